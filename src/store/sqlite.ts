/**
 * SqliteStore: the embedded Store, one SQLite file (WAL mode) shared by every knit process on
 * a host.
 *
 * Design note. Many short-lived processes (CNI calls, the CLI, the agent) use the same file at
 * once, so all coordination lives in SQLite, none in this process:
 * - Every write runs inside `BEGIN IMMEDIATE`, which takes the file's write lock before the
 *   first read, so a txn's compares and ops see and change one state. Waiting is SQLite's
 *   busy_timeout; a SQLITE_BUSY that still escapes is retried with jitter.
 * - One store-wide revision (a `meta` row) is bumped once per write txn that changes anything,
 *   as in etcd. Each change is appended to `events`, which watches read: SQLite cannot notify
 *   other processes, but every commit writes the WAL file, so an inotify watch on the
 *   database's directory wakes them at once (with a slow poll as a safety net, and a fast one
 *   where inotify is unavailable). History is bounded by compacting past HISTORY revisions.
 * - Leases expire lazily: every operation and every watch poll first revokes expired leases,
 *   deleting their keys through ordinary delete events.
 * Where the interface leaves room, etcd decides: a value compare on a missing key is false,
 * deleting a missing key changes nothing, and a watch from revision <= 0 starts "now".
 */
import { Database, SQLiteError } from "bun:sqlite";
import { mkdirSync, watch as watchDir, type FSWatcher } from "node:fs";
import { basename, dirname, join } from "node:path";
import { KnitError, invalid, notFound } from "../errors.ts";
import type { Compare, CompareOp, KeyValue, ListOptions, ListResult, Op, Store, TxnResult, Watch, WatchEvent, WatchHandlers } from "./store.ts";
import { checkLimit } from "./store.ts";

/** Revisions of history kept for watches before automatic compaction. */
const HISTORY = 10_000;
/** How often a watch polls the events table when no change notification wakes it. */
const POLL_MS = 25;
/**
 * How often it polls when a change notification (inotify on the database's directory: every
 * commit, by any process, writes the WAL file) wakes it at once: only a safety net, and
 * the pace at which expired leases are noticed without writes.
 */
const POLL_NOTIFIED_MS = 250;
/** SQLite's own wait for a lock, per statement. */
const BUSY_TIMEOUT_MS = 10_000;
/** Give up retrying a busy database after this long. */
const BUSY_DEADLINE_MS = 30_000;

const SCHEMA = `
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL, version INTEGER NOT NULL,
  create_rev INTEGER NOT NULL, mod_rev INTEGER NOT NULL, lease TEXT);
CREATE INDEX IF NOT EXISTS kv_lease ON kv (lease) WHERE lease IS NOT NULL;
CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, rev INTEGER NOT NULL, key TEXT NOT NULL,
  type TEXT NOT NULL, value TEXT);
CREATE INDEX IF NOT EXISTS events_rev ON events (rev);
CREATE TABLE IF NOT EXISTS leases (id TEXT PRIMARY KEY, ttl INTEGER NOT NULL, expires_at_ms INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS leases_expiry ON leases (expires_at_ms);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', 0), ('compacted', 0);
`;

type KvRow = { key: string; value: string; version: number; create_rev: number; mod_rev: number; lease: string | null };
type EventRow = { rev: number; key: string; type: "put" | "delete"; value: string | null };
/** A write transaction in progress: the revision it will commit, and its changes so far. */
type Batch = { readonly rev: number; changes: number };
/** What one watch poll read, from one snapshot. */
type EventsRead = { readonly revision: number; readonly compacted: number; readonly events: WatchEvent[] };

/** The embedded store. Open it with {@link openSqliteStore}. */
export class SqliteStore implements Store {
  /** `sqlite:<path of the database file>`. */
  readonly describe: string;
  /** Open watches: their close, and what wakes them. */
  private readonly watches = new Map<() => void, () => void>();
  private closed = false;
  private readonly dir: string;
  private readonly file: string;
  /** Change notifications for the database's directory, while watches are open. */
  private notifier: FSWatcher | undefined;
  private notifierFailed = false;

