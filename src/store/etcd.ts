/**
 * EtcdStore: the cluster Store, on an etcd v3 cluster (etcd 3.4+), through the `etcd3` npm
 * client's raw gRPC services.
 *
 * Design note. The Store interface is etcd's own model, so most calls map one to one: get and
 * list are Range, put and delete are Put and DeleteRange, txn is Txn, leases are leases,
 * revisions are etcd's header revisions, lease ids are etcd's (decimal) lease ids. What is
 * built here, and why:
 * - Every knit key lives under a root prefix (default `/knit/`), so one etcd can hold other
 *   data, or several knit clusters; the Store's keys are the etcd keys without it.
 * - Fail fast. knit's CLI runs once per container: an unreachable etcd must be a clear error
 *   within seconds, never a hang. Each call has one deadline (OPERATION_TIMEOUT_MS) for all
 *   of its attempts; etcd3's own retry and circuit-breaker policies are off, and this file
 *   retries instead, on another endpoint, only where that is safe: reads and idempotent lease
 *   calls on any transient error, writes only when gRPC says nothing was sent (or etcd said
 *   it had no leader). A txn that timed out is never replayed: a claim that was in fact
 *   applied would otherwise report that it lost.
 * - Recover by themselves. Each channel has its own subchannel pool and short reconnect
 *   backoff, so calls work again within a second of etcd coming back.
 * - Watches are one gRPC stream each, on etcd's Watch service directly (not etcd3's
 *   WatchBuilder: it moves its resume point to the header revision of the "created" answer,
 *   so a reconnect during catch-up would skip history, and it drops the compact revision).
 *   The resume point is the revision after the last delivered event, so a reconnect neither
 *   loses nor repeats events; a lost stream is retried for WATCH_GRACE_MS before the watch
 *   reports onError; a compacted start revision ends in onCompacted(current revision).
 */
import { noop } from "cockatiel";
import {
  castGrpcError,
  Etcd3,
  EtcdLeaseInvalidError,
  GRPCDeadlineExceededError,
  GRPCUnavailableError,
  isRecoverableError,
  type ICompare,
  type IDuplexStream,
  type IEvent,
  type IKeyValue,
  type IPutRequest,
  type IRequestOp,
  type IWatchRequest,
  type IWatchResponse,
} from "etcd3";
import { KnitError, invalid, notFound } from "../errors.ts";
import { checkEndpoint } from "./open.ts";
import { DEFAULT_ETCD_PREFIX, isLeaseId, prefixEnd } from "./etcd-http.ts";
import type { Compare, CompareOp, KeyValue, ListOptions, ListResult, Op, Store, TxnResult, Watch, WatchEvent, WatchHandlers } from "./store.ts";
import { checkLimit } from "./store.ts";
import { ResumingWatch } from "./etcd-watch.ts";

export { DEFAULT_ETCD_PREFIX };
/** Deadline of one store call, all retries included. */
const OPERATION_TIMEOUT_MS = 2000;
/** How long a watch keeps reconnecting before it reports onError. */
const WATCH_GRACE_MS = 5000;
/** Pause between attempts of one call (doubles up to RETRY_MAX_MS). */
const RETRY_FIRST_MS = 25;
const RETRY_MAX_MS = 250;

/** How to reach the cluster. */
export interface EtcdStoreOptions {
  /** Client endpoints, `host:port` (IPv6 as `[addr]:port`); `http://` is accepted and dropped. */
  readonly endpoints: readonly string[];
  /** Root prefix of knit's keys (default {@link DEFAULT_ETCD_PREFIX}). */
  readonly prefix?: string;
  /** Deadline of one call, retries included (default 2000 ms). */
  readonly timeoutMs?: number;
  /** How long a watch may stay disconnected before onError (default 5000 ms). */
  readonly watchGraceMs?: number;
}

/** Which failures a call may retry: any transient one, or only those where nothing was sent. */
type Retry = "idempotent" | "unsent";
type CallOptions = { deadline: Date };
type WatchStream = IDuplexStream<IWatchRequest, IWatchResponse>;

