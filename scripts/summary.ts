/**
 * Summarise a test run: the checks scripts/test ran (typecheck, lint) plus every test case in
 * the JUnit report that `bun test --reporter=junit` wrote. Prints the name of every failure,
 * then a last line `N passed, N failed[, N skipped]`. Exits 1 when anything failed.
 *
 *   bun scripts/summary.ts [--check NAME=pass|fail]... --junit FILE --log FILE --exit CODE [--label TEXT]
 *                          [--junit FILE --log FILE --exit CODE [--label TEXT]]...
 *
 * Each `--junit` starts one `bun test` run; the `--log`, `--exit` and `--label` after it are
 * that run's (a label prefixes its test names, to tell a second pass over some files apart).
 *
 * What Bun 1.4.4 writes (checked): `<testsuites>` > one `<testsuite>` per file > nested
 * `<testsuite>` per describe block > `<testcase name classname file line>`, with a
 * `<failure type message>` child for a failed test (a timeout is type="TimeoutError"; a
 * failing afterAll appears as a test case named "(unnamed)"), `<skipped/>` for skip and
 * `<skipped message="TODO"/>` for todo. An error outside any test (a file that throws while
 * loading) is NOT in the report: Bun only prints "# Unhandled error between tests" and counts
 * it in its " N error" line, so the console log is read for that, and a non-zero exit of
 * `bun test` without any failure found counts as one failure too.
 */
import { existsSync, readFileSync } from "node:fs";

/** One test case from the report. */
export interface TestCase {
  /** `file > describe > … > test`. */
  name: string;
  status: "passed" | "failed" | "skipped";
  /** The failure message (its first lines are printed). */
  message?: string;
}

/** How many lines of a failure message the summary prints. */
const MESSAGE_LINES = 12;

const ENTITIES: Record<string, string> = { lt: "<", gt: ">", amp: "&", quot: '"', apos: "'" };

/** Decode XML character and entity references. */
export function unescapeXml(s: string): string {
  return s.replace(/&(#x[0-9a-fA-F]+|#\d+|\w+);/g, (m, ref: string) => {
    if (ref.startsWith("#x")) return String.fromCodePoint(parseInt(ref.slice(2), 16));
    if (ref.startsWith("#")) return String.fromCodePoint(parseInt(ref.slice(1), 10));
    return ENTITIES[ref] ?? m;
  });
}

function attrs(text: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const m of text.matchAll(/([\w:.-]+)\s*=\s*"([^"]*)"/g)) {
    if (m[1] !== undefined && m[2] !== undefined) out[m[1]] = unescapeXml(m[2]);
  }
  return out;
}

