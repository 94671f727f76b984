/**
 * Endpoints: a sandbox joining (connect) or leaving (disconnect) a network.
 *
 * Connect claims everything in one transaction before touching the kernel: the addresses
 * (`ipam/<net>/<addr>` created only if absent), the interface name inside the sandbox, the
 * membership (a sandbox joins a network once), the endpoint row in state "creating", and a
 * pending marker naming this process. Then the driver wires the kernel, and a second
 * transaction marks the endpoint ready. If the process dies in between, the pending marker
 * names a dead owner and the next command on that network (or `knit gc`) undoes the rest.
 */
import { KnitError, conflict, invalid, runAll } from "../errors.ts";
import { absent, getJson, listJson, putJson, type Compare, type Op } from "../store/store.ts";
import { keys, type Endpoint, type Membership, type Network, type Sandbox } from "../model.ts";
import { drivers } from "../drivers/registry.ts";
import { candidates, checkStaticAddress, toPool, type Pool } from "../ipam/ipam.ts";
import { formatIp, parseIp, type Ip } from "../net/ip.ts";
import type { Netns } from "../kernel/exec.ts";
import { listLinks } from "../kernel/ip.ts";
import { getNetwork, newId, type Engine } from "./engine.ts";
import { abandoned, currentOwner, hostName } from "./owner.ts";
import { faultPoint } from "./faults.ts";
import { ensureDefaultBridgeKernel, syncFirewall } from "./networks.ts";
import { flushUdpFlows, hairpinPortEndpoints } from "../ports/publish.ts";
import { attachOverlay, ensureOverlayHost, joinGwBridge, leaveGwBridgeIfUnused, needsGateway, prepareOverlayJoin } from "../cluster/attach.ts";
import { requireLocalHost } from "../cluster/hosts.ts";
import { ensureOverlayDnsHost, internalOverlay, routeSandboxDns } from "../cluster/overlay-dns.ts";

export interface ConnectOptions {
  ip?: string;
  ip6?: string;
  aliases?: readonly string[];
  /** Interface name inside the sandbox (CNI gives one); else prefix + lowest free number. */
  ifname?: string;
  mac?: string;
  /** Joining while the sandbox is created (`knit run`): the only time host and none may be joined. */
  atCreate?: boolean;
  /**
   * Claim addresses only: another program (a CNI plugin using knit's IPAM) makes the
   * interface, so the driver wires nothing. The sandbox has no namespace of knit's (netnsPath "").
   */
  addressOnly?: boolean;
  /** The endpoint's id, when a front end brings one (the Docker plugin uses Docker's); else a new one. */
  id?: string;
  /**
   * For a runtime that moves the interface into the sandbox and configures it itself (Docker's
   * Join, src/plugin): the driver makes it in this namespace, under `ifname`, with the
   * endpoint's MAC but without addresses or routes. The claims are the sandbox's, as usual.
   */
  handoff?: Netns;
  /**
   * With a static `ip`/`ip6`: an address claim holding this value was made for this endpoint
   * beforehand (by knit's IPAM driver for Docker); the endpoint takes it over.
   */
  adoptClaim?: string;
}

/** Docker-style MAC: 02:42 followed by the IPv4 address, else random locally administered. */
export function macFor(ipv4: Ip | undefined): string {
  const tail = ipv4 ? [24n, 16n, 8n, 0n].map((s) => Number((ipv4.value >> s) & 255n)) : [...crypto.getRandomValues(new Uint8Array(4))];
  return ["02", "42", ...tail.map((b) => b.toString(16).padStart(2, "0"))].join(":");
}

const firstPool = (pools: readonly Pool[], family: 4 | 6): Pool | undefined => pools.find((p) => p.subnet.family === family);

interface Claim {
  pool: Pool;
  ip: Ip;
  fixed: boolean;
}

