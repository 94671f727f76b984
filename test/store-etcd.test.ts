/**
 * EtcdStore: the shared conformance suite against a real etcd 3.4 running in the lab, plus
 * what only the cluster store must show: knit's keys and leases are really in etcd (checked
 * with etcdctl), a 3-member cluster keeps working when its leader stops, calls fail fast while
 * etcd is down and work again by themselves once it is back, a watch that missed a
 * compaction is told so and can resume, and a short-lived process exits promptly. Both
 * clients run all of it: the gRPC one (etcd3, the agent's) and the JSON gateway one (fetch,
 * the CLI's).
 */
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { join } from "node:path";
import { KnitError } from "../src/errors.ts";
import { type EtcdCluster, type EtcdMember, etcdMissing, startEtcdCluster } from "../src/lab/etcd.ts";
import { Lab, waitFor } from "../src/lab/lab.ts";
import { openEtcdStore } from "../src/store/etcd.ts";
import { openEtcdHttpStore } from "../src/store/etcd-http.ts";
import { type EtcdClient, openStore, parseStoreSpec } from "../src/store/open.ts";
import type { Store, WatchEvent } from "../src/store/store.ts";
import { rejection, runStoreSuite } from "./store-suite.ts";

setDefaultTimeout(60_000);

describe("store specs", () => {
  test("parse etcd, sqlite and directory specs", () => {
    expect(parseStoreSpec(undefined, "/var/lib/knit")).toEqual({ kind: "sqlite", dir: "/var/lib/knit" });
    expect(parseStoreSpec("", "/s")).toEqual({ kind: "sqlite", dir: "/s" });
    expect(parseStoreSpec("sqlite:/data/k", "/s")).toEqual({ kind: "sqlite", dir: "/data/k" });
    expect(parseStoreSpec("/data/k2", "/s")).toEqual({ kind: "sqlite", dir: "/data/k2" });
    expect(parseStoreSpec("rel/dir", "/s")).toEqual({ kind: "sqlite", dir: join(process.cwd(), "rel/dir") });
    expect(parseStoreSpec("etcd://10.0.0.1:2379", "/s")).toEqual({ kind: "etcd", endpoints: ["10.0.0.1:2379"] });
    expect(parseStoreSpec("etcd://a:2379,b.example:2379,[fd00::1]:2379/", "/s")).toEqual({
      kind: "etcd",
      endpoints: ["a:2379", "b.example:2379", "[fd00::1]:2379"],
    });
    expect(parseStoreSpec("etcd://a:2379/team1", "/s")).toEqual({ kind: "etcd", endpoints: ["a:2379"], prefix: "/team1/" });
  });

  test("bad specs fail with invalid-argument naming the problem", () => {
    const failure = (spec: string): KnitError => {
      try {
        parseStoreSpec(spec, "/s");
      } catch (err) {
        if (err instanceof KnitError) return err;
      }
      throw new Error(`${spec} was accepted`);
    };
    expect(failure("etcd://")).toMatchObject({ code: "invalid-argument" });
    expect(failure("etcd://").message).toContain('bad etcd endpoint ""');
    expect(failure("etcd://a").message).toContain('bad etcd endpoint "a"');
    expect(failure("etcd://a:99999")).toMatchObject({ code: "invalid-argument" });
    expect(failure("etcd://a:2379,,b:2379")).toMatchObject({ code: "invalid-argument" });
    expect(failure("consul://a:8500")).toMatchObject({ code: "invalid-argument" });
    expect(failure("consul://a:8500").message).toContain("unknown store");
    expect(failure("sqlite:")).toMatchObject({ code: "invalid-argument" });
  });

  test("a sqlite spec does not load the etcd client", async () => {
    const dir = `/tmp/knit-spec-${process.pid}-${Date.now()}`;
    const script = `const { openStore } = await import(${JSON.stringify(join(import.meta.dir, "../src/store/open.ts"))});
      const store = await openStore(${JSON.stringify(`sqlite:${dir}`)}, "/nonexistent");
      await store.put("k", "v");
      await store.close();
      console.log(Object.keys(require.cache).some((path) => path.includes("/etcd3/") || path.includes("@grpc")));
      require("node:fs").rmSync(${JSON.stringify(dir)}, { recursive: true, force: true });`;
    const child = Bun.spawn([process.execPath, "-e", script], { stdout: "pipe", stderr: "pipe" });
    const [stdout, stderr, code] = await Promise.all([new Response(child.stdout).text(), new Response(child.stderr).text(), child.exited]);
    expect({ code, stderr, stdout: stdout.trim() }).toEqual({ code: 0, stderr: "", stdout: "false" });
  });
});

