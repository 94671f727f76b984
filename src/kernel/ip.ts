/**
 * iproute2: links, addresses, routes and namespaces. Reads (links, addresses, routes) and
 * link deletion go through in-process rtnetlink (netlink.ts), which returns the same shapes
 * `ip -j` printed; so do the hot paths' changes (netlink.ts `rtnl`). The rarer changes still
 * go through `ip -batch`, one process per namespace.
 */
import { existsSync } from "node:fs";
import { run, netnsName, type Netns, NETNS_DIR } from "./exec.ts";
import { KnitError } from "../errors.ts";
import * as netlink from "./netlink.ts";

/**
 * The subset of `ip -j -d link` that knit reads (decoded by netlink.ts as iproute2 prints
 * it; `info_data` for vxlan and macvlan links, `info_slave_data` for bridge ports).
 */
export interface LinkInfo {
  ifindex: number;
  ifname: string;
  link?: string;
  /** Index of the peer (`link`) when it lives in another namespace (`link_netnsid`). */
  link_index?: number;
  master?: string;
  mtu: number;
  operstate: string;
  flags: string[];
  link_type?: string;
  address?: string;
  linkinfo?: { info_kind?: string; info_data?: Record<string, unknown>; info_slave_kind?: string; info_slave_data?: Record<string, unknown> };
  link_netnsid?: number;
  ifalias?: string;
}

export interface AddrInfo {
  ifname: string;
  addr_info: { family: "inet" | "inet6"; local: string; prefixlen: number; scope: string }[];
}

export interface RouteInfo {
  dst: string;
  gateway?: string;
  dev?: string;
  protocol?: string;
  scope?: string;
  prefsrc?: string;
  type?: string;
  metric?: number;
  /** The routing table, when it is not the main one (in `table all` listings). */
  table?: string;
}

/** `ip` argv prefix for a namespace (`-n NAME`) or the current one. */
function ipArgv(ns: Netns | undefined, ...rest: string[]): { argv: string[]; netns?: Netns } {
  if (!ns) return { argv: ["ip", ...rest] };
  const name = netnsName(ns);
  return name ? { argv: ["ip", "-n", name, ...rest] } : { argv: ["ip", ...rest], netns: ns };
}

/** Run many `ip` commands (one per line, without the leading `ip`) in one process. */
export async function ipBatch(lines: readonly string[], ns?: Netns): Promise<void> {
  if (lines.length === 0) return;
  const { argv, netns } = ipArgv(ns, "-batch", "-");
  await run(argv, netns ? { stdin: lines.join("\n") + "\n", netns } : { stdin: lines.join("\n") + "\n" });
}

/** Run one `ip` command. */
export async function ip(args: readonly string[], ns?: Netns, allowFailure = false): Promise<string> {
  const { argv, netns } = ipArgv(ns, ...args);
  const opts = { allowFailure, ...(netns ? { netns } : {}) };
  return (await run(argv, opts)).stdout;
}

/** Every link of a namespace (`ip -j -d link show`, through netlink). */
export const listLinks = async (ns?: Netns): Promise<LinkInfo[]> => netlink.listLinks(ns);

/**
 * One link by name, or undefined when it does not exist (nor does the namespace, as when
 * `ip` said so).
 */
export async function getLink(name: string, ns?: Netns): Promise<LinkInfo | undefined> {
  if (ns && !netnsExists(ns)) return undefined;
  return netlink.getLink(name, ns);
}

/** Every link with its addresses (`ip -j addr show`, through netlink). */
export const listAddrs = async (ns?: Netns): Promise<AddrInfo[]> => netlink.listAddrs(ns);

/**
 * Delete a link: true when it was deleted, false when no link has that name (already gone is
 * fine, also when another process deleted it a moment ago). One netlink request; in a
 * process that called {@link setLinkDeletionAside}, the same request on a worker thread, or
 * a child `ip` process ({@link deleteLinkAside}) when those are busy.
 */
