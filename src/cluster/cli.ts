/**
 * `knit host ls`: the hosts of the cluster as the store knows them; `knit host rm`: forget a
 * host that is gone (src/cluster/remove.ts).
 *
 *   NAME    ADDRESS      STATUS   ENDPOINTS
 *   h1 *    10.80.0.11   alive    3
 *   h2      10.80.0.12   down     1
 *
 * A host is "alive" while its registration (`hosts/<name>`, under its agent's lease) exists;
 * a host that still has sandboxes or endpoints in the store without one is "down". `*` marks
 * this host. ENDPOINTS counts the host's endpoints on every network.
 *
 * `knit host rm [-f] HOST [HOST...]`, as `docker node rm`: a host that is down is forgotten
 * (its sandboxes, local networks, endpoints, address and port claims leave the store); an
 * alive one is refused unless forced.
 */
import { defineCommand, parseArgs, renderHelp, type CommandSpec } from "../cli/args.ts";
import { renderFormat, renderTable } from "../cli/format.ts";
import type { CommandContext } from "../cli/context.ts";
import { invalid } from "../errors.ts";
import { listJson } from "../store/store.ts";
import { keys, type Endpoint, type Sandbox } from "../model.ts";
import { hostName } from "../engine/owner.ts";
import type { Engine } from "../engine/engine.ts";
import { liveHosts } from "./hosts.ts";
import { removeHost } from "./remove.ts";

const ls = defineCommand({
  name: "host ls",
  usage: "[OPTIONS]",
  summary: "List the hosts of the cluster",
  args: { max: 0 },
  flags: [
    { name: "format", kind: "string", help: "Format output: table, json, or a Go template" },
    { name: "quiet", short: "q", kind: "bool", help: "Only display host names" },
  ],
});

const rm = defineCommand({
  name: "host rm",
  usage: "[OPTIONS] HOST [HOST...]",
  summary: "Remove one or more hosts from the cluster",
  args: { min: 1 },
  flags: [{ name: "force", short: "f", kind: "bool", help: "Force-remove a host that is not down (its agent still renews its registration)" }],
});

/** One row of `host ls` (the fields --format sees). */
export interface HostRow {
  Name: string;
  Address: string;
  Device: string;
  MTU: number;
  Status: "alive" | "down";
  Endpoints: number;
  Self: boolean;
  Started: string;
  LeaseTTL: number;
}

/** The rows of `host ls`, sorted by name. */
export async function hostRows(engine: Engine): Promise<HostRow[]> {
  const [hosts, endpoints, sandboxes] = await Promise.all([
    liveHosts(engine.store),
    listJson<Endpoint>(engine.store, keys.endpoints()),
    listJson<Sandbox>(engine.store, keys.sandboxes()),
  ]);
  const counts = new Map<string, number>();
  for (const ep of endpoints) if (ep.host !== undefined) counts.set(ep.host, (counts.get(ep.host) ?? 0) + 1);
  const names = new Set([...hosts.keys(), ...counts.keys(), ...sandboxes.map((s) => s.host)]);
  const me = hostName();
  return [...names].sort().map((name) => {
    const h = hosts.get(name);
    return {
      Name: name,
      Address: h?.address ?? "",
      Device: h?.device ?? "",
      MTU: h?.mtu ?? 0,
      Status: h ? "alive" : "down",
      Endpoints: counts.get(name) ?? 0,
      Self: name === me,
      Started: h?.started ?? "",
      LeaseTTL: h?.ttl ?? 0,
    };
  });
}

/** Run `knit host <sub> ...`. */
export async function hostMain(ctx: CommandContext, argv: readonly string[]): Promise<number> {
  const [sub, ...args] = argv;
  const group: CommandSpec = {
    name: "host",
    usage: "COMMAND",
    summary: "Hosts of the cluster",
    flags: [],
    commands: [
      { name: "ls", summary: ls.summary },
      { name: "rm", summary: rm.summary },
    ],
  };
  if (sub === undefined || sub === "--help" || sub === "-h" || sub === "help") {
    ctx.out(renderHelp(group));
    return sub === undefined ? 1 : 0;
  }
  if (sub === "rm" || sub === "remove") {
    const r = parseArgs(rm, args);
    if (r.help) return ctx.help(rm);
    const engine = await ctx.engine();
    let failed = 0;
    for (const name of r.positionals) {
      try {
        await removeHost(engine, name, r.flags.force);
        ctx.out(`${name}\n`);
      } catch (err) {
        failed++;
        ctx.error(err);
      }
    }
    return failed ? 1 : 0;
  }
  if (sub !== "ls" && sub !== "list") throw invalid(`unknown command "knit host ${sub}"`, "see knit host --help");
  const a = parseArgs(ls, args);
  if (a.help) return ctx.help(ls);
  const rows = await hostRows(await ctx.engine());
  if (a.flags.quiet) ctx.out(rows.map((r) => `${r.Name}\n`).join(""));
  else if (a.flags.format && a.flags.format !== "table") ctx.out(renderFormat(a.flags.format, rows));
  else ctx.out(renderTable(["NAME", "ADDRESS", "STATUS", "ENDPOINTS"], rows.map((r) => [`${r.Name}${r.Self ? " *" : ""}`, r.Address || "-", r.Status, String(r.Endpoints)])));
  return 0;
}
