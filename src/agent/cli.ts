/**
 * `knit agent`: run the host's agent in the foreground, or talk to the running one.
 *
 *   knit agent [--dns-timeout MS] [--log-level LEVEL]   run in the foreground (systemd)
 *   knit agent start [--dns-timeout MS] [--log-level L]  start in the background unless running
 *   knit agent status                                    its health as JSON (exit 1: none runs)
 *   knit agent stop                                      stop it, by its recorded PID
 */
import { rmSync } from "node:fs";
import { invalid } from "../errors.ts";
import { defineCommand, parseArgs, renderHelp } from "../cli/args.ts";
import type { CommandContext } from "../cli/context.ts";
import { DEFAULT_DNS_TIMEOUT_MS, runAgent } from "./agent.ts";
import { startAgent } from "./autostart.ts";
import { LogLevels, type LogLevel } from "./log.ts";
import { agentPaths, liveAgent, readAgentRecord, stopAgentProcess } from "./pidfile.ts";
import { fetchHealth } from "./status.ts";

const runFlags = [
  { name: "dns-timeout", kind: "string", placeholder: "ms", help: `Time each upstream DNS server gets to answer (default ${DEFAULT_DNS_TIMEOUT_MS})` },
  { name: "log-level", kind: "string", placeholder: "level", help: "Log level: debug, info, warn, error (default info)" },
] as const;

const agentCmd = defineCommand({
  name: "agent",
  usage: "[OPTIONS] | start | status | stop",
  summary: "Run the per-host agent (DNS for user-defined networks) in the foreground",
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

function levelFlag(value: string | undefined): LogLevel {
  if (value === undefined) return "info";
  const level = LogLevels.find((l) => l === value);
  if (!level) throw invalid(`invalid value "${value}" for --log-level: expected one of ${LogLevels.join(", ")}`);
  return level;
}

/** Run `knit agent ...` for the state directory `stateDir`. */
export async function agentMain(ctx: CommandContext, argv: readonly string[], stateDir: string): Promise<number> {
  const [sub, ...rest] = argv;
  switch (sub) {
    case "start": {
      const a = parseArgs(startCmd, rest);
      if (a.help) return ctx.help(startCmd);
      const extra = [...(a.given.has("dns-timeout") ? ["--dns-timeout", String(timeoutFlag(a.flags["dns-timeout"]))] : []), ...(a.given.has("log-level") ? ["--log-level", levelFlag(a.flags["log-level"])] : [])];
      const rec = await startAgent(stateDir, "service", extra);
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
      return runAgent({ stateDir, mode: a.flags.auto ? "auto" : "service", dnsTimeoutMs: timeoutFlag(a.flags["dns-timeout"]), logLevel: levelFlag(a.flags["log-level"]) });
    }
  }
}
