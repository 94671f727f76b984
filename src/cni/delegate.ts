/**
 * Delegated plugins (SPEC.md section 4): when the knit plugin's `ipam.type` names another
 * IPAM plugin (host-local, static, dhcp ...), that executable is looked up in CNI_PATH and run
 * with the same environment and configuration the knit plugin got, its stderr passed through.
 * Its error (code, msg, details) is reported as it is.
 */
import { existsSync, statSync } from "node:fs";
import { join } from "node:path";
import { CniCodes, CniError } from "./errors.ts";
import { isObject, parseJson } from "./json.ts";
import { parseResult, type CniResult } from "./result.ts";
import type { Command, Invocation } from "./protocol.ts";

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

/**
 * Run a delegated plugin for `command` with the invocation's environment and `stdin`; returns
 * its result for ADD (in the configuration's `version`), nothing otherwise.
 */
export async function execDelegate(type: string, command: Command, inv: Invocation, stdin: string, version: string): Promise<CniResult | undefined> {
  const file = findPlugin(type, inv.path);
  const env: Record<string, string> = {};
  for (const [k, v] of Object.entries(process.env)) if (v !== undefined) env[k] = v;
  env.CNI_COMMAND = command;
  const proc = Bun.spawn([file], { env, stdin: new TextEncoder().encode(stdin), stdout: "pipe", stderr: "inherit" });
  const [out, code] = await Promise.all([new Response(proc.stdout).text(), proc.exited]);
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
