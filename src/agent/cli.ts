/**
 * `knit agent`: run the host's agent in the foreground, or talk to the running one.
 *
 *   knit agent [--dns-timeout MS] [--log-level LEVEL]   run in the foreground (systemd)
 *     cluster: [--store etcd://H:P,...] [--name H] [--advertise-address IP | --underlay IFACE]
 *              [--lease-ttl S]
 *     Docker: [--docker-plugin [--plugin-dir DIR] [--plugin-name NAME] [--docker-host URL]]
 *   knit agent start [same options]                      start in the background unless running
 *   knit agent status                                    its health as JSON (exit 1: none runs)
 *   knit agent stop                                      stop it, by its recorded PID
 */
import { rmSync } from "node:fs";
import { invalid } from "../errors.ts";
import { adoptHostName } from "../engine/owner.ts";
import { parseStoreSpec } from "../store/open.ts";
import { DEFAULT_LEASE_TTL } from "../cluster/hosts.ts";
import { defineCommand, parseArgs, renderHelp } from "../cli/args.ts";
import type { CommandContext } from "../cli/context.ts";
import { DEFAULT_DNS_TIMEOUT_MS, runAgent } from "./agent.ts";
import { startAgent } from "./autostart.ts";
import { LogLevels, type LogLevel } from "./log.ts";
import { agentPaths, liveAgent, readAgentRecord, stopAgentProcess } from "./pidfile.ts";
import { fetchHealth } from "./status.ts";
import { DEFAULT_PLUGIN_DIR, DEFAULT_PLUGIN_NAME, type DockerPluginOptions } from "../plugin/plugin.ts";
import { defaultDockerHost } from "../plugin/docker-api.ts";

const runFlags = [
  { name: "dns-timeout", kind: "string", placeholder: "ms", help: `Time each upstream DNS server gets to answer (default ${DEFAULT_DNS_TIMEOUT_MS})` },
  { name: "log-level", kind: "string", placeholder: "level", help: "Log level: debug, info, warn, error (default info)" },
  { name: "store", kind: "string", placeholder: "spec", help: "Store: etcd://HOST:PORT[,HOST:PORT...] joins the cluster (default: --store / KNIT_STORE, else SQLite)" },
  { name: "name", kind: "string", placeholder: "host", help: "This host's name in the cluster (default: --host / KNIT_HOST, else the hostname)" },
  { name: "advertise-address", kind: "string", placeholder: "ip", help: "Underlay address other hosts send overlay traffic to (default: the default route's)" },
  { name: "underlay", kind: "string", placeholder: "iface", help: "Underlay interface (its first IPv4 address is advertised)" },
  { name: "lease-ttl", kind: "string", placeholder: "s", help: `Seconds the cluster waits for this host's agent before it drops the host (default ${DEFAULT_LEASE_TTL})` },
  { name: "docker-plugin", kind: "bool", help: "Be Docker's network and IPAM driver: docker network create -d knit --ipam-driver knit ..." },
  { name: "plugin-dir", kind: "string", placeholder: "dir", help: `Directory dockerd finds plugin sockets in (default ${DEFAULT_PLUGIN_DIR})` },
  { name: "plugin-name", kind: "string", placeholder: "name", help: `Driver name; the socket is DIR/NAME.sock (default ${DEFAULT_PLUGIN_NAME})` },
  { name: "docker-host", kind: "string", placeholder: "url", help: "Docker daemon asked for network and container names (default DOCKER_HOST, else unix:///var/run/docker.sock)" },
] as const;

const agentCmd = defineCommand({
  name: "agent",
  usage: "[OPTIONS] | start | status | stop",
  summary: "Run the per-host agent (DNS; cluster membership and overlay peers on an etcd store) in the foreground",
  args: { max: 0 },
  flags: [...runFlags, { name: "auto", kind: "bool", help: "Started on demand: stop when no sandbox needs it (set by auto-start)" }],
  commands: [
    { name: "start", summary: "Start the agent in the background unless it runs" },
    { name: "status", summary: "Show the running agent's health as JSON" },
    { name: "stop", summary: "Stop the running agent" },
  ],
});
const startCmd = defineCommand({ name: "agent start", usage: "[OPTIONS]", summary: "Start the agent in the background unless it runs", args: { max: 0 }, flags: runFlags });
const statusCmd = defineCommand({ name: "agent status", summary: "Show the running agent's health as JSON (exit 1 when none runs)", args: { max: 0 }, flags: [] });
const stopCmd = defineCommand({ name: "agent stop", summary: "Stop the running agent (SIGTERM, SIGKILL after 5 s)", args: { max: 0 }, flags: [] });

function timeoutFlag(value: string | undefined): number {
  if (value === undefined) return DEFAULT_DNS_TIMEOUT_MS;
  const n = Number(value);
  if (!/^\d+$/.test(value) || n < 10 || n > 60_000) throw invalid(`invalid value "${value}" for --dns-timeout: expected milliseconds between 10 and 60000`);
  return n;
}

function leaseFlag(value: string | undefined): number {
  if (value === undefined) return DEFAULT_LEASE_TTL;
  const n = Number(value);
  if (!/^\d+$/.test(value) || n < 1 || n > 3600) throw invalid(`invalid value "${value}" for --lease-ttl: expected whole seconds between 1 and 3600`);
  return n;
}

