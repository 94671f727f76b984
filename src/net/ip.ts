/**
 * IPv4/IPv6 addresses and prefixes as bigints. The single place for address arithmetic in
 * knit: parsing, printing, containment, overlap, iteration.
 */
import { invalid } from "../errors.ts";

export type Family = 4 | 6;

/** An address: family and its value as an unsigned integer (32 or 128 bits). */
export interface Ip {
  readonly family: Family;
  readonly value: bigint;
}

/** A prefix in canonical form: `base` has no host bits set. */
export interface Cidr {
  readonly family: Family;
  readonly base: bigint;
  readonly prefix: number;
}

const bits = (f: Family): number => (f === 4 ? 32 : 128);
const allOnes = (f: Family): bigint => (1n << BigInt(bits(f))) - 1n;

function parseV4(s: string): bigint | undefined {
  const parts = s.split(".");
  if (parts.length !== 4) return undefined;
  let v = 0n;
  for (const p of parts) {
    if (!/^\d{1,3}$/.test(p)) return undefined;
    if (p.length > 1 && p.startsWith("0")) return undefined; // no octal-looking octets
    const n = Number(p);
    if (n > 255) return undefined;
    v = (v << 8n) | BigInt(n);
  }
  return v;
}

function parseV6(s: string): bigint | undefined {
  if (!/^[0-9a-fA-F:.]+$/.test(s) || s.length < 2) return undefined;
  let tail4: bigint | undefined;
  let text = s;
  const lastColon = s.lastIndexOf(":");
  if (s.includes(".")) {
    tail4 = parseV4(s.slice(lastColon + 1));
    if (tail4 === undefined) return undefined;
    text = `${s.slice(0, lastColon + 1)}0:0`;
  }
  const halves = text.split("::");
  if (halves.length > 2) return undefined;
  const group = (h: string): string[] => (h === "" ? [] : h.split(":"));
  const head = group(halves[0] ?? "");
  const rest = halves.length === 2 ? group(halves[1] ?? "") : [];
  const fill = 8 - head.length - rest.length;
  if (halves.length === 2 ? fill < 1 : head.length !== 8) return undefined;
  const groups = halves.length === 2 ? [...head, ...Array<string>(fill).fill("0"), ...rest] : head;
  let v = 0n;
  for (const g of groups) {
    if (!/^[0-9a-fA-F]{1,4}$/.test(g)) return undefined;
    v = (v << 16n) | BigInt(parseInt(g, 16));
  }
  if (tail4 !== undefined) v = (v & ~0xffffffffn) | tail4;
  return v;
}

/** Parse an address, or return undefined. */
export function tryParseIp(s: string): Ip | undefined {
  const v4 = parseV4(s);
  if (v4 !== undefined) return { family: 4, value: v4 };
  const v6 = s.includes(":") ? parseV6(s) : undefined;
  return v6 === undefined ? undefined : { family: 6, value: v6 };
}

/** Parse an address; `what` names the flag or field in the error. */
export function parseIp(s: string, what = "address"): Ip {
  const ip = tryParseIp(s.trim());
  if (!ip) throw invalid(`invalid ${what} "${s}": not an IPv4 or IPv6 address`);
  return ip;
}

/** An address's bytes in network order: 4 for IPv4, 16 for IPv6 (netlink attributes, DNS record data). */
export function ipToBytes(ip: Ip): Uint8Array {
  const n = ip.family === 4 ? 4 : 16;
  const out = new Uint8Array(n);
  let v = ip.value;
  for (let i = n - 1; i >= 0; i--) {
    out[i] = Number(v & 0xffn);
    v >>= 8n;
  }
  return out;
}

