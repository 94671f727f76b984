/**
 * Scale benchmark of knit's overlay control plane: N lab hosts, each running its own real
 * `knit agent --store etcd://...` (src/demo/cluster-lab.ts), E real sandboxes per host on one
 * overlay network, for N = 10, 25, 50 by default:
 *
 *   scripts/lab-run node_modules/.bin/bun bench/overlay-scale.ts [--hosts 10,25,50] [--endpoints 10]
 *       [--reps 10] [--concurrency 4] [--max-runnable 6] [--agent-batch 5] [--boost 10] [--lease-ttl 30]
 *       [--timeout 600]
 *
 * Per host count, in a fresh lab (one etcd, N hosts on one underlay LAN):
 *
 * 1. Bulk convergence. Every host gets E sandboxes (`knit run -d --network scale -- sleep`,
 *    each a namespace, a veth, an overlay address and a docker_gwbridge leg), all hosts at
 *    once: the N x E commands are interleaved across hosts (h1, h2, ... hN, h1, ...) and run
 *    `--concurrency` at a time (default 4), each started only when the machine's run queue
 *    (/proc/loadavg: runnable tasks) holds at most `--max-runnable` (default 6, 3 per core):
 *    every commit sets all N agents to work, and past that they only queue on the 2 cores,
 *    starve each other and (seen at 50 hosts) their etcd connections fail their keepalive and
 *    leases are lost. So the commands go as fast as the agents absorb them, no faster; the
 *    time the gate held them is reported. Measured: from the start until EVERY host's kernel
 *    holds, on its vxlan device, one FDB entry (MAC -> owner's underlay address) and one
 *    neighbour entry (IP -> MAC) for every endpoint of every other host. Each host's tables
 *    are followed from before the start by `bridge -t monitor fdb` and `ip -ts -f inet
 *    monitor neigh` in its namespace (boosted, see below: they stamp an event when they read
 *    it), so the time of each entry is the time the kernel reported it (no polling, no load
 *    from checking); at the end every host's `bridge -j fdb show` / `ip -j neigh show` must
 *    equal what the store says (ClusterLab.actualPeers vs expectedPeers), or the run fails.
 * 2. Incremental convergence. With everything in place, `--reps` times: one more sandbox on
 *    one host (a different host each time); per other host, the time from the endpoint's
 *    first commit to the store (seen by a watch in this process; agents program a peer from
 *    that commit on) and from the start of `knit run` to that host's FDB and neighbour entry
 *    (from the same monitors); p50/p99/max over hosts x reps, and the max per rep (the time
 *    until every host has it). The sandbox is then removed and every host must drop it.
 * 3. Memory: VmRSS and VmHWM (/proc/PID/status) of every agent (the Bun process itself: the
 *    PID in the host's agent.pid, checked to be the lab's agent process and to run bun), and
 *    of etcd; CPU seconds the agents and etcd used during the bulk phase.
 * 4. Growth: a table of all of this per host count, and the ratio of the largest to the
 *    smallest.
 *
 * The N agents stand for N machines but share this machine's 2 cores. etcd, which stands for
 * a machine of its own, the monitors and this process (both only take timestamps) run at nice
 * -`--boost` (default 10; 0 turns it off); the agents and every knit command run at 0. (Tried
 * and dropped: boosting the knit commands too starved the agents until their etcd connections
 * failed their keepalive and leases were lost; the agents at nice 10 lost leases as well.)
 * Everything one event costs all N agents together has to fit on 2 cores: the bulk time is
 * that total, and at 50 hosts a `knit run` can miss the store's 2 s deadline: it is then
 * removed and run again, counted and reported, as a user would. For the same reason the
 * agents' lease TTL is 30 s (`--lease-ttl`; knit's default is 10 s): an agent starved for
 * longer than the TTL drops out of the cluster, which is failure detection, not measured
 * here. Each agent's re-registrations (`knit agent status`) are reported: 0 means no lease
 * was lost.
 *
 * There is no external anchor: the point is how the figures grow from 10 to 50 hosts. A
 * convergence that does not complete within `--timeout` seconds fails the run (no number).
 */
import { closeSync, fstatSync, openSync, readdirSync, readFileSync, readSync } from "node:fs";
import { join } from "node:path";
import { type ExecResult, KNIT_BIN, Lab, type LabProcess, runCommand } from "../src/lab/lab.ts";
import { ClusterLab, type ClusterHost } from "../src/demo/cluster-lab.ts";
import { keys, type Endpoint } from "../src/model.ts";
import { argNumber, loadAverage, median, printTable, procCpuSeconds, procStatusKb, quantile, round, writeResults } from "./lib.ts";

const HOST_COUNTS = argList("hosts", [10, 25, 50]);
const ENDPOINTS = argNumber("endpoints", 10);
const REPS = argNumber("reps", 10);
const CONCURRENCY = argNumber("concurrency", 4);
const MAX_RUNNABLE = argNumber("max-runnable", 6);
const TIMEOUT_MS = argNumber("timeout", 600) * 1000;
/** Agents starting at the same time: each start loads Bun, the etcd client and the store on 2 cores, within the store's 2 s deadline. */
const AGENT_BATCH = argNumber("agent-batch", 5);
/** etcd, the monitors and this process run at nice -BOOST; the agents and the measured knit commands at 0 (see the file comment). */
const BOOST = argInt("boost", 10, 0, 20);
const LEASE_TTL = argNumber("lease-ttl", 30);
const NETWORK = "scale";
const SUBNET = "10.210.0.0/18";