const missing = etcdMissing();
const title = missing ? `etcd in the lab (skipped: ${missing})` : "etcd in the lab";

describe.skipIf(missing !== undefined)(title, () => {
  let lab: Lab;
  /** One member: the conformance suite, then the outage test. */
  let solo: EtcdCluster;
  /** Three members: losing one, resuming a watch across a compaction. */
  let trio: EtcdCluster;
  const stores: Store[] = [];
  /** A store of either client, not tracked. */
  const openWith = async (client: EtcdClient, endpoints: readonly string[], options: { prefix?: string; watchGraceMs?: number } = {}): Promise<Store> =>
    client === "grpc" ? openEtcdStore({ endpoints, ...options }) : openEtcdHttpStore({ endpoints, ...options });

  beforeAll(async () => {
    lab = await Lab.create("e");
    [solo, trio] = await Promise.all([
      startEtcdCluster(lab, { label: "solo", size: 1, subnet: "10.79.1.0/24" }),
      startEtcdCluster(lab, { label: "trio", size: 3, subnet: "10.79.3.0/24" }),
    ]);
  });

  afterAll(async () => {
    for (const store of stores) await store.close();
    const selfLinks = (): string[] => (JSON.parse(Bun.spawnSync(["ip", "-j", "link"]).stdout.toString()) as { ifname: string }[]).map((l) => l.ifname);
    expect(selfLinks().filter((name) => name.startsWith(`${lab.id}-`)).length).toBe(2);
    expect(await lab.cleanup()).toEqual([]);
    // The veths into the clusters' LANs go with the LANs (the kernel frees a namespace a moment later).
    expect(await waitFor(() => !selfLinks().some((name) => name.startsWith(`${lab.id}-`)), 10_000)).toBe(true);
  });

  /** etcdctl inside a member's namespace, against that member (or `endpoints`). */
  const etcdctl = async (member: EtcdMember, args: readonly string[], endpoints = member.endpoint): Promise<string> =>
    (await member.node.exec(["etcdctl", `--endpoints=${endpoints}`, "--command-timeout=3s", ...args])).stdout;
  const first = (cluster: EtcdCluster): EtcdMember => {
    const member = cluster.members[0];
    if (!member) throw new Error("cluster without members");
    return member;
  };

  for (const client of ["grpc", "http"] as const satisfies readonly EtcdClient[]) {
  /** A store this test closes in afterAll at the latest. */
  const open = async (endpoints: readonly string[], options: { prefix?: string; watchGraceMs?: number } = {}): Promise<Store> => {
    const store = await openWith(client, endpoints, options);
    stores.push(store);
    return store;
  };

  /** The suite against a cluster; afterwards nothing it wrote may stay (checked with etcdctl). */
  const suite = (name: string, cluster: () => EtcdCluster): void =>
    runStoreSuite(
      name,
      () => openWith(client, cluster().endpoints),
      async () => {
        const store = await openWith(client, cluster().endpoints);
        await store.txn([], [{ type: "deletePrefix", prefix: "conformance/" }]);
        await store.close();
        expect(await etcdctl(first(cluster()), ["get", "--prefix", "/knit/", "--keys-only"])).toBe("");
      },
    );
  suite(`etcd (${client} client)`, () => solo);
  // Three members: reads, writes and watches spread over members that must agree.
  suite(`etcd, 3 members (${client} client)`, () => trio);

  describe(`EtcdStore (${client} client)`, () => {
    test("knit's keys live under the root prefix in etcd; describe names the endpoints", async () => {
      const member = first(solo);
      const store = await openStore(`etcd://${member.endpoint}`, "/nonexistent", { etcdClient: client });
      const team = await openStore(`etcd://${member.endpoint}/team1`, "/nonexistent", { etcdClient: client });
      try {
        expect(store.describe).toBe(`etcd:${member.endpoint}`);
        expect(team.describe).toBe(`etcd:${member.endpoint} (prefix /team1/)`);
        const revision = await store.put("networks/n1", '{"name":"n1"}');
        await team.put("networks/n1", "team");
        await etcdctl(member, ["put", "/other/networks/n2", "not knit's"]);
        expect(await etcdctl(member, ["get", "/knit/networks/n1", "--print-value-only"])).toBe('{"name":"n1"}\n');
        expect(await etcdctl(member, ["get", "/team1/networks/n1", "--print-value-only"])).toBe("team\n");
        const listed = await store.list("");
        expect(listed.items.map((kv) => [kv.key, kv.value])).toEqual([["networks/n1", '{"name":"n1"}']]);
        expect(listed.revision).toBeGreaterThan(revision);
        // etcd's own revision numbers are the store's.
        const status = JSON.parse(await etcdctl(member, ["get", "/knit/networks/n1", "-w", "json"])) as { kvs: { mod_revision: number }[] };
        expect(status.kvs[0]?.mod_revision).toBe(revision);
        await store.txn([], [{ type: "deletePrefix", prefix: "" }]);
        await team.delete("networks/n1");
        await etcdctl(member, ["del", "/other/networks/n2"]);
        expect(await etcdctl(member, ["get", "--prefix", "/", "--keys-only"])).toBe("");
      } finally {
        await store.close();
        await team.close();
      }
    });

    test("leases are etcd leases: etcdctl sees the TTL, and revoke removes it", async () => {
      const member = first(solo);
      const store = await open(solo.endpoints);
      const lease = await store.grantLease(30);
      const hex = BigInt(lease).toString(16).padStart(16, "0");
      await store.put("hosts/h1", "h1", lease);
      const ttl = await etcdctl(member, ["lease", "timetolive", hex, "--keys"]);
      expect(ttl).toMatch(new RegExp(`lease ${hex} granted with TTL\\(30s\\), remaining\\(\\d+s\\), attached keys\\(\\[/knit/hosts/h1\\]\\)`));
      await store.revokeLease(lease);
      expect(await etcdctl(member, ["lease", "list"])).not.toContain(hex);
      expect(await etcdctl(member, ["get", "--prefix", "/knit/", "--keys-only"])).toBe("");
    });

    test("a watch from revision 0 starts after the current revision", async () => {
      const store = await open(solo.endpoints);
      await store.put("now/old", "x");
      const events: WatchEvent[] = [];
      const watch = store.watch("now/", 0, { onEvents: (batch) => events.push(...batch) });
      try {
        // The watch is created asynchronously: keep writing until it reports.
        const reported = async (): Promise<boolean> => {
          await store.put("now/new", "y");
          return events.length > 0;
        };
        expect(await waitFor(reported, 5000, 50)).toBe(true);
        expect(events.every((e) => e.key === "now/new")).toBe(true);
      } finally {
        watch.close();
      }
      await store.txn([], [{ type: "deletePrefix", prefix: "now/" }]);
    });

    test("a process that opens the store, reads a key and closes exits promptly", async () => {
      const script = `const t0 = performance.now();
        const { openStore } = await import(${JSON.stringify(join(import.meta.dir, "../src/store/open.ts"))});
        const store = await openStore(${JSON.stringify(solo.spec)}, "/nonexistent", { etcdClient: ${JSON.stringify(client)} });
        const t1 = performance.now();
        await store.get("missing");
        await store.close();
        console.log(JSON.stringify({ openMs: t1 - t0, getCloseMs: performance.now() - t1, closedAt: Date.now() }));`;
      const runs: { total: number; open: number; getClose: number; exitAfterClose: number }[] = [];
      for (let i = 0; i < 3; i++) {
        const started = Date.now();
        const child = Bun.spawn([process.execPath, "-e", script], { stdout: "pipe", stderr: "pipe" });
        const [stdout, stderr, code] = await Promise.all([new Response(child.stdout).text(), new Response(child.stderr).text(), child.exited]);
        const exited = Date.now();
        expect({ code, stderr }).toEqual({ code: 0, stderr: "" });
        const times = JSON.parse(stdout) as { openMs: number; getCloseMs: number; closedAt: number };
        runs.push({ total: exited - started, open: times.openMs, getClose: times.getCloseMs, exitAfterClose: exited - times.closedAt });
      }
      const rounded = runs.map((run) => Object.fromEntries(Object.entries(run).map(([k, v]) => [k, Math.round(v)])));
      console.log(`etcd store (${client}) process timings (ms): ${JSON.stringify(rounded)}`);
      for (const run of runs) {
        expect(run.exitAfterClose).toBeLessThan(500);
        expect(run.total).toBeLessThan(5000);
      }
    });

    test("while etcd is down, calls fail within 3 s with a store error; they work again once it is back", async () => {
      const member = first(solo);
      const store = await open(solo.endpoints, { watchGraceMs: 1000 });
      await store.put("outage/k", "before");
      const lease = await store.grantLease(60);
      const watchErrors: Error[] = [];
      const watch = store.watch("outage/", 0, { onEvents: () => undefined, onError: (err) => watchErrors.push(err) });
      await member.stop();
      try {
        const calls: [string, () => Promise<unknown>][] = [
          ["get", () => store.get("outage/k")],
          ["list", () => store.list("outage/")],
          ["put", () => store.put("outage/k", "during")],
          ["txn", () => store.txn([{ key: "outage/k", target: "version", op: ">", value: 0 }], [{ type: "delete", key: "outage/k" }])],
          ["delete", () => store.delete("outage/k")],
          ["grantLease", () => store.grantLease(10)],
          ["keepAlive", () => store.keepAlive(lease)],
          ["revokeLease", () => store.revokeLease(lease)],
        ];
        const started = Date.now();
        const failures = await Promise.all(
          calls.map(async ([name, call]) => {
            const err = await rejection(call());
            return { name, err, elapsed: Date.now() - started };
          }),
        );
        console.log(`etcd store (${client}) down: calls failed after ${JSON.stringify(failures.map((f) => [f.name, f.elapsed]))} ms`);
        for (const { name, err, elapsed } of failures) {
          expect({ name, elapsedUnder3s: elapsed < 3000 }).toEqual({ name, elapsedUnder3s: true });
          expect(err).toBeInstanceOf(KnitError);
          expect((err as KnitError).code).toBe("store");
          expect(err.message).toContain(`cannot reach the cluster store at ${member.endpoint}`);
          expect((err as KnitError).hint).toContain(member.endpoint);
        }
        expect(await waitFor(() => watchErrors.length > 0, 5000)).toBe(true);
        expect(watchErrors[0]).toBeInstanceOf(KnitError);
        expect(watchErrors[0]?.message).toContain("cannot reach the cluster store");
      } finally {
        watch.close();
        await member.start();
      }
      // The same store, not reopened, works again by itself.
      const back = Date.now();
      expect(await waitFor(async () => (await store.get("outage/k").catch(() => undefined))?.value === "before", 10_000, 50)).toBe(true);
      console.log(`etcd store: first successful call ${Date.now() - back} ms after the member was healthy again`);
      expect(await store.keepAlive(lease)).toBe(true);
      await store.revokeLease(lease);
      expect(await store.delete("outage/k")).toBe(true);
      expect(await etcdctl(member, ["get", "--prefix", "/knit/", "--keys-only"])).toBe("");
    });

    test("a 3-member cluster keeps serving when its leader is killed; the member catches up when it is back", async () => {
      const all = trio.endpoints.join(",");
      // Member ids are 64-bit: keep them as strings.
      const json = (await etcdctl(first(trio), ["endpoint", "status", "-w", "json"], all)).replace(/:(\d{10,})/g, ':"$1"');
      const status = JSON.parse(json) as { Endpoint: string; Status: { header: { member_id: string }; leader: string } }[];
      const leaderEndpoint = status.find((s) => s.Status.header.member_id === s.Status.leader)?.Endpoint;
      const leader = trio.members.find((m) => `http://${m.endpoint}` === leaderEndpoint || m.endpoint === leaderEndpoint);
      if (!leader) throw new Error(`no leader in ${JSON.stringify(status)}`);
      const survivor = trio.members.find((m) => m !== leader);
      if (!survivor) throw new Error("no second member");

      const store = await open(trio.endpoints);
      await store.put("ha/before", "1");
      await leader.crash();
      try {
        // Electing a new leader takes a moment (election timeout 1 s); then every write works.
        const crashedAt = Date.now();
        expect(await waitFor(async () => (await store.put("ha/probe", "x").catch(() => 0)) > 0, 15_000, 100)).toBe(true);
        console.log(`etcd 3-member cluster (${client}): writes work again ${Date.now() - crashedAt} ms after the leader was killed`);
        for (let i = 0; i < 10; i++) {
          const claim = await store.txn([{ key: `ha/claim${i}`, target: "version", op: "=", value: 0 }], [{ type: "put", key: `ha/claim${i}`, value: `${i}` }]);
          expect(claim.succeeded).toBe(true);
        }
        expect((await store.list("ha/")).items.map((kv) => kv.key)).toEqual([
          "ha/before",
          ...Array.from({ length: 10 }, (_, i) => `ha/claim${i}`),
          "ha/probe",
        ]);
        expect(await etcdctl(survivor, ["get", "/knit/ha/claim9", "--print-value-only"])).toBe("9\n");
      } finally {
        await leader.start();
      }
      // The restarted member has the writes it missed (a local, serializable read on it).
      const local = (): Promise<string> => etcdctl(leader, ["get", "/knit/ha/claim9", "--print-value-only", "--consistency=s"]);
      expect(await waitFor(async () => (await local()) === "9\n", 10_000)).toBe(true);
      await store.txn([], [{ type: "deletePrefix", prefix: "ha/" }]);
      expect(await etcdctl(survivor, ["get", "--prefix", "/knit/", "--keys-only"])).toBe("");
    });

    test("a watch that misses a compaction while its member is down is told so, and resumes after a re-list", async () => {
      const member = first(trio);
      const others = trio.endpoints.filter((endpoint) => endpoint !== member.endpoint);
      const watcher = await open([member.endpoint], { watchGraceMs: 60_000 });
      const writer = await open(others);
      const events: WatchEvent[] = [];
      const compacted: number[] = [];
      const errors: Error[] = [];
      const from = await writer.put("resume/a", "1");
      const watch = watcher.watch("resume/", from, {
        onEvents: (batch) => events.push(...batch),
        onCompacted: (revision) => compacted.push(revision),
        onError: (err) => errors.push(err),
      });
      let resumed: ReturnType<Store["watch"]> | undefined;
      try {
        expect(await waitFor(() => events.length === 1, 5000, 20)).toBe(true);
        await member.crash();
        try {
          expect(await waitFor(async () => (await writer.put("resume/b", "2").catch(() => 0)) > 0, 15_000, 100)).toBe(true);
          const last = await writer.put("resume/c", "3");
          await writer.compact(last);
        } finally {
          await member.start();
        }
        expect(await waitFor(() => compacted.length > 0, 10_000, 20)).toBe(true);
        expect(errors).toEqual([]);
        expect(events.map((e) => `${e.type} ${e.key}=${e.value ?? ""}`)).toEqual(["put resume/a=1"]);
        // As the interface says: re-list, then watch from the listed revision + 1.
        const listed = await watcher.list("resume/");
        expect(listed.revision).toBeGreaterThanOrEqual(compacted[0] ?? Infinity);
        expect(listed.items.map((kv) => kv.value)).toEqual(["1", "2", "3"]);
        const later: WatchEvent[] = [];
        resumed = watcher.watch("resume/", listed.revision + 1, { onEvents: (batch) => later.push(...batch) });
        const d = await writer.put("resume/d", "4");
        expect(await waitFor(() => later.length === 1, 5000, 20)).toBe(true);
        expect(later).toEqual([{ type: "put", key: "resume/d", value: "4", modRevision: d }]);
      } finally {
        watch.close();
        resumed?.close();
      }
      await writer.txn([], [{ type: "deletePrefix", prefix: "resume/" }]);
      expect(await etcdctl(member, ["get", "--prefix", "/knit/", "--keys-only"])).toBe("");
    });
  });
  }
});
