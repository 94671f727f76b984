/**
 * The `knit` CNI plugin: a container joins a knit network (bridge, macvlan, any knit driver)
 * through the engine, exactly as `knit network connect` joins a sandbox, so CNI containers,
 * podman containers and knit sandboxes share one network, one IPAM and one DNS.
 *
 * ADD validates everything, resolves (or creates) the knit network, records the attachment
 * (a sandbox, see attachments.ts), connects it (addresses claimed in the store, then the
 * driver wires veth/macvlan, MAC, addresses, default routes), then applies what the
 * runtime asked on top: hairpin mode, extra IPAM routes, bandwidth. Any failure after the
 * record undoes it all, address claims included. Masquerade, isolation and icc are rules of
 * the network (one nftables transaction at `network create`), so an ADD never touches the
 * firewall: that is where the reference bridge spends most of its time.
 *
 * IPAM: `ipam.type` "knit-ipam" (or no ipam) allocates in-process from the network's IPAM;
 * any other type is executed as a delegated plugin and its addresses are claimed as static
 * ones, so they can never collide with knit's.
 */
import { CniCodes, CniError } from "./errors.ts";
import { checkMac, checkNetns, cniFault, staticAddresses, type PluginContext } from "./context.ts";
import { discardAttachment, findAttachment, Labels, listAttachments, recordAttachment, removeAttachment, setLabel } from "./attachments.ts";
import { resolveNetwork, networkRef } from "./network.ts";
import { applyShaping, checkBandwidth, checkShaping, removeShaping, type Shaping } from "./bandwidth.ts";
import { execDelegate } from "./delegate.ts";
import { mergeResults, type CniDns, type CniResult, type CniRoute } from "./result.ts";
import { attachmentKey, gcValidSet } from "./gc.ts";
import { runAll } from "../errors.ts";
import { getJson } from "../store/store.ts";
import { OVERLAY_DNS_ADDRESS, keys, type Endpoint, type Network, type Sandbox } from "../model.ts";
import { findNetwork, type Engine } from "../engine/engine.ts";
import { connectSandbox, findMembership } from "../engine/endpoints.ts";
import { drivers } from "../drivers/registry.ts";
import { getLink, linkMacs, listAddrs } from "../kernel/ip.ts";
import { rtnl, type RouteSpec } from "../kernel/netlink.ts";
import type { Netns } from "../kernel/exec.ts";
import { cidrContains, cidrSize, formatIp, parseCidr, parseIpWithPrefix, tryParseIp } from "../net/ip.ts";
import { checkDnsSettings, dnsServerAddress, servesDns, servesOverlayDns } from "../dns/resolvconf.ts";

const usesKnitIpam = (ctx: PluginContext): boolean => !ctx.conf.ipam || ctx.conf.ipam.type === "" || ctx.conf.ipam.type === "knit-ipam";

/** The device that faces the container from the host (veth) if the driver makes one. */
const hostDevice = (ep: Endpoint): string | undefined => ep.hostIfname;

/** Where an endpoint is shaped: its host-side device, else its own interface in the container. */
function shapingTarget(ep: Endpoint, netns: string): { dev: string; ns: Netns | undefined } {
  const host = hostDevice(ep);
  return host ? { dev: host, ns: undefined } : { dev: ep.ifname, ns: { path: netns } };
}

/** Routes the result lists: default routes via the gateways (unless internal), then IPAM's own. */
function resultRoutes(net: Network, ep: Endpoint, extra: readonly CniRoute[]): CniRoute[] {
  const routes: CniRoute[] = [];
  if (!net.internal) {
    for (const [addr, dst] of [[ep.ipv4, "0.0.0.0/0"], [ep.ipv6, "::/0"]] as const) {
      const gw = addr ? gatewayFor(net, addr) : undefined;
      if (gw) routes.push({ dst, gw });
    }
  }
  for (const r of extra) if (!routes.some((x) => x.dst === r.dst)) routes.push(r);
  return routes;
}

/** The gateway of the subnet an address belongs to. */
function gatewayFor(net: Network, cidr: string): string | undefined {
  const { ip } = parseIpWithPrefix(cidr);
  return net.subnets.find((s) => cidrContains(parseCidr(s.subnet), ip))?.gateway;
}

