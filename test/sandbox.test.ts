/**
 * knit's sandboxes through the real CLI (`knit run`, `ps`, `inspect`, `exec`, `rm`, and
 * `network connect/disconnect` of namespaces knit did not make), inside a lab host. Checked
 * against the kernel (`ip -j` in the sandbox's namespace, /proc) and with real traffic.
 * Every test removes what it made; afterEach proves it, kernel and store.
 *
 *   lan 10.20.0.0/24 ── h1 10.20.0.11 (knit host) ── r 10.20.0.1 ── internet
 */
import { afterAll, afterEach, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { existsSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { hostname } from "node:os";
import { join } from "node:path";
import { INTERNET, Lab, type LabHost, type NetnsRef, waitFor } from "../src/lab/lab.ts";
import { assertHostClean } from "./leaks.ts";

setDefaultTimeout(60_000);

interface IpLink {
  ifname: string;
  address: string;
  ifalias?: string;
  master?: string;
}
interface IpAddr {
  ifname: string;
  addr_info: { family: string; local: string; prefixlen: number; scope: string }[];
}
interface EndpointView {
  NetworkID: string;
  EndpointID: string;
  Gateway: string;
  IPAddress: string;
  IPPrefixLen: number;
  MacAddress: string;
  InterfaceName: string;
}
interface SandboxView {
  Id: string;
  Name: string;
  Kind: string;
  State: { Status: string; Running: boolean; Pid: number };
  Config: { Hostname: string; Cmd: string[] };
  HostConfig: { NetworkMode: string; AutoRemove: boolean };
  NetworkSettings: { SandboxKey: string; Networks: Record<string, EndpointView> };
}
interface NetworkView {
  Containers: Record<string, { Name: string; IPv4Address: string; MacAddress: string }>;
}

let lab: Lab;
let h1: LabHost;
/** Set once a test brought up the predefined bridge: knit0 then stays, like docker0. */
let defaultBridgeUsed = false;

async function ipj<T>(node: NetnsRef, args: readonly string[]): Promise<T[]> {
  return JSON.parse((await lab.exec(node, ["ip", "-j", ...args])).stdout || "[]") as T[];
}
/** Global addresses of a namespace, by interface, as "addr/len". */
async function globalAddrs(node: NetnsRef): Promise<Record<string, string[]>> {
  const out: Record<string, string[]> = {};
  for (const l of await ipj<IpAddr>(node, ["addr", "show"])) {
    const a = l.addr_info.filter((i) => i.scope === "global").map((i) => `${i.local}/${i.prefixlen}`);
    if (a.length) out[l.ifname] = a;
  }
  return out;
}
const linkNames = async (node: NetnsRef): Promise<string[]> => (await ipj<IpLink>(node, ["link", "show"])).map((l) => l.ifname).sort();
const lines = (out: string): string[] => out.split("\n").filter((l) => l !== "");

async function inspect(ref: string): Promise<SandboxView> {
  const v = (JSON.parse((await h1.knitOk(["inspect", ref])).stdout) as SandboxView[])[0];
  if (!v) throw new Error(`no inspect output for ${ref}`);
  return v;
}

interface Sb {
  id: string;
  ns: NetnsRef;
  view: SandboxView;
}
/** `knit run -d ARGS -- sleep 1000`, inspected. */
async function runSb(args: readonly string[]): Promise<Sb> {
  const id = (await h1.knitOk(["run", "-d", ...args, "--", "sleep", "1000"])).stdout.trim();
  expect(id).toMatch(/^[0-9a-f]{64}$/);
  const view = await inspect(id);
  return { id, ns: { path: view.NetworkSettings.SandboxKey }, view };
}

/** The network namespace inode a path or a process's ns link refers to. */
const nsInode = (path: string): number => statSync(path).ino;
/** True while a process exists and is not a zombie. */
function alive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    const state = stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3);
    return state !== "Z" && state !== "X";
  } catch {
    return false;
  }
}

