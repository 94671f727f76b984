/**
 * Sandboxes: "containers" without a runtime. A sandbox is a network namespace (named
 * knit-<id12> under /run/netns, so `ip netns exec` works on it) plus a UTS and mount
 * namespace made by `unshare` around the command, in which /etc/hosts and /etc/resolv.conf
 * are bind-mounted from the sandbox's own directory and the hostname is set.
 *
 * The record is written before the namespace exists (state "creating", with this process as
 * owner and a pending marker), so a crash at any point leaves something reconcile can find.
 * A sandbox keeps its networks after its command exits (status "exited") until `knit rm`.
 */
import { copyFileSync, readFileSync, rmSync, writeFileSync, openSync, closeSync } from "node:fs";
import { hostname as hostHostname } from "node:os";
import { join } from "node:path";
import { conflict, invalid, runAll } from "../errors.ts";
import { absent, getJson, putJson } from "../store/store.ts";
import { keys, type Endpoint, type Network, type PortMapping, type Sandbox } from "../model.ts";
import { createNetns, deleteNetns } from "../kernel/ip.ts";
import { NETNS_DIR } from "../kernel/exec.ts";
import { checkName, getNetwork, getSandbox, newId, retryTxn, sandboxDir, type Engine } from "./engine.ts";
import { connectSandbox, disconnectSandbox, findMembership, listMemberships } from "./endpoints.ts";
import { abandoned, currentOwner, hostName, processAlive, processStartTime } from "./owner.ts";
import { faultPoint } from "./faults.ts";
import { syncFirewall } from "./networks.ts";
import { planClaims, releaseClaims, type ResolvedRequest } from "../ports/claims.ts";
import { flushUdpFlows, hairpinPortEndpoints, resolvePortRequests } from "../ports/publish.ts";
import { checkDnsSettings, renderSandboxResolvConf, servesDns } from "../dns/resolvconf.ts";
import { ensureAgent } from "../agent/autostart.ts";
import { gatewayOf, needsGateway, publishTarget } from "../cluster/attach.ts";

export interface RunRequest {
  name?: string;
  /** Networks to join, in order; default the predefined "bridge". */
  networks?: readonly string[];
  ip?: string;
  ip6?: string;
  hostname?: string;
  aliases?: readonly string[];
  detach?: boolean;
  autoRemove?: boolean;
  /** `-p` values: ports to publish from the host to the sandbox's first network. */
  publish?: readonly string[];
  /** `--dns`, `--dns-search`, `--dns-option`. */
  dns?: { servers?: readonly string[]; search?: readonly string[]; options?: readonly string[] };
  command: readonly string[];
}

/** Status of a knit sandbox's command. */
export function sandboxStatus(sb: Sandbox): "created" | "running" | "exited" | "removing" {
  if (sb.state === "deleting") return "removing";
  if (sb.pid === undefined) return "created";
  return processAlive(sb.pid, sb.pidStartTime) ? "running" : "exited";
}

/**
 * The init run by `sh` inside the new UTS and mount namespaces: set the hostname, bind the
 * sandbox's hosts and resolv.conf over the host's, then become the command. Arguments are
 * passed as argv ("$1".."$@"), never interpolated into the script.
 */
const INIT = 'hostname "$1" && mount --bind "$2" /etc/hosts && mount --bind "$3" /etc/resolv.conf && shift 3 && exec "$@"';

function hostsFile(sb: Sandbox, endpoints: readonly Endpoint[]): string {
  const lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"];
  for (const ep of endpoints) {
    for (const a of [ep.ipv4, ep.ipv6]) if (a) lines.push(`${a.split("/")[0]}\t${sb.hostname}`);
  }
  return lines.join("\n") + "\n";
}

