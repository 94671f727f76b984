/**
 * The overlay driver: one L2 network across hosts, over VXLAN (UDP 4789), without Swarm.
 *
 * Per host and network, and only on hosts that have endpoints of the network:
 *
 *   sandbox eth0 ─ veth ─┐
 *   sandbox eth0 ─ veth ─┤ bridge ov-<id12>  (no address: the host is no router into the
 *                        │                   overlay, so LAN machines cannot reach it)
 *                        └ vxlan vx-<id12>   id VNI dstport 4789 local <underlay IP>
 *                                            dev <underlay> nolearning proxy
 *
 * No flooding, no learning: for every endpoint on another host the control plane (the agent,
 * src/cluster/sync.ts) programs exactly one FDB entry in the vxlan device's table (its MAC ->
 * that host's underlay address: `self`) and one neighbour entry (its IP -> its MAC) on the
 * vxlan device. With `proxy` the vxlan device answers ARP and neighbour solicitations from
 * that table itself, and without an all-zeros FDB entry broadcasts and unknown unicast never
 * leave the host. The bridge port of the vxlan device does not learn; instead the bridge gets
 * one static forwarding entry per remote MAC (`master static`: this MAC is behind the vxlan
 * port), so frames to remote sandboxes are forwarded, never flooded to the local ones.
 *
 * MTU: the underlay's minus 50 (VXLAN over IPv4), unless com.docker.network.driver.mtu says
 * otherwise. Egress (docker_gwbridge) and published ports are the engine's business: this
 * driver's sandbox interface gets no default route (src/cluster/attach.ts adds the second
 * interface that has one).
 *
 * The driver never touches the store: the engine hands it the host's underlay
 * ({@link ensureOverlayDevices}) and the peers to program ({@link programPeers}).
 */
import { KnitError, conflict, invalid } from "../errors.ts";
import { batchToken, bridgeBatch, deleteLink, getLink, ip, ipBatch, type LinkInfo } from "../kernel/ip.ts";
import { listNeighbours, rtnl } from "../kernel/netlink.ts";
import { configureSandboxIface } from "./sandbox-iface.ts";
import { hostVethName, knitAlias } from "./bridge.ts";
import { OVERLAY_DNS_ADDRESS, type Network } from "../model.ts";
import { checkIfname, checkOptionKeys, parseIntOption, type DriverState, type NetworkDriver, type PrepareContext } from "./driver.ts";

export const OverlayOptions = {
  mtu: "com.docker.network.driver.mtu",
  bridgeName: "com.docker.network.bridge.name",
  /** Docker's option to choose the VNI (one per network here). */
  vni: "com.docker.network.driver.overlay.vxlanid_list",
  ifacePrefix: "com.docker.network.container_iface_prefix",
} as const;

/** IANA's VXLAN port. */
export const VXLAN_PORT = 4789;
/** Outer Ethernet is not counted: IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14. */
export const VXLAN_OVERHEAD = 50;
/** VNIs knit hands out start here (below are left to hand-made VXLANs, as Docker does). */
export const MIN_AUTO_VNI = 4096;
/** Largest 24-bit VNI. */
export const MAX_VNI = 0xffffff;

/** What the overlay keeps in driverState. */
export interface OverlayState {
  bridge: string;
  vxlan: string;
  /** 0: the underlay's MTU minus {@link VXLAN_OVERHEAD}, decided on each host. */
  mtu: number;
  /** The VNI claimed in the store (vni/<n>); 0 only in a draft. */
  vni: number;
  /** A VNI the user asked for (0: none). */
  requestedVni: number;
  ifacePrefix: string;
}

export function overlayState(net: Network): OverlayState {
  const s = net.driverState;
  return {
    bridge: String(s.bridge),
    vxlan: String(s.vxlan),
    mtu: Number(s.mtu ?? 0),
    vni: Number(s.vni ?? 0),
    requestedVni: Number(s.requestedVni ?? 0),
    ifacePrefix: String(s.ifacePrefix ?? "eth"),
  };
}

/** The host's side of the underlay, as its agent registered it. */
export interface Underlay {
  /** Local VTEP address. */
  address: string;
  device: string;
  mtu: number;
}

/** The MTU of a network's devices on a host with this underlay. */
export const overlayMtu = (st: OverlayState, underlay: Underlay): number => st.mtu || Math.max(68, underlay.mtu - VXLAN_OVERHEAD);