async function scrub(): Promise<void> {
  const ids = lines((await h1.knit(["ps", "-aq", "--no-trunc"])).stdout);
  if (ids.length) await h1.knit(["rm", "-f", ...ids]);
  const nets = lines((await h1.knit(["network", "ls", "-q", "--no-trunc", "--filter", "type=custom"])).stdout);
  for (const n of nets) {
    const r = await h1.knit(["network", "inspect", n]);
    const view = r.code === 0 ? (JSON.parse(r.stdout) as NetworkView[])[0] : undefined;
    for (const c of Object.values(view?.Containers ?? {})) await h1.knit(["network", "disconnect", "-f", n, c.Name]);
  }
  if (nets.length) await h1.knit(["network", "rm", ...nets]);
}

beforeAll(async () => {
  lab = await Lab.create();
  const lan = await lab.lan("lan");
  h1 = await lab.host("h1");
  await lab.plug(h1, lan, { ifname: "eth0", addresses: ["10.20.0.11/24"] });
  await lab.router("r", [{ lan, addresses: ["10.20.0.1/24"] }], { internet: true });
});

afterEach(async () => {
  try {
    await assertHostClean(h1, { defaultBridge: defaultBridgeUsed });
  } catch (err) {
    await scrub();
    throw err;
  }
});

afterAll(async () => {
  await lab.cleanup();
});

