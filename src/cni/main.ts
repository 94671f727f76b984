/**
 * knit's CNI plugins: ONE multi-call executable. A runtime runs the file named like the
 * configuration's `type` from its CNI bin dir; `knit install` puts `knit`, `knit-ipam` and
 * `knit-portmap` there as links to one launcher, which runs the plugin with the name it was
 * called by (`--plugin NAME`). One program, because the three share everything (protocol,
 * store, engine) and a runtime start is the main cost of a plugin: one file to install,
 * upgrade and cache, and nothing the three could disagree on.
 *
 * Two paths (docs/cni.md "Two paths"): the launcher starts src/cni/client.ts, which hands
 * the invocation to the host's knit agent when one runs for the state directory (the agent
 * runs {@link runPlugin} in its own process, src/agent/cni-server.ts), and otherwise loads
 * this file and runs it here ({@link runInProcess}). Both run the same code with the
 * invocation's environment and stdin: nothing on the path reads process.env.
 *
 * Start-up is kept lean: this file imports only the protocol layer; the engine, store and
 * kernel layers load when a command needs them; output goes through write(2), never
 * process.stdout. Every failure, whatever it is, ends as the spec's error JSON on stdout
 * with a non-zero exit: a runtime never sees a stack trace or a partial result.
 */
import { readSync, writeSync } from "node:fs";
import { CniCodes, CniError, errorJson, toCniError } from "./errors.ts";
import { LATEST, SupportedVersions, loadConfig, readInvocation, statedVersion, type Invocation } from "./protocol.ts";
import { isObject } from "./json.ts";
import { explicitHost, type CniEnv, type PluginContext } from "./context.ts";
import type { PluginConf } from "./config.ts";
import type { CniResult } from "./result.ts";
import type { Engine } from "../engine/engine.ts";
import { CniTrace, traceLine, type KernelStats, type TraceRecord } from "./trace.ts";
import { DEFAULT_PATH, MAX_STDIN, stdinTooLarge } from "./defaults.ts";

/** The operations of one plugin. */
export interface CniPlugin {
  add(ctx: PluginContext): Promise<CniResult>;
  del(ctx: PluginContext): Promise<void>;
  check(ctx: PluginContext): Promise<void>;
  status(ctx: PluginContext): Promise<void>;
  gc(ctx: PluginContext): Promise<void>;
}

export const PluginNames = ["knit", "knit-ipam", "knit-portmap"] as const;
export type PluginName = (typeof PluginNames)[number];

const loaders: Record<PluginName, () => Promise<CniPlugin>> = {
  knit: () => import("./knit-plugin.ts"),
  "knit-ipam": () => import("./ipam-plugin.ts"),
  "knit-portmap": () => import("./portmap-plugin.ts"),
};

/** All of stdin (bounded), as text. */
function readStdin(): string {
  const chunks: Buffer[] = [];
  let total = 0;
  const buf = Buffer.allocUnsafe(1 << 16);
  for (;;) {
    let n: number;
    try {
      n = readSync(0, buf, 0, buf.length, null);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === "EAGAIN") continue;
      if (code === "EOF") break;
      throw new CniError(CniCodes.io, `error reading from stdin: ${(err as Error).message}`);
    }
    if (n === 0) break;
    total += n;
    if (total > MAX_STDIN) throw stdinTooLarge();
    chunks.push(Buffer.from(buf.subarray(0, n)));
  }
  return Buffer.concat(chunks).toString("utf8");
}

/** The plugin a name stands for: the known names, anything else is the main plugin. */
export function pluginFor(name: string): PluginName {
  return (PluginNames as readonly string[]).includes(name) ? (name as PluginName) : "knit";
}

export interface RunOutput {
  code: number;
  stdout: string;
  stderr: string;
  /** With KNIT_CNI_TRACE=1: where the time went (src/cni/trace.ts). */
  trace?: TraceRecord;
}

/**
 * Where an invocation runs: what it gets its engine from, and where delegated plugins'
 * stderr goes. A plugin process opens the store and closes it again; the agent lends the
 * engine it keeps open, and collects stderr into the answer it sends back.
 */
export interface PluginHost {
  /** Which path this is, for the trace: "in-process" or "agent". */
  readonly path: string;
  /** The invocation's working directory, when it is not this process's. */
  readonly cwd?: string;
  /** The engine for an invocation's configuration (its state directory and host name). */
  engine(conf: PluginConf, env: CniEnv): Promise<Engine>;
  /** The invocation is over: give back what {@link engine} gave. */
  release(engine: Engine): Promise<void>;
  readonly delegateStderr: "inherit" | "collect";
}

/** A plugin process: the store opened for the invocation, as the host it names, and closed after. */
export const processHost: PluginHost = {
  path: "in-process",
  async engine(conf, env) {
    const { openEngine } = await import("./context.ts");
    return openEngine(conf.stateDir, explicitHost(conf, env));
  },
  async release(engine) {
    await engine.store.close().catch(() => undefined);
  },
  delegateStderr: "inherit",
};