/** The cluster store. Open it with {@link openEtcdStore}. */
export class EtcdStore implements Store {
  /** `etcd:<endpoints>` (plus the prefix when it is not the default). */
  readonly describe: string;
  private readonly root: Buffer;
  private readonly watches = new Set<EtcdWatch>();
  private closed = false;

  /** Wraps a client; use {@link openEtcdStore} instead. */
  constructor(
    private readonly client: Etcd3,
    private readonly endpoints: readonly string[],
    prefix: string,
    private readonly timeoutMs: number,
    /** @internal How long a watch may stay disconnected. */
    readonly watchGraceMs: number,
  ) {
    this.root = Buffer.from(prefix);
    this.describe = `etcd:${endpoints.join(",")}${prefix === DEFAULT_ETCD_PREFIX ? "" : ` (prefix ${prefix})`}`;
  }

  async get(key: string): Promise<KeyValue | undefined> {
    const res = await this.call(`get ${key}`, "idempotent", (options) => this.client.kv.range({ key: this.key(key) }, options));
    const kv = res.kvs[0];
    return kv === undefined ? undefined : this.toKeyValue(kv);
  }

  async list(prefix: string, opts: ListOptions = {}): Promise<ListResult> {
    const limit = checkLimit(opts.limit);
    const request = limit === undefined ? this.range(prefix) : { ...this.range(prefix), limit };
    const res = await this.call(`list ${prefix}`, "idempotent", (options) => this.client.kv.range(request, options));
    const items = res.kvs.map((kv) => this.toKeyValue(kv));
    const revision = Number(res.header.revision);
    return limit === undefined ? { items, revision } : { items, revision, more: res.more };
  }

  async txn(compares: readonly Compare[], success: readonly Op[], failure: readonly Op[] = []): Promise<TxnResult> {
    const request = {
      compare: compares.map((compare) => this.compare(compare)),
      success: success.map((op) => this.requestOp(op)),
      failure: failure.map((op) => this.requestOp(op)),
    };
    const res = await this.call("txn", "unsent", (options) => this.client.kv.txn(request, options), leaseError(...success, ...failure));
    return { succeeded: res.succeeded, revision: Number(res.header.revision) };
  }

  async put(key: string, value: string, lease?: string): Promise<number> {
    const op: Op = lease === undefined ? { type: "put", key, value } : { type: "put", key, value, lease };
    const request = this.putRequest(op);
    const res = await this.call(`put ${key}`, "unsent", (options) => this.client.kv.put(request, options), leaseError(op));
    return Number(res.header.revision);
  }

  async delete(key: string): Promise<boolean> {
    const res = await this.call(`delete ${key}`, "unsent", (options) => this.client.kv.deleteRange({ key: this.key(key) }, options));
    return res.deleted !== "0";
  }

  /**
   * One gRPC stream per watch, reconnecting (to any endpoint) for up to `watchGraceMs`.
   * Without an onCompacted handler, compaction is reported through onError. Handlers must
   * not throw.
   */
  watch(prefix: string, fromRevision: number, handlers: WatchHandlers): Watch {
    this.ensureOpen();
    const watch = new EtcdWatch(this, this.range(prefix), prefix, fromRevision, handlers);
    this.watches.add(watch);
    watch.connect();
    return watch;
  }

  /** etcd raises TTLs below its minimum (about 2 s with default timing) to that minimum. */
  async grantLease(ttlSeconds: number): Promise<string> {
    if (!Number.isInteger(ttlSeconds) || ttlSeconds < 1) {
      throw invalid(`lease TTL must be a whole number of seconds >= 1, got ${ttlSeconds}`);
    }
    const res = await this.call("grant a lease", "unsent", (options) => this.client.leaseClient.leaseGrant({ TTL: ttlSeconds, ID: 0 }, options));
    if (res.error) throw new KnitError("store", `${this.describe}: cannot grant a lease: ${res.error}`);
    return res.ID;
  }

