/**
 * The `knit-ipam` CNI plugin: an IPAM plugin (for the reference bridge, macvlan, ptp ...)
 * that hands out the addresses of a knit network from knit's store, so they never collide
 * with knit sandboxes or containers of other runtimes on that network, and GC can give back
 * every address whose container is gone (host-local's leak after crashes and reboots).
 *
 * Configuration (the `ipam` section, host-local's shape accepted):
 *   {"type": "knit-ipam", "network": "front", "ranges": [[{"subnet": "10.88.0.0/16",
 *    "rangeStart", "rangeEnd", "gateway"}]], "routes": [{"dst": "0.0.0.0/0"}]}
 * The network (ipam.network, else the top-level `network`, else the CNI network name) must
 * exist; ranges, when given, must describe it. Static addresses come from runtimeConfig.ips,
 * args.cni.ips or CNI_ARGS IP=.
 *
 * Each allocation is an address-only endpoint of an attachment sandbox: knit records and
 * reserves, the calling plugin makes the interface.
 */
import { CniCodes, CniError } from "./errors.ts";
import { staticAddresses, type PluginContext } from "./context.ts";
import { discardAttachment, findAttachment, Labels, listAttachments, recordAttachment, removeAttachment } from "./attachments.ts";
import { networkRef, resolveNetwork } from "./network.ts";
import { attachmentKey, gcValidSet } from "./gc.ts";
import type { CniResult } from "./result.ts";
import { runAll } from "../errors.ts";
import { keys } from "../model.ts";
import { findNetwork } from "../engine/engine.ts";
import { connectSandbox, findMembership } from "../engine/endpoints.ts";
import { drivers } from "../drivers/registry.ts";
import { cidrContains, formatIp, parseCidr, parseIpWithPrefix } from "../net/ip.ts";
import { dnsServerAddress, servesDns } from "../dns/resolvconf.ts";

function requireIpam(ctx: PluginContext): void {
  if (!ctx.conf.ipam) throw new CniError(CniCodes.invalidConfig, "knit-ipam needs an ipam section", 'add "ipam": {"type": "knit-ipam"} to the configuration');
}

export async function add(ctx: PluginContext): Promise<CniResult> {
  requireIpam(ctx);
  const { inv, conf } = ctx;
  const engine = await ctx.engine();
  const net = await resolveNetwork(engine, conf, { create: false, forIpam: true });
  if (!drivers[net.driver].addressed) throw new CniError(CniCodes.invalidConfig, `knit network ${net.name} (driver ${net.driver}) has no addresses to hand out`);
  const statics = staticAddresses(conf.staticIps, net);
  const sb = await recordAttachment(engine, {
    containerId: inv.containerId,
    ifname: inv.ifname,
    netns: inv.netns,
    config: conf.name,
    plugin: "knit-ipam",
    ...(conf.podName ? { podName: conf.podName } : {}),
  });
  try {
    const aliases = net.predefined || !conf.podName ? [] : [conf.podName];
    const ep = await connectSandbox(engine, net.id, sb, { ifname: inv.ifname, addressOnly: true, ...statics, ...(aliases.length ? { aliases } : {}) });
    const res: CniResult = { interfaces: [], ips: [], routes: [...(conf.ipam?.routes ?? [])], dns: {} };
    for (const addr of [ep.ipv4, ep.ipv6]) {
      if (!addr) continue;
      const { ip } = parseIpWithPrefix(addr);
      const gateway = net.subnets.find((s) => cidrContains(parseCidr(s.subnet), ip))?.gateway;
      res.ips.push({ address: addr, ...(gateway && !net.internal ? { gateway } : {}) });
    }
    if (servesDns(net)) {
      const server = dnsServerAddress(net);
      if (server) res.dns.nameservers = [server];
      const { ensureAgent } = await import("../agent/autostart.ts");
      await ensureAgent(engine);
    }
    return res;
  } catch (err) {
    await discardAttachment(engine, inv.containerId, inv.ifname).catch(() => undefined);
    throw err;
  }
}

export async function del(ctx: PluginContext): Promise<void> {
  const engine = await ctx.engine();
  const sb = await findAttachment(engine, ctx.inv.containerId, ctx.inv.ifname);
  if (sb) await removeAttachment(engine, sb);
}

/** CHECK: the addresses of prevResult are still reserved for this container. */
export async function check(ctx: PluginContext): Promise<void> {
  requireIpam(ctx);
  const { inv, conf } = ctx;
  const engine = await ctx.engine();
  const failed = (msg: string): CniError => new CniError(CniCodes.checkFailed, msg);
  const sb = await findAttachment(engine, inv.containerId, inv.ifname);
  if (!sb || sb.state !== "ready") throw failed(`knit-ipam holds no addresses for container ${inv.containerId} interface ${inv.ifname}`);
  const ref = networkRef(conf, true).ref;
  const net = await findNetwork(engine, ref);
  const ep = net ? await findMembership(engine, sb, net.id) : undefined;
  if (!net || !ep) throw failed(`container ${inv.containerId} holds no address on knit network ${ref}`);
  for (const ip of conf.prevResult?.ips ?? []) {
    const addr = formatIp(parseIpWithPrefix(ip.address).ip);
    const holder = await engine.store.get(keys.ipam(net.id, addr));
    if (holder?.value !== ep.id) throw failed(`address ${ip.address} is not reserved for container ${inv.containerId}`);
  }
}

export async function status(ctx: PluginContext): Promise<void> {
  requireIpam(ctx);
  let engine;
  try {
    engine = await ctx.engine();
  } catch (err) {
    throw new CniError(CniCodes.notAvailable, `knit's store in ${ctx.conf.stateDir} cannot be used`, err instanceof Error ? err.message : String(err));
  }
  const ref = networkRef(ctx.conf, true).ref;
  const net = await findNetwork(engine, ref);
  if (!net || net.state !== "ready") throw new CniError(CniCodes.notAvailable, `knit network ${ref} does not exist`, `create it: knit network create ${ref}`);
}

/** GC: addresses of attachments of this CNI network that the runtime no longer lists go back. */
export async function gc(ctx: PluginContext): Promise<void> {
  const valid = gcValidSet(ctx.conf.fields);
  const engine = await ctx.engine();
  const stale = (await listAttachments(engine, ctx.conf.name)).filter(
    (sb) => sb.labels[Labels.plugin] === "knit-ipam" && !valid.has(attachmentKey(sb)),
  );
  await runAll(`GC of knit-ipam for ${ctx.conf.name}`, stale.map((sb) => () => removeAttachment(engine, sb)));
}
