/**
 * A small declarative flag parser with pflag/cobra behaviour (what `docker` uses): long flags
 * as `--name value` or `--name=value`, short flags as `-n value`, `-nvalue` or `-n=value`,
 * bundled short booleans (`-df`), flags after positionals, and `--` ending flag parsing.
 * A command declares its flags once; `parseArgs` returns their values typed from that spec.
 */
import { invalid, KnitError } from "../errors.ts";

/** Program name used in usage lines and hints. */
export const PROGRAM = "knit";

/**
 * How a flag takes its value: `string` (last one wins), `bool` (`--x`, `--x=false`),
 * `list` (repeatable) or `map` (repeatable `KEY=VALUE`, last value for a key wins).
 */
export type FlagKind = "string" | "bool" | "list" | "map";

/** One flag of a command. */
export interface FlagSpec {
  /** Long name without dashes, e.g. `"subnet"`; also the key in the parsed values. */
  readonly name: string;
  /** One-letter shorthand without the dash, e.g. `"d"`. */
  readonly short?: string;
  readonly kind: FlagKind;
  /** One-line description for `--help`. */
  readonly help: string;
  /** Value of a `string` flag when it is not given (then typed `string`); shown in help. */
  readonly default?: string;
  /** For `list` flags: split each value on commas, like pflag's stringSlice (`--subnet a,b`). */
  readonly csv?: boolean;
  /** Value name shown in help instead of the kind (`--ip-range string`). */
  readonly placeholder?: string;
}

/** A command: how it is called, what it does, which flags it takes. */
export interface CommandSpec<F extends readonly FlagSpec[] = readonly FlagSpec[]> {
  /** Command path without the program, e.g. `"network create"`. */
  readonly name: string;
  /** Usage after the command path, e.g. `"[OPTIONS] NETWORK"`. */
  readonly usage?: string;
  /** One-line description. */
  readonly summary: string;
  readonly flags: F;
  /** Bounds on the number of positionals, checked after parsing (not when `--help`). */
  readonly args?: { readonly min?: number; readonly max?: number };
  /**
   * When false, flag parsing stops at the first positional, which with everything after it
   * becomes `positionals` (`knit run [OPTIONS] IMAGE CMD -c x`). Default true.
   */
  readonly interspersed?: boolean;
  /** Subcommands listed by `renderHelp` (for group commands such as `network`). */
  readonly commands?: readonly { readonly name: string; readonly summary: string }[];
}

type KindValue<K extends FlagKind> = K extends "bool"
  ? boolean
  : K extends "list"
    ? string[]
    : K extends "map"
      ? Record<string, string>
      : string | undefined;

/** The parsed value type of one flag spec. */
export type FlagValue<S extends FlagSpec> = S extends { readonly kind: "string"; readonly default: string }
  ? string
  : KindValue<S["kind"]>;

/** Parsed values of a command's flags, keyed by long name. */
export type FlagValues<F extends readonly FlagSpec[]> = { [S in F[number] as S["name"]]: FlagValue<S> };

/** What `parseArgs` returns. */
export interface ParsedArgs<F extends readonly FlagSpec[]> {
  flags: FlagValues<F>;
  /** Names of the flags given on the command line (to tell `--x=false` from absent). */
  given: ReadonlySet<string>;
  positionals: string[];
  /** Everything after `--`, or undefined when there was no `--`. */
  rest: string[] | undefined;
  /** `--help` or `-h` (unless `-h` is a declared shorthand) was given; parsing stopped there. */
  help: boolean;
}

type AnyValue = string | undefined | boolean | string[] | Record<string, string>;

/** Declare a command; identity at run time, keeps flag names and kinds as literal types. */
export function defineCommand<const F extends readonly FlagSpec[]>(
  spec: CommandSpec<F>,
): CommandSpec<F> {
  indexFlags(spec);
  return spec;
}

/** The hint on usage errors: `See 'knit network create --help'.` */
export const seeHelp = (spec: CommandSpec): string => `See '${PROGRAM} ${spec.name} --help'.`;

function indexFlags(spec: CommandSpec): { long: Map<string, FlagSpec>; short: Map<string, FlagSpec> } {
  const long = new Map<string, FlagSpec>();
  const short = new Map<string, FlagSpec>();
  for (const f of spec.flags) {
    if (long.has(f.name) || f.name === "help" || !/^[a-z0-9][a-z0-9-]*$/i.test(f.name)) {
      throw new KnitError("internal", `command "${spec.name}": bad or duplicate flag --${f.name}`);
    }
    long.set(f.name, f);
    if (f.short === undefined) continue;
    if (short.has(f.short) || f.short.length !== 1) {
      throw new KnitError("internal", `command "${spec.name}": bad or duplicate flag -${f.short}`);
    }
    short.set(f.short, f);
  }
  return { long, short };
}

const TRUE = new Set(["1", "t", "T", "true", "TRUE", "True"]);
const FALSE = new Set(["0", "f", "F", "false", "FALSE", "False"]);

