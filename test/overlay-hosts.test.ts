/**
 * Cluster lab (3 hosts, etcd, a LAN machine, an internet), two things:
 *
 *   - DNS on `--internal` overlay networks: sandboxes on two hosts resolve each other by name
 *     and alias through knit's DNS at 169.254.53.53 on their own host's bridge
 *     (src/cluster/overlay-dns.ts); nothing leaves the network (no internet, no external
 *     names, no host services), the LAN reaches nothing, and the address, reply route and
 *     policy rule go with the last endpoint;
 *   - `knit host rm`: refused for an unknown host, for this host, and for a live one without
 *     -f; a dead host (lease still alive) removed with -f leaves the store, every other
 *     host's data path and DNS; coming back, it cleans its own remnants and rejoins; a live
 *     host removed with -f stays out until its agent is restarted.
 *
 * Every check reads the kernel (`ip -j`, `bridge -j`, `nft -j`) or sends real traffic.
 */
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { INTERNET, Lab, waitFor } from "../src/lab/lab.ts";
import { etcdMissing } from "../src/lab/etcd.ts";
import { ClusterLab, type ClusterHost } from "../src/demo/cluster-lab.ts";
import { OVERLAY_DNS_ADDRESS, keys, type Endpoint, type Network, type Sandbox } from "../src/model.ts";
import { OVERLAY_DNS_RULE_PRIORITY, OVERLAY_DNS_TABLE } from "../src/cluster/overlay-dns.ts";
import { assertClusterClean } from "./overlay-lab.ts";

setDefaultTimeout(120_000);

let lab: Lab;
let c: ClusterLab;
let h1: ClusterHost;
let h2: ClusterHost;
let h3: ClusterHost;

type Sb = Awaited<ReturnType<ClusterLab["sandbox"]>>;

interface AddrJson {
  addr_info: { family: string; local: string; prefixlen: number; scope: string }[];
}

/** The policy rules of the DNS reply route on a host (`ip -j rule`). */
async function dnsRules(h: ClusterHost): Promise<unknown[]> {
  return JSON.parse((await h.host.exec(["ip", "-j", "rule", "show", "priority", String(OVERLAY_DNS_RULE_PRIORITY)])).stdout || "[]") as unknown[];
}

/** Routes of knit's DNS reply table on a host (`ip -j route show table`). */
async function dnsRoutes(h: ClusterHost): Promise<{ dst: string; dev: string }[]> {
  const r = await h.host.exec(["ip", "-j", "route", "show", "table", String(OVERLAY_DNS_TABLE)], { check: false });
  if (r.code !== 0 && r.stderr.includes("FIB table does not exist")) return []; // the kernel drops an empty table
  if (r.code !== 0) throw new Error(`ip route show table ${OVERLAY_DNS_TABLE} on ${h.label}: ${r.stderr}`);
  return JSON.parse(r.stdout || "[]") as { dst: string; dev: string }[];
}

/** IPv4 addresses of a device on a host. */
async function addrsOf(h: ClusterHost, dev: string): Promise<string[]> {
  const [link] = JSON.parse((await h.host.exec(["ip", "-j", "addr", "show", "dev", dev])).stdout) as AddrJson[];
  return (link?.addr_info ?? []).map((a) => `${a.local}/${a.prefixlen} ${a.scope}`);
}

/** The addresses knit's DNS listens on (agent status). */
async function dnsListeners(h: ClusterHost): Promise<string[]> {
  const status = JSON.parse(await c.knitOk(h, ["agent", "status"])) as { dns: { listeners: { address: string; udp: boolean; tcp: boolean }[] } };
  return status.dns.listeners.filter((l) => l.udp && l.tcp).map((l) => l.address);
}

/** `getent hosts NAME` in a sandbox (its resolv.conf): the addresses, or undefined. */
async function lookup(sb: Sb, name: string): Promise<string | undefined> {
  const r = await c.inSandbox(sb.pid, ["getent", "hosts", name]);
  return r.code === 0 ? r.stdout.trim().split(/\s+/)[0] : undefined;
}

