/**
 * The name table: which names answer with which addresses, as seen from each network.
 *
 * It mirrors three kinds of store records (networks, endpoints, sandboxes; fed by
 * mirror.ts) and derives, once per batch of changes, the indexes that a query needs:
 *
 *   names    network id -> lower-case name -> A and AAAA record data
 *   reverse  network id -> reverse name (x.x.x.x.in-addr.arpa, ...ip6.arpa) -> PTR data
 *   clients  "network id + address" -> the sandbox asking: its networks and upstreams
 *
 * A sandbox answers, on every user network it has a ready endpoint on, to its name, its
 * hostname, its 12-character short id and that endpoint's aliases (Docker's rules). Which
 * names a query may see depends on who asks where (see {@link NameTable.client}): a sandbox
 * sees the names of every network it is on, as Docker's embedded DNS does; nobody sees the
 * names of a network they are not on.
 *
 * Overlay networks span hosts: their names come from the endpoints of every host (the store
 * is shared), except hosts whose registration (`hosts/<name>`) is gone. They have no address
 * on any host, so their sandboxes ask on the gateway of docker_gwbridge, their way out: that
 * network is served (listened on) but has no names of its own, so a query arriving there
 * sees exactly the names of the asking sandbox's other networks. Sandboxes of `--internal`
 * overlay networks have no docker_gwbridge: they ask on {@link OVERLAY_DNS_ADDRESS}, which
 * this host serves (as the pseudo network {@link INTERNAL_OVERLAYS}) while it has endpoints on
 * such a network; there the source address tells which network asks (src/cluster/overlay-dns.ts).
 */
import { hostName } from "../engine/owner.ts";
import { GW_BRIDGE_NETWORK, OVERLAY_DNS_ADDRESS, type Endpoint, type HostRecord, type Network, type Sandbox } from "../model.ts";
import { cidrContains, ipToBytes, parseCidr, tryParseIp, formatIp, type Cidr } from "../net/ip.ts";
import { encodeName } from "./packet.ts";
import { servesDns } from "./resolvconf.ts";

/** A network the DNS server listens on. */
export interface ServedNetwork {
  readonly id: string;
  readonly name: string;
  /** Gateway addresses: where the server answers for this network. */
  readonly addresses: readonly string[];
  readonly internal: boolean;
}

/** The answers for one name: address record data, ready to put in a reply. */
export interface NameRecords {
  readonly v4: Uint8Array[];
  readonly v6: Uint8Array[];
}

/** Who is asking, as the table knows it. */
export interface Client {
  /** Networks whose names the client sees, the one the query arrived on first. */
  readonly networks: readonly string[];
  /** Upstream servers for names knit does not know (the sandbox's --dns), if any. */
  readonly upstreams: readonly string[];
  /** False when every network of the client is --internal: nothing is forwarded. */
  readonly forward: boolean;
  /** The asking sandbox, when the address is one's. */
  readonly sandboxId?: string;
}

interface Member {
  readonly sandboxId: string;
  readonly upstreams: readonly string[];
}

/** What one endpoint (with its sandbox) adds to the indexes; see NameTable.derive. */
interface Derived {
  readonly sb: Sandbox;
  readonly v4: readonly Uint8Array[];
  readonly v6: readonly Uint8Array[];
  readonly reverse: readonly string[];
  readonly memberKeys: readonly string[];
  readonly ptr: Uint8Array;
  readonly names: readonly string[];
}

const PREFIX_NETWORK = "networks/";
const PREFIX_ENDPOINT = "endpoints/";
const PREFIX_SANDBOX = "sandboxes/";
const PREFIX_HOST = "hosts/";

/** Store key prefixes the table needs. */
export const TABLE_PREFIXES = [PREFIX_NETWORK, PREFIX_ENDPOINT, PREFIX_SANDBOX, PREFIX_HOST] as const;

/**
 * The served "network" behind {@link OVERLAY_DNS_ADDRESS}: every internal overlay network of
 * this host at once (not a network id: those are 64 hex digits).
 */
export const INTERNAL_OVERLAYS = "internal-overlays";

/** Overlay networks carry names from every host. */
const namedOverlay = (net: Network): boolean => net.driver === "overlay" && net.state === "ready";
/** A host's docker_gwbridge: served, but without names of its own. */
const gatewayOnly = (net: Network): boolean => net.driver === "bridge" && net.name === GW_BRIDGE_NETWORK && net.host !== undefined;

