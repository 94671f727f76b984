/**
 * `knit host rm`: forget a host of the cluster for good, as `docker node rm` does.
 *
 * Design note. A host that is gone (its agent stopped renewing, its lease ran out) already
 * left every other host's data path and DNS, and its overlay endpoints were freed by the
 * reaper (reap.ts); what stays in the store are the records that only the host itself would
 * ever clean: its sandboxes, its local networks (with their address claims), its endpoints on
 * them, its host port claims, name keys, its agent claim, the Docker plugin's rows for it.
 * Removing the host deletes them all, so `knit host ls` no longer lists it.
 *
 * A host whose registration is alive is refused unless forced (`-f`), as Docker refuses a
 * node that is not down. Forced, the registration goes first: an `evicted/<name>` key is put
 * (under a lease of its own, so it cannot outlive its use) and the host's lease is revoked.
 * Every other agent sees `hosts/<name>` go and drops the host's endpoints as if its TTL had
 * passed; the host's own agent, if it still runs, finds the eviction and stops renewing
 * instead of registering again (restarting it joins again).
 *
 * Every deletion is guarded by "the host's registration is still absent": a host whose agent
 * registers again in the middle keeps what was not removed yet, and the command says so. The
 * removal is many small transactions (etcd limits a transaction's size); running the command
 * again finishes one that was cut short.
 */
import { KnitError, conflict, invalid, notFound } from "../errors.ts";
import { absent, getJson, listJson, type Compare, type Op, type Store } from "../store/store.ts";
import { keys, type HostRecord, type Network, type Owner, type Sandbox } from "../model.ts";
import { dockerKeys, type DockerEndpoint, type DockerNetworkLink, type DockerPool } from "../plugin/records.ts";
import { hostName } from "../engine/owner.ts";
import type { Engine } from "../engine/engine.ts";
import { finishNetworkRemoval } from "../engine/networks.ts";
import { reapHost } from "./reap.ts";

/** What `knit host rm` removed of one host. */
export interface HostRemoval {
  name: string;
  /** The host was registered (alive) and was evicted (`-f`). */
  evicted: boolean;
  endpoints: number;
  sandboxes: number;
  networks: number;
}

/** Lease of the eviction mark, at least this many seconds (and three of the host's TTLs). */
const EVICTION_MIN_TTL = 30;

/** Everything the store holds for a host, as listed before the removal. */
interface HostRecords {
  registration: { record: HostRecord; lease: string | undefined } | undefined;
  sandboxes: Sandbox[];
  networks: Network[];
  /** Global networks whose create or rm the host left unfinished. */
  orphanedGlobal: Network[];
  endpoints: number;
  /** Keys under names/<host>/, ports/<host>/, agents/<host>, docker/sandboxes/<host>/. */
  otherKeys: number;
}

async function findHostRecords(engine: Engine, name: string): Promise<HostRecords> {
  const store = engine.store;
  const reg = await store.get(keys.host(name));
  let registration: HostRecords["registration"];
  if (reg) {
    try {
      registration = { record: JSON.parse(reg.value) as HostRecord, lease: reg.lease };
    } catch {
      registration = { record: { name, address: "", device: "", mtu: 0, pid: 0, started: "", ttl: 10 }, lease: reg.lease };
    }
  }
  const [sandboxes, networks, endpoints, pending] = await Promise.all([
    listJson<Sandbox>(store, keys.sandboxes()),
    listJson<Network>(store, keys.networks()),
    store.list(keys.endpoints()),
    store.list(keys.pendingNetworks()),
  ]);
  const orphanedGlobal: Network[] = [];
  for (const kv of pending.items) {
    const owner = JSON.parse(kv.value) as Owner;
    const net = networks.find((n) => n.id === kv.key.slice(keys.pendingNetworks().length));
    if (owner.host === name && net && net.host === undefined) orphanedGlobal.push(net);
  }
  let otherKeys = 0;
  for (const prefix of [`names/${name}/`, keys.portsOf(name), dockerKeys.sandboxesOf(name)]) otherKeys += (await store.list(prefix)).items.length;
  if (await store.get(keys.agent(name))) otherKeys++;
  return {
    registration,
    sandboxes: sandboxes.filter((s) => s.host === name),
    networks: networks.filter((n) => n.host === name),
    orphanedGlobal,
    endpoints: endpoints.items.filter((kv) => (JSON.parse(kv.value) as { host?: string }).host === name).length,
    otherKeys,
  };
}