  /** Wraps an initialised database; use {@link openSqliteStore} instead. */
  constructor(
    private readonly db: Database,
    path: string,
    /** Wake watches by inotify (false: poll at POLL_MS, as where inotify is unavailable). */
    changeNotifications = true,
  ) {
    this.describe = `sqlite:${path}`;
    this.dir = dirname(path);
    this.file = basename(path);
    this.notifierFailed = !changeNotifications;
  }

  async get(key: string): Promise<KeyValue | undefined> {
    await this.expireLeases();
    const row = await this.retry(() => this.row(key));
    return row === null ? undefined : toKeyValue(row);
  }

  async list(prefix: string, opts: ListOptions = {}): Promise<ListResult> {
    const limit = checkLimit(opts.limit);
    await this.expireLeases();
    const read = this.db.transaction((): ListResult => {
      const rows = this.rows(prefix, limit === undefined ? undefined : limit + 1);
      const revision = this.meta("revision");
      if (limit === undefined) return { items: rows.map(toKeyValue), revision };
      return { items: rows.slice(0, limit).map(toKeyValue), revision, more: rows.length > limit };
    });
    return this.retry(() => read.deferred());
  }

  async txn(compares: readonly Compare[], success: readonly Op[], failure: readonly Op[] = []): Promise<TxnResult> {
    const { value: succeeded, revision } = await this.write((batch) => {
      const holds = compares.every((compare) => this.holds(compare));
      this.apply(holds ? success : failure, batch);
      return holds;
    });
    return { succeeded, revision };
  }

  async put(key: string, value: string, lease?: string): Promise<number> {
    return (await this.write((batch) => this.putKey(key, value, lease, batch))).revision;
  }

  async delete(key: string): Promise<boolean> {
    return (await this.write((batch) => this.deleteKey(key, batch))).value;
  }

  /**
   * Reads new events when a commit to the database is noticed (inotify on its directory),
   * and every POLL_NOTIFIED_MS besides; every POLL_MS where notifications are unavailable.
   * Neither keeps the process alive. Without an onCompacted handler, compaction is reported
   * through onError. Handlers must not throw.
   */
  watch(prefix: string, fromRevision: number, handlers: WatchHandlers): Watch {
    this.ensureOpen();
    let next = fromRevision > 0 ? fromRevision : this.meta("revision") + 1;
    let polling = false;
    /** A wake-up came during a poll: poll again after it (the commit may be newer). */
    let again = false;
    const close = (): void => {
      clearInterval(timer);
      this.watches.delete(close);
      if (this.watches.size === 0) this.stopNotifier();
    };
    const poll = async (): Promise<void> => {
      if (polling) {
        again = true;
        return;
      }
      polling = true;
      again = false;
      let read: EventsRead;
      try {
        await this.expireLeases();
        read = await this.retry(() => this.readEvents(prefix, next));
      } catch (err) {
        if (this.watches.has(close)) {
          close();
          handlers.onError?.(storeError(err));
        }
        return;
      } finally {
        polling = false;
      }
      if (!this.watches.has(close)) return;
      if (next < read.compacted) {
        close();
        if (handlers.onCompacted) handlers.onCompacted(read.revision);
        else handlers.onError?.(new KnitError("store", `watch on ${prefix} from revision ${next}: history compacted`));
        return;
      }
      next = Math.max(next, read.revision + 1);
      if (read.events.length > 0) handlers.onEvents(read.events);
      if (again && this.watches.has(close)) void poll();
    };
    const timer = setInterval(() => void poll(), this.startNotifier() ? POLL_NOTIFIED_MS : POLL_MS);
    timer.unref();
    this.watches.set(close, () => void poll());
    return { close };
  }

  /** Wake the watches at every change of the database's files; false when unavailable. */
  private startNotifier(): boolean {
    if (this.notifier) return true;
    if (this.notifierFailed) return false;
    try {
      const notifier = watchDir(this.dir, { persistent: false }, (_event, name) => {
        if (typeof name === "string" && !name.startsWith(this.file)) return;
        for (const wake of this.watches.values()) wake();
      });
      // Broken later (the directory went): the watches go on at POLL_NOTIFIED_MS.
      notifier.on("error", () => {
        this.notifierFailed = true;
        this.stopNotifier();
      });
      this.notifier = notifier;
      return true;
    } catch {
      // No inotify here (or its limits are reached): poll at POLL_MS.
      this.notifierFailed = true;
      return false;
    }
  }