/** No DNS reply rule, no reply route, no listener on the DNS address: a host without internal overlay endpoints. */
async function dnsPlumbingProblems(h: ClusterHost, agentRunning = true): Promise<string[]> {
  const problems: string[] = [];
  if ((await dnsRules(h)).length) problems.push(`${h.label}: DNS reply rule left`);
  if ((await dnsRoutes(h)).length) problems.push(`${h.label}: routes left in table ${OVERLAY_DNS_TABLE}`);
  if (agentRunning && (await dnsListeners(h)).includes(OVERLAY_DNS_ADDRESS)) problems.push(`${h.label}: DNS still listens on ${OVERLAY_DNS_ADDRESS}`);
  return problems;
}

const missing = etcdMissing();

describe.skipIf(missing !== undefined)("internal overlay DNS and knit host rm", () => {
  beforeAll(async () => {
    lab = await Lab.create("ovh");
    c = await ClusterLab.create(lab, { etcdNet: 87 });
    [h1, h2, h3] = c.hosts as [ClusterHost, ClusterHost, ClusterHost];
  });

  afterAll(async () => {
    try {
      if (c) {
        for (const h of c.hosts) if (!h.agent?.running) await c.startAgent(h);
        for (const h of c.hosts) {
          const left = (await c.knit(h, ["ps", "-aq"])).stdout.split("\n").filter(Boolean);
          if (left.length) await c.knit(h, ["rm", "-f", ...left]);
        }
        for (const n of ["inet1", "hnet", "h3local"]) await c.knit(h1, ["network", "rm", n]);
        await c.knit(h3, ["network", "rm", "h3local"]);
        const problems: string[] = [];
        for (const h of c.hosts) problems.push(...(await dnsPlumbingProblems(h)));
        await assertClusterClean(c);
        // The rule is the agent's: stopped agents leave none either.
        for (const h of c.hosts) problems.push(...(await dnsPlumbingProblems(h, false)));
        expect(problems).toEqual([]);
      }
    } finally {
      await lab?.cleanup();
    }
  });

  test("sandboxes of an --internal overlay network resolve each other by name and alias across hosts", async () => {
    const netId = await c.knitOk(h1, ["network", "create", "-d", "overlay", "--internal", "--subnet", "10.96.0.0/24", "inet1"]);
    await Promise.all([
      c.knitOk(h1, ["run", "-d", "--name", "i1", "--network", "inet1", "--alias", "ione", "--", "sleep", "3600"]),
      c.knitOk(h2, ["run", "-d", "--name", "i2", "--network", "inet1", "--alias", "itwo", "--", "sleep", "3600"]),
    ]);
    await c.knitOk(h2, ["run", "-d", "--name", "i2b", "--network", "inet1", "--", "sleep", "3600"]);
    const [i1, i2, i2b] = [await c.sandbox(h1, "i1"), await c.sandbox(h2, "i2"), await c.sandbox(h2, "i2b")];
    expect(await c.peersConverged(netId)).toBe(true);
    // No docker_gwbridge: the overlay interface is the only one, with one host route to the DNS address.
    expect(Object.keys(i1.ip)).toEqual(["inet1"]);
    const routes = JSON.parse((await lab.exec(i1.ns, ["ip", "-j", "route", "show"])).stdout) as { dst: string; dev: string; scope?: string }[];
    expect(routes.map((r) => `${r.dst} ${r.dev} ${r.scope ?? ""}`).sort()).toEqual(["10.96.0.0/24 eth0 link", `${OVERLAY_DNS_ADDRESS} eth0 link`]);
    expect((await c.inSandbox(i1.pid, ["cat", "/etc/resolv.conf"])).stdout).toMatch(new RegExp(`^nameserver ${OVERLAY_DNS_ADDRESS.replace(/\./g, "\\.")}$[\\s\\S]*ndots:0`, "m"));

    // By name and by alias, both ways across hosts, and on one host.
    const ok = await waitFor(async () => (await lookup(i1, "i2")) === i2.ip["inet1"], 5000);
    expect(ok).toBe(true);
    expect(await lookup(i1, "itwo")).toBe(i2.ip["inet1"]);
    expect(await lookup(i2, "i1")).toBe(i1.ip["inet1"]);
    expect(await lookup(i2, "ione")).toBe(i1.ip["inet1"]);
    expect(await lookup(i2b, "i2")).toBe(i2.ip["inet1"]);
    expect(await lookup(i1, "nosuchname")).toBeUndefined();
    const ping = await c.inSandbox(i1.pid, ["ping", "-c1", "-W2", "itwo"]);
    expect(ping.stdout).toContain(`(${i2.ip["inet1"]})`);
    // Over TCP too, and reverse lookups.
    expect((await c.inSandbox(i2.pid, ["dig", "+tcp", "+short", "+time=2", `@${OVERLAY_DNS_ADDRESS}`, "i1"])).stdout.trim()).toBe(i1.ip["inet1"] ?? "?");
    expect((await c.inSandbox(i2.pid, ["dig", "+short", "+time=2", `@${OVERLAY_DNS_ADDRESS}`, "-x", i1.ip["inet1"] ?? "?"])).stdout.trim()).toBe("i1.");

    // An existing namespace connected to the network gets the route too, and asks the same way.
    const ns = await lab.ns("iext");
    await c.knitOk(h2, ["network", "connect", "--alias", "iextra", "inet1", ns.name]);
    expect((await lab.exec(ns, ["dig", "+short", "+time=2", `@${OVERLAY_DNS_ADDRESS}`, "ione"])).stdout.trim()).toBe(i1.ip["inet1"] ?? "?");
    expect(await waitFor(async () => (await lookup(i1, "iextra")) !== undefined, 5000)).toBe(true);
    await c.knitOk(h2, ["network", "disconnect", "inet1", ns.name]);
  });

  test("the host side: a /32 on the bridge, a reply route and rule, and no route into the overlay", async () => {
    const netId = await c.knitOk(h1, ["network", "inspect", "--format", "{{.Id}}", "inet1"]);
    const bridge = `ov-${netId.slice(0, 12)}`;
    for (const h of [h1, h2]) {
      expect(await addrsOf(h, bridge)).toEqual([`${OVERLAY_DNS_ADDRESS}/32 link`]);
      expect((await dnsRoutes(h)).map((r) => `${r.dst} ${r.dev}`)).toEqual([`10.96.0.0/24 ${bridge}`]);
      expect(await dnsRules(h)).toEqual([{ priority: OVERLAY_DNS_RULE_PRIORITY, src: OVERLAY_DNS_ADDRESS, iif: "lo", table: String(OVERLAY_DNS_TABLE) }]);
      expect(await dnsListeners(h)).toContain(OVERLAY_DNS_ADDRESS);
      // The host itself has no route into the overlay (the main table does not know it).
      const route = JSON.parse((await h.host.exec(["ip", "-j", "route", "get", "10.96.0.9"], { check: false })).stdout || "[]") as { dev?: string }[];
      expect(route[0]?.dev).not.toBe(bridge);
    }
    // h3 has no endpoint of the network: no address, no route, no rule, no listener.
    expect(await dnsPlumbingProblems(h3)).toEqual([]);
    // The firewall (every host: overlay networks are in every host's table): nothing routed in
    // or out of the bridge, and into the host only DNS to the DNS address.
    for (const h of c.hosts) {
      const doc = JSON.parse((await h.host.exec(["nft", "-j", "list", "table", "inet", "knit"])).stdout) as { nftables: { rule?: { chain: string; comment?: string; expr: unknown[] } }[] };
      const mine = doc.nftables.flatMap((o) => (o.rule?.comment === `knit ${netId}` ? [o.rule] : []));
      const input = mine.filter((r) => r.chain === "input").map((r) => JSON.stringify(r.expr));
      expect(input).toHaveLength(2);
      expect(input[0]).toContain(OVERLAY_DNS_ADDRESS);
      expect(input[0]).toContain('"accept"');
      expect(input[1]).toContain('"drop"');
      expect(mine.filter((r) => r.chain === "forward" && JSON.stringify(r.expr).includes('"drop"')).length).toBeGreaterThanOrEqual(3); // internal (2) + isolation
    }
  });

  test("nothing leaves an internal overlay network: no internet, no external names, no host services", async () => {
    const i1 = await c.sandbox(h1, "i1");
    expect(await lab.ping(i1.ns, INTERNET.server4, { waitSec: 1 })).toBe(false);
    // Names knit does not know are not forwarded: the lab's upstream would answer this one.
    const ext = await c.inSandbox(i1.pid, ["dig", "+time=2", "+tries=1", `@${OVERLAY_DNS_ADDRESS}`, "example.test"]);
    expect(ext.stdout).toContain("status: REFUSED");
    expect(await lookup(i1, "example.test")).toBeUndefined();
    // Even with the DNS address as its gateway, the sandbox is routed nowhere...
    await lab.exec(i1.ns, ["ip", "route", "add", "default", "via", OVERLAY_DNS_ADDRESS, "dev", "eth0", "onlink"]);
    try {
      expect(await lab.ping(i1.ns, INTERNET.server4, { waitSec: 1 })).toBe(false);
      expect(await lab.ping(i1.ns, h1.address, { waitSec: 1 })).toBe(false);
      // ...and reaches no service of its host, on the DNS address or on another host address.
      const echo = await lab.tcpEchoServer(h1.host, 7000);
      try {
        expect(await lab.tcpSend(h1.host, OVERLAY_DNS_ADDRESS, 7000, "hi", 1)).toBe("hi"); // the host itself can
        expect(await lab.tcpSend(i1.ns, OVERLAY_DNS_ADDRESS, 7000, "hi", 1)).toBeUndefined();
        expect(await lab.tcpSend(i1.ns, h1.address, 7000, "hi", 1)).toBeUndefined();
      } finally {
        await echo.stop();
      }
    } finally {
      await lab.exec(i1.ns, ["ip", "route", "del", "default"]);
    }
  });

  test("the LAN reaches neither the overlay nor its DNS", async () => {
    const m = c.machine;
    if (!m) throw new Error("no LAN machine");
    const i1 = await c.sandbox(h1, "i1");
    await lab.exec(m, ["ip", "route", "replace", "10.96.0.0/24", "via", h1.address]);
    await lab.exec(m, ["ip", "route", "replace", `${OVERLAY_DNS_ADDRESS}/32`, "via", h1.address]);
    try {
      expect(await lab.ping(m, i1.ip["inet1"] ?? "?", { waitSec: 1 })).toBe(false);
      const dig = await lab.exec(m, ["dig", `@${OVERLAY_DNS_ADDRESS}`, "+time=1", "+tries=1", "i1"], { check: false });
      expect(dig.stdout).not.toContain(i1.ip["inet1"] ?? "?");
    } finally {
      await lab.exec(m, ["ip", "route", "del", "10.96.0.0/24"]);
      await lab.exec(m, ["ip", "route", "del", `${OVERLAY_DNS_ADDRESS}/32`]);
    }
  });

  test("the DNS address, reply route and rule go with a host's last internal overlay endpoint", async () => {
    await c.knitOk(h2, ["rm", "-f", "i2", "i2b"]);
    const gone = await waitFor(async () => (await dnsPlumbingProblems(h2)).length === 0, 10_000);
    expect(await dnsPlumbingProblems(h2)).toEqual([]);
    expect(gone).toBe(true);
    // h1 keeps answering its own sandbox.
    const i1 = await c.sandbox(h1, "i1");
    expect(await lookup(i1, "i1")).toBe(i1.ip["inet1"]);
    expect(await lookup(i1, "i2")).toBeUndefined();
    await c.knitOk(h1, ["rm", "-f", "i1"]);
    await c.knitOk(h1, ["network", "rm", "inet1"]);
    for (const h of c.hosts) expect(await waitFor(async () => (await dnsPlumbingProblems(h)).length === 0, 10_000)).toBe(true);
  });

  test("knit host rm refuses an unknown host, this host, and a live host without -f", async () => {
    const unknown = await c.knit(h1, ["host", "rm", "nosuchhost"]);
    expect(unknown.code).not.toBe(0);
    expect(unknown.stderr).toContain("host nosuchhost is not in the cluster");
    const names = (await c.store.list("names/")).items.length;
    const reserved = await c.knit(h1, ["host", "rm", "global"]);
    expect(reserved.code).not.toBe(0);
    expect(reserved.stderr).toContain('"global" is not a host name');
    expect((await c.store.list("names/")).items.length).toBe(names);
    const self = await c.knit(h1, ["host", "rm", "h1"]);
    expect(self.code).not.toBe(0);
    expect(self.stderr).toContain("host h1 is this host");
    const live = await c.knit(h1, ["host", "rm", "h3"]);
    expect(live.code).not.toBe(0);
    expect(live.stderr).toContain("host h3 is not down and cannot be removed");
    expect(live.stderr).toContain("knit host rm -f h3");
    expect(await c.store.get(keys.host("h3"))).toBeDefined();
    expect(await c.knitOk(h1, ["host", "--help"])).toContain("Remove one or more hosts from the cluster");
    expect(await c.knitOk(h1, ["host", "rm", "--help"])).toContain("--force");
  });

  test("a dead host removed with -f leaves the store, the data path and DNS; back, it rejoins cleanly", async () => {
    const hnet = await c.knitOk(h1, ["network", "create", "-d", "overlay", "--subnet", "10.95.0.0/24", "hnet"]);
    await c.knitOk(h3, ["network", "create", "--subnet", "10.94.0.0/24", "h3local"]);
    await c.knitOk(h1, ["run", "-d", "--name", "a1", "--network", "hnet", "--", "sleep", "3600"]);
    await c.knitOk(h3, ["run", "-d", "--name", "c3", "--network", "hnet", "--alias", "cee", "--", "sleep", "3600"]);
    await c.knitOk(h3, ["run", "-d", "--name", "l3", "--network", "h3local", "-p", "8080:80", "--", "sleep", "3600"]);
    const a1 = await c.sandbox(h1, "a1");
    const c3 = await c.sandbox(h3, "c3");
    expect(await c.peersConverged(hnet)).toBe(true);
    expect(await waitFor(async () => (await lookup(a1, "cee")) === c3.ip["hnet"], 5000)).toBe(true);
    const c3ep = (await c.store.list(keys.endpointsOf(hnet))).items.map((kv) => JSON.parse(kv.value) as Endpoint).find((ep) => ep.host === "h3");
    expect(c3ep).toBeDefined();

    // h3 dies: its agent is killed, its lease (10 s) still runs. Removing it needs -f.
    await c.stopAgent(h3, "SIGKILL");
    const refused = await c.knit(h1, ["host", "rm", "h3"]);
    expect(refused.stderr).toContain("is not down");
    expect(await c.knitOk(h1, ["host", "rm", "-f", "h3"])).toBe("h3");

    // The store: nothing of h3 but the eviction mark.
    const all = (await c.store.list("")).items;
    const ofH3 = all.filter((kv) => {
      if (kv.key.includes("/h3/") || kv.key.endsWith("/h3")) return true;
      try {
        const v = JSON.parse(kv.value) as { host?: string };
        return v.host === "h3";
      } catch {
        return false;
      }
    });
    expect(ofH3.map((kv) => kv.key)).toEqual([keys.evicted("h3")]);
    expect(await c.store.get(keys.ipam(hnet, c3.ip["hnet"] ?? "?"))).toBeUndefined();
    expect((await c.store.list(keys.sandboxes())).items.map((kv) => (JSON.parse(kv.value) as Sandbox).name)).toEqual(["a1"]);
    expect((await c.store.list(keys.networks())).items.map((kv) => JSON.parse(kv.value) as Network).filter((n) => n.host === "h3")).toEqual([]);
    // The other hosts: no FDB or neighbour entry for h3, no name.
    expect(await c.peersConverged(hnet, 5000, [h1, h2])).toBe(true);
    expect((await c.fdb(h1, hnet)).some((e) => e.dst === h3.address)).toBe(false);
    expect((await c.neigh(h1, hnet)).some((n) => n.ip === c3.ip["hnet"])).toBe(false);
    expect(await waitFor(async () => (await lookup(a1, "cee")) === undefined, 5000)).toBe(true);
    expect(await lab.ping(a1.ns, c3.ip["hnet"] ?? "?", { waitSec: 1 })).toBe(false);
    expect((await c.knitOk(h1, ["host", "ls", "-q"])).split("\n")).toEqual(["h1", "h2"]);
    // Once removed, a second rm finds nothing.
    expect((await c.knit(h1, ["host", "rm", "-f", "h3"])).stderr).toContain("host h3 is not in the cluster");

    // h3 comes back: its agent joins again and cleans what the store forgot (the sandboxes'
    // processes, namespaces and directories, their links, the local bridge, the DNAT rule).
    await c.startAgent(h3);
    expect(await c.store.get(keys.evicted("h3"))).toBeUndefined();
    expect(await c.knitOk(h3, ["ps", "-aq"])).toBe("");
    for (const id of [c3.id]) {
      expect(existsSync(`/run/netns/knit-${id.slice(0, 12)}`)).toBe(false);
      expect(existsSync(join(h3.host.stateDir, "sandboxes", id))).toBe(false);
    }
    const links = JSON.parse((await h3.host.exec(["ip", "-j", "link"])).stdout) as { ifname: string }[];
    expect(links.map((l) => l.ifname).filter((n) => /^(br-|veth|knit_gw)/.test(n))).toEqual([]);
    expect((await h3.host.exec(["nft", "-j", "list", "table", "inet", "knit"], { check: false })).stdout).not.toContain('"published"');
    // ...and is a full member again: a new sandbox there is reached by name from h1.
    await c.knitOk(h3, ["run", "-d", "--name", "c3b", "--network", "hnet", "--", "sleep", "3600"]);
    const c3b = await c.sandbox(h3, "c3b");
    expect(await c.peersConverged(hnet)).toBe(true);
    expect(await lab.waitPing(a1.ns, c3b.ip["hnet"] ?? "?")).toBe(true);
    expect(await waitFor(async () => (await lookup(a1, "c3b")) === c3b.ip["hnet"], 5000)).toBe(true);
    await c.knitOk(h3, ["rm", "-f", "c3b"]);
    await c.knitOk(h1, ["rm", "-f", "a1"]);
    await c.knitOk(h1, ["network", "rm", "hnet"]);
  });

  test("a live host removed with -f stays out until its agent starts again, and its agent removes what the store forgot", async () => {
    await c.knitOk(h2, ["network", "create", "--subnet", "10.92.0.0/24", "h2local"]);
    await c.knitOk(h2, ["run", "-d", "--name", "l2", "--network", "h2local", "--", "sleep", "3600"]);
    const l2 = await c.sandbox(h2, "l2");
    const l2ns = `/run/netns/knit-${l2.id.slice(0, 12)}`;
    expect(existsSync(l2ns)).toBe(true);
    expect(await c.knitOk(h1, ["host", "rm", "-f", "h2"])).toBe("h2");
    expect(await c.store.get(keys.host("h2"))).toBeUndefined();
    // Its agent renews every TTL/3 (3.3 s): it finds the eviction instead of registering again.
    const stayedOut = await waitFor(async () => (await c.store.get(keys.host("h2"))) !== undefined, 7000);
    expect(stayedOut).toBe(false);
    const status = JSON.parse(await c.knitOk(h2, ["agent", "status"])) as { status: string; cluster: { host: { registered: boolean; evicted?: string } } };
    expect(status.cluster.host.registered).toBe(false);
    expect(status.cluster.host.evicted).toContain('"by":"h1"');
    expect(status.status).toBe("degraded");
    expect((await c.knitOk(h1, ["host", "ls", "-q"])).split("\n")).toEqual(["h1", "h3"]);
    // The evicted agent took down what the removal freed: the sandbox (process, namespace,
    // directory), its veth and the local network's bridge.
    expect(await waitFor(async () => !existsSync(l2ns), 10_000)).toBe(true);
    expect(existsSync(join(h2.host.stateDir, "sandboxes", l2.id))).toBe(false);
    expect(await c.knitOk(h2, ["ps", "-aq"])).toBe("");
    const h2links = JSON.parse((await h2.host.exec(["ip", "-j", "link"])).stdout) as { ifname: string }[];
    expect(h2links.map((l) => l.ifname).filter((n) => /^(br-|veth)/.test(n))).toEqual([]);
    // Overlay commands on h2 say why they fail.
    await c.knitOk(h1, ["network", "create", "-d", "overlay", "--subnet", "10.93.0.0/24", "enet"]);
    const refused = await c.knit(h2, ["run", "-d", "--name", "e2", "--network", "enet", "--", "sleep", "10"]);
    expect(refused.code).not.toBe(0);
    expect(refused.stderr).toContain("host h2 is not registered in the cluster");
    // Restarting the agent joins again.
    await c.stopAgent(h2);
    await c.startAgent(h2);
    expect(await c.store.get(keys.evicted("h2"))).toBeUndefined();
    expect((await c.knitOk(h1, ["host", "ls", "-q"])).split("\n")).toEqual(["h1", "h2", "h3"]);
    await c.knitOk(h1, ["network", "rm", "enet"]);
  });
});
