/**
 * The macvlan driver: containers as first-class machines on the LAN. Every endpoint is a
 * macvlan device on a parent interface of the host, made straight inside the sandbox's
 * namespace under its final name, with its own MAC and a LAN address; the LAN's router is
 * the gateway. No bridge, no NAT, no firewall rules: the LAN reaches containers by IP.
 * Option names are Docker's (`parent`, `macvlan_mode`), plus knit's own `knit.macvlan.*`.
 *
 * The parent is one of three kinds:
 *  - "link": an interface that exists (`-o parent=eth1`, or a sub-interface the user made).
 *  - "vlan": `-o parent=eth1.10` that does not exist: knit creates the 802.1q sub-interface
 *    on eth1 (VID 1..4094), and deletes it when the last network on it goes.
 *  - "isolated": no parent: knit creates an empty Linux bridge `dm-<id12>` as the parent (as
 *    Docker uses a dummy link), so the network's containers talk among themselves only.
 *
 * What knit changes on the host is kept in driverState, so that rm restores exactly that:
 * `promiscSet` (knit turned the parent's promiscuous mode on), `vlanCreated` (knit made the
 * sub-interface), `shim` (the host-access device). Several networks may share one parent
 * (different subnets): the facts about the parent are properties of the parent, so a network
 * joining a parent inherits them from the networks already on it, and the last one to go
 * restores them. A knit-made sub-interface is handed over (its `knit:<id>` alias) to a network
 * that still uses it, so reconcile never takes it for an orphan.
 *
 * Host access (`-o knit.macvlan.host_access=true`): the kernel never passes frames between a
 * macvlan device and its own parent, so a host cannot reach its macvlan containers. knit
 * gives the host a macvlan device of its own on the parent (the shim `mvh-<id11>`), holding
 * the address of the network's `--aux-address host=IP`, and one host route per endpoint
 * through it. A shim someone deleted (its routes go with it) is made again, with the routes
 * of every endpoint, by `knit gc` and by the next endpoint to join.
 *
 * Endpoints are wired and unwired by in-process netlink, no process spawned: the device is
 * made on the parent straight into the sandbox under its final name (one request), its
 * announcement sysctls are written from inside the sandbox's namespace, then its alias,
 * addresses, state and routes are set on one socket there. The parent's VLAN sub-interface
 * and the isolated network's bridge, made once per network, still go through `ip`.
 */
import { KnitError, conflict, invalid, notFound, runAll } from "../errors.ts";
import { batchToken, deleteLink, getLink, ip, ipBatch, netnsExists, type LinkInfo } from "../kernel/ip.ts";
import { isErrno, rtnl, type LinkKind, type Rtnl } from "../kernel/netlink.ts";
import { writeSysctlsIn } from "../kernel/sysctl.ts";
import { formatIp, parseIp, parseIpWithPrefix } from "../net/ip.ts";
import { applySandboxIface, sandboxIfacePlan } from "./sandbox-iface.ts";
import { knitAlias } from "./bridge.ts";
import type { Endpoint, Network } from "../model.ts";
import { checkIfname, checkOptionKeys, parseBoolOption, parseIntOption, type DriverState, type NetworkDriver, type PrepareContext } from "./driver.ts";

export const MacvlanOptions = {
  parent: "parent",
  mode: "macvlan_mode",
  mtu: "com.docker.network.driver.mtu",
  hostAccess: "knit.macvlan.host_access",
  promisc: "knit.macvlan.promisc",
} as const;

export const MacvlanModes = ["bridge", "private", "vepa", "passthru"] as const;
export type MacvlanMode = (typeof MacvlanModes)[number];

/** Names of the aux addresses the host-access shim takes (`host`, and `host6` for IPv6). */
export const HOST_AUX = ["host", "host6"] as const;

/** Where a network's parent comes from; see the file comment. */
export type ParentKind = "link" | "vlan" | "isolated";

/** Settings derived at creation; `promiscSet`, `vlanCreated` and `parentKind` by precheck. */
export interface MacvlanState {
  /** The device endpoints hang off. */
  parent: string;
  parentKind: ParentKind;
  mode: MacvlanMode;
  /** 0: endpoints inherit the parent's MTU. */
  mtu: number;
  /** The user wants the parent in promiscuous mode (option, default true; never for passthru or isolated). */
  wantPromisc: boolean;
  /** knit turned the parent's promiscuous mode on: rm turns it off again. */
  promiscSet: boolean;
  /** knit created the parent (a VLAN sub-interface): the last network on it deletes it. */
  vlanCreated: boolean;
  hostAccess: boolean;
  /** Host-access device, "" without host access. */
  shim: string;
}

