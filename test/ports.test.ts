/**
 * Published ports (`knit run -p`, `knit port`) through the real CLI on a lab host: real TCP
 * and UDP traffic from another machine on the LAN, from the host itself, from sandboxes on the
 * same and on other networks, checked against `nft -j`, `conntrack` and the store. Every test
 * removes what it made; afterEach proves it.
 *
 *   lan 10.10.0.0/24, fd00:10::/64 ─┬─ h1      10.10.0.11  fd00:10::11   (knit host)
 *                                   └─ client  10.10.0.50  fd00:10::50   (a LAN machine)
 *
 * The client has no route to any sandbox subnet: whatever reaches a sandbox from it went
 * through a published port. Servers in sandboxes are small Bun programs that answer with the
 * address they see the client at, so the tests can tell a real client address from a NATed one.
 */
import { afterAll, afterEach, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { join } from "node:path";
import { Lab, type LabHost, type LabNode, type NetnsRef, REPO_ROOT, waitFor } from "../src/lab/lab.ts";
import { KnitError } from "../src/errors.ts";
import { expandPortSpec, parsePortSpec, parsePublish } from "../src/ports/spec.ts";
import { claimConflict } from "../src/ports/claims.ts";
import { openSqliteStore } from "../src/store/sqlite.ts";
import { assertHostClean, assertNoLeaks, findStoreLeaks } from "./leaks.ts";

setDefaultTimeout(60_000);

const BUN = join(REPO_ROOT, "node_modules", ".bin", "bun");
const H1 = "10.10.0.11";
const H1_6 = "fd00:10::11";
const CLIENT = "10.10.0.50";
const CLIENT_6 = "fd00:10::50";

let lab: Lab;
let h1: LabHost;
let client: LabNode;

// ---- programs run inside sandboxes and on the client --------------------------------------

/** TCP server: answers every connection with "<tag> <client address>" and closes it. */
const tcpPeerServer = (port: number, tag: string): string[] => [
  BUN,
  "-e",
  `Bun.listen({ hostname: "::", port: ${port}, socket: { open(s) { s.end(${JSON.stringify(tag)} + " " + String(s.remoteAddress).replace(/^::ffff:/, "") + "\\n"); }, data() {} } });`,
];

/** UDP server: answers every datagram with "<tag> <client address>:<port>". */
const udpPeerServer = (port: number, tag: string): string[] => [
  BUN,
  "-e",
  `await Bun.udpSocket({ hostname: "0.0.0.0", port: ${port}, socket: { data(s, _b, p, a) { s.send(${JSON.stringify(tag)} + " " + a + ":" + p, p, a); } } });`,
];

/** UDP client: from a fixed source port, sends to addr:port every 50 ms and prints replies. */
const udpClient = (srcPort: number, addr: string, port: number): string[] => [
  BUN,
  "-e",
  `const c = await Bun.udpSocket({ port: ${srcPort}, socket: { data(_s, b) { console.log("got " + b.toString()); }, error() {} } });
   setInterval(() => c.send("ping", ${port}, ${JSON.stringify(addr)}), 50);`,
];

// ---- helpers ----------------------------------------------------------------------------------

interface SandboxView {
  Id: string;
  HostConfig: { PortBindings: Record<string, { HostIp: string; HostPort: string }[]> };
  NetworkSettings: {
    SandboxKey: string;
    Ports: Record<string, { HostIp: string; HostPort: string }[]>;
    Networks: Record<string, { IPAddress: string; Gateway: string }>;
  };
}

interface Sb {
  id: string;
  ns: NetnsRef;
  view: SandboxView;
}

async function inspect(ref: string): Promise<SandboxView> {
  const v = (JSON.parse((await h1.knitOk(["inspect", ref])).stdout) as SandboxView[])[0];
  if (!v) throw new Error(`no inspect output for ${ref}`);
  return v;
}

/** `knit run -d --name NAME --network NET [-p P]... -- CMD`, inspected. */
async function run(name: string, net: string, publish: readonly string[], cmd: readonly string[] = ["sleep", "1000"]): Promise<Sb> {
  const id = (await h1.knitOk(["run", "-d", "--name", name, "--network", net, ...publish.flatMap((p) => ["-p", p]), "--", ...cmd])).stdout.trim();
  const view = await inspect(id);
  return { id, ns: { path: view.NetworkSettings.SandboxKey }, view };
}

/** A sandbox running the TCP peer server on port 80 (waits until it listens). */
async function tcpServer(name: string, net: string, publish: readonly string[], port = 80): Promise<Sb> {
  const sb = await run(name, net, publish, tcpPeerServer(port, name));
  await lab.waitListening(sb.ns, port);
  return sb;
}

/** Connect to addr:port from a namespace; the server's one-line answer, trimmed, or undefined. */
async function ask(from: NetnsRef, addr: string, port: number): Promise<string | undefined> {
  const out = await lab.tcpSend(from, addr, port, "", 2);
  return out ? out.trim() : undefined;
}

/** Rules of `table inet knit` as `nft -j` shows them (empty when there is no table). */
async function nftRules(): Promise<{ chain: string; comment?: string; expr: unknown[] }[]> {
  const r = await h1.exec(["nft", "-j", "list", "table", "inet", "knit"], { check: false });
  if (r.code !== 0) return [];
  const doc = JSON.parse(r.stdout) as { nftables: { rule?: { chain: string; comment?: string; expr: unknown[] } }[] };
  return doc.nftables.flatMap((o) => (o.rule ? [o.rule] : []));
}

/** DNAT rules naming a sandbox (their comment carries the first 12 digits of its id). */
async function dnatRulesOf(sbId: string): Promise<{ chain: string; expr: unknown[] }[]> {
  return (await nftRules()).filter((r) => r.comment?.endsWith(` ${sbId.slice(0, 12)}`));
}

/** Keys of the store under a prefix. */
async function storeKeys(prefix: string): Promise<string[]> {
  const store = await openSqliteStore(h1.stateDir);
  try {
    return (await store.list(prefix)).items.map((kv) => kv.key);
  } finally {
    await store.close();
  }
}

const routeLocalnet = async (bridge: string): Promise<string> => (await h1.exec(["sysctl", "-n", `net.ipv4.conf.${bridge}.route_localnet`])).stdout.trim();
const bridgeOf = async (net: string): Promise<string> =>
  ((JSON.parse((await h1.knitOk(["network", "inspect", net])).stdout) as { Options: Record<string, string>; Id: string }[])[0]?.Id ?? "").slice(0, 12);

/** Remove every sandbox left on h1 (after a failed test). */
async function scrub(): Promise<void> {
  const ids = (await h1.knit(["ps", "-aq", "--no-trunc"])).stdout.split("\n").filter(Boolean);
  if (ids.length) await h1.knit(["rm", "-f", ...ids]);
}

/** The networks every test of this file shares (made in beforeAll). */
const SHARED = /network (front|back) |names\/[^/]+\/networks\/(front|back) /;

afterEach(async () => {
  try {
    await assertNoLeaks(h1, {
      allowLinks: [/^br-/, "knit0"],
      allowNftTables: ["inet knit"],
      extra: async (h) => [
        ...(await findStoreLeaks(h)).filter((p) => !SHARED.test(p)),
        ...(await storeKeys("ports/")).map((k) => `store: port claim ${k} left`),
        ...(await nftRules()).filter((r) => r.chain === "published").map((r) => `nft: DNAT rule "${r.comment ?? ""}" left`),
      ],
    });
  } catch (err) {
    await scrub();
    throw err;
  }
});

beforeAll(async () => {
  lab = await Lab.create("pt");
  const lan = await lab.lan("lan");
  h1 = await lab.host("h1");
  client = await lab.ns("client");
  await lab.plug(h1, lan, { ifname: "eth0", addresses: [`${H1}/24`, `${H1_6}/64`] });
  await lab.plug(client, lan, { ifname: "eth0", addresses: [`${CLIENT}/24`, `${CLIENT_6}/64`] });
  await h1.knitOk(["network", "create", "--subnet", "172.30.1.0/24", "--ipv6", "--subnet", "fd00:30:1::/64", "front"]);
  await h1.knitOk(["network", "create", "--subnet", "172.30.2.0/24", "back"]);
});

afterAll(async () => {
  try {
    await scrub();
    for (const n of ["front", "back", "bound"]) await h1.knit(["network", "rm", n]);
    await assertHostClean(h1, { defaultBridge: true });
  } finally {
    await lab.cleanup();
  }
});

// ---- syntax (pure) ----------------------------------------------------------------------------

describe("-p syntax", () => {
  test("good forms parse as Docker reads them", () => {
    const one = (raw: string) => expandPortSpec(parsePortSpec(raw)).map((r) => [r.hostIp, r.hostPorts ? `${r.hostPorts.start}-${r.hostPorts.end}` : "auto", r.containerPort, r.proto]);
    expect(one("80")).toEqual([["", "auto", 80, "tcp"]]);
    expect(one("8080:80")).toEqual([["", "8080-8080", 80, "tcp"]]);
    expect(one("8080:80/UDP")).toEqual([["", "8080-8080", 80, "udp"]]);
    expect(one("127.0.0.1::80")).toEqual([["127.0.0.1", "auto", 80, "tcp"]]);
    expect(one("10.0.0.1:8080:80/udp")).toEqual([["10.0.0.1", "8080-8080", 80, "udp"]]);
    expect(one("[::]:8080:80")).toEqual([["::", "8080-8080", 80, "tcp"]]);
    expect(one("[2001:DB8:0::1]:8080:80")).toEqual([["2001:db8::1", "8080-8080", 80, "tcp"]]);
    expect(one("::1:8080:80")).toEqual([["::1", "8080-8080", 80, "tcp"]]);
    expect(one("8000-8001:80-81")).toEqual([
      ["", "8000-8000", 80, "tcp"],
      ["", "8001-8001", 81, "tcp"],
    ]);
    expect(one("8000-8010:80")).toEqual([["", "8000-8010", 80, "tcp"]]);
    expect(one("80-81")).toEqual([
      ["", "auto", 80, "tcp"],
      ["", "auto", 81, "tcp"],
    ]);
    expect(parsePublish(["80", "90-91/udp"])).toHaveLength(3);
  });

  test("wildcards conflict with every address of their family, not with the other family", () => {
    const sb = "a".repeat(64);
    expect(claimConflict({ "0.0.0.0": sb }, "10.0.0.1")).toBe(sb);
    expect(claimConflict({ "10.0.0.1": sb }, "0.0.0.0")).toBe(sb);
    expect(claimConflict({ "10.0.0.1": sb }, "10.0.0.1")).toBe(sb);
    expect(claimConflict({ "10.0.0.1": sb }, "10.0.0.2")).toBeUndefined();
    expect(claimConflict({ "::": sb }, "0.0.0.0")).toBeUndefined();
    expect(claimConflict({ "0.0.0.0": sb }, "2001:db8::1")).toBeUndefined();
    expect(claimConflict({ "2001:db8::1": sb }, "::")).toBe(sb);
  });
});

/** Every bad -p form, with what the error must say. */
const BAD_FORMS: [string, RegExp][] = [
  ["", /empty port specification/],
  ["http", /container port "http" is not a port number/],
  ["0", /container port 0 is out of range: ports are 1 to 65535/],
  ["65536", /container port 65536 is out of range/],
  ["8080:0", /container port 0 is out of range/],
  ["0:80", /host port 0 is out of range/],
  ["70000:80", /host port 70000 is out of range/],
  ["-1", /container port "-1" is not a port number/],
  ["80-70", /container port range 80-70 ends before it starts/],
  ["80-", /container port "80-" is not a port number/],
  ["8080-8081:80-82", /host range 8080-8081 \(2 ports\) and container range 80-82 \(3 ports\) differ in length/],
  ["8080:80-81", /host range 8080 \(1 port\) and container range 80-81 \(2 ports\) differ in length/],
  ["80/xyz", /unknown protocol "xyz": use tcp or udp/],
  ["80/sctp", /knit publishes tcp and udp ports, not sctp/],
  ["80/", /missing protocol after '\/'/],
  ["80/tcp/udp", /more than one '\/'/],
  ["8080:", /missing container port/],
  [" 80", /contains whitespace/],
  ["1.2.3.999:8080:80", /host IP "1.2.3.999" is not an IPv4 or IPv6 address/],
  ["[1.2.3.4]:8080:80", /brackets are for IPv6 addresses only/],
  ["8080:80:90", /host IP "8080" is not an IPv4 or IPv6 address/],
  ["[::1]:80", /host port "1]" is not a port number/],
];

describe("bad -p input", () => {
  for (const [form, message] of BAD_FORMS) {
    test(`-p ${JSON.stringify(form)} is refused by the parser`, () => {
      let err: unknown;
      try {
        parsePortSpec(form);
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(KnitError);
      expect((err as KnitError).message).toMatch(message);
    });
  }

  test("every bad form makes knit run exit 125 with the error and leave nothing", async () => {
    const results = await Promise.all(BAD_FORMS.map(([form]) => h1.knit(["run", "-d", "--network", "front", "-p", "8080:80", "-p", form, "--", "sleep", "100"])));
    for (const [i, [form, message]] of BAD_FORMS.entries()) {
      const r = results[i];
      expect(r?.code, `-p ${JSON.stringify(form)}`).toBe(125);
      expect(r?.stderr).toMatch(message);
      expect(r?.stderr).toContain("[hostIP:][hostPort[-end]:]containerPort"); // the hint
    }
    expect((await h1.knitOk(["ps", "-aq"])).stdout).toBe("");
  });

  test("ports on host, none, internal and IPv4-only networks are refused clearly", async () => {
    await h1.knitOk(["network", "create", "--internal", "--subnet", "172.30.9.0/24", "inner"]);
    try {
      const cases: [string[], RegExp][] = [
        [["--network", "host", "-p", "80"], /published ports need a bridge network: the host network/],
        [["--network", "none", "-p", "80"], /published ports need a bridge network: the none network/],
        [["--network", "inner", "-p", "80"], /network inner is internal/],
        [["--network", "back", "-p", "[::]:8080:80"], /network back has no IPv6/],
        [["--network", "front", "-p", "[::1]:8080:80"], /cannot be published on ::1/],
        [["--network", "front", "-p", "10.9.9.9:8080:80"], /host IP 10.9.9.9 is not an address of this host/],
      ];
      for (const [args, message] of cases) {
        const r = await h1.knit(["run", "-d", ...args, "--", "sleep", "100"]);
        expect(r.code, args.join(" ")).toBe(125);
        expect(r.stderr).toMatch(message);
      }
      expect((await h1.knitOk(["ps", "-aq"])).stdout).toBe("");
    } finally {
      await h1.knitOk(["network", "rm", "inner"]);
    }
  });
});

// ---- traffic ----------------------------------------------------------------------------------

describe("published TCP ports", () => {
  test("reachable from the LAN (real client address), the host, hairpin and other networks", async () => {
    const front = await bridgeOf("front");
    expect(await ask(client, H1, 8080)).toBeUndefined(); // nothing published yet
    const web = await tcpServer("web", "front", ["8080:80"]);
    const gwFront = web.view.NetworkSettings.Networks.front?.Gateway;
    const peer = await run("peer", "front", []);
    const other = await run("other", "back", []);

    // Another machine on the LAN: no userland proxy, the server sees the client's own address.
    expect(await ask(client, H1, 8080)).toBe(`web ${CLIENT}`);
    // The host itself, through its LAN address and through 127.0.0.1.
    expect(await ask(h1, H1, 8080)).toBe(`web ${H1}`);
    expect(await ask(h1, "127.0.0.1", 8080)).toBe(`web ${gwFront}`);
    expect(await routeLocalnet(`br-${front}`)).toBe("1");
    // Hairpin: a sandbox on the same network, and the server itself, through the host address.
    expect(await ask(peer.ns, H1, 8080)).toBe(`web ${gwFront}`);
    expect(await ask(web.ns, H1, 8080)).toBe(`web ${gwFront}`);
    // A sandbox on another network, through the host address; its own address stays isolated.
    expect(await ask(other.ns, H1, 8080)).toBe(`web ${gwFront}`); // masqueraded by its own network's rule
    expect(await ask(other.ns, web.view.NetworkSettings.Networks.front?.IPAddress ?? "", 80)).toBeUndefined();
    // Only the published port: 8081 goes nowhere.
    expect(await ask(client, H1, 8081)).toBeUndefined();

    // The kernel's view: one DNAT rule, in the published chain, to the sandbox's address.
    const rules = await dnatRulesOf(web.id);
    expect(rules.map((r) => r.chain)).toEqual(["published"]);
    expect(JSON.stringify(rules[0]?.expr)).toContain(`{"dnat":{"family":"ip","addr":"${web.view.NetworkSettings.Networks.front?.IPAddress}","port":80}}`);
    expect(await storeKeys("ports/")).toEqual(["ports/h1/tcp/8080"]);

    // knit port and inspect.
    expect((await h1.knitOk(["port", "web"])).stdout).toBe("80/tcp -> 0.0.0.0:8080\n");
    expect((await h1.knitOk(["port", "web", "80/tcp"])).stdout).toBe("0.0.0.0:8080\n");
    const miss = await h1.knit(["port", "web", "81"]);
    expect(miss.code).toBe(1);
    expect(miss.stderr).toContain("no public port '81/tcp' published for web");
    expect(web.view.NetworkSettings.Ports).toEqual({ "80/tcp": [{ HostIp: "0.0.0.0", HostPort: "8080" }] });
    expect(web.view.HostConfig.PortBindings).toEqual({ "80/tcp": [{ HostIp: "", HostPort: "8080" }] });

    // rm removes the rules with the sandbox: nothing in nft names it, nothing answers.
    await h1.knitOk(["rm", "-f", "web", "peer", "other"]);
    expect(await dnatRulesOf(web.id)).toEqual([]);
    expect(await ask(client, H1, 8080)).toBeUndefined();
    expect(await routeLocalnet(`br-${front}`)).toBe("0");
  });

  test("IPv6: [::]:PORT reaches the sandbox's IPv6 address with the client's real address", async () => {
    const web = await tcpServer("web6", "front", ["[::]:8086:80", "8087:80"]);
    expect(await ask(client, H1_6, 8086)).toBe(`web6 ${CLIENT_6}`);
    expect(await ask(client, H1, 8087)).toBe(`web6 ${CLIENT}`);
    expect(await ask(client, H1_6, 8087)).toBeUndefined(); // published on IPv4 only
    expect((await h1.knitOk(["port", "web6"])).stdout).toBe("80/tcp -> 0.0.0.0:8087\n80/tcp -> [::]:8086\n");
    await h1.knitOk(["rm", "-f", web.id]);
    expect(await ask(client, H1_6, 8086)).toBeUndefined();
  });

  test("-p 80 and ranges pick free host ports, skipping claimed and listening ones", async () => {
    const listener = await lab.tcpEchoServer(h1, 20000);
    try {
      const holder = await run("holder", "front", ["20001:81"]);
      const web = await tcpServer("pick", "front", ["20000-20003:80", "80", "127.0.0.1::80"]);
      const ports = web.view.NetworkSettings.Ports["80/tcp"] ?? [];
      expect(ports).toHaveLength(3);
      const [ranged, anyPort, local] = [ports.find((p) => p.HostPort.startsWith("2000")), ports.find((p) => p.HostIp === "0.0.0.0" && !p.HostPort.startsWith("2000")), ports.find((p) => p.HostIp === "127.0.0.1")];
      expect(ranged).toEqual({ HostIp: "0.0.0.0", HostPort: "20002" }); // 20000 listens, 20001 is claimed
      expect(Number(anyPort?.HostPort)).toBeGreaterThanOrEqual(49153);
      expect(Number(anyPort?.HostPort)).toBeLessThanOrEqual(65535);
      expect(web.view.HostConfig.PortBindings["80/tcp"]?.map((b) => `${b.HostIp}:${b.HostPort}`).sort()).toEqual(["127.0.0.1:", ":", ":20000-20003"]);
      expect(await ask(client, H1, 20002)).toBe(`pick ${CLIENT}`);
      expect(await ask(client, H1, Number(anyPort?.HostPort))).toBe(`pick ${CLIENT}`);
      // 127.0.0.1 only: the host reaches it through loopback, the LAN cannot.
      expect(await ask(h1, "127.0.0.1", Number(local?.HostPort))).toMatch(/^pick /);
      expect(await ask(client, H1, Number(local?.HostPort))).toBeUndefined();
      await h1.knitOk(["rm", "-f", web.id, holder.id]);
    } finally {
      await listener.stop();
    }
  });

  test("the predefined bridge network publishes too", async () => {
    const web = await tcpServer("dflt", "bridge", ["8089:80"]);
    expect(await ask(client, H1, 8089)).toBe(`dflt ${CLIENT}`);
    expect(await ask(h1, "127.0.0.1", 8089)).toMatch(/^dflt /);
    await h1.knitOk(["rm", "-f", web.id]);
    expect(await ask(client, H1, 8089)).toBeUndefined();
  });

  test("host_binding_ipv4 sets the default host IP of a network's ports", async () => {
    await h1.knitOk(["network", "create", "--subnet", "172.30.3.0/24", "-o", `com.docker.network.bridge.host_binding_ipv4=${H1}`, "bound"]);
    try {
      const web = await tcpServer("bound-web", "bound", ["8088:80"]);
      expect((await h1.knitOk(["port", "bound-web"])).stdout).toBe(`80/tcp -> ${H1}:8088\n`);
      expect(web.view.HostConfig.PortBindings).toEqual({ "80/tcp": [{ HostIp: "", HostPort: "8088" }] });
      expect(await ask(client, H1, 8088)).toBe(`bound-web ${CLIENT}`);
      // Not on the host's other addresses: 127.0.0.1 stays the host's own.
      expect(await ask(h1, "127.0.0.1", 8088)).toBeUndefined();
      await h1.knitOk(["rm", "-f", web.id]);
    } finally {
      await h1.knitOk(["network", "rm", "bound"]);
    }
  });
});

describe("conflicts", () => {
  test("a port taken by knit or by a listening socket is refused clearly and leaves nothing", async () => {
    const web = await run("taken", "front", ["8080-8081:80-81", "10.10.0.11:6060:80", "7072:80/udp"]);
    const tcpListener = await lab.tcpEchoServer(h1, 7070);
    const udpListener = h1.spawn([BUN, "-e", `await Bun.udpSocket({ hostname: "0.0.0.0", port: 7071 });`]);
    try {
      expect(await waitFor(async () => (await h1.exec(["ss", "-Hlnu", "sport = :7071"])).stdout.trim() !== "")).toBe(true);
      const cases: [string[], RegExp][] = [
        [["8080:80"], /host port 0\.0\.0\.0:8080\/tcp is already published by sandbox taken/],
        [[`${H1}:8080:81`], /host port 10\.10\.0\.11:8080\/tcp is already published by sandbox taken/],
        [["6060:80"], /host port 0\.0\.0\.0:6060\/tcp is already published by sandbox taken/],
        [["7072:80/udp"], /host port 0\.0\.0\.0:7072\/udp is already published by sandbox taken/],
        [["7070:80"], /host port 0\.0\.0\.0:7070\/tcp is already in use by a program on this host/],
        [["7071:80/udp"], /host port 0\.0\.0\.0:7071\/udp is already in use by a program on this host/],
        [["5050:80", "5050:81"], /host port 0\.0\.0\.0:5050\/tcp is published twice by this command/],
        [["9090:80", "127.0.0.1:9090:81"], /host port 127\.0\.0\.1:9090\/tcp is published twice by this command/],
        [["8080-8081:80"], /no free host port for 80\/tcp on 0\.0\.0\.0 in 8080-8081/],
      ];
      for (const [publish, message] of cases) {
        const r = await h1.knit(["run", "-d", "--name", "loser", "--network", "front", "-p", "9999:99", ...publish.flatMap((p) => ["-p", p]), "--", "sleep", "100"]);
        expect(r.code, publish.join(" ")).toBe(125);
        expect(r.stderr).toMatch(message);
        // Nothing of the refused sandbox: no record, no claim (9999 is free again), no rule.
        expect((await h1.knit(["inspect", "loser"])).code).not.toBe(0);
        expect(await storeKeys("ports/")).toEqual(["ports/h1/tcp/6060", "ports/h1/tcp/8080", "ports/h1/tcp/8081", "ports/h1/udp/7072"]);
      }
      // Two commands racing for one port: exactly one wins, the other is refused.
      const race = await Promise.all(["r1", "r2"].map((n) => h1.knit(["run", "-d", "--name", n, "--network", "front", "-p", "7777:80", "--", "sleep", "100"])));
      expect(race.map((r) => r.code).sort()).toEqual([0, 125]);
      expect(race.find((r) => r.code === 125)?.stderr).toMatch(/host port 0\.0\.0\.0:7777\/tcp is already published by sandbox r[12]/);
      await h1.knitOk(["rm", "-f", race.find((r) => r.code === 0)?.stdout.trim() ?? ""]);
      // Same port, other protocol or other address: fine.
      const udp = await run("udp8080", "front", ["8080:80/udp", "127.0.0.1:6061:80"]);
      await h1.knitOk(["rm", "-f", udp.id]);
    } finally {
      await tcpListener.stop();
      await udpListener.stop();
    }
    await h1.knitOk(["rm", "-f", web.id]);
    // Released with the sandbox: the same port can be published again at once.
    const again = await run("again", "front", ["8080:80"]);
    await h1.knitOk(["rm", "-f", again.id]);
  });
});

describe("UDP", () => {
  test("mappings work and never blackhole a client that keeps sending (conntrack flush on add and remove)", async () => {
    // The client sends before anything is published: the host answers "port unreachable" and
    // conntrack keeps an entry for the flow, which a mapping added later would never see.
    const sender = lab.spawn(client, udpClient(40000, H1, 9999));
    try {
      const stale = await waitFor(async () => (await h1.exec(["conntrack", "-L", "-p", "udp", "--orig-port-dst", "9999"], { check: false })).stdout.includes("sport=40000"));
      expect(stale).toBe(true);

      const u1 = await run("u1", "front", ["9999:9999/udp"], udpPeerServer(9999, "u1"));
      expect(await waitFor(() => sender.output().includes(`got u1 ${CLIENT}:40000`), 5000)).toBe(true);

      // Replace the server: the flow DNATed to u1's address must not outlive u1.
      await h1.knitOk(["rm", "-f", u1.id]);
      const u1Ip = u1.view.NetworkSettings.Networks.front?.IPAddress ?? "";
      const flows = (await h1.exec(["conntrack", "-L", "-p", "udp", "--orig-port-dst", "9999"], { check: false })).stdout;
      expect(flows).not.toContain(`src=${u1Ip} `); // no flow is still DNATed to the removed sandbox
      const u2 = await run("u2", "front", ["9999:9999/udp"], udpPeerServer(9999, "u2"));
      expect(u2.view.NetworkSettings.Networks.front?.IPAddress).not.toBe(u1.view.NetworkSettings.Networks.front?.IPAddress);
      expect(await waitFor(() => sender.output().includes(`got u2 ${CLIENT}:40000`), 5000)).toBe(true);
      expect((await h1.knitOk(["port", "u2"])).stdout).toBe("9999/udp -> 0.0.0.0:9999\n");
      await h1.knitOk(["rm", "-f", u2.id]);
    } finally {
      await sender.stop();
    }
  });
});

describe("lifecycle", () => {
  test("gc rebuilds the DNAT rules after the table is lost; disconnect + gc drops them", async () => {
    const web = await tcpServer("keep", "front", ["8080:80"]);
    expect(await ask(client, H1, 8080)).toBe(`keep ${CLIENT}`);
    await h1.exec(["nft", "delete", "table", "inet", "knit"]);
    expect(await ask(client, H1, 8080)).toBeUndefined();
    await h1.knitOk(["gc"]);
    expect(await dnatRulesOf(web.id)).toHaveLength(1);
    expect(await ask(client, H1, 8080)).toBe(`keep ${CLIENT}`);

    // Without its endpoint the mapping publishes nothing (the claim stays with the sandbox).
    await h1.knitOk(["network", "disconnect", "front", "keep"]);
    await h1.knitOk(["gc"]);
    expect(await dnatRulesOf(web.id)).toEqual([]);
    expect(await storeKeys("ports/")).toEqual(["ports/h1/tcp/8080"]);
    await h1.knitOk(["rm", "-f", web.id]);
  });

  test("a run that fails after publishing takes its ports back at once", async () => {
    const r = await h1.knit(["run", "-d", "--name", "fail", "--network", "front", "-p", "8181:80", "--", "sleep", "100"], { env: { KNIT_FAIL_AT: "run:after-connect" } });
    expect(r.code).toBe(1); // an internal error, not the user's: exit 1 rather than 125
    expect(r.stderr).toContain("injected failure at run:after-connect");
    expect(await storeKeys("ports/")).toEqual([]);
  });

  test("a run that crashed after publishing leaves nothing once gc ran", async () => {
    for (const point of ["run:after-record", "run:after-connect"]) {
      const r = await h1.knit(["run", "-d", "--name", "crash", "--network", "front", "-p", "8181:80", "-p", "8182:80/udp", "--", "sleep", "100"], { env: { KNIT_CRASH_AT: point } });
      expect(r.code, point).toBe(137);
      expect(await storeKeys("ports/")).toEqual(["ports/h1/tcp/8181", "ports/h1/udp/8182"]);
      await h1.knitOk(["gc"]);
      expect(await storeKeys("ports/")).toEqual([]);
      expect((await nftRules()).filter((x) => x.chain === "published")).toEqual([]);
    }
    const again = await run("crash", "front", ["8181:80"]);
    await h1.knitOk(["rm", "-f", again.id]);
  });

  test("gc drops this host's claims that no sandbox lists, and moves claims of the old layout", async () => {
    const web = await run("lister", "front", ["6553:80"]);
    const edit = async (change: (store: Awaited<ReturnType<typeof openSqliteStore>>) => Promise<void>): Promise<void> => {
      const store = await openSqliteStore(h1.stateDir);
      try {
        await change(store);
      } finally {
        await store.close();
      }
    };
    const claimOf = async (key: string): Promise<unknown> => {
      let value: unknown;
      await edit(async (store) => {
        value = JSON.parse((await store.get(key))?.value ?? "null");
      });
      return value;
    };
    await edit(async (store) => {
      // A claim of a sandbox that does not exist, and a foreign address on a real claim's key.
      await store.put("ports/h1/tcp/6554", JSON.stringify({ "0.0.0.0": "f".repeat(64) }));
      const kv = await store.get("ports/h1/tcp/6553");
      await store.put("ports/h1/tcp/6553", JSON.stringify({ ...(JSON.parse(kv?.value ?? "{}") as object), "127.0.0.1": "e".repeat(64) }));
      // A claim in the layout before hosts (ports/<proto>/<port>) that nobody lists, and a claim
      // of another host (a cluster store): that one is not h1's to judge.
      await store.put("ports/tcp/6555", JSON.stringify({ "0.0.0.0": "d".repeat(64) }));
      await store.put("ports/h9/tcp/6556", JSON.stringify({ "0.0.0.0": "c".repeat(64) }));
    });
    expect((await h1.knit(["run", "-d", "--network", "front", "-p", "6554:80", "--", "sleep", "1"])).stderr).toContain("already published by sandbox ffffffffffff");
    // Another host's claim on a port does not stop h1 from publishing it (ports are per host).
    const same = await run("same", "front", ["6556:80"]);
    expect(await storeKeys("ports/")).toEqual(["ports/h1/tcp/6553", "ports/h1/tcp/6554", "ports/h1/tcp/6556", "ports/h9/tcp/6556", "ports/tcp/6555"]);
    await h1.knitOk(["rm", "-f", same.id]);
    await h1.knitOk(["gc"]);
    expect(await storeKeys("ports/")).toEqual(["ports/h1/tcp/6553", "ports/h9/tcp/6556"]);
    expect(await claimOf("ports/h1/tcp/6553")).toEqual({ "0.0.0.0": web.id });
    // web's claim in the old layout: gc moves it under h1, where it holds the port again.
    await edit(async (store) => {
      await store.delete("ports/h1/tcp/6553");
      await store.put("ports/tcp/6553", JSON.stringify({ "0.0.0.0": web.id }));
    });
    await h1.knitOk(["gc"]);
    expect(await storeKeys("ports/")).toEqual(["ports/h1/tcp/6553", "ports/h9/tcp/6556"]);
    expect(await claimOf("ports/h1/tcp/6553")).toEqual({ "0.0.0.0": web.id });
    expect((await h1.knit(["run", "-d", "--network", "front", "-p", "6553:80", "--", "sleep", "1"])).stderr).toContain("already published by sandbox lister");
    await edit(async (store) => {
      await store.delete("ports/h9/tcp/6556");
    });
    await h1.knitOk(["rm", "-f", web.id]);
  });
});
