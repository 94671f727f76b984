/**
 * The handoff of a CNI invocation from a plugin process (src/cni/client.ts) to the host's knit
 * agent (src/agent/cni-server.ts), over the agent's root-only unix socket
 * `<state dir>/agent-cni.sock`. One connection per invocation, newline-terminated JSON lines
 * (JSON never holds a raw newline):
 *
 *   plugin → agent   {v, plugin, env, stdin, pid}      the whole invocation
 *   agent → plugin   {ok: true, cniVersion} | {ok: false, reason}
 *   plugin → agent   "go"                              only after ok
 *   agent → plugin   {code, stdout, stderr, trace?}    then the agent closes
 *
 * Why three steps: the plugin may run the invocation itself (fall back) only as long as the
 * agent cannot have started it. The agent starts nothing before "go", and the plugin sends
 * "go" only once, after which it never falls back: an answer that does not come (the agent
 * died, the connection broke, the bounded wait ran out) is CNI error 11, try again later.
 * A decline, a refused connection or no acknowledgement within the bound leaves the plugin
 * free to run the invocation itself: nothing was started, so nothing runs twice.
 */
import type { TraceRecord } from "./trace.ts";

/** The protocol's version: an agent that speaks another declines, and the plugin runs it itself. */
export const HANDOFF_VERSION = 1;

/** Name of the socket file in the state directory. */
export const HANDOFF_SOCKET = "agent-cni.sock";

/** The plugin's request: which plugin, the invocation's environment and stdin, its own PID. */
export interface HandoffRequest {
  v: number;
  plugin: string;
  env: Record<string, string>;
  stdin: string;
  /** The plugin process (the agent compares its namespaces with its own). */
  pid: number;
  /** Its working directory (relative paths in the invocation are relative to it). */
  cwd: string;
}

/** The agent's acknowledgement: it will run the invocation on "go", or why not. */
export type HandoffAck = { ok: true; cniVersion: string } | { ok: false; reason: string };

/** The agent's answer: what the plugin prints and exits with. */
export interface HandoffAnswer {
  code: number;
  stdout: string;
  stderr: string;
  trace?: TraceRecord;
}

/** The line a plugin sends to let the agent start. */
export const GO_LINE = "go\n";

/** Largest request line the agent reads (16 MiB of stdin, JSON-escaped, and the environment). */
export const MAX_REQUEST_BYTES = 128 << 20;