export function macvlanState(net: Network): MacvlanState {
  const s = net.driverState;
  const mode = String(s.mode);
  const kind = String(s.parentKind);
  return {
    parent: String(s.parent),
    parentKind: kind === "vlan" || kind === "isolated" ? kind : "link",
    mode: (MacvlanModes as readonly string[]).includes(mode) ? (mode as MacvlanMode) : "bridge",
    mtu: Number(s.mtu ?? 0),
    wantPromisc: s.wantPromisc === true,
    promiscSet: s.promiscSet === true,
    vlanCreated: s.vlanCreated === true,
    hostAccess: s.hostAccess === true,
    shim: typeof s.shim === "string" ? s.shim : "",
  };
}

/** The empty bridge that stands in for a parent when none is given (Docker's "dm-" dummy). */
export const isolatedParentName = (netId: string): string => `dm-${netId.slice(0, 12)}`;
/** The host-access device of a network. */
export const shimName = (netId: string): string => `mvh-${netId.slice(0, 11)}`;

/** `eth1.10` -> base eth1, VID 10 (unchecked), or undefined when the name has no VID part. */
function splitVlanName(name: string): { base: string; vid: string } | undefined {
  const m = /^(.+)\.(\d+)$/.exec(name);
  return m?.[1] && m[2] ? { base: m[1], vid: m[2] } : undefined;
}

function prepare(ctx: PrepareContext): DriverState {
  checkOptionKeys("macvlan", Object.values(MacvlanOptions), ctx.options);
  const o = ctx.options;
  // `-o parent=` (empty), as with Docker, is the same as no parent.
  const given = o[MacvlanOptions.parent] || undefined;
  if (given !== undefined) {
    checkIfname(given, `value for option ${MacvlanOptions.parent}`);
    if (given === "lo") throw invalid(`the loopback interface is not a valid macvlan parent`, "give the interface on the LAN, e.g. -o parent=eth1");
  }
  const isolated = given === undefined;
  const mode = (o[MacvlanOptions.mode] ?? "bridge") as MacvlanMode;
  if (!MacvlanModes.includes(mode)) {
    throw invalid(`invalid value "${mode}" for option ${MacvlanOptions.mode}`, `choose one of ${MacvlanModes.join(", ")} (bridge is the default)`);
  }
  if (isolated && mode === "passthru") throw invalid(`${MacvlanOptions.mode}=passthru needs a parent`, `add -o ${MacvlanOptions.parent}=IFACE`);
  const mtuText = o[MacvlanOptions.mtu];
  const mtu = mtuText === undefined ? 0 : parseIntOption(MacvlanOptions.mtu, mtuText, 68, 65535);
  if (ctx.ipv6 && mtu !== 0 && mtu < 1280) throw invalid(`invalid value "${mtu}" for option ${MacvlanOptions.mtu}: IPv6 needs an MTU of at least 1280`);
  const flag = (key: string, dflt: boolean): boolean => (o[key] === undefined ? dflt : parseBoolOption(key, o[key]));
  const hostAccess = flag(MacvlanOptions.hostAccess, false);
  if (hostAccess && mode !== "bridge") {
    throw invalid(
      `${MacvlanOptions.hostAccess}=true needs ${MacvlanOptions.mode}=bridge`,
      "the host's shim is a macvlan device on the same parent: private mode forbids it to talk to containers, vepa needs a hairpinning switch, passthru allows one device",
    );
  }
  return {
    parent: isolated ? isolatedParentName(ctx.id) : given,
    parentKind: isolated ? "isolated" : "link",
    mode,
    mtu,
    wantPromisc: !isolated && mode !== "passthru" && flag(MacvlanOptions.promisc, true),
    promiscSet: false,
    vlanCreated: false,
    hostAccess,
    shim: hostAccess ? shimName(ctx.id) : "",
  } satisfies MacvlanState as DriverState;
}