/** Reverse-lookup name of an address ("4.3.2.1.in-addr.arpa", nibbles for IPv6). */
export function reverseName(addr: string): string | undefined {
  const ip = tryParseIp(addr);
  if (!ip) return undefined;
  if (ip.family === 4) return `${formatIp(ip).split(".").reverse().join(".")}.in-addr.arpa`;
  const nibbles = ip.value.toString(16).padStart(32, "0").split("").reverse();
  return `${nibbles.join(".")}.ip6.arpa`;
}

/** Record data of an address: 4 or 16 bytes. */
function addressBytes(addr: string): { family: 4 | 6; bytes: Uint8Array } | undefined {
  const ip = tryParseIp(addr);
  return ip ? { family: ip.family, bytes: ipToBytes(ip) } : undefined;
}

const parseJson = <T>(value: string): T | undefined => {
  try {
    return JSON.parse(value) as T;
  } catch {
    return undefined;
  }
};

/** Names a sandbox answers to on one endpoint's network, lower-cased, without duplicates. */
export function namesOf(sb: Sandbox, ep: Endpoint): string[] {
  return [...new Set([sb.name, sb.hostname, sb.id.slice(0, 12), ...ep.aliases].map((n) => n.toLowerCase().replace(/\.$/, "")).filter((n) => n !== ""))];
}

/** What one endpoint adds to the indexes, given the table's current structure. */
interface Contribution {
  readonly networkId: string;
  readonly sandboxId: string;
  /** On docker_gwbridge: only known as a client, no names. */
  readonly gatewayOnly: boolean;
  readonly d: Derived;
  readonly member: Member;
  /** This host's endpoint on an internal overlay network (serve OVERLAY_DNS_ADDRESS). */
  readonly internalHere: boolean;
}

/** The networks' side of the table: recomputed whole when a network or host record changes. */
interface Structure {
  readonly served: Map<string, ServedNetwork & { subnets: Cidr[] }>;
  readonly named: Set<string>;
  readonly overlays: Set<string>;
  readonly gateways: Set<string>;
  readonly liveHosts: Set<string>;
  readonly internalOverlays: readonly string[];
}

/** The address the peer gate is asked about for an endpoint (its first). */
const gateAddress = (ep: Endpoint): string | undefined => ep.ipv4?.split("/")[0] ?? ep.ipv6?.split("/")[0];
const gateKey = (ep: Endpoint): string => `${ep.networkId} ${gateAddress(ep) ?? ""}`;

/** A map of maps: get the inner map, making it when missing. */
function inner<K, V>(outer: Map<string, Map<K, V>>, key: string): Map<K, V> {
  let m = outer.get(key);
  if (!m) outer.set(key, (m = new Map<K, V>()));
  return m;
}

/**
 * The value of the least key: when two endpoints claim one address (for a moment, while an
 * address moves), the answer does not depend on the order their records arrived in.
 */
function ownerValue<V>(m: ReadonlyMap<string, V>): V | undefined {
  let least: string | undefined;
  let value: V | undefined;
  for (const [k, v] of m) {
    if (least === undefined || k < least) {
      least = k;
      value = v;
    }
  }
  return value;
}

/**
 * The names of every served network, derived from the mirrored store records.
 *
 * Kept up to date incrementally: a changed endpoint or sandbox record withdraws what its
 * endpoints contributed and adds what they contribute now, so a store change costs the same
 * with 1,000 endpoints as with one (a full rebuild per change took ~20 ms of the agent's CPU
 * at 1,000, which every knit command then competed with). A changed network or host record,
 * or a moved peer gate, rebuilds everything. Every index entry remembers which endpoints put
 * it there, so that one endpoint leaving never removes what another still provides.
 */
