/**
 * The overlay control plane of one host: the agent keeps this host's overlay data path
 * equal to what the store says, from etcd watches.
 *
 * Design note. Level-triggered, not edge-triggered. The agent mirrors three prefixes of the
 * store (networks/, endpoints/, hosts/: list, then watch from the list's revision; list again
 * after a compaction or a broken watch). A change marks the overlay networks it touches
 * "dirty"; a single worker then brings each dirty network to its plan (src/cluster/peers.ts):
 * devices made or deleted, and the vxlan device's FDB and neighbour tables compared with the
 * kernel's own listing (two netlink dumps in the agent's process, the entries `bridge -j fdb
 * show` and `ip -j neigh show` list) and fixed both ways with one batch per table. Comparing
 * with the kernel each time (two dumps, no process) instead of with
 * a memory of what was programmed is what makes the result exact whoever else touched the
 * tables: the CLI adds the peers it knows when it makes a network's devices (so a new host
 * talks at once), and a restarted agent finds whatever its predecessor left. Changes that
 * arrive while the worker runs coalesce into its next round, so a burst of 30 connects costs
 * a few rounds, not 30.
 *
 * On start, after every re-list, and every `resyncMs`, a full round also deletes overlay
 * devices and interfaces whose records are gone (a network removed while the agent was down,
 * endpoints of this host freed by the others while it was cut off: see reap.ts), frees the
 * endpoints of hosts whose lease expired, and takes docker_gwbridge away from sandboxes that
 * no longer have an overlay network.
 *
 * Devices of a network whose last local endpoint left are deleted after `idleGraceMs`, once
 * a fresh read of the store confirms it: a connect racing the removal keeps them.
 *
 * Overlay networks are part of every host's firewall table (isolation, internal rules, the
 * DNS guard of internal ones): when one appears, changes state or goes, the table of this
 * host is rebuilt from the store, so a network removed on another host leaves no rules here.
 */
import { getJson, listJson, type Store, type Watch, type WatchEvent } from "../store/store.ts";
import { keys, type Endpoint, type HostRecord, type Network, type Sandbox } from "../model.ts";
import { deleteLink, listLinks } from "../kernel/ip.ts";
import { hostVethName } from "../drivers/bridge.ts";
import { deleteOverlayDevices, diffPeers, ensureOverlayDevices, noChanges, overlayState, programPeers, reattachEndpoints, readPeers, type Underlay } from "../drivers/overlay.ts";
import type { Engine } from "../engine/engine.ts";
import type { Logger } from "../agent/log.ts";
import { planNetwork } from "./peers.ts";
import { reapVanishedHosts } from "./reap.ts";
import { isGwBridge, leaveGwBridgeIfUnused } from "./attach.ts";
import { ensureOverlayDnsHost } from "./overlay-dns.ts";
import { syncFirewall } from "../engine/networks.ts";

/** Prefixes the control plane follows. */
const PREFIXES = [keys.networks(), keys.endpoints(), keys.hosts()] as const;

export interface OverlaySyncOptions {
  /** This host's name and underlay. */
  me: string;
  underlay: Underlay;
  log: Logger;
  /** Full rounds at this interval (default 30 s). */
  resyncMs?: number;
  /** Devices without local endpoints are deleted after this (default 1 s). */
  idleGraceMs?: number;
  /** Pause before listing again after an error (default 1 s). */
  retryMs?: number;
  /**
   * Called after the programmed peer addresses of a network changed (see
   * {@link OverlaySync.programmed}), with the addresses that came or went.
   */
  onPeersChanged?: (networkId: string, changed: readonly string[]) => void;
}

/** What `knit agent status` shows about the control plane. */
export interface OverlaySyncStatus {
  revision: number;
  relists: number;
  rounds: number;
  fullRounds: number;
  /** FDB + neighbour entries added and removed so far. */
  programmed: { set: number; removed: number };
  reaped: number;
  errors: number;
  lastError?: string;
  networks: { id: string; name: string; vni: number; local: number; peers: number }[];
  hosts: { name: string; address: string }[];
}

const parse = <T>(value: string | undefined): T | undefined => {
  if (value === undefined) return undefined;
  try {
    return JSON.parse(value) as T;
  } catch {
    return undefined;
  }
};

