/**
 * Small helpers shared by the benchmarks: timing, summaries (median, percentiles), side by
 * side runs that alternate their order to cancel drift, a plain-text results table, the
 * machine's load, and writing a run's results as JSON under bench/results/ (gitignored).
 *
 * Only ratios measured in one run on one machine mean much: the machine is shared and busy,
 * so every comparison runs both sides interleaved, in the same lab, and reports medians.
 */
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { cpus, loadavg, release } from "node:os";
import { join } from "node:path";
import { REPO_ROOT } from "../src/lab/lab.ts";

/** Where result files go (ignored by git). */
export const RESULTS_DIR = join(REPO_ROOT, "bench", "results");

/** Milliseconds `fn` took (wall clock), with its result. */
export async function timed<T>(fn: () => Promise<T>): Promise<{ ms: number; value: T }> {
  const started = performance.now();
  const value = await fn();
  return { ms: performance.now() - started, value };
}

/** Milliseconds `fn` took (wall clock). */
export async function timeMs(fn: () => Promise<unknown>): Promise<number> {
  return (await timed(fn)).ms;
}

/** The `q` quantile (0..1) of `xs`, interpolated between the two nearest ranks; NaN when empty. */
export function quantile(xs: readonly number[], q: number): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  const pos = (s.length - 1) * Math.min(1, Math.max(0, q));
  const lo = Math.floor(pos);
  const hi = Math.ceil(pos);
  const a = s[lo] ?? NaN;
  const b = s[hi] ?? NaN;
  return a + (b - a) * (pos - lo);
}

/** The median of `xs` (NaN when empty). */
export const median = (xs: readonly number[]): number => quantile(xs, 0.5);

/** What a list of samples (milliseconds, bytes ...) is summarised as. */
export interface Summary {
  n: number;
  median: number;
  p90: number;
  min: number;
  max: number;
  mean: number;
}

/** Count, median, p90, min, max and mean of `xs`. */
export function summarize(xs: readonly number[]): Summary {
  return {
    n: xs.length,
    median: median(xs),
    p90: quantile(xs, 0.9),
    min: xs.length ? Math.min(...xs) : NaN,
    max: xs.length ? Math.max(...xs) : NaN,
    mean: xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : NaN,
  };
}

/** `a / b`, rounded to 2 decimals (NaN when b is 0). */
export function ratio(a: number, b: number): number {
  return b === 0 ? NaN : Math.round((a / b) * 100) / 100;
}

/** A number rounded to `digits` decimals (for tables and JSON). */
export function round(x: number, digits = 1): number {
  const f = 10 ** digits;
  return Math.round(x * f) / f;
}

/** One side of a side-by-side measurement: a name and one timed sample per call. */
export interface Variant {
  name: string;
  /** Run once and return the sample (usually milliseconds). */
  sample(): Promise<number>;
}

/**
 * Run every variant `rounds` times, interleaved: round i runs them in order, round i+1 in
 * reverse order, so that neither side always runs first and drift (another job starting on
 * the machine) hits both alike. Returns the samples per variant name.
 */
export async function interleaved(variants: readonly Variant[], rounds: number, onRound?: (i: number) => void): Promise<Record<string, number[]>> {
  const out: Record<string, number[]> = Object.fromEntries(variants.map((v) => [v.name, []]));
  for (let i = 0; i < rounds; i++) {
    const order = i % 2 === 0 ? variants : [...variants].reverse();
    for (const v of order) out[v.name]?.push(await v.sample());
    onRound?.(i);
  }
  return out;
}

/** A plain-text table: columns padded to their widest cell, numbers right-aligned. */
export function renderTable(headers: readonly string[], rows: readonly (readonly (string | number)[])[]): string {
  const cells = rows.map((r) => r.map((c) => (typeof c === "number" ? (Number.isFinite(c) ? String(c) : "-") : c)));
  const widths = headers.map((h, i) => Math.max(h.length, ...cells.map((r) => (r[i] ?? "").length)));
  const numeric = headers.map((_, i) => rows.every((r) => typeof r[i] === "number" || r[i] === undefined));
  const line = (r: readonly string[]): string =>
    r
      .map((c, i) => (numeric[i] ? c.padStart(widths[i] ?? 0) : c.padEnd(widths[i] ?? 0)))
      .join("  ")
      .trimEnd();
  return [line(headers), line(widths.map((w) => "-".repeat(w))), ...cells.map(line)].join("\n") + "\n";
}

/** Print a titled table to stdout. */
export function printTable(title: string, headers: readonly string[], rows: readonly (readonly (string | number)[])[]): void {
  process.stdout.write(`\n${title}\n${renderTable(headers, rows)}`);
}

/** The 1, 5 and 15 minute load averages, rounded. */
export function loadAverage(): [number, number, number] {
  const [a = NaN, b = NaN, c = NaN] = loadavg();
  return [round(a, 2), round(b, 2), round(c, 2)];
}

/** What a results file records about the machine the run was made on. */
export function machineInfo(): Record<string, unknown> {
  return { kernel: release(), cpus: cpus().length, cpuModel: cpus()[0]?.model ?? "?", bun: Bun.version, load: loadAverage() };
}

/** `--name VALUE` as a positive number, or `dflt`. */
export function argNumber(name: string, dflt: number): number {
  const i = process.argv.indexOf(`--${name}`);
  if (i < 0) return dflt;
  const v = Number(process.argv[i + 1]);
  if (!Number.isFinite(v) || v <= 0) throw new Error(`--${name} needs a positive number`);
  return v;
}

/** True when `--name` is on the command line. */
export const argFlag = (name: string): boolean => process.argv.includes(`--${name}`);

/**
 * Write `data` (plus the machine's description and the time) to
 * `bench/results/<name>-<date>T<time>.json`; returns the path.
 */
export function writeResults(name: string, data: Record<string, unknown>): string {
  mkdirSync(RESULTS_DIR, { recursive: true });
  const now = new Date();
  const stamp = now.toISOString().replace(/:/g, "-").replace(/\.\d+Z$/, "");
  const path = join(RESULTS_DIR, `${name}-${stamp}.json`);
  writeFileSync(path, `${JSON.stringify({ benchmark: name, at: now.toISOString(), machine: machineInfo(), ...data }, null, 2)}\n`);
  return path;
}

/** A field of /proc/PID/status in kB (VmHWM, VmRSS ...), or undefined when gone. */
export function procStatusKb(pid: number, field: string): number | undefined {
  try {
    const m = new RegExp(`^${field}:\\s+(\\d+) kB`, "m").exec(readFileSync(`/proc/${pid}/status`, "utf8"));
    return m ? Number(m[1]) : undefined;
  } catch {
    return undefined;
  }
}

/** User + system CPU seconds a process has used so far (/proc/PID/stat), or undefined when gone. */
export function procCpuSeconds(pid: number): number | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    // Fields 14 and 15 overall (utime, stime), in clock ticks of 1/100 s on Linux.
    return round((Number(fields[11]) + Number(fields[12])) / 100, 2);
  } catch {
    return undefined;
  }
}

/** Fields of /proc/meminfo in kB (MemAvailable, Slab, Percpu ...). */
export function meminfoKb(): Record<string, number> {
  const out: Record<string, number> = {};
  for (const line of readFileSync("/proc/meminfo", "utf8").split("\n")) {
    const m = /^(\w+(?:\(\w+\))?):\s+(\d+)/.exec(line);
    if (m?.[1] && m[2]) out[m[1]] = Number(m[2]);
  }
  return out;
}