  private stopNotifier(): void {
    this.notifier?.close();
    this.notifier = undefined;
  }

  async grantLease(ttlSeconds: number): Promise<string> {
    if (!Number.isInteger(ttlSeconds) || ttlSeconds < 1) {
      throw invalid(`lease TTL must be a whole number of seconds >= 1, got ${ttlSeconds}`);
    }
    const id = Array.from(crypto.getRandomValues(new Uint8Array(8)), (b) => b.toString(16).padStart(2, "0")).join("");
    const expiresAt = Date.now() + ttlSeconds * 1000;
    await this.write(() => this.db.query("INSERT INTO leases (id, ttl, expires_at_ms) VALUES (?, ?, ?)").run(id, ttlSeconds, expiresAt));
    return id;
  }

  async keepAlive(lease: string): Promise<boolean> {
    const renew = "UPDATE leases SET expires_at_ms = ? + ttl * 1000 WHERE id = ?";
    return (await this.write(() => this.db.query(renew).run(Date.now(), lease).changes > 0)).value;
  }

  /** Revoking an unknown or already expired lease is a no-op. */
  async revokeLease(lease: string): Promise<void> {
    await this.write((batch) => this.revokeIn(lease, batch));
  }

  /** Compacting to a revision at or below the current compaction is a no-op. */
  async compact(revision: number): Promise<void> {
    await this.write(() => {
      const current = this.meta("revision");
      if (revision > current) throw invalid(`cannot compact to revision ${revision}: the store is at revision ${current}`);
      this.compactIn(revision);
    });
  }

  /** Stops every watch and closes the database; later calls fail with a "store" error. */
  async close(): Promise<void> {
    if (this.closed) return;
    for (const closeWatch of [...this.watches.keys()]) closeWatch();
    this.closed = true;
    this.db.close();
  }

  /** Runs `body` in one BEGIN IMMEDIATE transaction that commits at most one new revision. */
  private write<T>(body: (batch: Batch) => T): Promise<{ value: T; revision: number }> {
    const transaction = this.db.transaction(() => {
      const current = this.meta("revision");
      const batch: Batch = { rev: current + 1, changes: 0 };
      this.expireIn(batch);
      const value = body(batch);
      if (batch.changes === 0) return { value, revision: current };
      this.setMeta("revision", batch.rev);
      if (batch.rev - this.meta("compacted") > HISTORY * 1.1) this.compactIn(batch.rev - HISTORY);
      return { value, revision: batch.rev };
    });
    return this.retry(() => transaction.immediate());
  }

  private holds(compare: Compare): boolean {
    const row = this.row(compare.key);
    if (compare.target === "value") {
      return row !== null && (compare.op === "=" ? row.value === compare.value : row.value !== compare.value);
    }
    const actual = row === null ? 0 : compare.target === "version" ? row.version : row.mod_rev;
    return COMPARE[compare.op](actual, compare.value);
  }

  private apply(ops: readonly Op[], batch: Batch): void {
    for (const op of ops) {
      if (op.type === "put") this.putKey(op.key, op.value, op.lease, batch);
      else if (op.type === "delete") this.deleteKey(op.key, batch);
      else for (const kv of this.rows(op.prefix)) this.deleteKey(kv.key, batch);
    }
  }

  private putKey(key: string, value: string, lease: string | undefined, batch: Batch): void {
    if (lease !== undefined && this.db.query("SELECT 1 FROM leases WHERE id = ?").get(lease) === null) {
      throw notFound(`lease ${lease} not found`, "it expired or was revoked: grant a new lease");
    }
    const upsert = `INSERT INTO kv (key, value, version, create_rev, mod_rev, lease) VALUES (?1, ?2, 1, ?3, ?3, ?4)
      ON CONFLICT (key) DO UPDATE SET value = ?2, version = version + 1, mod_rev = ?3, lease = ?4`;
    this.db.query(upsert).run(key, value, batch.rev, lease ?? null);
    this.record(batch, "put", key, value);
  }