/** An iterator over the addresses to try in one family. */
async function addressSource(engine: Engine, net: Network, pools: readonly Pool[], family: 4 | 6, requested: string | undefined, flag: string) {
  if (requested) {
    const { pool, ip } = checkStaticAddress(pools, requested, flag);
    if (ip.family !== family) throw invalid(`invalid ${flag} ${requested}: expected an IPv${family} address`);
    return { pool, gen: [ip][Symbol.iterator](), fixed: true };
  }
  const pool = firstPool(pools, family);
  if (!pool) return undefined;
  const cursor = await engine.store.get(keys.cursor(net.id, family));
  return { pool, gen: candidates(pool, cursor ? parseIp(cursor.value).value : undefined), fixed: false };
}

function nextClaim(src: { pool: Pool; gen: Iterator<Ip>; fixed: boolean } | undefined, net: Network): Claim | undefined {
  if (!src) return undefined;
  const n = src.gen.next();
  if (n.done) throw new KnitError("conflict", `no available IPv${src.pool.subnet.family} addresses on network ${net.name}`, { hint: "remove unused sandboxes or use a larger --subnet" });
  return { pool: src.pool, ip: n.value, fixed: src.fixed };
}

async function pickIfname(engine: Engine, sb: Sandbox, prefix: string, taken: Set<string>): Promise<string> {
  const used = new Set([...(await engine.store.list(keys.ifnamesOf(sb.id))).items.map((kv) => kv.key.slice(keys.ifnamesOf(sb.id).length)), ...taken]);
  for (let i = 0; ; i++) if (!used.has(`${prefix}${i}`)) return `${prefix}${i}`;
}

/** Rows an endpoint owns, as delete ops. */
export function endpointRowDeletes(ep: Endpoint, sb: { id: string }): Op[] {
  const ops: Op[] = [
    { type: "delete", key: keys.endpoint(ep.networkId, ep.id) },
    { type: "delete", key: keys.ifname(sb.id, ep.ifname) },
    { type: "delete", key: keys.member(sb.id, ep.networkId) },
    { type: "delete", key: keys.pendingEndpoint(ep.networkId, ep.id) },
  ];
  for (const a of [ep.ipv4, ep.ipv6]) if (a) ops.push({ type: "delete", key: keys.ipam(ep.networkId, a.split("/")[0] ?? a) });
  return ops;
}

/** The namespace an endpoint lives in, or undefined for host-mode sandboxes. */
export function sandboxNetns(sb: Sandbox): Netns | undefined {
  return sb.netnsPath && sb.netnsPath !== "host" ? { path: sb.netnsPath } : undefined;
}

/**
 * Join a sandbox to a network. Claims, wires, marks ready; on any failure undoes it all,
 * including the record of an external sandbox that was made for this connect.
 */
export async function connectSandbox(engine: Engine, netRef: string, sb: Sandbox, opts: ConnectOptions = {}): Promise<Endpoint> {
  try {
    return await joinNetwork(engine, netRef, sb, opts);
  } catch (err) {
    await dropExternalIfUnused(engine, sb).catch(() => undefined);
    throw err;
  }
}

