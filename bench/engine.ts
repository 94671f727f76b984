/**
 * Benchmark of knit's engine against Docker's (dockerd 20.10, Debian), side by side in one
 * lab host, through both command lines:
 *
 *   scripts/lab-run node_modules/.bin/bun bench/engine.ts [--quick] [--rounds N] [--scale N]
 *
 *   a. connect + disconnect of a running sandbox / container to a user bridge network
 *      (both live on a user network of their own, with DNS: Docker 20.10 refuses to connect a
 *      `--network none` container to anything). Target ratio knit/docker <= 1.0.
 *   b. network create + rm of a bridge network. Target ratio <= 0.5. Also knit on a lab host
 *      without Docker (no DOCKER-USER chain to keep).
 *   c. where the time of one knit command goes: process and runtime start, module loading,
 *      store, kernel commands (count and milliseconds per tool), firewall; from the CLI's own
 *      trace (KNIT_TRACE=1, see src/cli/main.ts).
 *   d. scale: SCALE (default 1000) `knit run -d` sandboxes on one /16 bridge network. Time per
 *      run around the 1st, SCALE/10th and SCALE-th, and the time of a pure attach (connect +
 *      disconnect of a probe `ip netns` namespace) at those points: both must stay flat. The
 *      attaches alternate with attaches on a control host (a second knit host whose network
 *      holds one sandbox), so that growth with SCALE can be told from the machine's load.
 *      Peak RSS of every knit process (/usr/bin/time -f %M), the agent's VmHWM, and the
 *      machine's kernel memory growth; then everything is removed, timed.
 *
 * Rounds of (a) and (b) alternate knit and Docker (and swap which goes first), so drift on
 * this shared machine hits both sides alike; medians, p90 and the ratio of medians are
 * printed and written to bench/results/engine-<time>.json. `--quick`: 8 rounds, scale 100.
 */
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { KNIT_BIN, Lab, type ExecResult, type LabHost, type LabNode, inLab, runInLab } from "../src/lab/lab.ts";
import { type DockerDaemon, dockerMissing, startDocker } from "../src/lab/docker.ts";
import { readAgentRecord } from "../src/agent/pidfile.ts";
import {
  argFlag,
  argNumber,
  interleaved,
  loadAverage,
  median,
  meminfoKb,
  printTable,
  procCpuSeconds,
  procStatusKb,
  ratio,
  round,
  summarize,
  timeMs,
  timed,
  writeResults,
  type Summary,
} from "./lib.ts";

if (!inLab()) process.exit(await runInLab([process.execPath, import.meta.path, ...process.argv.slice(2)]));

const QUICK = argFlag("quick");
const ROUNDS = argNumber("rounds", QUICK ? 8 : 30);
const SCALE = argNumber("scale", QUICK ? 100 : 1000);
const TRACE_RUNS = QUICK ? 5 : 15;
/** Attaches per point on the big host and on the control host, alternately. */
const CONTROL_PROBES = 9;

const log = (msg: string): void => {
  process.stderr.write(`[engine bench ${new Date().toISOString().slice(11, 19)} load ${loadAverage()[0]}] ${msg}\n`);
};

function check(r: ExecResult, what: string): ExecResult {
  if (r.code !== 0) throw new Error(`${what} failed (exit ${r.code}): ${r.stderr.trim() || r.stdout.trim()}`);
  return r;
}

/** Run knit on `host`; throws on failure. */
async function knit(host: LabHost, args: readonly string[], env: Record<string, string> = {}): Promise<ExecResult> {
  return check(await host.knit(args, { env }), `knit ${args.join(" ")}`);
}

/** Milliseconds of one successful knit command. */
const knitMs = (host: LabHost, args: readonly string[]): Promise<number> => timeMs(() => knit(host, args));

/** Milliseconds of one successful docker command. */
const dockerMs = (d: DockerDaemon, args: readonly string[]): Promise<number> => timeMs(() => d.dockerOk(args));

/** Median, p90 and the raw count of a sample list, rounded for printing. */
function brief(xs: readonly number[]): Summary {
  const s = summarize(xs);
  return { n: s.n, median: round(s.median), p90: round(s.p90), min: round(s.min), max: round(s.max), mean: round(s.mean) };
}

// ---- (a) and (b): side by side ----------------------------------------------------------

interface PairResult {
  knit: { total: Summary; first: Summary; second: Summary };
  docker: { total: Summary; first: Summary; second: Summary };
  ratio: number;
  ratioP90: number;
  extra?: Record<string, Summary>;
}