const fmt = (n: number, digits = 1): string => (Number.isFinite(n) ? n.toFixed(digits) : "-");
const load = (): string => loadAverage().join(" ");
/** Wall-clock milliseconds with sub-millisecond precision (the monitors print wall-clock time). */
const wallNow = (): number => performance.timeOrigin + performance.now();
const mb = (kb: number | undefined): number => (kb === undefined ? NaN : round(kb / 1024, 1));

/** `--name N` as an integer in [min, max], or `dflt`. */
function argInt(name: string, dflt: number, min: number, max: number): number {
  const i = process.argv.indexOf(`--${name}`);
  if (i < 0) return dflt;
  const v = Number(process.argv[i + 1]);
  if (!Number.isInteger(v) || v < min || v > max) throw new Error(`--${name} needs an integer from ${min} to ${max}`);
  return v;
}

/** `--name 10,25,50` as a list of positive integers, or `dflt`. */
function argList(name: string, dflt: number[]): number[] {
  const i = process.argv.indexOf(`--${name}`);
  if (i < 0) return dflt;
  const xs = (process.argv[i + 1] ?? "").split(",").map(Number);
  if (xs.length === 0 || xs.some((x) => !Number.isInteger(x) || x < 2)) throw new Error(`--${name} needs a comma-separated list of integers >= 2`);
  return xs;
}

// ---- following a host's FDB and neighbour tables ----

const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

/** `Timestamp: Fri Nov 27 20:34:40 2026 627970 usec` (bridge -t, local time) in wall-clock ms. */
function parseBridgeStamp(line: string): number | undefined {
  const m = /^Timestamp: \w+ (\w+) +(\d+) (\d+):(\d+):(\d+) (\d+) (\d+) usec/.exec(line);
  if (!m) return undefined;
  const [, mon = "", d, h, mi, s, y, us] = m;
  return new Date(Number(y), MONTHS.indexOf(mon), Number(d), Number(h), Number(mi), Number(s)).getTime() + Number(us) / 1000;
}

/** `[2026-11-27T20:34:40.631908] ...` (ip -ts, local time): [wall-clock ms, rest of the line]. */
function parseIpStamp(line: string): [number, string] | undefined {
  const m = /^\[(\d+)-(\d+)-(\d+)T(\d+):(\d+):(\d+)\.(\d+)\] (.*)$/.exec(line);
  if (!m) return undefined;
  const [, y, mo, d, h, mi, s, frac = "0", rest = ""] = m;
  const ms = new Date(Number(y), Number(mo) - 1, Number(d), Number(h), Number(mi), Number(s)).getTime() + Number(`0.${frac}`) * 1000;
  return [ms, rest];
}

/** Whether an entry is in the table now, and since when (wall-clock ms of its last change). */
interface Presence {
  present: boolean;
  since: number;
}

/**
 * One host's vxlan FDB and neighbour table as its two monitors report them: FDB entries by
 * `MAC|dst`, neighbours by IP (with their MAC). Reads the monitors' log files incrementally.
 */
class TableFollower {
  readonly fdb = new Map<string, Presence>();
  readonly neigh = new Map<string, Presence & { mac: string }>();
  private readonly offsets = { fdb: 0, neigh: 0 };
  private readonly rests = { fdb: "", neigh: "" };
  private stamp = NaN;

  constructor(
    readonly h: ClusterHost,
    private readonly vx: string,
    readonly fdbMon: LabProcess,
    readonly neighMon: LabProcess,
  ) {}

  /** Read what the monitors wrote since the last call. */
  update(): void {
    for (const line of this.readLines("fdb", this.fdbMon.logFile)) this.fdbLine(line);
    for (const line of this.readLines("neigh", this.neighMon.logFile)) this.neighLine(line);
  }

  private readLines(which: "fdb" | "neigh", file: string): string[] {
    const fd = openSync(file, "r");
    try {
      const size = fstatSync(fd).size;
      const from = this.offsets[which];
      if (size <= from) return [];
      const buf = Buffer.alloc(size - from);
      const n = readSync(fd, buf, 0, buf.length, from);
      this.offsets[which] = from + n;
      const text = this.rests[which] + buf.subarray(0, n).toString("utf8");
      const lines = text.split("\n");
      this.rests[which] = lines.pop() ?? "";
      return lines;
    } finally {
      closeSync(fd);
    }
  }

  /** `bridge -t monitor fdb`: a Timestamp line, then `[Deleted ]MAC dev VX dst IP self permanent`. */
  private fdbLine(line: string): void {
    const t = parseBridgeStamp(line);
    if (t !== undefined) {
      this.stamp = t;
      return;
    }
    const m = /^(Deleted )?([0-9a-f:]{17}) dev (\S+) dst (\S+) /.exec(line);
    if (!m || m[3] !== this.vx) return;
    this.fdb.set(`${m[2] ?? ""}|${m[4] ?? ""}`, { present: m[1] === undefined, since: this.stamp });
  }

  /** `ip -ts -f inet monitor neigh`: `[T] [Deleted ]IP dev VX lladdr MAC STATE` (no lladdr: not usable). */
  private neighLine(line: string): void {
    const p = parseIpStamp(line);
    if (!p) return;
    const [t, rest] = p;
    const m = /^(Deleted )?(\S+) dev (\S+)(?: lladdr ([0-9a-f:]{17}))?/.exec(rest);
    if (!m || m[3] !== this.vx) return;
    const present = m[1] === undefined && m[4] !== undefined;
    this.neigh.set(m[2] ?? "", { present, since: t, mac: m[4] ?? "" });
  }

  /** When both entries of a remote endpoint were last made present, or undefined if one is missing. */
  presentSince(mac: string, dst: string, ip: string): number | undefined {
    const f = this.fdb.get(`${mac}|${dst}`);
    const n = this.neigh.get(ip);
    if (!f?.present || !n?.present || n.mac !== mac) return undefined;
    return Math.max(f.since, n.since);
  }

