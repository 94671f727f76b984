/**
 * `knit network ...`: Docker's network commands, translated into engine calls.
 */
import { defineCommand, parseArgs, renderHelp, type CommandSpec } from "./args.ts";
import { matchNetworkFilters, NetworkFilterKeys, parseFilters, renderFormat, renderTable, renderTemplate, shortId, joinLabels } from "./format.ts";
import { invalid } from "../errors.ts";
import { type Network } from "../model.ts";
import { createNetwork, networkHasEndpoints, pruneNetworks, removeNetwork } from "../engine/networks.ts";
import { connectSandbox, disconnectSandbox } from "../engine/endpoints.ts";
import { resolveContainer } from "../engine/containers.ts";
import { type Engine, getNetwork, getSandbox, listNetworks } from "../engine/engine.ts";
import { networkView } from "../engine/views.ts";
import type { CommandContext } from "./context.ts";
import { refuseDockerEndpoint } from "../plugin/records.ts";

const create = defineCommand({
  name: "network create",
  usage: "[OPTIONS] NETWORK",
  summary: "Create a network",
  args: { min: 1, max: 1 },
  flags: [
    { name: "driver", short: "d", kind: "string", default: "bridge", help: "Driver to manage the network (bridge, macvlan, overlay)" },
    { name: "subnet", kind: "list", help: "Subnet in CIDR format that represents a network segment" },
    { name: "gateway", kind: "list", help: "IPv4 or IPv6 gateway for the subnet" },
    { name: "ip-range", kind: "list", help: "Allocate container IPs from a sub-range" },
    { name: "aux-address", kind: "list", help: "Auxiliary IPv4 or IPv6 addresses used by the network driver (name=IP)" },
    { name: "opt", short: "o", kind: "map", help: "Set driver specific options" },
    { name: "label", kind: "map", help: "Set metadata on a network" },
    { name: "internal", kind: "bool", help: "Restrict external access to the network" },
    { name: "ipv6", kind: "bool", help: "Enable IPv6 networking" },
    { name: "attachable", kind: "bool", help: "Enable manual container attachment" },
    { name: "ipam-driver", kind: "string", help: "IP Address Management Driver (only \"default\")" },
  ],
});

const ls = defineCommand({
  name: "network ls",
  usage: "[OPTIONS]",
  summary: "List networks",
  args: { max: 0 },
  flags: [
    { name: "filter", short: "f", kind: "list", help: "Provide filter values (e.g. 'driver=bridge')" },
    { name: "format", kind: "string", help: "Format output: table, json, or a Go template" },
    { name: "no-trunc", kind: "bool", help: "Do not truncate the output" },
    { name: "quiet", short: "q", kind: "bool", help: "Only display network IDs" },
  ],
});

const inspect = defineCommand({
  name: "network inspect",
  usage: "[OPTIONS] NETWORK [NETWORK...]",
  summary: "Display detailed information on one or more networks",
  args: { min: 1 },
  flags: [{ name: "format", short: "f", kind: "string", help: "Format output using a Go template" }],
});

const rm = defineCommand({ name: "network rm", usage: "NETWORK [NETWORK...]", summary: "Remove one or more networks", args: { min: 1 }, flags: [] });

const prune = defineCommand({
  name: "network prune",
  usage: "[OPTIONS]",
  summary: "Remove all unused networks",
  args: { max: 0 },
  flags: [
    { name: "force", short: "f", kind: "bool", help: "Do not prompt for confirmation" },
    { name: "filter", kind: "list", help: "Provide filter values (e.g. 'label=<key>=<value>')" },
  ],
});

const connect = defineCommand({
  name: "network connect",
  usage: "[OPTIONS] NETWORK CONTAINER",
  summary: "Connect a sandbox, netns, pid:N or Docker/podman container to a network",
  args: { min: 2, max: 2 },
  flags: [
    { name: "ip", kind: "string", help: "IPv4 address (e.g. 172.30.100.104)" },
    { name: "ip6", kind: "string", help: "IPv6 address (e.g. 2001:db8::33)" },
    { name: "alias", kind: "list", help: "Add network-scoped alias for the container" },
  ],
});

const disconnect = defineCommand({
  name: "network disconnect",
  usage: "[OPTIONS] NETWORK CONTAINER",
  summary: "Disconnect a container from a network",
  args: { min: 2, max: 2 },
  flags: [{ name: "force", short: "f", kind: "bool", help: "Force the container to disconnect from a network" }],
});

export const networkCommands: readonly CommandSpec[] = [create, ls, inspect, rm, prune, connect, disconnect];

/** The row `network ls` shows and `--format` templates see (Docker's field names). */
function lsRow(n: Network, noTrunc: boolean) {
  return {
    ID: noTrunc ? n.id : shortId(n.id),
    Name: n.name,
    Driver: n.driver,
    Scope: n.scope,
    IPv6: String(n.enableIPv6),
    Internal: String(n.internal),
    Labels: joinLabels(n.labels),
    CreatedAt: n.created,
  };
}

async function sortedNetworks(engine: Engine): Promise<Network[]> {
  return (await listNetworks(engine)).filter((n) => n.state === "ready").sort((a, b) => a.name.localeCompare(b.name));
}