export class NameTable {
  private readonly networks = new Map<string, Network>();
  private readonly endpoints = new Map<string, Endpoint>();
  private readonly sandboxes = new Map<string, Sandbox>();
  private readonly hosts = new Map<string, HostRecord>();
  /** Live (not deleting) sandboxes by id, and the endpoint keys of each sandbox id. */
  private readonly sandboxById = new Map<string, Sandbox>();
  private readonly endpointsOfSandbox = new Map<string, Set<string>>();
  /** "network address" (the address the peer gate is asked about) -> endpoint keys there. */
  private readonly endpointsAt = new Map<string, Set<string>>();
  /** Networks or hosts changed (or the gate moved): rebuild everything at the next refresh. */
  private dirty = true;
  /** Endpoint keys to withdraw and add again at the next refresh. */
  private readonly touched = new Set<string>();
  /**
   * What each endpoint contributes, derived from its record and its sandbox's record (both
   * replaced, never mutated, by {@link apply}): parsing and encoding happen once per record.
   */
  private derived = new WeakMap<Endpoint, Derived>();

  private structure: Structure = { served: new Map(), named: new Set(), overlays: new Set(), gateways: new Set(), liveHosts: new Set(), internalOverlays: [] };
  private readonly contributions = new Map<string, Contribution>();
  /** network -> name -> answers, and the endpoint keys that give each name. */
  private readonly names = new Map<string, Map<string, NameRecords>>();
  private readonly nameOwners = new Map<string, Map<string, Set<string>>>();
  /** "network name" pairs whose answers must be recomputed at the end of this refresh. */
  private readonly stale = new Set<string>();
  /** network -> reverse name -> endpoint key -> PTR data (see ownerValue for who answers). */
  private readonly reverse = new Map<string, Map<string, Map<string, Uint8Array>>>();
  /** "network address" -> endpoint key -> who asks from there (see ownerValue). */
  private readonly members = new Map<string, Map<string, Member>>();
  /** sandbox id -> endpoint key -> network: the named networks each sandbox is on. */
  private readonly sandboxNetworks = new Map<string, Map<string, string>>();
  private internalHere = 0;
  private nameCount = 0;
  /** Endpoints looked at by refreshes so far (how tests see that a change costs O(1)). */
  workCounter = 0;
  /** See {@link setPeerGate}. */
  private peerGate: ((networkId: string, address: string) => boolean) | undefined;

  /**
   * Answer for an overlay endpoint of another host only once `gate(network, address)` says
   * this host's data path knows it (the agent's overlay sync programmed its FDB and
   * neighbour entries): a name that resolves before that sends the asker's first packet
   * into a path that drops it, and a client waits out its retry (ping 1 s, TCP SYN 1 s).
   * Call {@link invalidate} when the gate's answers change.
   */
  setPeerGate(gate: ((networkId: string, address: string) => boolean) | undefined): void {
    this.peerGate = gate;
    this.dirty = true;
  }

  /** Rebuild at the next {@link refresh} even without a store change (the peer gate moved). */
  invalidate(): void {
    this.dirty = true;
  }

  /**
   * The peer gate's answer changed for these addresses of one network: look at their
   * endpoints again at the next {@link refresh} (cheaper than {@link invalidate}).
   */
  peersChanged(networkId: string, addresses: Iterable<string>): void {
    for (const addr of addresses) for (const key of this.endpointsAt.get(`${networkId} ${addr}`) ?? []) this.touched.add(key);
  }

  /** Forget everything (before a re-list). */
  clear(): void {
    this.networks.clear();
    this.endpoints.clear();
    this.sandboxes.clear();
    this.hosts.clear();
    this.sandboxById.clear();
    this.endpointsOfSandbox.clear();
    this.endpointsAt.clear();
    this.dirty = true;
  }

