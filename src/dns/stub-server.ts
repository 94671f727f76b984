/**
 * A tiny authoritative DNS server with a fixed zone: the "upstream" that tests, the demo and
 * the benchmark run inside the lab, so that no query ever reaches a real resolver. It is a
 * test tool, not part of knit's data path.
 *
 *   bun src/dns/stub-server.ts --listen ADDR [--listen ADDR...] [--port 53]
 *       [--answer NAME=IP ...] [--many NAME=COUNT ...] [--mode answer|silent|servfail] [--quiet]
 *
 * --answer gives NAME an A or AAAA record; --many gives NAME COUNT A records (to force
 * truncation over UDP); other names get NXDOMAIN. --mode silent never answers (a dead
 * server), servfail always fails. Over UDP an answer larger than the client allows is sent
 * truncated (TC), over TCP in full. Unless --quiet, every query is printed as one JSON line
 * {"server","transport","name","type"}. "ready" is printed once every socket is bound.
 */
import { writeSync } from "node:fs";
import { Rcode, RecordType, buildReply, parseQuery, udpLimit, type Answer } from "./packet.ts";
import { ipToBytes, tryParseIp } from "../net/ip.ts";

/** What the stub server knows and how it behaves. */
export interface StubZone {
  /** name -> answers (lower-case names without the final dot). */
  records: Map<string, Answer[]>;
  mode: "answer" | "silent" | "servfail";
}

function addressAnswer(ip: string): Answer {
  const parsed = tryParseIp(ip);
  if (!parsed) throw new Error(`not an address: ${ip}`);
  return { type: parsed.family === 4 ? RecordType.A : RecordType.AAAA, ttl: 60, rdata: ipToBytes(parsed) };
}

/** The reply of the stub zone to one packet (undefined: stay silent). */
export function stubAnswer(zone: StubZone, packet: Uint8Array, transport: "udp" | "tcp"): Uint8Array | undefined {
  if (zone.mode === "silent") return undefined;
  const p = parseQuery(packet);
  if (p.kind === "drop") return undefined;
  if (p.kind === "error") return buildReply(p, p.rcode);
  const q = p.query;
  if (zone.mode === "servfail") return buildReply(q, Rcode.SERVFAIL);
  const records = zone.records.get(q.question.name);
  if (!records) return buildReply(q, Rcode.NXDOMAIN, [], { authoritative: true });
  const answers = records.filter((a) => a.type === q.question.type);
  return buildReply(q, Rcode.NOERROR, answers, { authoritative: true, maxSize: transport === "udp" ? udpLimit(q.edns) : 65535 });
}

function parseArgs(argv: readonly string[]): { listen: string[]; port: number; zone: StubZone; quiet: boolean } {
  const out = { listen: [] as string[], port: 53, zone: { records: new Map<string, Answer[]>(), mode: "answer" as StubZone["mode"] }, quiet: false };
  const add = (name: string, a: Answer): void => {
    const key = name.toLowerCase().replace(/\.$/, "");
    out.zone.records.set(key, [...(out.zone.records.get(key) ?? []), a]);
  };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    const value = argv[i + 1] ?? "";
    if (flag === "--quiet") {
      out.quiet = true;
      continue;
    }
    i++;
    const [name = "", rest = ""] = value.split("=");
    if (flag === "--listen") out.listen.push(value);
    else if (flag === "--port") out.port = Number(value);
    else if (flag === "--answer") add(name, addressAnswer(rest));
    else if (flag === "--many") for (let k = 0; k < Number(rest); k++) add(name, addressAnswer(`198.18.${k >> 8}.${k & 255}`));
    else if (flag === "--mode" && (value === "answer" || value === "silent" || value === "servfail")) out.zone.mode = value;
    else throw new Error(`stub-server: bad argument ${flag ?? ""} ${value}`);
  }
  return out;
}

async function main(): Promise<void> {
  const args = parseArgs(process.argv.slice(2));
  const log = (server: string, transport: string, packet: Uint8Array): void => {
    if (args.quiet) return;
    const p = parseQuery(packet);
    const q = p.kind === "query" ? p.query.question : undefined;
    writeSync(1, `${JSON.stringify({ server, transport, name: q?.name ?? null, type: q?.type ?? null })}\n`);
  };
  for (const address of args.listen) {
    await Bun.udpSocket({
      hostname: address,
      port: args.port,
      binaryType: "uint8array",
      socket: {
        data: (sock, packet, port, from) => {
          log(address, "udp", packet);
          const reply = stubAnswer(args.zone, packet, "udp");
          if (reply) sock.send(reply, port, from);
        },
      },
    });
    Bun.listen<{ buf: Uint8Array }>({
      hostname: address,
      port: args.port,
      data: { buf: new Uint8Array(0) },
      socket: {
        open: (s) => {
          s.data = { buf: new Uint8Array(0) };
        },
        data: (s, chunk) => {
          const buf = new Uint8Array(s.data.buf.length + chunk.length);
          buf.set(s.data.buf);
          buf.set(chunk, s.data.buf.length);
          let rest = buf;
          while (rest.length >= 2) {
            const len = ((rest[0] ?? 0) << 8) | (rest[1] ?? 0);
            if (rest.length < 2 + len) break;
            const packet = rest.slice(2, 2 + len);
            rest = rest.subarray(2 + len);
            log(address, "tcp", packet);
            const reply = stubAnswer(args.zone, packet, "tcp");
            if (!reply) continue;
            const framed = new Uint8Array(reply.length + 2);
            framed[0] = reply.length >> 8;
            framed[1] = reply.length & 0xff;
            framed.set(reply, 2);
            s.write(framed);
          }
          s.data.buf = rest.slice();
        },
      },
    });
  }
  writeSync(1, "ready\n");
}

if (import.meta.main) await main();
