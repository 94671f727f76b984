/**
 * rtnetlink in-process: links, addresses and routes, read and changed without spawning `ip`
 * (the socket, namespaces and wire format are in netlink-socket.ts).
 *
 * Reads return the shapes src/kernel/ip.ts has always returned from `ip -j` (`LinkInfo`,
 * `AddrInfo`, `RouteInfo`), decoded the way iproute2 prints them: the same flag names and
 * order, `master` and `link` as names, `link_index` for a peer in another namespace, and
 * `linkinfo.info_data` for the kinds whose data knit reads (vxlan, macvlan), plus
 * `info_slave_data` of bridge ports (hairpin, learning, isolated).
 *
 * Changes mirror what the `ip` command lines they replace did, one request per line: a link
 * is created, then set (alias and master cannot be given at creation), addresses are added,
 * the link is brought up, routes are added. Every request asks for an ACK, and a refusal is a
 * NetlinkError that says what failed and why ("cannot create veth vethab12cd3: File exists
 * (EEXIST)"); `isErrno(err, "EEXIST")` tells kinds of failure apart.
 *
 * Several changes in one namespace share one socket: `rtnl(ns, (r) => { r.setLink(...);
 * r.addAddress(...); })`. The callback is synchronous (see netlink-socket.ts for why).
 */
import { KnitError, invalid } from "../errors.ts";
import { formatIp, ipToBytes, parseIpWithPrefix, tryParseIp, type Ip } from "../net/ip.ts";
import type { Netns } from "./exec.ts";
import type { AddrInfo, LinkInfo, RouteInfo } from "./ip.ts";
import {
  HOST_LE,
  NLM_F_ACK,
  NLM_F_CREATE,
  NLM_F_DUMP,
  NLM_F_EXCL,
  NLM_F_REPLACE,
  NLM_F_REQUEST,
  NetlinkError,
  NlRequest,
  attrBytes,
  attrString,
  attrU32,
  attrU8,
  isErrno,
  parseAttrs,
  withNetnsFd,
  withSocket,
  type NetlinkSocket,
  type NlMessage,
} from "./netlink-socket.ts";

export { NetlinkError, isErrno } from "./netlink-socket.ts";

const RTM_NEWLINK = 16;
const RTM_DELLINK = 17;
const RTM_GETLINK = 18;
const RTM_NEWADDR = 20;
const RTM_GETADDR = 22;
const RTM_NEWROUTE = 24;
const RTM_DELROUTE = 25;
const RTM_GETROUTE = 26;
const RTM_GETNEIGH = 30;

const AF_UNSPEC = 0;
const AF_INET = 2;
const AF_INET6 = 10;
const AF_BRIDGE = 7;

const NDA_DST = 1;
const NDA_LLADDR = 2;
const NDA_MASTER = 9;
const NUD_NOARP = 0x40;
const NUD_PERMANENT = 0x80;
const NTF_PROXY = 0x08;
const NTF_EXT_LEARNED = 0x10;

const IFLA_ADDRESS = 1;
const IFLA_IFNAME = 3;
const IFLA_MTU = 4;
const IFLA_LINK = 5;
const IFLA_MASTER = 10;
const IFLA_OPERSTATE = 16;
const IFLA_LINKINFO = 18;
const IFLA_IFALIAS = 20;
const IFLA_AF_SPEC = 26;
const IFLA_NET_NS_FD = 28;
const IFLA_EXT_MASK = 29;
const IFLA_LINK_NETNSID = 37;
const IFLA_INFO_KIND = 1;
const IFLA_INFO_DATA = 2;
const IFLA_INFO_SLAVE_KIND = 4;
const IFLA_INFO_SLAVE_DATA = 5;
const VETH_INFO_PEER = 1;
const IFLA_MACVLAN_MODE = 1;
const IFLA_INET6_ADDR_GEN_MODE = 8;
const IN6_ADDR_GEN_MODE_NONE = 1;
/** Dumps without the per-link statistics: a third of the bytes. */
const RTEXT_FILTER_SKIP_STATS = 1 << 3;
const IFLA_BRPORT_MODE = 4;
const IFLA_BRPORT_LEARNING = 8;
const IFLA_BRPORT_ISOLATED = 33;

const IFA_ADDRESS = 1;
const IFA_LOCAL = 2;
const IFA_FLAGS = 8;
const IFA_F_NODAD = 0x02;

const RTA_DST = 1;
const RTA_OIF = 4;
const RTA_GATEWAY = 5;
const RTA_PRIORITY = 6;
const RTA_PREFSRC = 7;
const RTA_TABLE = 15;
const RTM_F_CLONED = 0x200;
const RTNH_F_ONLINK = 4;
const RT_TABLE_MAIN = 254;
const RTPROT_BOOT = 3;
const RT_SCOPE_UNIVERSE = 0;
const RT_SCOPE_LINK = 253;
/** In a deletion: a route of any scope. */
const RT_SCOPE_NOWHERE = 255;
const RTN_UNICAST = 1;

