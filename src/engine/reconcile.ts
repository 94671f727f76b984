/**
 * Reconcile (`knit gc`, and the agent on start): make store and kernel agree, both ways.
 *
 * Store -> kernel: operations whose owner died are finished or undone (sandboxes, networks,
 * endpoints, via their pending markers); sandboxes whose namespace vanished (reboot, a
 * container that exited) lose their endpoints; every ready network's kernel objects are
 * re-ensured, with what its endpoints keep outside their sandboxes (macvlan's shim routes);
 * host port claims that no sandbox lists are dropped; the firewall (published ports
 * included) is rebuilt.
 * Kernel -> store: links in this namespace carrying knit's alias (`knit:<id>`) that belong to
 * no network or endpoint in the store are deleted; knit sandboxes of this state directory
 * whose record is gone (the host was removed from the cluster with `knit host rm` while it
 * was away) are stopped and their namespace and directory deleted.
 */
import { listNetworks, listSandboxes } from "./engine.ts";
import { existsSync, readdirSync, readlinkSync, rmSync, statSync } from "node:fs";
import { join } from "node:path";
import { DockerLabels, keys } from "../model.ts";
import { drivers } from "../drivers/registry.ts";
import { toPool } from "../ipam/ipam.ts";
import { deleteNetns, ip, listLinks } from "../kernel/ip.ts";
import { NETNS_DIR } from "../kernel/exec.ts";
import type { Engine } from "./engine.ts";
import { disconnectSandbox, dropExternalIfUnused, listMemberships, readyEndpointsHere, repairNetworkEndpoints } from "./endpoints.ts";
import { repairNetworks, syncFirewall } from "./networks.ts";
import { repairSandboxes, teardownSandbox } from "./sandboxes.ts";
import { dropOrphanClaims } from "../ports/claims.ts";

export interface ReconcileReport {
  sandboxes: number;
  /** knit sandboxes whose record was gone (directory, namespace and processes removed). */
  forgotten: number;
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

/** PIDs of the processes whose network namespace is the one at `nsPath`. */
function processesIn(nsPath: string): number[] {
  let ino: number;
  try {
    ino = statSync(nsPath).ino;
  } catch {
    return [];
  }
  const out: number[] = [];
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry) || Number(entry) === process.pid) continue;
    try {
      if (readlinkSync(`/proc/${entry}/ns/net`) === `net:[${ino}]`) out.push(Number(entry));
    } catch {
      // gone, or not ours to look at
    }
  }
  return out;
}

/**
 * knit sandboxes whose directory is in this host's state directory but whose record (and
 * pending marker) is gone from the store: forgotten by `knit host rm` while this host was
 * down or cut off. A sandbox's record is written before its directory and deleted after it,
 * so a directory without a record is always such a remnant. Its command is killed, its
 * namespace (knit-<id12>) and its directory deleted.
 */
async function dropForgottenSandboxes(engine: Engine): Promise<number> {
  const dir = join(engine.stateDir, "sandboxes");
  if (!existsSync(dir)) return 0;
  let n = 0;
  for (const id of readdirSync(dir)) {
    if (!/^[0-9a-f]{64}$/.test(id)) continue;
    if ((await engine.store.get(keys.sandbox(id))) || (await engine.store.get(keys.pendingSandbox(id)))) continue;
    const netns = `knit-${id.slice(0, 12)}`;
    const pids = processesIn(`${NETNS_DIR}/${netns}`);
    for (const pid of pids) {
      try {
        process.kill(pid, "SIGKILL");
      } catch {
        // gone meanwhile
      }
    }
    for (let i = 0; i < 300 && processesIn(`${NETNS_DIR}/${netns}`).length > 0; i++) await Bun.sleep(10);
    await deleteNetns(netns);
    rmSync(join(dir, id), { recursive: true, force: true });
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
  const forgotten = await dropForgottenSandboxes(engine);
  const networks = await repairNetworks(engine);
  let endpoints = 0;
  for (const net of await listNetworks(engine)) {
    endpoints += await repairNetworkEndpoints(engine, net.id);
    const dormant = net.predefined && net.driver === "bridge" && !net.driverState.kernelCreated;
    if (net.state !== "ready" || dormant) continue;
    const driver = drivers[net.driver];
    await driver.ensureNetwork(net, net.subnets.map(toPool));
    // What endpoints hang off a network object just made again (macvlan's shim routes).
    if (driver.ensureEndpoints) await driver.ensureEndpoints(net, await readyEndpointsHere(engine, net.id));
  }
  const orphanLinks = await deleteOrphanLinks(engine);
  await dropOrphanClaims(engine);
  await syncFirewall(engine);
  return { sandboxes, forgotten, networks, endpoints, orphanLinks };
}
