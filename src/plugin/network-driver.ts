/**
 * Docker's remote NetworkDriver, translated into engine calls.
 *
 *   CreateNetwork   -> createNetwork (id = Docker's id, driver from `-o knit.driver=`, the
 *                      subnets, gateways and aux addresses Docker's IPAM gave), or, for a
 *                      global (overlay) network another host made with the same subnets,
 *                      a link to it: that is how Docker hosts without Swarm share a network
 *   DeleteNetwork   -> removeNetwork, once no Docker network links to it any more
 *   CreateEndpoint  -> checks, the MAC, and a note of the addresses (the sandbox is not known
 *                      before Join)
 *   Join            -> connectSandbox into the handoff namespace, then the device to the host
 *                      for Docker to move (handoff.ts); the gateway the driver set is returned
 *   Leave           -> nothing: Docker moves the device back, DeleteEndpoint removes it
 *   DeleteEndpoint  -> disconnectSandbox
 *   Program/RevokeExternalConnectivity -> publish/unpublish the container's ports
 *   EndpointOperInfo, DiscoverNew, DiscoverDelete -> answers only
 *
 * Docker never says a network's or a container's name; the plugin asks the daemon's API
 * (docker-api.ts) and names the knit records after them (until it knows: `docker-<id12>`).
 */
import { KnitError, conflict, invalid, notFound } from "../errors.ts";
import { getJson, listJson, putJson } from "../store/store.ts";
import { DockerLabels, keys, type Endpoint, type Network, type PortMapping, type Sandbox } from "../model.ts";
import { driverFor } from "../drivers/registry.ts";
import { MacvlanOptions } from "../drivers/macvlan.ts";
import { type Engine } from "../engine/engine.ts";
import { createNetwork, removeNetwork, renameNetwork, type CreateNetworkRequest as CreateKnitNetworkRequest } from "../engine/networks.ts";
import { AddressSpaces } from "./ipam-driver.ts";
import { connectSandbox, disconnectSandbox, findMembership, macFor } from "../engine/endpoints.ts";
import { publishSandboxPorts, unpublishSandboxPorts } from "../engine/sandboxes.ts";
import { hostName } from "../engine/owner.ts";
import { resolvePortRequests } from "../ports/publish.ts";
import { formatCidr, parseCidr, parseIpWithPrefix } from "../net/ip.ts";
import type { Logger } from "../agent/log.ts";
import {
  NetworkOptionKeys,
  boolOption,
  portBindings,
  stringMap,
  type CreateEndpointRequest,
  type CreateNetworkRequest,
  type EndpointRequest,
  type IpamData,
  type ExternalConnectivityRequest,
  type JoinRequest,
  type JoinResponse,
  type NetworkRequest,
} from "./protocol.ts";
import { dockerKeys, getDockerEndpoint, getLink, ipamHolder, type DockerEndpoint, type DockerNetworkLink, type DockerPool } from "./records.ts";
import { dropDevice, gatewaysFor, hostNetns, srcNameFor } from "./handoff.ts";
import { describeDockerSandbox, dockerSandbox, forgetDockerSandbox, setEndpointAliases } from "./sandboxes.ts";
import { DnsRedirect, internalDnsRoutes } from "./dns-redirect.ts";
import { hasDefaultRoute } from "../kernel/ip.ts";
import type { DockerApi, DockerNetworkInfo } from "./docker-api.ts";
import { ensureGwBridge, needsGateway } from "../cluster/attach.ts";
import { parseBoolOption } from "../drivers/driver.ts";

/** Options of `docker network create -d knit` that the plugin reads itself. */
export const KnitDockerOptions = {
  /** The knit driver behind the Docker network: bridge (default), macvlan, overlay. */
  driver: "knit.driver",
  /**
   * This Docker network is the host's docker_gwbridge, the way out of overlay containers: it
   * stands for knit's own docker_gwbridge network (the plugin creates it in dockerd itself).
   */
  gateway: "knit.gateway",
} as const;

/** The name of Docker's gateway network (libnetwork's, and knit's for its overlays). */
const DOCKER_GW_NETWORK = "docker_gwbridge";

/** The drivers a Docker network may use (host and none are Docker's own). */
const DOCKER_DRIVERS = ["bridge", "macvlan", "overlay"] as const;

/** A knit network's name until Docker's is known. */
export const provisionalName = (dockerNetworkId: string): string => `docker-${dockerNetworkId.slice(0, 12)}`;

