/**
 * Docker's remote IpamDriver: knit's address management for Docker networks
 * (`docker network create --ipam-driver knit`).
 *
 * Docker asks for a pool (RequestPool), its gateway and aux addresses (RequestAddress) before
 * it creates the network, and for each endpoint's address after. A pool is a store row
 * (records.ts); until a knit network hands out its addresses, the pool's own claims hold them
 * (`docker/claims/<pool>/<addr>`). Once CreateNetwork made the knit network (network-driver.ts
 * links the pool to it), endpoint addresses are claimed in the knit network's own IPAM
 * (`ipam/<net>/<addr>`, holder "docker-ipam"), so knit sandboxes and Docker containers on one
 * network never get the same address; the endpoint's Join takes the claim over.
 *
 * A requested pool must overlap no knit network and no other pool; with no pool requested, a
 * default one is picked as knit picks them (avoiding routes too). A pool equal to the subnet
 * of an existing global (overlay) network stands for that network: that is how a second
 * Docker host joins a knit overlay network.
 */
import { conflict, invalid, notFound, KnitError } from "../errors.ts";
import { absent, getJson, listJson, putJson } from "../store/store.ts";
import { keys, type Network } from "../model.ts";
import { listNetworks, newId, retryTxn, type Engine } from "../engine/engine.ts";
import { takenSubnets } from "../engine/networks.ts";
import { hostName } from "../engine/owner.ts";
import { candidates, checkStaticAddress, toPool, type Pool } from "../ipam/ipam.ts";
import { pickV4Pool, pickV6Pool } from "../ipam/pools.ts";
import { ensureGwBridge } from "../cluster/attach.ts";
import { parseBoolOption } from "../drivers/driver.ts";
import { cidrContains, cidrCovers, cidrOverlaps, formatCidr, formatIp, parseCidr, parseIp, type Cidr, type Ip } from "../net/ip.ts";
import { GATEWAY_REQUEST, REQUEST_ADDRESS_TYPE, type ReleaseAddressRequest, type RequestAddressRequest, type RequestPoolRequest } from "./protocol.ts";
import { dockerKeys, getPool, ipamHolder, type DockerPool } from "./records.ts";

/** `--ipam-opt knit.gateway=true`: the pool of knit's docker_gwbridge network (network-driver.ts). */
const GATEWAY_OPTION = "knit.gateway";

/** The address spaces of knit's IPAM driver. */
export const AddressSpaces = { local: "knit", global: "knit-global" } as const;

export class DockerIpamDriver {
  constructor(private readonly engine: Engine) {}

  getCapabilities(): object {
    // Pools and claims live in the store: nothing to replay when dockerd restarts.
    return { RequiresMACAddress: false, RequiresRequestReplay: false };
  }

  getDefaultAddressSpaces(): object {
    return { LocalDefaultAddressSpace: AddressSpaces.local, GlobalDefaultAddressSpace: AddressSpaces.global };
  }

  /** Subnets a new pool must not overlap: knit networks this host sees and knit IPAM's pools. */
  private async taken(global: boolean): Promise<{ cidr: Cidr; what: string }[]> {
    const nets = global ? await listJson<Network>(this.engine.store, keys.networks()) : await listNetworks(this.engine);
    const out = nets.flatMap((n) => n.subnets.map((s) => ({ cidr: parseCidr(s.subnet), what: `network "${n.name}" (${s.subnet})` })));
    for (const p of await listJson<DockerPool>(this.engine.store, dockerKeys.pools())) {
      if (p.network !== undefined) continue; // its network is listed already
      if (p.host !== undefined && p.host !== hostName() && !global) continue;
      out.push({ cidr: parseCidr(p.subnet), what: `a pool of another Docker network (${p.subnet})` });
    }
    return out;
  }

  async requestPool(req: RequestPoolRequest): Promise<object> {
    const global = req.AddressSpace === AddressSpaces.global;
    if (!global && req.AddressSpace !== AddressSpaces.local) throw invalid(`unknown address space "${req.AddressSpace}"`, `knit's are ${AddressSpaces.local} and ${AddressSpaces.global}`);
    for (const key of Object.keys(req.Options)) {
      if (key !== GATEWAY_OPTION) throw invalid(`unknown IPAM option "${key}"`, `knit's IPAM driver takes --ipam-opt ${GATEWAY_OPTION}=true only`);
    }
    const pool = await retryTxn("request pool", async () => {
      const meta = await this.engine.store.get(dockerKeys.poolsMeta());
      const draft = await this.draftPool(req, global);
      const res = await this.engine.store.txn(
        [{ key: dockerKeys.poolsMeta(), target: "version", op: "=", value: meta?.version ?? 0 }],
        [putJson(dockerKeys.pool(draft.id), draft), { type: "put", key: dockerKeys.poolsMeta(), value: draft.id }],
      );
      return res.succeeded ? draft : undefined;
    });
    return { PoolID: pool.id, Pool: pool.subnet, Data: {} };
  }

