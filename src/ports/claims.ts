/**
 * Host port claims in the store: who holds which host port, so that two sandboxes can never
 * publish the same one, even when two `knit run` commands race.
 *
 * Design note. There is one key per host, protocol and host port, `ports/<host>/<proto>/<port>`,
 * holding every claim on that port as `{ hostIp: sandboxId }`. A published port belongs to the
 * host that publishes it (Docker's `-p 8080:80` on two hosts is fine), so the host is part of
 * the key: on a cluster store two hosts never compete for a port, and each host's claims sit
 * under one prefix. One key per port (rather than one per host address) is what makes the
 * wildcard rule transactional: "0.0.0.0:8080" conflicts with "10.0.0.5:8080", and with one key
 * per port the claimer reads the key, decides in code, and writes it back under a modRevision
 * compare, so a concurrent claim on any address of that port makes the transaction fail and
 * the plan is made again. Claims are written in the same
 * transaction as the sandbox record whose `ports` lists them, and released in one
 * transaction that also drops `ports` from the record, so record and claims never disagree.
 * Both transactions bump `meta/ports`, which tells a concurrent firewall rebuild to run again.
 */
import { conflict, invalid } from "../errors.ts";
import { absent, getJson, putJson, type Compare, type Op } from "../store/store.ts";
import { keys, type PortClaims, type PortMapping, type PortProtocol, type Sandbox } from "../model.ts";
import type { Engine } from "../engine/engine.ts";
import { hostName } from "../engine/owner.ts";
import { EPHEMERAL_PORTS, hostAddress, type PortRange, type PortRequest } from "./spec.ts";
import { probeHostPort } from "./probe.ts";

/** A request with its host address decided (the network's default filled in). */
export interface ResolvedRequest extends PortRequest {
  /** Canonical host address; "0.0.0.0" / "::" for every address of the family. */
  readonly hostIp: string;
  /** The host address as the user gave it ("" when left out). */
  readonly requestedHostIp: string;
  /** Network whose endpoint receives the traffic. */
  readonly networkId: string;
}

/** Claims to write together with the sandbox record. */
export interface ClaimPlan {
  /** One mapping per request, in request order. */
  readonly mappings: PortMapping[];
  readonly compares: Compare[];
  readonly ops: Op[];
}

const familyOf = (ip: string): 4 | 6 => (ip.includes(":") ? 6 : 4);
/** The address standing for every address of a family. */
export const wildcardIp = (family: 4 | 6): string => (family === 4 ? "0.0.0.0" : "::");

/**
 * The holder (sandbox id) of a claim that `hostIp` would collide with on this port: the same
 * address, or a wildcard on either side within one IP family.
 */
export function claimConflict(claims: PortClaims, hostIp: string): string | undefined {
  const family = familyOf(hostIp);
  const any = wildcardIp(family);
  for (const [ip, holder] of Object.entries(claims)) {
    if (familyOf(ip) !== family) continue;
    if (ip === hostIp || ip === any || hostIp === any) return holder;
  }
  return undefined;
}

/** Host ports to try for a request, in order. */
function* candidatePorts(range: PortRange | undefined): Generator<number> {
  const r = range ?? EPHEMERAL_PORTS;
  const size = r.end - r.start + 1;
  // A fixed range is tried from its start (as Docker does); the ephemeral range from a random
  // point, so that concurrent runs rarely pick the same port and have to plan again.
  const first = range ? 0 : Math.floor(Math.random() * size);
  for (let i = 0; i < size; i++) yield r.start + ((first + i) % size);
}

const portLabel = (hostIp: string, port: number, proto: PortProtocol): string => `${hostAddress(hostIp, port)}/${proto}`;

async function holderName(engine: Engine, holder: string): Promise<string> {
  return (await getJson<Sandbox>(engine.store, keys.sandbox(holder)))?.name ?? holder.slice(0, 12);
}

/**
 * Choose a host port of this host for every request and build the transaction parts that
 * claim them (the probe checks this host's sockets; the claims go under this host's name,
 * the host of every sandbox this process creates or publishes for). A fixed port that is
 * claimed or held by a socket is an error; ranges and `-p PORT` move on to the next free port.
 * Reads the store and probes sockets; writes nothing.
 */
