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
 * One table of its own, `inet knit_docker`: a fixed rule per family that looks the packet's
 * (input bridge, source address) up in a map whose value is the DNS address. The table is made
 * once; after every Join and DeleteEndpoint only the maps' elements are replaced, in one `nft`
 * transaction (a few milliseconds: no hook is registered again). The agent deletes the table
 * when it stops. knit's own sandboxes are never matched (they ask the gateway directly).
 */
import { nftApply } from "../kernel/nft.ts";
import { getJson, listJson } from "../store/store.ts";
import { DockerLabels, keys, type Endpoint, type Membership, type Network } from "../model.ts";
import { drivers } from "../drivers/registry.ts";
import { listSandboxes, type Engine } from "../engine/engine.ts";
import { servesDns } from "../dns/resolvconf.ts";

export const DNS_TABLE = "knit_docker";

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
        if (!net || !bridge || !servesDns(net)) continue;
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
    if (!bridge || !servesDns(net)) return [];
    const gws = net.subnets.flatMap((s) => (s.gateway ? [s.gateway] : []));
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
