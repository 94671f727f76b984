/**
 * One agent per host: the agent claims `agents/<hostname>` in the store with a
 * compare-and-swap before it binds anything. A claim whose process is dead (the agent was
 * killed) is taken over; a live one makes the newcomer give up. The pidfile cannot do this
 * alone: two starters could both find it stale and both take it; the store's transaction
 * decides between them.
 */
import { hostName } from "../engine/owner.ts";
import { KnitError } from "../errors.ts";
import { absent, type Store } from "../store/store.ts";
import { keys, type AgentClaim } from "../model.ts";
import { ownerAlive } from "../engine/owner.ts";

/** Claim the host for `me`; returns the live holder when another agent has it. */
export async function claimAgent(store: Store, me: AgentClaim): Promise<{ ok: true } | { ok: false; holder: AgentClaim }> {
  const key = keys.agent(hostName());
  const value = JSON.stringify(me);
  for (let i = 0; i < 16; i++) {
    const current = await store.get(key);
    if (!current) {
      if ((await store.txn([absent(key)], [{ type: "put", key, value }])).succeeded) return { ok: true };
      continue;
    }
    let holder: AgentClaim | undefined;
    try {
      holder = JSON.parse(current.value) as AgentClaim;
    } catch {
      holder = undefined;
    }
    if (holder && holder.pid !== me.pid && ownerAlive(holder)) return { ok: false, holder };
    const taken = await store.txn([{ key, target: "modRevision", op: "=", value: current.modRevision }], [{ type: "put", key, value }]);
    if (taken.succeeded) return { ok: true };
  }
  throw new KnitError("store", "cannot claim the agent role: the claim keeps changing", { hint: "try again" });
}

/** Give the claim up, if it is still ours. */
export async function releaseAgent(store: Store, me: AgentClaim): Promise<void> {
  const key = keys.agent(hostName());
  await store.txn([{ key, target: "value", op: "=", value: JSON.stringify(me) }], [{ type: "delete", key }]);
}
