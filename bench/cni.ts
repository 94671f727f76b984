/**
 * knit's CNI plugins against the Go reference plugins, side by side in one run, in a
 * private lab:
 *
 *   scripts/lab-run node_modules/.bin/bun bench/cni.ts [--rounds N] [--parallel N] [--parallel-rounds N] [--in-process]
 *       [--auto-agent [--linger S]]
 *
 * 1. Sequential ADD+DEL of one container: knit (bridge driver, knit IPAM, ipMasq) against the
 *    reference bridge + host-local with ipMasq. Rounds alternate which goes first, so both
 *    see the same machine load; the verdict is the median (target: knit <= 0.7x).
 * 2. N concurrent ADDs, then N concurrent DELs (default 50), same pairing (target <= 0.5x).
 * 3. Where the time of one knit ADD (and DEL) goes: runtime start and exit (wall clock minus
 *    what the plugin measured from its first line), module loading, store, each engine phase,
 *    and how many kernel tool processes it ran and how long they took. An ADD runs no
 *    firewall command at all: masquerade is a rule of the network, made once.
 *
 * Both sides run as libcni runs them (test/cni-libcni.ts), from a process inside the knit
 * host's namespace (this file again, with --inner), so nothing but the plugins is timed.
 * knit's plugins are the ones `knit install` writes into a CNI bin dir (KNIT_BENCH_CNI_DIR=DIR
 * uses plugins already installed in DIR instead). The knit agent runs (as on a host with
 * DNS), so knit's plugin processes hand their invocations to it (docs/cni.md "Two paths");
 * `--in-process` makes them run each invocation themselves (KNIT_CNI_AGENT=0). With
 * `--auto-agent` no agent is started beforehand: the plugins start one on demand, as on a host
 * without the service, which lingers `--linger` seconds (default 30; 0: it stops after every
 * DEL and the next ADD starts another). The report says which path the traced calls took.
 */
import { readFileSync } from "node:fs";
import { loadavg } from "node:os";
import { join } from "node:path";
import { Lab, REPO_ROOT, inLab, runInLab } from "../src/lab/lab.ts";
import { CniRuntime, type ConfList, type RuntimeConf } from "../test/cni-libcni.ts";

function argValue(name: string, dflt: number): number {
  const i = process.argv.indexOf(`--${name}`);
  const v = i >= 0 ? Number(process.argv[i + 1]) : dflt;
  if (!Number.isFinite(v) || v <= 0) throw new Error(`--${name} needs a positive number`);
  return v;
}

const median = (xs: readonly number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  return s.length % 2 ? (s[mid] ?? 0) : ((s[mid - 1] ?? 0) + (s[mid] ?? 0)) / 2;
};
const fmt = (n: number, digits = 1): string => n.toFixed(digits);

/** What the inner process is told. */
interface InnerSpec {
  knitDir: string;
  stateDir: string;
  /** The lab host's name in knit's store (KNIT_HOST, as its CLI has it). */
  host: string;
  labDir: string;
  netns: string[];
  rounds: number;
  parallel: number;
  parallelRounds: number;
  /** Run knit's invocations in the plugin processes (KNIT_CNI_AGENT=0), not in the agent. */
  inProcess: boolean;
  /**
   * No agent started beforehand: the plugins start one on demand, which lingers
   * KNIT_AGENT_LINGER seconds (`--auto-agent [--linger S]`, default 30) after the last DEL.
   */
  autoAgent?: { linger: string };
}

interface InnerResult {
  seq: { knit: number[]; ref: number[] };
  /** CPU (ms, summed over the sequential pairs) of all processes of each side. */
  seqCpu: { knit: { user: number; sys: number; n: number }; ref: { user: number; sys: number; n: number } };
  par: { knit: { add: number; del: number; cpu: number }[]; ref: { add: number; del: number; cpu: number }[] };
  traces: { add: Trace[]; del: Trace[]; addWall: number[]; delWall: number[] };
}

