/**
 * knit's firewall against the real kernel. Run inside a private network + mount namespace
 * (scripts/lab-run): every namespace below is created by this file and deleted in afterAll.
 *
 * Topology (all names carry a per-run prefix):
 *
 *   c1 10.88.1.2 ─┐
 *   c2 10.88.1.3 ─┴─ brA 10.88.1.1 ┐
 *   c3 10.88.2.2 ─── brB 10.88.2.1 ┴─ "host" ── up0 192.0.2.2 ─── 192.0.2.1 "outside"
 *
 * "outside" has no route back to 10.88.0.0/16, so a reply reaching a container proves that
 * the host masqueraded the request.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { KnitError } from "../src/errors.ts";
import {
  applyFirewall,
  buildRuleset,
  forwardingSysctls,
  removeFirewall,
  syncDockerUserChain,
  type BridgeNetworkRules,
} from "../src/firewall/firewall.ts";
import { additionScript } from "../src/firewall/delta.ts";
import { checkNetworks } from "../src/firewall/rules.ts";
import { run, type Netns } from "../src/kernel/exec.ts";
import type { PublishedPort } from "../src/firewall/dnat.ts";
import { nftListTable, nftTables, type NftJson } from "../src/kernel/nft.ts";

const P = `kfw${process.pid}`;
const NS = { host: `${P}-host`, c1: `${P}-c1`, c2: `${P}-c2`, c3: `${P}-c3`, out: `${P}-out` } as const;
const host: Netns = { path: `/run/netns/${NS.host}` };
const OUTSIDE = "192.0.2.1";
const GW_A = "10.88.1.1";

const netA: BridgeNetworkRules = {
  networkId: "neta",
  bridge: "brA",
  subnets: ["10.88.1.0/24", "fd00:88:1::/64"],
  masquerade: true,
  internal: false,
};
const netB: BridgeNetworkRules = {
  networkId: "netb",
  bridge: "brB",
  subnets: ["10.88.2.0/24"],
  masquerade: true,
  internal: false,
};

const sh = (...argv: string[]) => run(argv);
const ipn = (ns: string, ...argv: string[]) => run(["ip", "-n", ns, ...argv]);
const exec = (ns: string, ...argv: string[]) => run(["ip", "netns", "exec", ns, ...argv], { allowFailure: true });

/** One ICMP echo; true when the reply came back. */
async function ping(from: string, to: string): Promise<boolean> {
  return (await exec(from, "ping", "-n", "-c1", "-W1", to)).code === 0;
}

/** Reachability of several pairs at once, as a map "from>to" -> reachable. */
async function reach(pairs: readonly [string, string][]): Promise<Record<string, boolean>> {
  const results = await Promise.all(pairs.map(([from, to]) => ping(from, to)));
  return Object.fromEntries(pairs.map(([from, to], i) => [`${from.slice(P.length + 1)}>${to}`, results[i] === true]));
}

/** Rules of one chain in an `nft -j` document. */
function rules(doc: NftJson | undefined, chain: string): Record<string, unknown>[] {
  return (doc?.nftables ?? []).flatMap((o) => (o.rule && o.rule.chain === chain ? [o.rule] : []));
}
const chains = (doc: NftJson | undefined): string[] =>
  (doc?.nftables ?? []).flatMap((o) => (o.chain ? [String(o.chain.name)] : []));
const setElements = (doc: NftJson | undefined, name: string): unknown =>
  (doc?.nftables ?? []).find((o) => o.set?.name === name)?.set?.elem;

/** Knit's rules in DOCKER-USER as `iptables -S` prints them, all rules there, and KNIT-USER's rules. */
async function dockerUser(tool: string): Promise<{ knit: string[]; all: string[]; own: string[] }> {
  const { stdout } = await run(["ip", "netns", "exec", NS.host, tool, "-S"]);
  const lines = stdout.split("\n");
  const all = lines.filter((l) => l.startsWith("-A DOCKER-USER "));
  const own = lines.filter((l) => l.startsWith("-A KNIT-USER "));
  return { knit: all.filter((l) => l.includes("--comment knit")), all, own };
}

