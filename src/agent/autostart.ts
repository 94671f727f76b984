/**
 * Starting the agent on demand, as podman starts aardvark-dns: the first sandbox that joins
 * a network with knit DNS starts it, and when the last such sandbox is gone an agent that
 * was started this way is stopped again. An agent started on purpose (`knit agent`,
 * `knit agent start`, a systemd unit) is never stopped by this.
 *
 * The check on the hot path costs one file read and one /proc read (see pidfile.ts). When
 * no agent runs, `bun src/cli/main.ts agent --auto` is spawned in a new session (setsid),
 * its output appended to `<state dir>/agent.log`, and the caller waits until agent.pid names
 * a live process (bounded). Two callers that race both spawn one; the store claim lets one
 * win and the other exits at once.
 *
 * An auto-started agent lingers: it stops itself once no sandbox has needed it for
 * KNIT_AGENT_LINGER seconds (default 30), so that containers coming and going one at a time
 * (a CNI runtime's ADD after the last DEL) do not each pay for an agent's start. With 0,
 * the command that removed the last such sandbox stops it at once.
 *
 * KNIT_AGENT_AUTOSTART=0 turns this off (then run `knit agent` yourself, or install it as a
 * service).
 */
import { findSandbox } from "../engine/engine.ts";
import { listNetworks } from "../engine/engine.ts";
import { closeSync, openSync } from "node:fs";
import { join } from "node:path";
import { KnitError } from "../errors.ts";
import { keys, type Endpoint } from "../model.ts";
import type { Engine } from "../engine/engine.ts";
import { refreshSandboxResolvConfs, servesDns } from "../dns/resolvconf.ts";
import { agentPaths, liveAgent, stopAgentProcess, type AgentRecord } from "./pidfile.ts";

/** How long a caller waits for a spawned agent to be ready. */
const START_TIMEOUT_MS = 10_000;
/** The CLI entry point the agent is started with. */
const MAIN = join(import.meta.dir, "..", "cli", "main.ts");

const autostartEnabled = (): boolean => process.env.KNIT_AGENT_AUTOSTART !== "0";

/** Default of KNIT_AGENT_LINGER, in seconds. */
export const DEFAULT_LINGER_S = 30;

/** KNIT_AGENT_LINGER in milliseconds: seconds, 0 or more (fractions allowed); default 30 s. */
export function agentLingerMs(env: Record<string, string | undefined> = process.env): number {
  const raw = env.KNIT_AGENT_LINGER;
  if (raw === undefined || raw === "") return DEFAULT_LINGER_S * 1000;
  const s = Number(raw);
  if (!/^\d+(\.\d+)?$/.test(raw.trim()) || !Number.isFinite(s) || s > 86_400) {
    throw new KnitError("invalid-argument", `KNIT_AGENT_LINGER must be a number of seconds from 0 to 86400, not "${raw}"`);
  }
  return Math.round(s * 1000);
}

/** True when some ready endpoint sits on a network with knit DNS. */
export async function agentNeeded(engine: Engine): Promise<boolean> {
  const ready = (items: readonly { value: string }[]): boolean => items.some((kv) => (JSON.parse(kv.value) as Endpoint).state === "ready");
  for (const net of await listNetworks(engine)) {
    if (!servesDns(net)) continue;
    // The first few endpoints nearly always include a ready one: this runs after every
    // command that may remove endpoints, and must not cost O(endpoints on the network).
    const first = await engine.store.list(keys.endpointsOf(net.id), { limit: 8 });
    if (ready(first.items)) return true;
    if (first.more === true && ready((await engine.store.list(keys.endpointsOf(net.id))).items)) return true;
  }
  return false;
}

/** Make sure an agent runs for this state directory, starting one (mode "auto") if not. */
export async function ensureAgent(engine: Engine): Promise<void> {
  if (!autostartEnabled() || liveAgent(engine.stateDir)) return;
  await startAgent(engine.stateDir, "auto");
}