  /** One LeaseKeepAlive exchange; false when the lease expired, was revoked or never existed. */
  async keepAlive(lease: string): Promise<boolean> {
    if (!isLeaseId(lease)) return false;
    return this.call(`keep lease ${lease} alive`, "idempotent", async (options) => {
      const stream = await this.client.leaseClient.leaseKeepAlive(options);
      try {
        return await new Promise<boolean>((resolve, reject) => {
          stream.on("data", (res) => resolve(Number(res.TTL) > 0));
          stream.on("error", (err) => reject(castGrpcError(err)));
          stream.on("end", () => reject(new GRPCUnavailableError("keepalive stream ended")));
          stream.write({ ID: lease });
        });
      } finally {
        endStream(stream);
      }
    });
  }

  /** Revoking an unknown or already expired lease is a no-op. */
  async revokeLease(lease: string): Promise<void> {
    if (!isLeaseId(lease)) return;
    try {
      await this.call(`revoke lease ${lease}`, "idempotent", (options) => this.client.leaseClient.leaseRevoke({ ID: lease }, options));
    } catch (err) {
      if (!(err instanceof KnitError && err.cause instanceof EtcdLeaseInvalidError)) throw err;
    }
  }

  /** Compacting to a revision at or below the current compaction is a no-op. */
  async compact(revision: number): Promise<void> {
    try {
      await this.call(`compact to revision ${revision}`, "idempotent", (options) => this.client.kv.compact({ revision, physical: false }, options));
    } catch (err) {
      const message = err instanceof KnitError && err.cause instanceof Error ? err.cause.message : "";
      if (/required revision has been compacted/.test(message)) return;
      if (/required revision is a future revision/.test(message)) {
        throw invalid(`cannot compact to revision ${revision}: the store is not there yet (${this.describe})`);
      }
      throw err;
    }
  }

  /** Stops every watch and releases every connection; later calls fail with a "store" error. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const watch of [...this.watches]) watch.close();
    this.client.close();
  }

  /** @internal The store's current revision. */
  async currentRevision(): Promise<number> {
    const res = await this.call("read the revision", "idempotent", (options) =>
      this.client.kv.range({ key: this.root, count_only: true }, options),
    );
    return Number(res.header.revision);
  }

  /** @internal Opens a raw Watch stream (no retry: the watch retries itself). */
  async openWatchStream(): Promise<WatchStream> {
    this.ensureOpen();
    return this.client.watchClient.watch();
  }

  /** @internal Forgets a closed watch. */
  dropWatch(watch: ResumingWatch): void {
    if (watch instanceof EtcdWatch) this.watches.delete(watch);
  }

  /** @internal */
  isClosed(): boolean {
    return this.closed;
  }

  /** @internal Store key of an etcd key (the root prefix removed). */
  storeKey(key: Buffer): string {
    return key.subarray(this.root.length).toString("utf8");
  }

  /** @internal A failure as the KnitError callers see. */
  storeError(what: string, err: unknown): KnitError {
    if (err instanceof KnitError) return err;
    if (this.closed) return new KnitError("store", `${this.describe} is closed`, { cause: err });
    const detail = grpcDetail(err);
    if (isUnreachable(err)) {
      return new KnitError("store", `cannot reach the cluster store at ${this.endpoints.join(", ")}: ${detail} (${what})`, {
        cause: err,
        hint: `check that etcd is running and that ${this.endpoints.join(", ")} can be reached from this host`,
      });
    }
    return new KnitError("store", `${this.describe}: ${what}: ${detail}`, { cause: err });
  }

  /**
   * Runs `fn` until it succeeds, fails for good, or the call's deadline passes; every attempt
   * gets the same absolute deadline. `onError` may turn a failure into a specific error.
   */
  private async call<T>(what: string, retry: Retry, fn: (options: CallOptions) => Promise<T>, onError?: (err: unknown) => KnitError | undefined): Promise<T> {
    this.ensureOpen();
    const deadline = Date.now() + this.timeoutMs;
    for (let pause = RETRY_FIRST_MS; ; pause = Math.min(pause * 2, RETRY_MAX_MS)) {
      try {
        return await fn({ deadline: new Date(deadline) });
      } catch (err) {
        const again = !this.closed && (retry === "idempotent" ? isRecoverableError(asError(err)) : notSent(err));
        if (!again || Date.now() + pause >= deadline) throw onError?.(err) ?? this.storeError(what, err);
        await Bun.sleep(pause);
      }
    }
  }

