/**
 * knit's in-process rtnetlink (src/kernel/netlink.ts) against iproute2, in a lab: every
 * change is made through netlink in a lab namespace and read back with `ip -j`; every read
 * is compared field by field with what `ip -j` prints for the same kernel state. Errors must
 * say what failed and why, leave nothing behind, and leave the calling thread in its own
 * network namespace (checked after every test). Network parameters of another namespace,
 * written from inside it (src/kernel/sysctl.ts writeSysctlsIn), are read back with `cat`.
 *
 *   h (a lab host: bridge, veth host ends)  ──veth──  s (a sandbox-like namespace)
 */
import { afterAll, afterEach, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { readlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { Lab, type LabHost, type LabNode, type NetnsRef } from "../src/lab/lab.ts";
import { getLink, listAddrs, listLinks, listNeighbours, listRoutes, rtnl, deleteLink, isErrno, NetlinkError, type MacvlanModeName } from "../src/kernel/netlink.ts";
import { writeSysctlsIn } from "../src/kernel/sysctl.ts";
import { execStats } from "../src/kernel/exec.ts";
import { assertNoLeaks } from "./leaks.ts";
import { thrownKnitError } from "./thrown.ts";

setDefaultTimeout(60_000);

let lab: Lab;
let h: LabHost;
let s: LabNode;
/** The test process's own namespace, which every netlink call must leave it in. */
let home = "";

type Json = Record<string, unknown>;

async function ipj<T = Json>(node: NetnsRef, args: readonly string[]): Promise<T[]> {
  return JSON.parse((await lab.exec(node, ["ip", "-j", ...args])).stdout || "[]") as T[];
}

/** The fields of `ip -j -d link show dev NAME` that knit's LinkInfo carries. */
async function ipLink(node: NetnsRef, name: string): Promise<Json> {
  const l = (await ipj(node, ["-d", "link", "show", "dev", name]))[0];
  if (!l) throw new Error(`ip shows no ${name}`);
  return l;
}

/** `a`'s fields as `b` has them: every field netlink returned, compared with ip's. */
function sameFields(mine: object, ip: Json, skip: readonly string[] = []): void {
  const m = mine as Json;
  for (const key of Object.keys(m)) {
    if (skip.includes(key) || key === "linkinfo") continue;
    expect({ [key]: m[key] }).toEqual({ [key]: ip[key] });
  }
  const li = m.linkinfo as Json | undefined;
  const ipli = ip.linkinfo as Json | undefined;
  expect(li === undefined).toBe(ipli === undefined);
  if (!li || !ipli) return;
  expect(li.info_kind).toEqual(ipli.info_kind);
  expect(li.info_slave_kind).toEqual(ipli.info_slave_kind);
  // info_data / info_slave_data: the fields knit decodes, as ip prints them.
  for (const key of ["info_data", "info_slave_data"] as const) {
    const mine = li[key] as Json | undefined;
    if (!mine) continue;
    const theirs = (ipli[key] ?? {}) as Json;
    for (const [k, v] of Object.entries(mine)) expect({ [`${key}.${k}`]: v }).toEqual({ [`${key}.${k}`]: theirs[k] });
  }
}

const linkNames = async (node: NetnsRef): Promise<string[]> => (await ipj<{ ifname: string }>(node, ["link", "show"])).map((l) => l.ifname).sort();


beforeAll(async () => {
  home = readlinkSync("/proc/thread-self/ns/net");
  lab = await Lab.create("nl");
  h = await lab.host("h");
  s = await lab.ns("s");
});

afterEach(async () => {
  // The thread is back in its own namespace, whatever the test did.
  expect(readlinkSync("/proc/thread-self/ns/net")).toBe(home);
  for (const node of [h, s]) {
    for (const name of await linkNames(node)) if (name !== "lo") await lab.exec(node, ["ip", "link", "del", "dev", name], { check: false });
  }
  await assertNoLeaks(h);
  expect(await linkNames(s)).toEqual(["lo"]);
});

afterAll(async () => {
  await lab.cleanup();
});

describe("links", () => {
  test("a bridge: created, MTU, MAC, alias, addresses (IPv6 nodad), up; as ip shows it", async () => {
    rtnl(h.netns, (r) => {
      r.createLink("br-nl", { kind: "bridge" });
      r.setLink("br-nl", { mtu: 1400, address: "02:42:0A:1E:00:01", alias: "knit:net 1" });
      r.addAddress("br-nl", "10.30.0.1/24", { replace: true });
      r.addAddress("br-nl", "fd00:30::1/64", { replace: true, nodad: true });
      r.setLink("br-nl", { up: true });
    });
    const ip = await ipLink(h, "br-nl");
    expect(ip).toMatchObject({ mtu: 1400, address: "02:42:0a:1e:00:01", ifalias: "knit:net 1", linkinfo: { info_kind: "bridge" } });
    expect(ip.flags).toContain("UP");
    const mine = getLink("br-nl", h.netns);
    expect(mine).toBeDefined();
    sameFields(mine ?? {}, ip);
    const addrs = (await ipj<{ ifname: string; addr_info: Json[] }>(h, ["addr", "show", "dev", "br-nl"]))[0]?.addr_info ?? [];
    expect(addrs.filter((a) => a.scope === "global").map((a) => [a.local, a.prefixlen, a.nodad ?? false])).toEqual([
      ["10.30.0.1", 24, false],
      ["fd00:30::1", 64, true],
    ]);
    // replace: the same address again is fine.
    rtnl(h.netns, (r) => r.addAddress("br-nl", "10.30.0.1/24", { replace: true }));
  });

  test("a veth pair, the peer made in another namespace under its final name; master, alias, isolated, hairpin", async () => {
    rtnl(h.netns, (r) => {
      r.createLink("br-nl", { kind: "bridge" });
      r.setLink("br-nl", { up: true });
      r.createLink("vethnl1", { kind: "veth", peer: { name: "eth3", mtu: 1450, netns: s.netns } }, { mtu: 1450 });
      r.setLink("vethnl1", { master: "br-nl", alias: "knit:ep1", up: true });
      r.setBridgePort("vethnl1", { isolated: true, hairpin: true });
    });
    const ip = await ipLink(h, "vethnl1");
    expect(ip).toMatchObject({ mtu: 1450, master: "br-nl", ifalias: "knit:ep1", linkinfo: { info_kind: "veth", info_slave_kind: "bridge", info_slave_data: { isolated: true, hairpin: true } } });
    const mine = getLink("vethnl1", h.netns);
    sameFields(mine ?? {}, ip);
    expect(mine?.linkinfo?.info_slave_data).toEqual({ hairpin: true, learning: true, isolated: true });
    expect(mine?.link_netnsid).toBeNumber();
    const peer = await ipLink(s, "eth3");
    expect(peer.mtu).toBe(1450);
    sameFields(getLink("eth3", s.netns) ?? {}, peer);
    // Every link of both namespaces, as a dump, matches ip's dump.
    for (const node of [h, s]) {
      const ipAll = await ipj(node, ["-d", "link", "show"]);
      const all = listLinks(node.netns);
      expect(all.map((l) => l.ifname)).toEqual(ipAll.map((l) => String(l.ifname)));
      for (const l of all) sameFields(l, ipAll.find((x) => x.ifname === l.ifname) ?? {});
    }
  });

  test("a veth pair inside one namespace: link names its peer, M-DOWN while the peer is down", async () => {
    rtnl(h.netns, (r) => {
      r.createLink("va", { kind: "veth", peer: { name: "vb" } });
      r.setLink("va", { up: true, promisc: true });
    });
    for (const name of ["va", "vb"]) {
      const mine = getLink(name, h.netns);
      expect(mine?.link).toBe(name === "va" ? "vb" : "va");
      sameFields(mine ?? {}, await ipLink(h, name));
    }
    expect(getLink("va", h.netns)?.flags).toEqual(["NO-CARRIER", "BROADCAST", "MULTICAST", "PROMISC", "UP", "M-DOWN"]);
  });

  test("vxlan and macvlan links made by ip decode as ip -d shows them", async () => {
    await h.exec(["ip", "link", "add", "dum0", "type", "ifb"]);
    await h.exec(["ip", "addr", "add", "10.31.0.1/24", "dev", "dum0"]);
    await h.exec(["ip", "link", "set", "dum0", "up"]);
    await h.exec(["ip", "link", "add", "vx0", "type", "vxlan", "id", "4242", "dstport", "4789", "local", "10.31.0.1", "dev", "dum0", "nolearning", "proxy"]);
    await h.exec(["ip", "link", "add", "mv0", "link", "dum0", "type", "macvlan", "mode", "bridge"]);
    const vx = getLink("vx0", h.netns);
    expect(vx?.linkinfo?.info_data).toMatchObject({ id: 4242, port: 4789, local: "10.31.0.1", link: "dum0", learning: false, proxy: true });
    sameFields(vx ?? {}, await ipLink(h, "vx0"));
    const mv = getLink("mv0", h.netns);
    expect(mv?.linkinfo?.info_data).toEqual({ mode: "bridge" });
    sameFields(mv ?? {}, await ipLink(h, "mv0"));
  });

  test("listNeighbours: a vxlan port's own FDB entries, the bridge's, and neighbours, as bridge -j and ip -j list them", async () => {
    await h.exec(["ip", "link", "add", "nbr0", "type", "bridge"]);
    await h.exec(["ip", "link", "add", "nvx0", "type", "vxlan", "id", "42", "dstport", "4789", "nolearning"]);
    await h.exec(["ip", "link", "set", "nvx0", "master", "nbr0", "up"]);
    await h.exec(["ip", "link", "set", "nbr0", "up"]);
    const macs = ["02:00:00:00:00:01", "02:00:00:00:00:02", "02:00:00:00:00:07"] as const;
    await h.exec(["bridge", "fdb", "append", macs[0], "dev", "nvx0", "dst", "10.1.0.2", "self", "permanent"]);
    await h.exec(["bridge", "fdb", "append", macs[1], "dev", "nvx0", "dst", "10.1.0.3", "self", "permanent"]);
    await h.exec(["bridge", "fdb", "append", "00:00:00:00:00:00", "dev", "nvx0", "dst", "10.1.0.4", "self", "permanent"]);
    await h.exec(["bridge", "fdb", "add", macs[0], "dev", "nvx0", "master", "static"]);
    await h.exec(["ip", "neigh", "replace", "10.9.0.5", "lladdr", macs[0], "dev", "nvx0", "nud", "permanent"]);
    await h.exec(["ip", "neigh", "replace", "fd00:9::5", "lladdr", macs[1], "dev", "nvx0", "nud", "permanent"]);
    await h.exec(["ip", "neigh", "replace", "10.9.0.7", "lladdr", macs[2], "dev", "nvx0", "nud", "noarp"]); // ip hides it
    await h.exec(["ip", "neigh", "replace", "10.9.0.8", "lladdr", macs[2], "dev", "nbr0", "nud", "permanent"]); // another device
    const mine = listNeighbours("nvx0", h.netns);
    type Fdb = { mac: string; dst?: string; master?: string; state?: string };
    const fdb = (await lab.exec(h, ["bridge", "-j", "fdb", "show", "dev", "nvx0"])).stdout;
    const theirs = (JSON.parse(fdb) as Fdb[]).map((e) => ({
      mac: e.mac,
      ...(e.dst ? { dst: e.dst } : {}),
      ...(e.master ? { master: true } : {}),
      ...(e.state === "permanent" || e.state === "static" ? { state: e.state } : {}),
    }));
    const key = (e: object): string => JSON.stringify(e);
    expect(mine.fdb.map(key).sort()).toEqual(theirs.map(key).sort());
    expect(mine.fdb).toContainEqual({ mac: macs[1], dst: "10.1.0.3", state: "permanent" });
    expect(mine.fdb).toContainEqual({ mac: macs[0], master: true, state: "static" });
    const neigh = (await ipj<{ dst: string; lladdr?: string }>(h, ["neigh", "show", "dev", "nvx0"])).map((n) => ({ dst: n.dst, ...(n.lladdr ? { lladdr: n.lladdr } : {}) }));
    expect(mine.neigh.map(key).sort()).toEqual(neigh.map(key).sort());
    expect(mine.neigh.map((n) => n.dst).sort()).toEqual(["10.9.0.5", "fd00:9::5"]);
    expect(listNeighbours("nosuch0", h.netns)).toEqual({ fdb: [], neigh: [] });
  });

  test("setLink: addrgenmode none keeps even the link-local address away; down and release from the bridge", async () => {
    rtnl(h.netns, (r) => {
      r.createLink("br-nl", { kind: "bridge" });
      r.createLink("dnl", { kind: "ifb" }, { mtu: 1300 });
      r.setLink("dnl", { addrgenmode: "none" });
      r.setLink("dnl", { master: "br-nl", up: true });
    });
    expect((await ipLink(h, "dnl")).master).toBe("br-nl");
    expect((await ipLink(h, "dnl")).inet6_addr_gen_mode).toBe("none");
    expect(listAddrs(h.netns).find((a) => a.ifname === "dnl")?.addr_info).toEqual([]);
    rtnl(h.netns, (r) => r.setLink("dnl", { master: "", up: false }));
    const ip = await ipLink(h, "dnl");
    expect(ip.master).toBeUndefined();
    expect(ip.flags).not.toContain("UP");
    sameFields(getLink("dnl", h.netns) ?? {}, ip);
  });

  test("deleteLink: true when deleted, false when there is none; getLink of a missing link is undefined", async () => {
    rtnl(h.netns, (r) => r.createLink("dnl", { kind: "ifb" }));
    expect(deleteLink("dnl", h.netns)).toBe(true);
    expect(await linkNames(h)).toEqual(["lo"]);
    expect(deleteLink("dnl", h.netns)).toBe(false);
    expect(getLink("dnl", h.netns)).toBeUndefined();
    // A name no interface can have is simply not there.
    expect(getLink("a-name-far-too-long", h.netns)).toBeUndefined();
  });

  test("a dump spanning many reads: 400 links, all listed", async () => {
    rtnl(s.netns, (r) => {
      for (let i = 0; i < 200; i++) r.createLink(`a${i}`, { kind: "veth", peer: { name: `b${i}` } });
    });
    const mine = listLinks(s.netns).map((l) => l.ifname);
    expect(mine).toHaveLength(401);
    expect(mine).toEqual((await ipj<{ ifname: string }>(s, ["link", "show"])).map((l) => l.ifname));
    rtnl(s.netns, (r) => {
      for (let i = 0; i < 200; i++) expect(r.deleteLink(`a${i}`)).toBe(true);
    });
    expect(await linkNames(s)).toEqual(["lo"]);
  });
});

describe("addresses and routes", () => {
  test("the sandbox side: MAC, addresses, up, default routes with metrics; listAddrs and listRoutes as ip shows them", async () => {
    rtnl(h.netns, (r) => {
      r.createLink("br-nl", { kind: "bridge" });
      r.addAddress("br-nl", "10.32.0.1/24", { replace: true });
      r.addAddress("br-nl", "fd00:32::1/64", { replace: true, nodad: true });
      r.setLink("br-nl", { up: true });
      r.createLink("vethnl2", { kind: "veth", peer: { name: "eth1", netns: s.netns } });
      r.setLink("vethnl2", { master: "br-nl", up: true });
    });
    rtnl(s.netns, (r) => {
      r.setLink("eth1", { address: "02:42:0a:20:00:02" });
      r.addAddress("eth1", "10.32.0.2/24");
      r.addAddress("eth1", "fd00:32::2/64", { nodad: true });
      r.setLink("eth1", { up: true });
      r.addRoute({ dst: "default", gateway: "10.32.0.1", dev: "eth1", metric: 1, replace: true });
      r.addRoute({ dst: "default", gateway: "fd00:32::1", dev: "eth1", metric: 1, replace: true });
      r.addRoute({ dst: "192.0.2.0/24", gateway: "10.32.0.1", dev: "eth1", replace: true });
      r.addRoute({ dst: "198.51.100.0/24", dev: "eth1" });
      r.addRoute({ dst: "203.0.113.0/24", gateway: "10.99.0.1", dev: "eth1", onlink: true });
      // replace twice: one route.
      r.addRoute({ dst: "default", gateway: "10.32.0.1", dev: "eth1", metric: 1, replace: true });
    });
    expect((await ipLink(s, "eth1")).address).toBe("02:42:0a:20:00:02");
    const ipAddrs = await ipj<{ ifname: string; addr_info: Json[] }>(s, ["addr", "show"]);
    const mine = listAddrs(s.netns);
    expect(mine.map((a) => a.ifname)).toEqual(ipAddrs.map((a) => a.ifname));
    for (const a of mine) {
      const theirs = ipAddrs.find((x) => x.ifname === a.ifname)?.addr_info ?? [];
      expect(a.addr_info as Json[]).toEqual(theirs.map((i) => ({ family: i.family, local: i.local, prefixlen: i.prefixlen, scope: i.scope })));
    }
    expect((ipAddrs.find((a) => a.ifname === "eth1")?.addr_info ?? []).find((i) => i.local === "fd00:32::2")?.nodad).toBe(true);

    const ipRoutes = await ipj(s, ["route", "show", "table", "all"]);
    const routes = listRoutes(s.netns);
    expect(routes).toHaveLength(ipRoutes.length);
    for (const [i, r] of routes.entries()) {
      const theirs = ipRoutes[i] ?? {};
      const fields = ["dst", "gateway", "dev", "protocol", "scope", "prefsrc", "type", "table", "metric"];
      expect(r as unknown as Json).toEqual(Object.fromEntries(fields.filter((f) => theirs[f] !== undefined).map((f) => [f, theirs[f]])));
    }
    expect(routes.filter((r) => r.dst === "default")).toEqual([
      { dst: "default", gateway: "10.32.0.1", dev: "eth1", metric: 1 },
      { dst: "default", gateway: "fd00:32::1", dev: "eth1", metric: 1 },
    ]);
    expect(ipRoutes.find((r) => r.dst === "203.0.113.0/24")?.flags).toEqual(["onlink"]);
    expect(ipRoutes.find((r) => r.dst === "198.51.100.0/24")?.scope).toBe("link");
    // And the path works: the sandbox reaches its gateway over both families.
    expect(await s.waitPing("10.32.0.1")).toBe(true);
    expect(await s.waitPing("fd00:32::1")).toBe(true);
  });
});

describe("macvlan devices, routes with a source, parameters of another namespace", () => {
  test("macvlan: made on a parent straight into another namespace under its final name, in each mode; as ip -d shows it (kind, mode, parent)", async () => {
    for (const p of ["par0", "par1"]) {
      await h.exec(["ip", "link", "add", p, "type", "ifb"]);
      await h.exec(["ip", "link", "set", p, "up"]);
    }
    const par0 = await ipLink(h, "par0");
    const par1 = await ipLink(h, "par1");
    const spawns = execStats.spawns;
    const modes: MacvlanModeName[] = ["bridge", "private", "vepa", "passthru"];
    rtnl(h.netns, (r) => {
      for (const [i, mode] of modes.entries()) {
        // passthru: the only device on its parent, with the parent's MAC.
        const on = mode === "passthru" ? { parent: "par1" } : { parent: "par0", address: `02:42:0a:21:00:0${i + 2}` };
        r.createLink(`eth${i}`, { kind: "macvlan", mode, netns: s.netns, ...on }, mode === "passthru" ? {} : { mtu: 1400 });
      }
      // In the namespace of the request itself, as the host-access shim is: `link` names the parent.
      r.createLink("mvnl", { kind: "macvlan", parent: "par0", mode: "bridge" });
    });
    expect(execStats.spawns).toBe(spawns);
    expect(await linkNames(h)).toEqual(["lo", "mvnl", "par0", "par1"]);
    expect(await linkNames(s)).toEqual(["eth0", "eth1", "eth2", "eth3", "lo"]);
    for (const [i, mode] of modes.entries()) {
      const ip = await ipLink(s, `eth${i}`);
      expect(ip.linkinfo).toMatchObject({ info_kind: "macvlan", info_data: { mode } });
      // The parent stays in the host's namespace: ip names it by index there.
      expect(ip.link_index).toBe(mode === "passthru" ? par1.ifindex : par0.ifindex);
      expect(ip.link_netnsid).toBeNumber();
      expect(ip.mtu).toBe(mode === "passthru" ? 1500 : 1400);
      expect(ip.address).toBe(mode === "passthru" ? par1.address : `02:42:0a:21:00:0${i + 2}`);
      sameFields(getLink(`eth${i}`, s.netns) ?? {}, ip);
    }
    const shim = await ipLink(h, "mvnl");
    expect(shim).toMatchObject({ link: "par0", linkinfo: { info_kind: "macvlan", info_data: { mode: "bridge" } } });
    sameFields(getLink("mvnl", h.netns) ?? {}, shim);
    // Two bridge-mode devices on one parent talk inside the host, across the namespaces.
    rtnl(h.netns, (r) => {
      r.addAddress("mvnl", "10.33.0.1/24");
      r.setLink("mvnl", { up: true });
    });
    rtnl(s.netns, (r) => {
      r.addAddress("eth0", "10.33.0.2/24");
      r.setLink("eth0", { up: true });
    });
    expect(await s.waitPing("10.33.0.1")).toBe(true);
  });

  test("macvlan refusals: a missing parent, a name the target has, a second device on a passthru parent, an MTU above the parent's, a bad mode; nothing is left", async () => {
    await h.exec(["ip", "link", "add", "par0", "type", "ifb"]);
    await s.exec(["ip", "link", "add", "eth0", "type", "ifb"]);
    const make = (name: string, mode: MacvlanModeName, mtu?: number) => () =>
      rtnl(h.netns, (r) => r.createLink(name, { kind: "macvlan", parent: "par0", mode, netns: s.netns }, mtu === undefined ? {} : { mtu }));
    const noParent = thrownKnitError(() => rtnl(h.netns, (r) => r.createLink("eth1", { kind: "macvlan", parent: "nosuch0", mode: "bridge", netns: s.netns })));
    expect(noParent.message).toBe(`no interface nosuch0 in ${h.path}: No such device (ENODEV)`);
    const dup = thrownKnitError(make("eth0", "bridge"));
    expect(dup.message).toStartWith(`cannot create macvlan eth0 in ${s.path} on par0 in ${h.path}: File exists (EEXIST)`);
    const mtu = thrownKnitError(make("eth1", "bridge", 9000));
    expect(mtu.message).toStartWith(`cannot create macvlan eth1 in ${s.path} on par0 in ${h.path}: Invalid argument (EINVAL)`);
    expect(isErrno(mtu, "EINVAL")).toBe(true);
    make("eth1", "passthru")();
    const second = thrownKnitError(make("eth2", "bridge"));
    expect(isErrno(second, "EINVAL")).toBe(true);
    const mode = thrownKnitError(make("eth2", "fast" as MacvlanModeName));
    expect([mode.code, mode.message]).toEqual(["invalid-argument", 'invalid macvlan mode "fast": expected one of private, vepa, bridge, passthru']);
    expect(await linkNames(h)).toEqual(["lo", "par0"]);
    expect(await linkNames(s)).toEqual(["eth0", "eth1", "lo"]);
  });

  test("routes with a source address, and their deletion by destination and device: true once, then false; another device's route stays", async () => {
    rtnl(h.netns, (r) => {
      for (const dev of ["dnl", "dnl2"]) {
        r.createLink(dev, { kind: "ifb" });
        r.setLink(dev, { up: true });
      }
      r.addAddress("dnl", "10.34.0.250/32");
      r.addAddress("dnl", "fd00:34::250/128", { nodad: true });
      r.addRoute({ dst: "10.34.0.7/32", dev: "dnl", src: "10.34.0.250", replace: true });
      r.addRoute({ dst: "fd00:34::7/128", dev: "dnl", src: "fd00:34::250", replace: true });
      r.addRoute({ dst: "10.34.0.8/32", dev: "dnl2" });
    });
    const shown = async (args: readonly string[]) => (await ipj(h, ["route", "show", ...args])).map((r) => [r.dst, r.dev, r.prefsrc, r.scope]);
    expect(await shown(["10.34.0.7/32"])).toEqual([["10.34.0.7", "dnl", "10.34.0.250", "link"]]);
    expect((await ipj(h, ["-6", "route", "show", "fd00:34::7/128"])).map((r) => [r.dst, r.dev, r.prefsrc])).toEqual([["fd00:34::7", "dnl", "fd00:34::250"]]);
    expect(listRoutes(h.netns).filter((r) => r.dst === "10.34.0.7" || r.dst === "fd00:34::7")).toEqual([
      { dst: "10.34.0.7", dev: "dnl", scope: "link", prefsrc: "10.34.0.250" },
      { dst: "fd00:34::7", dev: "dnl", prefsrc: "fd00:34::250", metric: 1024 },
    ]);
    rtnl(h.netns, (r) => {
      expect(r.deleteRoute({ dst: "10.34.0.7/32", dev: "dnl" })).toBe(true);
      expect(r.deleteRoute({ dst: "10.34.0.7/32", dev: "dnl" })).toBe(false);
      expect(r.deleteRoute({ dst: "fd00:34::7/128", dev: "dnl" })).toBe(true);
      expect(r.deleteRoute({ dst: "fd00:34::7/128", dev: "dnl" })).toBe(false);
      // Through another device: not that route.
      expect(r.deleteRoute({ dst: "10.34.0.8/32", dev: "dnl" })).toBe(false);
      // No such device: its routes went with it.
      expect(r.deleteRoute({ dst: "10.34.0.8/32", dev: "nosuch0" })).toBe(false);
    });
    expect(await shown(["10.34.0.7/32"])).toEqual([]);
    expect(await ipj(h, ["-6", "route", "show", "fd00:34::7/128"])).toEqual([]);
    expect(await shown(["10.34.0.8/32"])).toEqual([["10.34.0.8", "dnl2", undefined, "link"]]);
    const mixed = thrownKnitError(() => rtnl(h.netns, (r) => r.addRoute({ dst: "10.34.0.9/32", dev: "dnl", src: "fd00:34::250" })));
    expect([mixed.code, mixed.message]).toEqual(["invalid-argument", "route 10.34.0.9/32: source fd00:34::250 is not of the destination's family"]);
  });

  test("network parameters of another namespace: set from inside it, no process; the same interface elsewhere keeps its own; a missing key fails, the thread comes home", async () => {
    rtnl(s.netns, (r) => r.createLink("dnl", { kind: "ifb" }));
    rtnl(h.netns, (r) => r.createLink("dnl", { kind: "ifb" }));
    const read = async (node: NetnsRef, key: string) => (await lab.exec(node, ["cat", `/proc/sys/${key}`])).stdout.trim();
    expect(await read(s, "net/ipv4/conf/dnl/arp_notify")).toBe("0");
    const spawns = execStats.spawns;
    const requests = execStats.netlink;
    // Slashed and dotted keys alike.
    writeSysctlsIn(s.netns, [
      ["net/ipv4/conf/dnl/arp_notify", "1"],
      ["net/ipv6/conf/dnl/ndisc_notify", "1"],
      ["net.ipv4.conf.dnl.arp_ignore", "2"],
    ]);
    expect(execStats.spawns).toBe(spawns);
    // One entry in the trace, for the one visit.
    expect(execStats.netlink - requests).toBe(1);
    expect(await read(s, "net/ipv4/conf/dnl/arp_notify")).toBe("1");
    expect(await read(s, "net/ipv6/conf/dnl/ndisc_notify")).toBe("1");
    expect(await read(s, "net/ipv4/conf/dnl/arp_ignore")).toBe("2");
    for (const key of ["net/ipv4/conf/dnl/arp_notify", "net/ipv6/conf/dnl/ndisc_notify", "net/ipv4/conf/dnl/arp_ignore"]) expect(`${key}=${await read(h, key)}`).toBe(`${key}=0`);

    const missing = thrownKnitError(() => writeSysctlsIn(s.netns, [["net/ipv4/conf/dnl/arp_accept", "1"], ["net/ipv4/conf/nosuch0/arp_notify", "1"]]));
    expect([missing.code, missing.message]).toEqual(["kernel", `cannot set net/ipv4/conf/nosuch0/arp_notify=1 in ${s.path}: No such file or directory (ENOENT)`]);
    expect(readlinkSync("/proc/thread-self/ns/net")).toBe(home);
    // The keys before the failing one are set.
    expect(await read(s, "net/ipv4/conf/dnl/arp_accept")).toBe("1");
    const bad = thrownKnitError(() => writeSysctlsIn(s.netns, [["net/ipv4/conf/dnl/arp_notify", "bogus"]]));
    expect(bad.message).toBe(`cannot set net/ipv4/conf/dnl/arp_notify=bogus in ${s.path}: Invalid argument (EINVAL)`);
    expect(thrownKnitError(() => writeSysctlsIn({ path: "/run/netns/nl-no-such-ns" }, [["net/ipv4/conf/all/arp_notify", "1"]])).message).toBe(
      "cannot open network namespace /run/netns/nl-no-such-ns: No such file or directory (ENOENT)",
    );
    // Only network parameters, and no way out of /proc/sys/net.
    for (const key of ["kernel/hostname", "net/../kernel/hostname", "net/ipv4//ip_forward"]) expect(thrownKnitError(() => writeSysctlsIn(s.netns, [[key, "x"]])).code).toBe("internal");
  });
});

describe("errors", () => {
  test("EEXIST: an existing name, and a peer name the target namespace already has; nothing is left", async () => {
    rtnl(h.netns, (r) => r.createLink("br-nl", { kind: "bridge" }));
    const dup = thrownKnitError(() => rtnl(h.netns, (r) => r.createLink("br-nl", { kind: "bridge" })));
    expect(dup).toBeInstanceOf(NetlinkError);
    expect(dup.code).toBe("kernel");
    expect(dup.message).toBe(`cannot create bridge br-nl in ${h.path}: File exists (EEXIST)`);
    expect(isErrno(dup, "EEXIST")).toBe(true);

    await s.exec(["ip", "link", "add", "eth0", "type", "ifb"]);
    const before = await linkNames(h);
    const peer = thrownKnitError(() => rtnl(h.netns, (r) => r.createLink("vethnl3", { kind: "veth", peer: { name: "eth0", netns: s.netns } })));
    expect(peer.message).toStartWith(`cannot create veth pair vethnl3 in ${h.path} / eth0 in ${s.path}: File exists (EEXIST)`);
    expect(await linkNames(h)).toEqual(before);
    expect(await linkNames(s)).toEqual(["eth0", "lo"]);
  });

  test("ENODEV and the like: missing links, a route via a missing device, a master that is no bridge", async () => {
    const missing = thrownKnitError(() => rtnl(h.netns, (r) => r.setLink("nosuch0", { up: true })));
    expect(missing.message).toBe(`cannot set state up of interface nosuch0 in ${h.path}: No such device (ENODEV)`);
    expect(isErrno(missing, "ENODEV")).toBe(true);
    const noDev = thrownKnitError(() => rtnl(h.netns, (r) => r.addAddress("nosuch0", "10.0.0.1/24")));
    expect(noDev.message).toBe(`no interface nosuch0 in ${h.path}: No such device (ENODEV)`);
    rtnl(h.netns, (r) => r.createLink("dnl", { kind: "ifb" }));
    const unreachable = thrownKnitError(() => rtnl(h.netns, (r) => r.addRoute({ dst: "default", gateway: "10.77.0.1", dev: "dnl" })));
    expect(unreachable.message).toMatch(new RegExp(`^cannot add route default via 10.77.0.1 dev dnl in ${h.path}: .+ \\(E[A-Z]+\\)`));
    const badMaster = thrownKnitError(() => rtnl(h.netns, (r) => r.setLink("dnl", { master: "lo" })));
    expect(badMaster.message).toStartWith(`cannot set master lo of interface dnl in ${h.path}: `);
    expect(await linkNames(h)).toEqual(["dnl", "lo"]);
  });

  test("bad namespaces: a missing path, a file that is no namespace; the thread stays home", async () => {
    const gone = thrownKnitError(() => listLinks({ path: "/run/netns/nl-no-such-ns" }));
    expect(gone.message).toBe("cannot open network namespace /run/netns/nl-no-such-ns: No such file or directory (ENOENT)");
    const file = join(lab.dir, "_not-a-netns");
    writeFileSync(file, "");
    const notNs = thrownKnitError(() => listLinks({ path: file }));
    expect(notNs.message).toBe(`cannot enter network namespace ${file}: Invalid argument (EINVAL)`);
    expect(readlinkSync("/proc/thread-self/ns/net")).toBe(home);
    // A veth whose peer would go to a missing namespace: refused before anything is made.
    const peer = thrownKnitError(() => rtnl(h.netns, (r) => r.createLink("vethnl4", { kind: "veth", peer: { name: "eth0", netns: { path: "/run/netns/nl-no-such-ns" } } })));
    expect(peer.message).toContain("No such file or directory (ENOENT)");
    expect(await linkNames(h)).toEqual(["lo"]);
  });

  test("bad input is refused before the kernel sees it", () => {
    expect(thrownKnitError(() => rtnl(h.netns, (r) => r.createLink("a-name-far-too-long", { kind: "ifb" }))).code).toBe("invalid-argument");
    expect(thrownKnitError(() => rtnl(h.netns, (r) => r.createLink("bad/name", { kind: "ifb" }))).code).toBe("invalid-argument");
    rtnl(h.netns, (r) => r.createLink("dnl", { kind: "ifb" }));
    const mac = thrownKnitError(() => rtnl(h.netns, (r) => r.setLink("dnl", { address: "02:42:zz:00:00:01" })));
    expect([mac.code, mac.message]).toEqual(["invalid-argument", 'invalid MAC address "02:42:zz:00:00:01"']);
    expect(thrownKnitError(() => rtnl(h.netns, (r) => r.addAddress("dnl", "10.0.0.300/24"))).code).toBe("invalid-argument");
    expect(thrownKnitError(() => rtnl(h.netns, (r) => r.addRoute({ dst: "default", dev: "dnl" }))).message).toBe("route default dev dnl: a default route needs a gateway");
  });
});

describe("tracing", () => {
  test("netlink requests are counted apart from spawned processes", () => {
    const before = { ...execStats };
    rtnl(h.netns, (r) => {
      r.createLink("dnl", { kind: "ifb" });
      r.setLink("dnl", { up: true });
    });
    expect(execStats.spawns).toBe(before.spawns);
    // The socket in the namespace, the create, the set.
    expect(execStats.netlink - before.netlink).toBe(3);
    expect(execStats.netlinkMillis).toBeGreaterThan(before.netlinkMillis);
  });
});
