/**
 * Benchmark of the macvlan driver, in a private lab:
 *
 *   scripts/lab-run node_modules/.bin/bun bench/macvlan.ts [--seconds N] [--rounds N] [--attach N]
 *
 * 1. TCP throughput (iperf3) from a container on a macvlan network to a plain LAN machine,
 *    against the host itself sending to the same machine over the same parent interface, in
 *    the same run. Each round runs both back to back (alternating which goes first), so that
 *    both see the same machine load; the verdict is the median of the rounds' ratios
 *    (target: >= 95%).
 * 2. Attach and detach time of an existing namespace on a macvlan network against a bridge
 *    network: in the engine (connectSandbox / disconnectSandbox, run by this file with
 *    `--inner` inside the knit host's namespace, so no CLI start-up is counted; also the
 *    number of processes each spawns), and as whole CLI commands.
 *
 *   lan (bridge) ─┬─ h (knit host) eth1 192.168.100.11   macvlan parent
 *                 └─ m (LAN machine) 192.168.100.50     iperf3 server
 */
import { loadavg } from "node:os";
import { join } from "node:path";
import { Lab, REPO_ROOT, type LabHost, type NetnsRef } from "../src/lab/lab.ts";
import { openSqliteStore } from "../src/store/sqlite.ts";
import { resolveContainer } from "../src/engine/containers.ts";
import { connectSandbox, disconnectSandbox } from "../src/engine/endpoints.ts";
import { execStats } from "../src/kernel/exec.ts";

function argValue(name: string, dflt: number): number {
  const i = process.argv.indexOf(`--${name}`);
  const v = i >= 0 ? Number(process.argv[i + 1]) : dflt;
  if (!Number.isFinite(v) || v <= 0) throw new Error(`--${name} needs a positive number`);
  return v;
}

const SECONDS = argValue("seconds", 3);
const ROUNDS = argValue("rounds", 7);
const ATTACH = argValue("attach", 10);

const median = (xs: readonly number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  return s.length % 2 ? (s[mid] ?? 0) : ((s[mid - 1] ?? 0) + (s[mid] ?? 0)) / 2;
};
const fmt = (n: number, digits = 1): string => n.toFixed(digits);

interface IperfResult {
  end?: { sum_received?: { bits_per_second?: number } };
  error?: string;
}

/** One iperf3 run from `from` to the server; returns Gbit/s received. */
async function iperf(lab: Lab, from: NetnsRef, server: string): Promise<number> {
  const r = await lab.exec(from, ["iperf3", "-c", server, "-t", String(SECONDS), "-J"], { check: false, timeoutMs: (SECONDS + 20) * 1000 });
  const res = JSON.parse(r.stdout || "{}") as IperfResult;
  const bps = res.end?.sum_received?.bits_per_second;
  if (r.code !== 0 || bps === undefined) throw new Error(`iperf3 failed: ${res.error ?? r.stderr}`);
  return bps / 1e9;
}

/** Wall time of one knit command, in ms; throws when it fails. */
async function timed(host: LabHost, args: readonly string[]): Promise<number> {
  const t = performance.now();
  await host.knitOk(args);
  return performance.now() - t;
}

/** Engine-level timings, as the inner process prints them. */
interface InnerResult {
  connect: number[];
  disconnect: number[];
  connectSpawns: number;
  disconnectSpawns: number;
}

/**
 * `--inner NET NETNS N STATEDIR`: inside the knit host's namespace, connect and disconnect
 * NETNS N times through the engine and print the timings as JSON.
 */
async function inner(args: readonly string[]): Promise<void> {
  const [net = "", nsName = "", count = "1", stateDir = ""] = args;
  const engine = { store: await openSqliteStore(stateDir), stateDir };
  const out: InnerResult = { connect: [], disconnect: [], connectSpawns: 0, disconnectSpawns: 0 };
  try {
    for (let i = 0; i < Number(count); i++) {
      const sb = await resolveContainer(engine, nsName);
      let spawns = execStats.spawns;
      let t = performance.now();
      await connectSandbox(engine, net, sb);
      out.connect.push(performance.now() - t);
      out.connectSpawns = execStats.spawns - spawns;
      spawns = execStats.spawns;
      t = performance.now();
      await disconnectSandbox(engine, net, sb);
      out.disconnect.push(performance.now() - t);
      out.disconnectSpawns = execStats.spawns - spawns;
    }
  } finally {
    await engine.store.close();
  }
  console.log(JSON.stringify(out));
}

