/**
 * The CNI protocol layer on its own (no kernel, no store): environment and name validation,
 * CNI_ARGS, version rules, Go-style JSON decoding, result formats in every version, a fuzz of
 * the decoding layer that must only ever end in a CniError (never another exception), and
 * the handoff of invocations to the agent (src/cni/handoff.ts): the agent's side served by
 * this test process, the plugin's side run as a plugin process.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { CniServer } from "../src/agent/cni-server.ts";
import { jsonLogger } from "../src/agent/log.ts";
import { hostName, processStartTime } from "../src/engine/owner.ts";
import { HANDOFF_SOCKET, HANDOFF_VERSION, type HandoffAck } from "../src/cni/handoff.ts";
import { CniError } from "../src/cni/errors.ts";
import { Fields, field } from "../src/cni/json.ts";
import { loadConfig, parseCniArgs, readInvocation, SupportedVersions } from "../src/cni/protocol.ts";
import { parsePluginConf } from "../src/cni/config.ts";
import { formatResult, parseResult, type CniResult } from "../src/cni/result.ts";
import { rangeCidr } from "../src/cni/network.ts";
import { parseCidr } from "../src/net/ip.ts";
import { runPlugin } from "../src/cni/main.ts";
import { randomJson } from "./cni-lab.ts";

/** The CNI code a function fails with. */
function codeOf(fn: () => unknown): number | "ok" {
  try {
    fn();
    return "ok";
  } catch (err) {
    if (err instanceof CniError) return err.code;
    throw err;
  }
}

const base = { CNI_COMMAND: "ADD", CNI_CONTAINERID: "abc", CNI_NETNS: "/run/netns/x", CNI_IFNAME: "eth0", CNI_PATH: "/opt/cni/bin" };

describe("environment", () => {
  test("required variables per command, named in the message (code 4)", () => {
    const missing = (env: Record<string, string>): string => {
      try {
        readInvocation(env);
        return "ok";
      } catch (err) {
        return `${(err as CniError).code} ${(err as CniError).message}`;
      }
    };
    expect(missing({})).toBe("4 required env variables [CNI_COMMAND] missing");
    expect(missing({ CNI_COMMAND: "ADD" })).toBe("4 required env variables [CNI_CONTAINERID,CNI_NETNS,CNI_IFNAME,CNI_PATH] missing");
    expect(missing({ CNI_COMMAND: "DEL", CNI_CONTAINERID: "a", CNI_IFNAME: "eth0", CNI_PATH: "/x" })).toBe("ok");
    expect(missing({ CNI_COMMAND: "GC" })).toBe("4 required env variables [CNI_PATH] missing");
    expect(missing({ CNI_COMMAND: "STATUS", CNI_PATH: "/x" })).toBe("ok");
    expect(missing({ CNI_COMMAND: "VERSION" })).toBe("ok");
    expect(missing({ ...base, CNI_COMMAND: "add" })).toBe("4 unknown CNI_COMMAND: add");
  });

  test("container ids and interface names are validated as the spec says", () => {
    for (const id of ["-abc", "a b", "a/b", "ä", "a:b", ".x"]) expect(codeOf(() => readInvocation({ ...base, CNI_CONTAINERID: id }))).toBe(4);
    for (const id of ["a", "A1_b.c-d", "0".repeat(200)]) expect(codeOf(() => readInvocation({ ...base, CNI_CONTAINERID: id }))).toBe("ok");
    for (const ifname of [".", "..", "a/b", "a:b", "a b", "a\tb", "x".repeat(16), "a\u00a0b"]) expect(codeOf(() => readInvocation({ ...base, CNI_IFNAME: ifname }))).toBe(4);
    for (const ifname of ["eth0", "x".repeat(15), "net-1.2", "é"]) expect(codeOf(() => readInvocation({ ...base, CNI_IFNAME: ifname }))).toBe("ok");
  });

  test("CNI_ARGS: known keys, IgnoreUnknown, malformed pairs", () => {
    expect(parseCniArgs("IP=10.0.0.5;K8S_POD_NAME=web", ["IP", "K8S_POD_NAME"])).toEqual({ IP: "10.0.0.5", K8S_POD_NAME: "web" });
    expect(parseCniArgs("IgnoreUnknown=1;FOO=bar;IP=1.2.3.4", ["IP"])).toEqual({ IP: "1.2.3.4" });
    expect(parseCniArgs("IgnoreUnknown=true;FOO=a=b", ["IP"])).toEqual({});
    expect(parseCniArgs("", ["IP"])).toEqual({});
    expect(codeOf(() => parseCniArgs("FOO=bar", ["IP"]))).toBe(4);
    expect(codeOf(() => parseCniArgs("IgnoreUnknown=0;FOO=bar", ["IP"]))).toBe(4);
    expect(codeOf(() => parseCniArgs("IP", ["IP"]))).toBe(4);
  });
});

