/**
 * Network lifecycle: create, remove, prune, the predefined networks, and the firewall that
 * is rebuilt from the store after every change.
 *
 * Create records intent first (network row in state "creating" with its owner, name claim,
 * gateway and aux reservations, all in one transaction guarded by the version of
 * meta/networks so that two concurrent creates cannot both pass the overlap check), then
 * makes kernel objects, then marks the row ready. A crash in between is repaired by reconcile.
 */
import { KnitError, conflict, invalid, runAll } from "../errors.ts";
import { absent, getJson, listJson, putJson, type Compare, type Op } from "../store/store.ts";
import { DockerLabels, keys, type DriverName, type Network } from "../model.ts";
import { driverFor, drivers } from "../drivers/registry.ts";
import { BridgeOptions } from "../drivers/bridge.ts";
import { toPool, reservedAddresses } from "../ipam/ipam.ts";
import { pickV4Pool, pickV6Pool } from "../ipam/pools.ts";
import { cidrOverlaps, parseCidr, type Cidr } from "../net/ip.ts";
import { listRoutes } from "../kernel/ip.ts";
import { applyFirewall, removeFirewall, type BridgeNetworkRules } from "../firewall/firewall.ts";
import { buildSubnetConfigs, parseAuxAddresses, poolConfig } from "./network-spec.ts";
import { checkName, getNetwork, listNetworks, networkNameKey, newId, retryTxn, type Engine } from "./engine.ts";
import { abandoned, currentOwner, hostName, ownerAlive } from "./owner.ts";
import { faultPoint } from "./faults.ts";
import { repairNetworkEndpoints } from "./endpoints.ts";
import { repairSandboxes } from "./sandboxes.ts";
import { firewallPorts } from "../ports/publish.ts";
import { planVni, releaseVniOps } from "../cluster/vni.ts";

export interface CreateNetworkRequest {
  name: string;
  driver?: string;
  subnets?: readonly string[];
  gateways?: readonly string[];
  ipRanges?: readonly string[];
  /** `name=ip` items, as --aux-address takes them. */
  auxAddresses?: readonly string[];
  options?: Readonly<Record<string, string>>;
  labels?: Readonly<Record<string, string>>;
  internal?: boolean;
  ipv6?: boolean;
  attachable?: boolean;
  /** The network's id, when a front end brings one (the Docker plugin uses Docker's); else a new one. */
  id?: string;
}

export const PREDEFINED = ["bridge", "host", "none"] as const;
const PREDEFINED_DRIVER: Record<(typeof PREDEFINED)[number], DriverName> = { bridge: "bridge", host: "host", none: "null" };
/** Device name of the predefined bridge network (Docker's is docker0; knit coexists with it). */
export const DEFAULT_BRIDGE = "knit0";

/**
 * Subnets in use on this host that a new network must not overlap: other networks and routes
 * (except routes through `lanDevices`, the LAN the new network joins, as a macvlan parent).
 */
export async function takenSubnets(engine: Engine, lanDevices: readonly string[] = [], cluster?: { withRoutes: boolean }): Promise<{ cidr: Cidr; what: string }[]> {
  // A global (overlay) network spans hosts: no network of any host may overlap it. Its subnet
  // is never routed on a host (its bridges have no address), so the host's routes only
  // matter when a default pool is picked for it.
  const nets = cluster ? await listJson<Network>(engine.store, keys.networks()) : await listNetworks(engine);
  const bridges = new Set(nets.map((n) => String(n.driverState.bridge ?? "")));
  const out = nets.flatMap((n) => n.subnets.map((s) => ({ cidr: parseCidr(s.subnet), what: `network "${n.name}"${n.host && cluster ? ` of host ${n.host}` : ""} (${s.subnet})` })));
  if (cluster && !cluster.withRoutes) return out;
  for (const r of await listRoutes()) {
    if (r.dst === "default" || !r.dst || (r.dev && (bridges.has(r.dev) || lanDevices.includes(r.dev)))) continue;
    const dst = r.dst.includes("/") ? r.dst : r.dst.includes(":") ? `${r.dst}/128` : `${r.dst}/32`;
    let cidr: Cidr;
    try {
      cidr = parseCidr(dst, "route", false);
    } catch {
      continue;
    }
    // Link-local and multicast routes exist on every IPv6 link; they are not networks.
    if (cidr.family === 6 && (cidr.base >> 118n === 0x3fan || cidr.base >> 120n === 0xffn)) continue;
    out.push({ cidr, what: `a route on this host (${r.dst}${r.dev ? ` dev ${r.dev}` : ""})` });
  }
  return out;
}