export async function planClaims(engine: Engine, sandboxId: string, requests: readonly ResolvedRequest[]): Promise<ClaimPlan> {
  if (requests.length === 0) return { mappings: [], compares: [], ops: [] };
  const host = hostName();
  const current = new Map<string, { modRevision: number; claims: PortClaims }>();
  for (const kv of (await engine.store.list(keys.portsOf(host))).items) current.set(kv.key, { modRevision: kv.modRevision, claims: JSON.parse(kv.value) as PortClaims });
  const changed = new Map<string, PortClaims>();
  const claimsOf = (key: string): PortClaims => changed.get(key) ?? current.get(key)?.claims ?? {};
  // Exact ports first, so that a range or `-p 80` in the same command cannot take them.
  const width = (r: ResolvedRequest): number => (r.hostPorts ? r.hostPorts.end - r.hostPorts.start : 1 << 20);
  const order = requests.map((r, i) => ({ r, i })).sort((a, b) => width(a.r) - width(b.r) || a.i - b.i);
  const mappings: PortMapping[] = new Array<PortMapping>(requests.length);

  for (const { r, i } of order) {
    const exact = r.hostPorts !== undefined && r.hostPorts.start === r.hostPorts.end;
    let chosen: number | undefined;
    for (const port of candidatePorts(r.hostPorts)) {
      const key = keys.port(host, r.proto, port);
      const holder = claimConflict(claimsOf(key), r.hostIp);
      if (holder !== undefined) {
        if (!exact) continue;
        if (holder === sandboxId) throw invalid(`host port ${portLabel(r.hostIp, port, r.proto)} is published twice by this command`, "give each -p its own host port");
        const name = await holderName(engine, holder);
        throw conflict(`host port ${portLabel(r.hostIp, port, r.proto)} is already published by sandbox ${name}`, `choose another host port, or remove the sandbox first: knit rm -f ${name}`);
      }
      const probe = await probeHostPort(r.hostIp, port, r.proto);
      if (probe === "not-local") throw invalid(`invalid -p "${r.raw}": host IP ${r.hostIp} is not an address of this host`);
      if (probe === "in-use") {
        if (!exact) continue;
        throw conflict(`host port ${portLabel(r.hostIp, port, r.proto)} is already in use by a program on this host`, "stop that program, or choose another host port");
      }
      chosen = port;
      changed.set(key, { ...claimsOf(key), [r.hostIp]: sandboxId });
      break;
    }
    if (chosen === undefined) {
      const range = r.hostPorts ?? EPHEMERAL_PORTS;
      throw conflict(`no free host port for ${r.containerPort}/${r.proto} on ${r.hostIp} in ${range.start}-${range.end}`, "free some ports, or give a host port or range");
    }
    mappings[i] = {
      proto: r.proto,
      containerPort: r.containerPort,
      hostIp: r.hostIp,
      hostPort: chosen,
      networkId: r.networkId,
      requested: { hostIp: r.requestedHostIp, hostPort: r.hostPorts ? formatRange(r.hostPorts) : "" },
    };
  }

  const compares: Compare[] = [];
  const ops: Op[] = [];
  for (const [key, claims] of changed) {
    const before = current.get(key);
    compares.push(before ? { key, target: "modRevision", op: "=", value: before.modRevision } : absent(key));
    ops.push(putJson(key, claims));
  }
  ops.push({ type: "put", key: keys.portsMeta(), value: sandboxId });
  return { mappings, compares, ops };
}

const formatRange = (r: PortRange): string => (r.start === r.end ? String(r.start) : `${r.start}-${r.end}`);

/** Claim keys of the mappings of a sandbox on `host`, each with the host addresses it holds there. */
function claimKeys(host: string, mappings: readonly PortMapping[]): Map<string, Set<string>> {
  const out = new Map<string, Set<string>>();
  for (const m of mappings) {
    const key = keys.port(host, m.proto, m.hostPort);
    out.set(key, (out.get(key) ?? new Set()).add(m.hostIp));
  }
  return out;
}

/**
 * Unpublish a sandbox's ports in the store: drop `ports` from its record and its claims, in
 * one transaction. Returns the mappings released (empty when there were none). Idempotent.
 */