describe("configuration", () => {
  test("decoding and validation codes: 6 for bad JSON and types, 7 for names, 1 for versions", () => {
    const c = (text: string, cmd: "ADD" | "CHECK" | "GC" | "STATUS" = "ADD") => codeOf(() => loadConfig(text, cmd));
    expect(c("")).toBe(6);
    expect(c("{")).toBe(6);
    expect(c("[]")).toBe(6);
    expect(c('"x"')).toBe(6);
    expect(c("null")).toBe(7);
    expect(c("{}")).toBe(7);
    expect(c('{"name": 5}')).toBe(6);
    expect(c('{"name": "bad name"}')).toBe(7);
    expect(c('{"name": "n", "cniVersion": 1}')).toBe(6);
    expect(c('{"name": "n", "cniVersion": "2.0.0"}')).toBe(1);
    expect(c('{"name": "n"}')).toBe("ok"); // 0.1.0
    expect(c('{"name": "n", "cniVersion": "0.3.1"}', "CHECK")).toBe(1);
    expect(c('{"name": "n", "cniVersion": "abc"}', "CHECK")).toBe(6);
    expect(c('{"name": "n", "cniVersion": "1.0.0"}', "GC")).toBe(1);
    expect(c('{"name": "n", "cniVersion": "1.0.0"}', "STATUS")).toBe(1);
    expect(c('{"name": "n", "cniVersion": "1.1.0"}', "STATUS")).toBe("ok");
  });

  test("keys match case-insensitively as in Go; the last matching key wins; null is absent", () => {
    const f = new Fields({ bandWidth: 1, BANDWIDTH: 2, Mtu: null }, "c");
    expect(f.raw("bandwidth")).toBe(2);
    expect(f.has("mtu")).toBe(false);
    expect(field({ Name: "a", name: "b" }, "name")).toBe("b");
    const loaded = loadConfig(JSON.stringify({ NAME: "net1", CniVersion: "1.1.0", TYPE: "knit", RuntimeConfig: { BandWidth: { IngressRate: 1000, ingressburst: 800 }, PORTMAPPINGS: [{ HostPort: 80, containerport: 8080, Protocol: "TCP" }] } }), "ADD");
    expect(loaded.name).toBe("net1");
    const conf = parsePluginConf(loaded, readInvocation(base), {});
    expect(conf.runtime.bandwidth).toEqual({ ingressRate: 1000, ingressBurst: 800 });
    expect(conf.runtime.portMappings).toEqual([{ hostPort: 80, containerPort: 8080, protocol: "tcp", hostIP: "" }]);
  });

  test("wrong types in known fields are decoding errors naming the field", () => {
    const inv = readInvocation(base);
    const bad = (extra: Record<string, unknown>): string => {
      try {
        parsePluginConf(loadConfig(JSON.stringify({ name: "n", cniVersion: "1.1.0", ...extra }), "ADD"), inv, {});
        return "ok";
      } catch (err) {
        return `${(err as CniError).code} ${(err as CniError).message}`;
      }
    };
    expect(bad({ runtimeConfig: { ips: "10.0.0.1" } })).toBe("6 cannot decode config.runtimeConfig.ips: expected an array, got string");
    expect(bad({ runtimeConfig: { bandwidth: { ingressRate: 1.5 } } })).toMatch(/^6 cannot decode config.runtimeConfig.bandwidth.ingressRate/);
    expect(bad({ ipam: { ranges: [{ subnet: "10.0.0.0/24" }] } })).toMatch(/^6 cannot decode config.ipam.ranges\[0\]/);
    expect(bad({ ipam: { ranges: [[]] } })).toMatch(/^7 /);
    expect(bad({ stateDir: 5 })).toBe("6 cannot decode config.stateDir: expected a string, got number");
    expect(bad({ prevResult: { ips: [{ address: 5 }] } })).toMatch(/^6 /);
    expect(bad({ args: { cni: { ips: [1] } } })).toMatch(/^6 /);
  });

  test("host-local ranges become knit ip-ranges only when they are CIDR blocks", () => {
    const s = parseCidr("10.1.0.0/24");
    expect(rangeCidr(s, { subnet: "10.1.0.0/24" })).toBeUndefined();
    expect(rangeCidr(s, { subnet: "", rangeStart: "10.1.0.1", rangeEnd: "10.1.0.254" })).toBeUndefined();
    expect(rangeCidr(s, { subnet: "", rangeStart: "10.1.0.128", rangeEnd: "10.1.0.255" })).toBe("10.1.0.128/25");
    expect(rangeCidr(s, { subnet: "", rangeStart: "10.1.0.64", rangeEnd: "10.1.0.127" })).toBe("10.1.0.64/26");
    expect(codeOf(() => rangeCidr(s, { subnet: "", rangeStart: "10.1.0.10", rangeEnd: "10.1.0.20" }))).toBe(7);
    expect(codeOf(() => rangeCidr(s, { subnet: "", rangeStart: "10.2.0.10" }))).toBe(7);
  });
});

