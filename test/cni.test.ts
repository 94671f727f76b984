/**
 * knit's CNI plugins driven as libcni drives them (test/cni-libcni.ts), in a private lab:
 *
 *   lan ─┬─ h       knit host 192.168.60.2: knit network "front" 10.90.0.0/24, plugins
 *        │          installed by `knit install` into a CNI bin dir of the lab's
 *        └─ client  192.168.60.10 (a machine on the LAN, for published ports)
 *
 * Containers are plain lab namespaces (c1, c2 ...) that the plugins wire from h. Every check
 * reads the kernel (ip -j, nft -j, tc -j) or sends real traffic; after each test the host's
 * links, store claims and attachment records are back to where they were.
 */
import { afterAll, afterEach, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { existsSync, lstatSync, readFileSync, readlinkSync } from "node:fs";
import { join } from "node:path";
import { Lab, type LabHost, type LabNode } from "../src/lab/lab.ts";
import { assertHostClean } from "./leaks.ts";
import { CniCallError, failure, type CniRuntime } from "./cni-libcni.ts";
import { agentMode, container, endpointClaims, firstAddress, ifaceAddrs, installCni, knitList, links, runtimeOn, startCniAgent, stopCniAgent, storeKeys } from "./cni-lab.ts";

setDefaultTimeout(120_000);

let lab: Lab;
let h: LabHost;
let client: LabNode;
let binDir: string;
let rt: CniRuntime;
let frontBridge = "";

const FRONT = "front";

beforeAll(async () => {
  lab = await Lab.create("cni");
  const lan = await lab.lan("lan");
  h = await lab.host("h");
  client = await lab.ns("client");
  await lab.plug(h, lan, { addresses: ["192.168.60.2/24"] });
  await lab.plug(client, lan, { addresses: ["192.168.60.10/24"] });
  binDir = await installCni(lab, h);
  rt = runtimeOn(lab, h, [binDir]);
  await h.knitOk(["network", "create", "--subnet", "10.90.0.0/24", FRONT]);
  const inspect = JSON.parse((await h.knitOk(["network", "inspect", FRONT])).stdout) as { Options: Record<string, string>; Id: string }[];
  frontBridge = `br-${inspect[0]?.Id.slice(0, 12) ?? ""}`;
});

// A failed test must not leave attachments behind for the next one.
afterEach(async () => {
  await rt.delAll();
});

afterAll(async () => {
  await h?.knit(["network", "rm", FRONT]);
  await lab?.cleanup();
});

/** No attachment, claim or CNI link left on h (front and the predefined networks stay). */
async function expectNoAttachments(): Promise<void> {
  expect(Object.keys(await storeKeys(h, "sandboxes/"))).toEqual([]);
  expect(Object.keys(await storeKeys(h, "endpoints/"))).toEqual([]);
  expect(Object.keys(await storeKeys(h, "pending/"))).toEqual([]);
  expect(await endpointClaims(h)).toEqual([]);
  const left = (await links(lab, h)).filter((l) => /^(veth|kb)/.test(l.ifname));
  expect(left.map((l) => l.ifname)).toEqual([]);
}

describe("knit install", () => {
  test("one multi-call launcher and three links in the CNI bin dir, each answering VERSION", async () => {
    expect(lstatSync(join(binDir, "knit-cni")).isFile()).toBe(true);
    for (const name of ["knit", "knit-ipam", "knit-portmap"]) {
      expect(readlinkSync(join(binDir, name))).toBe("knit-cni");
      const v = await rt.version(name, "1.0.0");
      expect(v).toEqual({ cniVersion: "1.0.0", supportedVersions: ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] });
    }
    // Installing again upgrades in place; a foreign file of the same name is left alone.
    await h.knitOk(["install", "--cni-bin-dir", binDir]);
    const other = join(lab.dir, "_cni-foreign");
    await lab.run(["sh", "-c", `mkdir -p ${other} && echo '#!/bin/sh' > ${other}/knit && chmod +x ${other}/knit`]);
    const r = await h.knit(["install", "--cni-bin-dir", other]);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toContain("not knit's");
    await h.knitOk(["install", "--cni-bin-dir", other, "--force"]);
    expect(readlinkSync(join(other, "knit"))).toBe("knit-cni");
    // The launcher runs the lean client, which loads the full plugin only to run an invocation itself.
    expect(readFileSync(join(binDir, "knit-cni"), "utf8")).toContain(`${join(binDir, "knit-cni-client.js")}' --plugin "\${0##*/}" --engine '${join(binDir, "knit-cni.js")}'`);
    for (const f of ["knit-cni.js", "knit-cni.js.jsc", "knit-cni-client.js", "knit-cni-client.js.jsc"]) expect(existsSync(join(binDir, f))).toBe(true);
    // --from-source: the launcher runs the checkout's sources, the bundles go.
    await h.knitOk(["install", "--cni-bin-dir", other, "--from-source"]);
    expect(readFileSync(join(other, "knit-cni"), "utf8")).toContain("/src/cni/client.ts' --plugin");
    expect(readFileSync(join(other, "knit-cni"), "utf8")).toContain("/src/cni/main.ts");
    expect(existsSync(join(other, "knit-cni.js"))).toBe(false);
    expect(existsSync(join(other, "knit-cni-client.js"))).toBe(false);
    const src = await lab.exec(h, [join(other, "knit-ipam")], { stdin: "{}", env: { CNI_COMMAND: "VERSION" } });
    expect((JSON.parse(src.stdout) as { supportedVersions: string[] }).supportedVersions).toContain("1.1.0");
  });
});

