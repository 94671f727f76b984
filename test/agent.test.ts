/**
 * `knit agent`: how it starts (on demand, and on purpose), what it says about itself, that
 * there is one per host, that it repairs on start, and that killing it (-9) loses nothing.
 * Checked against the kernel (which process listens where, in which namespace, in which
 * session; links and rules before and after) and with real DNS queries and pings.
 *
 *   h (knit host): network n1 10.71.0.0/24, sandboxes on it
 *
 * Every agent a test starts is stopped by its PID before the test ends; afterAll proves that
 * nothing is left (no process in the host's namespace, no link, no store rows).
 */
import { afterAll, afterEach, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { existsSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { Lab, processesInNetns, type LabHost, type NetnsRef, waitFor } from "../src/lab/lab.ts";
import { assertHostClean } from "./leaks.ts";

setDefaultTimeout(60_000);

const GW = "10.71.0.1";

let lab: Lab;
let h: LabHost;

interface AgentFile {
  pid: number;
  startTime: string;
  mode: "auto" | "service";
  socket: string;
  lingerMs?: number;
}

const pidfile = (): string => join(h.stateDir, "agent.pid");
const readAgent = (): AgentFile | undefined => (existsSync(pidfile()) ? (JSON.parse(readFileSync(pidfile(), "utf8")) as AgentFile) : undefined);
const alive = (pid: number): boolean => {
  try {
    return !/^\d+ \(.*\) [ZX] /.test(readFileSync(`/proc/${pid}/stat`, "utf8"));
  } catch {
    return false;
  }
};
const cmdline = (pid: number): string[] => {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0").filter(Boolean);
  } catch {
    return []; // exited meanwhile
  }
};

/** Is something listening on GW:53, UDP and TCP, in the host's namespace? */
async function listening(): Promise<{ udp: boolean; tcp: boolean }> {
  const udp = (await h.exec(["ss", "-Hlun", `src ${GW}:53`])).stdout.trim() !== "";
  const tcp = (await h.exec(["ss", "-Hltn", `src ${GW}:53`])).stdout.trim() !== "";
  return { udp, tcp };
}

/** The IPv4 address `name` resolves to through knit's DNS, asked from `from`. */
async function resolve(from: NetnsRef, name: string): Promise<string> {
  // -q: a bare "a" would be taken for the record type.
  const r = await lab.exec(from, ["dig", `@${GW}`, "+short", "+time=1", "+tries=1", "-q", name], { check: false });
  return r.code === 0 ? r.stdout.trim() : "";
}

interface Sb {
  id: string;
  ip: string;
  ns: NetnsRef;
}

async function runSb(name: string, env: Record<string, string> = {}): Promise<Sb> {
  const id = (await h.knitOk(["run", "-d", "--name", name, "--network", "n1", "--", "sleep", "1000"], { env })).stdout.trim();
  const [view] = JSON.parse((await h.knitOk(["inspect", id])).stdout) as { NetworkSettings: { SandboxKey: string; Networks: Record<string, { IPAddress: string }> } }[];
  return { id, ip: view?.NetworkSettings.Networks["n1"]?.IPAddress ?? "?", ns: { path: view?.NetworkSettings.SandboxKey ?? "" } };
}

/** The test process's KNIT_RESOLV_CONF, restored in afterAll. */
const savedResolvConf = process.env.KNIT_RESOLV_CONF;

beforeAll(async () => {
  lab = await Lab.create("agt");
  h = await lab.host("h");
  // Agents started here (also through auto-start, which inherits the environment) must never
  // forward a query to the machine's real resolvers: give them a resolv.conf without any.
  const resolv = join(lab.dir, "resolv.conf");
  writeFileSync(resolv, "# no upstreams in this test\n");
  process.env.KNIT_RESOLV_CONF = resolv;
  await h.knitOk(["network", "create", "--subnet", "10.71.0.0/24", "n1"]);
});

afterEach(async () => {
  // Whatever a failed test left: sandboxes, then any agent (by its recorded PID).
  const left = (await h.knit(["ps", "-aq", "--no-trunc"])).stdout.split("\n").filter(Boolean);
  if (left.length) await h.knit(["rm", "-f", ...left]);
  await h.knit(["agent", "stop"]);
  expect(processesInNetns(h.path).filter((p) => p !== process.pid && cmdline(p).includes("agent"))).toEqual([]);
});

afterAll(async () => {
  if (savedResolvConf === undefined) delete process.env.KNIT_RESOLV_CONF;
  else process.env.KNIT_RESOLV_CONF = savedResolvConf;
  try {
    await h.knitOk(["network", "rm", "n1"]);
    await assertHostClean(h);
  } finally {
    await lab.cleanup();
  }
});

describe("starting on demand", () => {
  test("the first sandbox on a user network starts the agent; the last one gone stops it", async () => {
    expect(readAgent()).toBeUndefined();
    expect(await listening()).toEqual({ udp: false, tcp: false });
    const a = await runSb("a");
    const rec = readAgent();
    if (!rec) throw new Error("no agent.pid after the first sandbox");
    expect(rec.mode).toBe("auto");
    expect(alive(rec.pid)).toBe(true);
    // A detached process of its own session (setsid), running `knit agent --auto`, in the
    // host's network namespace, listening on the gateway.
    expect(cmdline(rec.pid)).toContain("agent");
    expect(cmdline(rec.pid)).toContain("--auto");
    const stat = readFileSync(`/proc/${rec.pid}/stat`, "utf8").slice(readFileSync(`/proc/${rec.pid}/stat`, "utf8").lastIndexOf(")") + 2).split(" ");
    expect(Number(stat[3])).toBe(rec.pid); // session id
    expect(processesInNetns(h.path)).toContain(rec.pid);
    expect(await listening()).toEqual({ udp: true, tcp: true });
    // It logs JSON lines to agent.log.
    const log = readFileSync(join(h.stateDir, "agent.log"), "utf8").trim().split("\n").map((l) => JSON.parse(l) as { time: string; level: string; msg: string });
    for (const msg of ["starting", "dns listening", "reconciled", "ready"]) expect(log.map((l) => l.msg)).toContain(msg);
    for (const l of log) expect(Number.isNaN(Date.parse(l.time))).toBe(false);

    // The second sandbox uses the same agent, and is resolvable from the first at once.
    const b = await runSb("b");
    expect(readAgent()?.pid).toBe(rec.pid);
    expect(await resolve(a.ns, "b")).toBe(b.ip);
    await h.knitOk(["rm", "-f", "a"]);
    expect(alive(rec.pid)).toBe(true);
    await h.knitOk(["rm", "-f", "b"]);
    // Nothing needs it any more: gone, with its pidfile, its socket and its ports.
    expect(alive(rec.pid)).toBe(false);
    expect(readAgent()).toBeUndefined();
    expect(existsSync(join(h.stateDir, "agent.sock"))).toBe(false);
    expect(await listening()).toEqual({ udp: false, tcp: false });
  });

  test("network connect starts it too; KNIT_AGENT_AUTOSTART=0 leaves it off", async () => {
    await runSb("quiet", { KNIT_AGENT_AUTOSTART: "0" });
    expect(readAgent()).toBeUndefined();
    expect(await listening()).toEqual({ udp: false, tcp: false });
    await h.knitOk(["network", "disconnect", "n1", "quiet"]);
    await h.knitOk(["network", "connect", "n1", "quiet"]);
    const rec = readAgent();
    expect(rec?.mode).toBe("auto");
    expect(await listening()).toEqual({ udp: true, tcp: true });
    await h.knitOk(["network", "disconnect", "n1", "quiet"]);
    expect(alive(rec?.pid ?? 0)).toBe(false);
    await h.knitOk(["rm", "-f", "quiet"]);
  });
});

describe("lingering (KNIT_AGENT_LINGER)", () => {
  test("an auto-started agent outlives the last sandbox by its linger, serves the next one, then stops itself", async () => {
    const linger = { KNIT_AGENT_LINGER: "1.5" };
    await runSb("l1", linger);
    const rec = readAgent();
    if (!rec) throw new Error("no agent.pid after the first sandbox");
    expect(rec).toMatchObject({ mode: "auto", lingerMs: 1500 });
    await h.knitOk(["rm", "-f", "l1"], { env: linger });
    // The command left it running: no sandbox needs it, but its linger has not passed.
    expect(alive(rec.pid)).toBe(true);
    // The next sandbox within the linger finds it (no new start) and resolves at once.
    await Bun.sleep(500);
    const a = await runSb("l2", linger);
    const b = await runSb("l3", linger);
    expect(readAgent()?.pid).toBe(rec.pid);
    expect(await resolve(a.ns, "l3")).toBe(b.ip);
    // A need resets the clock: 1 s after the last rm it still runs, within ~3 s it is gone,
    // with its pidfile and its ports.
    await h.knitOk(["rm", "-f", "l2", "l3"], { env: linger });
    const gone = Date.now();
    await Bun.sleep(1000);
    expect(alive(rec.pid)).toBe(true);
    expect(await waitFor(() => !alive(rec.pid), 5000, 50)).toBe(true);
    expect(Date.now() - gone).toBeGreaterThanOrEqual(1500);
    expect(readAgent()).toBeUndefined();
    expect(await listening()).toEqual({ udp: false, tcp: false });
    const log = readFileSync(join(h.stateDir, "agent.log"), "utf8");
    expect(log).toContain("no sandbox has needed the agent for its linger");
  });

  test("a bad KNIT_AGENT_LINGER: the agent says so in its log and lingers the default", async () => {
    await runSb("l4", { KNIT_AGENT_LINGER: "soon" });
    const rec = readAgent();
    expect(rec?.lingerMs).toBe(30_000);
    expect(readFileSync(join(h.stateDir, "agent.log"), "utf8")).toContain('KNIT_AGENT_LINGER must be a number of seconds from 0 to 86400, not \\"soon\\"');
    await h.knitOk(["rm", "-f", "l4"]);
    // A lingering agent is still stopped on purpose by its PID.
    await h.knitOk(["agent", "stop"]);
    expect(alive(rec?.pid ?? 0)).toBe(false);
  });
});

describe("status, stop, one per host", () => {
  test("knit agent status reports its health as JSON; knit agent stop stops it by its PID", async () => {
    const started = await h.knitOk(["agent", "start"]);
    const pid = Number(started.stdout.trim());
    expect(alive(pid)).toBe(true);
    expect(readAgent()).toMatchObject({ pid, mode: "service" });
    await runSb("s1");
    const health = JSON.parse((await h.knitOk(["agent", "status"])).stdout) as {
      status: string;
      pid: number;
      mode: string;
      uptimeSeconds: number;
      store: { revision: number };
      reconcile: { state: string };
      dns: { networks: { name: string; addresses: string[] }[]; listeners: { address: string; udp: boolean; tcp: boolean }[]; names: number };
    };
    expect(health).toMatchObject({ status: "ok", pid, mode: "service", reconcile: { state: "done" } });
    expect(health.uptimeSeconds).toBeGreaterThanOrEqual(0);
    expect(health.store.revision).toBeGreaterThan(0);
    expect(health.dns.networks).toMatchObject([{ name: "n1", addresses: [GW] }]);
    expect(health.dns.listeners).toMatchObject([{ address: GW, udp: true, tcp: true }]);
    // s1 answers to its name and its short id (which is also its hostname).
    expect(health.dns.names).toBe(2);
    // A service agent stays when the last sandbox goes.
    await h.knitOk(["rm", "-f", "s1"]);
    expect(alive(pid)).toBe(true);
    expect((await h.knitOk(["agent", "stop"])).stdout).toBe(`stopped agent ${pid}\n`);
    expect(alive(pid)).toBe(false);
    const none = await h.knit(["agent", "status"]);
    expect(none.code).toBe(1);
    expect(JSON.parse(none.stdout)).toEqual({ status: "stopped" });
    expect(none.stderr).toContain("no knit agent runs");
    expect((await h.knitOk(["agent", "stop"])).stdout).toBe("no agent running\n");
  });

  test("a second agent on the same host gives up, naming the first", async () => {
    const first = h.spawnKnit(["agent"]);
    expect(await waitFor(() => readAgent()?.pid === first.pid, 10_000, 20)).toBe(true);
    const second = await h.knit(["agent"], { timeoutMs: 20_000 });
    expect(second.code).toBe(1);
    const line = JSON.parse(second.stderr.trim().split("\n").pop() ?? "{}") as { msg?: string; pid?: number };
    expect(line).toMatchObject({ msg: "another agent already serves this host", pid: first.pid });
    expect(alive(first.pid)).toBe(true);
    expect(await first.stop()).toBe(0);
    expect(readAgent()).toBeUndefined();
  });

  test("bad flags are refused", async () => {
    for (const [args, says] of [
      [["agent", "--dns-timeout", "soon"], /invalid value "soon" for --dns-timeout/],
      [["agent", "--dns-timeout", "0"], /invalid value "0" for --dns-timeout/],
      [["agent", "--log-level", "loud"], /invalid value "loud" for --log-level/],
      [["agent", "status", "extra"], /accepts no arguments/],
      [["agent", "--bogus"], /unknown flag: --bogus/],
    ] as const) {
      const r = await h.knit(args);
      expect({ args, code: r.code }).toEqual({ args, code: 1 });
      expect(r.stderr).toMatch(says);
    }
    expect(readAgent()).toBeUndefined();
  });
});

describe("crashes", () => {
  test("kill -9 and start again: traffic never stops, names resolve again within 1 s", async () => {
    const agent = h.spawnKnit(["agent"]);
    expect(await waitFor(() => readAgent()?.pid === agent.pid, 10_000, 20)).toBe(true);
    const a = await runSb("a");
    const b = await runSb("b");
    expect(await resolve(a.ns, "b")).toBe(b.ip);
    const kernel = async (): Promise<string> => {
      const links = JSON.parse((await h.exec(["ip", "-j", "link"])).stdout) as { ifname: string; operstate: string }[];
      const nft = (await h.exec(["nft", "list", "table", "inet", "knit"])).stdout;
      return JSON.stringify({ links: links.map((l) => [l.ifname, l.operstate]), nft });
    };
    const before = await kernel();
    agent.kill("SIGKILL");
    expect(await agent.exited).toBe(137);
    // No DNS now, but the data path is kernel state: pings go on, nothing changed.
    expect(await resolve(a.ns, "b")).toBe("");
    expect(await listening()).toEqual({ udp: false, tcp: false });
    expect(await lab.ping(a.ns, b.ip)).toBe(true);
    expect(await kernel()).toBe(before);
    // The dead agent's pidfile stays; nobody trusts it.
    expect(readAgent()?.pid).toBe(agent.pid);
    expect((await h.knit(["agent", "status"])).code).toBe(1);

    const t = performance.now();
    const again = h.spawnKnit(["agent"]);
    expect(await waitFor(async () => (await resolve(a.ns, "b")) === b.ip, 5000, 10)).toBe(true);
    const ms = performance.now() - t;
    expect(ms).toBeLessThan(1000);
    expect(await waitFor(() => readAgent()?.pid === again.pid, 10_000, 20)).toBe(true);
    expect(await kernel()).toBe(before);
    expect(await lab.ping(b.ns, a.ip)).toBe(true);
    await h.knitOk(["rm", "-f", "a", "b"]);
    expect(await again.stop()).toBe(0);
  });

  test("an auto-started agent killed with -9 is replaced by the next sandbox", async () => {
    await runSb("a");
    const first = readAgent();
    if (!first) throw new Error("no agent");
    process.kill(first.pid, "SIGKILL");
    expect(await waitFor(() => !alive(first.pid), 5000, 10)).toBe(true);
    const b = await runSb("b");
    const second = readAgent();
    expect(second?.pid).not.toBe(first.pid);
    expect(alive(second?.pid ?? 0)).toBe(true);
    expect(await resolve(b.ns, "a")).not.toBe("");
    await h.knitOk(["rm", "-f", "a", "b"]);
    expect(alive(second?.pid ?? 0)).toBe(false);
  });

  test("the agent reconciles on start: what a crashed command left is repaired", async () => {
    // A run killed after wiring its endpoint: namespace, veth and rows are left behind.
    const crashed = await h.knit(["run", "-d", "--name", "crashed", "--network", "n1", "--", "sleep", "1000"], { env: { KNIT_CRASH_AT: "run:after-connect" } });
    expect(crashed.code).toBe(137);
    const knitNs = (): string[] => readdirSync("/run/netns").filter((n) => n.startsWith("knit-") && !h.lab.netnsAtStart.has(n));
    expect(knitNs().length).toBe(1);
    expect(readAgent()).toBeUndefined();
    const agent = h.spawnKnit(["agent"]);
    expect(await waitFor(() => readAgent()?.pid === agent.pid, 10_000, 20)).toBe(true);
    // By the time it is ready, the repair is done.
    expect(knitNs()).toEqual([]);
    const health = JSON.parse((await h.knitOk(["agent", "status"])).stdout) as { reconcile: { state: string; report: { sandboxes: number } } };
    expect(health.reconcile).toMatchObject({ state: "done", report: { sandboxes: 1 } });
    expect((await h.knitOk(["ps", "-aq"])).stdout).toBe("");
    expect(await agent.stop()).toBe(0);
  });
});
