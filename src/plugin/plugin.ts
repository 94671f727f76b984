/**
 * knit's Docker plugin: one socket (`<plugin dir>/<name>.sock`, `/run/docker/plugins/knit.sock`
 * by default) that implements both of Docker's remote network protocols, NetworkDriver and
 * IpamDriver, served by the knit agent (`knit agent --docker-plugin`). dockerd finds it by
 * name, without configuration: `docker network create -d knit --ipam-driver knit ...`.
 *
 * Start-up: knit's records are brought in step with what dockerd knows (it may have removed
 * networks or stopped containers while no agent answered: their knit records go), the DNS
 * redirect is rebuilt, and only then the socket opens. On stop the socket and the redirect
 * table go; kernel state of live endpoints stays (traffic keeps flowing), and the next agent
 * takes over from the store.
 */
import { existsSync } from "node:fs";
import type { Engine } from "../engine/engine.ts";
import { hostName } from "../engine/owner.ts";
import { getJson, listJson } from "../store/store.ts";
import { keys, type Endpoint, type Network, type Sandbox } from "../model.ts";
import { disconnectSandbox } from "../engine/endpoints.ts";
import type { Logger } from "../agent/log.ts";
import {
  parseCreateEndpoint,
  parseCreateNetwork,
  parseEndpointRequest,
  parseExternalConnectivity,
  parseJoin,
  parseNetworkRequest,
  parsePoolId,
  parseReleaseAddress,
  parseRequestAddress,
  parseRequestPool,
} from "./protocol.ts";
import { servePlugin, type PluginServer, type Route } from "./server.ts";
import { DockerNetworkDriver, provisionalName } from "./network-driver.ts";
import { DockerIpamDriver } from "./ipam-driver.ts";
import { nameHostNetns, unnameHostNetns } from "./handoff.ts";
import { DnsRedirect } from "./dns-redirect.ts";
import { DockerApi } from "./docker-api.ts";
import { dockerKeys, type DockerEndpoint, type DockerNetworkLink, type DockerPool } from "./records.ts";
import { forgetDockerSandbox } from "./sandboxes.ts";

/** Where dockerd looks for plugin sockets (fixed in dockerd; spec files live elsewhere). */
export const DEFAULT_PLUGIN_DIR = "/run/docker/plugins";
/** The driver name: `docker network create -d knit --ipam-driver knit`. */
export const DEFAULT_PLUGIN_NAME = "knit";

export interface DockerPluginOptions {
  dir: string;
  name: string;
  /** The daemon to ask for names (`unix:///var/run/docker.sock`); undefined: do not ask. */
  dockerHost: string | undefined;
}

/** What `knit agent status` shows about the plugin. */
export interface DockerPluginStatus {
  socket: string;
  name: string;
  dockerHost: string | undefined;
  calls: Record<string, number>;
  errors: number;
  startup: { networksDropped: number; endpointsDropped: number; poolsDropped: number; dockerReachable: boolean };
}

export class DockerPlugin {
  private server: PluginServer | undefined;
  private driver: DockerNetworkDriver | undefined;
  private readonly dns: DnsRedirect;
  private readonly docker: DockerApi | undefined;
  private startup: DockerPluginStatus["startup"] = { networksDropped: 0, endpointsDropped: 0, poolsDropped: 0, dockerReachable: false };

  constructor(
    private readonly engine: Engine,
    private readonly opts: DockerPluginOptions,
    private readonly log: Logger,
  ) {
    this.dns = new DnsRedirect(engine);
    this.docker = opts.dockerHost ? new DockerApi(opts.dockerHost) : undefined;
  }

  async start(): Promise<void> {
    await nameHostNetns();
    const net = new DockerNetworkDriver({ engine: this.engine, dns: this.dns, docker: this.docker, log: this.log, name: this.opts.name });
    this.driver = net;
    const ipam = new DockerIpamDriver(this.engine);
    await this.syncWithDocker(net).catch((err: unknown) => this.log.warn("docker plugin: cannot compare with Docker", { err }));
    await this.dns.sync();
    this.server = servePlugin({ dir: this.opts.dir, name: this.opts.name, routes: routes(net, ipam), log: this.log });
    this.log.info("docker plugin listening", { socket: this.server.socket, docker: this.opts.dockerHost, ...this.startup });
  }

