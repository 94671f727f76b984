/**
 * `knit agent`: the long-running process of a host. It serves DNS to the sandboxes of
 * user-defined networks and, on a cluster store, keeps the host in the cluster and its
 * overlay data path in step (src/cluster); with `--docker-plugin` it is Docker's network and
 * IPAM driver (src/plugin).
 *
 * Start-up, in this order:
 *   1. claim the host in the store (one agent per host; a dead holder is taken over);
 *   2. cluster mode: register the host under its lease (hosts/<name>, src/cluster/hosts.ts);
 *   3. load the name table (list) and follow the store (watch), see src/dns/mirror.ts;
 *   4. cluster mode: bring the overlay devices and peers in step, then follow the store
 *      (src/cluster/sync.ts);
 *   5. listen on every served network's gateway, port 53, UDP and TCP: names resolve now;
 *   6. open the status socket (`knit agent status`);
 *   7. reconcile store and kernel (`knit gc`), as after a crash or a reboot;
 *   7b. with --docker-plugin: serve Docker's NetworkDriver/IpamDriver socket (src/plugin);
 *   7c. take CNI invocations that plugin processes hand over (src/agent/cni-server.ts);
 *   8. write agent.pid: from now on `knit run` finds it without asking, and CNI plugins
 *      hand their invocations to it.
 * DNS comes before reconcile so that a restarted agent answers within a second of its
 * start; agent.pid comes last so that whoever started it (auto-start) waits until the
 * repairs are done and cannot race them.
 *
 * Nothing the agent holds is needed to keep traffic flowing: links, addresses and firewall
 * rules are kernel state. Killing it (even with -9) stops name resolution until it is
 * started again, and loses nothing: the store is the truth, the agent only mirrors it. CNI
 * invocations it was running when killed end as error 11 for their runtimes, and what they
 * left half made is undone like a killed plugin's (the runtime's DEL, GC, reconcile).
 *
 * An agent started on demand (mode "auto") stops itself once no sandbox has needed it for
 * its linger (KNIT_AGENT_LINGER, default 30 s; watchIdle). With no linger it stops after a
 * CNI DEL it ran left no sandbox that needs it, as `stopIdleAgent` stops it after other
 * commands.
 */
import { type Engine } from "../engine/engine.ts";
import { currentOwner } from "../engine/owner.ts";
import { reconcile, type ReconcileReport } from "../engine/reconcile.ts";
import { openStore } from "../store/open.ts";
import type { Store } from "../store/store.ts";
import { DockerLabels, OVERLAY_DNS_ADDRESS, type AgentClaim, type HostRecord } from "../model.ts";
import { hostName } from "../engine/owner.ts";
import { HostRegistration, detectUnderlay, type RegistrationStatus, type UnderlaySpec } from "../cluster/hosts.ts";
import { OverlaySync, type OverlaySyncStatus } from "../cluster/sync.ts";
import { clearEviction } from "../cluster/remove.ts";
import { ensureOverlayDnsRule, removeOverlayDnsRule } from "../cluster/overlay-dns.ts";
import { DockerPlugin, type DockerPluginOptions, type DockerPluginStatus } from "../plugin/plugin.ts";
import { NameTable, type Client } from "../dns/table.ts";
import { StoreMirror } from "../dns/mirror.ts";
import { Forwarder } from "../dns/forwarder.ts";
import { Resolver } from "../dns/resolver.ts";
import { DnsServer } from "../dns/server.ts";
import { hostUpstreams } from "../dns/resolvconf.ts";
import { claimAgent, releaseAgent } from "./claim.ts";
import { agentPaths, removeAgentRecord, writeAgentRecord } from "./pidfile.ts";
import { serveStatus } from "./status.ts";
import { jsonLogger, type LogLevel, type Logger } from "./log.ts";
import { CniServer } from "./cni-server.ts";
import { DEFAULT_LINGER_S, agentLingerMs, agentNeeded, startAgent } from "./autostart.ts";
import { hasDefaultRoute, setLinkDeletionAside } from "../kernel/ip.ts";

/** How `knit agent` was asked to run. */
export interface AgentOptions {
  stateDir: string;
  /** "auto" when started on demand (stopped again when idle), else "service". */
  mode: AgentClaim["mode"];
  /** How long each upstream DNS server gets to answer, in milliseconds. */
  dnsTimeoutMs: number;
  logLevel: LogLevel;
  /** Port the DNS server listens on (53). */
  dnsPort?: number;
  /** Store spec (`--store`, KNIT_STORE); undefined: SQLite in the state directory. */
  store?: string;
  /** Cluster mode: register the host and keep its overlay data path (src/cluster). */
  cluster?: { underlay: UnderlaySpec; leaseTtl: number };
  /** Serve Docker's remote network and IPAM driver protocols (`--docker-plugin`, src/plugin). */
  dockerPlugin?: DockerPluginOptions;
}

