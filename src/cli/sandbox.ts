/**
 * Sandbox commands: `knit run`, `ps`, `inspect`, `exec`, `rm` (Docker's container verbs for
 * knit's runtime-less sandboxes).
 */
import { defineCommand, parseArgs, type CommandSpec } from "./args.ts";
import { renderFormat, renderTable, renderTemplate, shortId } from "./format.ts";
import { invalid, notFound } from "../errors.ts";
import { execInSandbox, removeSandbox, runSandbox, sandboxStatus } from "../engine/sandboxes.ts";
import { listSandboxes } from "../engine/engine.ts";
import { findNetwork, findSandbox } from "../engine/engine.ts";
import { networkView, sandboxView } from "../engine/views.ts";
import { listMemberships } from "../engine/endpoints.ts";
import { getJson } from "../store/store.ts";
import { keys, type Network } from "../model.ts";
import { parsePortFilter } from "../ports/spec.ts";
import { portLines } from "../ports/view.ts";
import type { CommandContext } from "./context.ts";

export const runCmd = defineCommand({
  name: "run",
  usage: "[OPTIONS] [--] COMMAND [ARG...]",
  summary: "Run a command in a new sandbox",
  interspersed: false,
  flags: [
    { name: "name", kind: "string", help: "Assign a name to the sandbox" },
    { name: "network", kind: "list", help: "Connect the sandbox to a network (repeatable; bridge, host, none or a user network)" },
    { name: "net", kind: "list", help: "Alias of --network" },
    { name: "ip", kind: "string", help: "IPv4 address on the first network" },
    { name: "ip6", kind: "string", help: "IPv6 address on the first network" },
    { name: "hostname", short: "h", kind: "string", help: "Sandbox host name" },
    { name: "alias", kind: "list", help: "Network-scoped alias on the first network" },
    { name: "network-alias", kind: "list", help: "Alias of --alias" },
    { name: "detach", short: "d", kind: "bool", help: "Run in the background and print the sandbox ID" },
    { name: "rm", kind: "bool", help: "Remove the sandbox when its command exits" },
    { name: "publish", short: "p", kind: "list", help: "Publish a sandbox's port to the host: [hostIP:][hostPort[-end]:]containerPort[-end][/tcp|/udp] (repeatable)" },
    { name: "dns", kind: "list", help: "DNS server to use (repeatable; on user networks: the upstream of knit's DNS)" },
    { name: "dns-search", kind: "list", help: "DNS search domain (repeatable)" },
    { name: "dns-option", kind: "list", help: "DNS resolver option, e.g. ndots:2 (repeatable)" },
    { name: "dns-opt", kind: "list", help: "Alias of --dns-option" },
  ],
});

const psCmd = defineCommand({
  name: "ps",
  usage: "[OPTIONS]",
  summary: "List sandboxes",
  args: { max: 0 },
  flags: [
    { name: "all", short: "a", kind: "bool", help: "Show all sandboxes (default shows just running)" },
    { name: "quiet", short: "q", kind: "bool", help: "Only display sandbox IDs" },
    { name: "no-trunc", kind: "bool", help: "Do not truncate output" },
    { name: "format", kind: "string", help: "Format output: table, json, or a Go template" },
  ],
});

const inspectCmd = defineCommand({
  name: "inspect",
  usage: "[OPTIONS] NAME|ID [NAME|ID...]",
  summary: "Display detailed information on sandboxes (or networks)",
  args: { min: 1 },
  flags: [{ name: "format", short: "f", kind: "string", help: "Format output using a Go template" }],
});

const execCmd = defineCommand({
  name: "exec",
  usage: "SANDBOX [--] COMMAND [ARG...]",
  summary: "Run a command in a running sandbox",
  interspersed: false,
  args: { min: 1 },
  flags: [],
});

const rmCmd = defineCommand({
  name: "rm",
  usage: "[OPTIONS] SANDBOX [SANDBOX...]",
  summary: "Remove one or more sandboxes",
  args: { min: 1 },
  flags: [{ name: "force", short: "f", kind: "bool", help: "Force the removal of a running sandbox (uses SIGKILL)" }],
});

const portCmd = defineCommand({
  name: "port",
  usage: "SANDBOX [PRIVATE_PORT[/PROTO]]",
  summary: "List port mappings or a specific mapping for the sandbox",
  args: { min: 1, max: 2 },
  flags: [],
});

export const sandboxCommands: readonly CommandSpec[] = [runCmd, psCmd, inspectCmd, execCmd, rmCmd, portCmd];

/** Command words after flags: everything after `--`, or the positionals. */
function commandWords(positionals: readonly string[], rest: readonly string[] | undefined): string[] {
  const words = [...positionals];
  if (words[0] === "--") words.shift();
  return rest ? [...words, ...rest] : words;
}

