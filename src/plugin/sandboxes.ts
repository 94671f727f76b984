/**
 * Docker containers as knit sandboxes. A container that joins a knit network through Docker
 * is an external sandbox (kind "container") whose namespace is Docker's sandbox key (a path
 * under dockerd's exec root, bind-mounted only after the Join), named after the container so
 * that knit's DNS answers to the name. One record per Docker sandbox, found again by its key
 * (`docker/sandboxes/<host>/<key>`); it goes with its last endpoint, as every external
 * sandbox does.
 */
import { basename } from "node:path";
import { absent, getJson, putJson } from "../store/store.ts";
import { DockerLabels, keys, type Endpoint, type Sandbox } from "../model.ts";
import { checkName, newId, retryTxn, type Engine } from "../engine/engine.ts";
import { hostName } from "../engine/owner.ts";
import { dockerKeys } from "./records.ts";

/** The sandbox standing for the Docker sandbox at `sandboxKey`, if there is one. */
export async function findDockerSandbox(engine: Engine, sandboxKey: string): Promise<Sandbox | undefined> {
  const idx = await engine.store.get(dockerKeys.sandbox(hostName(), sandboxKey));
  return idx ? getJson<Sandbox>(engine.store, keys.sandbox(idx.value)) : undefined;
}

/** A name Docker's container may be known by in knit, else one made from the sandbox key. */
function candidateNames(sandboxKey: string, containerName: string | undefined): string[] {
  const short = basename(sandboxKey).replace(/[^a-zA-Z0-9_.-]/g, "").slice(0, 12) || newId().slice(0, 12);
  const names: string[] = [];
  if (containerName) {
    try {
      names.push(checkName(containerName, "container"));
      names.push(`${containerName}-${short}`);
    } catch {
      // not a name knit accepts: fall back to the key's
    }
  }
  names.push(`docker-${short}`);
  return names;
}

/**
 * The sandbox for a Docker sandbox, made on first use. It takes the container's name when it
 * is free on this host (a knit sandbox may have it), else `<name>-<key>`.
 */
export async function dockerSandbox(engine: Engine, sandboxKey: string, containerName: string | undefined): Promise<Sandbox> {
  const me = hostName();
  const idxKey = dockerKeys.sandbox(me, sandboxKey);
  return retryTxn("docker sandbox", async () => {
    const idx = await engine.store.get(idxKey);
    if (idx) {
      const sb = await getJson<Sandbox>(engine.store, keys.sandbox(idx.value));
      if (sb) return sb;
      // Its record went with its last endpoint: forget the index too, then make a new one.
      await engine.store.txn([{ key: idxKey, target: "modRevision", op: "=", value: idx.modRevision }], [{ type: "delete", key: idxKey }]);
      return undefined;
    }
    let name: string | undefined;
    for (const n of candidateNames(sandboxKey, containerName)) {
      if (!(await engine.store.get(keys.sandboxName(me, n)))) {
        name = n;
        break;
      }
    }
    name ??= `docker-${newId().slice(0, 12)}`;
    const sb: Sandbox = {
      id: newId(),
      host: me,
      name,
      kind: "container",
      hostname: name,
      netnsPath: sandboxKey,
      command: [],
      created: new Date().toISOString(),
      networkMode: "",
      state: "ready",
      autoRemove: false,
      labels: { [DockerLabels.sandbox]: sandboxKey },
    };
    const res = await engine.store.txn(
      [absent(idxKey), absent(keys.sandboxName(me, name))],
      [putJson(keys.sandbox(sb.id), sb), { type: "put", key: keys.sandboxName(me, name), value: sb.id }, { type: "put", key: idxKey, value: sb.id }],
    );
    return res.succeeded ? sb : undefined;
  });
}

/** Forget the index of a Docker sandbox whose record is gone (it left its last network). */
export async function forgetDockerSandbox(engine: Engine, sandboxKey: string): Promise<void> {
  const idxKey = dockerKeys.sandbox(hostName(), sandboxKey);
  const idx = await engine.store.get(idxKey);
  if (!idx || (await engine.store.get(keys.sandbox(idx.value)))) return;
  await engine.store.txn([{ key: idxKey, target: "modRevision", op: "=", value: idx.modRevision }], [{ type: "delete", key: idxKey }]);
}

/**
 * What Docker says about a container once it runs: its hostname (the DNS names knit answers
 * to are the sandbox's name, hostname and short id, as Docker's) and its container id.
 */
export async function describeDockerSandbox(engine: Engine, sbId: string, info: { hostname: string; containerId: string }): Promise<void> {
  await retryTxn("docker sandbox details", async () => {
    const kv = await engine.store.get(keys.sandbox(sbId));
    if (!kv) return true;
    const sb = JSON.parse(kv.value) as Sandbox;
    const next: Sandbox = { ...sb, hostname: info.hostname || sb.hostname, labels: { ...sb.labels, "knit.docker.container": info.containerId } };
    if (JSON.stringify(next) === kv.value) return true;
    const res = await engine.store.txn([{ key: kv.key, target: "modRevision", op: "=", value: kv.modRevision }], [putJson(kv.key, next)]);
    return res.succeeded ? true : undefined;
  });
}

/** An endpoint's network-scoped aliases (what Docker lists for the container), for knit's DNS. */
export async function setEndpointAliases(engine: Engine, netId: string, epId: string, aliases: readonly string[]): Promise<void> {
  const valid = [...new Set(aliases)].filter((a) => /^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,252}$/.test(a));
  await retryTxn("endpoint aliases", async () => {
    const kv = await engine.store.get(keys.endpoint(netId, epId));
    if (!kv) return true;
    const ep = JSON.parse(kv.value) as Endpoint;
    if (ep.state !== "ready" || JSON.stringify(ep.aliases) === JSON.stringify(valid)) return true;
    const res = await engine.store.txn([{ key: kv.key, target: "modRevision", op: "=", value: kv.modRevision }], [putJson(kv.key, { ...ep, aliases: valid })]);
    return res.succeeded ? true : undefined;
  });
}
