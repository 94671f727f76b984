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
import { cidrContains, parseCidr, tryParseIp, formatIp, type Cidr } from "../net/ip.ts";
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
}

interface Member {
  readonly sandboxId: string;
  readonly upstreams: readonly string[];
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
  if (!ip) return undefined;
  const n = ip.family === 4 ? 4 : 16;
  const bytes = new Uint8Array(n);
  let v = ip.value;
  for (let i = n - 1; i >= 0; i--) {
    bytes[i] = Number(v & 0xffn);
    v >>= 8n;
  }
  return { family: ip.family, bytes };
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

/** The names of every served network, derived from the mirrored store records. */
export class NameTable {
  private readonly networks = new Map<string, Network>();
  private readonly endpoints = new Map<string, Endpoint>();
  private readonly sandboxes = new Map<string, Sandbox>();
  private readonly hosts = new Map<string, HostRecord>();
  private dirty = true;

  private served = new Map<string, ServedNetwork & { subnets: Cidr[] }>();
  private names = new Map<string, Map<string, NameRecords>>();
  private reverse = new Map<string, Map<string, Uint8Array>>();
  private members = new Map<string, Member>();
  private sandboxNetworks = new Map<string, string[]>();
  /** Ready internal overlay networks (their sandboxes ask at OVERLAY_DNS_ADDRESS). */
  private internalOverlays: string[] = [];
  private nameCount = 0;
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

  /** Forget everything (before a re-list). */
  clear(): void {
    this.networks.clear();
    this.endpoints.clear();
    this.sandboxes.clear();
    this.hosts.clear();
    this.dirty = true;
  }

  /**
   * Apply one store change: `value` undefined means the key was deleted. Keys the table
   * does not use, and values that are not valid JSON, are ignored. Call {@link refresh}
   * after a batch. Returns false for keys the table does not use.
   */
  apply(key: string, value: string | undefined): boolean {
    let map: Map<string, Network> | Map<string, Endpoint> | Map<string, Sandbox> | Map<string, HostRecord>;
    if (key.startsWith(PREFIX_NETWORK)) map = this.networks;
    else if (key.startsWith(PREFIX_ENDPOINT)) map = this.endpoints;
    else if (key.startsWith(PREFIX_SANDBOX)) map = this.sandboxes;
    else if (key.startsWith(PREFIX_HOST)) map = this.hosts;
    else return false;
    this.dirty = true;
    const record = value === undefined ? undefined : parseJson<Network & Endpoint & Sandbox & HostRecord>(value);
    if (record && typeof record === "object") map.set(key, record);
    else map.delete(key);
    return true;
  }

  /** Rebuild the derived indexes when something changed since the last call. */
  refresh(): void {
    if (!this.dirty) return;
    this.dirty = false;
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
    const bySandbox = new Map<string, Sandbox>();
    for (const sb of this.sandboxes.values()) if (sb.state !== "deleting") bySandbox.set(sb.id, sb);

    const names = new Map<string, Map<string, NameRecords>>();
    const reverse = new Map<string, Map<string, Uint8Array>>();
    const members = new Map<string, Member>();
    const sandboxNetworks = new Map<string, string[]>();
    let count = 0;
    const me = hostName();
    let internalHere = false;
    for (const ep of this.endpoints.values()) {
      const sb = bySandbox.get(ep.sandboxId);
      if (ep.state !== "ready" || !sb) continue;
      if (gateways.has(ep.networkId)) {
        // Who asks on docker_gwbridge: known by address, sees its other networks' names.
        for (const cidr of [ep.ipv4, ep.ipv6]) {
          const addr = cidr?.split("/")[0];
          if (addr) members.set(`${ep.networkId} ${addr.includes(":") ? canonical(addr) : addr}`, { sandboxId: sb.id, upstreams: sb.dns?.servers ?? [] });
        }
        continue;
      }
      if (!named.has(ep.networkId)) continue;
      // An overlay endpoint of a host that left the cluster is gone for everybody.
      if (overlays.has(ep.networkId) && ep.host !== undefined && !liveHosts.has(ep.host)) continue;
      // Nor before this host's data path can reach it (see setPeerGate).
      const gate = this.peerGate;
      if (gate && overlays.has(ep.networkId) && ep.host !== undefined && ep.host !== me) {
        const addr = ep.ipv4?.split("/")[0] ?? ep.ipv6?.split("/")[0];
        if (addr && !gate(ep.networkId, addr)) continue;
      }
      if (ep.host === me && internalOverlays.includes(ep.networkId)) internalHere = true;
      let netNames = names.get(ep.networkId);
      if (!netNames) names.set(ep.networkId, (netNames = new Map<string, NameRecords>()));
      let netReverse = reverse.get(ep.networkId);
      if (!netReverse) reverse.set(ep.networkId, (netReverse = new Map<string, Uint8Array>()));
      const ptr = encodeName(sb.name);
      const v4: Uint8Array[] = [];
      const v6: Uint8Array[] = [];
      for (const cidr of [ep.ipv4, ep.ipv6]) {
        const addr = cidr?.split("/")[0];
        const bytes = addr ? addressBytes(addr) : undefined;
        if (!addr || !bytes) continue;
        (bytes.family === 4 ? v4 : v6).push(bytes.bytes);
        const rev = reverseName(addr);
        if (rev) netReverse.set(rev, ptr);
        members.set(`${ep.networkId} ${bytes.family === 6 ? canonical(addr) : addr}`, { sandboxId: sb.id, upstreams: sb.dns?.servers ?? [] });
      }
      for (const name of namesOf(sb, ep)) {
        const rec = netNames.get(name);
        if (rec) {
          rec.v4.push(...v4);
          rec.v6.push(...v6);
        } else {
          netNames.set(name, { v4: [...v4], v6: [...v6] });
          count++;
        }
      }
      const nets = sandboxNetworks.get(sb.id);
      if (nets) nets.push(ep.networkId);
      else sandboxNetworks.set(sb.id, [ep.networkId]);
    }
    if (internalHere) served.set(INTERNAL_OVERLAYS, { id: INTERNAL_OVERLAYS, name: "internal overlay networks", addresses: [OVERLAY_DNS_ADDRESS], internal: true, subnets: [] });
    this.internalOverlays = internalOverlays;
    this.served = served;
    this.names = names;
    this.reverse = reverse;
    this.members = members;
    this.sandboxNetworks = sandboxNetworks;
    this.nameCount = count;
  }

  /** Networks the server must listen on. */
  servedNetworks(): ServedNetwork[] {
    return [...this.served.values()].map(({ subnets: _subnets, ...net }) => net);
  }

  /** Number of distinct (network, name) pairs. */
  get size(): number {
    return this.nameCount;
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
    const arrival = netId === INTERNAL_OVERLAYS ? this.internalOverlays.find((id) => this.members.has(`${id} ${key}`)) : netId;
    if (arrival === undefined) return undefined;
    const member = this.members.get(`${arrival} ${key}`);
    if (member) {
      const others = this.sandboxNetworks.get(member.sandboxId) ?? [];
      // The arrival network first; on docker_gwbridge (no names) the sandbox's overlays follow.
      const networks = [arrival, ...others.filter((n) => n !== arrival)];
      const forward = networks.some((n) => this.served.get(n)?.internal === false);
      return { networks, upstreams: member.upstreams, forward };
    }
    const net = this.served.get(netId);
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
      const ptr = this.reverse.get(net)?.get(name);
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