describe("one network, any runtime", () => {
  test("ADD joins a knit network: veth on its bridge, address, route; CNI containers and sandboxes ping each other", async () => {
    const c1 = await container(lab, "c1");
    const list = knitList("front-cni", { network: FRONT });
    const res = await rt.add(list, { containerId: "ctr1", netns: c1.path, ifname: "eth0", args: [["IgnoreUnknown", "1"], ["K8S_POD_NAME", "web"]] });
    // The reference bridge's result shape: bridge, host veth, container interface.
    const ifaces = res.interfaces as { name: string; mac?: string; sandbox?: string; mtu?: number }[];
    expect(ifaces.map((i) => i.name)).toHaveLength(3);
    expect([ifaces[0]?.name, ifaces[2]?.name]).toEqual([frontBridge, "eth0"]);
    expect(ifaces[1]?.name).toMatch(/^veth[0-9a-f]{7}$/);
    expect(ifaces[2]?.sandbox).toBe(c1.path);
    const ip = firstAddress(res);
    expect(ip).toMatch(/^10\.90\.0\.\d+$/);
    expect(res.routes).toEqual([{ dst: "0.0.0.0/0", gw: "10.90.0.1" }]);
    // The kernel: address and MAC in the container, host veth on the bridge.
    expect(await ifaceAddrs(lab, c1, "eth0")).toEqual([`${ip}/24`]);
    const eth0 = (await links(lab, c1)).find((l) => l.ifname === "eth0");
    expect(eth0?.address).toBe(ifaces[2]?.mac);
    const hostVeth = (await links(lab, h)).find((l) => l.ifname === ifaces[1]?.name);
    expect(hostVeth?.master).toBe(frontBridge);
    const route = JSON.parse((await c1.exec(["ip", "-j", "route", "show", "default"])).stdout) as { gateway: string; dev: string }[];
    expect(route[0]).toMatchObject({ gateway: "10.90.0.1", dev: "eth0" });

    // A knit sandbox on the same network and the CNI container reach each other.
    await h.knitOk(["run", "-d", "--name", "sb1", "--network", FRONT, "--", "sleep", "600"]);
    const sbIp = ((JSON.parse((await h.knitOk(["inspect", "sb1"])).stdout) as { NetworkSettings: { Networks: Record<string, { IPAddress: string }> } }[])[0]?.NetworkSettings.Networks[FRONT]?.IPAddress) ?? "";
    expect(await c1.ping(sbIp)).toBe(true);
    expect((await h.knit(["exec", "sb1", "--", "ping", "-c1", "-W1", ip])).code).toBe(0);
    // Both show in `knit network inspect`, the container under its runtime's name.
    const view = JSON.parse((await h.knitOk(["network", "inspect", FRONT])).stdout) as { Containers: Record<string, { Name: string; IPv4Address: string }> }[];
    const names = Object.values(view[0]?.Containers ?? {}).map((c) => `${c.Name} ${c.IPv4Address}`).sort();
    expect(names).toEqual([`sb1 ${sbIp}/24`, `web ${ip}/24`].sort());

    await rt.check(list, { containerId: "ctr1", netns: c1.path, ifname: "eth0" });
    // CHECK notices what is missing: remove the address behind knit's back.
    await c1.exec(["ip", "addr", "flush", "dev", "eth0"]);
    const err = await rt.check(list, { containerId: "ctr1", netns: c1.path, ifname: "eth0" }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(CniCallError);
    expect((err as CniCallError).code).toBe(104);
    expect((err as CniCallError).details).toContain("missing");

    await rt.del(list, { containerId: "ctr1", netns: c1.path, ifname: "eth0" });
    await h.knitOk(["rm", "-f", "sb1"]);
    await expectNoAttachments();
    expect((await links(lab, c1)).map((l) => l.ifname)).toEqual(["lo"]);
  });

  test("DEL is idempotent: repeated, without prevResult, without a netns, after the netns is gone", async () => {
    const c2 = await container(lab, "c2");
    const list = knitList("front-cni", { network: FRONT });
    const att = { containerId: "ctr2", netns: c2.path, ifname: "eth0" };
    await rt.add(list, att);
    await c2.exec(["true"]);
    await lab.run(["ip", "netns", "delete", c2.name]);
    await rt.del(list, att); // netns gone
    await rt.del(list, att); // again, no cached result: no prevResult
    await rt.del(list, { ...att, netns: "" }); // no CNI_NETNS at all
    await expectNoAttachments();
  });
});

describe("result formats", () => {
  for (const version of ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]) {
    test(`cniVersion ${version}: the result in that version's shape; CHECK and DEL take it back as prevResult`, async () => {
      const c = await container(lab, `v${version.replace(/\./g, "")}`);
      const list = knitList("front-cni", { network: FRONT }, version);
      const att = { containerId: `ver-${version}`, netns: c.path, ifname: "eth0" };
      const res = await rt.add(list, att);
      expect(res.cniVersion).toBe(version);
      if (version === "0.1.0" || version === "0.2.0") {
        const ip4 = res.ip4 as { ip: string; gateway: string; routes: unknown[] };
        expect(ip4.ip).toMatch(/^10\.90\.0\.\d+\/24$/);
        expect([ip4.gateway, ip4.routes]).toEqual(["10.90.0.1", [{ dst: "0.0.0.0/0", gw: "10.90.0.1" }]]);
        expect(res.interfaces).toBeUndefined();
      } else {
        const ips = res.ips as Record<string, unknown>[];
        const ifaces = res.interfaces as Record<string, unknown>[];
        expect(ips[0]?.interface).toBe(2);
        if (version.startsWith("0.")) expect(ips[0]?.version).toBe("4");
        else expect(ips[0]).not.toHaveProperty("version");
        if (version === "1.1.0") expect(ifaces[0]?.mtu).toBe(1500);
        else expect(ifaces[0]).not.toHaveProperty("mtu");
      }
      expect(res.dns).toBeDefined();
      await rt.check(list, att); // libcni skips it before 0.4.0
      if (version === "0.3.1") {
        const err = await failure(rt.call("knit", "CHECK", { ...list.plugins[0], name: list.name, cniVersion: version }, att));
        expect([err.code, err.msg]).toEqual([1, "config version does not allow CHECK"]);
      }
      if (version === "1.0.0") {
        for (const cmd of ["STATUS", "GC"]) {
          const err = await failure(rt.call("knit", cmd, { ...list.plugins[0], name: list.name, cniVersion: version, "cni.dev/valid-attachments": [] }, undefined));
          expect(err.code).toBe(1);
        }
      }
      await rt.del(list, att);
      await expectNoAttachments();
    });
  }
});