  private deleteKey(key: string, batch: Batch): boolean {
    if (this.db.query("DELETE FROM kv WHERE key = ?").run(key).changes === 0) return false;
    this.record(batch, "delete", key, null);
    return true;
  }

  private record(batch: Batch, type: WatchEvent["type"], key: string, value: string | null): void {
    this.db.query("INSERT INTO events (rev, key, type, value) VALUES (?, ?, ?, ?)").run(batch.rev, key, type, value);
    batch.changes++;
  }

  private revokeIn(lease: string, batch: Batch): void {
    const keys = this.db.query<{ key: string }, [string]>("SELECT key FROM kv WHERE lease = ? ORDER BY key").all(lease);
    for (const { key } of keys) this.deleteKey(key, batch);
    this.db.query("DELETE FROM leases WHERE id = ?").run(lease);
  }

  private expireIn(batch: Batch): void {
    const expired = this.db.query<{ id: string }, [number]>("SELECT id FROM leases WHERE expires_at_ms < ?").all(Date.now());
    for (const { id } of expired) this.revokeIn(id, batch);
  }

  /** Revokes expired leases, taking the write lock only when there is one. */
  private async expireLeases(): Promise<void> {
    const due = await this.retry(() => this.db.query("SELECT 1 FROM leases WHERE expires_at_ms < ? LIMIT 1").get(Date.now()));
    if (due !== null) await this.write(() => undefined);
  }

  private compactIn(revision: number): void {
    if (revision <= this.meta("compacted")) return;
    this.db.query("DELETE FROM events WHERE rev < ?").run(revision);
    this.setMeta("compacted", revision);
  }

  private readEvents(prefix: string, from: number): EventsRead {
    const range = keyRange(prefix);
    const read = this.db.transaction((): EventsRead => {
      const revision = this.meta("revision");
      const compacted = this.meta("compacted");
      if (from > revision || from < compacted) return { revision, compacted, events: [] };
      // ORDER BY rev, id (the same order as id alone: both only grow) lets SQLite walk the
      // rev index from `from`; ORDER BY id alone made it scan the whole history (up to
      // HISTORY rows of records) at every poll of every watch, 25 ms apart.
      const sql = `SELECT rev, key, type, value FROM events WHERE rev >= ? AND ${range.sql} ORDER BY rev, id`;
      const rows = this.db.query<EventRow, (string | number)[]>(sql).all(from, ...range.params);
      return { revision, compacted, events: rows.map(toWatchEvent) };
    });
    return read.deferred();
  }

  private row(key: string): KvRow | null {
    return this.db.query<KvRow, [string]>("SELECT * FROM kv WHERE key = ?").get(key);
  }

  /** The keys under `prefix`, sorted (the first `limit` of them). */
  private rows(prefix: string, limit?: number): KvRow[] {
    const range = keyRange(prefix);
    if (limit === undefined) return this.db.query<KvRow, string[]>(`SELECT * FROM kv WHERE ${range.sql} ORDER BY key`).all(...range.params);
    return this.db.query<KvRow, (string | number)[]>(`SELECT * FROM kv WHERE ${range.sql} ORDER BY key LIMIT ?`).all(...range.params, limit);
  }

  private meta(name: "revision" | "compacted"): number {
    return this.db.query<{ value: number }, [string]>("SELECT value FROM meta WHERE name = ?").get(name)?.value ?? 0;
  }

  private setMeta(name: "revision" | "compacted", value: number): void {
    this.db.query("UPDATE meta SET value = ? WHERE name = ?").run(value, name);
  }

  private ensureOpen(): void {
    if (this.closed) throw new KnitError("store", `${this.describe} is closed`);
  }

  private retry<T>(fn: () => T): Promise<T> {
    return retryBusy(() => {
      this.ensureOpen();
      return fn();
    });
  }
}

/**
 * Open (creating if needed) the store in `dir/knit.db`. Safe to call from many processes at
 * once on the same directory.
 */
