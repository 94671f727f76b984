/**
 * The DNS name table is updated incrementally (src/dns/table.ts): a changed endpoint or
 * sandbox record withdraws and re-adds only what its endpoints contribute, and a peer gate
 * change re-examines only the addresses it names. Pure logic, no lab: long random sequences
 * of store changes (networks of every kind, sandboxes, endpoints, hosts coming and going,
 * peer gate moves) are applied to one table refreshed after every batch, and after each
 * batch every answer it gives (served networks, size, who a client is, every name, every
 * reverse name) is compared with a table built from scratch out of the same records.
 */
import { describe, expect, test } from "bun:test";
import { NameTable, reverseName } from "../src/dns/table.ts";
import { hostName } from "../src/engine/owner.ts";
import { GW_BRIDGE_NETWORK, type Endpoint, type HostRecord, type Network, type Sandbox } from "../src/model.ts";
import { rng } from "./prng.ts";

const hex = (n: number): string => n.toString(16).padStart(12, "0").padEnd(64, "0");
const me = hostName();
const HOSTS = [me, "peer-a", "peer-b"];

function network(i: number, kind: "bridge" | "internal" | "gw" | "overlay" | "overlay-internal", state: Network["state"] = "ready"): Network {
  const overlay = kind.startsWith("overlay");
  return {
    id: hex(0xa000 + i),
    name: kind === "gw" ? GW_BRIDGE_NETWORK : `net${i}`,
    driver: overlay ? "overlay" : "bridge",
    scope: overlay ? "global" : "local",
    state,
    internal: kind === "internal" || kind === "overlay-internal",
    ipv6: true,
    subnets: [
      { subnet: `10.${i}.0.0/24`, gateway: overlay ? undefined : `10.${i}.0.1` },
      { subnet: `fd00:${i}::/64`, gateway: overlay ? undefined : `fd00:${i}::1` },
    ],
    ...(overlay ? {} : { host: me }),
  } as unknown as Network;
}

const NETWORKS: readonly [number, Parameters<typeof network>[1]][] = [
  [1, "bridge"],
  [2, "internal"],
  [3, "gw"],
  [4, "overlay"],
  [5, "overlay-internal"],
];

/** A random store change, as the mirror would apply it. */
function change(r: () => number, gate: Set<string>): { key: string; value: string | undefined } | { gate: [string, string[]] } {
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(r() * xs.length)] as T;
  const sbi = Math.floor(r() * 12);
  const roll = r();
  if (roll < 0.08) {
    const [i, kind] = pick(NETWORKS);
    const net = network(i, kind, r() < 0.15 ? "deleting" : "ready");
    return { key: `networks/${net.id}`, value: r() < 0.1 ? undefined : JSON.stringify(net) };
  }
  if (roll < 0.14) {
    const name = pick(HOSTS);
    const rec = { name, address: "192.0.2.1", device: "eth0", mtu: 1500, pid: 1, started: "", ttl: 30 } as unknown as HostRecord;
    return { key: `hosts/${name}`, value: r() < 0.4 ? undefined : JSON.stringify(rec) };
  }
  if (roll < 0.2) {
    // The overlay data path learnt or forgot some remote addresses.
    const [i] = pick(NETWORKS.filter(([, k]) => k.startsWith("overlay")));
    const netId = hex(0xa000 + i);
    const addrs = [`10.${i}.0.${10 + Math.floor(r() * 12)}`];
    for (const a of addrs) {
      const k = `${netId} ${a}`;
      if (gate.has(k)) gate.delete(k);
      else gate.add(k);
    }
    return { gate: [netId, addrs] };
  }
  if (roll < 0.45) {
    const sb: Sandbox = {
      id: hex(0xb000 + sbi),
      name: `sb${sbi}`,
      hostname: r() < 0.3 ? `shared` : `host${sbi}`,
      state: r() < 0.1 ? "deleting" : "running",
      ...(r() < 0.3 ? { dns: { servers: [`192.0.2.${sbi}`], search: [], options: [] } } : {}),
    } as unknown as Sandbox;
    return { key: `sandboxes/${sb.id}`, value: r() < 0.15 ? undefined : r() < 0.03 ? "{not json" : JSON.stringify(sb) };
  }
  const [i] = pick(NETWORKS);
  const netId = hex(0xa000 + i);
  // Addresses sometimes collide (an address reused before the old record is gone).
  const host = 10 + (r() < 0.2 ? Math.floor(r() * 3) : sbi);
  const ep: Endpoint = {
    id: hex(0xc000 + sbi * 16 + i),
    networkId: netId,
    sandboxId: hex(0xb000 + sbi),
    state: r() < 0.2 ? "creating" : "ready",
    ifname: "eth0",
    mac: "02:42:00:00:00:01",
    ipv4: `10.${i}.0.${host}/24`,
    ...(r() < 0.5 ? { ipv6: `fd00:${i}::${host.toString(16)}/64` } : {}),
    aliases: r() < 0.4 ? [pick(["web", "db", "Web.", "cache"])] : [],
    created: "",
    host: pick(HOSTS),
  } as unknown as Endpoint;
  return { key: `endpoints/${netId}/${ep.id}`, value: r() < 0.2 ? undefined : JSON.stringify(ep) };
}