/** IPAM routes other than the default ones knit sets itself, as routes to replace in the container. */
function extraRoutes(net: Network, ep: Endpoint, routes: readonly CniRoute[]): RouteSpec[] {
  const out: RouteSpec[] = [];
  for (const r of routes) {
    if (r.dst === "0.0.0.0/0" || r.dst === "::/0") continue;
    const v6 = r.dst.includes(":");
    const addr = v6 ? ep.ipv6 : ep.ipv4;
    if (!addr) continue;
    const gw = r.gw ?? gatewayFor(net, addr);
    if (!gw) continue;
    out.push({ dst: r.dst, gateway: gw, dev: ep.ifname, replace: true });
  }
  return out;
}

function resultDns(ctx: PluginContext, net: Network): CniDns {
  const rt = ctx.conf.runtime.dns;
  const conf = ctx.conf.dns ?? {};
  const dns: CniDns = {};
  const server = servesDns(net) ? dnsServerAddress(net) : servesOverlayDns(net) ? OVERLAY_DNS_ADDRESS : undefined;
  const nameservers = server ? [server] : rt?.servers.length ? rt.servers : (conf.nameservers ?? []);
  if (nameservers.length) dns.nameservers = nameservers;
  if (conf.domain) dns.domain = conf.domain;
  const search = rt?.searches.length ? rt.searches : (conf.search ?? []);
  if (search.length) dns.search = search;
  const options = rt?.options.length ? rt.options : (conf.options ?? []);
  if (options.length) dns.options = options;
  return dns;
}

/** The result of an attachment, in the reference bridge's order: bridge, host veth, container. */
async function buildResult(ctx: PluginContext, net: Network, ep: Endpoint, routes: readonly CniRoute[]): Promise<CniResult> {
  const res: CniResult = { interfaces: [], ips: [], routes: [], dns: resultDns(ctx, net) };
  const bridge = net.driver === "bridge" ? String(net.driverState.bridge) : undefined;
  const host = hostDevice(ep);
  const names = [bridge, host].filter((n): n is string => !!n);
  if (names.length) {
    const macs = await linkMacs(names);
    const mtu = Number(net.driverState.mtu) || undefined;
    for (const name of names) {
      const mac = macs.get(name);
      res.interfaces.push({ name, ...(mac ? { mac } : {}), ...(mtu ? { mtu } : {}) });
    }
  }
  const index = res.interfaces.length;
  res.interfaces.push({ name: ep.ifname, mac: ep.mac, sandbox: ctx.inv.netns });
  for (const addr of [ep.ipv4, ep.ipv6]) {
    if (!addr) continue;
    const gateway = gatewayFor(net, addr);
    res.ips.push({ address: addr, ...(gateway ? { gateway } : {}), interface: index });
  }
  res.routes = resultRoutes(net, ep, routes);
  return mergeResults(ctx.conf.prevResult, res);
}

/** Addresses from a delegated IPAM result, as static addresses for the engine. */
function delegatedAddresses(res: CniResult | undefined): string[] {
  return (res?.ips ?? []).map((ip) => ip.address);
}

async function startDns(engine: Engine, net: Network): Promise<void> {
  if (!servesDns(net)) return;
  const { ensureAgent } = await import("../agent/autostart.ts");
  await ensureAgent(engine);
}

