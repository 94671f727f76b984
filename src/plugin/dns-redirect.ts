/**
 * Names for Docker containers on knit networks. A container on a user-defined network asks
 * Docker's embedded resolver (127.0.0.11): it answers the names Docker knows (containers of
 * this daemon on the same network) and forwards every other query, from inside the
 * container's namespace, to the daemon's upstream servers. knit's sandboxes, and containers of
 * other hosts, are names only knit's DNS knows. So those forwarded queries go to knit's DNS
 * instead: DNS (UDP and TCP port 53) that arrives on the bridge of a network knit serves DNS
 * on, from a Docker endpoint's address, bound for an address that is not the host's, is
 * destination-NATed to the network's DNS address (its gateway). knit's DNS sees the
 * container's own address, knows it as a member, answers with the names of all its networks
 * and forwards the rest to the host's upstreams.
 *
 * On `--internal` networks a container has no default route, so its forwarded queries would
 * never leave it: Join gives it host routes for exactly the daemon's upstream servers (see
 * {@link dockerUpstreams}), through the network's DNS address (the gateway of a bridge, or
 * 169.254.53.53 on the bridge of an internal overlay, src/cluster/overlay-dns.ts), and the
 * same redirect turns them into queries to knit's DNS. Nothing else gains a way out: the
 * firewall still drops everything leaving an internal network. A container that has a
 * default route when it joins (a running one, connected) gets none: its queries have a way.
 *
 * One table of its own, `inet knit_docker`: a fixed rule per family that looks the packet's
 * (input bridge, source address) up in a map whose value is the DNS address. The table is made
 * once; after every Join and DeleteEndpoint only the maps' elements are replaced, in one `nft`
 * transaction (a few milliseconds: no hook is registered again). The agent deletes the table
 * when it stops. knit's own sandboxes are never matched (they ask the gateway directly).
 */
import { readFileSync } from "node:fs";
import { nftApply } from "../kernel/nft.ts";
import { getJson, listJson } from "../store/store.ts";
import { DockerLabels, OVERLAY_DNS_ADDRESS, keys, type Endpoint, type Membership, type Network } from "../model.ts";
import { drivers } from "../drivers/registry.ts";
import { listSandboxes, type Engine } from "../engine/engine.ts";
import { isLoopback, parseResolvConf, servesDns, servesOverlayDns } from "../dns/resolvconf.ts";
import type { StaticRoute } from "./protocol.ts";

export const DNS_TABLE = "knit_docker";

/** Docker's public fallback resolvers, used when the host names none it can use (libnetwork's defaults). */
const DOCKER_DEFAULT_DNS = { 4: ["8.8.8.8", "8.8.4.4"], 6: ["2001:4860:4860::8888", "2001:4860:4860::8844"] } as const;

function nameserversIn(path: string): string[] {
  try {
    return parseResolvConf(readFileSync(path, "utf8")).nameservers.filter((s) => !s.includes("%"));
  } catch {
    return [];
  }
}

/**
 * The servers dockerd forwards a container's unknown names to, found as dockerd finds them:
 * the host's /etc/resolv.conf (systemd-resolved's upstream file when that names only its
 * 127.0.0.53 stub), without loopback servers (unreachable from a container), else Docker's
 * defaults. A container's own `--dns` or dockerd's `dns` setting are not seen here.
 */
export function dockerUpstreams(family: 4 | 6, etc = "/etc/resolv.conf", resolved = "/run/systemd/resolve/resolv.conf"): string[] {
  let servers = nameserversIn(etc);
  if (servers.length === 1 && servers[0] === "127.0.0.53") servers = nameserversIn(resolved);
  const usable = servers.filter((s) => !isLoopback(s));
  const all = usable.length ? usable : [...DOCKER_DEFAULT_DNS[4], ...(family === 6 ? DOCKER_DEFAULT_DNS[6] : [])];
  return all.filter((s) => s.includes(":") === (family === 6));
}

/**
 * Join's static routes for a container on an internal network where knit serves names: the
 * daemon's upstream servers through the network's DNS address (and, on an internal overlay,
 * that address on the link). None on other networks: their default route carries the queries.
 */
export function internalDnsRoutes(net: Network, families: { v4: boolean; v6: boolean }): StaticRoute[] {
  if (!net.internal) return [];
  const out: StaticRoute[] = [];
  if (servesOverlayDns(net)) {
    if (!families.v4) return [];
    out.push({ Destination: `${OVERLAY_DNS_ADDRESS}/32`, RouteType: 1, NextHop: "" });
    for (const u of dockerUpstreams(4)) out.push({ Destination: `${u}/32`, RouteType: 0, NextHop: OVERLAY_DNS_ADDRESS });
    return out;
  }
  if (!servesDns(net)) return [];
  for (const family of [4, 6] as const) {
    if (!(family === 4 ? families.v4 : families.v6)) continue;
    const gw = net.subnets.find((s) => s.gateway && s.gateway.includes(":") === (family === 6))?.gateway;
    if (!gw) continue;
    for (const u of dockerUpstreams(family)) out.push({ Destination: `${u}/${family === 4 ? 32 : 128}`, RouteType: 0, NextHop: gw });
  }
  return out;
}

/** Networks whose Docker endpoints' DNS goes to knit: bridges with knit DNS, internal overlays. */
const redirectsDns = (net: Network): boolean => servesDns(net) || servesOverlayDns(net);

/** One redirected source: a Docker endpoint's address on a bridge, and where its DNS goes. */
export interface Redirect {
  bridge: string;
  source: string;
  target: string;
}

const quote = (s: string): string => `"${s.replace(/["\\]/g, "")}"`;
const DNS = "meta l4proto { tcp, udp } th dport 53 fib daddr type != local";