/** A `knit-cni-trace` line: durations and counts, the path and why (src/cni/trace.ts). */
type Trace = Record<string, number | string>;

function lists(spec: InnerSpec): { knit: ConfList; ref: ConfList } {
  return {
    knit: {
      cniVersion: "1.0.0",
      name: "kbench",
      plugins: [{ type: "knit", bridge: "kbench0", ipMasq: true, ipam: { type: "knit-ipam", ranges: [[{ subnet: "10.70.0.0/16" }]] } }],
    },
    ref: {
      cniVersion: "1.0.0",
      name: "rbench",
      plugins: [{ type: "bridge", bridge: "rbench0", isGateway: true, ipMasq: true, ipam: { type: "host-local", dataDir: join(spec.labDir, "_host-local"), ranges: [[{ subnet: "10.71.0.0/16" }]] } }],
    },
  };
}

/** Runs plugins directly (this process is inside the host's namespace). */
function directExec(traceInto?: string[]): ConstructorParameters<typeof CniRuntime>[1] {
  return async (argv, stdin, env) => {
    const proc = Bun.spawn([...argv], { env: { ...process.env, ...env }, stdin: new TextEncoder().encode(stdin), stdout: "pipe", stderr: "pipe" });
    const [stdout, stderr, code] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
    if (traceInto) for (const line of stderr.split("\n")) if (line.startsWith("knit-cni-trace ")) traceInto.push(line.slice(15));
    return { code, stdout, stderr };
  };
}

async function timedPair(rt: CniRuntime, list: ConfList, att: RuntimeConf): Promise<number> {
  const t = performance.now();
  await rt.add(list, att);
  await rt.del(list, att);
  return performance.now() - t;
}

/** CPU time (ms) so far, user and system. */
type CpuClock = () => { user: number; sys: number };

/**
 * CPU time (user + system, ms) of this process's waited-for children and their own children
 * so far: the plugins, and what they ran (host-local, iptables). 10 ms ticks, so only sums
 * over many calls mean anything.
 */
const childCpu: CpuClock = () => {
  const f = readFileSync("/proc/self/stat", "utf8").split(") ")[1]?.split(" ") ?? [];
  return { user: (Number(f[13]) * 1000) / CLOCK_TICKS, sys: (Number(f[14]) * 1000) / CLOCK_TICKS };
};

/**
 * The plugins' CPU and the knit agent's (its own and its reaped children's: the `ip`
 * processes that delete links), for knit's side: invocations handed to the agent run there.
 * The agent is not this process's child, so it is read by the PID in its agent.pid.
 */
function withAgentCpu(stateDir: string): CpuClock {
  let pid: number | undefined;
  try {
    pid = (JSON.parse(readFileSync(join(stateDir, "agent.pid"), "utf8")) as { pid?: number }).pid;
  } catch {
    pid = undefined;
  }
  return () => {
    const c = childCpu();
    if (pid === undefined) return c;
    let f: string[];
    try {
      const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
      f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    } catch {
      return c;
    }
    const ms = (i: number): number => (Number(f[i]) * 1000) / CLOCK_TICKS;
    return { user: c.user + ms(11) + ms(13), sys: c.sys + ms(12) + ms(14) };
  };
}

/** A sequential ADD+DEL, and the CPU `clock` counted meanwhile, added to `cpu`. */
async function cpuPair(rt: CniRuntime, list: ConfList, att: RuntimeConf, cpu: { user: number; sys: number; n: number }, clock: CpuClock): Promise<number> {
  const c0 = clock();
  const ms = await timedPair(rt, list, att);
  const c1 = clock();
  cpu.user += c1.user - c0.user;
  cpu.sys += c1.sys - c0.sys;
  cpu.n++;
  return ms;
}
const CLOCK_TICKS = 100;

