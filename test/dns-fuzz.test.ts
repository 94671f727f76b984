/**
 * Malformed DNS never crashes or stalls knit's DNS server.
 *
 * 1. In process: tens of thousands of random, truncated, mutated and hand-made hostile
 *    packets (pointer loops, forward pointers, 64-byte labels, 256-byte names, two OPT
 *    records, wrong opcodes, responses) through the parser and the resolver: nothing
 *    throws, every answer is a well-formed response to the right id, and it is fast.
 * 2. Live: the same kind of corpus blasted over UDP at a running agent from inside a
 *    sandbox, plus TCP abuse (garbage frames, half frames, oversize lengths, zero-length
 *    frames, idle connections). Afterwards the agent is the same process and answers
 *    correctly and quickly, over UDP and TCP.
 */
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { Lab, type LabHost, type LabProcess, type NetnsRef, waitFor } from "../src/lab/lab.ts";
import { RecordType, buildQuery, buildReply, parseQuery, parseReply, readHeader } from "../src/dns/packet.ts";
import { NameTable } from "../src/dns/table.ts";
import { Resolver } from "../src/dns/resolver.ts";
import { Forwarder } from "../src/dns/forwarder.ts";
import type { Endpoint, Network, Sandbox } from "../src/model.ts";
import { assertHostClean } from "./leaks.ts";
import { rng } from "./prng.ts";

setDefaultTimeout(120_000);

// ---- the corpus ----------------------------------------------------------------------------

const bytes = (...xs: number[]): Uint8Array => Uint8Array.from(xs);
const header = (id: number, flags: number, qd: number, an = 0, ns = 0, ar = 0): number[] => [id >> 8, id & 255, flags >> 8, flags & 255, 0, qd, an >> 8, an & 255, 0, ns, ar >> 8, ar & 255];

