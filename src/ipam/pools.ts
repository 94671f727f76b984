/**
 * Default address pools, picked the way Docker picks them when no --subnet is given:
 * 172.17-19.0.0/16, then 172.20/14, 172.24/14 and 172.28/14 split into /16s, then
 * 192.168.0.0/16 split into /20s. The first candidate that overlaps no existing network and
 * no route on the host wins. IPv6 networks without a subnet get a random ULA /64.
 */
import { KnitError } from "../errors.ts";
import { cidrOverlaps, parseCidr, splitCidr, type Cidr } from "../net/ip.ts";

const V4_POOLS: readonly { base: string; size: number }[] = [
  { base: "172.17.0.0/16", size: 16 },
  { base: "172.18.0.0/16", size: 16 },
  { base: "172.19.0.0/16", size: 16 },
  { base: "172.20.0.0/14", size: 16 },
  { base: "172.24.0.0/14", size: 16 },
  { base: "172.28.0.0/14", size: 16 },
  { base: "192.168.0.0/16", size: 20 },
];

/** Every default IPv4 candidate in Docker's order. */
export function* defaultV4Candidates(): Generator<Cidr> {
  for (const pool of V4_POOLS) yield* splitCidr(parseCidr(pool.base), pool.size);
}

/** The first default IPv4 pool that overlaps nothing in `taken`. */
export function pickV4Pool(taken: readonly Cidr[]): Cidr {
  for (const c of defaultV4Candidates()) {
    if (!taken.some((t) => cidrOverlaps(t, c))) return c;
  }
  throw new KnitError("conflict", "all predefined address pools have been fully subnetted", {
    hint: "give the network a --subnet of its own",
  });
}

/** A random unique-local IPv6 /64 (fdXX:XXXX:XXXX:XXXX::/64) that overlaps nothing in `taken`. */
export function pickV6Pool(taken: readonly Cidr[]): Cidr {
  for (let i = 0; i < 16; i++) {
    const bytes = crypto.getRandomValues(new Uint8Array(7));
    let base = 0xfdn;
    for (const b of bytes) base = (base << 8n) | BigInt(b);
    const c: Cidr = { family: 6, base: base << 64n, prefix: 64 };
    if (!taken.some((t) => cidrOverlaps(t, c))) return c;
  }
  throw new KnitError("conflict", "could not find a free IPv6 pool", { hint: "give the network an IPv6 --subnet" });
}
