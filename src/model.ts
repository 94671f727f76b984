/**
 * The records knit keeps in the store, and the key layout. Everything the engine knows
 * about a network, an endpoint or a sandbox is one JSON value under one key.
 *
 * Key layout (all under the store's root):
 *   networks/<id>                   Network
 *   names/<host>/networks/<name>    network id (local networks: names are per host)
 *   names/global/networks/<name>    network id (global networks: names are cluster-wide)
 *   meta/networks                   bumped on every network create/rm (overlap check is
 *                                   an optimistic transaction on its version)
 *   ipam/<netId>/<address>          endpoint id holding the address (or "gateway"/"aux:<n>")
 *   cursor/<netId>/<family>         last address handed out (where the next search starts)
 *   endpoints/<netId>/<endpointId>  Endpoint
 *   sandboxes/<id>                  Sandbox
 *   names/<host>/sandboxes/<name>   sandbox id
 *   ifnames/<sandboxId>/<ifname>    endpoint id (one interface name per sandbox)
 *   members/<sandboxId>/<netId>     Membership (a sandbox joins a network once)
 *   pending/{networks,endpoints/<netId>,sandboxes}/<id>
 *                                   owner of an operation under way (reconcile reads these)
 *   ports/<host>/<proto>/<hostPort> PortClaims: which sandbox holds the port on which host IP
 *                                   of that host (a published port is per host, as Docker's)
 *   meta/ports                      bumped on every publish/unpublish (firewall rebuilds)
 *   agents/<hostname>               AgentClaim: the one live `knit agent` of a host
 *   hosts/<hostname>                HostRecord, under the host's lease (cluster membership:
 *                                   the key vanishes when the host's agent stops renewing it)
 *   evicted/<hostname>              set by `knit host rm -f` of a registered host, under a lease
 *                                   of its own: the host's agent stops renewing its registration
 *                                   instead of registering again (restarting it joins again)
 *   vni/<n>                         network id holding VXLAN network identifier n (overlay)
 *   docker/...                      the Docker plugin's maps from Docker's ids to these
 *                                   records (layout in src/plugin/records.ts)
 */

/** Labels on records the Docker plugin (src/plugin) manages. */
export const DockerLabels = {
  /** On a network made by `docker network create -d knit`: the Docker network's id. */
  network: "knit.docker.network",
  /** On the external sandbox standing for a Docker container's namespace: Docker's sandbox key. */
  sandbox: "knit.docker.sandbox",
} as const;

export const DriverNames = ["bridge", "host", "null", "macvlan", "overlay"] as const;
export type DriverName = (typeof DriverNames)[number];

/** One IPAM pool of a network, as Docker's IPAM.Config entry. */
export interface SubnetConfig {
  subnet: string;
  gateway?: string;
  ipRange?: string;
  auxAddresses: Record<string, string>;
}

/** Lifecycle of a network or sandbox record: intent first, kernel second, then ready. */
export type RecordState = "creating" | "ready" | "deleting";

export interface Network {
  id: string;
  /** The host a local-scope network lives on; absent for global (cluster-wide) networks. */
  host?: string;
  state: RecordState;
  owner?: Owner;
  name: string;
  driver: DriverName;
  /** "local" for single-host drivers. */
  scope: "local" | "global" | "swarm";
  created: string;
  internal: boolean;
  attachable: boolean;
  enableIPv6: boolean;
  /** True for the predefined bridge, host and none networks. */
  predefined: boolean;
  /** True when the user gave no --subnet (a pool was picked). */
  defaultPool: boolean;
  subnets: SubnetConfig[];
  /** Options exactly as given by the user (Docker shows them in inspect). */
  options: Record<string, string>;
  labels: Record<string, string>;
  /** Driver settings derived from options (bridge name, mtu, ...), fixed at creation. */
  driverState: Record<string, string | number | boolean>;
}

/** Lifecycle of an endpoint: intent recorded first, kernel changes second, then ready. */
export type EndpointState = RecordState;

