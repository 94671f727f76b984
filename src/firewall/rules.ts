/**
 * Rule builders for knit's nftables tables. Pure functions from a validated description of
 * the bridge networks to lines of nft script; `firewall.ts` assembles them into one
 * transaction. Every name or subnet that reaches the script is validated or re-printed in
 * canonical form first, so nothing a user typed can change the script's syntax.
 */
import { invalid } from "../errors.ts";
import { checkIfname } from "../net/ifname.ts";
import { formatCidr, formatIp, parseCidr, tryParseIp } from "../net/ip.ts";
import { checkPortOverlaps, checkPorts, portChains, portSnatRules, sysctlSafeIfname, type CheckedPort, type PublishedPort } from "./dnat.ts";

/** What the firewall needs to know about one bridge network. */
export interface BridgeNetworkRules {
  /** The network's id (used in rule comments). */
  networkId: string;
  /** Linux bridge device name. */
  bridge: string;
  /** CIDRs, IPv4 and/or IPv6. */
  subnets: string[];
  /** `com.docker.network.bridge.enable_ip_masquerade`. */
  masquerade: boolean;
  /** `--internal`: no traffic in or out of the bridge. */
  internal: boolean;
  /** Ports published to sandboxes on this network (DNAT from the host's addresses). */
  ports?: readonly PublishedPort[];
  /**
   * An IPv4 address of the host on the bridge through which sandboxes may reach the host's
   * DNS (UDP and TCP port 53), and nothing else of the host: everything else that enters
   * the host from the bridge is dropped (internal overlay networks, src/cluster/overlay-dns.ts).
   */
  dnsOnly?: string;
}

/** A network after validation: canonical subnets split by family. */
export interface CheckedNetwork {
  readonly id: string;
  readonly bridge: string;
  readonly v4: readonly string[];
  readonly v6: readonly string[];
  readonly masquerade: boolean;
  readonly internal: boolean;
  readonly ports: readonly CheckedPort[];
  /** route_localnet can be set on the bridge, so 127.0.0.1 can reach published ports. */
  readonly localnet: boolean;
  /** See {@link BridgeNetworkRules.dnsOnly}: the canonical address, if any. */
  readonly dnsOnly: string | undefined;
}

/** Name of knit's table (`table inet knit`). */
export const TABLE = "knit";
/** The named set of every knit bridge, in `table inet knit`. */
export const BRIDGE_SET = "bridges";

/** Network ids only appear in rule comments; they must be plain tokens. */
function checkNetworkId(id: string): string {
  if (!/^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/.test(id)) throw invalid(`invalid network id "${id}"`);
  return id;
}

/** Validate every network (all before any is used) and reject duplicate bridges. */
export function checkNetworks(nets: readonly BridgeNetworkRules[]): CheckedNetwork[] {
  const seen = new Set<string>();
  const checked = nets.map((n) => {
    const bridge = checkIfname(n.bridge);
    if (seen.has(bridge)) throw invalid(`bridge "${bridge}" is listed for more than one network`);
    seen.add(bridge);
    const cidrs = n.subnets.map((s) => parseCidr(s, "subnet", false));
    const id = checkNetworkId(n.networkId);
    const ports = checkPorts(n.ports ?? [], cidrs, id);
    if (ports.length > 0 && n.internal) throw invalid(`network ${id} is internal: it cannot have published ports`);
    const dns = n.dnsOnly === undefined ? undefined : tryParseIp(n.dnsOnly);
    if (n.dnsOnly !== undefined && dns?.family !== 4) throw invalid(`invalid DNS address "${n.dnsOnly}" of network ${id}: expected an IPv4 address`);
    return {
      id,
      bridge,
      v4: cidrs.filter((c) => c.family === 4).map(formatCidr),
      v6: cidrs.filter((c) => c.family === 6).map(formatCidr),
      masquerade: n.masquerade,
      internal: n.internal,
      ports,
      localnet: sysctlSafeIfname(bridge),
      dnsOnly: dns ? formatIp(dns) : undefined,
    };
  });
  checkPortOverlaps(checked.flatMap((n) => n.ports));
  return checked;
}

