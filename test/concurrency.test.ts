/**
 * Concurrency, through the real CLI: many `knit` processes started at the same moment on one
 * lab host must never hand out an address twice, create two networks where one may exist,
 * or leave anything half-made. Every claim is a store transaction; these tests check the
 * outcome in the kernel (`ip -j`, `nft -j`) and in the store file.
 */
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { readdirSync, readFileSync } from "node:fs";
import { Lab, NETNS_DIR, type ExecResult, type LabHost, type LabNode, type NetnsRef } from "../src/lab/lab.ts";
import { openSqliteStore } from "../src/store/sqlite.ts";
import { keys, type Endpoint, type Network } from "../src/model.ts";
import { assertHostClean } from "./leaks.ts";

setDefaultTimeout(120_000);

/** The sandboxes' command: `sleep MARK`, so leftover processes can be found by their argv. */
const MARK = "86402";

interface IpLink {
  ifname: string;
  master?: string;
  linkinfo?: { info_kind?: string };
}
interface IpAddr {
  ifname: string;
  addr_info: { family: string; local: string; prefixlen: number; scope: string }[];
}

let lab: Lab;

/** Read the host's store (in this process; SQLite in WAL mode allows it next to knit's). */
async function withStore<T>(host: LabHost, fn: (list: (prefix: string) => Promise<{ key: string; value: string }[]>) => Promise<T>): Promise<T> {
  const store = await openSqliteStore(host.stateDir);
  try {
    return await fn(async (prefix) => (await store.list(prefix)).items);
  } finally {
    await store.close();
  }
}

function sandboxProcesses(): number[] {
  const pids: number[] = [];
  for (const e of readdirSync("/proc")) {
    if (!/^\d+$/.test(e)) continue;
    try {
      if (readFileSync(`/proc/${e}/cmdline`, "utf8").split("\0").join(" ").trim() === `sleep ${MARK}`) pids.push(Number(e));
    } catch {
      // gone
    }
  }
  return pids;
}


const leftoverProcesses = (): string[] => sandboxProcesses().map((p) => `sandbox process ${p} (sleep ${MARK}) still runs`);

/** IPv4 addresses (address/prefix) per interface other than lo. */
async function ipv4s(ns: NetnsRef): Promise<string[]> {
  const addrs = JSON.parse((await lab.exec(ns, ["ip", "-j", "-4", "addr", "show"])).stdout) as IpAddr[];
  return addrs.filter((a) => a.ifname !== "lo").flatMap((a) => a.addr_info.map((i) => `${a.ifname} ${i.local}/${i.prefixlen}`));
}

async function linkNames(ns: NetnsRef): Promise<string[]> {
  return (JSON.parse((await lab.exec(ns, ["ip", "-j", "link", "show"])).stdout) as IpLink[]).map((l) => l.ifname);
}

async function bridges(host: LabHost): Promise<{ name: string; addrs: string[] }[]> {
  const links = JSON.parse((await host.exec(["ip", "-j", "-d", "link", "show", "type", "bridge"])).stdout || "[]") as IpLink[];
  const out = [];
  for (const l of links) {
    const a = JSON.parse((await host.exec(["ip", "-j", "-4", "addr", "show", "dev", l.ifname])).stdout) as IpAddr[];
    out.push({ name: l.ifname, addrs: a.flatMap((x) => x.addr_info.map((i) => `${i.local}/${i.prefixlen}`)) });
  }
  return out;
}

async function bridgePorts(host: LabHost, bridge: string): Promise<string[]> {
  return (JSON.parse((await host.exec(["ip", "-j", "link", "show", "master", bridge])).stdout || "[]") as IpLink[]).map((l) => l.ifname);
}

async function networkId(host: LabHost, name: string): Promise<string> {
  return (await host.knitOk(["network", "inspect", "-f", "{{.Id}}", name])).stdout.trim();
}

/** Start all commands at once; report every failure with its output. */
async function together(host: LabHost, argvs: readonly string[][]): Promise<ExecResult[]> {
  return Promise.all(argvs.map((a) => host.knit(a, { timeoutMs: 90_000 })));
}

function describeFailures(argvs: readonly string[][], results: readonly ExecResult[]): string[] {
  return results.flatMap((r, i) => (r.code === 0 ? [] : [`knit ${argvs[i]?.join(" ")} -> ${r.code}: ${r.stderr.trim()}`]));
}

beforeAll(async () => {
  lab = await Lab.create();
});

