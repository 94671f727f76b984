/**
 * The `knit-portmap` chained CNI plugin: `runtimeConfig.portMappings` become knit published
 * ports of the attachment (the same claims, DNAT rules and conntrack flushes as `knit run
 * -p`). It works for containers whose address knit manages: attached by the `knit` plugin,
 * or given their address by `knit-ipam` on a knit bridge network. For any other container
 * use the reference `portmap` plugin.
 *
 * Port claims are made in one store transaction with the attachment's record (no two
 * containers, sandboxes or runtimes can hold one host port), then the firewall is rebuilt as
 * one nftables transaction: no per-container chains, no iptables lock.
 */
import { CniCodes, CniError } from "./errors.ts";
import type { PluginContext } from "./context.ts";
import { findAttachment, listAttachments } from "./attachments.ts";
import { attachmentKey, gcValidSet } from "./gc.ts";
import type { PortMapEntry } from "./config.ts";
import type { CniResult } from "./result.ts";
import { emptyResult } from "./result.ts";
import { runAll } from "../errors.ts";
import { getJson, putJson, type Compare, type Op } from "../store/store.ts";
import { keys, type Endpoint, type Network, type PortMapping, type Sandbox } from "../model.ts";
import type { Engine } from "../engine/engine.ts";
import { listMemberships } from "../engine/endpoints.ts";
import { syncFirewall } from "../engine/networks.ts";
import { planClaims, releaseClaims, dropOrphanClaims } from "../ports/claims.ts";
import { flushUdpFlows, hairpinPortEndpoints, resolvePortRequests } from "../ports/publish.ts";
import { nftListTable } from "../kernel/nft.ts";
import { tryParseIp, formatIp } from "../net/ip.ts";

/** A portMappings entry as a `-p` value (the syntax src/ports parses and checks). */
export function publishValue(p: PortMapEntry): string {
  for (const [key, n] of [["hostPort", p.hostPort], ["containerPort", p.containerPort]] as const) {
    if (!Number.isInteger(n) || n < 1 || n > 65535) throw new CniError(CniCodes.invalidConfig, `portMappings: ${key} ${n} is out of range (1-65535)`);
  }
  const proto = p.protocol || "tcp";
  let host = "";
  if (p.hostIP) {
    const ip = tryParseIp(p.hostIP);
    if (!ip) throw new CniError(CniCodes.invalidConfig, `portMappings: hostIP "${p.hostIP}" is not an IP address`);
    host = ip.family === 6 ? `[${formatIp(ip)}]:` : `${formatIp(ip)}:`;
  }
  return `${host}${p.hostPort}:${p.containerPort}/${proto}`;
}

/** The attachment's network and endpoint (knit-portmap needs a knit address). */
async function attachmentEndpoint(engine: Engine, sb: Sandbox): Promise<{ net: Network; ep: Endpoint }> {
  for (const m of await listMemberships(engine, sb.id)) {
    const net = await getJson<Network>(engine.store, keys.network(m.networkId));
    const ep = await getJson<Endpoint>(engine.store, keys.endpoint(m.networkId, m.endpointId));
    if (net && ep?.state === "ready") return { net, ep };
  }
  throw new CniError(CniCodes.invalidConfig, `attachment ${sb.name} has no ready endpoint on a knit network`);
}

/** Rebuild the firewall after claims changed and flush UDP flows of these ports. */
async function refresh(engine: Engine, mappings: readonly PortMapping[]): Promise<void> {
  if (mappings.length === 0) return;
  await syncFirewall(engine);
  await flushUdpFlows(mappings);
}

function passThrough(ctx: PluginContext): CniResult {
  return ctx.conf.prevResult ?? emptyResult();
}

