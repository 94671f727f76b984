/**
 * SqliteStore: the shared conformance suite, plus what only an embedded store must show:
 * many processes sharing one file serialize correctly, and data survives reopening.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { openSqliteStore } from "../src/store/sqlite.ts";
import { rejection, runStoreSuite } from "./store-suite.ts";

const dirs: string[] = [];
const freshDir = (): string => {
  const dir = mkdtempSync(join(tmpdir(), "knit-store-"));
  dirs.push(dir);
  return dir;
};
afterAll(() => {
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

const suiteDir = freshDir();
runStoreSuite("sqlite", () => openSqliteStore(suiteDir), async () => rmSync(suiteDir, { recursive: true, force: true }));
// Where inotify is unavailable, watches poll instead: the same suite on that path.
const pollDir = freshDir();
runStoreSuite("sqlite, watches polling (no change notifications)", () => openSqliteStore(pollDir, { changeNotifications: false }), async () => rmSync(pollDir, { recursive: true, force: true }));

describe("SqliteStore", () => {
  test("describe names the database file", async () => {
    const dir = freshDir();
    const store = await openSqliteStore(dir);
    expect(store.describe).toBe(`sqlite:${join(dir, "knit.db")}`);
    await store.close();
  });

  test(
    "20 processes claiming free keys at once never claim the same key",
    async () => {
      const dir = freshDir();
      const processes = 20;
      const perProcess = 4;
      const fixture = join(import.meta.dir, "fixtures", "store-claim.ts");
      const startAt = Date.now() + 1500;
      const children = Array.from({ length: processes }, () =>
        Bun.spawn([process.execPath, fixture, dir, `${perProcess}`, `${startAt}`], { stdout: "pipe", stderr: "pipe" }),
      );
      const outputs = await Promise.all(
        children.map(async (child) => {
          const [stdout, stderr, code] = await Promise.all([new Response(child.stdout).text(), new Response(child.stderr).text(), child.exited]);
          expect({ code, stderr }).toEqual({ code: 0, stderr: "" });
          return JSON.parse(stdout) as string[];
        }),
      );
      const claimed = outputs.flat();
      expect(claimed.length).toBe(processes * perProcess);
      expect(new Set(claimed).size).toBe(processes * perProcess);

      const store = await openSqliteStore(dir);
      try {
        const { items, revision } = await store.list("ipam/n/");
        expect(items.length).toBe(processes * perProcess);
        expect(new Set(items.map((kv) => kv.value)).size).toBe(processes);
        // Each successful claim is exactly one revision; failed claims write nothing.
        expect(revision).toBe(processes * perProcess);
        expect(items.every((kv) => kv.version === 1)).toBe(true);
      } finally {
        await store.close();
      }
    },
    60_000,
  );

  test("reopening keeps keys, versions and the revision", async () => {
    const dir = freshDir();
    const first = await openSqliteStore(dir);
    await first.put("k", "1");
    const revision = await first.put("k", "2");
    await first.put("other", "x");
    await first.close();

    const second = await openSqliteStore(dir);
    try {
      expect(await second.get("k")).toMatchObject({ value: "2", version: 2, createRevision: 1, modRevision: revision });
      expect((await second.list("")).revision).toBe(revision + 1);
      expect(await second.put("k", "3")).toBe(revision + 2);
    } finally {
      await second.close();
    }
  });

  test(
    "history is bounded: the oldest events are compacted automatically",
    async () => {
      const store = await openSqliteStore(freshDir());
      try {
        let revision = 0;
        for (let i = 0; i < 11_001; i++) revision = await store.put("counter", `${i}`);
        const compacted: number[] = [];
        const events: number[] = [];
        const stale = store.watch("", 1, { onEvents: () => undefined, onCompacted: (rev) => compacted.push(rev) });
        const recent = store.watch("", revision - 9_999, { onEvents: (batch) => events.push(...batch.map((e) => e.modRevision)) });
        await Bun.sleep(300);
        stale.close();
        recent.close();
        expect(compacted).toEqual([revision]);
        expect(events.length).toBe(10_000);
        expect(events.at(-1)).toBe(revision);
      } finally {
        await store.close();
      }
    },
    60_000,
  );

  test("a watch from revision 0 starts after the current revision", async () => {
    const store = await openSqliteStore(freshDir());
    try {
      await store.put("old", "x");
      const keys: string[] = [];
      const watch = store.watch("", 0, { onEvents: (batch) => keys.push(...batch.map((e) => e.key)) });
      await store.put("new", "y");
      await Bun.sleep(150);
      watch.close();
      expect(keys).toEqual(["new"]);
    } finally {
      await store.close();
    }
  });

  test("an open watch does not keep the process alive", async () => {
    const dir = freshDir();
    const script = `import { openSqliteStore } from ${JSON.stringify(join(import.meta.dir, "../src/store/sqlite.ts"))};
      const store = await openSqliteStore(${JSON.stringify(dir)});
      store.watch("", 1, { onEvents() {} });
      console.log("watching");`;
    const child = Bun.spawn([process.execPath, "-e", script], { stdout: "pipe", stderr: "pipe" });
    const timeout = setTimeout(() => child.kill(), 5000);
    const [code, stdout] = await Promise.all([child.exited, new Response(child.stdout).text()]);
    clearTimeout(timeout);
    expect({ code, stdout: stdout.trim() }).toEqual({ code: 0, stdout: "watching" });
  });

  test("a closed store rejects operations", async () => {
    const store = await openSqliteStore(freshDir());
    await store.close();
    expect((await rejection(store.get("k"))).message).toMatch(/closed/);
    expect(() => store.watch("", 1, { onEvents: () => undefined })).toThrow(/closed/);
  });
});