/** Print an address in its canonical text form (RFC 5952 for IPv6). */
export function formatIp(ip: Ip): string {
  if (ip.family === 4) {
    const v = ip.value;
    return [24n, 16n, 8n, 0n].map((s) => String((v >> s) & 255n)).join(".");
  }
  const groups: number[] = [];
  for (let i = 7; i >= 0; i--) groups.push(Number((ip.value >> BigInt(i * 16)) & 0xffffn));
  let bestStart = -1;
  let bestLen = 1;
  for (let i = 0; i < 8; ) {
    if (groups[i] !== 0) {
      i++;
      continue;
    }
    let j = i;
    while (j < 8 && groups[j] === 0) j++;
    if (j - i > bestLen) {
      bestStart = i;
      bestLen = j - i;
    }
    i = j;
  }
  const hex = groups.map((g) => g.toString(16));
  if (bestStart < 0) return hex.join(":");
  const left = hex.slice(0, bestStart).join(":");
  const right = hex.slice(bestStart + bestLen).join(":");
  return `${left}::${right}`;
}

/** Mask of the network bits of a prefix. */
function netMask(f: Family, prefix: number): bigint {
  return allOnes(f) ^ ((1n << BigInt(bits(f) - prefix)) - 1n);
}

/** Parse `addr/len` into an address with its prefix length, host bits kept. */
export function parseIpWithPrefix(s: string, what = "address"): { ip: Ip; prefix: number } {
  const m = /^([^/]+)\/(\d{1,3})$/.exec(s.trim());
  const ip = m ? tryParseIp(m[1] ?? "") : undefined;
  const prefix = m ? Number(m[2]) : NaN;
  if (!ip || !(prefix >= 0 && prefix <= bits(ip.family))) {
    throw invalid(`invalid ${what} "${s}": expected ADDRESS/LENGTH such as 10.1.0.0/24 or fd00::/64`);
  }
  return { ip, prefix };
}

/**
 * Parse a CIDR. With `strict` (the default, as Docker does for --subnet) host bits must be
 * zero; otherwise they are masked off.
 */
export function parseCidr(s: string, what = "subnet", strict = true): Cidr {
  const { ip, prefix } = parseIpWithPrefix(s, what);
  const base = ip.value & netMask(ip.family, prefix);
  if (strict && base !== ip.value) {
    const canonical = formatCidr({ family: ip.family, base, prefix });
    throw invalid(`invalid ${what} "${s}": host bits are set`, `use ${canonical}`);
  }
  return { family: ip.family, base, prefix };
}

export function formatCidr(c: Cidr): string {
  return `${formatIp({ family: c.family, value: c.base })}/${c.prefix}`;
}

/** Number of addresses in the prefix. */
export function cidrSize(c: Cidr): bigint {
  return 1n << BigInt(bits(c.family) - c.prefix);
}

/** Last address of the prefix (the IPv4 broadcast address). */
export function cidrLast(c: Cidr): bigint {
  return c.base + cidrSize(c) - 1n;
}

export function cidrContains(c: Cidr, ip: Ip): boolean {
  return c.family === ip.family && ip.value >= c.base && ip.value <= cidrLast(c);
}

/** True when `inner` lies wholly inside `outer`. */
export function cidrCovers(outer: Cidr, inner: Cidr): boolean {
  return outer.family === inner.family && outer.prefix <= inner.prefix && inner.base >= outer.base && cidrLast(inner) <= cidrLast(outer);
}

export function cidrOverlaps(a: Cidr, b: Cidr): boolean {
  return a.family === b.family && a.base <= cidrLast(b) && b.base <= cidrLast(a);
}

/** The address at `offset` from the start of the prefix. */
export function cidrAt(c: Cidr, offset: bigint): Ip {
  return { family: c.family, value: c.base + offset };
}

/** Split a prefix into subprefixes of length `newPrefix`, in order. */
export function* splitCidr(c: Cidr, newPrefix: number): Generator<Cidr> {
  const step = 1n << BigInt(bits(c.family) - newPrefix);
  for (let b = c.base; b <= cidrLast(c); b += step) yield { family: c.family, base: b, prefix: newPrefix };
}

export const ipEquals = (a: Ip, b: Ip): boolean => a.family === b.family && a.value === b.value;

/** Text form `addr/len` of an address within a prefix, as the kernel and Docker print it. */
export const formatIpWithPrefix = (ip: Ip, prefix: number): string => `${formatIp(ip)}/${prefix}`;
