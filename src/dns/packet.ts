/**
 * DNS wire format (RFC 1035, 3596, 6891): just what knit's resolver needs, and total.
 *
 * Design note. Every byte here comes from an untrusted sandbox, so parsing never throws and
 * never loops: each read is bounds-checked against the packet, a name is at most 255 bytes
 * of labels of at most 63, and a compression pointer must point strictly backwards, with at
 * most MAX_HOPS of them per name (a pointer cycle would otherwise spin forever). A packet
 * that is not a well-formed query yields FORMERR (when its header can be answered) or is
 * dropped (too short for a header, or a response: answering responses invites loops).
 *
 * Names are handled in two forms: `wire`, the uncompressed label bytes in the sender's
 * case (echoed back in the question), and `name`, the lower-case dotted text used for
 * lookups. A name whose labels hold a '.' or bytes outside printable ASCII cannot be any
 * sandbox's name: it is marked not `plain` and only ever forwarded.
 */

/** Record types knit answers or inspects. */
export const RecordType = { A: 1, NS: 2, CNAME: 5, SOA: 6, PTR: 12, MX: 15, TXT: 16, AAAA: 28, OPT: 41, ANY: 255 } as const;
/** The Internet class, and the class wildcard. */
export const RecordClass = { IN: 1, ANY: 255 } as const;
/** Response codes (BADVERS is an extended code carried partly in the OPT record). */
export const Rcode = { NOERROR: 0, FORMERR: 1, SERVFAIL: 2, NXDOMAIN: 3, NOTIMP: 4, REFUSED: 5, BADVERS: 16 } as const;

/** Size of the fixed DNS header. */
export const HEADER_SIZE = 12;
/** Largest UDP reply to a client that did not advertise more (RFC 1035). */
export const PLAIN_UDP_SIZE = 512;
/** The UDP payload size knit advertises and honours at most (the DNS flag day 2020 value). */
export const EDNS_UDP_SIZE = 1232;
/** Longest name in wire form, including the root label. */
const MAX_NAME_WIRE = 255;
/** Compression pointers followed per name at most. */
const MAX_HOPS = 64;

const FLAG_QR = 0x8000;
const FLAG_AA = 0x0400;
const FLAG_TC = 0x0200;
const FLAG_RD = 0x0100;
const FLAG_RA = 0x0080;
const FLAG_CD = 0x0010;

/** The question of a query. */
export interface Question {
  /** Lower-case dotted name without the final dot ("" is the root). */
  readonly name: string;
  /** False when a label holds '.' or a byte outside printable ASCII: no sandbox has that name. */
  readonly plain: boolean;
  /** The name in uncompressed wire form, in the sender's case. */
  readonly wire: Uint8Array;
  readonly type: number;
  readonly klass: number;
}

/** The EDNS(0) OPT record of a query. */
export interface Edns {
  /** Largest UDP reply the client accepts (at least 512). */
  readonly udpSize: number;
  readonly version: number;
}

/** A well-formed standard query. */
export interface Query {
  readonly id: number;
  readonly flags: number;
  readonly question: Question;
  readonly edns: Edns | undefined;
}

/** What {@link parseQuery} makes of a packet. */
export type Parsed =
  | { readonly kind: "query"; readonly query: Query }
  /** Answer with this rcode (and the question, when it could be read). */
  | { readonly kind: "error"; readonly id: number; readonly flags: number; readonly rcode: number; readonly question?: Question; readonly edns?: Edns }
  /** Not worth an answer: too short for a header, or not a query at all. */
  | { readonly kind: "drop" };

const DROP: Parsed = { kind: "drop" };

/** One answer record; the owner is always the question's name. */
export interface Answer {
  readonly type: number;
  readonly ttl: number;
  readonly rdata: Uint8Array;
}

const u16 = (b: Uint8Array, o: number): number => ((b[o] ?? 0) << 8) | (b[o + 1] ?? 0);

/** Scratch buffers for name decoding (parsing is synchronous, so one set suffices). */
const scratchText = new Uint8Array(MAX_NAME_WIRE + 1);
const scratchWire = new Uint8Array(MAX_NAME_WIRE + 1);

/** A label byte that may appear in a sandbox name (letters already lower-cased). */
function nameByte(c: number): boolean {
  return (c >= 0x61 && c <= 0x7a) || (c >= 0x30 && c <= 0x39) || c === 0x2d || c === 0x5f;
}

/**
 * Decode the name at `start`. Returns undefined when it is malformed: out of bounds, a
 * label type other than plain or pointer, a forward or self pointer, too many hops, or
 * longer than 255 bytes.
 */
