/**
 * Published ports in `table inet knit`: destination NAT from host addresses to sandboxes, no
 * userland proxy, so servers see their clients' real addresses. Pure rule builders; rules.ts
 * puts them into the table and firewall.ts applies the table in one transaction.
 *
 * Design note. Where a packet for a published port comes from decides which hook sees it:
 *
 *   from another machine, or from a sandbox (hairpin, other networks)
 *        prerouting (nat, dstnat): `fib daddr type local` -> chain published -> dnat
 *   from the host itself (its own addresses, 127.0.0.1)
 *        output (nat, -100): `fib daddr type local` -> chain published -> dnat
 *
 * `fib daddr type local` is true for every address of the host (also the bridges' gateways
 * and 127.0.0.1), so a wildcard mapping ("0.0.0.0") is just "tcp dport P" behind it, and a
 * specific one adds "ip daddr H". After DNAT two cases need source NAT in postrouting:
 *
 *   hairpin: a sandbox reaching a port published on its own network through a host address
 *     (ct status dnat, source in the subnet, going back out of the same bridge): masquerade,
 *     else the server would answer the client directly from its own address and the client
 *     would drop the answer.
 *   localhost: a packet from 127.0.0.1 routed out of a bridge. The kernel refuses to route a
 *     loopback source out of a real interface unless `route_localnet` is set on that interface
 *     (firewall.ts sets it on bridges with IPv4 ports); the masquerade then replaces the
 *     source with the bridge's address. The `guard` chain drops what route_localnet would
 *     otherwise let in: packets from the bridge to (or from) 127.0.0.0/8.
 *
 * Traffic from other networks is DNATed in prerouting and let through the forward chain by
 * its `ct status dnat accept` (before the isolation rules); its own network's masquerade
 * rule (`oifname != bridge`) gives it the gateway's source address. IPv6 works the same
 * way except that ::1 is never published (IPv6 has no route_localnet).
 */
import { invalid } from "../errors.ts";
import { cidrContains, formatIp, parseIp, type Cidr, type Family } from "../net/ip.ts";
import { PortProtocols, type PortProtocol } from "../model.ts";

/** One published port as the engine describes it (from the store). */
export interface PublishedPort {
  /** Host address; "0.0.0.0" or "::" for every address of the host in that family. */
  hostIp: string;
  hostPort: number;
  proto: PortProtocol;
  /** The sandbox's address on the network (same family as hostIp), and the port there. */
  containerIp: string;
  containerPort: number;
  /** The sandbox's id: rules carry its first 12 digits in their comment. */
  sandboxId: string;
}

/** A published port after validation: canonical addresses, family known. */
export interface CheckedPort {
  readonly family: Family;
  /** Canonical host address, or undefined for every address of the family. */
  readonly hostIp: string | undefined;
  readonly hostPort: number;
  readonly proto: PortProtocol;
  readonly containerIp: string;
  readonly containerPort: number;
  readonly sandboxId: string;
}

/** The chain holding every DNAT rule; prerouting and output jump to it. */
export const PUBLISHED_CHAIN = "published";

function checkPortNumber(n: number, what: string): number {
  if (!Number.isInteger(n) || n < 1 || n > 65535) throw invalid(`invalid ${what} ${n}: ports are 1 to 65535`);
  return n;
}

/** Validate a network's published ports against its subnets. */
export function checkPorts(ports: readonly PublishedPort[], subnets: readonly Cidr[], networkId: string): CheckedPort[] {
  return ports.map((p) => {
    const host = parseIp(p.hostIp, "published host IP");
    const container = parseIp(p.containerIp, "published container IP");
    if (host.family !== container.family) throw invalid(`published port ${p.hostIp}:${p.hostPort}: host and container addresses are of different IP families`);
    if (!subnets.some((s) => cidrContains(s, container))) throw invalid(`published port ${p.hostIp}:${p.hostPort}: ${p.containerIp} is in no subnet of network ${networkId}`);
    if (!PortProtocols.includes(p.proto)) throw invalid(`invalid protocol "${String(p.proto)}" for a published port`);
    if (!/^[0-9a-f]{12,64}$/.test(p.sandboxId)) throw invalid(`invalid sandbox id "${p.sandboxId}"`);
    return {
      family: host.family,
      hostIp: host.value === 0n ? undefined : formatIp(host),
      hostPort: checkPortNumber(p.hostPort, "host port"),
      proto: p.proto,
      containerIp: formatIp(container),
      containerPort: checkPortNumber(p.containerPort, "container port"),
      sandboxId: p.sandboxId,
    };
  });
}