async function parallel(rt: CniRuntime, list: ConfList, atts: readonly RuntimeConf[], clock: CpuClock): Promise<{ add: number; del: number; cpu: number }> {
  const total = (): number => {
    const c = clock();
    return c.user + c.sys;
  };
  const cpu0 = total();
  const t0 = performance.now();
  await Promise.all(atts.map((a) => rt.add(list, a)));
  const t1 = performance.now();
  await Promise.all(atts.map((a) => rt.del(list, a)));
  return { add: t1 - t0, del: performance.now() - t1, cpu: total() - cpu0 };
}

/** `--inner SPEC_JSON`: the measurements, inside the knit host's namespace. */
async function inner(spec: InnerSpec): Promise<InnerResult> {
  const { knit, ref } = lists(spec);
  // The agent runs (started by the outer process): an ADD only checks that it is there.
  const env = {
    KNIT_STATE_DIR: spec.stateDir,
    KNIT_HOST: spec.host,
    ...(spec.inProcess ? { KNIT_CNI_AGENT: "0" } : {}),
    ...(spec.autoAgent ? { KNIT_AGENT_LINGER: spec.autoAgent.linger } : {}),
  };
  const rtKnit = new CniRuntime([spec.knitDir], directExec(), env);
  const rtRef = new CniRuntime(["/usr/lib/cni"], directExec(), env);
  const att = (i: number): RuntimeConf => ({ containerId: `bench${i}`, netns: spec.netns[i] ?? "", ifname: "eth0" });
  // Warm up: knit creates its network on the first ADD, the reference its bridge.
  await timedPair(rtKnit, knit, att(0));
  await timedPair(rtRef, ref, att(0));
  // (After the warm-up: an agent started on demand runs by now, unless it lingers 0 s.)
  const knitCpu = withAgentCpu(spec.stateDir);
  const out: InnerResult = { seqCpu: { knit: { user: 0, sys: 0, n: 0 }, ref: { user: 0, sys: 0, n: 0 } }, seq: { knit: [], ref: [] }, par: { knit: [], ref: [] }, traces: { add: [], del: [], addWall: [], delWall: [] } };
  for (let r = 0; r < spec.rounds; r++) {
    if (r % 2 === 0) {
      out.seq.knit.push(await cpuPair(rtKnit, knit, att(0), out.seqCpu.knit, knitCpu));
      out.seq.ref.push(await cpuPair(rtRef, ref, att(0), out.seqCpu.ref, childCpu));
    } else {
      out.seq.ref.push(await cpuPair(rtRef, ref, att(0), out.seqCpu.ref, childCpu));
      out.seq.knit.push(await cpuPair(rtKnit, knit, att(0), out.seqCpu.knit, knitCpu));
    }
  }
  const many = Array.from({ length: spec.parallel }, (_, i) => att(i));
  for (let r = 0; r < spec.parallelRounds; r++) {
    if (r % 2 === 0) {
      out.par.knit.push(await parallel(rtKnit, knit, many, knitCpu));
      out.par.ref.push(await parallel(rtRef, ref, many, childCpu));
    } else {
      out.par.ref.push(await parallel(rtRef, ref, many, childCpu));
      out.par.knit.push(await parallel(rtKnit, knit, many, knitCpu));
    }
  }
  // One ADD and one DEL, traced, a few times.
  const lines: string[] = [];
  const traced = new CniRuntime([spec.knitDir], directExec(lines), { ...env, KNIT_CNI_TRACE: "1" });
  for (let i = 0; i < 7; i++) {
    let t = performance.now();
    await traced.add(knit, att(0));
    out.traces.addWall.push(performance.now() - t);
    t = performance.now();
    await traced.del(knit, att(0));
    out.traces.delWall.push(performance.now() - t);
  }
  for (const [i, l] of lines.entries()) (i % 2 === 0 ? out.traces.add : out.traces.del).push(JSON.parse(l) as Trace);
  return out;
}

/** Median of each numeric field over traces. */
function medianTrace(traces: readonly Trace[]): Record<string, number> {
  const keys = [...new Set(traces.flatMap((t) => Object.keys(t).filter((k) => typeof t[k] === "number")))];
  return Object.fromEntries(keys.map((k) => [k, median(traces.map((t) => (typeof t[k] === "number" ? t[k] : 0)))]));
}

