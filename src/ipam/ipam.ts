/**
 * Address management: which addresses of a subnet may be handed out, and in what order.
 * Pure arithmetic; the claims themselves are store transactions made by the engine
 * (`ipam/<netId>/<address>` created only if absent), so no address is handed out twice,
 * across processes and, with etcd, across hosts.
 *
 * Search starts after the last address handed out (a cursor, as host-local does), so an
 * attach costs O(1) claims on a network with a thousand endpoints rather than a scan.
 */
import { invalid } from "../errors.ts";
import { cidrContains, cidrLast, cidrSize, formatCidr, formatIp, parseCidr, parseIp, type Cidr, type Ip } from "../net/ip.ts";
import type { SubnetConfig } from "../model.ts";

/** A subnet of a network with its parsed parts. */
export interface Pool {
  readonly config: SubnetConfig;
  readonly subnet: Cidr;
  /** Where dynamic addresses come from: the --ip-range, else the subnet. */
  readonly range: Cidr;
  readonly gateway: Ip | undefined;
}

export function toPool(config: SubnetConfig): Pool {
  const subnet = parseCidr(config.subnet);
  return {
    config,
    subnet,
    range: config.ipRange ? parseCidr(config.ipRange, "ip-range") : subnet,
    gateway: config.gateway ? parseIp(config.gateway, "gateway") : undefined,
  };
}

/** True for addresses that are never handed out by arithmetic: network and IPv4 broadcast. */
function isReservedByShape(pool: Pool, value: bigint): boolean {
  if (value === pool.subnet.base) return true;
  return pool.subnet.family === 4 && pool.subnet.prefix < 31 && value === cidrLast(pool.subnet);
}

/**
 * Candidate addresses for a dynamic allocation, starting after `cursor` and wrapping once
 * around the range. Claimed addresses (gateway and aux included) are skipped by the caller's
 * failed transaction; network and broadcast addresses are skipped here.
 */
export function* candidates(pool: Pool, cursor: bigint | undefined, limit = 1 << 20): Generator<Ip> {
  const { range } = pool;
  const size = cidrSize(range);
  const first = range.base;
  const start = cursor !== undefined && cidrContains(range, { family: range.family, value: cursor }) ? cursor - first + 1n : 0n;
  let yielded = 0;
  for (let i = 0n; i < size && yielded < limit; i++) {
    const value = first + ((start + i) % size);
    if (isReservedByShape(pool, value)) continue;
    yielded++;
    yield { family: range.family, value };
  }
}

/** Check a requested static address against the pool; returns it parsed. */
export function checkStaticAddress(pools: readonly Pool[], text: string, flag: string): { pool: Pool; ip: Ip } {
  const ip = parseIp(text, flag);
  const pool = pools.find((p) => cidrContains(p.subnet, ip));
  if (!pool) {
    const subnets = pools.filter((p) => p.subnet.family === ip.family).map((p) => formatCidr(p.subnet));
    throw invalid(
      `invalid ${flag} ${text}: no configured subnet contains it`,
      subnets.length ? `choose an address in ${subnets.join(", ")}` : `the network has no IPv${ip.family} subnet`,
    );
  }
  if (isReservedByShape(pool, ip.value)) throw invalid(`invalid ${flag} ${text}: it is the subnet's network or broadcast address`);
  return { pool, ip };
}

/** The addresses reserved when a network is created: gateways and aux addresses. */
export function reservedAddresses(pools: readonly Pool[]): { address: string; holder: string }[] {
  const out: { address: string; holder: string }[] = [];
  for (const p of pools) {
    if (p.gateway) out.push({ address: formatIp(p.gateway), holder: "gateway" });
    for (const [name, addr] of Object.entries(p.config.auxAddresses)) out.push({ address: formatIp(parseIp(addr)), holder: `aux:${name}` });
  }
  return out;
}
