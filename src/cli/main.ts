/**
 * knit's command line: docker-style verbs over the engine. Global flags come before the
 * command (`knit --state-dir /tmp/k network ls`). Errors print `Error: ...` and a hint, and
 * exit non-zero (125 for `run`, as Docker does, so a command's own exit code stays distinct).
 */
import { KnitError, asKnitError, invalid } from "../errors.ts";
import { renderHelp, type CommandSpec } from "./args.ts";
import { writeErr, writeOut } from "./output.ts";
import type { CommandContext } from "./context.ts";
import { networkMain } from "./network.ts";
import { execMain, inspectMain, portMain, psMain, rmMain, runMain } from "./sandbox.ts";
import { DEFAULT_STATE_DIR, type Engine } from "../engine/engine.ts";
import { openStore } from "../store/open.ts";
import { adoptHostName } from "../engine/owner.ts";
import { ensurePredefined } from "../engine/networks.ts";
import { reconcile } from "../engine/reconcile.ts";
import { afterCommand } from "../agent/autostart.ts";
import { execStats, execTrace } from "../kernel/exec.ts";
import type { Store } from "../store/store.ts";

const VERSION = "0.1.0";

const TOP: CommandSpec = {
  name: "",
  usage: "[--state-dir DIR] [--store SPEC] [--host NAME] COMMAND",
  summary: "Container networks on real kernel objects, for any runtime",
  flags: [],
  commands: [
    { name: "network", summary: "Manage networks (create, ls, inspect, rm, prune, connect, disconnect)" },
    { name: "run", summary: "Run a command in a new sandbox" },
    { name: "ps", summary: "List sandboxes" },
    { name: "inspect", summary: "Display detailed information on sandboxes or networks" },
    { name: "exec", summary: "Run a command in a running sandbox" },
    { name: "rm", summary: "Remove sandboxes" },
    { name: "port", summary: "List a sandbox's published ports" },
    { name: "gc", summary: "Reconcile store and kernel: repair what crashed commands left" },
    { name: "agent", summary: "Run the per-host agent (DNS, cluster membership, overlay peers), or ask it: start, status, stop" },
    { name: "host", summary: "Hosts of the cluster (ls, rm)" },
    { name: "demo", summary: "Show what knit does, in a private lab" },
    { name: "install", summary: "Install knit's CNI plugins into a CNI bin dir" },
    { name: "version", summary: "Show the knit version" },
  ],
};

interface Globals {
  stateDir: string;
  /** Store spec: `etcd://h:p[,h:p]`, `sqlite:DIR`, or undefined for the state directory. */
  store: string | undefined;
  /** This host's name, when given (`--host`, KNIT_HOST). */
  host: string | undefined;
  rest: string[];
}

function parseGlobals(argv: readonly string[]): Globals {
  let stateDir = process.env.KNIT_STATE_DIR || DEFAULT_STATE_DIR;
  let store = process.env.KNIT_STORE || undefined;
  let host = process.env.KNIT_HOST || undefined;
  let i = 0;
  for (; i < argv.length; i++) {
    const a = argv[i] ?? "";
    if (a === "--state-dir") {
      const v = argv[++i];
      if (!v) throw invalid("flag needs an argument: --state-dir");
      stateDir = v;
    } else if (a.startsWith("--state-dir=")) stateDir = a.slice("--state-dir=".length);
    else if (a === "--store") {
      const v = argv[++i];
      if (!v) throw invalid("flag needs an argument: --store");
      store = v;
    } else if (a.startsWith("--store=")) store = a.slice("--store=".length);
    else if (a === "--host" || a.startsWith("--host=")) {
      const v = a === "--host" ? argv[++i] : a.slice("--host=".length);
      if (!v || !/^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$/.test(v)) throw invalid(`invalid --host "${v ?? ""}": a host name of letters, digits, '.', '_' and '-'`);
      host = v;
    }
    else break;
  }
  // Processes this one starts (an auto-started agent, a --rm waiter) use the same store.
  if (store !== undefined) process.env.KNIT_STORE = store;
  return { stateDir, store, host, rest: argv.slice(i) };
}

function printError(err: unknown): void {
  const e = asKnitError(err);
  writeErr(`Error: ${e.message}\n`);
  if (e.hint) writeErr(`${e.hint}\n`);
  if (process.env.KNIT_DEBUG && e.cause instanceof Error) writeErr(`cause: ${e.cause.stack ?? e.cause.message}\n`);
}

/** Where one CLI run spent its time, printed to stderr at exit with KNIT_TRACE=1. */
interface Trace {
  /** Milliseconds since the runtime started (`performance.now()`), at each phase's end. */
  marks: Record<string, number>;
  /** Store calls: count and milliseconds per method. */
  store: Record<string, { n: number; ms: number }>;
  /** Every store call in order: milliseconds, method, key or prefix (or txn size). */
  storeCalls: string[];
}

const trace: Trace | undefined = execTrace ? { marks: { load: performance.now() }, store: {}, storeCalls: [] } : undefined;

