/**
 * knit next to a real Docker daemon on one host. dockerd (Debian's 20.10) starts first in a
 * fresh lab host, so it finds IPv4 forwarding off and does what it does on any machine: turns
 * it on, sets the iptables FORWARD policy to DROP, installs its chains (DOCKER-USER first)
 * and switches br_netfilter's bridge-nf-call-iptables on. Then knit works on the same host:
 *
 *   internet (198.51.100.10) ── r ── lan 10.40.0.0/24 ── h 10.40.0.11  dockerd + knit
 *
 *   h: docker0 172.17.0.0/16    container dc
 *      knit0   (knit's predefined bridge)   sandbox p1
 *      ka      (a knit network)             sandboxes a1, a2   (+ dc, connected by knit)
 *      kb      (a knit network)             sandbox b1
 *
 * The internet routes only 10.40.0.0/24 back to r: whatever reaches the internet server from a
 * sandbox or a container was masqueraded by its host. Every check reads the kernel (ip -j,
 * iptables -S / iptables-save) or sends real traffic. The file's last test removes everything
 * and proves nothing is left.
 */
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { INTERNET, Lab, type LabHost, type NetnsRef, waitFor } from "../src/lab/lab.ts";
import { DOCKER_CLI, type DockerDaemon, dockerMissing, startDocker } from "../src/lab/docker.ts";
import { cidrOverlaps, parseCidr } from "../src/net/ip.ts";
import { assertHostClean } from "./leaks.ts";

setDefaultTimeout(90_000);

const missing = dockerMissing();
const title = missing ? `knit next to Docker (skipped: ${missing})` : "knit next to Docker";

interface EndpointView {
  IPAddress: string;
  IPPrefixLen: number;
  Gateway: string;
}
interface SandboxView {
  NetworkSettings: { SandboxKey: string; Networks: Record<string, EndpointView> };
}
interface NetworkView {
  Id: string;
  IPAM: { Config: { Subnet: string; Gateway?: string }[] };
  Containers: Record<string, { Name: string; IPv4Address: string }>;
}
interface IpAddr {
  ifname: string;
  addr_info: { family: string; local: string; prefixlen: number }[];
}

/** A knit sandbox: its namespace and its address on each network. */
interface Sb {
  ns: NetnsRef;
  ip: Record<string, string>;
}

const DOCKER0 = parseCidr("172.17.0.0/16");