afterAll(async () => {
  await lab.cleanup();
});

describe("concurrent connects and disconnects", () => {
  const N = 20;
  let h: LabHost;
  let nss: LabNode[];

  beforeAll(async () => {
    h = await lab.host("conn");
    nss = await Promise.all(Array.from({ length: N }, (_, i) => lab.ns(`c${i}`)));
    await h.knitOk(["network", "create", "--subnet", "10.50.0.0/24", "conc"]);
  });

  test(`${N} connects at once: all succeed, ${N} distinct addresses, no duplicate claim`, async () => {
    const argvs = nss.map((ns) => ["network", "connect", "conc", ns.name]);
    const started = performance.now();
    const results = await together(h, argvs);
    const took = performance.now() - started;
    expect(describeFailures(argvs, results)).toEqual([]);
    console.log(`${N} concurrent connects: ${Math.round(took)} ms`);

    // The kernel: one address per namespace, all in the subnet, all different, none the gateway.
    const perNs = await Promise.all(nss.map((ns) => ipv4s(ns)));
    for (const addrs of perNs) {
      expect(addrs).toHaveLength(1);
      expect(addrs[0]).toMatch(/^eth0 10\.50\.0\.\d+\/24$/);
    }
    const ips = perNs.map((a) => (a[0] ?? "").split(" ")[1]?.split("/")[0] ?? "");
    expect(new Set(ips).size).toBe(N);
    expect(ips).not.toContain("10.50.0.1");
    const id = await networkId(h, "conc");
    expect(await bridgePorts(h, `br-${id.slice(0, 12)}`)).toHaveLength(N);

    // The store: N ready endpoints, N + 1 claims (the gateway), each address held once.
    await withStore(h, async (list) => {
      const eps = (await list(keys.endpointsOf(id))).map((kv) => JSON.parse(kv.value) as Endpoint);
      expect(eps).toHaveLength(N);
      expect(eps.every((e) => e.state === "ready")).toBe(true);
      expect(new Set(eps.map((e) => e.ipv4)).size).toBe(N);
      expect(eps.map((e) => e.ipv4?.split("/")[0]).sort()).toEqual([...ips].sort());
      const claims = await list(keys.ipamPrefix(id));
      expect(claims).toHaveLength(N + 1);
      expect(new Set(claims.map((c) => c.value)).size).toBe(N + 1);
      expect(await list("pending/")).toEqual([]);
    });

    // Every namespace is really wired: the host reaches all, and the first reaches the last.
    const pings = await Promise.all(ips.map((ip) => h.ping(ip)));
    expect(pings.every(Boolean)).toBe(true);
    expect(await nss[0]?.ping(ips[N - 1] ?? "")).toBe(true);
  });

  test(`${N} disconnects at once leave nothing`, async () => {
    const argvs = nss.map((ns) => ["network", "disconnect", "conc", ns.name]);
    const results = await together(h, argvs);
    expect(describeFailures(argvs, results)).toEqual([]);
    for (const ns of nss) expect(await linkNames(ns)).toEqual(["lo"]);
    const id = await networkId(h, "conc");
    expect(await bridgePorts(h, `br-${id.slice(0, 12)}`)).toEqual([]);
    await withStore(h, async (list) => {
      expect(await list(keys.endpointsOf(id))).toEqual([]);
      expect((await list(keys.ipamPrefix(id))).map((kv) => kv.value)).toEqual(["gateway"]);
      expect(await list("sandboxes/")).toEqual([]);
      expect(await list("members/")).toEqual([]);
    });
    await h.knitOk(["network", "rm", "conc"]);
    await assertHostClean(h, { extra: leftoverProcesses });
  });

  // The rm starts before, with, or after the connects: each outcome must be whole.
  for (const rmHeadStartMs of [-150, 0, 150]) {
    test(`network rm racing with connects (rm ${rmHeadStartMs < 0 ? "later" : rmHeadStartMs > 0 ? "earlier" : "at once"}): either it wins and nothing is connected, or it loses and every connect is whole`, async () => {
      await h.knitOk(["network", "create", "--subnet", "10.51.0.0/24", "race"]);
      const id = await networkId(h, "race");
      const bridge = `br-${id.slice(0, 12)}`;
      const some = nss.slice(0, 10);
      const later = async (ms: number, args: string[]): Promise<ExecResult> => {
        if (ms > 0) await Bun.sleep(ms);
        return h.knit(args, { timeoutMs: 90_000 });
      };
      const rmRun = later(-rmHeadStartMs, ["network", "rm", "race"]);
      const results = await Promise.all(some.map((ns) => later(rmHeadStartMs, ["network", "connect", "race", ns.name])));
      const rm = await rmRun;
      const connected = some.filter((_, i) => results[i]?.code === 0);
      for (const [i, r] of results.entries()) {
        if (r.code !== 0) expect(`${i}: ${r.stderr}`).toMatch(/^\d+: Error: network race (is being removed|not found)/);
      }
      console.log(`rm head start ${rmHeadStartMs} ms: network rm ${rm.code === 0 ? "won" : "lost"}; ${connected.length} of ${some.length} connects succeeded`);
      if (rm.code === 0) {
        expect(connected).toEqual([]);
        expect((await h.exec(["ip", "link", "show", bridge], { check: false })).code).not.toBe(0);
      } else {
        expect(rm.stderr).toMatch(/has active endpoints/);
        expect(connected.length).toBeGreaterThan(0);
        expect(await bridgePorts(h, bridge)).toHaveLength(connected.length);
      }
      for (const ns of some) expect(await ipv4s(ns)).toHaveLength(connected.includes(ns) ? 1 : 0);
      for (const ns of connected) await h.knitOk(["network", "disconnect", "race", ns.name]);
      if (rm.code !== 0) await h.knitOk(["network", "rm", "race"]);
      await assertHostClean(h, { extra: leftoverProcesses });
    });
  }
});