/** Write hostname, hosts and resolv.conf for a sandbox; returns their paths. */
function writeSandboxFiles(engine: Engine, sb: Sandbox, endpoints: readonly Endpoint[], nets: readonly Network[]): { hosts: string; resolv: string } {
  const dir = sandboxDir(engine, sb.id);
  const hosts = join(dir, "hosts");
  const resolv = join(dir, "resolv.conf");
  if (sb.netnsPath === "host") copyFileSync("/etc/hosts", hosts);
  else writeFileSync(hosts, hostsFile(sb, endpoints));
  writeFileSync(resolv, renderSandboxResolvConf(sb, nets));
  writeFileSync(join(dir, "hostname"), sb.hostname + "\n");
  return { hosts, resolv };
}

async function validateRun(engine: Engine, req: RunRequest): Promise<Network[]> {
  if (req.command.length === 0) throw invalid("knit run needs a command", "example: knit run --network front -- sleep 1000");
  if (req.name !== undefined) checkName(req.name, "sandbox");
  if (req.hostname !== undefined && !/^[a-zA-Z0-9][a-zA-Z0-9.-]{0,62}$/.test(req.hostname)) throw invalid(`invalid hostname "${req.hostname}"`);
  const nets = await Promise.all((req.networks?.length ? req.networks : ["bridge"]).map((n) => getNetwork(engine, n)));
  const special = nets.filter((n) => n.driver === "host" || n.driver === "null");
  if (special.length > 0 && nets.length > 1) throw conflict("conflicting options: cannot attach both user-defined and non-user-defined network-modes");
  if (new Set(nets.map((n) => n.id)).size !== nets.length) throw invalid("the same network is given twice");
  if (req.name !== undefined && (await engine.store.get(keys.sandboxName(hostName(), req.name)))) {
    throw conflict(`the sandbox name "${req.name}" is already in use`, `remove it with knit rm -f ${req.name}, or choose another --name`);
  }
  return nets;
}

/** Start the command inside the sandbox's namespaces. */
/**
 * A detached `--rm` sandbox needs someone to remove it when its command exits: a `sh` in the
 * host's namespaces waits for the command, then runs `knit rm` (argv only, no interpolation).
 */
const REMOVER = '"$@"; exec "$KNIT_SELF" --state-dir "$KNIT_SB_STATE" rm -f "$KNIT_SB_ID" >/dev/null 2>&1';

/** The PID of a process's first child (the command under the --rm waiter), waiting briefly. */
async function firstChild(pid: number): Promise<number | undefined> {
  for (let i = 0; i < 200; i++) {
    try {
      const kids = readFileSync(`/proc/${pid}/task/${pid}/children`, "utf8").trim();
      if (kids) return Number(kids.split(" ")[0]);
    } catch {
      return undefined;
    }
    await Bun.sleep(2);
  }
  return undefined;
}

/** Start the command inside the sandbox's namespaces; returns the process and the command's PID. */
async function spawnSandbox(engine: Engine, sb: Sandbox, files: { hosts: string; resolv: string }, detach: boolean) {
  const inner = ["unshare", "--uts", "--mount", "--propagation", "private", "--", "sh", "-c", INIT, "knit-init", sb.hostname, files.hosts, files.resolv, ...sb.command];
  const argv = sb.netnsPath === "host" ? inner : ["nsenter", `--net=${sb.netnsPath}`, "--", ...inner];
  if (!detach) {
    const proc = Bun.spawn(argv, { stdin: "inherit", stdout: "inherit", stderr: "inherit" });
    return { proc, pid: proc.pid };
  }
  const log = openSync(join(sandboxDir(engine, sb.id), "log"), "a");
  try {
    if (!sb.autoRemove) {
      const proc = Bun.spawn(argv, { stdin: "ignore", stdout: log, stderr: log, detached: true });
      proc.unref();
      return { proc, pid: proc.pid };
    }
    const env = { ...process.env, KNIT_SELF: `${process.env.KNIT_ROOT ?? join(import.meta.dir, "..", "..")}/bin/knit`, KNIT_SB_STATE: engine.stateDir, KNIT_SB_ID: sb.id };
    const proc = Bun.spawn(["sh", "-c", REMOVER, "knit-rm-waiter", ...argv], { stdin: "ignore", stdout: log, stderr: log, detached: true, env });
    proc.unref();
    return { proc, pid: (await firstChild(proc.pid)) ?? proc.pid };
  } finally {
    closeSync(log);
  }
}

