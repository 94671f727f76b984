/**
 * The macvlan driver through the real CLI, on a lab LAN: containers become machines on the
 * LAN, checked against the kernel's own JSON (`ip -j`) and real traffic.
 *
 *   internet (198.51.100.10, 2001:db8:5e::10)
 *       │
 *       r  192.168.100.1, 2001:db8:100::1 (the LAN's router: the networks' gateway)
 *       │
 *   lan 192.168.100.0/24, 2001:db8:100::/64 ─┬─ h1 eth1 192.168.100.11, ::11 (a host on the LAN)
 *                                            ├─ h2 eth1 (no address: a dedicated parent)
 *                                            └─ m  eth0 192.168.100.50, ::50 (a plain LAN machine)
 *
 * Two knit hosts on one LAN hand out addresses independently, so tests give each host its own
 * --ip-range (as Docker's documentation tells macvlan users to). After every test nothing
 * may be left: no link, namespace, store row, and each parent's promiscuous mode and MAC as
 * the lab made them.
 */
import { afterAll, afterEach, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { INTERNET, Lab, type LabHost, type LabLan, type LabNode, type NetnsRef } from "../src/lab/lab.ts";
import { assertHostClean } from "./leaks.ts";

setDefaultTimeout(90_000);

// ---- kernel JSON -------------------------------------------------------------------------

interface IpLink {
  ifname: string;
  mtu: number;
  address: string;
  link?: string;
  master?: string;
  ifalias?: string;
  flags: string[];
  promiscuity?: number;
  linkinfo?: { info_kind?: string; info_data?: { mode?: string } };
}
interface IpAddrInfo {
  family: "inet" | "inet6";
  local: string;
  prefixlen: number;
  scope: string;
}
interface IpRoute {
  dst: string;
  gateway?: string;
  dev?: string;
  prefsrc?: string;
}
interface NetworkView {
  Name: string;
  Id: string;
  Driver: string;
  IPAM: { Config: { Subnet: string; IPRange?: string; Gateway?: string; AuxiliaryAddresses?: Record<string, string> }[] };
  Containers: Record<string, { Name: string; EndpointID: string; MacAddress: string; IPv4Address: string; IPv6Address: string }>;
  Options: Record<string, string>;
}
interface SandboxView {
  Id: string;
  NetworkSettings: {
    SandboxKey: string;
    Networks: Record<string, { EndpointID: string; IPAddress: string; GlobalIPv6Address: string; MacAddress: string; Gateway: string; InterfaceName: string }>;
  };
}

let lab: Lab;
let lan: LabLan;
let h1: LabHost;
let h2: LabHost;
let m: LabNode;

async function ipj<T>(node: NetnsRef, args: readonly string[]): Promise<T[]> {
  const r = await lab.exec(node, ["ip", "-j", ...args]);
  return JSON.parse(r.stdout || "[]") as T[];
}

async function link(node: NetnsRef, name: string): Promise<IpLink | undefined> {
  const r = await lab.exec(node, ["ip", "-j", "-d", "link", "show", "dev", name], { check: false });
  return r.code === 0 ? (JSON.parse(r.stdout) as IpLink[])[0] : undefined;
}

async function addrs(node: NetnsRef, dev: string, family?: "inet" | "inet6"): Promise<string[]> {
  const list = await ipj<{ addr_info: IpAddrInfo[] }>(node, ["addr", "show", "dev", dev]);
  return (list[0]?.addr_info ?? []).filter((a) => a.scope === "global" && (!family || a.family === family)).map((a) => `${a.local}/${a.prefixlen}`);
}

/** `ip -j [-6] route show ARGS` (a leading "-6" in `args` selects IPv6). */
function routes(node: NetnsRef, args: readonly string[]): Promise<IpRoute[]> {
  const family = args[0] === "-6" ? ["-6"] : [];
  return ipj<IpRoute>(node, [...family, "route", "show", ...args.slice(family.length)]);
}

// ---- knit ----------------------------------------------------------------------------------

async function createNet(host: LabHost, args: readonly string[]): Promise<string> {
  const id = (await host.knitOk(["network", "create", ...args])).stdout.trim();
  expect(id).toMatch(/^[0-9a-f]{64}$/);
  return id;
}

async function inspectNet(host: LabHost, ref: string): Promise<NetworkView> {
  const v = (JSON.parse((await host.knitOk(["network", "inspect", ref])).stdout) as NetworkView[])[0];
  if (!v) throw new Error(`no inspect output for ${ref}`);
  return v;
}

interface Sb {
  name: string;
  ns: NetnsRef;
  view: SandboxView;
}

async function runSbView(host: LabHost, name: string): Promise<SandboxView> {
  const view = (JSON.parse((await host.knitOk(["inspect", name])).stdout) as SandboxView[])[0];
  if (!view) throw new Error(`no inspect output for ${name}`);
  return view;
}

/** `knit run -d --name NAME --network NET EXTRA -- sleep 1000`, inspected. */
async function runSb(host: LabHost, name: string, net: string, extra: readonly string[] = []): Promise<Sb> {
  await host.knitOk(["run", "-d", "--name", name, "--network", net, ...extra, "--", "sleep", "1000"]);
  const view = await runSbView(host, name);
  return { name, ns: { path: view.NetworkSettings.SandboxKey }, view };
}

function ep(sb: Sb, net: string) {
  const e = sb.view.NetworkSettings.Networks[net];
  if (!e) throw new Error(`${sb.name} is not on ${net}`);
  return e;
}

/** A knit command that must fail: returns its stderr. */
async function knitFails(host: LabHost, args: readonly string[]): Promise<string> {
  const r = await host.knit(args);
  if (r.code === 0) throw new Error(`knit ${args.join(" ")} succeeded, expected a failure:\n${r.stdout}`);
  return r.stderr;
}

const names = (out: string): string[] => out.split("\n").filter((l) => l !== "");

// ---- cleanliness ---------------------------------------------------------------------------

/** Each host's parent (eth1) as the lab made it: MAC, promiscuity and flags. */
const pristine = new Map<LabHost, IpLink>();

async function scrub(host: LabHost): Promise<void> {
  const sbs = names((await host.knit(["ps", "-aq", "--no-trunc"])).stdout);
  if (sbs.length) await host.knit(["rm", "-f", ...sbs]);
  for (const n of names((await host.knit(["network", "ls", "-q", "--no-trunc", "--filter", "type=custom"])).stdout)) {
    const r = await host.knit(["network", "inspect", n]);
    const view = r.code === 0 ? (JSON.parse(r.stdout) as NetworkView[])[0] : undefined;
    for (const c of Object.values(view?.Containers ?? {})) await host.knit(["network", "disconnect", "-f", n, c.Name]);
    await host.knit(["network", "rm", n]);
  }
}

/** Problems with a host's parent interface: promiscuous mode, MAC or flags changed. */
async function parentProblems(host: LabHost): Promise<string[]> {
  const before = pristine.get(host);
  const now = await link(host, "eth1");
  if (!before || !now) return [`${host.label}: eth1 missing`];
  const out: string[] = [];
  if (now.flags.join(",") !== before.flags.join(",")) out.push(`${host.label}: eth1 flags ${now.flags.join(",")} (were ${before.flags.join(",")})`);
  if (now.promiscuity !== before.promiscuity) out.push(`${host.label}: eth1 promiscuity ${now.promiscuity} (was ${before.promiscuity})`);
  if (now.address !== before.address) out.push(`${host.label}: eth1 MAC ${now.address} (was ${before.address})`);
  return out;
}

afterEach(async () => {
  const problems: string[] = [];
  for (const host of [h1, h2]) {
    try {
      await assertHostClean(host, { extra: parentProblems });
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
  await lab.router("r", [{ lan, addresses: ["192.168.100.1/24", "2001:db8:100::1/64"] }], { internet: true });
  h1 = await lab.host("h1");
  h2 = await lab.host("h2");
  m = await lab.ns("m");
  await lab.plug(h1, lan, { ifname: "eth1", addresses: ["192.168.100.11/24", "2001:db8:100::11/64"] });
  await lab.plug(h2, lan, { ifname: "eth1" });
  await lab.plug(m, lan, { ifname: "eth0", addresses: ["192.168.100.50/24", "2001:db8:100::50/64"] });
  for (const h of [h1, h2]) {
    const l = await link(h, "eth1");
    if (!l) throw new Error("no eth1");
    pristine.set(h, l);
    expect(l.flags).not.toContain("PROMISC");
  }
});

afterAll(async () => {
  await lab.cleanup();
});

// ---- tests ---------------------------------------------------------------------------------

describe("macvlan networks: containers as machines on the LAN", () => {
  test("the users' command, verbatim: promiscuous parent, a LAN address, reachable by IP from the LAN", async () => {
    const id = await createNet(h1, ["-d", "macvlan", "--subnet=192.168.100.0/24", "--gateway=192.168.100.1", "-o", "parent=eth1", "lan0"]);
    expect((await link(h1, "eth1"))?.flags).toContain("PROMISC");
    const view = await inspectNet(h1, "lan0");
    expect(view.Driver).toBe("macvlan");
    expect(view.Options).toEqual({ parent: "eth1" });
    expect(view.IPAM.Config).toEqual([{ Subnet: "192.168.100.0/24", Gateway: "192.168.100.1" }]);
    // No device on the host for the network itself.
    expect((await ipj<IpLink>(h1, ["link", "show"])).filter((l) => l.ifalias === `knit:${id}`)).toEqual([]);

    const c1 = await runSb(h1, "c1", "lan0");
    const e = ep(c1, "lan0");
    // IPAM skips the network address and the gateway (the LAN's router).
    expect(e.IPAddress).toBe("192.168.100.2");
    // The gateway stays outside the host: on no host interface, and no container gets it, not even by --ip.
    const hostAddrs = (await ipj<{ addr_info: IpAddrInfo[] }>(h1, ["addr", "show"])).flatMap((l) => l.addr_info.map((a) => a.local));
    expect(hostAddrs).toContain("192.168.100.11");
    expect(hostAddrs).not.toContain("192.168.100.1");
    expect(await knitFails(h1, ["run", "-d", "--name", "gw", "--network", "lan0", "--ip", "192.168.100.1", "--", "sleep", "1000"])).toContain("192.168.100.1: Address already in use");
    const dev = await link(c1.ns, "eth0");
    expect(dev?.linkinfo?.info_kind).toBe("macvlan");
    expect(dev?.linkinfo?.info_data?.mode).toBe("bridge");
    expect(dev?.address).toBe("02:42:c0:a8:64:02");
    expect(dev?.address).toBe(e.MacAddress);
    expect(dev?.ifalias).toBe(`knit:${e.EndpointID}`);
    expect(dev?.mtu).toBe(1500);
    expect(await addrs(c1.ns, "eth0", "inet")).toEqual(["192.168.100.2/24"]);
    expect((await routes(c1.ns, ["default"])).map((r) => [r.gateway, r.dev])).toEqual([["192.168.100.1", "eth0"]]);

    // The LAN reaches the container directly, by IP: ping and HTTP from the plain LAN machine.
    expect(await lab.waitPing(m, "192.168.100.2")).toBe(true);
    const web = await lab.httpServer(c1.ns, 8080, "hello from c1\n");
    expect(await lab.httpGet(m, "http://192.168.100.2:8080/")).toBe("hello from c1\n");
    await web.stop();
    // ... and the container reaches its router and the internet behind it.
    expect(await lab.waitPing(c1.ns, "192.168.100.1")).toBe(true);
    expect(await lab.waitPing(c1.ns, INTERNET.server4)).toBe(true);
    // Docker's known limitation holds without host access: the host cannot reach it.
    expect(await lab.ping(h1, "192.168.100.2")).toBe(false);

    await h1.knitOk(["rm", "-f", "c1"]);
    await h1.knitOk(["network", "rm", "lan0"]);
    expect(await lab.ping(m, "192.168.100.2")).toBe(false);
  });

  test("two hosts, dual stack: across hosts, to the router, the internet, from the LAN; connect, disconnect, --ip, --ip6", async () => {
    const common = ["-d", "macvlan", "--ipv6", "--subnet", "192.168.100.0/24", "--gateway", "192.168.100.1", "--subnet", "2001:db8:100::/64", "--gateway", "2001:db8:100::1", "-o", "parent=eth1"];
    await createNet(h1, [...common, "--ip-range", "192.168.100.64/28", "--ip-range", "2001:db8:100::1:0/112", "lan"]);
    await createNet(h2, [...common, "--ip-range", "192.168.100.128/28", "--ip-range", "2001:db8:100::2:0/112", "lan"]);
    const a = await runSb(h1, "a", "lan");
    const a2 = await runSb(h1, "a2", "lan");
    const b = await runSb(h2, "b", "lan");
    expect([ep(a, "lan").IPAddress, ep(a2, "lan").IPAddress, ep(b, "lan").IPAddress]).toEqual(["192.168.100.64", "192.168.100.65", "192.168.100.128"]);
    expect(ep(a, "lan").GlobalIPv6Address).toBe("2001:db8:100::1:0");
    expect(ep(b, "lan").GlobalIPv6Address).toBe("2001:db8:100::2:0");
    expect(await addrs(b.ns, "eth0", "inet6")).toEqual(["2001:db8:100::2:0/64"]);
    expect((await routes(b.ns, ["-6", "default"]))[0]?.gateway).toBe("2001:db8:100::1");

    const reach = async (from: NetnsRef, to: string): Promise<boolean> => lab.waitPing(from, to);
    // Across hosts, both families; and between two containers on one parent (bridge mode).
    for (const [from, to] of [
      [a.ns, "192.168.100.128"], [b.ns, "192.168.100.64"], [a.ns, "2001:db8:100::2:0"], [b.ns, "2001:db8:100::1:0"],
      [a.ns, "192.168.100.65"], [a2.ns, "2001:db8:100::1:0"],
    ] as const) {
      expect(`${from.path} -> ${to}: ${await reach(from, to)}`).toBe(`${from.path} -> ${to}: true`);
    }
    // The router and the internet behind it, both families, from both hosts.
    for (const sb of [a, b]) {
      for (const to of ["192.168.100.1", "2001:db8:100::1", INTERNET.server4, INTERNET.server6]) expect(`${sb.name} -> ${to}: ${await reach(sb.ns, to)}`).toBe(`${sb.name} -> ${to}: true`);
    }
    // The plain LAN machine reaches both by IP, both families, and over TCP.
    for (const to of ["192.168.100.64", "192.168.100.128", "2001:db8:100::1:0", "2001:db8:100::2:0"]) expect(`m -> ${to}: ${await reach(m, to)}`).toBe(`m -> ${to}: true`);
    const echo = await lab.tcpEchoServer(b.ns, 7000);
    expect(await lab.tcpSend(m, "192.168.100.128", 7000, "over the LAN\n")).toBe("over the LAN\n");
    expect(await lab.tcpSend(a.ns, "2001:db8:100::2:0", 7000, "across hosts\n")).toBe("across hosts\n");
    await echo.stop();

    // A static address on h1, then the same address on h2: the LAN learns the move at once,
    // as the device announces itself (gratuitous ARP) when it comes up. To see the
    // announcement, m's cache first holds a wrong MAC for the address.
    const x = await runSb(h1, "x", "lan", ["--ip", "192.168.100.90"]);
    expect(await reach(m, "192.168.100.90")).toBe(true);
    await h1.knitOk(["rm", "-f", x.name]);
    await m.exec(["ip", "neigh", "replace", "192.168.100.90", "lladdr", "02:00:00:00:00:01", "dev", "eth0", "nud", "stale"]);
    const d = await runSb(h2, "d", "none");
    await h2.knitOk(["network", "connect", "--ip", "192.168.100.90", "--ip6", "2001:db8:100::90", "lan", "d"]);
    const dIf = (await runSbView(h2, "d")).NetworkSettings.Networks["lan"]?.InterfaceName ?? "?";
    const dEth = await link(d.ns, dIf);
    expect(dEth?.linkinfo?.info_kind).toBe("macvlan");
    expect(dEth?.address).toBe("02:42:c0:a8:64:5a");
    expect(await addrs(d.ns, dIf, "inet6")).toEqual(["2001:db8:100::90/64"]);
    expect(await lab.ping(m, "192.168.100.90", { count: 1, waitSec: 2 })).toBe(true);
    expect(await reach(m, "2001:db8:100::90")).toBe(true);
    await h2.knitOk(["network", "disconnect", "lan", "d"]);
    expect(await link(d.ns, dIf)).toBeUndefined();
    expect(await lab.ping(m, "192.168.100.90")).toBe(false);
    expect(await lab.ping(m, "2001:db8:100::90")).toBe(false);

    await h1.knitOk(["rm", "-f", "a", "a2"]);
    await h2.knitOk(["rm", "-f", "b", "d"]);
    await h1.knitOk(["network", "rm", "lan"]);
    await h2.knitOk(["network", "rm", "lan"]);
  });

  test("modes: private isolates containers on one parent, vepa sends them through the LAN switch, bridge does not", async () => {
    await createNet(h1, ["-d", "macvlan", "--subnet", "192.168.100.0/24", "--gateway", "192.168.100.1", "--ip-range", "192.168.100.32/28", "-o", "parent=eth1", "-o", "macvlan_mode=private", "priv"]);
    const p1 = await runSb(h1, "p1", "priv");
    const p2 = await runSb(h1, "p2", "priv");
    expect((await link(p1.ns, "eth0"))?.linkinfo?.info_data?.mode).toBe("private");
    expect(await lab.waitPing(p1.ns, "192.168.100.50")).toBe(true);
    expect(await lab.waitPing(m, ep(p2, "priv").IPAddress)).toBe(true);
    expect(await lab.ping(p1.ns, ep(p2, "priv").IPAddress, { count: 2 })).toBe(false);
    await h1.knitOk(["rm", "-f", "p1", "p2"]);
    await h1.knitOk(["network", "rm", "priv"]);

    await createNet(h1, ["-d", "macvlan", "--subnet", "192.168.100.0/24", "--gateway", "192.168.100.1", "--ip-range", "192.168.100.32/28", "-o", "parent=eth1", "-o", "macvlan_mode=vepa", "vepa"]);
    const v1 = await runSb(h1, "v1", "vepa");
    const v2 = await runSb(h1, "v2", "vepa");
    expect((await link(v1.ns, "eth0"))?.linkinfo?.info_data?.mode).toBe("vepa");
    expect(await lab.waitPing(v1.ns, "192.168.100.50")).toBe(true);
    expect(await lab.ping(v1.ns, ep(v2, "vepa").IPAddress, { count: 2 })).toBe(false);
    // A switch that hairpins (reflective relay) brings vepa traffic back to the same port.
    const ports = (await ipj<IpLink>(lan, ["link", "show", "master", lan.bridge])).map((l) => l.ifname);
    const hairpin = (on: boolean) => lab.exec(lan, ["bridge", "-batch", "-"], { stdin: ports.map((p) => `link set dev ${p} hairpin ${on ? "on" : "off"}`).join("\n") + "\n" });
    await hairpin(true);
    try {
      expect(await lab.waitPing(v1.ns, ep(v2, "vepa").IPAddress)).toBe(true);
    } finally {
      await hairpin(false);
    }
    await h1.knitOk(["rm", "-f", "v1", "v2"]);
    await h1.knitOk(["network", "rm", "vepa"]);
  });

  test("--internal: on the LAN and reached from it, but no default route, so nothing beyond the LAN", async () => {
    await createNet(h2, ["-d", "macvlan", "--internal", "--subnet", "192.168.100.0/24", "--gateway", "192.168.100.1", "--ip-range", "192.168.100.160/28", "-o", "parent=eth1", "int"]);
    const c = await runSb(h2, "c", "int");
    const cip = ep(c, "int").IPAddress;
    expect(cip).toBe("192.168.100.160");
    expect(await addrs(c.ns, "eth0", "inet")).toEqual(["192.168.100.160/24"]);
    expect(await routes(c.ns, ["default"])).toEqual([]);
    expect(await lab.waitPing(m, cip)).toBe(true);
    expect(await lab.waitPing(c.ns, "192.168.100.50")).toBe(true);
    expect(await lab.ping(c.ns, INTERNET.server4)).toBe(false);
    await h2.knitOk(["rm", "-f", "c"]);
    await h2.knitOk(["network", "rm", "int"]);
  });

  test("passthru: one endpoint that takes over the parent; a second one is refused and leaves nothing", async () => {
    await createNet(h2, ["-d", "macvlan", "--subnet", "192.168.100.0/24", "--gateway", "192.168.100.1", "--ip-range", "192.168.100.144/28", "-o", "parent=eth1", "-o", "macvlan_mode=passthru", "pt"]);
    // passthru leaves promiscuous mode to the kernel: knit does not set the flag.
    expect((await link(h2, "eth1"))?.flags).not.toContain("PROMISC");
    const t1 = await runSb(h2, "t1", "pt");
    const dev = await link(t1.ns, "eth0");
    expect(dev?.linkinfo?.info_data?.mode).toBe("passthru");
    // The device has the parent's MAC, and the parent's MAC is untouched.
    expect(dev?.address).toBe(pristine.get(h2)?.address ?? "?");
    expect((await link(h2, "eth1"))?.address).toBe(pristine.get(h2)?.address ?? "?");
    expect(await lab.waitPing(m, ep(t1, "pt").IPAddress)).toBe(true);
    expect(await lab.waitPing(t1.ns, INTERNET.server4)).toBe(true);

    const err = await knitFails(h2, ["run", "-d", "--name", "t2", "--network", "pt", "--", "sleep", "1000"]);
    expect(err).toContain("passthru mode, which allows one endpoint");
    expect(names((await h2.knitOk(["ps", "-aq"])).stdout)).toHaveLength(1);
    // Nor may another network share a parent held in passthru mode.
    const other = await knitFails(h2, ["network", "create", "-d", "macvlan", "--subnet", "10.20.0.0/24", "-o", "parent=eth1", "other"]);
    expect(other).toContain("passthru mode");

    await h2.knitOk(["rm", "-f", "t1"]);
    await h2.knitOk(["network", "rm", "pt"]);
  });

  test("no parent: an isolated network on a knit-owned empty bridge; containers talk among themselves only", async () => {
    // The LAN's own subnet, on purpose: nothing may leak onto the LAN.
    const id = await createNet(h2, ["-d", "macvlan", "--subnet", "192.168.100.0/24", "iso"]);
    const bridge = `dm-${id.slice(0, 12)}`;
    const br = await link(h2, bridge);
    expect(br?.linkinfo?.info_kind).toBe("bridge");
    expect(br?.ifalias).toBe(`knit:${id}`);
    expect(br?.flags).toContain("UP");
    expect(await addrs(h2, bridge)).toEqual([]);
    expect(await ipj<IpLink>(h2, ["link", "show", "master", bridge])).toEqual([]);
    expect((await link(h2, "eth1"))?.flags).not.toContain("PROMISC");

    const i1 = await runSb(h2, "i1", "iso");
    const i2 = await runSb(h2, "i2", "iso");
    expect((await link(i1.ns, "eth0"))?.linkinfo?.info_kind).toBe("macvlan");
    expect(await routes(i1.ns, ["default"])).toEqual([]);
    expect(await lab.waitPing(i1.ns, ep(i2, "iso").IPAddress)).toBe(true);
    const echo = await lab.tcpEchoServer(i2.ns, 7001);
    expect(await lab.tcpSend(i1.ns, ep(i2, "iso").IPAddress, 7001, "among ourselves\n")).toBe("among ourselves\n");
    await echo.stop();
    expect(await lab.ping(i1.ns, "192.168.100.50")).toBe(false);
    expect(await lab.ping(i1.ns, "192.168.100.1")).toBe(false);
    expect(await lab.ping(m, ep(i1, "iso").IPAddress)).toBe(false);

    await h2.knitOk(["rm", "-f", "i1", "i2"]);
    await h2.knitOk(["network", "rm", "iso"]);
    expect(await link(h2, bridge)).toBeUndefined();

    // An empty parent (`-o parent=`), as with Docker, is no parent.
    const id2 = await createNet(h2, ["-d", "macvlan", "--subnet", "10.22.0.0/24", "-o", "parent=", "iso2"]);
    expect((await link(h2, `dm-${id2.slice(0, 12)}`))?.linkinfo?.info_kind).toBe("bridge");
    expect((await link(h2, "eth1"))?.flags).not.toContain("PROMISC");
    await h2.knitOk(["network", "rm", "iso2"]);
    expect(await link(h2, `dm-${id2.slice(0, 12)}`)).toBeUndefined();
  });

  /** A dual-stack network with host access on eth1; the shim holds the aux addresses "host". */
  const HOST_ACCESS_NET = [
    "-d", "macvlan", "--ipv6",
    "--subnet", "192.168.100.0/24", "--gateway", "192.168.100.1", "--ip-range", "192.168.100.64/28", "--aux-address", "host=192.168.100.250",
    "--subnet", "2001:db8:100::/64", "--gateway", "2001:db8:100::1", "--aux-address", "host6=2001:db8:100::250",
    "-o", "parent=eth1", "-o", "knit.macvlan.host_access=true", "ha",
  ];

  test("host access: a shim on the parent and a route per endpoint let host and containers talk", async () => {
    const id = await createNet(h1, HOST_ACCESS_NET);
    const shim = `mvh-${id.slice(0, 11)}`;
    const s = await link(h1, shim);
    expect(s?.linkinfo?.info_kind).toBe("macvlan");
    expect(s?.linkinfo?.info_data?.mode).toBe("bridge");
    expect(s?.link).toBe("eth1");
    expect(s?.ifalias).toBe(`knit:${id}`);
    expect((await addrs(h1, shim)).sort()).toEqual(["192.168.100.250/32", "2001:db8:100::250/128"]);

    // The shim's address is the network's: nobody else gets it.
    const taken = await knitFails(h1, ["run", "-d", "--name", "bad", "--network", "ha", "--ip", "192.168.100.250", "--", "sleep", "1000"]);
    expect(taken).toContain("already in use");
    const c = await runSb(h1, "c", "ha");
    const cip = ep(c, "ha").IPAddress;
    const cip6 = ep(c, "ha").GlobalIPv6Address;
    expect((await routes(h1, [`${cip}/32`])).map((r) => [r.dev, r.prefsrc])).toEqual([[shim, "192.168.100.250"]]);
    expect((await routes(h1, ["-6", `${cip6}/128`])).map((r) => r.dev)).toEqual([shim]);
    expect(await lab.waitPing(h1, cip)).toBe(true);
    expect(await lab.waitPing(h1, cip6)).toBe(true);
    expect(await lab.waitPing(c.ns, "192.168.100.250")).toBe(true);
    const echo = await lab.tcpEchoServer(c.ns, 7002);
    expect(await lab.tcpSend(h1, cip, 7002, "from the host\n")).toBe("from the host\n");
    await echo.stop();
    // The LAN still reaches the container as before.
    expect(await lab.waitPing(m, cip)).toBe(true);

    await h1.knitOk(["network", "disconnect", "ha", "c"]);
    expect(await routes(h1, [`${cip}/32`])).toEqual([]);
    expect(await routes(h1, ["-6", `${cip6}/128`])).toEqual([]);
    await h1.knitOk(["rm", "-f", "c"]);
    await h1.knitOk(["network", "rm", "ha"]);
    expect(await link(h1, shim)).toBeUndefined();
  });

  test("host access after someone deleted the shim: gc makes it again with every container's route, so does the next connect; host and containers talk again", async () => {
    const id = await createNet(h1, HOST_ACCESS_NET);
    const shim = `mvh-${id.slice(0, 11)}`;
    const c1 = await runSb(h1, "c1", "ha");
    const c2 = await runSb(h1, "c2", "ha");
    /** The shim as the kernel shows it, and the host's routes to each container. */
    const shimView = async (sbs: readonly Sb[]) => {
      const l = await link(h1, shim);
      const perContainer: string[][] = [];
      for (const sb of sbs) {
        const e = ep(sb, "ha");
        for (const r of await routes(h1, [`${e.IPAddress}/32`])) perContainer.push([sb.name, r.dst, r.dev ?? "", r.prefsrc ?? ""]);
        for (const r of await routes(h1, ["-6", `${e.GlobalIPv6Address}/128`])) perContainer.push([sb.name, r.dst, r.dev ?? "", r.prefsrc ?? ""]);
      }
      return { kind: l?.linkinfo?.info_kind, mode: l?.linkinfo?.info_data?.mode, parent: l?.link, alias: l?.ifalias, up: l?.flags.includes("UP"), addrs: l ? (await addrs(h1, shim)).sort() : [], routes: perContainer };
    };
    /** Host to container (ping both families, TCP) and container to host (ping), for each. */
    const talk = async (sbs: readonly Sb[]) => {
      for (const sb of sbs) {
        const e = ep(sb, "ha");
        // The host first: its ARP request from the shim tells the container the shim's (new) MAC.
        for (const [from, to] of [[h1, e.IPAddress], [h1, e.GlobalIPv6Address], [sb.ns, "192.168.100.250"], [sb.ns, "2001:db8:100::250"]] as const) {
          expect(`${sb.name}: ${from.path} -> ${to}: ${await lab.waitPing(from, to)}`).toBe(`${sb.name}: ${from.path} -> ${to}: true`);
        }
        const echo = await lab.tcpEchoServer(sb.ns, 7003);
        expect(await lab.tcpSend(h1, e.IPAddress, 7003, `host to ${sb.name}\n`)).toBe(`host to ${sb.name}\n`);
        await echo.stop();
      }
    };
    const healthy = await shimView([c1, c2]);
    expect(healthy).toEqual({
      kind: "macvlan", mode: "bridge", parent: "eth1", alias: `knit:${id}`, up: true, addrs: ["192.168.100.250/32", "2001:db8:100::250/128"],
      routes: [c1, c2].flatMap((sb) => [
        [sb.name, ep(sb, "ha").IPAddress, shim, "192.168.100.250"],
        [sb.name, ep(sb, "ha").GlobalIPv6Address, shim, "2001:db8:100::250"],
      ]),
    });
    await talk([c1, c2]);

    // Someone deletes the shim: its routes go with it, and the host loses its containers.
    await h1.exec(["ip", "link", "del", "dev", shim]);
    expect(await shimView([c1, c2])).toMatchObject({ kind: undefined, addrs: [], routes: [] });
    expect(await lab.ping(h1, ep(c1, "ha").IPAddress)).toBe(false);
    // knit gc makes it again, with a route for every container already attached.
    await h1.knitOk(["gc"]);
    expect(await shimView([c1, c2])).toEqual(healthy);
    await talk([c1, c2]);
    // gc again changes nothing.
    await h1.knitOk(["gc"]);
    expect(await shimView([c1, c2])).toEqual(healthy);

    // Deleted again, then the next command touching the network, a container joining it:
    // the shim is back, with the routes of the containers that were there and of the new one.
    await h1.exec(["ip", "link", "del", "dev", shim]);
    const c3 = await runSb(h1, "c3", "ha");
    const all = await shimView([c1, c2, c3]);
    expect(all).toEqual({
      ...healthy,
      routes: [
        ...healthy.routes,
        ["c3", ep(c3, "ha").IPAddress, shim, "192.168.100.250"],
        ["c3", ep(c3, "ha").GlobalIPv6Address, shim, "2001:db8:100::250"],
      ],
    });
    await talk([c1, c2, c3]);

    // Without a shim, leaving the network is fine, and makes nothing.
    await h1.exec(["ip", "link", "del", "dev", shim]);
    await h1.knitOk(["network", "disconnect", "ha", "c3"]);
    expect(await link(h1, shim)).toBeUndefined();
    await h1.knitOk(["rm", "-f", "c1", "c2", "c3"]);
    await h1.knitOk(["network", "rm", "ha"]);
    expect(await link(h1, shim)).toBeUndefined();
  });

  test("a parent shared by two networks stays promiscuous until the last one goes; gc keeps live objects; --internal, aux, MTU", async () => {
    const oneId = await createNet(h1, [
      "-d", "macvlan", "--subnet", "192.168.100.0/24", "--gateway", "192.168.100.1", "--ip-range", "192.168.100.96/28",
      "--aux-address", "host=192.168.100.250", "-o", "parent=eth1", "-o", "knit.macvlan.host_access=true", "one",
    ]);
    await createNet(h1, ["-d", "macvlan", "--internal", "--subnet", "10.20.0.0/24", "--aux-address", "printer=10.20.0.2", "-o", "parent=eth1", "-o", "com.docker.network.driver.mtu=1400", "two"]);
    const isoId = await createNet(h1, ["-d", "macvlan", "--subnet", "10.21.0.0/24", "iso"]);
    const shim = `mvh-${oneId.slice(0, 11)}`;
    const report = JSON.parse((await h1.knitOk(["gc"])).stdout) as { orphanLinks: string[] };
    expect(report.orphanLinks).toEqual([]);
    expect((await link(h1, `dm-${isoId.slice(0, 12)}`))?.linkinfo?.info_kind).toBe("bridge");
    expect((await link(h1, shim))?.linkinfo?.info_kind).toBe("macvlan");
    expect((await link(h1, "eth1"))?.flags).toContain("PROMISC");
    await h1.knitOk(["network", "rm", "one"]);
    expect(await link(h1, shim)).toBeUndefined();
    expect((await link(h1, "eth1"))?.flags).toContain("PROMISC");
    // --internal: on the LAN, but no default route. IPAM skips the aux address; the MTU option holds.
    const c = await runSb(h1, "c", "two");
    expect(ep(c, "two").IPAddress).toBe("10.20.0.3");
    expect(await addrs(c.ns, "eth0", "inet")).toEqual(["10.20.0.3/24"]);
    expect(await routes(c.ns, ["default"])).toEqual([]);
    expect((await link(c.ns, "eth0"))?.mtu).toBe(1400);
    await h1.knitOk(["rm", "-f", "c"]);
    await h1.knitOk(["network", "rm", "two", "iso"]);
    expect((await link(h1, "eth1"))?.flags).not.toContain("PROMISC");
  });

  test("a parent left promiscuous by its user stays so; -o knit.macvlan.promisc=false leaves it alone", async () => {
    await h2.exec(["ip", "link", "set", "eth1", "promisc", "on"]);
    try {
      await createNet(h2, ["-d", "macvlan", "--subnet", "192.168.100.0/24", "-o", "parent=eth1", "lan0"]);
      await h2.knitOk(["network", "rm", "lan0"]);
      expect((await link(h2, "eth1"))?.flags).toContain("PROMISC");
    } finally {
      await h2.exec(["ip", "link", "set", "eth1", "promisc", "off"]);
    }
    await createNet(h2, ["-d", "macvlan", "--subnet", "192.168.100.0/24", "-o", "parent=eth1", "-o", "knit.macvlan.promisc=false", "lan0"]);
    expect((await link(h2, "eth1"))?.flags).not.toContain("PROMISC");
    await h2.knitOk(["network", "rm", "lan0"]);
  });

  test("a VLAN parent on this kernel (no 802.1q): a clear error naming the feature, nothing left behind", async () => {
    const err = await knitFails(h1, ["network", "create", "-d", "macvlan", "--subnet", "10.30.0.0/24", "-o", "parent=eth1.10", "v10"]);
    expect(err).toContain("cannot create eth1.10");
    expect(err).toContain("802.1q VLAN support");
    expect(err).toContain("8021q");
    expect(await link(h1, "eth1.10")).toBeUndefined();
    expect(names((await h1.knitOk(["network", "ls", "-q", "--filter", "type=custom"])).stdout)).toEqual([]);
    // VIDs are checked before anything is tried, and the base must exist.
    for (const bad of ["eth1.0", "eth1.4095", "eth1.010"]) expect(await knitFails(h1, ["network", "create", "-d", "macvlan", "-o", `parent=${bad}`, "v"])).toContain("invalid VLAN ID");
    // The bounds themselves are valid VIDs: they get as far as the kernel.
    for (const edge of ["eth1.1", "eth1.4094"]) {
      expect(await knitFails(h1, ["network", "create", "-d", "macvlan", "--subnet", "10.30.0.0/24", "-o", `parent=${edge}`, "v"])).toContain(`cannot create ${edge}: this kernel has no 802.1q VLAN support`);
      expect(await link(h1, edge)).toBeUndefined();
    }
    expect(await knitFails(h1, ["network", "create", "-d", "macvlan", "-o", "parent=eth7.10", "v"])).toContain("nor does eth7");

    // An IFACE.VID parent that exists is the user's, whatever made it (a veth here: this kernel
    // makes no VLAN): knit uses it as it is, and rm restores its flags but never deletes it.
    await h1.exec(["ip", "link", "add", "eth1.20", "type", "veth", "peer", "name", "e120p"]);
    try {
      await h1.exec(["ip", "link", "set", "eth1.20", "up"]);
      await createNet(h1, ["-d", "macvlan", "--subnet", "10.30.0.0/24", "-o", "parent=eth1.20", "v20"]);
      expect((await link(h1, "eth1.20"))?.flags).toContain("PROMISC");
      const c = await runSb(h1, "c", "v20");
      expect((await link(c.ns, "eth0"))?.linkinfo?.info_kind).toBe("macvlan");
      await h1.knitOk(["rm", "-f", "c"]);
      await h1.knitOk(["network", "rm", "v20"]);
      const kept = await link(h1, "eth1.20");
      expect(kept?.linkinfo?.info_kind).toBe("veth");
      expect(kept?.flags).not.toContain("PROMISC");
    } finally {
      await h1.exec(["ip", "link", "del", "eth1.20"], { check: false });
    }
  });

  test("validation: parent exists and is up, MTU, modes, options, overlaps; nothing is left by a refusal", async () => {
    const create = (args: readonly string[]) => knitFails(h1, ["network", "create", "-d", "macvlan", ...args, "bad"]);
    expect(await create(["--subnet", "10.31.0.0/24", "-o", "parent=eth9"])).toContain("parent interface eth9 does not exist");
    expect(await create(["-o", "parent=lo"])).toContain("loopback");
    expect(await create(["-o", "parent=eth1", "-o", "com.docker.network.driver.mtu=9000"])).toContain("above the MTU of parent interface eth1 (1500)");
    expect(await create(["-o", "parent=eth1", "-o", "macvlan_mode=fast"])).toContain('invalid value "fast" for option macvlan_mode');
    expect(await create(["-o", "macvlan_mode=passthru"])).toContain("passthru needs a parent");
    expect(await create(["-o", "parent=eth1", "-o", "color=blue"])).toContain('unknown option "color"');
    expect(await create(["-o", "parent=eth1", "-o", "macvlan_mode=private", "-o", "knit.macvlan.host_access=true"])).toContain("needs macvlan_mode=bridge");
    expect(await create(["--subnet", "10.31.0.0/24", "-o", "parent=eth1", "-o", "knit.macvlan.host_access=true"])).toContain("--aux-address host=IP");
    expect(
      await create([
        "--subnet", "10.31.0.0/24", "--aux-address", "host=10.31.0.250", "--subnet", "10.32.0.0/24", "--aux-address", "host6=10.32.0.250",
        "-o", "parent=eth1", "-o", "knit.macvlan.host_access=true",
      ]),
    ).toContain("more than one IPv4 host address");
    expect(await create(["--ipv6", "--subnet", "2001:db8:31::/64", "-o", "parent=eth1", "-o", "com.docker.network.driver.mtu=1200"])).toContain("IPv6 needs an MTU of at least 1280");

    // A parent that is down, one that is a bridge port, one that is no Ethernet device.
    await h1.exec(["ip", "link", "add", "x0", "type", "veth", "peer", "name", "x1"]);
    await h1.exec(["ip", "link", "add", "xbr", "type", "bridge"]);
    await h1.exec(["ip", "tuntap", "add", "dev", "xtun", "mode", "tun"]);
    try {
      expect(await create(["--subnet", "10.31.0.0/24", "-o", "parent=x0"])).toContain("parent interface x0 is down");
      await h1.exec(["ip", "link", "set", "x0", "master", "xbr", "up"]);
      expect(await create(["--subnet", "10.31.0.0/24", "-o", "parent=x0"])).toContain("is a port of xbr");
      await h1.exec(["ip", "link", "set", "xtun", "up"]);
      expect(await create(["--subnet", "10.31.0.0/24", "-o", "parent=xtun"])).toContain("parent interface xtun is not an Ethernet device (none)");
      expect((await link(h1, "xtun"))?.flags).not.toContain("PROMISC");
    } finally {
      await h1.exec(["ip", "link", "del", "x0"]);
      await h1.exec(["ip", "link", "del", "xbr"]);
      await h1.exec(["ip", "link", "del", "xtun"]);
    }

    // Subnets must not overlap other networks, of any driver; the host's own route on the
    // parent (h1 sits on the LAN) is the LAN itself and no conflict.
    await createNet(h1, ["-d", "macvlan", "--subnet", "192.168.100.0/24", "--gateway", "192.168.100.1", "-o", "parent=eth1", "lan0"]);
    expect(await create(["--subnet", "192.168.100.128/25", "-o", "parent=eth1"])).toContain('overlaps network "lan0"');
    // One network per parent and subnet, whatever its mode; a passthru network wants the parent to itself.
    expect(await create(["--subnet", "192.168.100.0/24", "--gateway", "192.168.100.1", "-o", "parent=eth1"])).toContain('overlaps network "lan0"');
    expect(await create(["--subnet", "192.168.100.0/24", "-o", "parent=eth1", "-o", "macvlan_mode=private"])).toContain('overlaps network "lan0"');
    expect(await create(["--subnet", "10.31.0.0/24", "-o", "parent=eth1", "-o", "macvlan_mode=passthru"])).toContain("cannot use macvlan_mode=passthru on eth1: network lan0 already uses it");
    expect(await knitFails(h1, ["network", "create", "--subnet", "192.168.100.0/25", "br"])).toContain('overlaps network "lan0"');
    // The host's route through the LAN does count for a network elsewhere.
    await h1.knitOk(["network", "rm", "lan0"]);
    expect(await knitFails(h1, ["network", "create", "-d", "macvlan", "--subnet", "192.168.100.0/24", "iso"])).toContain("a route on this host");
    expect(names((await h1.knitOk(["network", "ls", "-q", "--filter", "type=custom"])).stdout)).toEqual([]);
  });

  test("crashes: a create killed after the kernel work, and a connect killed after wiring, are repaired by gc", async () => {
    const args = [
      "network", "create", "-d", "macvlan", "--subnet", "192.168.100.0/24", "--gateway", "192.168.100.1", "--ip-range", "192.168.100.64/28",
      "--aux-address", "host=192.168.100.250", "-o", "parent=eth1", "-o", "knit.macvlan.host_access=true", "ha",
    ];
    const crashed = await h1.knit(args, { env: { KNIT_CRASH_AT: "network-create:after-kernel" } });
    expect(crashed.code).not.toBe(0);
    expect((await link(h1, "eth1"))?.flags).toContain("PROMISC");
    await h1.knitOk(["gc"]);
    // (afterEach proves the shim is gone and promiscuous mode is off again.)
    expect((await link(h1, "eth1"))?.flags).not.toContain("PROMISC");
    const failed = await h1.knit(args, { env: { KNIT_FAIL_AT: "network-create:after-kernel" } });
    expect(failed.stderr).toContain("injected failure");
    expect((await link(h1, "eth1"))?.flags).not.toContain("PROMISC");

    await createNet(h1, args.slice(2));
    // An existing namespace (as a runtime made it) joins; the command dies after wiring it.
    const ext = await lab.ns("ext");
    const r = await h1.knit(["network", "connect", "--ip", "192.168.100.70", "ha", ext.name], { env: { KNIT_CRASH_AT: "connect:after-kernel" } });
    expect(r.code).not.toBe(0);
    expect((await link(ext, "eth0"))?.linkinfo?.info_kind).toBe("macvlan");
    expect(await routes(h1, ["192.168.100.70/32"])).toHaveLength(1);
    await h1.knitOk(["gc"]);
    expect(await link(ext, "eth0")).toBeUndefined();
    expect(await routes(h1, ["192.168.100.70/32"])).toEqual([]);
    await h1.knitOk(["network", "connect", "--ip", "192.168.100.70", "ha", ext.name]);
    expect(await lab.waitPing(h1, "192.168.100.70")).toBe(true);
    await h1.knitOk(["network", "disconnect", "ha", ext.name]);
    expect(await link(ext, "eth0")).toBeUndefined();
    await h1.knitOk(["network", "rm", "ha"]);
  });
});