/** Default time an upstream gets: three of them still answer within glibc's 5 s timeout. */
export const DEFAULT_DNS_TIMEOUT_MS = 1500;
/** How often addresses that could not be bound are tried again. */
const REBIND_MS = 500;

/** Run the agent until SIGTERM or SIGINT; returns the process exit code. */
export async function runAgent(opts: AgentOptions): Promise<number> {
  const log = jsonLogger(opts.logLevel);
  let requestStop: (reason: string) => void = () => undefined;
  const stopSignal = new Promise<string>((resolve) => {
    requestStop = resolve;
    for (const sig of ["SIGTERM", "SIGINT"] as const) process.on(sig, () => resolve(sig));
  });
  let store: Store;
  try {
    // The agent runs for days on watch streams and its lease: the gRPC client, whose load
    // time it pays once (the CLI uses etcd's JSON gateway instead; src/store/open.ts).
    store = await openStore(opts.store, opts.stateDir, { etcdClient: "grpc" });
  } catch (err) {
    log.error("cannot open the store", { err, stateDir: opts.stateDir, store: opts.store });
    return 1;
  }
  const me: AgentClaim = { ...currentOwner(), mode: opts.mode };
  try {
    const claim = await claimAgent(store, me);
    if (!claim.ok) {
      log.info("another agent already serves this host", { pid: claim.holder.pid, mode: claim.holder.mode });
      await store.close();
      return opts.mode === "auto" ? 0 : 1;
    }
  } catch (err) {
    log.error("cannot claim the host", { err });
    await store.close();
    return 1;
  }
  const agent = new Agent({ store, stateDir: opts.stateDir }, me, opts, log, requestStop);
  try {
    await agent.start();
  } catch (err) {
    log.error("start failed", { err });
    await agent.stop();
    return 1;
  }
  const signal = await stopSignal;
  log.info("stopping", { signal });
  await agent.stop(signal === "idle");
  log.info("stopped");
  return 0;
}

/** The health `knit agent status` prints. */
export interface AgentHealth {
  status: "starting" | "ok" | "degraded";
  pid: number;
  mode: AgentClaim["mode"];
  started: string;
  uptimeSeconds: number;
  store: { describe: string; revision: number; relists: number };
  reconcile: { state: "pending" | "done" | "failed"; report?: ReconcileReport; error?: string };
  /** Cluster mode only: the host's registration and the overlay control plane. */
  cluster?: { host: RegistrationStatus; overlay: OverlaySyncStatus };
  /** With --docker-plugin: its socket and the calls dockerd made. */
  docker?: DockerPluginStatus;
  /** CNI invocations plugin processes handed over: the socket, how many ran, failed, were declined, run now. */
  cni: { socket: string; ran: number; failed: number; declined: number; inFlight: number };
  dns: {
    networks: { id: string; name: string; addresses: readonly string[]; internal: boolean }[];
    listeners: ReturnType<DnsServer["status"]>;
    names: number;
    hostUpstreams: readonly string[];
    timeoutMs: number;
    queries: Resolver["stats"];
    upstream: Forwarder["stats"] & { inFlight: number };
  };
}

class Agent {
  private readonly table = new NameTable();
  private readonly forwarder: Forwarder;
  private readonly resolver: Resolver;
  private readonly server: DnsServer;
  private readonly mirror: StoreMirror;
  private readonly started = new Date();
  private readonly paths: ReturnType<typeof agentPaths>;
  private status: { stop(): Promise<void> } | undefined;
  private rebind: ReturnType<typeof setTimeout> | undefined;
  private reconciled: AgentHealth["reconcile"] = { state: "pending" };
  private ready = false;
  private listening: Promise<void> = Promise.resolve();
  private stopping = false;
  private registration: HostRegistration | undefined;
  private overlay: OverlaySync | undefined;
  private plugin: DockerPlugin | undefined;
  private readonly cni: CniServer;
  /** An idle check under way (an auto-started agent after a CNI DEL). */
  private idleCheck: Promise<void> | undefined;
  /** An auto-started agent's linger (KNIT_AGENT_LINGER); 0 for a service, or no linger. */
  private readonly lingerMs: number;
  private idleTimer: ReturnType<typeof setInterval> | undefined;
  /** Since when no sandbox has needed this agent (a lingering one's clock). */
  private idleSince: number | undefined;
  /** Cluster mode: whether the reply rule of the internal overlays' DNS address is in place (undefined: not known yet). */
  private overlayDnsRule: boolean | undefined;

