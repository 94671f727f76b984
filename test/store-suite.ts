/**
 * The Store conformance suite: every Store implementation (SQLite embedded, etcd cluster) runs
 * these same tests, so they check only behaviour promised by src/store/store.ts (and etcd's
 * semantics where the interface is silent), nothing backend-specific.
 *
 * Tests share one store and may run against a shared etcd, so each uses its own random key
 * prefix, and every lease a test grants is gone (expired or revoked) when the test ends.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { absent, type Store, type Watch, type WatchEvent } from "../src/store/store.ts";

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/** Polls `check` until it returns true, failing after `timeoutMs`. */
async function eventually(what: string, check: () => boolean | Promise<boolean>, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(20);
  }
}

/** The error `promise` rejects with; fails if it resolves. */
export async function rejection(promise: Promise<unknown>): Promise<Error> {
  try {
    await promise;
  } catch (err) {
    if (err instanceof Error) return err;
    throw new Error(`rejected with a non-Error: ${String(err)}`);
  }
  throw new Error("expected a rejection, but the promise resolved");
}

/** A watch that records everything it is told. */
interface Recorder {
  readonly events: WatchEvent[];
  readonly batches: WatchEvent[][];
  readonly compacted: number[];
  readonly errors: Error[];
  readonly watch: Watch;
  /** Waits until at least `count` events arrived. */
  waitFor(count: number): Promise<WatchEvent[]>;
}

function record(store: Store, prefix: string, fromRevision: number): Recorder {
  const events: WatchEvent[] = [];
  const batches: WatchEvent[][] = [];
  const compacted: number[] = [];
  const errors: Error[] = [];
  const watch = store.watch(prefix, fromRevision, {
    onEvents: (batch) => {
      batches.push([...batch]);
      events.push(...batch);
    },
    onCompacted: (revision) => compacted.push(revision),
    onError: (err) => errors.push(err),
  });
  const waitFor = async (count: number): Promise<WatchEvent[]> => {
    await eventually(`${count} events on ${prefix}`, () => events.length >= count);
    return events;
  };
  return { events, batches, compacted, errors, watch, waitFor };
}

/** Compact form of events for assertions: "put k=v@rev" / "delete k@rev". */
const describeEvents = (events: readonly WatchEvent[], prefix: string): string[] =>
  events.map((e) => `${e.type} ${e.key.slice(prefix.length)}${e.type === "put" ? `=${e.value}` : ""}@${e.modRevision}`);

const LEASE_TEST_MS = 15_000;

/**
 * Registers the conformance tests for one Store implementation. `open` is called once before
 * the tests, the store is closed after them, then `cleanup` runs.
 */
