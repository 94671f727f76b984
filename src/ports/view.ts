/**
 * How published ports are shown: Docker's `inspect` maps (HostConfig.PortBindings as asked
 * for, NetworkSettings.Ports as bound) and `docker port` lines ("80/tcp -> 0.0.0.0:8080").
 */
import type { PortMapping, PortProtocol } from "../model.ts";
import { hostAddress, portKey } from "./spec.ts";

/** One host binding in Docker's inspect shape. */
export interface PortBindingView {
  HostIp: string;
  HostPort: string;
}

const v6 = (m: PortMapping): number => (m.hostIp.includes(":") ? 1 : 0);

/** Mappings sorted by container port, protocol, IPv4 before IPv6, host address and port. */
export function sortedMappings(mappings: readonly PortMapping[]): PortMapping[] {
  return [...mappings].sort(
    (a, b) => a.containerPort - b.containerPort || a.proto.localeCompare(b.proto) || v6(a) - v6(b) || a.hostIp.localeCompare(b.hostIp) || a.hostPort - b.hostPort,
  );
}

function group(mappings: readonly PortMapping[], binding: (m: PortMapping) => PortBindingView): Record<string, PortBindingView[]> {
  const out: Record<string, PortBindingView[]> = {};
  for (const m of sortedMappings(mappings)) (out[portKey(m.containerPort, m.proto)] ??= []).push(binding(m));
  return out;
}

/** HostConfig.PortBindings: what `-p` asked for ("" where it left the host IP or port out). */
export const portBindingsView = (mappings: readonly PortMapping[]): Record<string, PortBindingView[]> =>
  group(mappings, (m) => ({ HostIp: m.requested.hostIp, HostPort: m.requested.hostPort }));

/** NetworkSettings.Ports: what is published, with the host addresses and ports chosen. */
export const portsView = (mappings: readonly PortMapping[]): Record<string, PortBindingView[]> =>
  group(mappings, (m) => ({ HostIp: m.hostIp, HostPort: String(m.hostPort) }));

/**
 * `knit port` output: "80/tcp -> 0.0.0.0:8080" per mapping, or only the host side
 * ("0.0.0.0:8080") when asked about one container port.
 */
export function portLines(mappings: readonly PortMapping[], only?: { port: number; proto: PortProtocol }): string[] {
  const picked = sortedMappings(mappings).filter((m) => !only || (m.containerPort === only.port && m.proto === only.proto));
  return picked.map((m) => (only ? hostAddress(m.hostIp, m.hostPort) : `${portKey(m.containerPort, m.proto)} -> ${hostAddress(m.hostIp, m.hostPort)}`));
}
