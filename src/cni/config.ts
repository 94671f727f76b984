/**
 * The configuration knit's plugins read (all three share it; each reads what it needs):
 *
 *   {
 *     "cniVersion": "1.1.0", "name": "front", "type": "knit",
 *     "network": "front",                  knit network to join (must exist); default: `name`,
 *                                          created from the fields below when missing
 *     "stateDir": "/var/lib/knit",         knit's state (default $KNIT_STATE_DIR, /var/lib/knit)
 *     "host": "node1",                     this host's name in knit's store (default $KNIT_HOST,
 *                                          else the hostname), as the agent's --name
 *     "driver": "bridge" | "macvlan",      for a network knit creates (default bridge)
 *     "bridge": "cni0", "ipMasq": true, "isGateway": true, "mtu": 1500, "hairpinMode": false,
 *     "master": "eth0", "mode": "bridge",  macvlan parent and mode
 *     "internal": false, "options": {Docker -o options}, "labels": {...},
 *     "ipam": {"type": "knit-ipam", "network": "...", "ranges": [[{"subnet","rangeStart",
 *              "rangeEnd","gateway"}]], "subnet", "gateway", "routes": [{"dst","gw"}]},
 *     "dns": {...}, "runtimeConfig": {...}, "args": {"cni": {"ips": [...]}}, "prevResult": {...}
 *   }
 *
 * Everything is decoded and validated here, before any plugin touches the store or kernel.
 */
import { CniCodes, CniError } from "./errors.ts";
import { Fields } from "./json.ts";
import { parseCniArgs, type Invocation, type LoadedConfig } from "./protocol.ts";
import { prevResultOf, type CniDns, type CniResult, type CniRoute } from "./result.ts";
import { DEFAULT_STATE_DIR } from "./defaults.ts";

/** One host-local range: a subnet, optionally narrowed and with its gateway. */
export interface IpamRange {
  subnet: string;
  rangeStart?: string;
  rangeEnd?: string;
  gateway?: string;
}

export interface IpamConf {
  type: string;
  /** The knit network to allocate from (`ipam.network`). */
  network?: string;
  /** host-local's `ranges`: one address per range set. */
  ranges: IpamRange[][];
  routes: CniRoute[];
}

/** `runtimeConfig.portMappings` entry. */
export interface PortMapEntry {
  hostPort: number;
  containerPort: number;
  protocol: string;
  hostIP: string;
}

/** `runtimeConfig.bandwidth`: rates in bit/s, bursts in bits. */
export interface Bandwidth {
  ingressRate?: number;
  ingressBurst?: number;
  egressRate?: number;
  egressBurst?: number;
}

export interface RuntimeConf {
  ips: string[];
  mac?: string;
  portMappings: PortMapEntry[];
  bandwidth?: Bandwidth;
  dns?: { servers: string[]; searches: string[]; options: string[] };
  aliases: string[];
  ipRanges?: IpamRange[][];
}

export interface PluginConf {
  readonly name: string;
  readonly cniVersion: LoadedConfig["cniVersion"];
  readonly type: string;
  readonly fields: Fields;
  readonly stateDir: string;
  /** This host's name in the store, when the configuration sets it (else KNIT_HOST or the hostname). */
  readonly host?: string;
  readonly network?: string;
  readonly ipam?: IpamConf;
  readonly runtime: RuntimeConf;
  readonly prevResult?: CniResult;
  /** The config's own `dns` key. */
  readonly dns?: CniDns;
  /** K8S_POD_NAME from CNI_ARGS (podman passes the container name there). */
  readonly podName?: string;
  /** Static addresses asked for, from runtimeConfig.ips, args.cni.ips or CNI_ARGS IP. */
  readonly staticIps: string[];
  readonly mac?: string;
}

const KNOWN_ARGS = ["IP", "MAC", "K8S_POD_NAME", "K8S_POD_NAMESPACE", "K8S_POD_INFRA_CONTAINER_ID", "K8S_POD_UID"] as const;

export { DEFAULT_STATE_DIR };

function parseRanges(list: unknown[], path: string): IpamRange[][] {
  return list.map((set, i) => {
    if (!Array.isArray(set)) throw new CniError(CniCodes.decode, `cannot decode ${path}[${i}]: expected an array of ranges`);
    if (set.length === 0) throw new CniError(CniCodes.invalidConfig, `${path}[${i}] is empty: a range set needs at least one range`);
    return set.map((r, j) => {
      const f = Fields.of(r, `${path}[${i}][${j}]`);
      const subnet = f.string("subnet");
      if (!subnet) throw new CniError(CniCodes.invalidConfig, `${f.path}.subnet is missing`);
      const range: IpamRange = { subnet };
      for (const key of ["rangeStart", "rangeEnd", "gateway"] as const) {
        const v = f.string(key);
        if (v) range[key] = v;
      }
      return range;
    });
  });
}

function parseRoutes(list: Fields[] | undefined): CniRoute[] {
  return (list ?? []).map((r) => {
    const dst = r.string("dst");
    if (!dst) throw new CniError(CniCodes.invalidConfig, `${r.path}.dst is missing`);
    const gw = r.string("gw");
    return gw ? { dst, gw } : { dst };
  });
}

