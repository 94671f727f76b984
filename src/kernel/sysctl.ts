/**
 * Kernel parameters. In knit's own namespace they are written through /proc/sys (no
 * process); inside another namespace through `sysctl` run by nsenter.
 */
import { readFileSync, writeFileSync } from "node:fs";
import { KnitError } from "../errors.ts";
import { run, type Netns } from "./exec.ts";

/**
 * The /proc/sys path of a key. Dotted keys (`net.ipv4.ip_forward`) map dots to slashes; a key
 * that already uses slashes (`net/ipv4/conf/br.0/route_localnet`) is taken as it is, so
 * interface names with dots stay intact.
 */
const procPath = (key: string): string => `/proc/sys/${key.includes("/") ? key : key.replace(/\./g, "/")}`;

/** Read a parameter of knit's own namespace, or undefined when it does not exist. */
export function readSysctl(key: string): string | undefined {
  try {
    return readFileSync(procPath(key), "utf8").trim();
  } catch {
    return undefined;
  }
}

/** Set a parameter, in knit's own namespace or inside `ns`; skips the write when already set. */
export async function writeSysctl(key: string, value: string, ns?: Netns): Promise<void> {
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