/** Hand-made hostile packets, each with what the parser must make of it. */
function crafted(): { what: string; packet: Uint8Array; kind: "query" | "error" | "drop"; rcode?: number }[] {
  const q = [0, 1, 0, 1]; // type A, class IN
  const label = (n: number): number[] => [n, ...Array<number>(n).fill(0x61)];
  return [
    { what: "empty", packet: bytes(), kind: "drop" },
    { what: "11 bytes", packet: bytes(...header(1, 0x0100, 1).slice(0, 11)), kind: "drop" },
    { what: "a response", packet: bytes(...header(2, 0x8180, 1), 0, ...q), kind: "drop" },
    { what: "header only", packet: bytes(...header(3, 0x0100, 1)), kind: "error", rcode: 1 },
    { what: "no question", packet: bytes(...header(4, 0x0100, 0)), kind: "error", rcode: 1 },
    { what: "two questions", packet: bytes(...header(5, 0x0100, 2), 0, ...q, 0, ...q), kind: "error", rcode: 1 },
    { what: "opcode STATUS", packet: bytes(...header(6, 0x1100, 1), 0, ...q), kind: "error", rcode: 4 },
    { what: "pointer to itself", packet: bytes(...header(7, 0x0100, 1), 0xc0, 12, ...q), kind: "error", rcode: 1 },
    { what: "pointer forward", packet: bytes(...header(8, 0x0100, 1), 0xc0, 14, 0, ...q), kind: "error", rcode: 1 },
    { what: "pointer cycle", packet: bytes(...header(9, 0x0100, 1), 1, 0x61, 0xc0, 12, ...q), kind: "error", rcode: 1 },
    { what: "pointer out of the packet", packet: bytes(...header(10, 0x0100, 1), 0xc0), kind: "error", rcode: 1 },
    { what: "label 64", packet: bytes(...header(11, 0x0100, 1), ...label(64), 0, ...q), kind: "error", rcode: 1 },
    { what: "label type 0x40", packet: bytes(...header(12, 0x0100, 1), 0x41, 0x61, 0, ...q), kind: "error", rcode: 1 },
    { what: "name of 256 bytes", packet: bytes(...header(13, 0x0100, 1), ...label(63), ...label(63), ...label(63), ...label(62), 0, ...q), kind: "error", rcode: 1 },
    { what: "name of 255 bytes", packet: bytes(...header(14, 0x0100, 1), ...label(63), ...label(63), ...label(63), ...label(61), 0, ...q), kind: "query" },
    { what: "label past the end", packet: bytes(...header(15, 0x0100, 1), 10, 0x61), kind: "error", rcode: 1 },
    { what: "no type and class", packet: bytes(...header(16, 0x0100, 1), 0, 0, 1), kind: "error", rcode: 1 },
    { what: "65535 answers claimed", packet: bytes(...header(17, 0x0100, 1, 0xffff), 0, ...q), kind: "error", rcode: 1 },
    { what: "additional past the end", packet: bytes(...header(18, 0x0100, 1, 0, 0, 1), 0, ...q, 0, 0, 41, 4, 0, 0, 0, 0, 0, 0, 9), kind: "error", rcode: 1 },
    { what: "two OPT records", packet: bytes(...header(19, 0x0100, 1, 0, 0, 2), 0, ...q, 0, 0, 41, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 41, 4, 0, 0, 0, 0, 0, 0, 0), kind: "error", rcode: 1 },
    { what: "OPT in the answers", packet: bytes(...header(20, 0x0100, 1, 1), 0, ...q, 0, 0, 41, 4, 0, 0, 0, 0, 0, 0, 0), kind: "error", rcode: 1 },
    { what: "EDNS version 1", packet: bytes(...header(21, 0x0100, 1, 0, 0, 1), 0, ...q, 0, 0, 41, 4, 0, 0, 1, 0, 0, 0, 0), kind: "error", rcode: 16 },
    { what: "EDNS with a tiny size", packet: bytes(...header(22, 0x0100, 1, 0, 0, 1), 0, ...q, 0, 0, 41, 0, 1, 0, 0, 0, 0, 0, 0), kind: "query" },
    { what: "a dot inside a label", packet: bytes(...header(23, 0x0100, 1), 3, 0x61, 0x2e, 0x62, 0, ...q), kind: "query" },
    { what: "bytes above 0x7f", packet: bytes(...header(24, 0x0100, 1), 2, 0xff, 0xfe, 0, ...q), kind: "query" },
    { what: "a valid query with trailing garbage", packet: bytes(...header(25, 0x0100, 1), 3, 0x61, 0x70, 0x69, 0, ...q, 1, 2, 3), kind: "query" },
  ];
}

const VALID: Uint8Array[] = [
  buildQuery(0x1234, "api", RecordType.A),
  buildQuery(0x2345, "api", RecordType.AAAA, { edns: 1232 }),
  buildQuery(0x3456, "2.0.61.10.in-addr.arpa", RecordType.PTR),
  buildQuery(0x4567, "Some.Longer.Name.Example.Test", RecordType.ANY, { edns: 4096 }),
];

/** Random, truncated and mutated packets from a seed. */
function corpus(seed: number, n: number): Uint8Array[] {
  const r = rng(seed);
  const out: Uint8Array[] = [];
  for (const v of VALID) for (let len = 0; len < v.length; len++) out.push(v.slice(0, len));
  for (const c of crafted()) out.push(c.packet);
  while (out.length < n) {
    const pick = r();
    if (pick < 0.3) {
      const p = new Uint8Array(Math.floor(r() * 600));
      for (let i = 0; i < p.length; i++) p[i] = Math.floor(r() * 256);
      // Often keep it a query (QR clear) so that it gets past the first check.
      if (p.length > 2 && r() < 0.7) p[2] = (p[2] ?? 0) & 0x7f;
      out.push(p);
    } else {
      const base = VALID[Math.floor(r() * VALID.length)] ?? VALID[0] ?? new Uint8Array(0);
      const p = base.slice(0, r() < 0.2 ? Math.floor(r() * base.length) : base.length);
      const flips = 1 + Math.floor(r() * 8);
      for (let i = 0; i < flips && p.length > 0; i++) {
        const at = Math.floor(r() * p.length);
        p[at] = r() < 0.5 ? (p[at] ?? 0) ^ (1 << Math.floor(r() * 8)) : Math.floor(r() * 256);
      }
      // Sometimes a compression pointer anywhere.
      if (r() < 0.2 && p.length > 14) {
        const at = 12 + Math.floor(r() * (p.length - 13));
        p[at] = 0xc0 | Math.floor(r() * 4);
        p[at + 1] = Math.floor(r() * 256);
      }
      out.push(p);
    }
  }
  return out;
}

