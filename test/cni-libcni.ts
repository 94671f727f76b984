/**
 * A CNI runtime for tests and benchmarks that drives plugins exactly as libcni (the Go
 * library inside podman, containerd, cri-o) does:
 *
 * - every plugin of a conflist gets its own configuration with `name` and `cniVersion`
 *   injected, `runtimeConfig` built from the capabilities it declares, and (after the first
 *   ADD) the previous plugin's result as `prevResult`;
 * - the environment is the process's own plus CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS,
 *   CNI_ARGS (`K=V;K2=V2`), CNI_IFNAME, CNI_PATH (libcni's order: later ones win);
 * - the final ADD result is cached; DEL runs the plugins in reverse order, each with the
 *   cached result as prevResult (for 0.4.0 and later); CHECK runs them in order with it;
 * - GC first DELs every cached attachment of the network not in the valid list, then (1.1.0)
 *   sends GC to every plugin with `cni.dev/valid-attachments` and `cni.dev/attachments`;
 * - STATUS (1.1.0) goes to every plugin in order, stopping at the first error;
 * - a plugin's non-zero exit is an error carrying the code, msg and details it printed.
 *
 * Plugins are run through an `exec` function, so a test can run them inside a lab host.
 */
import { existsSync } from "node:fs";

/** How a plugin process is run: argv, stdin, extra environment. */
export type PluginExec = (argv: readonly string[], stdin: string, env: Record<string, string>) => Promise<{ code: number; stdout: string; stderr: string }>;

export interface RuntimeConf {
  containerId: string;
  netns: string;
  ifname: string;
  /** CNI_ARGS pairs. */
  args?: readonly (readonly [string, string])[];
  /** Capability arguments (portMappings, ips, mac, bandwidth, dns, aliases ...). */
  capabilityArgs?: Record<string, unknown>;
}

export interface ConfList {
  cniVersion: string;
  name: string;
  disableCheck?: boolean;
  disableGC?: boolean;
  plugins: Record<string, unknown>[];
}

/** A plugin's error result. */
export class CniCallError extends Error {
  constructor(
    readonly plugin: string,
    readonly command: string,
    readonly code: number,
    readonly msg: string,
    readonly details: string,
    readonly stderr: string,
  ) {
    super(`${plugin} ${command}: [${code}] ${msg}${details ? ` (${details})` : ""}`);
  }
}

/** The error a call fails with (the test fails when it succeeds or fails otherwise). */
export async function failure(p: Promise<unknown>): Promise<CniCallError> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  if (!(err instanceof CniCallError)) throw new Error(`expected a CNI error, got ${err === undefined ? "success" : err instanceof Error ? err.message : JSON.stringify(err)}`);
  return err;
}

/** One invocation, as recorded for tests that look at what was sent. */
export interface CallRecord {
  plugin: string;
  command: string;
  env: Record<string, string>;
  stdin: Record<string, unknown>;
  stdout: string;
  code: number;
}

const atLeast = (v: string, min: string): boolean => {
  const p = (s: string) => s.split(".").map(Number);
  const [a, b] = [p(v), p(min)];
  for (let i = 0; i < 3; i++) if ((a[i] ?? 0) !== (b[i] ?? 0)) return (a[i] ?? 0) > (b[i] ?? 0);
  return true;
};

export class CniRuntime {
  /** Final ADD results by "network/containerId/ifname" (libcni's result cache). */
  readonly cache = new Map<string, { result: Record<string, unknown>; rt: RuntimeConf; network: string; list: ConfList }>();
  readonly calls: CallRecord[] = [];

  constructor(
    readonly pluginDirs: readonly string[],
    readonly exec: PluginExec,
    /** Extra environment for every plugin (e.g. KNIT_STATE_DIR). */
    readonly env: Record<string, string> = {},
  ) {}

  /** The first executable named `type` in the plugin directories (libcni's FindInPath). */
  private findPlugin(type: string): string {
    for (const dir of this.pluginDirs) if (existsSync(`${dir}/${type}`)) return `${dir}/${type}`;
    throw new Error(`failed to find plugin "${type}" in path [${this.pluginDirs.join(" ")}]`);
  }

  /** libcni's environment for one call. */
  private envFor(command: string, rt: RuntimeConf | undefined): Record<string, string> {
    return {
      ...this.env,
      CNI_COMMAND: command,
      CNI_CONTAINERID: rt?.containerId ?? "",
      CNI_NETNS: rt?.netns ?? "",
      CNI_ARGS: (rt?.args ?? []).map(([k, v]) => `${k}=${v}`).join(";"),
      CNI_IFNAME: rt?.ifname ?? "",
      CNI_PATH: this.pluginDirs.join(":"),
    };
  }

  /** The configuration one plugin gets (buildOneConfig + injectRuntimeConfig). */
  static pluginConfig(list: ConfList, plugin: Record<string, unknown>, prevResult: Record<string, unknown> | undefined, rt: RuntimeConf | undefined, extra: Record<string, unknown> = {}): Record<string, unknown> {
    const conf: Record<string, unknown> = { ...plugin, name: list.name, cniVersion: list.cniVersion, ...extra };
    if (prevResult) conf.prevResult = prevResult;
    const caps = (plugin.capabilities ?? {}) as Record<string, boolean>;
    if (rt) {
      const rc: Record<string, unknown> = {};
      for (const [cap, on] of Object.entries(caps)) if (on && rt.capabilityArgs && cap in rt.capabilityArgs) rc[cap] = rt.capabilityArgs[cap];
      if (Object.keys(rc).length) conf.runtimeConfig = rc;
    }
    return conf;
  }

