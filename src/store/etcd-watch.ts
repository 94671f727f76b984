/**
 * The bookkeeping of an etcd watch that resumes after failures, shared by both etcd clients
 * (src/store/etcd.ts over gRPC streams, src/store/etcd-http.ts over the JSON gateway's
 * streaming POST): they differ in how a stream is opened and read, not in what a watch
 * remembers. This file imports no transport, so the CLI's client never loads gRPC.
 *
 * - `next` is the first revision not yet delivered (0: "from now" until etcd created the
 *   watch and said at which revision); a new stream always starts there, so a reconnect
 *   neither loses nor repeats an event.
 * - A failed stream is opened again after a pause that doubles from 100 ms to 1 s, for as long
 *   as the failures have lasted less than the store's watch grace period; then the watch is
 *   closed and its owner told (onError).
 * - A start revision etcd has compacted away closes the watch and reports the store's current
 *   revision (onCompacted), so the owner can list again and watch from there.
 */
import { KnitError } from "../errors.ts";
import type { Watch, WatchEvent, WatchHandlers } from "./store.ts";

/** What a resuming watch needs from the store that made it. */
export interface WatchOwner {
  readonly watchGraceMs: number;
  currentRevision(): Promise<number>;
  storeError(what: string, err: unknown): KnitError;
  dropWatch(watch: ResumingWatch): void;
  /** True once the store is closed: a failed watch then gives up at once. */
  isClosed(): boolean;
}

export abstract class ResumingWatch implements Watch {
  /** The first revision not yet delivered; 0 = "from now" until the watch is created. */
  protected next: number;
  protected closed = false;
  private failingSince: number | undefined;
  private pause = 100;
  private timer: ReturnType<typeof setTimeout> | undefined;

  constructor(
    private readonly owner: WatchOwner,
    protected readonly prefix: string,
    fromRevision: number,
    protected readonly handlers: WatchHandlers,
  ) {
    this.next = fromRevision > 0 ? fromRevision : 0;
  }

  /** Open a stream from {@link next} (the transport's part). */
  abstract connect(): void;

  /** End the current stream, if any (the transport's part). */
  protected abstract stopStream(): void;

  close(): void {
    if (this.closed) return;
    this.closed = true;
    clearTimeout(this.timer);
    this.stopStream();
    this.owner.dropWatch(this);
  }

  /** etcd created the watch: the stream works again, and "from now" becomes a revision. */
  protected created(headerRevision: number): void {
    this.failingSince = undefined;
    this.pause = 100;
    if (this.next === 0) this.next = headerRevision + 1;
  }

  /** Hand events to the owner, in order, and move the resume point past them. */
  protected deliver(events: WatchEvent[]): void {
    const last = events.at(-1);
    if (last === undefined) return;
    this.next = last.modRevision + 1;
    this.handlers.onEvents(events);
  }

  /** The start revision was compacted: report the current revision, then close. */
  protected compacted(compactRevision: number): void {
    const from = this.next;
    this.close();
    const report = (revision: number): void => {
      if (this.handlers.onCompacted) this.handlers.onCompacted(revision);
      else this.handlers.onError?.(new KnitError("store", `watch on ${this.prefix} from revision ${from}: history compacted (at ${compactRevision})`));
    };
    this.owner.currentRevision().then(report, (err: unknown) => this.handlers.onError?.(this.owner.storeError(`watch on ${this.prefix}`, err)));
  }

  /** The stream failed: open it again after a pause, or give up once the grace period is over. */
  protected retryOrGiveUp(err: unknown): void {
    this.stopStream();
    const now = Date.now();
    this.failingSince ??= now;
    if (now - this.failingSince >= this.owner.watchGraceMs || this.owner.isClosed()) {
      this.close();
      this.handlers.onError?.(this.owner.storeError(`watch on ${this.prefix}`, err));
      return;
    }
    this.timer = setTimeout(() => this.connect(), this.pause);
    this.pause = Math.min(this.pause * 2, 1000);
  }
}