describe("networks from a conflist", () => {
  test("a network the conflist describes is created on first ADD: bridge, mtu, ipMasq, ranges, routes", async () => {
    const ipam = {
      type: "knit-ipam",
      ranges: [[{ subnet: "10.91.0.0/24", rangeStart: "10.91.0.128", rangeEnd: "10.91.0.255", gateway: "10.91.0.1" }]],
      routes: [{ dst: "0.0.0.0/0" }, { dst: "10.200.0.0/16", gw: "10.91.0.254" }],
    };
    const list = knitList("auto1", { bridge: "cniauto0", ipMasq: true, mtu: 1400, ipam });
    const [ca, cb] = [await container(lab, "auto-a"), await container(lab, "auto-b")];
    // Two first ADDs at once: one creates the network, the other waits for it.
    const [ra, rb] = await Promise.all([
      rt.add(list, { containerId: "auto-a", netns: ca.path, ifname: "eth0" }),
      rt.add(list, { containerId: "auto-b", netns: cb.path, ifname: "eth0" }),
    ]);
    for (const r of [ra, rb]) expect(firstAddress(r)).toMatch(/^10\.91\.0\.(12[89]|1[3-9]\d|2\d\d)$/);
    expect(firstAddress(ra)).not.toBe(firstAddress(rb));
    expect(ra.routes).toEqual([{ dst: "0.0.0.0/0", gw: "10.91.0.1" }, { dst: "10.200.0.0/16", gw: "10.91.0.254" }]);
    const net = (JSON.parse((await h.knitOk(["network", "inspect", "auto1"])).stdout) as { Labels: Record<string, string>; IPAM: { Config: unknown[] } }[])[0];
    expect(net?.Labels["knit.cni.implicit"]).toBe("true");
    expect(net?.IPAM.Config).toEqual([{ Subnet: "10.91.0.0/24", IPRange: "10.91.0.128/25", Gateway: "10.91.0.1" }]);
    const bridge = (await links(lab, h)).find((l) => l.ifname === "cniauto0");
    expect(bridge?.mtu).toBe(1400);
    expect((await links(lab, ca)).find((l) => l.ifname === "eth0")?.mtu).toBe(1400);
    const routes = (await ca.exec(["ip", "route", "show", "10.200.0.0/16"])).stdout;
    expect(routes).toContain("via 10.91.0.254 dev eth0");
    const nft = (await h.exec(["nft", "list", "table", "inet", "knit"])).stdout;
    expect(nft).toMatch(/ip saddr 10\.91\.0\.0\/24 oifname != "cniauto0" masquerade/);
    expect(await ca.ping(firstAddress(rb))).toBe(true);
    await rt.del(list, { containerId: "auto-a", netns: ca.path, ifname: "eth0" });
    await rt.del(list, { containerId: "auto-b", netns: cb.path, ifname: "eth0" });
    await expectNoAttachments();
    // The network stays (as the reference bridge's device does) until knit network rm.
    await h.knitOk(["network", "rm", "auto1"]);
    expect((await links(lab, h)).some((l) => l.ifname === "cniauto0")).toBe(false);
  });

  test("what a conflist says about an existing network must match it; unsupported fields are named", async () => {
    const c = await container(lab, "mismatch");
    const att = { containerId: "mm", netns: c.path, ifname: "eth0" };
    const cases: [Record<string, unknown>, number, RegExp][] = [
      [{ network: FRONT, ipam: { type: "knit-ipam", ranges: [[{ subnet: "10.99.0.0/24" }]] } }, 7, /subnet 10\.99\.0\.0\/24 does not match/],
      [{ network: FRONT, bridge: "other0" }, 7, /bridge other0 does not match/],
      [{ network: "nosuchnet" }, 7, /"nosuchnet" does not exist/],
      [{ isGateway: false, ipam: { type: "knit-ipam", ranges: [[{ subnet: "10.93.0.0/24" }]] } }, 2, /isGateway=false/],
      [{ ipam: { type: "knit-ipam", ranges: [[{ subnet: "10.93.0.0/24", rangeStart: "10.93.0.10", rangeEnd: "10.93.0.20" }]] } }, 7, /not a CIDR block/],
      [{ driver: "nosuchdriver" }, 7, /unknown driver "nosuchdriver"/],
    ];
    for (const [extra, code, msg] of cases) {
      const err = await failure(rt.add(knitList("mismatch", extra), att));
      expect(err.code).toBe(code);
      expect(`${err.msg} ${err.details}`).toMatch(msg);
      await rt.del(knitList("mismatch", extra), att);
    }
    await expectNoAttachments();
    expect((await h.knitOk(["network", "ls", "--format", "{{.Name}}"])).stdout.split("\n").sort()).toEqual(["", "bridge", FRONT, "host", "none"]);
  });
});