/** True when a kernel error's text matches `re`. */
const kernelSays = (err: unknown, re: RegExp): boolean => err instanceof KnitError && re.test(err.message);
const UNSUPPORTED = /Unknown device type|Operation not supported|not supported/i;

/** The addresses of the host-access shim: each subnet's `host` aux address, with a full-length prefix. */
function shimAddresses(net: Network): { cidr: string; family: 4 | 6 }[] {
  return net.subnets.flatMap((s) =>
    HOST_AUX.flatMap((name) => {
      const a = s.auxAddresses[name];
      if (!a) return [];
      const ipAddr = parseIp(a);
      return [{ cidr: `${formatIp(ipAddr)}/${ipAddr.family === 4 ? 32 : 128}`, family: ipAddr.family }];
    }),
  );
}

/** Other macvlan networks on the same parent device. */
function peersOnParent(net: Network, others: readonly Network[]): Network[] {
  const parent = String(net.driverState.parent);
  return others.filter((o) => o.id !== net.id && o.driver === "macvlan" && String(o.driverState.parent) === parent);
}

const isUp = (l: LinkInfo): boolean => l.flags.includes("UP");

/**
 * Check the parent against the kernel and the host's other networks, and learn what the
 * network will change on it. Nothing is changed here.
 */
async function precheck(net: Network, others: readonly Network[]): Promise<DriverState> {
  const st = macvlanState(net);
  const peers = peersOnParent(net, others);
  for (const p of peers) {
    const pm = macvlanState(p);
    if (st.mode === "passthru") throw conflict(`cannot use ${MacvlanOptions.mode}=passthru on ${st.parent}: network ${p.name} already uses it`, "passthru gives one container the whole parent; choose another parent");
    if (pm.mode === "passthru") throw conflict(`network ${p.name} uses parent ${st.parent} in passthru mode, which allows no other network on it`);
  }
  if (st.shim && (await getLink(st.shim))) throw conflict(`cannot create network ${net.name}: interface "${st.shim}" already exists on this host`);
  if (st.hostAccess) {
    const shim = shimAddresses(net);
    if (shim.length === 0) {
      throw invalid(`${MacvlanOptions.hostAccess}=true needs an address for the host on the LAN`, "reserve one with --aux-address host=IP (and host6=IPv6 for IPv6): an unused address of the --subnet, outside --ip-range");
    }
    for (const family of [4, 6] as const) {
      if (shim.filter((a) => a.family === family).length > 1) throw invalid(`${MacvlanOptions.hostAccess}: more than one IPv${family} host address (aux-addresses ${HOST_AUX.join(", ")})`);
    }
  }
  if (st.parentKind === "isolated") {
    if (await getLink(st.parent)) throw conflict(`cannot create network ${net.name}: interface "${st.parent}" already exists on this host`);
    return {};
  }
  const peer = peers[0] ? macvlanState(peers[0]) : undefined;
  const link = await getLink(st.parent);
  if (link) {
    checkParentLink(link, st, "parent");
    // The parent's state was decided by the first network on it; later ones share it.
    const promiscSet = peer ? peer.promiscSet : st.wantPromisc && !link.flags.includes("PROMISC");
    // A sub-interface another knit network made (and still uses) stays knit's.
    const vlanCreated = peer ? peer.vlanCreated : link.linkinfo?.info_kind === "vlan" && link.ifalias?.startsWith("knit:") === true;
    return { parentKind: vlanCreated ? "vlan" : "link", promiscSet, vlanCreated };
  }
  const vlan = splitVlanName(st.parent);
  if (!vlan) throw notFound(`parent interface ${st.parent} does not exist`, "give an existing interface (ip link), or IFACE.VID for a VLAN sub-interface");
  const vid = Number(vlan.vid);
  if (!(vid >= 1 && vid <= 4094) || vlan.vid.startsWith("0")) throw invalid(`invalid VLAN ID "${vlan.vid}" in parent ${st.parent}: expected 1 to 4094`);
  const base = await getLink(vlan.base);
  if (!base) throw notFound(`parent interface ${st.parent} does not exist, nor does ${vlan.base} to create it on`);
  checkParentLink(base, st, "base");
  return { parentKind: "vlan", promiscSet: peer ? peer.promiscSet : st.wantPromisc, vlanCreated: true };
}