describe("results", () => {
  const res: CniResult = {
    interfaces: [{ name: "br0", mac: "aa:bb:cc:dd:ee:01", mtu: 1500 }, { name: "veth1", mac: "aa:bb:cc:dd:ee:02", mtu: 1500 }, { name: "eth0", mac: "02:42:0a:00:00:02", sandbox: "/run/netns/c" }],
    ips: [{ address: "10.0.0.2/24", gateway: "10.0.0.1", interface: 2 }, { address: "fd00::2/64", gateway: "fd00::1", interface: 2 }],
    routes: [{ dst: "0.0.0.0/0", gw: "10.0.0.1", mtu: 1400, priority: 5 }, { dst: "::/0", gw: "fd00::1" }],
    dns: { nameservers: ["10.0.0.1"], search: ["example"] },
  };

  test("each version's shape", () => {
    expect(formatResult(res, "1.1.0")).toEqual({ cniVersion: "1.1.0", interfaces: res.interfaces, ips: res.ips, routes: res.routes, dns: res.dns });
    const v100 = formatResult(res, "1.0.0");
    expect((v100.interfaces as object[])[0]).toEqual({ name: "br0", mac: "aa:bb:cc:dd:ee:01" });
    expect((v100.routes as object[])[0]).toEqual({ dst: "0.0.0.0/0", gw: "10.0.0.1" });
    for (const v of ["0.3.0", "0.3.1", "0.4.0"] as const) {
      expect((formatResult(res, v).ips as object[]).map((i) => (i as { version: string }).version)).toEqual(["4", "6"]);
    }
    expect(formatResult(res, "0.2.0")).toEqual({
      cniVersion: "0.2.0",
      ip4: { ip: "10.0.0.2/24", gateway: "10.0.0.1", routes: [{ dst: "0.0.0.0/0", gw: "10.0.0.1" }] },
      ip6: { ip: "fd00::2/64", gateway: "fd00::1", routes: [{ dst: "::/0", gw: "fd00::1" }] },
      dns: res.dns,
    });
    expect(formatResult({ interfaces: [], ips: [], routes: [], dns: {} }, "1.0.0")).toEqual({ cniVersion: "1.0.0", dns: {} });
  });

  test("a printed result reads back (as prevResult) into the same thing, in every version", () => {
    for (const v of SupportedVersions) {
      const back = parseResult(JSON.parse(JSON.stringify(formatResult(res, v))), v);
      expect(formatResult(back, v)).toEqual(formatResult(res, v));
    }
  });
});

describe("the plugin entry point, in process", () => {
  test("VERSION answers whatever stdin holds; errors are JSON with the version of the config", async () => {
    const v = await runPlugin("knit", { CNI_COMMAND: "VERSION" }, () => "garbage");
    expect([v.code, JSON.parse(v.stdout)]).toEqual([0, { cniVersion: "1.1.0", supportedVersions: [...SupportedVersions] }]);
    const v2 = await runPlugin("knit", { CNI_COMMAND: "VERSION" }, () => '{"cniVersion":"0.4.0"}');
    expect((JSON.parse(v2.stdout) as { cniVersion: string }).cniVersion).toBe("0.4.0");
    const e = await runPlugin("knit", { ...base, CNI_NETNS: "/nonexistent/ns" }, () => '{"cniVersion":"0.4.0","name":"n","type":"knit"}');
    expect(e.code).toBe(1);
    expect(JSON.parse(e.stdout)).toEqual({ cniVersion: "0.4.0", code: 4, msg: "CNI_NETNS: /nonexistent/ns does not exist", details: "give the path of the container's network namespace" });
    const own = await runPlugin("knit", { ...base, CNI_NETNS: "/proc/self/ns/net" }, () => '{"cniVersion":"1.1.0","name":"n","type":"knit"}');
    expect((JSON.parse(own.stdout) as { code: number }).code).toBe(8);
  });
});