describe("what the runtime asks for", () => {
  test("static addresses and MAC from runtimeConfig, args and CNI_ARGS; conflicts and bad args leave nothing", async () => {
    const list = knitList("front-cni", { network: FRONT });
    const c = await container(lab, "static1");
    const att = { containerId: "st1", netns: c.path, ifname: "net1", capabilityArgs: { ips: ["10.90.0.77/24"], mac: "0a:58:0a:5a:00:4d" } };
    const res = await rt.add(list, att);
    expect(firstAddress(res)).toBe("10.90.0.77");
    expect(await ifaceAddrs(lab, c, "net1")).toEqual(["10.90.0.77/24"]);
    expect((await links(lab, c)).find((l) => l.ifname === "net1")?.address).toBe("0a:58:0a:5a:00:4d");

    // The same address for another container: taken (code 100), and that ADD leaves nothing.
    const c2 = await container(lab, "static2");
    const err = await failure(rt.add(list, { containerId: "st2", netns: c2.path, ifname: "eth0", capabilityArgs: { ips: ["10.90.0.77"] } }));
    expect(err.code).toBe(100);
    expect(err.msg).toContain("already in use");
    expect((await links(lab, c2)).map((l) => l.ifname)).toEqual(["lo"]);
    await rt.del(list, { containerId: "st2", netns: c2.path, ifname: "eth0" });

    // CNI_ARGS IP= and MAC= (with IgnoreUnknown, other keys pass); args.cni.ips.
    const r2 = await rt.add(list, { containerId: "st2", netns: c2.path, ifname: "eth0", args: [["IgnoreUnknown", "1"], ["FOO", "bar"], ["IP", "10.90.0.78"], ["MAC", "0a:58:0a:5a:00:4e"]] });
    expect(firstAddress(r2)).toBe("10.90.0.78");
    expect((await links(lab, c2)).find((l) => l.ifname === "eth0")?.address).toBe("0a:58:0a:5a:00:4e");
    const c3 = await container(lab, "static3");
    const r3 = await rt.add(knitList("front-cni", { network: FRONT, args: { cni: { ips: ["10.90.0.79"] } } }), { containerId: "st3", netns: c3.path, ifname: "eth0" });
    expect(firstAddress(r3)).toBe("10.90.0.79");

    // An interface of that name already in the container: code 100, and nothing else changes.
    await c2.exec(["ip", "link", "add", "eth7", "type", "veth", "peer", "name", "peer7"]);
    const exists = await failure(rt.add(list, { containerId: "st5", netns: c2.path, ifname: "eth7" }));
    expect([exists.code, exists.msg]).toEqual([100, `interface eth7 already exists in ${c2.path}`]);
    await rt.del(list, { containerId: "st5", netns: c2.path, ifname: "eth7" });
    await c2.exec(["ip", "link", "del", "eth7"]);

    // Unknown CNI_ARGS keys without IgnoreUnknown: code 4, naming them.
    const c4 = await container(lab, "static4");
    const bad = await failure(rt.add(list, { containerId: "st4", netns: c4.path, ifname: "eth0", args: [["FOO", "bar"]] }));
    expect([bad.code, bad.msg]).toEqual([4, 'CNI_ARGS: unknown args ["FOO"]']);
    const outside = await failure(rt.add(list, { containerId: "st4", netns: c4.path, ifname: "eth0", capabilityArgs: { ips: ["10.1.2.3"] } }));
    expect(outside.code).toBe(7);
    for (const [id, ns] of [["st1", c], ["st2", c2], ["st4", c4]] as const) await rt.del(list, { containerId: id, netns: ns.path, ifname: id === "st1" ? "net1" : "eth0" });
    await rt.del(knitList("front-cni", { network: FRONT, args: { cni: { ips: ["10.90.0.79"] } } }), { containerId: "st3", netns: c3.path, ifname: "eth0" });
    await expectNoAttachments();
  });

  test("bandwidth becomes tc: tbf on the host veth towards the container, ifb + tbf from it; CHECK sees it; DEL removes the ifb", async () => {
    const list = knitList("front-cni", { network: FRONT });
    const c = await container(lab, "bw");
    const bandwidth = { ingressRate: 8_000_000, ingressBurst: 800_000, egressRate: 4_000_000, egressBurst: 400_000 };
    const att = { containerId: "bw1", netns: c.path, ifname: "eth0", capabilityArgs: { bandwidth } };
    const res = await rt.add(list, att);
    const veth = (res.interfaces as { name: string }[])[1]?.name ?? "";
    type Q = { kind: string; root?: boolean; options?: { rate?: number; burst?: number } };
    const qdiscs = async (dev: string): Promise<Q[]> => JSON.parse((await h.exec(["tc", "-j", "qdisc", "show", "dev", dev])).stdout) as Q[];
    const root = (await qdiscs(veth)).find((q) => q.root);
    expect(root).toMatchObject({ kind: "tbf", options: { rate: 1_000_000, burst: 100_000 } });
    expect((await qdiscs(veth)).some((q) => q.kind === "ingress")).toBe(true);
    const ifb = (await links(lab, h)).find((l) => l.ifname.startsWith("kb"));
    expect(ifb).toBeDefined();
    expect((await qdiscs(ifb?.ifname ?? "")).find((q) => q.root)).toMatchObject({ kind: "tbf", options: { rate: 500_000 } });
    expect(await c.ping("10.90.0.1")).toBe(true);
    await rt.check(list, att);
    await h.exec(["tc", "qdisc", "del", "dev", veth, "root"]);
    const err = await failure(rt.check(list, att));
    expect(err.code).toBe(104);
    const half = await failure(rt.add(list, { containerId: "bw2", netns: c.path, ifname: "eth1", capabilityArgs: { bandwidth: { ingressRate: 1000 } } }));
    expect(half.code).toBe(7);
    await rt.del(list, { containerId: "bw2", netns: c.path, ifname: "eth1" });
    await rt.del(list, att);
    await expectNoAttachments();
  });
});