/** Who is working on a record right now; a dead owner means a crashed command. */
export interface Owner {
  pid: number;
  /** Process start time (from /proc/PID/stat), so a reused PID is not mistaken for it. */
  startTime: string;
  host: string;
}

export interface Endpoint {
  id: string;
  networkId: string;
  sandboxId: string;
  state: EndpointState;
  owner?: Owner;
  /** Interface name inside the sandbox. */
  ifname: string;
  /** Host-side device name (veth peer), if the driver makes one. */
  hostIfname?: string;
  mac: string;
  ipv4?: string; // address/prefix
  ipv6?: string; // address/prefix
  aliases: string[];
  created: string;
  /**
   * The host the endpoint lives on (set by connect). Peers of a global (overlay) network send
   * an endpoint's traffic to this host's underlay address; a host that vanishes loses them.
   */
  host?: string;
}

/** A sandbox's place on a network: which endpoint, under which interface name. */
export interface Membership {
  endpointId: string;
  networkId: string;
  ifname: string;
}

export type SandboxKind =
  | "knit" // created by `knit run`: knit owns its namespace
  | "netns" // an existing named or path namespace (ip netns, CNI, ...)
  | "container"; // a Docker or podman container, reached through its PID

export interface Sandbox {
  id: string;
  /** The host the sandbox lives on. */
  host: string;
  name: string;
  kind: SandboxKind;
  hostname: string;
  /** Path of its network namespace; "host" for --network host; empty for none-yet. */
  netnsPath: string;
  /** Name under /run/netns when knit created it. */
  netnsName?: string;
  /** Process running the command (knit sandboxes). */
  pid?: number;
  pidStartTime?: string;
  command: string[];
  created: string;
  /** Networks requested at run time, in order (names or ids). */
  networkMode: string;
  state: RecordState;
  owner?: Owner;
  /** Directory holding hosts, resolv.conf and the log of a knit sandbox. */
  dir?: string;
  autoRemove: boolean;
  labels: Record<string, string>;
  /** Published ports (`knit run -p`), claimed under `ports/` in the sandbox's first transaction. */
  ports?: PortMapping[];
  /** DNS settings given at run time (absent: the host's). */
  dns?: DnsSettings;
}

/** `knit run --dns/--dns-search/--dns-option`: what the sandbox's resolver uses. */
export interface DnsSettings {
  /** Upstream servers (addresses): in resolv.conf on the predefined bridge, else behind knit's DNS. */
  servers: string[];
  search: string[];
  options: string[];
}

/** The agent that holds a host (see src/agent): its process and how it was started. */
export interface AgentClaim extends Owner {
  /** "auto": started on demand and stopped when no sandbox needs it; "service": stays. */
  mode: "auto" | "service";
}

/**
 * A member of the cluster, as its agent registers it under `hosts/<name>` with a lease: the
 * key exists while the agent renews the lease, so "alive" is "the key is there".
 */
export interface HostRecord {
  name: string;
  /** Underlay address: where VXLAN traffic for this host's endpoints goes (the VTEP). */
  address: string;
  /** Underlay device the address is on. */
  device: string;
  /** MTU of the underlay device (overlay devices get 50 less unless a network sets its own). */
  mtu: number;
  /** The agent holding the registration. */
  pid: number;
  /** When the agent registered (ISO time). */
  started: string;
  /** Lease time to live, in seconds. */
  ttl: number;
}

/**
 * Name of the per-host network that gives overlay endpoints their way out (Docker's
 * docker_gwbridge): a local bridge network with masquerade and without inter-container
 * traffic. knit creates it on first use unless the user made one under this name.
 */
export const GW_BRIDGE_NETWORK = "docker_gwbridge";

/**
 * Where sandboxes of `--internal` overlay networks ask knit's DNS (they have no
 * docker_gwbridge): a link-local address that each host puts on the bridge of every internal
 * overlay network it has endpoints of, and that a sandbox reaches through its overlay
 * interface (one host route). Replies find their way back by a policy rule of the host's
 * that only traffic from this address uses. See src/cluster/overlay-dns.ts.
 */