/** Build the network record (not yet stored). Validates everything; touches nothing. */
async function draftNetwork(engine: Engine, req: CreateNetworkRequest, predefined = false): Promise<Network> {
  const name = checkName(req.name, "network");
  const driver = driverFor(req.driver ?? "bridge");
  if (!driver.userNetworks && !predefined) {
    throw conflict(`only one instance of "${driver.name}" network is allowed`, `use the predefined "${driver.name === "null" ? "none" : "host"}" network`);
  }
  const ipv6 = req.ipv6 ?? false;
  const id = req.id ?? newId();
  if (!/^[0-9a-f]{64}$/.test(id)) throw invalid(`invalid network id "${id}": expected 64 hex digits`);
  const options = { ...(req.options ?? {}) };
  const driverState = driver.prepare({ id, name, options, ipv6, internal: req.internal ?? false });
  const explicit = buildSubnetConfigs({
    subnets: req.subnets ?? [],
    gateways: req.gateways ?? [],
    ipRanges: req.ipRanges ?? [],
    auxAddresses: parseAuxAddresses(req.auxAddresses ?? []),
    ipv6,
  });
  const subnets = [...explicit];
  if (driver.addressed) {
    const cluster = driver.scope === "global" ? { withRoutes: explicit.length === 0 } : undefined;
    const taken = await takenSubnets(engine, driver.lanDevices?.(driverState) ?? [], cluster);
    for (const s of explicit) {
      const c = parseCidr(s.subnet);
      const clash = taken.find((t) => cidrOverlaps(t.cidr, c));
      if (clash) throw conflict(`subnet ${s.subnet} overlaps ${clash.what}`, "choose a --subnet that overlaps no other network or route");
    }
    const takenCidrs = [...taken.map((t) => t.cidr), ...explicit.map((s) => parseCidr(s.subnet))];
    if (!explicit.some((s) => parseCidr(s.subnet).family === 4)) subnets.unshift(poolConfig(pickV4Pool(takenCidrs)));
    if (ipv6 && !explicit.some((s) => parseCidr(s.subnet).family === 6)) subnets.push(poolConfig(pickV6Pool(takenCidrs)));
  } else if (explicit.length > 0) {
    throw invalid(`the ${driver.name} driver takes no subnets`);
  }
  return {
    id,
    ...(driver.scope === "local" ? { host: hostName() } : {}),
    state: "creating",
    owner: currentOwner(),
    name,
    driver: driver.name,
    scope: driver.scope,
    created: new Date().toISOString(),
    internal: req.internal ?? false,
    attachable: req.attachable ?? false,
    enableIPv6: ipv6,
    predefined,
    defaultPool: explicit.length === 0,
    subnets,
    options,
    labels: { ...(req.labels ?? {}) },
    driverState,
  };
}

/** Record a drafted network with its name claim and reservations, optimistically. */
async function recordNetwork(engine: Engine, net: Network, metaVersion: number, claims: { compares: Compare[]; ops: Op[] } = { compares: [], ops: [] }): Promise<boolean> {
  const ops: Op[] = [
    ...claims.ops,
    putJson(keys.network(net.id), net),
    { type: "put", key: networkNameKey(net), value: net.id },
    { type: "put", key: keys.networksMeta(), value: net.id },
    putJson(keys.pendingNetwork(net.id), net.owner),
    ...reservedAddresses(net.subnets.map(toPool)).map((r): Op => ({ type: "put", key: keys.ipam(net.id, r.address), value: r.holder })),
  ];
  const res = await engine.store.txn([absent(networkNameKey(net)), { key: keys.networksMeta(), target: "version", op: "=", value: metaVersion }, ...claims.compares], ops);
  return res.succeeded;
}

