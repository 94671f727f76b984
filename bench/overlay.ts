/**
 * Benchmark of knit's overlay networks, in a private lab with two hosts and etcd
 * (src/demo/cluster-lab.ts):
 *
 *   scripts/lab-run node_modules/.bin/bun bench/overlay.ts [--seconds N] [--rounds N] [--runs N]
 *
 * 1. TCP throughput (iperf3, one stream) from a sandbox on host h1 to a sandbox on host h2
 *    over a knit overlay network, against the same kernel path built by hand in the same run
 *    on the same hosts: a bridge, a vxlan device (another VNI, same port 4789, same MTU 1450)
 *    with static FDB entries, veth pairs into two namespaces with static neighbours. Each
 *    round runs both back to back, alternating which goes first; the verdict is the median of
 *    the rounds' ratios (target: knit >= 95% of the hand-made path).
 * 2. Convergence: a sandbox "probe" runs on h2. Each of `--runs` times, `knit run -d --name
 *    cvN` starts a sandbox on h1 while probe pings `cvN` by name in a loop (each try a new
 *    ping: name lookup through knit's DNS on h2, then ICMP over the overlay). Reported: time
 *    from the start of `knit run` to the first answered ping, and from `knit run`'s return to
 *    it (0 when the ping was answered before the command returned), and from the moment the
 *    new endpoint was committed "ready" to the store (seen by a watch in this process) to it:
 *    the control plane's own share (h2's agent: DNS name table and FDB/neighbour entries; h1's
 *    CLI programs h1). p50 and p99; target: p99 < 200 ms.
 */
import { loadavg } from "node:os";
import { Lab, type NetnsRef } from "../src/lab/lab.ts";
import { ClusterLab, type ClusterHost } from "../src/demo/cluster-lab.ts";
import { argNumber, median, quantile, round, writeResults } from "./lib.ts";
import { keys, type Endpoint, type Sandbox } from "../src/model.ts";

const SECONDS = argNumber("seconds", 3);
const ROUNDS = argNumber("rounds", 5);
const RUNS = argNumber("runs", 50);
const fmt = (n: number, digits = 1): string => n.toFixed(digits);
const load = (): string => loadavg().map((x) => fmt(x, 2)).join(" ");

interface IperfResult {
  end?: { sum_received?: { bits_per_second?: number } };
  error?: string;
}

/** One iperf3 run from `from` to `server`; Gbit/s received. */
async function iperf(lab: Lab, from: NetnsRef, server: string): Promise<number> {
  const r = await lab.exec(from, ["iperf3", "-c", server, "-t", String(SECONDS), "-O", "1", "-J"], { check: false, timeoutMs: (SECONDS + 20) * 1000 });
  const res = JSON.parse(r.stdout || "{}") as IperfResult;
  const bps = res.end?.sum_received?.bits_per_second;
  if (r.code !== 0 || bps === undefined) throw new Error(`iperf3 to ${server} failed: ${res.error ?? r.stderr}`);
  return bps / 1e9;
}

/** The hand-made path: bridge + vxlan (VNI 9999) + static FDB on h1 and h2, one namespace behind each. */
async function handMade(lab: Lab, h1: ClusterHost, h2: ClusterHost): Promise<{ client: NetnsRef; server: NetnsRef; serverIp: string }> {
  const ends = [
    { h: h1, peer: h2, ns: await lab.ns("hand1"), ip: "10.201.0.1", mac: "02:aa:00:00:00:01" },
    { h: h2, peer: h1, ns: await lab.ns("hand2"), ip: "10.201.0.2", mac: "02:aa:00:00:00:02" },
  ] as const;
  for (const [i, e] of ends.entries()) {
    const other = ends[1 - i];
    if (!other) throw new Error("two ends");
    await lab.ipBatch(e.h.host, [
      "link add hbr type bridge",
      "link set dev hbr addrgenmode none",
      "link set dev hbr mtu 1450 up",
      `link add hvx type vxlan id 9999 dstport 4789 local ${e.h.address} dev eth0 nolearning`,
      "link set dev hvx addrgenmode none",
      "link set dev hvx mtu 1450 master hbr up",
      `link add hveth mtu 1450 type veth peer name eth0 mtu 1450 netns ${e.ns.name}`,
      "link set dev hveth master hbr up",
    ]);
    await lab.exec(e.h.host, ["bridge", "fdb", "add", other.mac, "dev", "hvx", "dst", e.peer.address, "self", "permanent"]);
    await lab.ipBatch(e.ns, [`link set dev eth0 address ${e.mac}`, `addr add ${e.ip}/24 dev eth0`, "link set dev eth0 up", `neigh add ${other.ip} lladdr ${other.mac} dev eth0 nud permanent`]);
  }
  lab.onCleanup("delete the hand-made vxlan", async () => {
    for (const e of ends) await lab.exec(e.h.host, ["ip", "link", "del", "hbr"], { check: false }).then(() => lab.exec(e.h.host, ["ip", "link", "del", "hvx"], { check: false }));
  });
  return { client: ends[0].ns, server: ends[1].ns, serverIp: ends[1].ip };
}