const IFF_UP = 0x1;
const IFF_RUNNING = 0x40;
const IFF_PROMISC = 0x100;
/** iproute2's order of link flags (print_link_flags). */
const FLAG_NAMES: [string, number][] = [
  ["LOOPBACK", 0x8],
  ["BROADCAST", 0x2],
  ["POINTOPOINT", 0x10],
  ["MULTICAST", 0x1000],
  ["NOARP", 0x80],
  ["ALLMULTI", 0x200],
  ["PROMISC", 0x100],
  ["MASTER", 0x400],
  ["SLAVE", 0x800],
  ["DEBUG", 0x4],
  ["DYNAMIC", 0x8000],
  ["AUTOMEDIA", 0x4000],
  ["PORTSEL", 0x2000],
  ["NOTRAILERS", 0x20],
  ["UP", 0x1],
  ["LOWER_UP", 0x10000],
  ["DORMANT", 0x20000],
  ["ECHO", 0x40000],
];
const OPER_STATES = ["UNKNOWN", "NOTPRESENT", "DOWN", "LOWERLAYERDOWN", "TESTING", "DORMANT", "UP"];
const LINK_TYPES: Record<number, string> = { 1: "ether", 768: "ipip", 769: "tunnel6", 772: "loopback", 776: "sit", 778: "gre", 823: "gre6", 65534: "none", 65535: "void" };
const SCOPES: Record<number, string> = { 0: "global", 200: "site", 253: "link", 254: "host", 255: "nowhere" };
const TABLES: Record<number, string> = { 0: "unspec", 253: "default", 254: "main", 255: "local" };
const ROUTE_TYPES = ["none", "unicast", "local", "broadcast", "anycast", "multicast", "blackhole", "unreachable", "prohibit", "throw", "nat", "xresolve"];
const PROTOCOLS: Record<number, string> = {
  0: "unspec", 1: "redirect", 2: "kernel", 3: "boot", 4: "static", 8: "gated", 9: "ra", 10: "mrt", 11: "zebra", 12: "bird",
  13: "dnrouted", 14: "xorp", 15: "ntk", 16: "dhcp", 18: "keepalived", 42: "babel", 186: "bgp", 187: "isis", 188: "ospf",
  189: "rip", 192: "eigrp",
};
const MACVLAN_MODES: Record<number, string> = { 1: "private", 2: "vepa", 4: "bridge", 8: "passthru", 16: "source" };
/** The macvlan modes a device can be made in, as IFLA_MACVLAN_MODE values. */
const MACVLAN_MODE_VALUES = { private: 1, vepa: 2, bridge: 4, passthru: 8 } as const;
export type MacvlanModeName = keyof typeof MACVLAN_MODE_VALUES;

// ---- encoding helpers -----------------------------------------------------------------

/** Interface names the kernel can hold: 1-15 bytes, no '/', ':' or white space. */
function validIfname(name: string): boolean {
  const bytes = new TextEncoder().encode(name).length;
  return bytes >= 1 && bytes <= 15 && !/[/:\s]/.test(name) && name !== "." && name !== "..";
}

function checkIfname(name: string): void {
  if (!validIfname(name)) throw invalid(`invalid interface name "${name}": expected 1-15 bytes without '/', ':' or white space`);
}

/** "02:42:0a:00:00:01" to 6 bytes. */
export function parseMac(mac: string): Uint8Array {
  const parts = mac.split(":");
  if (parts.length !== 6 || parts.some((p) => !/^[0-9a-fA-F]{1,2}$/.test(p))) throw invalid(`invalid MAC address "${mac}"`);
  return Uint8Array.from(parts.map((p) => parseInt(p, 16)));
}

/** Bytes to "aa:bb:..." (lower case, two digits each), as iproute2 prints link addresses. */
export function formatMac(bytes: Uint8Array): string {
  return [...bytes].map((b) => b.toString(16).padStart(2, "0")).join(":");
}

/** Network-order bytes as text, the way inet_ntop (and so iproute2) writes them. */
export function formatAddr(bytes: Uint8Array): string {
  if (bytes.length === 4) return [...bytes].join(".");
  const words: number[] = [];
  for (let i = 0; i < 16; i += 2) words.push(((bytes[i] ?? 0) << 8) | (bytes[i + 1] ?? 0));
  // Embedded IPv4 (::ffff:a.b.c.d, and the old ::a.b.c.d), as glibc prints them.
  const v4 = `${bytes[12]}.${bytes[13]}.${bytes[14]}.${bytes[15]}`;
  if (words.slice(0, 5).every((w) => w === 0)) {
    if (words[5] === 0xffff) return `::ffff:${v4}`;
    if (words[5] === 0 && (words[6] !== 0 || (words[7] ?? 0) > 1)) return `::${v4}`;
  }
  let value = 0n;
  for (const b of bytes) value = (value << 8n) | BigInt(b);
  return formatIp({ family: 6, value });
}

function parseAddress(text: string, what: string): Ip {
  const ip = tryParseIp(text);
  if (!ip) throw invalid(`invalid ${what} "${text}": not an IPv4 or IPv6 address`);
  return ip;
}

const family = (ip: Ip): number => (ip.family === 4 ? AF_INET : AF_INET6);

function ifinfo(index = 0, flags = 0, change = 0): (v: DataView, at: number) => void {
  return (v, at) => {
    v.setUint8(at, AF_UNSPEC);
    v.setInt32(at + 4, index, HOST_LE);
    v.setUint32(at + 8, flags, HOST_LE);
    v.setUint32(at + 12, change, HOST_LE);
  };
}

// ---- decoding links -------------------------------------------------------------------