  private async draftPool(req: RequestPoolRequest, global: boolean): Promise<DockerPool> {
    const family = req.V6 ? 6 : 4;
    const base: DockerPool = { id: newId().slice(0, 24), space: req.AddressSpace, subnet: "", v6: req.V6, host: hostName() };
    if (req.Options[GATEWAY_OPTION] !== undefined && parseBoolOption(GATEWAY_OPTION, req.Options[GATEWAY_OPTION])) {
      // Docker's docker_gwbridge standing for knit's (network-driver.ts): its subnet.
      const gw = await ensureGwBridge(this.engine);
      const cfg = gw.subnets.find((s) => parseCidr(s.subnet).family === family);
      if (!cfg) throw conflict(`knit's docker_gwbridge network has no IPv${family} subnet`);
      // Its subnet, asked for by name: for a pool it did not ask for, dockerd would check the
      // host's routes, find the bridge's, and ask again forever.
      if (!req.Pool || formatCidr(parseCidr(req.Pool, "pool")) !== cfg.subnet) throw conflict(`${GATEWAY_OPTION} needs the subnet of knit's docker_gwbridge network, ${cfg.subnet}`, `add --subnet ${cfg.subnet}`);
      return { ...base, subnet: cfg.subnet, network: gw.id, joined: true, ...(cfg.ipRange ? { ipRange: cfg.ipRange } : {}) };
    }
    const taken = await this.taken(global);
    let subnet: Cidr;
    if (req.Pool) {
      subnet = parseCidr(req.Pool, "pool");
      if (subnet.family !== family) throw invalid(`pool ${req.Pool} is not an IPv${family} subnet`);
      // A second Docker host asking for an overlay's subnet joins that network.
      const joined = (await listJson<Network>(this.engine.store, keys.networks())).find((n) => n.host === undefined && n.subnets.some((s) => s.subnet === formatCidr(subnet)));
      if (joined) {
        const cfg = joined.subnets.find((s) => s.subnet === formatCidr(subnet));
        if (req.SubPool && req.SubPool !== (cfg?.ipRange ?? "")) throw conflict(`network ${joined.name} has subnet ${req.Pool} with ${cfg?.ipRange ? `ip range ${cfg.ipRange}` : "no ip range"}`);
        return { ...base, subnet: formatCidr(subnet), network: joined.id, joined: true, ...(cfg?.ipRange ? { ipRange: cfg.ipRange } : {}) };
      }
      const clash = taken.find((t) => cidrOverlaps(t.cidr, subnet));
      if (clash) throw conflict(`pool ${req.Pool} overlaps ${clash.what}`, "choose a --subnet that overlaps no other network");
    } else {
      if (req.SubPool) throw invalid("--ip-range needs a --subnet");
      // A picked pool also avoids the host's routes, as knit network create does.
      const routes = await takenSubnets(this.engine);
      const cidrs = [...taken, ...routes].map((t) => t.cidr);
      subnet = family === 4 ? pickV4Pool(cidrs) : pickV6Pool(cidrs);
    }
    const out: DockerPool = { ...base, subnet: formatCidr(subnet) };
    if (req.SubPool) {
      const range = parseCidr(req.SubPool, "ip-range");
      if (!cidrCovers(subnet, range)) throw invalid(`ip range ${req.SubPool} is not inside pool ${formatCidr(subnet)}`);
      out.ipRange = formatCidr(range);
    }
    return out;
  }

  async releasePool(poolId: string): Promise<object> {
    await this.engine.store.txn([], [{ type: "delete", key: dockerKeys.pool(poolId) }, { type: "deletePrefix", prefix: dockerKeys.claimsOf(poolId) }, { type: "put", key: dockerKeys.poolsMeta(), value: `-${poolId}` }]);
    return {};
  }

  private async requirePool(poolId: string): Promise<DockerPool> {
    const pool = await getPool(this.engine.store, poolId);
    if (!pool) throw notFound(`IPAM pool ${poolId} not found`);
    return pool;
  }

  async requestAddress(req: RequestAddressRequest): Promise<object> {
    const pool = await this.requirePool(req.PoolID);
    const prefix = parseCidr(pool.subnet).prefix;
    const gateway = req.Options[REQUEST_ADDRESS_TYPE] === GATEWAY_REQUEST;
    const net = pool.network ? await getJson<Network>(this.engine.store, keys.network(pool.network)) : undefined;
    let addr: Ip;
    if (gateway && pool.joined && net) addr = this.joinedGateway(net, pool, req.Address);
    else if (net && !gateway) addr = await this.claimInNetwork(net, pool, req.Address);
    else addr = await this.claimInPool(pool, req.Address, gateway ? "gateway" : "address");
    return { Address: `${formatIp(addr)}/${prefix}`, Data: {} };
  }