export interface DriverContext {
  readonly engine: Engine;
  readonly dns: DnsRedirect;
  readonly docker: DockerApi | undefined;
  readonly log: Logger;
  /** The plugin's name (Docker's driver name for knit networks). */
  readonly name: string;
}

const PROTOS: Record<number, "tcp" | "udp"> = { 6: "tcp", 17: "udp" };

/** `-p` text for one of Docker's port bindings (knit's port code parses Docker's syntax). */
function publishText(b: { Proto: number; Port: number; HostIP: string; HostPort: number; HostPortEnd: number }): string {
  const proto = PROTOS[b.Proto];
  if (!proto) throw new KnitError("unsupported", `publishing protocol number ${b.Proto} is not supported`, { hint: "knit publishes tcp and udp ports" });
  const host = b.HostIP.includes(":") ? `[${b.HostIP}]` : b.HostIP;
  const ports = b.HostPort === 0 ? "" : b.HostPortEnd > b.HostPort ? `${b.HostPort}-${b.HostPortEnd}` : `${b.HostPort}`;
  if (host === "" && ports === "") return `${b.Port}/${proto}`;
  return `${host ? `${host}:` : ""}${ports}:${b.Port}/${proto}`;
}

export class DockerNetworkDriver {
  /** Set when the plugin stops: background work (names learnt from Docker) ends. */
  private closed = false;

  constructor(private readonly ctx: DriverContext) {}

  /** Stop background work. */
  close(): void {
    this.closed = true;
  }

  private get engine(): Engine {
    return this.ctx.engine;
  }

  getCapabilities(): { Scope: string; ConnectivityScope: string } {
    // Data scope local: each dockerd keeps its own record of the network (no Swarm store);
    // knit connects them, so connectivity may span hosts.
    return { Scope: "local", ConnectivityScope: "global" };
  }

  /** The knit network behind a Docker network. */
  async knitNetwork(dockerNetworkId: string): Promise<Network | undefined> {
    const link = await getLink(this.engine.store, dockerNetworkId);
    return getJson<Network>(this.engine.store, keys.network(link?.network ?? dockerNetworkId));
  }

  private async requireNetwork(dockerNetworkId: string): Promise<Network> {
    const net = await this.knitNetwork(dockerNetworkId);
    if (!net) throw notFound(`knit has no network for Docker network ${dockerNetworkId.slice(0, 12)}`, "remove it with docker network rm and create it again");
    return net;
  }

  async createNetwork(req: CreateNetworkRequest): Promise<object> {
    if (await getLink(this.engine.store, req.NetworkID)) return {};
    const generic = stringMap(req.Options[NetworkOptionKeys.generic], `option ${NetworkOptionKeys.generic}`);
    const { [KnitDockerOptions.driver]: driverOpt, [KnitDockerOptions.gateway]: gatewayOpt, ...options } = generic;
    if (gatewayOpt !== undefined && parseBoolOption(KnitDockerOptions.gateway, gatewayOpt)) return this.linkGateway(req);
    if (options[MacvlanOptions.hostAccess] !== undefined) {
      throw invalid(`option ${MacvlanOptions.hostAccess} is not available through Docker`, "Docker configures its containers' interfaces itself; give the host its own macvlan device on the parent instead");
    }
    const driverName = driverOpt ?? "bridge";
    if (!(DOCKER_DRIVERS as readonly string[]).includes(driverName)) {
      throw invalid(`unknown value "${driverName}" for option ${KnitDockerOptions.driver}`, `choose one of ${DOCKER_DRIVERS.join(", ")}`);
    }
    const driver = driverFor(driverName);
    const data = [...req.IPv4Data, ...req.IPv6Data];
    if (data.length === 0 || data.some((d) => parseCidr(d.Pool, "pool", false).prefix === 0)) {
      throw invalid("a knit network needs a subnet", "create it with --subnet, or leave --ipam-driver at default or knit");
    }
    const subnets = data.map((d) => formatCidr(parseCidr(d.Pool, "pool", false)));
    const pools = await this.poolsFor(data.map((d) => d.AddressSpace), subnets);
    if (driver.scope === "global") {
      if (data.some((d) => d.AddressSpace !== AddressSpaces.local && d.AddressSpace !== AddressSpaces.global)) {
        throw invalid(`a knit ${driverName} network needs knit's IPAM driver`, `create it with --ipam-driver ${this.ctx.name}: the Docker daemon of every host would hand out the same addresses`);
      }
      const existing = await this.globalNetworkWith(subnets);
      if (existing) {
        await this.joinExisting(req.NetworkID, existing, driverName);
        void this.ensureDockerGateway();
        return {};
      }
    }
    const net = await this.createKnitNetwork(data, {
      id: req.NetworkID,
      name: provisionalName(req.NetworkID),
      driver: driverName,
      subnets,
      gateways: data.flatMap((d) => (d.Gateway ? [d.Gateway.split("/")[0] ?? ""] : [])),
      ipRanges: pools.flatMap((p) => (p.ipRange ? [p.ipRange] : [])),
      auxAddresses: data.flatMap((d) => Object.entries(d.AuxAddresses).map(([n, a]) => `${n}=${a.split("/")[0] ?? a}`)),
      options,
      labels: { [DockerLabels.network]: req.NetworkID },
      internal: boolOption(req.Options, NetworkOptionKeys.internal),
      ipv6: boolOption(req.Options, NetworkOptionKeys.enableIPv6),
    });
    await this.link(req.NetworkID, { network: net.id, host: hostName(), created: true }, pools);
    this.learnNetworkName(req.NetworkID);
    if (needsGateway(net)) void this.ensureDockerGateway();
    return {};
  }

