/**
 * EtcdHttpStore: the cluster Store through etcd's own JSON API (the gRPC gateway that every
 * etcd 3.4+ member serves on its client URL: `POST /v3/kv/range`, `/v3/kv/txn`, `/v3/watch`,
 * `/v3/lease/grant` ...), with nothing but `fetch`.
 *
 * Why a second client next to EtcdStore (src/store/etcd.ts, the `etcd3` npm package over
 * gRPC): knit's CLI and CNI plugin start once per container, and loading etcd3 with grpc-js
 * and its protobuf definitions costs 150 to 350 ms of every such start under Bun (measured:
 * the "open" phase of `KNIT_TRACE=1 knit run` on a cluster, 150 ms idle and 350 ms loaded),
 * while a call costs the same through either (about 1.1 to 1.6 ms for a read or a claim in
 * the lab). That start is most of the time from `knit run` on one host to the first ping by
 * name from another. So short-lived processes use this client; the agent, which runs for
 * days and holds watch streams and its lease, keeps the gRPC client. Both pass the same
 * conformance suite and the same outage tests (test/store-etcd.test.ts).
 *
 * Semantics are EtcdStore's (see its design note): keys under a root prefix; one deadline per
 * call for all of its attempts; reads and idempotent lease calls retried on any transient
 * failure, on the next endpoint; writes retried only when nothing can have reached etcd (the
 * connection was refused, or etcd said it had no leader); a txn that timed out is never
 * replayed. A watch is one streaming POST; it resumes from the revision after the last
 * delivered event on another endpoint for up to `watchGraceMs`, and a compacted start
 * revision ends in onCompacted(current revision).
 *
 * JSON shapes are protobuf's JSON mapping: bytes in base64, int64 as decimal strings, fields
 * at their default value (false, 0, empty) left out.
 */
import { KnitError, invalid, notFound } from "../errors.ts";
import { checkEndpoint } from "./open.ts";
import type { Compare, CompareOp, KeyValue, ListOptions, ListResult, Op, Store, TxnResult, Watch, WatchEvent, WatchHandlers } from "./store.ts";
import { checkLimit } from "./store.ts";
import { ResumingWatch } from "./etcd-watch.ts";

/** Root prefix of knit's keys in etcd, unless configured (the same as EtcdStore's). */
export const DEFAULT_ETCD_PREFIX = "/knit/";
const OPERATION_TIMEOUT_MS = 2000;
const WATCH_GRACE_MS = 5000;
const RETRY_FIRST_MS = 25;
const RETRY_MAX_MS = 250;

/** gRPC status codes that etcd's gateway puts in its error bodies. */
const GRPC = { deadlineExceeded: 4, notFound: 5, outOfRange: 11, unavailable: 14 } as const;

export interface EtcdHttpStoreOptions {
  /** Client endpoints, `host:port` (IPv6 as `[addr]:port`); `http://` is accepted and dropped. */
  readonly endpoints: readonly string[];
  /** Root prefix of knit's keys (default {@link DEFAULT_ETCD_PREFIX}). */
  readonly prefix?: string;
  /** Deadline of one call, retries included (default 2000 ms). */
  readonly timeoutMs?: number;
  /** How long a watch may stay disconnected before onError (default 5000 ms). */
  readonly watchGraceMs?: number;
}

type Retry = "idempotent" | "unsent";

/** What etcd's gateway answers with a non-200 status. */
class GatewayError extends Error {
  constructor(
    readonly status: number,
    readonly code: number,
    message: string,
  ) {
    super(message);
  }
}

/** The request never got an answer: refused, reset, or cut by the deadline. */
class TransportError extends Error {
  constructor(
    message: string,
    /** True when the connection was refused: nothing was sent. */
    readonly refused: boolean,
  ) {
    super(message);
  }
}

interface RawKv {
  key: string;
  value?: string;
  version?: string;
  create_revision?: string;
  mod_revision?: string;
  lease?: string;
}
interface Header {
  revision?: string;
}
interface RawEvent {
  type?: "PUT" | "DELETE";
  kv: RawKv;
}
interface WatchResult {
  header?: Header;
  created?: boolean;
  canceled?: boolean;
  cancel_reason?: string;
  compact_revision?: string;
  events?: RawEvent[];
}

const b64 = (bytes: Uint8Array): string => Buffer.from(bytes).toString("base64");

export class EtcdHttpStore implements Store {
  readonly describe: string;
  private readonly root: Buffer;
  private readonly watches = new Set<HttpWatch>();
  private readonly aborts = new Set<AbortController>();
  private closed = false;
  /** Index of the endpoint tried first; moves on after a failure. */
  private preferred = 0;