  /** When both entries of a remote endpoint were gone, or undefined while one is still there. */
  goneSince(mac: string, dst: string, ip: string): number | undefined {
    const f = this.fdb.get(`${mac}|${dst}`);
    const n = this.neigh.get(ip);
    if (!f || f.present || !n || (n.present && n.mac === mac)) return undefined;
    return Math.max(f.since, n.since);
  }
}

/** Start both monitors in a host's namespace and wait until they run (their own exec'd binary). */
async function follow(h: ClusterHost, netId: string): Promise<TableFollower> {
  const vx = `vx-${netId.slice(0, 12)}`;
  // At this process's nice value (-BOOST), like every command it runs.
  const fdbMon = h.host.spawn(["bridge", "-t", "monitor", "fdb"]);
  const neighMon = h.host.spawn(["ip", "-ts", "-f", "inet", "monitor", "neigh"]);
  const comm = (pid: number): string => {
    try {
      return readFileSync(`/proc/${pid}/comm`, "utf8").trim();
    } catch {
      return "";
    }
  };
  const ok = await waitForMs(() => comm(fdbMon.pid) === "bridge" && comm(neighMon.pid) === "ip", 10_000);
  if (!ok) throw new Error(`the monitors of ${h.label} did not start:\n${fdbMon.output()}${neighMon.output()}`);
  return new TableFollower(h, vx, fdbMon, neighMon);
}

async function waitForMs(pred: () => boolean, timeoutMs: number, intervalMs = 20): Promise<boolean> {
  const deadline = performance.now() + timeoutMs;
  while (!pred()) {
    if (performance.now() > deadline) return false;
    await Bun.sleep(intervalMs);
  }
  return true;
}

/**
 * Poll `followers` until each reports a time through `since` (recorded into `times` by host
 * label) or TIMEOUT_MS passes; true when every one did.
 */
function timesOnEvery(followers: readonly TableFollower[], times: Map<string, number>, since: (f: TableFollower) => number | undefined): Promise<boolean> {
  return waitForMs(() => {
    for (const f of followers) {
      if (times.has(f.h.label)) continue;
      f.update();
      const t = since(f);
      if (t !== undefined) times.set(f.h.label, t);
    }
    return times.size === followers.length;
  }, TIMEOUT_MS, 50);
}

// ---- the cluster ----

/** A remote endpoint as the peers must hold it. */
interface PeerWant {
  host: string;
  mac: string;
  ip: string;
  dst: string;
}

async function endpointsOf(c: ClusterLab, netId: string): Promise<Endpoint[]> {
  return (await c.store.list(keys.endpointsOf(netId))).items.map((kv) => JSON.parse(kv.value) as Endpoint);
}

function peerWant(ep: Endpoint, hosts: readonly ClusterHost[]): PeerWant {
  const owner = hosts.find((h) => h.label === ep.host);
  if (!owner || !ep.ipv4) throw new Error(`endpoint ${ep.id} has no host or address: ${JSON.stringify(ep)}`);
  return { host: owner.label, mac: ep.mac.toLowerCase(), ip: ep.ipv4.split("/")[0] ?? "", dst: owner.address };
}

/** Runnable tasks on the whole machine now (/proc/loadavg's 4th field), this reader excluded. */
function runnable(): number {
  const field = readFileSync("/proc/loadavg", "utf8").split(" ")[3] ?? "1/0";
  return Number(field.split("/")[0]) - 1;
}

/** Wait until at most MAX_RUNNABLE tasks are runnable (30 s at most, so another job cannot stop the run); returns the ms waited. */
async function admission(): Promise<number> {
  const t0 = performance.now();
  while (runnable() > MAX_RUNNABLE && performance.now() - t0 < 30_000) await Bun.sleep(20);
  return performance.now() - t0;
}

/** Run `fn` over `items`, at most `n` at a time; the first failure stops taking new items and is thrown. */
async function inPool<T>(items: readonly T[], n: number, fn: (x: T) => Promise<void>): Promise<void> {
  let next = 0;
  let failed = false;
  const worker = async (): Promise<void> => {
    while (!failed && next < items.length) {
      const item = items[next++] as T;
      try {
        await fn(item);
      } catch (err) {
        failed = true;
        throw err;
      }
    }
  };
  const results = await Promise.allSettled(Array.from({ length: Math.min(n, items.length) }, worker));
  const bad = results.find((r): r is PromiseRejectedResult => r.status === "rejected");
  if (bad) throw bad.reason;
}

/** The agent's own PID (agent.pid), checked to be the lab's agent process and a bun binary. */
function agentPid(h: ClusterHost): number {
  const rec = JSON.parse(readFileSync(join(h.host.stateDir, "agent.pid"), "utf8")) as { pid: number };
  const exe = readFileSync(`/proc/${rec.pid}/cmdline`, "utf8").split("\0")[0] ?? "";
  if (rec.pid !== h.agent?.pid || !/bun$/.test(exe)) throw new Error(`agent of ${h.label}: agent.pid ${rec.pid}, lab process ${h.agent?.pid}, ${exe}`);
  return rec.pid;
}

interface MemoryFigures {
  rssMb: { median: number; max: number };
  hwmMb: { median: number; max: number };
  etcdRssMb: number;
  etcdHwmMb: number;
}