/** Delete every row of a network (record, name, reservations, cursors, pending marker). */
async function deleteNetworkRows(engine: Engine, net: Network): Promise<void> {
  await engine.store.txn(
    [],
    [
      { type: "delete", key: keys.network(net.id) },
      { type: "delete", key: networkNameKey(net) },
      { type: "deletePrefix", prefix: keys.ipamPrefix(net.id) },
      { type: "deletePrefix", prefix: keys.cursorPrefix(net.id) },
      { type: "delete", key: keys.pendingNetwork(net.id) },
      { type: "put", key: keys.networksMeta(), value: `-${net.id}` },
      ...releaseVniOps(net),
    ],
  );
}

/** Create a network; returns its record. On any failure nothing is left behind. */
export async function createNetwork(engine: Engine, req: CreateNetworkRequest): Promise<Network> {
  // A create or rm that crashed must not hold the name or the subnet: finish it first.
  await repairNetworks(engine).catch(() => undefined);
  const net = await retryTxn("network create", async () => {
    const meta = await engine.store.get(keys.networksMeta());
    for (const key of [keys.networkName(req.name, hostName()), keys.networkName(req.name, undefined)]) {
      if (await engine.store.get(key)) throw conflict(`network with name ${req.name} already exists`);
    }
    const draft = await draftNetwork(engine, req);
    const driver = drivers[draft.driver];
    const learnt = await driver.precheck(draft, await listNetworks(engine));
    if (learnt) Object.assign(draft.driverState, learnt);
    // An overlay network claims its VXLAN id in the same transaction (src/cluster/vni.ts).
    const vni = draft.driver === "overlay" ? await planVni(engine.store, draft) : undefined;
    if (vni) draft.driverState.vni = vni.vni;
    return (await recordNetwork(engine, draft, meta?.version ?? 0, vni)) ? draft : undefined;
  });
  try {
    faultPoint("network-create:after-store");
    await drivers[net.driver].ensureNetwork(net, net.subnets.map(toPool));
    faultPoint("network-create:after-kernel");
    await syncFirewall(engine, net.id);
    const ready: Network = { ...net, state: "ready" };
    delete ready.owner;
    await engine.store.txn([], [putJson(keys.network(net.id), ready), { type: "delete", key: keys.pendingNetwork(net.id) }]);
    return ready;
  } catch (err) {
    await runAll("undo network create", [
      async () => drivers[net.driver].deleteNetwork(net, await remainingNetworks(engine, net)),
      () => deleteNetworkRows(engine, net),
      () => syncFirewall(engine),
    ]).catch(() => undefined);
    throw err;
  }
}

/** The host's networks other than `net` that are not being removed (they keep shared objects). */
async function remainingNetworks(engine: Engine, net: Network): Promise<Network[]> {
  return (await listNetworks(engine)).filter((n) => n.id !== net.id && n.state !== "deleting");
}

/** Endpoints of a network (any state). */
export async function networkEndpointCount(engine: Engine, netId: string): Promise<number> {
  return (await engine.store.list(keys.endpointsOf(netId))).items.length;
}

/** Whether a network has endpoints (any state); reads one key at most. */
export async function networkHasEndpoints(engine: Engine, netId: string): Promise<boolean> {
  return (await engine.store.list(keys.endpointsOf(netId), { limit: 1 })).items.length > 0;
}