/** The kernel work counters so far, when tracing. */
async function kernelStats(trace: CniTrace): Promise<KernelStats | undefined> {
  return trace.enabled ? { ...(await import("../kernel/exec.ts")).execStats } : undefined;
}

/**
 * One plugin invocation, start to end: environment, stdin, dispatch, output. `env` is the
 * invocation's environment, `stdin` reads its configuration; `host` says where it runs,
 * `started` when its first line of code ran (for the trace).
 */
export async function runPlugin(name: string, env: CniEnv, stdin: () => string, host: PluginHost = processHost, started = performance.now()): Promise<RunOutput> {
  const trace = CniTrace.of(env, started);
  const kernelAtStart = await kernelStats(trace);
  let version: string = LATEST;
  let engine: Engine | undefined;
  let collected = "";
  const finish = async (out: RunOutput): Promise<RunOutput> => {
    if (engine) await host.release(engine);
    engine = undefined;
    const end = await kernelStats(trace);
    const rec = trace.record(end ? { end, ...(kernelAtStart ? { start: kernelAtStart } : {}) } : undefined);
    return { ...out, stderr: collected + out.stderr, ...(rec ? { trace: { ...rec, path: host.path } } : {}) };
  };
  try {
    const inv: Invocation = readInvocation(env);
    if (inv.command === "VERSION") {
      let asked: unknown;
      try {
        asked = JSON.parse(stdin()) as unknown;
      } catch {
        asked = undefined;
      }
      const v = isObject(asked) && typeof asked.cniVersion === "string" ? asked.cniVersion : LATEST;
      const cniVersion = (SupportedVersions as readonly string[]).includes(v) ? v : LATEST;
      return await finish({ code: 0, stdout: JSON.stringify({ cniVersion, supportedVersions: SupportedVersions }), stderr: "" });
    }
    const text = stdin();
    try {
      const v = statedVersion(JSON.parse(text) as unknown);
      if ((SupportedVersions as readonly string[]).includes(v)) version = v;
    } catch {
      // reported by loadConfig below
    }
    const loaded = loadConfig(text, inv.command);
    version = loaded.cniVersion;
    const { parsePluginConf } = await import("./config.ts");
    const conf = parsePluginConf(loaded, inv, env);
    trace.mark("config");
    const plugin = await loaders[pluginFor(name)]();
    trace.mark("load");
    const ctx: PluginContext = {
      inv,
      env,
      conf,
      stdin: text,
      stderr: host.delegateStderr === "inherit" ? "inherit" : (t) => (collected += t),
      ...(host.cwd ? { cwd: host.cwd } : {}),
      trace,
      async engine() {
        if (!engine) {
          engine = await host.engine(conf, env);
          trace.mark("store");
        }
        return engine;
      },
    };
    switch (inv.command) {
      case "ADD": {
        const result = await plugin.add(ctx);
        const { formatResult } = await import("./result.ts");
        return await finish({ code: 0, stdout: JSON.stringify(formatResult(result, loaded.cniVersion)), stderr: "" });
      }
      case "DEL":
        await plugin.del(ctx);
        break;
      case "CHECK":
        await plugin.check(ctx);
        break;
      case "STATUS":
        await plugin.status(ctx);
        break;
      case "GC":
        await plugin.gc(ctx);
        break;
    }
    return await finish({ code: 0, stdout: "", stderr: "" });
  } catch (err) {
    const e = toCniError(err);
    const details = e.details ? `\n  ${e.details}` : "";
    return finish({ code: 1, stdout: errorJson(e, version), stderr: `${name}: ${e.message}${details}\n` });
  }
}

/** The plugin name this process was started as: `--plugin NAME`, else the file name. */
export function invokedAs(argv: readonly string[]): string {
  const i = argv.indexOf("--plugin");
  if (i >= 0 && argv[i + 1]) return argv[i + 1] ?? "knit";
  const self = argv[1] ?? "knit";
  return self.slice(self.lastIndexOf("/") + 1);
}

/**
 * Run one invocation in this process (the plugin's in-process path), print its result or
 * error, and exit with its code. `stdin` reads the configuration (src/cni/client.ts has
 * read it already when it falls back here; default: read it now); `reason` says why the
 * agent did not take it, `started` when the process's first line of code ran (both for the
 * trace).
 */
export function runInProcess(name: string, stdin: () => string = readStdin, reason?: string, started?: number): void {
  // Runtimes may start plugins with a bare environment: the kernel tools must still be found.
  process.env.PATH ||= DEFAULT_PATH;
  // No top-level await: `knit install` bundles this file as CommonJS with a bytecode cache.
  void runPlugin(name, process.env, stdin, processHost, started).then((out) => {
    if (out.stdout) writeSync(1, out.stdout + "\n");
    if (out.stderr) writeSync(2, out.stderr);
    if (out.trace) writeSync(2, traceLine({ ...out.trace, ...(reason ? { reason } : {}) }));
    process.exit(out.code);
  });
}

/** Run as a plugin process, in-process: environment and stdin in, result or error out, exit code. */
export function pluginMain(): void {
  runInProcess(invokedAs(process.argv), readStdin);
}

if (import.meta.main) pluginMain();