function prepare(ctx: PrepareContext): DriverState {
  checkOptionKeys("overlay", Object.values(OverlayOptions), ctx.options);
  const o = ctx.options;
  const bridge = checkIfname(o[OverlayOptions.bridgeName] ?? `ov-${ctx.id.slice(0, 12)}`, `value for option ${OverlayOptions.bridgeName}`);
  const mtuText = o[OverlayOptions.mtu];
  const mtu = mtuText === undefined ? 0 : parseIntOption(OverlayOptions.mtu, mtuText, 68, 65535);
  if (ctx.ipv6 && mtu !== 0 && mtu < 1280) throw invalid(`invalid value "${mtu}" for option ${OverlayOptions.mtu}: IPv6 needs an MTU of at least 1280`);
  const vniText = o[OverlayOptions.vni];
  let requestedVni = 0;
  if (vniText !== undefined) {
    if (vniText.includes(",")) throw invalid(`invalid value "${vniText}" for option ${OverlayOptions.vni}: knit networks have one subnet per family and take one VNI`);
    requestedVni = parseIntOption(OverlayOptions.vni, vniText, 1, MAX_VNI);
  }
  const ifacePrefix = o[OverlayOptions.ifacePrefix] ?? "eth";
  if (!/^[a-zA-Z][a-zA-Z0-9_-]{0,11}$/.test(ifacePrefix)) {
    throw invalid(`invalid value "${ifacePrefix}" for option ${OverlayOptions.ifacePrefix}: expected 1-12 letters, digits, '_' or '-', starting with a letter`);
  }
  return { bridge, vxlan: `vx-${ctx.id.slice(0, 12)}`, mtu, vni: 0, requestedVni, ifacePrefix } satisfies OverlayState as DriverState;
}

/** True when `link` is the vxlan device this network and underlay call for. */
function vxlanMatches(link: LinkInfo | undefined, st: OverlayState, underlay: Underlay): boolean {
  const d = link?.linkinfo?.info_data;
  return (
    link?.linkinfo?.info_kind === "vxlan" &&
    d?.id === st.vni &&
    d.port === VXLAN_PORT &&
    d.local === underlay.address &&
    d.link === underlay.device &&
    d.learning === false &&
    d.proxy === true
  );
}

/** True when the devices of `net` exist as they should (one `ip` process). */
async function devicesReady(st: OverlayState, underlay: Underlay, mtu: number): Promise<boolean> {
  const vx = await getLink(st.vxlan);
  return vxlanMatches(vx, st, underlay) && vx?.master === st.bridge && vx.mtu === mtu && vx.flags.includes("UP");
}

/**
 * Create or repair the bridge and vxlan device of `net` on this host (ensureX: an existing
 * correct device is kept, a wrong vxlan device is made again, a link of another kind under
 * the bridge's name is an error). Costs one process when all is in place. Returns false when
 * everything was in place already, true when something was made or repaired.
 */
export async function ensureOverlayDevices(net: Network, underlay: Underlay): Promise<boolean> {
  const st = overlayState(net);
  if (st.vni < 1) throw new KnitError("internal", `overlay network ${net.name} has no VNI`);
  const mtu = overlayMtu(st, underlay);
  if (await devicesReady(st, underlay, mtu)) return false;
  const br = batchToken(st.bridge);
  const vx = batchToken(st.vxlan);
  const alias = batchToken(knitAlias(net.id));
  // addrgenmode none before up: the host gets no address at all on the overlay, not even a
  // link-local one (set together with up, the kernel brings the link up first).
  const bridgeLines = [`link set dev ${br} addrgenmode none`, `link set dev ${br} mtu ${mtu} alias ${alias} up`];
  const vxlanAdd = `link add ${vx} type vxlan id ${st.vni} dstport ${VXLAN_PORT} local ${batchToken(underlay.address)} dev ${batchToken(underlay.device)} nolearning proxy`;
  const vxlanLines = [
    `link set dev ${vx} addrgenmode none`,
    `link set dev ${vx} mtu ${mtu} alias ${alias} master ${br}`,
    `link set dev ${vx} type bridge_slave learning off`,
    `link set dev ${vx} up`,
  ];
  try {
    // Both new: one process. Stops at the first error, leaving existing links untouched.
    await ipBatch([`link add ${br} type bridge`, ...bridgeLines, vxlanAdd, ...vxlanLines]);
    return true;
  } catch (err) {
    const link = await getLink(st.bridge);
    if (!link) throw err;
    if (link.linkinfo?.info_kind !== "bridge") throw conflict(`interface "${st.bridge}" exists but is not a bridge`, `overlay network ${net.name} needs that name for its bridge on this host`);
  }
  await ipBatch(bridgeLines);
  const current = await getLink(st.vxlan);
  if (current && !vxlanMatches(current, st, underlay)) await deleteLink(st.vxlan);
  if (!current || !vxlanMatches(current, st, underlay)) {
    try {
      await ipBatch([vxlanAdd]);
    } catch (err) {
      // Made a moment ago by another process (the agent, a concurrent connect): fine if right.
      if (!vxlanMatches(await getLink(st.vxlan), st, underlay)) throw err;
    }
  }
  await ipBatch(vxlanLines);
  return true;
}

