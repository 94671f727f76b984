/**
 * The host registry: which hosts are in the cluster, where their underlay is, and whether
 * they are alive.
 *
 * Design note. Each agent registers its host as `hosts/<name>` = {@link HostRecord}, put with
 * a lease of its own (TTL default 10 s) that it keeps alive every TTL/3. "Alive" is simply
 * "the key exists": when an agent dies (or loses the store for longer than the TTL), etcd
 * deletes the key at the lease's expiry, every other agent's watch sees the delete, and they
 * drop the host from their data path and DNS and free its addresses (src/cluster/reap.ts).
 * A restarted agent grants a new lease and puts the key again; the put moves the key to the
 * new lease, so the old lease's expiry later deletes nothing. A graceful stop keeps the key
 * until the TTL runs out: an agent restarted for an upgrade within the TTL disturbs nobody.
 * A host removed with `knit host rm -f` while registered finds an `evicted/<name>` key when it
 * next renews: it stops renewing instead of registering again (src/cluster/remove.ts).
 */
import { KnitError, invalid } from "../errors.ts";
import { getLink, listAddrs, listRoutes } from "../kernel/ip.ts";
import { getJson, type Store } from "../store/store.ts";
import { keys, type HostRecord } from "../model.ts";
import { hostName } from "../engine/owner.ts";
import type { Engine } from "../engine/engine.ts";
import type { Underlay } from "../drivers/overlay.ts";

/** Default lease TTL of a host registration, in seconds. */
export const DEFAULT_LEASE_TTL = 10;

/** The underlay of a registered host. */
export const underlayOf = (h: HostRecord): Underlay => ({ address: h.address, device: h.device, mtu: h.mtu });

/** The registration of this host, when its agent holds one. */
export const localHost = (store: Store): Promise<HostRecord | undefined> => getJson<HostRecord>(store, keys.host(hostName()));

/**
 * The registration of this host, or a clear error: overlay networks need this host's agent
 * to run against the cluster store (it knows the underlay and keeps the peers programmed).
 */
export async function requireLocalHost(engine: Engine): Promise<HostRecord> {
  const h = await localHost(engine.store);
  if (h) return h;
  throw new KnitError("conflict", `host ${hostName()} is not registered in the cluster (${engine.store.describe}): overlay networks need its knit agent`, {
    hint: `start it: knit agent --store etcd://HOST:PORT --name ${hostName()} --advertise-address UNDERLAY_IP (and use the same --store / KNIT_STORE and --host / KNIT_HOST here)`,
  });
}

/** Every registered (alive) host, by name. */
export async function liveHosts(store: Store): Promise<Map<string, HostRecord>> {
  const out = new Map<string, HostRecord>();
  for (const kv of (await store.list(keys.hosts())).items) {
    try {
      const h = JSON.parse(kv.value) as HostRecord;
      out.set(kv.key.slice(keys.hosts().length), h);
    } catch {
      // a value that is not a host record: not a live host
    }
  }
  return out;
}

/** How the agent was told to find its underlay. */
export interface UnderlaySpec {
  /** `--advertise-address IP`: the address peers send VXLAN traffic to. */
  address?: string;
  /** `--underlay IFACE`: the device whose first IPv4 address is advertised. */
  device?: string;
}

/**
 * Find the underlay: the device holding `--advertise-address`, the first IPv4 address of
 * `--underlay`, or else the device and address of the default route.
 */
export async function detectUnderlay(spec: UnderlaySpec): Promise<Underlay> {
  const addrs = await listAddrs();
  let device: string | undefined;
  let address: string | undefined;
  if (spec.address !== undefined) {
    address = spec.address;
    device = addrs.find((a) => a.addr_info.some((i) => i.local === spec.address))?.ifname;
    if (!device) throw invalid(`--advertise-address ${spec.address} is no address of this host`, "give an IPv4 address of the interface on the hosts' LAN");
    if (spec.device !== undefined && spec.device !== device) throw invalid(`--advertise-address ${spec.address} is on ${device}, not on --underlay ${spec.device}`);
  } else {
    device = spec.device ?? (await listRoutes()).find((r) => r.dst === "default" && r.dev)?.dev;
    if (!device) throw invalid("cannot find the underlay: this host has no default route", "give --advertise-address IP or --underlay IFACE");
    address = addrs.find((a) => a.ifname === device)?.addr_info.find((i) => i.family === "inet" && i.scope === "global")?.local;
    if (!address) throw invalid(`the underlay device ${device} has no IPv4 address`, "give --advertise-address IP");
  }
  if (address.includes(":")) throw invalid(`--advertise-address ${address}: the underlay must be IPv4`, "VXLAN tunnels run between IPv4 addresses");
  const link = await getLink(device);
  if (!link) throw invalid(`underlay device ${device} does not exist`);
  return { address, device, mtu: link.mtu };
}

