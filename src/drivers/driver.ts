/**
 * The network driver interface. One file per driver implements it; the registry
 * (drivers/registry.ts) maps each DriverName to its driver. A driver gets everything it needs
 * in one context object and never touches the store: the engine records intent, calls the
 * driver for kernel work, and records the outcome.
 */
import { invalid } from "../errors.ts";
export { checkIfname } from "../net/ifname.ts";
import type { Netns } from "../kernel/exec.ts";
import type { DriverName, Endpoint, Network } from "../model.ts";
import type { BridgeNetworkRules } from "../firewall/firewall.ts";
import type { Pool } from "../ipam/ipam.ts";

/** What a driver knows when it validates a new network. */
export interface PrepareContext {
  readonly id: string;
  readonly name: string;
  readonly options: Readonly<Record<string, string>>;
  readonly ipv6: boolean;
  readonly internal: boolean;
}

/** Derived, validated settings a driver keeps with the network (bridge name, mtu ...). */
export type DriverState = Record<string, string | number | boolean>;

export interface AttachContext {
  readonly network: Network;
  readonly pools: readonly Pool[];
  readonly endpoint: Endpoint;
  /** The sandbox's network namespace. */
  readonly netns: Netns;
  /**
   * The network's other ready endpoints on this host, read from the store only when called:
   * for a driver that finds a per-network object gone that they need too (macvlan's
   * host-access shim, with a route per endpoint) and makes it again.
   */
  readonly peers?: () => Promise<readonly Endpoint[]>;
}

export interface NetworkDriver {
  readonly name: DriverName;
  /** Scope shown in `network ls`. */
  readonly scope: "local" | "global";
  /** Option keys this driver accepts; anything else is refused by name. */
  readonly optionKeys: readonly string[];
  /**
   * May sandboxes join through `network connect` (bridge), or only at `run` (host, none)?
   * Also whether a user may create more networks of this driver.
   */
  readonly userNetworks: boolean;
  /**
   * Endpoints get addresses and MACs from IPAM and networks have subnets (bridge, macvlan,
   * overlay); otherwise endpoints are records only (host, none).
   */
  readonly addressed: boolean;
  /** Name of the endpoint's device on the host side, if the driver makes one. */
  hostIfname(endpointId: string): string | undefined;
  /** Validate options and derive the driver's state. Throws KnitError("invalid-argument"). */
  prepare(ctx: PrepareContext): DriverState;
  /**
   * Checks against the kernel and the host's other networks (`others`, in any state) before
   * anything is recorded: names in use, a parent device another network holds ... May return
   * settings learnt from the kernel (what the network will change on a shared device), which
   * are merged into the network's driverState before it is recorded.
   */
  precheck(network: Network, others: readonly Network[]): Promise<DriverState | void>;
  /** Create the network's kernel objects. Idempotent: existing, correct objects are kept. */
  ensureNetwork(network: Network, pools: readonly Pool[]): Promise<void>;
  /**
   * After ensureNetwork (`knit gc`): make again what the network's ready endpoints on this
   * host have outside their sandboxes, when it depends on a network object that ensureNetwork
   * may just have made again (macvlan's routes through the host-access shim). Idempotent.
   */
  ensureEndpoints?(network: Network, endpoints: readonly Endpoint[]): Promise<void>;
  /**
   * Remove the network's kernel objects; already gone is fine. `others` are the host's other
   * networks (any state but "deleting"): objects shared with them, such as a parent device
   * and what was changed on it, stay while they use them.
   */
  deleteNetwork(network: Network, others: readonly Network[]): Promise<void>;
  /**
   * Devices of the LAN this network joins (a macvlan parent), from the state prepare made:
   * routes through them describe that LAN, which the network's subnet may well be, so the
   * subnet overlap check ignores them.
   */
  lanDevices?(state: DriverState): readonly string[];
  /** Wire an endpoint into a sandbox namespace. Fails if the interface name exists there. */
  attach(ctx: AttachContext): Promise<void>;
  /** Unwire an endpoint; already gone is fine. */
  detach(network: Network, endpoint: Endpoint, netns: Netns | undefined): Promise<void>;
  /** The firewall description of this network, if it needs rules. */
  firewall(network: Network): BridgeNetworkRules | undefined;
}

/** Parse a boolean option the way Go's strconv.ParseBool does (Docker's parser). */
export function parseBoolOption(key: string, value: string): boolean {
  if (["1", "t", "T", "TRUE", "true", "True"].includes(value)) return true;
  if (["0", "f", "F", "FALSE", "false", "False"].includes(value)) return false;
  throw invalid(`invalid value "${value}" for option ${key}: expected true or false`);
}

/** Parse an integer option within bounds. */
export function parseIntOption(key: string, value: string, min: number, max: number): number {
  const n = /^\d+$/.test(value) ? Number(value) : NaN;
  if (!(n >= min && n <= max)) throw invalid(`invalid value "${value}" for option ${key}: expected a whole number from ${min} to ${max}`);
  return n;
}

/** Refuse option keys the driver does not know. */
export function checkOptionKeys(driver: string, keys: readonly string[], options: Readonly<Record<string, string>>): void {
  for (const key of Object.keys(options)) {
    if (!keys.includes(key)) {
      throw invalid(`unknown option "${key}" for the ${driver} driver`, keys.length ? `known options: ${keys.join(", ")}` : `the ${driver} driver takes no options`);
    }
  }
}

/**
 * A driver whose endpoints are records only (host, none): nothing to create or wire, no
 * options, no user-created networks.
 */
export function recordOnlyDriver(name: "host" | "null"): NetworkDriver {
  return {
    name,
    scope: "local",
    optionKeys: [],
    userNetworks: false,
    addressed: false,
    hostIfname: () => undefined,
    prepare(ctx) {
      checkOptionKeys(name, [], ctx.options);
      return {};
    },
    async precheck() {},
    async ensureNetwork() {},
    async deleteNetwork() {},
    async attach() {},
    async detach() {},
    firewall: () => undefined,
  };
}