/**
 * A two-step operation (connect then disconnect, create then rm) measured on both sides,
 * interleaved. `extra` variants (knit elsewhere) run in the same rounds.
 */
async function sideBySide(
  label: string,
  knitSteps: (i: number) => [() => Promise<number>, () => Promise<number>],
  dockerSteps: (i: number) => [() => Promise<number>, () => Promise<number>],
  extra: Record<string, (i: number) => Promise<number>> = {},
): Promise<PairResult> {
  const parts = { knit: [[], []] as number[][], docker: [[], []] as number[][] };
  let round_ = 0;
  const two = (side: "knit" | "docker", steps: (i: number) => [() => Promise<number>, () => Promise<number>]) => async (): Promise<number> => {
    const [a, b] = steps(round_);
    const t1 = await a();
    const t2 = await b();
    parts[side][0]?.push(t1);
    parts[side][1]?.push(t2);
    return t1 + t2;
  };
  const samples = await interleaved(
    [
      { name: "knit", sample: two("knit", knitSteps) },
      { name: "docker", sample: two("docker", dockerSteps) },
      ...Object.entries(extra).map(([name, f]) => ({ name, sample: () => f(round_) })),
    ],
    ROUNDS,
    (i) => {
      round_ = i + 1;
      if ((i + 1) % 10 === 0) log(`${label}: ${i + 1}/${ROUNDS} rounds`);
    },
  );
  const k = samples.knit ?? [];
  const d = samples.docker ?? [];
  const result: PairResult = {
    knit: { total: brief(k), first: brief(parts.knit[0] ?? []), second: brief(parts.knit[1] ?? []) },
    docker: { total: brief(d), first: brief(parts.docker[0] ?? []), second: brief(parts.docker[1] ?? []) },
    ratio: ratio(median(k), median(d)),
    ratioP90: ratio(summarize(k).p90, summarize(d).p90),
  };
  if (Object.keys(extra).length) result.extra = Object.fromEntries(Object.keys(extra).map((n) => [n, brief(samples[n] ?? [])]));
  return result;
}

// ---- (c): where the time goes -----------------------------------------------------------

/** What KNIT_TRACE=1 prints (src/cli/main.ts). */
interface KnitTrace {
  marks: Record<string, number>;
  store: Record<string, { n: number; ms: number }>;
  exec: { spawns: number; ms: number; byTool: Record<string, { n: number; ms: number }> };
  commands: string[];
}

function parseTrace(stderr: string): KnitTrace {
  const line = stderr.split("\n").find((l) => l.startsWith("knit-trace: "));
  if (!line) throw new Error(`no knit-trace line in:\n${stderr}`);
  return JSON.parse(line.slice("knit-trace: ".length)) as KnitTrace;
}

/** Medians over traced runs of one command: the phases of its wall time. */
interface Breakdown {
  command: string;
  runs: number;
  wallMs: number;
  /** Spawning the process (nsenter, sh, bun) and Bun's own start, until the first module runs, plus exit. */
  processMs: number;
  /** Loading and evaluating knit's modules. */
  loadMs: number;
  /** Opening the store (and the predefined networks check). */
  openMs: number;
  /** The command itself. */
  commandMs: number;
  /** Housekeeping after it (resolv.conf refresh, DNS agent check). */
  afterMs: number;
  storeCalls: number;
  storeMs: number;
  spawns: number;
  kernelMs: number;
  byTool: Record<string, { n: number; ms: number }>;
  /** nft + iptables + ip6tables (and their -restore). */
  firewallMs: number;
  /** One traced run's command list, as an example. */
  example: string[];
}

