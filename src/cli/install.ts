/**
 * `knit install`: put knit's CNI plugins into a CNI bin dir (default /opt/cni/bin), where
 * runtimes (podman, containerd, cri-o, libcni) look executables up by the configuration's
 * `type`.
 *
 * What lands there: `knit-cni-client.js`, src/cni/client.ts bundled (a few KB: it hands an
 * invocation to the host's knit agent, docs/cni.md "Two paths"); `knit-cni.js`,
 * src/cni/main.ts and everything it imports bundled into one CommonJS file, which the
 * client loads to run an invocation itself; each with its bytecode cache (`.jsc`), so a
 * plugin start parses nothing and resolves no module; `knit-cni`, a small launcher that runs
 * the client with this knit's Bun; and `knit`, `knit-ipam`, `knit-portmap` as links to the
 * launcher (one multi-call executable; see src/cni/main.ts). `--from-source` makes the
 * launcher run the sources of this checkout instead (for development: changes apply without
 * installing again).
 *
 * Every file is written under a temporary name and renamed into place, so a runtime never
 * runs half a file, and an install over an older one is an upgrade. Files of the same names
 * that are not knit's are left alone unless --force. Finally each plugin is asked for
 * VERSION, so a broken install is reported here and not at the first container start.
 *
 * `--docker-plugin` also writes the knit agent's systemd unit, which serves Docker's knit
 * network and IPAM driver (src/plugin/install.ts, docs/docker-plugin.md).
 */
import { chmodSync, existsSync, lstatSync, mkdirSync, readFileSync, readlinkSync, realpathSync, renameSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { KnitError, invalid } from "../errors.ts";
import { defineCommand, parseArgs } from "./args.ts";
import type { CommandContext } from "./context.ts";
import { DEFAULT_SYSTEMD_DIR, UNIT_NAME, installAgentUnit } from "../plugin/install.ts";

export const DEFAULT_CNI_BIN_DIR = "/opt/cni/bin";
/** The multi-call launcher, and the plugin names linked to it. */
export const LAUNCHER = "knit-cni";
export const PLUGIN_LINKS = ["knit", "knit-ipam", "knit-portmap"] as const;
/** The bundle and its bytecode cache, next to the launcher. */
export const BUNDLE = "knit-cni.js";
/** The client's bundle (what the launcher runs), next to it. */
export const CLIENT_BUNDLE = "knit-cni-client.js";
const MARK = "# knit CNI plugins";

const spec = defineCommand({
  name: "install",
  usage: "[OPTIONS]",
  summary: "Install knit's CNI plugins (knit, knit-ipam, knit-portmap) into a CNI bin dir",
  args: { max: 0 },
  flags: [
    { name: "cni-bin-dir", kind: "string", default: DEFAULT_CNI_BIN_DIR, placeholder: "DIR", help: "Directory runtimes load CNI plugins from" },
    { name: "force", short: "f", kind: "bool", help: "Replace files of the same names that are not knit's" },
    { name: "from-source", kind: "bool", help: "Run this checkout's sources instead of a bundle (development)" },
    { name: "docker-plugin", kind: "bool", help: `Also install the ${UNIT_NAME} systemd unit: knit agent --docker-plugin, Docker's knit network driver (docs/docker-plugin.md)` },
    { name: "systemd-dir", kind: "string", default: DEFAULT_SYSTEMD_DIR, placeholder: "DIR", help: "Where --docker-plugin writes the unit" },
  ],
});

/** Quote a path for sh (single quotes). */
const shQuote = (s: string): string => `'${s.replace(/'/g, `'\\''`)}'`;

/**
 * The launcher's text: the plugin name is the name it is started by; `client` hands the
 * invocation to the agent or loads `engine` to run it.
 */
export function launcherScript(bun: string, client: string, engine: string): string {
  return [
    "#!/bin/sh",
    `${MARK} (multi-call: knit, knit-ipam, knit-portmap are links to this file). Installed by \`knit install\`.`,
    `exec ${shQuote(bun)} ${shQuote(client)} --plugin "\${0##*/}" --engine ${shQuote(engine)}`,
    "",
  ].join("\n");
}

/** True when `path` is (or links to) something knit installed, or is absent. */
function ours(path: string): boolean {
  let st;
  try {
    st = lstatSync(path);
  } catch {
    return true;
  }
  if (st.isSymbolicLink()) return readlinkSync(path) === LAUNCHER;
  if (!st.isFile()) return false;
  try {
    return readFileSync(path, "utf8").split("\n", 2)[1]?.startsWith(MARK) === true;
  } catch {
    return false;
  }
}

/**
 * Node built-ins that cost milliseconds to load (node:net alone 6-15 ms) and that a plugin
 * call rarely uses (only publishing a port probes a socket). Bun resolves built-ins before
 * any bundler plugin sees them, so the bundle's sources import them from stand-ins instead,
 * whose functions load the real module on first call. Importing any other name from them
 * fails the build, loudly, here.
 */
const LAZY_BUILTINS: Record<string, readonly string[]> = {
  net: ["createServer", "createConnection", "connect", "isIP", "isIPv4", "isIPv6"],
  dgram: ["createSocket"],
};

const lazyBuiltins: Bun.BunPlugin = {
  name: "knit-lazy-builtins",
  setup(build) {
    const imports = /from "node:(net|dgram)"/g;
    build.onLoad({ filter: /\.ts$/ }, async (args) => ({ loader: "ts", contents: (await Bun.file(args.path).text()).replace(imports, 'from "knit-lazy:$1"') }));
    build.onResolve({ filter: /^knit-lazy:/ }, (args) => ({ path: args.path, namespace: "knit-lazy" }));
    build.onLoad({ filter: /.*/, namespace: "knit-lazy" }, (args) => {
      const mod = args.path.slice("knit-lazy:".length);
      // process.getBuiltinModule: a plain require() here would be bundled back to this stand-in.
      const load = `process.getBuiltinModule(${JSON.stringify(`node:${mod}`)})`;
      return { loader: "js", contents: (LAZY_BUILTINS[mod] ?? []).map((fn) => `export function ${fn}(...a) { return ${load}.${fn}(...a); }`).join("\n") };
    });
  },
};