/**
 * Start a detached agent unless one runs, and wait until it is ready. Returns the running
 * agent (which may be another starter's).
 */
export async function startAgent(stateDir: string, mode: AgentRecord["mode"], extraArgs: readonly string[] = []): Promise<AgentRecord> {
  const running = liveAgent(stateDir);
  if (running) return running;
  const { log } = agentPaths(stateDir);
  const env: Record<string, string | undefined> = { ...process.env };
  // Fault injection is for the command under test, never for the agent it starts.
  delete env.KNIT_CRASH_AT;
  delete env.KNIT_FAIL_AT;
  const argv = [process.execPath, MAIN, "--state-dir", stateDir, "agent", ...(mode === "auto" ? ["--auto"] : []), ...extraArgs];
  const fd = openSync(log, "a");
  let exitedAt = 0;
  try {
    const proc = Bun.spawn(argv, { stdin: "ignore", stdout: fd, stderr: fd, env, cwd: "/", detached: true });
    proc.unref();
    void proc.exited.then(() => {
      exitedAt = Date.now();
    });
  } finally {
    closeSync(fd);
  }
  // Ours may exit at once because another agent holds the host: give that one a moment.
  const deadline = Date.now() + START_TIMEOUT_MS;
  for (;;) {
    const rec = liveAgent(stateDir);
    if (rec) return rec;
    if (Date.now() > deadline || (exitedAt > 0 && Date.now() - exitedAt > 3000)) break;
    await Bun.sleep(10);
  }
  throw new KnitError("io", exitedAt ? "the knit agent exited at start" : `the knit agent did not start within ${START_TIMEOUT_MS / 1000} s`, {
    hint: `see its log, ${log}; or set KNIT_AGENT_AUTOSTART=0 and run \`knit agent\` yourself`,
  });
}

/**
 * After a command that may have removed endpoints: stop an auto-started agent that no
 * sandbox needs any more. If a sandbox appeared meanwhile (another command raced this one),
 * start it again. Inside the agent itself (a CNI DEL it was handed) nothing happens here:
 * the agent checks once the invocation is answered (src/agent/agent.ts).
 */
export async function stopIdleAgent(engine: Engine): Promise<void> {
  const rec = liveAgent(engine.stateDir);
  // A lingering agent stops itself (src/agent/agent.ts, watchIdle).
  if (!rec || rec.mode !== "auto" || rec.pid === process.pid || (rec.lingerMs ?? 0) > 0 || (await agentNeeded(engine))) return;
  await stopAgentProcess(rec);
  if (await agentNeeded(engine)) await ensureAgent(engine);
}

/**
 * The CLI's housekeeping after a command (src/cli/main.ts): after `network connect` or
 * `disconnect`, running sandboxes get the resolv.conf their networks call for and the agent
 * is started when now needed; after commands that remove endpoints (`rm`, `run --rm`,
 * `network disconnect`, `gc`) an idle auto-started agent is stopped.
 */
export async function afterCommand(engine: Engine, command: string, sub: string, args: readonly string[] = []): Promise<void> {
  const network = command === "network" && (sub === "connect" || sub === "disconnect");
  if (network) {
    // Only the sandbox the command named (its last argument): rewriting every sandbox's
    // file made each connect cost O(sandboxes on the host).
    const ref = [...args].reverse().find((a) => !a.startsWith("-"));
    const sb = ref === undefined ? undefined : await findSandbox(engine, ref);
    if (sb) await refreshSandboxResolvConfs(engine, [sb]);
  }
  if (command === "network" && sub === "connect") {
    if (autostartEnabled() && !liveAgent(engine.stateDir) && (await agentNeeded(engine))) await ensureAgent(engine);
  } else if (network || command === "rm" || command === "run" || command === "gc") {
    await stopIdleAgent(engine);
  }
}
