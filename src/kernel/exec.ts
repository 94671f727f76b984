/**
 * Running kernel tools. Commands are argv arrays (never a shell); a namespace is entered by
 * `ip -n NAME` for named namespaces or by `nsenter --net=PATH` for any other path. (The
 * in-process netlink path, netlink-socket.ts, enters a namespace only for the synchronous
 * moment it takes to open a socket there.)
 */
import { KnitError } from "../errors.ts";

/** A network namespace: a path to its nsfs file (`/run/netns/x`, `/proc/PID/ns/net`). */
export interface Netns {
  readonly path: string;
}

/** The directory where `ip netns` keeps named namespaces. */
export const NETNS_DIR = "/run/netns";

/** The name `ip -n` accepts for a namespace, when it has one. */
export function netnsName(ns: Netns): string | undefined {
  const prefix = `${NETNS_DIR}/`;
  if (!ns.path.startsWith(prefix)) return undefined;
  const name = ns.path.slice(prefix.length);
  return name.includes("/") ? undefined : name;
}

export interface RunResult {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

export interface RunOptions {
  /** Text fed to the command's standard input. */
  stdin?: string;
  /** Run inside this namespace (via nsenter). */
  netns?: Netns;
  /** Return a non-zero exit instead of throwing. */
  allowFailure?: boolean;
}

/**
 * Count of commands spawned, and of netlink requests made in-process (src/kernel/netlink.ts),
 * for benchmarks that report where time goes.
 */
export const execStats = { spawns: 0, millis: 0, netlink: 0, netlinkMillis: 0 };

/**
 * With KNIT_TRACE=1, every command run (argv without the namespace prefix, shortened) and its
 * milliseconds, for the CLI's trace at exit (src/cli/main.ts). Undefined otherwise.
 */
export const execTrace: { argv: string; ms: number }[] | undefined = process.env.KNIT_TRACE === "1" ? [] : undefined;

/**
 * Count one netlink request (or socket set-up) and its milliseconds; with KNIT_TRACE=1 it is
 * listed with the commands as `netlink WHAT`, so traces show the kernel calls that spawn
 * nothing.
 */
export function recordNetlink(what: string, ms: number): void {
  execStats.netlink++;
  execStats.netlinkMillis += ms;
  execTrace?.push({ argv: `netlink ${what}`, ms });
}

/** Run one command and collect its output; a non-zero exit throws a KnitError("kernel"). */
export async function run(argv: readonly string[], opts: RunOptions = {}): Promise<RunResult> {
  const full = opts.netns ? ["nsenter", `--net=${opts.netns.path}`, "--", ...argv] : [...argv];
  const started = performance.now();
  let proc;
  try {
    proc = Bun.spawn(full, {
      stdin: opts.stdin === undefined ? "ignore" : new TextEncoder().encode(opts.stdin),
      stdout: "pipe",
      stderr: "pipe",
    });
  } catch (err) {
    throw new KnitError("kernel", `cannot run ${full[0]}: ${(err as Error).message}`, {
      cause: err,
      hint: "run the README's setup command to install iproute2 and nftables",
    });
  }
  const [stdout, stderr, code] = await Promise.all([
    new Response(proc.stdout).text(),
    new Response(proc.stderr).text(),
    proc.exited,
  ]);
  const ms = performance.now() - started;
  execStats.spawns++;
  execStats.millis += ms;
  execTrace?.push({ argv: argv.slice(0, 4).join(" "), ms });
  if (code !== 0 && !opts.allowFailure) {
    const shown = full.join(" ");
    const input = opts.stdin ? `\n${opts.stdin.trimEnd()}` : "";
    throw new KnitError("kernel", `${shown} failed (exit ${code}): ${stderr.trim() || stdout.trim()}`, {
      cause: new Error(`${shown}${input}`),
    });
  }
  return { code, stdout, stderr };
}

/** Run a command that prints JSON and parse it. Empty output parses as `fallback`. */
export async function runJson<T>(argv: readonly string[], fallback: T, opts: RunOptions = {}): Promise<T> {
  const { stdout } = await run(argv, opts);
  const text = stdout.trim();
  if (text === "") return fallback;
  try {
    return JSON.parse(text) as T;
  } catch (err) {
    throw new KnitError("kernel", `${argv.join(" ")} printed output that is not JSON`, { cause: err });
  }
}