  /** The gateway of the overlay network a joined pool stands for (Docker asks for one). */
  private joinedGateway(net: Network, pool: DockerPool, requested: string): Ip {
    const gw = net.subnets.find((s) => s.subnet === pool.subnet)?.gateway;
    if (!gw) throw conflict(`network ${net.name} has no gateway in ${pool.subnet}`);
    if (requested && formatIp(parseIp(requested, "gateway")) !== gw) throw conflict(`network ${net.name} already has gateway ${gw} in ${pool.subnet}`, `give --gateway ${gw}, or none`);
    return parseIp(gw);
  }

  /** An endpoint address from the knit network's own IPAM (reserved until Join adopts it). */
  private async claimInNetwork(net: Network, pool: DockerPool, requested: string): Promise<Ip> {
    const pools = net.subnets.map(toPool);
    const holder = ipamHolder();
    if (requested) {
      const { ip } = checkStaticAddress(pools, requested, "--ip");
      const key = keys.ipam(net.id, formatIp(ip));
      if (!(await this.engine.store.txn([absent(key)], [{ type: "put", key, value: holder }])).succeeded) {
        throw conflict(`address ${formatIp(ip)} is already in use on network ${net.name}`);
      }
      return ip;
    }
    const p = pools.find((x) => x.config.subnet === pool.subnet);
    if (!p) throw conflict(`network ${net.name} has no subnet ${pool.subnet}`);
    const family = p.subnet.family;
    const cursor = await this.engine.store.get(keys.cursor(net.id, family));
    for (const ip of candidates(p, cursor ? parseIp(cursor.value).value : undefined)) {
      const a = formatIp(ip);
      const key = keys.ipam(net.id, a);
      if (await this.engine.store.get(key)) continue;
      const res = await this.engine.store.txn([absent(key)], [{ type: "put", key, value: holder }, { type: "put", key: keys.cursor(net.id, family), value: a }]);
      if (res.succeeded) return ip;
    }
    throw new KnitError("conflict", `no available IPv${family} addresses on network ${net.name}`, { hint: "remove unused containers or use a larger --subnet" });
  }

  /** An address of a pool no knit network holds (gateway, aux, or a non-knit driver's endpoints). */
  private async claimInPool(pool: DockerPool, requested: string, what: "gateway" | "address"): Promise<Ip> {
    const p: Pool = toPool({ subnet: pool.subnet, ...(pool.ipRange ? { ipRange: pool.ipRange } : {}), auxAddresses: {} });
    if (requested || what === "gateway") {
      const ip = requested ? checkStaticAddress([p], requested, what === "gateway" ? "--gateway" : "--ip").ip : { family: p.subnet.family, value: p.subnet.base + 1n };
      if (!cidrContains(p.subnet, ip)) throw invalid(`address ${formatIp(ip)} is not in pool ${pool.subnet}`);
      const key = dockerKeys.claim(pool.id, formatIp(ip));
      if (!(await this.engine.store.txn([absent(key)], [{ type: "put", key, value: what }])).succeeded) throw conflict(`address ${formatIp(ip)} is already in use in pool ${pool.subnet}`);
      return ip;
    }
    const held = new Set((await this.engine.store.list(dockerKeys.claimsOf(pool.id))).items.map((kv) => kv.key.slice(dockerKeys.claimsOf(pool.id).length)));
    for (const ip of candidates(p, undefined)) {
      const a = formatIp(ip);
      if (held.has(a)) continue;
      const key = dockerKeys.claim(pool.id, a);
      if ((await this.engine.store.txn([absent(key)], [{ type: "put", key, value: what }])).succeeded) return ip;
    }
    throw new KnitError("conflict", `no available addresses in pool ${pool.subnet}`, { hint: "use a larger --subnet" });
  }

  async releaseAddress(req: ReleaseAddressRequest): Promise<object> {
    const pool = await getPool(this.engine.store, req.PoolID);
    if (!pool) return {};
    const addr = formatIp(parseIp(req.Address.split("/")[0] ?? req.Address, "address"));
    await this.engine.store.delete(dockerKeys.claim(pool.id, addr));
    if (pool.network) {
      // Only a reservation: an endpoint that adopted the address gives it back itself.
      const key = keys.ipam(pool.network, addr);
      await this.engine.store.txn([{ key, target: "value", op: "=", value: ipamHolder() }], [{ type: "delete", key }]);
    }
    return {};
  }
}