async function joinNetwork(engine: Engine, netRef: string, sb: Sandbox, opts: ConnectOptions): Promise<Endpoint> {
  let net = await getNetwork(engine, netRef);
  const driver = drivers[net.driver];
  if (net.state !== "ready") throw conflict(`network ${net.name} is being ${net.state === "creating" ? "created" : "removed"}`, "try again in a moment");
  if (!driver.userNetworks && !opts.atCreate) {
    throw conflict(`sandbox ${sb.name} cannot be connected to the ${net.name} network`, `the ${net.name} network is joined only when a sandbox is created: knit run --network ${net.name} ...`);
  }
  const netns = sandboxNetns(sb);
  if (!netns && net.driver !== "host" && !opts.addressOnly) throw conflict(`sandbox ${sb.name} shares the host's network stack and cannot join network ${net.name}`);
  if (net.predefined && (opts.ip || opts.ip6)) throw invalid("user specified IP address is supported on user defined networks only");
  if (net.predefined && opts.aliases?.length) throw invalid("network-scoped alias is supported only for containers in user defined networks");
  if (opts.ip6 && !net.enableIPv6) throw invalid(`invalid --ip6 ${opts.ip6}: network ${net.name} has no IPv6`, "create the network with --ipv6");
  for (const a of opts.aliases ?? []) if (!/^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,252}$/.test(a)) throw invalid(`invalid alias "${a}"`);
  // Not dropping sb's own record: a crashed connect of this same sandbox is repaired here.
  await repairNetworkEndpoints(engine, net.id, sb.id);
  net = await ensureDefaultBridgeKernel(engine, net);
  // Overlay: this host must be a live cluster member (src/cluster/attach.ts).
  const clusterHost = net.driver === "overlay" ? await prepareOverlayJoin(engine, net) : undefined;
  const me = hostName();

  const pools = net.subnets.map(toPool);
  const owner = currentOwner();
  const prefix = typeof net.driverState.ifacePrefix === "string" ? net.driverState.ifacePrefix : "eth";
  const src4 = await addressSource(engine, net, pools, 4, opts.ip, "--ip");
  const src6 = net.enableIPv6 ? await addressSource(engine, net, pools, 6, opts.ip6, "--ip6") : undefined;
  const recordOnly = !driver.addressed;
  let c4 = recordOnly ? undefined : nextClaim(src4, net);
  let c6 = recordOnly ? undefined : nextClaim(src6, net);
  const avoid = new Set<string>();
  // A container or `ip netns` namespace may hold interfaces knit did not make (Docker's
  // eth0): the name picked must be free in the namespace itself, not only in the store.
  if (netns && sb.kind !== "knit" && !recordOnly && !opts.ifname) for (const l of await listLinks(netns)) avoid.add(l.ifname);
  // Record-only endpoints (host, none) have no interface: they claim no interface name.
  const NO_IFNAME = "";
  let ifname = recordOnly ? NO_IFNAME : (opts.ifname ?? (await pickIfname(engine, sb, prefix, avoid)));
  const id = opts.id ?? newId();
  // The revision the claim is guarded by must be that of a record still "ready": a network
  // marked for removal since getNetwork() above must not get new endpoints.
  const netKv = await engine.store.get(keys.network(net.id));
  if (!netKv || (JSON.parse(netKv.value) as Network).state !== "ready") throw conflict(`network ${net.name} is being removed`);
  let netRevision = netKv.modRevision;

  let endpoint: Endpoint | undefined;
  for (let attempt = 0; attempt < 100000 && !endpoint; attempt++) {
    const ep: Endpoint = {
      id,
      networkId: net.id,
      sandboxId: sb.id,
      state: "creating",
      owner,
      ifname,
      mac: opts.mac ?? macFor(c4?.ip),
      aliases: [...(opts.aliases ?? [])],
      created: new Date().toISOString(),
      host: me,
    };
    if (c4) ep.ipv4 = `${formatIp(c4.ip)}/${c4.pool.subnet.prefix}`;
    if (c6) ep.ipv6 = `${formatIp(c6.ip)}/${c6.pool.subnet.prefix}`;
    const hostIfname = driver.hostIfname(id);
    if (hostIfname) ep.hostIfname = hostIfname;
    const member: Membership = { endpointId: id, networkId: net.id, ifname };
    // The network must not change (be marked for removal) while we claim.
    const compares: Compare[] = [
      { key: keys.network(net.id), target: "modRevision", op: "=", value: netRevision },
      // ...nor the sandbox be forgotten (an external one, by a repair in another process).
      { key: keys.sandbox(sb.id), target: "version", op: ">", value: 0 },
      absent(keys.member(sb.id, net.id)),
      ...(recordOnly ? [] : [absent(keys.ifname(sb.id, ifname))]),
      // ...nor may an overlay endpoint outlive its host's membership (a vanished host's
      // endpoints are freed by the others, src/cluster/reap.ts).
      ...(clusterHost ? [{ key: keys.host(me), target: "version", op: ">", value: 0 } as const] : []),
    ];
    const ops: Op[] = [
      putJson(keys.endpoint(net.id, id), ep),
      putJson(keys.pendingEndpoint(net.id, id), owner),
      putJson(keys.member(sb.id, net.id), member),
      // Every join bumps this key, so forgetting an external sandbox can tell it lost a race.
      { type: "put", key: keys.joins(sb.id), value: id },
      ...(recordOnly ? [] : [{ type: "put", key: keys.ifname(sb.id, ifname), value: id } as const]),
    ];
    for (const c of [c4, c6]) {
      if (!c) continue;
      const a = formatIp(c.ip);
      const adopt = c.fixed && opts.adoptClaim !== undefined && (await engine.store.get(keys.ipam(net.id, a)))?.value === opts.adoptClaim;
      compares.push(adopt ? { key: keys.ipam(net.id, a), target: "value", op: "=", value: opts.adoptClaim ?? "" } : absent(keys.ipam(net.id, a)));
      ops.push({ type: "put", key: keys.ipam(net.id, a), value: id });
      if (!c.fixed) ops.push({ type: "put", key: keys.cursor(net.id, c.ip.family), value: a });
    }
    if ((await engine.store.txn(compares, ops)).succeeded) {
      endpoint = ep;
      break;
    }
    // Find out which claim lost and move just that one on.
    const current = await engine.store.get(keys.network(net.id));
    if (!current || (JSON.parse(current.value) as Network).state !== "ready") throw conflict(`network ${net.name} is being removed`);
    netRevision = current.modRevision;
    if (!(await engine.store.get(keys.sandbox(sb.id)))) throw conflict(`sandbox ${sb.name} was removed while it was being connected`, "try again");
    if (clusterHost && !(await engine.store.get(keys.host(me)))) await requireLocalHost(engine);
    if (await engine.store.get(keys.member(sb.id, net.id))) throw conflict(`endpoint with name ${sb.name} already exists in network ${net.name}`);
    if (await engine.store.get(keys.ifname(sb.id, ifname))) {
      if (opts.ifname) throw conflict(`sandbox ${sb.name} already has an interface named ${ifname}`);
      avoid.add(ifname);
      ifname = await pickIfname(engine, sb, prefix, avoid);
    }
    for (const [c, src, flag] of [[c4, src4, "--ip"], [c6, src6, "--ip6"]] as const) {
      const held = c ? await engine.store.get(keys.ipam(net.id, formatIp(c.ip))) : undefined;
      if (!c || !held || (opts.adoptClaim !== undefined && held.value === opts.adoptClaim)) continue;
      if (c.fixed) throw conflict(`invalid ${flag} ${formatIp(c.ip)}: Address already in use on network ${net.name}`);
      if (c.ip.family === 4) c4 = nextClaim(src, net);
      else c6 = nextClaim(src, net);
    }
  }
  if (!endpoint) throw new KnitError("store", `could not claim an endpoint on ${net.name}`);

  try {
    faultPoint("connect:after-claim");
    if (netns && clusterHost) await ensureOverlayHost(engine, net, clusterHost);
    const handoff = opts.handoff;
    let wire: (() => Promise<void>) | undefined;
    if (handoff) {
      const bare: Endpoint = { ...endpoint };
      delete bare.ipv4;
      delete bare.ipv6;
      wire = () => driver.attach({ network: { ...net, internal: true }, pools, endpoint: bare, netns: handoff });
    } else if (netns) wire = () => driver.attach({ network: net, pools, endpoint, netns, peers: () => readyEndpointsHere(engine, net.id) });
    if (wire && netns && clusterHost) await attachOverlay(engine, net, clusterHost, endpoint, wire);
    else if (wire) await wire();
    // An internal overlay's sandbox asks knit's DNS on its host's bridge (src/cluster/overlay-dns.ts).
    // A handed-off device (Docker's) gets its route from Docker (Join's static routes).
    if (wire && netns && clusterHost && internalOverlay(net)) {
      await ensureOverlayDnsHost(net);
      if (!handoff) await routeSandboxDns(engine, sb, netns);
    }
    faultPoint("connect:after-kernel");
    const ready: Endpoint = { ...endpoint, state: "ready" };
    delete ready.owner;
    await engine.store.txn([], [putJson(keys.endpoint(net.id, endpoint.id), ready), { type: "delete", key: keys.pendingEndpoint(net.id, endpoint.id) }]);
    // An overlay endpoint's way out: a second interface on docker_gwbridge.
    if (netns && !opts.addressOnly && !opts.handoff && needsGateway(net)) await joinGwBridge(engine, sb, opts.atCreate ?? false);
    // A sandbox rejoining the network its ports are published on gets its rules back
    // (at run time, runSandbox publishes once all networks are joined).
    if (!opts.atCreate && sb.ports?.some((m) => m.networkId === net.id)) {
      await hairpinPortEndpoints([ready], sb.ports);
      await refreshPublishedPorts(engine, sb, net.id);
    }
    return ready;
  } catch (err) {
    await undoEndpoint(engine, net, endpoint, sb).catch(() => undefined);
    throw err;
  }
}

