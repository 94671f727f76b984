/**
 * knit's CNI plugins: ONE multi-call executable. A runtime runs the file named like the
 * configuration's `type` from its CNI bin dir; `knit install` puts `knit`, `knit-ipam` and
 * `knit-portmap` there as links to one launcher, which runs this file with the name it was
 * called by (`--plugin NAME`). One program, because the three share everything (protocol,
 * store, engine) and a runtime start is the main cost of a plugin: one file to install,
 * upgrade and cache, and nothing the three could disagree on.
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
import type { PluginContext } from "./context.ts";
import type { CniResult } from "./result.ts";
import type { Engine } from "../engine/engine.ts";
import { mark, printTrace } from "./trace.ts";

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

/** Largest configuration read from stdin. */
const MAX_STDIN = 16 << 20;

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
    if (total > MAX_STDIN) throw new CniError(CniCodes.io, `network config on stdin is larger than ${MAX_STDIN} bytes`);
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
}

/** One plugin invocation, start to end: environment, stdin, dispatch, output. */
export async function runPlugin(name: string, env: Record<string, string | undefined>, stdin: () => string): Promise<RunOutput> {
  let version: string = LATEST;
  let engine: Engine | undefined;
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
      return { code: 0, stdout: JSON.stringify({ cniVersion, supportedVersions: SupportedVersions }), stderr: "" };
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
    mark("config");
    const plugin = await loaders[pluginFor(name)]();
    mark("load");
    const ctx: PluginContext = {
      inv,
      conf,
      stdin: text,
      async engine() {
        if (!engine) {
          const { openEngine } = await import("./context.ts");
          engine = await openEngine(conf.stateDir, conf.host);
          mark("store");
        }
        return engine;
      },
    };
    switch (inv.command) {
      case "ADD": {
        const result = await plugin.add(ctx);
        const { formatResult } = await import("./result.ts");
        return { code: 0, stdout: JSON.stringify(formatResult(result, loaded.cniVersion)), stderr: "" };
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
    return { code: 0, stdout: "", stderr: "" };
  } catch (err) {
    const e = toCniError(err);
    const details = e.details ? `\n  ${e.details}` : "";
    return { code: 1, stdout: errorJson(e, version), stderr: `${name}: ${e.message}${details}\n` };
  } finally {
    await engine?.store.close().catch(() => undefined);
    if (process.env.KNIT_CNI_TRACE === "1") printTrace((await import("../kernel/exec.ts")).execStats);
  }
}

/** The plugin name this process was started as: `--plugin NAME`, else the file name. */
function invokedAs(argv: readonly string[]): string {
  const i = argv.indexOf("--plugin");
  if (i >= 0 && argv[i + 1]) return argv[i + 1] ?? "knit";
  const self = argv[1] ?? "knit";
  return self.slice(self.lastIndexOf("/") + 1);
}

/** Run as a plugin process: environment and stdin in, result or error out, exit code. */
export function pluginMain(): void {
  // Runtimes may start plugins with a bare environment: the kernel tools must still be found.
  process.env.PATH ||= "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
  // No top-level await: `knit install` bundles this file as CommonJS with a bytecode cache.
  void runPlugin(invokedAs(process.argv), process.env, readStdin).then((out) => {
    if (out.stdout) writeSync(1, out.stdout + "\n");
    if (out.stderr) writeSync(2, out.stderr);
    process.exit(out.code);
  });
}

if (import.meta.main) pluginMain();