  /** Docker's docker_gwbridge network, as created by {@link ensureDockerGateway}: knit's own. */
  private async linkGateway(req: CreateNetworkRequest): Promise<object> {
    const gw = await ensureGwBridge(this.engine);
    const want = gw.subnets.map((s) => s.subnet).sort().join(",");
    const got = [...req.IPv4Data, ...req.IPv6Data].map((d) => formatCidr(parseCidr(d.Pool, "pool", false))).sort().join(",");
    if (want !== got) throw conflict(`knit's ${DOCKER_GW_NETWORK} network has subnets ${want}, not ${got}`, `create it with --ipam-driver ${this.ctx.name} --ipam-opt ${KnitDockerOptions.gateway}=true`);
    await this.link(req.NetworkID, { network: gw.id, host: hostName(), created: false }, await this.poolsFor([AddressSpaces.local, AddressSpaces.global], gw.subnets.map((s) => s.subnet)));
    return {};
  }

  /** A check (and creation) of Docker's docker_gwbridge under way: concurrent callers share it. */
  private gatewayCheck: Promise<void> | undefined;

  /**
   * Overlay containers get their way out from Docker's gateway service, the network named
   * docker_gwbridge, which dockerd creates with its bridge driver unless one exists. The
   * plugin creates it first, as a knit network standing for knit's own docker_gwbridge (as
   * Docker lets users create docker_gwbridge themselves): the containers' second interface is
   * then on knit's bridge, where knit's DNS answers them with the names of every host. A
   * docker_gwbridge of another driver is left alone (with a warning). Never throws.
   */
  ensureDockerGateway(): Promise<void> {
    const docker = this.ctx.docker;
    if (!docker) return Promise.resolve();
    this.gatewayCheck ??= (async () => {
      const existing = await docker.network(DOCKER_GW_NETWORK);
      if (existing) {
        if (existing.Driver !== this.ctx.name) this.ctx.log.warn(`Docker's ${DOCKER_GW_NETWORK} is not knit's: overlay containers get their way out, but not knit's names of other hosts`, { driver: existing.Driver });
        return;
      }
      // With the subnet given: for a pool it did not ask for by subnet, dockerd checks that no
      // route of the host overlaps it, and asks again and again while one does (knit's does).
      const gw = await ensureGwBridge(this.engine);
      await docker.createNetwork({
        Name: DOCKER_GW_NETWORK,
        Driver: this.ctx.name,
        Options: { [KnitDockerOptions.gateway]: "true" },
        IPAM: {
          Driver: this.ctx.name,
          Options: { [KnitDockerOptions.gateway]: "true" },
          Config: gw.subnets.map((s) => ({ Subnet: s.subnet, ...(s.gateway ? { Gateway: s.gateway } : {}) })),
        },
      });
      this.ctx.log.info(`created Docker's ${DOCKER_GW_NETWORK} on knit's`);
    })()
      .catch((err: unknown) => this.ctx.log.warn(`cannot create Docker's ${DOCKER_GW_NETWORK}`, { err }))
      .finally(() => {
        this.gatewayCheck = undefined;
      });
    return this.gatewayCheck;
  }