/** Remove a network: refused while endpoints exist and for predefined networks. */
export async function removeNetwork(engine: Engine, ref: string, opts: { byDocker?: boolean } = {}): Promise<Network> {
  const net = await getNetwork(engine, ref);
  if (net.predefined) throw conflict(`${net.name} is a pre-defined network and cannot be removed`);
  // A network Docker made through knit's plugin is Docker's to remove (prune skips it too).
  if (net.labels[DockerLabels.network] && !opts.byDocker) throw conflict(`network ${net.name} belongs to Docker`, `remove it with: docker network rm ${net.name}`);
  // Sandboxes whose run or rm crashed may still hold endpoints here (best effort: what is
  // left still counts below).
  await repairSandboxes(engine).catch(() => undefined);
  await repairNetworkEndpoints(engine, net.id);
  if (await networkHasEndpoints(engine, net.id)) {
    const count = await networkEndpointCount(engine, net.id);
    throw conflict(`error while removing network: network ${net.name} id ${net.id} has active endpoints (${count})`, `disconnect them first: knit network disconnect ${net.name} SANDBOX`);
  }
  // Mark first: a concurrent connect compares the network's revision and fails after this.
  const marked: Network = { ...net, state: "deleting", owner: currentOwner() };
  await engine.store.txn([], [putJson(keys.network(net.id), marked), putJson(keys.pendingNetwork(net.id), marked.owner)]);
  if (await networkHasEndpoints(engine, net.id)) {
    await engine.store.txn([], [putJson(keys.network(net.id), net), { type: "delete", key: keys.pendingNetwork(net.id) }]);
    throw conflict(`error while removing network: network ${net.name} id ${net.id} has active endpoints`);
  }
  await finishNetworkRemoval(engine, marked);
  return net;
}

/**
 * Give a network another name (the Docker plugin learns Docker's name only after the network
 * exists). Fails with a conflict when the name is taken; the id and everything else stay.
 */
export async function renameNetwork(engine: Engine, id: string, name: string): Promise<Network> {
  checkName(name, "network");
  return retryTxn("network rename", async () => {
    const kv = await engine.store.get(keys.network(id));
    if (!kv) throw conflict(`network ${id.slice(0, 12)} does not exist`);
    const net = JSON.parse(kv.value) as Network;
    if (net.name === name) return net;
    const renamed: Network = { ...net, name };
    if (await engine.store.get(networkNameKey(renamed))) throw conflict(`network with name ${name} already exists`);
    const res = await engine.store.txn(
      [{ key: kv.key, target: "modRevision", op: "=", value: kv.modRevision }, absent(networkNameKey(renamed))],
      [putJson(kv.key, renamed), { type: "delete", key: networkNameKey(net) }, { type: "put", key: networkNameKey(renamed), value: id }],
    );
    return res.succeeded ? renamed : undefined;
  });
}

/**
 * Second half of removal, also used by reconcile for a crashed rm or create. A marked
 * removal is always finished: every step runs even when one fails (a bridge that could not
 * be deleted keeps its `knit:` alias, and reconcile deletes it as an orphan).
 */
export async function finishNetworkRemoval(engine: Engine, net: Network): Promise<void> {
  await runAll(`remove network ${net.name}`, [
    async () => faultPoint("network-rm:after-mark"),
    // The firewall is rebuilt while the kernel deletes the devices: the network is marked
    // deleting, so the rebuild leaves it out already, and both wait for RCU grace periods in
    // the kernel (bridge deletion 35-45 ms, nft's close after a delete ~20 ms) that overlap.
    async () => {
      const remaining = await remainingNetworks(engine, net);
      const [kernel, firewall] = await Promise.allSettled([drivers[net.driver].deleteNetwork(net, remaining), syncFirewall(engine)]);
      if (kernel.status === "rejected") throw kernel.reason;
      if (firewall.status === "rejected") throw firewall.reason;
    },
    async () => faultPoint("network-rm:after-kernel"),
    () => deleteNetworkRows(engine, net),
  ]);
}

/** Finish the creates and removals of networks whose process died; returns how many. */
export async function repairNetworks(engine: Engine): Promise<number> {
  let n = 0;
  for (const kv of (await engine.store.list(keys.pendingNetworks())).items) {
    if (!(await abandoned(engine.store, kv))) continue;
    const net = await getJson<Network>(engine.store, keys.network(kv.key.slice(keys.pendingNetworks().length)));
    if (net) await finishNetworkRemoval(engine, net);
    else await engine.store.delete(kv.key);
    n++;
  }
  return n;
}

/** Remove every user network without endpoints; returns the names removed. */
export async function pruneNetworks(engine: Engine, labelFilter?: (n: Network) => boolean): Promise<string[]> {
  const removed: string[] = [];
  for (const net of await listNetworks(engine)) {
    if (net.predefined || net.state !== "ready" || (labelFilter && !labelFilter(net))) continue;
    if (await networkHasEndpoints(engine, net.id)) continue;
    try {
      await removeNetwork(engine, net.id);
      removed.push(net.name);
    } catch (err) {
      if (!(err instanceof KnitError && err.code === "conflict")) throw err;
    }
  }
  return removed;
}