/** The store, with every call counted and timed into `t` (for KNIT_TRACE). */
function tracedStore(store: Store, t: Trace): Store {
  return new Proxy(store, {
    get(target, prop, receiver) {
      const value: unknown = Reflect.get(target, prop, receiver);
      if (typeof value !== "function" || typeof prop !== "string") return value;
      return (...args: unknown[]): unknown => {
        const started = performance.now();
        const out: unknown = Reflect.apply(value as (...a: unknown[]) => unknown, target, args);
        const done = (): void => {
          const ms = performance.now() - started;
          const s = (t.store[prop] ??= { n: 0, ms: 0 });
          s.n++;
          s.ms += ms;
          const arg = typeof args[0] === "string" ? ` ${args[0]}` : Array.isArray(args[0]) ? ` (${args[0].length} compares, ${Array.isArray(args[1]) ? args[1].length : 0} ops)` : "";
          t.storeCalls.push(`${ms.toFixed(2)} ${prop}${arg}`);
        };
        if (out instanceof Promise) return out.finally(done);
        done();
        return out;
      };
    },
  });
}

/** Print the trace of this run: one line, `knit-trace: {json}`. */
function printTrace(t: Trace): void {
  const byTool: Record<string, { n: number; ms: number }> = {};
  for (const c of execTrace ?? []) {
    const tool = c.argv.split(" ")[0] ?? "?";
    const e = (byTool[tool] ??= { n: 0, ms: 0 });
    e.n++;
    e.ms += c.ms;
  }
  const round = (x: number): number => Math.round(x * 100) / 100;
  const out = {
    marks: Object.fromEntries(Object.entries(t.marks).map(([k, v]) => [k, round(v)])),
    store: Object.fromEntries(Object.entries(t.store).map(([k, v]) => [k, { n: v.n, ms: round(v.ms) }])),
    exec: { spawns: execStats.spawns, ms: round(execStats.millis), byTool: Object.fromEntries(Object.entries(byTool).map(([k, v]) => [k, { n: v.n, ms: round(v.ms) }])) },
    commands: (execTrace ?? []).map((c) => `${round(c.ms)} ${c.argv}`),
    storeCalls: t.storeCalls,
  };
  writeErr(`knit-trace: ${JSON.stringify(out)}\n`);
}

/** Run the CLI; returns the process exit code. */
export async function main(argv: readonly string[]): Promise<number> {
  let engine: Engine | undefined;
  let command = "";
  let sub = "";
  let argvAfterSub: readonly string[] = [];
  try {
    const g = parseGlobals(argv);
    const [cmd, ...args] = g.rest;
    command = cmd ?? "";
    sub = args[0] ?? "";
    argvAfterSub = args.slice(1);
    const ctx: CommandContext = {
      async engine() {
        if (!engine) {
          adoptHostName(g.stateDir, g.host);
          const store = await openStore(g.store, g.stateDir);
          engine = { store: trace ? tracedStore(store, trace) : store, stateDir: g.stateDir };
          await ensurePredefined(engine);
          if (trace) trace.marks.open = performance.now();
        }
        return engine;
      },
      out: writeOut,
      error: printError,
      help(spec) {
        writeOut(renderHelp(spec));
        return 0;
      },
    };
    switch (cmd) {
      case undefined:
      case "help":
      case "--help":
      case "-h":
        ctx.out(renderHelp(TOP));
        return cmd === undefined ? 1 : 0;
      case "version":
      case "--version":
        ctx.out(`knit ${VERSION} (bun ${Bun.version})\n`);
        return 0;
      case "network":
        return await networkMain(ctx, args);
      case "run":
        return await runMain(ctx, args);
      case "ps":
        return await psMain(ctx, args);
      case "inspect":
        return await inspectMain(ctx, args);
      case "exec":
        return await execMain(ctx, args);
      case "port":
        return await portMain(ctx, args);
      case "rm":
        return await rmMain(ctx, args);
      case "gc": {
        const report = await reconcile(await ctx.engine());
        ctx.out(`${JSON.stringify(report)}\n`);
        return 0;
      }
      case "agent": {
        const { agentMain } = await import("../agent/cli.ts");
        adoptHostName(g.stateDir, g.host);
        return await agentMain(ctx, args, g.stateDir, g.store);
      }
      case "host": {
        const { hostMain } = await import("../cluster/cli.ts");
        return await hostMain(ctx, args);
      }
      case "install": {
        const { installMain } = await import("./install.ts");
        return await installMain(ctx, args);
      }
      case "demo": {
        const { demoMain } = await import("../demo/demo.ts");
        return await demoMain(args);
      }
      default:
        throw invalid(`unknown command "${cmd}"`, "see knit --help");
    }
  } catch (err) {
    printError(err);
    return command === "run" && !(err instanceof KnitError && err.code === "internal") ? 125 : 1;
  } finally {
    if (trace) trace.marks.command = performance.now();
    // Sandboxes came or went: start or stop the DNS agent, fix resolv.conf files.
    if (engine) await afterCommand(engine, command, sub, argvAfterSub).catch(printError);
    if (trace) trace.marks.after = performance.now();
    await engine?.store.close();
    if (trace) {
      trace.marks.close = performance.now();
      printTrace(trace);
    }
  }
}

if (import.meta.main) {
  void main(process.argv.slice(2)).then((code) => {
    process.exitCode = code;
    // Output is written synchronously and the store is closed: nothing is left to do. A
    // cluster store whose address black-holes packets (a firewall drops them) leaves a TCP
    // connect pending in the gRPC client after close(), which would hold the process for
    // minutes after its error was printed; this unref'd timer ends it instead (and never
    // fires when the process exits by itself).
    setTimeout(() => process.exit(code), 200).unref();
  });
}