export function readName(buf: Uint8Array, start: number): { question: Omit<Question, "type" | "klass">; end: number } | undefined {
  let off = start;
  let end = -1;
  let hops = 0;
  let wireLen = 0;
  let textLen = 0;
  let plain = true;
  for (;;) {
    if (off >= buf.length) return undefined;
    const len = buf[off] ?? 0;
    if (len === 0) {
      if (end < 0) end = off + 1;
      break;
    }
    const kind = len & 0xc0;
    if (kind === 0xc0) {
      if (off + 1 >= buf.length || ++hops > MAX_HOPS) return undefined;
      const target = ((len & 0x3f) << 8) | (buf[off + 1] ?? 0);
      if (target >= off) return undefined;
      if (end < 0) end = off + 2;
      off = target;
      continue;
    }
    if (kind !== 0) return undefined;
    if (off + 1 + len > buf.length || wireLen + len + 2 > MAX_NAME_WIRE) return undefined;
    scratchWire[wireLen++] = len;
    if (textLen > 0) scratchText[textLen++] = 0x2e;
    for (let i = off + 1; i <= off + len; i++) {
      let c = buf[i] ?? 0;
      scratchWire[wireLen++] = c;
      if (c >= 0x41 && c <= 0x5a) c |= 0x20;
      if (!nameByte(c)) plain = false;
      scratchText[textLen++] = c;
    }
    off += 1 + len;
  }
  scratchWire[wireLen++] = 0;
  // Bytes outside ASCII make the text lossy, but such a name is not plain and never looked up.
  const name = String.fromCharCode(...scratchText.subarray(0, textLen));
  return { question: { name, plain, wire: scratchWire.slice(0, wireLen) }, end };
}

/** Offset after the name at `off` (pointers end a name), or -1 when out of bounds. */
function skipName(buf: Uint8Array, start: number): number {
  let off = start;
  for (let labels = 0; labels < 128; labels++) {
    if (off >= buf.length) return -1;
    const len = buf[off] ?? 0;
    if (len === 0) return off + 1;
    if ((len & 0xc0) === 0xc0) return off + 2 <= buf.length ? off + 2 : -1;
    if ((len & 0xc0) !== 0) return -1;
    off += 1 + len;
  }
  return -1;
}

/** Read the header's id and flags (undefined when the packet is too short). */
export function readHeader(buf: Uint8Array): { id: number; flags: number; rcode: number; counts: [number, number, number, number] } | undefined {
  if (buf.length < HEADER_SIZE) return undefined;
  const flags = u16(buf, 2);
  return { id: u16(buf, 0), flags, rcode: flags & 0xf, counts: [u16(buf, 4), u16(buf, 6), u16(buf, 8), u16(buf, 10)] };
}

/**
 * Parse a packet received from a client. Total: never throws, whatever the bytes.
 */
export function parseQuery(buf: Uint8Array): Parsed {
  if (buf.length < HEADER_SIZE) return DROP;
  const id = u16(buf, 0);
  const flags = u16(buf, 2);
  if (flags & FLAG_QR) return DROP;
  const opcode = (flags >> 11) & 0xf;
  if (opcode !== 0) return { kind: "error", id, flags, rcode: Rcode.NOTIMP };
  if (u16(buf, 4) !== 1) return { kind: "error", id, flags, rcode: Rcode.FORMERR };
  const read = readName(buf, HEADER_SIZE);
  if (!read || read.end + 4 > buf.length) return { kind: "error", id, flags, rcode: Rcode.FORMERR };
  const question: Question = { ...read.question, type: u16(buf, read.end), klass: u16(buf, read.end + 2) };
  const records = u16(buf, 6) + u16(buf, 8) + u16(buf, 10);
  const additionalFrom = u16(buf, 6) + u16(buf, 8);
  let off = read.end + 4;
  let edns: Edns | undefined;
  for (let i = 0; i < records; i++) {
    const at = skipName(buf, off);
    if (at < 0 || at + 10 > buf.length) return { kind: "error", id, flags, rcode: Rcode.FORMERR, question };
    const type = u16(buf, at);
    const rdlen = u16(buf, at + 8);
    if (at + 10 + rdlen > buf.length) return { kind: "error", id, flags, rcode: Rcode.FORMERR, question };
    if (type === RecordType.OPT) {
      // One OPT at most, in the additional section, owned by the root (RFC 6891 6.1.1).
      if (edns || i < additionalFrom || at !== off + 1) return { kind: "error", id, flags, rcode: Rcode.FORMERR, question };
      edns = { udpSize: Math.max(PLAIN_UDP_SIZE, u16(buf, at + 2)), version: buf[at + 5] ?? 0 };
    }
    off = at + 10 + rdlen;
  }
  if (edns && edns.version !== 0) return { kind: "error", id, flags, rcode: Rcode.BADVERS, question, edns };
  return { kind: "query", query: { id, flags, question, edns } };
}