function memory(c: ClusterLab): MemoryFigures {
  const pids = c.hosts.map(agentPid);
  const rss = pids.map((p) => mb(procStatusKb(p, "VmRSS")));
  const hwm = pids.map((p) => mb(procStatusKb(p, "VmHWM")));
  const etcd = c.etcd.members[0]?.process.pid ?? 0;
  return {
    rssMb: { median: round(median(rss)), max: Math.max(...rss) },
    hwmMb: { median: round(median(hwm)), max: Math.max(...hwm) },
    etcdRssMb: mb(procStatusKb(etcd, "VmRSS")),
    etcdHwmMb: mb(procStatusKb(etcd, "VmHWM")),
  };
}

/** CPU seconds of the agents (their own, and of the `ip` / `bridge` processes they ran and reaped) and of etcd. */
interface CpuSample {
  agents: number[];
  children: number[];
  etcd: number;
}

/** User + system CPU seconds of a process's reaped children (/proc/PID/stat cutime + cstime). */
function childCpuSeconds(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(fields[13]) + Number(fields[14])) / 100;
}

function cpuSeconds(c: ClusterLab): CpuSample {
  const pids = c.hosts.map(agentPid);
  return {
    agents: pids.map((p) => procCpuSeconds(p) ?? NaN),
    children: pids.map(childCpuSeconds),
    etcd: procCpuSeconds(c.etcd.members[0]?.process.pid ?? 0) ?? NaN,
  };
}

/** The overlay control plane's counters of one agent (`knit agent status` .cluster.overlay), from its status socket. */
interface SyncCounters {
  rounds: number;
  fullRounds: number;
  programmed: { set: number; removed: number };
  errors: number;
  lastError?: string;
}

/** `knit agent status` .cluster of one agent: its registration and its overlay control plane. */
async function agentCluster(h: ClusterHost): Promise<{ host: { renewals: number; reRegistrations: number; lastError?: string }; overlay: SyncCounters }> {
  const res = await fetch("http://knit-agent/health", { unix: join(h.host.stateDir, "agent.sock"), signal: AbortSignal.timeout(10_000) });
  const health = (await res.json()) as { cluster?: { host?: { renewals: number; reRegistrations: number; lastError?: string }; overlay?: SyncCounters } };
  const { host, overlay } = health.cluster ?? {};
  if (!host || !overlay) throw new Error(`agent of ${h.label}: no cluster status in ${JSON.stringify(health).slice(0, 300)}`);
  return { host, overlay };
}

async function syncCounters(h: ClusterHost): Promise<SyncCounters> {
  return (await agentCluster(h)).overlay;
}

/** What the agents logged at warn level or above, and how each one that exited ended (for a failed run). */
function agentDiagnostics(c: ClusterLab): string {
  const out: string[] = [];
  for (const h of c.hosts) {
    const log = h.agent?.output() ?? "";
    const lines = log.split("\n").filter((l) => /"level":"(warn|error)"/.test(l));
    if (h.agent?.running === false) out.push(`${h.label}: agent exited:\n    ${log.trim().split("\n").slice(-5).join("\n    ")}`);
    else if (lines.length) out.push(`${h.label}: ${lines.length} warnings, the last: ${lines.slice(-3).join("\n    ")}`);
  }
  return out.slice(0, 12).join("\n  ");
}

/** Wait until no agent has started a round for `quietMs` (the tail of a phase is over), at most `timeoutMs`. */
async function agentsQuiet(c: ClusterLab, quietMs = 3000, timeoutMs = 120_000): Promise<SyncCounters[]> {
  const deadline = performance.now() + timeoutMs;
  let last = await Promise.all(c.hosts.map(syncCounters));
  let since = performance.now();
  for (;;) {
    await Bun.sleep(500);
    const now = await Promise.all(c.hosts.map(syncCounters));
    if (now.some((x, i) => x.rounds !== last[i]?.rounds)) since = performance.now();
    last = now;
    if (performance.now() - since >= quietMs) return now;
    if (performance.now() > deadline) throw new Error(`the agents did not settle within ${timeoutMs / 1000} s`);
  }
}

/** Every host's kernel equals what the store says (exact: nothing missing, nothing extra), or a description of the first differences. */
async function verifyKernel(c: ClusterLab, netId: string, timeoutMs: number): Promise<void> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    const wrong: string[] = [];
    for (const h of c.hosts) {
      const [want, have] = [await c.expectedPeers(h, netId), await c.actualPeers(h, netId)];
      if (JSON.stringify(want) !== JSON.stringify(have)) {
        wrong.push(`${h.label}: fdb ${have.fdb.length}/${want.fdb.length}, neigh ${have.neigh.length}/${want.neigh.length}, bridge ${have.bridged.length}/${want.bridged.length}`);
      }
    }
    if (wrong.length === 0) return;
    if (performance.now() > deadline) throw new Error(`the kernel tables do not match the store (have/want):\n  ${wrong.slice(0, 10).join("\n  ")}`);
    await Bun.sleep(500);
  }
}

// ---- the phases ----

interface BulkFigures {
  endpoints: number;
  lastCreatedS: number;
  lastConvergedS: number;
  afterLastCreateS: number;
  hostConvergedS: { p50: number; max: number };
  runMs: { p50: number; p99: number };
  agentCpuS: { median: number; max: number; total: number };
  /** CPU of the ip / bridge processes the agents ran. */
  agentChildCpuS: { median: number; total: number };
  etcdCpuS: number;
  /** Rounds of each agent's sync worker during the phase, and FDB + neighbour entries it set. */
  agentRounds: { median: number; max: number };
  agentEntriesSet: { median: number };
  agentErrors: number;
  /** knit run commands that missed the store's deadline and were run again. */
  retried: string[];
  /** Seconds the run-queue gate held commands back, summed over the workers. */
  gatedS: number;
  load: { start: [number, number, number]; end: [number, number, number] };
}

