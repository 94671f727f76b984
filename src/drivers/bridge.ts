/**
 * The bridge driver: a Linux bridge holding the gateway addresses, one veth pair per
 * endpoint, nftables rules for masquerade, icc and isolation. Option names are Docker's.
 *
 * Every kernel object knit makes carries the alias `knit:<id>` so that reconcile can tell
 * knit's links from everybody else's.
 */
import { invalid, conflict } from "../errors.ts";
import { deleteLink, deleteLinkAside, getLink } from "../kernel/ip.ts";
import { isErrno, rtnl } from "../kernel/netlink.ts";
import { formatIp, parseIp } from "../net/ip.ts";
import { configureSandboxIface } from "./sandbox-iface.ts";
import type { Network } from "../model.ts";
import type { BridgeNetworkRules } from "../firewall/firewall.ts";
import { checkIfname, checkOptionKeys, parseBoolOption, parseIntOption, type NetworkDriver, type PrepareContext, type DriverState } from "./driver.ts";
import type { Pool } from "../ipam/ipam.ts";

export const BridgeOptions = {
  name: "com.docker.network.bridge.name",
  masquerade: "com.docker.network.bridge.enable_ip_masquerade",
  icc: "com.docker.network.bridge.enable_icc",
  hostBinding: "com.docker.network.bridge.host_binding_ipv4",
  mtu: "com.docker.network.driver.mtu",
  ifacePrefix: "com.docker.network.container_iface_prefix",
  defaultBridge: "com.docker.network.bridge.default_bridge",
} as const;

const DEFAULT_MTU = 1500;

/** Alias that marks a kernel link as knit's. */
export const knitAlias = (id: string): string => `knit:${id}`;

/** Bridge settings derived once, at creation. */
export interface BridgeState {
  bridge: string;
  mtu: number;
  masquerade: boolean;
  icc: boolean;
  hostBinding: string;
  ifacePrefix: string;
}

export function bridgeState(net: Network): BridgeState {
  const s = net.driverState;
  return {
    bridge: String(s.bridge),
    mtu: Number(s.mtu),
    masquerade: s.masquerade === true,
    icc: s.icc === true,
    hostBinding: String(s.hostBinding),
    ifacePrefix: String(s.ifacePrefix),
  };
}

function prepare(ctx: PrepareContext): DriverState {
  checkOptionKeys("bridge", Object.values(BridgeOptions), ctx.options);
  const o = ctx.options;
  const bridge = checkIfname(o[BridgeOptions.name] ?? `br-${ctx.id.slice(0, 12)}`, `value for option ${BridgeOptions.name}`);
  const mtuText = o[BridgeOptions.mtu];
  const mtu = mtuText === undefined ? DEFAULT_MTU : parseIntOption(BridgeOptions.mtu, mtuText, 68, 65535);
  if (ctx.ipv6 && mtu < 1280) throw invalid(`invalid value "${mtu}" for option ${BridgeOptions.mtu}: IPv6 needs an MTU of at least 1280`);
  const hostBinding = o[BridgeOptions.hostBinding] ?? "0.0.0.0";
  if (parseIp(hostBinding, `value for option ${BridgeOptions.hostBinding}`).family !== 4) {
    throw invalid(`invalid value "${hostBinding}" for option ${BridgeOptions.hostBinding}: expected an IPv4 address`);
  }
  const ifacePrefix = o[BridgeOptions.ifacePrefix] ?? "eth";
  if (!/^[a-zA-Z][a-zA-Z0-9_-]{0,11}$/.test(ifacePrefix)) {
    throw invalid(`invalid value "${ifacePrefix}" for option ${BridgeOptions.ifacePrefix}: expected 1-12 letters, digits, '_' or '-', starting with a letter`);
  }
  const flag = (key: string, dflt: boolean): boolean => (o[key] === undefined ? dflt : parseBoolOption(key, o[key]));
  return {
    bridge,
    mtu,
    masquerade: flag(BridgeOptions.masquerade, true),
    icc: flag(BridgeOptions.icc, true),
    hostBinding,
    ifacePrefix,
  } satisfies BridgeState as DriverState;
}

/** Gateway address with the subnet's prefix length, as it sits on the bridge. */
function gatewayAddresses(pools: readonly Pool[]): { cidr: string; family: 4 | 6 }[] {
  return pools.flatMap((p) => (p.gateway ? [{ cidr: `${formatIp(p.gateway)}/${p.subnet.prefix}`, family: p.subnet.family }] : []));
}

