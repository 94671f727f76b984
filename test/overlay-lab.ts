/**
 * Leak checks for the cluster lab of the overlay tests: after a file's tests, the hosts must
 * look as the lab left them and the etcd store must hold only what every knit host has
 * (its predefined networks). docker_gwbridge stays after use, as with Docker: it is removed
 * here first, then agents are stopped and their registrations revoked (as a TTL would).
 */
import { existsSync, readdirSync } from "node:fs";
import { join } from "node:path";
import type { ClusterLab } from "../src/demo/cluster-lab.ts";
import type { Network } from "../src/model.ts";
import { assertNoLeaks } from "./leaks.ts";

/** Keys of a clean cluster store: the predefined networks of each host and their rows. */
function storeProblems(items: readonly { key: string; value: string }[]): string[] {
  const problems: string[] = [];
  const predefined = new Set<string>();
  for (const kv of items) {
    if (!kv.key.startsWith("networks/")) continue;
    const net = JSON.parse(kv.value) as Network;
    if (net.predefined) predefined.add(net.id);
    else problems.push(`store: network ${net.name} (${net.driver}, host ${net.host ?? "global"}) left`);
  }
  for (const { key, value } of items) {
    if (key.startsWith("networks/") || key.startsWith("meta/")) continue;
    const m = /^names\/([^/]+)\/networks\/(bridge|host|none)$/.exec(key);
    if (m && predefined.has(value)) continue;
    const rows = /^(ipam|cursor)\/([^/]+)\//.exec(key);
    if (rows && predefined.has(rows[2] ?? "") && (rows[1] === "cursor" || value === "gateway" || value.startsWith("aux:"))) continue;
    problems.push(`store: key ${key} left`);
  }
  return problems;
}

/** Remove docker_gwbridge, stop the agents, then throw unless hosts and store are clean. */
export async function assertClusterClean(c: ClusterLab): Promise<void> {
  const problems: string[] = [];
  for (const h of c.hosts) {
    const left = (await c.knit(h, ["ps", "-aq"])).stdout.split("\n").filter(Boolean);
    if (left.length) problems.push(`${h.label}: sandboxes left: ${left.join(" ")}`);
    const nets = (await c.knit(h, ["network", "ls", "--format", "{{.Name}}"])).stdout.split("\n").filter((n) => n && !["bridge", "host", "none", "docker_gwbridge"].includes(n));
    if (nets.length) problems.push(`${h.label}: networks left: ${nets.join(" ")}`);
    const gw = await c.knit(h, ["network", "rm", "docker_gwbridge"]);
    if (gw.code !== 0 && !/not found/.test(gw.stderr)) problems.push(`${h.label}: cannot remove docker_gwbridge: ${gw.stderr.trim()}`);
  }
  for (const h of c.hosts) {
    if (!h.agent?.running) problems.push(`${h.label}: the agent is not running:\n${h.agent?.output().slice(-4000) ?? "(never started)"}`);
    if (process.env.KNIT_TEST_AGENT_LOGS) console.error(`agent ${h.label}:\n${h.agent?.output() ?? ""}`);
    await c.stopAgent(h);
    await c.expire(h);
  }
  problems.push(...storeProblems((await c.store.list("")).items));
  for (const h of c.hosts) {
    const dir = join(h.host.stateDir, "sandboxes");
    if (existsSync(dir)) for (const d of readdirSync(dir)) problems.push(`${h.label}: sandbox directory ${d} left`);
    try {
      await assertNoLeaks(h.host);
    } catch (err) {
      problems.push((err as Error).message);
    }
  }
  if (problems.length) throw new Error(`the cluster is not clean:\n  ${problems.join("\n  ")}`);
}
