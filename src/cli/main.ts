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
import { execMain, inspectMain, psMain, rmMain, runMain } from "./sandbox.ts";
import { DEFAULT_STATE_DIR, type Engine } from "../engine/engine.ts";
import { openSqliteStore } from "../store/sqlite.ts";
import { ensurePredefined } from "../engine/networks.ts";
import { reconcile } from "../engine/reconcile.ts";

const VERSION = "0.1.0";

const TOP: CommandSpec = {
  name: "",
  usage: "[--state-dir DIR] COMMAND",
  summary: "Container networks on real kernel objects, for any runtime",
  flags: [],
  commands: [
    { name: "network", summary: "Manage networks (create, ls, inspect, rm, prune, connect, disconnect)" },
    { name: "run", summary: "Run a command in a new sandbox" },
    { name: "ps", summary: "List sandboxes" },
    { name: "inspect", summary: "Display detailed information on sandboxes or networks" },
    { name: "exec", summary: "Run a command in a running sandbox" },
    { name: "rm", summary: "Remove sandboxes" },
    { name: "gc", summary: "Reconcile store and kernel: repair what crashed commands left" },
    { name: "demo", summary: "Show what knit does, in a private lab" },
    { name: "version", summary: "Show the knit version" },
  ],
};

interface Globals {
  stateDir: string;
  rest: string[];
}

function parseGlobals(argv: readonly string[]): Globals {
  let stateDir = process.env.KNIT_STATE_DIR || DEFAULT_STATE_DIR;
  let i = 0;
  for (; i < argv.length; i++) {
    const a = argv[i] ?? "";
    if (a === "--state-dir") {
      const v = argv[++i];
      if (!v) throw invalid("flag needs an argument: --state-dir");
      stateDir = v;
    } else if (a.startsWith("--state-dir=")) stateDir = a.slice("--state-dir=".length);
    else break;
  }
  return { stateDir, rest: argv.slice(i) };
}

function printError(err: unknown): void {
  const e = asKnitError(err);
  writeErr(`Error: ${e.message}\n`);
  if (e.hint) writeErr(`${e.hint}\n`);
  if (process.env.KNIT_DEBUG && e.cause instanceof Error) writeErr(`cause: ${e.cause.stack ?? e.cause.message}\n`);
}

/** Run the CLI; returns the process exit code. */
export async function main(argv: readonly string[]): Promise<number> {
  let engine: Engine | undefined;
  let command = "";
  try {
    const g = parseGlobals(argv);
    const [cmd, ...args] = g.rest;
    command = cmd ?? "";
    const ctx: CommandContext = {
      async engine() {
        if (!engine) {
          engine = { store: await openSqliteStore(g.stateDir), stateDir: g.stateDir };
          await ensurePredefined(engine);
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
      case "rm":
        return await rmMain(ctx, args);
      case "gc": {
        const report = await reconcile(await ctx.engine());
        ctx.out(`${JSON.stringify(report)}\n`);
        return 0;
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
    await engine?.store.close();
  }
}

if (import.meta.main) {
  process.exitCode = await main(process.argv.slice(2));
}