/** The parent (or the base of a VLAN parent) must be up, free of a bridge or bond, and big enough. */
function checkParentLink(link: LinkInfo, st: MacvlanState, role: "parent" | "base"): void {
  const what = role === "parent" ? `parent interface ${link.ifname}` : `interface ${link.ifname} (base of ${st.parent})`;
  const linkType = (link as LinkInfo & { link_type?: string }).link_type;
  if (linkType !== undefined && linkType !== "ether") throw invalid(`${what} is not an Ethernet device (${linkType})`);
  if (!isUp(link)) throw conflict(`${what} is down`, `bring it up first: ip link set ${link.ifname} up`);
  if (link.master) throw conflict(`${what} is a port of ${link.master}`, `a macvlan parent cannot be enslaved; use ${link.master} itself, or another interface`);
  if (st.mtu > link.mtu) throw invalid(`invalid value "${st.mtu}" for option ${MacvlanOptions.mtu}: above the MTU of ${what} (${link.mtu})`);
}

/** Create the parent when knit owns it (isolated bridge, VLAN sub-interface); verify it otherwise. */
async function ensureParent(net: Network, st: MacvlanState): Promise<void> {
  const dev = batchToken(st.parent);
  const alias = batchToken(knitAlias(net.id));
  const link = await getLink(st.parent);
  if (st.parentKind === "isolated") {
    const settle = [`link set dev ${dev} ${st.mtu ? `mtu ${st.mtu} ` : ""}alias ${alias} up`];
    if (link && link.linkinfo?.info_kind !== "bridge") throw conflict(`interface "${st.parent}" exists but is not a bridge`);
    if (!link) await createOwned(st.parent, `link add ${dev} type bridge`, "Linux bridge support (CONFIG_BRIDGE)", settle);
    else await ipBatch(settle);
    return;
  }
  if (link) {
    if (isUp(link)) return;
    // knit's own sub-interface is knit's to bring up; the user's parent is the user's.
    if (st.vlanCreated && link.ifalias?.startsWith("knit:")) return ipBatch([`link set dev ${dev} up`]);
    throw conflict(`parent interface ${st.parent} of network ${net.name} is down`, `bring it up: ip link set ${st.parent} up`);
  }
  const vlan = splitVlanName(st.parent);
  if (st.parentKind !== "vlan" || !st.vlanCreated || !vlan) throw notFound(`parent interface ${st.parent} of network ${net.name} does not exist`);
  await createOwned(st.parent, `link add link ${batchToken(vlan.base)} name ${dev} type vlan id ${Number(vlan.vid)}`, "802.1q VLAN support (kernel module 8021q, CONFIG_VLAN_8021Q)", [
    `link set dev ${dev} alias ${alias} up`,
  ]);
}

/** A kernel refusal to create `name` for lack of `feature`, as a clear "unsupported" error naming it. */
function explainCreateError(err: unknown, name: string, feature: string): unknown {
  if (!kernelSays(err, UNSUPPORTED)) return err;
  return new KnitError("unsupported", `cannot create ${name}: this kernel has no ${feature}`, {
    cause: err,
    hint: "use a kernel with that feature (or load its module), or give an existing interface as -o parent=",
  });
}

/**
 * Create a link knit owns, then settle it; a missing kernel feature becomes a clear
 * "unsupported" error naming it, and a failed settle deletes the new link again.
 */
async function createOwned(name: string, addLine: string, feature: string, settle: readonly string[]): Promise<void> {
  try {
    await ipBatch([addLine]);
  } catch (err) {
    throw explainCreateError(err, name, feature);
  }
  try {
    await ipBatch(settle);
  } catch (err) {
    await ip(["link", "del", "dev", name], undefined, true);
    throw err;
  }
}

const NO_MACVLAN = "macvlan support (kernel module macvlan, CONFIG_MACVLAN)";

/**
 * The host-access shim: a bridge-mode macvlan on the parent holding the `host` aux
 * addresses, made (or, when it exists, settled) on a netlink session in the host's
 * namespace. A shim made here and not settled is deleted again.
 */
