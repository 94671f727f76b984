/**
 * The plugin process's entry (what `knit install`'s launcher runs): hand the invocation to
 * the host's knit agent, or run it here. See docs/cni.md "Two paths".
 *
 * When a live agent serves the state directory the configuration names, this process reads
 * its environment and stdin, connects to the agent's socket, hands the invocation over
 * (src/cni/handoff.ts), and prints the agent's answer: it loads none of knit's engine,
 * store or kernel code, which is most of what a plugin process costs. It runs the
 * invocation itself, by loading the full plugin (`--engine FILE`, src/cni/main.ts or its
 * bundle) and running it exactly as before, when:
 *   - the command is VERSION, KNIT_CNI_AGENT=0 is set, or fault injection is asked for
 *     (KNIT_CRASH_AT, KNIT_FAIL_AT: tests of the plugin process itself);
 *   - stdin cannot be read or is too large (the full plugin reports it);
 *   - no agent runs for the state directory (no agent.pid, its process gone, or an agent
 *     that takes no invocations);
 *   - the agent's socket refuses the connection, the agent declines (another state
 *     directory, host name or namespace; stopping), or does not acknowledge within
 *     {@link ACK_TIMEOUT_MS}, or the connection breaks before the acknowledgement.
 * Once it has told the agent to go, it never runs the invocation itself: no answer (the
 * agent died, the connection broke, KNIT_CNI_AGENT_TIMEOUT seconds passed, default 120) is
 * CNI error 11, try again later.
 *
 * Lean on purpose: Bun's own file, stdin and socket APIs (node:fs alone costs a plugin
 * start about 3 ms of CPU), no configuration layer (the agent parses and checks all of it).
 */
import { CniCodes } from "./errors.ts";
import { LATEST } from "./protocol.ts";
import { DEFAULT_PATH, DEFAULT_STATE_DIR, MAX_STDIN, stdinTooLarge } from "./defaults.ts";
import { GO_LINE, HANDOFF_VERSION, type HandoffAck, type HandoffAnswer, type HandoffRequest } from "./handoff.ts";
import { traceLine, type TraceRecord } from "./trace.ts";

/** How long the agent gets to acknowledge (it only checks the request): then this process runs it. */
export const ACK_TIMEOUT_MS = 5000;
/** How long the agent gets to answer, by default (KNIT_CNI_AGENT_TIMEOUT, seconds). */
export const ANSWER_TIMEOUT_S = 120;

const started = performance.now();

/** `--NAME VALUE` of argv. */
function argValue(argv: readonly string[], name: string): string | undefined {
  const i = argv.indexOf(name);
  return i >= 0 ? argv[i + 1] : undefined;
}

/** The plugin name this process was started as: `--plugin NAME`, else the file name. */
function pluginName(argv: readonly string[]): string {
  const given = argValue(argv, "--plugin");
  if (given) return given;
  const self = argv[1] ?? "knit";
  return self.slice(self.lastIndexOf("/") + 1);
}

/** Why this invocation is not handed over before stdin is even read, or undefined. */
function reasonToStay(env: Record<string, string | undefined>): string | undefined {
  if (env.KNIT_CNI_AGENT === "0") return "KNIT_CNI_AGENT=0";
  if (env.CNI_COMMAND === "VERSION") return "VERSION";
  if (env.KNIT_CRASH_AT || env.KNIT_FAIL_AT) return "fault injection";
  return undefined;
}