/**
 * Create a sandbox, join its networks and start its command. With `detach` returns once
 * started; else waits and returns the exit code (removing the sandbox with `autoRemove`).
 */
export async function runSandbox(engine: Engine, req: RunRequest): Promise<{ sandbox: Sandbox; exitCode?: number }> {
  // A run or rm that crashed must not hold its name or addresses: finish it first.
  await repairSandboxes(engine).catch(() => undefined);
  const nets = await validateRun(engine, req);
  const dns = req.dns ? checkDnsSettings(req.dns) : undefined;
  // Ports of a sandbox on an overlay network are published to its docker_gwbridge address.
  const portRequests = resolvePortRequests(req.publish ?? [], await publishTarget(engine, nets[0], (req.publish ?? []).length > 0));
  const id = newId();
  const mode = nets[0]?.driver === "host" ? "host" : nets[0]?.driver === "null" ? "none" : "bridge";
  const owner = currentOwner();
  let sb: Sandbox = {
    id,
    host: hostName(),
    name: req.name ?? `sandbox-${id.slice(0, 8)}`,
    kind: "knit",
    hostname: req.hostname ?? (mode === "host" ? hostHostname() : id.slice(0, 12)),
    netnsPath: mode === "host" ? "host" : `${NETNS_DIR}/knit-${id.slice(0, 12)}`,
    command: [...req.command],
    created: new Date().toISOString(),
    networkMode: nets.map((n) => n.name).join(","),
    state: "creating",
    owner,
    autoRemove: req.autoRemove ?? false,
    labels: {},
  };
  if (mode !== "host") sb.netnsName = `knit-${id.slice(0, 12)}`;
  if (dns && (dns.servers.length || dns.search.length || dns.options.length)) sb.dns = dns;
  sb = await recordSandbox(engine, sb, portRequests);
  try {
    faultPoint("run:after-record");
    if (sb.netnsName) await createNetns(sb.netnsName);
    faultPoint("run:after-netns");
    const endpoints: Endpoint[] = [];
    for (const [i, net] of nets.entries()) {
      const first = i === 0;
      const opts = { atCreate: true, ...(first && req.ip ? { ip: req.ip } : {}), ...(first && req.ip6 ? { ip6: req.ip6 } : {}), ...(first && req.aliases ? { aliases: req.aliases } : {}) };
      endpoints.push(await connectSandbox(engine, net.id, sb, opts));
    }
    faultPoint("run:after-connect");
    // Overlay networks brought docker_gwbridge with them: its gateway answers DNS queries.
    const gateway = nets.some(needsGateway) ? await gatewayOf(engine, sb) : undefined;
    if (gateway) {
      nets.push(gateway.network);
      endpoints.push(gateway.endpoint);
    }
    // Names resolve from the command's first instruction on: the DNS agent must run.
    if (nets.some(servesDns)) await ensureAgent(engine);
    await hairpinPortEndpoints(endpoints, sb.ports ?? []);
    await refreshPortRules(engine, sb.ports ?? []);
    const files = writeSandboxFiles(engine, sb, endpoints, nets);
    const { proc, pid } = await spawnSandbox(engine, sb, files, req.detach ?? false);
    sb = { ...sb, state: "ready", pid };
    const start = processStartTime(pid);
    if (start !== undefined) sb.pidStartTime = start;
    delete sb.owner;
    await engine.store.txn([], [putJson(keys.sandbox(id), sb), { type: "delete", key: keys.pendingSandbox(id) }]);
    if (req.detach) return { sandbox: sb };
    const exitCode = await proc.exited;
    if (sb.autoRemove) await removeSandbox(engine, sb.id, true);
    return { sandbox: sb, exitCode };
  } catch (err) {
    await teardownSandbox(engine, { ...sb, state: "deleting" }).catch(() => undefined);
    throw err;
  }
}