const known = (r: HostRecords): boolean =>
  r.registration !== undefined || r.sandboxes.length > 0 || r.networks.length > 0 || r.orphanedGlobal.length > 0 || r.endpoints > 0 || r.otherKeys > 0;

/** Run a transaction that must hold while the host is absent; a failure because it is back is an error. */
async function whileAbsent(store: Store, name: string, compares: readonly Compare[], ops: readonly Op[]): Promise<boolean> {
  const res = await store.txn([absent(keys.host(name)), ...compares], ops);
  if (res.succeeded) return true;
  if (await store.get(keys.host(name))) {
    throw conflict(`host ${name} registered again while it was being removed: what was not removed yet stays`, `stop its knit agent first, then run knit host rm ${name} again`);
  }
  return false;
}

/** Evict a registered host: mark it, then revoke its lease (its registration goes with it). */
async function evict(store: Store, name: string, registration: NonNullable<HostRecords["registration"]>): Promise<void> {
  const lease = await store.grantLease(Math.max(EVICTION_MIN_TTL, 3 * registration.record.ttl));
  await store.put(keys.evicted(name), JSON.stringify({ by: hostName(), at: new Date().toISOString() }), lease);
  if (registration.lease) await store.revokeLease(registration.lease);
  await store.delete(keys.host(name));
}

/** Delete the records of the host's sandboxes (their endpoints are gone already). */
async function removeSandboxes(store: Store, name: string, sandboxes: readonly Sandbox[]): Promise<number> {
  let n = 0;
  for (const sb of sandboxes) {
    const ops: Op[] = [
      { type: "delete", key: keys.sandbox(sb.id) },
      { type: "delete", key: keys.sandboxName(name, sb.name) },
      { type: "delete", key: keys.pendingSandbox(sb.id) },
      { type: "deletePrefix", prefix: keys.ifnamesOf(sb.id) },
      { type: "deletePrefix", prefix: keys.membersOf(sb.id) },
      { type: "delete", key: keys.joins(sb.id) },
    ];
    if (await whileAbsent(store, name, [], ops)) n++;
  }
  return n;
}

/** Delete the host's local networks with every row they own. */
async function removeLocalNetworks(store: Store, name: string, networks: readonly Network[]): Promise<number> {
  let n = 0;
  for (const net of networks) {
    const ops: Op[] = [
      { type: "delete", key: keys.network(net.id) },
      { type: "delete", key: keys.networkName(net.name, name) },
      { type: "deletePrefix", prefix: keys.ipamPrefix(net.id) },
      { type: "deletePrefix", prefix: keys.cursorPrefix(net.id) },
      { type: "deletePrefix", prefix: keys.endpointsOf(net.id) },
      { type: "deletePrefix", prefix: keys.pendingEndpointsOf(net.id) },
      { type: "delete", key: keys.pendingNetwork(net.id) },
      { type: "put", key: keys.networksMeta(), value: `-${net.id}` },
    ];
    if (await whileAbsent(store, name, [], ops)) n++;
  }
  return n;
}