  private ensureOpen(): void {
    if (this.closed) throw new KnitError("store", `${this.describe} is closed`);
  }

  private key(key: string): Buffer {
    return Buffer.concat([this.root, Buffer.from(key)]);
  }

  /** The etcd key range of the keys starting with `prefix`. */
  private range(prefix: string): { key: Buffer; range_end: Buffer } {
    const key = this.key(prefix);
    return { key: key.length === 0 ? Buffer.from([0]) : key, range_end: prefixEnd(key) };
  }

  private compare(compare: Compare): ICompare {
    const key = this.key(compare.key);
    const result = COMPARE_RESULT[compare.op];
    if (compare.target === "version") return { key, target: "Version", result, version: compare.value };
    if (compare.target === "modRevision") return { key, target: "Mod", result, mod_revision: compare.value };
    return { key, target: "Value", result, value: Buffer.from(compare.value) };
  }

  private requestOp(op: Op): IRequestOp {
    if (op.type === "put") return { request_put: this.putRequest(op) };
    if (op.type === "delete") return { request_delete_range: { key: this.key(op.key) } };
    return { request_delete_range: this.range(op.prefix) };
  }

  private putRequest(op: Extract<Op, { type: "put" }>): IPutRequest {
    const request = { key: this.key(op.key), value: Buffer.from(op.value) };
    if (op.lease === undefined) return request;
    if (!isLeaseId(op.lease)) throw notFound(`lease ${op.lease} not found`, "lease ids are what grantLease returned");
    return { ...request, lease: op.lease };
  }

  private toKeyValue(kv: IKeyValue): KeyValue {
    const out = {
      key: this.storeKey(kv.key),
      value: kv.value.toString("utf8"),
      version: Number(kv.version),
      createRevision: Number(kv.create_revision),
      modRevision: Number(kv.mod_revision),
    };
    return kv.lease === "0" || kv.lease === "" ? out : { ...out, lease: kv.lease };
  }
}

/**
 * One watch: a Watch stream with one watcher on it, recreated after a failure from the
 * revision after the last delivered event.
 */
class EtcdWatch extends ResumingWatch {
  private stream: WatchStream | undefined;

  constructor(
    private readonly store: EtcdStore,
    private readonly range: { key: Buffer; range_end: Buffer },
    prefix: string,
    fromRevision: number,
    handlers: WatchHandlers,
  ) {
    super(store, prefix, fromRevision, handlers);
  }

  protected stopStream(): void {
    if (this.stream) endStream(this.stream);
    this.stream = undefined;
  }

  /** Opens a stream and asks for the watcher; failures go to {@link EtcdWatch.lost}. */
  connect(): void {
    this.store.openWatchStream().then(
      (stream) => {
        if (this.closed) return endStream(stream);
        this.stream = stream;
        stream.on("data", (res) => this.receive(stream, res));
        stream.on("error", (err) => this.lost(stream, castGrpcError(err)));
        stream.on("end", () => this.lost(stream, new GRPCUnavailableError("watch stream ended")));
        stream.write({ create_request: { ...this.range, start_revision: this.next } });
      },
      (err: unknown) => this.lost(undefined, err),
    );
  }

  private receive(stream: WatchStream, res: IWatchResponse): void {
    if (this.closed || stream !== this.stream) return;
    if (res.compact_revision !== "0") return this.compacted(Number(res.compact_revision));
    if (res.canceled) return this.lost(stream, new Error(`watch canceled by etcd: ${res.cancel_reason || "no reason given"}`));
    if (res.created) this.created(Number(res.header.revision));
    this.deliver(res.events.map((event) => this.toWatchEvent(event)));
  }

  /** The stream failed (events of a stream already replaced are ignored). */
  private lost(stream: WatchStream | undefined, err: unknown): void {
    if (this.closed || stream !== this.stream) return;
    this.retryOrGiveUp(err);
  }