  /** createNetwork; a subnet from Docker's own IPAM that knit cannot take gets a hint for Docker users. */
  private async createKnitNetwork(data: readonly IpamData[], req: CreateKnitNetworkRequest): Promise<Network> {
    try {
      return await createNetwork(this.engine, req);
    } catch (err) {
      const dockers = data.every((d) => d.AddressSpace !== AddressSpaces.local && d.AddressSpace !== AddressSpaces.global);
      if (!(err instanceof KnitError && err.code === "conflict" && /overlaps/.test(err.message) && dockers)) throw err;
      throw new KnitError("conflict", err.message, { hint: "give a --subnet that overlaps no knit network, or --ipam-driver knit to let knit pick a free one" });
    }
  }

  /** Knit IPAM pools (of these address spaces) that hand out these subnets and no network's yet. */
  private async poolsFor(spaces: readonly string[], subnets: readonly string[]): Promise<DockerPool[]> {
    const all = await listJson<DockerPool>(this.engine.store, dockerKeys.pools());
    return all.filter((p) => spaces.includes(p.space) && subnets.includes(p.subnet) && (p.host === undefined || p.host === hostName()) && (p.network === undefined || p.joined));
  }

  /** A global knit network with exactly these subnets (made by another host's Docker, or knit). */
  private async globalNetworkWith(subnets: readonly string[]): Promise<Network | undefined> {
    const nets = await listJson<Network>(this.engine.store, keys.networks());
    const want = [...subnets].sort().join(",");
    return nets.find((n) => n.host === undefined && n.state === "ready" && n.subnets.map((s) => s.subnet).sort().join(",") === want);
  }

  private async joinExisting(dockerNetworkId: string, net: Network, driverName: string): Promise<void> {
    if (net.driver !== driverName) throw conflict(`subnets of network ${net.name} are in use by a ${net.driver} network`, `use -o ${KnitDockerOptions.driver}=${net.driver} to join it, or other subnets`);
    await this.link(dockerNetworkId, { network: net.id, host: hostName(), created: false }, await this.poolsFor([AddressSpaces.local, AddressSpaces.global], net.subnets.map((s) => s.subnet)));
    this.ctx.log.info("docker network joins knit network", { docker: dockerNetworkId.slice(0, 12), network: net.name });
  }

  /** Record the link, and point the pools knit's IPAM gave at the knit network. */
  private async link(dockerNetworkId: string, link: DockerNetworkLink, pools: readonly DockerPool[]): Promise<void> {
    await this.engine.store.txn([], [putJson(dockerKeys.network(dockerNetworkId), link), ...pools.map((p) => putJson(dockerKeys.pool(p.id), { ...p, network: link.network }))]);
  }

  async deleteNetwork(req: NetworkRequest): Promise<object> {
    const link = await getLink(this.engine.store, req.NetworkID);
    const netId = link?.network ?? req.NetworkID;
    const net = await getJson<Network>(this.engine.store, keys.network(netId));
    await this.engine.store.delete(dockerKeys.network(req.NetworkID));
    if (!net || net.labels[DockerLabels.network] === undefined) return {};
    const links = await listJson<DockerNetworkLink>(this.engine.store, dockerKeys.networks());
    if (links.some((l) => l.network === netId)) return {}; // another Docker host still uses it
    try {
      await removeNetwork(this.engine, netId, { byDocker: true });
    } catch (err) {
      if (!(err instanceof KnitError && err.code === "conflict")) throw err;
      // Docker forgets its network whatever the driver says: knit keeps it (its sandboxes
      // still use it) as a network of its own, which `knit network rm` removes later.
      const labels = { ...net.labels };
      delete labels[DockerLabels.network];
      const current = await getJson<Network>(this.engine.store, keys.network(netId));
      if (current) await this.engine.store.put(keys.network(netId), JSON.stringify({ ...current, labels }));
      throw new KnitError("conflict", `${err.message}; knit keeps network ${net.name} for them`, { hint: `remove it with knit network rm ${net.name} once they are gone` });
    }
    return {};
  }