describe("published ports (knit-portmap)", () => {
  test("portMappings publish a container port on the host's addresses, reachable from the LAN; DEL unpublishes", async () => {
    const list = knitList("front-cni", { network: FRONT }, "1.1.0", [{ type: "knit-portmap", capabilities: { portMappings: true } }]);
    const c = await container(lab, "pm1");
    const att = { containerId: "pm1", netns: c.path, ifname: "eth0", capabilityArgs: { portMappings: [{ hostPort: 8080, containerPort: 80, protocol: "tcp" }] } };
    const res = await rt.add(list, att);
    // A chained plugin passes the result on.
    expect(firstAddress(res)).toMatch(/^10\.90\.0\./);
    await lab.httpServer(c, 80, "hello from pm1");
    expect(await lab.httpGet(client, "http://192.168.60.2:8080/")).toBe("hello from pm1");
    const nft = (await h.exec(["nft", "list", "chain", "inet", "knit", "published"])).stdout;
    expect(nft).toContain(`tcp dport 8080 dnat ip to ${firstAddress(res)}:80`);
    await rt.check(list, att);
    // The same host port for another container is refused, and that ADD leaves nothing behind.
    const c2 = await container(lab, "pm2");
    const att2 = { ...att, containerId: "pm2", netns: c2.path };
    const err = await failure(rt.add(list, att2));
    expect(err.code).toBe(100);
    expect(err.msg).toContain("8080");
    await rt.del(list, att2);
    await rt.del(list, att);
    expect(await lab.httpGet(client, "http://192.168.60.2:8080/", 1)).toBeUndefined();
    expect((await h.exec(["nft", "list", "table", "inet", "knit"])).stdout).not.toContain("dport 8080");
    expect(Object.keys(await storeKeys(h, "ports/"))).toEqual([]);
    await expectNoAttachments();
  });
});

