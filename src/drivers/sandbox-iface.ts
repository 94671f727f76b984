/**
 * The sandbox side of an endpoint, shared by every driver that hands out addresses: once the
 * driver has put a device named `endpoint.ifname` into the sandbox's namespace, this sets its
 * MAC, addresses (IPv6 without DAD, so it is usable at once) and default routes via the
 * network's gateways (none for --internal networks). One plan, applied through netlink on one
 * socket inside the namespace (configureSandboxIface), or on a driver's own session there
 * when it has more to do on that socket (applySandboxIface: macvlan sets the alias too).
 */
import { rtnl, type Rtnl } from "../kernel/netlink.ts";
import type { Netns } from "../kernel/exec.ts";
import { cidrContains, formatIp, parseIpWithPrefix } from "../net/ip.ts";
import type { Endpoint, Network } from "../model.ts";
import type { Pool } from "../ipam/ipam.ts";

/** What the sandbox side of an endpoint gets, in the order it is applied. */
export interface SandboxIfacePlan {
  dev: string;
  mac?: string;
  addresses: { cidr: string; nodad: boolean }[];
  /** Default routes: one per family with a gateway, all with the interface's metric. */
  routes: { gateway: string; metric: number }[];
}

/** The plan for the endpoint's device inside its sandbox. */
export function sandboxIfacePlan(network: Network, pools: readonly Pool[], endpoint: Endpoint, setMac = true): SandboxIfacePlan {
  const plan: SandboxIfacePlan = { dev: endpoint.ifname, addresses: [], routes: [], ...(setMac ? { mac: endpoint.mac } : {}) };
  if (endpoint.ipv4) plan.addresses.push({ cidr: endpoint.ipv4, nodad: false });
  if (endpoint.ipv6) plan.addresses.push({ cidr: endpoint.ipv6, nodad: true });
  if (network.internal) return plan;
  // One default route per interface, its metric the interface's number (eth0: 0, eth1: 1):
  // joining a second network keeps the first one's gateway, as in Docker, and leaving a
  // network falls back to the next interface's route by itself. Only a route with exactly
  // this metric can be replaced, so another interface's default route is never touched.
  const metric = Number(/(\d+)$/.exec(endpoint.ifname)?.[1] ?? 0) % 10000;
  for (const p of pools) {
    const addr = p.subnet.family === 4 ? endpoint.ipv4 : endpoint.ipv6;
    if (!p.gateway || !addr || !cidrContains(p.subnet, parseIpWithPrefix(addr).ip)) continue;
    plan.routes.push({ gateway: formatIp(p.gateway), metric });
  }
  return plan;
}

/** Apply a plan on a netlink session inside the sandbox's namespace: MAC, addresses, up, routes. */
export function applySandboxIface(r: Rtnl, plan: SandboxIfacePlan): void {
  if (plan.mac) r.setLink(plan.dev, { address: plan.mac });
  for (const a of plan.addresses) r.addAddress(plan.dev, a.cidr, { nodad: a.nodad });
  r.setLink(plan.dev, { up: true });
  for (const route of plan.routes) r.addRoute({ dst: "default", gateway: route.gateway, dev: plan.dev, metric: route.metric, replace: true });
}

/** Configure the endpoint's device inside the sandbox: netlink requests on one socket there. */
export async function configureSandboxIface(network: Network, pools: readonly Pool[], endpoint: Endpoint, netns: Netns, setMac = true): Promise<void> {
  const plan = sandboxIfacePlan(network, pools, endpoint, setMac);
  rtnl(netns, (r) => applySandboxIface(r, plan));
}