  async createEndpoint(req: CreateEndpointRequest): Promise<object> {
    const net = await this.requireNetwork(req.NetworkID);
    const { Address: address, AddressIPv6: addressV6 } = req.Interface;
    if (!address && !addressV6 && driverFor(net.driver).addressed) throw invalid(`Docker gave endpoint ${req.EndpointID.slice(0, 12)} no address`);
    for (const a of [address, addressV6]) {
      if (!a) continue;
      const ip = parseIpWithPrefix(a, "endpoint address").ip;
      const subnet = net.subnets.find((s) => parseCidr(s.subnet).family === ip.family);
      if (!subnet) throw invalid(`address ${a} is not in a subnet of network ${net.name}`);
      const held = await this.engine.store.get(keys.ipam(net.id, a.split("/")[0] ?? a));
      if (held && held.value !== ipamHolder() && held.value !== req.EndpointID) {
        throw conflict(`address ${a.split("/")[0]} is in use on network ${net.name}${held.value === "gateway" || held.value.startsWith("aux:") ? ` (${held.value})` : ""}`, "with knit sandboxes on the same network, create it with --ipam-driver knit");
      }
    }
    const v4 = address ? parseIpWithPrefix(address).ip : undefined;
    const mac = req.Interface.MacAddress || macFor(v4?.family === 4 ? v4 : undefined);
    const ep: DockerEndpoint = { dockerNetwork: req.NetworkID, network: net.id, address, addressV6, mac, srcName: srcNameFor(req.EndpointID), host: hostName() };
    await this.engine.store.put(dockerKeys.endpoint(req.EndpointID), JSON.stringify(ep));
    return req.Interface.MacAddress ? {} : { Interface: { MacAddress: mac } };
  }

  async endpointOperInfo(req: EndpointRequest): Promise<object> {
    const ep = await getDockerEndpoint(this.engine.store, req.EndpointID);
    if (!ep) throw notFound(`endpoint ${req.EndpointID.slice(0, 12)} not found`);
    const knit = await getJson<Endpoint>(this.engine.store, keys.endpoint(ep.network, req.EndpointID));
    const sb = knit ? await getJson<Sandbox>(this.engine.store, keys.sandbox(knit.sandboxId)) : undefined;
    const ports = (sb?.ports ?? []).filter((m) => m.networkId === ep.network);
    return {
      Value: {
        "knit.network": ep.network,
        "knit.sandbox": sb?.name ?? "",
        "knit.ports": ports.map((m) => `${m.hostIp}:${m.hostPort}->${m.containerPort}/${m.proto}`),
      },
    };
  }

  async join(req: JoinRequest): Promise<JoinResponse> {
    const ep = await getDockerEndpoint(this.engine.store, req.EndpointID);
    if (!ep) throw notFound(`endpoint ${req.EndpointID.slice(0, 12)} was not created`);
    const net = await this.requireNetwork(req.NetworkID);
    const info = await this.inspectNetwork(req.NetworkID);
    if (info && net.name === provisionalName(req.NetworkID)) await this.adoptName(net, info.Name);
    const containerName = info ? Object.values(info.Containers ?? {}).find((c) => c.EndpointID === req.EndpointID)?.Name : undefined;
    const sb = await dockerSandbox(this.engine, req.SandboxKey, containerName);
    const srcName = ep.srcName;
    const prefix = typeof net.driverState.ifacePrefix === "string" ? net.driverState.ifacePrefix : "eth";
    // An overlay container's way out: Docker's gateway network must be knit's before Docker
    // sets it up, right after this Join.
    if (needsGateway(net)) await this.ensureDockerGateway();
    let knit = await findMembership(this.engine, sb, net.id);
    if (knit && knit.id !== req.EndpointID) throw conflict(`container ${sb.name} is already on network ${net.name}`);
    if (!knit) {
      // Names first: the redirect for the container's address goes in while the device is made.
      const rebuilds = this.ctx.dns.started;
      const redirect = this.ctx.dns.add(DnsRedirect.for(net, [ep.address, ep.addressV6].filter(Boolean)));
      try {
        knit = await connectSandbox(this.engine, net.id, sb, {
          id: req.EndpointID,
          ifname: srcName,
          mac: ep.mac,
          handoff: hostNetns(),
          adoptClaim: ipamHolder(),
          ...(ep.address ? { ip: ep.address.split("/")[0] ?? "" } : {}),
          ...(ep.addressV6 ? { ip6: ep.addressV6.split("/")[0] ?? "" } : {}),
        });
        ep.gateways = gatewaysFor(net, knit);
        // A container with a way out already (`docker network connect` of a running one) keeps
        // sending its forwarded queries there.
        const routes = net.internal && !(await hasDefaultRoute(req.SandboxKey)) ? internalDnsRoutes(net, { v4: knit.ipv4 !== undefined, v6: knit.ipv6 !== undefined }) : [];
        if (routes.length) ep.routes = routes;
        await redirect;
      } catch (err) {
        await redirect.catch(() => undefined);
        await this.undoJoin(net, sb, req.EndpointID, srcName);
        throw err;
      }
      ep.sandboxKey = req.SandboxKey;
      await this.engine.store.put(dockerKeys.endpoint(req.EndpointID), JSON.stringify(ep));
      this.describeLater(req.NetworkID, knit, sb.id);
      // A rebuild that began before the endpoint was ready may have taken its element away:
      // then one more, which sees it.
      if (this.ctx.dns.started !== rebuilds) void this.ctx.dns.sync().catch((err: unknown) => this.ctx.log.warn("cannot update the DNS redirect", { err }));
    }
    const gw = ep.gateways ?? {};
    return {
      InterfaceName: { SrcName: srcName, DstPrefix: prefix },
      ...(gw.v4 ? { Gateway: gw.v4 } : {}),
      ...(gw.v6 ? { GatewayIPv6: gw.v6 } : {}),
      ...(ep.routes?.length ? { StaticRoutes: ep.routes } : {}),
      // No gateway (internal, isolated macvlan): Docker must not add its docker_gwbridge either.
      // An overlay's way out is Docker's gateway service (docker_gwbridge), as with Swarm.
      DisableGatewayService: !gw.v4 && !gw.v6 && !needsGateway(net),
    };
  }

