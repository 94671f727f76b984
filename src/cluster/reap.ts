/**
 * Freeing what a vanished host held. When a host's `hosts/<name>` key is gone (its lease
 * expired: the agent died, or the host lost the store for longer than the TTL), the live
 * agents remove that host's endpoints on overlay networks from the store: endpoint row,
 * address claim, membership, interface name. Their addresses can then be handed out again
 * and their names stop resolving everywhere. The host's own sandboxes and local networks are
 * left alone: they are its business, and nobody else allocates from them.
 *
 * Every removal is one transaction guarded by "the host key is still absent" (and the row is
 * unchanged), so agents reaping at the same moment do no harm, and a host that registers
 * again in the middle keeps whatever was not removed yet. A host that comes back after being
 * reaped finds its overlay endpoints gone from the store; its agent then deletes their
 * interfaces (src/cluster/sync.ts): it rejoins with a clean slate, never with addresses that
 * may have been given to others meanwhile.
 *
 * `knit host rm` (remove.ts) uses the same removal for every endpoint of the host it forgets,
 * on local networks too, once that host's registration is gone.
 */
import { absent, listJson, type Store } from "../store/store.ts";
import { keys, type Endpoint, type Network } from "../model.ts";
import { endpointRowDeletes } from "../engine/endpoints.ts";

/**
 * Endpoints (with their key revision) of hosts for which `vanished(host)` holds: on overlay
 * networks only, or on every network (`knit host rm`, which forgets the host's local networks
 * and sandboxes too).
 */
async function endpointsOfHosts(store: Store, vanished: (host: string) => boolean, overlayOnly: boolean): Promise<{ ep: Endpoint; modRevision: number }[]> {
  const overlay = new Set((await listJson<Network>(store, keys.networks())).filter((n) => n.driver === "overlay").map((n) => n.id));
  const out: { ep: Endpoint; modRevision: number }[] = [];
  for (const kv of (await store.list(keys.endpoints())).items) {
    let ep: Endpoint;
    try {
      ep = JSON.parse(kv.value) as Endpoint;
    } catch {
      continue;
    }
    if (ep.host !== undefined && (!overlayOnly || overlay.has(ep.networkId)) && vanished(ep.host)) out.push({ ep, modRevision: kv.modRevision });
  }
  return out;
}

/** Free each endpoint (rows and address) while its host is still absent and the row unchanged. */
async function freeEndpoints(store: Store, found: readonly { ep: Endpoint; modRevision: number }[]): Promise<Endpoint[]> {
  const reaped: Endpoint[] = [];
  for (const { ep, modRevision } of found) {
    const host = ep.host ?? "";
    const res = await store.txn(
      [absent(keys.host(host)), { key: keys.endpoint(ep.networkId, ep.id), target: "modRevision", op: "=", value: modRevision }],
      endpointRowDeletes(ep, { id: ep.sandboxId }),
    );
    if (res.succeeded) reaped.push(ep);
  }
  return reaped;
}

/**
 * Remove the overlay endpoints of every host that `alive` does not list (never `me`'s own).
 * Returns the endpoints removed.
 */
export async function reapVanishedHosts(store: Store, alive: ReadonlySet<string>, me: string): Promise<Endpoint[]> {
  return freeEndpoints(store, await endpointsOfHosts(store, (h) => h !== me && !alive.has(h), true));
}

/**
 * Remove every endpoint of host `name`, on any network, with the same guard ("the host is
 * still absent"): `knit host rm`, after the host's registration is gone. Overlay endpoints
 * go first, so the other hosts drop them from their data path and DNS at once.
 */
export async function reapHost(store: Store, name: string): Promise<Endpoint[]> {
  const overlay = await freeEndpoints(store, await endpointsOfHosts(store, (h) => h === name, true));
  return [...overlay, ...(await freeEndpoints(store, await endpointsOfHosts(store, (h) => h === name, false)))];
}