interface RawLink {
  index: number;
  type: number;
  flags: number;
  name: string;
  attrs: Map<number, DataView>;
}

function rawLink(m: NlMessage): RawLink {
  const d = m.data;
  const attrs = parseAttrs(d, 16, d.byteLength);
  return { index: d.getInt32(4, HOST_LE), type: d.getUint16(2, HOST_LE), flags: d.getUint32(8, HOST_LE), name: attrString(attrs.get(IFLA_IFNAME)) ?? "", attrs };
}

/** A link's name and flags by index, in the same namespace, when known. */
type LinkLookup = (index: number) => { name: string; flags: number } | undefined;

function flagNames(flags: number, mdown: boolean): string[] {
  const out: string[] = [];
  if (flags & IFF_UP && !(flags & IFF_RUNNING)) out.push("NO-CARRIER");
  let left = flags & ~IFF_RUNNING;
  for (const [name, bit] of FLAG_NAMES) {
    if (left & bit) {
      out.push(name);
      left &= ~bit;
    }
  }
  if (left) out.push(left.toString(16));
  if (mdown) out.push("M-DOWN");
  return out;
}

/** A link-layer address as iproute2 prints it: dotted for IPv4 tunnels, colon hex otherwise. */
function linkAddress(bytes: Uint8Array, type: number): string {
  if ((type === 768 || type === 776 || type === 778) && bytes.length === 4) return formatAddr(bytes);
  if ((type === 769 || type === 823) && bytes.length === 16) return formatAddr(bytes);
  return formatMac(bytes);
}

function vxlanData(d: Map<number, DataView>, lookup: LinkLookup): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  const id = attrU32(d.get(1));
  if (id === undefined) return out;
  out.id = id;
  const group = attrBytes(d.get(2));
  const group6 = attrBytes(d.get(16));
  if (group && group.some((b) => b !== 0)) out[(group[0] ?? 0) >= 224 && (group[0] ?? 0) <= 239 ? "group" : "remote"] = formatAddr(group);
  else if (!group && group6 && group6.some((b) => b !== 0)) out[group6[0] === 0xff ? "group6" : "remote6"] = formatAddr(group6);
  const local = attrBytes(d.get(4));
  const local6 = attrBytes(d.get(17));
  if (local && local.some((b) => b !== 0)) out.local = formatAddr(local);
  else if (!local && local6 && local6.some((b) => b !== 0)) out.local6 = formatAddr(local6);
  const link = attrU32(d.get(3));
  if (link) out.link = lookup(link)?.name ?? `if${link}`;
  const port = d.get(15);
  if (port && port.byteLength >= 2) out.port = port.getUint16(0, false);
  const learning = attrU8(d.get(7));
  if (learning !== undefined) out.learning = learning !== 0;
  if (attrU8(d.get(11))) out.proxy = true;
  out.ttl = attrU8(d.get(5)) ?? 0;
  return out;
}

function infoData(kind: string, data: DataView | undefined, lookup: LinkLookup): Record<string, unknown> | undefined {
  if (!data) return undefined;
  const d = parseAttrs(data, 0, data.byteLength);
  switch (kind) {
    case "vxlan":
      return vxlanData(d, lookup);
    case "macvlan": {
      const mode = attrU32(d.get(1));
      return mode === undefined ? {} : { mode: MACVLAN_MODES[mode] ?? String(mode) };
    }
    default:
      return undefined;
  }
}

function bridgePortData(data: DataView | undefined): Record<string, unknown> | undefined {
  if (!data) return undefined;
  const d = parseAttrs(data, 0, data.byteLength);
  const out: Record<string, unknown> = {};
  for (const [key, type] of [["hairpin", IFLA_BRPORT_MODE], ["learning", IFLA_BRPORT_LEARNING], ["isolated", IFLA_BRPORT_ISOLATED]] as const) {
    const v = attrU8(d.get(type));
    if (v !== undefined) out[key] = v !== 0;
  }
  return out;
}

/** A link in the shape of `ip -j -d link show` (the fields LinkInfo names). */
function toLinkInfo(raw: RawLink, lookup: LinkLookup): LinkInfo {
  const a = raw.attrs;
  const info: LinkInfo = { ifindex: raw.index, ifname: raw.name, flags: [], mtu: attrU32(a.get(IFLA_MTU)) ?? 0, operstate: "UNKNOWN" };
  let mdown = false;
  const iflink = attrU32(a.get(IFLA_LINK));
  if (iflink) {
    if (a.has(IFLA_LINK_NETNSID)) info.link_index = iflink;
    else {
      const l = lookup(iflink);
      info.link = l?.name ?? `if${iflink}`;
      mdown = l !== undefined && !(l.flags & IFF_UP);
    }
  }
  info.flags = flagNames(raw.flags, mdown);
  const master = attrU32(a.get(IFLA_MASTER));
  if (master) info.master = lookup(master)?.name ?? `if${master}`;
  const oper = attrU8(a.get(IFLA_OPERSTATE));
  if (oper !== undefined) info.operstate = OPER_STATES[oper] ?? String(oper);
  info.link_type = LINK_TYPES[raw.type] ?? `[${raw.type}]`;
  const addr = attrBytes(a.get(IFLA_ADDRESS));
  if (addr && addr.length) info.address = linkAddress(addr, raw.type);
  const nsid = a.get(IFLA_LINK_NETNSID);
  if (nsid && nsid.byteLength >= 4) info.link_netnsid = nsid.getInt32(0, HOST_LE);
  const alias = attrString(a.get(IFLA_IFALIAS));
  if (alias) info.ifalias = alias;
  const li = a.get(IFLA_LINKINFO);
  if (li) {
    const l = parseAttrs(li, 0, li.byteLength);
    const kind = attrString(l.get(IFLA_INFO_KIND));
    const slaveKind = attrString(l.get(IFLA_INFO_SLAVE_KIND));
    const linkinfo: NonNullable<LinkInfo["linkinfo"]> = {};
    if (kind) {
      linkinfo.info_kind = kind;
      const data = infoData(kind, l.get(IFLA_INFO_DATA), lookup);
      if (data) linkinfo.info_data = data;
    }
    if (slaveKind) {
      linkinfo.info_slave_kind = slaveKind;
      const data = slaveKind === "bridge" ? bridgePortData(l.get(IFLA_INFO_SLAVE_DATA)) : undefined;
      if (data) linkinfo.info_slave_data = data;
    }
    info.linkinfo = linkinfo;
  }
  return info;
}