async function bulk(c: ClusterLab, netId: string, followers: TableFollower[]): Promise<BulkFigures> {
  const jobs: { h: ClusterHost; name: string }[] = [];
  for (let j = 0; j < ENDPOINTS; j++) for (const h of c.hosts) jobs.push({ h, name: `${h.label}-e${j}` });
  console.log(`\n[${c.hosts.length} hosts] bulk: ${jobs.length} x knit run -d, ${CONCURRENCY} at a time (load ${load()})`);
  const cpu0 = cpuSeconds(c);
  const sync0 = await Promise.all(c.hosts.map(syncCounters));
  const load0 = loadAverage();
  const t0 = wallNow();
  let lastCreated = t0;
  const runMs: number[] = [];
  const retried: string[] = [];
  let gatedMs = 0;
  await inPool(jobs, CONCURRENCY, async ({ h, name }) => {
    gatedMs += await admission();
    const started = wallNow();
    for (let attempt = 1; ; attempt++) {
      const r = await knitUnboosted(c, h, ["run", "-d", "--name", name, "--network", NETWORK, "--", "sleep", "1000000"]);
      if (r.code === 0) break;
      // A command starved past the store's 2 s deadline: what a user would do, remove what it
      // may have left and run it again (counted). Anything else fails the run.
      if (attempt > 3 || !r.stderr.includes("cannot reach the cluster store")) throw new Error(`knit run ${name} on ${h.label} failed (exit ${r.code}):\n${r.stdout}${r.stderr}`);
      retried.push(`${name}: ${r.stderr.split("\n")[0] ?? ""}`);
      await c.knitOk(h, ["rm", "-f", name]).catch(() => undefined);
    }
    lastCreated = Math.max(lastCreated, wallNow());
    runMs.push(wallNow() - started);
  });
  console.log(`  last knit run returned after ${fmt((lastCreated - t0) / 1000, 2)} s (load ${load()}); the run-queue gate held commands ${fmt(gatedMs / 1000)} s in all${retried.length ? `; ${retried.length} run again after missing the store deadline, e.g. ${retried[0] ?? ""}` : ""}`);

  const eps = await endpointsOf(c, netId);
  if (eps.length !== jobs.length || eps.some((ep) => ep.state !== "ready")) throw new Error(`store: ${eps.length} endpoints (${eps.filter((ep) => ep.state === "ready").length} ready), want ${jobs.length}`);
  const wants = eps.map((ep) => peerWant(ep, c.hosts));
  const convergedAt = new Map<string, number>();
  const deadline = performance.now() + TIMEOUT_MS;
  for (;;) {
    for (const f of followers) {
      if (convergedAt.has(f.h.label)) continue;
      f.update();
      let last = 0;
      for (const w of wants) {
        if (w.host === f.h.label) continue;
        const since = f.presentSince(w.mac, w.dst, w.ip);
        if (since === undefined) {
          last = NaN;
          break;
        }
        last = Math.max(last, since);
      }
      if (!Number.isNaN(last)) convergedAt.set(f.h.label, last);
    }
    if (convergedAt.size === followers.length) break;
    if (performance.now() > deadline) {
      const missing = followers.filter((f) => !convergedAt.has(f.h.label)).map((f) => `${f.h.label} (${wants.filter((w) => w.host !== f.h.label && f.presentSince(w.mac, w.dst, w.ip) === undefined).length} missing)`);
      throw new Error(`bulk convergence did not complete within ${TIMEOUT_MS / 1000} s: ${missing.join(", ")}`);
    }
    await Bun.sleep(200);
  }
  const cpu1 = cpuSeconds(c);
  const load1 = loadAverage();
  const sync1 = await Promise.all(c.hosts.map(syncCounters));
  await verifyKernel(c, netId, 30_000);
  const rounds = sync1.map((x, i) => x.rounds - (sync0[i]?.rounds ?? 0));
  const entries = sync1.map((x, i) => x.programmed.set - (sync0[i]?.programmed.set ?? 0));
  const childCpu = cpu1.children.map((x, i) => x - (cpu0.children[i] ?? NaN));
  const lastConverged = Math.max(...convergedAt.values());
  const hostS = [...convergedAt.values()].map((t) => (t - t0) / 1000);
  const agentCpu = cpu1.agents.map((x, i) => x - (cpu0.agents[i] ?? NaN));
  const out: BulkFigures = {
    endpoints: jobs.length,
    lastCreatedS: round((lastCreated - t0) / 1000, 2),
    lastConvergedS: round((lastConverged - t0) / 1000, 2),
    afterLastCreateS: round((lastConverged - lastCreated) / 1000, 2),
    hostConvergedS: { p50: round(median(hostS), 2), max: round(Math.max(...hostS), 2) },
    runMs: { p50: round(median(runMs)), p99: round(quantile(runMs, 0.99)) },
    agentCpuS: { median: round(median(agentCpu), 2), max: round(Math.max(...agentCpu), 2), total: round(agentCpu.reduce((a, b) => a + b, 0), 1) },
    agentChildCpuS: { median: round(median(childCpu), 2), total: round(childCpu.reduce((x, y) => x + y, 0), 1) },
    etcdCpuS: round(cpu1.etcd - cpu0.etcd, 2),
    agentRounds: { median: median(rounds), max: Math.max(...rounds) },
    agentEntriesSet: { median: median(entries) },
    agentErrors: sync1.reduce((x, y, i) => x + y.errors - (sync0[i]?.errors ?? 0), 0),
    retried,
    gatedS: round(gatedMs / 1000, 1),
    load: { start: load0, end: load1 },
  };
  console.log(`  every host has every peer's entries after ${fmt(out.lastConvergedS, 2)} s (${fmt(out.afterLastCreateS, 2)} s after the last create; per host p50 ${fmt(out.hostConvergedS.p50, 2)} s); kernel tables verified against the store`);
  console.log(`  knit run: p50 ${out.runMs.p50} ms, p99 ${out.runMs.p99} ms; load at the end ${load1.join(" ")}`);
  console.log(
    `  CPU during the phase: agents ${out.agentCpuS.total} s (median ${out.agentCpuS.median} s each) + their ip/bridge processes ${out.agentChildCpuS.total} s, etcd ${out.etcdCpuS} s; sync rounds per agent median ${out.agentRounds.median} (max ${out.agentRounds.max}), entries set per agent median ${out.agentEntriesSet.median}, errors ${out.agentErrors}`,
  );
  return out;
}