export const deleteLink = async (name: string, ns?: Netns): Promise<boolean> =>
  deletionAside ? (await import("./link-deleter.ts")).deleteLinkOffLoop(name, ns, deleteLinkAside) : netlink.deleteLink(name, ns);

let deletionAside = false;

/**
 * From now on, {@link deleteLink} deletes off the event loop (src/kernel/link-deleter.ts).
 * For a long-running process that serves many callers at once (the agent): the kernel
 * handles an rtnetlink request inside the sending syscall, so a link deletion's RCU wait
 * (15-45 ms) would hold the event loop, and every deletion would wait behind the previous one.
 */
export function setLinkDeletionAside(on: boolean): void {
  deletionAside = on;
}

/**
 * Delete a link in a child `ip` process: like {@link deleteLink}, but the kernel's wait for
 * the device to go (an RCU grace period, 20-45 ms for a bridge or veth) happens in that
 * process, not in this one's netlink call, which would block the event loop for all of it.
 * For a deletion that can overlap other slow work (the firewall rebuild of `network rm`).
 */
export async function deleteLinkAside(name: string, ns?: Netns): Promise<boolean> {
  const { argv, netns } = ipArgv(ns, "link", "del", "dev", name);
  const res = await run(argv, { allowFailure: true, ...(netns ? { netns } : {}) });
  if (res.code === 0) return true;
  // "Cannot find device": no such name. "No such device": the name was found, but the link
  // was deleted by another process (the agent, a concurrent rm) before ip's delete reached it.
  if (/Cannot find device|No such device/.test(res.stderr)) return false;
  throw new KnitError("kernel", `${argv.join(" ")} failed (exit ${res.code}): ${res.stderr.trim() || res.stdout.trim()}`);
}

/**
 * All routes of both families in the main table: one dump of every table and family (as
 * `ip route show table all`), keeping the main table's.
 */
export async function listRoutes(ns?: Netns): Promise<RouteInfo[]> {
  return netlink.listRoutes(ns).filter((r) => r.table === undefined || r.table === "main");
}

/**
 * True when the namespace at `path` has a default route (IPv4 or IPv6); false when it has
 * none, or is no namespace (yet: Docker mounts a container's after its first Join).
 */
export async function hasDefaultRoute(path: string): Promise<boolean> {
  if (!path || !existsSync(path)) return false;
  try {
    return (await listRoutes({ path })).some((r) => r.dst === "default");
  } catch {
    return false;
  }
}

/** Quote a token for `ip -batch` input (which splits on white space and honours quotes). */
export function batchToken(s: string): string {
  if (/^[A-Za-z0-9_.:/@%+=-]+$/.test(s)) return s;
  return `"${s.replace(/(["\\])/g, "\\$1")}"`;
}

/** Create a named namespace, with loopback up. */
export async function createNetns(name: string): Promise<Netns> {
  await run(["ip", "netns", "add", name]);
  const ns = { path: `${NETNS_DIR}/${name}` };
  netlink.rtnl(ns, (r) => r.setLink("lo", { up: true }));
  return ns;
}

/** Delete a named namespace; already gone is fine. */
export async function deleteNetns(name: string): Promise<void> {
  if (!existsSync(`${NETNS_DIR}/${name}`)) return;
  await run(["ip", "netns", "delete", name]);
}

/** True when the namespace file exists. */
export const netnsExists = (ns: Netns): boolean => existsSync(ns.path);

/** Run `bridge` commands (one per line, without the leading `bridge`) in one process. */
export async function bridgeBatch(lines: readonly string[], ns?: Netns): Promise<void> {
  if (lines.length === 0) return;
  await run(["bridge", "-batch", "-"], ns ? { stdin: `${lines.join("\n")}\n`, netns: ns } : { stdin: `${lines.join("\n")}\n` });
}

/** MACs of some links (one netlink request each); missing links are left out. */
export async function linkMacs(names: readonly string[]): Promise<Map<string, string>> {
  return netlink.rtnl(undefined, (r) => {
    const out = new Map<string, string>();
    for (const n of names) {
      const mac = r.linkMac(n);
      if (mac) out.set(n, mac);
    }
    return out;
  });
}
