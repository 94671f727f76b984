/**
 * `-p` / `--publish` syntax, as Docker reads it:
 *
 *   [hostIP:][hostPort[-hostPortEnd]:]containerPort[-containerPortEnd][/tcp|/udp]
 *
 * IPv6 host addresses go in brackets (`[::]:8080:80`); like Docker, an unbracketed IPv6 address
 * is also accepted because the last two colon-separated fields are always the ports. A host
 * port left out (`-p 80`, `-p 127.0.0.1::80`) means "any free port"; a host range with one
 * container port (`-p 8000-8010:80`) means "any free port of that range". Pure functions: no
 * store, no kernel.
 */
import { invalid, unsupported } from "../errors.ts";
import { formatIp, tryParseIp } from "../net/ip.ts";
import { PortProtocols, type PortProtocol } from "../model.ts";

/** An inclusive range of port numbers (start === end for one port). */
export interface PortRange {
  readonly start: number;
  readonly end: number;
}

/** One parsed `-p` value. */
export interface PortSpec {
  /** The value as given, for messages. */
  readonly raw: string;
  /** Canonical host address, or "" when left out (the network's default applies). */
  readonly hostIp: string;
  /** Host ports, or undefined when left out (pick free ones). */
  readonly hostPorts: PortRange | undefined;
  readonly containerPorts: PortRange;
  readonly proto: PortProtocol;
}

/**
 * One container port to publish. `hostPorts` undefined: any free port of the ephemeral range;
 * a range: any free port in it; start === end: exactly that port.
 */
export interface PortRequest {
  readonly raw: string;
  readonly hostIp: string;
  readonly hostPorts: PortRange | undefined;
  readonly containerPort: number;
  readonly proto: PortProtocol;
}

/** The range Docker picks free host ports from (`-p 80`). */
export const EPHEMERAL_PORTS: PortRange = { start: 49153, end: 65535 };

const HINT = "the form is [hostIP:][hostPort[-end]:]containerPort[-end][/tcp|/udp], e.g. -p 8080:80 or -p 127.0.0.1:5353:53/udp";

function bad(raw: string, why: string): never {
  throw invalid(`invalid -p "${raw}": ${why}`, HINT);
}

/** A port number 1-65535 or a range "a-b" with a <= b. */
function parseRange(raw: string, text: string, what: string): PortRange {
  if (text === "") bad(raw, `missing ${what}`);
  const m = /^(\d{1,10})(?:-(\d{1,10}))?$/.exec(text);
  if (!m) bad(raw, `${what} "${text}" is not a port number or a range like 8000-8010`);
  const start = Number(m[1]);
  const end = m[2] === undefined ? start : Number(m[2]);
  for (const n of [start, end]) {
    if (n < 1 || n > 65535) bad(raw, `${what} ${n} is out of range: ports are 1 to 65535`);
  }
  if (end < start) bad(raw, `${what} range ${text} ends before it starts`);
  return { start, end };
}

function parseProto(raw: string, text: string | undefined): PortProtocol {
  if (text === undefined) return "tcp";
  const p = text.toLowerCase();
  if (p === "") bad(raw, "missing protocol after '/'");
  if (p === "sctp") throw unsupported(`invalid -p "${raw}": knit publishes tcp and udp ports, not sctp`, HINT);
  const known = PortProtocols.find((k) => k === p);
  if (!known) bad(raw, `unknown protocol "${text}": use tcp or udp`);
  return known;
}

/** Host address as given: brackets removed, checked, canonical; "" when left out. */
function parseHostIp(raw: string, text: string): string {
  if (text === "") return "";
  const bracketed = /^\[(.*)\]$/.exec(text);
  const inner = bracketed ? (bracketed[1] ?? "") : text;
  const ip = tryParseIp(inner);
  if (!ip) bad(raw, `host IP "${text}" is not an IPv4 or IPv6 address`);
  if (bracketed && ip.family === 4) bad(raw, `host IP "${text}": brackets are for IPv6 addresses only`);
  return formatIp(ip);
}

const ports = (n: number): string => `${n} port${n === 1 ? "" : "s"}`;

/** Parse one `-p` value. Throws a KnitError saying what is wrong ("unsupported" for sctp). */
export function parsePortSpec(raw: string): PortSpec {
  if (raw.trim() === "") bad(raw, "empty port specification");
  if (/\s/.test(raw)) bad(raw, "contains whitespace");
  const slash = raw.split("/");
  if (slash.length > 2) bad(raw, "more than one '/'");
  const proto = parseProto(raw, slash[1]);
  const parts = (slash[0] ?? "").split(":");
  const n = parts.length;
  const containerText = parts[n - 1] ?? "";
  const hostPortText = n >= 2 ? (parts[n - 2] ?? "") : "";
  const hostIpText = n >= 3 ? parts.slice(0, n - 2).join(":") : "";
  const containerPorts = parseRange(raw, containerText, "container port");
  const hostPorts = hostPortText === "" ? undefined : parseRange(raw, hostPortText, "host port");
  const hostIp = parseHostIp(raw, hostIpText);
  if (hostPorts) {
    const hostLen = hostPorts.end - hostPorts.start;
    const containerLen = containerPorts.end - containerPorts.start;
    // Docker's rule: equal lengths map one to one; a host range with ONE container port means
    // "any one of these host ports"; anything else is an error.
    if (containerLen !== hostLen && containerLen !== 0) {
      bad(raw, `host range ${hostPortText} (${ports(hostLen + 1)}) and container range ${containerText} (${ports(containerLen + 1)}) differ in length`);
    }
  }
  return { raw, hostIp, hostPorts, containerPorts, proto };
}

/** The single-container-port requests a spec stands for, in container port order. */
export function expandPortSpec(spec: PortSpec): PortRequest[] {
  const { raw, hostIp, hostPorts, containerPorts, proto } = spec;
  const count = containerPorts.end - containerPorts.start + 1;
  if (count === 1) return [{ raw, hostIp, hostPorts, containerPort: containerPorts.start, proto }];
  return Array.from({ length: count }, (_, i) => {
    const host = hostPorts ? { start: hostPorts.start + i, end: hostPorts.start + i } : undefined;
    return { raw, hostIp, hostPorts: host, containerPort: containerPorts.start + i, proto };
  });
}

/** Parse and expand every `-p` value; the first bad one throws before anything is used. */
export function parsePublish(values: readonly string[]): PortRequest[] {
  return values.map(parsePortSpec).flatMap(expandPortSpec);
}

/** Docker's key for a container port: "80/tcp". */
export const portKey = (port: number, proto: PortProtocol): string => `${port}/${proto}`;

/** Host side of a mapping as Docker prints it: "0.0.0.0:8080", "[::]:8080". */
export const hostAddress = (hostIp: string, hostPort: number): string =>
  hostIp.includes(":") ? `[${hostIp}]:${hostPort}` : `${hostIp}:${hostPort}`;

/** Parse the PORT[/PROTO] filter of `knit port NAME PORT[/PROTO]`. */
export function parsePortFilter(text: string): { port: number; proto: PortProtocol } {
  if (text.includes(":")) throw invalid(`invalid port "${text}": give a container port, e.g. 80/tcp`);
  const spec = parsePortSpec(text);
  if (spec.containerPorts.start !== spec.containerPorts.end) throw invalid(`invalid port "${text}": give one port, e.g. 80/tcp`);
  return { port: spec.containerPorts.start, proto: spec.proto };
}