interface IncrementalFigures {
  reps: number;
  fromCommitMs: { p50: number; p99: number; max: number };
  fromRunStartMs: { p50: number; p99: number; max: number };
  everyHostFromCommitMs: { p50: number; max: number };
  removalFromRmStartMs: { p50: number; p99: number; max: number };
  runMs: { p50: number };
}

async function incremental(c: ClusterLab, netId: string, followers: TableFollower[]): Promise<IncrementalFigures> {
  const settle = performance.now();
  await agentsQuiet(c);
  console.log(`\n[${c.hosts.length} hosts] incremental: ${REPS} x one more sandbox on one host (agents idle for 3 s after ${fmt((performance.now() - settle) / 1000)} s; load ${load()})`);
  // When each endpoint of the network was first committed, and as what, seen by a watch here.
  const firstSeen = new Map<string, { at: number; ep: Endpoint }>();
  // From the revision after a listing: no commit is missed while the watch is being set up.
  const from = (await c.store.list(keys.endpointsOf(netId))).revision + 1;
  const watch = c.store.watch(keys.endpointsOf(netId), from, {
    onEvents(events) {
      const now = wallNow();
      for (const e of events) {
        if (e.type !== "put" || e.value === undefined) continue;
        const ep = JSON.parse(e.value) as Endpoint;
        if (!firstSeen.has(ep.id)) firstSeen.set(ep.id, { at: now, ep });
      }
    },
  });
  await Bun.sleep(500);
  const fromCommit: number[] = [];
  const fromStart: number[] = [];
  const everyHost: number[] = [];
  const removal: number[] = [];
  const runMs: number[] = [];
  try {
    for (let r = 0; r < REPS; r++) {
      const h = c.hosts[(r * 7) % c.hosts.length] as ClusterHost;
      const name = `inc${r}`;
      const t0 = wallNow();
      await knitUnboostedOk(c, h, ["run", "-d", "--name", name, "--network", NETWORK, "--", "sleep", "1000000"]);
      runMs.push(wallNow() - t0);
      const sbId = (await c.sandbox(h, name)).id;
      const ep = (await endpointsOf(c, netId)).find((e) => e.sandboxId === sbId);
      await waitForMs(() => [...firstSeen.values()].some((s) => s.ep.sandboxId === sbId), 5000);
      const seen = [...firstSeen.values()].find((s) => s.ep.sandboxId === sbId);
      if (!seen || !ep) throw new Error(`the endpoint of ${name} (${sbId}) is not in the store or was not seen by the watch`);
      const want = peerWant(ep, c.hosts);
      const others = followers.filter((f) => f.h !== h);
      const at = new Map<string, number>();
      const ok = await timesOnEvery(others, at, (f) => f.presentSince(want.mac, want.dst, want.ip));
      if (!ok) throw new Error(`${name} on ${h.label}: only ${at.size} of ${others.length} hosts got its entries within ${TIMEOUT_MS / 1000} s`);
      const lat = [...at.values()].map((t) => t - seen.at);
      fromCommit.push(...lat);
      fromStart.push(...[...at.values()].map((t) => t - t0));
      everyHost.push(Math.max(...lat));
      // Remove it; every other host must drop both entries.
      const rm0 = wallNow();
      await knitUnboostedOk(c, h, ["rm", "-f", name]);
      const gone = new Map<string, number>();
      const dropped = await timesOnEvery(others, gone, (f) => f.goneSince(want.mac, want.dst, want.ip));
      if (!dropped) throw new Error(`${name} on ${h.label}: ${others.length - gone.size} hosts kept its entries after rm`);
      removal.push(...[...gone.values()].map((t) => t - rm0));
      console.log(
        `  rep ${r + 1} (${h.label}): ${others.length} hosts, from the commit p50 ${fmt(quantile(lat, 0.5))} ms, max ${fmt(Math.max(...lat))} ms; from knit run's start max ${fmt(Math.max(...at.values()) - t0)} ms; removal max ${fmt(Math.max(...gone.values()) - rm0)} ms`,
      );
    }
  } finally {
    watch.close();
  }
  const p = (xs: number[], q: number): number => round(quantile(xs, q), 1);
  const out: IncrementalFigures = {
    reps: REPS,
    fromCommitMs: { p50: p(fromCommit, 0.5), p99: p(fromCommit, 0.99), max: round(Math.max(...fromCommit), 1) },
    fromRunStartMs: { p50: p(fromStart, 0.5), p99: p(fromStart, 0.99), max: round(Math.max(...fromStart), 1) },
    everyHostFromCommitMs: { p50: p(everyHost, 0.5), max: round(Math.max(...everyHost), 1) },
    removalFromRmStartMs: { p50: p(removal, 0.5), p99: p(removal, 0.99), max: round(Math.max(...removal), 1) },
    runMs: { p50: p(runMs, 0.5) },
  };
  console.log(`  per host, from the endpoint's first commit: p50 ${out.fromCommitMs.p50} ms, p99 ${out.fromCommitMs.p99} ms, max ${out.fromCommitMs.max} ms (${fromCommit.length} samples)`);
  console.log(`  every host has it, from the commit: p50 ${out.everyHostFromCommitMs.p50} ms, max ${out.everyHostFromCommitMs.max} ms; from knit run's start (per host): p50 ${out.fromRunStartMs.p50} ms, p99 ${out.fromRunStartMs.p99} ms`);
  console.log(`  removal, from the start of knit rm (per host): p50 ${out.removalFromRmStartMs.p50} ms, p99 ${out.removalFromRmStartMs.p99} ms`);
  return out;
}