  constructor(
    private readonly endpoints: readonly string[],
    prefix: string,
    private readonly timeoutMs: number,
    /** @internal */
    readonly watchGraceMs: number,
  ) {
    this.root = Buffer.from(prefix);
    this.describe = `etcd:${endpoints.join(",")}${prefix === DEFAULT_ETCD_PREFIX ? "" : ` (prefix ${prefix})`}`;
  }

  async get(key: string): Promise<KeyValue | undefined> {
    const res = await this.call<{ kvs?: RawKv[] }>(`get ${key}`, "idempotent", "/v3/kv/range", { key: this.key(key) });
    const kv = res.kvs?.[0];
    return kv === undefined ? undefined : this.toKeyValue(kv);
  }

  async list(prefix: string, opts: ListOptions = {}): Promise<ListResult> {
    const limit = checkLimit(opts.limit);
    const body = limit === undefined ? this.range(prefix) : { ...this.range(prefix), limit };
    const res = await this.call<{ kvs?: RawKv[]; header?: Header; more?: boolean }>(`list ${prefix}`, "idempotent", "/v3/kv/range", body);
    const items = (res.kvs ?? []).map((kv) => this.toKeyValue(kv));
    const revision = Number(res.header?.revision ?? 0);
    return limit === undefined ? { items, revision } : { items, revision, more: res.more === true };
  }

  async txn(compares: readonly Compare[], success: readonly Op[], failure: readonly Op[] = []): Promise<TxnResult> {
    const body = {
      compare: compares.map((c) => this.compare(c)),
      success: success.map((op) => this.requestOp(op)),
      failure: failure.map((op) => this.requestOp(op)),
    };
    const res = await this.call<{ succeeded?: boolean; header?: Header }>("txn", "unsent", "/v3/kv/txn", body, leaseError(...success, ...failure));
    return { succeeded: res.succeeded === true, revision: Number(res.header?.revision ?? 0) };
  }

  async put(key: string, value: string, lease?: string): Promise<number> {
    const op: Op = lease === undefined ? { type: "put", key, value } : { type: "put", key, value, lease };
    const res = await this.call<{ header?: Header }>(`put ${key}`, "unsent", "/v3/kv/put", this.putRequest(op), leaseError(op));
    return Number(res.header?.revision ?? 0);
  }

  async delete(key: string): Promise<boolean> {
    const res = await this.call<{ deleted?: string }>(`delete ${key}`, "unsent", "/v3/kv/deleterange", { key: this.key(key) });
    return (res.deleted ?? "0") !== "0";
  }

  watch(prefix: string, fromRevision: number, handlers: WatchHandlers): Watch {
    this.ensureOpen();
    const watch = new HttpWatch(this, this.range(prefix), prefix, fromRevision, handlers);
    this.watches.add(watch);
    watch.connect();
    return watch;
  }

  async grantLease(ttlSeconds: number): Promise<string> {
    if (!Number.isInteger(ttlSeconds) || ttlSeconds < 1) throw invalid(`lease TTL must be a whole number of seconds >= 1, got ${ttlSeconds}`);
    const res = await this.call<{ ID?: string; error?: string }>("grant a lease", "unsent", "/v3/lease/grant", { TTL: String(ttlSeconds) });
    if (res.error || !res.ID) throw new KnitError("store", `${this.describe}: cannot grant a lease: ${res.error ?? "no lease id in the answer"}`);
    return res.ID;
  }

  async keepAlive(lease: string): Promise<boolean> {
    if (!isLeaseId(lease)) return false;
    // A one-message stream: one answer, as a `{"result": ...}` line.
    const res = await this.call<{ result?: { TTL?: string } }>(`keep lease ${lease} alive`, "idempotent", "/v3/lease/keepalive", { ID: lease });
    return Number(res.result?.TTL ?? 0) > 0;
  }

  async revokeLease(lease: string): Promise<void> {
    if (!isLeaseId(lease)) return;
    try {
      await this.call(`revoke lease ${lease}`, "idempotent", "/v3/lease/revoke", { ID: lease });
    } catch (err) {
      if (!(err instanceof KnitError && err.cause instanceof GatewayError && err.cause.code === GRPC.notFound)) throw err;
    }
  }

  async compact(revision: number): Promise<void> {
    try {
      await this.call(`compact to revision ${revision}`, "idempotent", "/v3/kv/compaction", { revision: String(revision) });
    } catch (err) {
      const message = err instanceof KnitError && err.cause instanceof Error ? err.cause.message : "";
      if (/required revision has been compacted/.test(message)) return;
      if (/required revision is a future revision/.test(message)) throw invalid(`cannot compact to revision ${revision}: the store is not there yet (${this.describe})`);
      throw err;
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const watch of [...this.watches]) watch.close();
    for (const abort of this.aborts) abort.abort();
    this.aborts.clear();
  }