/** Keeps this host's overlay devices and peers in step with the store (see the file comment). */
export class OverlaySync {
  private readonly networks = new Map<string, Network>();
  /** network id -> endpoint id -> endpoint. */
  private readonly endpoints = new Map<string, Map<string, Endpoint>>();
  private readonly hosts = new Map<string, HostRecord>();
  /** Overlay networks whose devices exist here (as far as this agent knows), with their record. */
  private readonly devices = new Map<string, Network>();
  /** network id -> addresses of the remote endpoints whose entries are in this host's kernel. */
  private readonly peerAddresses = new Map<string, Set<string>>();
  /** Networks whose devices were checked since the last full round. */
  private readonly verified = new Set<string>();
  private readonly dirty = new Set<string>();
  private readonly idleSince = new Map<string, number>();
  private readonly goneLocal: Endpoint[] = [];
  private reapWanted = false;
  private fullWanted = false;
  private firewallWanted = false;
  private worker: Promise<void> | undefined;
  private watch: Watch | undefined;
  private timers = new Set<ReturnType<typeof setTimeout>>();
  private resync: ReturnType<typeof setInterval> | undefined;
  private closed = false;
  private readonly stats = { revision: 0, relists: 0, rounds: 0, fullRounds: 0, set: 0, removed: 0, reaped: 0, errors: 0, lastError: undefined as string | undefined };

  constructor(
    private readonly engine: Engine,
    private readonly opts: OverlaySyncOptions,
  ) {}

  private get store(): Store {
    return this.engine.store;
  }

  /**
   * True when the FDB and neighbour entries of the remote endpoint with `address` on network
   * `networkId` are programmed here (the DNS table answers its name only then).
   */
  programmed(networkId: string, address: string): boolean {
    return this.peerAddresses.get(networkId)?.has(address) ?? false;
  }

  /** Record what the kernel now holds for a network; tell the listener when it changed. */
  private setPeerAddresses(id: string, addresses: Set<string> | undefined): void {
    const before = this.peerAddresses.get(id) ?? new Set<string>();
    const after = addresses ?? new Set<string>();
    const changed = [...[...after].filter((a) => !before.has(a)), ...[...before].filter((a) => !after.has(a))];
    if (addresses === undefined) this.peerAddresses.delete(id);
    else this.peerAddresses.set(id, addresses);
    if (changed.length > 0) this.opts.onPeersChanged?.(id, changed);
  }

  /** List, bring the data path in step (a full round), then follow the store. */
  async start(): Promise<void> {
    await this.relist();
    await this.idle();
    this.resync = setInterval(() => this.requestFull(), this.opts.resyncMs ?? 30_000);
  }

  /** Stop following the store (the data path stays as it is: it is kernel state). */
  close(): void {
    this.closed = true;
    this.watch?.close();
    this.watch = undefined;
    clearInterval(this.resync);
    for (const t of this.timers) clearTimeout(t);
    this.timers.clear();
  }

  /** Resolves when the worker has nothing left to do (tests, start-up). */
  async idle(): Promise<void> {
    while (this.worker) await this.worker;
  }

  /** Ask for a full round (after the store came back, or on a timer). */
  requestFull(): void {
    this.fullWanted = true;
    this.kick();
  }

  /** What `knit agent status` shows under cluster.overlay. */
  status(): OverlaySyncStatus {
    const networks = [...this.networks.values()]
      .filter((n) => n.driver === "overlay")
      .map((n) => {
        const eps = [...(this.endpoints.get(n.id)?.values() ?? [])];
        const plan = planNetwork(n, eps, this.hosts, this.opts.me);
        return { id: n.id, name: n.name, vni: overlayState(n).vni, local: plan?.local.length ?? 0, peers: plan?.peers.length ?? 0 };
      });
    const { revision, relists, rounds, fullRounds, set, removed, reaped, errors, lastError } = this.stats;
    return {
      revision,
      relists,
      rounds,
      fullRounds,
      programmed: { set, removed },
      reaped,
      errors,
      ...(lastError === undefined ? {} : { lastError }),
      networks,
      hosts: [...this.hosts.values()].map((h) => ({ name: h.name, address: h.address })),
    };
  }

  // ---- following the store ----