/**
 * Remove everything knit made (sandboxes, the network, docker_gwbridge), timed. The agents stop
 * first (SIGTERM): with them running, each removal would set all N agents to work again, which
 * the incremental phase has measured already; each host's CLI removes its own part alone.
 */
async function teardown(c: ClusterLab): Promise<number> {
  const t0 = performance.now();
  await Promise.all(c.hosts.map((h) => c.stopAgent(h)));
  await inPool(c.hosts, CONCURRENCY, async (h) => {
    const names = Array.from({ length: ENDPOINTS }, (_, j) => `${h.label}-e${j}`);
    await c.knitOk(h, ["rm", "-f", ...names]);
  });
  await c.knitOk(c.hosts[0] as ClusterHost, ["network", "rm", NETWORK]);
  await inPool(c.hosts, CONCURRENCY, async (h) => {
    await c.knitOk(h, ["network", "rm", "docker_gwbridge"]);
  });
  return (performance.now() - t0) / 1000;
}


/**
 * `knit ARGS` on a host at nice 0, like the agents (`nice -n BOOST` from this process's
 * -BOOST): a boosted command would starve the agents (see the file comment), and its own work
 * after its commit would hold the other hosts' agents back, as it would not on a real cluster.
 */
function knitUnboosted(c: ClusterLab, h: ClusterHost, args: readonly string[]): Promise<ExecResult> {
  return c.lab.exec(h.host, ["nice", "-n", String(BOOST), KNIT_BIN, ...args], { env: h.host.knitEnv(c.env()), check: false });
}

/** {@link knitUnboosted}; throws with the output on failure. */
async function knitUnboostedOk(c: ClusterLab, h: ClusterHost, args: readonly string[]): Promise<void> {
  const r = await knitUnboosted(c, h, args);
  if (r.code !== 0) throw new Error(`knit ${args.join(" ")} on ${h.label} failed (exit ${r.code}):\n${r.stdout}${r.stderr}`);
}

/** Set the nice value of every thread of these processes (setpriority applies per thread; new threads and children inherit it). */
async function renice(lab: Lab, pids: readonly number[], nice: number): Promise<void> {
  const tids = pids.flatMap((pid) => readdirSync(`/proc/${pid}/task`));
  await lab.run(["renice", "-n", String(nice), "-p", ...tids]);
}

interface SizeResult {
  hosts: number;
  setupS: number;
  agentsRestartedAtStart: number;
  /** Leases lost (and registered again) over the whole size's run, all agents together. */
  reRegistrations: number;
  bulk: BulkFigures;
  incremental: IncrementalFigures;
  memoryAfterBulk: MemoryFigures;
  memoryAtEnd: MemoryFigures;
  teardownS: number;
  load: [number, number, number];
}

async function runSize(n: number): Promise<SizeResult> {
  const lab = await Lab.create("bos");
  let cluster: ClusterLab | undefined;
  try {
    const t0 = performance.now();
    console.log(`\n=== ${n} hosts x ${ENDPOINTS} endpoints (load ${load()}) ===`);
    const c = await ClusterLab.create(lab, { hosts: n, internet: false, lanMachine: false, etcdNet: 89, logLevel: "warn", leaseTtl: LEASE_TTL, agentBatch: AGENT_BATCH, agentRestarts: 3 });
    cluster = c;
    // etcd and the agents are children of this process (boosted, see main): agents back to 0.
    const etcdPid = c.etcd.members[0]?.process.pid;
    if (BOOST > 0 && etcdPid !== undefined) await renice(lab, [etcdPid], -BOOST);
    await renice(lab, c.hosts.map(agentPid), 0);
    const h1 = c.hosts[0] as ClusterHost;
    await c.knitOk(h1, ["network", "create", "-d", "overlay", "--subnet", SUBNET, NETWORK]);
    const netId = await c.knitOk(h1, ["network", "inspect", "--format", "{{.Id}}", NETWORK]);
    const followers = await Promise.all(c.hosts.map((h) => follow(h, netId)));
    const setupS = (performance.now() - t0) / 1000;
    console.log(`  lab, ${n} agents, network and monitors ready in ${fmt(setupS)} s${c.restarted.length ? ` (agents started again after exiting during start-up: ${c.restarted.join(" ")})` : ""}`);
    const b = await bulk(c, netId, followers);
    const memoryAfterBulk = memory(c);
    const inc = await incremental(c, netId, followers);
    await verifyKernel(c, netId, 30_000);
    const memoryAtEnd = memory(c);
    console.log(
      `  memory per agent: VmRSS median ${memoryAtEnd.rssMb.median} MB, max ${memoryAtEnd.rssMb.max} MB; VmHWM median ${memoryAtEnd.hwmMb.median} MB, max ${memoryAtEnd.hwmMb.max} MB; etcd VmRSS ${memoryAtEnd.etcdRssMb} MB (VmHWM ${memoryAtEnd.etcdHwmMb} MB)`,
    );
    const reg = await Promise.all(c.hosts.map(async (h) => (await agentCluster(h)).host));
    const reRegistrations = reg.reduce((x, r) => x + r.reRegistrations, 0);
    console.log(`  registrations: ${reRegistrations} lease(s) lost and registered again (lease TTL ${LEASE_TTL} s), renewals per agent median ${median(reg.map((r) => r.renewals))}`);
    const l = loadAverage();
    const teardownS = await teardown(c);
    console.log(`  teardown (agents stopped, rm -f of ${b.endpoints} sandboxes, network rm, docker_gwbridge rm) ${fmt(teardownS)} s`);
    return { hosts: n, setupS: round(setupS, 1), agentsRestartedAtStart: c.restarted.length, reRegistrations, bulk: b, incremental: inc, memoryAfterBulk, memoryAtEnd, teardownS: round(teardownS, 1), load: l };
  } catch (err) {
    if (cluster) console.error(`\n[${n} hosts] failed; the agents said:\n  ${agentDiagnostics(cluster) || "nothing at warn level"}`);
    throw err;
  } finally {
    await lab.cleanup();
  }
}