async function traced(host: LabHost, label: string, runs: number, setup: (i: number) => Promise<void>, args: (i: number) => string[], teardown: (i: number) => Promise<void>): Promise<Breakdown> {
  const rows: { wall: number; t: KnitTrace }[] = [];
  for (let i = 0; i < runs; i++) {
    await setup(i);
    const { ms, value } = await timed(() => knit(host, args(i), { KNIT_TRACE: "1" }));
    rows.push({ wall: ms, t: parseTrace(value.stderr) });
    await teardown(i);
  }
  const m = (f: (r: { wall: number; t: KnitTrace }) => number): number => round(median(rows.map(f)), 2);
  const mark = (t: KnitTrace, k: string, dflt: number): number => t.marks[k] ?? dflt;
  const tools = [...new Set(rows.flatMap((r) => Object.keys(r.t.exec.byTool)))];
  const byTool = Object.fromEntries(
    tools.map((tool) => [tool, { n: m((r) => r.t.exec.byTool[tool]?.n ?? 0), ms: m((r) => r.t.exec.byTool[tool]?.ms ?? 0) }]),
  );
  const fw = (t: KnitTrace): number =>
    ["nft", "iptables", "ip6tables", "iptables-restore", "ip6tables-restore"].reduce((a, k) => a + (t.exec.byTool[k]?.ms ?? 0), 0);
  const load = (t: KnitTrace): number => mark(t, "load", 0);
  const open = (t: KnitTrace): number => mark(t, "open", load(t));
  return {
    command: label,
    runs,
    wallMs: m((r) => r.wall),
    processMs: m((r) => r.wall - mark(r.t, "close", 0)),
    loadMs: m((r) => load(r.t)),
    openMs: m((r) => open(r.t) - load(r.t)),
    commandMs: m((r) => mark(r.t, "command", 0) - open(r.t)),
    afterMs: m((r) => mark(r.t, "after", 0) - mark(r.t, "command", 0)),
    storeCalls: m((r) => Object.values(r.t.store).reduce((a, s) => a + s.n, 0)),
    storeMs: m((r) => Object.values(r.t.store).reduce((a, s) => a + s.ms, 0)),
    spawns: m((r) => r.t.exec.spawns),
    kernelMs: m((r) => r.t.exec.ms),
    byTool,
    firewallMs: m((r) => fw(r.t)),
    example: rows[rows.length - 1]?.t.commands ?? [],
  };
}

// ---- (d): scale -------------------------------------------------------------------------

/** A knit command under /usr/bin/time: wall milliseconds and the process's peak RSS in kB. */
async function knitWithRss(host: LabHost, args: readonly string[], env: Record<string, string> = {}): Promise<{ ms: number; rssKb: number; stderr: string }> {
  const argv = ["/usr/bin/time", "-f", "knit-maxrss-kb %M", KNIT_BIN, ...args];
  const { ms, value } = await timed(() => host.lab.exec(host, argv, { env: host.knitEnv(env), check: false }));
  check(value, `knit ${args.join(" ")}`);
  const m = /knit-maxrss-kb (\d+)/.exec(value.stderr);
  return { ms, rssKb: m ? Number(m[1]) : NaN, stderr: value.stderr };
}

/** Kernel memory of the whole machine (kB): slab, per-CPU, kernel stacks, page tables. */
function kernelMemKb(): Record<string, number> {
  const mi = meminfoKb();
  const pick = ["Slab", "SUnreclaim", "Percpu", "KernelStack", "PageTables", "MemAvailable"];
  return Object.fromEntries(pick.map((k) => [k, mi[k] ?? NaN]));
}

/** Phases of one traced command (ms) and its store calls. */
interface AttachTrace {
  loadMs: number;
  openMs: number;
  commandMs: number;
  afterMs: number;
  closeMs: number;
  storeCalls: number;
  storeMs: number;
  kernelMs: number;
}

function tracePhases(t: KnitTrace): AttachTrace {
  return {
    loadMs: round(t.marks.load ?? 0),
    openMs: round((t.marks.open ?? 0) - (t.marks.load ?? 0)),
    closeMs: round((t.marks.close ?? 0) - (t.marks.after ?? 0)),
    commandMs: round((t.marks.command ?? 0) - (t.marks.open ?? 0)),
    afterMs: round((t.marks.after ?? 0) - (t.marks.command ?? 0)),
    storeCalls: Object.values(t.store).reduce((a, x) => a + x.n, 0),
    storeMs: round(Object.values(t.store).reduce((a, x) => a + x.ms, 0)),
    kernelMs: round(t.exec.ms),
  };
}

interface ScaleResult {
  sandboxes: number;
  how: string;
  /** Median wall time of `knit run -d` around each point (the runs in a window of 10). */
  runMs: Record<string, Summary>;
  /** Median connect + disconnect of a probe netns with N sandboxes on the network. */
  attachMs: Record<string, { connect: Summary; disconnect: Summary }>;
  flatness: { run: number; connect: number };
  /**
   * The control host's attach at each point (one sandbox on its network, measured alternately
   * with the big host's), and big / control.
   */
  control: Record<string, { connect: Summary; disconnect: Summary; ratio: { connect: number; disconnect: number } }>;
  /** (big / control at N) / (big / control at 1): growth with N that the machine's load cannot explain. */
  controlFlatness: { connect: number; disconnect: number };
  knitPeakRssKb: { median: number; max: number };
  /** The DNS agent after the ramp: memory, and CPU used since it started (before the ramp). */
  agent: { vmHwmKb?: number; vmRssKb?: number; cpuSeconds?: number };
  kernelMemDeltaKb: Record<string, number>;
  kernelMemPerSandboxKb: number;
  bridgePorts: number;
  pingOk: boolean;
  /** Phases of one traced probe connect and disconnect at each point. */
  attachTrace: Record<string, { connect: AttachTrace; disconnect: AttachTrace }>;
  /** Phases of the traced `knit run` that made the sandbox of each point. */
  runTrace: Record<string, AttachTrace & { wallMs: number }>;
  /** How many DNS agent processes served the host during the ramp (1: never restarted). */
  agentStarts: number;
  /** Sandboxes `knit ps -a` listed before the teardown (should be `sandboxes`). */
  sandboxesListed: number;
  /** Error lines of the batch `knit rm`. */
  teardownErrors: string[];
  teardown: { oneByOne: Summary; oneByOneCount: number; batchMs: number; batchCount: number; batchPerSandboxMs: number; networkRmMs: number };
}