/** Parse argv (without program and command path) against a command's spec. */
export function parseArgs<const F extends readonly FlagSpec[]>(
  spec: CommandSpec<F>,
  argv: readonly string[],
): ParsedArgs<F> {
  const { long, short } = indexFlags(spec);
  const values: Record<string, AnyValue> = {};
  for (const f of spec.flags) values[f.name] = initial(f);
  const given = new Set<string>();
  const positionals: string[] = [];
  let rest: string[] | undefined;
  let help = false;
  let i = 0;

  const next = (label: string): string => {
    const v = argv[i];
    if (v === undefined) throw invalid(`flag needs an argument: ${label}`, seeHelp(spec));
    i++;
    return v;
  };
  const set = (f: FlagSpec, raw: string, label: string): void => {
    given.add(f.name);
    const cur = values[f.name];
    if (f.kind === "bool") {
      if (!TRUE.has(raw) && !FALSE.has(raw)) {
        throw invalid(`invalid value "${raw}" for ${label}: expected true or false`, seeHelp(spec));
      }
      values[f.name] = TRUE.has(raw);
    } else if (f.kind === "list" && Array.isArray(cur)) {
      cur.push(...(f.csv === true ? raw.split(",") : [raw]));
    } else if (f.kind === "map" && typeof cur === "object" && !Array.isArray(cur)) {
      const eq = raw.indexOf("=");
      const key = eq < 0 ? raw : raw.slice(0, eq);
      if (key === "") {
        throw invalid(`invalid value "${raw}" for ${label}: expected KEY=VALUE`, seeHelp(spec));
      }
      const value = eq < 0 ? "" : raw.slice(eq + 1);
      // defineProperty, so a key such as "__proto__" is stored like any other.
      Object.defineProperty(cur, key, { value, enumerable: true, writable: true, configurable: true });
    } else {
      values[f.name] = raw;
    }
  };

  while (i < argv.length && !help) {
    const arg = argv[i] ?? "";
    i++;
    if (arg === "--") {
      rest = argv.slice(i);
      break;
    } else if (arg.startsWith("--")) {
      const eq = arg.indexOf("=");
      const name = arg.slice(2, eq < 0 ? undefined : eq);
      const inline = eq < 0 ? undefined : arg.slice(eq + 1);
      if (name === "help") {
        help = true;
        break;
      }
      const f = long.get(name);
      if (f === undefined) throw invalid(`unknown flag: --${name}`, seeHelp(spec));
      const label = `--${name}`;
      set(f, inline ?? (f.kind === "bool" ? "true" : next(label)), label);
    } else if (arg.startsWith("-") && arg.length > 1) {
      for (let j = 1; j < arg.length; j++) {
        const c = arg.charAt(j);
        const f = short.get(c);
        if (f === undefined && c === "h") {
          help = true;
          break;
        }
        if (f === undefined) throw invalid(`unknown shorthand flag: '${c}' in ${arg}`, seeHelp(spec));
        const after = arg.slice(j + 1);
        const label = `-${c}`;
        if (after.startsWith("=")) {
          set(f, after.slice(1), label);
          break;
        }
        if (f.kind === "bool") {
          set(f, "true", label);
          continue;
        }
        set(f, after !== "" ? after : next(`'${c}' in ${arg}`), label);
        break;
      }
    } else if (spec.interspersed === false) {
      positionals.push(arg, ...argv.slice(i));
      break;
    } else {
      positionals.push(arg);
    }
  }
  if (!help) checkCount(spec, positionals.length);
  // The record was filled from spec.flags, one entry per flag, with the value its kind implies.
  return { flags: values as FlagValues<F>, given, positionals, rest, help };
}

function initial(f: FlagSpec): AnyValue {
  switch (f.kind) {
    case "bool":
      return false;
    case "list":
      return [];
    case "map":
      return {};
    case "string":
      return f.default;
  }
}

function checkCount(spec: CommandSpec, n: number): void {
  const min = spec.args?.min ?? 0;
  const max = spec.args?.max ?? Infinity;
  if (n >= min && n <= max) return;
  const noun = (k: number): string => `${k} argument${k === 1 ? "" : "s"}`;
  const what =
    max === 0
      ? "accepts no arguments"
      : min === max
        ? `requires exactly ${noun(min)}`
        : max === Infinity
          ? `requires at least ${noun(min)}`
          : min === 0
            ? `requires at most ${noun(max)}`
            : `requires at least ${min} and at most ${noun(max)}`;
  throw invalid(`"${PROGRAM} ${spec.name}" ${what}.`, seeHelp(spec));
}

/** Docker-style help text for `--help`, ending in a newline. */
export function renderHelp(spec: CommandSpec): string {
  const usage = spec.usage === undefined ? "" : ` ${spec.usage}`;
  const out = [`Usage:  ${PROGRAM} ${spec.name}${usage}`, "", spec.summary];
  const section = (title: string, rows: [string, string][]): void => {
    if (rows.length === 0) return;
    const width = Math.max(...rows.map(([left]) => left.length)) + 3;
    out.push("", `${title}:`, ...rows.map(([left, right]) => `${left.padEnd(width)}${right}`.trimEnd()));
  };
  section(
    "Commands",
    (spec.commands ?? []).map((c) => [`  ${c.name}`, c.summary]),
  );
  section(
    "Options",
    spec.flags.map((f) => {
      const type = f.placeholder ?? (f.kind === "bool" ? "" : f.kind);
      const short = f.short === undefined ? "   " : `-${f.short},`;
      const left = `  ${short} --${f.name}${type === "" ? "" : ` ${type}`}`;
      const def = f.kind === "string" && f.default !== undefined ? ` (default "${f.default}")` : "";
      return [left, f.help + def];
    }),
  );
  if (spec.commands !== undefined && spec.commands.length > 0) {
    out.push("", `Run '${PROGRAM} ${spec.name} COMMAND --help' for more information on a command.`);
  }
  return out.join("\n") + "\n";
}
