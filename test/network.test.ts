/**
 * The single-host engine through the real CLI: `knit network ...` and `knit run` inside lab
 * hosts, checked against the kernel's own JSON (`ip -j`, `bridge -j`, `nft -j`) and real
 * traffic between namespaces. Every test removes what it made; afterEach proves it (kernel
 * and store), and scrubs the host when a test failed half-way so later tests start clean.
 *
 *   internet (198.51.100.10) ── r ── lan 10.10.0.0/24 ─┬─ h1 10.10.0.11   (most tests)
 *                                                      ├─ h2 10.10.0.12   (default pools)
 *                                                      └─ h3 10.10.0.13   (default pools)
 *
 * The internet routes 10.10.0.0/24 back to r but knows nothing of the sandboxes' subnets, so
 * a sandbox that reaches the internet server proves that its host masqueraded it.
 */
import { afterAll, afterEach, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { join } from "node:path";
import { INTERNET, Lab, type LabHost, type LabLan, type LabRouter, type NetnsRef, REPO_ROOT } from "../src/lab/lab.ts";
import { assertHostClean, findLeaks, findStoreLeaks } from "./leaks.ts";

setDefaultTimeout(60_000);

// ---- kernel JSON -------------------------------------------------------------------------

interface IpLink {
  ifname: string;
  mtu: number;
  address: string;
  master?: string;
  ifalias?: string;
  flags: string[];
  linkinfo?: { info_kind?: string; info_slave_kind?: string };
}
interface IpAddrInfo {
  family: "inet" | "inet6";
  local: string;
  prefixlen: number;
  scope: string;
  tentative?: boolean;
  dadfailed?: boolean;
}
interface IpAddr {
  ifname: string;
  addr_info: IpAddrInfo[];
}
interface IpRoute {
  dst: string;
  gateway?: string;
  dev?: string;
}
interface BridgeLink {
  ifname: string;
  master?: string;
  isolated?: boolean;
}
interface NftItem {
  set?: { name: string; elem?: unknown[] };
  rule?: { chain: string; comment?: string; expr: unknown[] };
}

/** Docker's `inspect` shapes, the parts the tests read. */
interface EndpointView {
  NetworkID: string;
  EndpointID: string;
  Gateway: string;
  IPAddress: string;
  IPPrefixLen: number;
  IPv6Gateway: string;
  GlobalIPv6Address: string;
  MacAddress: string;
  InterfaceName: string;
}
interface SandboxView {
  Id: string;
  Name: string;
  State: { Status: string; Running: boolean; Pid: number };
  NetworkSettings: { SandboxKey: string; Networks: Record<string, EndpointView> };
}
interface NetworkView {
  Name: string;
  Id: string;
  Driver: string;
  Scope: string;
  EnableIPv6: boolean;
  Internal: boolean;
  IPAM: { Driver: string; Config: { Subnet: string; IPRange?: string; Gateway?: string }[] };
  Containers: Record<string, { Name: string; EndpointID: string; MacAddress: string; IPv4Address: string; IPv6Address: string }>;
  Options: Record<string, string>;
  Labels: Record<string, string>;
}

let lab: Lab;
let lan: LabLan;
let h1: LabHost;
let router: LabRouter;

/** Run `ip -j ARGS` in a namespace and parse it. */
async function ipj<T>(node: NetnsRef, args: readonly string[]): Promise<T[]> {
  const r = await lab.exec(node, ["ip", "-j", ...args]);
  return JSON.parse(r.stdout || "[]") as T[];
}

/** One link by name, or undefined. */
async function link(node: NetnsRef, name: string): Promise<IpLink | undefined> {
  const r = await lab.exec(node, ["ip", "-j", "-d", "link", "show", "dev", name], { check: false });
  return r.code === 0 ? (JSON.parse(r.stdout) as IpLink[])[0] : undefined;
}

/** The host-side link of an endpoint, found by the alias knit gives it. */
async function linkByAlias(node: NetnsRef, alias: string): Promise<IpLink | undefined> {
  return (await ipj<IpLink>(node, ["-d", "link", "show"])).find((l) => l.ifalias === alias);
}

/** Addresses of one interface, as "addr/len". */
async function addrs(node: NetnsRef, dev: string, family?: "inet" | "inet6"): Promise<IpAddrInfo[]> {
  const list = await ipj<IpAddr>(node, ["addr", "show", "dev", dev]);
  return (list[0]?.addr_info ?? []).filter((a) => a.scope === "global" && (!family || a.family === family));
}
const cidrs = (infos: readonly IpAddrInfo[]): string[] => infos.map((a) => `${a.local}/${a.prefixlen}`);

async function defaultRoutes(node: NetnsRef, family: "-4" | "-6"): Promise<IpRoute[]> {
  return ipj<IpRoute>(node, [family, "route", "show", "default"]);
}

async function nftTable(host: LabHost): Promise<NftItem[] | undefined> {
  const r = await host.exec(["nft", "-j", "list", "table", "inet", "knit"], { check: false });
  return r.code === 0 ? (JSON.parse(r.stdout) as { nftables: NftItem[] }).nftables : undefined;
}

/** Rules of knit's table that carry a network's comment, by chain. */
async function rulesOf(host: LabHost, netId: string): Promise<{ forward: number; postrouting: number }> {
  const items = (await nftTable(host)) ?? [];
  const mine = items.flatMap((i) => (i.rule && i.rule.comment === `knit ${netId}` ? [i.rule] : []));
  return { forward: mine.filter((r) => r.chain === "forward").length, postrouting: mine.filter((r) => r.chain === "postrouting").length };
}

// ---- knit ----------------------------------------------------------------------------------

/** `knit network create ARGS`: returns the printed id (checked to be 64 hex digits). */
async function createNet(host: LabHost, args: readonly string[]): Promise<string> {
  const id = (await host.knitOk(["network", "create", ...args])).stdout.trim();
  expect(id).toMatch(/^[0-9a-f]{64}$/);
  return id;
}

async function inspectNet(host: LabHost, ref: string): Promise<NetworkView> {
  const views = JSON.parse((await host.knitOk(["network", "inspect", ref])).stdout) as NetworkView[];
  const v = views[0];
  if (!v) throw new Error(`no inspect output for ${ref}`);
  return v;
}

async function inspectSandbox(host: LabHost, ref: string): Promise<SandboxView> {
  const views = JSON.parse((await host.knitOk(["inspect", ref])).stdout) as SandboxView[];
  const v = views[0];
  if (!v) throw new Error(`no inspect output for ${ref}`);
  return v;
}

interface Sb {
  id: string;
  name: string;
  ns: NetnsRef;
  view: SandboxView;
}

/** `knit run -d --name NAME [--network N]... EXTRA -- sleep 1000`, inspected. */
async function runSb(host: LabHost, name: string, nets: readonly string[], extra: readonly string[] = []): Promise<Sb> {
  const out = await host.knitOk(["run", "-d", "--name", name, ...nets.flatMap((n) => ["--network", n]), ...extra, "--", "sleep", "1000"]);
  const id = out.stdout.trim();
  expect(id).toMatch(/^[0-9a-f]{64}$/);
  const view = await inspectSandbox(host, id);
  return { id, name, ns: { path: view.NetworkSettings.SandboxKey }, view };
}

/** The sandbox's IPv4 address on a network (no prefix). */
function ip4(sb: Sb, net: string): string {
  const ep = sb.view.NetworkSettings.Networks[net];
  if (!ep) throw new Error(`${sb.name} is not on ${net}`);
  return ep.IPAddress;
}

const names = (out: string): string[] => out.split("\n").filter((l) => l !== "");

// ---- cleanliness ---------------------------------------------------------------------------

/** Hosts this file uses, and whether the predefined bridge (knit0) was brought up on each. */
const hosts = new Map<LabHost, { defaultBridge: boolean }>();

/** Remove every sandbox and custom network a failed test may have left on a host. */
async function scrub(host: LabHost): Promise<void> {
  const sbs = names((await host.knit(["ps", "-aq", "--no-trunc"])).stdout);
  if (sbs.length) await host.knit(["rm", "-f", ...sbs]);
  const nets = names((await host.knit(["network", "ls", "-q", "--no-trunc", "--filter", "type=custom"])).stdout);
  for (const n of nets) {
    const r = await host.knit(["network", "inspect", n]);
    if (r.code !== 0) continue;
    const view = (JSON.parse(r.stdout) as NetworkView[])[0];
    for (const c of Object.values(view?.Containers ?? {})) await host.knit(["network", "disconnect", "-f", n, c.Name]);
  }
  if (nets.length) await host.knit(["network", "rm", ...nets]);
}

afterEach(async () => {
  const problems: string[] = [];
  for (const [host, o] of hosts) {
    try {
      await assertHostClean(host, { defaultBridge: o.defaultBridge });
    } catch (err) {
      problems.push((err as Error).message);
      await scrub(host);
    }
  }
  if (problems.length) throw new Error(problems.join("\n"));
});

beforeAll(async () => {
  lab = await Lab.create();
  lan = await lab.lan("lan");
  h1 = await lab.host("h1");
  await lab.plug(h1, lan, { ifname: "eth0", addresses: ["10.10.0.11/24", "fd00:10::11/64"] });
  router = await lab.router("r", [{ lan, addresses: ["10.10.0.1/24", "fd00:10::1/64"] }], { internet: true });
  hosts.set(h1, { defaultBridge: false });
});

afterAll(async () => {
  await lab.cleanup();
});

describe("knit network (bridge driver) on a lab host", () => {
  test("the seed commands: br0 and docker_gwbridge, run --ip, connect, disconnect, ls", async () => {
    // Verbatim, as users type them.
    const seeds = [
      ["network", "create", "--driver=bridge", "--gateway=192.168.1.1", "--subnet=192.168.1.0/24", "--opt", "com.docker.network.bridge.name=br0", "br0"],
      [
        "network", "create", "--subnet", "172.18.0.0/16", "--ip-range", "172.18.0.0/24",
        "--opt", "com.docker.network.bridge.name=docker_gwbridge",
        "--opt", "com.docker.network.bridge.enable_icc=true",
        "--opt", "com.docker.network.bridge.enable_ip_masquerade=true",
        "docker_gwbridge",
      ],
    ];
    const [br0 = "", gw = ""] = await Promise.all(seeds.map(async (argv) => (await h1.knitOk(argv)).stdout));
    for (const id of [br0, gw]) expect(id).toMatch(/^[0-9a-f]{64}\n$/);

    // Both bridges exist, are up, carry their gateway and knit's alias.
    for (const [dev, id, gwCidr] of [["br0", br0.trim(), "192.168.1.1/24"], ["docker_gwbridge", gw.trim(), "172.18.0.1/16"]] as const) {
      const l = await link(h1, dev);
      expect(l?.linkinfo?.info_kind).toBe("bridge");
      expect(l?.ifalias).toBe(`knit:${id}`);
      expect(l?.flags).toContain("UP");
      expect(cidrs(await addrs(h1, dev, "inet"))).toEqual([gwCidr]);
    }
    const gwView = await inspectNet(h1, "docker_gwbridge");
    expect(gwView.IPAM.Config).toEqual([{ Subnet: "172.18.0.0/16", IPRange: "172.18.0.0/24", Gateway: "172.18.0.1" }]);
    expect(gwView.Options["com.docker.network.bridge.enable_icc"]).toBe("true");

    const web = await runSb(h1, "web", ["br0"], ["--ip", "192.168.1.50"]);
    expect(cidrs(await addrs(web.ns, "eth0", "inet"))).toEqual(["192.168.1.50/24"]);
    const routes = await defaultRoutes(web.ns, "-4");
    expect(routes.map((r) => [r.gateway, r.dev])).toEqual([["192.168.1.1", "eth0"]]);
    expect(await lab.waitPing(web.ns, "192.168.1.1")).toBe(true);

    // connect: a second interface with an address from the ip-range (not merely the subnet).
    await h1.knitOk(["network", "connect", "docker_gwbridge", "web"]);
    const eth1 = cidrs(await addrs(web.ns, "eth1", "inet"));
    expect(eth1).toHaveLength(1);
    expect(eth1[0]).toMatch(/^172\.18\.0\.\d+\/16$/);
    const other = await runSb(h1, "other", ["docker_gwbridge"]);
    expect(cidrs(await addrs(other.ns, "eth0", "inet"))[0]).toMatch(/^172\.18\.0\.\d+\/16$/);
    expect(await lab.waitPing(other.ns, (eth1[0] ?? "").split("/")[0] ?? "")).toBe(true);
    const inWeb = await inspectSandbox(h1, "web");
    expect(Object.keys(inWeb.NetworkSettings.Networks).sort()).toEqual(["br0", "docker_gwbridge"]);
    const epId = inWeb.NetworkSettings.Networks["docker_gwbridge"]?.EndpointID ?? "";
    const hostVeth = await linkByAlias(h1, `knit:${epId}`);
    expect(hostVeth?.master).toBe("docker_gwbridge");

    const ls = names((await h1.knitOk(["network", "ls", "--format", "{{.Name}}"])).stdout);
    expect(ls).toEqual(["br0", "bridge", "docker_gwbridge", "host", "none"]);

    const twice = await h1.knit(["network", "connect", "docker_gwbridge", "web"]);
    expect(twice.code).toBe(1);
    expect(twice.stderr).toContain("endpoint with name web already exists in network docker_gwbridge");
    expect(await link(web.ns, "eth2")).toBeUndefined();

    // disconnect: interface, veth and the Containers entry are gone; br0 is untouched.
    await h1.knitOk(["network", "disconnect", "docker_gwbridge", "web"]);
    expect(await link(web.ns, "eth1")).toBeUndefined();
    expect(await linkByAlias(h1, `knit:${epId}`)).toBeUndefined();
    expect(Object.values((await inspectNet(h1, "docker_gwbridge")).Containers).map((c) => c.Name)).toEqual(["other"]);
    expect(cidrs(await addrs(web.ns, "eth0", "inet"))).toEqual(["192.168.1.50/24"]);

    const notThere = await h1.knit(["network", "disconnect", "docker_gwbridge", "web"]);
    expect(notThere.code).toBe(1);
    expect(notThere.stderr).toContain("sandbox web is not connected to network docker_gwbridge");
    await h1.knitOk(["rm", "-f", "web", "other"]);
    await h1.knitOk(["network", "rm", "br0", "docker_gwbridge"]);
    expect(await link(h1, "br0")).toBeUndefined();
    expect(await link(h1, "docker_gwbridge")).toBeUndefined();
  });

  test("bad input is refused with the reason and changes nothing in the kernel", async () => {
    const before = await ipj<IpLink>(h1, ["-d", "addr", "show"]);
    const cases: [readonly string[], string][] = [
      [["--subnet", "10.50.0.0/24", "--gateway", "10.51.0.1", "x"], "no matching subnet for gateway 10.51.0.1"],
      [["--subnet", "10.50.0.0/33", "x"], 'invalid subnet "10.50.0.0/33"'],
      [["--subnet", "fd00:9::/64", "x"], "given without --ipv6"],
      [["--ip-range", "10.50.0.0/28", "x"], "no matching subnet for ip-range 10.50.0.0/28"],
      [["-o", "com.docker.network.bridge.name=eth0", "x"], 'interface "eth0" already exists on this host'],
      [["-o", "com.docker.network.driver.mtu=9", "x"], "com.docker.network.driver.mtu"],
      [["-o", "com.docker.network.bridge.enable_icc=maybe", "x"], "expected true or false"],
      [["-o", "foo=bar", "x"], 'unknown option "foo" for the bridge driver'],
      [["--driver", "nosuch", "x"], 'unknown driver "nosuch"'],
      [["--driver", "host", "x"], 'only one instance of "host" network is allowed'],
      [["bad/name"], 'invalid network name "bad/name"'],
      [["bridge"], "network with name bridge already exists"],
    ];
    for (const [args, message] of cases) {
      const r = await h1.knit(["network", "create", ...args]);
      expect({ args, code: r.code }).toEqual({ args, code: 1 });
      expect(r.stderr).toContain(message);
    }
    expect(await ipj<IpLink>(h1, ["-d", "addr", "show"])).toEqual(before);
    expect(names((await h1.knitOk(["network", "ls", "--format", "{{.Name}}"])).stdout)).toEqual(["bridge", "host", "none"]);
  });

  test("an --ip-range bounds dynamic addresses; --ip may lie outside it, inside the subnet", async () => {
    await createNet(h1, ["--subnet", "10.99.0.0/24", "--ip-range", "10.99.0.8/30", "ranged"]);
    const got: string[] = [];
    for (let i = 0; i < 4; i++) got.push(ip4(await runSb(h1, `r${i}`, ["ranged"]), "ranged"));
    expect(got.sort()).toEqual(["10.99.0.10", "10.99.0.11", "10.99.0.8", "10.99.0.9"]);
    const full = await h1.knit(["run", "-d", "--name", "r4", "--network", "ranged", "--", "sleep", "1000"]);
    expect(full.code).toBe(125);
    expect(full.stderr).toContain("no available IPv4 addresses");
    const fixed = await runSb(h1, "r5", ["ranged"], ["--ip", "10.99.0.200"]);
    expect(cidrs(await addrs(fixed.ns, "eth0", "inet"))).toEqual(["10.99.0.200/24"]);
    const outside = await h1.knit(["run", "-d", "--name", "r6", "--network", "ranged", "--ip", "10.98.0.5", "--", "sleep", "1000"]);
    expect(outside.code).toBe(125);
    expect(outside.stderr).toContain("no configured subnet contains it");
    await h1.knitOk(["rm", "-f", "r0", "r1", "r2", "r3", "r5"]);
    await h1.knitOk(["network", "rm", "ranged"]);
  });

  test("kernel shape: MTU on bridge, veth and sandbox side; interface prefix; eth0/eth1; MAC; master", async () => {
    const shapeId = await createNet(h1, [
      "--opt", "com.docker.network.driver.mtu=1400",
      "--opt", "com.docker.network.container_iface_prefix=ens",
      "shape",
    ]);
    await createNet(h1, ["plain"]);
    await createNet(h1, ["plain2"]);
    const s = await runSb(h1, "s", ["plain"]);
    await h1.knitOk(["network", "connect", "plain2", "s"]);
    await h1.knitOk(["network", "connect", "shape", "s"]);
    const view = await inspectSandbox(h1, "s");
    const nets = view.NetworkSettings.Networks;
    expect([nets["plain"]?.InterfaceName, nets["plain2"]?.InterfaceName, nets["shape"]?.InterfaceName]).toEqual(["eth0", "eth1", "ens0"]);

    const bridge = `br-${shapeId.slice(0, 12)}`;
    expect((await link(h1, bridge))?.mtu).toBe(1400);
    const ep = nets["shape"];
    const veth = await linkByAlias(h1, `knit:${ep?.EndpointID ?? ""}`);
    expect(veth?.ifname).toBe(`veth${(ep?.EndpointID ?? "").slice(0, 7)}`);
    expect(veth?.mtu).toBe(1400);
    expect(veth?.master).toBe(bridge);
    expect(veth?.linkinfo?.info_kind).toBe("veth");
    expect(veth?.linkinfo?.info_slave_kind).toBe("bridge");
    const ens0 = await link(s.ns, "ens0");
    expect(ens0?.mtu).toBe(1400);
    expect(ens0?.flags).toContain("UP");
    // The MAC that inspect reports is the kernel's, in both views.
    expect(ens0?.address).toBe(ep?.MacAddress ?? "");
    expect((await inspectNet(h1, "shape")).Containers[s.id]?.MacAddress).toBe(ens0?.address ?? "?");
    for (const name of ["eth0", "eth1"] as const) {
      const e = Object.values(nets).find((n) => n.InterfaceName === name);
      expect((await link(s.ns, name))?.address).toBe(e?.MacAddress ?? "?");
      expect((await link(s.ns, name))?.mtu).toBe(1500);
    }
    // Traffic over the small-MTU network: a full-size (1372-byte payload) ping passes, unfragmented.
    const gw = nets["shape"]?.Gateway ?? "";
    const big = await lab.exec(s.ns, ["ping", "-n", "-q", "-c1", "-W2", "-M", "do", "-s", "1372", gw], { check: false });
    expect(big.code).toBe(0);
    const tooBig = await lab.exec(s.ns, ["ping", "-n", "-q", "-c1", "-W1", "-M", "do", "-s", "1373", gw], { check: false });
    expect(tooBig.code).not.toBe(0);

    // A freed name is reused: leave plain (eth0), join it again.
    await h1.knitOk(["network", "disconnect", "plain", "s"]);
    expect(await link(s.ns, "eth0")).toBeUndefined();
    await h1.knitOk(["network", "connect", "plain", "s"]);
    expect((await inspectSandbox(h1, "s")).NetworkSettings.Networks["plain"]?.InterfaceName).toBe("eth0");
    expect(await link(s.ns, "eth0")).toBeDefined();

    await h1.knitOk(["rm", "-f", "s"]);
    await h1.knitOk(["network", "rm", "shape", "plain", "plain2"]);
  });

  test("dual stack: both addresses, no DAD, IPv6 default route, ping6 between sandboxes", async () => {
    const id = await createNet(h1, ["--ipv6", "--subnet", "fd00:1::/64", "ds"]);
    const view = await inspectNet(h1, "ds");
    expect(view.EnableIPv6).toBe(true);
    const v4 = view.IPAM.Config.find((c) => !c.Subnet.includes(":"));
    expect(v4?.Subnet).toMatch(/^172\.\d+\.0\.0\/16$/); // from the default pools
    expect(view.IPAM.Config.find((c) => c.Subnet.includes(":"))).toEqual({ Subnet: "fd00:1::/64", Gateway: "fd00:1::1" });
    const bridge = `br-${id.slice(0, 12)}`;
    const brV6 = await addrs(h1, bridge, "inet6");
    expect(cidrs(brV6)).toEqual(["fd00:1::1/64"]);
    expect(brV6[0]?.tentative).toBeUndefined();

    const a = await runSb(h1, "a", ["ds"]);
    const b = await runSb(h1, "b", ["ds"]);
    for (const sb of [a, b]) {
      const ep = sb.view.NetworkSettings.Networks["ds"];
      const v6 = await addrs(sb.ns, "eth0", "inet6");
      expect(cidrs(v6)).toEqual([`${ep?.GlobalIPv6Address ?? "?"}/64`]);
      expect(v6[0]?.local).toMatch(/^fd00:1::/);
      expect(v6[0]?.tentative).toBeUndefined();
      expect(v6[0]?.dadfailed).toBeUndefined();
      expect(cidrs(await addrs(sb.ns, "eth0", "inet"))).toEqual([`${ep?.IPAddress ?? "?"}/16`]);
      expect((await defaultRoutes(sb.ns, "-6")).map((r) => r.gateway)).toEqual(["fd00:1::1"]);
      expect(ep?.IPv6Gateway).toBe("fd00:1::1");
    }
    const bV6 = b.view.NetworkSettings.Networks["ds"]?.GlobalIPv6Address ?? "";
    // No waiting for DAD: the very first ping6 succeeds.
    expect(await lab.ping(a.ns, bV6, { waitSec: 2 })).toBe(true);
    expect(await lab.ping(a.ns, "fd00:1::1")).toBe(true);
    expect(await lab.ping(b.ns, ip4(a, "ds"))).toBe(true);
    // The firewall masquerades the IPv6 subnet too.
    expect((await rulesOf(h1, id)).postrouting).toBe(2);

    // --ipv6 without an IPv6 subnet: a unique-local /64 is picked.
    await createNet(h1, ["--ipv6", "ula"]);
    const ula = (await inspectNet(h1, "ula")).IPAM.Config.map((c) => c.Subnet);
    expect(ula.some((s) => /^fd[0-9a-f]{2}:[0-9a-f]{1,4}:[0-9a-f]{1,4}:[0-9a-f]{1,4}::\/64$/.test(s))).toBe(true);

    await h1.knitOk(["rm", "-f", "a", "b"]);
    await h1.knitOk(["network", "rm", "ds", "ula"]);
  });

  test("traffic: same network connects, different networks are isolated both ways", async () => {
    const aId = await createNet(h1, ["--subnet", "10.31.0.0/24", "neta"]);
    const bId = await createNet(h1, ["--subnet", "10.32.0.0/24", "netb"]);
    const a1 = await runSb(h1, "a1", ["neta"]);
    const a2 = await runSb(h1, "a2", ["neta"]);
    const b1 = await runSb(h1, "b1", ["netb"]);
    expect(await lab.waitPing(a1.ns, ip4(a2, "neta"))).toBe(true);
    expect(await lab.waitPing(b1.ns, "10.32.0.1")).toBe(true);
    expect(await lab.ping(a1.ns, ip4(b1, "netb"))).toBe(false);
    expect(await lab.ping(b1.ns, ip4(a1, "neta"))).toBe(false);
    // The isolation is knit's: one rule per network, and both bridges in the set.
    const table = (await nftTable(h1)) ?? [];
    const set = table.find((i) => i.set?.name === "bridges")?.set;
    expect([...(set?.elem ?? [])].sort()).toEqual([`br-${aId.slice(0, 12)}`, `br-${bId.slice(0, 12)}`].sort());
    expect(await rulesOf(h1, aId)).toEqual({ forward: 1, postrouting: 1 });
    expect(await rulesOf(h1, bId)).toEqual({ forward: 1, postrouting: 1 });
    // A sandbox on both networks talks to both.
    await h1.knitOk(["network", "connect", "netb", "a2"]);
    expect(await lab.waitPing(a2.ns, ip4(b1, "netb"))).toBe(true);
    expect(await lab.ping(a2.ns, ip4(a1, "neta"))).toBe(true);

    // Control: without knit's forward rules the host routes between the two networks.
    await h1.exec(["nft", "flush", "chain", "inet", "knit", "forward"]);
    expect(await lab.waitPing(a1.ns, ip4(b1, "netb"))).toBe(true);
    await h1.knitOk(["rm", "-f", "a1", "a2", "b1"]);
    await h1.knitOk(["network", "rm", "neta", "netb"]);
    expect(await nftTable(h1)).toBeUndefined();
  });

  test("firewall cost: a second network is added in place, and no iptables runs without Docker", async () => {
    /** The kernel commands of one traced knit command (tool and arguments, no times). */
    const traced = async (args: readonly string[]): Promise<string[]> => {
      const r = await h1.knitOk(args, { env: { KNIT_TRACE: "1" } });
      const line = r.stderr.split("\n").find((l) => l.startsWith("knit-trace: ")) ?? "";
      return (JSON.parse(line.slice("knit-trace: ".length)) as { commands: string[] }).commands.map((c) => c.replace(/^\S+ /, ""));
    };
    const firewall = (commands: readonly string[]): string[] => commands.filter((c) => /^(nft|ip6?tables)/.test(c));
    await createNet(h1, ["--subnet", "10.33.0.0/24", "fwa"]);
    // No DOCKER-USER chain on this host: one `nft -f` that only adds, nothing else.
    expect(firewall(await traced(["network", "create", "--subnet", "10.34.0.0/24", "fwb"]))).toEqual(["nft -f -"]);
    const bId = (await h1.knitOk(["network", "inspect", "-f", "{{.Id}}", "fwb"])).stdout.trim();
    expect(await rulesOf(h1, bId)).toEqual({ forward: 1, postrouting: 1 });
    expect(firewall(await traced(["network", "rm", "fwb"]))).toEqual(["nft -f -"]);
    expect(await rulesOf(h1, bId)).toEqual({ forward: 0, postrouting: 0 });
    await h1.knitOk(["network", "rm", "fwa"]);
    expect(await nftTable(h1)).toBeUndefined();
  });

  test("masquerade: a sandbox reaches the internet, which sees the host's LAN address", async () => {
    const inet = await lab.internet();
    const script = join(lab.dir, "peer-server.ts");
    await Bun.write(
      script,
      `Bun.listen({ hostname: "0.0.0.0", port: 7100, socket: { data(s) { s.write(String(s.remoteAddress) + "\\n"); s.end(); } } });\n`,
    );
    const server = inet.spawn([join(REPO_ROOT, "node_modules", ".bin", "bun"), script]);
    try {
      await lab.waitListening(inet, 7100);
      await createNet(h1, ["--subnet", "10.33.0.0/24", "out"]);
      const s = await runSb(h1, "s", ["out"]);
      expect(await lab.waitPing(s.ns, INTERNET.server4)).toBe(true);
      expect(await lab.tcpSend(s.ns, INTERNET.server4, 7100, "who am i\n")).toBe("10.10.0.11\n");
      // Without knit's masquerade the internet has no way back to 10.33.0.0/24.
      expect(await lab.ping(inet, "10.33.0.2")).toBe(false);
      await h1.knitOk(["rm", "-f", "s"]);
      await h1.knitOk(["network", "rm", "out"]);
    } finally {
      await server.stop();
    }
  });

  test("enable_ip_masquerade=false: the internet is out of reach, the gateway is not", async () => {
    const id = await createNet(h1, ["--subnet", "10.34.0.0/24", "--opt", "com.docker.network.bridge.enable_ip_masquerade=false", "nomasq"]);
    const s = await runSb(h1, "s", ["nomasq"]);
    expect(await lab.waitPing(s.ns, "10.34.0.1")).toBe(true);
    expect(await lab.ping(s.ns, "10.10.0.11")).toBe(true); // the host itself, routed
    expect(await lab.ping(s.ns, INTERNET.server4)).toBe(false);
    expect(await rulesOf(h1, id)).toEqual({ forward: 1, postrouting: 0 });
    await h1.knitOk(["rm", "-f", "s"]);
    await h1.knitOk(["network", "rm", "nomasq"]);
  });

  test("--internal: no default route, no internet, traffic inside the network works", async () => {
    const id = await createNet(h1, ["--internal", "--subnet", "10.35.0.0/24", "int"]);
    expect((await inspectNet(h1, "int")).Internal).toBe(true);
    const i1 = await runSb(h1, "i1", ["int"]);
    const i2 = await runSb(h1, "i2", ["int"]);
    expect(await defaultRoutes(i1.ns, "-4")).toEqual([]);
    expect(i1.view.NetworkSettings.Networks["int"]?.Gateway).toBe("");
    expect(await lab.waitPing(i1.ns, ip4(i2, "int"))).toBe(true);
    expect(await lab.ping(i1.ns, INTERNET.server4)).toBe(false);
    // Even with routes put in by hand both ways (the router knows 10.35.0.0/24 via h1), the
    // firewall stops traffic leaving or entering the bridge; flushing knit's rules opens it.
    await lab.exec(i1.ns, ["ip", "route", "add", "default", "via", "10.35.0.1"]);
    await lab.route(router, "10.35.0.0/24", "10.10.0.11");
    try {
      expect(await lab.ping(i1.ns, "10.10.0.1")).toBe(false);
      expect(await lab.ping(router, ip4(i1, "int"))).toBe(false);
      expect(await rulesOf(h1, id)).toEqual({ forward: 3, postrouting: 0 });
      await h1.exec(["nft", "flush", "chain", "inet", "knit", "forward"]);
      await lab.sysctl(h1, { "net.ipv4.ip_forward": "1" }); // knit turns it on for routed networks only
      expect(await lab.waitPing(i1.ns, "10.10.0.1")).toBe(true);
      expect(await lab.ping(router, ip4(i1, "int"))).toBe(true);
    } finally {
      await router.exec(["ip", "route", "del", "10.35.0.0/24"]);
    }
    await h1.knitOk(["rm", "-f", "i1", "i2"]);
    await h1.knitOk(["network", "rm", "int"]);
  });

  test("enable_icc=false: ports are isolated; sandboxes reach the gateway, not each other", async () => {
    const id = await createNet(h1, ["--subnet", "10.36.0.0/24", "--opt", "com.docker.network.bridge.enable_icc=false", "noicc"]);
    const iccId = await createNet(h1, ["--subnet", "10.37.0.0/24", "icc"]);
    const c1 = await runSb(h1, "c1", ["noicc"]);
    const c2 = await runSb(h1, "c2", ["noicc"]);
    const d1 = await runSb(h1, "d1", ["icc"]);
    const ports = JSON.parse((await h1.exec(["bridge", "-j", "-d", "link"])).stdout) as BridgeLink[];
    const isolated = (bridge: string): (boolean | undefined)[] => ports.filter((p) => p.master === bridge).map((p) => p.isolated);
    expect(isolated(`br-${id.slice(0, 12)}`)).toEqual([true, true]);
    expect(isolated(`br-${iccId.slice(0, 12)}`)).toEqual([false]);
    expect(await lab.waitPing(c1.ns, "10.36.0.1")).toBe(true);
    expect(await lab.waitPing(c2.ns, "10.36.0.1")).toBe(true);
    expect(await lab.ping(c1.ns, ip4(c2, "noicc"))).toBe(false);
    expect(await lab.ping(c2.ns, ip4(c1, "noicc"))).toBe(false);
    expect(await lab.waitPing(c1.ns, INTERNET.server4)).toBe(true);
    expect(await lab.waitPing(d1.ns, "10.37.0.1")).toBe(true);
    await h1.knitOk(["rm", "-f", "c1", "c2", "d1"]);
    await h1.knitOk(["network", "rm", "noicc", "icc"]);
  });

  test("network ls: -q, --no-trunc, filters, --format", async () => {
    const n1 = await createNet(h1, ["--label", "env=prod", "--label", "team=a", "n1"]);
    const n2 = await createNet(h1, ["--label", "env=dev", "n2"]);
    const ls = async (...args: string[]): Promise<string[]> => names((await h1.knitOk(["network", "ls", ...args])).stdout);
    const q = await ls("-q");
    expect(q).toHaveLength(5);
    for (const id of q) expect(id).toMatch(/^[0-9a-f]{12}$/);
    expect(q).toContain(n1.slice(0, 12));
    const full = await ls("-q", "--no-trunc");
    expect(full).toContain(n1);
    expect(full).toContain(n2);
    for (const id of full) expect(id).toMatch(/^[0-9a-f]{64}$/);
    const table = await ls("--no-trunc");
    expect(table[0]).toMatch(/^NETWORK ID\s+NAME\s+DRIVER\s+SCOPE$/);
    expect(table.some((l) => l.startsWith(`${n1} `) && /\sn1\s+bridge\s+local$/.test(l))).toBe(true);
    const byName = (...args: string[]): Promise<string[]> => ls(...args, "--format", "{{.Name}}");
    expect(await byName("--filter", "driver=bridge")).toEqual(["bridge", "n1", "n2"]);
    expect(await byName("--filter", "driver=null")).toEqual(["none"]);
    expect(await byName("--filter", "name=n1")).toEqual(["n1"]);
    expect(await byName("--filter", "name=^n")).toEqual(["n1", "n2", "none"]);
    expect(await byName("--filter", "label=env")).toEqual(["n1", "n2"]);
    expect(await byName("--filter", "label=env=prod")).toEqual(["n1"]);
    expect(await byName("--filter", "label=env", "--filter", "label=team=a")).toEqual(["n1"]);
    expect(await byName("--filter", "type=custom")).toEqual(["n1", "n2"]);
    expect(await byName("--filter", "type=builtin")).toEqual(["bridge", "host", "none"]);
    expect(await byName("--filter", `id=${n2.slice(0, 20)}`)).toEqual(["n2"]);
    const json = (await ls("--format", "json")).map((l) => JSON.parse(l) as Record<string, string>);
    expect(json.map((r) => r["Name"])).toEqual(["bridge", "host", "n1", "n2", "none"]);
    expect(json.find((r) => r["Name"] === "n1")).toMatchObject({ ID: n1.slice(0, 12), Driver: "bridge", Scope: "local", Internal: "false" });
    const bad = await h1.knit(["network", "ls", "--filter", "type=weird"]);
    expect(bad.code).not.toBe(0);
    expect(bad.stderr).toContain("type");
    await h1.knitOk(["network", "rm", "n1", "n2"]);
  });

  test("network inspect, rm (refused while in use and for predefined networks), prune", async () => {
    const id = await createNet(h1, ["--subnet", "10.38.0.0/24", "--label", "k=v", "--opt", "com.docker.network.bridge.enable_icc=true", "used"]);
    await createNet(h1, ["--subnet", "10.39.0.0/24", "unused"]);
    const s = await runSb(h1, "s", ["used"]);
    const eth0 = await link(s.ns, "eth0");
    const view = await inspectNet(h1, "used");
    expect(view).toMatchObject({
      Name: "used",
      Id: id,
      Driver: "bridge",
      Scope: "local",
      EnableIPv6: false,
      Internal: false,
      IPAM: { Driver: "default", Config: [{ Subnet: "10.38.0.0/24", Gateway: "10.38.0.1" }] },
      Options: { "com.docker.network.bridge.enable_icc": "true" },
      Labels: { k: "v" },
    });
    expect(view.Containers).toEqual({
      [s.id]: {
        Name: "s",
        EndpointID: s.view.NetworkSettings.Networks["used"]?.EndpointID ?? "?",
        MacAddress: eth0?.address ?? "?",
        IPv4Address: `${ip4(s, "used")}/24`,
        IPv6Address: "",
      },
    });
    // By id prefix, and with a template.
    expect((await h1.knitOk(["network", "inspect", "--format", "{{.Name}} {{.Driver}}", id.slice(0, 10)])).stdout).toBe("used bridge\n");

    const inUse = await h1.knit(["network", "rm", "used"]);
    expect(inUse.code).toBe(1);
    expect(inUse.stderr).toContain("has active endpoints");
    expect(await link(h1, `br-${id.slice(0, 12)}`)).toBeDefined();
    expect(await lab.ping(s.ns, "10.38.0.1")).toBe(true);
    for (const name of ["bridge", "host", "none"]) {
      const r = await h1.knit(["network", "rm", name]);
      expect(r.code).toBe(1);
      expect(r.stderr).toContain(`${name} is a pre-defined network and cannot be removed`);
    }
    const missing = await h1.knit(["network", "rm", "nosuch"]);
    expect(missing.code).toBe(1);
    expect(missing.stderr).toContain("not found");

    const pruned = await h1.knitOk(["network", "prune", "-f"]);
    expect(pruned.stdout).toBe("Deleted Networks:\nunused\n");
    expect(names((await h1.knitOk(["network", "ls", "--format", "{{.Name}}"])).stdout)).toEqual(["bridge", "host", "none", "used"]);
    expect(await link(h1, `br-${id.slice(0, 12)}`)).toBeDefined();
    expect(await lab.ping(s.ns, "10.38.0.1")).toBe(true);

    await h1.knitOk(["rm", "-f", "s"]);
    expect((await h1.knitOk(["network", "prune", "-f"])).stdout).toBe("Deleted Networks:\nused\n");
    expect((await h1.knitOk(["network", "prune", "-f"])).stdout).toBe("");
  });

  test("default pools in Docker's order; a route on the host makes the picker skip a pool", async () => {
    const h2 = await lab.host("h2");
    await lab.plug(h2, lan, { ifname: "eth0", addresses: ["10.10.0.12/24"] });
    hosts.set(h2, { defaultBridge: false });
    const subnetOf = async (name: string): Promise<string> => (await inspectNet(h2, name)).IPAM.Config[0]?.Subnet ?? "";
    const bridgeAddr = async (id: string): Promise<string[]> => cidrs(await addrs(h2, `br-${id.slice(0, 12)}`, "inet"));

    // The first command records the predefined networks; bridge takes the first pool, and
    // its device appears only once something joins it (as docker0 with dockerd).
    expect(names((await h2.knitOk(["network", "ls", "--format", "{{.Name}}"])).stdout)).toEqual(["bridge", "host", "none"]);
    expect(await subnetOf("bridge")).toBe("172.17.0.0/16");
    expect(await link(h2, "knit0")).toBeUndefined();

    const p1 = await createNet(h2, ["p1"]);
    expect(await subnetOf("p1")).toBe("172.18.0.0/16");
    expect(await bridgeAddr(p1)).toEqual(["172.18.0.1/16"]);
    await h2.exec(["ip", "route", "add", "172.19.0.0/16", "via", "10.10.0.1"]);
    try {
      const p2 = await createNet(h2, ["p2"]);
      expect(await subnetOf("p2")).toBe("172.20.0.0/16");
      expect(await bridgeAddr(p2)).toEqual(["172.20.0.1/16"]);
      const clash = await h2.knit(["network", "create", "--subnet", "172.19.5.0/24", "p3"]);
      expect(clash.code).not.toBe(0);
      expect(clash.stderr).toContain("overlaps a route on this host (172.19.0.0/16");
      const clash2 = await h2.knit(["network", "create", "--subnet", "172.18.128.0/17", "p3"]);
      expect(clash2.code).not.toBe(0);
      expect(clash2.stderr).toContain('overlaps network "p1"');
      const clash3 = await h2.knit(["network", "create", "--subnet", "10.10.0.0/16", "p3"]);
      expect(clash3.stderr).toContain("overlaps a route on this host (10.10.0.0/24 dev eth0)");
      expect(names((await h2.knitOk(["network", "ls", "--format", "{{.Name}}"])).stdout)).not.toContain("p3");
      await createNet(h2, ["p4"]);
      expect(await subnetOf("p4")).toBe("172.21.0.0/16");
      // A freed pool is handed out again.
      await h2.knitOk(["network", "rm", "p1"]);
      const p5 = await createNet(h2, ["p5"]);
      expect(await subnetOf("p5")).toBe("172.18.0.0/16");
      expect(await bridgeAddr(p5)).toEqual(["172.18.0.1/16"]);
      await h2.knitOk(["network", "rm", "p2", "p4", "p5"]);
    } finally {
      await h2.exec(["ip", "route", "del", "172.19.0.0/16"]);
    }
  });

  test("the predefined bridge skips a pool that a route already covers, and comes up on first use", async () => {
    const h3 = await lab.host("h3");
    await lab.plug(h3, lan, { ifname: "eth0", addresses: ["10.10.0.13/24"] });
    hosts.set(h3, { defaultBridge: true });
    await h3.exec(["ip", "route", "add", "172.17.0.0/16", "via", "10.10.0.1"]);
    try {
      const bridgeId = (await h3.knitOk(["network", "ls", "-q", "--no-trunc", "--filter", "name=^bridge$"])).stdout.trim();
      expect((await inspectNet(h3, "bridge")).IPAM.Config).toEqual([{ Subnet: "172.18.0.0/16", Gateway: "172.18.0.1" }]);
      const s = await runSb(h3, "s", []);
      const knit0 = await link(h3, "knit0");
      expect(knit0?.linkinfo?.info_kind).toBe("bridge");
      expect(knit0?.ifalias).toBe(`knit:${bridgeId}`);
      expect(cidrs(await addrs(h3, "knit0", "inet"))).toEqual(["172.18.0.1/16"]);
      expect(ip4(s, "bridge")).toBe("172.18.0.2");
      expect(await lab.waitPing(s.ns, INTERNET.server4)).toBe(true);
      const p = await createNet(h3, ["p"]);
      expect((await inspectNet(h3, "p")).IPAM.Config[0]?.Subnet).toBe("172.19.0.0/16");
      await h3.knitOk(["rm", "-f", "s"]);
      await h3.knitOk(["network", "rm", p]);
      // knit0 stays, as docker0 does, with its firewall rules alone.
      expect(await link(h3, "knit0")).toBeDefined();
      expect(await rulesOf(h3, bridgeId)).toEqual({ forward: 1, postrouting: 1 });
    } finally {
      await h3.exec(["ip", "route", "del", "172.17.0.0/16"]);
    }
  });

  test("at the end every host's store holds only the predefined networks", async () => {
    for (const host of hosts.keys()) {
      expect(await findStoreLeaks(host)).toEqual([]);
      expect(await findLeaks(host, { allowLinks: ["knit0"], allowNftTables: ["inet knit"] })).toEqual([]);
      const json = names((await host.knitOk(["network", "ls", "--format", "json"])).stdout).map((l) => JSON.parse(l) as { Name: string });
      expect(json.map((n) => n.Name)).toEqual(["bridge", "host", "none"]);
    }
  });
});