export const OVERLAY_DNS_ADDRESS = "169.254.53.53";

/** Protocols a port can be published for. */
export const PortProtocols = ["tcp", "udp"] as const;
export type PortProtocol = (typeof PortProtocols)[number];

/**
 * A published port: traffic to hostIp:hostPort (proto) is DNATed to the sandbox's address on
 * network `networkId`, port `containerPort`.
 */
export interface PortMapping {
  proto: PortProtocol;
  containerPort: number;
  /** Canonical host address; "0.0.0.0" or "::" stands for every address of the family. */
  hostIp: string;
  hostPort: number;
  /** The network whose endpoint receives the traffic (the sandbox's first network). */
  networkId: string;
  /** What was asked for (inspect's PortBindings): host IP and port as given, "" when left out. */
  requested: { hostIp: string; hostPort: string };
}

/** Holders of one protocol's host port: host IP (canonical, or a wildcard) -> sandbox id. */
export type PortClaims = Record<string, string>;

export const keys = {
  network: (id: string) => `networks/${id}`,
  networks: () => "networks/",
  /** Name claims: per host for local networks and sandboxes, cluster-wide for global networks. */
  networkName: (name: string, host: string | undefined) => (host === undefined ? `names/global/networks/${name}` : `names/${host}/networks/${name}`),
  networksMeta: () => "meta/networks",
  ipam: (netId: string, addr: string) => `ipam/${netId}/${addr}`,
  ipamPrefix: (netId: string) => `ipam/${netId}/`,
  cursor: (netId: string, family: 4 | 6) => `cursor/${netId}/${family}`,
  cursorPrefix: (netId: string) => `cursor/${netId}/`,
  endpoint: (netId: string, epId: string) => `endpoints/${netId}/${epId}`,
  endpointsOf: (netId: string) => `endpoints/${netId}/`,
  endpoints: () => "endpoints/",
  sandbox: (id: string) => `sandboxes/${id}`,
  sandboxes: () => "sandboxes/",
  sandboxName: (host: string, name: string) => `names/${host}/sandboxes/${name}`,
  ifname: (sbId: string, ifname: string) => `ifnames/${sbId}/${ifname}`,
  ifnamesOf: (sbId: string) => `ifnames/${sbId}/`,
  member: (sbId: string, netId: string) => `members/${sbId}/${netId}`,
  membersOf: (sbId: string) => `members/${sbId}/`,
  /** Bumped by every join of a sandbox (guards forgetting an external sandbox). */
  joins: (sbId: string) => `joins/${sbId}`,
  /** In-flight operations; reconcile lists only these, so repair costs O(pending). */
  pendingEndpoint: (netId: string, epId: string) => `pending/endpoints/${netId}/${epId}`,
  pendingEndpointsOf: (netId: string) => `pending/endpoints/${netId}/`,
  pendingEndpoints: () => "pending/endpoints/",
  pendingSandbox: (id: string) => `pending/sandboxes/${id}`,
  pendingSandboxes: () => "pending/sandboxes/",
  pendingNetwork: (id: string) => `pending/networks/${id}`,
  pendingNetworks: () => "pending/networks/",
  /** Host port claims, one key per host, protocol and port (see PortClaims). */
  port: (host: string, proto: string, hostPort: number) => `ports/${host}/${proto}/${hostPort}`,
  /** The port claims of one host. */
  portsOf: (host: string) => `ports/${host}/`,
  ports: () => "ports/",
  portsMeta: () => "meta/ports",
  /** The agent claim of a host (one live agent per host and store). */
  agent: (host: string) => `agents/${host}`,
  /** Cluster membership of a host (a leased key, see HostRecord). */
  host: (name: string) => `hosts/${name}`,
  hosts: () => "hosts/",
  /** A host removed with `knit host rm -f` while registered (see HostRecord). */
  evicted: (name: string) => `evicted/${name}`,
  /** VXLAN network identifier claims of overlay networks. */
  vni: (vni: number) => `vni/${vni}`,
  vnis: () => "vni/",
} as const;
