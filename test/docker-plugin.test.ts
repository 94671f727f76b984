/**
 * knit as Docker's network and IPAM driver (src/plugin), against the real daemon: Debian's
 * dockerd 20.10 inside a lab host, with its own data root, exec root and socket, and a knit
 * agent serving /run/docker/plugins/knit.sock (`knit agent --docker-plugin`).
 *
 *   lan 10.60.0.0/24:  h 10.60.0.10 (eth1)  dockerd + knit agent
 *                      peer 10.60.0.20      another machine on the LAN
 *
 *   h: front  10.61.0.0/24  -d knit --ipam-driver knit     containers c1 (alias al1), c2; sandbox k1
 *      back   10.63.0.0/24  -d knit (Docker's IPAM)        c2 connected later
 *      lan    10.60.0.0/24  -d knit -o knit.driver=macvlan  parent eth1
 *
 * Every check reads the kernel (ip -j, nft -j in the container's own namespace or the host's)
 * or sends real traffic; Docker's own output is checked where it is what users see. The last
 * test removes everything and proves that nothing is left.
 */
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { existsSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { Lab, REPO_ROOT, waitFor, type LabHost, type LabNode, type LabProcess, type NetnsRef } from "../src/lab/lab.ts";
import { type DockerDaemon, dockerMissing, startDocker } from "../src/lab/docker.ts";
import { openSqliteStore } from "../src/store/sqlite.ts";
import { assertHostClean } from "./leaks.ts";

setDefaultTimeout(120_000);

const missing = dockerMissing();
const title = missing ? `knit as Docker's network plugin (skipped: ${missing})` : "knit as Docker's network plugin";

const PLUGIN_DIR = "/run/docker/plugins";
const SOCKET = `${PLUGIN_DIR}/knit.sock`;
const CT = "application/vnd.docker.plugins.v1.2+json";
/** The agent's upstream resolver: knit's stub DNS server on the LAN machine. */
const UPSTREAM = "10.60.0.20";

interface IpLink {
  ifname: string;
  address?: string;
  ifalias?: string;
  master?: string;
  mtu?: number;
  linkinfo?: { info_kind?: string };
  addr_info?: { family: string; local: string; prefixlen: number; scope?: string }[];
}
interface Route {
  dst: string;
  gateway?: string;
  dev?: string;
}
interface KnitNetworkView {
  Id: string;
  Name: string;
  Driver: string;
  Labels: Record<string, string>;
  Containers: Record<string, { Name: string; EndpointID: string; IPv4Address: string }>;
}

/** One raw call to the plugin socket, as dockerd makes it. */
async function call(path: string, body?: unknown, method = "POST"): Promise<{ status: number; type: string | null; json: Record<string, unknown> | undefined; text: string }> {
  const init: RequestInit & { unix: string } = { method, unix: SOCKET, headers: { Accept: CT } };
  if (body !== undefined) init.body = typeof body === "string" ? body : JSON.stringify(body);
  const res = await fetch(`http://plugin${path}`, init);
  const text = await res.text();
  let json: Record<string, unknown> | undefined;
  try {
    json = JSON.parse(text) as Record<string, unknown>;
  } catch {
    json = undefined;
  }
  return { status: res.status, type: res.headers.get("content-type"), json, text };
}

describe.skipIf(missing !== undefined)(title, () => {
  let lab: Lab;
  let h: LabHost;
  let peer: LabNode;
  let d: DockerDaemon;
  let agent: LabProcess;
  let stub: LabProcess;
  let resolvConf = "";
  const ids = { front: "", back: "", lan: "", plain: "" };

  const agentArgs = (): string[] => ["agent", "--docker-plugin", "--docker-host", d.dockerHost, "--log-level", "debug"];

  async function startAgent(): Promise<void> {
    agent = h.spawnKnit(agentArgs(), { env: { KNIT_RESOLV_CONF: resolvConf } });
    if (!(await waitFor(() => existsSync(SOCKET) && existsSync(`${h.stateDir}/agent.pid`), 20_000, 20))) {
      throw new Error(`the agent did not start:\n${agent.output()}`);
    }
  }

  const docker = (args: readonly string[]) => d.dockerOk(args);
  /** The namespace of a running container (its SandboxKey). */
  async function ns(container: string): Promise<NetnsRef> {
    return { path: (await docker(["inspect", "-f", "{{.NetworkSettings.SandboxKey}}", container])).stdout.trim() };
  }
  async function links(node: NetnsRef): Promise<IpLink[]> {
    return JSON.parse((await lab.exec(node, ["ip", "-j", "-d", "addr", "show"])).stdout) as IpLink[];
  }
  async function addrOf(container: string, network: string): Promise<string> {
    return (await docker(["inspect", "-f", `{{(index .NetworkSettings.Networks "${network}").IPAddress}}`, container])).stdout.trim();
  }
  async function knitNetwork(name: string): Promise<KnitNetworkView> {
    const v = (JSON.parse((await h.knitOk(["network", "inspect", name])).stdout) as KnitNetworkView[])[0];
    if (!v) throw new Error(`no knit network ${name}`);
    return v;
  }
  /** Ping from a container ("-4 NAME": options first); the output when a reply came back (it names the address used). */
  async function pingFrom(container: string, target: string): Promise<string | undefined> {
    const r = await d.docker(["exec", container, "ping", "-c1", "-W2", ...target.split(" ")]);
    return r.code === 0 ? r.stdout : undefined;
  }
  async function knitPing(sandbox: string, target: string): Promise<string | undefined> {
    const r = await h.knit(["exec", sandbox, "--", "ping", "-c1", "-W2", target]);
    return r.code === 0 ? r.stdout : undefined;
  }
  async function hostLinks(): Promise<IpLink[]> {
    return JSON.parse((await h.exec(["ip", "-j", "-d", "link", "show"])).stdout) as IpLink[];
  }
  /** The store's keys under a prefix (opened read-only while the agent runs: SQLite WAL). */
  async function storeKeys(prefix: string): Promise<string[]> {
    const store = await openSqliteStore(h.stateDir);
    try {
      return (await store.list(prefix)).items.map((kv) => kv.key);
    } finally {
      await store.close();
    }
  }
  async function flags(dev: string): Promise<string[]> {
    return (JSON.parse((await h.exec(["ip", "-j", "link", "show", dev])).stdout) as { flags: string[] }[])[0]?.flags ?? [];
  }
  /** The DNS redirect's elements, as "bridge source target" (undefined: no table). */
  async function redirects(): Promise<string[] | undefined> {
    const r = await h.exec(["nft", "-j", "list", "table", "inet", "knit_docker"], { check: false });
    if (r.code !== 0) return undefined;
    const doc = JSON.parse(r.stdout) as { nftables: { map?: { name: string; elem?: [{ concat: string[] }, string][] } }[] };
    const out: string[] = [];
    for (const o of doc.nftables) for (const [k, v] of o.map?.elem ?? []) out.push(`${k.concat.join(" ")} ${v}`);
    return out.sort();
  }

  beforeAll(async () => {
    lab = await Lab.create("dkp");
    const lan = await lab.lan("lan");
    h = await lab.host("h");
    peer = await lab.ns("peer");
    await lab.plug(h, lan, { addresses: ["10.60.0.10/24"], ifname: "eth1" });
    await lab.plug(peer, lan, { addresses: ["10.60.0.20/24"] });
    d = await startDocker(h);
    await d.ensureBusyboxImage();
    stub = peer.spawn([process.execPath, join(REPO_ROOT, "src", "dns", "stub-server.ts"), "--listen", UPSTREAM, "--answer", "ext.test=192.0.2.10"]);
    if (!(await waitFor(() => stub.output().includes("ready"), 5000, 20))) throw new Error(`stub DNS did not start: ${stub.output()}`);
    resolvConf = join(lab.dir, "resolv.conf");
    writeFileSync(resolvConf, `nameserver ${UPSTREAM}\n`);
    await startAgent();
  }, 180_000);

  afterAll(async () => {
    await stub.stop();
    await lab.cleanup();
  });

  test("dockerd finds the plugin by name on a root-only socket; one network for both CLIs", async () => {
    const st = statSync(SOCKET);
    expect(st.isSocket()).toBe(true);
    expect(st.mode & 0o777).toBe(0o600);
    expect(st.uid).toBe(0);
    expect(statSync(PLUGIN_DIR).mode & 0o077).toBe(0);

    ids.front = (await docker(["network", "create", "-d", "knit", "--ipam-driver", "knit", "--subnet", "10.61.0.0/24", "front"])).stdout.trim();
    expect(ids.front).toMatch(/^[0-9a-f]{64}$/);
    const dv = JSON.parse((await docker(["network", "inspect", "front"])).stdout) as { Driver: string; IPAM: { Driver: string; Config: { Subnet: string }[] } }[];
    expect(dv[0]?.Driver).toBe("knit");
    expect(dv[0]?.IPAM).toMatchObject({ Driver: "knit", Config: [{ Subnet: "10.61.0.0/24" }] });
    // knit knows it by Docker's id and, once Docker has stored it, by Docker's name.
    expect(await waitFor(async () => (await h.knit(["network", "inspect", "front"])).code === 0, 5000, 20)).toBe(true);
    const kv = await knitNetwork("front");
    expect(kv.Id).toBe(ids.front);
    expect(kv.Driver).toBe("bridge");
    expect((await h.knitOk(["network", "ls", "--format", "{{.ID}} {{.Name}}"])).stdout).toContain(`${ids.front.slice(0, 12)} front`);
    // The kernel: knit's bridge with the gateway Docker's IPAM request gave.
    const br = JSON.parse((await h.exec(["ip", "-j", "addr", "show", "dev", `br-${ids.front.slice(0, 12)}`])).stdout) as IpLink[];
    expect(br[0]?.addr_info?.map((a) => `${a.local}/${a.prefixlen}`)).toContain("10.61.0.1/24");
    const brLink = JSON.parse((await h.exec(["ip", "-j", "-d", "link", "show", "dev", `br-${ids.front.slice(0, 12)}`])).stdout) as IpLink[];
    expect(brLink[0]?.ifalias).toBe(`knit:${ids.front}`);
  });

  test("containers and knit sandboxes share the network: addresses, MACs, routes, names", async () => {
    await docker(["run", "-d", "--init", "--name", "c1", "--network", "front", "--network-alias", "al1", "bb", "sleep", "3600"]);
    await docker(["run", "-d", "--init", "--name", "c2", "--network", "front", "bb", "sleep", "3600"]);
    await h.knitOk(["run", "-d", "--name", "k1", "--network", "front", "--", "sleep", "3600"]);
    const c1 = await addrOf("c1", "front");
    const c2 = await addrOf("c2", "front");
    const k1 = (await knitNetwork("front")).Containers;
    const k1Addr = Object.values(k1).find((c) => c.Name === "k1")?.IPv4Address.split("/")[0] ?? "";
    // One IPAM for both: three different addresses of the subnet.
    expect(new Set([c1, c2, k1Addr]).size).toBe(3);
    for (const a of [c1, c2, k1Addr]) expect(a).toMatch(/^10\.61\.0\.\d+$/);

    // Inside c1's namespace: eth0 (Docker's name) with the address, knit's MAC, and the route.
    const c1ns = await ns("c1");
    const eth0 = (await links(c1ns)).find((l) => l.ifname === "eth0");
    expect(eth0?.linkinfo?.info_kind).toBe("veth");
    expect(eth0?.addr_info?.map((a) => `${a.local}/${a.prefixlen}`)).toEqual([`${c1}/24`]);
    const octets = c1.split(".").map((o) => Number(o).toString(16).padStart(2, "0"));
    expect(eth0?.address).toBe(`02:42:${octets.join(":")}`);
    const routes = JSON.parse((await lab.exec(c1ns, ["ip", "-j", "route", "show", "default"])).stdout) as Route[];
    expect(routes.map((r) => `${r.dst} via ${r.gateway} dev ${r.dev}`)).toEqual(["default via 10.61.0.1 dev eth0"]);
    // Its host end is a port of knit's bridge; no device is left under its handoff name.
    const epId = (await docker(["inspect", "-f", '{{(index .NetworkSettings.Networks "front").EndpointID}}', "c1"])).stdout.trim();
    const host = await hostLinks();
    expect(host.find((l) => l.ifname === `veth${epId.slice(0, 7)}`)?.master).toBe(`br-${ids.front.slice(0, 12)}`);
    expect(host.filter((l) => l.ifname.startsWith("kd"))).toEqual([]);

    // Both CLIs list the containers; knit also its own sandbox, under Docker's endpoint ids.
    const kv = await knitNetwork("front");
    expect(Object.values(kv.Containers).map((c) => c.Name).sort()).toEqual(["c1", "c2", "k1"]);
    expect(Object.values(kv.Containers).find((c) => c.Name === "c1")?.EndpointID).toBe(epId);
    const dv = JSON.parse((await docker(["network", "inspect", "front"])).stdout) as { Containers: Record<string, { Name: string }> }[];
    expect(Object.values(dv[0]?.Containers ?? {}).map((c) => c.Name).sort()).toEqual(["c1", "c2"]);
    // What Docker connected, only Docker disconnects.
    const off = await h.knit(["network", "disconnect", "front", "c1"]);
    expect(off.code).not.toBe(0);
    expect(off.stderr).toContain("c1 is connected to network front by Docker");

    // Traffic and names in every direction.
    expect(await pingFrom("c1", c2)).toBeDefined();
    expect(await pingFrom("c1", "c2")).toContain(c2); // Docker's own DNS
    expect(await pingFrom("c1", "k1")).toContain(k1Addr); // knit's DNS, through the redirect
    expect(await knitPing("k1", "c1")).toContain(c1); // knit's DNS knows the container
    // The alias and the short id, learnt from Docker once c1 runs.
    const shortId = (await docker(["inspect", "-f", "{{.Id}}", "c1"])).stdout.trim().slice(0, 12);
    expect(await waitFor(async () => (await knitPing("k1", "al1"))?.includes(c1) === true, 10_000, 200)).toBe(true);
    expect(await knitPing("k1", shortId)).toContain(c1);
    // The redirect: exactly the containers' addresses on the bridge, to the network's DNS.
    const br = `br-${ids.front.slice(0, 12)}`;
    expect(await redirects()).toEqual([`${br} ${c1} 10.61.0.1`, `${br} ${c2} 10.61.0.1`].sort());
  });

  test("docker network connect and disconnect: a second interface comes and goes", async () => {
    ids.back = (await docker(["network", "create", "-d", "knit", "--subnet", "10.63.0.0/24", "back"])).stdout.trim();
    await docker(["network", "connect", "--ip", "10.63.0.50", "back", "c2"]);
    const c2ns = await ns("c2");
    const eth1 = (await links(c2ns)).find((l) => l.ifname === "eth1");
    expect(eth1?.addr_info?.map((a) => `${a.local}/${a.prefixlen}`)).toEqual(["10.63.0.50/24"]);
    await h.knitOk(["run", "-d", "--name", "k2", "--network", "back", "--", "sleep", "3600"]);
    expect(await knitPing("k2", "10.63.0.50")).toBeDefined();
    expect(await knitPing("k2", "c2")).toContain("10.63.0.50");
    // Docker moves the default route to the network it prefers ("back" sorts first): the
    // gateway knit reported in Join is the one Docker sets.
    const defaults = async (): Promise<string[]> =>
      (JSON.parse((await lab.exec(c2ns, ["ip", "-j", "route", "show", "default"])).stdout) as Route[]).map((r) => `${r.gateway} dev ${r.dev}`);
    expect(await defaults()).toEqual(["10.63.0.1 dev eth1"]);

    await docker(["network", "disconnect", "back", "c2"]);
    expect((await links(c2ns)).map((l) => l.ifname).sort()).toEqual(["eth0", "lo"]);
    expect(await defaults()).toEqual(["10.61.0.1 dev eth0"]);
    expect((await hostLinks()).filter((l) => l.ifname.startsWith("kd"))).toEqual([]);
    expect(Object.values((await knitNetwork("back")).Containers).map((c) => c.Name)).toEqual(["k2"]);
    expect(await knitPing("k2", "10.63.0.50")).toBeUndefined();
  });

  test("Docker's network options reach knit: knit.driver, IPv6, gateway, aux address, bridge name, MTU, internal, a picked subnet", async () => {
    const id = (
      await docker([
        "network", "create", "-d", "knit", "--ipam-driver", "knit", "-o", "knit.driver=bridge", "--ipv6",
        "--subnet", "10.64.0.0/24", "--gateway", "10.64.0.254", "--aux-address", "router=10.64.0.2", "--subnet", "fd00:64::/64",
        "-o", "com.docker.network.bridge.name=kopts0", "-o", "com.docker.network.driver.mtu=1400", "opts",
      ])
    ).stdout.trim();
    // The kernel: knit's bridge under the name and MTU asked for, with both gateways.
    const br = (JSON.parse((await h.exec(["ip", "-j", "-d", "addr", "show", "dev", "kopts0"])).stdout) as IpLink[])[0];
    expect(br?.ifalias).toBe(`knit:${id}`);
    expect(br?.mtu).toBe(1400);
    const global = (l: IpLink | undefined): string[] => (l?.addr_info ?? []).filter((a) => a.scope === "global").map((a) => `${a.local}/${a.prefixlen}`).sort();
    expect(global(br)).toEqual(["10.64.0.254/24", "fd00:64::1/64"]);
    const dv = JSON.parse((await docker(["network", "inspect", "opts"])).stdout) as { EnableIPv6: boolean; IPAM: { Config: { Subnet: string; Gateway?: string }[] } }[];
    expect(dv[0]?.EnableIPv6).toBe(true);
    // (Docker shows the configuration it was given: no IPv6 gateway was.)
    expect(dv[0]?.IPAM.Config.map((c) => `${c.Subnet} ${c.Gateway ?? ""}`).sort()).toEqual(["10.64.0.0/24 10.64.0.254", "fd00:64::/64 "]);

    await docker(["run", "-d", "--init", "--name", "o1", "--network", "opts", "bb", "sleep", "3600"]);
    await h.knitOk(["run", "-d", "--name", "k5", "--network", "opts", "--", "sleep", "3600"]);
    const o1ns = await ns("o1");
    const eth0 = (await links(o1ns)).find((l) => l.ifname === "eth0");
    expect(eth0?.mtu).toBe(1400);
    const [v4, v6] = [global(eth0).find((a) => !a.includes(":")), global(eth0).find((a) => a.includes(":"))];
    // knit's IPAM skips the gateway and the aux address; Docker shows what knit gave.
    expect(v4).toMatch(/^10\.64\.0\.\d+\/24$/);
    expect(["10.64.0.2/24", "10.64.0.254/24"]).not.toContain(v4);
    expect(v6).toMatch(/^fd00:64::[0-9a-f:]+\/64$/);
    expect((await docker(["inspect", "-f", '{{(index .NetworkSettings.Networks "opts").GlobalIPv6Address}}', "o1"])).stdout.trim()).toBe(v6?.split("/")[0] ?? "?");
    const defaults = async (family: "-4" | "-6"): Promise<string[]> =>
      (JSON.parse((await lab.exec(o1ns, ["ip", "-j", family, "route", "show", "default"])).stdout) as Route[]).map((r) => `${r.gateway} dev ${r.dev}`);
    expect(await defaults("-4")).toEqual(["10.64.0.254 dev eth0"]);
    expect(await defaults("-6")).toEqual(["fd00:64::1 dev eth0"]);
    // Both families carry traffic to a knit sandbox on the network, by name (knit's DNS
    // answers A and AAAA through the redirect).
    const k5 = (JSON.parse((await h.knitOk(["inspect", "k5"])).stdout) as { NetworkSettings: { Networks: Record<string, { IPAddress: string; GlobalIPv6Address: string }> } }[])[0]?.NetworkSettings.Networks.opts;
    expect(await pingFrom("o1", "-4 k5")).toContain(k5?.IPAddress ?? "?");
    expect(await waitFor(async () => (await pingFrom("o1", "-6 k5"))?.includes(k5?.GlobalIPv6Address ?? "?") === true, 10_000, 200)).toBe(true);

    // --internal: no default route, and nothing leaves through knit's bridge even with one.
    const intId = (await docker(["network", "create", "-d", "knit", "--ipam-driver", "knit", "--internal", "--subnet", "10.65.0.0/24", "int"])).stdout.trim();
    await docker(["run", "-d", "--init", "--name", "i1", "--network", "int", "bb", "sleep", "3600"]);
    const i1ns = await ns("i1");
    expect(JSON.parse((await lab.exec(i1ns, ["ip", "-j", "route", "show", "default"])).stdout)).toEqual([]);
    // Names on an internal network: Docker's resolver forwards what it does not know to the
    // daemon's upstream servers; Join gave the container a host route to each, through the
    // gateway, where the redirect hands the query to knit's DNS.
    await h.knitOk(["run", "-d", "--name", "k6", "--network", "int", "--", "sleep", "3600"]);
    const k6 = (await knitNetwork("int")).Containers;
    const k6Addr = Object.values(k6).find((c) => c.Name === "k6")?.IPv4Address.split("/")[0] ?? "?";
    const hostRoutes = (JSON.parse((await lab.exec(i1ns, ["ip", "-j", "-4", "route", "show"])).stdout) as Route[]).filter((r) => r.gateway !== undefined);
    expect(hostRoutes.length).toBeGreaterThan(0);
    for (const r of hostRoutes) expect(`${r.gateway} dev ${r.dev}`).toBe("10.65.0.1 dev eth0");
    expect(await pingFrom("i1", "k6")).toContain(k6Addr);
    expect((await docker(["exec", "i1", "nslookup", "k6"])).stdout).toContain(`Address: ${k6Addr}`);
    expect(await redirects()).toContain(`br-${intId.slice(0, 12)} ${await addrOf("i1", "int")} 10.65.0.1`);
    // A running container that has a way out already keeps sending its queries there: no routes.
    await docker(["run", "-d", "--init", "--name", "i2", "--network", "bridge", "bb", "sleep", "3600"]);
    await docker(["network", "connect", "int", "i2"]);
    const i2routes = JSON.parse((await lab.exec(await ns("i2"), ["ip", "-j", "-4", "route", "show"])).stdout) as Route[];
    expect(i2routes.filter((r) => r.gateway !== undefined).map((r) => r.dst)).toEqual(["default"]);
    expect(await pingFrom("i2", k6Addr)).toBeDefined();
    await docker(["rm", "-f", "i2"]);
    // The other order: internal first (routes to knit's DNS, which forwards nothing for it),
    // then Docker's bridge: from then on knit's DNS forwards its other names, as Docker would.
    await docker(["run", "-d", "--init", "--name", "i3", "--network", "int", "bb", "sleep", "3600"]);
    const lookupExt = async (): Promise<string> => (await d.docker(["exec", "i3", "nslookup", "ext.test"])).stdout;
    expect(await lookupExt()).not.toContain("192.0.2.10");
    expect((await docker(["exec", "i3", "nslookup", "k6"])).stdout).toContain(`Address: ${k6Addr}`);
    await docker(["network", "connect", "bridge", "i3"]);
    expect(await waitFor(async () => (await lookupExt()).includes("Address: 192.0.2.10"), 10_000, 500)).toBe(true);
    await docker(["rm", "-f", "i3"]);
    await h.knitOk(["rm", "-f", "k6"]);
    await lab.exec(i1ns, ["ip", "route", "add", "default", "via", "10.65.0.1"]);
    expect(await lab.waitPing(i1ns, "10.65.0.1")).toBe(true); // the bridge answers...
    expect(await lab.ping(i1ns, "10.60.0.20")).toBe(false); // ...but forwards nothing out
    // No subnet given: knit's IPAM picks one that overlaps nothing, and both sides agree on it.
    await docker(["network", "create", "-d", "knit", "--ipam-driver", "knit", "auto"]);
    const picked = (JSON.parse((await docker(["network", "inspect", "auto"])).stdout) as { IPAM: { Config: { Subnet: string }[] } }[])[0]?.IPAM.Config[0]?.Subnet;
    expect(picked).toMatch(/^172\.\d+\.0\.0\/16$/);
    expect(await waitFor(async () => (await h.knit(["network", "inspect", "auto"])).code === 0, 5000, 20)).toBe(true);
    const knitAuto = JSON.parse((await h.knitOk(["network", "inspect", "auto"])).stdout) as { IPAM: { Config: { Subnet: string }[] } }[];
    expect(knitAuto[0]?.IPAM.Config.map((c) => c.Subnet)).toEqual([picked ?? "?"]);

    await docker(["rm", "-f", "o1", "i1"]);
    await h.knitOk(["rm", "-f", "k5"]);
    for (const n of ["opts", "int", "auto"]) await docker(["network", "rm", n]);
    expect((await hostLinks()).some((l) => l.ifname === "kopts0")).toBe(false);
  });

  test("published ports: -p HOST:CONTAINER and -p CONTAINER, from the LAN, and released with the container", async () => {
    await docker(["run", "-d", "--name", "web", "--network", "front", "-p", "8080:80", "-p", "80", "bb", "sh", "-c", "mkdir -p /www && echo hello-from-docker > /www/index.html && exec httpd -f -p 80 -h /www"]);
    expect(await waitFor(async () => (await lab.httpGet(peer, "http://10.60.0.10:8080/"))?.includes("hello-from-docker") === true, 10_000, 200)).toBe(true);
    // The random host port: Docker cannot show a remote driver's choice; knit can.
    const ports = JSON.parse((await h.knitOk(["inspect", "web"])).stdout) as { NetworkSettings: { Ports: Record<string, { HostIp: string; HostPort: string }[] | null> } }[];
    const random = ports[0]?.NetworkSettings.Ports["80/tcp"]?.map((p) => Number(p.HostPort)).find((p) => p !== 8080);
    expect(random).toBeGreaterThanOrEqual(49153);
    expect(await lab.httpGet(peer, `http://10.60.0.10:${random}/`)).toContain("hello-from-docker");
    expect((await h.knitOk(["port", "web"])).stdout.split("\n").filter(Boolean).sort()).toEqual([`80/tcp -> 0.0.0.0:${random}`, "80/tcp -> 0.0.0.0:8080"].sort());
    // The host's own port is taken: another container, and a knit sandbox, are refused by name.
    const second = await d.docker(["run", "-d", "--name", "web2", "--network", "front", "-p", "8080:80", "bb", "sleep", "60"]);
    expect(second.code).not.toBe(0);
    expect(second.stderr).toContain("host port 0.0.0.0:8080/tcp is already published by sandbox web");
    await d.docker(["rm", "-f", "web2"]);
    expect((await h.knit(["run", "-d", "--name", "k3", "--network", "front", "-p", "8080:80", "--", "sleep", "60"])).stderr).toContain("already published by sandbox web");
    const nft = (await h.exec(["nft", "list", "table", "inet", "knit"])).stdout;
    expect(nft).toContain("8080");

    await docker(["rm", "-f", "web"]);
    expect((await h.exec(["nft", "list", "table", "inet", "knit"])).stdout).not.toContain("8080");
    expect(await storeKeys("ports/")).toEqual([]);
    expect(await lab.httpGet(peer, "http://10.60.0.10:8080/", 1)).toBeUndefined();
  });

  test("published ports as Docker users expect: 127.0.0.1, ranges, -P, UDP, hairpin, and following the gateway network", async () => {
    const serve = "for p in 80 81 82; do mkdir -p /w$p && echo port-$p > /w$p/index.html; done; httpd -p 81 -h /w81; httpd -p 82 -h /w82; exec httpd -f -p 80 -h /w80";
    await docker(["run", "-d", "--name", "web3", "--network", "front", "-p", "127.0.0.1:8090:80", "-p", "8100-8101:80-81", "--expose", "82", "-P", "-p", "5300:5300/udp", "bb", "sh", "-c", serve]);
    const web3ns = await ns("web3");
    await lab.waitListening(web3ns, 80);
    // Bound to 127.0.0.1: the host reaches it there; another machine does not.
    expect(await waitFor(async () => (await lab.httpGet(h, "http://127.0.0.1:8090/"))?.includes("port-80") === true, 10_000, 200)).toBe(true);
    expect(await lab.httpGet(peer, "http://10.60.0.10:8090/", 1)).toBeUndefined();
    // A range maps one to one; -P publishes the exposed port on a free host port.
    expect(await lab.httpGet(peer, "http://10.60.0.10:8100/")).toContain("port-80");
    expect(await lab.httpGet(peer, "http://10.60.0.10:8101/")).toContain("port-81");
    const ports = (JSON.parse((await h.knitOk(["inspect", "web3"])).stdout) as { NetworkSettings: { Ports: Record<string, { HostPort: string }[] | null> } }[])[0]?.NetworkSettings.Ports ?? {};
    const random = Number(ports["82/tcp"]?.[0]?.HostPort);
    expect(random).toBeGreaterThanOrEqual(49153);
    expect(await lab.httpGet(peer, `http://10.60.0.10:${random}/`)).toContain("port-82");
    // Docker asks the driver for what it published: EndpointOperInfo answers with knit's view.
    const epId = (await docker(["inspect", "-f", '{{(index .NetworkSettings.Networks "front").EndpointID}}', "web3"])).stdout.trim();
    const info = await call("/NetworkDriver.EndpointOperInfo", { NetworkID: ids.front, EndpointID: epId });
    expect(info.json?.Value).toMatchObject({ "knit.network": ids.front, "knit.sandbox": "web3" });
    expect((info.json?.Value as { "knit.ports": string[] })["knit.ports"]).toContain(`127.0.0.1:8090->80/tcp`);
    // UDP: a server in the container's namespace, a client on another machine.
    const udpServer = lab.spawn(web3ns, [process.execPath, "-e", 'await Bun.udpSocket({ hostname: "0.0.0.0", port: 5300, socket: { data(s, b, p, a) { s.send("udp-" + b.toString(), p, a); } } });']);
    const udpClient = `const c = await Bun.udpSocket({ socket: { data(_s, b) { console.log(b.toString()); process.exit(0); } } });
      setInterval(() => c.send("hello", 5300, "10.60.0.10"), 100); setTimeout(() => process.exit(1), 5000);`;
    try {
      expect((await lab.exec(peer, [process.execPath, "-e", udpClient], { check: false })).stdout).toContain("udp-hello");
    } finally {
      await udpServer.stop();
    }
    // Hairpin: another container on the network, through the host's address.
    expect(await lab.httpGet(await ns("c1"), "http://10.60.0.10:8100/")).toContain("port-80");

    // The ports go where Docker's gateway goes: "alt" sorts first, so Docker revokes them on
    // front and programs them on alt (and back again when web3 leaves alt).
    const dnatTo = async (): Promise<string[]> =>
      [...(await h.exec(["nft", "list", "table", "inet", "knit"])).stdout.matchAll(/dport 8100 dnat ip to ([\d.]+):80/g)].map((m) => m[1] ?? "");
    const front = await addrOf("web3", "front");
    expect(await dnatTo()).toEqual([front]);
    await docker(["network", "create", "-d", "knit", "--ipam-driver", "knit", "--subnet", "10.66.0.0/24", "alt"]);
    await docker(["network", "connect", "alt", "web3"]);
    const alt = await addrOf("web3", "alt");
    expect(await dnatTo()).toEqual([alt]);
    expect(await lab.httpGet(peer, "http://10.60.0.10:8100/")).toContain("port-80");
    await docker(["network", "disconnect", "alt", "web3"]);
    expect(await dnatTo()).toEqual([front]);
    expect(await lab.httpGet(peer, "http://10.60.0.10:8100/")).toContain("port-80");

    await docker(["rm", "-f", "web3"]);
    await docker(["network", "rm", "alt"]);
    expect(await dnatTo()).toEqual([]);
    expect(await storeKeys("ports/")).toEqual([]);
    expect(await lab.httpGet(h, "http://127.0.0.1:8090/", 1)).toBeUndefined();
  });

  test("macvlan: a container on the LAN, reachable from another machine", async () => {
    ids.lan = (
      await docker(["network", "create", "-d", "knit", "--ipam-driver", "knit", "-o", "knit.driver=macvlan", "-o", "parent=eth1", "--subnet", "10.60.0.0/24", "--ip-range", "10.60.0.128/25", "--gateway", "10.60.0.1", "lan"])
    ).stdout.trim();
    await docker(["run", "-d", "--name", "m1", "--network", "lan", "bb", "sleep", "3600"]);
    const m1 = await addrOf("m1", "lan");
    expect(m1).toMatch(/^10\.60\.0\.(1[2-9]\d|2\d\d)$/); // in the --ip-range
    const eth0 = (await links(await ns("m1"))).find((l) => l.ifname === "eth0");
    expect(eth0?.linkinfo?.info_kind).toBe("macvlan");
    expect(eth0?.addr_info?.map((a) => a.local)).toEqual([m1]);
    expect(await lab.waitPing(peer, m1)).toBe(true);
    expect(await flags("eth1")).toContain("PROMISC");
    // A knit macvlan network, listing the container.
    const kv = await knitNetwork("lan");
    expect(kv.Driver).toBe("macvlan");
    expect(Object.values(kv.Containers).map((c) => `${c.Name} ${c.IPv4Address}`)).toEqual([`m1 ${m1}/24`]);

    await docker(["rm", "-f", "m1"]);
    expect(await lab.ping(peer, m1)).toBe(false);
    // Docker moved the device back to the host under its handoff name; knit deleted it.
    expect((await hostLinks()).filter((l) => l.linkinfo?.info_kind === "macvlan")).toEqual([]);
    await docker(["network", "rm", "lan"]);
    expect(await flags("eth1")).not.toContain("PROMISC");
  });

  test("Docker's own IPAM on a knit network: an address a knit sandbox holds is refused, by name", async () => {
    ids.plain = (await docker(["network", "create", "-d", "knit", "--subnet", "10.62.0.0/24", "plain"])).stdout.trim();
    await docker(["run", "-d", "--name", "p1", "--network", "plain", "bb", "sleep", "3600"]);
    expect(await addrOf("p1", "plain")).toBe("10.62.0.2");
    await h.knitOk(["run", "-d", "--name", "k4", "--network", "plain", "--", "sleep", "3600"]);
    // knit knows p1's address; Docker does not know k4's, and offers it next.
    const k4 = Object.values((await knitNetwork("plain")).Containers).find((c) => c.Name === "k4")?.IPv4Address;
    expect(k4).toBe("10.62.0.3/24");
    const r = await d.docker(["run", "-d", "--name", "p2", "--network", "plain", "bb", "sleep", "3600"]);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toContain("address 10.62.0.3 is in use on network plain");
    expect(r.stderr).toContain("--ipam-driver knit");
    await d.docker(["rm", "-f", "p2"]);
    await docker(["rm", "-f", "p1"]);
    await h.knitOk(["rm", "-f", "k4"]);
    await docker(["network", "rm", "plain"]);
    expect((await hostLinks()).some((l) => l.ifname === `br-${ids.plain.slice(0, 12)}`)).toBe(false);
  });

  test("errors reach the Docker CLI, and a failed create leaves nothing", async () => {
    const before = (await hostLinks()).map((l) => l.ifname).sort();
    const pools = await storeKeys("docker/pools/");
    const cases: [string[], RegExp][] = [
      [["-d", "knit", "-o", "knit.driver=ipvlan", "--subnet", "10.70.0.0/24"], /unknown value "ipvlan" for option knit\.driver/],
      [["-d", "knit", "-o", "com.docker.network.bridge.nope=1", "--subnet", "10.70.0.0/24"], /unknown option "com\.docker\.network\.bridge\.nope" for the bridge driver/],
      [["-d", "knit", "--ipam-driver", "knit", "--subnet", "10.61.0.0/25"], /pool 10\.61\.0\.0\/25 overlaps network "front"/],
      [["-d", "knit", "--subnet", "10.61.0.128/25"], /subnet 10\.61\.0\.128\/25 overlaps network "front"/],
      [["-d", "knit", "--ipam-driver", "knit", "--ipam-opt", "x=1", "--subnet", "10.70.0.0/24"], /unknown IPAM option "x"/],
      [["-d", "knit", "-o", "knit.driver=macvlan", "-o", "parent=nosuch0", "--subnet", "10.70.0.0/24"], /parent interface nosuch0 does not exist/],
      [["-d", "knit", "-o", "knit.driver=macvlan", "-o", "parent=eth1", "-o", "knit.macvlan.host_access=true", "--subnet", "10.70.0.0/24"], /option knit\.macvlan\.host_access is not available through Docker/],
      [["-d", "knit", "-o", "knit.driver=overlay", "--subnet", "10.70.0.0/24"], /a knit overlay network needs knit's IPAM driver/],
    ];
    for (const [args, re] of cases) {
      const r = await d.docker(["network", "create", ...args, "bogus"]);
      expect(r.code).not.toBe(0);
      expect(r.stderr).toMatch(/Error response from daemon: .*remote: /);
      expect(r.stderr).toMatch(re);
    }
    expect((await d.docker(["network", "inspect", "bogus"])).code).not.toBe(0); // not hex: no id prefix
    expect((await hostLinks()).map((l) => l.ifname).sort()).toEqual(before);
    expect(await storeKeys("docker/pools/")).toEqual(pools);
    // An address knit's IPAM gave already (RequestAddress), by name.
    const taken = await addrOf("c1", "front");
    const dup = await d.docker(["run", "-d", "--name", "dup", "--network", "front", "--ip", taken, "bb", "sleep", "60"]);
    expect(dup.code).not.toBe(0);
    expect(dup.stderr).toContain(`remote: address ${taken} is already in use on network front`);
    await d.docker(["rm", "-f", "dup"]);

    // knit will not remove Docker's network behind Docker's back...
    const rm = await h.knit(["network", "rm", "back"]);
    expect(rm.code).not.toBe(0);
    expect(rm.stderr).toContain("network back belongs to Docker");
    // ...and when Docker removes it while a knit sandbox is on it, knit keeps it for that sandbox.
    await docker(["network", "rm", "back"]);
    expect((await d.docker(["network", "inspect", "back"])).code).not.toBe(0);
    // dockerd got knit's {"Err"} (it logs it and forgets the network anyway).
    expect(d.process.output()).toMatch(/driver error deleting network back : remote: .*knit keeps network back for them/);
    expect((await knitNetwork("back")).Labels).toEqual({});
    expect(await knitPing("k2", "10.63.0.1")).toBeDefined();
    await h.knitOk(["rm", "-f", "k2"]);
    await h.knitOk(["network", "rm", "back"]);
    expect((await hostLinks()).some((l) => l.ifname === `br-${ids.back.slice(0, 12)}`)).toBe(false);
  });

  test("the protocol, call by call: answers, errors, 400 and 404", async () => {
    const activate = await call("/Plugin.Activate");
    expect(activate).toMatchObject({ status: 200, type: CT, json: { Implements: ["NetworkDriver", "IpamDriver"] } });
    expect((await call("/NetworkDriver.GetCapabilities")).json).toEqual({ Scope: "local", ConnectivityScope: "global" });
    expect((await call("/IpamDriver.GetCapabilities")).json).toEqual({ RequiresMACAddress: false, RequiresRequestReplay: false });
    expect((await call("/IpamDriver.GetDefaultAddressSpaces")).json).toEqual({ LocalDefaultAddressSpace: "knit", GlobalDefaultAddressSpace: "knit-global" });
    for (const p of ["/NetworkDriver.DiscoverNew", "/NetworkDriver.DiscoverDelete"]) {
      expect(await call(p, { DiscoveryType: 1, DiscoveryData: { Address: "10.60.0.20", self: false } })).toMatchObject({ status: 200, json: {} });
    }
    // Not served: Swarm's allocation calls, anything unknown, anything but POST.
    for (const p of ["/NetworkDriver.AllocateNetwork", "/NetworkDriver.FreeNetwork", "/Nope.Nothing"]) expect((await call(p, {})).status).toBe(404);
    expect((await call("/Plugin.Activate", undefined, "GET")).status).toBe(404);
    // Not the protocol's shape: 400 with {"Err"}.
    const garbled = await call("/NetworkDriver.CreateNetwork", "{not json");
    expect(garbled.status).toBe(400);
    expect(String(garbled.json?.Err)).toContain("not JSON");
    expect((await call("/NetworkDriver.Join", { NetworkID: "x", EndpointID: "y", SandboxKey: "/z" })).status).toBe(400);
    expect((await call("/IpamDriver.RequestPool", { AddressSpace: "knit", V6: "yes" })).json?.Err).toContain("V6");
    // Every call with arguments refuses a body without them, naming the field.
    for (const [p, field] of [
      ["/NetworkDriver.CreateNetwork", "NetworkID"],
      ["/NetworkDriver.DeleteNetwork", "NetworkID"],
      ["/NetworkDriver.CreateEndpoint", "NetworkID"],
      ["/NetworkDriver.EndpointOperInfo", "NetworkID"],
      ["/NetworkDriver.DeleteEndpoint", "NetworkID"],
      ["/NetworkDriver.Join", "SandboxKey"],
      ["/NetworkDriver.Leave", "NetworkID"],
      ["/NetworkDriver.ProgramExternalConnectivity", "NetworkID"],
      ["/NetworkDriver.RevokeExternalConnectivity", "NetworkID"],
      ["/IpamDriver.RequestPool", "AddressSpace"],
      ["/IpamDriver.ReleasePool", "PoolID"],
      ["/IpamDriver.RequestAddress", "PoolID"],
      ["/IpamDriver.ReleaseAddress", "PoolID"],
    ] as const) {
      const r = await call(p, {});
      expect({ p, status: r.status }).toEqual({ p, status: 400 });
      expect(String(r.json?.Err)).toContain(`missing field ${field}`);
    }
    // Well-formed but impossible: 200 with {"Err"} (network) or {"Error"} (IPAM).
    const fake = "f".repeat(64);
    const join = await call("/NetworkDriver.Join", { NetworkID: fake, EndpointID: fake, SandboxKey: "/run/x", Options: {} });
    expect(join).toMatchObject({ status: 200, json: { Err: `endpoint ${fake.slice(0, 12)} was not created` } });
    expect((await call("/NetworkDriver.CreateEndpoint", { NetworkID: fake, EndpointID: fake, Interface: { Address: "10.9.9.9/24" } })).json?.Err).toContain("knit has no network for Docker network");
    expect((await call("/NetworkDriver.EndpointOperInfo", { NetworkID: fake, EndpointID: fake })).json?.Err).toContain("not found");
    const program = await call("/NetworkDriver.ProgramExternalConnectivity", { NetworkID: fake, EndpointID: fake, Options: { "com.docker.network.portmap": [{ Proto: 6, IP: "", Port: 80, HostIP: "", HostPort: 8080, HostPortEnd: 8080 }] } });
    expect(program).toMatchObject({ status: 200, json: { Err: `endpoint ${fake.slice(0, 12)} not found` } });
    expect((await call("/NetworkDriver.ProgramExternalConnectivity", { NetworkID: fake, EndpointID: fake, Options: { "com.docker.network.portmap": "80" } })).status).toBe(400);
    expect((await call("/IpamDriver.RequestAddress", { PoolID: "nope", Address: "", Options: {} })).json).toEqual({ Error: "IPAM pool nope not found" });
    expect((await call("/IpamDriver.RequestPool", { AddressSpace: "other", Pool: "", SubPool: "", Options: {}, V6: false })).json?.Error).toContain('unknown address space "other"');
    // Removing what is not there succeeds (Docker repeats these after crashes).
    for (const [p, b] of [
      ["/NetworkDriver.DeleteEndpoint", { NetworkID: fake, EndpointID: fake }],
      ["/NetworkDriver.Leave", { NetworkID: fake, EndpointID: fake }],
      ["/NetworkDriver.DeleteNetwork", { NetworkID: fake }],
      ["/NetworkDriver.RevokeExternalConnectivity", { NetworkID: fake, EndpointID: fake }],
      ["/IpamDriver.ReleasePool", { PoolID: "nope" }],
      ["/IpamDriver.ReleaseAddress", { PoolID: "nope", Address: "10.9.9.9" }],
    ] as const) {
      expect(await call(p, b)).toMatchObject({ status: 200, json: {} });
    }
    // A pool, its gateway and an address, then released: the whole IPAM round trip by hand.
    const pool = (await call("/IpamDriver.RequestPool", { AddressSpace: "knit", Pool: "", SubPool: "", Options: {}, V6: false })).json as { PoolID: string; Pool: string };
    expect(pool.Pool).toMatch(/^172\.\d+\.0\.0\/16$/);
    const gw = (await call("/IpamDriver.RequestAddress", { PoolID: pool.PoolID, Address: "", Options: { RequestAddressType: "com.docker.network.gateway" } })).json;
    expect(gw?.Address).toBe(pool.Pool.replace(/0\.0\/16$/, "0.1/16"));
    const again = (await call("/IpamDriver.RequestAddress", { PoolID: pool.PoolID, Address: pool.Pool.replace(/0\.0\/16$/, "0.1"), Options: {} })).json;
    expect(again?.Error).toContain("already in use");
    expect((await call("/IpamDriver.RequestAddress", { PoolID: pool.PoolID, Address: "", Options: {} })).json?.Address).toBe(pool.Pool.replace(/0\.0\/16$/, "0.2/16"));
    // Released, the address is handed out again; a release of something that is not an address is refused.
    expect((await call("/IpamDriver.ReleaseAddress", { PoolID: pool.PoolID, Address: pool.Pool.replace(/0\.0\/16$/, "0.2") })).json).toEqual({});
    expect((await call("/IpamDriver.RequestAddress", { PoolID: pool.PoolID, Address: "", Options: {} })).json?.Address).toBe(pool.Pool.replace(/0\.0\/16$/, "0.2/16"));
    expect((await call("/IpamDriver.ReleaseAddress", { PoolID: pool.PoolID, Address: "not-an-ip" })).json?.Error).toContain("not-an-ip");
    expect((await call("/IpamDriver.ReleasePool", { PoolID: pool.PoolID })).json).toEqual({});
    expect((await storeKeys("docker/")).filter((k) => k.includes(pool.PoolID))).toEqual([]);
  });

  test("dockerd restarts while the agent keeps state: networks stay, endpoints go and come back", async () => {
    // Graceful: dockerd stops its containers and tells the plugin (Leave, DeleteEndpoint).
    const dockerEndpoints = (await storeKeys("docker/endpoints/")).map((k) => k.slice("docker/endpoints/".length));
    expect(dockerEndpoints.length).toBe(2);
    const ofDocker = async (): Promise<string[]> => (await hostLinks()).filter((l) => l.ifname.startsWith("kd") || dockerEndpoints.some((e) => l.ifalias === `knit:${e}`)).map((l) => l.ifname);
    expect((await ofDocker()).length).toBe(2);
    await d.stop();
    expect(await storeKeys("docker/endpoints/")).toEqual([]);
    expect(await ofDocker()).toEqual([]);
    // knit keeps the network, its bridge and its knit sandbox while no dockerd runs.
    expect((await knitNetwork("front")).Id).toBe(ids.front);
    expect(await knitPing("k1", "10.61.0.1")).toBeDefined();
    expect(await waitFor(async () => (await redirects())?.length === 0, 5000, 50)).toBe(true);
    d = await startDocker(h);
    expect((await docker(["network", "ls", "--filter", "driver=knit", "--format", "{{.Name}}"])).stdout.trim().split("\n").sort()).toEqual(["front"]);
    await docker(["start", "c1", "c2"]);
    expect(await pingFrom("c1", "k1")).toBeDefined();
    expect(await knitPing("k1", "c2")).toBeDefined();

    // Killed: its containers die with it (no live-restore); the next dockerd cleans up
    // through the plugin, and the agent answers.
    d.process.kill("SIGKILL");
    await d.process.exited;
    await d.stop();
    d = await startDocker(h);
    expect(await waitFor(async () => (await storeKeys("docker/endpoints/")).length === 0, 20_000, 100)).toBe(true);
    expect(await waitFor(async () => (await ofDocker()).length === 0, 10_000, 100)).toBe(true);
    await docker(["start", "c1", "c2"]);
    expect(await pingFrom("c2", "c1")).toBeDefined();
  });

  test("the agent restarts while containers run: traffic flows on, and Docker's calls resume", async () => {
    const c1 = await addrOf("c1", "front");
    const before = (await hostLinks()).map((l) => l.ifname).sort();
    agent.kill("SIGKILL");
    await agent.exited;
    // Kernel state is knit's truth, not the agent: traffic and Docker's own names still work.
    expect(await pingFrom("c2", c1)).toBeDefined();
    expect(await pingFrom("c2", "c1")).toBeDefined();
    // A call Docker makes meanwhile is retried (for about 15 s) until the agent is back.
    const pending = d.docker(["network", "disconnect", "front", "c2"]);
    await Bun.sleep(500);
    await startAgent();
    expect((await pending).code).toBe(0);
    expect((await links(await ns("c2"))).map((l) => l.ifname)).toEqual(["lo"]);
    expect((await hostLinks()).map((l) => l.ifname).sort().length).toBe(before.length - 1);
    await docker(["network", "connect", "front", "c2"]);
    expect(await pingFrom("c2", "k1")).toBeDefined();
    expect(await knitPing("k1", "c2")).toBeDefined();
  });

  test("an agent that starts finds what Docker forgot meanwhile, and drops it", async () => {
    // Rows as a Docker call that never reached knit would leave them: an endpoint and a
    // network Docker does not know (written while no agent runs).
    await h.knitOk(["agent", "stop"]);
    await agent.exited;
    const ghost = "e".repeat(64);
    const store = await openSqliteStore(h.stateDir);
    try {
      await store.put(`docker/endpoints/${ghost}`, JSON.stringify({ dockerNetwork: ids.front, network: ids.front, address: "10.61.0.200/24", addressV6: "", mac: "02:42:0a:3d:00:c8", srcName: "kdeeeeeeeeeeeee", host: "h" }));
      await store.put(`docker/networks/${"d".repeat(64)}`, JSON.stringify({ network: "d".repeat(64), host: "h", created: true }));
    } finally {
      await store.close();
    }
    await startAgent();
    const status = JSON.parse((await h.knitOk(["agent", "status"])).stdout) as { docker: { startup: Record<string, number | boolean> } };
    expect(status.docker.startup).toMatchObject({ dockerReachable: true, endpointsDropped: 1, networksDropped: 1 });
    expect(await storeKeys(`docker/endpoints/${ghost}`)).toEqual([]);
    expect(await storeKeys(`docker/networks/${"d".repeat(64)}`)).toEqual([]);
    // What Docker does know stays.
    expect(await pingFrom("c1", "k1")).toBeDefined();
  });

  test("knit install --docker-plugin writes the agent's unit; the agent's plugin flags are checked", async () => {
    const dir = `${lab.dir}/_systemd`;
    const out = await h.knitOk(["install", "--cni-bin-dir", `${lab.dir}/_cni`, "--from-source", "--docker-plugin", "--systemd-dir", dir]);
    expect(out.stdout).toContain(`${dir}/knit-agent.service`);
    const unit = await Bun.file(`${dir}/knit-agent.service`).text();
    expect(unit).toMatch(/^ExecStart=\S+\/bin\/knit agent --docker-plugin$/m);
    expect(unit).toContain("Before=docker.service");
    // What the unit starts serves the plugin: dockerd finds it, and the network is knit's.
    // (Under systemd the daemon is the default socket; here the lab's, through DOCKER_HOST.)
    const execStart = /^ExecStart=(.+)$/m.exec(unit)?.[1]?.split(" ") ?? [];
    await h.knitOk(["agent", "stop"]);
    await agent.exited;
    agent = h.spawn(execStart, { env: h.knitEnv({ DOCKER_HOST: d.dockerHost }) });
    expect(await waitFor(() => existsSync(SOCKET) && existsSync(`${h.stateDir}/agent.pid`), 20_000, 20)).toBe(true);
    const viaUnit = (await docker(["network", "create", "-d", "knit", "--ipam-driver", "knit", "--subnet", "10.67.0.0/24", "unitnet"])).stdout.trim();
    expect(await waitFor(async () => (await h.knit(["network", "ls", "--format", "{{.ID}} {{.Name}}"])).stdout.includes(`${viaUnit.slice(0, 12)} unitnet`), 5000, 20)).toBe(true);
    await docker(["network", "rm", "unitnet"]);
    await h.knitOk(["agent", "stop"]);
    await agent.exited;
    await startAgent();
    // Again: replaced in place. Someone else's unit of that name: refused.
    await h.knitOk(["install", "--cni-bin-dir", `${lab.dir}/_cni`, "--from-source", "--docker-plugin", "--systemd-dir", dir]);
    await Bun.write(`${dir}/knit-agent.service`, "[Unit]\nDescription=not knit\n");
    const refused = await h.knit(["install", "--cni-bin-dir", `${lab.dir}/_cni`, "--from-source", "--docker-plugin", "--systemd-dir", dir]);
    expect(refused.code).not.toBe(0);
    expect(refused.stderr).toContain("exists and is not knit's");
    for (const [args, re] of [
      [["agent", "--plugin-dir", "/tmp/x"], /--plugin-dir needs --docker-plugin/],
      [["agent", "start", "--docker-host", "unix:///x"], /--docker-host needs --docker-plugin/],
    ] as const) {
      const r = await h.knit(args);
      expect(r.code).not.toBe(0);
      expect(r.stderr).toMatch(re);
    }
  });

  test("everything removed: nothing of knit's is left in the kernel, the store or the plugin directory", async () => {
    await docker(["rm", "-f", "c1", "c2"]);
    await h.knitOk(["rm", "-f", "k1"]);
    await docker(["network", "rm", "front"]);
    expect(await waitFor(async () => (await redirects())?.length === 0, 5000, 50)).toBe(true);
    await h.knitOk(["agent", "stop"]);
    await agent.exited;
    expect(existsSync(SOCKET)).toBe(false);
    expect(await redirects()).toBeUndefined();
    await assertHostClean(h, {
      allowLinks: ["docker0"],
      extra: async () => (await storeKeys("docker/")).map((k) => `store: key ${k} left`),
    });
  });
});