async function scale(lab: Lab, host: LabHost, probe: LabNode): Promise<ScaleResult> {
  const n = SCALE;
  const mid = Math.max(2, Math.round(n / 10));
  await knit(host, ["network", "create", "--subnet", "10.100.0.0/16", "big"]);
  // A control: another knit host whose network keeps one sandbox. Its attaches alternate with
  // the big host's at each point, so the two see the same machine at the same moment; the
  // ratio big/control at N against the one at 1 is growth that machine load cannot explain.
  const ctl = await lab.host("ctl");
  const ctlProbe = await lab.ns("ctlprobe");
  await knit(ctl, ["network", "create", "--subnet", "10.100.0.0/16", "big"]);
  await knit(ctl, ["run", "-d", "--name", "c1", "--network", "big", "--", "sleep", "36000"]);
  const control: ScaleResult["control"] = {};
  const points = [1, mid, n];
  const runMs: number[] = [];
  const rss: number[] = [];
  const attach: ScaleResult["attachMs"] = {};
  const traces: ScaleResult["attachTrace"] = {};
  const runTraces: ScaleResult["runTrace"] = {};
  let agentPid = 0;
  let agentStarts = 0;
  const probeAttach = async (at: number): Promise<void> => {
    const c: number[] = [];
    const d: number[] = [];
    const cc: number[] = [];
    const cd: number[] = [];
    const big = async (): Promise<void> => {
      c.push(await knitMs(host, ["network", "connect", "big", probe.name]));
      d.push(await knitMs(host, ["network", "disconnect", "big", probe.name]));
    };
    const small = async (): Promise<void> => {
      cc.push(await knitMs(ctl, ["network", "connect", "big", ctlProbe.name]));
      cd.push(await knitMs(ctl, ["network", "disconnect", "big", ctlProbe.name]));
    };
    for (let i = 0; i < CONTROL_PROBES; i++) {
      if (i % 2 === 0) {
        await big();
        await small();
      } else {
        await small();
        await big();
      }
    }
    attach[String(at)] = { connect: brief(c), disconnect: brief(d) };
    control[String(at)] = {
      connect: brief(cc),
      disconnect: brief(cd),
      ratio: { connect: ratio(median(c), median(cc)), disconnect: ratio(median(d), median(cd)) },
    };
    // One traced pair: which phase grows with the number of sandboxes.
    const tc = tracePhases(parseTrace((await knit(host, ["network", "connect", "big", probe.name], { KNIT_TRACE: "1" })).stderr));
    const td = tracePhases(parseTrace((await knit(host, ["network", "disconnect", "big", probe.name], { KNIT_TRACE: "1" })).stderr));
    traces[String(at)] = { connect: tc, disconnect: td };
    log(`scale: attach with ${at} sandboxes: connect ${round(median(c))} ms, disconnect ${round(median(d))} ms (control host at the same time: ${round(median(cc))} / ${round(median(cd))}); after-command phase ${tc.afterMs} / ${td.afterMs} ms`);
  };
  const memBefore = kernelMemKb();
  for (let i = 1; i <= n; i++) {
    const at = points.includes(i);
    const r = await knitWithRss(host, ["run", "-d", "--name", `s${i}`, "--network", "big", "--", "sleep", "36000"], at ? { KNIT_TRACE: "1" } : {});
    runMs.push(r.ms);
    rss.push(r.rssKb);
    if (at) runTraces[String(i)] = { wallMs: round(r.ms), ...tracePhases(parseTrace(r.stderr)) };
    const pid = readAgentRecord(host.stateDir)?.pid ?? 0;
    if (pid !== agentPid && pid !== 0) {
      agentStarts++;
      if (agentPid !== 0) log(`scale: the DNS agent changed from pid ${agentPid} to ${pid} after s${i}`);
    }
    agentPid = pid || agentPid;
    if (at) await probeAttach(i);
    if (i % 100 === 0) log(`scale: ${i}/${n} sandboxes, last run ${round(r.ms)} ms, peak RSS ${r.rssKb} kB`);
  }
  const memAfter = kernelMemKb();
  const agentRec = readAgentRecord(host.stateDir);
  const agent: ScaleResult["agent"] = {};
  if (agentRec) {
    const hwm = procStatusKb(agentRec.pid, "VmHWM");
    const rssNow = procStatusKb(agentRec.pid, "VmRSS");
    if (hwm !== undefined) agent.vmHwmKb = hwm;
    if (rssNow !== undefined) agent.vmRssKb = rssNow;
    const cpu = procCpuSeconds(agentRec.pid);
    if (cpu !== undefined) agent.cpuSeconds = cpu;
  }
  // The kernel's view: every sandbox has a port on the network's bridge, and traffic flows
  // between the first and the last.
  const netJson = JSON.parse(check(await host.knit(["network", "inspect", "big"]), "inspect big").stdout) as { Options: Record<string, string>; Id: string; Containers: Record<string, { Name: string; IPv4Address: string }> }[];
  const bridge = `br-${netJson[0]?.Id.slice(0, 12) ?? ""}`;
  const ports = JSON.parse((await host.exec(["ip", "-j", "link", "show", "master", bridge])).stdout || "[]") as unknown[];
  const addrOf = (name: string): string => Object.values(netJson[0]?.Containers ?? {}).find((c) => c.Name === name)?.IPv4Address.split("/")[0] ?? "";
  const last = JSON.parse((await knit(host, ["inspect", `s${n}`])).stdout) as { NetworkSettings: { SandboxKey: string } }[];
  const pingOk = await lab.ping({ path: last[0]?.NetworkSettings.SandboxKey ?? "" }, addrOf("s1"), { waitSec: 3 });

  const window = (at: number): number[] => runMs.slice(Math.max(0, Math.min(at - 5, n - 10)), Math.max(0, Math.min(at - 5, n - 10)) + 10);
  const runSummary = Object.fromEntries(points.map((p) => [String(p), brief(window(p))]));
  const delta = Object.fromEntries(Object.keys(memAfter).map((k) => [k, (memAfter[k] ?? 0) - (memBefore[k] ?? 0)]));
  const kernelGrowth = (delta.Slab ?? 0) + (delta.Percpu ?? 0) + (delta.KernelStack ?? 0) + (delta.PageTables ?? 0);

  const listed = (await knit(host, ["ps", "-a", "-q"])).stdout.split("\n").filter(Boolean).length;
  if (listed !== n + 1) log(`scale: knit ps -a lists ${listed} sandboxes, expected ${n + 1}`);

  // Teardown: the first tenth one by one (each its own knit rm), the rest in one command.
  const oneByOne: number[] = [];
  for (let i = 1; i <= mid; i++) oneByOne.push(await knitMs(host, ["rm", "-f", `s${i}`]));
  const rest = Array.from({ length: n - mid }, (_, k) => `s${mid + 1 + k}`);
  const batch = await timed(() => host.knit(["rm", "-f", ...rest]));
  const batchMs = rest.length ? batch.ms : 0;
  const teardownErrors = batch.value.stderr.split("\n").filter((l) => l.startsWith("Error"));
  if (teardownErrors.length) log(`scale: knit rm reported ${teardownErrors.length} errors: ${teardownErrors.slice(0, 3).join("; ")}`);
  const networkRmMs = await knitMs(host, ["network", "rm", "big"]);
  await knit(ctl, ["rm", "-f", "c1"]);
  await knit(ctl, ["network", "rm", "big"]);
  log(`scale: removed ${mid} one by one (median ${round(median(oneByOne))} ms), ${rest.length} in one knit rm (${round(batchMs)} ms), network rm ${round(networkRmMs)} ms`);

  const flat = (f: (p: string) => number): number => ratio(f(String(n)), f("1"));
  const ctlFlat = (k: "connect" | "disconnect"): number => ratio(control[String(n)]?.ratio[k] ?? NaN, control["1"]?.ratio[k] ?? NaN);
  return {
    sandboxes: n,
    how: "knit run -d --network big -- sleep (a real sandbox each: netns, veth, IPAM, files, process); attach = knit network connect/disconnect of a probe `ip netns` namespace",
    runMs: runSummary,
    attachMs: attach,
    flatness: { run: flat((p) => runSummary[p]?.median ?? NaN), connect: flat((p) => attach[p]?.connect.median ?? NaN) },
    control,
    controlFlatness: { connect: ctlFlat("connect"), disconnect: ctlFlat("disconnect") },
    knitPeakRssKb: { median: median(rss), max: Math.max(...rss) },
    agent,
    kernelMemDeltaKb: delta,
    kernelMemPerSandboxKb: round(kernelGrowth / n),
    bridgePorts: ports.length,
    pingOk,
    attachTrace: traces,
    runTrace: runTraces,
    agentStarts,
    sandboxesListed: listed - 1,
    teardownErrors,
    teardown: { oneByOne: brief(oneByOne), oneByOneCount: mid, batchMs: round(batchMs), batchCount: rest.length, batchPerSandboxMs: round(rest.length ? batchMs / rest.length : 0, 2), networkRmMs: round(networkRmMs) },
  };
}