/** Which paths the traced calls took, e.g. "agent (14 of 14)" or "in-process: KNIT_CNI_AGENT=0 (14 of 14)". */
function pathsTaken(traces: readonly Trace[]): string {
  const counts = new Map<string, number>();
  for (const t of traces) {
    const key = `${String(t.path ?? "unknown")}${t.reason ? `: ${String(t.reason)}` : ""}`;
    counts.set(key, (counts.get(key) ?? 0) + 1);
  }
  return [...counts].map(([k, n]) => `${k} (${n} of ${traces.length})`).join(", ");
}

async function outer(): Promise<void> {
  const rounds = argValue("rounds", 21);
  const par = argValue("parallel", 50);
  const parRounds = argValue("parallel-rounds", 3);
  const inProcess = process.argv.includes("--in-process");
  const li = process.argv.indexOf("--linger");
  const linger = li >= 0 ? (process.argv[li + 1] ?? "") : "30";
  if (!/^\d+(\.\d+)?$/.test(linger)) throw new Error("--linger needs a number of seconds");
  const autoAgent = process.argv.includes("--auto-agent") ? { linger } : undefined;
  const lab = await Lab.create("bcni");
  try {
    const h = await lab.host("h");
    const knitDir = process.env.KNIT_BENCH_CNI_DIR || join(lab.dir, "_cni-bin");
    if (!process.env.KNIT_BENCH_CNI_DIR) await h.knitOk(["install", "--cni-bin-dir", knitDir]);
    const agent = autoAgent ? undefined : h.spawnKnit(["agent"]);
    const netns = [];
    for (let i = 0; i < par; i++) netns.push((await lab.ns(`c${i}`)).path);
    for (let i = 0; agent && i < 100 && (await h.knit(["agent", "status"])).code !== 0; i++) await Bun.sleep(50);
    const spec: InnerSpec = { knitDir, stateDir: h.stateDir, host: h.knitEnv().KNIT_HOST ?? "", labDir: lab.dir, netns, rounds, parallel: par, parallelRounds: parRounds, inProcess, ...(autoAgent ? { autoAgent } : {}) };
    const r = await lab.exec(h, [process.execPath, join(REPO_ROOT, "bench", "cni.ts"), "--inner", JSON.stringify(spec)], { timeoutMs: 1_800_000 });
    const res = JSON.parse(r.stdout) as InnerResult;
    report(res, spec);
    await h.knit(["network", "rm", "kbench"]);
    if (agent) await agent.stop();
    else await h.knit(["agent", "stop"]); // the one started on demand, if it lingers
  } finally {
    await lab.cleanup();
  }
}

