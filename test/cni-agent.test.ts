/**
 * The two paths of a CNI invocation (docs/cni.md "Two paths"): with a knit agent serving the
 * host, the plugin process hands the invocation to it and prints its answer; without one, or
 * when the agent cannot or may not take it, the plugin process runs it itself. In a lab:
 *
 *   h   knit host: network "front" 10.96.0.0/24, plugins installed by `knit install`;
 *       containers are plain lab namespaces the plugins wire from h
 *
 * Which path a call took is read from its KNIT_CNI_TRACE line; what it did, from the kernel
 * (ip -j) and the store. Covered: delegation (and that the plugin process then loads no
 * engine), every fallback, bad input giving the same error JSON on both paths, an agent
 * killed in the middle of an ADD (error 11, nothing run twice, DEL and GC leave nothing),
 * invocations while the agent restarts, a hung agent, an agent that takes an invocation and
 * never answers or breaks the connection.
 */
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { copyFileSync, mkdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { Lab, type LabHost, type LabNode } from "../src/lab/lab.ts";
import { launcherScript } from "../src/cli/install.ts";
import { processStartTime } from "../src/engine/owner.ts";
import { assertHostClean } from "./leaks.ts";
import { CniRuntime, failure, type RuntimeConf } from "./cni-libcni.ts";
import { cniAgentRecord, cniTrace, container, endpointClaims, firstAddress, ifaceAddrs, installCni, knitList, links, startCniAgent, stopCniAgent, storeKeys } from "./cni-lab.ts";

setDefaultTimeout(120_000);

let lab: Lab;
let h: LabHost;
let binDir: string;
const FRONT = "front";

beforeAll(async () => {
  lab = await Lab.create("cnia");
  h = await lab.host("h");
  binDir = await installCni(lab, h);
  await h.knitOk(["network", "create", "--subnet", "10.96.0.0/24", FRONT]);
});

afterAll(async () => {
  await stopCniAgent(h);
  await h?.knit(["agent", "stop"]);
  await h?.knit(["network", "rm", FRONT]);
  await lab?.cleanup();
});

/** What one plugin call did: exit code, stdout, stderr and its trace. */
interface Call {
  code: number;
  stdout: string;
  stderr: string;
  trace: Record<string, string | number> | undefined;
}

/** Run a plugin of `dir` in h, as a runtime runs it, with KNIT_CNI_TRACE=1. */
async function call(plugin: string, env: Record<string, string>, stdin: string | Uint8Array, dir = binDir): Promise<Call> {
  const proc = Bun.spawn(["nsenter", `--net=${h.path}`, "--", join(dir, plugin)], {
    env: { PATH: process.env.PATH ?? "/usr/bin:/bin", ...h.knitEnv({ KNIT_AGENT_AUTOSTART: "0", KNIT_CNI_TRACE: "1" }), ...env },
    stdin: typeof stdin === "string" ? new TextEncoder().encode(stdin) : stdin,
    stdout: "pipe",
    stderr: "pipe",
  });
  const [stdout, stderr, code] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
  return { code, stdout, stderr, trace: cniTrace(stderr) };
}

/** The environment of a command on an attachment. */
const cniEnv = (command: string, containerId: string, netns: string, ifname = "eth0"): Record<string, string> => ({
  CNI_COMMAND: command,
  CNI_CONTAINERID: containerId,
  CNI_NETNS: netns,
  CNI_IFNAME: ifname,
  CNI_PATH: binDir,
});

const conf = (extra: Record<string, unknown> = {}): Record<string, unknown> => ({ cniVersion: "1.0.0", name: "front-cni", type: "knit", network: FRONT, ...extra });

/** A runtime in h whose plugin calls' traces are collected. */
function tracedRuntime(traces: Record<string, string | number>[], env: Record<string, string> = {}): CniRuntime {
  return new CniRuntime(
    [binDir],
    async (argv, stdin, e) => {
      const r = await lab.exec(h, argv, { stdin, env: e, check: false, timeoutMs: 60_000 });
      const t = cniTrace(r.stderr);
      if (t) traces.push(t);
      return r;
    },
    h.knitEnv({ KNIT_AGENT_AUTOSTART: "0", KNIT_CNI_TRACE: "1", ...env }),
  );
}

/** No attachment, claim, pending operation or CNI link left on h. */
async function expectNothingLeft(...containers: LabNode[]): Promise<void> {
  expect(Object.keys(await storeKeys(h, "sandboxes/"))).toEqual([]);
  expect(Object.keys(await storeKeys(h, "endpoints/"))).toEqual([]);
  expect(Object.keys(await storeKeys(h, "pending/"))).toEqual([]);
  expect(await endpointClaims(h)).toEqual([]);
  expect((await links(lab, h)).filter((l) => l.ifname.startsWith("veth")).map((l) => l.ifname)).toEqual([]);
  for (const c of containers) expect((await links(lab, c)).map((l) => l.ifname)).toEqual(["lo"]);
}

/** The agent's count of CNI invocations it ran (`knit agent status`). */
async function agentRan(): Promise<number> {
  const health = JSON.parse((await h.knitOk(["agent", "status"])).stdout) as { cni: { ran: number } };
  return health.cni.ran;
}

describe("handed to the agent", () => {
  test("ADD, CHECK and DEL run in the agent; a plugin process that hands over loads no engine at all", async () => {
    if (!cniAgentRecord(h)) await startCniAgent(h);
    const c = await container(lab, "del1");
    const ran = await agentRan();
    const add = await call("knit", cniEnv("ADD", "dg1", c.path), JSON.stringify(conf()));
    expect(add.code).toBe(0);
    expect(add.trace?.path).toBe("agent");
    expect(typeof add.trace?.agentMs).toBe("number");
    const result = JSON.parse(add.stdout) as Record<string, unknown>;
    const ip = firstAddress(result);
    // The agent made it in the kernel as the plugin would: address in the container, veth on the bridge.
    expect(await ifaceAddrs(lab, c, "eth0")).toEqual([`${ip}/24`]);
    const veth = (result.interfaces as { name: string }[])[1]?.name ?? "";
    expect((await links(lab, h)).find((l) => l.ifname === veth)?.master).toMatch(/^br-/);
    expect(await agentRan()).toBe(ran + 1);

    // A bin dir with the client only: its launcher names a full plugin that does not exist.
    const lean = join(lab.dir, "_cni-lean");
    mkdirSync(lean, { recursive: true });
    for (const f of ["knit-cni-client.js", "knit-cni-client.js.jsc"]) copyFileSync(join(binDir, f), join(lean, f));
    writeFileSync(join(lean, "knit-cni"), launcherScript(process.execPath, join(lean, "knit-cni-client.js"), join(lean, "knit-cni.js")), { mode: 0o755 });
    symlinkSync("knit-cni", join(lean, "knit"));
    const withPrev = JSON.stringify(conf({ prevResult: result }));
    const check = await call("knit", cniEnv("CHECK", "dg1", c.path), withPrev, lean);
    expect([check.code, check.stdout, check.trace?.path]).toEqual([0, "", "agent"]);
    // Without the agent, the same launcher has to load the full plugin, and cannot.
    const alone = await call("knit", { ...cniEnv("CHECK", "dg1", c.path), KNIT_CNI_AGENT: "0" }, withPrev, lean);
    expect(alone.code).toBe(1);
    expect(JSON.parse(alone.stdout)).toMatchObject({ code: 999, msg: expect.stringContaining("cannot load knit's CNI plugin") as unknown });
    const del = await call("knit", cniEnv("DEL", "dg1", c.path), withPrev, lean);
    expect([del.code, del.trace?.path]).toEqual([0, "agent"]);
    await expectNothingLeft(c);
    rmSync(lean, { recursive: true, force: true });
  });

  test("bad input gives the same error JSON through the agent as in the plugin process", async () => {
    if (!cniAgentRecord(h)) await startCniAgent(h);
    const c = await container(lab, "bad1");
    const env = (cmd: string, over: Record<string, string> = {}): Record<string, string> => ({ ...cniEnv(cmd, "bad1", c.path), ...over });
    const cases: { what: string; plugin?: string; env: Record<string, string>; stdin: string | Uint8Array }[] = [
      { what: "not JSON", env: env("ADD"), stdin: "{" },
      { what: "empty stdin", env: env("ADD"), stdin: "" },
      { what: "binary stdin", env: env("ADD"), stdin: new Uint8Array([0xff, 0xfe, 0x00, 0x7b, 0x80]) },
      { what: "name of the wrong type", env: env("ADD"), stdin: JSON.stringify(conf({ name: 5 })) },
      { what: "unknown version", env: env("ADD"), stdin: JSON.stringify(conf({ cniVersion: "9.9.9" })) },
      { what: "CHECK before 0.4.0", env: env("CHECK"), stdin: JSON.stringify(conf({ cniVersion: "0.3.1" })) },
      { what: "interface name too long", env: env("ADD", { CNI_IFNAME: "x".repeat(16) }), stdin: JSON.stringify(conf()) },
      { what: "bad container id", env: env("DEL", { CNI_CONTAINERID: "a b" }), stdin: JSON.stringify(conf()) },
      { what: "unknown CNI_ARGS", env: env("ADD", { CNI_ARGS: "FOO=bar" }), stdin: JSON.stringify(conf()) },
      { what: "no CNI_PATH", env: env("ADD", { CNI_PATH: "" }), stdin: JSON.stringify(conf()) },
      { what: "unknown command", env: env("FOO"), stdin: JSON.stringify(conf()) },
      { what: "netns that does not exist", env: env("ADD", { CNI_NETNS: "/nonexistent/ns" }), stdin: JSON.stringify(conf()) },
      { what: "the plugin's own netns", env: env("ADD", { CNI_NETNS: "/proc/self/ns/net" }), stdin: JSON.stringify(conf()) },
      { what: "network that does not exist", env: env("ADD"), stdin: JSON.stringify(conf({ network: "nosuchnet" })) },
      { what: "static address outside the network", env: env("ADD"), stdin: JSON.stringify(conf({ runtimeConfig: { ips: ["10.1.2.3"] } })) },
      { what: "bad MAC", env: env("ADD"), stdin: JSON.stringify(conf({ runtimeConfig: { mac: "01:00:00:00:00:01" } })) },
      { what: "runtimeConfig.ips of the wrong type", env: env("ADD"), stdin: JSON.stringify(conf({ runtimeConfig: { ips: "10.96.0.9" } })) },
      { what: "IPAM plugin not in CNI_PATH", env: env("ADD"), stdin: JSON.stringify(conf({ ipam: { type: "nosuchipam" } })) },
      { what: "CHECK without prevResult", env: env("CHECK"), stdin: JSON.stringify(conf()) },
      { what: "GC without valid attachments", env: env("GC"), stdin: JSON.stringify(conf({ cniVersion: "1.1.0" })) },
      { what: "STATUS of a missing network", env: env("STATUS"), stdin: JSON.stringify(conf({ cniVersion: "1.1.0", network: "nosuchnet" })) },
      { what: "knit-ipam without ipam", plugin: "knit-ipam", env: env("ADD"), stdin: JSON.stringify(conf({ type: "knit-ipam" })) },
      { what: "knit-portmap without prevResult", plugin: "knit-portmap", env: env("ADD"), stdin: JSON.stringify(conf({ type: "knit-portmap", runtimeConfig: { portMappings: [{ hostPort: 8080, containerPort: 80 }] } })) },
    ];
    const mismatches: string[] = [];
    for (const k of cases) {
      const plugin = k.plugin ?? "knit";
      const here = await call(plugin, { ...k.env, KNIT_CNI_AGENT: "0" }, k.stdin);
      const there = await call(plugin, k.env, k.stdin);
      if (here.trace?.path !== "in-process" || there.trace?.path !== "agent") mismatches.push(`${k.what}: paths ${String(here.trace?.path)} / ${String(there.trace?.path)} (${String(there.trace?.reason)})`);
      if (here.code !== 1 || there.code !== here.code || there.stdout !== here.stdout) mismatches.push(`${k.what}: in-process exit ${here.code} ${here.stdout.trim()} / agent exit ${there.code} ${there.stdout.trim()}`);
      // The one-line message on stderr too (the trace line aside).
      const message = (s: string): string => s.split("\n").filter((l) => !l.startsWith("knit-cni-trace ")).join("\n");
      if (message(there.stderr) !== message(here.stderr)) mismatches.push(`${k.what}: stderr ${message(here.stderr)} / ${message(there.stderr)}`);
    }
    expect(mismatches).toEqual([]);
    await expectNothingLeft(c);
  });
});

describe("the plugin process runs it itself", () => {
  test("no agent, a stale agent.pid, KNIT_CNI_AGENT=0, VERSION, another state directory, fault injection", async () => {
    await stopCniAgent(h);
    const c = await container(lab, "fb1");
    const stdin = JSON.stringify(conf());
    const add = await call("knit", cniEnv("ADD", "fb1", c.path), stdin);
    expect([add.code, add.trace?.path, add.trace?.reason]).toEqual([0, "in-process", "no agent"]);
    expect(await ifaceAddrs(lab, c, "eth0")).toEqual([`${firstAddress(JSON.parse(add.stdout) as Record<string, unknown>)}/24`]);

    // A killed agent leaves its agent.pid: its process is gone, so the plugin runs it.
    const agent = await startCniAgent(h);
    agent.kill("SIGKILL");
    await agent.exited;
    expect(JSON.parse(readFileSync(join(h.stateDir, "agent.pid"), "utf8"))).toMatchObject({ pid: agent.pid });
    const del = await call("knit", cniEnv("DEL", "fb1", c.path), stdin);
    expect([del.code, del.trace?.path, del.trace?.reason]).toEqual([0, "in-process", "no agent"]);
    await h.knitOk(["agent", "stop"]); // clears the stale record

    await startCniAgent(h);
    const off = await call("knit", { ...cniEnv("ADD", "fb2", c.path), KNIT_CNI_AGENT: "0" }, stdin);
    expect([off.code, off.trace?.path, off.trace?.reason]).toEqual([0, "in-process", "KNIT_CNI_AGENT=0"]);
    const version = await call("knit", { CNI_COMMAND: "VERSION" }, '{"cniVersion":"0.4.0"}');
    expect([version.code, version.trace?.path, version.trace?.reason]).toEqual([0, "in-process", "VERSION"]);
    expect((JSON.parse(version.stdout) as { cniVersion: string }).cniVersion).toBe("0.4.0");
    const fault = await call("knit", { ...cniEnv("DEL", "fb2", c.path), KNIT_FAIL_AT: "cni-add:after-connect" }, stdin);
    expect([fault.code, fault.trace?.path, fault.trace?.reason]).toEqual([0, "in-process", "fault injection"]);
    // A state directory no agent serves: the plugin's own store there.
    const other = join(lab.dir, "_other-state");
    const elsewhere = await call("knit", cniEnv("DEL", "fb3", c.path), JSON.stringify(conf({ stateDir: other })));
    expect([elsewhere.code, elsewhere.trace?.path, elsewhere.trace?.reason]).toEqual([0, "in-process", "no agent"]);
    await expectNothingLeft(c);
  });

  test("a hung agent: the plugin waits for its acknowledgement a bounded time, then runs the invocation itself, once", async () => {
    if (!cniAgentRecord(h)) await startCniAgent(h);
    const rec = cniAgentRecord(h);
    if (!rec) throw new Error("no agent");
    const ran = await agentRan();
    const c = await container(lab, "hung1");
    process.kill(rec.pid, "SIGSTOP");
    let add: Call;
    try {
      add = await call("knit", cniEnv("ADD", "hung1", c.path), JSON.stringify(conf()));
    } finally {
      process.kill(rec.pid, "SIGCONT");
    }
    expect([add.code, add.trace?.path, add.trace?.reason]).toEqual([0, "in-process", "agent: no acknowledgement within 5 s before it took the invocation"]);
    // The agent reads the request once it runs again, but never gets "go": it runs nothing.
    await Bun.sleep(500);
    expect(await agentRan()).toBe(ran);
    expect(await endpointClaims(h)).toHaveLength(1);
    expect((await links(lab, c)).map((l) => l.ifname).sort()).toEqual(["eth0", "lo"]);
    const del = await call("knit", cniEnv("DEL", "hung1", c.path), JSON.stringify(conf()));
    expect([del.code, del.trace?.path]).toEqual([0, "agent"]);
    await expectNothingLeft(c);
  });
});

describe("an agent that goes away", () => {
  test("killed in the middle of an ADD: error 11, the invocation is not run again, DEL and GC leave nothing", async () => {
    await stopCniAgent(h);
    await h.knit(["agent", "stop"]);
    const traces: Record<string, string | number>[] = [];
    const rt = tracedRuntime(traces);
    const list = knitList("front-cni", { network: FRONT });
    const [c1, c2] = [await container(lab, "kill1"), await container(lab, "kill2")];
    // An agent that kills itself half way through an ADD it was handed (after the veth is made).
    let agent = await startCniAgent(h, { KNIT_CRASH_AT: "cni-add:after-connect" });
    const err = await failure(rt.add(list, { containerId: "kill1", netns: c1.path, ifname: "eth0" }));
    expect(err.code).toBe(11);
    expect(err.msg).toBe("the knit agent did not answer: the connection closed");
    expect(err.details).toContain("DEL it");
    expect(await agent.exited).not.toBe(0);
    // Run once, in the agent: one address claimed, one interface made; never a second time in the plugin.
    expect(await endpointClaims(h)).toHaveLength(1);
    expect((await links(lab, c1)).map((l) => l.ifname).sort()).toEqual(["eth0", "lo"]);
    // The runtime's DEL (the agent is gone: the plugin runs it) undoes it all.
    await rt.del(list, { containerId: "kill1", netns: c1.path, ifname: "eth0" });
    expect(traces.at(-1)).toMatchObject({ path: "in-process", reason: "no agent" });
    await expectNothingLeft(c1);

    // Again, and this time a runtime that lost the container: GC cleans up.
    agent = await startCniAgent(h, { KNIT_CRASH_AT: "cni-add:after-connect" });
    expect((await failure(rt.add(list, { containerId: "kill2", netns: c2.path, ifname: "eth0" }))).code).toBe(11);
    await agent.exited;
    expect(await endpointClaims(h)).toHaveLength(1);
    expect(await rt.gc(list, [])).toEqual([]);
    await expectNothingLeft(c2);
    await h.knit(["agent", "stop"]);
  });

  test("invocations while the agent restarts: each runs exactly once, in the agent or in its plugin", async () => {
    await startCniAgent(h);
    const traces: Record<string, string | number>[] = [];
    const rt = tracedRuntime(traces);
    const list = knitList("front-cni", { network: FRONT });
    const nodes = await Promise.all(Array.from({ length: 12 }, (_, i) => container(lab, `rs${i}`)));
    const atts: RuntimeConf[] = nodes.map((n, i) => ({ containerId: `rs${i}`, netns: n.path, ifname: "eth0" }));
    const restart = async (): Promise<void> => {
      await Bun.sleep(30);
      await stopCniAgent(h);
      await startCniAgent(h);
    };
    const [results] = await Promise.all([Promise.all(atts.map((a) => rt.add(list, a))), restart()]);
    const ips = results.map(firstAddress);
    expect(new Set(ips).size).toBe(12);
    expect(await endpointClaims(h)).toHaveLength(12);
    for (const [i, n] of nodes.entries()) expect(await ifaceAddrs(lab, n, "eth0")).toEqual([`${ips[i] ?? ""}/24`]);
    expect(traces.every((t) => t.path === "agent" || t.path === "in-process")).toBe(true);
    expect(traces).toHaveLength(12);
    await Promise.all([Promise.all(atts.map((a) => rt.del(list, a))), restart()]);
    await expectNothingLeft(...nodes);
  });
});

describe("the plugin's side of the handoff", () => {
  /** An agent of our own in this test process, for a state directory of its own, that misbehaves as told. */
  async function fakeAgent(behaviour: "silent" | "close-after-go" | "close-before-ack" | "decline"): Promise<{ dir: string; stop(): void }> {
    const dir = join(lab.dir, `_fake-${behaviour}`);
    mkdirSync(dir, { recursive: true });
    const socket = join(dir, "agent-cni.sock");
    rmSync(socket, { force: true });
    const listener = Bun.listen<{ got: string }>({
      unix: socket,
      socket: {
        open(s) {
          s.data = { got: "" };
        },
        data(s, chunk) {
          s.data.got += chunk.toString();
          if (!s.data.got.includes("\n")) return;
          if (behaviour === "close-before-ack") s.end();
          else if (behaviour === "decline") s.end('{"ok":false,"reason":"not today"}\n');
          else if (!s.data.got.includes("\ngo\n")) s.write('{"ok":true,"cniVersion":"1.0.0"}\n');
          else if (behaviour === "close-after-go") s.end();
          // silent: never answers
        },
      },
    });
    writeFileSync(join(dir, "agent.pid"), JSON.stringify({ pid: process.pid, startTime: processStartTime(process.pid), host: "h", mode: "service", socket: "", cniSocket: socket, started: "" }));
    return {
      dir,
      stop: () => {
        listener.stop(true);
        rmSync(join(dir, "agent.pid"), { force: true });
      },
    };
  }

  test("an agent that takes the invocation and never answers, or breaks the connection: error 11, bounded; one that declines or breaks before: the plugin runs it", async () => {
    const c = await container(lab, "fake1");
    const silent = await fakeAgent("silent");
    try {
      const started = Date.now();
      const r = await call("knit", { ...cniEnv("DEL", "fake1", c.path), KNIT_CNI_AGENT_TIMEOUT: "1" }, JSON.stringify(conf({ stateDir: silent.dir })));
      expect(Date.now() - started).toBeLessThan(30_000);
      expect(r.code).toBe(1);
      expect(JSON.parse(r.stdout)).toEqual({
        cniVersion: "1.0.0",
        code: 11,
        msg: "the knit agent did not answer: no answer within 1 s",
        details: "it had taken the invocation, which may be done in part or in full: try again, or DEL it (DEL is idempotent)",
      });
    } finally {
      silent.stop();
    }
    const broken = await fakeAgent("close-after-go");
    try {
      const r = await call("knit", cniEnv("DEL", "fake1", c.path), JSON.stringify(conf({ stateDir: broken.dir })));
      expect(r.code).toBe(1);
      expect(JSON.parse(r.stdout)).toMatchObject({ code: 11, msg: "the knit agent did not answer: the connection closed" });
    } finally {
      broken.stop();
    }
    for (const [behaviour, reason] of [
      ["close-before-ack", "agent: the connection closed before it took the invocation"],
      ["decline", "agent declined: not today"],
    ] as const) {
      const fake = await fakeAgent(behaviour);
      try {
        const r = await call("knit", cniEnv("DEL", "fake1", c.path), JSON.stringify(conf({ stateDir: fake.dir })));
        expect([r.code, r.stdout, r.trace?.path, r.trace?.reason]).toEqual([0, "", "in-process", reason]);
      } finally {
        fake.stop();
      }
    }
  });
});

describe("the host is clean", () => {
  test("after everything: no agent, attachment, claim, link or rule is left", async () => {
    await stopCniAgent(h);
    await h.knit(["agent", "stop"]);
    await expectNothingLeft();
    await h.knitOk(["network", "rm", FRONT]);
    await assertHostClean(h);
    await h.knitOk(["network", "create", "--subnet", "10.96.0.0/24", FRONT]);
  });
});
