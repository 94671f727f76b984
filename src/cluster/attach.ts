/**
 * The engine's side of overlay endpoints (called from src/engine/endpoints.ts): what a
 * connect to an overlay network needs around the driver's own attach.
 *
 *   before the claim   this host is registered in the cluster (its agent knows the underlay)
 *   after the claim    the network's bridge and vxlan device exist on this host, and when
 *                      this connect just made them, every peer known so far is programmed
 *                      (the agent programs the rest as it sees them; see sync.ts)
 *   after the attach   the sandbox also joins docker_gwbridge, its way out (unless --internal)
 *
 * Egress, Docker's way: every overlay endpoint's sandbox gets a second interface on the
 * host's docker_gwbridge network, a plain local bridge network with masquerade on and
 * inter-container traffic off; its default route goes there (the overlay interface has
 * none). The network is created on first use (bridge device knit_gwbridge, a default pool),
 * unless the user made one under the name docker_gwbridge first, with their own subnet and
 * options, which is then used as it is. Published ports of a sandbox whose first network is
 * an overlay are DNATed to its docker_gwbridge address, on the host that runs it.
 */
import { KnitError, conflict, invalid } from "../errors.ts";
import { getJson, listJson } from "../store/store.ts";
import { GW_BRIDGE_NETWORK, keys, type Endpoint, type HostRecord, type Membership, type Network, type Sandbox } from "../model.ts";
import { BridgeOptions, hostVethName } from "../drivers/bridge.ts";
import { ensureOverlayDevices, overlayState, programPeers } from "../drivers/overlay.ts";
import { deleteLink, getLink } from "../kernel/ip.ts";
import { hostName, ownerAlive } from "../engine/owner.ts";
import type { Engine } from "../engine/engine.ts";
import { createNetwork, repairNetworks } from "../engine/networks.ts";
import { connectSandbox, disconnectSandbox, listMemberships } from "../engine/endpoints.ts";
import { liveHosts, requireLocalHost, underlayOf } from "./hosts.ts";
import { planNetwork } from "./peers.ts";

/** Bridge device of a docker_gwbridge network knit makes (not Docker's name: both may run on one host). */
export const GW_BRIDGE_DEVICE = "knit_gwbridge";

/** True for this host's egress network of overlay endpoints. */
export const isGwBridge = (net: Pick<Network, "name" | "driver" | "host">): boolean => net.driver === "bridge" && net.name === GW_BRIDGE_NETWORK && net.host !== undefined;

/** Overlay networks that give their endpoints a way out (through docker_gwbridge). */
export const needsGateway = (net: Pick<Network, "driver" | "internal">): boolean => net.driver === "overlay" && !net.internal;

/** Checks before an overlay endpoint is claimed: the host must be a registered cluster member. */
export async function prepareOverlayJoin(engine: Engine, net: Network): Promise<HostRecord> {
  const host = await requireLocalHost(engine);
  if (needsGateway(net)) await ensureGwBridge(engine);
  return host;
}

/**
 * Make the network's devices on this host; when this call made them, program the peers the
 * store knows now (adds only: removing is the agent's job, which compares with the kernel).
 */
export async function ensureOverlayHost(engine: Engine, net: Network, host: HostRecord): Promise<void> {
  let made = false;
  for (let attempt = 1; ; attempt++) {
    try {
      made = await ensureOverlayDevices(net, underlayOf(host));
      break;
    } catch (err) {
      // The agent removes a network's devices once the host's last endpoint left, after a
      // look at the store. A look taken just before this connect's claim lets that removal
      // run under this call (seen: the bridge vanished between two of its steps). It runs
      // once: the agent's next look sees the claim. So start over (after the removal had
      // time to end); an error that is no race (a name taken by another link) is final.
      if (attempt >= 3 || (err instanceof KnitError && err.code === "conflict")) throw err;
      await Bun.sleep(20);
    }
  }
  if (!made) return;
  const [endpoints, hosts] = await Promise.all([listJson<Endpoint>(engine.store, keys.endpointsOf(net.id)), liveHosts(engine.store)]);
  const plan = planNetwork(net, endpoints, hosts, hostName());
  if (plan?.peers.length) await programPeers(net, { removeFdb: [], removeNeigh: [], removeBridged: [], set: plan.peers });
}

/**
 * Run the driver's attach of an overlay endpoint. The agent deletes a network's devices when
 * the host's last endpoint left; when that deletion raced this connect (the bridge vanished
 * under the attach), the half-made interface is removed, the devices are made again and the
 * attach is tried once more: the agent cannot delete them again, as it first checks the store,
 * which now holds this endpoint.
 */