export async function add(ctx: PluginContext): Promise<CniResult> {
  const { inv, conf } = ctx;
  checkNetns(inv.netns);
  const shaping = checkBandwidth(conf.runtime.bandwidth);
  const mac = conf.mac ? checkMac(conf.mac) : undefined;
  const rtDns = conf.runtime.dns;
  const dns = rtDns ? checkDnsSettings({ servers: rtDns.servers, search: rtDns.searches, options: rtDns.options }) : undefined;
  const engine = await ctx.engine();
  const net = await resolveNetwork(engine, conf, { create: true });
  ctx.trace.mark("network");
  const driver = drivers[net.driver];
  if (!driver.addressed || !driver.userNetworks) {
    throw new CniError(CniCodes.invalidConfig, `knit network ${net.name} (driver ${net.driver}) cannot be joined by a container`, "name a bridge or macvlan network");
  }
  const delegated = usesKnitIpam(ctx) ? undefined : (conf.ipam?.type ?? "");
  const ipamResult = delegated ? await execDelegate(delegated, "ADD", ctx, conf.cniVersion) : undefined;
  try {
    const statics = staticAddresses(delegated ? delegatedAddresses(ipamResult) : conf.staticIps, net);
    if (statics.ip6 && !net.enableIPv6) throw new CniError(CniCodes.invalidConfig, `static address ${statics.ip6}: network ${net.name} has no IPv6`);
    const aliases = net.predefined ? [] : [...new Set([...(conf.podName ? [conf.podName] : []), ...conf.runtime.aliases])];
    const sb = await recordAttachment(engine, {
      containerId: inv.containerId,
      ifname: inv.ifname,
      netns: inv.netns,
      config: conf.name,
      plugin: "knit",
      ...(conf.podName ? { podName: conf.podName } : {}),
      ...(dns && (dns.servers.length || dns.search.length || dns.options.length) ? { dns } : {}),
    });
    ctx.trace.mark("record");
    try {
      const ep = await connectSandbox(engine, net.id, sb, { ifname: inv.ifname, ...statics, ...(mac ? { mac } : {}), ...(aliases.length ? { aliases } : {}) }).catch((err: unknown) => {
        throw explainConnectError(err, inv.ifname, inv.netns);
      });
      ctx.trace.mark("connect");
      cniFault("cni-add:after-connect", ctx.env);
      const routes = [...(conf.ipam?.routes ?? []), ...(ipamResult?.routes ?? [])];
      await applyExtras(ctx, engine, { net, ep, sb, routes, shaping });
      cniFault("cni-add:after-shaping", ctx.env);
      ctx.trace.mark("extras");
      const [result] = await Promise.all([buildResult(ctx, net, ep, routes), startDns(engine, net)]);
      ctx.trace.mark("result");
      return result;
    } catch (err) {
      await undoAdd(engine, inv.containerId, inv.ifname);
      throw err;
    }
  } catch (err) {
    if (delegated) await execDelegate(delegated, "DEL", ctx, conf.cniVersion).catch(() => undefined);
    throw err;
  }
}

/** The interface is made in the container under its final name: "File exists" means it has one. */
function explainConnectError(err: unknown, ifname: string, netns: string): unknown {
  if (err instanceof Error && /File exists/.test(err.message)) {
    return new CniError(CniCodes.conflict, `interface ${ifname} already exists in ${netns}`, "choose another CNI_IFNAME, or DEL the attachment that made it");
  }
  return err;
}

/** What an ADD does after the engine wired the endpoint: IPAM routes, hairpin mode, bandwidth. */
async function applyExtras(ctx: PluginContext, engine: Engine, a: { net: Network; ep: Endpoint; sb: Sandbox; routes: readonly CniRoute[]; shaping: Shaping | undefined }): Promise<void> {
  const { inv, conf } = ctx;
  const inside = extraRoutes(a.net, a.ep, a.routes);
  if (inside.length) rtnl({ path: inv.netns }, (r) => inside.forEach((route) => r.addRoute(route)));
  const host = a.ep.hostIfname;
  if (conf.fields.bool("hairpinMode") && host) rtnl(undefined, (r) => r.setBridgePort(host, { hairpin: true }));
  if (a.shaping) {
    const t = shapingTarget(a.ep, inv.netns);
    // Labelled before the ifb is made, so that DEL always looks for it.
    await setLabel(engine, a.sb, Labels.shaped, t.ns ? "netns" : "host");
    await applyShaping(a.shaping, t.dev, t.ns, a.ep.id);
  }
}

/** Undo a failed ADD completely (best effort: the original error is what the runtime sees). */
async function undoAdd(engine: Engine, containerId: string, ifname: string): Promise<void> {
  await discardAttachment(engine, containerId, ifname, (sb) => removeKnitAttachment(engine, sb)).catch(() => undefined);
}