  /** Run one plugin; returns its stdout parsed (or undefined when empty). */
  async call(type: string, command: string, conf: Record<string, unknown>, rt: RuntimeConf | undefined): Promise<Record<string, unknown> | undefined> {
    const env = this.envFor(command, rt);
    const stdin = JSON.stringify(conf);
    const r = await this.exec([this.findPlugin(type)], stdin, env);
    this.calls.push({ plugin: type, command, env, stdin: conf, stdout: r.stdout, code: r.code });
    if (r.code !== 0) {
      let e: { code?: number; msg?: string; details?: string } = {};
      try {
        e = JSON.parse(r.stdout) as typeof e;
      } catch {
        e = { code: -1, msg: `exit ${r.code}, no error JSON: ${r.stdout.trim()} ${r.stderr.trim()}` };
      }
      throw new CniCallError(type, command, e.code ?? -1, e.msg ?? "", e.details ?? "", r.stderr);
    }
    const text = r.stdout.trim();
    if (!text) return undefined;
    const parsed = JSON.parse(text) as Record<string, unknown>;
    // fixupResultVersion: a result without cniVersion is in the config's version.
    if (command === "ADD" && (typeof parsed.cniVersion !== "string" || parsed.cniVersion === "")) parsed.cniVersion = conf.cniVersion;
    return parsed;
  }

  private key(list: ConfList, rt: RuntimeConf): string {
    return `${list.name}/${rt.containerId}/${rt.ifname}`;
  }

  async add(list: ConfList, rt: RuntimeConf): Promise<Record<string, unknown>> {
    let prev: Record<string, unknown> | undefined;
    for (const plugin of list.plugins) {
      const conf = CniRuntime.pluginConfig(list, plugin, prev, rt);
      prev = await this.call(String(plugin.type), "ADD", conf, rt);
    }
    if (!prev) throw new Error("no plugin returned a result");
    this.cache.set(this.key(list, rt), { result: prev, rt, network: list.name, list });
    return prev;
  }

  async del(list: ConfList, rt: RuntimeConf): Promise<void> {
    const cached = atLeast(list.cniVersion, "0.4.0") ? this.cache.get(this.key(list, rt))?.result : undefined;
    for (const plugin of [...list.plugins].reverse()) {
      await this.call(String(plugin.type), "DEL", CniRuntime.pluginConfig(list, plugin, cached, rt), rt);
    }
    this.cache.delete(this.key(list, rt));
  }

  async check(list: ConfList, rt: RuntimeConf): Promise<void> {
    if (!atLeast(list.cniVersion, "0.4.0") || list.disableCheck) return;
    const cached = this.cache.get(this.key(list, rt))?.result;
    if (!cached) throw new Error(`no cached result for ${this.key(list, rt)}`);
    for (const plugin of list.plugins) await this.call(String(plugin.type), "CHECK", CniRuntime.pluginConfig(list, plugin, cached, rt), rt);
  }

  async status(list: ConfList): Promise<void> {
    if (!atLeast(list.cniVersion, "1.1.0")) return;
    for (const plugin of list.plugins) await this.call(String(plugin.type), "STATUS", CniRuntime.pluginConfig(list, plugin, undefined, undefined), undefined);
  }

  /** GC keeping `valid` (containerID, ifname) attachments; errors are collected. */
  async gc(list: ConfList, valid: readonly { containerID: string; ifname: string }[]): Promise<Error[]> {
    if (list.disableGC) return [];
    const errors: Error[] = [];
    for (const [key, entry] of [...this.cache]) {
      if (entry.network !== list.name || valid.some((v) => v.containerID === entry.rt.containerId && v.ifname === entry.rt.ifname)) continue;
      try {
        await this.del(list, entry.rt);
      } catch (err) {
        errors.push(err as Error);
        this.cache.delete(key);
      }
    }
    if (atLeast(list.cniVersion, "1.1.0")) {
      const extra = { "cni.dev/valid-attachments": valid, "cni.dev/attachments": valid };
      for (const plugin of list.plugins) {
        try {
          await this.call(String(plugin.type), "GC", CniRuntime.pluginConfig(list, plugin, undefined, undefined, extra), undefined);
        } catch (err) {
          errors.push(err as Error);
        }
      }
    }
    return errors;
  }

  /** DEL every cached attachment (test cleanup); returns the errors. */
  async delAll(): Promise<Error[]> {
    const errors: Error[] = [];
    for (const entry of [...this.cache.values()]) await this.del(entry.list, entry.rt).catch((e: unknown) => errors.push(e as Error));
    this.cache.clear();
    return errors;
  }

  /** Forget a cached attachment without DEL (a runtime that crashed and lost its cache). */
  forget(list: ConfList, rt: RuntimeConf): void {
    this.cache.delete(this.key(list, rt));
  }

  /** VERSION of one plugin. */
  async version(type: string, cniVersion = "1.1.0"): Promise<{ cniVersion: string; supportedVersions: string[] }> {
    const r = await this.exec([this.findPlugin(type)], JSON.stringify({ cniVersion }), { ...this.env, CNI_COMMAND: "VERSION" });
    return JSON.parse(r.stdout) as { cniVersion: string; supportedVersions: string[] };
  }
}
