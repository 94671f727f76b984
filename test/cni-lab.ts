/**
 * Shared setup of the CNI tests: a lab host with knit's plugins installed by `knit install`
 * into a CNI bin dir of the lab's own, a libcni-like runtime that runs plugins inside that
 * host's namespace, and readers for what the kernel and the store hold.
 *
 * The two paths of a plugin invocation (docs/cni.md "Two paths"): by default no knit agent
 * runs unless a test starts one, so the plugin processes run their invocations themselves.
 * With KNIT_TEST_CNI_AGENT=1 every CNI test file runs with a knit agent serving its host
 * from the install on, the plugins hand their invocations to it, and each runtime from
 * {@link runtimeOn} checks (by KNIT_CNI_TRACE) that every one of them did:
 *
 *   KNIT_TEST_CNI_AGENT=1 scripts/lab-run node_modules/.bin/bun test --timeout 120000 test/cni.test.ts
 */
import { join } from "node:path";
import { existsSync, readFileSync } from "node:fs";
import type { Lab, LabHost, LabNode, LabProcess } from "../src/lab/lab.ts";
import { openSqliteStore } from "../src/store/sqlite.ts";
import { CniRuntime, type ConfList, type PluginExec } from "./cni-libcni.ts";

/** Where Debian's containernetworking-plugins live. */
export const REFERENCE_DIR = "/usr/lib/cni";

/** Whether this run's CNI tests have a knit agent serving each host (KNIT_TEST_CNI_AGENT=1). */
export const agentMode = process.env.KNIT_TEST_CNI_AGENT === "1";

/** Install knit's plugins with the real CLI into `<lab dir>/_cni-bin-<host>`; returns the dir. */
export async function installCni(lab: Lab, host: LabHost): Promise<string> {
  const dir = join(lab.dir, `_cni-bin-${host.label}`);
  await host.knitOk(["install", "--cni-bin-dir", dir]);
  if (agentMode) await startCniAgent(host);
  return dir;
}

const agents = new Map<LabHost, LabProcess>();

/** The agent record of a host, if it names a live process that takes CNI invocations. */
export function cniAgentRecord(host: LabHost): { pid: number; cniSocket: string; mode: string } | undefined {
  try {
    const rec = JSON.parse(readFileSync(join(host.stateDir, "agent.pid"), "utf8")) as { pid: number; cniSocket?: string; mode: string };
    process.kill(rec.pid, 0);
    return rec.cniSocket ? { pid: rec.pid, cniSocket: rec.cniSocket, mode: rec.mode } : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Start `knit agent` (a service) on `host` (with `env` on top of the host's), and wait until
 * it takes CNI invocations. Stopped by {@link stopCniAgent} or the lab's cleanup.
 */
export async function startCniAgent(host: LabHost, env: Record<string, string> = {}): Promise<LabProcess> {
  const proc = host.spawnKnit(["agent"], { env });
  agents.set(host, proc);
  const deadline = Date.now() + 30_000;
  while (cniAgentRecord(host)?.pid !== proc.pid) {
    if (!proc.running || Date.now() > deadline) throw new Error(`the knit agent on ${host.label} did not start: ${proc.output().slice(-2000)}`);
    await Bun.sleep(25);
  }
  return proc;
}

/** Stop the agent {@link startCniAgent} started on `host` (if it still runs). */
export async function stopCniAgent(host: LabHost): Promise<void> {
  await agents.get(host)?.stop(10_000);
  agents.delete(host);
}

/** The `knit-cni-trace` line of a plugin call's stderr (KNIT_CNI_TRACE=1), parsed. */
export function cniTrace(stderr: string): Record<string, string | number> | undefined {
  const line = stderr.split("\n").find((l) => l.startsWith("knit-cni-trace "));
  return line ? (JSON.parse(line.slice("knit-cni-trace ".length)) as Record<string, string | number>) : undefined;
}

/**
 * A runtime whose plugins run inside `host` (the runtime's network namespace). With
 * `checkPath` (the default in agent mode), each call of a knit plugin that is to be handed
 * to the agent (not VERSION, no fault injection, no KNIT_CNI_AGENT=0) must have been: the
 * call fails otherwise, naming the path and reason its trace gave.
 */
export function runtimeOn(lab: Lab, host: LabHost, dirs: readonly string[], env: Record<string, string> = {}, opts: { checkPath?: boolean } = {}): CniRuntime {
  const check = opts.checkPath ?? agentMode;
  const exec: PluginExec = async (argv, stdin, e) => {
    const r = await lab.exec(host, argv, { stdin, env: e, check: false, timeoutMs: 60_000 });
    const plugin = (argv[0] ?? "").slice((argv[0] ?? "").lastIndexOf("/") + 1);
    const handed = e.CNI_COMMAND !== "VERSION" && !e.KNIT_CRASH_AT && !e.KNIT_FAIL_AT && e.KNIT_CNI_AGENT !== "0";
    if (check && handed && ["knit", "knit-ipam", "knit-portmap"].includes(plugin)) {
      const t = cniTrace(r.stderr);
      if (t?.path !== "agent") throw new Error(`${plugin} ${e.CNI_COMMAND ?? ""} was not handed to the agent: ${t ? `${String(t.path)} (${String(t.reason)})` : `no trace; stderr: ${r.stderr}`}`);
    }
    return r;
  };
  // The environment knit's CLI runs with on this host (state dir, host name), as a runtime
  // that runs knit's plugins next to knit's CLI and agent has it.
  return new CniRuntime(dirs, exec, host.knitEnv({ KNIT_AGENT_AUTOSTART: "0", ...(check ? { KNIT_CNI_TRACE: "1" } : {}), ...env }));
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