// ---- 1. in process -----------------------------------------------------------------------------

function fakeTable(): NameTable {
  const t = new NameTable();
  const net = {
    id: "n1",
    state: "ready",
    name: "front",
    driver: "bridge",
    predefined: false,
    internal: false,
    subnets: [{ subnet: "10.61.0.0/24", gateway: "10.61.0.1", auxAddresses: {} }],
  } as unknown as Network;
  const sb = { id: "a".repeat(64), name: "api", hostname: "api-host", state: "ready", kind: "knit" } as unknown as Sandbox;
  const ep = { id: "e1", networkId: "n1", sandboxId: sb.id, state: "ready", ipv4: "10.61.0.2/24", ipv6: "fd61::2/64", aliases: ["www"] } as unknown as Endpoint;
  t.apply("networks/n1", JSON.stringify(net));
  t.apply(`sandboxes/${sb.id}`, JSON.stringify(sb));
  t.apply("endpoints/n1/e1", JSON.stringify(ep));
  t.refresh();
  return t;
}

describe("the parser and the resolver, in process", () => {
  test("hand-made hostile packets get the right verdict", () => {
    for (const c of crafted()) {
      const p = parseQuery(c.packet);
      expect({ what: c.what, kind: p.kind }).toEqual({ what: c.what, kind: c.kind });
      if (p.kind === "error") {
        expect({ what: c.what, rcode: p.rcode }).toEqual({ what: c.what, rcode: c.rcode ?? -1 });
        const reply = buildReply(p, p.rcode);
        const h = readHeader(reply);
        expect(h?.id).toBe(readHeader(c.packet)?.id ?? -1);
        expect((h?.flags ?? 0) & 0x8000).toBe(0x8000);
      }
    }
  });

  test("60 000 random, truncated and mutated packets: never a throw, always a well-formed reply, fast", () => {
    const packets = corpus(0x5eed, 60_000);
    const table = fakeTable();
    const forwarder = new Forwarder({ timeoutMs: 100 });
    const resolver = new Resolver(table, forwarder, () => []);
    const kinds = { query: 0, error: 0, drop: 0 };
    const t = performance.now();
    for (const p of packets) kinds[parseQuery(p).kind]++;
    const parseMs = performance.now() - t;
    // Every kind shows up: the corpus reaches past the header checks.
    expect(kinds.query).toBeGreaterThan(1000);
    expect(kinds.error).toBeGreaterThan(1000);
    expect(kinds.drop).toBeGreaterThan(1000);
    // Bounded work: well under 10 µs a packet on average.
    expect(parseMs / packets.length).toBeLessThan(0.01);
    for (const [i, p] of packets.entries()) {
      for (const transport of ["udp", "tcp"] as const) {
        const reply = resolver.handle(p, { networkId: "n1", address: i % 3 ? "10.61.0.2" : "192.0.2.9", transport });
        // No upstreams: nothing is ever forwarded, so every answer is immediate.
        if (reply === undefined) continue;
        expect(reply instanceof Uint8Array).toBe(true);
        if (!(reply instanceof Uint8Array)) continue;
        const parsed = parseReply(reply);
        expect(parsed?.id).toBe(readHeader(p)?.id ?? -1);
        if (transport === "udp") expect(reply.length).toBeLessThanOrEqual(1232);
      }
    }
    expect(resolver.stats.malformed).toBeGreaterThan(0);
    expect(resolver.stats.dropped).toBeGreaterThan(0);
    expect(resolver.stats.local).toBeGreaterThan(0);
    forwarder.close();
  });

  test("after the storm the resolver still answers correctly", () => {
    const resolver = new Resolver(fakeTable(), new Forwarder({ timeoutMs: 100 }), () => []);
    for (const p of corpus(7, 5000)) void resolver.handle(p, { networkId: "n1", address: "10.61.0.2", transport: "udp" });
    const reply = resolver.handle(buildQuery(77, "WWW", RecordType.A), { networkId: "n1", address: "10.61.0.2", transport: "udp" });
    if (!(reply instanceof Uint8Array)) throw new Error("no immediate reply");
    expect(parseReply(reply)).toMatchObject({ id: 77, rcode: 0, authoritative: true, answers: [{ name: "www", type: RecordType.A, ttl: 0, data: "10.61.0.2" }] });
  });
});

