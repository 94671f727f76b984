/**
 * Reconcile (`knit gc`, and the agent on start): make store and kernel agree, both ways.
 *
 * Store -> kernel: operations whose owner died are finished or undone (sandboxes, networks,
 * endpoints, via their pending markers); sandboxes whose namespace vanished (reboot, a
 * container that exited) lose their endpoints; every ready network's kernel objects are
 * re-ensured; host port claims that no sandbox lists are dropped; the firewall (published
 * ports included) is rebuilt.
 * Kernel -> store: links in this namespace carrying knit's alias (`knit:<id>`) that belong to
 * no network or endpoint in the store are deleted.
 */
import { listNetworks, listSandboxes } from "./engine.ts";
import { existsSync } from "node:fs";
import { DockerLabels, keys } from "../model.ts";
import { drivers } from "../drivers/registry.ts";
import { toPool } from "../ipam/ipam.ts";
import { ip, listLinks } from "../kernel/ip.ts";
import type { Engine } from "./engine.ts";
import { disconnectSandbox, dropExternalIfUnused, listMemberships, repairNetworkEndpoints } from "./endpoints.ts";
import { repairNetworks, syncFirewall } from "./networks.ts";
import { repairSandboxes, teardownSandbox } from "./sandboxes.ts";
import { dropOrphanClaims } from "../ports/claims.ts";

export interface ReconcileReport {
  sandboxes: number;
  networks: number;
  endpoints: number;
  orphanLinks: string[];
}

/** Sandboxes whose namespace is gone: knit's are removed, external ones lose their endpoints. */
async function dropVanishedSandboxes(engine: Engine): Promise<number> {
  let n = 0;
  for (const sb of await listSandboxes(engine)) {
    if (sb.state !== "ready" || sb.netnsPath === "host" || !sb.netnsPath || existsSync(sb.netnsPath)) continue;
    // A Docker container's namespace appears only after its Join; Docker tells the plugin
    // when it goes, and the plugin asks Docker about the rest (src/plugin).
    if (sb.labels[DockerLabels.sandbox] !== undefined) continue;
    if (sb.kind === "knit") await teardownSandbox(engine, sb);
    else {
      for (const m of await listMemberships(engine, sb.id)) await disconnectSandbox(engine, m.networkId, sb, true, false);
      await dropExternalIfUnused(engine, sb);
    }
    n++;
  }
  return n;
}

async function deleteOrphanLinks(engine: Engine): Promise<string[]> {
  const deleted: string[] = [];
  // The kernel first, then the store: an endpoint is recorded before its link is made, so
  // the link of every live endpoint listed here finds its row below. The endpoints are
  // listed once (not once per link: that was quadratic, seconds at 1,000 sandboxes).
  const links = (await listLinks()).filter((l) => l.ifalias?.startsWith("knit:"));
  if (links.length === 0) return deleted;
  const endpointIds = new Set((await engine.store.list(keys.endpoints())).items.map((kv) => kv.key.slice(kv.key.lastIndexOf("/") + 1)));
  for (const link of links) {
    const id = (link.ifalias ?? "").slice(5);
    if (endpointIds.has(id) || (await engine.store.get(keys.network(id)))) continue;
    await ip(["link", "del", "dev", link.ifname], undefined, true);
    deleted.push(link.ifname);
  }
  return deleted;
}

/** Bring store and kernel into agreement. Safe to run at any time, any number of times. */
export async function reconcile(engine: Engine): Promise<ReconcileReport> {
  const sandboxes = (await repairSandboxes(engine)) + (await dropVanishedSandboxes(engine));
  const networks = await repairNetworks(engine);
  let endpoints = 0;
  for (const net of await listNetworks(engine)) {
    endpoints += await repairNetworkEndpoints(engine, net.id);
    const dormant = net.predefined && net.driver === "bridge" && !net.driverState.kernelCreated;
    if (net.state === "ready" && !dormant) await drivers[net.driver].ensureNetwork(net, net.subnets.map(toPool));
  }
  const orphanLinks = await deleteOrphanLinks(engine);
  await dropOrphanClaims(engine);
  await syncFirewall(engine);
  return { sandboxes, networks, endpoints, orphanLinks };
}