/** Largest reply this client accepts over UDP. */
export function udpLimit(edns: Edns | undefined): number {
  return edns ? Math.min(edns.udpSize, EDNS_UDP_SIZE) : PLAIN_UDP_SIZE;
}

/** How {@link buildReply} shapes a reply. */
export interface ReplyOptions {
  /** Set AA: knit is the authority for sandbox names. */
  authoritative?: boolean;
  /** Largest size allowed (UDP): answers that do not fit are dropped and TC is set. */
  maxSize?: number;
  /** Set TC (and send no answers) regardless of size. */
  truncated?: boolean;
}

/**
 * Build a reply to `id`/`flags` with the question (when known), the answers (all owned by
 * the question's name, written as a pointer to it) and an OPT record when the query had one.
 */
export function buildReply(
  head: { id: number; flags: number; question?: Question | undefined; edns?: Edns | undefined },
  rcode: number,
  answers: readonly Answer[] = [],
  opts: ReplyOptions = {},
): Uint8Array {
  const q = head.question;
  const optSize = head.edns ? 11 : 0;
  let size = HEADER_SIZE + (q ? q.wire.length + 4 : 0) + optSize;
  const full = q ? answers.reduce((n, a) => n + 12 + a.rdata.length, size) : size;
  // Answers point at the question's name (offset 12); without a question there are none.
  const fits = full <= (opts.maxSize ?? 65535) && opts.truncated !== true;
  const kept = q && fits ? answers : [];
  if (fits) size = full;
  const out = new Uint8Array(size);
  let flags = FLAG_QR | FLAG_RA | (head.flags & (FLAG_RD | FLAG_CD)) | (rcode & 0xf);
  if (opts.authoritative) flags |= FLAG_AA;
  if (!fits) flags |= FLAG_TC;
  out[0] = head.id >> 8;
  out[1] = head.id & 0xff;
  out[2] = flags >> 8;
  out[3] = flags & 0xff;
  out[5] = q ? 1 : 0;
  out[6] = kept.length >> 8;
  out[7] = kept.length & 0xff;
  out[11] = optSize ? 1 : 0;
  let off = HEADER_SIZE;
  if (q) {
    out.set(q.wire, off);
    off += q.wire.length;
    out[off++] = q.type >> 8;
    out[off++] = q.type & 0xff;
    out[off++] = q.klass >> 8;
    out[off++] = q.klass & 0xff;
  }
  for (const a of kept) {
    out[off++] = 0xc0;
    out[off++] = HEADER_SIZE;
    out[off++] = a.type >> 8;
    out[off++] = a.type & 0xff;
    out[off++] = 0;
    out[off++] = RecordClass.IN;
    out[off++] = (a.ttl >>> 24) & 0xff;
    out[off++] = (a.ttl >>> 16) & 0xff;
    out[off++] = (a.ttl >>> 8) & 0xff;
    out[off++] = a.ttl & 0xff;
    out[off++] = a.rdata.length >> 8;
    out[off++] = a.rdata.length & 0xff;
    out.set(a.rdata, off);
    off += a.rdata.length;
  }
  if (optSize) {
    // Root owner, type OPT, our UDP size, extended rcode high bits, version 0, no options.
    out[off + 1] = 0;
    out[off + 2] = RecordType.OPT;
    out[off + 3] = EDNS_UDP_SIZE >> 8;
    out[off + 4] = EDNS_UDP_SIZE & 0xff;
    out[off + 5] = (rcode >> 4) & 0xff;
  }
  return out;
}

/** A copy of `msg` with its id replaced (for relaying an upstream's reply). */
export function withId(msg: Uint8Array, id: number): Uint8Array {
  const out = msg.slice();
  out[0] = id >> 8;
  out[1] = id & 0xff;
  return out;
}

/** True when a message has the TC (truncated) flag. */
export const isTruncated = (msg: Uint8Array): boolean => msg.length >= 4 && ((msg[2] ?? 0) & 0x02) !== 0;

