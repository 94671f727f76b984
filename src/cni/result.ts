/**
 * CNI results in every format knit speaks. Internally a result is the 1.1.0 shape; it is
 * printed in the version the configuration asked for:
 *
 *   1.1.0          interfaces[{name,mac,mtu,sandbox,socketPath,pciID}], ips[{address,gateway,
 *                  interface}], routes[{dst,gw,mtu,advmss,priority,table,scope}], dns
 *   1.0.0          the same without the 1.1.0 additions (interface mtu/socketPath/pciID,
 *                  route mtu/advmss/priority/table/scope)
 *   0.3.0-0.4.0    as 1.0.0, and every ip carries "version": "4" | "6"
 *   0.1.0, 0.2.0   {ip4: {ip, gateway, routes}, ip6: {...}, dns}
 *
 * `prevResult` arrives in the configuration's version and is read back into the internal shape.
 * Field presence follows Go's `omitempty` on the reference types, so that runtimes that diff
 * results (or cache them) see what they would see from a Go plugin.
 */
import { CniCodes, CniError } from "./errors.ts";
import { Fields, isObject } from "./json.ts";
import { versionAtLeast, type CniVersion } from "./protocol.ts";

export interface CniInterface {
  name: string;
  mac?: string;
  mtu?: number;
  sandbox?: string;
  socketPath?: string;
  pciID?: string;
}

export interface CniIp {
  /** CIDR: address with the subnet's prefix length. */
  address: string;
  gateway?: string;
  /** Index into `interfaces`. */
  interface?: number;
}

export interface CniRoute {
  dst: string;
  gw?: string;
  mtu?: number;
  advmss?: number;
  priority?: number;
  table?: number;
  scope?: number;
}

export interface CniDns {
  nameservers?: string[];
  domain?: string;
  search?: string[];
  options?: string[];
}

/** A result in the internal (1.1.0) shape. */
export interface CniResult {
  interfaces: CniInterface[];
  ips: CniIp[];
  routes: CniRoute[];
  dns: CniDns;
}

export const emptyResult = (): CniResult => ({ interfaces: [], ips: [], routes: [], dns: {} });

const familyOf = (cidr: string): "4" | "6" => (cidr.includes(":") ? "6" : "4");

function dnsOut(dns: CniDns): CniDns {
  const out: CniDns = {};
  if (dns.nameservers?.length) out.nameservers = dns.nameservers;
  if (dns.domain) out.domain = dns.domain;
  if (dns.search?.length) out.search = dns.search;
  if (dns.options?.length) out.options = dns.options;
  return out;
}

function routeOut(r: CniRoute, rich: boolean): CniRoute {
  const out: CniRoute = { dst: r.dst };
  if (r.gw) out.gw = r.gw;
  if (rich) {
    if (r.mtu) out.mtu = r.mtu;
    if (r.advmss) out.advmss = r.advmss;
    if (r.priority) out.priority = r.priority;
    if (r.table) out.table = r.table;
    if (r.scope !== undefined) out.scope = r.scope;
  }
  return out;
}

/** The result as the JSON object of `version`. */
export function formatResult(res: CniResult, version: CniVersion): Record<string, unknown> {
  if (!versionAtLeast(version, "0.3.0")) return formatLegacy(res, version);
  const rich = versionAtLeast(version, "1.1.0");
  const versioned = !versionAtLeast(version, "1.0.0");
  const out: Record<string, unknown> = { cniVersion: version };
  if (res.interfaces.length) {
    out.interfaces = res.interfaces.map((i) => {
      const o: CniInterface = { name: i.name };
      if (i.mac) o.mac = i.mac;
      if (rich && i.mtu) o.mtu = i.mtu;
      if (i.sandbox) o.sandbox = i.sandbox;
      if (rich && i.socketPath) o.socketPath = i.socketPath;
      if (rich && i.pciID) o.pciID = i.pciID;
      return o;
    });
  }
  if (res.ips.length) {
    out.ips = res.ips.map((ip) => {
      const o: Record<string, unknown> = versioned ? { version: familyOf(ip.address) } : {};
      o.address = ip.address;
      if (ip.gateway) o.gateway = ip.gateway;
      if (ip.interface !== undefined) o.interface = ip.interface;
      return o;
    });
  }
  if (res.routes.length) out.routes = res.routes.map((r) => routeOut(r, rich));
  out.dns = dnsOut(res.dns);
  return out;
}