/** What the registration reports in `knit agent status`. */
export interface RegistrationStatus {
  record: HostRecord;
  lease: string | undefined;
  /** False while the store cannot be reached or the lease was lost and not yet renewed. */
  registered: boolean;
  renewals: number;
  reRegistrations: number;
  lastError?: string;
  /** Set when `knit host rm -f` removed this host: who and when (the eviction mark). */
  evicted?: string;
}

/**
 * Keeps `hosts/<name>` alive: grant, put, keep alive every TTL/3; when the lease is found
 * expired (the store was unreachable for longer than the TTL), register again with a new
 * lease. Store errors never stop it: it tries again at the next tick.
 */
export class HostRegistration {
  private lease: string | undefined;
  private timer: ReturnType<typeof setTimeout> | undefined;
  private stopped = false;
  private registered = false;
  private renewals = 0;
  private reRegistrations = 0;
  private lastError: string | undefined;
  private evicted: string | undefined;

  constructor(
    private readonly store: Store,
    readonly record: HostRecord,
    private readonly onChange: (event: "registered" | "lost" | "evicted" | "error", err?: unknown) => void,
  ) {}

  /** Register now (throws when the store cannot be reached), then keep it alive. */
  async start(): Promise<void> {
    await this.register();
    this.schedule();
  }

  /** Stop renewing. The key stays until its lease expires (see the file comment). */
  stop(): void {
    this.stopped = true;
    clearTimeout(this.timer);
  }

  /** What `knit agent status` shows under cluster.host. */
  status(): RegistrationStatus {
    return {
      record: this.record,
      lease: this.lease,
      registered: this.registered,
      renewals: this.renewals,
      reRegistrations: this.reRegistrations,
      ...(this.lastError === undefined ? {} : { lastError: this.lastError }),
      ...(this.evicted === undefined ? {} : { evicted: this.evicted }),
    };
  }

  private async register(): Promise<void> {
    const lease = await this.store.grantLease(this.record.ttl);
    await this.store.put(keys.host(this.record.name), JSON.stringify(this.record), lease);
    this.lease = lease;
    this.registered = true;
    this.lastError = undefined;
    this.onChange("registered");
  }

  private schedule(): void {
    if (this.stopped) return;
    const every = Math.max(300, (this.record.ttl * 1000) / 3);
    this.timer = setTimeout(() => {
      void this.tick().finally(() => this.schedule());
    }, every);
  }

  /**
   * True when `knit host rm -f` removed this host: then it stays out (no more renewals) until
   * its agent is started again.
   */
  private async wasEvicted(): Promise<boolean> {
    const mark = await this.store.get(keys.evicted(this.record.name));
    if (!mark) return false;
    this.stop();
    this.registered = false;
    this.evicted = mark.value;
    this.onChange("evicted");
    return true;
  }

  private async tick(): Promise<void> {
    try {
      const alive = this.lease !== undefined && (await this.store.keepAlive(this.lease));
      if (alive) {
        this.renewals++;
        // The key may have been deleted by hand while the lease lived on.
        if (!this.registered || !(await this.store.get(keys.host(this.record.name)))) {
          if (!(await this.wasEvicted())) await this.register();
        }
        return;
      }
      const was = this.registered;
      this.registered = false;
      if (await this.wasEvicted()) return;
      if (was) this.onChange("lost");
      this.reRegistrations++;
      await this.register();
    } catch (err) {
      this.lastError = err instanceof Error ? err.message : String(err);
      this.onChange("error", err);
    }
  }
}
