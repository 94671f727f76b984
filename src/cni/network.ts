/**
 * Which knit network a CNI configuration means.
 *
 * - `"network": "front"` names a network made with `knit network create`; it must exist.
 *   This is how podman, any CNI runtime and knit sandboxes share one network.
 * - Without `network`, the knit network named like the CNI network (`name`) is used, and
 *   when it does not exist the knit plugin creates it from the configuration, as the
 *   reference bridge plugin creates its bridge: driver, bridge name, ipMasq, mtu, subnets from
 *   `ipam.ranges`. It is labelled `knit.cni.implicit=true` and stays until `knit network rm`
 *   (the reference bridge's device stays too). knit-ipam alone never creates a network: the
 *   kernel side belongs to another plugin, so its network must exist.
 *
 * Whatever the configuration states about an existing network (driver, bridge name,
 * subnets, gateways) must match it: a conflist that disagrees with the network is an error,
 * never silently ignored.
 */
import { CniCodes, CniError } from "./errors.ts";
import type { IpamRange, PluginConf } from "./config.ts";
import { KnitError } from "../errors.ts";
import type { Network } from "../model.ts";
import { findNetwork, type Engine } from "../engine/engine.ts";
import { createNetwork, type CreateNetworkRequest } from "../engine/networks.ts";
import { BridgeOptions } from "../drivers/bridge.ts";
import { MacvlanOptions } from "../drivers/macvlan.ts";
import { cidrContains, cidrLast, formatCidr, formatIp, parseCidr, parseIp, tryParseIp, type Cidr } from "../net/ip.ts";

export const ImplicitLabel = "knit.cni.implicit";

/** The knit network reference of a configuration (`ipam.network` counts for knit-ipam). */
export function networkRef(conf: PluginConf, forIpam = false): { ref: string; explicit: boolean } {
  const explicit = (forIpam ? conf.ipam?.network : undefined) ?? conf.network;
  return { ref: explicit ?? conf.name, explicit: explicit !== undefined };
}

const bad = (msg: string, details = ""): CniError => new CniError(CniCodes.invalidConfig, msg, details);

/** A host-local range narrowed by rangeStart/rangeEnd, as a CIDR (knit's --ip-range), or undefined for the whole subnet. */
export function rangeCidr(subnet: Cidr, r: IpamRange): string | undefined {
  if (!r.rangeStart && !r.rangeEnd) return undefined;
  const ip = (text: string, key: string) => {
    const v = tryParseIp(text);
    if (!v || v.family !== subnet.family || !cidrContains(subnet, v)) throw bad(`ipam range ${key} ${text} is not an address of ${formatCidr(subnet)}`);
    return v.value;
  };
  const start = r.rangeStart ? ip(r.rangeStart, "rangeStart") : subnet.base;
  const end = r.rangeEnd ? ip(r.rangeEnd, "rangeEnd") : cidrLast(subnet);
  if (end < start) throw bad(`ipam range ${r.rangeStart ?? ""}-${r.rangeEnd ?? ""} ends before it starts`);
  // host-local's default range: the subnet without its network and broadcast address.
  if ((start === subnet.base || start === subnet.base + 1n) && (end === cidrLast(subnet) || end === cidrLast(subnet) - 1n)) return undefined;
  const size = end - start + 1n;
  const bits = subnet.family === 4 ? 32 : 128;
  let prefix = bits;
  while (prefix > 0 && 1n << BigInt(bits - prefix) < size) prefix--;
  if (1n << BigInt(bits - prefix) !== size || start % size !== 0n) {
    throw bad(
      `ipam range ${r.rangeStart ?? formatIp({ family: subnet.family, value: start })}-${r.rangeEnd ?? formatIp({ family: subnet.family, value: end })} is not a CIDR block`,
      "knit allocates from a subnet or a CIDR part of it (Docker's --ip-range): give rangeStart/rangeEnd on a power-of-two boundary, e.g. 10.1.0.128-10.1.0.255",
    );
  }
  return formatCidr({ family: subnet.family, base: start, prefix });
}

/** The subnets, gateways and ranges a configuration's IPAM ranges describe. */
function ipamShape(conf: PluginConf): { subnets: string[]; gateways: string[]; ipRanges: string[] } {
  const out = { subnets: [] as string[], gateways: [] as string[], ipRanges: [] as string[] };
  const delegated = !!conf.ipam?.type && conf.ipam.type !== "knit-ipam";
  for (const set of conf.ipam?.ranges ?? []) {
    for (const r of set) {
      let subnet: Cidr;
      try {
        subnet = parseCidr(r.subnet, "ipam subnet", false);
      } catch (err) {
        throw bad(err instanceof Error ? err.message : String(err));
      }
      out.subnets.push(formatCidr(subnet));
      if (r.gateway) out.gateways.push(r.gateway);
      // A delegated IPAM plugin (host-local ...) narrows its ranges itself: knit only needs
      // the subnets it hands out of.
      const range = delegated ? undefined : rangeCidr(subnet, r);
      if (range) out.ipRanges.push(range);
    }
  }
  return out;
}