  /**
   * Apply one store change: `value` undefined means the key was deleted. Keys the table
   * does not use, and values that are not valid JSON, are ignored. Call {@link refresh}
   * after a batch. Returns false for keys the table does not use.
   */
  apply(key: string, value: string | undefined): boolean {
    const kind = key.startsWith(PREFIX_NETWORK) ? "network" : key.startsWith(PREFIX_ENDPOINT) ? "endpoint" : key.startsWith(PREFIX_SANDBOX) ? "sandbox" : key.startsWith(PREFIX_HOST) ? "host" : undefined;
    if (kind === undefined) return false;
    const parsed = value === undefined ? undefined : parseJson<Network & Endpoint & Sandbox & HostRecord>(value);
    const record = parsed && typeof parsed === "object" ? parsed : undefined;
    if (kind === "network" || kind === "host") {
      const map: Map<string, Network> | Map<string, HostRecord> = kind === "network" ? this.networks : this.hosts;
      if (record) map.set(key, record);
      else map.delete(key);
      this.dirty = true;
    } else if (kind === "endpoint") {
      const old = this.endpoints.get(key);
      if (old) {
        this.endpointsOfSandbox.get(old.sandboxId)?.delete(key);
        this.endpointsAt.get(gateKey(old))?.delete(key);
      }
      if (record) {
        this.endpoints.set(key, record);
        let set = this.endpointsOfSandbox.get(record.sandboxId);
        if (!set) this.endpointsOfSandbox.set(record.sandboxId, (set = new Set<string>()));
        set.add(key);
        let at = this.endpointsAt.get(gateKey(record));
        if (!at) this.endpointsAt.set(gateKey(record), (at = new Set()));
        at.add(key);
      } else this.endpoints.delete(key);
      this.touched.add(key);
    } else {
      const old = this.sandboxes.get(key);
      if (old && this.sandboxById.get(old.id) === old) this.sandboxById.delete(old.id);
      if (record) {
        this.sandboxes.set(key, record);
        if (record.state !== "deleting") this.sandboxById.set(record.id, record);
      } else this.sandboxes.delete(key);
      for (const id of new Set([old?.id, record?.id])) {
        if (id !== undefined) for (const ep of this.endpointsOfSandbox.get(id) ?? []) this.touched.add(ep);
      }
    }
    return true;
  }

  /** Bring the derived indexes up to date with the records applied since the last call. */
  refresh(): void {
    if (this.dirty) {
      this.rebuild();
      return;
    }
    for (const key of this.touched) {
      this.withdraw(key);
      this.contribute(key);
    }
    this.touched.clear();
    this.materializeStale();
    this.updateInternalServed();
  }

  private rebuild(): void {
    this.dirty = false;
    this.touched.clear();
    const served = new Map<string, ServedNetwork & { subnets: Cidr[] }>();
    const named = new Set<string>();
    const overlays = new Set<string>();
    const gateways = new Set<string>();
    const liveHosts = new Set([...this.hosts.values()].map((h) => h.name));
    const internalOverlays: string[] = [];
    for (const net of this.networks.values()) {
      if (namedOverlay(net)) {
        named.add(net.id);
        overlays.add(net.id);
        if (net.internal) internalOverlays.push(net.id);
      }
      if (!servesDns(net)) continue;
      if (gatewayOnly(net)) gateways.add(net.id);
      else named.add(net.id);
      const addresses = net.subnets.flatMap((s) => (s.gateway ? [s.gateway] : []));
      const subnets = net.subnets.flatMap((s) => {
        try {
          return [parseCidr(s.subnet, "subnet", false)];
        } catch {
          return [];
        }
      });
      served.set(net.id, { id: net.id, name: net.name, addresses, internal: net.internal, subnets });
    }
    this.structure = { served, named, overlays, gateways, liveHosts, internalOverlays };
    this.contributions.clear();
    this.names.clear();
    this.nameOwners.clear();
    this.reverse.clear();
    this.members.clear();
    this.sandboxNetworks.clear();
    this.internalHere = 0;
    this.nameCount = 0;
    this.stale.clear();
    for (const key of this.endpoints.keys()) this.contribute(key);
    this.materializeStale();
    this.updateInternalServed();
  }

  /** Serve OVERLAY_DNS_ADDRESS exactly while this host has endpoints on internal overlays. */
  private updateInternalServed(): void {
    const { served } = this.structure;
    if (this.internalHere > 0 && !served.has(INTERNAL_OVERLAYS)) {
      served.set(INTERNAL_OVERLAYS, { id: INTERNAL_OVERLAYS, name: "internal overlay networks", addresses: [OVERLAY_DNS_ADDRESS], internal: true, subnets: [] });
    } else if (this.internalHere === 0) served.delete(INTERNAL_OVERLAYS);
  }

