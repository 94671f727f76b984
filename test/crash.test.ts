/**
 * Crash safety, through the real CLI in lab hosts. For every fault point of
 * src/engine/faults.ts the matching command runs with
 *   KNIT_CRASH_AT=<point>  the process SIGKILLs itself there, then
 *     (a) `knit gc` repairs: the host is exactly as before the command (kernel and store),
 *         what survived still works (a fresh sandbox on the network pings), and after the
 *         test undoes its own setup nothing is left;
 *     (b) without gc, the next command touching the same network or sandbox (a retry, a
 *         `network rm`, ...) repairs what the crash left and succeeds, and no address or
 *         veth of the crashed command stays;
 *   KNIT_FAIL_AT=<point>   an error is thrown there: the command fails with a clear message and
 *     leaves the host as it was before (creations are rolled back) or as it will be after
 *     (removals are completed), at once, without gc.
 *
 * Every test gets a fresh lab host (its own namespace and store), so that one failure does
 * not spill into the next test.
 */
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, setDefaultTimeout, test } from "bun:test";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { Lab, NETNS_DIR, type ExecResult, type LabHost, type LabNode, type NetnsRef } from "../src/lab/lab.ts";
import { openSqliteStore } from "../src/store/sqlite.ts";
import { FaultPoints, type FaultPoint } from "../src/engine/faults.ts";
import { assertHostClean, knitNftState } from "./leaks.ts";

setDefaultTimeout(60_000);

/** The sandboxes' command: `sleep MARK`, so leftover processes can be found by their argv. */
const MARK = "86401";
const SUBNET = "10.40.0.0/24";
const GATEWAY = "10.40.0.1";

// ---- the host's state, kernel and store ------------------------------------------------

/**
 * Store keys that are bookkeeping, not objects: allocation cursors (where the next address
 * search starts) and the meta/* change counters (bumped by every network or port change).
 */
const COUNTERS = ["cursor/", "meta/"];

interface Snapshot {
  links: string[];
  addresses: string[];
  netns: string[];
  nft: string;
  store: string[];
  sandboxDirs: string[];
}

interface IpLink {
  ifname: string;
  master?: string;
  linkinfo?: { info_kind?: string };
}
interface IpAddr {
  ifname: string;
  addr_info: { family: string; local: string; prefixlen: number; scope: string }[];
}

/**
 * Links (names are random per endpoint, so veths count by bridge), addresses, knit
 * namespaces, nft tables, store keys (counters aside, see COUNTERS) and sandbox directories.
 */
async function snapshot(host: LabHost): Promise<Snapshot> {
  const links = JSON.parse((await host.exec(["ip", "-j", "-d", "link", "show"])).stdout) as IpLink[];
  const addrs = JSON.parse((await host.exec(["ip", "-j", "addr", "show"])).stdout) as IpAddr[];
  const store = await openSqliteStore(host.stateDir);
  let storeKeys: string[];
  try {
    storeKeys = (await store.list("")).items.map((kv) => kv.key).filter((k) => !COUNTERS.some((p) => k.startsWith(p)));
  } finally {
    await store.close();
  }
  const sbDir = join(host.stateDir, "sandboxes");
  return {
    links: links.map((l) => `${l.linkinfo?.info_kind === "veth" ? "veth*" : l.ifname} ${l.linkinfo?.info_kind ?? ""} ${l.master ?? ""}`).sort(),
    addresses: addrs.flatMap((a) => a.addr_info.filter((i) => i.scope !== "link").map((i) => `${a.ifname} ${i.local}/${i.prefixlen}`)).sort(),
    netns: existsSync(NETNS_DIR) ? readdirSync(NETNS_DIR).filter((n) => n.startsWith("knit-")).sort() : [],
    nft: await knitNftState(host),
    store: storeKeys.sort(),
    sandboxDirs: existsSync(sbDir) ? readdirSync(sbDir).sort() : [],
  };
}

/** PIDs of sandbox commands (`sleep MARK`) still running. */
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


// ---- running knit -------------------------------------------------------------------------

/**
 * No DNS agent is started on demand: it runs `knit gc` when it starts, and these tests must
 * show that commands repair by themselves, without gc.
 */
const NO_AGENT = { KNIT_AGENT_AUTOSTART: "0" } as const;

function knit(host: LabHost, args: readonly string[], env: Record<string, string> = {}): Promise<ExecResult> {
  return host.knit(args, { env: { ...NO_AGENT, ...env } });
}