function ensureShim(r: Rtnl, net: Network, st: MacvlanState): void {
  let made = false;
  try {
    r.createLink(st.shim, { kind: "macvlan", parent: st.parent, mode: "bridge" }, st.mtu ? { mtu: st.mtu } : {});
    made = true;
  } catch (err) {
    if (!isErrno(err, "EEXIST")) throw explainCreateError(err, st.shim, NO_MACVLAN);
    if (r.getLink(st.shim)?.linkinfo?.info_kind !== "macvlan") throw conflict(`interface "${st.shim}" exists but is not a macvlan device`);
  }
  try {
    r.setLink(st.shim, { alias: knitAlias(net.id) });
    for (const a of shimAddresses(net)) r.addAddress(st.shim, a.cidr, { replace: true, nodad: a.family === 6 });
    r.setLink(st.shim, { up: true });
  } catch (err) {
    if (made) r.deleteLink(st.shim);
    throw err;
  }
}

/** Add (or replace) host routes through the shim. */
function addShimRoutes(r: Rtnl, st: MacvlanState, routes: readonly { dst: string; src: string }[]): void {
  for (const route of routes) r.addRoute({ dst: route.dst, dev: st.shim, src: route.src, replace: true });
}

/** Delete a link if it exists and passes `mine`; already gone is fine. */
async function deleteLinkIf(name: string, mine: (l: LinkInfo) => boolean): Promise<void> {
  const link = await getLink(name);
  if (link && mine(link)) await ip(["link", "del", "dev", name], undefined, true);
}

/** Undo what knit did to the parent, unless another network still uses it (then hand it over). */
async function releaseParent(net: Network, st: MacvlanState, others: readonly Network[]): Promise<void> {
  if (st.parentKind === "isolated") return deleteLinkIf(st.parent, (l) => l.linkinfo?.info_kind === "bridge" && l.ifalias === knitAlias(net.id));
  const next = peersOnParent(net, others)[0];
  const link = await getLink(st.parent);
  if (!link) return;
  const knitMade = st.vlanCreated && link.ifalias?.startsWith("knit:") === true && link.linkinfo?.info_kind === "vlan";
  if (next) {
    if (knitMade && link.ifalias === knitAlias(net.id)) await ip(["link", "set", "dev", st.parent, "alias", knitAlias(next.id)]);
    return;
  }
  if (knitMade) return deleteLinkIf(st.parent, () => true);
  if (st.promiscSet && link.flags.includes("PROMISC")) await ip(["link", "set", "dev", st.parent, "promisc", "off"]);
}

/** Host routes to an endpoint through the shim (one per address family that has a shim address). */
function shimRoutes(net: Network, st: MacvlanState, ep: Endpoint): { dst: string; src: string }[] {
  const shim = shimAddresses(net);
  const out: { dst: string; src: string }[] = [];
  for (const a of [ep.ipv4, ep.ipv6]) {
    if (!a) continue;
    const { ip: addr } = parseIpWithPrefix(a);
    const src = shim.find((s) => s.family === addr.family);
    if (st.shim && src) out.push({ dst: `${formatIp(addr)}/${addr.family === 4 ? 32 : 128}`, src: src.cidr.split("/")[0] ?? "" });
  }
  return out;
}

/** A kernel refusal to make an endpoint's device, explained. */
function explainAttachError(err: unknown, net: Network, st: MacvlanState): unknown {
  if (kernelSays(err, UNSUPPORTED)) return new KnitError("unsupported", `cannot create a macvlan device: this kernel has no ${NO_MACVLAN}`, { cause: err });
  // The only device the request names besides the new one is the parent.
  if (isErrno(err, "ENODEV")) return notFound(`parent interface ${st.parent} of network ${net.name} does not exist`, "recreate it, or remove the network");
  if (kernelSays(err, /Invalid argument/)) {
    if (st.mode === "passthru") return conflict(`network ${net.name} is in passthru mode, which allows one endpoint, and ${st.parent} already has a macvlan device`);
    return new KnitError("kernel", `the kernel refused a macvlan device on ${st.parent} for network ${net.name}`, {
      cause: err,
      hint: `is ${st.parent} used by a passthru macvlan device, or is its MTU now below the network's?`,
    });
  }
  return err;
}