/** Every answer a table gives, in a form `toEqual` can compare. */
function observe(t: NameTable): unknown {
  const served = t.servedNetworks().sort((a, b) => a.id.localeCompare(b.id));
  const clients: Record<string, unknown> = {};
  const answers: Record<string, unknown> = {};
  const hexOf = (b: Uint8Array | undefined): string | undefined => (b ? Buffer.from(b).toString("hex") : undefined);
  const names = ["sb0", "sb5", "sb11", "shared", "web", "db", "cache", "host3", "nobody", ...Array.from({ length: 12 }, (_, i) => hex(0xb000 + i).slice(0, 12))];
  for (const net of [...served.map((s) => s.id), "internal-overlays"]) {
    for (const [i] of NETWORKS) {
      for (let h = 1; h < 24; h++) {
        for (const addr of [`10.${i}.0.${h}`, `fd00:${i}::${h.toString(16)}`]) {
          const c = t.client(net, addr);
          if (!c) continue;
          clients[`${net} ${addr}`] = { ...c, networks: [...c.networks].sort() };
          for (const name of names) {
            const rec = t.lookup(c, name);
            // The order of several addresses for one name is not part of the contract.
            if (rec) answers[`${net} ${addr} ${name}`] = { v4: rec.v4.map(hexOf).sort(), v6: rec.v6.map(hexOf).sort() };
          }
          for (let x = 1; x < 24; x++) {
            const rev = reverseName(`10.${i}.0.${x}`);
            const ptr = rev && t.lookupReverse(c, rev);
            if (ptr) answers[`${net} ${addr} ${rev}`] = hexOf(ptr);
          }
        }
      }
    }
  }
  return { served, size: t.size, clients, answers };
}

describe("DNS name table", () => {
  for (const seed of [1, 7, 42, 1234, 99991]) {
    test(`incremental updates answer exactly as a rebuild from scratch (seed ${seed})`, () => {
      const r = rng(seed);
      const gate = new Set<string>();
      const records = new Map<string, string>();
      const table = new NameTable();
      table.setPeerGate((netId, addr) => gate.has(`${netId} ${addr}`));
      table.refresh();
      let compared = 0;
      let nonEmpty = 0;
      for (let batch = 0; batch < 150; batch++) {
        const n = 1 + Math.floor(r() * 4);
        for (let k = 0; k < n; k++) {
          const c = change(r, gate);
          if ("gate" in c) table.peersChanged(c.gate[0], c.gate[1]);
          else {
            if (c.value === undefined) records.delete(c.key);
            else records.set(c.key, c.value);
            table.apply(c.key, c.value);
          }
        }
        table.refresh();
        const fresh = new NameTable();
        fresh.setPeerGate((netId, addr) => gate.has(`${netId} ${addr}`));
        for (const [key, value] of records) fresh.apply(key, value);
        fresh.refresh();
        const got = observe(table);
        expect(got).toEqual(observe(fresh));
        compared++;
        if ((got as { size: number }).size > 0) nonEmpty++;
      }
      expect(compared).toBe(150);
      // The sequences must exercise real content, not compare two empty tables.
      expect(nonEmpty).toBeGreaterThan(50);
    });
  }

  test("one change costs the same with 1,000 endpoints as with 10", () => {
    // Counted in work, not time: the number of endpoints a refresh looks at.
    const build = (n: number): { t: NameTable; net: string } => {
      const t = new NameTable();
      const net = network(1, "bridge");
      t.apply(`networks/${net.id}`, JSON.stringify(net));
      for (let i = 0; i < n; i++) {
        const id = hex(0x100000 + i);
        t.apply(`sandboxes/${id}`, JSON.stringify({ id, name: `s${i}`, hostname: `s${i}`, state: "running" }));
        t.apply(`endpoints/${net.id}/${id}`, JSON.stringify({ id, networkId: net.id, sandboxId: id, state: "ready", ipv4: `10.1.${i >> 8}.${(i & 255) + 2}/16`, aliases: [] }));
      }
      t.refresh();
      return { t, net: net.id };
    };
    for (const n of [10, 1000]) {
      const { t, net } = build(n);
      const id = hex(0x200000);
      const seen = t.workCounter;
      t.apply(`sandboxes/${id}`, JSON.stringify({ id, name: "new", hostname: "new", state: "running" }));
      t.apply(`endpoints/${net}/${id}`, JSON.stringify({ id, networkId: net, sandboxId: id, state: "ready", ipv4: "10.1.200.1/16", aliases: [] }));
      t.refresh();
      expect(t.workCounter - seen).toBe(1);
      const c = t.client(net, "10.1.200.1");
      expect(c && t.lookup(c, "new")?.v4.length).toBe(1);
      expect(t.size).toBe(2 * n + 2);
    }
  });
});