export async function add(ctx: PluginContext): Promise<CniResult> {
  const { inv, conf } = ctx;
  if (!conf.prevResult) throw new CniError(CniCodes.invalidConfig, "knit-portmap is a chained plugin: it needs a prevResult", "put it after the knit plugin in a conflist");
  const values = conf.runtime.portMappings.map(publishValue);
  if (values.length === 0) return passThrough(ctx);
  const engine = await ctx.engine();
  const sb = await findAttachment(engine, inv.containerId, inv.ifname);
  if (!sb) {
    throw new CniError(CniCodes.invalidConfig, `knit-portmap: knit does not manage the address of container ${inv.containerId} interface ${inv.ifname}`, "use it after the knit plugin (or a plugin with knit-ipam); for other containers use the reference portmap plugin");
  }
  const { net, ep } = await attachmentEndpoint(engine, sb);
  const requests = resolvePortRequests(values, net);
  let mappings: PortMapping[] = [];
  for (let attempt = 0; ; attempt++) {
    const kv = await engine.store.get(keys.sandbox(sb.id));
    if (!kv) throw new CniError(CniCodes.conflict, `attachment ${sb.name} was removed while its ports were published`);
    const current = JSON.parse(kv.value) as Sandbox;
    if (current.ports?.length) throw new CniError(CniCodes.conflict, `container ${inv.containerId} already has published ports`, "DEL it first");
    const plan = await planClaims(engine, sb.id, requests);
    const compares: Compare[] = [{ key: kv.key, target: "modRevision", op: "=", value: kv.modRevision }, ...plan.compares];
    const ops: Op[] = [putJson(kv.key, { ...current, ports: plan.mappings }), ...plan.ops];
    if ((await engine.store.txn(compares, ops)).succeeded) {
      mappings = plan.mappings;
      break;
    }
    if (attempt >= 64) throw new CniError(CniCodes.tryAgain, "too much concurrent change while claiming host ports");
  }
  try {
    await hairpinPortEndpoints([ep], mappings);
    await refresh(engine, mappings);
  } catch (err) {
    await refresh(engine, await releaseClaims(engine, sb.id)).catch(() => undefined);
    throw err;
  }
  return passThrough(ctx);
}

export async function del(ctx: PluginContext): Promise<void> {
  const engine = await ctx.engine();
  const sb = await findAttachment(engine, ctx.inv.containerId, ctx.inv.ifname);
  if (!sb) return;
  await refresh(engine, await releaseClaims(engine, sb.id));
}

interface NftRule {
  rule?: { chain?: string; comment?: string };
}

/** CHECK: the claims are held and every mapping has its DNAT rule. */
export async function check(ctx: PluginContext): Promise<void> {
  const { inv, conf } = ctx;
  if (conf.runtime.portMappings.length === 0) return;
  const engine = await ctx.engine();
  const failed = (msg: string, details = ""): CniError => new CniError(CniCodes.checkFailed, msg, details);
  const sb = await findAttachment(engine, inv.containerId, inv.ifname);
  if (!sb) throw failed(`knit has no attachment of container ${inv.containerId} interface ${inv.ifname}`);
  const held = sb.ports ?? [];
  const problems: string[] = [];
  for (const p of conf.runtime.portMappings) {
    const proto = p.protocol || "tcp";
    if (!held.some((m) => m.hostPort === p.hostPort && m.containerPort === p.containerPort && m.proto === proto)) problems.push(`${p.hostPort}->${p.containerPort}/${proto} is not published`);
  }
  const table = await nftListTable("inet", "knit");
  const rules = ((table?.nftables ?? []) as NftRule[]).filter((r) => r.rule?.chain === "published" && r.rule.comment?.endsWith(sb.id.slice(0, 12)));
  if (rules.length < held.length) problems.push(`${held.length - rules.length} of ${held.length} DNAT rules are missing in table inet knit`);
  if (problems.length) throw failed(`published ports of container ${inv.containerId} are not as ADD left them`, problems.join("; "));
}

export async function status(ctx: PluginContext): Promise<void> {
  try {
    await ctx.engine();
  } catch (err) {
    throw new CniError(CniCodes.notAvailable, `knit's store in ${ctx.conf.stateDir} cannot be used`, err instanceof Error ? err.message : String(err));
  }
}

/** GC: ports of attachments of this CNI network that the runtime no longer lists are released. */
export async function gc(ctx: PluginContext): Promise<void> {
  const valid = gcValidSet(ctx.conf.fields);
  const engine = await ctx.engine();
  const stale = (await listAttachments(engine, ctx.conf.name)).filter(
    (sb) => sb.ports?.length && !valid.has(attachmentKey(sb)),
  );
  const released: PortMapping[] = [];
  await runAll(`GC of knit-portmap for ${ctx.conf.name}`, [
    ...stale.map((sb) => async () => released.push(...(await releaseClaims(engine, sb.id)))),
    () => dropOrphanClaims(engine),
  ]);
  await syncFirewall(engine);
  await flushUdpFlows(released);
}