export async function attachOverlay(engine: Engine, net: Network, host: HostRecord, endpoint: Endpoint, attach: () => Promise<void>): Promise<void> {
  try {
    await attach();
  } catch (err) {
    const { bridge } = overlayState(net);
    if ((await getLink(bridge))?.linkinfo?.info_kind === "bridge") throw err;
    await deleteLink(hostVethName(endpoint.id));
    await ensureOverlayHost(engine, net, host);
    await attach();
  }
}

/** This host's docker_gwbridge network, created (icc off, masquerade on) if there is none. */
export async function ensureGwBridge(engine: Engine): Promise<Network> {
  for (let attempt = 0; attempt < 500; attempt++) {
    const id = (await engine.store.get(keys.networkName(GW_BRIDGE_NETWORK, hostName())))?.value;
    const net = id ? await getJson<Network>(engine.store, keys.network(id)) : undefined;
    if (net) {
      if (net.driver !== "bridge") {
        throw conflict(`network ${GW_BRIDGE_NETWORK} is a ${net.driver} network: overlay endpoints need a bridge network of that name for their way out`, `remove it: knit network rm ${GW_BRIDGE_NETWORK}`);
      }
      if (net.state === "ready") return net;
      // Another command is creating or removing it: wait for it, or finish what a dead one left.
      if (ownerAlive(net.owner)) await Bun.sleep(20);
      else await repairNetworks(engine);
      continue;
    }
    try {
      return await createNetwork(engine, {
        name: GW_BRIDGE_NETWORK,
        driver: "bridge",
        options: { [BridgeOptions.name]: GW_BRIDGE_DEVICE, [BridgeOptions.icc]: "false", [BridgeOptions.masquerade]: "true" },
      });
    } catch (err) {
      // A concurrent connect on this host created it first: use theirs.
      if (!(err instanceof KnitError && err.code === "conflict" && /already exists/.test(err.message))) throw err;
    }
  }
  throw new KnitError("store", `network ${GW_BRIDGE_NETWORK} did not become ready`, { hint: "try again" });
}

/** Give a sandbox that just joined an overlay network its way out (idempotent). */
export async function joinGwBridge(engine: Engine, sb: Sandbox, atCreate: boolean): Promise<void> {
  const gw = await ensureGwBridge(engine);
  if (await engine.store.get(keys.member(sb.id, gw.id))) return;
  await connectSandbox(engine, gw.id, sb, { atCreate });
}

/** After a sandbox left an overlay network: leave docker_gwbridge when no overlay needs it. */
export async function leaveGwBridgeIfUnused(engine: Engine, sb: Sandbox): Promise<void> {
  const members = await listMemberships(engine, sb.id);
  let gw: Membership | undefined;
  for (const m of members) {
    const net = await getJson<Network>(engine.store, keys.network(m.networkId));
    if (!net) continue;
    if (needsGateway(net)) return;
    if (isGwBridge(net)) gw = m;
  }
  if (!gw) return;
  try {
    await disconnectSandbox(engine, gw.networkId, sb, true);
  } catch (err) {
    // Another process (the agent, a concurrent disconnect) took it away first.
    if (!(err instanceof KnitError && err.code === "conflict" && /is not connected/.test(err.message))) throw err;
  }
}

/** A sandbox's docker_gwbridge membership: the network and its endpoint there. */
export async function gatewayOf(engine: Engine, sb: Sandbox): Promise<{ network: Network; endpoint: Endpoint } | undefined> {
  for (const m of await listMemberships(engine, sb.id)) {
    const network = await getJson<Network>(engine.store, keys.network(m.networkId));
    if (!network || !isGwBridge(network)) continue;
    const endpoint = await getJson<Endpoint>(engine.store, keys.endpoint(m.networkId, m.endpointId));
    return endpoint ? { network, endpoint } : undefined;
  }
  return undefined;
}

/**
 * The network whose endpoint receives a sandbox's published ports, when `first` is its first
 * network: docker_gwbridge for an overlay network (ensured now, so ports can be planned before
 * anything is made), else `first` itself.
 */
export async function publishTarget(engine: Engine, first: Network | undefined, publishing: boolean): Promise<Network | undefined> {
  if (!publishing || first?.driver !== "overlay") return first;
  if (first.internal) throw invalid(`network ${first.name} is internal: ports cannot be published from it`, "publish from a network created without --internal");
  await requireLocalHost(engine);
  return ensureGwBridge(engine);
}
