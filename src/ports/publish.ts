/**
 * Published ports in the engine: resolving `-p` values against the network a sandbox joins
 * first, describing the store's mappings to the firewall, and flushing UDP conntrack entries
 * after a change. The order of a publish is: claims in the store (with the sandbox record),
 * endpoint wired, `meta/ports` bumped, firewall rebuilt from the store, UDP flows flushed;
 * an unpublish is the same backwards: claims released, firewall rebuilt, flows flushed, and
 * only then is the endpoint (and its address) given up.
 */
import { listSandboxes } from "../engine/engine.ts";
import { invalid } from "../errors.ts";
import { getJson } from "../store/store.ts";
import { keys, type Endpoint, type Membership, type Network, type PortMapping, type Sandbox } from "../model.ts";
import { conntrackDelete } from "../kernel/conntrack.ts";
import { batchToken, ipBatch } from "../kernel/ip.ts";
import type { PublishedPort } from "../firewall/firewall.ts";
import type { Engine } from "../engine/engine.ts";
import { ownerAlive } from "../engine/owner.ts";
import { parsePublish } from "./spec.ts";
import { wildcardIp, type ResolvedRequest } from "./claims.ts";

/** `com.docker.network.bridge.host_binding_ipv4`: the default host address of a network's ports. */
function defaultHostIp(net: Network): string {
  const v = net.driverState.hostBinding;
  return typeof v === "string" && v !== "" ? v : wildcardIp(4);
}

/**
 * Parse `-p` values and decide each one's host address, for a sandbox whose first network is
 * `net`. Everything is checked here, before anything is created: syntax, that the network
 * can publish (a bridge network, not internal) and that an IPv6 host address has an IPv6
 * network behind it.
 */
export function resolvePortRequests(values: readonly string[], net: Network | undefined): ResolvedRequest[] {
  const requests = parsePublish(values);
  if (requests.length === 0) return [];
  if (!net || net.driver !== "bridge") {
    const mode = net?.driver === "null" ? "none" : (net?.driver ?? "none");
    throw invalid(`published ports need a bridge network: the ${mode} network has no address to publish to`, "run on a bridge network (the default), e.g. knit run -p 8080:80 --network bridge ...");
  }
  if (net.internal) throw invalid(`network ${net.name} is internal: ports cannot be published from it`, "publish from a network created without --internal");
  return requests.map((r) => {
    const hostIp = r.hostIp || defaultHostIp(net);
    if (hostIp.includes(":") && !net.enableIPv6) {
      throw invalid(`invalid -p "${r.raw}": network ${net.name} has no IPv6, so nothing can be published on ${hostIp}`, "create the network with --ipv6, or publish on an IPv4 address");
    }
    if (hostIp.startsWith("127.") && String(net.driverState.bridge).includes(".")) {
      throw invalid(`invalid -p "${r.raw}": ports of network ${net.name} cannot be published on ${hostIp}: its bridge name has a '.', which route_localnet cannot be set for`, "publish on another address");
    }
    if (hostIp === "::1") throw invalid(`invalid -p "${r.raw}": ports cannot be published on ::1 (IPv6 cannot route loopback traffic to a sandbox)`, "publish on 127.0.0.1 or another address");
    return { ...r, hostIp, requestedHostIp: r.hostIp, networkId: net.id };
  });
}

/** Is the sandbox's record one whose ports should be live in the firewall? */
function sandboxActive(sb: Sandbox): boolean {
  if (sb.state === "ready") return true;
  return sb.state === "creating" && ownerAlive(sb.owner);
}

/**
 * Every live published port of this host, grouped by network id: mappings of this host's
 * active sandboxes whose endpoint on the mapping's network is ready. On a cluster store the
 * records of every host are there; only this host's sandboxes count, so a host never programs
 * a DNAT rule for another host's port (ports are per host, as their claims are). A mapping
 * whose endpoint is gone (disconnected) publishes nothing.
 */
export async function firewallPorts(engine: Engine): Promise<Map<string, PublishedPort[]>> {
  const out = new Map<string, PublishedPort[]>();
  for (const sb of await listSandboxes(engine)) {
    if (!sb.ports?.length || !sandboxActive(sb)) continue;
    const endpoints = new Map<string, Endpoint | undefined>();
    for (const m of sb.ports) {
      if (!endpoints.has(m.networkId)) {
        const member = await getJson<Membership>(engine.store, keys.member(sb.id, m.networkId));
        endpoints.set(m.networkId, member ? await getJson<Endpoint>(engine.store, keys.endpoint(m.networkId, member.endpointId)) : undefined);
      }
      const ep = endpoints.get(m.networkId);
      if (ep?.state !== "ready") continue;
      const address = (m.hostIp.includes(":") ? ep.ipv6 : ep.ipv4)?.split("/")[0];
      if (!address) continue;
      const list = out.get(m.networkId) ?? [];
      list.push({ hostIp: m.hostIp, hostPort: m.hostPort, proto: m.proto, containerIp: address, containerPort: m.containerPort, sandboxId: sb.id });
      out.set(m.networkId, list);
    }
  }
  return out;
}

/**
 * Delete the conntrack entries of UDP flows to these host ports, so that the next packet of
 * a client that kept sending is NATed afresh (to the new sandbox, or not at all).
 */
export async function flushUdpFlows(mappings: readonly PortMapping[]): Promise<void> {
  for (const m of mappings) {
    if (m.proto !== "udp") continue;
    const family = m.hostIp.includes(":") ? 6 : 4;
    const wildcard = m.hostIp === wildcardIp(family);
    await conntrackDelete({ family, proto: "udp", dport: m.hostPort, ...(wildcard ? {} : { daddr: m.hostIp }) });
  }
}

/**
 * Turn on hairpin mode on the host side of the endpoints that receive published ports. On a
 * host with br_netfilter (Docker's hosts, the default wherever the module is loaded) the
 * bridge runs the prerouting hook itself, and a sandbox reaching its OWN published port
 * through a host address is DNATed back to itself at layer 2: the frame has to leave by the
 * port it came in on, which a bridge only does for ports in hairpin mode. Docker sets the
 * same when its userland proxy is off.
 */
export async function hairpinPortEndpoints(endpoints: readonly Endpoint[], mappings: readonly PortMapping[]): Promise<void> {
  const nets = new Set(mappings.map((m) => m.networkId));
  const devs = endpoints.filter((ep) => nets.has(ep.networkId) && ep.hostIfname).map((ep) => ep.hostIfname ?? "");
  await ipBatch(devs.map((dev) => `link set dev ${batchToken(dev)} type bridge_slave hairpin on`));
}
