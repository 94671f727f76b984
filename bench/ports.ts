/**
 * Published ports, side by side in one run (inside the private lab):
 *
 *   scripts/lab-run node_modules/.bin/bun bench/ports.ts [--rounds N] [--seconds S]
 *
 * 1. Publish and unpublish 100 ports: `knit run -d -p 20000-20099:20000-20099` and its
 *    `knit rm -f`, against the same commands without -p (the difference is what the 100
 *    ports cost: claims, one nft transaction with 100 DNAT rules, the socket probes). Also
 *    one more port published while those 100 are in place, against one port on an empty host.
 * 2. Throughput of one TCP stream (iperf3) from a LAN machine through the published port
 *    (DNAT) against straight to the sandbox's address (plain forwarding via the same host;
 *    knit drops that path for unpublished ports, so the benchmark opens it for the client),
 *    and from the host itself likewise (through its LAN address, and through 127.0.0.1,
 *    which also masquerades). Runs alternate, medians are compared.
 *
 *   lan 10.10.0.0/24 ─┬─ h1 10.10.0.11     knit host, network "bench" 172.31.0.0/24
 *                     └─ client 10.10.0.50  (route to 172.31.0.0/24 via h1 for the direct runs)
 *
 * Only ratios mean anything: absolute figures depend on the machine and its load.
 */
import { Lab, type LabHost, type NetnsRef } from "../src/lab/lab.ts";

const args = process.argv.slice(2);
const option = (name: string, dflt: number): number => {
  const i = args.indexOf(`--${name}`);
  const v = i >= 0 ? Number(args[i + 1]) : dflt;
  return Number.isFinite(v) && v > 0 ? v : dflt;
};
const ROUNDS = option("rounds", 5);
const SECONDS = option("seconds", 2);
/** The DNS agent is not what is measured here. */
const ENV = { KNIT_AGENT_AUTOSTART: "0" };

const median = (xs: readonly number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? (s[m] ?? NaN) : ((s[m - 1] ?? NaN) + (s[m] ?? NaN)) / 2;
};
const ms = (x: number): string => `${x.toFixed(0).padStart(6)} ms`;

async function timed(h: LabHost, argv: readonly string[]): Promise<{ millis: number; stdout: string }> {
  const t = performance.now();
  const r = await h.knitOk(argv, { env: ENV });
  return { millis: performance.now() - t, stdout: r.stdout.trim() };
}

/** Median time of `knit run -d` with the given -p values, and of the `knit rm -f` after it. */
async function runRm(h: LabHost, publish: readonly string[]): Promise<{ run: number; rm: number }> {
  const runs: number[] = [];
  const rms: number[] = [];
  for (let i = 0; i < ROUNDS; i++) {
    const r = await timed(h, ["run", "-d", "--network", "bench", ...publish.flatMap((p) => ["-p", p]), "--", "sleep", "1000"]);
    runs.push(r.millis);
    rms.push((await timed(h, ["rm", "-f", r.stdout])).millis);
  }
  return { run: median(runs), rm: median(rms) };
}

interface IperfResult {
  end: { sum_received: { bits_per_second: number } };
}

/** One iperf3 run from a namespace; Gbit/s received. */
async function iperf(lab: Lab, from: NetnsRef, addr: string, port: number): Promise<number> {
  const r = await lab.exec(from, ["iperf3", "-J", "-c", addr, "-p", String(port), "-t", String(SECONDS)], { timeoutMs: (SECONDS + 20) * 1000 });
  return (JSON.parse(r.stdout) as IperfResult).end.sum_received.bits_per_second / 1e9;
}

