/**
 * The CNI execution protocol (SPEC.md section 2): which environment variables each command
 * needs and how they are validated, CNI_ARGS, the spec versions knit speaks, and the checks
 * on the configuration every command makes before anything else. The rules and codes are the
 * spec's, in the order libcni's plugins (Go's `skel`) apply them, so that a runtime sees the
 * same error from knit as from any other plugin.
 */
import { CniCodes, CniError } from "./errors.ts";
import { Fields, isObject, parseJson } from "./json.ts";

export const Commands = ["ADD", "DEL", "CHECK", "STATUS", "VERSION", "GC"] as const;
export type Command = (typeof Commands)[number];

/** Spec versions knit reads configurations and writes results for, oldest first. */
export const SupportedVersions = ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] as const;
export type CniVersion = (typeof SupportedVersions)[number];
export const LATEST: CniVersion = "1.1.0";

/** The variables of one invocation (SPEC.md "Parameters"). */
export interface Invocation {
  command: Command;
  containerId: string;
  netns: string;
  ifname: string;
  args: string;
  path: string[];
}

/** Which variables a command requires (and validates); VERSION needs only CNI_COMMAND. */
const REQUIRED: Record<string, readonly Command[]> = {
  CNI_CONTAINERID: ["ADD", "CHECK", "DEL"],
  CNI_NETNS: ["ADD", "CHECK"],
  CNI_IFNAME: ["ADD", "CHECK", "DEL"],
  CNI_PATH: ["ADD", "CHECK", "DEL", "GC", "STATUS"],
};

/** Names of containers and networks: `^[a-zA-Z0-9][a-zA-Z0-9_.-]*$`. */
export const CNI_NAME_RE = /^[a-zA-Z0-9][a-zA-Z0-9_.-]*$/;

export function checkContainerId(id: string): void {
  if (!CNI_NAME_RE.test(id)) throw new CniError(CniCodes.invalidEnv, "invalid characters in CNI_CONTAINERID", id);
}

/** Interface names: 1-15 bytes, not "." or "..", no '/', ':' or white space. */
export function checkCniIfname(name: string): void {
  const bad = (msg: string, details = ""): CniError => new CniError(CniCodes.invalidEnv, `CNI_IFNAME: ${msg}`, details);
  if (name.length === 0) throw bad("interface name is empty");
  if (new TextEncoder().encode(name).length > 15) throw bad("interface name is too long", "interface name should be less than 16 characters");
  if (name === "." || name === "..") throw bad("interface name is . or ..");
  if (/[/:\s]/u.test(name)) throw bad("interface name contains / or : or whitespace characters");
}

/** Read and validate the environment of one invocation. */
export function readInvocation(env: Record<string, string | undefined>): Invocation {
  const raw = env.CNI_COMMAND ?? "";
  const command = (Commands as readonly string[]).includes(raw) ? (raw as Command) : undefined;
  const missing: string[] = [];
  if (raw === "") missing.push("CNI_COMMAND");
  for (const [name, cmds] of Object.entries(REQUIRED)) {
    const value = env[name] ?? "";
    const needed = command !== undefined && cmds.includes(command);
    if (value === "") {
      if (needed) missing.push(name);
    } else if (needed && name === "CNI_CONTAINERID") checkContainerId(value);
    else if (needed && name === "CNI_IFNAME") checkCniIfname(value);
  }
  if (missing.length) throw new CniError(CniCodes.invalidEnv, `required env variables [${missing.join(",")}] missing`);
  if (!command) throw new CniError(CniCodes.invalidEnv, `unknown CNI_COMMAND: ${raw}`, `known commands: ${Commands.join(", ")}`);
  return {
    command,
    containerId: env.CNI_CONTAINERID ?? "",
    netns: env.CNI_NETNS ?? "",
    ifname: env.CNI_IFNAME ?? "",
    args: env.CNI_ARGS ?? "",
    path: (env.CNI_PATH ?? "").split(":").filter((p) => p !== ""),
  };
}

/**
 * CNI_ARGS (`K=V;K2=V2`): the keys a plugin knows are returned; an unknown key is an error
 * unless `IgnoreUnknown` is set to a true value (1, t, true...), as libcni's LoadArgs does.
 */