/** A question in wire form plus type and class, for comparing a reply's question to ours. */
export function sameQuestion(reply: Uint8Array, q: Question): boolean {
  const read = readName(reply, HEADER_SIZE);
  if (!read || read.end + 4 > reply.length || u16(reply, 4) !== 1) return false;
  return read.question.name === q.name && u16(reply, read.end) === q.type && u16(reply, read.end + 2) === q.klass;
}

/** Encode a dotted name (no escapes; labels of at most 63 bytes) in wire form. */
export function encodeName(name: string): Uint8Array {
  const labels = name.split(".").filter((l) => l !== "");
  const out = new Uint8Array(labels.reduce((n, l) => n + 1 + l.length, 1));
  let off = 0;
  for (const l of labels) {
    out[off++] = Math.min(l.length, 63);
    for (let i = 0; i < Math.min(l.length, 63); i++) out[off++] = l.charCodeAt(i) & 0xff;
  }
  return out;
}

/** A query for `name`/`type` (used by tests, the benchmark and the agent's self-check). */
export function buildQuery(id: number, name: string, type: number, opts: { rd?: boolean; edns?: number } = {}): Uint8Array {
  const wire = encodeName(name);
  const question: Question = { name: name.toLowerCase(), plain: true, wire, type, klass: RecordClass.IN };
  const msg = buildReply({ id, flags: opts.rd === false ? 0 : FLAG_RD, question, edns: opts.edns ? { udpSize: opts.edns, version: 0 } : undefined }, 0);
  // buildReply makes responses; turn it into a query: clear QR and RA, advertise our size.
  msg[2] = (msg[2] ?? 0) & ~(FLAG_QR >> 8);
  msg[3] = 0;
  if (opts.edns) {
    const opt = msg.length - 11;
    msg[opt + 3] = opts.edns >> 8;
    msg[opt + 4] = opts.edns & 0xff;
  }
  return msg;
}

/** A parsed reply: rcode, flags and the answers' data, for clients (tests, benchmark). */
export interface ParsedReply {
  id: number;
  rcode: number;
  truncated: boolean;
  authoritative: boolean;
  answers: { name: string; type: number; ttl: number; data: string }[];
}

/** Parse a reply's answer section (A, AAAA, PTR shown as text; other types as hex). */
export function parseReply(buf: Uint8Array): ParsedReply | undefined {
  const h = readHeader(buf);
  if (!h || !(h.flags & FLAG_QR)) return undefined;
  let off = HEADER_SIZE;
  for (let i = 0; i < h.counts[0]; i++) {
    const at = skipName(buf, off);
    if (at < 0 || at + 4 > buf.length) return undefined;
    off = at + 4;
  }
  const answers: ParsedReply["answers"] = [];
  for (let i = 0; i < h.counts[1]; i++) {
    const owner = readName(buf, off);
    const at = skipName(buf, off);
    if (!owner || at < 0 || at + 10 > buf.length) return undefined;
    const type = u16(buf, at);
    const ttl = ((u16(buf, at + 4) << 16) >>> 0) + u16(buf, at + 6);
    const rdlen = u16(buf, at + 8);
    const rd = at + 10;
    if (rd + rdlen > buf.length) return undefined;
    const bytes = buf.subarray(rd, rd + rdlen);
    let data: string;
    if (type === RecordType.A && rdlen === 4) data = Array.from(bytes).join(".");
    else if (type === RecordType.AAAA && rdlen === 16) data = formatV6(bytes);
    else if (type === RecordType.PTR || type === RecordType.CNAME) data = readName(buf, rd)?.question.name ?? "";
    else data = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
    answers.push({ name: owner.question.name, type, ttl, data });
    off = rd + rdlen;
  }
  return { id: h.id, rcode: h.rcode, truncated: (h.flags & FLAG_TC) !== 0, authoritative: (h.flags & FLAG_AA) !== 0, answers };
}

/** 16 bytes as an RFC 5952 IPv6 address. */
function formatV6(b: Uint8Array): string {
  const groups: number[] = [];
  for (let i = 0; i < 16; i += 2) groups.push(((b[i] ?? 0) << 8) | (b[i + 1] ?? 0));
  let best = -1;
  let bestLen = 1;
  for (let i = 0; i < 8; ) {
    if (groups[i] !== 0) {
      i++;
      continue;
    }
    let j = i;
    while (j < 8 && groups[j] === 0) j++;
    if (j - i > bestLen) [best, bestLen] = [i, j - i];
    i = j;
  }
  const hex = groups.map((g) => g.toString(16));
  return best < 0 ? hex.join(":") : `${hex.slice(0, best).join(":")}::${hex.slice(best + bestLen).join(":")}`;
}