describe("concurrent runs and removals", () => {
  test("10 runs at once on one network: all run, wired, with distinct addresses; 10 rm at once leave nothing", async () => {
    const h = await lab.host("runs");
    await h.knitOk(["network", "create", "--subnet", "10.52.0.0/24", "runs"]);
    const names = Array.from({ length: 10 }, (_, i) => `r${i}`);
    const argvs = names.map((n) => ["run", "-d", "--name", n, "--network", "runs", "--", "sleep", MARK]);
    const results = await together(h, argvs);
    expect(describeFailures(argvs, results)).toEqual([]);
    // Every sandbox survived the others' start (each run first repairs crashed runs).
    const ps = (await h.knitOk(["ps", "--format", "{{.Names}} {{.Status}}"])).stdout.trim().split("\n").sort();
    expect(ps).toEqual(names.map((n) => `${n} running`).sort());
    const ids = results.map((r) => r.stdout.trim());
    const addrs = await Promise.all(ids.map((id) => ipv4s({ path: `${NETNS_DIR}/knit-${id.slice(0, 12)}` })));
    for (const a of addrs) {
      expect(a).toHaveLength(1);
      expect(a[0]).toMatch(/^eth0 10\.52\.0\.\d+\/24$/);
    }
    const ips = addrs.map((a) => (a[0] ?? "").split(" ")[1]?.split("/")[0] ?? "");
    expect(new Set(ips).size).toBe(10);
    expect((await Promise.all(ips.map((ip) => h.ping(ip)))).every(Boolean)).toBe(true);
    expect(sandboxProcesses()).toHaveLength(10);

    const rms = names.map((n) => ["rm", "-f", n]);
    expect(describeFailures(rms, await together(h, rms))).toEqual([]);
    expect(sandboxProcesses()).toEqual([]);
    await h.knitOk(["network", "rm", "runs"]);
    await assertHostClean(h, { extra: leftoverProcesses });
  });
});