function parseIpam(f: Fields): IpamConf {
  const type = f.string("type") ?? "";
  const conf: IpamConf = { type, ranges: [], routes: parseRoutes(f.objects("routes")) };
  const network = f.string("network");
  if (network) conf.network = network;
  const ranges = f.array("ranges");
  if (ranges) conf.ranges = parseRanges(ranges, `${f.path}.ranges`);
  // host-local's older single-range form.
  const subnet = f.string("subnet");
  if (subnet) {
    const range: IpamRange = { subnet };
    for (const key of ["rangeStart", "rangeEnd", "gateway"] as const) {
      const v = f.string(key);
      if (v) range[key] = v;
    }
    conf.ranges.unshift([range]);
  }
  return conf;
}

function parseRuntime(f: Fields | undefined, netName: string): RuntimeConf {
  const rc: RuntimeConf = { ips: [], portMappings: [], aliases: [] };
  if (!f) return rc;
  rc.ips = f.strings("ips") ?? [];
  const mac = f.string("mac");
  if (mac) rc.mac = mac;
  rc.portMappings = (f.objects("portMappings") ?? []).map((p) => ({
    hostPort: p.int("hostPort", -(2 ** 31), 2 ** 31 - 1) ?? 0,
    containerPort: p.int("containerPort", -(2 ** 31), 2 ** 31 - 1) ?? 0,
    protocol: (p.string("protocol") ?? "").toLowerCase(),
    hostIP: p.string("hostIP") ?? "",
  }));
  const bw = f.object("bandwidth");
  if (bw) {
    const b: Bandwidth = {};
    for (const key of ["ingressRate", "ingressBurst", "egressRate", "egressBurst"] as const) {
      const v = bw.int(key, 0, Number.MAX_SAFE_INTEGER);
      if (v !== undefined) b[key] = v;
    }
    rc.bandwidth = b;
  }
  const dns = f.object("dns");
  if (dns) rc.dns = { servers: dns.strings("servers") ?? [], searches: dns.strings("searches") ?? [], options: dns.strings("options") ?? [] };
  // The convention is a list; podman sends {"<network name>": [...]}.
  const aliases = f.raw("aliases");
  if (Array.isArray(aliases)) rc.aliases = f.strings("aliases") ?? [];
  else if (aliases !== undefined) rc.aliases = f.object("aliases")?.strings(netName) ?? [];
  const ipRanges = f.array("ipRanges");
  if (ipRanges) rc.ipRanges = parseRanges(ipRanges, `${f.path}.ipRanges`);
  return rc;
}

/** Decode a plugin configuration (already checked by loadConfig) with the invocation's CNI_ARGS. */
export function parsePluginConf(loaded: LoadedConfig, inv: Invocation, env: Record<string, string | undefined>): PluginConf {
  const f = loaded.fields;
  const type = f.string("type") ?? "";
  const runtime = parseRuntime(f.object("runtimeConfig"), loaded.name);
  const ipamFields = f.object("ipam");
  const ipam = ipamFields ? parseIpam(ipamFields) : undefined;
  if (ipam && runtime.ipRanges) ipam.ranges = runtime.ipRanges;
  const cniArgs = inv.command === "ADD" || inv.command === "DEL" || inv.command === "CHECK" ? parseCniArgs(inv.args, KNOWN_ARGS) : {};
  const argsIps = f.object("args")?.object("cni")?.strings("ips");
  // CONVENTIONS.md: runtimeConfig first, then args, and CNI_ARGS only when neither says.
  const staticIps = runtime.ips.length ? runtime.ips : argsIps?.length ? argsIps : (cniArgs.IP?.split(",").filter((s) => s !== "") ?? []);
  const mac = runtime.mac ?? cniArgs.MAC;
  const network = f.string("network");
  const host = f.string("host");
  const dnsFields = f.object("dns");
  const conf: PluginConf = {
    name: loaded.name,
    cniVersion: loaded.cniVersion,
    type,
    fields: f,
    stateDir: f.string("stateDir") || env.KNIT_STATE_DIR || DEFAULT_STATE_DIR,
    ...(host ? { host } : {}),
    ...(network ? { network } : {}),
    ...(ipam ? { ipam } : {}),
    runtime,
    staticIps,
    ...(mac ? { mac } : {}),
    ...(cniArgs.K8S_POD_NAME ? { podName: cniArgs.K8S_POD_NAME } : {}),
  };
  const prev = inv.command === "GC" || inv.command === "STATUS" ? undefined : prevResultOf(f, loaded.cniVersion);
  if (prev) Object.assign(conf, { prevResult: prev });
  if (dnsFields) {
    const dns: CniDns = {};
    const ns = dnsFields.strings("nameservers");
    if (ns) dns.nameservers = ns;
    const domain = dnsFields.string("domain");
    if (domain) dns.domain = domain;
    const search = dnsFields.strings("search");
    if (search) dns.search = search;
    const options = dnsFields.strings("options");
    if (options) dns.options = options;
    Object.assign(conf, { dns });
  }
  return conf;
}