describe("DNS through the agent", () => {
  test("CNI containers and knit sandboxes resolve each other's names; the agent starts with the first and stops after the last", async () => {
    // This test is about the agent an ADD starts on demand: none may run before it.
    if (agentMode) await stopCniAgent(h);
    const auto = runtimeOn(lab, h, [binDir], { KNIT_AGENT_AUTOSTART: "1" }, { checkPath: false });
    const log = join(h.stateDir, "agent.log");
    const logBefore = existsSync(log) ? readFileSync(log, "utf8").length : 0;
    const list = knitList("front-cni", { network: FRONT });
    const c = await container(lab, "dns1");
    const dns = { servers: ["192.0.2.53"], searches: ["example.test"], options: ["ndots:2"] };
    const att = { containerId: "dns1", netns: c.path, ifname: "eth0", args: [["IgnoreUnknown", "1"], ["K8S_POD_NAME", "alpha"]] as [string, string][], capabilityArgs: { aliases: { "front-cni": ["alias-a"] }, dns } };
    try {
      const res = await auto.add(list, att);
      // knit's DNS answers on the gateway; runtimeConfig.dns servers become its upstreams for this container.
      expect(res.dns).toEqual({ nameservers: ["10.90.0.1"], search: ["example.test"], options: ["ndots:2"] });
      const view = (JSON.parse((await h.knitOk(["inspect", "alpha"])).stdout) as { HostConfig: { Dns: string[]; DnsSearch: string[] } }[])[0];
      expect(view?.HostConfig).toMatchObject({ Dns: ["192.0.2.53"], DnsSearch: ["example.test"] });
      expect((await h.knit(["agent", "status"])).code).toBe(0);
      await h.knitOk(["run", "-d", "--name", "beta", "--network", FRONT, "--", "sleep", "600"]);
      const dig = async (node: { path: string }, name: string): Promise<string> => (await lab.exec(node, ["dig", "+short", "+time=2", "@10.90.0.1", name], { check: false })).stdout.trim();
      const beta = (JSON.parse((await h.knitOk(["inspect", "beta"])).stdout) as { NetworkSettings: { Networks: Record<string, { IPAddress: string }> } }[])[0]?.NetworkSettings.Networks[FRONT]?.IPAddress;
      expect(await dig(c, "beta")).toBe(beta ?? "no address");
      expect((await h.knitOk(["exec", "beta", "--", "dig", "+short", "+time=2", "@10.90.0.1", "alpha"])).stdout.trim()).toBe(firstAddress(res));
      expect((await h.knitOk(["exec", "beta", "--", "dig", "+short", "+time=2", "@10.90.0.1", "alias-a"])).stdout.trim()).toBe(firstAddress(res));
      await h.knitOk(["rm", "-f", "beta"]);
      // The plugin hands this DEL to the agent the first ADD started.
      await auto.del(list, att);
      // The last container that needed it is gone: the auto-started agent stops, by itself
      // once it has answered the DEL.
      const deadline = Date.now() + 10_000;
      while ((await h.knit(["agent", "status"])).code === 0 && Date.now() < deadline) await Bun.sleep(100);
      expect((await h.knit(["agent", "status"])).code).toBe(1);
      expect(readFileSync(log, "utf8").slice(logBefore)).toContain('"msg":"stopping","signal":"idle"');
    } finally {
      await auto.delAll();
      await h.knit(["rm", "-f", "beta"]);
      await h.knit(["agent", "stop"]);
      if (agentMode) await startCniAgent(h);
    }
    await expectNoAttachments();
  });
});