/** Two mappings that would catch the same packets (same family, protocol, port, address). */
export function checkPortOverlaps(ports: readonly CheckedPort[]): void {
  const seen = new Map<string, (string | undefined)[]>();
  for (const p of ports) {
    const key = `${p.family}/${p.proto}/${p.hostPort}`;
    const hosts = seen.get(key) ?? [];
    if (hosts.some((h) => h === undefined || p.hostIp === undefined || h === p.hostIp)) {
      throw invalid(`host port ${p.hostIp ?? (p.family === 4 ? "0.0.0.0" : "::")}:${p.hostPort}/${p.proto} is published twice`);
    }
    seen.set(key, [...hosts, p.hostIp]);
  }
}

/** What the DNAT rules need to know about a network. */
export interface PortNetwork {
  readonly id: string;
  readonly bridge: string;
  readonly v4: readonly string[];
  readonly v6: readonly string[];
  readonly ports: readonly CheckedPort[];
  /** route_localnet can be set on the bridge (so 127.0.0.1 can be published). */
  readonly localnet: boolean;
}

const q = (s: string): string => `"${s}"`;
const portComment = (n: PortNetwork, p: CheckedPort): string => `comment ${q(`knit ${n.id} ${p.sandboxId.slice(0, 12)}`)}`;
const netComment = (n: PortNetwork): string => `comment ${q(`knit ${n.id}`)}`;
const hasFamily = (n: PortNetwork, family: Family): boolean => n.ports.some((p) => p.family === family);

/** One DNAT rule for the `published` chain. */
export function dnatRule(n: PortNetwork, p: CheckedPort): string {
  const ipKw = p.family === 4 ? "ip" : "ip6";
  let match: string;
  if (p.hostIp !== undefined) match = `${ipKw} daddr ${p.hostIp}`;
  else if (p.family === 6) match = "ip6 daddr != ::1";
  else match = n.localnet ? "meta nfproto ipv4" : "ip daddr != 127.0.0.0/8";
  const to = p.family === 4 ? `${p.containerIp}:${p.containerPort}` : `[${p.containerIp}]:${p.containerPort}`;
  return `${match} ${p.proto} dport ${p.hostPort} dnat ${ipKw} to ${to} ${portComment(n, p)}`;
}

/** Source NAT after DNAT: hairpin within the network, and 127.0.0.1 leaving via the bridge. */
export function portSnatRules(n: PortNetwork): string[] {
  if (n.ports.length === 0) return [];
  const br = q(n.bridge);
  const out: string[] = [];
  if (hasFamily(n, 4)) out.push(...n.v4.map((s) => `ip saddr ${s} oifname ${br} ct status dnat masquerade ${netComment(n)}`));
  if (hasFamily(n, 6)) out.push(...n.v6.map((s) => `ip6 saddr ${s} oifname ${br} ct status dnat masquerade ${netComment(n)}`));
  if (n.localnet && hasFamily(n, 4)) out.push(`ip saddr 127.0.0.0/8 oifname ${br} masquerade ${netComment(n)}`);
  return out;
}

/** Drops of loopback traffic that route_localnet would let in from the bridge. */
export function localnetGuardRules(n: PortNetwork): string[] {
  if (!n.localnet || !hasFamily(n, 4)) return [];
  const br = q(n.bridge);
  return [`iifname ${br} ip daddr 127.0.0.0/8 drop ${netComment(n)}`, `iifname ${br} ip saddr 127.0.0.0/8 drop ${netComment(n)}`];
}

/** The bridges that need `route_localnet=1` (IPv4 ports, a name sysctl can address). */
export const localnetBridges = (nets: readonly PortNetwork[]): string[] => nets.filter((n) => n.localnet && hasFamily(n, 4)).map((n) => n.bridge);

/**
 * The chains published ports add to `table inet knit` (none when nothing is published). The
 * caller adds {@link portSnatRules} to its postrouting chain.
 */
export function portChains(nets: readonly PortNetwork[], chain: (name: string, hook: string, rules: readonly string[]) => string[]): string[] {
  const dnat = nets.flatMap((n) => n.ports.map((p) => dnatRule(n, p)));
  if (dnat.length === 0) return [];
  const guard = nets.flatMap(localnetGuardRules);
  const jump = [`fib daddr type local jump ${PUBLISHED_CHAIN}`];
  return [
    ...(guard.length ? chain("guard", "type filter hook prerouting priority raw; policy accept;", guard) : []),
    ...chain("prerouting", "type nat hook prerouting priority dstnat; policy accept;", jump),
    ...chain("output", "type nat hook output priority -100; policy accept;", jump),
    `\tchain ${PUBLISHED_CHAIN} {`,
    ...dnat.map((r) => `\t\t${r}`),
    "\t}",
  ];
}

/** Whether a bridge name can be used in a `net.ipv4.conf.<name>.*` sysctl key. */
export const sysctlSafeIfname = (name: string): boolean => !name.includes(".");
