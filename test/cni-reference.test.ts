/**
 * knit's plugins in chains with the Go reference plugins (Debian's containernetworking-
 * plugins 1.1.1 in /usr/lib/cni, which speak CNI up to 1.0.0), driven exactly as libcni
 * drives them:
 *
 *   - knit, then the reference portmap, tuning and bandwidth;
 *   - the reference bridge with knit-ipam handing out the addresses of a knit network;
 *   - what libcni sends (environment, stdin, prevResult, reverse DEL), as recorded.
 *
 *   lan ─┬─ h       knit host 192.168.61.2 (plugins run in its namespace)
 *        └─ client  192.168.61.10
 */
import { afterAll, afterEach, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { Lab, type LabHost, type LabNode } from "../src/lab/lab.ts";
import { assertHostClean } from "./leaks.ts";
import { CniCallError, CniRuntime, type ConfList } from "./cni-libcni.ts";
import { REFERENCE_DIR, container, endpointClaims, firstAddress, ifaceAddrs, installCni, links, runtimeOn, storeKeys } from "./cni-lab.ts";

setDefaultTimeout(120_000);

let lab: Lab;
let h: LabHost;
let client: LabNode;
let rt: CniRuntime;

beforeAll(async () => {
  lab = await Lab.create("cnir");
  const lan = await lab.lan("lan");
  h = await lab.host("h");
  client = await lab.ns("client");
  await lab.plug(h, lan, { addresses: ["192.168.61.2/24"] });
  await lab.plug(client, lan, { addresses: ["192.168.61.10/24"] });
  const binDir = await installCni(lab, h);
  rt = runtimeOn(lab, h, [binDir, REFERENCE_DIR]);
  await h.knitOk(["network", "create", "--subnet", "10.95.0.0/24", "-o", "com.docker.network.bridge.name=kshared", "shared"]);
});

afterEach(async () => {
  await rt.delAll();
});

afterAll(async () => {
  await h?.knit(["rm", "-f", "sbx"]);
  await h?.knit(["network", "rm", "shared"]);
  // The reference portmap leaves its top-level iptables chains (as it always does); they
  // live in the lab host's namespace and go with it.
  await lab?.cleanup();
});

describe("knit followed by reference plugins", () => {
  test("knit → portmap → tuning → bandwidth: published port, sysctl and MAC, shaping; CHECK; reverse DEL", async () => {
    const list: ConfList = {
      cniVersion: "1.0.0",
      name: "refchain",
      plugins: [
        { type: "knit", network: "shared" },
        { type: "portmap", capabilities: { portMappings: true } },
        { type: "tuning", capabilities: { mac: true }, sysctl: { "net.ipv4.conf.eth0.arp_announce": "2" } },
        { type: "bandwidth", capabilities: { bandwidth: true } },
      ],
    };
    const c = await container(lab, "ref1");
    const att = {
      containerId: "ref1",
      netns: c.path,
      ifname: "eth0",
      capabilityArgs: {
        portMappings: [{ hostPort: 9090, containerPort: 80, protocol: "tcp" }],
        mac: "0a:58:0a:5f:00:63",
        bandwidth: { ingressRate: 8_000_000, ingressBurst: 800_000, egressRate: 8_000_000, egressBurst: 800_000 },
      },
    };
    const res = await rt.add(list, att);
    const ip = firstAddress(res);
    expect(ip).toMatch(/^10\.95\.0\./);
    // portmap: reachable from the LAN through the host's address.
    await lab.httpServer(c, 80, "behind reference portmap");
    expect(await lab.httpGet(client, "http://192.168.61.2:9090/")).toBe("behind reference portmap");
    // tuning: the sysctl and the MAC in the container, and in the result.
    expect((await c.exec(["sysctl", "-n", "net.ipv4.conf.eth0.arp_announce"])).stdout.trim()).toBe("2");
    expect((await links(lab, c)).find((l) => l.ifname === "eth0")?.address).toBe("0a:58:0a:5f:00:63");
    const ifaces = res.interfaces as { name: string; mac?: string; sandbox?: string }[];
    expect(ifaces.find((i) => i.sandbox)?.mac).toBe("0a:58:0a:5f:00:63");
    // bandwidth: found knit's host veth in prevResult and shaped it.
    const veth = ifaces[1]?.name ?? "";
    const qdisc = JSON.parse((await h.exec(["tc", "-j", "qdisc", "show", "dev", veth])).stdout) as { kind: string; root?: boolean }[];
    expect(qdisc.find((q) => q.root)?.kind).toBe("tbf");
    // CHECK as libcni sends it, except to portmap: Debian's portmap 1.1.1 checks its ip6tables
    // chain even for an IPv4-only container and fails (fixed upstream after 1.1.1).
    const cached = rt.cache.get(`refchain/ref1/eth0`)?.result;
    for (const plugin of list.plugins.filter((p) => p.type !== "portmap")) {
      await rt.call(String(plugin.type), "CHECK", CniRuntime.pluginConfig(list, plugin, cached, att), att);
    }
    await rt.del(list, att);
    expect(await lab.httpGet(client, "http://192.168.61.2:9090/", 1)).toBeUndefined();
    expect((await links(lab, h)).filter((l) => /^(veth|bwp|kb)/.test(l.ifname)).map((l) => l.ifname)).toEqual([]);
    expect(await endpointClaims(h)).toEqual([]);
  });
});

describe("the reference bridge with knit-ipam", () => {
  test("addresses come from the knit network, never colliding with knit sandboxes; inspect and traffic show one network", async () => {
    const list: ConfList = {
      cniVersion: "1.0.0",
      name: "refbridge",
      plugins: [{ type: "bridge", bridge: "kshared", isGateway: true, ipam: { type: "knit-ipam", network: "shared", routes: [{ dst: "0.0.0.0/0" }] } }],
    };
    await h.knitOk(["run", "-d", "--name", "sbx", "--network", "shared", "--ip", "10.95.0.2", "--", "sleep", "600"]);
    const nodes = [await container(lab, "rb1"), await container(lab, "rb2")];
    const atts = nodes.map((n, i) => ({ containerId: `rb${i}`, netns: n.path, ifname: "eth0", args: [["IgnoreUnknown", "1"], ["K8S_POD_NAME", `refpod${i}`]] as [string, string][] }));
    const results = [];
    for (const a of atts) results.push(await rt.add(list, a));
    const ips = results.map(firstAddress);
    // knit's IPAM skipped the gateway and the sandbox's address.
    expect(ips.every((ip) => /^10\.95\.0\.\d+$/.test(ip) && ip !== "10.95.0.1" && ip !== "10.95.0.2")).toBe(true);
    expect(new Set(ips).size).toBe(2);
    expect(await ifaceAddrs(lab, nodes[0] as LabNode, "eth0")).toEqual([`${ips[0]}/24`]);
    // The reference bridge plugged into knit's bridge: the sandbox and the containers talk.
    expect(await (nodes[0] as LabNode).ping("10.95.0.2")).toBe(true);
    expect(await (nodes[1] as LabNode).ping(ips[0] ?? "")).toBe(true);
    const view = JSON.parse((await h.knitOk(["network", "inspect", "shared"])).stdout) as { Containers: Record<string, { Name: string; IPv4Address: string }> }[];
    expect(Object.values(view[0]?.Containers ?? {}).map((v) => v.Name).sort()).toEqual(["refpod0", "refpod1", "sbx"]);
    await rt.check(list, atts[0] as (typeof atts)[0]);

    // The runtime lost refpod1 (crash, reboot): GC through knit-ipam gives its address back.
    rt.forget(list, atts[1] as (typeof atts)[0]);
    const gcConf = { ...list.plugins[0]?.ipam as object, type: "knit-ipam" };
    await rt.call("knit-ipam", "GC", CniRuntime.pluginConfig({ ...list, cniVersion: "1.1.0" }, { ...(list.plugins[0] as object), ipam: gcConf }, undefined, undefined, { "cni.dev/valid-attachments": [{ containerID: "rb0", ifname: "eth0" }] }), undefined);
    expect(Object.values(await storeKeys(h, "ipam/")).filter((v) => v !== "gateway").length).toBe(2); // sbx + rb0
    // After a reboot its namespace (and the reference bridge's veth with it) is gone too.
    await lab.run(["ip", "netns", "delete", (nodes[1] as LabNode).name]);
    await rt.del(list, atts[0] as (typeof atts)[0]);
    await h.knitOk(["rm", "-f", "sbx"]);
    expect(await endpointClaims(h)).toEqual([]);
  });

  test("knit-ipam refuses a network that does not exist (it never creates one behind another plugin)", async () => {
    const list: ConfList = { cniVersion: "1.0.0", name: "nonet", plugins: [{ type: "bridge", bridge: "cni-nonet", ipam: { type: "knit-ipam", ranges: [[{ subnet: "10.96.0.0/24" }]] } }] };
    const c = await container(lab, "nonet");
    const err = await rt.add(list, { containerId: "nonet", netns: c.path, ifname: "eth0" }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(CniCallError);
    expect((err as CniCallError).msg).toContain('knit network "nonet" does not exist');
    await rt.del(list, { containerId: "nonet", netns: c.path, ifname: "eth0" });
    await h.exec(["ip", "link", "del", "cni-nonet"], { check: false });
  });
});

describe("libcni's protocol, as recorded", () => {
  test("env, per-plugin stdin with name/cniVersion/runtimeConfig by capability, chained prevResult, reverse DEL with the cached result", async () => {
    const list: ConfList = {
      cniVersion: "1.0.0",
      name: "proto",
      plugins: [
        { type: "knit", network: "shared", capabilities: { ips: true } },
        { type: "knit-portmap", capabilities: { portMappings: true } },
        { type: "tuning", sysctl: { "net.ipv4.conf.eth0.arp_ignore": "1" } },
      ],
    };
    const c = await container(lab, "proto1");
    const att = { containerId: "proto1", netns: c.path, ifname: "eth0", args: [["IgnoreUnknown", "1"], ["K8S_POD_NAME", "p1"]] as [string, string][], capabilityArgs: { ips: ["10.95.0.50/24"], portMappings: [{ hostPort: 9191, containerPort: 80, protocol: "tcp" }], mac: "0a:58:00:00:00:01" } };
    rt.calls.length = 0;
    const final = await rt.add(list, att);
    await rt.del(list, att);
    const calls = rt.calls.map((c) => `${c.command} ${c.plugin}`);
    expect(calls).toEqual(["ADD knit", "ADD knit-portmap", "ADD tuning", "DEL tuning", "DEL knit-portmap", "DEL knit"]);
    const [a0, a1, a2, d0, , d2] = rt.calls;
    expect(a0?.env).toMatchObject({ CNI_COMMAND: "ADD", CNI_CONTAINERID: "proto1", CNI_NETNS: c.path, CNI_IFNAME: "eth0", CNI_ARGS: "IgnoreUnknown=1;K8S_POD_NAME=p1" });
    expect(a0?.env.CNI_PATH?.split(":")).toHaveLength(2);
    // Only declared capabilities reach a plugin; the first ADD has no prevResult.
    expect(a0?.stdin).toMatchObject({ name: "proto", cniVersion: "1.0.0", runtimeConfig: { ips: ["10.95.0.50/24"] } });
    expect(a0?.stdin).not.toHaveProperty("prevResult");
    expect(a1?.stdin.runtimeConfig).toEqual({ portMappings: [{ hostPort: 9191, containerPort: 80, protocol: "tcp" }] });
    expect(a2?.stdin).not.toHaveProperty("runtimeConfig");
    // Each plugin gets the previous one's output.
    expect(a1?.stdin.prevResult).toEqual(JSON.parse(a0?.stdout ?? "{}"));
    expect(a2?.stdin.prevResult).toEqual(JSON.parse(a1?.stdout ?? "{}"));
    // DEL: reverse order, every plugin with the final ADD result.
    expect(d0?.stdin.prevResult).toEqual(final);
    expect(d2?.stdin.prevResult).toEqual(final);
    expect(firstAddress(final)).toBe("10.95.0.50");
    expect(await endpointClaims(h)).toEqual([]);
  });
});

describe("clean host", () => {
  test("no knit state, link or rule is left", async () => {
    await h.knit(["rm", "-f", "sbx"]);
    await h.knitOk(["network", "rm", "shared"]);
    await assertHostClean(h);
    await h.knitOk(["network", "create", "--subnet", "10.95.0.0/24", "-o", "com.docker.network.bridge.name=kshared", "shared"]);
  });
});