describe("failures, crashes and GC", () => {
  test("a failure after IPAM (or after wiring, or shaping) leaves no address, link or record", async () => {
    const list = knitList("front-cni", { network: FRONT });
    const c = await container(lab, "fail1");
    for (const point of ["connect:after-claim", "connect:after-kernel", "cni-add:after-connect", "cni-add:after-shaping"]) {
      const failing = runtimeOn(lab, h, [binDir], { KNIT_FAIL_AT: point });
      const att = { containerId: "fail1", netns: c.path, ifname: "eth0", capabilityArgs: { bandwidth: { egressRate: 1_000_000, egressBurst: 100_000 } } };
      const err = await failure(failing.add(list, att));
      expect(err.msg).toContain(`injected failure at ${point}`);
      await expectNoAttachments();
      expect((await links(lab, c)).map((l) => l.ifname)).toEqual(["lo"]);
      await failing.del(list, att); // the runtime's DEL after a failed ADD
    }
  });

  test("a plugin killed in the middle of ADD, and containers the runtime lost, are cleaned up by GC", async () => {
    const list = knitList("front-cni", { network: FRONT });
    const [c1, c2, c3] = [await container(lab, "gc1"), await container(lab, "gc2"), await container(lab, "gc3")];
    const crashing = runtimeOn(lab, h, [binDir], { KNIT_CRASH_AT: "cni-add:after-connect" });
    const err = await failure(crashing.add(list, { containerId: "gc1", netns: c1.path, ifname: "eth0" }));
    expect(err.code).toBe(-1); // killed: no error JSON at all
    expect(await endpointClaims(h)).toHaveLength(1);
    await rt.add(list, { containerId: "gc2", netns: c2.path, ifname: "eth0" });
    const keep = await rt.add(list, { containerId: "gc3", netns: c3.path, ifname: "eth0" });
    // The runtime rebooted: it knows only gc3 now (and never saw gc1's result).
    rt.forget(list, { containerId: "gc2", netns: c2.path, ifname: "eth0" });
    const errors = await rt.gc(list, [{ containerID: "gc3", ifname: "eth0" }]);
    expect(errors).toEqual([]);
    expect(Object.values(await storeKeys(h, "sandboxes/")).map((v) => (JSON.parse(v) as { labels: Record<string, string> }).labels["knit.cni.container-id"])).toEqual(["gc3"]);
    expect(await endpointClaims(h)).toHaveLength(1);
    expect((await links(lab, c1)).map((l) => l.ifname)).toEqual(["lo"]);
    expect((await links(lab, c2)).map((l) => l.ifname)).toEqual(["lo"]);
    expect(await c3.ping("10.90.0.1")).toBe(true);
    expect(firstAddress(keep)).toMatch(/^10\.90\.0\./);
    await rt.del(list, { containerId: "gc3", netns: c3.path, ifname: "eth0" });
    await expectNoAttachments();
  });

  test("GC without the list of valid attachments is refused (it would remove everything)", async () => {
    const list = knitList("front-cni", { network: FRONT });
    const err = await failure(rt.call("knit", "GC", { ...list.plugins[0], name: list.name, cniVersion: "1.1.0" }, undefined));
    expect(err.code).toBe(7);
  });
});

describe("concurrency and status", () => {
  test("concurrent ADDs for different containers get distinct addresses and all work; concurrent DELs clean up", async () => {
    const list = knitList("front-cni", { network: FRONT });
    const nodes = await Promise.all(Array.from({ length: 16 }, (_, i) => container(lab, `par${i}`)));
    const atts = nodes.map((n, i) => ({ containerId: `par${i}`, netns: n.path, ifname: "eth0" }));
    const results = await Promise.all(atts.map((a) => rt.add(list, a)));
    const ips = results.map(firstAddress);
    expect(new Set(ips).size).toBe(16);
    for (const n of nodes.slice(0, 4)) expect(await n.ping(ips[15] ?? "")).toBe(true);
    await Promise.all(atts.map((a) => rt.del(list, a)));
    await expectNoAttachments();
  });

  test("STATUS: ready; not available when the network is full or missing", async () => {
    await rt.status(knitList("front-cni", { network: FRONT }));
    await h.knitOk(["network", "create", "--subnet", "10.92.0.0/29", "tiny"]);
    const tiny = knitList("tiny-cni", { network: "tiny" });
    const nodes = await Promise.all(Array.from({ length: 5 }, (_, i) => container(lab, `tiny${i}`)));
    try {
      for (const [i, n] of nodes.entries()) await rt.add(tiny, { containerId: `tiny${i}`, netns: n.path, ifname: "eth0" });
      const full = await failure(rt.status(tiny));
      expect([full.code, full.msg]).toEqual([50, "knit network tiny has no free IPv4 addresses"]);
      await rt.del(tiny, { containerId: "tiny0", netns: nodes[0]?.path ?? "", ifname: "eth0" });
      await rt.status(tiny);
      const missing = await failure(rt.status(knitList("x", { network: "nosuch" })));
      expect(missing.code).toBe(50);
    } finally {
      await rt.delAll();
      await h.knit(["network", "rm", "tiny"]);
    }
  });
});