beforeAll(async () => {
  for (const ns of Object.values(NS)) {
    await sh("ip", "netns", "add", ns);
    await ipn(ns, "link", "set", "lo", "up");
  }
  for (const [br, gw] of [["brA", GW_A], ["brB", "10.88.2.1"]] as const) {
    await ipn(NS.host, "link", "add", br, "type", "bridge");
    await ipn(NS.host, "addr", "add", `${gw}/24`, "dev", br);
    await ipn(NS.host, "link", "set", br, "up");
  }
  const containers = [
    [NS.c1, "brA", "10.88.1.2", GW_A],
    [NS.c2, "brA", "10.88.1.3", GW_A],
    [NS.c3, "brB", "10.88.2.2", "10.88.2.1"],
  ] as const;
  for (const [ns, br, addr, gw] of containers) {
    const port = `v${ns.slice(P.length + 1)}`;
    await ipn(NS.host, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns);
    await ipn(NS.host, "link", "set", port, "master", br, "up");
    await ipn(ns, "addr", "add", `${addr}/24`, "dev", "eth0");
    await ipn(ns, "link", "set", "eth0", "up");
    await ipn(ns, "route", "add", "default", "via", gw);
  }
  await ipn(NS.host, "link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", NS.out);
  await ipn(NS.host, "addr", "add", "192.0.2.2/24", "dev", "up0");
  await ipn(NS.host, "link", "set", "up0", "up");
  await ipn(NS.out, "addr", "add", `${OUTSIDE}/24`, "dev", "eth0");
  await ipn(NS.out, "link", "set", "eth0", "up");
  // No br_netfilter in "host": the rules must not depend on it (per-namespace switch).
  await exec(NS.host, "sysctl", "-q", "-w", "net.bridge.bridge-nf-call-iptables=0");
  await exec(NS.host, "sysctl", "-q", "-w", "net.bridge.bridge-nf-call-ip6tables=0");
});

afterAll(async () => {
  for (const ns of Object.values(NS)) await run(["ip", "netns", "del", ns], { allowFailure: true });
  const left = (await run(["ip", "netns", "list"])).stdout;
  expect(left).not.toContain(P);
});

