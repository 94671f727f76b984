/**
 * Delegated plugins (SPEC.md section 4): when the knit plugin's `ipam.type` names another
 * IPAM plugin (host-local, static, dhcp ...), that executable is looked up in CNI_PATH and run
 * with the same environment and configuration the knit plugin got (the invocation's, also
 * when the agent runs it), its stderr passed through (collected into the invocation's stderr
 * in the agent). Its error (code, msg, details) is reported as it is.
 */
import { existsSync, statSync } from "node:fs";
import { join } from "node:path";
import { CniCodes, CniError } from "./errors.ts";
import { isObject, parseJson } from "./json.ts";
import { parseResult, type CniResult } from "./result.ts";
import type { Command } from "./protocol.ts";
import type { PluginContext } from "./context.ts";

/** The executable of plugin `type` in CNI_PATH. */
export function findPlugin(type: string, path: readonly string[]): string {
  if (type === "" || type.includes("/") || type.includes("\\") || type === "." || type === "..") {
    throw new CniError(CniCodes.invalidConfig, `invalid plugin type "${type}"`);
  }
  for (const dir of path) {
    const file = join(dir, type);
    try {
      if (existsSync(file) && statSync(file).isFile()) return file;
    } catch {
      // unreadable directory: try the next one
    }
  }
  throw new CniError(CniCodes.invalidConfig, `failed to find plugin "${type}" in path [${path.join(" ")}]`);
}

/** What a delegated plugin is run with: the invocation, its environment and stdin, where its stderr goes. */
export type DelegateCall = Pick<PluginContext, "inv" | "env" | "stdin" | "stderr" | "cwd">;

/**
 * Run a delegated plugin for `command` with the invocation's environment and stdin; returns
 * its result for ADD (in the configuration's `version`), nothing otherwise.
 */
export async function execDelegate(type: string, command: Command, call: DelegateCall, version: string): Promise<CniResult | undefined> {
  const file = findPlugin(type, call.inv.path);
  const env: Record<string, string> = {};
  for (const [k, v] of Object.entries(call.env)) if (v !== undefined) env[k] = v;
  env.CNI_COMMAND = command;
  const sink = call.stderr;
  const proc = Bun.spawn([file], { env, ...(call.cwd ? { cwd: call.cwd } : {}), stdin: new TextEncoder().encode(call.stdin), stdout: "pipe", stderr: sink === "inherit" ? "inherit" : "pipe" });
  const [out, errText, code] = await Promise.all([
    new Response(proc.stdout).text(),
    sink === "inherit" || !proc.stderr ? Promise.resolve("") : new Response(proc.stderr).text(),
    proc.exited,
  ]);
  if (sink !== "inherit" && errText) sink(errText);
  if (code !== 0) {
    let parsed: unknown;
    try {
      parsed = parseJson(out, `${type} output`);
    } catch {
      parsed = undefined;
    }
    if (isObject(parsed) && typeof parsed.code === "number" && typeof parsed.msg === "string") {
      throw new CniError(parsed.code, `${type}: ${parsed.msg}`, typeof parsed.details === "string" ? parsed.details : "");
    }
    throw new CniError(CniCodes.delegate, `${type} ${command} failed (exit ${code})`, out.trim());
  }
  if (command !== "ADD") return undefined;
  return parseResult(parseJson(out, `${type} result`), version, `${type} result`);
}