/** Remove an endpoint's kernel objects and rows; best effort, idempotent. */
async function undoEndpoint(engine: Engine, net: Network, ep: Endpoint, sb: { id: string; netnsPath?: string }): Promise<void> {
  await runAll(`remove endpoint ${ep.id.slice(0, 12)}`, [
    () => drivers[net.driver].detach(net, ep, sb.netnsPath ? { path: sb.netnsPath } : undefined),
    () => engine.store.txn([], endpointRowDeletes(ep, sb)),
  ]);
}

/** The endpoint of a sandbox on a network, if any. */
export async function findMembership(engine: Engine, sb: Sandbox, netId: string): Promise<Endpoint | undefined> {
  const m = await getJson<Membership>(engine.store, keys.member(sb.id, netId));
  return m ? getJson<Endpoint>(engine.store, keys.endpoint(netId, m.endpointId)) : undefined;
}

/**
 * Leave a network. Marks the endpoint "deleting" (with this process as owner), removes the
 * kernel objects, then the rows. A marked removal is always finished: every step runs even
 * when one fails, and the errors are reported together (with `force`, kernel errors are not).
 * Leaving the last overlay network also leaves docker_gwbridge, unless `cascade` is false
 * (the caller removes every endpoint of the sandbox itself).
 */
export async function disconnectSandbox(engine: Engine, netRef: string, sb: Sandbox, force = false, cascade = true): Promise<void> {
  const net = await getNetwork(engine, netRef);
  const ep = await findMembership(engine, sb, net.id);
  if (!ep) throw conflict(`sandbox ${sb.name} is not connected to network ${net.name}`);
  const owner = currentOwner();
  await engine.store.txn([], [putJson(keys.endpoint(net.id, ep.id), { ...ep, state: "deleting", owner }), putJson(keys.pendingEndpoint(net.id, ep.id), owner)]);
  await runAll(`disconnect ${sb.name} from network ${net.name}`, [
    // Published ports stop pointing at this endpoint before its address can be reused.
    () => refreshPublishedPorts(engine, sb, net.id),
    async () => faultPoint("disconnect:after-mark"),
    () =>
      drivers[net.driver].detach(net, ep, sandboxNetns(sb)).catch((err: unknown) => {
        if (!force) throw err;
      }),
    async () => faultPoint("disconnect:after-kernel"),
    () => engine.store.txn([], endpointRowDeletes(ep, sb)),
    async () => {
      if (cascade && needsGateway(net)) await leaveGwBridgeIfUnused(engine, sb);
    },
    async () => {
      // The route to knit's DNS may have gone with this interface: through another internal overlay.
      const ns = sandboxNetns(sb);
      if (cascade && ns && internalOverlay(net)) await routeSandboxDns(engine, sb, ns);
    },
    () => dropExternalIfUnused(engine, sb),
  ]);
}