/** The `network create` request for a network the configuration describes. */
export function implicitRequest(conf: PluginConf): CreateNetworkRequest {
  const f = conf.fields;
  const driver = f.string("driver") ?? "bridge";
  const options: Record<string, string> = { ...(f.stringMap("options") ?? {}) };
  const mtu = f.int("mtu", 0, 65535);
  if (driver === "bridge") {
    const bridge = f.string("bridge");
    if (bridge) options[BridgeOptions.name] = bridge;
    const masq = f.bool("ipMasq");
    if (masq !== undefined) options[BridgeOptions.masquerade] = String(masq);
    if (f.bool("isGateway") === false) {
      throw new CniError(CniCodes.unsupportedField, "unsupported field isGateway=false", "a knit bridge network always holds its gateway; use \"internal\": true for a network without a way out");
    }
    if (mtu) options[BridgeOptions.mtu] = String(mtu);
  } else if (driver === "macvlan") {
    const master = f.string("master");
    if (master) options[MacvlanOptions.parent] = master;
    const mode = f.string("mode");
    if (mode) options[MacvlanOptions.mode] = mode;
    if (mtu) options[MacvlanOptions.mtu] = String(mtu);
  }
  const shape = ipamShape(conf);
  const labels = { ...(f.stringMap("labels") ?? {}), [ImplicitLabel]: "true" };
  return {
    name: conf.name,
    driver,
    subnets: shape.subnets,
    gateways: shape.gateways,
    ipRanges: shape.ipRanges,
    options,
    labels,
    internal: f.bool("internal") ?? false,
    ipv6: shape.subnets.some((s) => s.includes(":")),
  };
}

/** Everything the configuration states about an existing network must hold. */
export function verifyNetwork(conf: PluginConf, net: Network): void {
  const f = conf.fields;
  const mismatch = (what: string, want: string, have: string): CniError =>
    bad(`CNI network ${conf.name}: ${what} ${want} does not match knit network ${net.name} (${have})`, "remove the field from the configuration, or make it match `knit network inspect`");
  const driver = f.string("driver");
  if (driver && driver !== net.driver) throw mismatch("driver", driver, net.driver);
  const bridge = f.string("bridge");
  if (bridge && net.driver === "bridge" && bridge !== net.driverState.bridge) throw mismatch("bridge", bridge, String(net.driverState.bridge));
  const shape = ipamShape(conf);
  const have = net.subnets.map((s) => s.subnet);
  for (const s of shape.subnets) if (!have.includes(s)) throw mismatch("subnet", s, have.join(", "));
  for (const g of shape.gateways) {
    const ip = parseIp(g, "gateway");
    const owner = net.subnets.find((s) => cidrContains(parseCidr(s.subnet), ip));
    if (owner?.gateway !== formatIp(ip)) throw mismatch("gateway", g, net.subnets.map((s) => s.gateway ?? "none").join(", "));
  }
  for (const r of shape.ipRanges) if (!net.subnets.some((s) => s.ipRange === r)) throw mismatch("range", r, net.subnets.map((s) => s.ipRange ?? s.subnet).join(", "));
}

/** Wait (bounded) until a network another process is creating is ready. */
async function waitReady(engine: Engine, ref: string): Promise<Network | undefined> {
  const deadline = Date.now() + 15_000;
  for (;;) {
    const net = await findNetwork(engine, ref);
    if (!net || net.state === "ready") return net;
    if (net.state === "deleting") throw new CniError(CniCodes.tryAgain, `knit network ${net.name} is being removed`);
    if (Date.now() > deadline) throw new CniError(CniCodes.tryAgain, `knit network ${net.name} is still being created`);
    await Bun.sleep(10);
  }
}

/**
 * The knit network of a configuration, created from it when allowed (see the file comment).
 */
export async function resolveNetwork(engine: Engine, conf: PluginConf, opts: { create: boolean; forIpam?: boolean }): Promise<Network> {
  const { ref, explicit } = networkRef(conf, opts.forIpam);
  let net = await waitReady(engine, ref);
  if (!net) {
    if (explicit || !opts.create) {
      throw bad(`knit network "${ref}" does not exist`, `create it first, e.g. knit network create --subnet 10.88.0.0/16 ${ref}`);
    }
    const req = implicitRequest(conf);
    try {
      net = await createNetwork(engine, req);
    } catch (err) {
      // Another ADD created it a moment ago (this one then finds the name taken, or the
      // other's bridge route overlapping): use that one.
      if (!(err instanceof KnitError && err.code === "conflict")) throw err;
      net = await waitReady(engine, ref);
      if (!net) throw err;
    }
  }
  verifyNetwork(conf, net);
  return net;
}
