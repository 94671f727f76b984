/**
 * The JSON shapes of Docker's remote driver protocols (libnetwork's remote NetworkDriver and
 * IpamDriver), with Docker's own field names, and the checks that turn a decoded request body
 * into a typed one. Everything Docker sends is checked here before a handler sees it: a body
 * that is not what the protocol says is a syntactic problem (HTTP 400), never a half-done
 * operation.
 */

/**
 * A request that does not have the protocol's shape: answered with HTTP 400 (the protocol's
 * "syntactic problem"), unlike a well-formed request that cannot be done ({"Err": ...}).
 */
export class ProtocolError extends Error {
  override readonly name = "ProtocolError";
}

const invalid = (message: string): ProtocolError => new ProtocolError(message);

/** Content type of every plugin request and response. */
export const PLUGIN_CONTENT_TYPE = "application/vnd.docker.plugins.v1.2+json";

/** Option keys libnetwork puts into CreateNetwork's `Options`. */
export const NetworkOptionKeys = {
  /** The `-o` options of `docker network create`, as an object of strings. */
  generic: "com.docker.network.generic",
  enableIPv6: "com.docker.network.enable_ipv6",
  internal: "com.docker.network.internal",
} as const;

/** Option keys libnetwork puts into CreateEndpoint/Join/ProgramExternalConnectivity `Options`. */
export const EndpointOptionKeys = {
  portMap: "com.docker.network.portmap",
  exposedPorts: "com.docker.network.endpoint.exposedports",
} as const;

/** The IPAM option that marks a gateway request. */
export const REQUEST_ADDRESS_TYPE = "RequestAddressType";
export const GATEWAY_REQUEST = "com.docker.network.gateway";

/** One pool of a network as libnetwork passes it to a network driver (addresses in CIDR form). */
export interface IpamData {
  AddressSpace: string;
  Pool: string;
  Gateway: string;
  AuxAddresses: Record<string, string>;
}

export interface CreateNetworkRequest {
  NetworkID: string;
  Options: Record<string, unknown>;
  IPv4Data: IpamData[];
  IPv6Data: IpamData[];
}

export interface NetworkRequest {
  NetworkID: string;
}

export interface EndpointInterface {
  Address: string;
  AddressIPv6: string;
  MacAddress: string;
}

export interface CreateEndpointRequest {
  NetworkID: string;
  EndpointID: string;
  Interface: EndpointInterface;
  Options: Record<string, unknown>;
}

export interface EndpointRequest {
  NetworkID: string;
  EndpointID: string;
}

export interface JoinRequest extends EndpointRequest {
  SandboxKey: string;
  Options: Record<string, unknown>;
}

export interface ExternalConnectivityRequest extends EndpointRequest {
  Options: Record<string, unknown>;
}

/** A published port as libnetwork's types.PortBinding marshals it (Proto: 6 tcp, 17 udp, 132 sctp). */
export interface PortBinding {
  Proto: number;
  IP: string;
  Port: number;
  HostIP: string;
  HostPort: number;
  HostPortEnd: number;
}

/** A static route of Join's answer (RouteType 0: via NextHop; 1: on the link, NextHop ""). */
export interface StaticRoute {
  Destination: string;
  RouteType: number;
  NextHop: string;
}

export interface JoinResponse {
  InterfaceName: { SrcName: string; DstPrefix: string };
  Gateway?: string;
  GatewayIPv6?: string;
  StaticRoutes?: StaticRoute[];
  DisableGatewayService?: boolean;
}

export interface RequestPoolRequest {
  AddressSpace: string;
  Pool: string;
  SubPool: string;
  Options: Record<string, string>;
  V6: boolean;
}

export interface RequestAddressRequest {
  PoolID: string;
  Address: string;
  Options: Record<string, string>;
}

export interface ReleaseAddressRequest {
  PoolID: string;
  Address: string;
}

/** A decoded JSON object, or a 400 naming what is wrong. */
export function asObject(body: unknown, what: string): Record<string, unknown> {
  if (body === null || typeof body !== "object" || Array.isArray(body)) throw invalid(`${what}: the request body must be a JSON object`);
  return body as Record<string, unknown>;
}

/** A required string field (Docker always sends these). */
function str(o: Record<string, unknown>, key: string, what: string, required = true): string {
  const v = o[key];
  if (v === undefined || v === null) {
    if (required) throw invalid(`${what}: missing field ${key}`);
    return "";
  }
  if (typeof v !== "string") throw invalid(`${what}: field ${key} must be a string`);
  return v;
}

/** An optional object field (Go marshals an empty map as null). */
function obj(o: Record<string, unknown>, key: string, what: string): Record<string, unknown> {
  const v = o[key];
  if (v === undefined || v === null) return {};
  if (typeof v !== "object" || Array.isArray(v)) throw invalid(`${what}: field ${key} must be an object`);
  return v as Record<string, unknown>;
}

/** A map of strings (IPAM options, driver options). */
export function stringMap(v: unknown, what: string): Record<string, string> {
  if (v === undefined || v === null) return {};
  if (typeof v !== "object" || Array.isArray(v)) throw invalid(`${what} must be an object of strings`);
  const out: Record<string, string> = {};
  for (const [k, val] of Object.entries(v)) {
    if (typeof val !== "string") throw invalid(`${what}: value of ${k} must be a string`);
    out[k] = val;
  }
  return out;
}

