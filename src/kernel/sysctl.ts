/**
 * Kernel parameters, written with no process: in knit's own namespace through /proc/sys;
 * network parameters of another namespace by the calling thread visiting it
 * (netlink-socket.ts writeNetSysctls); any other parameter there by `sysctl` run by nsenter.
 */
import { readFileSync, writeFileSync } from "node:fs";
import { KnitError } from "../errors.ts";
import { run, type Netns } from "./exec.ts";
import { writeNetSysctls } from "./netlink-socket.ts";

/**
 * A key as a path under /proc/sys. Dotted keys (`net.ipv4.ip_forward`) map dots to slashes; a
 * key that already uses slashes (`net/ipv4/conf/br.0/route_localnet`) is taken as it is, so
 * interface names with dots stay intact.
 */
const keyPath = (key: string): string => (key.includes("/") ? key : key.replace(/\./g, "/"));
const procPath = (key: string): string => `/proc/sys/${keyPath(key)}`;

/**
 * Set network parameters (`net/...` or `net.` keys) of the namespace `ns`, in order, in one
 * visit to it; no process. A missing key fails ("cannot set KEY=VALUE in NS: No such file or
 * directory (ENOENT)"), and the keys before it stay set.
 */
export function writeSysctlsIn(ns: Netns, settings: readonly (readonly [key: string, value: string])[]): void {
  writeNetSysctls(ns, settings.map(([key, value]) => [keyPath(key), value] as const));
}

/** Read a parameter of knit's own namespace, or undefined when it does not exist. */
export function readSysctl(key: string): string | undefined {
  try {
    return readFileSync(procPath(key), "utf8").trim();
  } catch {
    return undefined;
  }
}

/** Set a parameter, in knit's own namespace (no write when already set) or inside `ns`. */
export async function writeSysctl(key: string, value: string, ns?: Netns): Promise<void> {
  if (ns && keyPath(key).startsWith("net/")) return writeSysctlsIn(ns, [[key, value]]);
  if (ns) {
    await run(["sysctl", "-q", "-w", `${key}=${value}`], { netns: ns });
    return;
  }
  if (readSysctl(key) === value) return;
  try {
    writeFileSync(procPath(key), value);
  } catch (err) {
    throw new KnitError("kernel", `cannot set ${key}=${value}: ${(err as Error).message}`, { cause: err });
  }
}