async function throughput(lab: Lab, c: ClusterLab, h1: ClusterHost, h2: ClusterHost): Promise<Record<string, unknown>> {
  await c.knitOk(h2, ["run", "-d", "--name", "srv", "--network", "bench", "--", "iperf3", "-s", "-p", "5201"]);
  await c.knitOk(h1, ["run", "-d", "--name", "cli", "--network", "bench", "--", "sleep", "100000"]);
  const srv = await c.sandbox(h2, "srv");
  const cli = await c.sandbox(h1, "cli");
  const knitServer = srv.ip["bench"] ?? "?";
  await lab.waitListening(srv.ns, 5201);
  const hand = await handMade(lab, h1, h2);
  const handServer = lab.spawn(hand.server, ["iperf3", "-s", "-p", "5201"]);
  await lab.waitListening(hand.server, 5201);
  if (!(await lab.waitPing(cli.ns, knitServer)) || !(await lab.waitPing(hand.client, hand.serverIp))) throw new Error("a path does not work");

  console.log(`\nTCP throughput across hosts, ${ROUNDS} rounds of ${SECONDS} s (iperf3, one stream, Gbit/s; load ${load()})`);
  const knit: number[] = [];
  const byHand: number[] = [];
  const ratios: number[] = [];
  for (let i = 0; i < ROUNDS; i++) {
    const knitFirst = i % 2 === 0;
    const a = await iperf(lab, knitFirst ? cli.ns : hand.client, knitFirst ? knitServer : hand.serverIp);
    const b = await iperf(lab, knitFirst ? hand.client : cli.ns, knitFirst ? hand.serverIp : knitServer);
    const [k, h] = knitFirst ? [a, b] : [b, a];
    knit.push(k);
    byHand.push(h);
    ratios.push(k / h);
    console.log(`  round ${i + 1}: knit overlay ${fmt(k, 2)}  hand-made vxlan ${fmt(h, 2)}  (${fmt((k / h) * 100)}%)`);
  }
  await handServer.stop();
  const ratio = median(ratios);
  console.log(`  median: knit ${fmt(median(knit), 2)}  hand-made ${fmt(median(byHand), 2)}  (ratio of medians ${fmt((median(knit) / median(byHand)) * 100)}%)`);
  console.log(`  knit / hand-made, median of the rounds: ${fmt(ratio * 100)}% (target >= 95%): ${ratio >= 0.95 ? "OK" : "BELOW TARGET"}`);
  await c.knitOk(h2, ["rm", "-f", "srv"]);
  await c.knitOk(h1, ["rm", "-f", "cli"]);
  return { knitGbps: knit.map((x) => round(x, 3)), handGbps: byHand.map((x) => round(x, 3)), ratios: ratios.map((x) => round(x, 3)), medianRatio: round(ratio, 3) };
}