export function runStoreSuite(name: string, open: () => Promise<Store>, cleanup?: () => Promise<void>): void {
  describe(`Store conformance: ${name}`, () => {
    let store: Store;
    const run = `${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`;
    let counter = 0;
    /** A fresh key prefix for one test. */
    const fresh = (): string => `conformance/${run}/${++counter}/`;
    const currentRevision = async (): Promise<number> => (await store.list(fresh())).revision;

    beforeAll(async () => {
      store = await open();
    });
    afterAll(async () => {
      await store.close();
      await cleanup?.();
    });

    describe("keys", () => {
      test("describe names the store", () => {
        expect(store.describe.length).toBeGreaterThan(0);
      });

      test("get of a missing key is undefined", async () => {
        expect(await store.get(`${fresh()}missing`)).toBeUndefined();
      });

      test("put then get returns the value with version 1 and the put's revision", async () => {
        const key = `${fresh()}a`;
        const revision = await store.put(key, "one");
        expect(await store.get(key)).toEqual({ key, value: "one", version: 1, createRevision: revision, modRevision: revision });
      });

      test("each put increments version and moves modRevision, createRevision stays", async () => {
        const key = `${fresh()}a`;
        const first = await store.put(key, "1");
        const second = await store.put(key, "2");
        const third = await store.put(key, "3");
        expect(second).toBeGreaterThan(first);
        expect(third).toBeGreaterThan(second);
        expect(await store.get(key)).toMatchObject({ value: "3", version: 3, createRevision: first, modRevision: third });
      });

      test("delete reports whether the key existed; re-creating starts over at version 1", async () => {
        const key = `${fresh()}a`;
        await store.put(key, "1");
        await store.put(key, "2");
        expect(await store.delete(key)).toBe(true);
        expect(await store.get(key)).toBeUndefined();
        expect(await store.delete(key)).toBe(false);
        const recreated = await store.put(key, "3");
        expect(await store.get(key)).toMatchObject({ version: 1, createRevision: recreated, modRevision: recreated });
      });

      test("deleting a missing key does not change the revision", async () => {
        const before = await currentRevision();
        expect(await store.delete(`${fresh()}missing`)).toBe(false);
        const result = await store.txn([], [{ type: "delete", key: `${fresh()}missing` }]);
        expect(result).toEqual({ succeeded: true, revision: before });
        expect(await currentRevision()).toBe(before);
      });

      test("values are stored verbatim", async () => {
        const prefix = fresh();
        const values = ["", " spaced ", '{"json":[1,2]}', "line\nbreak", "ünïcødé ✓ 🚀", "x".repeat(100_000)];
        for (const [i, value] of values.entries()) await store.put(`${prefix}${i}`, value);
        for (const [i, value] of values.entries()) expect((await store.get(`${prefix}${i}`))?.value).toBe(value);
      });

      test("list returns the keys under a prefix, sorted, with the current revision", async () => {
        const prefix = fresh();
        for (const key of ["b", "a/2", "c", "a/1", "a"]) await store.put(`${prefix}${key}`, key);
        await store.put(`${prefix.slice(0, -1)}-sibling`, "not under the prefix");
        const last = await store.put(`${prefix}d`, "d");
        const { items, revision } = await store.list(prefix);
        expect(items.map((kv) => kv.key.slice(prefix.length))).toEqual(["a", "a/1", "a/2", "b", "c", "d"]);
        expect(items.map((kv) => kv.value)).toEqual(["a", "a/1", "a/2", "b", "c", "d"]);
        expect(revision).toBe(last);
        expect(items.every((kv) => kv.version === 1 && kv.modRevision <= revision)).toBe(true);
      });

      test("list of an empty prefix range is empty but carries the revision", async () => {
        const revision = await store.put(`${fresh()}x`, "x");
        expect(await store.list(fresh())).toEqual({ items: [], revision });
      });

      test("list with a limit returns the first keys in order and says whether more exist", async () => {
        const prefix = fresh();
        for (const key of ["c", "a", "d", "b"]) await store.put(`${prefix}${key}`, key);
        await store.put(`${prefix.slice(0, -1)}-sibling`, "not under the prefix");
        const two = await store.list(prefix, { limit: 2 });
        expect(two.items.map((kv) => kv.value)).toEqual(["a", "b"]);
        expect(two.more).toBe(true);
        const four = await store.list(prefix, { limit: 4 });
        expect(four.items.map((kv) => kv.value)).toEqual(["a", "b", "c", "d"]);
        expect(four.more).toBe(false);
        const many = await store.list(prefix, { limit: 100 });
        expect(many.items.length).toBe(4);
        expect(many.more).toBe(false);
        expect(many.revision).toBe((await store.list(prefix)).revision);
        expect((await store.list(fresh(), { limit: 1 })).items).toEqual([]);
        for (const bad of [0, -1, 1.5, Number.NaN]) expect((await rejection(store.list(prefix, { limit: bad }))).message).toMatch(/list limit must be a positive integer/);
      });

      test("list treats prefix characters literally", async () => {
        const prefix = fresh();
        // "a&", "a`", "a+", "ê": the code point right after a prefix's last one must not match.
        for (const key of ["a%", "a_", "a*", "ab", "a%b", "a_b", "é", "éa", "a&", "a`", "a+", "ê"]) await store.put(`${prefix}${key}`, key);
        const keysUnder = async (sub: string): Promise<string[]> =>
          (await store.list(`${prefix}${sub}`)).items.map((kv) => kv.value);
        expect(await keysUnder("a%")).toEqual(["a%", "a%b"]);
        expect(await keysUnder("a_")).toEqual(["a_", "a_b"]);
        expect(await keysUnder("a*")).toEqual(["a*"]);
        expect(await keysUnder("é")).toEqual(["é", "éa"]);
      });
    });

    describe("transactions", () => {
      test("absent (version = 0) holds only for a missing key", async () => {
        const key = `${fresh()}claim`;
        const first = await store.txn([absent(key)], [{ type: "put", key, value: "first" }]);
        expect(first.succeeded).toBe(true);
        expect(await store.get(key)).toMatchObject({ value: "first", modRevision: first.revision });
        const second = await store.txn([absent(key)], [{ type: "put", key, value: "second" }]);
        expect(second).toEqual({ succeeded: false, revision: first.revision });
        expect((await store.get(key))?.value).toBe("first");
      });

      test("the failure branch runs when a compare fails", async () => {
        const prefix = fresh();
        await store.put(`${prefix}k`, "v");
        const result = await store.txn(
          [absent(`${prefix}k`)],
          [{ type: "put", key: `${prefix}success`, value: "s" }],
          [{ type: "put", key: `${prefix}failure`, value: "f" }],
        );
        expect(result.succeeded).toBe(false);
        expect(await store.get(`${prefix}success`)).toBeUndefined();
        expect(await store.get(`${prefix}failure`)).toMatchObject({ value: "f", modRevision: result.revision });
      });

      test("version compares: =, !=, <, >", async () => {
        const key = `${fresh()}k`;
        await store.put(key, "1");
        await store.put(key, "2");
        const holds = async (op: "=" | "!=" | "<" | ">", value: number): Promise<boolean> =>
          (await store.txn([{ key, target: "version", op, value }], [])).succeeded;
        expect([await holds("=", 2), await holds("=", 1), await holds("!=", 1), await holds("!=", 2)]).toEqual([true, false, true, false]);
        expect([await holds("<", 3), await holds("<", 2), await holds(">", 1), await holds(">", 2)]).toEqual([true, false, true, false]);
      });

      test("a missing key compares as version 0 and modRevision 0", async () => {
        const key = `${fresh()}missing`;
        const holds = async (target: "version" | "modRevision", op: "=" | ">", value: number): Promise<boolean> =>
          (await store.txn([{ key, target, op, value }], [])).succeeded;
        expect([await holds("version", "=", 0), await holds("modRevision", "=", 0), await holds("version", ">", 0)]).toEqual([true, true, false]);
      });

      test("value compares", async () => {
        const key = `${fresh()}k`;
        await store.put(key, "blue");
        const holds = async (op: "=" | "!=", value: string): Promise<boolean> =>
          (await store.txn([{ key, target: "value", op, value }], [])).succeeded;
        expect([await holds("=", "blue"), await holds("=", "red"), await holds("!=", "red"), await holds("!=", "blue")]).toEqual([true, false, true, false]);
      });

      test("a value compare on a missing key never holds", async () => {
        const key = `${fresh()}missing`;
        for (const op of ["=", "!="] as const) {
          expect((await store.txn([{ key, target: "value", op, value: "" }], [])).succeeded).toBe(false);
          expect((await store.txn([{ key, target: "value", op, value: "x" }], [])).succeeded).toBe(false);
        }
      });

      test("modRevision compare: compare-and-swap succeeds once per revision", async () => {
        const key = `${fresh()}k`;
        const revision = await store.put(key, "0");
        const swap = (value: string) => store.txn([{ key, target: "modRevision", op: "=", value: revision }], [{ type: "put", key, value }]);
        expect((await swap("1")).succeeded).toBe(true);
        expect((await swap("2")).succeeded).toBe(false);
        expect((await store.get(key))?.value).toBe("1");
        expect((await store.txn([{ key, target: "modRevision", op: ">", value: revision }], [])).succeeded).toBe(true);
        expect((await store.txn([{ key, target: "modRevision", op: "<", value: revision }], [])).succeeded).toBe(false);
      });

      test("every compare must hold", async () => {
        const prefix = fresh();
        await store.put(`${prefix}a`, "a");
        const put = { type: "put", key: `${prefix}out`, value: "x" } as const;
        const aIsA = { key: `${prefix}a`, target: "value", op: "=", value: "a" } as const;
        expect((await store.txn([aIsA, absent(`${prefix}a`)], [put])).succeeded).toBe(false);
        expect(await store.get(`${prefix}out`)).toBeUndefined();
        expect((await store.txn([aIsA, absent(`${prefix}b`)], [put])).succeeded).toBe(true);
      });

      test("all ops of a transaction share one new revision", async () => {
        const prefix = fresh();
        await store.put(`${prefix}gone`, "x");
        const before = await currentRevision();
        const result = await store.txn(
          [],
          [
            { type: "put", key: `${prefix}a`, value: "a" },
            { type: "put", key: `${prefix}b`, value: "b" },
            { type: "delete", key: `${prefix}gone` },
          ],
        );
        expect(result).toEqual({ succeeded: true, revision: before + 1 });
        const { items } = await store.list(prefix);
        expect(items.map((kv) => [kv.key.slice(prefix.length), kv.modRevision, kv.createRevision])).toEqual([
          ["a", before + 1, before + 1],
          ["b", before + 1, before + 1],
        ]);
      });

      test("a transaction that writes nothing keeps the revision", async () => {
        const before = await currentRevision();
        expect(await store.txn([], [])).toEqual({ succeeded: true, revision: before });
        expect(await store.txn([{ key: `${fresh()}x`, target: "version", op: ">", value: 0 }], [{ type: "put", key: `${fresh()}y`, value: "y" }])).toEqual({
          succeeded: false,
          revision: before,
        });
      });

      test("ops are all-or-nothing: a failing op undoes the ones before it", async () => {
        const prefix = fresh();
        const lease = await store.grantLease(5);
        await store.revokeLease(lease);
        const ops = [
          { type: "put", key: `${prefix}first`, value: "1" },
          { type: "put", key: `${prefix}leased`, value: "2", lease },
        ] as const;
        const before = await currentRevision();
        expect(await rejection(store.txn([], ops))).toBeInstanceOf(Error);
        expect(await currentRevision()).toBe(before);
        expect(await store.get(`${prefix}first`)).toBeUndefined();
        expect(await store.get(`${prefix}leased`)).toBeUndefined();
      });

      test("deletePrefix deletes every key under the prefix and nothing else", async () => {
        const prefix = fresh();
        for (const key of ["x/1", "x/2", "x/3/deep", "y", "xz"]) await store.put(`${prefix}${key}`, key);
        const result = await store.txn([], [{ type: "deletePrefix", prefix: `${prefix}x/` }]);
        expect(result.succeeded).toBe(true);
        expect((await store.list(prefix)).items.map((kv) => kv.value)).toEqual(["xz", "y"]);
        const again = await store.txn([], [{ type: "deletePrefix", prefix: `${prefix}x/` }]);
        expect(again.revision).toBe(result.revision);
      });
    });

    describe("watch", () => {
      test("delivers puts and deletes in order, including history before the watch started", async () => {
        const prefix = fresh();
        const from = await store.put(`${prefix}a`, "1");
        await store.put(`${prefix}b`, "2");
        await store.delete(`${prefix}a`);
        const rec = record(store, prefix, from);
        try {
          await rec.waitFor(3);
          await store.put(`${prefix}b`, "3");
          await store.txn([], [{ type: "deletePrefix", prefix }]);
          await rec.waitFor(5);
          expect(describeEvents(rec.events, prefix)).toEqual([
            `put a=1@${from}`,
            `put b=2@${from + 1}`,
            `delete a@${from + 2}`,
            `put b=3@${from + 3}`,
            `delete b@${from + 4}`,
          ]);
          expect(rec.events[2]?.value).toBeUndefined();
          expect(rec.errors).toEqual([]);
        } finally {
          rec.watch.close();
        }
      });

      test("starts at the given revision, skipping older changes", async () => {
        const prefix = fresh();
        await store.put(`${prefix}old`, "old");
        const from = (await currentRevision()) + 1;
        const rec = record(store, prefix, from);
        try {
          await store.put(`${prefix}new`, "new");
          await rec.waitFor(1);
          await sleep(100);
          expect(describeEvents(rec.events, prefix)).toEqual([`put new=new@${from}`]);
        } finally {
          rec.watch.close();
        }
      });

      test("sees only its prefix", async () => {
        const prefix = fresh();
        const rec = record(store, `${prefix}in/`, (await currentRevision()) + 1);
        try {
          await store.put(`${prefix}out`, "x");
          await store.put(`${prefix}in`, "x");
          await store.put(`${prefix}in/a`, "a");
          await store.put(`${prefix}inx`, "x");
          await store.put(`${prefix}in/b`, "b");
          await rec.waitFor(2);
          await sleep(100);
          expect(rec.events.map((e) => e.key.slice(prefix.length))).toEqual(["in/a", "in/b"]);
        } finally {
          rec.watch.close();
        }
      });

      test("events of one transaction share a revision and batches come in revision order", async () => {
        const prefix = fresh();
        const from = (await currentRevision()) + 1;
        const rec = record(store, prefix, from);
        try {
          const one = await store.txn([], [
            { type: "put", key: `${prefix}a`, value: "a" },
            { type: "put", key: `${prefix}b`, value: "b" },
          ]);
          for (let i = 0; i < 20; i++) await store.put(`${prefix}n`, `${i}`);
          await rec.waitFor(22);
          expect(rec.events.slice(0, 2).map((e) => e.modRevision)).toEqual([one.revision, one.revision]);
          const revisions = rec.batches.flat().map((e) => e.modRevision);
          expect(revisions).toEqual([...revisions].sort((a, b) => a - b));
          expect(rec.events.at(-1)?.value).toBe("19");
        } finally {
          rec.watch.close();
        }
      });

      test("close stops delivery", async () => {
        const prefix = fresh();
        const rec = record(store, prefix, (await currentRevision()) + 1);
        await store.put(`${prefix}a`, "a");
        await rec.waitFor(1);
        rec.watch.close();
        await store.put(`${prefix}b`, "b");
        await sleep(200);
        expect(rec.events.length).toBe(1);
      });

      test("a watch from a compacted revision is told so and closed", async () => {
        const prefix = fresh();
        const from = await store.put(`${prefix}a`, "1");
        await store.put(`${prefix}a`, "2");
        const kept = await store.put(`${prefix}a`, "3");
        await store.compact(kept);
        const stale = record(store, prefix, from);
        const current = record(store, prefix, kept);
        try {
          await eventually("onCompacted", () => stale.compacted.length > 0);
          expect(stale.compacted[0]).toBeGreaterThanOrEqual(kept);
          await current.waitFor(1);
          await store.put(`${prefix}a`, "4");
          await current.waitFor(2);
          await sleep(100);
          expect(stale.events).toEqual([]);
          expect(stale.compacted.length).toBe(1);
          expect(describeEvents(current.events, prefix)).toEqual([`put a=3@${kept}`, `put a=4@${kept + 1}`]);
        } finally {
          stale.watch.close();
          current.watch.close();
        }
      });
    });

    describe("leases", () => {
      test("a key put with a lease reports it; a put without one detaches it", async () => {
        const key = `${fresh()}k`;
        const lease = await store.grantLease(30);
        try {
          expect(lease.length).toBeGreaterThan(0);
          await store.put(key, "leased", lease);
          expect((await store.get(key))?.lease).toBe(lease);
          await store.put(key, "free");
          expect((await store.get(key))?.lease).toBeUndefined();
        } finally {
          await store.revokeLease(lease);
        }
        expect(await store.get(key)).toMatchObject({ value: "free" });
      });

      test(
        "keys vanish after the TTL, with delete events",
        async () => {
          const prefix = fresh();
          const grantedAt = Date.now();
          const lease = await store.grantLease(1);
          const from = await store.put(`${prefix}a`, "a", lease);
          await store.txn([], [{ type: "put", key: `${prefix}b`, value: "b", lease }]);
          await store.put(`${prefix}stays`, "s");
          const rec = record(store, prefix, from);
          try {
            await sleep(300);
            expect((await store.list(prefix)).items.length).toBe(3);
            await eventually("lease expiry", async () => (await store.get(`${prefix}a`)) === undefined, 8000);
            expect(Date.now() - grantedAt).toBeGreaterThanOrEqual(1000);
            expect((await store.list(prefix)).items.map((kv) => kv.value)).toEqual(["s"]);
            await rec.waitFor(5);
            expect(rec.events.slice(3).map((e) => `${e.type} ${e.key.slice(prefix.length)}`).sort()).toEqual(["delete a", "delete b"]);
            expect(await store.keepAlive(lease)).toBe(false);
          } finally {
            rec.watch.close();
          }
        },
        LEASE_TEST_MS,
      );

      test(
        "keepAlive extends the lease",
        async () => {
          const key = `${fresh()}k`;
          const lease = await store.grantLease(1);
          try {
            await store.put(key, "v", lease);
            const until = Date.now() + 3000;
            while (Date.now() < until) {
              expect(await store.keepAlive(lease)).toBe(true);
              await sleep(250);
            }
            expect((await store.get(key))?.value).toBe("v");
          } finally {
            await store.revokeLease(lease);
          }
          expect(await store.get(key)).toBeUndefined();
        },
        LEASE_TEST_MS,
      );

      test("revoke deletes the lease's keys at once, with delete events", async () => {
        const prefix = fresh();
        const lease = await store.grantLease(60);
        const from = await store.put(`${prefix}a`, "a", lease);
        await store.put(`${prefix}b`, "b", lease);
        await store.put(`${prefix}c`, "c");
        const rec = record(store, prefix, from);
        await store.revokeLease(lease);
        try {
          expect((await store.list(prefix)).items.map((kv) => kv.value)).toEqual(["c"]);
          await rec.waitFor(5);
          expect(rec.events.slice(3).map((e) => `${e.type} ${e.key.slice(prefix.length)}`).sort()).toEqual(["delete a", "delete b"]);
          expect(await store.keepAlive(lease)).toBe(false);
          await store.revokeLease(lease); // revoking again is harmless
        } finally {
          rec.watch.close();
        }
      });

      test("a put with a revoked lease fails", async () => {
        const key = `${fresh()}k`;
        const lease = await store.grantLease(60);
        await store.revokeLease(lease);
        expect(await rejection(store.put(key, "v", lease))).toBeInstanceOf(Error);
        expect(await store.get(key)).toBeUndefined();
      });
    });

    describe("concurrency", () => {
      test("of 50 concurrent claims of one key exactly one succeeds", async () => {
        const key = `${fresh()}claimed`;
        const results = await Promise.all(
          Array.from({ length: 50 }, (_, i) => store.txn([absent(key)], [{ type: "put", key, value: `claimer-${i}` }])),
        );
        const winners = results.flatMap((result, i) => (result.succeeded ? [i] : []));
        expect(winners.length).toBe(1);
        expect((await store.get(key))?.value).toBe(`claimer-${winners[0]}`);
      });

      test("concurrent compare-and-swap increments lose no update", async () => {
        const key = `${fresh()}counter`;
        await store.put(key, "0");
        const increment = async (): Promise<void> => {
          for (;;) {
            const kv = await store.get(key);
            if (!kv) throw new Error("counter vanished");
            const swap = await store.txn([{ key, target: "modRevision", op: "=", value: kv.modRevision }], [
              { type: "put", key, value: `${Number(kv.value) + 1}` },
            ]);
            if (swap.succeeded) return;
          }
        };
        await Promise.all(Array.from({ length: 20 }, increment));
        expect(await store.get(key)).toMatchObject({ value: "20", version: 21 });
      });
    });
  });
}