export const macvlanDriver: NetworkDriver = {
  name: "macvlan",
  scope: "local",
  optionKeys: Object.values(MacvlanOptions),
  userNetworks: true,
  addressed: true,
  hostIfname: () => undefined,
  prepare,
  precheck,
  lanDevices: (state) => (state.parentKind === "isolated" ? [] : [String(state.parent)]),

  async ensureNetwork(net) {
    const st = macvlanState(net);
    await ensureParent(net, st);
    rtnl(undefined, (r) => {
      if (st.promiscSet) r.setLink(st.parent, { promisc: true });
      if (st.hostAccess) ensureShim(r, net, st);
    });
  },

  async ensureEndpoints(net, endpoints) {
    const st = macvlanState(net);
    if (!st.shim) return;
    // After ensureNetwork: routes of a shim someone deleted went with it.
    rtnl(undefined, (r) => {
      for (const e of endpoints) addShimRoutes(r, st, shimRoutes(net, st, e));
    });
  },

  async deleteNetwork(net, others) {
    const st = macvlanState(net);
    await runAll(`remove network ${net.name}`, [
      () => (st.shim ? deleteLinkIf(st.shim, (l) => l.linkinfo?.info_kind === "macvlan" && l.ifalias === knitAlias(net.id)) : Promise.resolve()),
      () => releaseParent(net, st, others.filter((o) => o.state !== "deleting")),
    ]);
  },

  async attach({ network, pools, endpoint, netns, peers }) {
    const st = macvlanState(network);
    // passthru: the device takes the parent's MAC; setting another would change the parent's.
    const spec: LinkKind = { kind: "macvlan", parent: st.parent, mode: st.mode, netns, ...(st.mode === "passthru" ? {} : { address: endpoint.mac }) };
    const routes = shimRoutes(network, st, endpoint);
    const shimGone = rtnl(undefined, (r) => {
      try {
        // Made on the parent straight into the sandbox under its final name, in one request:
        // "File exists" (EEXIST) if the sandbox has that name.
        r.createLink(endpoint.ifname, spec, st.mtu ? { mtu: st.mtu } : {});
      } catch (err) {
        throw explainAttachError(err, network, st);
      }
      if (routes.length === 0) return false;
      try {
        r.index(st.shim);
      } catch (err) {
        if (isErrno(err, "ENODEV")) return true;
        throw err;
      }
      addShimRoutes(r, st, routes);
      return false;
    });
    if (shimGone) {
      // Someone deleted the shim, and its routes went with it: make it again, with the routes
      // of every endpoint on it.
      const others = peers ? await peers() : [];
      rtnl(undefined, (r) => {
        ensureShim(r, network, st);
        for (const e of [endpoint, ...others.filter((o) => o.id !== endpoint.id)]) addShimRoutes(r, st, shimRoutes(network, st, e));
      });
    }
    // Announce the address when the device comes up (gratuitous ARP, unsolicited NA): the
    // LAN's switches and neighbours learn at once where an address that moved now lives.
    // (Keys with '/' separators: a '.' in an interface name stays literal.)
    writeSysctlsIn(netns, [
      [`net/ipv4/conf/${endpoint.ifname}/arp_notify`, "1"],
      ...(endpoint.ipv6 ? [[`net/ipv6/conf/${endpoint.ifname}/ndisc_notify`, "1"] as const] : []),
    ]);
    // An isolated network has no router: no default route towards a gateway nobody holds.
    const shaped = st.parentKind === "isolated" ? { ...network, internal: true } : network;
    const plan = sandboxIfacePlan(shaped, pools, endpoint, false);
    rtnl(netns, (r) => {
      r.setLink(endpoint.ifname, { alias: knitAlias(endpoint.id) });
      applySandboxIface(r, plan);
    });
  },

  async detach(network, endpoint, netns) {
    const st = macvlanState(network);
    const routes = shimRoutes(network, st, endpoint);
    await runAll(`remove endpoint ${endpoint.id.slice(0, 12)}`, [
      async () => {
        // Already gone (or the shim with them) is fine.
        if (routes.length) rtnl(undefined, (r) => routes.forEach((route) => r.deleteRoute({ dst: route.dst, dev: st.shim })));
      },
      async () => {
        if (!netns || !netnsExists(netns)) return;
        // Through the kernel layer's deleteLink: in the agent (CNI DEL, Docker's
        // DeleteEndpoint) the kernel's wait for the device to go then holds a worker thread,
        // not the event loop.
        if ((await getLink(endpoint.ifname, netns))?.linkinfo?.info_kind === "macvlan") await deleteLink(endpoint.ifname, netns);
      },
    ]);
  },

  firewall: () => undefined,
};