/** Docker's ids: 64 lower-case hex digits. */
const ID_RE = /^[0-9a-f]{64}$/;

function id(o: Record<string, unknown>, key: string, what: string): string {
  const v = str(o, key, what);
  if (!ID_RE.test(v)) throw invalid(`${what}: ${key} "${v}" is not a Docker id (64 hex digits)`);
  return v;
}

function ipamData(v: unknown, what: string): IpamData[] {
  if (v === undefined || v === null) return [];
  if (!Array.isArray(v)) throw invalid(`${what} must be a list`);
  return v.map((item, i) => {
    const o = asObject(item, `${what}[${i}]`);
    return {
      AddressSpace: str(o, "AddressSpace", what, false),
      Pool: str(o, "Pool", what),
      Gateway: str(o, "Gateway", what, false),
      AuxAddresses: stringMap(o.AuxAddresses, `${what}[${i}].AuxAddresses`),
    };
  });
}

export function parseCreateNetwork(body: unknown): CreateNetworkRequest {
  const w = "CreateNetwork";
  const o = asObject(body, w);
  return { NetworkID: id(o, "NetworkID", w), Options: obj(o, "Options", w), IPv4Data: ipamData(o.IPv4Data, "IPv4Data"), IPv6Data: ipamData(o.IPv6Data, "IPv6Data") };
}

export function parseNetworkRequest(body: unknown, w: string): NetworkRequest {
  return { NetworkID: id(asObject(body, w), "NetworkID", w) };
}

export function parseEndpointRequest(body: unknown, w: string): EndpointRequest {
  const o = asObject(body, w);
  return { NetworkID: id(o, "NetworkID", w), EndpointID: id(o, "EndpointID", w) };
}

export function parseCreateEndpoint(body: unknown): CreateEndpointRequest {
  const w = "CreateEndpoint";
  const o = asObject(body, w);
  const i = obj(o, "Interface", w);
  return {
    ...parseEndpointRequest(o, w),
    Interface: { Address: str(i, "Address", w, false), AddressIPv6: str(i, "AddressIPv6", w, false), MacAddress: str(i, "MacAddress", w, false) },
    Options: obj(o, "Options", w),
  };
}

export function parseJoin(body: unknown): JoinRequest {
  const w = "Join";
  const o = asObject(body, w);
  const key = str(o, "SandboxKey", w);
  if (!key.startsWith("/")) throw invalid(`${w}: SandboxKey "${key}" is not an absolute path`);
  return { ...parseEndpointRequest(o, w), SandboxKey: key, Options: obj(o, "Options", w) };
}

export function parseExternalConnectivity(body: unknown, w: string): ExternalConnectivityRequest {
  const o = asObject(body, w);
  return { ...parseEndpointRequest(o, w), Options: obj(o, "Options", w) };
}

/** The port bindings in an Options map (`com.docker.network.portmap`), checked. */
export function portBindings(options: Record<string, unknown>): PortBinding[] {
  const v = options[EndpointOptionKeys.portMap];
  if (v === undefined || v === null) return [];
  if (!Array.isArray(v)) throw invalid(`${EndpointOptionKeys.portMap} must be a list`);
  return v.map((item, i) => {
    const o = asObject(item, `${EndpointOptionKeys.portMap}[${i}]`);
    const num = (k: string): number => {
      const n = o[k] ?? 0;
      if (typeof n !== "number" || !Number.isInteger(n) || n < 0 || n > 65535) throw invalid(`${EndpointOptionKeys.portMap}[${i}].${k} must be a port number`);
      return n;
    };
    const text = (k: string): string => {
      const s = o[k] ?? "";
      if (typeof s !== "string") throw invalid(`${EndpointOptionKeys.portMap}[${i}].${k} must be a string`);
      return s;
    };
    return { Proto: num("Proto"), IP: text("IP"), Port: num("Port"), HostIP: text("HostIP"), HostPort: num("HostPort"), HostPortEnd: num("HostPortEnd") };
  });
}

export function parseRequestPool(body: unknown): RequestPoolRequest {
  const w = "RequestPool";
  const o = asObject(body, w);
  const v6 = o.V6 ?? false;
  if (typeof v6 !== "boolean") throw invalid(`${w}: field V6 must be true or false`);
  return { AddressSpace: str(o, "AddressSpace", w), Pool: str(o, "Pool", w, false), SubPool: str(o, "SubPool", w, false), Options: stringMap(o.Options, `${w} Options`), V6: v6 };
}

export function parsePoolId(body: unknown, w: string): string {
  return str(asObject(body, w), "PoolID", w);
}

export function parseRequestAddress(body: unknown): RequestAddressRequest {
  const w = "RequestAddress";
  const o = asObject(body, w);
  return { PoolID: str(o, "PoolID", w), Address: str(o, "Address", w, false), Options: stringMap(o.Options, `${w} Options`) };
}

export function parseReleaseAddress(body: unknown): ReleaseAddressRequest {
  const w = "ReleaseAddress";
  const o = asObject(body, w);
  return { PoolID: str(o, "PoolID", w), Address: str(o, "Address", w) };
}

/** A boolean option libnetwork marshals as a JSON boolean (older daemons: a string). */
export function boolOption(options: Record<string, unknown>, key: string): boolean {
  const v = options[key];
  if (v === undefined || v === null) return false;
  if (typeof v === "boolean") return v;
  if (v === "true" || v === "false") return v === "true";
  throw invalid(`option ${key} must be true or false`);
}
