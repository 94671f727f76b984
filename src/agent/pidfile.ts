/**
 * Finding a host's agent without asking it: `<state dir>/agent.pid` holds the running
 * agent's process id, start time (so a reused PID is never mistaken for it), mode and
 * status socket. It is written once the agent serves, and removed when it stops; after a
 * crash it stays, and the start time tells that its process is gone.
 *
 * This is the cheap check on the hot path of `knit run`: one small file read and one read
 * of /proc/PID/stat, no connection to the agent.
 */
import { readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { AgentClaim } from "../model.ts";
import { processAlive } from "../engine/owner.ts";
import { HANDOFF_SOCKET } from "../cni/handoff.ts";

/** What agent.pid holds. */
export interface AgentRecord extends AgentClaim {
  /** The status socket (HTTP over a unix socket). */
  socket: string;
  /**
   * The socket CNI plugin processes hand their invocations to (src/cni/handoff.ts); absent
   * in the records of agents that do not take them.
   */
  cniSocket?: string;
  /** When the agent started (ISO time). */
  started: string;
  /**
   * An auto-started agent that lingers: it stops itself this long after no sandbox needs it
   * (KNIT_AGENT_LINGER), and commands leave it to. Absent or 0: commands stop it at once.
   */
  lingerMs?: number;
}

/** The agent's files in a state directory. */
export function agentPaths(stateDir: string): { pidfile: string; socket: string; cniSocket: string; log: string } {
  return { pidfile: join(stateDir, "agent.pid"), socket: join(stateDir, "agent.sock"), cniSocket: join(stateDir, HANDOFF_SOCKET), log: join(stateDir, "agent.log") };
}

/** The record in agent.pid, whether its process runs or not (undefined: none or unreadable). */
export function readAgentRecord(stateDir: string): AgentRecord | undefined {
  try {
    const rec = JSON.parse(readFileSync(agentPaths(stateDir).pidfile, "utf8")) as AgentRecord;
    return typeof rec.pid === "number" && typeof rec.startTime === "string" ? rec : undefined;
  } catch {
    return undefined;
  }
}

/** The running agent of this state directory, if there is one. */
export function liveAgent(stateDir: string): AgentRecord | undefined {
  const rec = readAgentRecord(stateDir);
  return rec && processAlive(rec.pid, rec.startTime) ? rec : undefined;
}

/** Write agent.pid atomically (readers see the old file or the new one, never half). */
export function writeAgentRecord(stateDir: string, rec: AgentRecord): void {
  const { pidfile } = agentPaths(stateDir);
  const tmp = `${pidfile}.${process.pid}.tmp`;
  writeFileSync(tmp, `${JSON.stringify(rec)}\n`);
  renameSync(tmp, pidfile);
}

/** Remove agent.pid if it still names process `pid` (never another agent's). */
export function removeAgentRecord(stateDir: string, pid: number): void {
  if (readAgentRecord(stateDir)?.pid === pid) rmSync(agentPaths(stateDir).pidfile, { force: true });
}

/**
 * Stop an agent by its recorded PID: SIGTERM, then SIGKILL after `graceMs`. Resolves when
 * the process is gone; false when it was not running.
 */
export async function stopAgentProcess(rec: AgentRecord, graceMs = 5000): Promise<boolean> {
  if (!processAlive(rec.pid, rec.startTime)) return false;
  const signal = (sig: NodeJS.Signals): void => {
    try {
      process.kill(rec.pid, sig);
    } catch {
      // already gone
    }
  };
  signal("SIGTERM");
  const deadline = Date.now() + graceMs;
  while (processAlive(rec.pid, rec.startTime)) {
    if (Date.now() > deadline) {
      signal("SIGKILL");
      for (let i = 0; i < 200 && processAlive(rec.pid, rec.startTime); i++) await Bun.sleep(10);
      break;
    }
    await Bun.sleep(10);
  }
  return true;
}