  /** @internal The store's current revision. */
  async currentRevision(): Promise<number> {
    const res = await this.call<{ header?: Header }>("read the revision", "idempotent", "/v3/kv/range", { key: b64(this.root), count_only: true });
    return Number(res.header?.revision ?? 0);
  }

  /** @internal The endpoint to try now (rotates after failures). */
  endpoint(): string {
    return this.endpoints[this.preferred % this.endpoints.length] ?? "";
  }

  /** @internal The last endpoint failed: the next call starts with the next one. */
  failedOver(): void {
    this.preferred = (this.preferred + 1) % this.endpoints.length;
  }

  /** @internal Forgets a closed watch. */
  dropWatch(watch: ResumingWatch): void {
    if (watch instanceof HttpWatch) this.watches.delete(watch);
  }

  /** @internal */
  isClosed(): boolean {
    return this.closed;
  }

  /** @internal Store key of an etcd key in base64 (the root prefix removed). */
  storeKey(key: string): string {
    return Buffer.from(key, "base64").subarray(this.root.length).toString("utf8");
  }

  /** @internal A failure as the KnitError callers see. */
  storeError(what: string, err: unknown): KnitError {
    if (err instanceof KnitError) return err;
    if (this.closed) return new KnitError("store", `${this.describe} is closed`, { cause: err });
    const detail = (err instanceof Error ? err.message : String(err)).replace(/^etcdserver: /, "");
    if (isUnreachable(err)) {
      return new KnitError("store", `cannot reach the cluster store at ${this.endpoints.join(", ")}: ${detail} (${what})`, {
        cause: err,
        hint: `check that etcd is running and that ${this.endpoints.join(", ")} can be reached from this host`,
      });
    }
    return new KnitError("store", `${this.describe}: ${what}: ${detail}`, { cause: err });
  }

  /** @internal One POST to the current endpoint, answered by parsed JSON, or a thrown error. */
  async post<T>(path: string, body: unknown, deadline: number): Promise<T> {
    const abort = new AbortController();
    this.aborts.add(abort);
    const timer = setTimeout(() => abort.abort(), Math.max(1, deadline - Date.now()));
    const endpoint = this.endpoint();
    try {
      let res: Response;
      try {
        res = await fetch(`http://${endpoint}${path}`, { method: "POST", body: JSON.stringify(body), signal: abort.signal, headers: { "content-type": "application/json" } });
      } catch (err) {
        throw transportError(err, abort.signal.aborted);
      }
      let text: string;
      try {
        text = await res.text();
      } catch (err) {
        throw transportError(err, abort.signal.aborted);
      }
      let parsed: unknown;
      try {
        parsed = JSON.parse(text);
      } catch {
        throw new GatewayError(res.status, 0, `etcd at ${endpoint} answered ${res.status} with no JSON: ${text.slice(0, 200)}`);
      }
      if (!res.ok) {
        const e = parsed as { message?: string; error?: string; code?: number };
        throw new GatewayError(res.status, e.code ?? 0, e.message ?? e.error ?? `HTTP ${res.status}`);
      }
      return parsed as T;
    } finally {
      clearTimeout(timer);
      this.aborts.delete(abort);
    }
  }

  private async call<T>(what: string, retry: Retry, path: string, body: unknown, onError?: (err: unknown) => KnitError | undefined): Promise<T> {
    this.ensureOpen();
    const deadline = Date.now() + this.timeoutMs;
    for (let pause = RETRY_FIRST_MS; ; pause = Math.min(pause * 2, RETRY_MAX_MS)) {
      try {
        return await this.post<T>(path, body, deadline);
      } catch (err) {
        if (isUnreachable(err)) this.failedOver();
        const again = !this.closed && (retry === "idempotent" ? isTransient(err) : notSent(err));
        if (!again || Date.now() + pause >= deadline) throw onError?.(err) ?? this.storeError(what, err);
        await Bun.sleep(pause);
      }
    }
  }

  private ensureOpen(): void {
    if (this.closed) throw new KnitError("store", `${this.describe} is closed`);
  }

  private key(key: string): string {
    return b64(Buffer.concat([this.root, Buffer.from(key)]));
  }

  private range(prefix: string): { key: string; range_end: string } {
    const key = Buffer.concat([this.root, Buffer.from(prefix)]);
    return { key: b64(key.length === 0 ? Buffer.from([0]) : key), range_end: b64(prefixEnd(key)) };
  }