/**
 * Record a new sandbox with its name, pending marker and host port claims in one
 * transaction. When a claim lost a race the ports are planned again; a taken name is final.
 */
async function recordSandbox(engine: Engine, sb: Sandbox, ports: readonly ResolvedRequest[]): Promise<Sandbox> {
  return retryTxn("knit run", async () => {
    const plan = await planClaims(engine, sb.id, ports);
    const record: Sandbox = plan.mappings.length ? { ...sb, ports: plan.mappings } : sb;
    const res = await engine.store.txn(
      [absent(keys.sandboxName(sb.host, sb.name)), ...plan.compares],
      [putJson(keys.sandbox(sb.id), record), { type: "put", key: keys.sandboxName(sb.host, sb.name), value: sb.id }, putJson(keys.pendingSandbox(sb.id), sb.owner), ...plan.ops],
    );
    if (res.succeeded) return record;
    if (await engine.store.get(keys.sandboxName(sb.host, sb.name))) throw conflict(`the sandbox name "${sb.name}" is already in use`);
    return undefined;
  });
}

/**
 * After ports were published or released in the store: rebuild the firewall from it (the
 * bump of meta/ports makes a concurrent rebuild run again) and flush the UDP flows.
 */
async function refreshPortRules(engine: Engine, mappings: readonly PortMapping[]): Promise<void> {
  if (mappings.length === 0) return;
  await engine.store.put(keys.portsMeta(), "sync");
  await syncFirewall(engine);
  await flushUdpFlows(mappings);
}

/**
 * Publish ports of a sandbox that exists already (the Docker plugin: Docker hands over a
 * container's port bindings after its Join). As at `knit run`, the claims and the record's
 * `ports` are written in one transaction; then the firewall is rebuilt. Returns the mappings.
 */
export async function publishSandboxPorts(engine: Engine, sbId: string, requests: readonly ResolvedRequest[]): Promise<PortMapping[]> {
  if (requests.length === 0) return [];
  const mappings = await retryTxn("publish ports", async () => {
    const kv = await engine.store.get(keys.sandbox(sbId));
    if (!kv) throw conflict(`sandbox ${sbId.slice(0, 12)} does not exist`);
    const sb = JSON.parse(kv.value) as Sandbox;
    const plan = await planClaims(engine, sbId, requests);
    const record: Sandbox = { ...sb, ports: [...(sb.ports ?? []), ...plan.mappings] };
    const res = await engine.store.txn([{ key: kv.key, target: "modRevision", op: "=", value: kv.modRevision }, ...plan.compares], [putJson(kv.key, record), ...plan.ops]);
    return res.succeeded ? plan.mappings : undefined;
  });
  const endpoints: Endpoint[] = [];
  for (const netId of new Set(mappings.map((m) => m.networkId))) {
    const ep = await findMembership(engine, { id: sbId } as Sandbox, netId);
    if (ep) endpoints.push(ep);
  }
  await hairpinPortEndpoints(endpoints, mappings);
  await refreshPortRules(engine, mappings);
  return mappings;
}

/** Unpublish every port of a sandbox (claims and record first, then the firewall). Idempotent. */
export async function unpublishSandboxPorts(engine: Engine, sbId: string): Promise<PortMapping[]> {
  const released = await releaseClaims(engine, sbId);
  await refreshPortRules(engine, released);
  return released;
}

/** Kill a sandbox's command (by its recorded PID and start time) and wait for it to go. */
async function stopProcess(sb: Sandbox): Promise<void> {
  if (!processAlive(sb.pid, sb.pidStartTime) || sb.pid === undefined) return;
  try {
    process.kill(sb.pid, "SIGKILL");
  } catch {
    return;
  }
  for (let i = 0; i < 300 && processAlive(sb.pid, sb.pidStartTime); i++) await Bun.sleep(10);
}