/** The script that makes the table (empty maps, the two rules), replacing any left over. */
export function dnsTableScript(): string {
  return [
    `table inet ${DNS_TABLE}`,
    `delete table inet ${DNS_TABLE}`,
    `table inet ${DNS_TABLE} {`,
    "  map dns4 { type ifname . ipv4_addr : ipv4_addr; }",
    "  map dns6 { type ifname . ipv6_addr : ipv6_addr; }",
    "  chain prerouting {",
    "    type nat hook prerouting priority dstnat; policy accept;",
    `    ${DNS} dnat ip to iifname . ip saddr map @dns4`,
    `    ${DNS} dnat ip6 to iifname . ip6 saddr map @dns6`,
    "  }",
    "}",
    "",
  ].join("\n");
}

/** The script that sets the maps' elements to exactly `redirects`. */
export function dnsElementsScript(redirects: readonly Redirect[]): string {
  const lines = [`flush map inet ${DNS_TABLE} dns4`, `flush map inet ${DNS_TABLE} dns6`];
  for (const family of [4, 6] as const) {
    const els = redirects.filter((r) => r.source.includes(":") === (family === 6)).map((r) => `${quote(r.bridge)} . ${r.source} : ${r.target}`);
    if (els.length) lines.push(`add element inet ${DNS_TABLE} dns${family} { ${els.join(", ")} }`);
  }
  return `${lines.join("\n")}\n`;
}

/** Keeps the redirect table in step with the store; rebuilds never overlap. */
export class DnsRedirect {
  private applied: string | undefined;
  private made = false;
  /** Full rebuilds started so far (a Join tells from it whether one may have missed its endpoint). */
  started = 0;
  private running: Promise<void> = Promise.resolve();
  /** A rebuild that has not started yet: callers arriving now share it. */
  private pending: Promise<void> | undefined;

  constructor(private readonly engine: Engine) {}

  /** The redirects the store calls for now: ready Docker endpoints on networks with knit DNS. */
  async wanted(): Promise<Redirect[]> {
    const out: Redirect[] = [];
    const nets = new Map<string, Network | undefined>();
    for (const sb of await listSandboxes(this.engine)) {
      if (sb.labels[DockerLabels.sandbox] === undefined) continue;
      for (const m of await listJson<Membership>(this.engine.store, keys.membersOf(sb.id))) {
        if (!nets.has(m.networkId)) nets.set(m.networkId, await getJson<Network>(this.engine.store, keys.network(m.networkId)));
        const net = nets.get(m.networkId);
        const bridge = net ? drivers[net.driver].firewall(net)?.bridge : undefined;
        if (!net || !bridge || !redirectsDns(net)) continue;
        const ep = await getJson<Endpoint>(this.engine.store, keys.endpoint(m.networkId, m.endpointId));
        if (ep?.state !== "ready") continue;
        out.push(...DnsRedirect.for(net, [ep.ipv4 ?? "", ep.ipv6 ?? ""].filter(Boolean)));
      }
    }
    return out.sort((a, b) => `${a.bridge} ${a.source}`.localeCompare(`${b.bridge} ${b.source}`));
  }

  /**
   * Add redirects at once, without reading the store (Join knows its endpoint's before the
   * endpoint is ready). A full {@link sync} afterwards keeps the table exact.
   */
  add(redirects: readonly Redirect[]): Promise<void> {
    if (redirects.length === 0) return Promise.resolve();
    const next = this.running
      .catch(() => undefined)
      .then(async () => {
        if (!this.made) await this.make();
        const lines = redirects.map((r) => `add element inet ${DNS_TABLE} dns${r.source.includes(":") ? 6 : 4} { ${quote(r.bridge)} . ${r.source} : ${r.target} }`);
        await nftApply(`${lines.join("\n")}\n`);
        this.applied = undefined; // the table is no longer what the last sync wrote
      });
    this.running = next;
    return next;
  }

  /** The redirects a network calls for, for these addresses (none when knit serves no DNS there). */
  static for(net: Network, addresses: readonly string[]): Redirect[] {
    const bridge = drivers[net.driver].firewall(net)?.bridge;
    if (!bridge || !redirectsDns(net)) return [];
    const gws = servesOverlayDns(net) ? [OVERLAY_DNS_ADDRESS] : net.subnets.flatMap((s) => (s.gateway ? [s.gateway] : []));
    return addresses.flatMap((a) => {
      const source = a.split("/")[0] ?? "";
      const target = gws.find((g) => g.includes(":") === source.includes(":"));
      return source && target ? [{ bridge, source, target }] : [];
    });
  }

  /** Bring the table in step with the store; waiting callers share one rebuild. */
  sync(): Promise<void> {
    if (this.pending) return this.pending;
    const next = this.running
      .catch(() => undefined)
      .then(async () => {
        this.pending = undefined;
        this.started++;
        const script = dnsElementsScript(await this.wanted());
        if (script === this.applied) return;
        if (!this.made) await this.make();
        try {
          await nftApply(script);
        } catch {
          // The table went (someone flushed the ruleset): make it again, once.
          await this.make();
          await nftApply(script);
        }
        this.applied = script;
      });
    this.pending = next;
    this.running = next;
    return next;
  }

  private async make(): Promise<void> {
    await nftApply(dnsTableScript());
    this.made = true;
  }

  /** Delete the table (the agent stops; the next agent makes it again). */
  async remove(): Promise<void> {
    await this.running.catch(() => undefined);
    await nftApply(`table inet ${DNS_TABLE}\ndelete table inet ${DNS_TABLE}\n`);
    this.made = false;
    this.applied = undefined;
  }
}