/** CPU of the agents and their ip / bridge processes during the bulk phase, per agent and per endpoint created (ms). */
function cpuPerAgentEndpointMs(s: SizeResult): number {
  return ((s.bulk.agentCpuS.total + s.bulk.agentChildCpuS.total) * 1000) / (s.hosts * s.bulk.endpoints);
}

async function main(): Promise<void> {
  const started = performance.now();
  // This process stamps the store commits of the incremental phase: it must not wait for the agents either.
  if (BOOST > 0) await runCommand(["renice", "-n", String(-BOOST), "-p", ...readdirSync(`/proc/${process.pid}/task`)]);
  const sizes: SizeResult[] = [];
  for (const n of HOST_COUNTS) sizes.push(await runSize(n));

  printTable(
    `Overlay scale: convergence (${ENDPOINTS} endpoints per host, ${CONCURRENCY} knit run at a time while <= ${MAX_RUNNABLE} runnable; incremental: ${REPS} reps, per other host, from the endpoint's first commit)`,
    ["hosts", "endpoints", "last create s", "all converged s", "knit run p50 ms", "incr. p50 ms", "incr. p99 ms", "incr. every host max ms", "removal p50 ms", "load 1m (bulk end)"],
    sizes.map((s) => [
      s.hosts,
      s.bulk.endpoints,
      s.bulk.lastCreatedS,
      s.bulk.lastConvergedS,
      s.bulk.runMs.p50,
      s.incremental.fromCommitMs.p50,
      s.incremental.fromCommitMs.p99,
      s.incremental.everyHostFromCommitMs.max,
      s.incremental.removalFromRmStartMs.p50,
      s.bulk.load.end[0],
    ]),
  );
  printTable(
    "Overlay scale: resources (memory at the end; CPU and sync rounds during the bulk phase)",
    ["hosts", "agent RSS MB", "max", "agent HWM MB", "max", "etcd RSS MB", "agent CPU s", "+ ip/bridge s", "all agents s", "ms/agent/endpoint", "etcd CPU s", "rounds/agent"],
    sizes.map((s) => [
      s.hosts,
      s.memoryAtEnd.rssMb.median,
      s.memoryAtEnd.rssMb.max,
      s.memoryAtEnd.hwmMb.median,
      s.memoryAtEnd.hwmMb.max,
      s.memoryAtEnd.etcdRssMb,
      s.bulk.agentCpuS.median,
      s.bulk.agentChildCpuS.median,
      round(s.bulk.agentCpuS.total + s.bulk.agentChildCpuS.total, 1),
      round(cpuPerAgentEndpointMs(s), 1),
      s.bulk.etcdCpuS,
      s.bulk.agentRounds.median,
    ]),
  );
  const [first, last] = [sizes[0], sizes[sizes.length - 1]];
  if (first && last && first !== last) {
    const x = (a: number, b: number): string => `${fmt(b / a, 2)}x`;
    console.log(
      `\ngrowth ${first.hosts} -> ${last.hosts} hosts (${fmt(last.hosts / first.hosts, 1)}x hosts, ${fmt(last.bulk.endpoints / first.bulk.endpoints, 1)}x endpoints, ${fmt((last.hosts * (last.hosts - 1)) / (first.hosts * (first.hosts - 1)), 1)}x kernel entries in the cluster):` +
        ` all converged ${x(first.bulk.lastConvergedS, last.bulk.lastConvergedS)}, agents' CPU ${x(first.bulk.agentCpuS.total + first.bulk.agentChildCpuS.total, last.bulk.agentCpuS.total + last.bulk.agentChildCpuS.total)}` +
        ` (per agent per endpoint ${x(cpuPerAgentEndpointMs(first), cpuPerAgentEndpointMs(last))}),` +
        ` incremental p50 ${x(first.incremental.fromCommitMs.p50, last.incremental.fromCommitMs.p50)}, p99 ${x(first.incremental.fromCommitMs.p99, last.incremental.fromCommitMs.p99)},` +
        ` agent RSS ${x(first.memoryAtEnd.rssMb.median, last.memoryAtEnd.rssMb.median)}, etcd RSS ${x(first.memoryAtEnd.etcdRssMb, last.memoryAtEnd.etcdRssMb)}`,
    );
  }
  const totalS = round((performance.now() - started) / 1000, 1);
  console.log(`\nbenchmark run time ${fmt(totalS)} s`);
  const path = writeResults("overlay-scale", { endpointsPerHost: ENDPOINTS, reps: REPS, concurrency: CONCURRENCY, maxRunnable: MAX_RUNNABLE, boost: BOOST, leaseTtlS: LEASE_TTL, timeoutS: TIMEOUT_MS / 1000, runTimeS: totalS, sizes });
  console.log(`results: ${path}`);
}

await main();