/** A small deterministic PRNG, so a failing case can be replayed from its seed. */
function prng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

describe("fuzz of the decoding layer", () => {
  test("random, truncated and mistyped configurations end as a CniError, never another exception", () => {
    const rnd = prng(20251127);
    const valid = JSON.stringify({ cniVersion: "1.1.0", name: "net", type: "knit", ipam: { type: "knit-ipam", ranges: [[{ subnet: "10.1.0.0/24" }]] }, runtimeConfig: { portMappings: [{ hostPort: 80, containerPort: 80, protocol: "tcp" }], bandwidth: { ingressRate: 1, ingressBurst: 1 }, ips: ["10.1.0.5"] }, prevResult: { cniVersion: "1.1.0", interfaces: [{ name: "eth0" }], ips: [{ address: "10.1.0.5/24", interface: 0 }] } });
    const inv = readInvocation(base);
    let ok = 0;
    for (let i = 0; i < 5000; i++) {
      let text: string;
      const kind = i % 3;
      if (kind === 0) text = JSON.stringify(randomJson(rnd));
      else if (kind === 1) text = valid.slice(0, Math.floor(rnd() * valid.length));
      else {
        const o = JSON.parse(valid) as Record<string, unknown>;
        const keys = Object.keys(o);
        o[keys[Math.floor(rnd() * keys.length)] ?? "name"] = randomJson(rnd, 3);
        text = JSON.stringify(o);
      }
      for (const cmd of ["ADD", "DEL", "CHECK", "GC", "STATUS"] as const) {
        try {
          const loaded = loadConfig(text, cmd);
          const conf = parsePluginConf(loaded, { ...inv, command: cmd }, {});
          if (conf.prevResult) formatResult(conf.prevResult, loaded.cniVersion);
          ok++;
        } catch (err) {
          if (!(err instanceof CniError)) throw new Error(`case ${i} (${cmd}) threw ${String(err)} for ${text.slice(0, 300)}`);
          expect([1, 2, 4, 5, 6, 7]).toContain(err.code);
          if (kind === 1 && text.length < valid.length) expect(err.code === 6 || err.code === 7 || err.code === 1).toBe(true);
        }
      }
    }
    expect(ok).toBeGreaterThan(0);
  });
});