/**
 * Rebuild knit's firewall tables from the store (networks and their published ports).
 * Lock-free: after applying, the versions of meta/networks and meta/ports are read again; if
 * another process changed networks or ports meanwhile, apply again (a full rebuild), so the
 * last writer always applies the newest state. `added`: the network this process just
 * created, whose rules the first apply may add in place instead of rebuilding the table.
 */
export async function syncFirewall(engine: Engine, added?: string): Promise<void> {
  const version = async (): Promise<string> =>
    `${(await engine.store.get(keys.networksMeta()))?.modRevision ?? 0}/${(await engine.store.get(keys.portsMeta()))?.modRevision ?? 0}`;
  for (let i = 0; i < 16; i++) {
    const before = await version();
    const nets = await listNetworks(engine);
    const ports = await firewallPorts(engine);
    const rules = nets
      .filter((n) => n.state !== "deleting" && (n.state === "ready" || ownerAlive(n.owner)))
      .flatMap((n): BridgeNetworkRules[] => {
        if (n.predefined && n.driver === "bridge" && !n.driverState.kernelCreated) return [];
        const r = drivers[n.driver].firewall(n);
        const published = ports.get(n.id);
        return r ? [published?.length ? { ...r, ports: published } : r] : [];
      });
    // In place only while no other network is half made or half removed: then the table in
    // the kernel is the one built for the other networks, which the short script assumes.
    const settled = i === 0 && added !== undefined && nets.every((n) => n.id === added || n.state === "ready");
    if (rules.length === 0) await removeFirewall();
    else await applyFirewall(rules, undefined, settled ? { added } : {});
    if ((await version()) === before) return;
  }
}

/**
 * Make sure the predefined networks exist in the store (first command on a host). The
 * predefined bridge gets its kernel objects on first use, as docker0 appears with dockerd.
 */
export async function ensurePredefined(engine: Engine): Promise<void> {
  const me = hostName();
  if (await engine.store.get(keys.networkName("none", me))) return;
  for (const name of PREDEFINED) {
    if (await engine.store.get(keys.networkName(name, me))) continue;
    const meta = await engine.store.get(keys.networksMeta());
    const req: CreateNetworkRequest =
      name === "bridge"
        ? { name, driver: "bridge", options: { [BridgeOptions.name]: DEFAULT_BRIDGE, [BridgeOptions.defaultBridge]: "true" } }
        : { name, driver: PREDEFINED_DRIVER[name] };
    const draft = await draftNetwork(engine, req, true);
    const ready: Network = { ...draft, state: "ready" };
    delete ready.owner;
    if (name === "bridge") ready.driverState.kernelCreated = false;
    // Not via recordNetwork: no pending marker, the record is ready at once.
    const ops: Op[] = [putJson(keys.network(ready.id), ready), { type: "put", key: keys.networkName(name, me), value: ready.id }, { type: "put", key: keys.networksMeta(), value: ready.id }];
    ops.push(...reservedAddresses(ready.subnets.map(toPool)).map((r): Op => ({ type: "put", key: keys.ipam(ready.id, r.address), value: r.holder })));
    await engine.store.txn([absent(keys.networkName(name, me)), { key: keys.networksMeta(), target: "version", op: "=", value: meta?.version ?? 0 }], ops);
  }
}

/** Create the predefined bridge's kernel objects the first time something joins it. */
export async function ensureDefaultBridgeKernel(engine: Engine, net: Network): Promise<Network> {
  if (!net.predefined || net.driver !== "bridge" || net.driverState.kernelCreated) return net;
  await drivers.bridge.ensureNetwork(net, net.subnets.map(toPool));
  const updated: Network = { ...net, driverState: { ...net.driverState, kernelCreated: true } };
  await engine.store.txn([], [putJson(keys.network(net.id), updated), { type: "put", key: keys.networksMeta(), value: net.id }]);
  await syncFirewall(engine);
  return updated;
}