/** Remove an attachment of the knit plugin, its ifb (if shaped) included; returns its networks. */
async function removeKnitAttachment(engine: Engine, sb: Sandbox): Promise<Network[]> {
  const nets: Network[] = [];
  const shaped = sb.labels[Labels.shaped];
  await removeAttachment(engine, sb, async (ep) => {
    const net = await getJson<Network>(engine.store, keys.network(ep.networkId));
    if (net) nets.push(net);
    // The ifb of a host-side shaping lives on the host; of a container-side one, in the container.
    if (shaped) await removeShaping(ep.id, shaped === "netns" && sb.netnsPath ? { path: sb.netnsPath } : undefined);
  });
  return nets;
}

export async function del(ctx: PluginContext): Promise<void> {
  const { inv, conf } = ctx;
  const engine = await ctx.engine();
  const sb = await findAttachment(engine, inv.containerId, inv.ifname);
  const steps: (() => Promise<unknown>)[] = [];
  let nets: Network[] = [];
  ctx.trace.mark("lookup");
  if (sb) steps.push(async () => (nets = await removeKnitAttachment(engine, sb)));
  const delegated = usesKnitIpam(ctx) ? undefined : (conf.ipam?.type ?? "");
  if (delegated) steps.push(() => execDelegate(delegated, "DEL", ctx, conf.cniVersion));
  await runAll(`DEL ${inv.containerId} ${inv.ifname}`, steps);
  ctx.trace.mark("remove");
  if (nets.some(servesDns)) {
    const { stopIdleAgent } = await import("../agent/autostart.ts");
    await stopIdleAgent(engine).catch(() => undefined);
    ctx.trace.mark("agent");
  }
}

/** CHECK: everything the ADD made and prevResult lists must be there and as it was. */
export async function check(ctx: PluginContext): Promise<void> {
  const { inv, conf } = ctx;
  checkNetns(inv.netns);
  const prev = conf.prevResult;
  if (!prev) throw new CniError(CniCodes.invalidConfig, "required prevResult missing", "CHECK needs the result of the ADD in prevResult");
  const engine = await ctx.engine();
  const failed = (msg: string, details = ""): CniError => new CniError(CniCodes.checkFailed, msg, details);
  const sb = await findAttachment(engine, inv.containerId, inv.ifname);
  if (!sb || sb.state !== "ready") throw failed(`knit has no attachment of container ${inv.containerId} interface ${inv.ifname}`);
  const net = await findNetwork(engine, networkRef(conf).ref);
  const ep = net ? await findMembership(engine, sb, net.id) : undefined;
  if (!net || !ep || ep.state !== "ready") throw failed(`container ${inv.containerId} is not on knit network ${networkRef(conf).ref}`);
  const problems: string[] = [];
  const ns: Netns = { path: inv.netns };
  const link = await getLink(inv.ifname, ns);
  const mine = prev.interfaces.findIndex((i) => i.name === inv.ifname && i.sandbox === inv.netns);
  // A later plugin in the chain (tuning) may have changed the MAC: prevResult says which.
  const mac = (prev.interfaces[mine]?.mac ?? ep.mac).toLowerCase();
  if (mine < 0) problems.push(`prevResult lists no interface ${inv.ifname} in ${inv.netns}`);
  if (!link) problems.push(`interface ${inv.ifname} is missing in ${inv.netns}`);
  else if (link.address?.toLowerCase() !== mac) problems.push(`interface ${inv.ifname} has MAC ${link.address ?? "none"}, not ${mac}`);
  const have = new Set((await listAddrs(ns)).filter((a) => a.ifname === inv.ifname).flatMap((a) => a.addr_info.map((i) => `${i.local}/${i.prefixlen}`)));
  for (const ip of prev.ips.filter((i) => i.interface === mine)) {
    const canonical = `${formatIp(parseIpWithPrefix(ip.address).ip)}/${parseIpWithPrefix(ip.address).prefix}`;
    if (!have.has(canonical)) problems.push(`address ${ip.address} is missing on ${inv.ifname}`);
    if (ep.ipv4 !== canonical && ep.ipv6 !== canonical) problems.push(`address ${ip.address} is not the one knit gave (${[ep.ipv4, ep.ipv6].filter(Boolean).join(", ")})`);
    const holder = await engine.store.get(keys.ipam(net.id, formatIp(parseIpWithPrefix(ip.address).ip)));
    if (holder?.value !== ep.id) problems.push(`address ${ip.address} is not reserved for this container in knit's IPAM`);
  }
  if (ep.hostIfname) {
    const hostLink = await getLink(ep.hostIfname);
    if (!hostLink) problems.push(`host interface ${ep.hostIfname} is missing`);
    else if (net.driver === "bridge" && hostLink.master !== net.driverState.bridge) problems.push(`host interface ${ep.hostIfname} is not attached to bridge ${String(net.driverState.bridge)}`);
  }
  const shaping: Shaping | undefined = checkBandwidth(conf.runtime.bandwidth);
  if (shaping) {
    const t = shapingTarget(ep, inv.netns);
    problems.push(...(await checkShaping(shaping, t.dev, t.ns, ep.id)));
  }
  if (problems.length) throw failed(`container ${inv.containerId} interface ${inv.ifname} is not as ADD left it`, problems.join("; "));
  if (!usesKnitIpam(ctx)) await execDelegate(conf.ipam?.type ?? "", "CHECK", ctx, conf.cniVersion);
}