describe("the handoff to the agent", () => {
  // This test process is the agent of a state directory of its own; the plugin runs as a
  // process (src/cni/client.ts with the sources as its full plugin), as a runtime runs it.
  let dir = "";
  let server: CniServer;
  const client = join(import.meta.dir, "..", "src", "cni", "client.ts");
  const engine = join(import.meta.dir, "..", "src", "cni", "main.ts");

  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), "knit-handoff-"));
    server = new CniServer({ stateDir: dir, socket: join(dir, HANDOFF_SOCKET), log: jsonLogger("error") });
    server.start();
    writeFileSync(join(dir, "agent.pid"), JSON.stringify({ pid: process.pid, startTime: processStartTime(process.pid), host: hostName(), mode: "service", socket: "", cniSocket: join(dir, HANDOFF_SOCKET), started: "" }));
  });

  afterAll(async () => {
    await server.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  /** The environment of an invocation for this state directory and host. */
  const envFor = (extra: Record<string, string> = {}): Record<string, string> => ({ ...base, KNIT_STATE_DIR: dir, KNIT_HOST: hostName(), ...extra });

  async function plugin(env: Record<string, string>, stdin: string): Promise<{ code: number; stdout: string; stderr: string }> {
    const proc = Bun.spawn([process.execPath, client, "--plugin", "knit", "--engine", engine], {
      env: { PATH: process.env.PATH ?? "/usr/bin:/bin", KNIT_CNI_TRACE: "1", ...env },
      stdin: new TextEncoder().encode(stdin),
      stdout: "pipe",
      stderr: "pipe",
    });
    const [stdout, stderr, code] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
    return { code, stdout, stderr };
  }

  test("errors of bad input come back as the same error JSON as runPlugin's in this process", async () => {
    const good = { cniVersion: "1.0.0", name: "n", type: "knit" };
    const cases: [Record<string, string>, string][] = [
      [envFor(), "{"],
      [envFor(), ""],
      [envFor(), JSON.stringify({ ...good, name: 5 })],
      [envFor(), JSON.stringify({ ...good, cniVersion: "9.9.9" })],
      [envFor({ CNI_COMMAND: "CHECK" }), JSON.stringify({ ...good, cniVersion: "0.3.1" })],
      [envFor({ CNI_IFNAME: "x".repeat(16) }), JSON.stringify(good)],
      [envFor({ CNI_ARGS: "FOO=bar" }), JSON.stringify(good)],
      [envFor({ CNI_PATH: "" }), JSON.stringify(good)],
      [envFor({ CNI_COMMAND: "FOO" }), JSON.stringify(good)],
      [envFor({ CNI_NETNS: "/nonexistent/ns" }), JSON.stringify(good)],
      [envFor(), JSON.stringify({ ...good, runtimeConfig: { ips: "10.0.0.1" } })],
      [envFor({ CNI_COMMAND: "GC" }), JSON.stringify({ ...good, cniVersion: "1.1.0" })],
    ];
    const ranBefore = server.stats.ran;
    for (const [env, stdin] of cases) {
      const here = await runPlugin("knit", env, () => stdin);
      const there = await plugin(env, stdin);
      expect([there.code, there.stdout]).toEqual([here.code, `${here.stdout}\n`]);
      expect(there.stderr).toContain(here.stderr);
      expect(there.stderr).toContain('"path":"agent"');
    }
    expect(server.stats.ran - ranBefore).toBe(cases.length);
  });

  /** The agent's acknowledgement of a raw request line. */
  async function ack(line: string): Promise<HandoffAck> {
    let got = "";
    const { promise, resolve } = Promise.withResolvers<HandoffAck>();
    const sock = await Bun.connect({
      unix: join(dir, HANDOFF_SOCKET),
      socket: {
        data(_s, chunk) {
          got += chunk.toString();
          if (got.includes("\n")) resolve(JSON.parse(got.slice(0, got.indexOf("\n"))) as HandoffAck);
        },
        close() {
          resolve({ ok: false, reason: `closed: ${got}` });
        },
      },
    });
    sock.write(`${line}\n`);
    const out = await promise;
    sock.end();
    return out;
  }

  test("the agent takes only what it would run as the plugin process would, and says why not", async () => {
    const req = (over: Record<string, unknown> = {}, env: Record<string, string> = {}, stdin = '{"cniVersion":"0.4.0","name":"n"}'): string =>
      JSON.stringify({ v: HANDOFF_VERSION, plugin: "knit", env: envFor(env), stdin, pid: process.pid, cwd: process.cwd(), ...over });
    const declined = async (line: string): Promise<string> => {
      const a = await ack(line);
      return a.ok ? "taken" : a.reason;
    };
    expect(await ack(req())).toEqual({ ok: true, cniVersion: "0.4.0" });
    expect(await ack(req({}, {}, "not json"))).toEqual({ ok: true, cniVersion: "1.1.0" });
    expect(await declined("{")).toBe("malformed request");
    expect(await declined(req({ v: 2 }))).toBe(`handoff protocol version 2, the agent speaks ${HANDOFF_VERSION}`);
    expect(await declined(req({ env: { A: 1 } }))).toBe("malformed request");
    expect(await declined(req({}, { KNIT_FAIL_AT: "cni-add:after-connect" }))).toBe("fault injection is asked for");
    expect(await declined(req({}, { CNI_COMMAND: "VERSION" }))).toBe("VERSION is answered by the plugin");
    expect(await declined(req({}, { KNIT_STATE_DIR: "/var/lib/elsewhere" }))).toBe(`state directory /var/lib/elsewhere is not the agent's (${dir})`);
    expect(await declined(req({}, {}, JSON.stringify({ name: "n", stateDir: "/var/lib/elsewhere" })))).toBe(`state directory /var/lib/elsewhere is not the agent's (${dir})`);
    expect(await declined(req({}, { KNIT_HOST: "another-host" }))).toBe(`host name another-host is not the agent's (${hostName()})`);
    expect(await declined(req({}, {}, JSON.stringify({ name: "n", HOST: "another-host" })))).toBe(`host name another-host is not the agent's (${hostName()})`);
    expect(await declined(req({ pid: 999_999_999 }))).toBe("the plugin runs in other namespaces than the agent");
    expect(await declined(req({ cwd: "/" }, { CNI_NETNS: "relative/ns" }))).toBe(process.cwd() === "/" ? "taken" : "relative paths, and another working directory than the agent's");
  });
});
