/**
 * What the data path of one host should hold for the overlay networks, computed from store
 * records alone (pure functions: the agent feeds them its mirror of the store, the CLI a
 * fresh listing; src/drivers/overlay.ts compares the result with the kernel and applies it).
 *
 * A host needs a network's devices while it has an endpoint of that network (in any state:
 * a connect under way is about to use them, a disconnect under way still does). For every
 * endpoint of the network on ANOTHER host that is alive (its `hosts/` key exists) and not
 * being removed, the host needs one peer entry: its MAC behind that host's underlay address,
 * its addresses behind its MAC.
 */
import type { Endpoint, HostRecord, Network } from "../model.ts";
import type { PeerEntry } from "../drivers/overlay.ts";

/** What one host needs for one overlay network. */
export interface NetworkPlan {
  network: Network;
  /** Endpoints of the network on this host. */
  local: Endpoint[];
  /** Entries for the endpoints on other hosts. */
  peers: PeerEntry[];
}

/** The address of a CIDR ("10.0.0.2/24" -> "10.0.0.2"). */
const addressOf = (cidr: string): string => cidr.split("/")[0] ?? cidr;

/** The peer entry of a remote endpoint, or undefined when it has nothing to program. */
export function peerOf(ep: Endpoint, hosts: ReadonlyMap<string, HostRecord>, me: string): PeerEntry | undefined {
  if (ep.host === undefined || ep.host === me || ep.state === "deleting") return undefined;
  const host = hosts.get(ep.host);
  const ips = [ep.ipv4, ep.ipv6].flatMap((a) => (a ? [addressOf(a)] : []));
  if (!host || ips.length === 0 || !ep.mac) return undefined;
  return { mac: ep.mac.toLowerCase(), ips, vtep: host.address };
}

/**
 * The plan of `network` on host `me`: undefined when the host needs no devices for it (not an
 * overlay network, being removed, or no endpoint here).
 */
export function planNetwork(network: Network, endpoints: readonly Endpoint[], hosts: ReadonlyMap<string, HostRecord>, me: string): NetworkPlan | undefined {
  if (network.driver !== "overlay" || network.state === "deleting") return undefined;
  const local = endpoints.filter((ep) => ep.host === me);
  if (local.length === 0) return undefined;
  const peers = endpoints.flatMap((ep) => peerOf(ep, hosts, me) ?? []);
  return { network, local, peers };
}
