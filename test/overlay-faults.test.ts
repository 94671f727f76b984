/**
 * Overlay networks when things break (the "Faults" list), in the 3-host cluster lab:
 *
 *   - an agent killed with -9 and restarted reconciles its data path exactly (entries that
 *     went missing come back, stale and wrong ones go, nothing twice), while traffic between
 *     the other hosts never stops;
 *   - a host that vanishes (agent dead, lease expired) leaves every other host's data path
 *     and DNS within the TTL, and its addresses are freed;
 *   - etcd down: traffic keeps flowing (by IP and by name), commands fail fast with a clear
 *     error, and the agents catch up by themselves when etcd is back;
 *   - a host cut off from etcd by a firewall rule (longer than its TTL) is dropped by the
 *     others, and rejoins cleanly when the rule goes.
 *
 * Every check reads the kernel (`bridge -j fdb`, `ip -j neigh`, `ip -j link`) or sends real
 * traffic between sandboxes.
 */
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { Lab, type LabProcess, waitFor } from "../src/lab/lab.ts";
import { etcdMissing } from "../src/lab/etcd.ts";
import { ClusterLab, type ClusterHost } from "../src/demo/cluster-lab.ts";
import { keys, type Endpoint, type HostRecord } from "../src/model.ts";
import { assertClusterClean } from "./overlay-lab.ts";

setDefaultTimeout(120_000);

let lab: Lab;
let c: ClusterLab;
let h1: ClusterHost;
let h2: ClusterHost;
let h3: ClusterHost;
let net = "";

type Sb = Awaited<ReturnType<ClusterLab["sandbox"]>>;

/**
 * Start a ping that runs until stopped; returns a function that stops it and says how it went.
 * It runs for at least 1.5 s (30 packets), however fast the commands in between were.
 */
function pingUntilStopped(from: Sb, to: string): () => Promise<{ sent: number; received: number }> {
  const proc: LabProcess = lab.spawn(from.ns, ["ping", "-n", "-i", "0.05", to]);
  const started = performance.now();
  return async () => {
    await Bun.sleep(Math.max(0, 1500 - (performance.now() - started)));
    proc.kill("SIGINT"); // ping prints its statistics on SIGINT
    await proc.exited;
    const m = /(\d+) packets transmitted, (\d+) received/.exec(proc.output());
    return { sent: Number(m?.[1] ?? 0), received: Number(m?.[2] ?? 0) };
  };
}

/** Does `name` resolve (through the sandbox's own resolv.conf, i.e. knit's DNS)? */
async function resolves(sb: Sb, name: string): Promise<boolean> {
  return (await c.inSandbox(sb.pid, ["getent", "hosts", name])).code === 0;
}

const endpointsOf = async (host: string): Promise<Endpoint[]> =>
  (await c.store.list(keys.endpointsOf(net))).items.map((kv) => JSON.parse(kv.value) as Endpoint).filter((ep) => ep.host === host);

/** True when neither FDB nor neighbour table of `h` knows anything of host `gone`'s endpoints. */
async function forgotten(h: ClusterHost, gone: ClusterHost, ips: readonly string[]): Promise<boolean> {
  const fdb = await c.fdb(h, net);
  const neigh = await c.neigh(h, net);
  return !fdb.some((e) => e.dst === gone.address) && !neigh.some((n) => ips.includes(n.ip));
}

const missing = etcdMissing();