/** All of stdin, bounded as the full plugin bounds it. */
async function readStdin(): Promise<string> {
  const chunks: Uint8Array[] = [];
  let total = 0;
  for await (const chunk of Bun.stdin.stream()) {
    total += chunk.length;
    if (total > MAX_STDIN) throw stdinTooLarge();
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString("utf8");
}

/** A configuration's string field as Go reads it (case-insensitive key, the last one wins), if any. */
function stringField(conf: unknown, name: string): string | undefined {
  if (typeof conf !== "object" || conf === null || Array.isArray(conf)) return undefined;
  const want = name.toLowerCase();
  let value: unknown;
  for (const [k, v] of Object.entries(conf)) if (k.toLowerCase() === want) value = v;
  return typeof value === "string" && value !== "" ? value : undefined;
}

/** The live agent of a state directory that takes CNI invocations: its PID and socket. */
async function agentOf(stateDir: string): Promise<{ pid: number; socket: string } | undefined> {
  let rec: { pid?: unknown; startTime?: unknown; cniSocket?: unknown };
  try {
    rec = (await Bun.file(`${stateDir}/agent.pid`).json()) as typeof rec;
  } catch {
    return undefined;
  }
  if (typeof rec.pid !== "number" || typeof rec.startTime !== "string" || typeof rec.cniSocket !== "string") return undefined;
  let stat: string;
  try {
    stat = await Bun.file(`/proc/${rec.pid}/stat`).text();
  } catch {
    return undefined;
  }
  // Field 22 (start time) after the command name, which may hold spaces and parentheses;
  // a zombie is gone. As src/engine/owner.ts processStartTime reads it.
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  if (fields[0] === "Z" || fields[0] === "X" || fields[19] !== rec.startTime) return undefined;
  return { pid: rec.pid, socket: rec.cniSocket };
}

/** What came of a handoff. */
type Outcome = { kind: "answer"; answer: HandoffAnswer } | { kind: "fallback"; reason: string } | { kind: "failed"; msg: string; details: string; cniVersion: string };

/** Hand the invocation to the agent at `socket`; see the file's comment for the outcomes. */
async function handOff(socket: string, req: HandoffRequest, answerTimeoutMs: number): Promise<Outcome> {
  let buffered = "";
  let acked: Extract<HandoffAck, { ok: true }> | undefined;
  // Settled once: after a fallback (a timeout included) nothing more is read, and "go" is never sent.
  let settled = false;
  let resolveOutcome: (o: Outcome) => void = () => undefined;
  const outcome = new Promise<Outcome>((resolve) => (resolveOutcome = resolve));
  const settle = (o: Outcome): void => {
    if (settled) return;
    settled = true;
    resolveOutcome(o);
  };
  const broken = (why: string): Outcome =>
    acked
      ? {
          kind: "failed",
          msg: `the knit agent did not answer: ${why}`,
          details: "it had taken the invocation, which may be done in part or in full: try again, or DEL it (DEL is idempotent)",
          cniVersion: acked.cniVersion,
        }
      : { kind: "fallback", reason: `agent: ${why} before it took the invocation` };
  let timer = setTimeout(() => settle(broken(`no acknowledgement within ${ACK_TIMEOUT_MS / 1000} s`)), ACK_TIMEOUT_MS);
  let sock: Awaited<ReturnType<typeof Bun.connect>>;
  let pending = Buffer.from(`${JSON.stringify(req)}\n`);
  const flush = (): void => {
    while (pending.length) {
      const n = sock.write(pending);
      if (n < 0) return;
      pending = pending.subarray(n);
      if (n === 0) return; // drain calls again
    }
  };
  try {
    sock = await Bun.connect({
      unix: socket,
      socket: {
        data(s, chunk) {
          if (settled) return;
          buffered += chunk.toString("utf8");
          for (let nl = buffered.indexOf("\n"); nl >= 0; nl = buffered.indexOf("\n")) {
            const line = buffered.slice(0, nl);
            buffered = buffered.slice(nl + 1);
            if (!acked) {
              let ack: HandoffAck;
              try {
                ack = JSON.parse(line) as HandoffAck;
              } catch {
                settle({ kind: "fallback", reason: "agent: malformed acknowledgement" });
                s.end();
                return;
              }
              if (!ack.ok) {
                settle({ kind: "fallback", reason: `agent declined: ${ack.reason}` });
                s.end();
                return;
              }
              const n = s.write(GO_LINE);
              if (n < 0) {
                // Not sent: the agent cannot have started it.
                settle({ kind: "fallback", reason: "agent: the connection closed before it took the invocation" });
                return;
              }
              // From here on this process never runs the invocation itself.
              acked = ack;
              clearTimeout(timer);
              timer = setTimeout(() => settle(broken(`no answer within ${answerTimeoutMs / 1000} s`)), answerTimeoutMs);
              if (n < GO_LINE.length) {
                pending = Buffer.from(GO_LINE.slice(n));
                flush();
              }
              continue;
            }
            try {
              settle({ kind: "answer", answer: JSON.parse(line) as HandoffAnswer });
            } catch {
              settle(broken("malformed answer"));
            }
            s.end();
            return;
          }
        },
        drain: () => flush(),
        close: () => settle(broken("the connection closed")),
        error: (_s, err) => settle(broken(`connection error: ${err.message}`)),
      },
    });
  } catch (err) {
    clearTimeout(timer);
    return { kind: "fallback", reason: `agent socket: ${err instanceof Error ? err.message : String(err)}` };
  }
  flush();
  const result = await outcome;
  clearTimeout(timer);
  sock.end();
  return result;
}

/** Write all of `text` to a standard stream. */
async function print(stream: typeof Bun.stdout, text: string): Promise<void> {
  if (text) await Bun.write(stream, text);
}

/**
 * Load the full plugin and run the invocation in this process (it exits when done). `stdin`:
 * the configuration already read, or undefined when the full plugin is to read it.
 */
async function runHere(engineFile: string, name: string, stdin: (() => string) | undefined, reason: string): Promise<void> {
  let main: typeof import("./main.ts") | undefined;
  try {
    const mod = (await import(engineFile)) as typeof import("./main.ts") & { default?: typeof import("./main.ts") };
    main = typeof mod.runInProcess === "function" ? mod : mod.default;
    if (typeof main?.runInProcess !== "function") throw new Error("it has no runInProcess");
  } catch (err) {
    // A broken install: still the spec's error JSON, never a stack trace.
    const msg = `cannot load knit's CNI plugin ${engineFile}: ${err instanceof Error ? err.message : String(err)}`;
    await print(Bun.stdout, `${JSON.stringify({ cniVersion: LATEST, code: CniCodes.internal, msg, details: "install the plugins again: knit install" })}\n`);
    await print(Bun.stderr, `${name}: ${msg}\n`);
    process.exit(1);
  }
  main.runInProcess(name, stdin, reason, started);
}

async function clientMain(argv: readonly string[]): Promise<void> {
  const name = pluginName(argv);
  const engineFile = argValue(argv, "--engine") ?? `${import.meta.dir}/main.ts`;
  const env = process.env;
  env.PATH ||= DEFAULT_PATH;
  const stay = reasonToStay(env);
  if (stay) return runHere(engineFile, name, undefined, stay);
  let stdin: string;
  try {
    stdin = await readStdin();
  } catch (err) {
    return runHere(engineFile, name, () => { throw err; }, "stdin");
  }
  let conf: unknown;
  try {
    conf = JSON.parse(stdin) as unknown;
  } catch {
    conf = undefined;
  }
  const stateDir = stringField(conf, "stateDir") ?? (env.KNIT_STATE_DIR || DEFAULT_STATE_DIR);
  const agent = await agentOf(stateDir);
  if (!agent) return runHere(engineFile, name, () => stdin, "no agent");
  const vars: Record<string, string> = {};
  for (const [k, v] of Object.entries(env)) if (v !== undefined) vars[k] = v;
  const timeoutS = Number(env.KNIT_CNI_AGENT_TIMEOUT);
  const answerTimeoutMs = (Number.isFinite(timeoutS) && timeoutS > 0 ? timeoutS : ANSWER_TIMEOUT_S) * 1000;
  const outcome = await handOff(agent.socket, { v: HANDOFF_VERSION, plugin: name, env: vars, stdin, pid: process.pid, cwd: process.cwd() }, answerTimeoutMs);
  if (outcome.kind === "fallback") return runHere(engineFile, name, () => stdin, outcome.reason);
  let code: number;
  let trace: TraceRecord | undefined;
  if (outcome.kind === "failed") {
    code = 1;
    await print(Bun.stdout, `${JSON.stringify({ cniVersion: outcome.cniVersion, code: CniCodes.tryAgain, msg: outcome.msg, details: outcome.details })}\n`);
    await print(Bun.stderr, `${name}: ${outcome.msg}\n  ${outcome.details}\n`);
    if (env.KNIT_CNI_TRACE === "1") trace = { path: "agent", inProcess: 0 };
  } else {
    const a = outcome.answer;
    code = a.code;
    await print(Bun.stdout, a.stdout ? `${a.stdout}\n` : "");
    await print(Bun.stderr, a.stderr);
    trace = a.trace;
  }
  if (trace) {
    // The agent's phases, and this process's own time around them.
    const agentMs = typeof trace.inProcess === "number" ? trace.inProcess : 0;
    const total = Math.round((performance.now() - started) * 10) / 10;
    await print(Bun.stderr, traceLine({ ...trace, path: "agent", agentMs, handoffMs: Math.round((total - agentMs) * 10) / 10, inProcess: total }));
  }
  process.exit(code);
}

if (import.meta.main) void clientMain(process.argv);
