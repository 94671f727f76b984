/**
 * CNI attachments as knit sandboxes. An attachment (CNI_CONTAINERID, CNI_IFNAME) is one
 * external sandbox of kind "netns" with exactly one endpoint, so that everything knit does
 * for sandboxes (inspect, DNS names, published ports, reconcile after a crash) works for
 * CNI containers too. Its id is derived from the pair and the host (a SHA-256), so DEL, CHECK
 * and GC find it with one read and need no index of their own.
 *
 * The record is written first, in state "ready": what makes an attachment is its endpoint,
 * which the engine claims with a pending marker of its own, so a plugin that dies while
 * connecting is undone by the next knit command on that network (or `knit gc`), and the
 * record goes with it. A plugin that dies between the two (an instant) leaves a record
 * without endpoint: the next ADD of the pair replaces it, DEL and GC remove it. Every write
 * transaction saved here is one lock hand-over less when fifty ADDs run at once.
 *
 * Labels keep what CNI said: container id, interface name, the CNI network (conflist) name
 * that GC is scoped to, the plugin that made it, and the netns path.
 */
import { CniCodes, CniError } from "./errors.ts";
import { runAll } from "../errors.ts";
import { absent, getJson, putJson } from "../store/store.ts";
import { keys, type Endpoint, type Sandbox } from "../model.ts";
import { listSandboxes, type Engine } from "../engine/engine.ts";
import { hostName, ownerAlive } from "../engine/owner.ts";
import { disconnectSandbox, dropExternalIfUnused, listMemberships } from "../engine/endpoints.ts";
import { teardownSandbox } from "../engine/sandboxes.ts";
import { syncFirewall } from "../engine/networks.ts";
import { releaseClaims } from "../ports/claims.ts";
import { flushUdpFlows } from "../ports/publish.ts";

export const Labels = {
  containerId: "knit.cni.container-id",
  ifname: "knit.cni.ifname",
  /** The CNI network name (the conflist's `name`): GC only touches attachments of its own. */
  config: "knit.cni.network",
  /** "knit" (the interface plugin) or "knit-ipam" (addresses only). */
  plugin: "knit.cni.plugin",
  netns: "knit.cni.netns",
  /** Set when the plugin shaped the endpoint (runtimeConfig.bandwidth): it made an ifb. */
  shaped: "knit.cni.shaped",
} as const;

/**
 * The sandbox id of an attachment: SHA-256 of this host's name, the container id and the
 * interface name (container ids are a runtime's, so unique on one host only).
 */
export function attachmentId(containerId: string, ifname: string): string {
  return new Bun.CryptoHasher("sha256").update(`cni\0${hostName()}\0${containerId}\0${ifname}`).digest("hex");
}

/** Sandbox names must be unique; try the container's own name first. */
function nameCandidates(id: string, containerId: string, ifname: string, podName: string | undefined): string[] {
  const ok = (n: string): boolean => /^[a-zA-Z0-9][a-zA-Z0-9_.-]*$/.test(n) && n.length <= 128;
  const base = podName && ok(podName) ? podName : `cni-${containerId.slice(0, 12)}`;
  return [base, `${base}-${ifname}`, `cni-${id.slice(0, 12)}`, `cni-${id}`].filter(ok);
}

export interface AttachmentSpec {
  containerId: string;
  ifname: string;
  netns: string;
  /** CNI network name. */
  config: string;
  plugin: "knit" | "knit-ipam";
  podName?: string;
  dns?: Sandbox["dns"];
}

/** The attachment's sandbox, if it exists. */
export const findAttachment = (engine: Engine, containerId: string, ifname: string): Promise<Sandbox | undefined> =>
  getJson<Sandbox>(engine.store, keys.sandbox(attachmentId(containerId, ifname)));

/**
 * Record a new attachment. A leftover record of the same pair (without endpoint, or being
 * removed by a process that died) is removed first; a live attachment is an error (the
 * runtime must DEL before it ADDs again).
 */
