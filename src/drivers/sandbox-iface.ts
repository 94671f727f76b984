/**
 * The sandbox side of an endpoint, shared by every driver that hands out addresses: once the
 * driver has put a device named `endpoint.ifname` into the sandbox's namespace, this sets its
 * MAC, addresses (IPv6 without DAD, so it is usable at once) and default routes via the
 * network's gateways (none for --internal networks), in one `ip -batch` inside the namespace.
 */
import { batchToken, ipBatch } from "../kernel/ip.ts";
import type { Netns } from "../kernel/exec.ts";
import { cidrContains, formatIp, parseIpWithPrefix } from "../net/ip.ts";
import type { Endpoint, Network } from "../model.ts";
import type { Pool } from "../ipam/ipam.ts";

/** The `ip -batch` lines that configure the endpoint's device inside its sandbox. */
export function sandboxIfaceLines(network: Network, pools: readonly Pool[], endpoint: Endpoint, setMac = true): string[] {
  const dev = batchToken(endpoint.ifname);
  const lines = setMac ? [`link set dev ${dev} address ${endpoint.mac}`] : [];
  if (endpoint.ipv4) lines.push(`addr add ${endpoint.ipv4} dev ${dev}`);
  if (endpoint.ipv6) lines.push(`addr add ${endpoint.ipv6} dev ${dev} nodad`);
  lines.push(`link set dev ${dev} up`);
  if (network.internal) return lines;
  // One default route per interface, its metric the interface's number (eth0: 0, eth1: 1):
  // joining a second network keeps the first one's gateway, as in Docker, and leaving a
  // network falls back to the next interface's route by itself. Only a route with exactly
  // this metric can be replaced, so another interface's default route is never touched.
  const metric = Number(/(\d+)$/.exec(endpoint.ifname)?.[1] ?? 0) % 10000;
  for (const p of pools) {
    const addr = p.subnet.family === 4 ? endpoint.ipv4 : endpoint.ipv6;
    if (!p.gateway || !addr || !cidrContains(p.subnet, parseIpWithPrefix(addr).ip)) continue;
    lines.push(`route replace default via ${formatIp(p.gateway)} dev ${dev} metric ${metric}`);
  }
  return lines;
}

/** Configure the endpoint's device inside the sandbox. */
export async function configureSandboxIface(network: Network, pools: readonly Pool[], endpoint: Endpoint, netns: Netns, setMac = true): Promise<void> {
  await ipBatch(sandboxIfaceLines(network, pools, endpoint, setMac), netns);
}
