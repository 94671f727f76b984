/**
 * Keeps a {@link NameTable} in step with the store: list the prefixes it needs, then watch
 * from the revision after the list. When the watch's start revision has been compacted
 * away, or the watch fails, list again and watch again (etcd's list+watch pattern, which
 * the SQLite store implements too).
 *
 * The prefixes are listed one by one, each at its own revision; the watch starts after the
 * oldest of them. Events the lists already reflected are then applied again, in order, up
 * to the present, which ends in the same state: a key's last event wins.
 */
import type { Store, Watch, WatchEvent } from "../store/store.ts";
import { NameTable, TABLE_PREFIXES } from "./table.ts";

/** What the mirror tells its owner. */
export interface MirrorOptions {
  /** Called after each batch of changes was applied to the table (and it was refreshed). */
  onChange: () => void;
  /** Called when the watch broke; the mirror re-lists by itself. */
  onError?: (err: unknown) => void;
  /** Wait before re-listing after an error, in milliseconds. */
  retryMs?: number;
}

/** Follows the store into a name table (list, then watch; list again when needed). */
export class StoreMirror {
  /** Store revision the table reflects. */
  revision = 0;
  /** Times the mirror had to list again (compaction or error). */
  relists = 0;
  private watch: Watch | undefined;
  private closed = false;
  private retry: ReturnType<typeof setTimeout> | undefined;

  constructor(
    private readonly store: Store,
    private readonly table: NameTable,
    private readonly opts: MirrorOptions,
  ) {}

  /** Load the table and start watching. Rejects only when the first list fails. */
  async start(): Promise<void> {
    await this.relist();
  }

  close(): void {
    this.closed = true;
    clearTimeout(this.retry);
    this.watch?.close();
    this.watch = undefined;
  }

  private async relist(): Promise<void> {
    this.watch?.close();
    this.watch = undefined;
    if (this.closed) return;
    const lists = [];
    for (const prefix of TABLE_PREFIXES) lists.push(await this.store.list(prefix));
    if (this.closed) return;
    this.table.clear();
    for (const list of lists) for (const kv of list.items) this.table.apply(kv.key, kv.value);
    const from = Math.min(...lists.map((l) => l.revision));
    this.revision = Math.max(...lists.map((l) => l.revision));
    this.table.refresh();
    this.opts.onChange();
    this.watch = this.store.watch("", from + 1, {
      onEvents: (events) => this.onEvents(events),
      onCompacted: () => this.again(undefined),
      onError: (err) => this.again(err),
    });
  }

  private onEvents(events: readonly WatchEvent[]): void {
    let relevant = false;
    for (const e of events) {
      if (this.table.apply(e.key, e.type === "put" ? e.value : undefined)) relevant = true;
      this.revision = Math.max(this.revision, e.modRevision);
    }
    if (!relevant) return;
    this.table.refresh();
    this.opts.onChange();
  }

  /** The watch is closed: list again (at once after compaction, after a pause on error). */
  private again(err: unknown): void {
    this.watch = undefined;
    if (this.closed) return;
    this.relists++;
    if (err !== undefined) this.opts.onError?.(err);
    const run = (): void => {
      this.relist().catch((e: unknown) => this.again(e ?? new Error("list failed")));
    };
    clearTimeout(this.retry);
    this.retry = setTimeout(run, err === undefined ? 0 : (this.opts.retryMs ?? 1000));
  }
}