/** Run `knit network <sub> ...`. */
export async function networkMain(ctx: CommandContext, argv: readonly string[]): Promise<number> {
  const [sub, ...args] = argv;
  const group: CommandSpec = {
    name: "network",
    usage: "COMMAND",
    summary: "Manage networks",
    flags: [],
    commands: networkCommands.map((c) => ({ name: c.name.split(" ")[1] ?? c.name, summary: c.summary })),
  };
  if (sub === undefined || sub === "--help" || sub === "-h" || sub === "help") {
    ctx.out(renderHelp(group));
    return sub === undefined ? 1 : 0;
  }
  const engine = await ctx.engine();
  switch (sub) {
    case "create": {
      const a = parseArgs(create, args);
      if (a.help) return ctx.help(create);
      if (a.flags["ipam-driver"] !== undefined && a.flags["ipam-driver"] !== "default") {
        throw invalid(`unknown IPAM driver "${a.flags["ipam-driver"]}"`, 'knit has one IPAM driver: "default"');
      }
      const net = await createNetwork(engine, {
        name: a.positionals[0] ?? "",
        driver: a.flags.driver,
        subnets: a.flags.subnet,
        gateways: a.flags.gateway,
        ipRanges: a.flags["ip-range"],
        auxAddresses: a.flags["aux-address"],
        options: a.flags.opt,
        labels: a.flags.label,
        internal: a.flags.internal,
        ipv6: a.flags.ipv6,
        attachable: a.flags.attachable,
      });
      ctx.out(`${net.id}\n`);
      return 0;
    }
    case "ls":
    case "list": {
      const a = parseArgs(ls, args);
      if (a.help) return ctx.help(ls);
      const filters = parseFilters(a.flags.filter, NetworkFilterKeys);
      const nets: Network[] = [];
      for (const n of await sortedNetworks(engine)) {
        const inUse = filters.has("dangling") ? await networkHasEndpoints(engine, n.id) : false;
        if (matchNetworkFilters(filters, { ...n, inUse })) nets.push(n);
      }
      const rows = nets.map((n) => lsRow(n, a.flags["no-trunc"]));
      if (a.flags.quiet) ctx.out(rows.map((r) => `${r.ID}\n`).join(""));
      else if (a.flags.format && a.flags.format !== "table") ctx.out(renderFormat(a.flags.format, rows, { headers: { ID: "NETWORK ID" } }));
      else ctx.out(renderTable(["NETWORK ID", "NAME", "DRIVER", "SCOPE"], rows.map((r) => [r.ID, r.Name, r.Driver, r.Scope])));
      return 0;
    }
    case "inspect": {
      const a = parseArgs(inspect, args);
      if (a.help) return ctx.help(inspect);
      const views = [];
      for (const ref of a.positionals) views.push(await networkView(engine, await getNetwork(engine, ref)));
      if (a.flags.format) ctx.out(views.map((v) => `${renderTemplate(a.flags.format ?? "", v)}\n`).join(""));
      else ctx.out(`${JSON.stringify(views, null, 4)}\n`);
      return 0;
    }
    case "rm":
    case "remove": {
      const a = parseArgs(rm, args);
      if (a.help) return ctx.help(rm);
      let failed = 0;
      for (const ref of a.positionals) {
        try {
          await removeNetwork(engine, ref);
          ctx.out(`${ref}\n`);
        } catch (err) {
          failed++;
          ctx.error(err);
        }
      }
      return failed ? 1 : 0;
    }
    case "prune": {
      const a = parseArgs(prune, args);
      if (a.help) return ctx.help(prune);
      const filters = parseFilters(a.flags.filter, ["label", "until"]);
      if (filters.has("until")) throw invalid("the until filter is not supported by knit network prune");
      const removed = await pruneNetworks(engine, (n) => matchNetworkFilters(filters, n));
      if (removed.length) ctx.out(`Deleted Networks:\n${removed.map((n) => `${n}\n`).join("")}`);
      return 0;
    }
    case "connect": {
      const a = parseArgs(connect, args);
      if (a.help) return ctx.help(connect);
      const [netRef = "", ref = ""] = a.positionals;
      await getNetwork(engine, netRef); // a missing network is reported before the container is looked up
      const sb = await resolveContainer(engine, ref);
      await connectSandbox(engine, netRef, sb, {
        ...(a.flags.ip ? { ip: a.flags.ip } : {}),
        ...(a.flags.ip6 ? { ip6: a.flags.ip6 } : {}),
        aliases: a.flags.alias,
      });
      return 0;
    }
    case "disconnect": {
      const a = parseArgs(disconnect, args);
      if (a.help) return ctx.help(disconnect);
      const [netRef = "", ref = ""] = a.positionals;
      const net = await getNetwork(engine, netRef);
      const sb = await getSandbox(engine, ref);
      await refuseDockerEndpoint(engine.store, sb, net);
      await disconnectSandbox(engine, netRef, sb, a.flags.force);
      return 0;
    }
    default:
      throw invalid(`unknown command "knit network ${sub}"`, "see knit network --help");
  }
}
