/**
 * Turning `network create` flags into validated IPAM configuration, with Docker's rules:
 * each --gateway, --ip-range and --aux-address must fall inside one --subnet; at most one
 * gateway and one range per subnet; subnets of one network must not overlap each other.
 * Pure: no store, no kernel (overlap with other networks and routes is checked by the caller).
 */
import { invalid } from "../errors.ts";
import { cidrContains, cidrCovers, cidrLast, cidrOverlaps, formatCidr, formatIp, parseCidr, parseIp, type Cidr } from "../net/ip.ts";
import type { SubnetConfig } from "../model.ts";

export interface IpamRequest {
  subnets: readonly string[];
  gateways: readonly string[];
  ipRanges: readonly string[];
  auxAddresses: Readonly<Record<string, string>>;
  ipv6: boolean;
}

interface Draft {
  cidr: Cidr;
  config: SubnetConfig;
}

function ownerOf(drafts: readonly Draft[], test: (c: Cidr) => boolean, what: string, value: string): Draft {
  const d = drafts.find((x) => test(x.cidr));
  if (!d) throw invalid(`no matching subnet for ${what} ${value}`, `each ${what} must lie inside one of the --subnet values`);
  return d;
}

/**
 * Validate explicit subnets and attach gateways, ranges and aux addresses to them.
 * Returns configs for the given subnets only; default pools are the caller's job.
 */
export function buildSubnetConfigs(req: IpamRequest): SubnetConfig[] {
  const drafts: Draft[] = req.subnets.map((s) => {
    const cidr = parseCidr(s, "subnet");
    if (cidr.family === 6 && !req.ipv6) throw invalid(`IPv6 subnet ${s} given without --ipv6`, "add --ipv6 to create a dual-stack network");
    if (cidr.family === 4 && cidr.prefix > 30) throw invalid(`invalid subnet ${s}: a /${cidr.prefix} has no room for a gateway and containers`);
    if (cidr.family === 6 && cidr.prefix > 126) throw invalid(`invalid subnet ${s}: a /${cidr.prefix} has no room for a gateway and containers`);
    return { cidr, config: { subnet: formatCidr(cidr), auxAddresses: {} } };
  });
  for (let i = 0; i < drafts.length; i++) {
    for (let j = i + 1; j < drafts.length; j++) {
      const a = drafts[i];
      const b = drafts[j];
      if (a && b && cidrOverlaps(a.cidr, b.cidr)) {
        throw invalid(`subnets ${a.config.subnet} and ${b.config.subnet} overlap`, "multiple overlapping subnet configuration is not supported");
      }
    }
  }
  for (const g of req.gateways) {
    const ip = parseIp(g, "gateway");
    const d = ownerOf(drafts, (c) => cidrContains(c, ip), "gateway", g);
    if (d.config.gateway) throw invalid(`cannot configure multiple gateways (${d.config.gateway}, ${g}) for the same subnet (${d.config.subnet})`);
    if (ip.value === d.cidr.base) throw invalid(`invalid gateway ${g}: it is the network address of ${d.config.subnet}`);
    if (ip.family === 4 && ip.value === cidrLast(d.cidr)) throw invalid(`invalid gateway ${g}: it is the broadcast address of ${d.config.subnet}`);
    d.config.gateway = formatIp(ip);
  }
  for (const r of req.ipRanges) {
    const range = parseCidr(r, "ip-range");
    const d = ownerOf(drafts, (c) => cidrCovers(c, range), "ip-range", r);
    if (d.config.ipRange) throw invalid(`cannot configure multiple ranges (${d.config.ipRange}, ${r}) on the same subnet (${d.config.subnet})`);
    d.config.ipRange = formatCidr(range);
  }
  for (const [name, addr] of Object.entries(req.auxAddresses)) {
    const ip = parseIp(addr, `aux-address ${name}`);
    const d = ownerOf(drafts, (c) => cidrContains(c, ip), "aux-address", `${name}=${addr}`);
    d.config.auxAddresses[name] = formatIp(ip);
  }
  if (req.subnets.length === 0 && (req.gateways.length || req.ipRanges.length || Object.keys(req.auxAddresses).length)) {
    throw invalid("--gateway, --ip-range and --aux-address need a --subnet", "add --subnet CIDR");
  }
  for (const d of drafts) d.config.gateway ??= formatIp({ family: d.cidr.family, value: d.cidr.base + 1n });
  return drafts.map((d) => d.config);
}

/** Config for a subnet picked from a default pool: gateway is its first address. */
export function poolConfig(cidr: Cidr): SubnetConfig {
  return { subnet: formatCidr(cidr), gateway: formatIp({ family: cidr.family, value: cidr.base + 1n }), auxAddresses: {} };
}

/** Parse `name=ip` aux address flags. */
export function parseAuxAddresses(list: readonly string[]): Record<string, string> {
  const out: Record<string, string> = {};
  for (const item of list) {
    const eq = item.indexOf("=");
    const name = item.slice(0, eq);
    if (eq <= 0 || eq === item.length - 1) throw invalid(`invalid --aux-address "${item}": expected NAME=IP`);
    if (name in out) throw invalid(`duplicate --aux-address name "${name}"`);
    out[name] = item.slice(eq + 1);
  }
  return out;
}
