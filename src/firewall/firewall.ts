/**
 * knit's firewall: nftables only, in knit's own tables, rebuilt from the store.
 *
 * Design note. The engine describes every bridge network (`BridgeNetworkRules`) and calls
 * `applyFirewall` after any network create/rm and on reconcile. The whole ruleset is rebuilt
 * and replaced in ONE `nft -f` transaction (`table X` / `delete table X` / `table X {...}`),
 * so the kernel never sees half a ruleset and stale rules cannot survive. Layout:
 *
 *   table inet knit                       (IPv4 + IPv6 in one table)
 *     set bridges                          every knit bridge (type ifname)
 *     chain forward   filter, priority filter - 5, policy accept
 *       internal networks: drop bridge -> other interface and other interface -> bridge
 *       ct state established,related accept; ct status dnat accept (published ports, hairpin)
 *       isolation: from bridge X to @bridges other than X: drop
 *     chain postrouting   nat, priority srcnat
 *       ip[6] saddr SUBNET oifname != BRIDGE masquerade    (masquerading, non-internal nets)
 *       + hairpin and 127.0.0.1 source NAT for networks with published ports
 *     chains guard, prerouting, output, published    only while ports are published:
 *       DNAT from the host's addresses to sandboxes (see dnat.ts)
 *
 * Every base chain has policy accept and only drops knit traffic, so other programs' tables
 * (Docker, podman, firewalld) keep deciding about everything else. icc=false is not a
 * firewall rule: the bridge driver marks the network's ports `isolated` (bridge port
 * isolation), which stops frames between containers, ARP included, on any kernel and
 * without br_netfilter, while the gateway (the bridge itself) still answers.
 *
 * One network added and nothing else (`network create`) is the exception: its set element
 * and rules are added to the table in place, in one transaction too, which spares the RCU
 * grace period that deleting the old table costs (see delta.ts).
 *
 * Docker's iptables chains are a separate base chain with policy DROP; see docker-user.ts.
 */
import type { Netns } from "../kernel/exec.ts";
import { nftApplyListingChains } from "../kernel/nft.ts";
import { readSysctl, writeSysctl } from "../kernel/sysctl.ts";
import { additionScript } from "./delta.ts";
import { syncDockerUserChain } from "./docker-user.ts";
import { localnetBridges } from "./dnat.ts";
import { checkNetworks, deleteTable, inetTable, type BridgeNetworkRules, type CheckedNetwork } from "./rules.ts";

export type { BridgeNetworkRules } from "./rules.ts";
export type { PublishedPort } from "./dnat.ts";
export { syncDockerUserChain } from "./docker-user.ts";

/**
 * The complete nft script for these networks: replaces `table inet knit` atomically. With no
 * networks it only deletes it. Throws KnitError("invalid-argument") on a bad bridge name,
 * subnet or network id, before anything is built.
 */
export function buildRuleset(nets: readonly BridgeNetworkRules[]): string {
  const checked = checkNetworks(nets);
  if (checked.length === 0) return removalScript();
  return `${[...deleteTable(), ...inetTable(checked)].join("\n")}\n`;
}

/** The script that deletes knit's table (succeeds when it does not exist). */
export function removalScript(): string {
  return `${deleteTable().join("\n")}\n`;
}

/**
 * The sysctls a set of networks needs: IPv4 forwarding when a non-internal network has an
 * IPv4 subnet, IPv6 forwarding likewise. Forwarding is never switched off again: other
 * programs on the host may rely on it.
 */
export function forwardingSysctls(nets: readonly BridgeNetworkRules[]): [key: string, value: string][] {
  const routed = checkNetworks(nets).filter((n) => !n.internal);
  const out: [string, string][] = [];
  if (routed.some((n) => n.v4.length > 0)) out.push(["net.ipv4.ip_forward", "1"]);
  if (routed.some((n) => n.v6.length > 0)) out.push(["net.ipv6.conf.all.forwarding", "1"]);
  return out;
}

const localnetKey = (bridge: string): string => `net.ipv4.conf.${bridge}.route_localnet`;

/**
 * `route_localnet` per bridge: on where IPv4 ports are published (so 127.0.0.1 can reach
 * them), back off on the other bridges when it was on. Bridges whose name has a '.' cannot be
 * named in a sysctl key and are left alone (their ports are not published on 127.0.0.1).
 */
async function syncRouteLocalnet(nets: readonly CheckedNetwork[], ns: Netns | undefined, on: boolean): Promise<void> {
  const wanted = new Set(localnetBridges(nets));
  for (const n of nets) {
    if (!n.localnet || n.v4.length === 0 || wanted.has(n.bridge) !== on) continue;
    if (on) await writeSysctl(localnetKey(n.bridge), "1", ns);
    else if (ns) await writeSysctl(localnetKey(n.bridge), "0", ns).catch(() => undefined); // best effort: the bridge may be gone
    else if (readSysctl(localnetKey(n.bridge)) === "1") await writeSysctl(localnetKey(n.bridge), "0");
  }
}

/** One firewall change at a time per namespace, so concurrent callers apply in order. */
const queues = new Map<string, Promise<unknown>>();
function serialized<T>(ns: Netns | undefined, work: () => Promise<T>): Promise<T> {
  const key = ns?.path ?? "";
  const next = (queues.get(key) ?? Promise.resolve()).then(work, work);
  const settled = next.catch(() => undefined);
  queues.set(key, settled);
  void settled.then(() => {
    if (queues.get(key) === settled) queues.delete(key);
  });
  return next;
}

/** What {@link applyFirewall} may assume about the change. */
export interface ApplyOptions {
  /**
   * The only change since the last apply is this network (id), which was added: its rules
   * are added in place when the table allows (delta.ts), else the table is rebuilt.
   */
  added?: string;
}

/**
 * Make the kernel's firewall match these networks (all bridge networks of the host): enable
 * forwarding, replace knit's nft tables in one transaction (or, for one added network, add
 * its rules in one transaction), then open Docker's DOCKER-USER chain for knit bridges when
 * Docker is present. With no networks, same as removeFirewall. Bad input throws before
 * anything changes.
 */
export async function applyFirewall(nets: readonly BridgeNetworkRules[], ns?: Netns, opts: ApplyOptions = {}): Promise<void> {
  const sysctls = forwardingSysctls(nets); // validates everything first
  if (nets.length === 0) return removeFirewall(ns);
  const script = buildRuleset(nets);
  const checked = checkNetworks(nets);
  const bridges = nets.map((n) => n.bridge);
  const delta = opts.added === undefined ? undefined : additionScript(checked, opts.added);
  await serialized(ns, async () => {
    for (const [key, value] of sysctls) await writeSysctl(key, value, ns);
    await syncRouteLocalnet(checked, ns, true);
    // The chain listing that comes with either tells whether Docker's chains exist.
    const added = delta ? await nftApplyListingChains(delta.script, ns, false) : undefined;
    const chains = added ?? (await nftApplyListingChains(script, ns));
    await syncRouteLocalnet(checked, ns, false);
    await syncDockerUserChain(bridges, ns, { ...(chains ? { chains } : {}), ...(added && delta ? { added: delta.bridge } : {}) });
  });
}

/** Remove everything of knit's firewall: the nft table and knit's DOCKER-USER rules. Idempotent. */
export async function removeFirewall(ns?: Netns): Promise<void> {
  await serialized(ns, async () => {
    const chains = await nftApplyListingChains(removalScript(), ns);
    await syncDockerUserChain([], ns, chains ? { chains } : {});
  });
}