describe.skipIf(missing !== undefined)("overlay faults", () => {
  beforeAll(async () => {
    lab = await Lab.create("ovf");
    c = await ClusterLab.create(lab, { etcdNet: 82 });
    [h1, h2, h3] = c.hosts as [ClusterHost, ClusterHost, ClusterHost];
    net = await c.knitOk(h1, ["network", "create", "-d", "overlay", "--subnet", "10.97.0.0/24", "fnet"]);
    await Promise.all([
      c.knitOk(h1, ["run", "-d", "--name", "a", "--network", "fnet", "--", "sleep", "3600"]),
      c.knitOk(h2, ["run", "-d", "--name", "b", "--network", "fnet", "--", "sleep", "3600"]),
      c.knitOk(h3, ["run", "-d", "--name", "c", "--network", "fnet", "--", "sleep", "3600"]),
    ]);
    expect(await c.peersConverged(net)).toBe(true);
  });

  afterAll(async () => {
    try {
      if (c) {
        await lab.exec(h3.host, ["nft", "delete", "table", "ip", "labcut"], { check: false });
        if (!c.etcd.members[0]?.running) await c.etcd.members[0]?.start();
        for (const h of c.hosts) if (!h.agent?.running) await c.startAgent(h);
        for (const h of c.hosts) {
          const left = (await c.knit(h, ["ps", "-aq"])).stdout.split("\n").filter(Boolean);
          if (left.length) await c.knit(h, ["rm", "-f", ...left]);
        }
        await c.knit(h1, ["network", "rm", "fnet"]);
        await assertClusterClean(c);
      }
    } finally {
      await lab?.cleanup();
    }
  });

  test("an agent killed with -9 and restarted reconciles exactly; traffic between other hosts never stops", async () => {
    await c.knitOk(h2, ["run", "-d", "--name", "b2", "--network", "fnet", "--", "sleep", "3600"]);
    expect(await c.peersConverged(net)).toBe(true);
    const [a, b, b2] = [await c.sandbox(h1, "a"), await c.sandbox(h2, "b"), await c.sandbox(h2, "b2")];
    const eps = new Map((await c.store.list(keys.endpointsOf(net))).items.map((kv) => JSON.parse(kv.value) as Endpoint).map((ep) => [ep.sandboxId, ep]));
    const macOf = (sb: Sb): string => eps.get(sb.id)?.mac ?? "?";
    const stopPing = pingUntilStopped(a, b.ip["fnet"] ?? "?");
    await c.stopAgent(h3, "SIGKILL");
    // While it is dead: a sandbox comes (on h1), one goes (on h2), and h3's tables are damaged:
    // a flooding entry, an entry for nobody, a lost entry, a wrong destination.
    await c.knitOk(h1, ["run", "-d", "--name", "d", "--network", "fnet", "--", "sleep", "3600"]);
    await c.knitOk(h2, ["rm", "-f", "b2"]);
    const vx = `vx-${net.slice(0, 12)}`;
    await lab.run(["nsenter", `--net=${h3.host.path}`, "bridge", "-batch", "-"], {
      stdin: [
        `fdb append 00:00:00:00:00:00 dev ${vx} dst 10.80.0.99 self permanent`,
        `fdb add 02:42:de:ad:be:ef dev ${vx} dst ${h2.address} self permanent`,
        `fdb add 02:42:de:ad:be:ef dev ${vx} master static`,
        `fdb del ${macOf(a)} dev ${vx} dst ${h1.address} self`,
        `fdb del ${macOf(a)} dev ${vx} master`,
        `fdb replace ${macOf(b)} dev ${vx} dst 10.80.0.99 self permanent`,
      ].join("\n") + "\n",
    });
    await h3.host.exec(["ip", "neigh", "add", "10.97.0.250", "lladdr", "02:42:de:ad:be:ef", "dev", vx, "nud", "permanent"]);
    // h3 is wrong now: it still knows b2, not d; not a; b behind a host that does not exist.
    const c3 = await c.sandbox(h3, "c");
    expect((await c.fdb(h3, net)).some((e) => e.mac === macOf(b2))).toBe(true);
    expect(await lab.ping(c3.ns, a.ip["fnet"] ?? "?", { waitSec: 0.5 })).toBe(false);

    await c.startAgent(h3);
    expect(await c.peersConverged(net, 5000)).toBe(true);
    const fdb = await c.fdb(h3, net);
    const want = await c.expectedPeers(h3, net);
    expect(await c.actualPeers(h3, net)).toEqual(want);
    expect(fdb.length).toBe(3); // a, b, d: one each; no b2, no dead beef, no flooding entry
    expect((await c.bridged(h3, net)).length).toBe(3);
    expect(new Set(fdb.map((e) => e.mac)).size).toBe(3);
    expect(fdb.map((e) => e.mac)).not.toContain("00:00:00:00:00:00");
    const d = await c.sandbox(h1, "d");
    for (const target of [a, b, d]) expect(await lab.waitPing(c3.ns, target.ip["fnet"] ?? "?")).toBe(true);
    expect(await resolves(c3, "d")).toBe(true);
    expect(await resolves(c3, "b2")).toBe(false);
    // h3 stayed in the cluster all along (restarted within its TTL): c was never freed.
    expect((await endpointsOf("h3")).length).toBe(1);
    const { sent, received } = await stopPing();
    expect(sent).toBeGreaterThan(20);
    expect(received).toBe(sent);
    await c.knitOk(h1, ["rm", "-f", "d"]);
  });

  test("a host that vanishes leaves every data path and DNS within the TTL; its addresses are freed", async () => {
    const ttl = 3;
    await c.stopAgent(h3);
    await c.startAgent(h3, ["--lease-ttl", String(ttl)]);
    expect((JSON.parse((await c.store.get(keys.host("h3")))?.value ?? "{}") as HostRecord).ttl).toBe(ttl);
    const [a, b, c3] = [await c.sandbox(h1, "a"), await c.sandbox(h2, "b"), await c.sandbox(h3, "c")];
    const cIp = c3.ip["fnet"] ?? "?";
    expect(await resolves(a, "c")).toBe(true);
    expect(await lab.waitPing(a.ns, cIp)).toBe(true);

    const killed = performance.now();
    await c.stopAgent(h3, "SIGKILL");
    const gone = await waitFor(async () => (await forgotten(h1, h3, [cIp])) && (await forgotten(h2, h3, [cIp])) && !(await resolves(a, "c")) && !(await resolves(b, "c")), 15_000, 50);
    const took = performance.now() - killed;
    expect(gone).toBe(true);
    // Within the TTL (plus etcd's expiry tick of 0.5 s and a little slack for a busy machine).
    expect(took).toBeLessThan(ttl * 1000 + 1500);
    console.log(`vanished host dropped from data path and DNS ${Math.round(took)} ms after its agent was killed (TTL ${ttl} s)`);
    expect(await lab.ping(a.ns, cIp, { waitSec: 0.5 })).toBe(false);
    // Its address is free: the store has no claim on it, and another sandbox can take it.
    expect(await endpointsOf("h3")).toEqual([]);
    expect(await c.store.get(keys.ipam(net, cIp))).toBeUndefined();
    await c.knitOk(h1, ["run", "-d", "--name", "taker", "--network", "fnet", "--ip", cIp, "--", "sleep", "3600"]);
    expect(await resolves(b, "taker")).toBe(true);
    expect((await c.knitOk(h1, ["host", "ls", "--format", "{{.Name}} {{.Status}}"])).split("\n")).toContain("h3 down");

    // The host comes back: its agent takes away what the others freed (c's overlay interface,
    // and docker_gwbridge, which c needed only for it) and the devices of fnet (no endpoint left).
    await c.startAgent(h3);
    const clean = await waitFor(async () => {
      const links = JSON.parse((await lab.exec(c3.ns, ["ip", "-j", "link"])).stdout) as { ifname: string }[];
      return links.every((l) => l.ifname === "lo") && (await c.vxlan(h3, net)) === undefined;
    }, 10_000);
    expect(clean).toBe(true);
    expect((await c.knitOk(h1, ["host", "ls", "--format", "{{.Name}} {{.Status}}"])).split("\n")).toContain("h3 alive");
    expect(await c.peersConverged(net)).toBe(true);
    await c.knitOk(h3, ["rm", "-f", "c"]);
    await c.knitOk(h1, ["rm", "-f", "taker"]);
  });

  test("etcd down: traffic keeps flowing, commands fail fast, agents catch up when it is back", async () => {
    const [a, b] = [await c.sandbox(h1, "a"), await c.sandbox(h2, "b")];
    const stopPing = pingUntilStopped(a, b.ip["fnet"] ?? "?");
    const member = c.etcd.members[0];
    if (!member) throw new Error("no etcd");
    await member.stop();
    expect(await lab.waitPing(a.ns, b.ip["fnet"] ?? "?")).toBe(true);
    expect(await resolves(a, "b")).toBe(true); // the agents answer from what they hold
    for (const args of [["network", "ls"], ["run", "-d", "--name", "x", "--network", "fnet", "--", "sleep", "1"]]) {
      const started = performance.now();
      const r = await c.knit(h1, args);
      const ms = performance.now() - started;
      expect(r.code).not.toBe(0);
      expect(r.stderr).toContain("cannot reach the cluster store");
      expect(ms).toBeLessThan(6000);
    }
    // Down long enough for the agents' watches to give up (5 s) and their leases to need renewal.
    await Bun.sleep(6500);
    expect(await lab.waitPing(a.ns, b.ip["fnet"] ?? "?")).toBe(true);
    await member.start();
    // Back: no host was dropped, and a new sandbox reaches and is reached by name at once.
    await c.knitOk(h2, ["run", "-d", "--name", "e", "--network", "fnet", "--", "sleep", "3600"]);
    const e = await c.sandbox(h2, "e");
    expect(await waitFor(() => resolves(a, "e"), 5000)).toBe(true);
    expect(await lab.waitPing(a.ns, e.ip["fnet"] ?? "?")).toBe(true);
    expect(await c.peersConverged(net)).toBe(true);
    expect((await c.store.list(keys.hosts())).items.length).toBe(3);
    const { sent, received } = await stopPing();
    expect(sent).toBeGreaterThan(100);
    expect(received).toBe(sent);
    await c.knitOk(h2, ["rm", "-f", "e"]);
  });

  test("a host cut off from etcd longer than its TTL is dropped, and rejoins cleanly", async () => {
    const ttl = 3;
    await c.stopAgent(h3);
    await c.startAgent(h3, ["--lease-ttl", String(ttl)]);
    await c.knitOk(h3, ["run", "-d", "--name", "c2", "--network", "fnet", "--", "sleep", "3600"]);
    const [a, c2] = [await c.sandbox(h1, "a"), await c.sandbox(h3, "c2")];
    const c2Ip = c2.ip["fnet"] ?? "?";
    expect(await lab.waitPing(a.ns, c2Ip)).toBe(true);
    const etcdIp = c.etcd.endpoints[0]?.split(":")[0] ?? "?";
    const t0 = performance.now();
    const mark = (what: string): void => console.log(`partition: ${what} at ${Math.round(performance.now() - t0)} ms`);
    await lab.exec(h3.host, ["nft", "-f", "-"], {
      stdin: `table ip labcut {\n chain out { type filter hook output priority 0; policy accept; ip daddr ${etcdIp} drop; }\n chain in { type filter hook input priority 0; policy accept; ip saddr ${etcdIp} drop; }\n}\n`,
    });
    // The others drop h3 once its lease expires: c2 leaves their data path and DNS.
    const dropped = await waitFor(async () => (await forgotten(h1, h3, [c2Ip])) && !(await resolves(a, "c2")), 15_000, 100);
    expect(dropped).toBe(true);
    mark("h3 dropped by the others");
    expect(await endpointsOf("h3")).toEqual([]);
    // While cut off (packets dropped, not refused), h3's own commands still fail fast.
    const started = performance.now();
    expect((await c.knit(h3, ["network", "ls"])).stderr).toContain("cannot reach the cluster store");
    expect(performance.now() - started).toBeLessThan(6000);
    mark("h3's CLI failed");
    await lab.exec(h3.host, ["nft", "delete", "table", "ip", "labcut"]);
    mark("healed");
    // Back: registered again, the freed endpoint's interface gone from h3, nothing stale anywhere.
    const rejoined = await waitFor(async () => {
      const links = JSON.parse((await lab.exec(c2.ns, ["ip", "-j", "link"])).stdout) as { ifname: string }[];
      return (await c.store.get(keys.host("h3"))) !== undefined && links.every((l) => l.ifname === "lo");
    }, 20_000, 100);
    expect(rejoined).toBe(true);
    mark("h3 rejoined");
    expect(h3.agent?.running).toBe(true);
    expect(await c.peersConverged(net)).toBe(true);
    // And it works as a member again.
    await c.knitOk(h3, ["run", "-d", "--name", "c3", "--network", "fnet", "--", "sleep", "3600"]);
    const c3 = await c.sandbox(h3, "c3");
    expect(await waitFor(() => resolves(a, "c3"), 5000)).toBe(true);
    expect(await lab.waitPing(a.ns, c3.ip["fnet"] ?? "?")).toBe(true);
    expect(await lab.waitPing(c3.ns, a.ip["fnet"] ?? "?")).toBe(true);
    expect(await c.peersConverged(net)).toBe(true);
    await c.knitOk(h3, ["rm", "-f", "c2", "c3"]);
  });
});
