/**
 * Shared setup of the CNI tests: a lab host with knit's plugins installed by `knit install`
 * into a CNI bin dir of the lab's own, a libcni-like runtime that runs plugins inside that
 * host's namespace, and readers for what the kernel and the store hold.
 */
import { join } from "node:path";
import { existsSync } from "node:fs";
import type { Lab, LabHost, LabNode } from "../src/lab/lab.ts";
import { openSqliteStore } from "../src/store/sqlite.ts";
import { CniRuntime, type ConfList } from "./cni-libcni.ts";

/** Where Debian's containernetworking-plugins live. */
export const REFERENCE_DIR = "/usr/lib/cni";

/** Install knit's plugins with the real CLI into `<lab dir>/_cni-bin-<host>`; returns the dir. */
export async function installCni(lab: Lab, host: LabHost): Promise<string> {
  const dir = join(lab.dir, `_cni-bin-${host.label}`);
  await host.knitOk(["install", "--cni-bin-dir", dir]);
  return dir;
}

/** A runtime whose plugins run inside `host` (the runtime's network namespace). */
export function runtimeOn(lab: Lab, host: LabHost, dirs: readonly string[], env: Record<string, string> = {}): CniRuntime {
  // The environment knit's CLI runs with on this host (state dir, host name), as a runtime
  // that runs knit's plugins next to knit's CLI and agent has it.
  return new CniRuntime(dirs, (argv, stdin, e) => lab.exec(host, argv, { stdin, env: e, check: false, timeoutMs: 60_000 }), host.knitEnv({ KNIT_AGENT_AUTOSTART: "0", ...env }));
}

/** A one-plugin conflist for knit, joining `network` (or creating a network named `name`). */
export function knitList(name: string, extra: Record<string, unknown> = {}, version = "1.1.0", more: Record<string, unknown>[] = []): ConfList {
  return {
    cniVersion: version,
    name,
    plugins: [{ type: "knit", capabilities: { ips: true, mac: true, bandwidth: true, dns: true, aliases: true, portMappings: true }, ...extra }, ...more],
  };
}

interface IpAddr {
  ifname: string;
  address?: string;
  mtu: number;
  master?: string;
  addr_info?: { family: string; local: string; prefixlen: number }[];
}

/** `ip -j addr show` of a namespace. */
export async function addrs(node: { path: string }, lab: Lab): Promise<IpAddr[]> {
  return JSON.parse((await lab.exec(node, ["ip", "-j", "addr", "show"])).stdout || "[]") as IpAddr[];
}

/** The CIDR addresses of one interface (global scope), e.g. ["10.1.0.2/24"]. */
export async function ifaceAddrs(lab: Lab, node: { path: string }, ifname: string): Promise<string[]> {
  const link = (await addrs(node, lab)).find((l) => l.ifname === ifname);
  return (link?.addr_info ?? []).filter((a) => !a.local.startsWith("fe80")).map((a) => `${a.local}/${a.prefixlen}`);
}

/** Links of a namespace by name. */
export async function links(lab: Lab, node: { path: string }): Promise<IpAddr[]> {
  return JSON.parse((await lab.exec(node, ["ip", "-j", "-d", "link", "show"])).stdout || "[]") as IpAddr[];
}

/** Store keys under a prefix on a host (read-only open). */
export async function storeKeys(host: LabHost, prefix: string): Promise<Record<string, string>> {
  if (!existsSync(join(host.stateDir, "knit.db"))) return {};
  const store = await openSqliteStore(host.stateDir);
  try {
    return Object.fromEntries((await store.list(prefix)).items.map((kv) => [kv.key, kv.value]));
  } catch {
    return {};
  } finally {
    await store.close();
  }
}

/** Address claims (`ipam/<net>/<addr>`) that belong to endpoints, not reservations. */
export async function endpointClaims(host: LabHost): Promise<string[]> {
  return Object.entries(await storeKeys(host, "ipam/"))
    .filter(([, v]) => v !== "gateway" && !v.startsWith("aux:"))
    .map(([k]) => k);
}

/** The container namespace's address of an ADD result (first ip). */
export function firstAddress(result: Record<string, unknown>): string {
  const ips = result.ips as { address: string }[] | undefined;
  const a = ips?.[0]?.address;
  if (!a) throw new Error(`result has no ips: ${JSON.stringify(result)}`);
  return a.split("/")[0] ?? "";
}

/** A fresh container namespace (a lab node without links). */
export async function container(lab: Lab, label: string): Promise<LabNode> {
  return lab.ns(label);
}

const KEYS = ["name", "cniVersion", "type", "network", "ipam", "ranges", "subnet", "rangeStart", "runtimeConfig", "portMappings", "bandwidth", "ips", "mac", "dns", "prevResult", "interfaces", "address", "routes", "dst", "args", "cni", "aliases", "mtu", "bridge", "hostPort", "cni.dev/valid-attachments", "ingressRate"];

/** A random JSON value (for fuzzing) biased towards CNI's keys. */
export function randomJson(rnd: () => number, depth = 0): unknown {
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rnd() * xs.length)] as T;
  const r = rnd();
  if (depth > 4 || r < 0.25) return pick([null, true, false, 0, -1, 1.5, 1e300, 65536, "", "1.1.0", "0.3.1", "knit", "10.0.0.0/24", "x".repeat(300), "eth0", "\u0000", "é"]);
  if (r < 0.45) return Array.from({ length: Math.floor(rnd() * 4) }, () => randomJson(rnd, depth + 1));
  const o: Record<string, unknown> = {};
  for (let i = Math.floor(rnd() * 6); i > 0; i--) {
    const k = pick(KEYS);
    o[rnd() < 0.2 ? k.toUpperCase() : k] = randomJson(rnd, depth + 1);
  }
  return o;
}