/** An external sandbox (ip netns, container) is forgotten with its last endpoint. */
export async function dropExternalIfUnused(engine: Engine, sb: Sandbox): Promise<void> {
  if (sb.kind === "knit") return;
  // Read the join counter before the members: a connect that lands after the list changes
  // the counter, and the transaction below then does nothing.
  const joins = (await engine.store.get(keys.joins(sb.id)))?.modRevision ?? 0;
  const left = await engine.store.list(keys.membersOf(sb.id));
  if (left.items.length > 0) return;
  await engine.store.txn([{ key: keys.joins(sb.id), target: "modRevision", op: "=", value: joins }], [
    { type: "delete", key: keys.sandbox(sb.id) },
    { type: "delete", key: keys.sandboxName(sb.host, sb.name) },
    { type: "delete", key: keys.joins(sb.id) },
  ]);
}

/**
 * Undo the endpoints of a network whose operation was cut short (owner process dead): a
 * connect that never finished is rolled back, a disconnect that never finished completes.
 * External sandboxes left without endpoints are forgotten, except `keepSandbox` (the one
 * the caller is connecting).
 */
export async function repairNetworkEndpoints(engine: Engine, netId: string, keepSandbox?: string): Promise<number> {
  const pending = await engine.store.list(keys.pendingEndpointsOf(netId));
  let repaired = 0;
  for (const kv of pending.items) {
    if (!(await abandoned(engine.store, kv))) continue;
    const epId = kv.key.slice(keys.pendingEndpointsOf(netId).length);
    const net = await getJson<Network>(engine.store, keys.network(netId));
    const ep = await getJson<Endpoint>(engine.store, keys.endpoint(netId, epId));
    if (!net || !ep) {
      await engine.store.delete(kv.key);
      continue;
    }
    const sb = (await getJson<Sandbox>(engine.store, keys.sandbox(ep.sandboxId))) ?? { id: ep.sandboxId };
    await undoEndpoint(engine, net, ep, sb);
    if ("kind" in sb && sb.id !== keepSandbox) await dropExternalIfUnused(engine, sb);
    repaired++;
  }
  return repaired;
}

/** All endpoints of a network. */
export const listEndpoints = (engine: Engine, netId: string): Promise<Endpoint[]> => listJson<Endpoint>(engine.store, keys.endpointsOf(netId));

/** The ready endpoints of a network that live on this host. */
export async function readyEndpointsHere(engine: Engine, netId: string): Promise<Endpoint[]> {
  const me = hostName();
  return (await listEndpoints(engine, netId)).filter((e) => e.state === "ready" && (e.host === undefined || e.host === me));
}

/** All memberships of a sandbox. */
export const listMemberships = (engine: Engine, sbId: string): Promise<Membership[]> => listJson<Membership>(engine.store, keys.membersOf(sbId));

/**
 * Rebuild the firewall when a sandbox with ports published on this network joins or leaves
 * it (the rules follow the endpoint's state), and flush stale UDP flows.
 */
async function refreshPublishedPorts(engine: Engine, sb: Sandbox, netId: string): Promise<void> {
  const mappings = sb.ports?.filter((m) => m.networkId === netId) ?? [];
  if (mappings.length === 0) return;
  await engine.store.put(keys.portsMeta(), sb.id);
  await syncFirewall(engine);
  await flushUdpFlows(mappings);
}