function knitOk(host: LabHost, args: readonly string[]): Promise<ExecResult> {
  return host.knitOk(args, { env: NO_AGENT });
}

// ---- checks on what knit made -----------------------------------------------------------

let lab: Lab;
let hosts = 0;

/** IPv4 addresses (with prefix) on a namespace's interfaces other than lo. */
async function ipv4s(ns: NetnsRef): Promise<string[]> {
  const addrs = JSON.parse((await lab.exec(ns, ["ip", "-j", "-4", "addr", "show"])).stdout) as IpAddr[];
  return addrs.filter((a) => a.ifname !== "lo").flatMap((a) => a.addr_info.map((i) => `${i.local}/${i.prefixlen}`));
}

/** Ports (veths) enslaved to the network's bridge on the host. */
async function bridgePorts(host: LabHost, net: string): Promise<string[]> {
  const id = (await knitOk(host, ["network", "inspect", "-f", "{{.Id}}", net])).stdout.trim();
  const bridge = `br-${id.slice(0, 12)}`;
  const links = JSON.parse((await host.exec(["ip", "-j", "link", "show", "master", bridge])).stdout || "[]") as IpLink[];
  return links.map((l) => l.ifname);
}

/** A fresh sandbox on `net` gets one address in SUBNET and pings both ways. */
async function probe(host: LabHost, net: string): Promise<void> {
  const id = (await knitOk(host, ["run", "-d", "--name", "probe", "--network", net, "--", "sleep", MARK])).stdout.trim();
  const ns = { path: `${NETNS_DIR}/knit-${id.slice(0, 12)}` };
  const addrs = await ipv4s(ns);
  expect(addrs).toHaveLength(1);
  expect(addrs[0]).toMatch(/^10\.40\.0\.\d+\/24$/);
  expect(await host.ping(addrs[0]?.split("/")[0] ?? "")).toBe(true);
  expect(await lab.ping(ns, GATEWAY)).toBe(true);
  await knitOk(host, ["rm", "-f", "probe"]);
}

/** `c` is on `net` with exactly one address, one veth on the bridge, and answers pings. */
async function expectConnected(host: LabHost, c: LabNode, net: string): Promise<void> {
  const addrs = await ipv4s(c);
  expect(addrs).toHaveLength(1);
  expect(addrs[0]).toMatch(/^10\.40\.0\.\d+\/24$/);
  expect(await bridgePorts(host, net)).toHaveLength(1);
  expect(await host.ping(addrs[0]?.split("/")[0] ?? "")).toBe(true);
}

async function expectClean(host: LabHost, c: LabNode): Promise<void> {
  await assertHostClean(host, { extra: () => sandboxProcesses().map((p) => `sandbox process ${p} (sleep ${MARK}) still runs`) });
  const links = JSON.parse((await c.exec(["ip", "-j", "link", "show"])).stdout) as IpLink[];
  expect(links.map((l) => l.ifname)).toEqual(["lo"]);
}

// ---- scenarios: one per operation, covering its fault points ----------------------------

interface Ctx {
  h: LabHost;
  /** A plain lab namespace (the "container" that connect/disconnect wire). */
  c: LabNode;
}

interface NextCommand {
  what: string;
  run(t: Ctx): Promise<void>;
  /** Where it leaves the host: as after `base` ("base"), or with `base` undone too ("clean"). */
  ends: "base" | "clean";
}

interface Scenario {
  name: string;
  points: readonly FaultPoint[];
  /** "create": the command makes something; "remove": it removes what `object` made. */
  kind: "create" | "remove";
  /** What exists before and survives the command (a network), made by the test. */
  base(t: Ctx): Promise<void>;
  /** For "remove": what the command removes. */
  object?(t: Ctx): Promise<void>;
  args(t: Ctx): string[];
  /** Survivors work (after gc or a failed command). */
  survivors(t: Ctx): Promise<void>;
  /** Commands that must repair a crash without gc. */
  next: readonly NextCommand[];
  undoBase(t: Ctx): Promise<void>;
}

const createNet = (name = "net"): string[] => ["network", "create", "--subnet", SUBNET, name];
const runArgs = (name: string): string[] => ["run", "-d", "--name", name, "--network", "net", "--", "sleep", MARK];
const nothing = async (): Promise<void> => {};
const makeNet = async (t: Ctx): Promise<void> => void (await knitOk(t.h, createNet()));
const removeNet = async (t: Ctx): Promise<void> => void (await knitOk(t.h, ["network", "rm", "net"]));
const probeNet = (t: Ctx): Promise<void> => probe(t.h, "net");