describe("knit sandboxes on a lab host", () => {
  test("run -d on the default bridge, ps, inspect, exec, rm refused while running, rm -f", async () => {
    defaultBridgeUsed = true;
    const s = await runSb(["--name", "s1"]);
    const v = s.view;
    expect(v).toMatchObject({ Id: s.id, Name: "s1", Kind: "knit", Config: { Cmd: ["sleep", "1000"] }, HostConfig: { NetworkMode: "bridge" } });
    expect(v.State.Status).toBe("running");
    expect(v.State.Running).toBe(true);
    // The recorded PID is the command itself, living in the sandbox's namespace.
    const pid = v.State.Pid;
    expect(readFileSync(`/proc/${pid}/comm`, "utf8").trim()).toBe("sleep");
    expect(nsInode(`/proc/${pid}/ns/net`)).toBe(nsInode(s.ns.path));
    expect(s.ns.path).toBe(`/run/netns/knit-${s.id.slice(0, 12)}`);

    // On the predefined bridge: device knit0, an address from its subnet, a veth in knit0.
    const ep = v.NetworkSettings.Networks["bridge"];
    expect(ep?.IPAddress).toMatch(/^172\.17\.0\.\d+$/);
    expect(await globalAddrs(s.ns)).toEqual({ eth0: [`${ep?.IPAddress ?? "?"}/16`] });
    const veth = (await ipj<IpLink>(h1, ["-d", "link", "show"])).find((l) => l.ifalias === `knit:${ep?.EndpointID ?? ""}`);
    expect(veth?.master).toBe("knit0");
    expect(await lab.waitPing(s.ns, "172.17.0.1")).toBe(true);
    expect(await lab.waitPing(s.ns, INTERNET.server4)).toBe(true);

    // ps: running sandboxes, short and full ids, templates.
    const ps = lines((await h1.knitOk(["ps"])).stdout);
    expect(ps[0]).toMatch(/^SANDBOX ID\s+COMMAND\s+CREATED\s+STATUS\s+NETWORKS\s+NAMES$/);
    expect(ps.slice(1).map((l) => l.split(/\s+/)[0])).toEqual([s.id.slice(0, 12)]);
    expect(ps[1]).toMatch(/running\s+bridge\s+s1$/);
    expect(lines((await h1.knitOk(["ps", "-q", "--no-trunc"])).stdout)).toEqual([s.id]);
    expect((await h1.knitOk(["ps", "--format", "{{.Names}} {{.Status}} {{.Networks}}"])).stdout).toBe("s1 running bridge\n");

    // exec: runs in the sandbox's namespaces and passes the exit code through.
    const inside = JSON.parse((await h1.knitOk(["exec", "s1", "--", "ip", "-j", "addr", "show", "eth0"])).stdout) as IpAddr[];
    expect(inside[0]?.addr_info.find((a) => a.family === "inet")?.local).toBe(ep?.IPAddress ?? "?");
    expect((await h1.knitOk(["exec", "s1", "hostname"])).stdout).toBe(`${s.id.slice(0, 12)}\n`);
    expect((await h1.knit(["exec", "s1", "--", "sh", "-c", "exit 7"])).code).toBe(7);

    // rm without -f is refused and changes nothing.
    const refused = await h1.knit(["rm", "s1"]);
    expect(refused.code).toBe(1);
    expect(refused.stderr).toContain("you cannot remove a running sandbox s1");
    expect(alive(pid)).toBe(true);
    expect(existsSync(s.ns.path)).toBe(true);
    expect(await lab.ping(s.ns, "172.17.0.1")).toBe(true);

    expect((await h1.knitOk(["rm", "-f", "s1"])).stdout).toBe("s1\n");
    expect(await waitFor(() => !alive(pid), 3000)).toBe(true);
    expect(existsSync(s.ns.path)).toBe(false);
    expect((await h1.knitOk(["ps", "-aq"])).stdout).toBe("");
    const gone = await h1.knit(["inspect", "s1"]);
    expect(gone.code).toBe(1);
    expect(gone.stderr).toContain("no such object: s1");
  });

  test("foreground run returns the command's exit code; ps -a shows it exited; --rm removes it", async () => {
    const r = await h1.knit(["run", "--network", "none", "--name", "three", "--", "sh", "-c", "echo out; echo err >&2; exit 3"]);
    expect(r.code).toBe(3);
    expect(r.stdout).toBe("out\n");
    expect(r.stderr).toBe("err\n");
    expect(lines((await h1.knitOk(["ps", "-q"])).stdout)).toEqual([]);
    const all = lines((await h1.knitOk(["ps", "-a", "--format", "{{.Names}} {{.Status}}"])).stdout);
    expect(all).toEqual(["three exited"]);
    const v = await inspect("three");
    expect(v.State).toEqual({ Status: "exited", Running: false, Pid: 0 });
    // exec into a sandbox whose command has exited is an error.
    const ex = await h1.knit(["exec", "three", "--", "true"]);
    expect(ex.code).not.toBe(0);
    expect(ex.stderr).toContain("sandbox three is not running");
    // An exited sandbox is removed without -f.
    expect((await h1.knitOk(["rm", "three"])).stdout).toBe("three\n");

    const rm = await h1.knit(["run", "--rm", "--network", "none", "--", "sh", "-c", "exit 4"]);
    expect(rm.code).toBe(4);
    expect((await h1.knitOk(["ps", "-aq"])).stdout).toBe("");
    expect((await h1.knit(["run", "--rm", "--network", "none", "--", "true"])).code).toBe(0);

    // knit's own errors exit 125, like docker run, so they differ from the command's codes.
    const bad = await h1.knit(["run", "--network", "nosuch", "--", "true"]);
    expect(bad.code).toBe(125);
    expect(bad.stderr).toContain("network nosuch not found");
    expect((await h1.knitOk(["ps", "-aq"])).stdout).toBe("");
  });

  test("--hostname, /etc/hosts with the sandbox's own address, the sandbox's resolv.conf", async () => {
    await h1.knitOk(["network", "create", "--subnet", "10.41.0.0/24", "names"]);
    // A host resolv.conf with a loopback resolver (as systemd-resolved has): the sandbox
    // cannot reach that one and must not get it. Bind-mounted in the lab's own mount namespace.
    const fake = join(lab.dir, "host-resolv.conf");
    writeFileSync(fake, "nameserver 127.0.0.53\nnameserver 192.0.2.53\nsearch lab.example\n");
    const realResolv = readFileSync("/etc/resolv.conf", "utf8");
    await lab.run(["mount", "--bind", fake, "/etc/resolv.conf"]);
    let s: Sb;
    try {
      s = await runSb(["--name", "named", "--hostname", "web.local", "--network", "names"]);
    } finally {
      await lab.run(["umount", "/etc/resolv.conf"]);
    }
    expect(readFileSync("/etc/resolv.conf", "utf8")).toBe(realResolv);
    expect(s.view.Config.Hostname).toBe("web.local");
    const ip = s.view.NetworkSettings.Networks["names"]?.IPAddress ?? "?";
    expect((await h1.knitOk(["exec", "named", "hostname"])).stdout).toBe("web.local\n");
    expect(hostname()).not.toBe("web.local");
    const hosts = (await h1.knitOk(["exec", "named", "cat", "/etc/hosts"])).stdout;
    expect(hosts.split("\n")).toContain(`${ip}\tweb.local`);
    expect(hosts).toContain("127.0.0.1\tlocalhost");
    const resolv = (await h1.knitOk(["exec", "named", "cat", "/etc/resolv.conf"])).stdout;
    // A user network: knit's DNS on the network's gateway, the host's search list kept.
    expect(resolv).toContain(`nameserver ${s.view.NetworkSettings.Networks["names"]?.Gateway ?? "?"}`);
    expect(resolv).not.toContain("nameserver 192.0.2.53");
    expect(resolv).toContain("search lab.example");
    expect(resolv).not.toContain("127.0.0.53");
    // Both files are mounts of the sandbox's own copies, in its own mount namespace only.
    const mounts = readFileSync(`/proc/${s.view.State.Pid}/mountinfo`, "utf8").split("\n").map((l) => l.split(" ")[4]);
    expect(mounts).toContain("/etc/hosts");
    expect(mounts).toContain("/etc/resolv.conf");
    expect(readFileSync("/etc/hosts", "utf8")).not.toContain("web.local");
    // A foreground run sees the same things.
    const fg = await h1.knitOk(["run", "--rm", "--network", "none", "--hostname", "fg", "--", "sh", "-c", "hostname; cat /etc/hosts"]);
    expect(fg.stdout.startsWith("fg\n")).toBe(true);

    await h1.knitOk(["rm", "-f", "named"]);
    await h1.knitOk(["network", "rm", "names"]);
  });

  test("--network none has only lo; --network host sees the host's interfaces", async () => {
    const none = JSON.parse((await h1.knitOk(["run", "--rm", "--network", "none", "--", "ip", "-j", "link", "show"])).stdout) as IpLink[];
    expect(none.map((l) => l.ifname)).toEqual(["lo"]);
    const s = await runSb(["--name", "isolated", "--network", "none"]);
    expect(await linkNames(s.ns)).toEqual(["lo"]);
    expect(s.view.NetworkSettings.Networks["none"]?.IPAddress).toBe("");
    expect(s.view.NetworkSettings.Networks["none"]?.MacAddress).toBe("");
    await h1.knitOk(["rm", "-f", "isolated"]);

    const host = JSON.parse((await h1.knitOk(["run", "--rm", "--network", "host", "--", "ip", "-j", "link", "show"])).stdout) as IpLink[];
    expect(host.map((l) => l.ifname).sort()).toEqual(await linkNames(h1));
    expect(host.map((l) => l.ifname)).toContain("eth0");
    const hs = await runSb(["--name", "hostnet", "--network", "host"]);
    expect(hs.view.NetworkSettings.SandboxKey).toBe("host");
    expect(nsInode(`/proc/${hs.view.State.Pid}/ns/net`)).toBe(nsInode(h1.path));
    expect(hs.view.Config.Hostname).toBe(hostname());
    await h1.knitOk(["rm", "-f", "hostnet"]);

    const mixed = await h1.knit(["run", "--network", "host", "--network", "none", "--", "true"]);
    expect(mixed.code).toBe(125);
    expect(mixed.stderr).toContain("conflicting options");
  });

  test("run with two --network flags: eth0 and eth1, each on its own network, the first one's gateway preferred", async () => {
    await h1.knitOk(["network", "create", "--subnet", "10.42.0.0/24", "front"]);
    await h1.knitOk(["network", "create", "--subnet", "10.43.0.0/24", "back"]);
    const s = await runSb(["--name", "two", "--network", "front", "--network", "back", "--ip", "10.42.0.9"]);
    expect(await globalAddrs(s.ns)).toEqual({ eth0: ["10.42.0.9/24"], eth1: ["10.43.0.2/24"] });
    expect(s.view.NetworkSettings.Networks["front"]?.InterfaceName).toBe("eth0");
    expect(s.view.NetworkSettings.Networks["back"]?.InterfaceName).toBe("eth1");
    expect(s.view.HostConfig.NetworkMode).toBe("front,back");
    // One default route per interface; the first network's (metric 0) is the one used.
    const routes = await ipj<{ gateway?: string; dev: string; metric?: number }>(s.ns, ["-4", "route", "show", "default"]);
    expect(routes.map((r) => [r.gateway, r.dev, r.metric ?? 0])).toEqual([["10.42.0.1", "eth0", 0], ["10.43.0.1", "eth1", 1]]);
    const used = await ipj<{ gateway?: string }>(s.ns, ["-4", "route", "get", INTERNET.server4]);
    expect(used[0]?.gateway).toBe("10.42.0.1");
    expect(await lab.waitPing(s.ns, "10.42.0.1")).toBe(true);
    expect(await lab.waitPing(s.ns, "10.43.0.1")).toBe(true);
    expect(await lab.waitPing(s.ns, INTERNET.server4)).toBe(true);
    expect((await h1.knitOk(["ps", "--format", "{{.Names}} {{.Networks}}"])).stdout).toBe("two back,front\n");
    await h1.knitOk(["rm", "-f", "two"]);
    await h1.knitOk(["network", "rm", "front", "back"]);
  });

  test("leaving the network that holds the default route moves it to a remaining network", async () => {
    await h1.knitOk(["network", "create", "--subnet", "10.42.0.0/24", "front"]);
    await h1.knitOk(["network", "create", "--subnet", "10.43.0.0/24", "back"]);
    const s = await runSb(["--name", "two", "--network", "front", "--network", "back"]);
    const gw = (await ipj<{ gateway?: string }>(s.ns, ["-4", "route", "show", "default"]))[0]?.gateway;
    await h1.knitOk(["network", "disconnect", gw === "10.42.0.1" ? "front" : "back", "two"]);
    expect(await ipj<{ gateway?: string }>(s.ns, ["-4", "route", "show", "default"])).toHaveLength(1);
    expect(await lab.waitPing(s.ns, INTERNET.server4)).toBe(true);
    await h1.knitOk(["rm", "-f", "two"]);
    await h1.knitOk(["network", "rm", "front", "back"]);
  });

  test("run -d --rm removes the sandbox once its command exits", async () => {
    await h1.knitOk(["run", "-d", "--rm", "--network", "none", "--name", "gone", "--", "true"]);
    expect(await waitFor(async () => (await h1.knitOk(["ps", "-aq"])).stdout === "", 3000)).toBe(true);
  });

  test("connect a namespace knit did not make: an ip netns name, a path, pid:N", async () => {
    await h1.knitOk(["network", "create", "--subnet", "10.44.0.0/24", "ext"]);
    const peer = await runSb(["--name", "peer", "--network", "ext"]);
    const named = await lab.ns("extnamed");
    const byPath = await lab.ns("extpath");
    const byPid = await lab.ns("extpid");
    const nsFile = join(lab.dir, "extpath.ns");
    writeFileSync(nsFile, "");
    await lab.run(["mount", "--bind", byPath.path, nsFile]);
    const sleeper = byPid.spawn(["sleep", "1000"]);
    try {
      const cases = [
        { ref: named.name, node: named as NetnsRef, ip: undefined },
        { ref: nsFile, node: byPath as NetnsRef, ip: "10.44.0.77" },
        { ref: `pid:${sleeper.pid}`, node: byPid as NetnsRef, ip: undefined },
      ];
      for (const c of cases) {
        await h1.knitOk(["network", "connect", ...(c.ip ? ["--ip", c.ip] : []), "ext", c.ref]);
        const v = await inspect(c.ref);
        expect(v.Kind).toBe("netns");
        const ep = v.NetworkSettings.Networks["ext"];
        if (c.ip) expect(ep?.IPAddress).toBe(c.ip);
        expect(await globalAddrs(c.node)).toEqual({ eth0: [`${ep?.IPAddress ?? "?"}/24`] });
        const eth0 = (await ipj<IpLink>(c.node, ["link", "show", "eth0"]))[0];
        expect(eth0?.address).toBe(ep?.MacAddress ?? "?");
        expect(await lab.waitPing(peer.ns, ep?.IPAddress ?? "?")).toBe(true);
        expect(await lab.waitPing(c.node, "10.44.0.1")).toBe(true);
        const containers = Object.values((JSON.parse((await h1.knitOk(["network", "inspect", "ext"])).stdout) as NetworkView[])[0]?.Containers ?? {});
        expect(containers.map((x) => x.Name).sort()).toEqual(["peer", c.ref].sort());
        // Not a knit sandbox: ps does not list it and rm refuses it.
        expect(lines((await h1.knitOk(["ps", "-a", "--format", "{{.Names}}"])).stdout)).toEqual(["peer"]);
        const rm = await h1.knit(["rm", c.ref]);
        expect(rm.code).toBe(1);
        expect(rm.stderr).toContain("is not a knit sandbox");

        await h1.knitOk(["network", "disconnect", "ext", c.ref]);
        expect(await linkNames(c.node)).toEqual(["lo"]);
        expect((await ipj<IpLink>(h1, ["-d", "link", "show"])).some((l) => l.ifalias === `knit:${ep?.EndpointID ?? ""}`)).toBe(false);
        const after = await h1.knit(["inspect", c.ref]);
        expect(after.code).toBe(1);
        expect(after.stderr).toContain(`no such object: ${c.ref}`);
        // The namespace itself is not knit's: it stays.
        expect(existsSync(c.node.path)).toBe(true);
      }
      expect(sleeper.running).toBe(true);
      const missing = await h1.knit(["network", "connect", "ext", "pid:999999"]);
      expect(missing.code).toBe(1);
      expect(missing.stderr).toContain("no process with pid 999999");
    } finally {
      await sleeper.stop();
      await lab.run(["umount", nsFile]);
    }
    await h1.knitOk(["rm", "-f", "peer"]);
    await h1.knitOk(["network", "rm", "ext"]);
  });

  test("addresses: --ip in use is refused; rm releases it; names are unique", async () => {
    await h1.knitOk(["network", "create", "--subnet", "10.45.0.0/24", "addr"]);
    const first = await runSb(["--name", "first", "--network", "addr", "--ip", "10.45.0.50"]);
    expect(await globalAddrs(first.ns)).toEqual({ eth0: ["10.45.0.50/24"] });
    const taken = await h1.knit(["run", "-d", "--name", "second", "--network", "addr", "--ip", "10.45.0.50", "--", "sleep", "1000"]);
    expect(taken.code).toBe(125);
    expect(taken.stderr).toContain("Address already in use");
    const dup = await h1.knit(["run", "-d", "--name", "first", "--network", "addr", "--", "sleep", "1000"]);
    expect(dup.code).toBe(125);
    expect(dup.stderr).toContain('the sandbox name "first" is already in use');
    const gw = await h1.knit(["run", "-d", "--name", "second", "--network", "addr", "--ip", "10.45.0.1", "--", "sleep", "1000"]);
    expect(gw.code).toBe(125);
    expect(lines((await h1.knitOk(["ps", "-a", "--format", "{{.Names}}"])).stdout)).toEqual(["first"]);

    await h1.knitOk(["rm", "-f", "first"]);
    const second = await runSb(["--name", "second", "--network", "addr", "--ip", "10.45.0.50"]);
    expect(await globalAddrs(second.ns)).toEqual({ eth0: ["10.45.0.50/24"] });
    expect(await lab.waitPing(second.ns, "10.45.0.1")).toBe(true);
    // The name is free again too.
    const again = await runSb(["--name", "first", "--network", "addr"]);
    expect(again.view.NetworkSettings.Networks["addr"]?.IPAddress).not.toBe("10.45.0.50");
    await h1.knitOk(["rm", "-f", "second", "first"]);
    await h1.knitOk(["network", "rm", "addr"]);
  });
});