  /** A Join that failed half-way: the endpoint and any device it made go. */
  private async undoJoin(net: Network, sb: Sandbox, endpointId: string, srcName: string): Promise<void> {
    const knit = await getJson<Endpoint>(this.engine.store, keys.endpoint(net.id, endpointId));
    if (knit) await disconnectSandbox(this.engine, net.id, sb, true).catch(() => undefined);
    await dropDevice(srcName);
    await forgetDockerSandbox(this.engine, sb.netnsPath).catch(() => undefined);
    void this.ctx.dns.sync().catch(() => undefined);
  }

  leave(): object {
    return {};
  }

  async deleteEndpoint(req: EndpointRequest): Promise<object> {
    const ep = await getDockerEndpoint(this.engine.store, req.EndpointID);
    if (!ep) return {};
    const knit = await getJson<Endpoint>(this.engine.store, keys.endpoint(ep.network, req.EndpointID));
    const sb = knit ? await getJson<Sandbox>(this.engine.store, keys.sandbox(knit.sandboxId)) : undefined;
    if (knit && sb) {
      if (sb.ports?.some((m) => m.networkId === ep.network)) await unpublishSandboxPorts(this.engine, sb.id);
      // Not cascading to docker_gwbridge: Docker removes its gateway endpoint itself.
      await disconnectSandbox(this.engine, ep.network, sb, true, false);
    }
    // Docker moved the device back under its source name: a veth went with its host end, a
    // device without one (macvlan) is deleted here.
    if (!knit?.hostIfname) await dropDevice(ep.srcName);
    await this.engine.store.delete(dockerKeys.endpoint(req.EndpointID));
    if (sb) await forgetDockerSandbox(this.engine, sb.netnsPath);
    else if (ep.sandboxKey) await forgetDockerSandbox(this.engine, ep.sandboxKey);
    // In the background: a redirect left a moment longer for an address that is gone harms
    // nobody (Join brings the table in step before a new container can use the address).
    void this.ctx.dns.sync().catch((err: unknown) => this.ctx.log.warn("cannot update the DNS redirect", { err }));
    return {};
  }