  private async relist(): Promise<void> {
    this.watch?.close();
    this.watch = undefined;
    if (this.closed) return;
    const lists = [];
    for (const prefix of PREFIXES) lists.push(await this.store.list(prefix));
    if (this.closed) return;
    this.networks.clear();
    this.endpoints.clear();
    this.hosts.clear();
    for (const list of lists) for (const kv of list.items) this.apply(kv.key, kv.value, false);
    this.stats.revision = Math.max(...lists.map((l) => l.revision));
    const from = Math.min(...lists.map((l) => l.revision));
    this.watch = this.store.watch("", from + 1, {
      onEvents: (events) => this.onEvents(events),
      onCompacted: () => this.again(undefined),
      onError: (err) => this.again(err),
    });
    this.requestFull();
  }

  private again(err: unknown): void {
    this.watch = undefined;
    if (this.closed) return;
    this.stats.relists++;
    if (err !== undefined) this.opts.log.warn("overlay: store watch broke; listing again", { err });
    const retry = (): void => {
      this.relist().catch((e: unknown) => this.again(e ?? new Error("list failed")));
    };
    this.later(retry, err === undefined ? 0 : (this.opts.retryMs ?? 1000));
  }

  private later(fn: () => void, ms: number): void {
    const t = setTimeout(() => {
      this.timers.delete(t);
      fn();
    }, ms);
    this.timers.add(t);
  }

  private onEvents(events: readonly WatchEvent[]): void {
    let relevant = false;
    for (const e of events) {
      this.stats.revision = Math.max(this.stats.revision, e.modRevision);
      if (this.apply(e.key, e.type === "put" ? e.value : undefined, true)) relevant = true;
    }
    if (relevant) this.kick();
  }

  /** Apply one key to the mirror and mark what it touches; false for keys of no interest. */
  private apply(key: string, value: string | undefined, live: boolean): boolean {
    if (key.startsWith(keys.networks())) {
      const id = key.slice(keys.networks().length);
      const net = parse<Network>(value);
      const known = this.networks.get(id);
      if (net) this.networks.set(id, net);
      else this.networks.delete(id);
      if ((net ?? known)?.driver === "overlay") {
        this.dirty.add(id);
        // Created, made ready, marked for removal or removed (elsewhere): rules change here too.
        if (live && net?.state !== known?.state) this.firewallWanted = true;
      }
      return true;
    }
    if (key.startsWith(keys.endpoints())) {
      const [netId = "", epId = ""] = key.slice(keys.endpoints().length).split("/");
      const ep = parse<Endpoint>(value);
      let map = this.endpoints.get(netId);
      const before = map?.get(epId);
      if (ep) {
        if (!map) this.endpoints.set(netId, (map = new Map<string, Endpoint>()));
        map.set(epId, ep);
      } else {
        map?.delete(epId);
        if (map?.size === 0) this.endpoints.delete(netId);
        // A local endpoint whose rows went while its interface is still here was freed by the
        // others (this host was cut off for longer than its lease): take the interface away.
        if (live && before?.host === this.opts.me && this.networks.get(netId)?.driver === "overlay") this.goneLocal.push(before);
      }
      if (this.networks.get(netId)?.driver === "overlay") this.dirty.add(netId);
      return true;
    }
    if (key.startsWith(keys.hosts())) {
      const name = key.slice(keys.hosts().length);
      const host = parse<HostRecord>(value);
      if (host) this.hosts.set(name, host);
      else {
        this.hosts.delete(name);
        if (live && name !== this.opts.me) this.reapWanted = true;
      }
      // Every overlay network with an endpoint on that host may change.
      for (const [netId, eps] of this.endpoints) {
        if (this.networks.get(netId)?.driver !== "overlay") continue;
        for (const ep of eps.values()) {
          if (ep.host === name) {
            this.dirty.add(netId);
            break;
          }
        }
      }
      return true;
    }
    return false;
  }

  // ---- the worker ----

  private hasWork(): boolean {
    return this.fullWanted || this.reapWanted || this.firewallWanted || this.dirty.size > 0 || this.goneLocal.length > 0;
  }

  private kick(): void {
    if (this.worker || this.closed) return;
    this.worker = this.drain().finally(() => {
      this.worker = undefined;
      if (this.hasWork()) this.kick();
    });
  }