describe.skipIf(missing !== undefined)(title, () => {
  let lab: Lab;
  let h: LabHost;
  let d: DockerDaemon;
  /** Docker's container on docker0 and its address there. */
  let dcIp = "";
  /** iptables-save of the host with Docker's state only, before knit did anything. */
  let dockerTablesBefore = "";
  const sb: Record<string, Sb> = {};
  const bridges: Record<string, string> = {};
  /** Environment that lets knit find the lab's Docker daemon (for `connect NET <container>`). */
  let dockerEnv: Record<string, string> = {};

  /** iptables-save and ip6tables-save output without comments, counters and knit's own rules and chain. */
  async function dockerTables(): Promise<string> {
    const lines: string[] = [];
    for (const tool of ["iptables-save", "ip6tables-save"]) {
      const r = await h.exec([tool]);
      for (const l of r.stdout.split("\n")) {
        if (l === "" || l.startsWith("#") || /--comment "?knit"?( |$)/.test(l) || l.startsWith(":KNIT-USER ")) continue;
        lines.push(`${tool}: ${l.replace(/\[\d+:\d+\]/, "[*]")}`);
      }
    }
    return lines.join("\n");
  }

  /** Knit's rules in DOCKER-USER and in its own chain KNIT-USER, as `iptables -S` prints them. */
  async function knitDockerUser(): Promise<string[]> {
    const r = await h.exec(["iptables", "-S"]);
    return r.stdout.split("\n").filter((l) => l.includes("--comment knit") && /^-A (DOCKER-USER|KNIT-USER) /.test(l));
  }

  /** The one rule knit keeps in DOCKER-USER. */
  const JUMP = "-A DOCKER-USER -m comment --comment knit -j KNIT-USER";

  /** The iptables-family tools that have Docker's chain on the host (Docker 20.10: IPv4 only). */
  async function dockerFamilies(): Promise<string[]> {
    const out: string[] = [];
    for (const tool of ["iptables", "ip6tables"]) if ((await h.exec([tool, "-S", "DOCKER-USER"], { check: false })).code === 0) out.push(tool);
    return out;
  }

  /** Run knit with KNIT_TRACE=1; the kernel commands it ran (tool and arguments, no times). */
  async function tracedCommands(args: readonly string[]): Promise<string[]> {
    const r = await h.knitOk(args, { env: { KNIT_TRACE: "1" } });
    const line = r.stderr.split("\n").find((l) => l.startsWith("knit-trace: "));
    if (!line) throw new Error(`no knit-trace line in:\n${r.stderr}`);
    return (JSON.parse(line.slice("knit-trace: ".length)) as { commands: string[] }).commands.map((c) => c.replace(/^\S+ /, ""));
  }

  /** The iptables processes among traced commands, by tool name. */
  const xtables = (commands: readonly string[]): string[] => commands.filter((c) => /^ip6?tables/.test(c)).map((c) => c.split(" ")[0] ?? "");

  async function run(name: string, nets: readonly string[]): Promise<Sb> {
    await h.knitOk(["run", "-d", "--name", name, ...nets.flatMap((n) => ["--network", n]), "--", "sleep", "3600"]);
    const v = (JSON.parse((await h.knitOk(["inspect", name])).stdout) as SandboxView[])[0];
    if (!v) throw new Error(`no inspect output for ${name}`);
    const s: Sb = { ns: { path: v.NetworkSettings.SandboxKey }, ip: {} };
    for (const [net, ep] of Object.entries(v.NetworkSettings.Networks)) s.ip[net] = ep.IPAddress;
    sb[name] = s;
    return s;
  }

  async function inspectNet(name: string): Promise<NetworkView> {
    const v = (JSON.parse((await h.knitOk(["network", "inspect", name])).stdout) as NetworkView[])[0];
    if (!v) throw new Error(`no inspect output for network ${name}`);
    return v;
  }

  /** Ping once from inside Docker's container; true when a reply came back in time. */
  async function pingFromContainer(addr: string, waitSec = 2): Promise<boolean> {
    return (await d.docker(["exec", "dc", "ping", "-c1", `-W${waitSec}`, addr])).code === 0;
  }

  /** For positive checks: ping from the container until a reply comes (a fresh path may lose the first). */
  async function containerReaches(addr: string): Promise<boolean> {
    return waitFor(() => pingFromContainer(addr, 1), 8000, 0);
  }

  beforeAll(async () => {
    lab = await Lab.create("dkc");
    const lan = await lab.lan("lan");
    await lab.router("r", [{ lan, addresses: ["10.40.0.1/24"] }], { internet: true });
    h = await lab.host("h");
    await lab.plug(h, lan, { addresses: ["10.40.0.11/24"] });
    d = await startDocker(h);
    await d.ensureBusyboxImage();
    await d.dockerOk(["run", "-d", "--name", "dc", "bb", "sleep", "3600"]);
    dcIp = (await d.dockerOk(["inspect", "-f", "{{.NetworkSettings.IPAddress}}", "dc"])).stdout.trim();
    dockerEnv = { DOCKER_HOST: d.dockerHost, KNIT_DOCKER: DOCKER_CLI };
    dockerTablesBefore = await dockerTables();
  }, 180_000);

  afterAll(async () => {
    await lab.cleanup();
  });

  test("dockerd runs in the lab host with its own firewall: FORWARD DROP, DOCKER-USER, br_netfilter", async () => {
    expect(dcIp).toMatch(/^172\.17\.\d+\.\d+$/);
    const forward = (await h.exec(["iptables", "-S", "FORWARD"])).stdout;
    expect(forward).toContain("-P FORWARD DROP");
    expect(forward.split("\n")[1]).toBe("-A FORWARD -j DOCKER-USER");
    expect((await h.exec(["sysctl", "-n", "net.bridge.bridge-nf-call-iptables"])).stdout.trim()).toBe("1");
    const docker0 = JSON.parse((await h.exec(["ip", "-j", "addr", "show", "docker0"])).stdout) as IpAddr[];
    expect(docker0[0]?.addr_info.some((a) => a.local === "172.17.0.1" && a.prefixlen === 16)).toBe(true);
    // Knit has done nothing yet: no knit rule anywhere.
    expect(await knitDockerUser()).toEqual([]);
  });

  test("pools avoid docker0: knit's predefined bridge takes 172.18.0.0/16, new networks others", async () => {
    await h.knitOk(["network", "create", "ka"]);
    // A second network: its nft rules are added in place (one `nft -f`), and its DOCKER-USER
    // rules appended in one iptables-restore per family with Docker's chain, nothing read.
    const commands = await tracedCommands(["network", "create", "kb"]);
    expect(commands.filter((c) => c.startsWith("nft "))).toEqual(["nft -f -"]);
    expect(xtables(commands)).toEqual((await dockerFamilies()).map((t) => `${t}-restore`));
    const predefined = await inspectNet("bridge");
    expect(predefined.IPAM.Config.map((c) => c.Subnet)).toEqual(["172.18.0.0/16"]);
    for (const name of ["ka", "kb"]) {
      const net = await inspectNet(name);
      bridges[name] = `br-${net.Id.slice(0, 12)}`;
      for (const c of net.IPAM.Config) {
        expect(cidrOverlaps(parseCidr(c.Subnet), DOCKER0)).toBe(false);
        expect(c.Subnet).not.toBe("172.18.0.0/16");
      }
    }
    // knit0 comes up on first use with the gateway of that pool.
    const p1 = await run("p1", ["bridge"]);
    const knit0 = JSON.parse((await h.exec(["ip", "-j", "addr", "show", "knit0"])).stdout) as IpAddr[];
    expect(knit0[0]?.addr_info.some((a) => a.local === "172.18.0.1" && a.prefixlen === 16)).toBe(true);
    expect(p1.ip.bridge).toMatch(/^172\.18\./);
  });

  test("DOCKER-USER lets knit's traffic through Docker's DROP: same network works, masquerade reaches the internet", async () => {
    const a1 = await run("a1", ["ka"]);
    const a2 = await run("a2", ["ka"]);
    const p1 = sb.p1;
    if (!p1) throw new Error("p1 missing");
    const rules = await knitDockerUser();
    expect(rules.filter((l) => l.startsWith("-A DOCKER-USER "))).toEqual([JUMP]);
    for (const br of [bridges.ka, bridges.kb, "knit0"]) {
      expect(rules).toContain(`-A KNIT-USER -i ${br} -m comment --comment knit -j DOCKER-ISOLATION-STAGE-2`);
      expect(rules).toContain(`-A KNIT-USER -i ${br} -m comment --comment knit -j ACCEPT`);
      expect(rules).toContain(`-A KNIT-USER -o ${br} -m comment --comment knit -j ACCEPT`);
    }
    expect((await h.exec(["iptables", "-S", "DOCKER-USER"])).stdout.split("\n")[1]).toBe(JUMP); // first
    // Bridged traffic goes through iptables (br_netfilter), and FORWARD drops by default.
    expect(await lab.waitPing(a1.ns, a2.ip.ka ?? "")).toBe(true);
    expect(await lab.waitPing(a2.ns, a1.ip.ka ?? "")).toBe(true);
    // The internet has no route back to 172.x: a reply proves that knit masqueraded.
    expect(await lab.waitPing(a1.ns, INTERNET.server4)).toBe(true);
    expect(await lab.waitPing(p1.ns, INTERNET.server4)).toBe(true);
    const inet = await lab.internet();
    expect(await lab.ping(inet, a1.ip.ka ?? "")).toBe(false);
  });

  test("knit networks stay isolated from each other next to Docker", async () => {
    const a1 = sb.a1;
    if (!a1) throw new Error("a1 missing");
    const b1 = await run("b1", ["kb"]);
    expect(await lab.waitPing(b1.ns, INTERNET.server4)).toBe(true);
    expect(await lab.ping(a1.ns, b1.ip.kb ?? "")).toBe(false);
    expect(await lab.ping(b1.ns, a1.ip.ka ?? "")).toBe(false);
  });

  test("Docker's container still reaches the internet", async () => {
    expect(await containerReaches(INTERNET.server4)).toBe(true);
  });

  // knit sends its bridges' traffic through Docker's DOCKER-ISOLATION-STAGE-2 (from its
  // KNIT-USER, jumped to from DOCKER-USER), and drops new traffic into its bridges from
  // non-knit interfaces.
  test("a knit sandbox cannot reach Docker's container on docker0", async () => {
    expect(await lab.waitPing(sb.a1?.ns ?? { path: "/nonexistent" }, dcIp)).toBe(false);
  });

  test("Docker's container on docker0 cannot reach a knit sandbox", async () => {
    expect(await containerReaches(sb.a1?.ip.ka ?? "192.0.2.1")).toBe(false);
  });

  test("knit network connect wires a Docker container into a knit network; disconnect takes it out", async () => {
    const a1 = sb.a1;
    if (!a1) throw new Error("a1 missing");
    await h.knitOk(["network", "connect", "ka", "dc"], { env: dockerEnv });
    const net = await inspectNet("ka");
    const entry = Object.values(net.Containers).find((c) => c.Name === "dc");
    const dcKnitIp = entry?.IPv4Address.split("/")[0] ?? "";
    expect(dcKnitIp).not.toBe("");
    // The container's own namespace got eth1 with that address, next to Docker's eth0.
    const addrs = (await d.dockerOk(["exec", "dc", "ip", "-o", "-4", "addr", "show"])).stdout;
    expect(addrs).toMatch(new RegExp(`eth1\\s+inet ${dcKnitIp.replace(/\./g, "\\.")}/`));
    expect(addrs).toMatch(new RegExp(`eth0\\s+inet ${dcIp.replace(/\./g, "\\.")}/`));
    const ports = JSON.parse((await h.exec(["ip", "-j", "link", "show", "master", bridges.ka ?? "?"])).stdout) as { ifname: string }[];
    expect(ports.length).toBe(3); // a1, a2, dc
    expect(await containerReaches(a1.ip.ka ?? "")).toBe(true);
    expect(await lab.waitPing(a1.ns, dcKnitIp)).toBe(true);

    await h.knitOk(["network", "disconnect", "ka", "dc"], { env: dockerEnv });
    expect((await d.docker(["exec", "dc", "ip", "link", "show", "eth1"])).code).not.toBe(0);
    const after = JSON.parse((await h.exec(["ip", "-j", "link", "show", "master", bridges.ka ?? "?"])).stdout) as { ifname: string }[];
    expect(after.length).toBe(2);
    expect(Object.values((await inspectNet("ka")).Containers).map((c) => c.Name).sort()).toEqual(["a1", "a2"]);
    expect((await h.knitOk(["ps", "-a", "--format", "{{.Names}}"])).stdout.split("\n")).not.toContain("dc");
    // Docker's own network is untouched: the container still reaches the internet.
    expect(await containerReaches(INTERNET.server4)).toBe(true);
  });

  test("a Docker container's name wins over a knit sandbox id prefix; a prefix alone still finds the sandbox", async () => {
    const a1Id = (JSON.parse((await h.knitOk(["inspect", "a1"])).stdout) as { Id: string }[])[0]?.Id ?? "";
    expect(a1Id).toMatch(/^[0-9a-f]{64}$/);
    // A Docker container named like the start of a1's id (CI once met "dc" by chance).
    const named = a1Id.slice(0, 6);
    await d.dockerOk(["run", "-d", "--name", named, "bb", "sleep", "3600"]);
    try {
      await h.knitOk(["network", "connect", "kb", named], { env: dockerEnv });
      expect(Object.values((await inspectNet("kb")).Containers).map((c) => c.Name).sort()).toEqual(["b1", named].sort());
      expect((await d.dockerOk(["exec", named, "ip", "-o", "-4", "addr", "show", "eth1"])).stdout).toContain("inet ");
      await h.knitOk(["network", "disconnect", "kb", named], { env: dockerEnv });
      // A longer prefix that names no container is a1's.
      await h.knitOk(["network", "connect", "kb", a1Id.slice(0, 10)], { env: dockerEnv });
      expect(Object.values((await inspectNet("kb")).Containers).map((c) => c.Name).sort()).toEqual(["a1", "b1"]);
      await h.knitOk(["network", "disconnect", "kb", a1Id.slice(0, 10)], { env: dockerEnv });
      expect(Object.values((await inspectNet("kb")).Containers).map((c) => c.Name)).toEqual(["b1"]);
    } finally {
      await h.knit(["network", "disconnect", "-f", "kb", named], { env: dockerEnv });
      await h.knit(["network", "disconnect", "-f", "kb", "a1"]);
      await d.docker(["rm", "-f", named]);
    }
  });

  test("knit leaves Docker's chains as they were; its DOCKER-USER rules go with its networks", async () => {
    expect(await dockerTables()).toBe(dockerTablesBefore);
    await h.knitOk(["rm", "-f", "b1"]);
    // knit's chain is rewritten in one iptables-restore per family with Docker's chain.
    expect(xtables(await tracedCommands(["network", "rm", "kb"]))).toEqual((await dockerFamilies()).map((t) => `${t}-restore`));
    const rules = await knitDockerUser();
    expect(rules.some((l) => l.includes(bridges.kb ?? "?"))).toBe(false);
    expect(rules.some((l) => l.includes(bridges.ka ?? "?"))).toBe(true);
    await h.knitOk(["rm", "-f", "a1", "a2", "p1"]);
    await h.knitOk(["network", "rm", "ka"]);
    // Only the predefined bridge is left: knit0 stays once made, as docker0 does, and so do
    // its two accepts.
    expect(await knitDockerUser()).toEqual([
      JUMP,
      "-A KNIT-USER -i knit0 -m comment --comment knit -j DOCKER-ISOLATION-STAGE-2",
      "-A KNIT-USER -i knit0 -m comment --comment knit -j ACCEPT",
      "-A KNIT-USER -o knit0 -m comment --comment knit -j ACCEPT",
    ]);
    expect(await dockerTables()).toBe(dockerTablesBefore);
    // Docker still works as before.
    expect(await containerReaches(INTERNET.server4)).toBe(true);
  });

  test("after Docker stops, nothing of knit's or Docker's is left on the host", async () => {
    await d.dockerOk(["rm", "-f", "dc"]);
    await d.stop();
    // docker0 stays after dockerd exits, as on any machine; knit0 and its table stay with
    // the predefined network.
    await assertHostClean(h, { defaultBridge: true, allowLinks: ["docker0"] });
  });
});