  async stop(): Promise<void> {
    this.driver?.close();
    await this.server?.stop().catch((err: unknown) => this.log.warn("docker plugin: cannot close the socket", { err }));
    await this.dns.remove().catch((err: unknown) => this.log.warn("docker plugin: cannot remove the DNS redirect", { err }));
    await unnameHostNetns().catch((err: unknown) => this.log.warn("docker plugin: cannot drop the host namespace's name", { err }));
  }

  status(): DockerPluginStatus {
    return { socket: this.server?.socket ?? "", name: this.opts.name, dockerHost: this.opts.dockerHost, calls: { ...this.server?.stats.calls }, errors: this.server?.stats.errors ?? 0, startup: this.startup };
  }

  /**
   * Drop what dockerd no longer knows (removed while no agent answered) and take the names
   * knit has not learnt yet. Without an answer from dockerd nothing is dropped.
   */
  private async syncWithDocker(driver: DockerNetworkDriver): Promise<void> {
    if (!this.docker) return;
    const dockerNets = await this.docker.networks();
    this.startup.dockerReachable = true;
    const me = hostName();
    const known = new Map(dockerNets.map((n) => [n.Id, n]));
    for (const kv of (await this.engine.store.list(dockerKeys.networks())).items) {
      const link = JSON.parse(kv.value) as DockerNetworkLink;
      const dockerId = kv.key.slice(dockerKeys.networks().length);
      if (link.host !== me) continue;
      const info = known.get(dockerId);
      if (!info) {
        await driver.deleteNetwork({ NetworkID: dockerId }).catch((err: unknown) => this.log.warn("docker plugin: network kept", { network: dockerId.slice(0, 12), err }));
        this.startup.networksDropped++;
        continue;
      }
      const net = await getJson<Network>(this.engine.store, keys.network(link.network));
      if (net?.name === provisionalName(dockerId)) await driver.adoptName(net, info.Name);
    }
    // Endpoints: dockerd lists each network's containers with their endpoint ids.
    const liveEndpoints = new Set<string>();
    for (const id of new Set((await listJson<DockerEndpoint>(this.engine.store, dockerKeys.endpoints())).filter((e) => e.host === me).map((e) => e.dockerNetwork))) {
      const info = await this.docker.network(id);
      for (const c of Object.values(info?.Containers ?? {})) liveEndpoints.add(c.EndpointID);
    }
    for (const kv of (await this.engine.store.list(dockerKeys.endpoints())).items) {
      const ep = JSON.parse(kv.value) as DockerEndpoint;
      const id = kv.key.slice(dockerKeys.endpoints().length);
      if (ep.host !== me || liveEndpoints.has(id)) continue;
      await driver.deleteEndpoint({ NetworkID: ep.dockerNetwork, EndpointID: id });
      this.startup.endpointsDropped++;
    }
    await this.dropStrayDockerSandboxes();
    // Pools: every pool of this host must belong to a Docker network that uses knit's IPAM.
    const subnets = new Set(dockerNets.filter((n) => n.IPAM.Driver === this.opts.name).flatMap((n) => (n.IPAM.Config ?? []).map((c) => c.Subnet ?? "")));
    for (const pool of await listJson<DockerPool>(this.engine.store, dockerKeys.pools())) {
      if (pool.host !== me || subnets.has(pool.subnet)) continue;
      await this.engine.store.txn([], [{ type: "delete", key: dockerKeys.pool(pool.id) }, { type: "deletePrefix", prefix: dockerKeys.claimsOf(pool.id) }]);
      this.startup.poolsDropped++;
    }
  }