// ---- main ---------------------------------------------------------------------------------

async function startupFloors(lab: Lab, host: LabHost, d: DockerDaemon): Promise<Record<string, Summary>> {
  const empty = join(lab.dir, "_empty.ts");
  writeFileSync(empty, "");
  const samples = await interleaved(
    [
      { name: "bun empty.ts", sample: () => timeMs(() => host.exec([process.execPath, empty])) },
      { name: "knit version", sample: () => knitMs(host, ["version"]) },
      { name: "docker --version", sample: () => dockerMs(d, ["--version"]) },
      { name: "docker version (client + daemon)", sample: () => dockerMs(d, ["version", "--format", "{{.Server.Version}}"]) },
    ],
    ROUNDS,
  );
  return Object.fromEntries(Object.entries(samples).map(([k, v]) => [k, brief(v)]));
}

async function main(): Promise<void> {
  const missing = dockerMissing();
  if (missing) throw new Error(`the engine benchmark compares against Docker: ${missing}`);
  const loadStart = loadAverage();
  log(`rounds ${ROUNDS}, scale ${SCALE}`);
  const lab = await Lab.create("be");
  try {
    const host = await lab.host("h");
    const solo = await lab.host("solo");
    const probe = await lab.ns("probe");
    const d = await startDocker(host);
    await d.ensureBusyboxImage();
    log(`dockerd up after ${round(d.startMs)} ms`);

    // Steady state on both sides: a sandbox / container on a user network of its own (so the
    // DNS side, knit's agent and Docker's embedded server, is up), plus the network to join.
    await knit(host, ["network", "create", "kbase"]);
    await knit(host, ["network", "create", "kbench"]);
    await knit(host, ["run", "-d", "--name", "ks", "--network", "kbase", "--", "sleep", "36000"]);
    await d.dockerOk(["network", "create", "dbase"]);
    await d.dockerOk(["network", "create", "dbench"]);
    await d.dockerOk(["run", "-d", "--name", "dc", "--network", "dbase", "bb", "sleep", "36000"]);
    await knit(solo, ["network", "create", "warm"]);
    await knit(solo, ["network", "rm", "warm"]);

    // Warm up, and check that both really wire an interface in.
    for (let i = 0; i < 3; i++) {
      await knit(host, ["network", "connect", "kbench", "ks"]);
      if (i === 0) {
        const sb = JSON.parse((await knit(host, ["inspect", "ks"])).stdout) as { NetworkSettings: { SandboxKey: string; Networks: Record<string, { IPAddress: string; Gateway: string }> } }[];
        const ns = sb[0]?.NetworkSettings;
        const addrs = (await lab.exec({ path: ns?.SandboxKey ?? "" }, ["ip", "-o", "-4", "addr", "show", "eth1"])).stdout;
        if (!addrs.includes(ns?.Networks.kbench?.IPAddress ?? "?")) throw new Error(`knit connect did not configure eth1: ${addrs}`);
        if (!(await lab.ping({ path: ns?.SandboxKey ?? "" }, ns?.Networks.kbench?.Gateway ?? "", { waitSec: 3 }))) throw new Error("knit sandbox cannot reach kbench's gateway");
      }
      await knit(host, ["network", "disconnect", "kbench", "ks"]);
      await d.dockerOk(["network", "connect", "dbench", "dc"]);
      if (i === 0) {
        const r = await d.dockerOk(["exec", "dc", "ip", "-o", "-4", "addr", "show", "eth1"]);
        if (!r.stdout.includes("inet ")) throw new Error(`docker connect did not configure eth1: ${r.stdout}`);
      }
      await d.dockerOk(["network", "disconnect", "dbench", "dc"]);
    }

    log("startup floors");
    const floors = await startupFloors(lab, host, d);

    log("a. connect + disconnect");
    const connect = await sideBySide(
      "connect+disconnect",
      () => [() => knitMs(host, ["network", "connect", "kbench", "ks"]), () => knitMs(host, ["network", "disconnect", "kbench", "ks"])],
      () => [() => dockerMs(d, ["network", "connect", "dbench", "dc"]), () => dockerMs(d, ["network", "disconnect", "dbench", "dc"])],
    );

    log("b. create + rm");
    const create = await sideBySide(
      "create+rm",
      (i) => [() => knitMs(host, ["network", "create", `kx${i}`]), () => knitMs(host, ["network", "rm", `kx${i}`])],
      (i) => [() => dockerMs(d, ["network", "create", `dx${i}`]), () => dockerMs(d, ["network", "rm", `dx${i}`])],
      { "knit, host without Docker": async (i) => (await knitMs(solo, ["network", "create", `sx${i}`])) + (await knitMs(solo, ["network", "rm", `sx${i}`])) },
    );

    log("c. where the time goes");
    const noop = async (): Promise<void> => {};
    const breakdown = [
      await traced(host, "network connect", TRACE_RUNS, noop, () => ["network", "connect", "kbench", "ks"], async () => void (await knit(host, ["network", "disconnect", "kbench", "ks"]))),
      await traced(host, "network disconnect", TRACE_RUNS, async () => void (await knit(host, ["network", "connect", "kbench", "ks"])), () => ["network", "disconnect", "kbench", "ks"], noop),
      await traced(host, "network create", TRACE_RUNS, noop, (i) => ["network", "create", `tx${i}`], async (i) => void (await knit(host, ["network", "rm", `tx${i}`]))),
      await traced(host, "network rm", TRACE_RUNS, async (i) => void (await knit(host, ["network", "create", `ty${i}`])), (i) => ["network", "rm", `ty${i}`], noop),
      await traced(host, "version", TRACE_RUNS, noop, () => ["version"], noop),
    ];

    log(`d. scale to ${SCALE}`);
    const loadBeforeScale = loadAverage();
    const sc = await scale(lab, host, probe);

    await d.dockerOk(["rm", "-f", "dc"]);
    await d.dockerOk(["network", "rm", "dbase", "dbench"]);
    await knit(host, ["rm", "-f", "ks"]);
    await knit(host, ["network", "rm", "kbase", "kbench"]);
    await d.stop();
    const loadEnd = loadAverage();

    // ---- report ----
    const pairRow = (what: string, r: PairResult, target: string): (string | number)[] => [
      what,
      r.knit.total.median,
      r.knit.total.p90,
      r.docker.total.median,
      r.docker.total.p90,
      r.ratio,
      r.ratioP90,
      target,
    ];
    printTable(`Side by side, ${ROUNDS} interleaved rounds (ms; ratio = knit / docker)`, ["operation", "knit med", "knit p90", "docker med", "docker p90", "ratio", "ratio p90", "target"], [
      pairRow("connect + disconnect", connect, "<= 1.0"),
      ["  connect", connect.knit.first.median, connect.knit.first.p90, connect.docker.first.median, connect.docker.first.p90, ratio(connect.knit.first.median, connect.docker.first.median), ratio(connect.knit.first.p90, connect.docker.first.p90), ""],
      ["  disconnect", connect.knit.second.median, connect.knit.second.p90, connect.docker.second.median, connect.docker.second.p90, ratio(connect.knit.second.median, connect.docker.second.median), ratio(connect.knit.second.p90, connect.docker.second.p90), ""],
      pairRow("network create + rm", create, "<= 0.5"),
      ["  create", create.knit.first.median, create.knit.first.p90, create.docker.first.median, create.docker.first.p90, ratio(create.knit.first.median, create.docker.first.median), ratio(create.knit.first.p90, create.docker.first.p90), ""],
      ["  rm", create.knit.second.median, create.knit.second.p90, create.docker.second.median, create.docker.second.p90, ratio(create.knit.second.median, create.docker.second.median), ratio(create.knit.second.p90, create.docker.second.p90), ""],
      ...Object.entries(create.extra ?? {}).map(([k, s]) => [`create + rm, ${k}`, s.median, s.p90, create.docker.total.median, create.docker.total.p90, ratio(s.median, create.docker.total.median), ratio(s.p90, create.docker.total.p90), ""]),
    ]);
    printTable("Command line start (ms)", ["command", "median", "p90"], Object.entries(floors).map(([k, s]) => [k, s.median, s.p90]));
    printTable(
      `Where the time of one knit command goes (medians of ${TRACE_RUNS} traced runs, ms)`,
      ["command", "wall", "process", "modules", "store open", "command", "after", "store calls", "store ms", "spawns", "kernel ms", "netlink reqs", "netlink ms", "firewall ms"],
      breakdown.map((b) => [b.command, b.wallMs, b.processMs, b.loadMs, b.openMs, b.commandMs, b.afterMs, b.storeCalls, b.storeMs, b.spawns, b.kernelMs, b.byTool.netlink?.n ?? 0, b.byTool.netlink?.ms ?? 0, b.firewallMs]),
    );
    for (const b of breakdown) if (b.example.length) process.stdout.write(`  ${b.command}: ${b.example.join(" | ")}\n`);
    printTable(`Scale: ${sc.sandboxes} sandboxes on one /16 network (ms)`, ["sandboxes on the network", "knit run -d med", "p90", "connect med", "disconnect med"], Object.keys(sc.runMs).map((p) => [p, sc.runMs[p]?.median ?? NaN, sc.runMs[p]?.p90 ?? NaN, sc.attachMs[p]?.connect.median ?? NaN, sc.attachMs[p]?.disconnect.median ?? NaN]));
    process.stdout.write(
      [
        `  flatness (at ${sc.sandboxes} / at 1): run ${sc.flatness.run}, connect ${sc.flatness.connect}`,
        `  against a control host with one sandbox, attaching alternately at the same moments: ${Object.entries(sc.control)
          .map(([p, c]) => `at ${p}: connect ${c.connect.median} (x${c.ratio.connect}), disconnect ${c.disconnect.median} (x${c.ratio.disconnect})`)
          .join("; ")}; growth of big/control from 1 to ${sc.sandboxes}: connect ${sc.controlFlatness.connect}, disconnect ${sc.controlFlatness.disconnect}`,
        `  traced phases, command / after-command ms (store calls): ${Object.entries(sc.attachTrace)
          .map(([p, t]) => {
            const r = sc.runTrace[p];
            const run = r ? `run ${r.commandMs} / ${r.afterMs} (${r.storeCalls}) of ${r.wallMs} (modules ${r.loadMs}, store open ${r.openMs}), ` : "";
            return `at ${p}: ${run}connect ${t.connect.commandMs} / ${t.connect.afterMs} (${t.connect.storeCalls}), disconnect ${t.disconnect.commandMs} / ${t.disconnect.afterMs} (${t.disconnect.storeCalls})`;
          })
          .join("; ")}`,
        `  bridge ports ${sc.bridgePorts}; s${sc.sandboxes} pings s1: ${sc.pingOk}; sandboxes listed before teardown ${sc.sandboxesListed}; DNS agent processes ${sc.agentStarts}; teardown errors ${sc.teardownErrors.length}`,
        `  knit process peak RSS: median ${sc.knitPeakRssKb.median} kB, max ${sc.knitPeakRssKb.max} kB; agent VmHWM ${sc.agent.vmHwmKb ?? "?"} kB, VmRSS ${sc.agent.vmRssKb ?? "?"} kB, CPU ${sc.agent.cpuSeconds ?? "?"} s since it started (with the first DNS sandbox of the run)`,
        `  kernel memory growth (whole machine, noisy): ${JSON.stringify(sc.kernelMemDeltaKb)} kB, ~${sc.kernelMemPerSandboxKb} kB per sandbox`,
        `  teardown: ${sc.teardown.oneByOneCount} x knit rm: median ${sc.teardown.oneByOne.median} ms; ${sc.teardown.batchCount} in one knit rm: ${sc.teardown.batchMs} ms (${sc.teardown.batchPerSandboxMs} ms each); network rm ${sc.teardown.networkRmMs} ms`,
        `  load average: start ${loadStart.join(" ")}, before scale ${loadBeforeScale.join(" ")}, end ${loadEnd.join(" ")}`,
        "",
      ].join("\n"),
    );
    const path = writeResults("engine", {
      rounds: ROUNDS,
      quick: QUICK,
      load: { start: loadStart, beforeScale: loadBeforeScale, end: loadEnd },
      dockerStartMs: round(d.startMs),
      connectDisconnect: connect,
      createRm: create,
      startup: floors,
      breakdown,
      scale: sc,
    });
    process.stdout.write(`results: ${path}\n`);
  } finally {
    await lab.cleanup();
  }
}

await main();