/**
 * Put the host ends of these endpoints back into the network's bridge, for those that exist
 * (after the bridge was made again under them: a device removal that raced a connect).
 */
export async function reattachEndpoints(net: Network, endpointIds: readonly string[]): Promise<void> {
  const { bridge } = overlayState(net);
  for (const id of endpointIds) await ip(["link", "set", "dev", hostVethName(id), "master", bridge], undefined, true);
}

/** Delete the bridge and vxlan device of `net` on this host; already gone is fine. */
export async function deleteOverlayDevices(net: Network): Promise<void> {
  const st = overlayState(net);
  await deleteLink(st.vxlan);
  const br = await getLink(st.bridge);
  if (br?.linkinfo?.info_kind === "bridge" && br.ifalias === knitAlias(net.id)) await deleteLink(st.bridge);
}

/** One remote endpoint as the data path knows it: its MAC lives behind `vtep`. */
export interface PeerEntry {
  mac: string;
  /** Addresses of the endpoint (no prefix length). */
  ips: string[];
  /** Underlay address of the endpoint's host. */
  vtep: string;
}

/** What the kernel holds on a vxlan device. */
export interface PeerTable {
  /** The vxlan device's own table (`self`): MAC -> remote host. */
  fdb: { mac: string; dst: string }[];
  neigh: { ip: string; mac: string }[];
  /** The bridge's static entries on the vxlan port (`master static`): MACs behind it. */
  bridged: string[];
}

/**
 * The FDB and neighbour entries on the vxlan device of `net`: two netlink dumps in this
 * process (it was two processes, `bridge -j fdb show` and `ip -j neigh show`, per network and
 * sync round: at 50 hosts most of the agents' CPU outside their own process).
 */
export function readPeers(net: Network): PeerTable {
  const { fdb, neigh } = listNeighbours(overlayState(net).vxlan);
  return {
    // Entries with a destination are the vxlan device's own table ("self"); the bridge's
    // entry for the port's own address has none. (netlink.ts formats MACs in lower case.)
    fdb: fdb.flatMap((e) => (e.dst !== undefined && !e.master ? [{ mac: e.mac, dst: e.dst }] : [])),
    neigh: neigh.map((n) => ({ ip: n.dst, mac: n.lladdr ?? "" })),
    // Not the port's own address ("permanent"), nor anything learned: the static ones knit set.
    bridged: fdb.filter((e) => e.master && e.state === "static").map((e) => e.mac),
  };
}

/** What to change on a vxlan device: entries to remove (first), then entries to set. */
export interface PeerChanges {
  removeFdb: { mac: string; dst: string }[];
  removeNeigh: string[];
  /** Static bridge entries to remove. */
  removeBridged: string[];
  set: PeerEntry[];
}

/** The changes that turn `actual` into `desired` (both ways: stale entries go, missing ones come). */
export function diffPeers(desired: readonly PeerEntry[], actual: PeerTable): PeerChanges {
  const wantFdb = new Map(desired.map((p) => [p.mac, p.vtep]));
  const wantNeigh = new Map(desired.flatMap((p) => p.ips.map((ip) => [ip, p.mac] as const)));
  const haveFdb = new Map<string, string[]>();
  for (const e of actual.fdb) haveFdb.set(e.mac, [...(haveFdb.get(e.mac) ?? []), e.dst]);
  const haveNeigh = new Map(actual.neigh.map((n) => [n.ip, n.mac]));
  const haveBridged = new Set(actual.bridged);
  const removeFdb = actual.fdb.filter((e) => wantFdb.get(e.mac) !== e.dst || (haveFdb.get(e.mac)?.length ?? 0) > 1);
  const removeNeigh = actual.neigh.filter((n) => wantNeigh.get(n.ip) !== n.mac).map((n) => n.ip);
  const removeBridged = [...haveBridged].filter((mac) => !wantFdb.has(mac));
  const set = desired.filter((p) => {
    const dsts = haveFdb.get(p.mac) ?? [];
    return dsts.length !== 1 || dsts[0] !== p.vtep || !haveBridged.has(p.mac) || p.ips.some((ip) => haveNeigh.get(ip) !== p.mac);
  });
  return { removeFdb, removeNeigh, removeBridged, set };
}