/** 0.1.0 / 0.2.0: one address per family, routes split by family. */
function formatLegacy(res: CniResult, version: CniVersion): Record<string, unknown> {
  const out: Record<string, unknown> = { cniVersion: version };
  for (const fam of ["4", "6"] as const) {
    const ip = res.ips.find((i) => familyOf(i.address) === fam);
    if (!ip) continue;
    const block: Record<string, unknown> = { ip: ip.address };
    if (ip.gateway) block.gateway = ip.gateway;
    const routes = res.routes.filter((r) => familyOf(r.dst) === fam).map((r) => routeOut(r, false));
    if (routes.length) block.routes = routes;
    out[`ip${fam}`] = block;
  }
  out.dns = dnsOut(res.dns);
  return out;
}

/** Read a result (a prevResult, or a delegated plugin's output) of `version` into the internal shape. */
export function parseResult(value: unknown, version: string, what = "prevResult"): CniResult {
  const f = Fields.of(value, what);
  const res = emptyResult();
  const legacy = /^0\.[12]\./.test(version) || (!f.has("ips") && !f.has("interfaces") && (f.has("ip4") || f.has("ip6")));
  if (legacy) {
    for (const fam of ["ip4", "ip6"]) {
      const block = f.object(fam);
      if (!block) continue;
      const address = block.string("ip");
      if (!address) throw new CniError(CniCodes.decode, `${what}.${fam}.ip is missing`);
      const gateway = block.string("gateway");
      res.ips.push(gateway ? { address, gateway } : { address });
      for (const r of block.objects("routes") ?? []) res.routes.push(parseRoute(r));
    }
  } else {
    for (const i of f.objects("interfaces") ?? []) {
      const iface: CniInterface = { name: i.string("name") ?? "" };
      const mac = i.string("mac");
      if (mac) iface.mac = mac;
      const mtu = i.int("mtu", 0, 0xffffffff);
      if (mtu) iface.mtu = mtu;
      const sandbox = i.string("sandbox");
      if (sandbox) iface.sandbox = sandbox;
      const socketPath = i.string("socketPath");
      if (socketPath) iface.socketPath = socketPath;
      const pciID = i.string("pciID");
      if (pciID) iface.pciID = pciID;
      res.interfaces.push(iface);
    }
    for (const i of f.objects("ips") ?? []) {
      const address = i.string("address");
      if (!address) throw new CniError(CniCodes.decode, `${i.path}.address is missing`);
      const ip: CniIp = { address };
      const gateway = i.string("gateway");
      if (gateway) ip.gateway = gateway;
      const index = i.int("interface", 0, 0xffffffff);
      if (index !== undefined) ip.interface = index;
      res.ips.push(ip);
    }
    for (const r of f.objects("routes") ?? []) res.routes.push(parseRoute(r));
  }
  const dns = f.object("dns");
  if (dns) {
    const nameservers = dns.strings("nameservers");
    if (nameservers) res.dns.nameservers = nameservers;
    const domain = dns.string("domain");
    if (domain) res.dns.domain = domain;
    const search = dns.strings("search");
    if (search) res.dns.search = search;
    const options = dns.strings("options");
    if (options) res.dns.options = options;
  }
  return res;
}

function parseRoute(r: Fields): CniRoute {
  const dst = r.string("dst");
  if (!dst) throw new CniError(CniCodes.decode, `${r.path}.dst is missing`);
  const out: CniRoute = { dst };
  const gw = r.string("gw");
  if (gw) out.gw = gw;
  for (const key of ["mtu", "advmss", "priority", "table", "scope"] as const) {
    const v = r.int(key, 0, 0xffffffff);
    if (v !== undefined) out[key] = v;
  }
  return out;
}

/** The prevResult of a configuration, if it has one. */
export function prevResultOf(conf: Fields, version: string): CniResult | undefined {
  const v = conf.raw("prevResult");
  if (v === undefined) return undefined;
  if (!isObject(v)) throw new CniError(CniCodes.decode, "cannot decode config.prevResult: expected an object");
  return parseResult(v, version);
}

/**
 * A chained plugin's output: `prev` with `mine` added (interfaces appended, the indexes of
 * mine shifted after them).
 */
export function mergeResults(prev: CniResult | undefined, mine: CniResult): CniResult {
  if (!prev) return mine;
  const shift = prev.interfaces.length;
  return {
    interfaces: [...prev.interfaces, ...mine.interfaces],
    ips: [...prev.ips, ...mine.ips.map((ip) => (ip.interface === undefined ? ip : { ...ip, interface: ip.interface + shift }))],
    routes: [...prev.routes, ...mine.routes],
    dns: Object.keys(mine.dns).length ? mine.dns : prev.dns,
  };
}