// ---- 2. live -----------------------------------------------------------------------------------

/** The sender that runs inside a sandbox: reads length-prefixed packets, blasts them. */
const SENDER = `
const [file, server] = process.argv.slice(2);
const buf = new Uint8Array(await Bun.file(file).arrayBuffer());
const packets = [];
for (let o = 0; o + 2 <= buf.length; ) { const n = (buf[o] << 8) | buf[o + 1]; packets.push(buf.subarray(o + 2, o + 2 + n)); o += 2 + n; }
let udpReplies = 0;
const sock = await Bun.udpSocket({ socket: { data() { udpReplies++; } } });
for (let i = 0; i < packets.length; i++) { sock.send(packets[i], 53, server); if (i % 100 === 99) await Bun.sleep(2); }
let tcpBytes = 0;
const open = (onOpen) => Bun.connect({ hostname: server, port: 53, socket: { open: onOpen, data(_s, d) { tcpBytes += d.length; }, error() {}, close() {} } });
const frame = (p) => { const f = new Uint8Array(p.length + 2); f[0] = p.length >> 8; f[1] = p.length & 255; f.set(p, 2); return f; };
const conns = [];
// Pipelined garbage frames (not empty: a zero-length frame ends the connection).
const framed = packets.filter((p) => p.length >= 12);
conns.push(await open((s) => { for (let i = 0; i < 200; i++) s.write(frame(framed[(i * 7919) % framed.length])); }));
// Half a length prefix; an oversize length with a few bytes; a zero-length frame; raw bytes.
conns.push(await open((s) => s.write(new Uint8Array([0]))));
conns.push(await open((s) => s.write(new Uint8Array([255, 255, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]))));
conns.push(await open((s) => s.write(new Uint8Array([0, 0, 0, 12]))));
conns.push(await open((s) => s.write(packets[3] ?? new Uint8Array(0))));
// Connections that never send anything.
for (let i = 0; i < 20; i++) conns.push(await open(() => undefined));
await Bun.sleep(800);
for (const c of conns) c.end();
sock.close();
console.log(JSON.stringify({ sent: packets.length, udpReplies, tcpBytes }));
process.exit(0);
`;

let lab: Lab;
let h: LabHost;
let agent: LabProcess;

beforeAll(async () => {
  lab = await Lab.create("dfz");
  h = await lab.host("h");
  // No upstreams: whatever the corpus asks is never forwarded to the machine's resolvers.
  const resolv = join(lab.dir, "resolv.conf");
  writeFileSync(resolv, "# no upstreams in this test\n");
  agent = h.spawnKnit(["agent", "--dns-timeout", "100"], { env: { KNIT_RESOLV_CONF: resolv } });
  await h.knitOk(["network", "create", "--subnet", "10.66.0.0/24", "fz"]);
  expect(await waitFor(() => agent.output().includes('"msg":"ready"'), 10_000, 20)).toBe(true);
});