export async function recordAttachment(engine: Engine, spec: AttachmentSpec): Promise<Sandbox> {
  const id = attachmentId(spec.containerId, spec.ifname);
  const existing = await getJson<Sandbox>(engine.store, keys.sandbox(id));
  if (existing) {
    const busy = existing.state !== "ready" && ownerAlive(existing.owner);
    const members = await listMemberships(engine, id);
    if (busy || (existing.state === "ready" && members.length > 0)) {
      throw new CniError(CniCodes.conflict, `container ${spec.containerId} already has interface ${spec.ifname} attached`, "the runtime must DEL an attachment before it ADDs it again");
    }
    await teardownSandbox(engine, { ...existing, state: "deleting" });
  }
  const labels: Record<string, string> = {
    [Labels.containerId]: spec.containerId,
    [Labels.ifname]: spec.ifname,
    [Labels.config]: spec.config,
    [Labels.plugin]: spec.plugin,
    [Labels.netns]: spec.netns,
  };
  for (const name of nameCandidates(id, spec.containerId, spec.ifname, spec.podName)) {
    const sb: Sandbox = {
      id,
      name,
      kind: "netns",
      host: hostName(),
      hostname: spec.podName ?? name,
      // knit-ipam makes no interface: knit must never touch the namespace of such a sandbox.
      netnsPath: spec.plugin === "knit" ? spec.netns : "",
      command: [],
      created: new Date().toISOString(),
      networkMode: `cni:${spec.config}`,
      state: "ready",
      autoRemove: false,
      labels,
      ...(spec.dns ? { dns: spec.dns } : {}),
    };
    const res = await engine.store.txn([absent(keys.sandboxName(hostName(), name)), absent(keys.sandbox(id))], [putJson(keys.sandbox(id), sb), { type: "put", key: keys.sandboxName(hostName(), name), value: id }]);
    if (res.succeeded) return sb;
    if (await engine.store.get(keys.sandbox(id))) {
      throw new CniError(CniCodes.conflict, `container ${spec.containerId} interface ${spec.ifname} is being attached by another process`);
    }
  }
  throw new CniError(CniCodes.conflict, `no free sandbox name for container ${spec.containerId}`);
}

/** A label set on an attachment after its endpoint was wired. */
export async function setLabel(engine: Engine, sb: Sandbox, key: string, value: string): Promise<Sandbox> {
  const next: Sandbox = { ...sb, labels: { ...sb.labels, [key]: value } };
  await engine.store.put(keys.sandbox(sb.id), JSON.stringify(next));
  return next;
}

/** Unpublish an attachment's ports (claims, DNAT rules, UDP flows); returns how many. */
export async function releasePorts(engine: Engine, sandboxId: string): Promise<number> {
  const released = await releaseClaims(engine, sandboxId);
  if (released.length === 0) return 0;
  await syncFirewall(engine);
  await flushUdpFlows(released);
  return released.length;
}

/**
 * Remove an attachment and everything it holds: published ports, endpoint (links, address
 * claims, through the engine's disconnect, which marks it first so a crash half way is
 * finished by the next knit command), then the record. `beforeDisconnect` removes what the
 * plugin added to the endpoint itself (an ifb). Idempotent.
 */
export async function removeAttachment(engine: Engine, sb: Sandbox, beforeDisconnect?: (ep: Endpoint) => Promise<unknown>): Promise<void> {
  const members = await listMemberships(engine, sb.id);
  await runAll(`remove attachment ${sb.name}`, [
    async () => (sb.ports?.length ? releasePorts(engine, sb.id) : 0),
    // The engine forgets the record with its last endpoint; one without endpoint goes here.
    ...(members.length === 0 ? [() => dropExternalIfUnused(engine, sb)] : []),
    ...members.map((m) => async () => {
      const ep = await getJson<Endpoint>(engine.store, keys.endpoint(m.networkId, m.endpointId));
      if (ep && beforeDisconnect) await beforeDisconnect(ep);
      await disconnectSandbox(engine, m.networkId, sb);
    }),
  ]);
}

/** Undo an ADD that failed: remove what is left of the attachment (a failed connect already dropped the record). */
export async function discardAttachment(engine: Engine, containerId: string, ifname: string, remove: (sb: Sandbox) => Promise<unknown> = (sb) => removeAttachment(engine, sb)): Promise<void> {
  const sb = await findAttachment(engine, containerId, ifname);
  if (sb) await remove(sb);
}

/** Attachments made through CNI network `config` (all CNI networks when undefined). */
export async function listAttachments(engine: Engine, config?: string): Promise<Sandbox[]> {
  const all = await listSandboxes(engine);
  return all.filter((sb) => sb.labels[Labels.containerId] !== undefined && (config === undefined || sb.labels[Labels.config] === config));
}
