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
 */
import { absent, listJson, type Store } from "../store/store.ts";
import { keys, type Endpoint, type Network } from "../model.ts";
import { endpointRowDeletes } from "../engine/endpoints.ts";

/** Overlay endpoints (with their key revision) of hosts for which `vanished(host)` holds. */
async function overlayEndpointsOf(store: Store, vanished: (host: string) => boolean): Promise<{ ep: Endpoint; modRevision: number }[]> {
  const overlay = new Set((await listJson<Network>(store, keys.networks())).filter((n) => n.driver === "overlay").map((n) => n.id));
  const out: { ep: Endpoint; modRevision: number }[] = [];
  for (const kv of (await store.list(keys.endpoints())).items) {
    let ep: Endpoint;
    try {
      ep = JSON.parse(kv.value) as Endpoint;
    } catch {
      continue;
    }
    if (ep.host !== undefined && overlay.has(ep.networkId) && vanished(ep.host)) out.push({ ep, modRevision: kv.modRevision });
  }
  return out;
}

/**
 * Remove the overlay endpoints of every host that `alive` does not list (never `me`'s own).
 * Returns the endpoints removed.
 */
export async function reapVanishedHosts(store: Store, alive: ReadonlySet<string>, me: string): Promise<Endpoint[]> {
  const reaped: Endpoint[] = [];
  for (const { ep, modRevision } of await overlayEndpointsOf(store, (h) => h !== me && !alive.has(h))) {
    const host = ep.host ?? "";
    const res = await store.txn(
      [absent(keys.host(host)), { key: keys.endpoint(ep.networkId, ep.id), target: "modRevision", op: "=", value: modRevision }],
      endpointRowDeletes(ep, { id: ep.sandboxId }),
    );
    if (res.succeeded) reaped.push(ep);
  }
  return reaped;
}