  private compare(c: Compare): Record<string, unknown> {
    const base = { key: this.key(c.key), result: COMPARE_RESULT[c.op] };
    if (c.target === "version") return { ...base, target: "VERSION", version: String(c.value) };
    if (c.target === "modRevision") return { ...base, target: "MOD", mod_revision: String(c.value) };
    return { ...base, target: "VALUE", value: b64(Buffer.from(c.value)) };
  }

  private requestOp(op: Op): Record<string, unknown> {
    if (op.type === "put") return { request_put: this.putRequest(op) };
    if (op.type === "delete") return { request_delete_range: { key: this.key(op.key) } };
    return { request_delete_range: this.range(op.prefix) };
  }

  private putRequest(op: Extract<Op, { type: "put" }>): Record<string, string> {
    const request = { key: this.key(op.key), value: b64(Buffer.from(op.value)) };
    if (op.lease === undefined) return request;
    if (!isLeaseId(op.lease)) throw notFound(`lease ${op.lease} not found`, "lease ids are what grantLease returned");
    return { ...request, lease: op.lease };
  }

  private toKeyValue(kv: RawKv): KeyValue {
    const out = {
      key: this.storeKey(kv.key),
      value: Buffer.from(kv.value ?? "", "base64").toString("utf8"),
      version: Number(kv.version ?? 0),
      createRevision: Number(kv.create_revision ?? 0),
      modRevision: Number(kv.mod_revision ?? 0),
    };
    return kv.lease === undefined || kv.lease === "0" || kv.lease === "" ? out : { ...out, lease: kv.lease };
  }
}

/** One watch: one streaming POST to /v3/watch, made again after a failure from where it was. */
class HttpWatch extends ResumingWatch {
  private abort: AbortController | undefined;
  /** Bumped on every (re)connect: events of an older stream are ignored. */
  private generation = 0;

  constructor(
    private readonly store: EtcdHttpStore,
    private readonly range: { key: string; range_end: string },
    prefix: string,
    fromRevision: number,
    handlers: WatchHandlers,
  ) {
    super(store, prefix, fromRevision, handlers);
  }

  protected stopStream(): void {
    this.abort?.abort();
    this.abort = undefined;
  }

  connect(): void {
    const generation = ++this.generation;
    const abort = new AbortController();
    this.abort = abort;
    void this.stream(generation, abort).catch((err: unknown) => this.lost(generation, err));
  }

  private async stream(generation: number, abort: AbortController): Promise<void> {
    const endpoint = this.store.endpoint();
    // The answer's headers come at once; a dead or unreachable member must not hold the
    // connect for long: the same deadline as a call.
    const connectTimer = setTimeout(() => abort.abort(), OPERATION_TIMEOUT_MS);
    let res: Response;
    try {
      res = await fetch(`http://${endpoint}/v3/watch`, {
        method: "POST",
        body: JSON.stringify({ create_request: { ...this.range, start_revision: String(this.next) } }),
        signal: abort.signal,
        headers: { "content-type": "application/json" },
      });
    } catch (err) {
      throw transportError(err, abort.signal.aborted);
    } finally {
      clearTimeout(connectTimer);
    }
    if (!res.ok || !res.body) throw new GatewayError(res.status, 0, `watch answered HTTP ${res.status}`);
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffered = "";
    for (;;) {
      let chunk: { done: boolean; value?: Uint8Array };
      try {
        chunk = await reader.read();
      } catch (err) {
        throw transportError(err, abort.signal.aborted);
      }
      if (this.closed || generation !== this.generation) {
        await reader.cancel().catch(() => undefined);
        return;
      }
      if (chunk.done) throw new TransportError("watch stream ended", false);
      buffered += decoder.decode(chunk.value, { stream: true });
      for (let nl = buffered.indexOf("\n"); nl >= 0; nl = buffered.indexOf("\n")) {
        const line = buffered.slice(0, nl).trim();
        buffered = buffered.slice(nl + 1);
        if (line === "") continue;
        const msg = JSON.parse(line) as { result?: WatchResult; error?: { message?: string; code?: number } };
        if (msg.error) throw new GatewayError(200, msg.error.code ?? 0, msg.error.message ?? "watch failed");
        if (msg.result && !this.receive(msg.result)) {
          await reader.cancel().catch(() => undefined);
          return;
        }
      }
    }
  }