const scenarios: readonly Scenario[] = [
  {
    name: "network create",
    points: ["network-create:after-store", "network-create:after-kernel"],
    kind: "create",
    base: nothing,
    args: () => createNet(),
    async survivors(t) {
      await makeNet(t);
      await probeNet(t);
      await removeNet(t);
    },
    next: [
      {
        what: "the same create again succeeds",
        async run(t) {
          await makeNet(t);
          await probeNet(t);
          await removeNet(t);
        },
        ends: "base",
      },
      { what: "network rm of the half-made network succeeds", run: removeNet, ends: "base" },
      {
        what: "another network with the same subnet can be created",
        async run(t) {
          await knitOk(t.h, createNet("other"));
          await probe(t.h, "other");
          await knitOk(t.h, ["network", "rm", "other"]);
        },
        ends: "base",
      },
    ],
    undoBase: nothing,
  },
  {
    name: "network rm",
    points: ["network-rm:after-mark", "network-rm:after-kernel"],
    kind: "remove",
    base: nothing,
    object: makeNet,
    args: () => ["network", "rm", "net"],
    survivors: nothing,
    next: [
      { what: "network rm again succeeds", run: removeNet, ends: "base" },
      {
        what: "a network with the same name and subnet can be created",
        async run(t) {
          await makeNet(t);
          await probeNet(t);
          await removeNet(t);
        },
        ends: "base",
      },
    ],
    undoBase: nothing,
  },
  {
    name: "network connect",
    points: ["connect:after-claim", "connect:after-kernel"],
    kind: "create",
    base: makeNet,
    args: (t) => ["network", "connect", "net", t.c.name],
    survivors: probeNet,
    next: [
      {
        what: "the same connect again succeeds, with one address and one veth",
        async run(t) {
          await knitOk(t.h, ["network", "connect", "net", t.c.name]);
          await expectConnected(t.h, t.c, "net");
          await probeNet(t);
          await knitOk(t.h, ["network", "disconnect", "net", t.c.name]);
        },
        ends: "base",
      },
      { what: "network rm succeeds", run: removeNet, ends: "clean" },
    ],
    undoBase: removeNet,
  },
  {
    name: "network disconnect",
    points: ["disconnect:after-mark", "disconnect:after-kernel"],
    kind: "remove",
    base: makeNet,
    async object(t) {
      await knitOk(t.h, ["network", "connect", "net", t.c.name]);
    },
    args: (t) => ["network", "disconnect", "net", t.c.name],
    survivors: probeNet,
    next: [
      { what: "disconnect again succeeds", run: (t) => knitOk(t.h, ["network", "disconnect", "net", t.c.name]).then(nothing), ends: "base" },
      { what: "network rm succeeds", run: removeNet, ends: "clean" },
      {
        what: "connect again succeeds, with one address and one veth",
        async run(t) {
          await knitOk(t.h, ["network", "connect", "net", t.c.name]);
          await expectConnected(t.h, t.c, "net");
          await knitOk(t.h, ["network", "disconnect", "net", t.c.name]);
        },
        ends: "base",
      },
    ],
    undoBase: removeNet,
  },
  {
    name: "run",
    points: ["run:after-record", "run:after-netns", "run:after-connect"],
    kind: "create",
    base: makeNet,
    args: () => runArgs("r1"),
    survivors: probeNet,
    next: [
      {
        what: "the same run (same name) again succeeds",
        async run(t) {
          const id = (await knitOk(t.h, runArgs("r1"))).stdout.trim();
          const ns = { path: `${NETNS_DIR}/knit-${id.slice(0, 12)}` };
          const addrs = await ipv4s(ns);
          expect(addrs).toHaveLength(1);
          expect(await bridgePorts(t.h, "net")).toHaveLength(1);
          expect(await t.h.ping(addrs[0]?.split("/")[0] ?? "")).toBe(true);
          await knitOk(t.h, ["rm", "-f", "r1"]);
        },
        ends: "base",
      },
      { what: "rm of the half-made sandbox succeeds", run: (t) => knitOk(t.h, ["rm", "-f", "r1"]).then(nothing), ends: "base" },
      { what: "network rm succeeds", run: removeNet, ends: "clean" },
    ],
    undoBase: removeNet,
  },
  {
    name: "rm",
    points: ["rm:after-mark", "rm:after-disconnect"],
    kind: "remove",
    base: makeNet,
    async object(t) {
      await knitOk(t.h, runArgs("r2"));
    },
    args: () => ["rm", "-f", "r2"],
    survivors: probeNet,
    next: [
      { what: "rm again succeeds", run: (t) => knitOk(t.h, ["rm", "-f", "r2"]).then(nothing), ends: "base" },
      { what: "network rm succeeds", run: removeNet, ends: "clean" },
      {
        what: "a sandbox with the same name can be run",
        async run(t) {
          await knitOk(t.h, runArgs("r2"));
          expect(await bridgePorts(t.h, "net")).toHaveLength(1);
          await knitOk(t.h, ["rm", "-f", "r2"]);
        },
        ends: "base",
      },
    ],
    undoBase: removeNet,
  },
];