export async function openSqliteStore(dir: string, opts: { changeNotifications?: boolean } = {}): Promise<SqliteStore> {
  const path = join(dir, "knit.db");
  let db: Database | undefined;
  try {
    mkdirSync(dir, { recursive: true });
    db = new Database(path, { create: true, strict: true });
    await initialise(db);
    return new SqliteStore(db, path, opts.changeNotifications ?? true);
  } catch (err) {
    db?.close();
    throw new KnitError("store", `cannot open ${path}: ${errorMessage(err)}`, { cause: err, hint: `check that ${dir} is a writable local directory` });
  }
}

/** Connection settings, then the schema; concurrent first opens of a new file are fine. */
function initialise(db: Database): Promise<void> {
  return retryBusy(() => {
    db.run(`PRAGMA busy_timeout = ${BUSY_TIMEOUT_MS}`);
    const mode = db.query<{ journal_mode: string }, []>("PRAGMA journal_mode = WAL").get()?.journal_mode;
    if (mode !== "wal") throw new Error(`cannot switch to WAL mode (got ${mode ?? "nothing"})`);
    db.run("PRAGMA synchronous = NORMAL");
    // The schema only when it is missing: taking the write lock on every open serialized
    // every knit process at start (up to 200 ms each under 20 concurrent commands).
    const tables = db.query<{ n: number }, []>("SELECT count(*) AS n FROM sqlite_master WHERE type = 'table' AND name IN ('kv', 'events', 'leases', 'meta')").get()?.n ?? 0;
    if (tables < 4) db.transaction(() => db.run(SCHEMA)).immediate();
  });
}

/** Runs `fn`, retrying with jitter while SQLite reports the database busy or locked. */
async function retryBusy<T>(fn: () => T): Promise<T> {
  const deadline = Date.now() + BUSY_DEADLINE_MS;
  for (;;) {
    try {
      return fn();
    } catch (err) {
      const busy = err instanceof SQLiteError && /^SQLITE_(BUSY|LOCKED)/.test(err.code ?? "");
      if (!busy || Date.now() > deadline) throw storeError(err);
      await Bun.sleep(5 + Math.random() * 45);
    }
  }
}

function storeError(err: unknown): KnitError {
  if (err instanceof KnitError) return err;
  return new KnitError("store", `sqlite store: ${errorMessage(err)}`, { cause: err });
}

const errorMessage = (err: unknown): string => (err instanceof Error ? err.message : String(err));

function toKeyValue(row: KvRow): KeyValue {
  const kv = { key: row.key, value: row.value, version: row.version, createRevision: row.create_rev, modRevision: row.mod_rev };
  return row.lease === null ? kv : { ...kv, lease: row.lease };
}

function toWatchEvent(row: EventRow): WatchEvent {
  const event = { type: row.type, key: row.key, modRevision: row.rev };
  return row.value === null ? event : { ...event, value: row.value };
}

const COMPARE: Record<CompareOp, (actual: number, expected: number) => boolean> = {
  "=": (actual, expected) => actual === expected,
  "!=": (actual, expected) => actual !== expected,
  "<": (actual, expected) => actual < expected,
  ">": (actual, expected) => actual > expected,
};

/** SQL condition for the keys starting with `prefix`, as an index-friendly range. */
function keyRange(prefix: string): { sql: string; params: string[] } {
  const end = prefixEnd(prefix);
  return end === undefined ? { sql: "key >= ?", params: [prefix] } : { sql: "key >= ? AND key < ?", params: [prefix, end] };
}

/**
 * The least string above every string that starts with `prefix` (undefined: none), by code
 * point, which is SQLite's byte order of UTF-8 text. Like etcd's range end for a prefix.
 */
function prefixEnd(prefix: string): string | undefined {
  const points = Array.from(prefix, (char) => char.codePointAt(0) ?? 0);
  while (points.length > 0) {
    const last = points.pop() ?? 0;
    if (last < 0x10ffff) return String.fromCodePoint(...points, last === 0xd7ff ? 0xe000 : last + 1);
  }
  return undefined;
}