/**
 * Bundle `entry` (src/cni/main.ts or client.ts) into `outDir` as `<name>.js` + bytecode.
 * Modules of the bundle that find the checkout through `import.meta.dir` (the agent's
 * auto-start runs src/cli/main.ts) get the directory the sources were in, which sits at the
 * same depth as every such module.
 */
async function buildBundle(entry: string, outDir: string, name: string): Promise<void> {
  const res = await Bun.build({
    entrypoints: [entry],
    outdir: outDir,
    target: "bun",
    format: "cjs",
    bytecode: true,
    minify: true,
    naming: `${name.replace(/\.js$/, "")}.[ext]`,
    define: { "import.meta.dir": JSON.stringify(join(entry, "..")) },
    plugins: [lazyBuiltins],
  });
  if (!res.success) throw new KnitError("io", `cannot bundle ${entry}: ${res.logs.map((l) => l.message).join("; ")}`);
}

/** Install into `dir`; returns the paths written. */
export async function installPlugins(dir: string, opts: { force?: boolean; root?: string; fromSource?: boolean } = {}): Promise<string[]> {
  const root = resolve(opts.root ?? process.env.KNIT_ROOT ?? join(import.meta.dir, "..", ".."));
  const main = join(root, "src", "cni", "main.ts");
  const client = join(root, "src", "cni", "client.ts");
  for (const f of [main, client]) if (!existsSync(f)) throw new KnitError("io", `cannot find knit's CNI entry point ${f}`);
  const bun = realpathSync(process.execPath);
  mkdirSync(dir, { recursive: true });
  const targets = [LAUNCHER, ...PLUGIN_LINKS].map((n) => join(dir, n));
  const foreign = targets.filter((t) => !ours(t));
  if (foreign.length && !opts.force) {
    throw new KnitError("conflict", `${foreign.join(", ")} ${foreign.length > 1 ? "exist and are" : "exists and is"} not knit's`, { hint: "move them away, or replace them with knit install --force" });
  }
  const tmp = `.knit-install-${process.pid}`;
  const launcher = join(dir, LAUNCHER);
  let engine = main;
  let front = client;
  if (opts.fromSource) {
    for (const f of [BUNDLE, CLIENT_BUNDLE]) for (const g of [f, `${f}.jsc`]) rmSync(join(dir, g), { force: true });
  } else {
    const build = join(dir, `${tmp}.d`);
    rmSync(build, { recursive: true, force: true });
    try {
      await buildBundle(main, build, BUNDLE);
      await buildBundle(client, build, CLIENT_BUNDLE);
      // The engine before the client (a new client may need it), the launcher last; within
      // each, bytecode first: a start between the two renames falls back to parsing the source.
      for (const f of [BUNDLE, CLIENT_BUNDLE]) {
        renameSync(join(build, `${f}.jsc`), join(dir, `${f}.jsc`));
        renameSync(join(build, f), join(dir, f));
        targets.push(join(dir, f), join(dir, `${f}.jsc`));
      }
    } finally {
      rmSync(build, { recursive: true, force: true });
    }
    engine = join(dir, BUNDLE);
    front = join(dir, CLIENT_BUNDLE);
  }
  writeFileSync(join(dir, tmp), launcherScript(bun, front, engine), { mode: 0o755 });
  chmodSync(join(dir, tmp), 0o755);
  renameSync(join(dir, tmp), launcher);
  for (const name of PLUGIN_LINKS) {
    rmSync(join(dir, tmp), { force: true });
    symlinkSync(LAUNCHER, join(dir, tmp));
    renameSync(join(dir, tmp), join(dir, name));
  }
  for (const name of PLUGIN_LINKS) await verify(join(dir, name));
  return targets;
}

/** Ask an installed plugin for VERSION. */
async function verify(file: string): Promise<void> {
  const proc = Bun.spawn([file], { env: { ...process.env, CNI_COMMAND: "VERSION" }, stdin: new TextEncoder().encode('{"cniVersion":"1.1.0"}'), stdout: "pipe", stderr: "pipe" });
  const [out, err, code] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
  if (code !== 0 || !out.includes("supportedVersions")) {
    throw new KnitError("io", `the installed plugin ${file} does not answer VERSION (exit ${code}): ${(err || out).trim()}`);
  }
}

export async function installMain(ctx: CommandContext, args: readonly string[]): Promise<number> {
  const a = parseArgs(spec, args);
  if (a.help) return ctx.help(spec);
  const dir = a.flags["cni-bin-dir"];
  if (dir === "") throw invalid("--cni-bin-dir needs a directory", `for example --cni-bin-dir ${DEFAULT_CNI_BIN_DIR}`);
  const written = await installPlugins(resolve(dir), { force: a.flags.force, fromSource: a.flags["from-source"] });
  for (const path of written) ctx.out(`${path}\n`);
  if (a.flags["docker-plugin"]) {
    const root = resolve(process.env.KNIT_ROOT ?? join(import.meta.dir, "..", ".."));
    ctx.out(`${installAgentUnit(resolve(a.flags["systemd-dir"]), root, { force: a.flags.force })}\n`);
    ctx.out(`enable it: systemctl daemon-reload && systemctl enable --now ${UNIT_NAME}; then: docker network create -d knit --ipam-driver knit ...\n`);
  }
  return 0;
}
