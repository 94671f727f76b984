/**
 * VXLAN network identifiers: one per overlay network, unique in the cluster. A network's VNI
 * is claimed as `vni/<n>` (created only if absent) in the same transaction that records the
 * network, so two hosts creating networks at the same moment can never get the same one: the
 * loser's transaction fails and its create is planned again.
 */
import { conflict } from "../errors.ts";
import { absent, type Compare, type Op, type Store } from "../store/store.ts";
import { keys, type Network } from "../model.ts";
import { MAX_VNI, MIN_AUTO_VNI, overlayState } from "../drivers/overlay.ts";

/** The claim of a VNI for a drafted overlay network. */
export interface VniClaim {
  vni: number;
  compares: Compare[];
  ops: Op[];
}

/** VNIs claimed in the store. */
async function claimedVnis(store: Store): Promise<Set<number>> {
  const prefix = keys.vnis();
  return new Set((await store.list(prefix)).items.map((kv) => Number(kv.key.slice(prefix.length))));
}

/**
 * Plan the VNI of `net`: the one asked for (com.docker.network.driver.overlay.vxlanid_list),
 * which must be free, else the lowest free one from {@link MIN_AUTO_VNI} up.
 */
export async function planVni(store: Store, net: Network): Promise<VniClaim> {
  const { requestedVni } = overlayState(net);
  const taken = await claimedVnis(store);
  let vni = requestedVni;
  if (vni > 0) {
    if (taken.has(vni)) throw conflict(`VNI ${vni} is already used by another overlay network`, "choose another com.docker.network.driver.overlay.vxlanid_list, or leave it out");
  } else {
    vni = MIN_AUTO_VNI;
    while (taken.has(vni)) vni++;
    if (vni > MAX_VNI) throw conflict("no free VXLAN network identifier is left", "remove unused overlay networks");
  }
  return { vni, compares: [absent(keys.vni(vni))], ops: [{ type: "put", key: keys.vni(vni), value: net.id }] };
}

/** The delete op of a network's VNI claim (none for other drivers). */
export function releaseVniOps(net: Network): Op[] {
  if (net.driver !== "overlay") return [];
  const { vni } = overlayState(net);
  return vni > 0 ? [{ type: "delete", key: keys.vni(vni) }] : [];
}
