/**
 * DNS for sandboxes of `--internal` overlay networks, which have no docker_gwbridge (the way
 * out, where knit's DNS answers for the other overlay sandboxes).
 *
 * Design note. knit's DNS server lives in the host's namespace and answers on addresses of
 * the host (docs/dns-and-agent.md: nothing per sandbox). An internal overlay sandbox's only
 * link is its overlay interface, and the overlay bridge has, by design, no address of the
 * host: giving it one from the overlay's subnet would hijack that address for the whole host
 * (the subnet may even be the LAN's) and give the host a route into the overlay. So:
 *
 *   - every host puts one link-local address, {@link OVERLAY_DNS_ADDRESS} (169.254.53.53/32,
 *     scope link), on the bridge of each internal overlay network it has endpoints of. A /32
 *     brings no subnet route: the host has still no route into the overlay, and LAN machines
 *     still reach nothing. The vxlan device never answers ARP for it (it answers only from its
 *     neighbour table), so each host's sandboxes reach their own host's server;
 *   - a sandbox gets one host route, `169.254.53.53 dev <overlay interface> scope link`, when
 *     it joins an internal overlay network (like its address, made once by the connecting
 *     command); its resolv.conf names 169.254.53.53;
 *   - replies from 169.254.53.53 (and only those: `from 169.254.53.53 iif lo`) are routed by
 *     a policy rule through a table of knit's, which holds one route per internal overlay
 *     network with endpoints here: its subnet on its bridge. The same rule makes the reverse
 *     path check of the queries pass under strict rp_filter;
 *   - the firewall lets sandboxes of such a bridge reach DNS on that address and nothing else
 *     of the host, and routes nothing in or out of the bridge (src/firewall/rules.ts).
 *
 * The server tells the networks apart by the source address (overlay subnets never overlap),
 * so one socket pair serves every internal overlay network of the host. Address and route
 * live on the bridge and go with it; the agent adds the rule while it serves the address and
 * deletes it when it stops.
 */
import { OVERLAY_DNS_ADDRESS, keys, type Endpoint, type Membership, type Network, type Sandbox } from "../model.ts";
import { getJson, listJson } from "../store/store.ts";
import { batchToken, ip, ipBatch } from "../kernel/ip.ts";
import { runJson, type Netns } from "../kernel/exec.ts";
import { overlayState } from "../drivers/overlay.ts";
import type { Engine } from "../engine/engine.ts";

/** knit's routing table for replies of the internal overlay DNS address. */
export const OVERLAY_DNS_TABLE = 53053;
/** Priority of the policy rule that sends those replies to {@link OVERLAY_DNS_TABLE}. */
export const OVERLAY_DNS_RULE_PRIORITY = 5353;

/** True for overlay networks whose sandboxes ask knit's DNS at {@link OVERLAY_DNS_ADDRESS}. */
export const internalOverlay = (net: Pick<Network, "driver" | "internal">): boolean => net.driver === "overlay" && net.internal;

/**
 * Give the bridge of an internal overlay network the DNS address and the reply route (one
 * `ip -batch`; idempotent). A no-op for other networks.
 */
export async function ensureOverlayDnsHost(net: Network): Promise<void> {
  if (!internalOverlay(net)) return;
  const br = batchToken(overlayState(net).bridge);
  const subnets = net.subnets.map((s) => s.subnet).filter((s) => !s.includes(":"));
  await ipBatch([
    `addr replace ${OVERLAY_DNS_ADDRESS}/32 dev ${br} scope link`,
    ...subnets.map((s) => `route replace ${batchToken(s)} dev ${br} table ${OVERLAY_DNS_TABLE} scope link`),
  ]);
}

interface RuleJson {
  priority?: number;
}

/** True when the reply rule is in place (one or more: `ip rule add` does not refuse copies). */
async function ruleCount(): Promise<number> {
  const rules = await runJson<RuleJson[]>(["ip", "-j", "rule", "show", "priority", String(OVERLAY_DNS_RULE_PRIORITY)], []);
  return rules.filter((r) => r.priority === OVERLAY_DNS_RULE_PRIORITY).length;
}

/** Add the policy rule for replies from the DNS address, unless it is there (the agent's job). */
export async function ensureOverlayDnsRule(): Promise<void> {
  if ((await ruleCount()) > 0) return;
  await ip(["rule", "add", "priority", String(OVERLAY_DNS_RULE_PRIORITY), "from", OVERLAY_DNS_ADDRESS, "iif", "lo", "lookup", String(OVERLAY_DNS_TABLE)]);
}

/** Delete the policy rule (every copy); already gone is fine. */
export async function removeOverlayDnsRule(): Promise<void> {
  for (let n = await ruleCount(); n > 0; n--) await ip(["rule", "del", "priority", String(OVERLAY_DNS_RULE_PRIORITY)], undefined, true);
}

/**
 * Point a sandbox's route to the DNS address at its first internal overlay interface (after
 * it joined or left an internal overlay network). Without one, nothing is left to do: the
 * route went with the interface.
 */
export async function routeSandboxDns(engine: Engine, sb: Sandbox, netns: Netns): Promise<void> {
  for (const m of await listJson<Membership>(engine.store, keys.membersOf(sb.id))) {
    const net = await getJson<Network>(engine.store, keys.network(m.networkId));
    if (!net || !internalOverlay(net)) continue;
    const ep = await getJson<Endpoint>(engine.store, keys.endpoint(m.networkId, m.endpointId));
    if (!ep || ep.state === "deleting") continue;
    await ip(["route", "replace", `${OVERLAY_DNS_ADDRESS}/32`, "dev", ep.ifname, "scope", "link"], netns);
    return;
  }
}