  /** What the endpoint under `key` contributes now, or undefined (not ready, not named...). */
  private contributionOf(key: string): Contribution | undefined {
    const ep = this.endpoints.get(key);
    const sb = ep && this.sandboxById.get(ep.sandboxId);
    if (!ep || !sb || ep.state !== "ready") return undefined;
    const st = this.structure;
    const member: Member = { sandboxId: sb.id, upstreams: sb.dns?.servers ?? [] };
    // Who asks on docker_gwbridge: known by address, sees its other networks' names.
    if (st.gateways.has(ep.networkId)) return { networkId: ep.networkId, sandboxId: sb.id, gatewayOnly: true, d: this.derive(ep, sb), member, internalHere: false };
    if (!st.named.has(ep.networkId)) return undefined;
    const overlay = st.overlays.has(ep.networkId);
    // An overlay endpoint of a host that left the cluster is gone for everybody.
    if (overlay && ep.host !== undefined && !st.liveHosts.has(ep.host)) return undefined;
    // Nor before this host's data path can reach it (see setPeerGate).
    const me = hostName();
    const gate = this.peerGate;
    if (gate && overlay && ep.host !== undefined && ep.host !== me) {
      const addr = gateAddress(ep);
      if (addr && !gate(ep.networkId, addr)) return undefined;
    }
    const internalHere = ep.host === me && st.internalOverlays.includes(ep.networkId);
    return { networkId: ep.networkId, sandboxId: sb.id, gatewayOnly: false, d: this.derive(ep, sb), member, internalHere };
  }

  /** Add the contribution of the endpoint under `key` (nothing if it contributes nothing). */
  private contribute(key: string): void {
    this.workCounter++;
    const c = this.contributionOf(key);
    if (!c) return;
    this.contributions.set(key, c);
    for (const mk of c.d.memberKeys) inner(this.members, mk).set(key, c.member);
    if (c.gatewayOnly) return;
    if (c.internalHere) this.internalHere++;
    const netReverse = inner(this.reverse, c.networkId);
    for (const rev of c.d.reverse) {
      let owners = netReverse.get(rev);
      if (!owners) netReverse.set(rev, (owners = new Map<string, Uint8Array>()));
      owners.set(key, c.d.ptr);
    }
    const owners = inner(this.nameOwners, c.networkId);
    for (const name of c.d.names) {
      let set = owners.get(name);
      if (!set) owners.set(name, (set = new Set<string>()));
      set.add(key);
      this.stale.add(`${c.networkId} ${name}`);
    }
    inner(this.sandboxNetworks, c.sandboxId).set(key, c.networkId);
  }

  /** Take back what the endpoint under `key` contributed. */
  private withdraw(key: string): void {
    const c = this.contributions.get(key);
    if (!c) return;
    this.contributions.delete(key);
    for (const mk of c.d.memberKeys) {
      const owners = this.members.get(mk);
      owners?.delete(key);
      if (owners?.size === 0) this.members.delete(mk);
    }
    if (c.gatewayOnly) return;
    if (c.internalHere) this.internalHere--;
    const netReverse = this.reverse.get(c.networkId);
    for (const rev of c.d.reverse) {
      const owners = netReverse?.get(rev);
      owners?.delete(key);
      if (owners?.size === 0) netReverse?.delete(rev);
    }
    const owners = this.nameOwners.get(c.networkId);
    for (const name of c.d.names) {
      const set = owners?.get(name);
      if (!set) continue;
      set.delete(key);
      if (set.size === 0) owners?.delete(name);
      this.stale.add(`${c.networkId} ${name}`);
    }
    const nets = this.sandboxNetworks.get(c.sandboxId);
    nets?.delete(key);
    if (nets?.size === 0) this.sandboxNetworks.delete(c.sandboxId);
  }

  /** Recompute the answers of the names whose endpoints changed (once each per refresh). */
  private materializeStale(): void {
    for (const pair of this.stale) {
      const cut = pair.indexOf(" ");
      this.materialize(pair.slice(0, cut), pair.slice(cut + 1));
    }
    this.stale.clear();
  }

  /** The answers for one name of one network, from the endpoints that give it. */
  private materialize(networkId: string, name: string): void {
    const netNames = inner(this.names, networkId);
    const owners = this.nameOwners.get(networkId)?.get(name);
    if (!owners || owners.size === 0) {
      if (netNames.delete(name)) this.nameCount--;
      return;
    }
    const v4: Uint8Array[] = [];
    const v6: Uint8Array[] = [];
    for (const k of owners) {
      const c = this.contributions.get(k);
      if (!c) continue;
      v4.push(...c.d.v4);
      v6.push(...c.d.v6);
    }
    if (!netNames.has(name)) this.nameCount++;
    netNames.set(name, { v4, v6 });
  }

