/**
 * Process identity for crash detection. An operation under way records its owner (PID,
 * process start time, host); reconcile treats a record whose owner is gone as the remains of
 * a crashed command and finishes or undoes it. The start time guards against PID reuse.
 */
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { hostname } from "node:os";
import type { Owner } from "../model.ts";
import type { KeyValue, Store } from "../store/store.ts";

/** Start time of a process in clock ticks since boot (field 22 of /proc/PID/stat). */
export function processStartTime(pid: number): string | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    if (fields[0] === "Z" || fields[0] === "X") return undefined; // exited, not yet reaped
    return fields[19]; // field 22 overall
  } catch {
    return undefined;
  }
}

let self: Owner | undefined;
let identity: string | undefined;

/**
 * This host's name in the store: `--host` / `KNIT_HOST` (the agent's `--name`), else the
 * kernel's hostname. Local networks, sandboxes and operation owners are keyed by it, so many
 * hosts can share one cluster store.
 */
export function hostName(): string {
  identity ??= process.env.KNIT_HOST || hostname();
  return identity;
}

/**
 * Settle this process's host name for a state directory: an explicit name (`--host`,
 * `KNIT_HOST`, the agent's `--name`) wins and is remembered in `<stateDir>/host`, so that
 * processes started without it (a runtime's CNI cleanup, a systemd unit) agree; else the
 * remembered name; else the kernel's hostname, remembered from then on.
 */
export function adoptHostName(stateDir: string, explicit: string | undefined): void {
  const file = join(stateDir, "host");
  let saved: string | undefined;
  try {
    saved = readFileSync(file, "utf8").trim() || undefined;
  } catch {
    saved = undefined;
  }
  // The first name used is kept: renaming the machine later must not hide its networks.
  const name = explicit ?? saved ?? (process.env.KNIT_HOST || hostname());
  if (name !== saved) {
    try {
      mkdirSync(stateDir, { recursive: true });
      writeFileSync(file, `${name}\n`);
    } catch {
      // a read-only state directory: the name still holds for this process
    }
  }
  setHostName(name);
}

/** Set this process's host name (before the first store access). */
export function setHostName(name: string): void {
  identity = name;
  self = undefined;
}

/** The owner record of this process. */
export function currentOwner(): Owner {
  self ??= { pid: process.pid, startTime: processStartTime(process.pid) ?? "", host: hostName() };
  return self;
}

/** True when the owner's process still runs (only decidable on the owner's own host). */
export function ownerAlive(owner: Owner | undefined): boolean {
  if (!owner) return false;
  if (owner.host !== hostName()) return true; // another host's business: never steal it
  return processStartTime(owner.pid) === owner.startTime;
}

/** True when a process with this PID and start time still runs. */
export function processAlive(pid: number | undefined, startTime: string | undefined): boolean {
  return pid !== undefined && startTime !== undefined && processStartTime(pid) === startTime;
}

/**
 * True when the pending marker `kv` (as listed) names a dead owner and is still there: the
 * operation was abandoned and may be repaired. The owner may have finished its operation,
 * removed the marker and exited between the listing and the liveness check; reading the
 * marker again after the check tells the two apart, as a dead owner changes nothing more.
 */
export async function abandoned(store: Store, kv: KeyValue): Promise<boolean> {
  if (ownerAlive(JSON.parse(kv.value) as Owner)) return false;
  return (await store.get(kv.key))?.modRevision === kv.modRevision;
}