export function parseCniArgs(text: string, known: readonly string[]): Record<string, string> {
  const out: Record<string, string> = {};
  const unknown: string[] = [];
  const pairs: [string, string][] = [];
  for (const item of text.split(";")) {
    if (item === "") continue;
    const eq = item.indexOf("=");
    if (eq < 0) throw new CniError(CniCodes.invalidEnv, `CNI_ARGS: invalid pair "${item}": expected KEY=VALUE`);
    pairs.push([item.slice(0, eq), item.slice(eq + 1)]);
  }
  const ignore = pairs.some(([k, v]) => k === "IgnoreUnknown" && ["1", "t", "T", "true", "TRUE", "True"].includes(v));
  for (const [k, v] of pairs) {
    if (k === "IgnoreUnknown") continue;
    if (known.includes(k)) out[k] = v;
    else if (!ignore) unknown.push(k);
  }
  if (unknown.length) {
    throw new CniError(CniCodes.invalidEnv, `CNI_ARGS: unknown args ${JSON.stringify(unknown)}`, `known: ${known.join(", ")}; add IgnoreUnknown=1 to pass others through`);
  }
  return out;
}

/** A version string as [major, minor, patch], or undefined when it does not parse. */
function parseVersion(v: string): [number, number, number] | undefined {
  const m = /^(\d+)\.(\d+)(?:\.(\d+))?$/.exec(v);
  return m ? [Number(m[1]), Number(m[2]), Number(m[3] ?? 0)] : undefined;
}

/** a >= b for spec versions; unparsable versions are a decoding error (code 6), as in libcni. */
export function versionAtLeast(a: string, b: string): boolean {
  const pa = parseVersion(a);
  const pb = parseVersion(b);
  if (!pa || !pb) throw new CniError(CniCodes.decode, `invalid version "${pa ? b : a}"`);
  for (let i = 0; i < 3; i++) if ((pa[i] ?? 0) !== (pb[i] ?? 0)) return (pa[i] ?? 0) > (pb[i] ?? 0);
  return true;
}

/** The configuration of one invocation, decoded: its raw object, fields view and version. */
export interface LoadedConfig {
  readonly fields: Fields;
  readonly name: string;
  readonly cniVersion: CniVersion;
}

/** The version a configuration states (libcni: missing or empty means 0.1.0). */
export function statedVersion(conf: unknown): string {
  if (!isObject(conf)) return "0.1.0";
  const v = new Fields(conf, "config").string("cniVersion");
  return v === undefined || v === "" ? "0.1.0" : v;
}

/**
 * Decode the configuration on stdin and check it for `command`: JSON (6), a valid network
 * name (7), a cniVersion knit supports (1), and the minimum version of CHECK (0.4.0), STATUS
 * and GC (1.1.0).
 */
export function loadConfig(stdin: string, command: Command): LoadedConfig {
  const value = parseJson(stdin, "network config");
  if (value !== null && !isObject(value)) throw new CniError(CniCodes.decode, "error decoding network config: expected a JSON object");
  const fields = new Fields(value ?? {}, "config");
  const name = fields.string("name") ?? "";
  if (name === "") throw new CniError(CniCodes.invalidConfig, "missing network name");
  if (!CNI_NAME_RE.test(name)) throw new CniError(CniCodes.invalidConfig, "invalid characters found in network name", name);
  const version = statedVersion(value);
  const minimum = command === "CHECK" ? "0.4.0" : command === "STATUS" || command === "GC" ? "1.1.0" : undefined;
  if (minimum && !versionAtLeast(version, minimum)) {
    throw new CniError(CniCodes.incompatibleVersion, `config version does not allow ${command}`, `${command} needs cniVersion ${minimum} or later, the config says ${version}`);
  }
  if (!(SupportedVersions as readonly string[]).includes(version)) {
    throw new CniError(CniCodes.incompatibleVersion, "incompatible CNI versions", `config is "${version}", plugin supports ${JSON.stringify(SupportedVersions)}`);
  }
  return { fields, name, cniVersion: version as CniVersion };
}