/** The Docker plugin's rows for the host: its sandboxes, endpoints, network links, local pools. */
async function removeDockerRows(store: Store, name: string): Promise<void> {
  const ops: Op[] = [{ type: "deletePrefix", prefix: dockerKeys.sandboxesOf(name) }];
  for (const kv of (await store.list(dockerKeys.endpoints())).items) {
    if ((JSON.parse(kv.value) as DockerEndpoint).host === name) ops.push({ type: "delete", key: kv.key });
  }
  for (const kv of (await store.list(dockerKeys.networks())).items) {
    const link = JSON.parse(kv.value) as DockerNetworkLink;
    const net = await getJson<Network>(store, keys.network(link.network));
    if (link.host === name && (!net || net.host === name)) ops.push({ type: "delete", key: kv.key });
  }
  for (const kv of (await store.list(dockerKeys.pools())).items) {
    const pool = JSON.parse(kv.value) as DockerPool;
    if (pool.host !== name) continue;
    ops.push({ type: "delete", key: kv.key }, { type: "deletePrefix", prefix: dockerKeys.claimsOf(pool.id) }, { type: "put", key: dockerKeys.poolsMeta(), value: `-${pool.id}` });
  }
  // Small batches: etcd limits the operations of one transaction.
  for (let i = 0; i < ops.length; i += 64) await whileAbsent(store, name, [], ops.slice(i, i + 64));
}

/**
 * Remove host `name` from the cluster: refused for this host, for an unknown one, and for a
 * registered (alive) one unless `force`. See the file comment for what goes.
 */
export async function removeHost(engine: Engine, name: string, force: boolean): Promise<HostRemoval> {
  const store = engine.store;
  // names/global/ holds the cluster-wide names: no host can be called that.
  if (name === "" || name === "global" || name.includes("/")) throw invalid(`"${name}" is not a host name`, "list the hosts with: knit host ls");
  if (name === hostName()) {
    throw conflict(`host ${name} is this host: a host cannot remove itself`, `remove it from another host of the cluster (after stopping its knit agent): knit host rm ${name}`);
  }
  const found = await findHostRecords(engine, name);
  if (!known(found)) throw notFound(`host ${name} is not in the cluster`, "list the hosts with: knit host ls");
  const evicted = found.registration !== undefined;
  if (found.registration) {
    if (!force) {
      throw conflict(`host ${name} is not down and cannot be removed: its knit agent still renews its registration`, `stop its agent (it is down once its lease of ${found.registration.record.ttl} s ran out, see knit host ls), or remove it anyway: knit host rm -f ${name}`);
    }
    await evict(store, name, found.registration);
  }
  const endpoints = (await reapHost(store, name)).length;
  const sandboxes = await removeSandboxes(store, name, found.sandboxes);
  const networks = await removeLocalNetworks(store, name, found.networks);
  for (const net of found.orphanedGlobal) {
    const current = await getJson<Network>(store, keys.network(net.id));
    if (current) await finishNetworkRemoval(engine, current);
  }
  await removeDockerRows(store, name);
  await whileAbsent(store, name, [], [
    { type: "deletePrefix", prefix: keys.portsOf(name) },
    { type: "put", key: keys.portsMeta(), value: `-${name}` },
    { type: "deletePrefix", prefix: `names/${name}/` },
    { type: "delete", key: keys.agent(name) },
  ]);
  // Endpoints that appeared meanwhile (a connect that was under way on the host) go too.
  const late = await reapHost(store, name);
  const left = await findHostRecords(engine, name);
  if (left.registration) throw conflict(`host ${name} registered again while it was being removed`, `stop its knit agent first, then run knit host rm ${name} again`);
  if (known(left)) throw new KnitError("store", `host ${name} was removed only in part: records of it were added meanwhile`, { hint: `run knit host rm ${name} again` });
  return { name, evicted, endpoints: endpoints + late.length, sandboxes, networks };
}

/** The eviction mark of `name`, if `knit host rm -f` removed it while it was registered. */
export const evictionOf = (store: Store, name: string): Promise<string | undefined> => store.get(keys.evicted(name)).then((kv) => kv?.value);

/** Forget the eviction mark (an agent starting again joins again). True when there was one. */
export const clearEviction = (store: Store, name: string): Promise<boolean> => store.delete(keys.evicted(name));