/** The bridge's MAC: 02:42 and its IPv4 gateway's four bytes (no sandbox has that address), else from the id. */
function bridgeMac(net: Network, pools: readonly Pool[]): string {
  const gw4 = pools.find((p) => p.subnet.family === 4 && p.gateway)?.gateway;
  const bytes = gw4 ? [24n, 16n, 8n, 0n].map((s) => Number((gw4.value >> s) & 255n)) : [0, 2, 4, 6].map((i) => parseInt(net.id.slice(i, i + 2), 16));
  return ["02", "42", ...bytes.map((b) => b.toString(16).padStart(2, "0"))].join(":");
}

/** Host-side veth name for an endpoint: "veth" + 7 hex digits of its id, like Docker's. */
export const hostVethName = (endpointId: string): string => `veth${endpointId.slice(0, 7)}`;

export const bridgeDriver: NetworkDriver = {
  name: "bridge",
  scope: "local",
  optionKeys: Object.values(BridgeOptions),
  userNetworks: true,
  addressed: true,
  hostIfname: hostVethName,
  prepare,

  async precheck(net) {
    const { bridge } = bridgeState(net);
    const existing = await getLink(bridge);
    if (existing) throw conflict(`cannot create network ${net.name}: interface "${bridge}" already exists on this host`, `choose another ${BridgeOptions.name}`);
  },

  async ensureNetwork(net, pools) {
    const st = bridgeState(net);
    // In-process netlink, one request per step (src/kernel/netlink.ts).
    rtnl(undefined, (r) => {
      // Create first, look only when that fails: an existing link is left untouched until it
      // is known to be a bridge (made before: reconcile; or a moment ago by another process).
      try {
        r.createLink(st.bridge, { kind: "bridge" });
      } catch (err) {
        if (!isErrno(err, "EEXIST")) throw err;
        const link = r.getLink(st.bridge);
        if (!link) throw err;
        if (link.linkinfo?.info_kind !== "bridge") throw conflict(`interface "${st.bridge}" exists but is not a bridge`);
      }
      // A fixed MAC: left alone, a bridge takes the lowest MAC of its ports, which changes as
      // sandboxes come and go and leaves the others with a stale gateway MAC for seconds.
      r.setLink(st.bridge, { mtu: st.mtu, address: bridgeMac(net, pools), alias: knitAlias(net.id) });
      // IPv6 on a bridge without DAD: the gateway must answer at once.
      for (const g of gatewayAddresses(pools)) r.addAddress(st.bridge, g.cidr, { replace: true, nodad: g.family === 6 });
      r.setLink(st.bridge, { up: true });
    });
  },

  async deleteNetwork(net) {
    const { bridge } = bridgeState(net);
    // In a child process, not by netlink here: the kernel takes 35-45 ms to let a bridge go,
    // and `network rm` rebuilds the firewall meanwhile (its nft waits too; see
    // finishNetworkRemoval), which an event loop blocked in a netlink call could not start.
    if (rtnl(undefined, (r) => r.getLink(bridge)?.linkinfo?.info_kind === "bridge")) await deleteLinkAside(bridge);
  },

  async attach({ network, pools, endpoint, netns }) {
    const st = bridgeState(network);
    const host = hostVethName(endpoint.id);
    rtnl(undefined, (r) => {
      // Create the pair with the container end already in its namespace under its final
      // name: no rename, and "File exists" (EEXIST) if the sandbox already has that interface.
      r.createLink(host, { kind: "veth", peer: { name: endpoint.ifname, mtu: st.mtu, netns } }, { mtu: st.mtu });
      r.setLink(host, { master: st.bridge, alias: knitAlias(endpoint.id), up: true });
      // icc=false: isolated ports cannot reach each other, only the bridge (the gateway).
      if (!st.icc) r.setBridgePort(host, { isolated: true });
    });
    await configureSandboxIface(network, pools, endpoint, netns);
  },

  async detach(_network, endpoint) {
    // Deleting the host end removes the pair; a gone namespace took its end with it.
    await deleteLink(hostVethName(endpoint.id));
  },

  firewall(net): BridgeNetworkRules {
    const st = bridgeState(net);
    return {
      networkId: net.id,
      bridge: st.bridge,
      subnets: net.subnets.map((s) => s.subnet),
      masquerade: st.masquerade,
      internal: net.internal,
    };
  },
};
