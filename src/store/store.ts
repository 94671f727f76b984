/**
 * The Store: knit's source of truth. It is shaped like etcd v3 (keys with versions and
 * revisions, transactions with compares, prefix lists, watches from a revision, leases) so
 * that the embedded SQLite store and the etcd cluster store are interchangeable and pass one
 * conformance suite (test/store-suite.ts).
 *
 * Keys are plain strings such as `networks/<id>`; values are strings (JSON by convention).
 */
import { KnitError } from "../errors.ts";

/** One stored key. Revisions are store-wide and strictly increasing. */
export interface KeyValue {
  readonly key: string;
  readonly value: string;
  /** Number of writes since the key was (re)created; 1 after creation. */
  readonly version: number;
  /** Store revision at which the key was created. */
  readonly createRevision: number;
  /** Store revision of the key's last write. */
  readonly modRevision: number;
  /** The lease that owns the key, if any ("0" style ids are never used: undefined instead). */
  readonly lease?: string;
}

/** A condition checked inside a transaction. A missing key has version 0 and revisions 0. */
export type Compare =
  | { readonly key: string; readonly target: "version"; readonly op: CompareOp; readonly value: number }
  | { readonly key: string; readonly target: "modRevision"; readonly op: CompareOp; readonly value: number }
  | { readonly key: string; readonly target: "value"; readonly op: "=" | "!="; readonly value: string };

export type CompareOp = "=" | "!=" | "<" | ">";

/** A write inside a transaction. */
export type Op =
  | { readonly type: "put"; readonly key: string; readonly value: string; readonly lease?: string }
  | { readonly type: "delete"; readonly key: string }
  | { readonly type: "deletePrefix"; readonly prefix: string };

export interface TxnResult {
  /** True when every compare held and the success ops were applied. */
  readonly succeeded: boolean;
  /** The store revision after the transaction. */
  readonly revision: number;
}

export interface WatchEvent {
  readonly type: "put" | "delete";
  readonly key: string;
  /** Value after a put; undefined for delete. */
  readonly value?: string;
  readonly modRevision: number;
}

export interface WatchHandlers {
  /** Events in revision order, batched. */
  onEvents(events: readonly WatchEvent[]): void;
  /**
   * The requested start revision was compacted away: the watcher must re-list the prefix
   * (at `revision`) and watch again from `revision + 1`. The watch is closed.
   */
  onCompacted?(revision: number): void;
  /** The watch failed (store unreachable); it is closed. */
  onError?(err: Error): void;
}

export interface Watch {
  close(): void;
}

export interface ListResult {
  readonly items: KeyValue[];
  /** Store revision the list was read at (start a watch at revision + 1). */
  readonly revision: number;
  /** With a limit: true when keys beyond the first `limit` exist under the prefix. */
  readonly more?: boolean;
}

/** Options of {@link Store.list}. */
export interface ListOptions {
  /** At most this many keys (the first ones, in key order); a positive integer. */
  readonly limit?: number;
}

/** The store interface implemented by SqliteStore (embedded) and EtcdStore (cluster). */
export interface Store {
  /** Human-readable kind and location, for `knit info` and errors. */
  readonly describe: string;
  get(key: string): Promise<KeyValue | undefined>;
  /** All keys starting with `prefix`, sorted by key. */
  list(prefix: string, opts?: ListOptions): Promise<ListResult>;
  /** Atomically: if every compare holds, apply `success`, else apply `failure`. */
  txn(compares: readonly Compare[], success: readonly Op[], failure?: readonly Op[]): Promise<TxnResult>;
  /** Unconditional put. */
  put(key: string, value: string, lease?: string): Promise<number>;
  /** Unconditional delete; true if the key existed. */
  delete(key: string): Promise<boolean>;
  /** Watch a prefix for changes with modRevision >= fromRevision. */
  watch(prefix: string, fromRevision: number, handlers: WatchHandlers): Watch;
  /** Grant a lease; keys put with it vanish when it expires or is revoked. */
  grantLease(ttlSeconds: number): Promise<string>;
  /** Renew a lease; false when it has already expired. */
  keepAlive(lease: string): Promise<boolean>;
  revokeLease(lease: string): Promise<void>;
  /** Drop history older than `revision` (watches from before it see onCompacted). */
  compact(revision: number): Promise<void>;
  close(): Promise<void>;
}

/** Read a JSON value, or undefined. */
export async function getJson<T>(store: Store, key: string): Promise<T | undefined> {
  const kv = await store.get(key);
  return kv ? (JSON.parse(kv.value) as T) : undefined;
}

/** List JSON values under a prefix. */
export async function listJson<T>(store: Store, prefix: string): Promise<T[]> {
  const { items } = await store.list(prefix);
  return items.map((kv) => JSON.parse(kv.value) as T);
}

/** A list limit as given, checked: undefined (no limit) or a positive integer. */
export function checkLimit(limit: number | undefined): number | undefined {
  if (limit === undefined) return undefined;
  if (!Number.isInteger(limit) || limit < 1) throw new KnitError("internal", `list limit must be a positive integer, not ${limit}`);
  return limit;
}

/** A put op with a JSON value. */
export const putJson = (key: string, value: unknown): Op => ({ type: "put", key, value: JSON.stringify(value) });

/** A compare that holds when the key does not exist. */
export const absent = (key: string): Compare => ({ key, target: "version", op: "=", value: 0 });