afterAll(async () => {
  try {
    await h.knit(["rm", "-f", "attacker", "target"]);
    await h.knit(["network", "rm", "fz"]);
    expect(await agent.stop()).toBe(0);
    await assertHostClean(h);
  } finally {
    await lab.cleanup();
  }
});

describe("a live agent under malformed traffic", () => {
  test("thousands of bad packets over UDP and abusive TCP: it survives and answers at once", async () => {
    await h.knitOk(["run", "-d", "--name", "target", "--network", "fz", "--", "sleep", "1000"]);
    const id = (await h.knitOk(["run", "-d", "--name", "attacker", "--network", "fz", "--", "sleep", "1000"])).stdout.trim();
    const ns: NetnsRef = { path: `/run/netns/knit-${id.slice(0, 12)}` };
    const [target] = JSON.parse((await h.knitOk(["inspect", "target"])).stdout) as { NetworkSettings: { Networks: Record<string, { IPAddress: string }> } }[];
    const targetIp = target?.NetworkSettings.Networks["fz"]?.IPAddress ?? "?";
    const digTarget = async (extra: string[] = []): Promise<{ answer: string; ms: number }> => {
      const t = performance.now();
      const r = await lab.exec(ns, ["dig", "@10.66.0.1", "+short", "+time=1", "+tries=1", ...extra, "target"], { check: false });
      return { answer: r.stdout.trim(), ms: performance.now() - t };
    };
    expect((await digTarget()).answer).toBe(targetIp);

    const packets = corpus(0xf00d, 5000);
    const framed = new Uint8Array(packets.reduce((n, p) => n + p.length + 2, 0));
    let o = 0;
    for (const p of packets) {
      framed[o++] = p.length >> 8;
      framed[o++] = p.length & 0xff;
      framed.set(p, o);
      o += p.length;
    }
    const file = join(lab.dir, "corpus.bin");
    const script = join(lab.dir, "sender.js");
    writeFileSync(file, framed);
    writeFileSync(script, SENDER);
    const out = await lab.exec(ns, [process.execPath, script, file, "10.66.0.1"], { timeoutMs: 60_000 });
    const res = JSON.parse(out.stdout) as { sent: number; udpReplies: number; tcpBytes: number };
    expect(res.sent).toBe(5000);
    // Malformed queries with a readable header are answered (FORMERR), the rest dropped.
    expect(res.udpReplies).toBeGreaterThan(1000);
    expect(res.udpReplies).toBeLessThan(res.sent);
    expect(res.tcpBytes).toBeGreaterThan(0);

    // Same process, healthy, and it answers correctly and quickly over UDP and TCP.
    expect(agent.running).toBe(true);
    const health = JSON.parse((await h.knitOk(["agent", "status"])).stdout) as { status: string; pid: number; dns: { queries: { malformed: number; dropped: number; tcp: number } } };
    expect(health).toMatchObject({ status: "ok", pid: agent.pid });
    expect(health.dns.queries.malformed).toBeGreaterThan(1000);
    expect(health.dns.queries.dropped).toBeGreaterThan(100);
    expect(health.dns.queries.tcp).toBeGreaterThan(0);
    for (let i = 0; i < 10; i++) {
      for (const extra of [[], ["+tcp"]]) {
        const r = await digTarget(extra);
        expect(r.answer).toBe(targetIp);
        expect(r.ms).toBeLessThan(500);
      }
    }
    // No connection of the abuse is left open.
    expect(await waitFor(async () => (await h.exec(["ss", "-Htn", "state", "established", "src", "10.66.0.1:53"])).stdout.trim() === "", 15_000, 200)).toBe(true);
  });
});