/** Remove a knit sandbox: refused while running unless `force`. */
export async function removeSandbox(engine: Engine, ref: string, force: boolean): Promise<Sandbox> {
  const sb = await getSandbox(engine, ref);
  if (sb.kind !== "knit") throw invalid(`${sb.name} is not a knit sandbox`, `disconnect it instead: knit network disconnect NETWORK ${sb.name}`);
  if (sandboxStatus(sb) === "running" && !force) {
    throw conflict(`you cannot remove a running sandbox ${sb.name}`, `stop its command first, or force the removal: knit rm -f ${sb.name}`);
  }
  const marked: Sandbox = { ...sb, state: "deleting", owner: currentOwner() };
  await engine.store.txn([], [putJson(keys.sandbox(sb.id), marked), putJson(keys.pendingSandbox(sb.id), marked.owner)]);
  // A marked removal is always finished, whatever fails on the way.
  await runAll(`remove sandbox ${sb.name}`, [async () => faultPoint("rm:after-mark"), () => teardownSandbox(engine, marked)]);
  return sb;
}

/** Tear a sandbox down completely: process, endpoints, namespace, files, rows. Idempotent. */
export async function teardownSandbox(engine: Engine, sb: Sandbox): Promise<void> {
  await stopProcess(sb);
  const members = await listMemberships(engine, sb.id);
  await runAll(`remove sandbox ${sb.name}`, [
    // Ports go first: no DNAT rule may point at an address after it is given back.
    async () => refreshPortRules(engine, await releaseClaims(engine, sb.id)),
    ...members.map((m) => () => disconnectSandbox(engine, m.networkId, sb, true, false)),
    async () => faultPoint("rm:after-disconnect"),
    async () => {
      if (sb.netnsName) await deleteNetns(sb.netnsName);
    },
    async () => rmSync(join(engine.stateDir, "sandboxes", sb.id), { recursive: true, force: true }),
    () =>
      engine.store.txn([], [
        { type: "delete", key: keys.sandbox(sb.id) },
        { type: "delete", key: keys.sandboxName(sb.host, sb.name) },
        { type: "delete", key: keys.pendingSandbox(sb.id) },
        { type: "deletePrefix", prefix: keys.ifnamesOf(sb.id) },
        { type: "deletePrefix", prefix: keys.membersOf(sb.id) },
        { type: "delete", key: keys.joins(sb.id) },
      ]),
  ]);
}

/** Run a command inside a running sandbox's namespaces; returns its exit code. */
export async function execInSandbox(engine: Engine, ref: string, command: readonly string[]): Promise<number> {
  const sb = await getSandbox(engine, ref);
  if (command.length === 0) throw invalid("knit exec needs a command", `example: knit exec ${ref} -- ip addr`);
  if (sb.kind !== "knit") throw invalid(`${sb.name} is not a knit sandbox`);
  if (sandboxStatus(sb) !== "running" || sb.pid === undefined) throw conflict(`sandbox ${sb.name} is not running`);
  const ns = sb.netnsPath === "host" ? ["--uts", "--mount"] : ["--net", "--uts", "--mount"];
  const proc = Bun.spawn(["nsenter", "-t", String(sb.pid), ...ns, "--", ...command], { stdin: "inherit", stdout: "inherit", stderr: "inherit" });
  return proc.exited;
}

/** Sandboxes whose creation or removal was cut short by a dead process. */
export async function repairSandboxes(engine: Engine): Promise<number> {
  let repaired = 0;
  for (const kv of (await engine.store.list(keys.pendingSandboxes())).items) {
    if (!(await abandoned(engine.store, kv))) continue;
    const sb = await getJson<Sandbox>(engine.store, keys.sandbox(kv.key.slice(keys.pendingSandboxes().length)));
    if (sb) await teardownSandbox(engine, { ...sb, state: "deleting" });
    else await engine.store.delete(kv.key);
    repaired++;
  }
  return repaired;
}