describe("buildRuleset", () => {
  test("output passes nft check mode, for this kernel's features", async () => {
    for (const internal of [true, false]) {
      const script = buildRuleset([{ ...netA, internal }, { ...netB, internal: !internal }]);
      const res = await run(["nft", "-c", "-f", "-"], { stdin: script, allowFailure: true });
      expect(res.stderr).toBe("");
      expect(res.code).toBe(0);
    }
  });

  test("shape: own table, atomic replace, isolation, masquerade", () => {
    const script = buildRuleset([netA, netB]);
    expect(script).toStartWith("table inet knit\ndelete table inet knit\ntable inet knit {\n");
    expect(script).toContain('elements = { "brA", "brB" }');
    expect(script).toContain('iifname "brA" oifname @bridges oifname != "brA" drop');
    expect(script).toContain('ip saddr 10.88.1.0/24 oifname != "brA" masquerade');
    expect(script).toContain('ip6 saddr fd00:88:1::/64 oifname != "brA" masquerade');
    expect(script).not.toContain("table bridge");
    expect(buildRuleset([])).toBe("table inet knit\ndelete table inet knit\n");
  });

  test("bad bridge names, subnets and duplicates are rejected before anything is built", () => {
    for (const bridge of ["", "br/x", "br x", 'br"x', "br'x", "br:0", "br*", "br\\x", "a234567890123456", ".."]) {
      let err: unknown;
      try {
        buildRuleset([{ ...netA, bridge }]);
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(KnitError);
      expect((err as KnitError).code).toBe("invalid-argument");
    }
    expect(() => buildRuleset([{ ...netA, subnets: ["10.0.0.0/33"] }])).toThrow(KnitError);
    expect(() => buildRuleset([netA, { ...netB, bridge: "brA" }])).toThrow(/more than one network/);
    expect(() => buildRuleset([{ ...netA, networkId: 'x" drop' }])).toThrow(KnitError);
  });

  test("forwarding sysctls follow the families of routed networks", () => {
    expect(forwardingSysctls([netB])).toEqual([["net.ipv4.ip_forward", "1"]]);
    expect(forwardingSysctls([netA])).toEqual([
      ["net.ipv4.ip_forward", "1"],
      ["net.ipv6.conf.all.forwarding", "1"],
    ]);
    expect(forwardingSysctls([{ ...netA, internal: true }])).toEqual([]);
  });
});

describe("applyFirewall on a real topology", () => {
  test("without knit's firewall, the networks reach each other", async () => {
    await exec(NS.host, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1");
    expect(await reach([[NS.c1, "10.88.2.2"]])).toEqual({ "c1>10.88.2.2": true });
  }, 30_000);

  test("isolation between networks, masquerade to the outside, icc inside", async () => {
    await applyFirewall([netA, netB], host);
    const doc = await nftListTable("inet", "knit", host);
    expect(chains(doc).sort()).toEqual(["forward", "postrouting"]);
    expect(rules(doc, "forward")).toHaveLength(5); // established, dnat, 2 x isolation, unpublished
    expect(rules(doc, "postrouting")).toHaveLength(3); // brA v4 + v6, brB v4
    expect(setElements(doc, "bridges")).toEqual(["brA", "brB"]);
    expect((await exec(NS.host, "sysctl", "-n", "net.ipv6.conf.all.forwarding")).stdout.trim()).toBe("1");

    expect(
      await reach([
        [NS.c1, "10.88.1.3"],
        [NS.c1, "10.88.2.2"],
        [NS.c3, "10.88.1.2"],
        [NS.c1, OUTSIDE],
        [NS.c3, OUTSIDE],
        [NS.c1, GW_A],
      ]),
    ).toEqual({
      "c1>10.88.1.3": true,
      "c1>10.88.2.2": false,
      "c3>10.88.1.2": false,
      [`c1>${OUTSIDE}`]: true,
      [`c3>${OUTSIDE}`]: true,
      [`c1>${GW_A}`]: true,
    });
  }, 30_000);

  test("masquerade=false: no source NAT, so the outside cannot answer", async () => {
    await applyFirewall([netA, { ...netB, masquerade: false }], host);
    expect(rules(await nftListTable("inet", "knit", host), "postrouting")).toHaveLength(2);
    expect(await reach([[NS.c3, OUTSIDE], [NS.c1, OUTSIDE]])).toEqual({
      [`c3>${OUTSIDE}`]: false,
      [`c1>${OUTSIDE}`]: true,
    });
  }, 30_000);

  test("internal: nothing leaves the network, traffic inside it still flows", async () => {
    await applyFirewall([{ ...netA, internal: true }, netB], host);
    const doc = await nftListTable("inet", "knit", host);
    expect(rules(doc, "forward")).toHaveLength(7); // 2 internal + established, dnat + 2 isolation + unpublished
    expect(rules(doc, "postrouting")).toHaveLength(1); // brB only
    expect(
      await reach([
        [NS.c1, OUTSIDE],
        [NS.c1, "10.88.1.3"],
        [NS.c3, "10.88.1.2"],
        [NS.c3, OUTSIDE],
      ]),
    ).toEqual({
      [`c1>${OUTSIDE}`]: false,
      "c1>10.88.1.3": true,
      "c3>10.88.1.2": false,
      [`c3>${OUTSIDE}`]: true,
    });
  }, 30_000);

  test("bad input changes nothing", async () => {
    const before = await nftListTable("inet", "knit", host);
    let err: unknown;
    try {
      await applyFirewall([netA, { ...netB, bridge: "bad name" }], host);
    } catch (e) {
      err = e;
    }
    expect((err as KnitError).code).toBe("invalid-argument");
    expect(await nftListTable("inet", "knit", host)).toEqual(before);
  });
});

// ---- published ports (DNAT) ----------------------------------------------------------------

const SB = "0123456789ab0123456789ab";
const web: PublishedPort = { hostIp: "0.0.0.0", hostPort: 8080, proto: "tcp", containerIp: "10.88.1.2", containerPort: 80, sandboxId: SB };

/** Run `busybox nc -ll -p PORT -e cat` in a namespace; returns a stop function. */
async function echoServer(ns: string, port: number): Promise<() => Promise<void>> {
  const proc = Bun.spawn(["ip", "netns", "exec", ns, "busybox", "nc", "-ll", "-p", String(port), "-e", "cat"], { stdout: "ignore", stderr: "ignore" });
  for (let i = 0; i < 50; i++) {
    if ((await exec(ns, "ss", "-Hltn", `sport = :${port}`)).stdout.trim() !== "") break;
    await Bun.sleep(50);
  }
  return async () => {
    proc.kill("SIGKILL");
    await proc.exited;
  };
}

/** Send a line over TCP from a namespace; what came back, or undefined. */
async function tcpEcho(from: string, addr: string, port: number): Promise<string | undefined> {
  const r = await run(["ip", "netns", "exec", from, "busybox", "nc", "-w", "2", addr, String(port)], { stdin: "hello\n", allowFailure: true });
  return r.code === 0 && r.stdout !== "" ? r.stdout : undefined;
}

const localnet = async (bridge: string): Promise<string> => (await exec(NS.host, "sysctl", "-n", `net.ipv4.conf.${bridge}.route_localnet`)).stdout.trim();

describe("published ports (DNAT)", () => {
  test("rulesets with ports pass nft check mode and have the expected shape", async () => {
    const ports: PublishedPort[] = [
      web,
      { ...web, hostIp: "192.0.2.2", hostPort: 8081, proto: "udp" },
      { ...web, hostIp: "::", containerIp: "fd00:88:1::2" },
      { ...web, hostIp: "2001:db8::1", hostPort: 8082, containerIp: "fd00:88:1::2" },
    ];
    const script = buildRuleset([{ ...netA, ports }, netB]);
    const res = await run(["nft", "-c", "-f", "-"], { stdin: script, allowFailure: true });
    expect(res.stderr).toBe("");
    expect(res.code).toBe(0);
    expect(script).toContain("fib daddr type local jump published");
    expect(script).toContain(`meta nfproto ipv4 tcp dport 8080 dnat ip to 10.88.1.2:80 comment "knit neta ${SB.slice(0, 12)}"`);
    expect(script).toContain("ip daddr 192.0.2.2 udp dport 8081 dnat ip to 10.88.1.2:80");
    expect(script).toContain("ip6 daddr != ::1 tcp dport 8080 dnat ip6 to [fd00:88:1::2]:80");
    expect(script).toContain("ip6 daddr 2001:db8::1 tcp dport 8082 dnat ip6 to [fd00:88:1::2]:80");
    expect(script).toContain('ip saddr 10.88.1.0/24 oifname "brA" ct status dnat masquerade');
    expect(script).toContain('ip saddr 127.0.0.0/8 oifname "brA" masquerade');
    expect(script).toContain('iifname "brA" ip daddr 127.0.0.0/8 drop');
    // No ports, no NAT hooks besides postrouting: the table is exactly as before.
    expect(buildRuleset([netA, netB])).not.toContain("prerouting");
    // A bridge whose name sysctl cannot address gets no 127.0.0.1 path.
    const dotted = buildRuleset([{ ...netA, bridge: "br.a", ports: [web] }]);
    expect(dotted).toContain("ip daddr != 127.0.0.0/8 tcp dport 8080");
    expect(dotted).not.toContain("ip saddr 127.0.0.0/8");
  });

  test("bad published ports are rejected before anything is built", () => {
    const bad: [Partial<PublishedPort>, RegExp][] = [
      [{ hostPort: 0 }, /ports are 1 to 65535/],
      [{ containerPort: 65536 }, /ports are 1 to 65535/],
      [{ containerIp: "10.99.0.2" }, /in no subnet/],
      [{ containerIp: "fd00:88:1::2" }, /different IP families/],
      [{ hostIp: "not-an-ip" }, /not an IPv4 or IPv6 address/],
      [{ sandboxId: 'x" drop' }, /invalid sandbox id/],
      [{ proto: "sctp" as PublishedPort["proto"] }, /invalid protocol/],
    ];
    for (const [change, message] of bad) {
      expect(() => buildRuleset([{ ...netA, ports: [{ ...web, ...change }] }])).toThrow(message);
    }
    expect(() => buildRuleset([{ ...netA, ports: [web, { ...web, hostIp: "192.0.2.2" }] }])).toThrow(/published twice/);
    expect(() => buildRuleset([{ ...netA, ports: [web] }, { ...netB, ports: [{ ...web, containerIp: "10.88.2.2" }] }])).toThrow(/published twice/);
    expect(() => buildRuleset([{ ...netA, internal: true, ports: [web] }])).toThrow(/internal/);
  });

  test("outside, other network, hairpin and the host itself reach a published port", async () => {
    await applyFirewall([netA, netB], host);
    const stop = await echoServer(NS.c1, 80);
    try {
      expect(await tcpEcho(NS.out, "192.0.2.2", 8080)).toBeUndefined(); // not published yet
      await applyFirewall([{ ...netA, ports: [web] }, netB], host);
      expect(chains(await nftListTable("inet", "knit", host)).sort()).toEqual(["forward", "guard", "output", "postrouting", "prerouting", "published"]);
      expect(await localnet("brA")).toBe("1");
      expect(await localnet("brB")).toBe("0");
      const via = await Promise.all([
        tcpEcho(NS.out, "192.0.2.2", 8080), // another machine
        tcpEcho(NS.c3, "192.0.2.2", 8080), // a container on another network
        tcpEcho(NS.c2, "192.0.2.2", 8080), // hairpin: same network, through the host address
        tcpEcho(NS.c1, GW_A, 8080), // the server itself, through its gateway
        tcpEcho(NS.host, "192.0.2.2", 8080), // the host, through its own address
        tcpEcho(NS.host, "127.0.0.1", 8080), // the host, through loopback
      ]);
      expect([...via]).toEqual(Array<string | undefined>(6).fill("hello\n"));
      // Isolation still holds for the container address itself.
      expect(await tcpEcho(NS.c3, "10.88.1.2", 80)).toBeUndefined();

      await applyFirewall([netA, netB], host);
      expect(chains(await nftListTable("inet", "knit", host)).sort()).toEqual(["forward", "postrouting"]);
      expect(await localnet("brA")).toBe("0");
      expect(await tcpEcho(NS.out, "192.0.2.2", 8080)).toBeUndefined();
    } finally {
      await stop();
    }
  }, 60_000);
});

// ---- one network added in place (delta.ts) --------------------------------------------------

/** knit's table as `nft -j` lists it, without handles, for comparing two ways of making it. */
async function knitTable(): Promise<string> {
  const strip = (v: unknown): unknown =>
    Array.isArray(v) ? v.map(strip) : v && typeof v === "object" ? Object.fromEntries(Object.entries(v).filter(([k]) => k !== "handle").map(([k, x]) => [k, strip(x)])) : v;
  return JSON.stringify(strip((await nftListTable("inet", "knit", host))?.nftables.filter((o) => !("metainfo" in o)) ?? []));
}

describe("adding one network in place", () => {
  const netC: BridgeNetworkRules = { networkId: "netc", bridge: "brC", subnets: ["10.88.3.0/24", "fd00:88:3::/64"], masquerade: true, internal: false };

  test("its short script only adds, and makes the table a full rebuild makes", async () => {
    const delta = additionScript(checkNetworks([netA, netC]), "netc");
    expect(delta?.bridge).toBe("brC");
    expect(delta?.script).toStartWith('create element inet knit bridges { "brC" }\n');
    expect(delta?.script).not.toMatch(/delete|flush|table/);
    // Nothing in place without other networks, or for a network with published ports.
    expect(additionScript(checkNetworks([netC]), "netc")).toBeUndefined();
    expect(additionScript(checkNetworks([{ ...netA, ports: [web] }, netB]), "neta")).toBeUndefined();

    const others: BridgeNetworkRules[][] = [[netA], [{ ...netA, ports: [web] }, netB], [{ ...netA, internal: true }, netB]];
    const added: BridgeNetworkRules[] = [netC, { ...netC, internal: true }, { ...netC, masquerade: false, subnets: ["10.88.3.0/24"] }];
    for (const before of others) {
      for (const net of added) {
        await applyFirewall(before, host);
        const script = additionScript(checkNetworks([...before, net]), "netc")?.script ?? "";
        await run(["nft", "-f", "-"], { stdin: script, netns: host }); // throws if nft rejects it
        const inPlace = await knitTable();
        await applyFirewall([...before, net], host);
        expect(inPlace).toBe(await knitTable());
        expect(inPlace).toContain('"brC"');
      }
    }
  }, 60_000);

  test("without the table for the other networks, the whole table is rebuilt", async () => {
    await applyFirewall([netA, netC], host);
    const full = await knitTable();
    await removeFirewall(host);
    await applyFirewall([netA, netC], host, { added: "netc" }); // no table at all
    expect(await knitTable()).toBe(full);
    await applyFirewall([netA, netC], host, { added: "netc" }); // brC is there already
    expect(await knitTable()).toBe(full);
    // The kernel has the table for netA alone; the short script would assume netB's rules
    // there too: an index past the end of a chain fails it, and the table is rebuilt.
    await applyFirewall([netA, netB, netC], host);
    const all = await knitTable();
    await applyFirewall([netA], host);
    await applyFirewall([netA, netB, netC], host, { added: "netc" });
    expect(await knitTable()).toBe(all);
    const doc = await nftListTable("inet", "knit", host);
    expect(setElements(doc, "bridges")).toEqual(["brA", "brB", "brC"]);
    expect(rules(doc, "forward")).toHaveLength(6);
  });
});

describe("removeFirewall", () => {
  test("leaves no knit table, twice in a row", async () => {
    await applyFirewall([netA, netB], host);
    await removeFirewall(host);
    await removeFirewall(host);
    const tables = await nftTables(host);
    expect(tables.filter((t) => t.name === "knit")).toEqual([]);
    await applyFirewall([], host); // no networks: the same as remove
    expect((await nftTables(host)).filter((t) => t.name === "knit")).toEqual([]);
  });
});

describe("syncDockerUserChain", () => {
  const JUMP = "-A DOCKER-USER -m comment --comment knit -j KNIT-USER";
  const accepts = (...bridges: string[]): string[] =>
    bridges.flatMap((b) => [`-A KNIT-USER -i ${b} -m comment --comment knit -j ACCEPT`, `-A KNIT-USER -o ${b} -m comment --comment knit -j ACCEPT`]);

  test("without a DOCKER-USER chain it does nothing", async () => {
    await syncDockerUserChain(["brA"], host);
    await applyFirewall([netA], host);
    for (const tool of ["iptables", "ip6tables"]) {
      expect((await exec(NS.host, tool, "-S", "DOCKER-USER")).code).not.toBe(0);
      expect((await exec(NS.host, tool, "-S", "KNIT-USER")).code).not.toBe(0);
    }
  });

  test("Docker's FORWARD DROP blocks knit bridges until knit opens DOCKER-USER", async () => {
    // What dockerd does: br_netfilter on, FORWARD policy DROP, DOCKER-USER jumped to first.
    await exec(NS.host, "sysctl", "-q", "-w", "net.bridge.bridge-nf-call-iptables=1");
    for (const tool of ["iptables", "ip6tables"]) {
      for (const args of [
        ["-N", "DOCKER-USER"],
        ["-A", "DOCKER-USER", "-i", "dockeruser0", "-j", "RETURN"], // a user's rule, not ours
        ["-A", "FORWARD", "-j", "DOCKER-USER"],
        ["-P", "FORWARD", "DROP"],
      ]) {
        const res = await exec(NS.host, tool, ...args);
        expect(res.stderr).toBe("");
      }
    }
    await removeFirewall(host);
    expect(
      await reach([
        [NS.c1, OUTSIDE],
        [NS.c1, "10.88.1.3"],
      ]),
    ).toEqual({ [`c1>${OUTSIDE}`]: false, "c1>10.88.1.3": false });

    await applyFirewall([netA, netB], host);
    for (const tool of ["iptables", "ip6tables"]) {
      const { knit, all, own } = await dockerUser(tool);
      expect(knit).toEqual([JUMP]);
      expect(all[0]).toBe(JUMP); // first, before every other rule there
      expect(all).toContain("-A DOCKER-USER -i dockeruser0 -j RETURN");
      expect(own).toEqual(accepts("brA", "brB"));
    }
    expect(
      await reach([
        [NS.c1, OUTSIDE],
        [NS.c1, "10.88.1.3"],
        [NS.c3, OUTSIDE],
        [NS.c1, "10.88.2.2"],
      ]),
    ).toEqual({ [`c1>${OUTSIDE}`]: true, "c1>10.88.1.3": true, [`c3>${OUTSIDE}`]: true, "c1>10.88.2.2": false });
  }, 60_000);

  test("a new network's rules are appended; Docker's isolation chain is used when it exists", async () => {
    await applyFirewall([netA], host);
    for (const tool of ["iptables", "ip6tables"]) expect((await dockerUser(tool)).own).toEqual(accepts("brA"));
    await applyFirewall([netA, netB], host, { added: "netb" });
    for (const tool of ["iptables", "ip6tables"]) expect((await dockerUser(tool)).own).toEqual(accepts("brA", "brB"));
    expect(await reach([[NS.c3, OUTSIDE]])).toEqual({ [`c3>${OUTSIDE}`]: true });

    // With Docker's DOCKER-ISOLATION-STAGE-2, knit's traffic goes through it first.
    await exec(NS.host, "iptables", "-N", "DOCKER-ISOLATION-STAGE-2");
    await applyFirewall([netA, netB], host);
    const stage2 = (b: string): string => `-A KNIT-USER -i ${b} -m comment --comment knit -j DOCKER-ISOLATION-STAGE-2`;
    expect((await dockerUser("iptables")).own).toEqual([stage2("brA"), ...accepts("brA"), stage2("brB"), ...accepts("brB")]);
    expect((await dockerUser("ip6tables")).own).toEqual(accepts("brA", "brB"));
    await applyFirewall([netA], host);
    await exec(NS.host, "iptables", "-F", "KNIT-USER");
    await exec(NS.host, "iptables", "-X", "DOCKER-ISOLATION-STAGE-2");
  }, 60_000);

  test("the jump comes back after DOCKER-USER was flushed", async () => {
    await applyFirewall([netA], host);
    for (const tool of ["iptables", "ip6tables"]) await exec(NS.host, tool, "-F", "DOCKER-USER");
    expect(await reach([[NS.c1, OUTSIDE]])).toEqual({ [`c1>${OUTSIDE}`]: false });
    await applyFirewall([netA, netB], host, { added: "netb" });
    for (const tool of ["iptables", "ip6tables"]) {
      const { all, own } = await dockerUser(tool);
      expect(all).toEqual([JUMP]);
      expect(own).toEqual(accepts("brA", "brB"));
      await exec(NS.host, tool, "-A", "DOCKER-USER", "-i", "dockeruser0", "-j", "RETURN");
    }
    expect(await reach([[NS.c1, OUTSIDE], [NS.c3, OUTSIDE]])).toEqual({ [`c1>${OUTSIDE}`]: true, [`c3>${OUTSIDE}`]: true });
  }, 60_000);

  test("stale and duplicate knit rules go, everything else stays", async () => {
    // Rules as older knit versions kept them (per bridge, in DOCKER-USER itself, no KNIT-USER).
    await removeFirewall(host);
    const tag = ["-m", "comment", "--comment", "knit", "-j", "ACCEPT"];
    await exec(NS.host, "iptables", "-A", "DOCKER-USER", "-i", "brGone", ...tag);
    await exec(NS.host, "iptables", "-A", "DOCKER-USER", "-i", "brA", ...tag);
    await exec(NS.host, "ip6tables", "-I", "DOCKER-USER", "-o", "brGone", ...tag);
    await applyFirewall([netA], host);
    await applyFirewall([netA], host); // idempotent
    for (const tool of ["iptables", "ip6tables"]) {
      const { knit, all, own } = await dockerUser(tool);
      expect(knit).toEqual([JUMP]);
      expect(all).toEqual([JUMP, "-A DOCKER-USER -i dockeruser0 -j RETURN"]);
      expect(own).toEqual(accepts("brA"));
    }
    // Reading the table (as after a failed guarded restore) keeps the jump on top and deletes
    // every other knit rule in DOCKER-USER, a second jump too.
    await exec(NS.host, "iptables", "-A", "DOCKER-USER", "-i", "brGone", ...tag);
    await exec(NS.host, "iptables", "-A", "DOCKER-USER", "-m", "comment", "--comment", "knit", "-j", "KNIT-USER");
    await syncDockerUserChain(["brA"], host);
    expect((await dockerUser("iptables")).all).toEqual([JUMP, "-A DOCKER-USER -i dockeruser0 -j RETURN"]);
    expect((await dockerUser("iptables")).own).toEqual(accepts("brA"));
    // brB is no knit network any more: Docker's DROP policy applies to it again.
    expect(await reach([[NS.c3, OUTSIDE], [NS.c1, OUTSIDE]])).toEqual({
      [`c3>${OUTSIDE}`]: false,
      [`c1>${OUTSIDE}`]: true,
    });

    // A second jump (two processes that both found no KNIT-USER) goes at the latest with the
    // last network.
    await exec(NS.host, "iptables", "-A", "DOCKER-USER", "-m", "comment", "--comment", "knit", "-j", "KNIT-USER");
    await removeFirewall(host);
    await removeFirewall(host); // idempotent
    for (const tool of ["iptables", "ip6tables"]) {
      const { knit, all } = await dockerUser(tool);
      expect(knit).toEqual([]);
      expect(all).toEqual(["-A DOCKER-USER -i dockeruser0 -j RETURN"]);
      expect((await exec(NS.host, tool, "-S", "KNIT-USER")).code).not.toBe(0);
    }
    const forward = await run(["ip", "netns", "exec", NS.host, "iptables", "-S", "FORWARD"]);
    expect(forward.stdout).toContain("-P FORWARD DROP");
    expect(forward.stdout).toContain("-A FORWARD -j DOCKER-USER");
  }, 60_000);
});