  async programExternalConnectivity(req: ExternalConnectivityRequest): Promise<object> {
    const bindings = portBindings(req.Options);
    const ep = await getDockerEndpoint(this.engine.store, req.EndpointID);
    if (!ep) throw notFound(`endpoint ${req.EndpointID.slice(0, 12)} not found`);
    const net = await this.requireNetwork(req.NetworkID);
    const knit = await getJson<Endpoint>(this.engine.store, keys.endpoint(net.id, req.EndpointID));
    if (!knit) throw notFound(`endpoint ${req.EndpointID.slice(0, 12)} has not joined`);
    await unpublishSandboxPorts(this.engine, knit.sandboxId);
    if (bindings.length === 0) return {};
    // As Docker's macvlan (whose containers are on the LAN themselves), a network without a
    // bridge publishes nothing, silently.
    if (net.driver !== "bridge") {
      this.ctx.log.info("ports not published: the network has no bridge", { network: net.name, driver: net.driver });
      return {};
    }
    const requests = resolvePortRequests(bindings.map(publishText), net);
    const mappings: PortMapping[] = await publishSandboxPorts(this.engine, knit.sandboxId, requests);
    this.ctx.log.debug("ports published", { endpoint: req.EndpointID.slice(0, 12), ports: mappings.map((m) => `${m.hostIp}:${m.hostPort}->${m.containerPort}/${m.proto}`) });
    return {};
  }

  async revokeExternalConnectivity(req: EndpointRequest): Promise<object> {
    const ep = await getDockerEndpoint(this.engine.store, req.EndpointID);
    if (!ep) return {};
    const knit = await getJson<Endpoint>(this.engine.store, keys.endpoint(ep.network, req.EndpointID));
    if (knit) await unpublishSandboxPorts(this.engine, knit.sandboxId);
    return {};
  }

  /**
   * After a Join: once Docker runs the container, take its hostname and its aliases on this
   * network (`--network-alias`, and the short container id) for knit's DNS, as Docker's
   * embedded DNS answers to them. In the background: Docker holds the container's lock until
   * it has started it, which is after this Join returns.
   */
  describeLater(dockerNetworkId: string, ep: Endpoint, sbId: string): void {
    const docker = this.ctx.docker;
    if (!docker) return;
    void (async () => {
      for (let i = 0; i < 40 && !this.closed; i++) {
        // Docker starts the container after this Join: no hurry, and no load on it meanwhile.
        await Bun.sleep(Math.min(100 * 2 ** i, 1000));
        if (this.closed) return;
        const info = await this.inspectNetwork(dockerNetworkId);
        const entry = Object.entries(info?.Containers ?? {}).find(([, c]) => c.EndpointID === ep.id);
        if (!info || !entry) return; // gone again
        if (entry[0].startsWith("ep-")) continue; // still joining
        const c = await docker.container(entry[0]).catch(() => undefined);
        if (!c) continue;
        const aliases = Object.values(c.NetworkSettings.Networks ?? {}).find((n) => n.EndpointID === ep.id)?.Aliases ?? [];
        await describeDockerSandbox(this.engine, sbId, { hostname: c.Config.Hostname, containerId: c.Id });
        await setEndpointAliases(this.engine, ep.networkId, ep.id, aliases);
        return;
      }
    })().catch((err: unknown) => this.ctx.log.warn("cannot learn a container's names from Docker", { endpoint: ep.id.slice(0, 12), err }));
  }

  /** Docker's view of one of its networks (undefined: no API, or it does not know it). */
  async inspectNetwork(id: string): Promise<DockerNetworkInfo | undefined> {
    if (!this.ctx.docker) return undefined;
    try {
      return await this.ctx.docker.network(id);
    } catch (err) {
      this.ctx.log.debug("cannot ask Docker about a network", { network: id.slice(0, 12), err });
      return undefined;
    }
  }

  /** Name the knit network after Docker's, unless the name is taken on this host. */
  async adoptName(net: Network, name: string): Promise<void> {
    if (net.name === name) return;
    try {
      await renameNetwork(this.engine, net.id, name);
    } catch (err) {
      this.ctx.log.warn("knit network keeps its name", { network: net.name, docker: name, err });
    }
  }

  /** After CreateNetwork: Docker stores the network once the driver answered; then take its name. */
  learnNetworkName(dockerNetworkId: string): void {
    if (!this.ctx.docker) return;
    void (async () => {
      for (let i = 0; i < 100 && !this.closed; i++) {
        await Bun.sleep(i < 10 ? 10 : 100);
        if (this.closed) return;
        const net = await this.knitNetwork(dockerNetworkId);
        if (!net || net.name !== provisionalName(dockerNetworkId)) return;
        const info = await this.inspectNetwork(dockerNetworkId);
        if (info) return this.adoptName(net, info.Name);
      }
    })().catch((err: unknown) => this.ctx.log.warn("cannot learn a network's name from Docker", { err }));
  }
}
