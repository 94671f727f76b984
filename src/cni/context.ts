/**
 * What every plugin command gets (the invocation, its environment, its decoded configuration,
 * the raw stdin for delegation, its trace, the engine opened on first use) and the checks
 * shared by the plugins: the container's namespace, static addresses and MACs from the
 * runtime.
 *
 * Nothing on a command's path reads process.env: a plugin process and the agent (which runs
 * invocations that plugin processes hand it, src/agent/cni-server.ts) both pass the
 * invocation's own environment here.
 */
import { statSync } from "node:fs";
import { CniCodes, CniError } from "./errors.ts";
import type { PluginConf } from "./config.ts";
import type { Invocation } from "./protocol.ts";
import type { Engine } from "../engine/engine.ts";
import type { Network } from "../model.ts";
import type { CniTrace } from "./trace.ts";
import { cidrContains, formatIp, parseCidr, tryParseIp } from "../net/ip.ts";

/** An invocation's environment variables. */
export type CniEnv = Readonly<Record<string, string | undefined>>;

export interface PluginContext {
  readonly inv: Invocation;
  /** The invocation's environment (delegated plugins get it, as the runtime gave it). */
  readonly env: CniEnv;
  readonly conf: PluginConf;
  /** The configuration as it came on stdin (delegated plugins get exactly this). */
  readonly stdin: string;
  /**
   * Where a delegated plugin's stderr goes: "inherit" passes it through (a plugin process),
   * a function collects it into the invocation's own stderr (the agent).
   */
  readonly stderr: "inherit" | ((text: string) => void);
  /** The invocation's working directory, for delegated plugins; undefined: this process's. */
  readonly cwd?: string;
  readonly trace: CniTrace;
  engine(): Promise<Engine>;
}

/**
 * The host name an invocation asks for: the configuration's `host`, else KNIT_HOST; undefined
 * means the state directory's remembered name, else the hostname (adoptHostName).
 */
export const explicitHost = (conf: Pick<PluginConf, "host">, env: CniEnv): string | undefined => conf.host ?? (env.KNIT_HOST || undefined);

/**
 * Open knit's store in a plugin process: the configuration's state directory, as host
 * `host` when given (the process takes that name, see adoptHostName).
 */
export async function openEngine(stateDir: string, host: string | undefined): Promise<Engine> {
  (await import("../engine/owner.ts")).adoptHostName(stateDir, host);
  const { openSqliteStore } = await import("../store/sqlite.ts");
  const { ensurePredefined } = await import("../engine/networks.ts");
  const engine: Engine = { store: await openSqliteStore(stateDir), stateDir };
  await ensurePredefined(engine);
  return engine;
}

/**
 * CNI_NETNS must name a network namespace other than the plugin's own (libcni's plugins
 * refuse their own namespace with code 8).
 */
export function checkNetns(path: string): void {
  let st;
  try {
    st = statSync(path);
  } catch {
    throw new CniError(CniCodes.invalidEnv, `CNI_NETNS: ${path} does not exist`, "give the path of the container's network namespace");
  }
  let self;
  try {
    self = statSync("/proc/self/ns/net");
  } catch {
    return;
  }
  if (st.ino === self.ino && st.dev === self.dev) {
    throw new CniError(CniCodes.invalidNetns, "plugin's netns and netns from CNI_NETNS should not be the same", path);
  }
}

/** The static addresses a runtime asked for, one per family, checked against the network. */
export function staticAddresses(ips: readonly string[], net: Network): { ip?: string; ip6?: string } {
  const out: { ip?: string; ip6?: string } = {};
  for (const text of ips) {
    const [addr = "", prefix] = text.split("/");
    const ip = tryParseIp(addr);
    if (!ip || (prefix !== undefined && !/^\d{1,3}$/.test(prefix))) throw new CniError(CniCodes.invalidConfig, `invalid static address "${text}"`, "give ADDRESS or ADDRESS/PREFIX");
    const key = ip.family === 4 ? "ip" : "ip6";
    if (out[key]) throw new CniError(CniCodes.invalidConfig, `more than one IPv${ip.family} address asked for (${out[key]}, ${text})`, "knit gives an interface one address per family");
    const subnet = net.subnets.map((s) => parseCidr(s.subnet)).find((c) => cidrContains(c, ip));
    if (prefix !== undefined && subnet && Number(prefix) !== subnet.prefix) {
      throw new CniError(CniCodes.invalidConfig, `static address ${text}: network ${net.name} has prefix length /${subnet.prefix} there`);
    }
    out[key] = formatIp(ip);
  }
  return out;
}

/** A unicast MAC in canonical (lower-case) form. */
export function checkMac(mac: string): string {
  const m = mac.toLowerCase();
  if (!/^([0-9a-f]{2}:){5}[0-9a-f]{2}$/.test(m)) throw new CniError(CniCodes.invalidConfig, `invalid MAC address "${mac}"`);
  if (parseInt(m.slice(0, 2), 16) & 1) throw new CniError(CniCodes.invalidConfig, `MAC address ${mac} is a multicast address`);
  if (m === "00:00:00:00:00:00") throw new CniError(CniCodes.invalidConfig, "MAC address 00:00:00:00:00:00 is not usable");
  return m;
}

/**
 * Fault injection for the CNI paths (tests): `KNIT_FAIL_AT=<point>` throws there,
 * `KNIT_CRASH_AT=<point>` kills the process. Points: cni-add:after-connect,
 * cni-add:after-shaping. Read from the invocation's environment (a plugin process with
 * either set never hands its invocation to the agent), and from the process's own: an agent
 * started with KNIT_CRASH_AT dies there, half way through an invocation it was handed.
 */
export function cniFault(point: "cni-add:after-connect" | "cni-add:after-shaping", env: CniEnv): void {
  if (env.KNIT_CRASH_AT === point || process.env.KNIT_CRASH_AT === point) process.kill(process.pid, "SIGKILL");
  if (env.KNIT_FAIL_AT === point || process.env.KNIT_FAIL_AT === point) throw new CniError(CniCodes.internal, `injected failure at ${point}`);
}