  private toWatchEvent(event: IEvent): WatchEvent {
    const base = { key: this.store.storeKey(event.kv.key), modRevision: Number(event.kv.mod_revision) };
    return event.type === "Put" ? { type: "put", ...base, value: event.kv.value.toString("utf8") } : { type: "delete", ...base };
  }
}

/**
 * Connects to etcd. Nothing is sent yet: the first call reports an unreachable cluster
 * (within the call deadline).
 */
export async function openEtcdStore(options: EtcdStoreOptions): Promise<EtcdStore> {
  const endpoints = options.endpoints.map((endpoint) => endpoint.replace(/^http:\/\//, "").replace(/\/+$/, ""));
  if (endpoints.length === 0) throw invalid("the etcd store needs at least one endpoint (host:port)");
  for (const endpoint of endpoints) checkEndpoint(endpoint);
  const prefix = options.prefix ?? DEFAULT_ETCD_PREFIX;
  if (prefix === "") throw invalid("the etcd key prefix must not be empty", `use ${DEFAULT_ETCD_PREFIX}`);
  const client = new Etcd3({
    hosts: endpoints.map((endpoint) => `http://${endpoint}`),
    // Retries are this file's business (see the design note): no hidden retries or breakers.
    faultHandling: { global: noop, host: () => noop },
    grpcOptions: {
      // A private subchannel per channel and a short reconnect backoff: a channel made after
      // etcd came back connects at once, not after a backoff shared with failed channels.
      "grpc.use_local_subchannel_pool": 1,
      "grpc.initial_reconnect_backoff_ms": 100,
      "grpc.min_reconnect_backoff_ms": 100,
      "grpc.max_reconnect_backoff_ms": 1000,
      // Lists of many keys may exceed gRPC's default 4 MiB.
      "grpc.max_receive_message_length": 256 * 1024 * 1024,
      // Find dead connections (a host that vanished) under long-lived watch streams; etcd
      // accepts pings every 5 s or slower.
      "grpc.keepalive_time_ms": 10_000,
      "grpc.keepalive_timeout_ms": 5_000,
    },
  });
  return new EtcdStore(client, endpoints, prefix, options.timeoutMs ?? OPERATION_TIMEOUT_MS, options.watchGraceMs ?? WATCH_GRACE_MS);
}

const COMPARE_RESULT: Record<CompareOp, "Equal" | "NotEqual" | "Less" | "Greater"> = {
  "=": "Equal",
  "!=": "NotEqual",
  "<": "Less",
  ">": "Greater",
};

/** Maps "lease not found" on a put to a not-found error naming the lease. */
function leaseError(...ops: readonly Op[]): (err: unknown) => KnitError | undefined {
  return (err) => {
    if (!(err instanceof EtcdLeaseInvalidError)) return undefined;
    const leases = [...new Set(ops.flatMap((op) => (op.type === "put" && op.lease !== undefined ? [op.lease] : [])))];
    return notFound(`lease ${leases.join(", ") || "?"} not found`, "it expired or was revoked: grant a new lease");
  };
}

/** Half-closes then cancels a stream; the cancel is no failure (no reset of the endpoint). */
function endStream(stream: { end(): void; cancel(): void }): void {
  stream.end();
  stream.cancel();
}

const asError = (err: unknown): Error => (err instanceof Error ? err : new Error(String(err)));

/** True when a failed write surely never reached etcd's state machine, so it can be resent. */
function notSent(err: unknown): boolean {
  return err instanceof GRPCUnavailableError && /No connection established|no leader|leader changed|not capable/i.test(err.message);
}

/** True when the failure means the cluster could not be reached (in time). */
function isUnreachable(err: unknown): boolean {
  return err instanceof GRPCUnavailableError || err instanceof GRPCDeadlineExceededError;
}

/** A gRPC error message without its status prefix and resolver notes. */
function grpcDetail(err: unknown): string {
  const message = err instanceof Error ? err.message : String(err);
  return message
    .replace(/^\w*Error: /, "")
    .replace(/^\d+ [A-Z_]+: /, "")
    .replace(/\s*Resolution note:.*$/s, "")
    .trim();
}