async function main(): Promise<void> {
  const lab = await Lab.create("bm");
  try {
    const lan = await lab.lan("lan");
    const h = await lab.host("h");
    const m = await lab.ns("m");
    await lab.plug(h, lan, { ifname: "eth1", addresses: ["192.168.100.11/24"] });
    await lab.plug(m, lan, { ifname: "eth0", addresses: ["192.168.100.50/24"] });
    await h.knitOk(["network", "create", "-d", "macvlan", "--subnet", "192.168.100.0/24", "--gateway", "192.168.100.1", "--ip-range", "192.168.100.64/26", "-o", "parent=eth1", "mv"]);
    await h.knitOk(["network", "create", "--subnet", "10.55.0.0/16", "br"]);
    await h.knitOk(["run", "-d", "--name", "c", "--network", "mv", "--", "sleep", "100000"]);
    const view = (JSON.parse((await h.knitOk(["inspect", "c"])).stdout) as { NetworkSettings: { SandboxKey: string } }[])[0];
    if (!view) throw new Error("no sandbox");
    const c: NetnsRef = { path: view.NetworkSettings.SandboxKey };

    const server = lab.spawn(m, ["iperf3", "-s", "-p", "5201"]);
    await lab.waitListening(m, 5201);
    if (!(await lab.waitPing(c, "192.168.100.50")) || !(await lab.waitPing(h, "192.168.100.50"))) throw new Error("LAN machine unreachable");

    console.log(`TCP throughput to a LAN machine, ${ROUNDS} rounds of ${SECONDS} s each (iperf3, Gbit/s; load average ${loadavg().map((x) => fmt(x, 2)).join(" ")})`);
    const host: number[] = [];
    const ctr: number[] = [];
    const ratios: number[] = [];
    for (let i = 0; i < ROUNDS; i++) {
      // Alternate which goes first, so that neither always runs right after the other.
      const [first, second] = i % 2 === 0 ? [h, c] : [c, h];
      const a = await iperf(lab, first, "192.168.100.50");
      const b = await iperf(lab, second, "192.168.100.50");
      const [hv, cv] = i % 2 === 0 ? [a, b] : [b, a];
      host.push(hv);
      ctr.push(cv);
      ratios.push(cv / hv);
      console.log(`  round ${i + 1}: host ${fmt(hv, 2)}  container ${fmt(cv, 2)}  (${fmt((cv / hv) * 100)}%)`);
    }
    await server.stop();
    // The verdict uses the paired ratios: each round's two runs see the same machine load,
    // while the load (other work on the machine) may drift from round to round.
    const ratio = median(ratios);
    console.log(`  median: host ${fmt(median(host), 2)}  container (macvlan) ${fmt(median(ctr), 2)}  (ratio of medians ${fmt((median(ctr) / median(host)) * 100)}%)`);
    console.log(`  container / host, median of the rounds: ${fmt(ratio * 100)}% (target >= 95%): ${ratio >= 0.95 ? "OK" : "BELOW TARGET"}`);

    console.log(`\nattach/detach of an existing namespace, ${ATTACH} times each (median ms)`);
    const ns = await lab.ns("x");
    for (const net of ["br", "mv"]) {
      const r = await lab.exec(h, [process.execPath, join(REPO_ROOT, "bench", "macvlan.ts"), "--inner", net, ns.name, String(ATTACH), h.stateDir], { env: h.knitEnv() });
      const res = JSON.parse(r.stdout.trim().split("\n").pop() ?? "{}") as InnerResult;
      const conn: number[] = [];
      const disc: number[] = [];
      for (let i = 0; i < ATTACH; i++) {
        conn.push(await timed(h, ["network", "connect", net, ns.name]));
        disc.push(await timed(h, ["network", "disconnect", net, ns.name]));
      }
      const name = net === "br" ? "bridge" : "macvlan";
      console.log(
        `  ${name.padEnd(8)} engine: connect ${fmt(median(res.connect))} (${res.connectSpawns} processes)  disconnect ${fmt(median(res.disconnect))} (${res.disconnectSpawns} processes)` +
          `   CLI: connect ${fmt(median(conn))}  disconnect ${fmt(median(disc))}`,
      );
    }
    const base = (await Promise.all([0, 1, 2, 3, 4].map(() => timed(h, ["network", "ls", "-q"])))).sort((a, b) => a - b)[2] ?? 0;
    console.log(`  (CLI start-up alone, knit network ls: ${fmt(base)} ms; machine load average ${loadavg().map((x) => fmt(x, 2)).join(" ")})`);

    await h.knitOk(["rm", "-f", "c"]);
    await h.knitOk(["network", "rm", "mv", "br"]);
  } finally {
    await lab.cleanup();
  }
}

const innerAt = process.argv.indexOf("--inner");
if (innerAt >= 0) await inner(process.argv.slice(innerAt + 1));
else await main();
