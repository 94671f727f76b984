/**
 * What the Docker plugin keeps in the store, beside the engine's own records. Docker asks by
 * its own ids (network, endpoint, pool); these rows map them to knit's records.
 *
 *   docker/networks/<dockerNetworkId>      DockerNetworkLink: the knit network behind it
 *   docker/endpoints/<dockerEndpointId>    DockerEndpoint: what CreateEndpoint said (addresses,
 *                                          MAC), kept until DeleteEndpoint; Join makes the knit
 *                                          endpoint (same id) from it
 *   docker/sandboxes/<host>/<sandboxKey>   knit sandbox id standing for a Docker sandbox (its
 *                                          namespace path, URI-encoded)
 *   docker/pools/<poolId>                  DockerPool: a pool handed out by knit's IPAM driver
 *   docker/claims/<poolId>/<address>       an address of a pool no knit network holds yet
 *                                          (gateway and aux requests come before CreateNetwork;
 *                                          every request when the network driver is not knit's)
 *   meta/docker-pools                      bumped on every pool change (overlap checks)
 *
 * A knit network created for Docker has id = Docker's network id and the label
 * `knit.docker.network`; a Docker container's namespace is an external sandbox (kind
 * "container") with the label `knit.docker.sandbox`. Endpoints keep Docker's endpoint ids.
 */
import { conflict } from "../errors.ts";
import { keys } from "../model.ts";
import { getJson, type Store } from "../store/store.ts";
import type { StaticRoute } from "./protocol.ts";

export interface DockerNetworkLink {
  /** The knit network. */
  network: string;
  /** The host whose dockerd owns the Docker network. */
  host: string;
  /** True when knit created the network for this Docker network (else it joined an existing one). */
  created: boolean;
}

export interface DockerEndpoint {
  dockerNetwork: string;
  /** The knit network. */
  network: string;
  /** Addresses Docker's IPAM gave (CIDR), "" when none. */
  address: string;
  addressV6: string;
  mac: string;
  /** The device name handed to Docker at Join (in the host's namespace until Docker moves it). */
  srcName: string;
  host: string;
  /** After Join: the container's namespace, and the default routes the driver set (Join's answer). */
  sandboxKey?: string;
  gateways?: { v4?: string; v6?: string };
  /** Join's static routes (internal networks: the way to knit's DNS, see dns-redirect.ts). */
  routes?: StaticRoute[];
}

/** A pool of knit's IPAM driver. */
export interface DockerPool {
  id: string;
  /** The address space Docker asked in. */
  space: string;
  subnet: string;
  ipRange?: string;
  v6: boolean;
  /** Host of a local-space pool; absent for the global space. */
  host?: string;
  /** The knit network whose addresses this pool hands out, once there is one. */
  network?: string;
  /** True when the pool stands for a network that existed before (another host's overlay). */
  joined?: boolean;
}

export const dockerKeys = {
  network: (id: string) => `docker/networks/${id}`,
  networks: () => "docker/networks/",
  endpoint: (id: string) => `docker/endpoints/${id}`,
  endpoints: () => "docker/endpoints/",
  sandbox: (host: string, key: string) => `docker/sandboxes/${host}/${encodeURIComponent(key)}`,
  sandboxesOf: (host: string) => `docker/sandboxes/${host}/`,
  pool: (id: string) => `docker/pools/${id}`,
  pools: () => "docker/pools/",
  claim: (poolId: string, addr: string) => `docker/claims/${poolId}/${addr}`,
  claimsOf: (poolId: string) => `docker/claims/${poolId}/`,
  poolsMeta: () => "meta/docker-pools",
} as const;

/**
 * Holder value of a knit network address that knit's IPAM driver handed to Docker for an
 * endpoint: reserved until the endpoint's Join adopts it, or ReleaseAddress frees it.
 */
export const ipamHolder = (): string => "docker-ipam";

export const getLink = (store: Store, dockerNetworkId: string): Promise<DockerNetworkLink | undefined> =>
  getJson<DockerNetworkLink>(store, dockerKeys.network(dockerNetworkId));

export const getDockerEndpoint = (store: Store, id: string): Promise<DockerEndpoint | undefined> => getJson<DockerEndpoint>(store, dockerKeys.endpoint(id));

export const getPool = (store: Store, id: string): Promise<DockerPool | undefined> => getJson<DockerPool>(store, dockerKeys.pool(id));

/**
 * For knit's CLI: refuse to take a Docker container off a network behind Docker's back (Docker
 * would still show it connected, and move a device back that is gone).
 */
export async function refuseDockerEndpoint(store: Store, sb: { id: string; name: string }, net: { id: string; name: string }): Promise<void> {
  const m = await getJson<{ endpointId: string }>(store, keys.member(sb.id, net.id));
  if (m && (await store.get(dockerKeys.endpoint(m.endpointId)))) {
    throw conflict(`${sb.name} is connected to network ${net.name} by Docker`, `disconnect it with docker network disconnect ${net.name} ${sb.name}`);
  }
}