describe("concurrent network creates", () => {
  let h: LabHost;

  beforeAll(async () => {
    h = await lab.host("create");
    await h.knitOk(["network", "ls"]);
  });

  test("10 creates of the same subnet: exactly one wins, the others report the overlap", async () => {
    const argvs = Array.from({ length: 10 }, (_, i) => ["network", "create", "--subnet", "10.60.0.0/24", `same-subnet-${i}`]);
    const results = await together(h, argvs);
    const winners = results.flatMap((r, i) => (r.code === 0 ? [i] : []));
    expect(winners).toHaveLength(1);
    const winner = `same-subnet-${winners[0]}`;
    const id = await networkId(h, winner);
    const bridge = `br-${id.slice(0, 12)}`;
    for (const r of results) {
      if (r.code === 0) continue;
      expect(r.code).toBe(1);
      // The winner is seen in the store, or (when it committed between the loser's reading of
      // networks and of routes) by the route of its bridge.
      const byStore = `Error: subnet 10.60.0.0/24 overlaps network "${winner}"`;
      const byRoute = `Error: subnet 10.60.0.0/24 overlaps a route on this host (10.60.0.0/24 dev ${bridge})`;
      const said = r.stderr.split("\n")[0] ?? "";
      expect({ said, ok: said.startsWith(byStore) || said.startsWith(byRoute) }).toEqual({ said, ok: true });
    }
    const brs = await bridges(h);
    expect(brs).toEqual([{ name: bridge, addrs: ["10.60.0.1/24"] }]);
    await withStore(h, async (list) => {
      const nets = (await list(keys.networks())).map((kv) => JSON.parse(kv.value) as Network).filter((n) => !n.predefined);
      expect(nets.map((n) => [n.name, n.state, n.subnets.map((s) => s.subnet)])).toEqual([[winner, "ready", ["10.60.0.0/24"]]]);
      expect(await list("pending/")).toEqual([]);
    });
    await h.knitOk(["network", "rm", winner]);
    await assertHostClean(h, { extra: leftoverProcesses });
  });

  test("5 creates of the same name: exactly one network", async () => {
    const argvs = Array.from({ length: 5 }, () => ["network", "create", "same-name"]);
    const results = await together(h, argvs);
    expect(results.filter((r) => r.code === 0)).toHaveLength(1);
    for (const r of results) if (r.code !== 0) expect(r.stderr).toContain("Error: network with name same-name already exists");
    const brs = await bridges(h);
    expect(brs).toHaveLength(1);
    const id = await networkId(h, "same-name");
    expect(brs[0]?.name).toBe(`br-${id.slice(0, 12)}`);
    await withStore(h, async (list) => {
      const nets = (await list(keys.networks())).map((kv) => JSON.parse(kv.value) as Network).filter((n) => !n.predefined);
      expect(nets.map((n) => n.name)).toEqual(["same-name"]);
    });
    await h.knitOk(["network", "rm", "same-name"]);
    await assertHostClean(h, { extra: leftoverProcesses });
  });
});

describe("concurrent first use of the predefined bridge", () => {
  test("two runs at once on a fresh host both succeed and share one knit0", async () => {
    // No knit command has run on this host: both processes also create the store and the
    // predefined networks at the same time.
    const h = await lab.host("fresh");
    const argvs = ["b1", "b2"].map((n) => ["run", "-d", "--name", n, "--", "sleep", MARK]);
    const results = await together(h, argvs);
    expect(describeFailures(argvs, results)).toEqual([]);

    const brs = await bridges(h);
    expect(brs).toEqual([{ name: "knit0", addrs: ["172.17.0.1/16"] }]);
    expect(await bridgePorts(h, "knit0")).toHaveLength(2);
    const ids = results.map((r) => r.stdout.trim());
    const addrs = await Promise.all(ids.map((id) => ipv4s({ path: `${NETNS_DIR}/knit-${id.slice(0, 12)}` })));
    for (const a of addrs) {
      expect(a).toHaveLength(1);
      expect(a[0]).toMatch(/^eth0 172\.17\.\d+\.\d+\/16$/);
    }
    const [ip1, ip2] = addrs.map((a) => (a[0] ?? "").split(" ")[1]?.split("/")[0] ?? "");
    expect(ip1).not.toBe(ip2);
    expect(await lab.ping({ path: `${NETNS_DIR}/knit-${ids[0]?.slice(0, 12)}` }, ip2 ?? "")).toBe(true);
    expect(await h.ping(ip1 ?? "")).toBe(true);
    // The firewall knows knit0 (masquerade for its subnet).
    const ruleset = (await h.exec(["nft", "-j", "list", "table", "inet", "knit"])).stdout;
    expect(ruleset).toContain("knit0");
    expect(ruleset).toContain("172.17.0.0");
    await withStore(h, async (list) => {
      const nets = (await list(keys.networks())).map((kv) => JSON.parse(kv.value) as Network);
      expect(nets.map((n) => n.name).sort()).toEqual(["bridge", "host", "none"]);
      expect(nets.find((n) => n.name === "bridge")?.driverState.kernelCreated).toBe(true);
    });

    await h.knitOk(["rm", "-f", "b1", "b2"]);
    // knit0 stays up once made (as docker0 does), with its firewall table holding knit0's
    // rules only: it is the predefined network's, not the test's.
    await assertHostClean(h, { defaultBridge: true, extra: leftoverProcesses });
    expect(await bridgePorts(h, "knit0")).toEqual([]);
  });
});