  private async drain(): Promise<void> {
    while (this.hasWork() && !this.closed) {
      this.stats.rounds++;
      const gone = this.goneLocal.splice(0);
      if (gone.length) await this.guard("remove freed local endpoints", () => this.removeFreedEndpoints(gone));
      if (this.reapWanted || this.fullWanted) {
        this.reapWanted = false;
        await this.guard("free the endpoints of vanished hosts", () => this.reap());
      }
      if (this.fullWanted) {
        this.fullWanted = false;
        this.dirty.clear();
        await this.guard("full round", () => this.fullRound());
        continue;
      }
      const nets = [...this.dirty];
      this.dirty.clear();
      for (const id of nets) await this.guard(`network ${id.slice(0, 12)}`, () => this.reconcileNetwork(id), id);
      if (this.firewallWanted) {
        this.firewallWanted = false;
        await this.guard("firewall", () =>
          syncFirewall(this.engine).catch((err: unknown) => {
            this.later(() => {
              this.firewallWanted = true;
              this.kick();
            }, 1000);
            throw err;
          }),
        );
      }
    }
  }

  /** Run a step; on failure log it and retry the network (or a full round) a second later. */
  private async guard(what: string, step: () => Promise<void>, netId?: string): Promise<void> {
    try {
      await step();
    } catch (err) {
      this.stats.errors++;
      this.stats.lastError = `${what}: ${err instanceof Error ? err.message : String(err)}`;
      this.opts.log.warn(`overlay: ${what} failed; trying again`, { err });
      if (netId) this.verified.delete(netId);
      this.later(() => {
        if (netId) this.dirty.add(netId);
        else this.fullWanted = true;
        this.kick();
      }, 1000);
    }
  }

  /** Bring one network's devices and peers on this host to its plan. */
  private async reconcileNetwork(id: string): Promise<void> {
    const net = this.networks.get(id);
    const eps = [...(this.endpoints.get(id)?.values() ?? [])];
    const plan = net ? planNetwork(net, eps, this.hosts, this.opts.me) : undefined;
    if (!plan) {
      await this.retire(id, net);
      return;
    }
    this.idleSince.delete(id);
    if (!this.verified.has(id)) {
      // Made again under endpoints that exist (their removal raced a connect): take them back.
      if (await ensureOverlayDevices(plan.network, this.opts.underlay)) await reattachEndpoints(plan.network, plan.local.map((ep) => ep.id));
      // An internal network's bridge carries the DNS address (src/cluster/overlay-dns.ts).
      await ensureOverlayDnsHost(plan.network);
      this.verified.add(id);
    }
    this.devices.set(id, plan.network);
    const changes = diffPeers(plan.peers, readPeers(plan.network));
    const addresses = new Set(plan.peers.flatMap((p) => p.ips));
    if (noChanges(changes)) {
      this.setPeerAddresses(id, addresses);
      return;
    }
    await programPeers(plan.network, changes);
    this.setPeerAddresses(id, addresses);
    this.stats.set += changes.set.length;
    this.stats.removed += changes.removeFdb.length + changes.removeNeigh.length + changes.removeBridged.length;
    this.opts.log.debug("overlay: peers programmed", {
      network: plan.network.name,
      set: changes.set.length,
      removedFdb: changes.removeFdb.length,
      removedNeigh: changes.removeNeigh.length,
      removedBridged: changes.removeBridged.length,
    });
  }

  /** A network this host needs no devices for: delete them (at once when the network is gone). */
  private async retire(id: string, net: Network | undefined): Promise<void> {
    const known = this.devices.get(id);
    if (!known) return;
    if (net && net.state !== "deleting") {
      // Still exists: wait for the grace period, then ask the store itself (not the mirror).
      const since = this.idleSince.get(id);
      const grace = this.opts.idleGraceMs ?? 1000;
      if (since === undefined || Date.now() - since < grace) {
        if (since === undefined) this.idleSince.set(id, Date.now());
        this.later(() => {
          this.dirty.add(id);
          this.kick();
        }, grace + 10);
        return;
      }
      const fresh = await listJson<Endpoint>(this.store, keys.endpointsOf(id));
      if (fresh.some((ep) => ep.host === this.opts.me)) {
        this.idleSince.delete(id);
        return;
      }
    }
    await deleteOverlayDevices(known);
    this.setPeerAddresses(id, undefined);
    this.devices.delete(id);
    this.verified.delete(id);
    this.idleSince.delete(id);
    this.opts.log.info("overlay: devices removed", { network: known.name, reason: net ? "no endpoint on this host" : "network removed" });
  }