function report(res: InnerResult, spec: InnerSpec): void {
  const k = median(res.seq.knit);
  const f = median(res.seq.ref);
  const lines: string[] = [];
  lines.push(`knit CNI vs reference plugins (${spec.rounds} rounds; load average ${loadavg().map((l) => fmt(l, 2)).join(" ")})`);
  lines.push(`knit's path (traced calls): ${pathsTaken([...res.traces.add, ...res.traces.del])}`);
  lines.push(`knit's agent: ${spec.autoAgent ? `started on demand by the plugins, linger ${spec.autoAgent.linger} s (CPU counts the agent running after the warm-up only)` : "started beforehand (a service)"}`);
  lines.push("");
  lines.push("1. sequential ADD+DEL, one container, bridge + IPAM + masquerade (median ms)");
  lines.push(`   knit (knit + knit-ipam, ipMasq)              ${fmt(k)}`);
  lines.push(`   reference (bridge + host-local, ipMasq)      ${fmt(f)}`);
  lines.push(`   ratio knit/reference                         ${fmt(k / f, 2)}x   (target <= 0.7x)`);
  const per = (c: { user: number; sys: number; n: number }): string => `${fmt((c.user + c.sys) / c.n)} (user ${fmt(c.user / c.n)}, system ${fmt(c.sys / c.n)})`;
  lines.push(`   CPU per ADD+DEL, all processes (knit's: its plugin processes and the agent): knit ${per(res.seqCpu.knit)}, reference ${per(res.seqCpu.ref)}`);
  const pk = res.par.knit.map((p) => p.add + p.del);
  const pf = res.par.ref.map((p) => p.add + p.del);
  lines.push("");
  lines.push(`2. ${spec.parallel} concurrent ADDs, then ${spec.parallel} concurrent DELs (median of ${spec.parallelRounds}, ms)`);
  lines.push(`   knit       ADDs ${fmt(median(res.par.knit.map((p) => p.add)))}  DELs ${fmt(median(res.par.knit.map((p) => p.del)))}  total ${fmt(median(pk))}`);
  lines.push(`   reference  ADDs ${fmt(median(res.par.ref.map((p) => p.add)))}  DELs ${fmt(median(res.par.ref.map((p) => p.del)))}  total ${fmt(median(pf))}`);
  lines.push(`   ratio knit/reference                         ${fmt(median(pk) / median(pf), 2)}x   (target <= 0.5x)`);
  const cpuK = median(res.par.knit.map((p) => p.cpu / spec.parallel));
  const cpuF = median(res.par.ref.map((p) => p.cpu / spec.parallel));
  lines.push(`   CPU per ADD+DEL (all processes)  knit ${fmt(cpuK)}  reference ${fmt(cpuF)}  ratio ${fmt(cpuK / cpuF, 2)}x`);
  const add = medianTrace(res.traces.add);
  const del = medianTrace(res.traces.del);
  const addWall = median(res.traces.addWall);
  const delWall = median(res.traces.delWall);
  const phases = (t: Record<string, number>): string =>
    Object.entries(t)
      .filter(([key]) => !["inProcess", "kernelCalls", "kernelMs", "netlinkCalls", "netlinkMs", "agentMs", "handoffMs"].includes(key))
      .map(([key, v]) => `${key} ${fmt(v)}`)
      .join(", ");
  // On the agent path: the plugin process's own part around the handoff, then the agent's.
  const split = (t: Record<string, number>): string =>
    t.agentMs === undefined ? `knit ${fmt(t.inProcess ?? 0)}` : `plugin process ${fmt(t.handoffMs ?? 0)} + agent ${fmt(t.agentMs)}`;
  lines.push("");
  lines.push("3. where the time of one knit ADD / DEL goes (median of 7, ms)");
  lines.push(`   ADD  wall ${fmt(addWall)} = runtime start+exit ${fmt(addWall - (add.inProcess ?? 0))} + ${split(add)}`);
  lines.push(`        knit: ${phases(add)}`);
  lines.push(`        kernel: ${add.kernelCalls ?? 0} processes, ${fmt(add.kernelMs ?? 0)} ms; ${add.netlinkCalls ?? 0} netlink requests, ${fmt(add.netlinkMs ?? 0)} ms; firewall: none (masquerade is the network's rule)`);
  lines.push(`   DEL  wall ${fmt(delWall)} = runtime start+exit ${fmt(delWall - (del.inProcess ?? 0))} + ${split(del)}`);
  lines.push(`        knit: ${phases(del)}`);
  lines.push(`        kernel: ${del.kernelCalls ?? 0} processes, ${fmt(del.kernelMs ?? 0)} ms; ${del.netlinkCalls ?? 0} netlink requests, ${fmt(del.netlinkMs ?? 0)} ms; firewall: none`);
  console.log(lines.join("\n"));
}

const at = process.argv.indexOf("--inner");
if (at >= 0) {
  const out = await inner(JSON.parse(process.argv[at + 1] ?? "{}") as InnerSpec);
  console.log(JSON.stringify(out));
} else if (!inLab()) {
  process.exit(await runInLab([process.execPath, ...process.argv.slice(1)]));
} else {
  await outer();
}