/** True when there is nothing to change. */
export const noChanges = (c: PeerChanges): boolean => c.removeFdb.length === 0 && c.removeNeigh.length === 0 && c.removeBridged.length === 0 && c.set.length === 0;

/**
 * Apply peer changes to the vxlan device of `net`: at most one `bridge -batch` and one
 * `ip -batch` for removals, and one of each for the entries to set (`replace`: setting an
 * entry twice changes nothing, so a peer programmed by the CLI and by the agent is one entry).
 */
export async function programPeers(net: Network, changes: PeerChanges): Promise<void> {
  const dev = batchToken(overlayState(net).vxlan);
  const fdbOut = [
    ...changes.removeFdb.map((e) => `fdb del ${e.mac} dev ${dev} dst ${batchToken(e.dst)} self`),
    ...changes.removeBridged.map((mac) => `fdb del ${mac} dev ${dev} master`),
  ];
  const neighOut = changes.removeNeigh.map((ip) => `neigh del ${batchToken(ip)} dev ${dev}`);
  const fdbIn = changes.set.flatMap((p) => [`fdb replace ${p.mac} dev ${dev} dst ${batchToken(p.vtep)} self permanent`, `fdb replace ${p.mac} dev ${dev} master static`]);
  const neighIn = changes.set.flatMap((p) => p.ips.map((ip) => `neigh replace ${batchToken(ip)} lladdr ${p.mac} dev ${dev} nud permanent`));
  await Promise.all([bridgeBatch([...fdbOut]).then(() => bridgeBatch(fdbIn)), ipBatch(neighOut).then(() => ipBatch(neighIn))]);
}

export const overlayDriver: NetworkDriver = {
  name: "overlay",
  scope: "global",
  optionKeys: Object.values(OverlayOptions),
  userNetworks: true,
  addressed: true,
  hostIfname: hostVethName,
  prepare,

  async precheck(net) {
    const { bridge } = overlayState(net);
    if (await getLink(bridge)) throw conflict(`cannot create network ${net.name}: interface "${bridge}" already exists on this host`, `choose another ${OverlayOptions.bridgeName}`);
  },

  // Devices exist per host and only where endpoints are: the engine makes them on the first
  // attach (ensureOverlayDevices), the agent on every host keeps them in step.
  async ensureNetwork() {},

  async deleteNetwork(net) {
    await deleteOverlayDevices(net);
  },

  async attach({ network, pools, endpoint, netns }) {
    const st = overlayState(network);
    const bridge = await getLink(st.bridge);
    if (bridge?.linkinfo?.info_kind !== "bridge") {
      throw new KnitError("kernel", `overlay network ${network.name} has no bridge ${st.bridge} on this host`, { hint: "is `knit agent --store etcd://...` running on this host?" });
    }
    const host = hostVethName(endpoint.id);
    rtnl(undefined, (r) => {
      r.createLink(host, { kind: "veth", peer: { name: endpoint.ifname, mtu: bridge.mtu, netns } }, { mtu: bridge.mtu });
      r.setLink(host, { master: st.bridge, alias: knitAlias(endpoint.id), up: true });
    });
    // No default route through the overlay: its gateway is on no host. Egress goes through
    // the sandbox's docker_gwbridge interface.
    await configureSandboxIface({ ...network, internal: true }, pools, endpoint, netns);
  },

  async detach(_network, endpoint) {
    await deleteLink(hostVethName(endpoint.id));
  },

  // The overlay bridge is a knit bridge like any other for isolation and for Docker's
  // DOCKER-USER chain (without those accepts, dockerd's FORWARD DROP kills bridged overlay
  // frames on Docker hosts); it has no masquerade: egress is via docker_gwbridge. An internal
  // network's bridge carries the host's DNS address (src/cluster/overlay-dns.ts): nothing may
  // be routed in or out through it, and the host answers DNS there, nothing else.
  firewall: (net) => ({
    networkId: net.id,
    bridge: overlayState(net).bridge,
    subnets: net.subnets.map((s) => s.subnet),
    masquerade: false,
    internal: net.internal,
    ...(net.internal ? { dnsOnly: OVERLAY_DNS_ADDRESS } : {}),
  }),
};