  /**
   * Docker sandboxes without Docker endpoints whose namespace is gone: what knit itself
   * connected there (`knit network connect NET <container>`) goes too.
   */
  private async dropStrayDockerSandboxes(): Promise<void> {
    const inUse = new Set((await listJson<DockerEndpoint>(this.engine.store, dockerKeys.endpoints())).map((e) => e.sandboxKey));
    for (const kv of (await this.engine.store.list(dockerKeys.sandboxesOf(hostName()))).items) {
      const sb = await getJson<Sandbox>(this.engine.store, keys.sandbox(kv.value));
      const key = decodeURIComponent(kv.key.slice(dockerKeys.sandboxesOf(hostName()).length));
      if (inUse.has(key) || existsSync(key)) continue;
      if (sb) {
        for (const m of await listJson<{ networkId: string; endpointId: string }>(this.engine.store, keys.membersOf(sb.id))) {
          if (!(await getJson<Endpoint>(this.engine.store, keys.endpoint(m.networkId, m.endpointId)))) continue;
          await disconnectSandbox(this.engine, m.networkId, sb, true).catch((err: unknown) => this.log.warn("docker plugin: cannot remove an endpoint", { err }));
        }
      }
      await forgetDockerSandbox(this.engine, key);
    }
  }
}

/** The served paths: every method of both protocols (anything else answers 404). */
function routes(net: DockerNetworkDriver, ipam: DockerIpamDriver): Map<string, Route> {
  const nd = (handle: (body: unknown) => unknown): Route => ({ handle: async (b) => handle(b), errorField: "Err" });
  const id = (handle: (body: unknown) => unknown): Route => ({ handle: async (b) => handle(b), errorField: "Error" });
  return new Map<string, Route>([
    ["/Plugin.Activate", nd(() => ({ Implements: ["NetworkDriver", "IpamDriver"] }))],
    ["/NetworkDriver.GetCapabilities", nd(() => net.getCapabilities())],
    ["/NetworkDriver.CreateNetwork", nd((b) => net.createNetwork(parseCreateNetwork(b)))],
    ["/NetworkDriver.DeleteNetwork", nd((b) => net.deleteNetwork(parseNetworkRequest(b, "DeleteNetwork")))],
    ["/NetworkDriver.CreateEndpoint", nd((b) => net.createEndpoint(parseCreateEndpoint(b)))],
    ["/NetworkDriver.EndpointOperInfo", nd((b) => net.endpointOperInfo(parseEndpointRequest(b, "EndpointOperInfo")))],
    ["/NetworkDriver.DeleteEndpoint", nd((b) => net.deleteEndpoint(parseEndpointRequest(b, "DeleteEndpoint")))],
    ["/NetworkDriver.Join", nd((b) => net.join(parseJoin(b)))],
    [
      "/NetworkDriver.Leave",
      nd((b) => {
        parseEndpointRequest(b, "Leave");
        return net.leave();
      }),
    ],
    ["/NetworkDriver.DiscoverNew", nd(() => ({}))],
    ["/NetworkDriver.DiscoverDelete", nd(() => ({}))],
    ["/NetworkDriver.ProgramExternalConnectivity", nd((b) => net.programExternalConnectivity(parseExternalConnectivity(b, "ProgramExternalConnectivity")))],
    ["/NetworkDriver.RevokeExternalConnectivity", nd((b) => net.revokeExternalConnectivity(parseEndpointRequest(b, "RevokeExternalConnectivity")))],
    ["/IpamDriver.GetCapabilities", id(() => ipam.getCapabilities())],
    ["/IpamDriver.GetDefaultAddressSpaces", id(() => ipam.getDefaultAddressSpaces())],
    ["/IpamDriver.RequestPool", id((b) => ipam.requestPool(parseRequestPool(b)))],
    ["/IpamDriver.ReleasePool", id((b) => ipam.releasePool(parsePoolId(b, "ReleasePool")))],
    ["/IpamDriver.RequestAddress", id((b) => ipam.requestAddress(parseRequestAddress(b)))],
    ["/IpamDriver.ReleaseAddress", id((b) => ipam.releaseAddress(parseReleaseAddress(b)))],
  ]);
}