// ---- the session ----------------------------------------------------------------------

/** How to create a link: its kind and what the kind needs. */
export type LinkKind =
  | { kind: "bridge" }
  | { kind: "ifb" }
  /** A veth pair; the peer is made directly in `netns` (when given) under its final name. */
  | { kind: "veth"; peer: { name: string; mtu?: number; netns?: Netns } }
  /**
   * A macvlan device on `parent` (a link of the namespace the request is made in), made
   * directly in `netns` (when given) under its final name, with `address` as its MAC (the
   * kernel picks one when not given; a passthru device takes the parent's).
   */
  | { kind: "macvlan"; parent: string; mode: MacvlanModeName; netns?: Netns; address?: string };

/** Settings of an existing link; each one given is applied, the rest left alone. */
export interface LinkChange {
  mtu?: number;
  /** MAC address ("02:42:..."). */
  address?: string;
  alias?: string;
  /** Name of the bridge to enslave it to; "" to release it. */
  master?: string;
  up?: boolean;
  promisc?: boolean;
  /** IPv6 address generation: "none" gives the link no address at all, not even link-local. */
  addrgenmode?: "none" | "eui64";
}

/** Port settings of a link enslaved to a bridge (`type bridge_slave ...`). */
export interface BridgePortChange {
  hairpin?: boolean;
  learning?: boolean;
  isolated?: boolean;
}

/** A route to add (`ip route add|replace`) in the main table. */
export interface RouteSpec {
  /** "default" or a CIDR. */
  dst: string;
  gateway?: string;
  dev: string;
  metric?: number;
  onlink?: boolean;
  /** Preferred source address (`src IP`), of the destination's family. */
  src?: string;
  /** Replace a route with the same destination and metric (`route replace`). */
  replace?: boolean;
}

/** rtnetlink requests on one socket in one namespace (see the file's notes). */
export class Rtnl {
  readonly #sock: NetlinkSocket;
  readonly #where: string;
  readonly #indexes = new Map<string, number>();

  constructor(sock: NetlinkSocket, ns: Netns | undefined) {
    this.#sock = sock;
    this.#where = ns ? ` in ${ns.path}` : "";
  }