  /** Full round: find devices in the kernel, reconcile every network, drop orphans. */
  private async fullRound(): Promise<void> {
    this.stats.fullRounds++;
    this.verified.clear();
    const links = await listLinks();
    const overlayBridges = new Map<string, string>();
    for (const link of links) {
      const id = link.ifalias?.startsWith("knit:") ? link.ifalias.slice(5) : undefined;
      if (!id || link.linkinfo?.info_kind !== "vxlan") continue;
      const net = this.networks.get(id);
      if (net?.driver === "overlay") this.devices.set(id, net);
      else if (!net) {
        // A network removed while this agent was away: its devices go (bridge: same alias).
        await deleteLink(link.ifname);
        for (const br of links) if (br.ifalias === link.ifalias && br.linkinfo?.info_kind === "bridge") await deleteLink(br.ifname);
        this.opts.log.info("overlay: orphan devices removed", { vxlan: link.ifname });
      }
    }
    const ids = new Set([...this.devices.keys(), ...[...this.networks.values()].filter((n) => n.driver === "overlay").map((n) => n.id)]);
    for (const id of ids) await this.guard(`network ${id.slice(0, 12)}`, () => this.reconcileNetwork(id), id);
    for (const net of this.devices.values()) overlayBridges.set(overlayState(net).bridge, net.id);
    // Interfaces in an overlay bridge whose endpoint is gone from the store (freed by others).
    for (const link of links) {
      const netId = link.master ? overlayBridges.get(link.master) : undefined;
      const epId = link.ifalias?.startsWith("knit:") ? link.ifalias.slice(5) : undefined;
      if (!netId || !epId || link.linkinfo?.info_kind !== "veth" || this.endpoints.get(netId)?.has(epId)) continue;
      // The mirror may lag behind a connect under way: ask the store itself.
      if (await this.store.get(keys.endpoint(netId, epId))) continue;
      await deleteLink(link.ifname);
      this.opts.log.info("overlay: interface of a freed endpoint removed", { link: link.ifname });
    }
    await this.dropUnneededGateways();
  }

  /** Free the endpoints of hosts whose registration is gone. */
  private async reap(): Promise<void> {
    const reaped = await reapVanishedHosts(this.store, new Set(this.hosts.keys()), this.opts.me);
    if (reaped.length === 0) return;
    this.stats.reaped += reaped.length;
    const hosts = [...new Set(reaped.map((ep) => ep.host ?? "?"))];
    this.opts.log.info("overlay: freed the endpoints of vanished hosts", { hosts, endpoints: reaped.length });
  }

  /** Local endpoints whose rows were removed by others: delete their interfaces. */
  private async removeFreedEndpoints(gone: readonly Endpoint[]): Promise<void> {
    let any = false;
    for (const ep of gone) {
      // A disconnect deletes the interface before the rows: only a freed endpoint still has one.
      if (!(await deleteLink(hostVethName(ep.id)))) continue;
      any = true;
      this.opts.log.info("overlay: interface of a freed endpoint removed", { endpoint: ep.id.slice(0, 12), network: ep.networkId.slice(0, 12) });
    }
    if (any) await this.dropUnneededGateways();
  }

  /** Sandboxes of this host on docker_gwbridge without an overlay network that needs it leave it. */
  private async dropUnneededGateways(): Promise<void> {
    const gateways = new Set([...this.networks.values()].filter((n) => n.host === this.opts.me && isGwBridge(n)).map((n) => n.id));
    if (gateways.size === 0) return;
    for (const id of gateways) {
      for (const ep of this.endpoints.get(id)?.values() ?? []) {
        if (ep.state !== "ready") continue;
        const sb = await getJson<Sandbox>(this.store, keys.sandbox(ep.sandboxId));
        if (sb) await leaveGwBridgeIfUnused(this.engine, sb);
      }
    }
  }
}
