/**
 * Handing an endpoint's device to Docker. Docker's Join contract: the driver makes the
 * container's interface in the daemon's own namespace under a temporary name (SrcName) and
 * returns that name with the gateway; Docker moves it into the container's namespace (which
 * does not even exist yet when Join is called: runc makes it later), renames it to
 * DstPrefix+N and sets the addresses, the MAC and the routes itself. When the container leaves
 * the network Docker moves it back under SrcName, then calls DeleteEndpoint.
 *
 * knit's drivers make the container end in a sandbox namespace and configure it there. The
 * engine's `handoff` mode (ConnectOptions.handoff) runs the same driver code with the host's
 * own namespace as the target and an endpoint without addresses: the driver makes its device
 * (a veth peer, a macvlan device ...) under SrcName with the MAC, and configures nothing that
 * Docker will configure. The device then crosses namespaces once, as with Docker's own drivers
 * (a move costs tens of milliseconds: the kernel waits for an RCU grace period).
 */
import { readdirSync } from "node:fs";
import { deleteLink, deleteNetns, ip } from "../kernel/ip.ts";
import { NETNS_DIR, type Netns } from "../kernel/exec.ts";
import { processStartTime } from "../engine/owner.ts";
import { needsGateway } from "../cluster/attach.ts";
import { macvlanState } from "../drivers/macvlan.ts";
import { cidrContains, parseCidr, parseIpWithPrefix } from "../net/ip.ts";
import type { Endpoint, Network } from "../model.ts";

/** The temporary device name of an endpoint: 15 characters, unique per endpoint. */
export const srcNameFor = (endpointId: string): string => `kd${endpointId.slice(0, 13)}`;

const NAME_PREFIX = "knit-docker-";
let named: Netns | undefined;

/**
 * This process's network namespace (the host's: where dockerd picks SrcName up). Named while
 * the plugin runs (`ip netns attach knit-docker-<pid>`), so that drivers reach it with
 * `ip -n NAME` rather than through nsenter: one process less per Join.
 */
export const hostNetns = (): Netns => named ?? { path: `/proc/${process.pid}/ns/net` };

/** Name this process's namespace (deleting names left by agents that are gone). */
export async function nameHostNetns(): Promise<void> {
  let entries: string[] = [];
  try {
    entries = readdirSync(NETNS_DIR);
  } catch {
    entries = [];
  }
  for (const e of entries) {
    const pid = Number(e.slice(NAME_PREFIX.length));
    if (e.startsWith(NAME_PREFIX) && pid !== process.pid && processStartTime(pid) === undefined) await deleteNetns(e);
  }
  const name = `${NAME_PREFIX}${process.pid}`;
  await deleteNetns(name);
  await ip(["netns", "attach", name, String(process.pid)]);
  named = { path: `${NETNS_DIR}/${name}` };
}

/** Drop the name again (the namespace itself is the host's and stays). */
export async function unnameHostNetns(): Promise<void> {
  named = undefined;
  await deleteNetns(`${NAME_PREFIX}${process.pid}`);
}

/** The default routes Docker is to set for an endpoint: Join's Gateway and GatewayIPv6. */
export interface Gateways {
  v4?: string;
  v6?: string;
}

/**
 * The gateways of an endpoint, as knit sets them for its own sandboxes: the gateway of the
 * subnet holding each address, except on internal networks, on overlays (their way out is a
 * second interface: Docker's gateway service) and on a macvlan network without a parent.
 */
export function gatewaysFor(net: Network, ep: Endpoint): Gateways {
  if (net.internal || needsGateway(net)) return {};
  if (net.driver === "macvlan" && macvlanState(net).parentKind === "isolated") return {};
  const out: Gateways = {};
  for (const addr of [ep.ipv4, ep.ipv6]) {
    if (!addr) continue;
    const { ip } = parseIpWithPrefix(addr);
    const gw = net.subnets.find((s) => s.gateway && cidrContains(parseCidr(s.subnet), ip))?.gateway;
    if (gw && ip.family === 4) out.v4 = gw;
    if (gw && ip.family === 6) out.v6 = gw;
  }
  return out;
}

/** Delete a handed-off device left in the host's namespace (Docker moved it back); gone is fine. */
export async function dropDevice(dev: string): Promise<void> {
  await deleteLink(dev).catch(() => false);
}
