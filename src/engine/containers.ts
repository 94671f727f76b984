/**
 * What CONTAINER may name in `network connect/disconnect`: a knit sandbox (name, id or id
 * prefix), an `ip netns` name, a namespace path, `pid:N`, or a Docker or podman container
 * (name or id). Anything that is not a knit sandbox becomes an "external" sandbox record the
 * first time it is connected, and that record goes away with its last endpoint.
 */
import { existsSync } from "node:fs";
import { notFound, invalid } from "../errors.ts";
import { run } from "../kernel/exec.ts";
import { NETNS_DIR } from "../kernel/exec.ts";
import { absent, getJson, putJson } from "../store/store.ts";
import { keys, type Sandbox, type SandboxKind } from "../model.ts";
import { findSandbox, newId, type Engine } from "./engine.ts";
import { hostName, processStartTime } from "./owner.ts";

interface Found {
  kind: SandboxKind;
  name: string;
  netnsPath: string;
  pid?: number;
  /** Found by a prefix of its id only (a container CLI's own lookup), not by name or full id. */
  byPrefix?: boolean;
}

/** Ask a container CLI (docker or podman) for a container's PID and name. */
async function inspectContainer(cli: string, ref: string): Promise<Found | undefined> {
  let out;
  try {
    out = await run([cli, "inspect", "--type", "container", "--format", "{{.State.Pid}} {{.Id}} {{.Name}}", ref], { allowFailure: true });
  } catch {
    return undefined; // the CLI is not installed
  }
  if (out.code !== 0) return undefined;
  const [pidText, id = "", rawName] = out.stdout.trim().split(" ");
  const pid = Number(pidText);
  if (!(pid > 0)) throw invalid(`${cli} container ${ref} is not running`, `start it first: ${cli} start ${ref}`);
  const name = (rawName ?? ref).replace(/^\//, "");
  return { kind: "container", name, netnsPath: `/proc/${pid}/ns/net`, pid, byPrefix: name !== ref && id !== ref };
}

async function locate(ref: string): Promise<Found | undefined> {
  if (/^[a-zA-Z0-9][a-zA-Z0-9_.-]*$/.test(ref) && existsSync(`${NETNS_DIR}/${ref}`)) {
    return { kind: "netns", name: ref, netnsPath: `${NETNS_DIR}/${ref}` };
  }
  if (ref.startsWith("/")) {
    if (!existsSync(ref)) throw notFound(`network namespace path ${ref} does not exist`);
    return { kind: "netns", name: ref, netnsPath: ref };
  }
  const pidMatch = /^pid:(\d+)$/.exec(ref);
  if (pidMatch) {
    const pid = Number(pidMatch[1]);
    if (!existsSync(`/proc/${pid}/ns/net`)) throw notFound(`no process with pid ${pid}`);
    return { kind: "netns", name: ref, netnsPath: `/proc/${pid}/ns/net`, pid };
  }
  return (await inspectContainer(process.env.KNIT_DOCKER ?? "docker", ref)) ?? (await inspectContainer(process.env.KNIT_PODMAN ?? "podman", ref));
}

/**
 * Resolve CONTAINER to a sandbox record, creating an external one if needed. Names and full
 * ids come before id prefixes, whoever holds them: a Docker container named "dc" is not a knit
 * sandbox whose id happens to start with dc (Docker ranks its own lookups the same way).
 */
export async function resolveContainer(engine: Engine, ref: string): Promise<Sandbox> {
  const known = await findSandbox(engine, ref, "exact");
  if (known) return known;
  const found = await locate(ref);
  if (!found || found.byPrefix) {
    const byPrefix = await findSandbox(engine, ref, "prefix");
    if (byPrefix) return byPrefix;
  }
  if (!found) {
    throw notFound(`no such container: ${ref}`, "give a knit sandbox, an `ip netns` name, a namespace path, pid:N, or a Docker or podman container");
  }
  const existing = await engine.store.get(keys.sandboxName(hostName(), found.name));
  if (existing) {
    const sb = await getJson<Sandbox>(engine.store, keys.sandbox(existing.value));
    if (sb) return sb;
  }
  const sb: Sandbox = {
    id: newId(),
    host: hostName(),
    name: found.name,
    kind: found.kind,
    hostname: found.name,
    netnsPath: found.netnsPath,
    command: [],
    created: new Date().toISOString(),
    networkMode: "",
    state: "ready",
    autoRemove: false,
    labels: {},
  };
  if (found.pid !== undefined) {
    sb.pid = found.pid;
    const start = processStartTime(found.pid);
    if (start !== undefined) sb.pidStartTime = start;
  }
  const res = await engine.store.txn([absent(keys.sandboxName(sb.host, sb.name))], [putJson(keys.sandbox(sb.id), sb), { type: "put", key: keys.sandboxName(sb.host, sb.name), value: sb.id }]);
  if (!res.succeeded) return resolveContainer(engine, ref);
  return sb;
}