export async function releaseClaims(engine: Engine, sandboxId: string): Promise<PortMapping[]> {
  for (let attempt = 0; attempt < 64; attempt++) {
    const kv = await engine.store.get(keys.sandbox(sandboxId));
    if (!kv) return [];
    const sb = JSON.parse(kv.value) as Sandbox;
    const mappings = sb.ports ?? [];
    if (mappings.length === 0) return [];
    const rest: Sandbox = { ...sb };
    delete rest.ports;
    const compares: Compare[] = [{ key: kv.key, target: "modRevision", op: "=", value: kv.modRevision }];
    const ops: Op[] = [putJson(kv.key, rest), { type: "put", key: keys.portsMeta(), value: sandboxId }];
    for (const [key, ips] of claimKeys(sb.host, mappings)) {
      const claimKv = await engine.store.get(key);
      if (!claimKv) {
        compares.push(absent(key));
        continue;
      }
      const claims = JSON.parse(claimKv.value) as PortClaims;
      const left = Object.fromEntries(Object.entries(claims).filter(([ip, holder]) => !(holder === sandboxId && ips.has(ip))));
      compares.push({ key, target: "modRevision", op: "=", value: claimKv.modRevision });
      ops.push(Object.keys(left).length ? putJson(key, left) : { type: "delete", key });
    }
    if ((await engine.store.txn(compares, ops)).succeeded) return mappings;
  }
  throw conflict(`could not release the ports of sandbox ${sandboxId.slice(0, 12)}: too much concurrent change`, "try again");
}

/** What a key under `ports/` names: a host's claim key, or one of the layout before hosts. */
function parseClaimKey(key: string): { host?: string; proto: string; port: number } | undefined {
  const parts = key.slice(keys.ports().length).split("/");
  const port = Number(parts[parts.length - 1]);
  if (!Number.isInteger(port)) return undefined;
  if (parts.length === 3) return { host: parts[0] ?? "", proto: parts[1] ?? "", port };
  if (parts.length === 2) return { proto: parts[0] ?? "", port };
  return undefined;
}

/**
 * Drop this host's claims that no sandbox record lists (left by a store edited by hand);
 * reconcile runs this. Claims in the layout of earlier versions (`ports/<proto>/<port>`,
 * without the host) are moved under the host of the sandbox that lists them, and dropped
 * when none does. Other hosts' claims are theirs to repair (or `knit host rm`'s to free).
 * Returns how many claims were dropped.
 */
export async function dropOrphanClaims(engine: Engine): Promise<number> {
  let dropped = 0;
  const me = hostName();
  const records = new Map<string, Sandbox | undefined>();
  const recordOf = async (id: string): Promise<Sandbox | undefined> => {
    if (!records.has(id)) records.set(id, await getJson<Sandbox>(engine.store, keys.sandbox(id)));
    return records.get(id);
  };
  for (const kv of (await engine.store.list(keys.ports())).items) {
    const parsed = parseClaimKey(kv.key);
    if (!parsed || (parsed.host !== undefined && parsed.host !== me)) continue;
    const claims = JSON.parse(kv.value) as PortClaims;
    // Where each listed claim belongs now (its sandbox's host), by claim key.
    const keep = new Map<string, PortClaims>();
    for (const [ip, holder] of Object.entries(claims)) {
      const sb = await recordOf(holder);
      if (!sb?.ports?.some((m) => m.proto === parsed.proto && m.hostPort === parsed.port && m.hostIp === ip)) continue;
      if (parsed.host !== undefined && sb.host !== parsed.host) continue;
      const key = keys.port(sb.host, parsed.proto, parsed.port);
      keep.set(key, { ...keep.get(key), [ip]: holder });
    }
    const kept = [...keep.values()].reduce((n, c) => n + Object.keys(c).length, 0);
    const moved = parsed.host === undefined;
    if (!moved && kept === Object.keys(claims).length) continue;
    const compares: Compare[] = [{ key: kv.key, target: "modRevision", op: "=", value: kv.modRevision }];
    const ops: Op[] = [{ type: "put", key: keys.portsMeta(), value: "gc" }];
    if (moved) {
      ops.push({ type: "delete", key: kv.key });
      for (const [key, add] of keep) {
        const target = await engine.store.get(key);
        compares.push(target ? { key, target: "modRevision", op: "=", value: target.modRevision } : absent(key));
        ops.push(putJson(key, { ...(target ? (JSON.parse(target.value) as PortClaims) : {}), ...add }));
      }
    } else {
      const left = keep.get(kv.key) ?? {};
      ops.push(Object.keys(left).length ? putJson(kv.key, left) : { type: "delete", key: kv.key });
    }
    const res = await engine.store.txn(compares, ops);
    if (res.succeeded) dropped += Object.keys(claims).length - kept;
  }
  return dropped;
}