const knitNetns = (): string[] => (existsSync(NETNS_DIR) ? readdirSync(NETNS_DIR).filter((n) => n.startsWith("knit-")) : []);
let netnsBefore = new Set<string>();

beforeAll(async () => {
  lab = await Lab.create();
});

// A failed test may leave sandboxes behind (its own host goes with the lab): remove their
// namespaces and processes so that the next test's leak checks judge that test alone.
beforeEach(() => {
  netnsBefore = new Set(knitNetns());
});

afterEach(async () => {
  for (const pid of sandboxProcesses()) process.kill(pid, "SIGKILL");
  for (const n of knitNetns()) if (!netnsBefore.has(n)) await lab.run(["ip", "netns", "delete", n], { check: false });
});

afterAll(async () => {
  await lab.cleanup();
});

/** A fresh host and namespace; base (and object) made; returns the state after base. */
async function prepare(s: Scenario): Promise<{ t: Ctx; atBase: Snapshot }> {
  const n = hosts++;
  const t: Ctx = { h: await lab.host(`h${n}`), c: await lab.ns(`c${n}`) };
  await knitOk(t.h, ["network", "ls"]); // the store and the predefined networks
  await s.base(t);
  const atBase = await snapshot(t.h);
  if (s.object) await s.object(t);
  return { t, atBase };
}

async function crash(s: Scenario, t: Ctx, point: FaultPoint): Promise<void> {
  const r = await knit(t.h, s.args(t), { KNIT_CRASH_AT: point });
  // SIGKILL: 128 + 9.
  expect({ point, code: r.code, stderr: r.stderr }).toEqual({ point, code: 137, stderr: "" });
}

test("every fault point is covered by a scenario", () => {
  expect(scenarios.flatMap((s) => s.points).sort()).toEqual([...FaultPoints].sort());
});

for (const s of scenarios) {
  describe(`crash in ${s.name}`, () => {
    for (const point of s.points) {
      test(`${point}: knit gc repairs, survivors work, nothing leaks`, async () => {
        const { t, atBase } = await prepare(s);
        await crash(s, t, point);
        const gc = await knitOk(t.h, ["gc"]);
        const report = JSON.parse(gc.stdout) as { sandboxes: number; networks: number; endpoints: number };
        expect(report.sandboxes + report.networks + report.endpoints).toBeGreaterThan(0);
        expect(await snapshot(t.h)).toEqual(atBase);
        // A second gc finds nothing more to do.
        const again = JSON.parse((await knitOk(t.h, ["gc"])).stdout) as Record<string, unknown>;
        expect(again).toEqual({ sandboxes: 0, forgotten: 0, networks: 0, endpoints: 0, orphanLinks: [] });
        await s.survivors(t);
        await s.undoBase(t);
        await expectClean(t.h, t.c);
      });

      for (const next of s.next) {
        test(`${point}: without gc, ${next.what}`, async () => {
          const { t, atBase } = await prepare(s);
          await crash(s, t, point);
          await next.run(t);
          if (next.ends === "base") {
            expect(await snapshot(t.h)).toEqual(atBase);
            await s.undoBase(t);
          }
          await expectClean(t.h, t.c);
        });
      }

      test(`${point}: KNIT_FAIL_AT fails clearly and leaves nothing behind, without gc`, async () => {
        const { t, atBase } = await prepare(s);
        const r = await knit(t.h, s.args(t), { KNIT_FAIL_AT: point });
        expect(r.code).not.toBe(0);
        expect(r.code).toBeLessThan(128);
        expect(r.stderr).toContain(`Error: injected failure at ${point}`);
        expect(await snapshot(t.h)).toEqual(atBase);
        await s.survivors(t);
        await s.undoBase(t);
        await expectClean(t.h, t.c);
      });
    }
  });
}