  constructor(
    private readonly engine: Engine,
    private readonly me: AgentClaim,
    private readonly opts: AgentOptions,
    private readonly log: Logger,
    private readonly requestStop: (reason: string) => void,
  ) {
    this.paths = agentPaths(engine.stateDir);
    let linger = 0;
    if (me.mode === "auto") {
      try {
        linger = agentLingerMs();
      } catch (err) {
        log.warn(`${err instanceof Error ? err.message : String(err)}: lingering ${DEFAULT_LINGER_S} s`);
        linger = DEFAULT_LINGER_S * 1000;
      }
    }
    this.lingerMs = linger;
    this.cni = new CniServer({ stateDir: engine.stateDir, socket: this.paths.cniSocket, log, onDel: () => this.checkIdle() });
    this.forwarder = new Forwarder({ timeoutMs: opts.dnsTimeoutMs });
    this.resolver = new Resolver(this.table, this.forwarder, hostUpstreams, (client) => this.dockerWayOut(client));
    this.server = new DnsServer(this.resolver, {
      ...(opts.dnsPort === undefined ? {} : { port: opts.dnsPort }),
      onError: (what, err, fields) => log.warn(`dns: ${what}`, { ...fields, err }),
    });
    this.mirror = new StoreMirror(engine.store, this.table, {
      onChange: () => void this.listen(),
      onError: (err) => log.warn("store watch broke; listing again", { err }),
    });
  }

  /** Recent answers of {@link dockerWayOut}, by sandbox id. */
  private readonly wayOuts = new Map<string, { at: number; value: Promise<boolean> }>();

  /**
   * Whether a Docker container whose knit networks are all --internal has a way out all the
   * same (a default route: a network of Docker's own driver, joined after the internal one).
   * Its queries reach knit's DNS through the internal network's routes (src/plugin/
   * dns-redirect.ts); then names knit does not know are forwarded for it, as Docker would.
   * Read from the container's namespace, and kept 2 s.
   */
  private dockerWayOut(client: Client): boolean | Promise<boolean> {
    const sb = client.sandboxId === undefined ? undefined : this.table.sandbox(client.sandboxId);
    if (!sb || sb.labels[DockerLabels.sandbox] === undefined) return false;
    const now = Date.now();
    const hit = this.wayOuts.get(sb.id);
    if (hit && now - hit.at < 2000) return hit.value;
    if (this.wayOuts.size > 1000) for (const [id, w] of this.wayOuts) if (now - w.at >= 2000) this.wayOuts.delete(id);
    const value = hasDefaultRoute(sb.netnsPath);
    this.wayOuts.set(sb.id, { at: now, value });
    return value;
  }

  async start(): Promise<void> {
    this.log.info("starting", { pid: this.me.pid, mode: this.me.mode, store: this.engine.store.describe, host: hostName() });
    // Many callers share this event loop (DNS, CNI invocations): a link deletion's RCU wait
    // must not hold it (src/kernel/ip.ts).
    setLinkDeletionAside(true);
    if (this.opts.cluster) await this.joinCluster(this.opts.cluster);
    await this.mirror.start();
    if (this.overlay) await this.overlay.start();
    await this.listen();
    this.status = serveStatus(this.paths.socket, () => this.health());
    try {
      const report = await reconcile(this.engine);
      this.reconciled = { state: "done", report };
      this.log.info("reconciled", { ...report });
    } catch (err) {
      this.reconciled = { state: "failed", error: err instanceof Error ? err.message : String(err) };
      this.log.error("reconcile failed", { err });
    }
    if (this.opts.dockerPlugin) {
      this.plugin = new DockerPlugin(this.engine, this.opts.dockerPlugin, this.log);
      await this.plugin.start();
    }
    this.cni.start();
    writeAgentRecord(this.engine.stateDir, {
      ...this.me,
      socket: this.paths.socket,
      cniSocket: this.paths.cniSocket,
      started: this.started.toISOString(),
      ...(this.lingerMs > 0 ? { lingerMs: this.lingerMs } : {}),
    });
    if (this.lingerMs > 0) this.watchIdle();
    this.ready = true;
    this.log.info("ready", { networks: this.table.servedNetworks().length, names: this.table.size, revision: this.mirror.revision });
  }

