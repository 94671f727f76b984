/**
 * The engine: the one place where networking logic lives. Front ends (CLI, CNI, Docker
 * plugin) translate their protocol into these calls. The engine holds the store and the
 * host's paths; operations live in networks.ts, endpoints.ts, sandboxes.ts, reconcile.ts.
 */
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { KnitError, notFound, invalid } from "../errors.ts";
import { getJson, listJson, type Store } from "../store/store.ts";
import { keys, type Network, type Sandbox } from "../model.ts";
import { hostName } from "./owner.ts";

export interface Engine {
  readonly store: Store;
  /** Where the store and per-sandbox files live (/var/lib/knit by default). */
  readonly stateDir: string;
}

/** Default state directory; overridden by --state-dir or KNIT_STATE_DIR. */
export const DEFAULT_STATE_DIR = "/var/lib/knit";

/** A new 64-hex identifier, as Docker's. */
export const newId = (): string => randomHex(32);

/** `n` random bytes as hex. Web Crypto, not node:crypto: that import alone costs ~8 ms per CLI start. */
export function randomHex(n: number): string {
  return Array.from(crypto.getRandomValues(new Uint8Array(n)), (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Names of networks and sandboxes: what Docker and CNI accept. */
const NAME_RE = /^[a-zA-Z0-9][a-zA-Z0-9_.-]*$/;

export function checkName(name: string, what: string): string {
  if (!NAME_RE.test(name) || name.length > 128) {
    throw invalid(`invalid ${what} name "${name}": only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed, up to 128 characters`);
  }
  return name;
}

export function sandboxDir(engine: Engine, id: string): string {
  const dir = join(engine.stateDir, "sandboxes", id);
  mkdirSync(dir, { recursive: true });
  return dir;
}

/** Networks this host sees: its own local networks and every global one. */
export async function listNetworks(engine: Engine): Promise<Network[]> {
  const me = hostName();
  return (await listJson<Network>(engine.store, keys.networks())).filter((n) => n.host === undefined || n.host === me);
}

/** Sandboxes of this host. */
export async function listSandboxes(engine: Engine): Promise<Sandbox[]> {
  const me = hostName();
  return (await listJson<Sandbox>(engine.store, keys.sandboxes())).filter((s) => s.host === me);
}

/**
 * Find a record by exact name (each name key in turn), full id, or unique id prefix among
 * the visible records (Docker's lookup order).
 */
async function findByRef<T extends { id: string }>(
  engine: Engine,
  ref: string,
  kind: string,
  nameKeys: readonly string[],
  recordKey: (id: string) => string,
  visible: () => Promise<T[]>,
  match: "exact" | "prefix" | "any" = "any",
): Promise<T | undefined> {
  if (match !== "prefix") {
    for (const nameKey of nameKeys) {
      const byName = await engine.store.get(nameKey);
      const rec = byName ? await getJson<T>(engine.store, recordKey(byName.value)) : undefined;
      if (rec) return rec;
    }
  }
  if (!(match === "exact" ? /^[0-9a-f]{64}$/ : /^[0-9a-f]{1,64}$/).test(ref)) return undefined;
  const matches = (await visible()).filter((r) => r.id.startsWith(ref));
  const exact = matches.find((r) => r.id === ref);
  if (exact || match === "exact") return exact;
  if (matches.length > 1) throw invalid(`${kind} id prefix "${ref}" is ambiguous: it matches ${matches.length} ${kind}s`);
  return matches[0];
}

export const findNetwork = (engine: Engine, ref: string): Promise<Network | undefined> =>
  findByRef<Network>(engine, ref, "network", [keys.networkName(ref, hostName()), keys.networkName(ref, undefined)], keys.network, () => listNetworks(engine));

export async function getNetwork(engine: Engine, ref: string): Promise<Network> {
  const net = await findNetwork(engine, ref);
  if (!net) throw notFound(`network ${ref} not found`, "list networks with `knit network ls`");
  return net;
}

/**
 * A sandbox by exact name, full id or unique id prefix. `match` narrows the lookup to names and
 * full ids ("exact") or to id prefixes ("prefix"), for callers that must rank other kinds of
 * names between the two (see resolveContainer).
 */
export const findSandbox = (engine: Engine, ref: string, match: "exact" | "prefix" | "any" = "any"): Promise<Sandbox | undefined> =>
  findByRef<Sandbox>(engine, ref, "sandbox", [keys.sandboxName(hostName(), ref)], keys.sandbox, () => listSandboxes(engine), match);

export async function getSandbox(engine: Engine, ref: string): Promise<Sandbox> {
  const sb = await findSandbox(engine, ref);
  if (!sb) throw notFound(`no such sandbox: ${ref}`, "list sandboxes with `knit ps -a`");
  return sb;
}

/** The name key of a network: per host for local networks, cluster-wide for global ones. */
export const networkNameKey = (net: { name: string; host?: string }): string => keys.networkName(net.name, net.host);

/** Retry an optimistic transaction a bounded number of times. */
export async function retryTxn<T>(what: string, attempt: () => Promise<T | undefined>, tries = 64): Promise<T> {
  for (let i = 0; i < tries; i++) {
    const out = await attempt();
    if (out !== undefined) return out;
  }
  throw new KnitError("store", `${what}: too much concurrent change, gave up after ${tries} tries`, { hint: "try again" });
}
