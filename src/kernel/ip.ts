/**
 * iproute2: links, addresses, routes and namespaces. Changes go through `ip -batch` so that
 * one endpoint costs one process per namespace; reads use `ip -j` and are parsed into types.
 */
import { existsSync } from "node:fs";
import { KnitError } from "../errors.ts";
import { run, runJson, netnsName, type Netns, NETNS_DIR } from "./exec.ts";

/** The subset of `ip -j link` that knit reads. */
export interface LinkInfo {
  ifindex: number;
  ifname: string;
  link?: string;
  master?: string;
  mtu: number;
  operstate: string;
  flags: string[];
  address?: string;
  linkinfo?: { info_kind?: string; info_data?: Record<string, unknown>; info_slave_kind?: string };
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

async function ipJson<T>(args: readonly string[], ns?: Netns): Promise<T[]> {
  const { argv, netns } = ipArgv(ns, "-j", ...args);
  return runJson<T[]>(argv, [], netns ? { netns } : {});
}

export const listLinks = (ns?: Netns): Promise<LinkInfo[]> => ipJson<LinkInfo>(["-d", "link", "show"], ns);

/** One link by name, or undefined when it does not exist. */
export async function getLink(name: string, ns?: Netns): Promise<LinkInfo | undefined> {
  const { argv, netns } = ipArgv(ns, "-j", "-d", "link", "show", "dev", name);
  const res = await run(argv, { allowFailure: true, ...(netns ? { netns } : {}) });
  if (res.code !== 0) return undefined;
  return (JSON.parse(res.stdout) as LinkInfo[])[0];
}

export const listAddrs = (ns?: Netns): Promise<AddrInfo[]> => ipJson<AddrInfo>(["addr", "show"], ns);

/**
 * Delete a link: true when it was deleted, false when no link has that name (already gone is
 * fine). One process, without looking the link up first.
 */
export async function deleteLink(name: string, ns?: Netns): Promise<boolean> {
  const { argv, netns } = ipArgv(ns, "link", "del", "dev", name);
  const res = await run(argv, { allowFailure: true, ...(netns ? { netns } : {}) });
  if (res.code === 0) return true;
  // "Cannot find device": no such name. "No such device": the name was found, but the link
  // was deleted by another process (the agent, a concurrent rm) before ip's delete reached it.
  if (/Cannot find device|No such device/.test(res.stderr)) return false;
  throw new KnitError("kernel", `${argv.join(" ")} failed (exit ${res.code}): ${res.stderr.trim() || res.stdout.trim()}`);
}

/**
 * All routes of both families in the main table, in one process: `route show table all`
 * dumps both families (`-4`/`-6` would take one process each) and names the table of every
 * route outside the main one.
 */
export async function listRoutes(ns?: Netns): Promise<RouteInfo[]> {
  const all = await ipJson<RouteInfo>(["route", "show", "table", "all"], ns);
  return all.filter((r) => r.table === undefined || r.table === "main");
}

/** Quote a token for `ip -batch` input (which splits on white space and honours quotes). */
export function batchToken(s: string): string {
  if (/^[A-Za-z0-9_.:/@%+=-]+$/.test(s)) return s;
  return `"${s.replace(/(["\\])/g, "\\$1")}"`;
}

/** Create a named namespace, with loopback up. */
export async function createNetns(name: string): Promise<Netns> {
  await run(["ip", "netns", "add", name]);
  await run(["ip", "-n", name, "link", "set", "lo", "up"]);
  return { path: `${NETNS_DIR}/${name}` };
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

/** MACs of some links, read with one `ip -j -batch` (one JSON array per line); missing links are left out. */
export async function linkMacs(names: readonly string[]): Promise<Map<string, string>> {
  const res = await run(["ip", "-j", "-batch", "-"], { stdin: names.map((n) => `link show dev ${batchToken(n)}\n`).join(""), allowFailure: true });
  const out = new Map<string, string>();
  for (const line of res.stdout.split("\n")) {
    if (!line.startsWith("[")) continue;
    for (const l of JSON.parse(line) as { ifname: string; address?: string }[]) if (l.address) out.set(l.ifname, l.address);
  }
  return out;
}
