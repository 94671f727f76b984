/**
 * Resolver configuration: the host's /etc/resolv.conf (read), a sandbox's resolv.conf
 * (written), and the `--dns`, `--dns-search`, `--dns-option` flags of `knit run`.
 *
 * Docker's rules: on a user-defined network the sandbox asks knit's DNS server (on the
 * network's gateway address) and `--dns` servers become that server's upstreams for this
 * sandbox; on the predefined bridge (and none, host) there is no knit DNS and the sandbox
 * gets the `--dns` servers, or the host's, directly. Search domains and options come from
 * the flags, else from the host.
 */
import { listSandboxes } from "../engine/engine.ts";
import { hostName } from "../engine/owner.ts";
import { existsSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { invalid } from "../errors.ts";
import { formatIp, tryParseIp } from "../net/ip.ts";
import { listJson, getJson } from "../store/store.ts";
import { OVERLAY_DNS_ADDRESS, keys, type DnsSettings, type Membership, type Network, type Sandbox } from "../model.ts";
import type { Engine } from "../engine/engine.ts";

/** A parsed resolv.conf. */
export interface ResolvConf {
  nameservers: string[];
  search: string[];
  options: string[];
}

/** At most this many upstream servers are used (glibc's MAXNS, Docker's limit). */
export const MAX_UPSTREAMS = 3;

/**
 * The host's resolver file: /etc/resolv.conf, or KNIT_RESOLV_CONF (tests and benchmarks
 * point it at a lab upstream so that nothing ever asks a real resolver).
 */
export const hostResolvConfPath = (): string => process.env.KNIT_RESOLV_CONF || "/etc/resolv.conf";

/** Parse resolv.conf text as glibc does: the last search/domain line wins, options add up. */
export function parseResolvConf(text: string): ResolvConf {
  const out: ResolvConf = { nameservers: [], search: [], options: [] };
  for (const raw of text.split("\n")) {
    const line = raw.replace(/[#;].*$/, "").trim();
    const [word, ...args] = line.split(/\s+/);
    if (word === "nameserver" && args[0]) {
      const ip = tryParseIp(args[0].replace(/%.*$/, ""));
      if (ip) out.nameservers.push(args[0].includes("%") ? args[0] : formatIp(ip));
    } else if (word === "search" || word === "domain") out.search = args.filter((a) => a !== "");
    else if (word === "options") out.options.push(...args.filter((a) => a !== ""));
  }
  return out;
}

/** The host's resolver configuration (empty when the file is missing). */
export function readHostResolvConf(): ResolvConf {
  try {
    return parseResolvConf(readFileSync(hostResolvConfPath(), "utf8"));
  } catch {
    return { nameservers: [], search: [], options: [] };
  }
}

/** A loopback address (127/8, ::1): reachable from the host's namespace only. */
export const isLoopback = (addr: string): boolean => /^127\./.test(addr) || addr === "::1";

let cached: { path: string; mtimeMs: number; size: number; checked: number; servers: string[] } | undefined;

/**
 * Upstreams for names knit does not know, when the asking sandbox has no `--dns`: the host's
 * nameservers, loopback ones included (the agent runs in the host's namespace, so a local
 * resolver such as systemd-resolved's 127.0.0.53 is reachable from it, unlike from a
 * sandbox). Re-read when the file changes, checked at most once a second.
 */
export function hostUpstreams(now = Date.now()): string[] {
  const path = hostResolvConfPath();
  if (cached && cached.path === path && now - cached.checked < 1000) return cached.servers;
  let mtimeMs = -1;
  let size = -1;
  try {
    const st = statSync(path);
    mtimeMs = st.mtimeMs;
    size = st.size;
  } catch {
    // missing: no upstreams
  }
  if (!cached || cached.path !== path || cached.mtimeMs !== mtimeMs || cached.size !== size) {
    const servers = mtimeMs < 0 ? [] : readHostResolvConf().nameservers.filter((s) => !s.includes("%"));
    cached = { path, mtimeMs, size, checked: now, servers };
  } else cached.checked = now;
  return cached.servers;
}

/** True for networks knit's DNS server answers on: user-defined bridge networks with a gateway. */
export function servesDns(net: Network): boolean {
  return net.driver === "bridge" && (net.host === undefined || net.host === hostName()) && !net.predefined && net.state === "ready" && net.subnets.some((s) => s.gateway !== undefined);
}

/**
 * True for `--internal` overlay networks: their sandboxes ask knit's DNS at
 * {@link OVERLAY_DNS_ADDRESS} on their host (src/cluster/overlay-dns.ts); the other overlay
 * networks' sandboxes ask on docker_gwbridge, which servesDns covers.
 */
export function servesOverlayDns(net: Network): boolean {
  return net.driver === "overlay" && net.internal && net.state === "ready";
}

/** The address a sandbox on `net` sends its queries to: the IPv4 gateway, else the IPv6 one. */
export function dnsServerAddress(net: Network): string | undefined {
  const gws = net.subnets.flatMap((s) => (s.gateway ? [s.gateway] : []));
  return gws.find((g) => !g.includes(":")) ?? gws[0];
}

/** A search domain as Docker accepts it (letters, digits, hyphens; dots between labels). */
const DOMAIN_RE = /^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?\.)*[a-zA-Z](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?\.?$/;

/**
 * Validate `--dns`, `--dns-search` and `--dns-option` values; returns them canonical
 * (addresses in their standard text form). Throws an invalid-argument error naming the flag.
 */
export function checkDnsSettings(dns: { servers?: readonly string[]; search?: readonly string[]; options?: readonly string[] }): DnsSettings {
  const servers = (dns.servers ?? []).map((s) => {
    const ip = tryParseIp(s.trim());
    if (!ip) throw invalid(`invalid argument "${s}" for "--dns" flag: ${s} is not an IP address`, "give the address of a DNS server, e.g. --dns 192.0.2.53");
    return formatIp(ip);
  });
  const search = (dns.search ?? []).map((d) => {
    if (d === ".") return d;
    if (d.length > 253 || !DOMAIN_RE.test(d)) throw invalid(`invalid argument "${d}" for "--dns-search" flag: ${d} is not a valid domain`);
    return d.replace(/\.$/, "");
  });
  const options = (dns.options ?? []).map((o) => {
    if (o === "" || /\s/.test(o)) throw invalid(`invalid argument "${o}" for "--dns-option" flag: options are single words such as ndots:2`);
    return o;
  });
  return { servers, search, options };
}

/**
 * The resolv.conf of a sandbox on `nets` (its networks, in order). On a network with knit
 * DNS: that server, with `ndots:0` unless an option sets ndots (as Docker does, so that
 * single-label names go to the server at once instead of through the search list first).
 */
export function renderSandboxResolvConf(sb: Pick<Sandbox, "name" | "dns">, nets: readonly Network[]): string {
  const host = readHostResolvConf();
  const dns = sb.dns;
  const served = nets.find(servesDns);
  const overlay = served ? undefined : nets.find(servesOverlayDns);
  const search = dns?.search.length ? dns.search.filter((d) => d !== ".") : host.search;
  const options = dns?.options.length ? [...dns.options] : [...host.options];
  let nameservers: string[];
  if (served || overlay) {
    nameservers = [served ? (dnsServerAddress(served) ?? "") : OVERLAY_DNS_ADDRESS];
    if (!options.some((o) => o.startsWith("ndots:"))) options.push("ndots:0");
  } else {
    nameservers = dns?.servers.length ? dns.servers : host.nameservers.filter((s) => !isLoopback(s));
  }
  const via = served ? `: knit DNS on network ${served.name}` : overlay ? `: knit DNS for network ${overlay.name}` : "";
  const lines = [`# Generated by knit for sandbox ${sb.name}${via}`];
  for (const s of nameservers.slice(0, MAX_UPSTREAMS)) lines.push(`nameserver ${s}`);
  if (search.length) lines.push(`search ${search.join(" ")}`);
  if (options.length) lines.push(`options ${options.join(" ")}`);
  return `${lines.join("\n")}\n`;
}

/**
 * After `network connect` or `disconnect`: rewrite the resolv.conf of every running knit
 * sandbox whose networks now call for another one (it is bind-mounted from the sandbox's
 * directory, so writing the file in place changes what the sandbox sees).
 */
export async function refreshSandboxResolvConfs(engine: Engine, only?: readonly Sandbox[]): Promise<number> {
  let changed = 0;
  for (const sb of only ?? (await listSandboxes(engine))) {
    if (sb.kind !== "knit" || sb.state !== "ready" || sb.netnsPath === "host") continue;
    const path = join(engine.stateDir, "sandboxes", sb.id, "resolv.conf");
    if (!existsSync(path)) continue;
    const nets: Network[] = [];
    for (const m of await listJson<Membership>(engine.store, keys.membersOf(sb.id))) {
      const net = await getJson<Network>(engine.store, keys.network(m.networkId));
      if (net) nets.push(net);
    }
    let current = "";
    try {
      current = readFileSync(path, "utf8");
    } catch {
      continue;
    }
    // Memberships list in id order: keep the server the sandbox already uses when it still can.
    const using = parseResolvConf(current).nameservers[0];
    nets.sort((a, b) => Number(dnsServerAddress(b) === using && servesDns(b)) - Number(dnsServerAddress(a) === using && servesDns(a)));
    const text = renderSandboxResolvConf(sb, nets);
    if (current === text) continue;
    writeFileSync(path, text);
    changed++;
  }
  return changed;
}