  /** An endpoint's addresses, reverse names, member keys and names (cached per record pair). */
  private derive(ep: Endpoint, sb: Sandbox): Derived {
    const cached = this.derived.get(ep);
    if (cached?.sb === sb) return cached;
    const v4: Uint8Array[] = [];
    const v6: Uint8Array[] = [];
    const reverse: string[] = [];
    const memberKeys: string[] = [];
    for (const cidr of [ep.ipv4, ep.ipv6]) {
      const addr = cidr?.split("/")[0];
      const bytes = addr ? addressBytes(addr) : undefined;
      if (!addr || !bytes) continue;
      (bytes.family === 4 ? v4 : v6).push(bytes.bytes);
      const rev = reverseName(addr);
      if (rev) reverse.push(rev);
      memberKeys.push(`${ep.networkId} ${bytes.family === 6 ? canonical(addr) : addr}`);
    }
    const d: Derived = { sb, v4, v6, reverse, memberKeys, ptr: encodeName(sb.name), names: namesOf(sb, ep) };
    this.derived.set(ep, d);
    return d;
  }

  /** Networks the server must listen on. */
  servedNetworks(): ServedNetwork[] {
    return [...this.structure.served.values()].map(({ subnets: _subnets, ...net }) => net);
  }

  /** Number of distinct (network, name) pairs. */
  get size(): number {
    return this.nameCount;
  }

  /** A live sandbox the table knows, by id. */
  sandbox(id: string): Sandbox | undefined {
    return this.sandboxById.get(id);
  }

  /**
   * Who asks: a query that arrived on network `netId` from `addr`.
   * - A sandbox with that address on that network sees the names of all its networks.
   * - Any other address inside the network's subnets (the host itself, asking its own
   *   gateway) sees that network's names and gets the host's upstreams.
   * - Anybody else is no client of this network: undefined (the query is refused).
   * On {@link INTERNAL_OVERLAYS} the network is the internal overlay network that has a
   * sandbox with that address (their subnets never overlap); nobody else is a client there.
   */
  client(netId: string, addr: string): Client | undefined {
    const key = addr.includes(":") ? canonical(addr) : addr;
    const { served, internalOverlays } = this.structure;
    const arrival = netId === INTERNAL_OVERLAYS ? internalOverlays.find((id) => this.members.has(`${id} ${key}`)) : netId;
    if (arrival === undefined) return undefined;
    const owners = this.members.get(`${arrival} ${key}`);
    const member = owners && ownerValue(owners);
    if (member) {
      const others = new Set(this.sandboxNetworks.get(member.sandboxId)?.values());
      others.delete(arrival);
      // The arrival network first; on docker_gwbridge (no names) the sandbox's overlays
      // follow. The others in id order: which one answers a name that two of them have must
      // not depend on the order their records arrived in.
      const networks = [arrival, ...[...others].sort()];
      const forward = networks.some((n) => served.get(n)?.internal === false);
      return { networks, upstreams: member.upstreams, forward, sandboxId: member.sandboxId };
    }
    const net = served.get(netId);
    const ip = tryParseIp(key);
    if (!net || !ip || !net.subnets.some((s) => cidrContains(s, ip))) return undefined;
    return { networks: [netId], upstreams: [], forward: !net.internal };
  }

  /** A and AAAA data for `name` as `client` sees it (the first network that has it wins). */
  lookup(client: Client, name: string): NameRecords | undefined {
    for (const net of client.networks) {
      const rec = this.names.get(net)?.get(name);
      if (rec) return rec;
    }
    return undefined;
  }

  /** PTR data (the sandbox's name in wire form) for a reverse name, as `client` sees it. */
  lookupReverse(client: Client, name: string): Uint8Array | undefined {
    for (const net of client.networks) {
      const owners = this.reverse.get(net)?.get(name);
      const ptr = owners && ownerValue(owners);
      if (ptr) return ptr;
    }
    return undefined;
  }
}

/** Canonical text of an IPv6 address (clients may print it differently). */
function canonical(addr: string): string {
  const ip = tryParseIp(addr.replace(/%.*$/, ""));
  return ip ? formatIp(ip) : addr;
}
