/**
 * Overlay networks on an etcd cluster store, without Swarm: three hosts, one etcd, a LAN
 * machine and an internet (src/demo/cluster-lab.ts). Everything is checked on the kernel's
 * own state (`ip -j`, `bridge -j`, `nft -j`) and with real traffic between namespaces:
 *
 *   - the issue's `network create` command, verbatim, on one host; visible on all;
 *   - VNI >= 4096, unique, also for networks created at the same moment on several hosts;
 *   - per host and network: a bridge without addresses and a vxlan device (VNI, UDP 4789,
 *     learning off, proxy, MTU = underlay - 50), only on hosts with endpoints;
 *   - exactly one FDB and one neighbour entry per remote endpoint (plus the bridge's static
 *     forwarding entry on the vxlan port), no flooding;
 *   - pings by IP and by name (and alias) across hosts;
 *   - 30 connects released at the same moment on 3 hosts get 30 distinct addresses (and a
 *     burst of `knit run` on all hosts);
 *   - egress through docker_gwbridge (icc off, masquerade); a user-made docker_gwbridge;
 *   - LAN machines reach neither overlay addresses nor names; published ports work on the
 *     host running the sandbox (and the same host port on two hosts, each host programming
 *     its own mapping only; the same port twice on one host is still refused);
 *   - rm refused while any host has endpoints; after rm every host deletes its devices.
 *
 * Faults (kill -9, lease expiry, etcd down, partition) are in overlay-faults.test.ts.
 */
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { mkdtempSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { INTERNET, Lab, waitFor } from "../src/lab/lab.ts";
import { etcdMissing } from "../src/lab/etcd.ts";
import { ClusterLab, UNDERLAY, type ClusterHost } from "../src/demo/cluster-lab.ts";
import { keys, type Endpoint } from "../src/model.ts";
import { assertClusterClean } from "./overlay-lab.ts";

setDefaultTimeout(120_000);

const SEED = ["network", "create", "--attachable", "--driver=overlay", "--gateway=192.168.1.1", "--subnet=192.168.1.0/24", "--opt", "com.docker.network.bridge.name=vlan0", "vlan0"];

let lab: Lab;
let c: ClusterLab;
let h1: ClusterHost;
let h2: ClusterHost;
let h3: ClusterHost;
let vlan0 = "";

interface IpAddrJson {
  ifname: string;
  mtu: number;
  addr_info: { family: string; local: string }[];
}

const missing = etcdMissing();

describe.skipIf(missing !== undefined)("overlay networks on a 3-host cluster", () => {
  beforeAll(async () => {
    lab = await Lab.create("ovl");
    c = await ClusterLab.create(lab, { etcdNet: 81 });
    [h1, h2, h3] = c.hosts as [ClusterHost, ClusterHost, ClusterHost];
    // h3's user made docker_gwbridge first, with a subnet and options of their own (as with
    // Docker): knit must use it as it is.
    await c.knitOk(h3, [
      "network", "create", "--subnet", "10.99.0.0/24",
      "--opt", "com.docker.network.bridge.name=docker_gwbridge",
      "--opt", "com.docker.network.bridge.enable_icc=false",
      "--opt", "com.docker.network.bridge.enable_ip_masquerade=true",
      "docker_gwbridge",
    ]);
  });

  afterAll(async () => {
    try {
      if (c) await assertClusterClean(c);
    } finally {
      await lab?.cleanup();
    }
  });

  test("the issue's command works verbatim on one host; every host sees the network", async () => {
    vlan0 = await c.knitOk(h1, SEED);
    expect(vlan0).toMatch(/^[0-9a-f]{64}$/);
    for (const h of c.hosts) {
      expect(await c.knitOk(h, ["network", "ls", "--format", "{{.Name}} {{.Driver}} {{.Scope}}", "--filter", "name=vlan0"])).toBe("vlan0 overlay global");
      const [view] = JSON.parse(await c.knitOk(h, ["network", "inspect", "vlan0"])) as {
        Id: string;
        Attachable: boolean;
        IPAM: { Config: { Subnet: string; Gateway: string }[] };
        Options: Record<string, string>;
      }[];
      expect(view?.Id).toBe(vlan0);
      expect(view?.Attachable).toBe(true);
      expect(view?.IPAM.Config).toEqual([{ Subnet: "192.168.1.0/24", Gateway: "192.168.1.1" }]);
      expect(Number(view?.Options["com.docker.network.driver.overlay.vxlanid_list"])).toBeGreaterThanOrEqual(4096);
      // No endpoint anywhere yet: no devices anywhere.
      expect((await h.host.exec(["ip", "link", "show", "dev", "vlan0"], { check: false })).code).not.toBe(0);
      expect(await c.vxlan(h, vlan0)).toBeUndefined();
    }
    // The VNI is claimed in the store under vni/<n>.
    const vni = (await c.store.list(keys.vnis())).items.find((kv) => kv.value === vlan0);
    expect(Number(vni?.key.slice(keys.vnis().length))).toBeGreaterThanOrEqual(4096);
    // Same name again, from another host: refused (names of overlay networks are cluster-wide).
    const again = await c.knit(h2, SEED);
    expect(again.code).not.toBe(0);
    expect(again.stderr).toContain("already exists");
  });

  test("networks created at the same moment on three hosts get distinct VNIs >= 4096", async () => {
    const names = ["vn1", "vn2", "vn3"];
    const ids = await Promise.all(c.hosts.map((h, i) => c.knitOk(h, ["network", "create", "-d", "overlay", names[i] ?? ""])));
    const vnis = new Map((await c.store.list(keys.vnis())).items.map((kv) => [kv.value, Number(kv.key.slice(keys.vnis().length))]));
    const mine = ids.map((id) => vnis.get(id) ?? 0);
    expect(new Set(mine).size).toBe(3);
    for (const v of mine) expect(v).toBeGreaterThanOrEqual(4096);
    expect(mine).not.toContain(vnis.get(vlan0));
    // Default pools never overlap each other or vlan0.
    const subnets = await Promise.all(names.map(async (n) => c.knitOk(h1, ["network", "inspect", "--format", "{{range .IPAM.Config}}{{.Subnet}}{{end}}", n])));
    expect(new Set([...subnets, "192.168.1.0/24"]).size).toBe(4);
    // A VNI asked for is honoured, and refused when taken.
    const fixed = await c.knitOk(h2, ["network", "create", "-d", "overlay", "-o", "com.docker.network.driver.overlay.vxlanid_list=70000", "vfix"]);
    expect((await c.store.get(keys.vni(70000)))?.value).toBe(fixed);
    const taken = await c.knit(h3, ["network", "create", "-d", "overlay", "-o", "com.docker.network.driver.overlay.vxlanid_list=70000", "vfix2"]);
    expect(taken.code).not.toBe(0);
    expect(taken.stderr).toContain("VNI 70000 is already used");
    for (const n of [...names, "vfix"]) await c.knitOk(h3, ["network", "rm", n]);
    expect((await c.store.list(keys.vnis())).items.map((kv) => kv.value)).toEqual([vlan0]);
  });

  test("sandboxes on three hosts reach each other by IP and by name", async () => {
    await Promise.all([
      c.knitOk(h1, ["run", "-d", "--name", "a", "--network", "vlan0", "--alias", "alpha", "--", "sleep", "3600"]),
      c.knitOk(h2, ["run", "-d", "--name", "b", "--network", "vlan0", "--", "sleep", "3600"]),
      c.knitOk(h3, ["run", "-d", "--name", "c", "--network", "vlan0", "--", "sleep", "3600"]),
    ]);
    const sbs = { a: await c.sandbox(h1, "a"), b: await c.sandbox(h2, "b"), c: await c.sandbox(h3, "c") };
    for (const sb of Object.values(sbs)) expect(sb.ip["vlan0"]).toMatch(/^192\.168\.1\.\d+$/);
    expect(await c.peersConverged(vlan0)).toBe(true);
    const pairs = [["a", "b"], ["a", "c"], ["b", "c"], ["b", "a"], ["c", "a"], ["c", "b"]] as const;
    for (const [from, to] of pairs) {
      const src = sbs[from];
      expect(await lab.waitPing(src.ns, sbs[to].ip["vlan0"] ?? "?", 5000)).toBe(true);
      // By name: the sandbox's resolver is knit's DNS on docker_gwbridge's gateway.
      const byName = await c.inSandbox(src.pid, ["ping", "-c1", "-W2", to]);
      expect(byName.stdout).toContain(`(${sbs[to].ip["vlan0"]})`);
      expect(byName.code).toBe(0);
    }
    // An alias of a sandbox on h1 resolves on h3; unknown names do not.
    expect((await c.inSandbox(sbs.c.pid, ["getent", "hosts", "alpha"])).stdout).toContain(sbs.a.ip["vlan0"] ?? "?");
    expect((await c.inSandbox(sbs.c.pid, ["getent", "hosts", "nosuchname"])).code).not.toBe(0);
  });

  test("each host with endpoints has a bridge without addresses and a vxlan device as specified", async () => {
    const vni = Number(await c.knitOk(h1, ["network", "inspect", "--format", '{{index .Options "com.docker.network.driver.overlay.vxlanid_list"}}', "vlan0"]));
    for (const h of c.hosts) {
      const vx = await c.vxlan(h, vlan0);
      expect(vx?.linkinfo?.info_kind).toBe("vxlan");
      expect(vx?.linkinfo?.info_data).toMatchObject({ id: vni, port: 4789, local: h.address, link: "eth0", learning: false, proxy: true });
      expect(vx?.linkinfo?.info_slave_data?.learning).toBe(false);
      expect(vx?.master).toBe("vlan0");
      expect(vx?.mtu).toBe(1450); // underlay 1500 - 50
      const [br] = JSON.parse((await h.host.exec(["ip", "-j", "addr", "show", "dev", "vlan0"])).stdout) as IpAddrJson[];
      expect(br?.addr_info).toEqual([]); // no IPv4, no IPv6, not even link-local
      expect(br?.mtu).toBe(1450);
      // The host has no route into the overlay.
      const route = JSON.parse((await h.host.exec(["ip", "-j", "route", "get", "192.168.1.2"])).stdout) as { dev: string }[];
      expect(route[0]?.dev).not.toBe("vlan0");
    }
    const a = await c.sandbox(h1, "a");
    const [eth0] = JSON.parse((await lab.exec(a.ns, ["ip", "-j", "addr", "show", "dev", "eth0"])).stdout) as IpAddrJson[];
    expect(eth0?.mtu).toBe(1450);
  });

  test("exactly one FDB and one neighbour entry per remote endpoint, and no flooding", async () => {
    expect(await c.peersConverged(vlan0)).toBe(true);
    const eps = (await c.store.list(keys.endpointsOf(vlan0))).items.map((kv) => JSON.parse(kv.value) as Endpoint);
    for (const h of c.hosts) {
      const fdb = await c.fdb(h, vlan0);
      const neigh = await c.neigh(h, vlan0);
      const remote = eps.filter((ep) => ep.host !== h.label);
      expect(remote.length).toBe(2);
      expect(fdb.length).toBe(remote.length);
      expect(new Set(fdb.map((e) => e.mac)).size).toBe(fdb.length);
      expect(neigh.length).toBe(remote.length);
      expect(fdb.map((e) => e.mac)).not.toContain("00:00:00:00:00:00");
      // The bridge forwards (never floods) to remote MACs: one static entry each on the vxlan
      // port, nothing learned there.
      const bridged = await c.bridged(h, vlan0);
      expect(bridged.length).toBe(remote.length);
      for (const ep of remote) {
        expect(fdb).toContainEqual({ mac: ep.mac, dst: c.host(ep.host ?? "").address });
        expect(neigh).toContainEqual({ ip: ep.ipv4?.split("/")[0] ?? "", mac: ep.mac });
        expect(bridged).toContainEqual({ mac: ep.mac, state: "static" });
      }
    }
    // Traffic to an address nobody has, and a broadcast, never reach the underlay.
    const a = await c.sandbox(h1, "a");
    const dump = h1.host.spawn(["tcpdump", "-i", "eth0", "-n", "-l", "udp", "port", "4789"]);
    await Bun.sleep(500);
    expect(await lab.ping(a.ns, "192.168.1.200", { waitSec: 1 })).toBe(false);
    await lab.exec(a.ns, ["ping", "-b", "-c2", "-i0.2", "-W1", "192.168.1.255"], { check: false });
    await Bun.sleep(200);
    await dump.stop();
    expect(dump.output().split("\n").filter((l) => /^\d\d:\d\d/.test(l))).toEqual([]);
  });

  test("30 connects at the same moment on 3 hosts get 30 distinct addresses", async () => {
    // One engine process per host, 10 connects each, all released at the same instant.
    const perHost = new Map(c.hosts.map((h) => [h.label, Array.from({ length: 10 }, (_, i) => `burst-${h.label}-${i}`)]));
    for (const names of perHost.values()) for (const n of names) await lab.run(["ip", "netns", "add", n]);
    lab.onCleanup("delete the burst namespaces", async () => {
      for (const names of perHost.values()) for (const n of names) await lab.run(["ip", "netns", "del", n], { check: false });
    });
    const burst = async (mode: "connect" | "disconnect"): Promise<void> => {
      const startAt = Date.now() + 1500;
      const outs = await Promise.all(
        c.hosts.map((h) =>
          h.host.exec([process.execPath, join(import.meta.dir, "overlay-burst.ts"), mode, "vlan0", String(startAt), ...(perHost.get(h.label) ?? [])], { env: c.env(h.host.knitEnv()) }),
        ),
      );
      for (const o of outs) expect(JSON.parse(o.stdout.trim().split("\n").pop() ?? "{}")).toEqual({ ok: 10, errors: [] });
    };
    await burst("connect");
    // In the store: 30 + a, b, c endpoints, 33 distinct addresses, never the gateway.
    const eps = (await c.store.list(keys.endpointsOf(vlan0))).items.map((kv) => JSON.parse(kv.value) as Endpoint);
    const addrs = eps.map((ep) => ep.ipv4?.split("/")[0]);
    expect(eps.length).toBe(33);
    expect(new Set(addrs).size).toBe(33);
    expect(addrs).not.toContain("192.168.1.1");
    // In the kernel: the address each namespace's eth0 really has.
    const kernel: string[] = [];
    for (const names of perHost.values()) {
      for (const n of names) {
        const [eth0] = JSON.parse((await lab.run(["ip", "-n", n, "-j", "addr", "show", "dev", "eth0"])).stdout) as IpAddrJson[];
        kernel.push(eth0?.addr_info.find((x) => x.family === "inet")?.local ?? "?");
      }
    }
    expect(new Set(kernel).size).toBe(30);
    for (const k of kernel) expect(addrs).toContain(k);
    expect(await c.peersConverged(vlan0, 10_000)).toBe(true);
    // Across the overlay: the last namespace of h3 reaches the first of h1.
    expect(await lab.waitPing({ path: "/run/netns/burst-h3-9" }, kernel[0] ?? "?")).toBe(true);
    await burst("disconnect");
    expect((await c.store.list(keys.endpointsOf(vlan0))).items.length).toBe(3);
    expect(await c.peersConverged(vlan0)).toBe(true);
    for (const n of perHost.get("h1") ?? []) expect((JSON.parse((await lab.run(["ip", "-n", n, "-j", "link"])).stdout) as unknown[]).length).toBe(1);
  });

  test("`knit run` on three hosts at once: distinct addresses, reachable at once", async () => {
    const names = c.hosts.flatMap((h) => Array.from({ length: 3 }, (_, i) => ({ h, name: `p${h.label}-${i}` })));
    const results = await Promise.all(names.map(({ h, name }) => c.knit(h, ["run", "-d", "--name", name, "--network", "vlan0", "--", "sleep", "3600"])));
    expect(results.filter((r) => r.code !== 0).map((r) => r.stderr)).toEqual([]);
    const kernel: string[] = [];
    for (const r of results) {
      // `run -d` printed the id; knit's sandboxes live in /run/netns/knit-<id12>.
      const [eth0] = JSON.parse((await lab.run(["ip", "-n", `knit-${r.stdout.trim().slice(0, 12)}`, "-j", "addr", "show", "dev", "eth0"])).stdout) as IpAddrJson[];
      kernel.push(eth0?.addr_info.find((x) => x.family === "inet")?.local ?? "?");
    }
    expect(new Set(kernel).size).toBe(9);
    expect(await c.peersConverged(vlan0, 10_000)).toBe(true);
    const last = await c.sandbox(h3, "ph3-2");
    expect(await lab.waitPing(last.ns, kernel[0] ?? "?")).toBe(true);
    expect((await c.inSandbox(last.pid, ["getent", "hosts", "ph1-0"])).stdout).toContain(kernel[0] ?? "?");
    await Promise.all(c.hosts.map((h) => c.knitOk(h, ["rm", "-f", ...names.filter((n) => n.h === h).map((n) => n.name)])));
    expect((await c.store.list(keys.endpointsOf(vlan0))).items.length).toBe(3);
    expect(await c.peersConverged(vlan0)).toBe(true);
  });

  test("egress: overlay sandboxes reach the internet through docker_gwbridge (icc off, masquerade)", async () => {
    const a = await c.sandbox(h1, "a");
    expect(await lab.waitPing(a.ns, INTERNET.server4)).toBe(true);
    // The default route goes through eth1 (docker_gwbridge); eth0 (the overlay) has none.
    const routes = JSON.parse((await lab.exec(a.ns, ["ip", "-j", "route", "show", "default"])).stdout) as { dev: string; gateway: string }[];
    expect(routes.map((r) => r.dev)).toEqual(["eth1"]);
    const gw = JSON.parse(await c.knitOk(h1, ["network", "inspect", "docker_gwbridge"])) as { Options: Record<string, string>; IPAM: { Config: { Gateway: string }[] } }[];
    expect(routes[0]?.gateway).toBe(gw[0]?.IPAM.Config[0]?.Gateway ?? "?");
    expect(gw[0]?.Options).toMatchObject({ "com.docker.network.bridge.enable_icc": "false", "com.docker.network.bridge.enable_ip_masquerade": "true", "com.docker.network.bridge.name": "knit_gwbridge" });
    // The host masquerades: the internet sees the host's underlay address. icc off: port isolation.
    const ports = JSON.parse((await h1.host.exec(["bridge", "-j", "-d", "link"])).stdout) as { ifname: string; master?: string; isolated?: boolean }[];
    const links = ports.filter((p) => p.master === "knit_gwbridge");
    expect(links.length).toBeGreaterThan(0);
    for (const l of links) expect(l.isolated).toBe(true);
    const nft = (await h1.host.exec(["nft", "-j", "list", "table", "inet", "knit"])).stdout;
    expect(nft).toContain("masquerade");
    // A second sandbox on h1 cannot reach a's docker_gwbridge address (icc off) but reaches a over the overlay.
    await c.knitOk(h1, ["run", "-d", "--name", "a2", "--network", "vlan0", "--", "sleep", "3600"]);
    const a2 = await c.sandbox(h1, "a2");
    expect(await lab.ping(a2.ns, a.ip["docker_gwbridge"] ?? "?", { waitSec: 1 })).toBe(false);
    expect(await lab.waitPing(a2.ns, a.ip["vlan0"] ?? "?")).toBe(true);
    await c.knitOk(h1, ["rm", "-f", "a2"]);
  });

  test("a docker_gwbridge the user made first is used as it is", async () => {
    const sb = await c.sandbox(h3, "c");
    expect(sb.ip["docker_gwbridge"]).toMatch(/^10\.99\.0\.\d+$/);
    const routes = JSON.parse((await lab.exec(sb.ns, ["ip", "-j", "route", "show", "default"])).stdout) as { gateway: string }[];
    expect(routes.map((r) => r.gateway)).toEqual(["10.99.0.1"]);
    expect((await h3.host.exec(["ip", "link", "show", "dev", "docker_gwbridge"])).code).toBe(0);
    expect(await lab.waitPing(sb.ns, INTERNET.server4)).toBe(true);
  });

  test("LAN machines reach neither overlay addresses nor names", async () => {
    const m = c.machine;
    if (!m) throw new Error("no LAN machine");
    const a = await c.sandbox(h1, "a");
    const b = await c.sandbox(h2, "b");
    // Even with routes pointing at the hosts, the overlay is not reachable from the LAN.
    await lab.exec(m, ["ip", "route", "replace", "192.168.1.0/24", "via", h1.address]);
    expect(await lab.ping(m, a.ip["vlan0"] ?? "?", { waitSec: 1 })).toBe(false);
    await lab.exec(m, ["ip", "route", "replace", "192.168.1.0/24", "via", h2.address]);
    expect(await lab.ping(m, b.ip["vlan0"] ?? "?", { waitSec: 1 })).toBe(false);
    await lab.exec(m, ["ip", "route", "del", "192.168.1.0/24"]);
    // knit's DNS on h1 refuses the LAN machine (it is no sandbox of any network there).
    const gw = await c.knitOk(h1, ["network", "inspect", "--format", "{{range .IPAM.Config}}{{.Gateway}}{{end}}", "docker_gwbridge"]);
    const sub = await c.knitOk(h1, ["network", "inspect", "--format", "{{range .IPAM.Config}}{{.Subnet}}{{end}}", "docker_gwbridge"]);
    await lab.exec(m, ["ip", "route", "replace", sub, "via", h1.address]);
    const dig = await lab.exec(m, ["dig", `@${gw}`, "+time=1", "+tries=1", "a"], { check: false });
    await lab.exec(m, ["ip", "route", "del", sub]);
    expect(dig.stdout).not.toContain(a.ip["vlan0"] ?? "?");
    expect(dig.stdout).toMatch(/status: REFUSED|connection timed out|no servers could be reached/);
  });

  test("published ports work on the host that runs the sandbox; two hosts publish the same port", async () => {
    const site = (text: string): string => {
      const dir = mkdtempSync(join(lab.dir, "_www-"));
      writeFileSync(join(dir, "index.html"), text);
      return dir;
    };
    // A published port is per host, as with Docker: h2 and h3 both publish host port 8080.
    await c.knitOk(h2, ["run", "-d", "--name", "web", "--network", "vlan0", "-p", "8080:80", "--", "busybox", "httpd", "-f", "-p", "80", "-h", site("hello from h2\n")]);
    await c.knitOk(h3, ["run", "-d", "--name", "web3", "--network", "vlan0", "-p", "8080:80", "--", "busybox", "httpd", "-f", "-p", "80", "-h", site("hello from h3\n")]);
    const m = c.machine;
    if (!m) throw new Error("no LAN machine");
    const web = await c.sandbox(h2, "web");
    const web3 = await c.sandbox(h3, "web3");
    await lab.waitListening(web.ns, 80);
    await lab.waitListening(web3.ns, 80);
    // Each through its own host's address, from the LAN machine and from another host.
    for (const [h, text] of [[h2, "hello from h2\n"], [h3, "hello from h3\n"]] as const) {
      expect(await waitFor(async () => (await lab.httpGet(m, `http://${h.address}:8080/`)) === text, 5000)).toBe(true);
      expect(await lab.httpGet(h1.host, `http://${h.address}:8080/`)).toBe(text);
    }
    // Not on a host that runs neither.
    expect(await lab.httpGet(m, `http://${h1.address}:8080/`, 1)).toBeUndefined();
    // One claim per host, and each host programs its own mapping only (DNAT comments carry the sandbox id).
    expect((await c.store.list(keys.ports())).items.map((kv) => kv.key)).toEqual(["ports/h2/tcp/8080", "ports/h3/tcp/8080"]);
    const dnat = async (h: ClusterHost): Promise<string[]> => {
      const r = await h.host.exec(["nft", "-j", "list", "table", "inet", "knit"], { check: false });
      const doc = JSON.parse(r.stdout || "{}") as { nftables?: { rule?: { chain: string; comment?: string } }[] };
      return (doc.nftables ?? []).flatMap((o) => (o.rule?.chain === "published" ? [o.rule.comment?.split(" ")[2] ?? ""] : []));
    };
    expect(await dnat(h1)).toEqual([]);
    expect(await dnat(h2)).toEqual([web.id.slice(0, 12)]);
    expect(await dnat(h3)).toEqual([web3.id.slice(0, 12)]);
    // On the SAME host the port is still taken: refused, and nothing of the loser is left.
    const again = await c.knit(h2, ["run", "-d", "--name", "web2", "--network", "vlan0", "-p", "8080:80", "--", "sleep", "100"]);
    expect(again.code).toBe(125);
    expect(again.stderr).toContain("host port 0.0.0.0:8080/tcp is already published by sandbox web");
    expect((await c.knit(h2, ["inspect", "web2"])).code).not.toBe(0);
    expect((await c.store.list(keys.ports())).items.map((kv) => kv.key)).toEqual(["ports/h2/tcp/8080", "ports/h3/tcp/8080"]);
    // The overlay address serves too, from another host's sandbox.
    const a = await c.sandbox(h1, "a");
    expect(await lab.httpGet(a.ns, `http://${web.ip["vlan0"]}/`)).toBe("hello from h2\n");
    // `knit port` shows it.
    expect(await c.knitOk(h2, ["port", "web"])).toContain("80/tcp -> 0.0.0.0:8080");
    await c.knitOk(h2, ["rm", "-f", "web"]);
    expect(await lab.httpGet(m, `http://${h2.address}:8080/`, 1)).toBeUndefined();
    // h3's is untouched by h2's removal.
    expect(await lab.httpGet(m, `http://${h3.address}:8080/`)).toBe("hello from h3\n");
    await c.knitOk(h3, ["rm", "-f", "web3"]);
    expect((await c.store.list(keys.ports())).items).toEqual([]);
  });

  test("connect and disconnect of an existing namespace bring and take docker_gwbridge along", async () => {
    const ns = await lab.ns("ext");
    await c.knitOk(h1, ["network", "connect", "--alias", "extra", "vlan0", ns.name]);
    const links = async (): Promise<string[]> => (JSON.parse((await lab.exec(ns, ["ip", "-j", "link"])).stdout) as { ifname: string }[]).map((l) => l.ifname).sort();
    expect(await links()).toEqual(["eth0", "eth1", "lo"]);
    const b = await c.sandbox(h2, "b");
    expect(await lab.waitPing(ns, b.ip["vlan0"] ?? "?")).toBe(true);
    expect(await lab.waitPing(ns, INTERNET.server4)).toBe(true);
    expect((await c.inSandbox(b.pid, ["getent", "hosts", "extra"])).code).toBe(0);
    await c.knitOk(h1, ["network", "disconnect", "vlan0", ns.name]);
    expect(await links()).toEqual(["lo"]);
    expect(await c.knitOk(h1, ["network", "inspect", "--format", "{{range .Containers}}{{.Name}} {{end}}", "docker_gwbridge"])).not.toContain(ns.name);
    expect((await c.knit(h1, ["inspect", ns.name])).code).not.toBe(0); // the namespace is forgotten with its last endpoint
    expect(await c.peersConverged(vlan0)).toBe(true);
  });

  test("names are scoped: another overlay network's sandboxes do not resolve", async () => {
    await c.knitOk(h1, ["network", "create", "-d", "overlay", "--subnet", "10.98.0.0/24", "other"]);
    await c.knitOk(h2, ["run", "-d", "--name", "o1", "--network", "other", "--", "sleep", "3600"]);
    const o1 = await c.sandbox(h2, "o1");
    const a = await c.sandbox(h1, "a");
    expect((await c.inSandbox(a.pid, ["getent", "hosts", "o1"])).code).not.toBe(0);
    expect((await c.inSandbox(o1.pid, ["getent", "hosts", "a"])).code).not.toBe(0);
    // ...nor are they reachable over the other network.
    expect(await lab.ping(a.ns, o1.ip["other"] ?? "?", { waitSec: 1 })).toBe(false);
  });

  test("rm is refused while any host has endpoints; afterwards every host removes its devices", async () => {
    const otherId = await c.knitOk(h1, ["network", "inspect", "--format", "{{.Id}}", "other"]);
    expect(await c.vxlan(h2, otherId)).toBeDefined();
    const refused = await c.knit(h1, ["network", "rm", "other"]);
    expect(refused.code).not.toBe(0);
    expect(refused.stderr).toContain("has active endpoints");
    // The last endpoint on h2 leaves: h2 removes its devices (it never had others).
    await c.knitOk(h2, ["rm", "-f", "o1"]);
    const devicesGone = async (): Promise<boolean> => (await c.vxlan(h2, otherId)) === undefined && (await h2.host.exec(["ip", "link", "show", `ov-${otherId.slice(0, 12)}`], { check: false })).code !== 0;
    expect(await waitFor(devicesGone, 5000)).toBe(true);
    // vlan0 from h3 while all three hosts have endpoints: refused. Then gone everywhere.
    expect((await c.knit(h3, ["network", "rm", "vlan0"])).code).not.toBe(0);
    await c.knitOk(h1, ["network", "rm", "other"]);
    await Promise.all([c.knitOk(h1, ["rm", "-f", "a"]), c.knitOk(h2, ["rm", "-f", "b"]), c.knitOk(h3, ["rm", "-f", "c"])]);
    await c.knitOk(h2, ["network", "rm", "vlan0"]);
    for (const h of c.hosts) {
      const gone = await waitFor(async () => (await h.host.exec(["ip", "link", "show", "dev", "vlan0"], { check: false })).code !== 0 && (await c.vxlan(h, vlan0)) === undefined, 5000);
      expect(gone).toBe(true);
    }
    expect((await c.store.list(keys.vnis())).items).toEqual([]);
  });

  test("knit host ls shows every host, its address, status and endpoints; agent status shows the cluster", async () => {
    await c.knitOk(h1, ["network", "create", "-d", "overlay", "ls1"]);
    await c.knitOk(h2, ["run", "-d", "--name", "l1", "--network", "ls1", "--", "sleep", "3600"]);
    const table = await c.knitOk(h1, ["host", "ls"]);
    expect(table.split("\n")[0]).toMatch(/^NAME\s+ADDRESS\s+STATUS\s+ENDPOINTS$/);
    const rows = (await c.knitOk(h3, ["host", "ls", "--format", "json"])).split("\n").map((l) => JSON.parse(l) as { Name: string; Address: string; Status: string; Endpoints: number; Self: boolean });
    expect(rows.map((r) => [r.Name, r.Address, r.Status, r.Self])).toEqual([
      ["h1", `${UNDERLAY.prefix}.11`, "alive", false],
      ["h2", `${UNDERLAY.prefix}.12`, "alive", false],
      ["h3", `${UNDERLAY.prefix}.13`, "alive", true],
    ]);
    // l1: one on ls1, one on h2's docker_gwbridge.
    expect(rows.find((r) => r.Name === "h2")?.Endpoints).toBe(2);
    const status = JSON.parse(await c.knitOk(h2, ["agent", "status"])) as { cluster: { host: { registered: boolean; record: { address: string } }; overlay: { networks: { name: string; local: number }[] } } };
    expect(status.cluster.host.registered).toBe(true);
    expect(status.cluster.host.record.address).toBe(h2.address);
    expect(status.cluster.overlay.networks.find((n) => n.name === "ls1")?.local).toBe(1);
    await c.knitOk(h2, ["rm", "-f", "l1"]);
    await c.knitOk(h1, ["network", "rm", "ls1"]);
  });
});