  /** Register this host under its lease, and prepare the overlay control plane. */
  private async joinCluster(cluster: NonNullable<AgentOptions["cluster"]>): Promise<void> {
    const underlay = await detectUnderlay(cluster.underlay);
    const record: HostRecord = { name: hostName(), ...underlay, pid: this.me.pid, started: this.started.toISOString(), ttl: cluster.leaseTtl };
    this.registration = new HostRegistration(this.engine.store, record, (event, err) => {
      if (event === "registered") this.log.info("host registered", { host: record.name, address: record.address, device: record.device, mtu: record.mtu, ttl: record.ttl });
      else if (event === "lost") this.log.warn("host lease expired; registering again", { host: record.name });
      else if (event === "evicted") {
        this.log.error("this host was removed from the cluster (knit host rm -f): no longer registering, removing what the store no longer has here; restart the agent to join again", { host: record.name });
        // As after a restart: the sandboxes, links and rules the removal freed in the store go
        // from the kernel too (a force-removed node stops its containers, as with Docker).
        void this.reconcileNow("after the eviction");
      }
      else this.log.warn("cannot renew the host lease", { err });
      // Back after a loss: whatever changed meanwhile is found by a full round.
      if (event === "registered") this.overlay?.requestFull();
    });
    // Starting is joining: a removal by `knit host rm -f` (src/cluster/remove.ts) is over.
    if (await clearEviction(this.engine.store, record.name)) this.log.info("this host had been removed from the cluster; joining again", { host: record.name });
    await this.registration.start();
    this.overlay = new OverlaySync(this.engine, {
      me: record.name,
      underlay,
      log: this.log,
      // A remote overlay name answers once its peer entries are in this host's kernel.
      onPeersChanged: (networkId, changed) => {
        this.table.peersChanged(networkId, changed);
        this.table.refresh();
      },
    });
    const overlay = this.overlay;
    this.table.setPeerGate((networkId, address) => overlay.programmed(networkId, address));
  }

  /**
   * Stop serving; `idle`: an auto-started agent that found itself not needed, which starts a
   * successor when a sandbox came to need one while it stopped (as stopIdleAgent does).
   */
  /** Reconcile store and kernel now (`knit gc`), logging the report. */
  private async reconcileNow(why: string): Promise<void> {
    try {
      const report = await reconcile(this.engine);
      this.log.info(`reconciled ${why}`, { ...report });
    } catch (err) {
      this.log.error(`reconcile ${why} failed`, { err });
    }
  }

  async stop(idle = false): Promise<void> {
    if (this.stopping) return;
    this.stopping = true;
    clearTimeout(this.rebind);
    clearInterval(this.idleTimer);
    // First: plugin processes run their invocations themselves from now on.
    await this.cni.stop();
    await this.plugin?.stop();
    this.registration?.stop();
    this.overlay?.close();
    this.mirror.close();
    await this.server.close();
    if (this.opts.cluster && this.overlayDnsRule !== false) await removeOverlayDnsRule().catch((err: unknown) => this.log.warn("cannot remove the DNS reply rule", { err }));
    this.forwarder.close();
    await this.status?.stop().catch(() => undefined);
    removeAgentRecord(this.engine.stateDir, this.me.pid);
    await releaseAgent(this.engine.store, this.me).catch((err: unknown) => this.log.warn("cannot release the claim", { err }));
    if (idle && (await agentNeeded(this.engine).catch(() => false))) {
      this.log.info("a sandbox came to need an agent while this one stopped: starting another");
      await startAgent(this.engine.stateDir, "auto").catch((err: unknown) => this.log.warn("cannot start another agent", { err }));
    }
    await this.engine.store.close();
  }

  /**
   * A lingering auto-started agent looks, a few times per linger (every 0.25 to 5 s), whether
   * a sandbox still needs it, and stops once none has for the whole linger; commands leave it
   * to do so (stopIdleAgent). A CNI invocation under way counts as a need.
   */
  private watchIdle(): void {
    const every = Math.min(5000, Math.max(250, this.lingerMs / 4));
    this.idleTimer = setInterval(() => {
      if (this.stopping || this.idleCheck) return;
      this.idleCheck = (async () => {
        try {
          const needed = this.cni.inFlight > 0 || (await agentNeeded(this.engine)) || this.cni.inFlight > 0;
          if (needed || this.stopping) {
            this.idleSince = undefined;
            return;
          }
          const now = Date.now();
          this.idleSince ??= now;
          if (now - this.idleSince < this.lingerMs) return;
          this.log.info("no sandbox has needed the agent for its linger", { lingerMs: this.lingerMs });
          this.requestStop("idle");
        } catch (err) {
          this.log.warn("cannot tell whether the agent is still needed", { err });
        } finally {
          this.idleCheck = undefined;
        }
      })();
    }, every);
  }