  #getRaw(what: { name: string } | { index: number }): RawLink | undefined {
    if ("name" in what && !validIfname(what.name)) return undefined;
    const req = new NlRequest(RTM_GETLINK, NLM_F_REQUEST | NLM_F_ACK).struct(16, ifinfo("index" in what ? what.index : 0));
    if ("name" in what) req.str(IFLA_IFNAME, what.name);
    req.u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS);
    const label = "name" in what ? what.name : `index ${what.index}`;
    try {
      const m = this.#sock.exchange(req, `cannot read interface ${label}${this.#where}`)[0];
      const raw = m ? rawLink(m) : undefined;
      if (raw) this.#indexes.set(raw.name, raw.index);
      return raw;
    } catch (err) {
      if (isErrno(err, "ENODEV")) return undefined;
      throw err;
    }
  }

  /** The index of a link; a missing one throws (ENODEV). */
  index(name: string): number {
    const known = this.#indexes.get(name);
    if (known !== undefined) return known;
    const raw = this.#getRaw({ name });
    if (!raw) throw new NetlinkError(`no interface ${name}${this.#where}`, 19);
    return raw.index;
  }

  /** One link as `ip -j -d link show dev NAME` shows it, or undefined when there is none. */
  getLink(name: string): LinkInfo | undefined {
    const raw = this.#getRaw({ name });
    if (!raw) return undefined;
    const seen = new Map<number, { name: string; flags: number } | undefined>();
    const lookup: LinkLookup = (index) => {
      if (!seen.has(index)) {
        const l = this.#getRaw({ index });
        seen.set(index, l ? { name: l.name, flags: l.flags } : undefined);
      }
      return seen.get(index);
    };
    return toLinkInfo(raw, lookup);
  }

  #dumpLinks(): RawLink[] {
    const req = new NlRequest(RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP).struct(16, ifinfo()).u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS);
    return this.#sock.exchange(req, `cannot list interfaces${this.#where}`).map(rawLink);
  }

  /** Every link, as `ip -j -d link show` lists them. */
  listLinks(): LinkInfo[] {
    const raws = this.#dumpLinks();
    const byIndex = new Map(raws.map((r) => [r.index, { name: r.name, flags: r.flags }]));
    return raws.map((r) => toLinkInfo(r, (i) => byIndex.get(i)));
  }

  /** The MAC of a link, or undefined when it does not exist (or has none). */
  linkMac(name: string): string | undefined {
    const raw = this.#getRaw({ name });
    const addr = attrBytes(raw?.attrs.get(IFLA_ADDRESS));
    return raw && addr?.length ? linkAddress(addr, raw.type) : undefined;
  }

  /** Delete a link: true when deleted, false when there was none of that name. */
  deleteLink(name: string): boolean {
    if (!validIfname(name)) return false;
    const req = new NlRequest(RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK).struct(16, ifinfo()).str(IFLA_IFNAME, name);
    try {
      this.#sock.exchange(req, `cannot delete interface ${name}${this.#where}`);
      this.#indexes.delete(name);
      return true;
    } catch (err) {
      if (isErrno(err, "ENODEV")) return false;
      throw err;
    }
  }

  /**
   * Create a link (`ip link add NAME [link PARENT] [mtu M] [address MAC] [netns NS] type KIND
   * ...`), in one request; an existing name (in the namespace it is made in) fails with
   * EEXIST, a missing macvlan parent with ENODEV before anything is sent.
   */
  createLink(name: string, spec: LinkKind, opts: { mtu?: number } = {}): void {
    checkIfname(name);
    if (spec.kind === "veth") checkIfname(spec.peer.name);
    let macvlan: { parent: number; mode: number; address?: Uint8Array } | undefined;
    if (spec.kind === "macvlan") {
      const mode = (MACVLAN_MODE_VALUES as Record<string, number | undefined>)[spec.mode];
      if (mode === undefined) throw invalid(`invalid macvlan mode "${spec.mode}": expected one of ${Object.keys(MACVLAN_MODE_VALUES).join(", ")}`);
      const address = spec.address === undefined ? undefined : parseMac(spec.address);
      macvlan = { parent: this.index(spec.parent), mode, ...(address ? { address } : {}) };
    }
    const build = (fd?: number): NlRequest => {
      const req = new NlRequest(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL).struct(16, ifinfo()).str(IFLA_IFNAME, name);
      if (opts.mtu !== undefined) req.u32(IFLA_MTU, opts.mtu);
      if (macvlan) {
        req.u32(IFLA_LINK, macvlan.parent);
        if (macvlan.address) req.attr(IFLA_ADDRESS, macvlan.address);
        // Made in the target namespace; the parent is looked up in this one (the link's).
        if (fd !== undefined) req.u32(IFLA_NET_NS_FD, fd);
      }
      req.nest(IFLA_LINKINFO, (li) => {
        li.text(IFLA_INFO_KIND, spec.kind);
        if (macvlan) {
          const mode = macvlan.mode;
          li.nest(IFLA_INFO_DATA, (data) => data.u32(IFLA_MACVLAN_MODE, mode));
        }
        if (spec.kind !== "veth") return;
        li.nest(IFLA_INFO_DATA, (data) =>
          data.nest(VETH_INFO_PEER, (peer) => {
            peer.struct(16, ifinfo()).str(IFLA_IFNAME, spec.peer.name);
            if (spec.peer.mtu !== undefined) peer.u32(IFLA_MTU, spec.peer.mtu);
            if (fd !== undefined) peer.u32(IFLA_NET_NS_FD, fd);
          }),
        );
      });
      return req;
    };
    let what: string;
    let netns: Netns | undefined;
    if (spec.kind === "veth") {
      netns = spec.peer.netns;
      what = `cannot create veth pair ${name}${this.#where} / ${spec.peer.name}${netns ? ` in ${netns.path}` : ""}`;
    } else if (spec.kind === "macvlan") {
      netns = spec.netns;
      what = netns ? `cannot create macvlan ${name} in ${netns.path} on ${spec.parent}${this.#where}` : `cannot create macvlan ${name}${this.#where} on ${spec.parent}`;
    } else {
      what = `cannot create ${spec.kind} ${name}${this.#where}`;
    }
    if (!netns) this.#sock.exchange(build(), what);
    else withNetnsFd(netns, (fd) => this.#sock.exchange(build(fd), what));
  }

  /** Change settings of a link (`ip link set dev NAME ...`), in one request. */
  setLink(name: string, change: LinkChange): void {
    checkIfname(name);
    let flags = 0;
    let mask = 0;
    if (change.up !== undefined) {
      mask |= IFF_UP;
      if (change.up) flags |= IFF_UP;
    }
    if (change.promisc !== undefined) {
      mask |= IFF_PROMISC;
      if (change.promisc) flags |= IFF_PROMISC;
    }
    const master = change.master === undefined ? undefined : change.master === "" ? 0 : this.index(change.master);
    const req = new NlRequest(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK).struct(16, ifinfo(0, flags, mask)).str(IFLA_IFNAME, name);
    if (change.mtu !== undefined) req.u32(IFLA_MTU, change.mtu);
    if (change.address !== undefined) req.attr(IFLA_ADDRESS, parseMac(change.address));
    if (change.alias !== undefined) req.text(IFLA_IFALIAS, change.alias);
    if (master !== undefined) req.u32(IFLA_MASTER, master);
    if (change.addrgenmode !== undefined) {
      const mode = change.addrgenmode === "none" ? IN6_ADDR_GEN_MODE_NONE : 0;
      req.nest(IFLA_AF_SPEC, (spec) => spec.nest(AF_INET6, (inet6) => inet6.u8(IFLA_INET6_ADDR_GEN_MODE, mode)));
    }
    this.#sock.exchange(req, `cannot set ${describeChange(change)} of interface ${name}${this.#where}`);
  }

  /** Port settings of a bridge port (`ip link set dev NAME type bridge_slave ...`). */
  setBridgePort(name: string, change: BridgePortChange): void {
    checkIfname(name);
    const req = new NlRequest(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK).struct(16, ifinfo()).str(IFLA_IFNAME, name);
    req.nest(IFLA_LINKINFO, (li) => {
      li.text(IFLA_INFO_SLAVE_KIND, "bridge");
      li.nest(IFLA_INFO_SLAVE_DATA, (d) => {
        if (change.hairpin !== undefined) d.u8(IFLA_BRPORT_MODE, change.hairpin ? 1 : 0);
        if (change.learning !== undefined) d.u8(IFLA_BRPORT_LEARNING, change.learning ? 1 : 0);
        if (change.isolated !== undefined) d.u8(IFLA_BRPORT_ISOLATED, change.isolated ? 1 : 0);
      });
    });
    const what = Object.entries(change).map(([k, v]) => `${k} ${v ? "on" : "off"}`).join(", ");
    this.#sock.exchange(req, `cannot set bridge port ${what} on interface ${name}${this.#where}`);
  }

  /**
   * Add an address ("10.0.0.2/24", "fd00::2/64") to a link: `ip addr add` (EEXIST when it is
   * there), or `ip addr replace` with `replace`. `nodad`: IPv6 without duplicate address
   * detection, usable at once.
   */
  addAddress(dev: string, cidr: string, opts: { nodad?: boolean; replace?: boolean } = {}): void {
    const { ip, prefix } = parseIpWithPrefix(cidr);
    const index = this.index(dev);
    const ifaFlags = opts.nodad ? IFA_F_NODAD : 0;
    const bytes = ipToBytes(ip);
    const req = new NlRequest(RTM_NEWADDR, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | (opts.replace ? NLM_F_REPLACE : NLM_F_EXCL)).struct(8, (v, at) => {
      v.setUint8(at, family(ip));
      v.setUint8(at + 1, prefix);
      v.setUint8(at + 2, ifaFlags & 0xff);
      // Scope: iproute2 gives 127.0.0.0/8 host scope, everything else universe.
      v.setUint8(at + 3, ip.family === 4 && bytes[0] === 127 ? 254 : 0);
      v.setUint32(at + 4, index, HOST_LE);
    });
    req.attr(IFA_LOCAL, bytes).attr(IFA_ADDRESS, bytes);
    if (ifaFlags) req.u32(IFA_FLAGS, ifaFlags);
    this.#sock.exchange(req, `cannot add address ${cidr} to interface ${dev}${this.#where}`);
  }

  /** Add (or replace) a route in the main table, as `ip route add|replace` does. */
  addRoute(route: RouteSpec): void {
    const dst = route.dst === "default" ? undefined : parseIpWithPrefix(route.dst, "route destination");
    const gw = route.gateway === undefined ? undefined : parseAddress(route.gateway, "gateway");
    const fam = dst?.ip.family ?? gw?.family;
    if (fam === undefined) throw invalid(`route ${route.dst} dev ${route.dev}: a default route needs a gateway`);
    if (gw && gw.family !== fam) throw invalid(`route ${route.dst}: gateway ${route.gateway} is not of the destination's family`);
    const src = route.src === undefined ? undefined : parseAddress(route.src, "source address");
    if (src && src.family !== fam) throw invalid(`route ${route.dst}: source ${route.src} is not of the destination's family`);
    const index = this.index(route.dev);
    const flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | (route.replace ? NLM_F_REPLACE : NLM_F_EXCL);
    const req = new NlRequest(RTM_NEWROUTE, flags).struct(12, (v, at) => {
      v.setUint8(at, fam === 4 ? AF_INET : AF_INET6);
      v.setUint8(at + 1, dst?.prefix ?? 0);
      v.setUint8(at + 4, RT_TABLE_MAIN);
      v.setUint8(at + 5, RTPROT_BOOT);
      v.setUint8(at + 6, gw ? RT_SCOPE_UNIVERSE : RT_SCOPE_LINK);
      v.setUint8(at + 7, RTN_UNICAST);
      v.setUint32(at + 8, route.onlink ? RTNH_F_ONLINK : 0, HOST_LE);
    });
    if (dst) req.attr(RTA_DST, ipToBytes(dst.ip));
    if (gw) req.attr(RTA_GATEWAY, ipToBytes(gw));
    req.u32(RTA_OIF, index);
    if (route.metric !== undefined) req.u32(RTA_PRIORITY, route.metric);
    if (src) req.attr(RTA_PREFSRC, ipToBytes(src));
    const text = `${route.dst}${route.gateway ? ` via ${route.gateway}` : ""} dev ${route.dev}${route.metric !== undefined ? ` metric ${route.metric}` : ""}${route.src ? ` src ${route.src}` : ""}`;
    this.#sock.exchange(req, `cannot ${route.replace ? "replace" : "add"} route ${text}${this.#where}`);
  }

  /**
   * Delete the main table's route to `dst` (a CIDR) through `dev`, of any scope, gateway or
   * metric (`ip route del DST dev DEV`): true when deleted, false when there was none, nor
   * any device of that name (its routes went with it).
   */
  deleteRoute(route: { dst: string; dev: string }): boolean {
    const { ip: dst, prefix } = parseIpWithPrefix(route.dst, "route destination");
    let index: number;
    try {
      index = this.index(route.dev);
    } catch (err) {
      if (isErrno(err, "ENODEV")) return false;
      throw err;
    }
    const req = new NlRequest(RTM_DELROUTE, NLM_F_REQUEST | NLM_F_ACK).struct(12, (v, at) => {
      v.setUint8(at, family(dst));
      v.setUint8(at + 1, prefix);
      v.setUint8(at + 4, RT_TABLE_MAIN);
      v.setUint8(at + 6, RT_SCOPE_NOWHERE);
    });
    req.attr(RTA_DST, ipToBytes(dst)).u32(RTA_OIF, index);
    try {
      this.#sock.exchange(req, `cannot delete route ${route.dst} dev ${route.dev}${this.#where}`);
      return true;
    } catch (err) {
      if (isErrno(err, "ESRCH")) return false;
      throw err;
    }
  }

  /** Every link with its addresses, as `ip -j addr show` lists them (the AddrInfo fields). */
  listAddrs(): AddrInfo[] {
    const links = this.#dumpLinks();
    const req = new NlRequest(RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP).struct(8, (v, at) => v.setUint8(at, AF_UNSPEC));
    const byIndex = new Map<number, AddrInfo>(links.map((l) => [l.index, { ifname: l.name, addr_info: [] }]));
    for (const m of this.#sock.exchange(req, `cannot list addresses${this.#where}`)) {
      const d = m.data;
      const fam = d.getUint8(0);
      if (fam !== AF_INET && fam !== AF_INET6) continue;
      const a = parseAttrs(d, 8, d.byteLength);
      const local = attrBytes(a.get(IFA_LOCAL) ?? a.get(IFA_ADDRESS));
      const entry = byIndex.get(d.getUint32(4, HOST_LE));
      if (!local || !entry) continue;
      const scope = d.getUint8(3);
      entry.addr_info.push({ family: fam === AF_INET ? "inet" : "inet6", local: formatAddr(local), prefixlen: d.getUint8(1), scope: SCOPES[scope] ?? String(scope) });
    }
    return [...byIndex.values()];
  }

  /**
   * The forwarding database and neighbour entries of one device: the entries `bridge -j fdb
   * show dev DEV` lists (with `dst` of a vxlan device's own entries, `master` set for the
   * bridge's entries, `state` as bridge prints it), and those `ip -j neigh show dev DEV` lists
   * (IPv4 and IPv6, without NOARP-only and state-less entries, as ip's default filter). A
   * missing device has none.
   */
  listNeighbours(dev: string): { fdb: FdbEntry[]; neigh: NeighEntry[] } {
    let index: number;
    try {
      index = this.index(dev);
    } catch (err) {
      if (isErrno(err, "ENODEV")) return { fdb: [], neigh: [] };
      throw err;
    }
    const ndmsg = (fam: number): NlRequest => new NlRequest(RTM_GETNEIGH, NLM_F_REQUEST | NLM_F_DUMP).struct(12, (v, at) => v.setUint8(at, fam));
    const fdb: FdbEntry[] = [];
    for (const m of this.#sock.exchange(ndmsg(AF_BRIDGE), `cannot list the forwarding database${this.#where}`)) {
      const d = m.data;
      if (d.getUint8(0) !== AF_BRIDGE || d.getInt32(4, HOST_LE) !== index) continue;
      const a = parseAttrs(d, 12, d.byteLength);
      const mac = attrBytes(a.get(NDA_LLADDR));
      if (!mac) continue;
      const e: FdbEntry = { mac: formatMac(mac) };
      const dst = attrBytes(a.get(NDA_DST));
      if (dst) e.dst = formatAddr(dst);
      if (a.has(NDA_MASTER)) e.master = true;
      const state = d.getUint16(8, HOST_LE);
      if (state & NUD_PERMANENT) e.state = "permanent";
      else if (state & NUD_NOARP) e.state = "static";
      fdb.push(e);
    }
    const neigh: NeighEntry[] = [];
    for (const m of this.#sock.exchange(ndmsg(AF_UNSPEC), `cannot list neighbours${this.#where}`)) {
      const d = m.data;
      const fam = d.getUint8(0);
      if ((fam !== AF_INET && fam !== AF_INET6) || d.getInt32(4, HOST_LE) !== index) continue;
      const state = d.getUint16(8, HOST_LE);
      const flags = d.getUint8(10);
      if (!(state & 0xff & ~NUD_NOARP) && !(flags & (NTF_PROXY | NTF_EXT_LEARNED))) continue;
      const a = parseAttrs(d, 12, d.byteLength);
      const dst = attrBytes(a.get(NDA_DST));
      if (!dst) continue;
      const mac = attrBytes(a.get(NDA_LLADDR));
      neigh.push({ dst: formatAddr(dst), ...(mac ? { lladdr: formatMac(mac) } : {}) });
    }
    return { fdb, neigh };
  }

  /** Routes of every table, both families, as `ip -j route show table all` lists them. */
  listRoutes(): RouteInfo[] {
    const req = new NlRequest(RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP).struct(12, (v, at) => v.setUint8(at, AF_UNSPEC));
    const routes = this.#sock.exchange(req, `cannot list routes${this.#where}`);
    // Links after routes: a link that a listed route goes through existed before this dump
    // (dumped first, a bridge made by a concurrent create in between would be "ifN").
    const names = new Map(this.#dumpLinks().map((l) => [l.index, l.name]));
    const out: RouteInfo[] = [];
    for (const m of routes) {
      const d = m.data;
      const fam = d.getUint8(0);
      if ((fam !== AF_INET && fam !== AF_INET6) || d.getUint32(8, HOST_LE) & RTM_F_CLONED) continue;
      const a = parseAttrs(d, 12, d.byteLength);
      const dstLen = d.getUint8(1);
      const dst = attrBytes(a.get(RTA_DST));
      const r: RouteInfo = { dst: dst ? (dstLen === dst.length * 8 ? formatAddr(dst) : `${formatAddr(dst)}/${dstLen}`) : dstLen ? `0/${dstLen}` : "default" };
      const type = d.getUint8(7);
      if (type !== RTN_UNICAST) r.type = ROUTE_TYPES[type] ?? String(type);
      const gw = attrBytes(a.get(RTA_GATEWAY));
      if (gw) r.gateway = formatAddr(gw);
      const oif = attrU32(a.get(RTA_OIF));
      if (oif) r.dev = names.get(oif) ?? `if${oif}`;
      const proto = d.getUint8(5);
      if (proto !== RTPROT_BOOT) r.protocol = PROTOCOLS[proto] ?? String(proto);
      const scope = d.getUint8(6);
      if (scope !== RT_SCOPE_UNIVERSE) r.scope = SCOPES[scope] ?? String(scope);
      const src = attrBytes(a.get(RTA_PREFSRC));
      if (src) r.prefsrc = formatAddr(src);
      const metric = attrU32(a.get(RTA_PRIORITY));
      if (metric !== undefined) r.metric = metric;
      const table = attrU32(a.get(RTA_TABLE)) ?? d.getUint8(4);
      if (table !== RT_TABLE_MAIN) r.table = TABLES[table] ?? String(table);
      out.push(r);
    }
    return out;
  }
}

function describeChange(c: LinkChange): string {
  const parts: string[] = [];
  if (c.mtu !== undefined) parts.push(`MTU ${c.mtu}`);
  if (c.address !== undefined) parts.push(`MAC ${c.address}`);
  if (c.alias !== undefined) parts.push(`alias "${c.alias}"`);
  if (c.master !== undefined) parts.push(c.master ? `master ${c.master}` : "no master");
  if (c.addrgenmode !== undefined) parts.push(`addrgenmode ${c.addrgenmode}`);
  if (c.promisc !== undefined) parts.push(`promisc ${c.promisc ? "on" : "off"}`);
  if (c.up !== undefined) parts.push(c.up ? "state up" : "state down");
  return parts.join(", ") || "nothing";
}

/**
 * Run `fn` with an rtnetlink session in `ns` (the process's own namespace when undefined).
 * `fn` must be synchronous; what it returns is returned.
 */
export function rtnl<T>(ns: Netns | undefined, fn: (r: Rtnl) => T): T {
  const out = withSocket(ns, (sock) => fn(new Rtnl(sock, ns)));
  if (out instanceof Promise) throw new KnitError("internal", "rtnl() was given an async function: netlink sessions are synchronous");
  return out;
}

/** One link by name, or undefined when it does not exist. */
export const getLink = (name: string, ns?: Netns): LinkInfo | undefined => rtnl(ns, (r) => r.getLink(name));
/** Every link of a namespace. */
export const listLinks = (ns?: Netns): LinkInfo[] => rtnl(ns, (r) => r.listLinks());
/** Delete a link: true when deleted, false when there was none. */
export const deleteLink = (name: string, ns?: Netns): boolean => rtnl(ns, (r) => r.deleteLink(name));
/** Every link with its addresses. */
export const listAddrs = (ns?: Netns): AddrInfo[] => rtnl(ns, (r) => r.listAddrs());
/** Routes of every table, both families. */
export const listRoutes = (ns?: Netns): RouteInfo[] => rtnl(ns, (r) => r.listRoutes());
/** The FDB and neighbour entries of one device (none when it is missing). */
export const listNeighbours = (dev: string, ns?: Netns): { fdb: FdbEntry[]; neigh: NeighEntry[] } => rtnl(ns, (r) => r.listNeighbours(dev));

/** A forwarding database entry, as `bridge -j fdb show` prints it (the fields knit reads). */
export interface FdbEntry {
  mac: string;
  /** A vxlan device's own entry: the remote end. */
  dst?: string;
  /** The bridge's entry (iproute2 prints the bridge's name; knit only asks whether). */
  master?: true;
  /** "permanent" or "static"; absent for learned entries. */
  state?: "permanent" | "static";
}

/** A neighbour entry, as `ip -j neigh show` prints it (the fields knit reads). */
export interface NeighEntry {
  dst: string;
  lladdr?: string;
}