/** Parse Bun's JUnit XML into test cases (nested suites give the name its path). */
export function parseJunit(xml: string): TestCase[] {
  const cases: TestCase[] = [];
  const suites: { name: string; file: string }[] = [];
  let current: (TestCase & { open: boolean }) | undefined;
  const tag = /<(\/?)(testsuites|testsuite|testcase|failure|error|skipped)\b((?:[^>"]|"[^"]*")*?)(\/?)>/g;
  for (const m of xml.matchAll(tag)) {
    const [, closing, name, rest = "", selfClosing] = m;
    if (name === "testsuite") {
      if (closing) suites.pop();
      else if (!selfClosing) {
        const a = attrs(rest);
        suites.push({ name: a["name"] ?? "", file: a["file"] ?? "" });
      }
    } else if (name === "testcase") {
      if (closing) {
        if (current) cases.push({ name: current.name, status: current.status, ...(current.message ? { message: current.message } : {}) });
        current = undefined;
        continue;
      }
      const a = attrs(rest);
      const file = a["file"] ?? suites[0]?.file ?? "";
      // The outermost suite is the file; the others are describe blocks, outermost first.
      const path = suites.map((s) => s.name).filter((n, i) => !(i === 0 && (n === file || n === suites[0]?.file)));
      const full = [file, ...path, a["name"] ?? "(unnamed)"].filter(Boolean).join(" > ");
      current = { name: full, status: "passed", open: true };
      if (selfClosing) {
        cases.push({ name: current.name, status: current.status });
        current = undefined;
      }
    } else if ((name === "failure" || name === "error") && !closing && current) {
      const a = attrs(rest);
      current.status = "failed";
      const msg = (a["message"] ?? a["type"] ?? "").trim();
      if (msg) current.message = msg;
    } else if (name === "skipped" && !closing && current && current.status !== "failed") {
      current.status = "skipped";
    }
  }
  return cases;
}

/** Errors Bun counted outside test cases: the number in its closing " N error" line. */
export function errorsOutsideTests(log: string): number {
  const text = log.replace(/\x1b\[[0-9;]*m/g, "");
  let n = 0;
  for (const m of text.matchAll(/^\s*(\d+) errors?\s*$/gm)) n = Number(m[1]);
  const unhandled = (text.match(/^# Unhandled error/gm) ?? []).length;
  return Math.max(n, unhandled);
}

interface Run {
  junit: string;
  log?: string;
  exit?: number;
  label?: string;
}

interface Args {
  runs: Run[];
  checks: { name: string; ok: boolean }[];
}

function parseArgs(argv: readonly string[]): Args {
  const args: Args = { runs: [], checks: [] };
  const run = (flag: string): Run => {
    const last = args.runs[args.runs.length - 1];
    if (!last) throw new Error(`summary: ${flag} before any --junit`);
    return last;
  };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    const value = argv[i + 1];
    if (value === undefined) throw new Error(`summary: ${flag ?? "?"} needs a value`);
    i++;
    if (flag === "--junit") args.runs.push({ junit: value });
    else if (flag === "--log") run(flag).log = value;
    else if (flag === "--exit") run(flag).exit = Number(value);
    else if (flag === "--label") run(flag).label = value;
    else if (flag === "--check") {
      const [name = "", result = ""] = value.split("=");
      if (result !== "pass" && result !== "fail") throw new Error(`summary: --check ${value}: expected NAME=pass or NAME=fail`);
      args.checks.push({ name, ok: result === "pass" });
    } else throw new Error(`summary: unknown argument ${flag ?? ""}`);
  }
  return args;
}

function main(): number {
  const args = parseArgs(process.argv.slice(2));
  const results: TestCase[] = args.checks.map((c) => ({ name: c.name, status: c.ok ? "passed" : "failed" }));
  for (const run of args.runs) {
    const bunExit = run.exit ?? 0;
    const prefix = run.label ? `[${run.label}] ` : "";
    const cases = existsSync(run.junit) ? parseJunit(readFileSync(run.junit, "utf8")) : undefined;
    if (cases === undefined) {
      results.push({ name: `${prefix}bun test`, status: "failed", message: `wrote no JUnit report (exit ${bunExit})` });
      continue;
    }
    const own = cases.map((c) => ({ ...c, name: `${prefix}${c.name}` }));
    const log = run.log !== undefined && existsSync(run.log) ? readFileSync(run.log, "utf8") : "";
    const outside = errorsOutsideTests(log);
    for (let i = 0; i < outside; i++) {
      own.push({ name: `${prefix}bun test: error outside a test (${i + 1} of ${outside})`, status: "failed", message: "see the output above" });
    }
    if (bunExit !== 0 && !own.some((r) => r.status === "failed")) {
      own.push({ name: `${prefix}bun test`, status: "failed", message: `exited with code ${bunExit}` });
    }
    results.push(...own);
  }
  const failed = results.filter((r) => r.status === "failed");
  const passed = results.filter((r) => r.status === "passed").length;
  const skipped = results.filter((r) => r.status === "skipped").length;
  if (failed.length) {
    console.log(`\nFailures (${failed.length}):`);
    // The first lines of each message: CI shows only the tail of the output, so the reason
    // for a failure must be here, not only in Bun's log above.
    for (const f of failed) {
      const lines = (f.message ?? "").split("\n").map((l) => l.trimEnd()).filter(Boolean);
      const shown = lines.slice(0, MESSAGE_LINES);
      if (lines.length > shown.length) shown.push(`… (${lines.length - shown.length} more lines in the log above)`);
      console.log(`  FAIL ${f.name}${shown.length ? `: ${shown.join("\n      ")}` : ""}`);
    }
  }
  if (skipped) {
    console.log(`\nSkipped (${skipped}):`);
    for (const s of results.filter((r) => r.status === "skipped")) console.log(`  SKIP ${s.name}`);
  }
  console.log("");
  console.log(`${passed} passed, ${failed.length} failed${skipped ? `, ${skipped} skipped` : ""}`);
  return failed.length ? 1 : 0;
}

if (import.meta.main) process.exit(main());