/** A validated name as an nft string literal. */
const q = (s: string): string => `"${s}"`;
const comment = (n: CheckedNetwork): string => `comment ${q(`knit ${n.id}`)}`;

/** The set of all knit bridges, the basis of isolation. */
export function bridgeSet(nets: readonly CheckedNetwork[]): string[] {
  const elements = nets.length > 0 ? [`\t\telements = { ${nets.map((n) => q(n.bridge)).join(", ")} }`] : [];
  return [`\tset ${BRIDGE_SET} {`, "\t\ttype ifname", ...elements, "\t}"];
}

/** --internal: nothing enters or leaves the bridge; traffic within it is untouched. */
export function internalRules(n: CheckedNetwork): string[] {
  if (!n.internal) return [];
  const br = q(n.bridge);
  return [
    `iifname ${br} oifname != ${br} drop ${comment(n)}`,
    `oifname ${br} iifname != ${br} drop ${comment(n)}`,
  ];
}

/** Isolation: from this bridge to any other knit bridge is dropped. */
export function isolationRule(n: CheckedNetwork): string {
  const br = q(n.bridge);
  return `iifname ${br} oifname @${BRIDGE_SET} oifname != ${br} drop ${comment(n)}`;
}

/** Source NAT for traffic that leaves a masquerading network through another interface. */
export function masqueradeRules(n: CheckedNetwork): string[] {
  if (!n.masquerade || n.internal) return [];
  const br = q(n.bridge);
  return [
    ...n.v4.map((s) => `ip saddr ${s} oifname != ${br} masquerade ${comment(n)}`),
    ...n.v6.map((s) => `ip6 saddr ${s} oifname != ${br} masquerade ${comment(n)}`),
  ];
}

/** Into the host from a bridge with a DNS address only: DNS to that address, nothing else. */
export function inputRules(n: CheckedNetwork): string[] {
  if (n.dnsOnly === undefined) return [];
  const br = q(n.bridge);
  return [`iifname ${br} ip daddr ${n.dnsOnly} meta l4proto { tcp, udp } th dport 53 accept ${comment(n)}`, `iifname ${br} drop ${comment(n)}`];
}

/** A base chain with its hook line and rules, indented for a table body. */
export function chain(name: string, hook: string, rules: readonly string[]): string[] {
  return [`\tchain ${name} {`, `\t\t${hook}`, ...rules.map((r) => `\t\t${r}`), "\t}"];
}

/** The forward filter of `table inet knit`: internal, then conntrack, then isolation. */
export function forwardRules(nets: readonly CheckedNetwork[]): string[] {
  return [
    ...nets.flatMap(internalRules),
    "ct state established,related accept",
    "ct status dnat accept",
    ...nets.map(isolationRule),
    // Nothing outside knit's bridges (a Docker bridge, the LAN) opens connections into a
    // sandbox unless a published port forwarded it (Docker's rule for unpublished ports).
    ...(nets.length ? [`oifname @${BRIDGE_SET} iifname != @${BRIDGE_SET} drop comment "knit: unpublished"`] : []),
  ];
}

/** `table inet knit { ... }`: isolation, internal networks, masquerade and published ports. */
export function inetTable(nets: readonly CheckedNetwork[]): string[] {
  return [
    `table inet ${TABLE} {`,
    ...bridgeSet(nets),
    ...chain("forward", "type filter hook forward priority filter - 5; policy accept;", forwardRules(nets)),
    ...chain(
      "postrouting",
      "type nat hook postrouting priority srcnat; policy accept;",
      [...nets.flatMap(masqueradeRules), ...nets.flatMap(portSnatRules)],
    ),
    ...portChains(nets, chain),
    // Only while a bridge carries a DNS address of the host (an internal overlay network here).
    ...(nets.some((n) => n.dnsOnly !== undefined) ? chain("input", "type filter hook input priority filter - 5; policy accept;", nets.flatMap(inputRules)) : []),
    "}",
  ];
}

/** Lines that delete a table if it exists (declare, then delete: never fails). */
export function deleteTable(): string[] {
  return [`table inet ${TABLE}`, `delete table inet ${TABLE}`];
}