function nameFlag(value: string | undefined): string | undefined {
  if (value === undefined) return undefined;
  if (!/^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$/.test(value)) throw invalid(`invalid --name "${value}": a host name of letters, digits, '.', '_' and '-'`);
  return value;
}

/** The flags of a run, as given (for `agent start`, which passes them on). */
type RunArgs = ReturnType<typeof parseArgs<typeof runFlags>>;

/** Flags given to `agent start`, as arguments for the agent it starts (validated first). */
function passOn(a: RunArgs): string[] {
  const out: string[] = [];
  const check: Record<string, (v: string | undefined) => unknown> = { "dns-timeout": timeoutFlag, "log-level": levelFlag, "lease-ttl": leaseFlag, name: nameFlag };
  for (const f of runFlags) {
    const v = a.flags[f.name];
    if (!a.given.has(f.name) || v === undefined) continue;
    if (typeof v === "boolean") {
      if (v) out.push(`--${f.name}`);
      continue;
    }
    check[f.name]?.(v);
    out.push(`--${f.name}`, v);
  }
  return out;
}

/** `--docker-plugin` and its settings; the settings alone are a mistake worth saying. */
function pluginFlags(a: RunArgs): DockerPluginOptions | undefined {
  if (!a.flags["docker-plugin"]) {
    const stray = ["plugin-dir", "plugin-name", "docker-host"].find((f) => a.given.has(f));
    if (stray) throw invalid(`--${stray} needs --docker-plugin`);
    return undefined;
  }
  return { dir: a.flags["plugin-dir"] ?? DEFAULT_PLUGIN_DIR, name: a.flags["plugin-name"] ?? DEFAULT_PLUGIN_NAME, dockerHost: a.flags["docker-host"] ?? defaultDockerHost() };
}

function levelFlag(value: string | undefined): LogLevel {
  if (value === undefined) return "info";
  const level = LogLevels.find((l) => l === value);
  if (!level) throw invalid(`invalid value "${value}" for --log-level: expected one of ${LogLevels.join(", ")}`);
  return level;
}

/** Run `knit agent ...` for the state directory `stateDir` (and the CLI's `--store`, if any). */
export async function agentMain(ctx: CommandContext, argv: readonly string[], stateDir: string, storeSpec?: string): Promise<number> {
  const [sub, ...rest] = argv;
  switch (sub) {
    case "start": {
      const a = parseArgs(startCmd, rest);
      if (a.help) return ctx.help(startCmd);
      pluginFlags(a);
      const rec = await startAgent(stateDir, "service", passOn(a));
      ctx.out(`${rec.pid}\n`);
      return 0;
    }
    case "status": {
      const a = parseArgs(statusCmd, rest);
      if (a.help) return ctx.help(statusCmd);
      const rec = liveAgent(stateDir);
      if (!rec) {
        ctx.out(`${JSON.stringify({ status: "stopped" })}\n`);
        ctx.error(invalid(`no knit agent runs for ${stateDir}`, "start one with `knit agent start`; it also starts by itself with the first sandbox on a user-defined network"));
        return 1;
      }
      ctx.out(`${JSON.stringify(await fetchHealth(rec.socket), null, 2)}\n`);
      return 0;
    }
    case "stop": {
      const a = parseArgs(stopCmd, rest);
      if (a.help) return ctx.help(stopCmd);
      const rec = liveAgent(stateDir);
      if (!rec) {
        // A killed agent leaves its pidfile: clear it, so nobody trusts it.
        if (readAgentRecord(stateDir)) rmSync(agentPaths(stateDir).pidfile, { force: true });
        ctx.out("no agent running\n");
        return 0;
      }
      await stopAgentProcess(rec);
      ctx.out(`stopped agent ${rec.pid}\n`);
      return 0;
    }
    case "help":
      ctx.out(renderHelp(agentCmd));
      return 0;
    default: {
      const a = parseArgs(agentCmd, argv);
      if (a.help) return ctx.help(agentCmd);
      const name = nameFlag(a.flags.name);
      if (name !== undefined) adoptHostName(stateDir, name);
      const store = a.flags.store ?? storeSpec;
      const advertise = a.flags["advertise-address"];
      const plugin = pluginFlags(a);
      const underlay = a.flags.underlay;
      // Cluster mode on an etcd store, or wherever an underlay is named. An agent started on
      // demand (--auto) serves DNS only: membership needs one that stays (a service).
      const clustered = (parseStoreSpec(store, stateDir).kind === "etcd" && !a.flags.auto) || advertise !== undefined || underlay !== undefined;
      return runAgent({
        stateDir,
        mode: a.flags.auto ? "auto" : "service",
        dnsTimeoutMs: timeoutFlag(a.flags["dns-timeout"]),
        logLevel: levelFlag(a.flags["log-level"]),
        ...(store === undefined ? {} : { store }),
        ...(clustered
          ? { cluster: { underlay: { ...(advertise === undefined ? {} : { address: advertise }), ...(underlay === undefined ? {} : { device: underlay }) }, leaseTtl: leaseFlag(a.flags["lease-ttl"]) } }
          : {}),
        ...(plugin ? { dockerPlugin: plugin } : {}),
      });
    }
  }
}