export async function runMain(ctx: CommandContext, argv: readonly string[]): Promise<number> {
  const a = parseArgs(runCmd, argv);
  if (a.help) return ctx.help(runCmd);
  const command = commandWords(a.positionals, a.rest);
  const f = a.flags;
  const engine = await ctx.engine();
  const res = await runSandbox(engine, {
    command,
    networks: [...f.network, ...f.net],
    aliases: [...f.alias, ...f["network-alias"]],
    publish: f.publish,
    dns: { servers: f.dns, search: f["dns-search"], options: [...f["dns-option"], ...f["dns-opt"]] },
    detach: f.detach,
    autoRemove: f.rm,
    ...(f.name !== undefined ? { name: f.name } : {}),
    ...(f.ip !== undefined ? { ip: f.ip } : {}),
    ...(f.ip6 !== undefined ? { ip6: f.ip6 } : {}),
    ...(f.hostname !== undefined ? { hostname: f.hostname } : {}),
  });
  if (f.detach) {
    ctx.out(`${res.sandbox.id}\n`);
    return 0;
  }
  return res.exitCode ?? 0;
}

export async function psMain(ctx: CommandContext, argv: readonly string[]): Promise<number> {
  const a = parseArgs(psCmd, argv);
  if (a.help) return ctx.help(psCmd);
  const engine = await ctx.engine();
  const rows = [];
  for (const sb of (await listSandboxes(engine)).filter((s) => s.kind === "knit").sort((x, y) => y.created.localeCompare(x.created))) {
    const status = sandboxStatus(sb);
    if (!a.flags.all && status !== "running") continue;
    const nets: string[] = [];
    for (const m of await listMemberships(engine, sb.id)) nets.push((await getJson<Network>(engine.store, keys.network(m.networkId)))?.name ?? m.networkId);
    const cmd = sb.command.join(" ");
    rows.push({
      ID: a.flags["no-trunc"] ? sb.id : shortId(sb.id),
      Command: a.flags["no-trunc"] || cmd.length <= 20 ? cmd : `${cmd.slice(0, 19)}…`,
      CreatedAt: sb.created,
      Status: status,
      Networks: nets.sort().join(","),
      Names: sb.name,
    });
  }
  if (a.flags.quiet) ctx.out(rows.map((r) => `${r.ID}\n`).join(""));
  else if (a.flags.format && a.flags.format !== "table") ctx.out(renderFormat(a.flags.format, rows, { headers: { ID: "SANDBOX ID" } }));
  else ctx.out(renderTable(["SANDBOX ID", "COMMAND", "CREATED", "STATUS", "NETWORKS", "NAMES"], rows.map((r) => [r.ID, JSON.stringify(r.Command), r.CreatedAt, r.Status, r.Networks, r.Names])));
  return 0;
}

export async function inspectMain(ctx: CommandContext, argv: readonly string[]): Promise<number> {
  const a = parseArgs(inspectCmd, argv);
  if (a.help) return ctx.help(inspectCmd);
  const engine = await ctx.engine();
  const views: unknown[] = [];
  for (const ref of a.positionals) {
    const sb = await findSandbox(engine, ref);
    if (sb) views.push(await sandboxView(engine, sb));
    else {
      const net = await findNetwork(engine, ref);
      if (!net) throw invalid(`no such object: ${ref}`);
      views.push(await networkView(engine, net));
    }
  }
  if (a.flags.format) ctx.out(views.map((v) => `${renderTemplate(a.flags.format ?? "", v)}\n`).join(""));
  else ctx.out(`${JSON.stringify(views, null, 4)}\n`);
  return 0;
}

export async function execMain(ctx: CommandContext, argv: readonly string[]): Promise<number> {
  const a = parseArgs(execCmd, argv);
  if (a.help) return ctx.help(execCmd);
  const [ref = "", ...words] = a.positionals;
  return execInSandbox(await ctx.engine(), ref, commandWords(words, a.rest));
}

export async function rmMain(ctx: CommandContext, argv: readonly string[]): Promise<number> {
  const a = parseArgs(rmCmd, argv);
  if (a.help) return ctx.help(rmCmd);
  const engine = await ctx.engine();
  let failed = 0;
  for (const ref of a.positionals) {
    try {
      await removeSandbox(engine, ref, a.flags.force);
      ctx.out(`${ref}\n`);
    } catch (err) {
      failed++;
      ctx.error(err);
    }
  }
  return failed ? 1 : 0;
}

export async function portMain(ctx: CommandContext, argv: readonly string[]): Promise<number> {
  const a = parseArgs(portCmd, argv);
  if (a.help) return ctx.help(portCmd);
  const [ref = "", filterText] = a.positionals;
  const filter = filterText === undefined ? undefined : parsePortFilter(filterText);
  const sb = await findSandbox(await ctx.engine(), ref);
  if (!sb) throw notFound(`no such sandbox: ${ref}`, "list sandboxes with `knit ps -a`");
  const lines = portLines(sb.ports ?? [], filter);
  if (filter && lines.length === 0) throw notFound(`no public port '${filter.port}/${filter.proto}' published for ${sb.name}`);
  ctx.out(lines.map((l) => `${l}\n`).join(""));
  return 0;
}