async function convergence(lab: Lab, c: ClusterLab, h1: ClusterHost, h2: ClusterHost): Promise<Record<string, unknown>> {
  await c.knitOk(h2, ["run", "-d", "--name", "probe", "--network", "bench", "--", "sleep", "100000"]);
  const probe = await c.sandbox(h2, "probe");
  console.log(`\nConvergence: knit run on h1 -> first answered ping by name from h2, ${RUNS} runs (load ${load()})`);
  const total: number[] = [];
  const after: number[] = [];
  const fromReady: number[] = [];
  const cli: number[] = [];
  // When each sandbox's endpoint on the network was committed ready, as a watch sees it.
  const names = new Map<string, string>();
  const readyAt = new Map<string, number>();
  const watch = c.store.watch("", 0, {
    onEvents(events) {
      const now = performance.now();
      for (const e of events) {
        if (e.type !== "put" || e.value === undefined) continue;
        if (e.key.startsWith(keys.sandboxes())) {
          const sb = JSON.parse(e.value) as Sandbox;
          names.set(sb.id, sb.name);
        } else if (e.key.startsWith(keys.endpoints())) {
          const ep = JSON.parse(e.value) as Endpoint;
          const name = names.get(ep.sandboxId);
          if (ep.state === "ready" && name && !readyAt.has(name) && ep.host === h1.label) readyAt.set(name, now);
        }
      }
    },
  });
  for (let i = 0; i < RUNS; i++) {
    const name = `cv${i}`;
    const t0 = performance.now();
    let returned = 0;
    const run = c.knitOk(h1, ["run", "-d", "--name", name, "--network", "bench", "--", "sleep", "100000"]).then(() => {
      returned = performance.now();
    });
    let answered = 0;
    while (performance.now() - t0 < 10_000) {
      const r = await c.inSandbox(probe.pid, ["ping", "-n", "-c1", "-W1", name]);
      if (r.code === 0) {
        answered = performance.now();
        break;
      }
      await Bun.sleep(5);
    }
    await run;
    if (!answered) throw new Error(`${name} never answered`);
    total.push(answered - t0);
    after.push(Math.max(0, answered - returned));
    cli.push(returned - t0);
    const ready = readyAt.get(name);
    if (ready !== undefined) fromReady.push(Math.max(0, answered - ready));
    await c.knitOk(h1, ["rm", "-f", name]);
  }
  const p = (xs: number[], q: number): number => round(quantile(xs, q), 1);
  console.log(`  knit run itself (CLI, on h1):           p50 ${p(cli, 0.5)} ms   p99 ${p(cli, 0.99)} ms`);
  console.log(`  from the start of knit run:             p50 ${p(total, 0.5)} ms   p99 ${p(total, 0.99)} ms`);
  console.log(`  from knit run's return:                 p50 ${p(after, 0.5)} ms   p99 ${p(after, 0.99)} ms (target p99 < 200 ms): ${quantile(after, 0.99) < 200 ? "OK" : "ABOVE TARGET"}`);
  console.log(`  from the endpoint's ready commit (${fromReady.length} seen): p50 ${p(fromReady, 0.5)} ms   p99 ${p(fromReady, 0.99)} ms (target p99 < 200 ms): ${quantile(fromReady, 0.99) < 200 ? "OK" : "ABOVE TARGET"}`);
  watch.close();
  await c.knitOk(h2, ["rm", "-f", "probe"]);
  return {
    runs: RUNS,
    cliMs: { p50: p(cli, 0.5), p99: p(cli, 0.99) },
    fromStartMs: { p50: p(total, 0.5), p99: p(total, 0.99) },
    afterReturnMs: { p50: p(after, 0.5), p99: p(after, 0.99) },
    fromReadyCommitMs: { p50: p(fromReady, 0.5), p99: p(fromReady, 0.99), n: fromReady.length },
    samplesAfterReturnMs: after.map((x) => round(x, 1)),
  };
}

async function main(): Promise<void> {
  const lab = await Lab.create("bov");
  try {
    const c = await ClusterLab.create(lab, { hosts: 2, internet: false, lanMachine: false, etcdNet: 83, logLevel: "warn" });
    const [h1, h2] = c.hosts as [ClusterHost, ClusterHost];
    await c.knitOk(h1, ["network", "create", "-d", "overlay", "--subnet", "10.200.0.0/24", "bench"]);
    const tput = await throughput(lab, c, h1, h2);
    const conv = await convergence(lab, c, h1, h2);
    await c.knitOk(h1, ["network", "rm", "bench"]);
    for (const h of c.hosts) await c.knit(h, ["network", "rm", "docker_gwbridge"]);
    const path = writeResults("overlay", { seconds: SECONDS, rounds: ROUNDS, throughput: tput, convergence: conv });
    console.log(`\nresults: ${path}`);
  } finally {
    await lab.cleanup();
  }
}

await main();