  /** Handles one answer; false when the watch ended (compacted, or closed by a handler). */
  private receive(res: WatchResult): boolean {
    if (this.closed) return false;
    if (res.compact_revision !== undefined && res.compact_revision !== "0") {
      this.compacted(Number(res.compact_revision));
      return false;
    }
    if (res.canceled) throw new GatewayError(200, 0, `watch canceled by etcd: ${res.cancel_reason ?? "no reason given"}`);
    if (res.created) this.created(Number(res.header?.revision ?? 0));
    this.deliver(
      (res.events ?? []).map((e): WatchEvent => {
        const base = { key: this.store.storeKey(e.kv.key), modRevision: Number(e.kv.mod_revision ?? 0) };
        return e.type === "DELETE" ? { type: "delete", ...base } : { type: "put", ...base, value: Buffer.from(e.kv.value ?? "", "base64").toString("utf8") };
      }),
    );
    return !this.closed;
  }

  /** The stream failed (a stream already replaced is ignored); an unreachable member is left. */
  private lost(generation: number, err: unknown): void {
    if (this.closed || generation !== this.generation) return;
    if (isUnreachable(err)) this.store.failedOver();
    this.retryOrGiveUp(err);
  }
}

/** Opens the store; nothing is sent yet (the first call reports an unreachable cluster). */
export function openEtcdHttpStore(options: EtcdHttpStoreOptions): EtcdHttpStore {
  const endpoints = options.endpoints.map((endpoint) => endpoint.replace(/^http:\/\//, "").replace(/\/+$/, ""));
  if (endpoints.length === 0) throw invalid("the etcd store needs at least one endpoint (host:port)");
  for (const endpoint of endpoints) checkEndpoint(endpoint);
  const prefix = options.prefix ?? DEFAULT_ETCD_PREFIX;
  if (prefix === "") throw invalid("the etcd key prefix must not be empty", `use ${DEFAULT_ETCD_PREFIX}`);
  return new EtcdHttpStore(endpoints, prefix, options.timeoutMs ?? OPERATION_TIMEOUT_MS, options.watchGraceMs ?? WATCH_GRACE_MS);
}

const COMPARE_RESULT: Record<CompareOp, string> = { "=": "EQUAL", "!=": "NOT_EQUAL", "<": "LESS", ">": "GREATER" };

/** A positive int64 in decimal: the form etcd's lease ids take. */
export function isLeaseId(lease: string): boolean {
  return /^[1-9][0-9]{0,18}$/.test(lease) && BigInt(lease) < 2n ** 63n;
}

function leaseError(...ops: readonly Op[]): (err: unknown) => KnitError | undefined {
  return (err) => {
    if (!(err instanceof GatewayError && err.code === GRPC.notFound && /lease not found/.test(err.message))) return undefined;
    const leases = [...new Set(ops.flatMap((op) => (op.type === "put" && op.lease !== undefined ? [op.lease] : [])))];
    return notFound(`lease ${leases.join(", ") || "?"} not found`, "it expired or was revoked: grant a new lease");
  };
}

/** The least key above every key that starts with `prefix`; "\0" (no end) when none. */
export function prefixEnd(prefix: Buffer): Buffer {
  const end = Buffer.from(prefix);
  for (let i = end.length - 1; i >= 0; i--) {
    const byte = end[i] ?? 0xff;
    if (byte < 0xff) {
      end[i] = byte + 1;
      return end.subarray(0, i + 1);
    }
  }
  return Buffer.from([0]);
}

/** A fetch failure as a TransportError: refused (nothing sent) or cut (maybe sent). */
function transportError(err: unknown, aborted: boolean): TransportError {
  if (aborted) return new TransportError("no answer before the deadline", false);
  const code = (err as { code?: unknown } | undefined)?.code;
  const message = err instanceof Error ? err.message : String(err);
  const refused = code === "ECONNREFUSED" || code === "ConnectionRefused" || code === "EHOSTUNREACH" || code === "ENETUNREACH";
  return new TransportError(refused ? `connection refused (${String(code)})` : message, refused);
}

/** The cluster could not be reached (in time), or has no leader to serve the call. */
function isUnreachable(err: unknown): boolean {
  if (err instanceof TransportError) return true;
  return err instanceof GatewayError && (err.code === GRPC.unavailable || err.code === GRPC.deadlineExceeded || err.status === 503);
}

/** Worth another attempt for a read. */
function isTransient(err: unknown): boolean {
  return isUnreachable(err) || (err instanceof GatewayError && /no leader|leader changed|timed out|not capable/i.test(err.message));
}

/** True when a failed write surely never reached etcd's state machine, so it can be resent. */
function notSent(err: unknown): boolean {
  if (err instanceof TransportError) return err.refused;
  return err instanceof GatewayError && /no leader|leader changed|not capable/i.test(err.message);
}