  /**
   * After a CNI DEL this agent ran: an auto-started agent that no sandbox needs any more
   * stops (what stopIdleAgent does after a plugin process's DEL), unless it lingers (then
   * {@link watchIdle} stops it). Not while other CNI invocations are under way: one of them
   * may be an ADD that needs it.
   */
  private checkIdle(): void {
    if (this.me.mode !== "auto" || this.lingerMs > 0 || this.stopping || this.idleCheck) return;
    this.idleCheck = (async () => {
      try {
        if (this.cni.inFlight > 0 || (await agentNeeded(this.engine)) || this.cni.inFlight > 0 || this.stopping) return;
        this.log.info("no sandbox needs the agent any more");
        this.requestStop("idle");
      } catch (err) {
        this.log.warn("cannot tell whether the agent is still needed", { err });
      } finally {
        this.idleCheck = undefined;
      }
    })();
  }

  /** Listen on exactly the served networks' gateways; retry what cannot be bound yet. */
  private listen(): Promise<void> {
    this.listening = this.listening.then(() => this.listenOnce());
    return this.listening;
  }

  private async listenOnce(): Promise<void> {
    if (this.stopping) return;
    const wanted = new Map<string, string>();
    for (const net of this.table.servedNetworks()) for (const a of net.addresses) wanted.set(a, net.id);
    const before = new Set(this.server.status().filter((l) => l.udp && l.tcp).map((l) => l.address));
    const ruled = await this.syncOverlayDnsRule(wanted.has(OVERLAY_DNS_ADDRESS));
    await this.server.sync(wanted);
    const after = this.server.status();
    for (const l of after) if (l.udp && l.tcp && !before.has(l.address)) this.log.info("dns listening", { address: l.address, network: l.network });
    for (const a of before) if (!wanted.has(a)) this.log.info("dns stopped listening", { address: a });
    clearTimeout(this.rebind);
    if ((this.server.incomplete || !ruled) && !this.stopping) this.rebind = setTimeout(() => void this.listen(), REBIND_MS);
  }

  /**
   * Cluster mode: the policy rule that routes replies of the internal overlays' DNS address
   * (src/cluster/overlay-dns.ts) is there exactly while that address is served. The first
   * call also removes one a killed predecessor left. False when it could not be changed.
   */
  private async syncOverlayDnsRule(wanted: boolean): Promise<boolean> {
    if (!this.opts.cluster || this.overlayDnsRule === wanted) return true;
    try {
      if (wanted) await ensureOverlayDnsRule();
      else await removeOverlayDnsRule();
      this.overlayDnsRule = wanted;
      return true;
    } catch (err) {
      this.log.warn("cannot set the DNS reply rule of internal overlay networks", { err, wanted });
      return false;
    }
  }

  private health(): AgentHealth {
    const listeners = this.server.status();
    const bound = listeners.every((l) => l.udp && l.tcp);
    return {
      status: !this.ready ? "starting" : bound && this.reconciled.state === "done" && (this.registration?.status().registered ?? true) ? "ok" : "degraded",
      pid: this.me.pid,
      mode: this.me.mode,
      started: this.started.toISOString(),
      uptimeSeconds: Math.round((Date.now() - this.started.getTime()) / 100) / 10,
      store: { describe: this.engine.store.describe, revision: this.mirror.revision, relists: this.mirror.relists },
      reconcile: this.reconciled,
      ...(this.plugin ? { docker: this.plugin.status() } : {}),
      cni: { socket: this.paths.cniSocket, ...this.cni.stats, inFlight: this.cni.inFlight },
      ...(this.registration && this.overlay ? { cluster: { host: this.registration.status(), overlay: this.overlay.status() } } : {}),
      dns: {
        networks: this.table.servedNetworks().map((n) => ({ id: n.id, name: n.name, addresses: n.addresses, internal: n.internal })),
        listeners,
        names: this.table.size,
        hostUpstreams: hostUpstreams(),
        timeoutMs: this.opts.dnsTimeoutMs,
        queries: { ...this.resolver.stats },
        upstream: { ...this.forwarder.stats, inFlight: this.forwarder.inFlight },
      },
    };
  }
}