/** Free dynamic addresses of the network's first pool of a family (an estimate: claims counted). */
async function freeAddresses(engine: Engine, net: Network): Promise<bigint> {
  const pool = net.subnets.find((s) => !s.subnet.includes(":"));
  if (!pool) return 1n;
  const range = parseCidr(pool.ipRange ?? pool.subnet);
  const usable = cidrSize(range) - (range.prefix < 31 ? 2n : 0n);
  const claims = (await engine.store.list(keys.ipamPrefix(net.id))).items.filter((kv) => {
    const ip = tryParseIp(kv.key.slice(keys.ipamPrefix(net.id).length));
    return ip !== undefined && cidrContains(range, ip);
  }).length;
  return usable - BigInt(claims);
}

/** STATUS: ready when the store works, the network can be used and has addresses left. */
export async function status(ctx: PluginContext): Promise<void> {
  const { conf } = ctx;
  let engine: Engine;
  try {
    engine = await ctx.engine();
  } catch (err) {
    throw new CniError(CniCodes.notAvailable, `knit's store in ${conf.stateDir} cannot be used`, err instanceof Error ? err.message : String(err));
  }
  const { ref, explicit } = networkRef(conf);
  const net = await findNetwork(engine, ref);
  if (!net && explicit) throw new CniError(CniCodes.notAvailable, `knit network ${ref} does not exist`, `create it: knit network create ${ref}`);
  if (net && net.state === "deleting") throw new CniError(CniCodes.notAvailable, `knit network ${ref} is being removed`);
  if (net && usesKnitIpam(ctx) && drivers[net.driver].addressed && (await freeAddresses(engine, net)) <= 0n) {
    throw new CniError(CniCodes.notAvailable, `knit network ${ref} has no free IPv4 addresses`, "remove unused containers, or use a network with a larger subnet");
  }
  if (!usesKnitIpam(ctx)) await execDelegate(conf.ipam?.type ?? "", "STATUS", ctx, conf.cniVersion);
}

/**
 * GC: every attachment this CNI network made through the knit plugin that the runtime no
 * longer lists is removed completely (links, ifb, address claims, published ports), then
 * knit reconciles (crashed operations, orphaned links, firewall). Errors do not stop it.
 */
export async function gc(ctx: PluginContext): Promise<void> {
  const { conf } = ctx;
  const valid = gcValidSet(conf.fields);
  const engine = await ctx.engine();
  const stale = (await listAttachments(engine, conf.name)).filter((sb) => sb.labels[Labels.plugin] === "knit" && !valid.has(attachmentKey(sb)));
  const steps: (() => Promise<unknown>)[] = stale.map((sb) => () => removeKnitAttachment(engine, sb));
  steps.push(async () => {
    const { reconcile } = await import("../engine/reconcile.ts");
    await reconcile(engine);
  });
  if (!usesKnitIpam(ctx)) steps.push(() => execDelegate(conf.ipam?.type ?? "", "GC", ctx, conf.cniVersion));
  await runAll(`GC of CNI network ${conf.name}`, steps);
}