describe("delegated IPAM and other drivers", () => {
  test("ipam.type host-local: the knit plugin runs it and claims its address in knit's store", async () => {
    // Debian's reference plugins (1.1.1) speak up to 1.0.0.
    const rtRef = runtimeOn(lab, h, [binDir, "/usr/lib/cni"]);
    const dataDir = join(lab.dir, "_host-local");
    const list = knitList("front-hl", { network: FRONT, ipam: { type: "host-local", dataDir, ranges: [[{ subnet: "10.90.0.0/24", rangeStart: "10.90.0.200", rangeEnd: "10.90.0.210" }]] } }, "1.0.0");
    const c = await container(lab, "hl1");
    const att = { containerId: "hl1", netns: c.path, ifname: "eth0" };
    const res = await rtRef.add(list, att);
    expect(firstAddress(res)).toBe("10.90.0.200");
    const front = (JSON.parse((await h.knitOk(["network", "inspect", FRONT])).stdout) as { Id: string }[])[0]?.Id ?? "";
    expect(Object.keys(await storeKeys(h, `ipam/${front}/10.90.0.200`))).toHaveLength(1);
    expect((await lab.run(["ls", join(dataDir, "front-hl")])).stdout).toContain("10.90.0.200");
    await rtRef.check(list, att);
    await rtRef.del(list, att);
    expect((await lab.run(["ls", join(dataDir, "front-hl")])).stdout).not.toContain("10.90.0.200");
    await expectNoAttachments();
  });

  test("a macvlan network from a conflist: the container is a machine on the LAN", async () => {
    const list = knitList("mvnet", {
      driver: "macvlan",
      master: "eth0",
      ipam: { type: "knit-ipam", ranges: [[{ subnet: "192.168.60.0/24", rangeStart: "192.168.60.128", rangeEnd: "192.168.60.191", gateway: "192.168.60.1" }]] },
    });
    const c = await container(lab, "mv1");
    const att = { containerId: "mv1", netns: c.path, ifname: "eth0", capabilityArgs: { bandwidth: { ingressRate: 8_000_000, ingressBurst: 800_000 } } };
    try {
      const res = await rt.add(list, att);
      expect((res.interfaces as { name: string }[]).map((i) => i.name)).toEqual(["eth0"]);
      const ip = firstAddress(res);
      expect(ip).toBe("192.168.60.128");
      expect((await links(lab, c)).find((l) => l.ifname === "eth0")).toMatchObject({ linkinfo: { info_kind: "macvlan" } });
      expect(await client.ping(ip)).toBe(true);
      await rt.check(list, att);
      await rt.del(list, att);
      expect((await links(lab, c)).map((l) => l.ifname)).toEqual(["lo"]);
    } finally {
      await rt.delAll();
      await h.knit(["network", "rm", "mvnet"]);
    }
    await expectNoAttachments();
  });
});

describe("dual stack", () => {
  test("an IPv6 network: both addresses, both default routes, IPv6 reachable", async () => {
    await h.knitOk(["network", "create", "--ipv6", "--subnet", "10.89.0.0/24", "--subnet", "fd00:89::/64", "dual"]);
    const c = await container(lab, "dual1");
    const list = knitList("dual-cni", { network: "dual" });
    const att = { containerId: "dual1", netns: c.path, ifname: "eth0", capabilityArgs: { ips: ["fd00:89::99"] } };
    try {
      const res = await rt.add(list, att);
      const ips = (res.ips as { address: string; gateway?: string }[]).map((i) => `${i.address} ${i.gateway ?? ""}`);
      expect(ips).toHaveLength(2);
      expect(ips[0]).toMatch(/^10\.89\.0\.\d+\/24 10\.89\.0\.1$/);
      expect(ips[1]).toBe("fd00:89::99/64 fd00:89::1");
      expect(res.routes).toEqual([{ dst: "0.0.0.0/0", gw: "10.89.0.1" }, { dst: "::/0", gw: "fd00:89::1" }]);
      expect(await ifaceAddrs(lab, c, "eth0")).toContain("fd00:89::99/64");
      expect(await c.ping("fd00:89::1")).toBe(true);
      await rt.check(list, att);
      await rt.del(list, att);
    } finally {
      await rt.delAll();
      await h.knit(["network", "rm", "dual"]);
    }
    await expectNoAttachments();
  });
});

describe("the host is clean", () => {
  test("after everything: no CNI links, records, claims or firewall rules of removed networks", async () => {
    await expectNoAttachments();
    await h.knitOk(["network", "rm", FRONT]);
    await assertHostClean(h, { allowProcesses: false });
    await h.knitOk(["network", "create", "--subnet", "10.90.0.0/24", FRONT]);
  });
});
