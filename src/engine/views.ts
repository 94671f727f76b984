/**
 * What `inspect` shows: Docker's JSON shapes for networks and sandboxes, filled from the
 * store. Front ends print these; the Docker plugin and CNI use the records directly.
 */
import { getJson } from "../store/store.ts";
import { keys, type Endpoint, type Network, type Sandbox } from "../model.ts";
import { listEndpoints, listMemberships } from "./endpoints.ts";
import { sandboxStatus } from "./sandboxes.ts";
import type { Engine } from "./engine.ts";
import { drivers } from "../drivers/registry.ts";
import { OverlayOptions } from "../drivers/overlay.ts";
import { portBindingsView, portsView } from "../ports/view.ts";

/** Docker's `network inspect` object. */
export interface NetworkView {
  Name: string;
  Id: string;
  Created: string;
  Scope: string;
  Driver: string;
  EnableIPv4: boolean;
  EnableIPv6: boolean;
  IPAM: { Driver: string; Options: Record<string, string>; Config: { Subnet: string; IPRange?: string; Gateway?: string; AuxiliaryAddresses?: Record<string, string> }[] };
  Internal: boolean;
  Attachable: boolean;
  Ingress: boolean;
  ConfigFrom: { Network: string };
  ConfigOnly: boolean;
  Containers: Record<string, { Name: string; EndpointID: string; MacAddress: string; IPv4Address: string; IPv6Address: string }>;
  Options: Record<string, string>;
  Labels: Record<string, string>;
}

export async function networkView(engine: Engine, net: Network): Promise<NetworkView> {
  const containers: NetworkView["Containers"] = {};
  for (const ep of await listEndpoints(engine, net.id)) {
    if (ep.state !== "ready") continue;
    const sb = await getJson<Sandbox>(engine.store, keys.sandbox(ep.sandboxId));
    containers[ep.sandboxId] = {
      Name: sb?.name ?? ep.sandboxId.slice(0, 12),
      EndpointID: ep.id,
      MacAddress: drivers[net.driver].addressed ? ep.mac : "",
      IPv4Address: ep.ipv4 ?? "",
      IPv6Address: ep.ipv6 ?? "",
    };
  }
  return {
    Name: net.name,
    Id: net.id,
    Created: net.created,
    Scope: net.scope,
    Driver: net.driver,
    EnableIPv4: drivers[net.driver].addressed,
    EnableIPv6: net.enableIPv6,
    IPAM: {
      Driver: "default",
      Options: {},
      Config: net.subnets.map((s) => ({
        Subnet: s.subnet,
        ...(s.ipRange ? { IPRange: s.ipRange } : {}),
        ...(s.gateway ? { Gateway: s.gateway } : {}),
        ...(Object.keys(s.auxAddresses).length ? { AuxiliaryAddresses: s.auxAddresses } : {}),
      })),
    },
    Internal: net.internal,
    Attachable: net.attachable,
    Ingress: false,
    ConfigFrom: { Network: "" },
    ConfigOnly: false,
    Containers: containers,
    // Docker shows an overlay network's VNI among its options.
    Options: net.driver === "overlay" ? { ...net.options, [OverlayOptions.vni]: String(net.driverState.vni ?? "") } : net.options,
    Labels: net.labels,
  };
}

/** One network's entry in a sandbox's NetworkSettings.Networks. */
function endpointSettings(net: Network, ep: Endpoint) {
  const [ip4, len4] = (ep.ipv4 ?? "/").split("/");
  const [ip6, len6] = (ep.ipv6 ?? "/").split("/");
  const gw = (family: 4 | 6): string =>
    net.internal ? "" : (net.subnets.find((s) => (family === 4) === !s.subnet.includes(":"))?.gateway ?? "");
  return {
    Aliases: ep.aliases,
    NetworkID: net.id,
    EndpointID: ep.id,
    Gateway: ep.ipv4 ? gw(4) : "",
    IPAddress: ip4 ?? "",
    IPPrefixLen: Number(len4 || 0),
    IPv6Gateway: ep.ipv6 ? gw(6) : "",
    GlobalIPv6Address: ip6 ?? "",
    GlobalIPv6PrefixLen: Number(len6 || 0),
    MacAddress: drivers[net.driver].addressed ? ep.mac : "",
    InterfaceName: ep.ifname,
  };
}

/** Docker-like `inspect` object for a sandbox. */
export async function sandboxView(engine: Engine, sb: Sandbox) {
  const networks: Record<string, ReturnType<typeof endpointSettings>> = {};
  for (const m of await listMemberships(engine, sb.id)) {
    const net = await getJson<Network>(engine.store, keys.network(m.networkId));
    const ep = await getJson<Endpoint>(engine.store, keys.endpoint(m.networkId, m.endpointId));
    if (net && ep) networks[net.name] = endpointSettings(net, ep);
  }
  const status = sandboxStatus(sb);
  return {
    Id: sb.id,
    Name: sb.name,
    Created: sb.created,
    Kind: sb.kind,
    State: { Status: status, Running: status === "running", Pid: status === "running" ? (sb.pid ?? 0) : 0 },
    Config: { Hostname: sb.hostname, Cmd: sb.command, Labels: sb.labels },
    HostConfig: {
      NetworkMode: sb.networkMode,
      AutoRemove: sb.autoRemove,
      PortBindings: portBindingsView(sb.ports ?? []),
      Dns: sb.dns?.servers ?? [],
      DnsSearch: sb.dns?.search ?? [],
      DnsOptions: sb.dns?.options ?? [],
    },
    NetworkSettings: { SandboxKey: sb.netnsPath, Ports: portsView(sb.ports ?? []), Networks: networks },
  };
}