async function main(): Promise<void> {
  const lab = await Lab.create("bp");
  try {
    const lan = await lab.lan("lan");
    const h1 = await lab.host("h1");
    const client = await lab.ns("client");
    await lab.plug(h1, lan, { ifname: "eth0", addresses: ["10.10.0.11/24"] });
    await lab.plug(client, lan, { ifname: "eth0", addresses: ["10.10.0.50/24"] });
    await lab.route(client, "172.31.0.0/24", "10.10.0.11");
    await h1.knitOk(["network", "create", "--subnet", "172.31.0.0/24", "bench"], { env: ENV });
    await runRm(h1, []); // warm up caches (bridge, firewall table, Bun's transpiler cache)

    console.log(`# publish / unpublish (median of ${ROUNDS})`);
    const none = await runRm(h1, []);
    const hundred = await runRm(h1, ["20000-20099:20000-20099"]);
    const one = await runRm(h1, ["30000:80"]);
    console.log(`run -d, no ports         ${ms(none.run)}    rm -f ${ms(none.rm)}`);
    console.log(`run -d, 1 port           ${ms(one.run)}    rm -f ${ms(one.rm)}`);
    console.log(`run -d, 100 ports        ${ms(hundred.run)}    rm -f ${ms(hundred.rm)}`);
    console.log(`=> publishing 100 ports costs ${ms(hundred.run - none.run)}, unpublishing ${ms(hundred.rm - none.rm)} (${((hundred.run - none.run) / 100).toFixed(2)} ms per port)`);
    const holder = await timed(h1, ["run", "-d", "--network", "bench", "-p", "20000-20099:20000-20099", "--", "sleep", "1000"]);
    const oneMore = await runRm(h1, ["30000:80"]);
    await timed(h1, ["rm", "-f", holder.stdout]);
    console.log(`run -d, 1 port while 100 are published ${ms(oneMore.run)} (x${(oneMore.run / one.run).toFixed(2)} of an empty host), rm -f ${ms(oneMore.rm)}`);

    console.log(`\n# one TCP stream, iperf3 -t ${SECONDS} (median of ${ROUNDS})`);
    const server = await timed(h1, ["run", "-d", "--name", "iperf", "--network", "bench", "-p", "5201:5201", "--", "iperf3", "-s"]);
    const view = (JSON.parse((await h1.knitOk(["inspect", server.stdout])).stdout) as { NetworkSettings: { SandboxKey: string; Networks: Record<string, { IPAddress: string }> } }[])[0];
    const sbIp = view?.NetworkSettings.Networks.bench?.IPAddress ?? "";
    await lab.waitListening({ path: view?.NetworkSettings.SandboxKey ?? "" }, 5201);
    // knit, like Docker since 28, drops connections from outside its bridges to a sandbox
    // port that is not published ("knit: unpublished" in its forward chain). The direct
    // baseline needs that path open: one accept for the LAN client, put in front of it in
    // knit's own chain (what a routed gateway mode would allow). Nothing rebuilds the table
    // while the iperf sandbox runs; its rm afterwards rebuilds it without this rule.
    await lab.exec(h1, ["nft", "insert", "rule", "inet", "knit", "forward", "ip", "saddr", "10.10.0.50", "ip", "daddr", sbIp, "tcp", "dport", "5201", "accept"]);
    // Each round measures every path once, direct and published back to back in alternating
    // order; a path's ratio is the median of its per-round ratios to the direct run from the
    // same machine, which cancels most of the drift of a busy host.
    const paths = [
      { label: "LAN machine -> 10.10.0.11:5201 (published)", from: client, addr: "10.10.0.11", base: "lan" },
      { label: `LAN machine -> ${sbIp}:5201 (direct)`, from: client, addr: sbIp, base: "lan" },
      { label: "host -> 10.10.0.11:5201 (published)", from: h1 as NetnsRef, addr: "10.10.0.11", base: "host" },
      { label: "host -> 127.0.0.1:5201 (published, masqueraded)", from: h1 as NetnsRef, addr: "127.0.0.1", base: "host" },
      { label: `host -> ${sbIp}:5201 (direct)`, from: h1 as NetnsRef, addr: sbIp, base: "host" },
    ];
    const samples = paths.map(() => [] as number[]);
    for (let i = 0; i < ROUNDS; i++) {
      const order = paths.map((_, k) => k);
      if (i % 2) order.reverse();
      for (const k of order) {
        const p = paths[k];
        if (p) samples[k]?.push(await iperf(lab, p.from, p.addr, 5201));
      }
    }
    await timed(h1, ["rm", "-f", server.stdout]);
    for (const [k, p] of paths.entries()) {
      const xs = samples[k] ?? [];
      const directIndex = paths.findIndex((q) => q.base === p.base && q.addr === sbIp);
      const direct = samples[directIndex] ?? [];
      const ratio = k === directIndex ? "" : `   ratio to direct ${median(xs.map((x, j) => x / (direct[j] ?? NaN))).toFixed(3)}`;
      console.log(`${p.label.padEnd(52)} ${median(xs).toFixed(2).padStart(6)} Gbit/s  [${Math.min(...xs).toFixed(2)}..${Math.max(...xs).toFixed(2)}]${ratio}`);
    }
    await h1.knitOk(["network", "rm", "bench"], { env: ENV });
  } finally {
    await lab.cleanup();
  }
}

await main();
