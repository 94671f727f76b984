/**
 * Leak checks for a lab host: after a test undoes what it did, the host's namespace must look
 * as the lab left it. Every check reads the kernel's own JSON output. Generic on purpose:
 * callers add their own checks through `extra` (for example, that the store is empty).
 */
import { existsSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { type LabHost, NETNS_DIR, isDescendant, mountsUnder, processCommand, processesInNetns } from "../src/lab/lab.ts";
import { openSqliteStore } from "../src/store/sqlite.ts";
import type { Network } from "../src/model.ts";

/** What {@link findLeaks} may accept and what else it checks. */
export interface LeakCheckOptions {
  /** Links that may exist besides `lo` and the lab's own (names or patterns). */
  allowLinks?: readonly (string | RegExp)[];
  /** nft tables (by name) that count as knit's: default every name starting with "knit". */
  nftTablePrefix?: string;
  /** knit tables that may exist anyway, as "FAMILY NAME" (e.g. "inet knit"). */
  allowNftTables?: readonly string[];
  /** Named namespaces (under /run/netns) that count as knit's: default prefix "knit-". */
  netnsPrefix?: string;
  /** Do not report processes living in the host's namespace. */
  allowProcesses?: boolean;
  /**
   * Bridges whose iptables rules knit may keep (Docker's DOCKER-USER coexistence, see
   * src/firewall/docker-user.ts); with any, knit's jump and its KNIT-USER chain may stay too.
   */
  allowIptablesBridges?: readonly string[];
  /**
   * Further checks, e.g. that the store has no networks or endpoints left. Return (or
   * resolve to) a list of problems, or throw.
   */
  extra?: (host: LabHost) => Promise<readonly string[] | void> | readonly string[] | void;
}

interface IpLink {
  ifname: string;
  linkinfo?: { info_kind?: string };
}

interface NftListing {
  nftables?: { table?: { family: string; name: string } }[];
}

function allowed(name: string, allow: readonly (string | RegExp)[]): boolean {
  return allow.some((a) => (typeof a === "string" ? a === name : a.test(name)));
}

/** Everything that looks leaked on `host`, one line per problem (empty when clean). */
export async function findLeaks(host: LabHost, opts: LeakCheckOptions = {}): Promise<string[]> {
  const problems: string[] = [];

  const links = JSON.parse((await host.exec(["ip", "-j", "-d", "link", "show"])).stdout || "[]") as IpLink[];
  for (const l of links) {
    if (l.ifname === "lo" || host.labLinks.has(l.ifname) || allowed(l.ifname, opts.allowLinks ?? [])) continue;
    problems.push(`link ${l.ifname}${l.linkinfo?.info_kind ? ` (${l.linkinfo.info_kind})` : ""} left in ${host.name}`);
  }

  const tablePrefix = opts.nftTablePrefix ?? "knit";
  const nft = JSON.parse((await host.exec(["nft", "-j", "list", "tables"])).stdout || "{}") as NftListing;
  for (const item of nft.nftables ?? []) {
    const t = item.table;
    if (t?.name.startsWith(tablePrefix) && !(opts.allowNftTables ?? []).includes(`${t.family} ${t.name}`)) {
      problems.push(`nft table ${t.family} ${t.name} left in ${host.name}`);
    }
  }

  const nsPrefix = opts.netnsPrefix ?? "knit-";
  if (existsSync(NETNS_DIR)) {
    for (const n of readdirSync(NETNS_DIR)) {
      if (n.startsWith(nsPrefix) && !host.lab.netnsAtStart.has(n)) problems.push(`named namespace ${NETNS_DIR}/${n} left`);
    }
  }
  for (const m of mountsUnder(host.stateDir)) {
    problems.push(`${m.fstype} mount ${m.target} left under the state directory of ${host.label}`);
  }

  problems.push(...(await iptablesLeaks(host, opts.allowIptablesBridges ?? [])));

  if (!opts.allowProcesses) {
    // Processes the lab tracks (and their children, like dockerd's containerd) are the test's.
    const ours = new Set(host.lab.pids);
    for (const pid of processesInNetns(host.path)) {
      if (isDescendant(pid, ours)) continue;
      problems.push(`process ${pid} (${processCommand(pid)}) still runs in ${host.name}`);
    }
  }

  if (opts.extra) {
    const more = await opts.extra(host);
    if (more) problems.push(...more);
  }
  return problems;
}

/**
 * knit's rules and chain in the iptables / ip6tables filter tables (iptables-save): none may
 * be left, but for `allowBridges`' rules in KNIT-USER and, with those, the jump to it.
 */
async function iptablesLeaks(host: LabHost, allowBridges: readonly string[]): Promise<string[]> {
  const problems: string[] = [];
  for (const tool of ["iptables-save", "ip6tables-save"]) {
    let lines: string[];
    try {
      const r = await host.exec([tool, "-t", "filter"], { check: false });
      if (r.code !== 0) continue;
      lines = r.stdout.split("\n");
    } catch {
      continue; // the tool is not installed: nothing of knit's can be there
    }
    const allowed = (l: string): boolean =>
      allowBridges.length > 0 &&
      (l === "-A DOCKER-USER -m comment --comment knit -j KNIT-USER" || l.startsWith(":KNIT-USER ") || allowBridges.some((b) => l.startsWith(`-A KNIT-USER -i ${b} `) || l.startsWith(`-A KNIT-USER -o ${b} `)));
    for (const l of lines) {
      if ((/--comment "?knit"?( |$)/.test(l) || l.startsWith(":KNIT-USER ") || l.includes(" KNIT-USER")) && !allowed(l)) {
        problems.push(`${tool.replace("-save", "")} rule or chain "${l}" left in ${host.name}`);
      }
    }
  }
  return problems;
}

/** Throw when {@link findLeaks} finds anything, listing every problem. */
export async function assertNoLeaks(host: LabHost, opts: LeakCheckOptions = {}): Promise<void> {
  const problems = await findLeaks(host, opts);
  if (problems.length) throw new Error(`leaks on ${host.label}:\n  ${problems.join("\n  ")}`);
}

/** The networks every knit host has from its first command on. */
const PREDEFINED_NETWORKS = new Set(["bridge", "host", "none"]);
/** Device of the predefined `bridge` network (knit's docker0). */
export const DEFAULT_BRIDGE_DEVICE = "knit0";
/** Key prefixes that belong to sandboxes, endpoints or operations under way: none may remain. */
const TRANSIENT_PREFIXES = ["endpoints/", "sandboxes/", "members/", "ifnames/", "pending/", "ports/", "joins/"];
/** Name keys: `names/<host>/networks/<name>`, `names/<host>/sandboxes/<name>`, `names/global/networks/<name>`. */
const NAME_KEY = /^names\/([^/]+)\/(networks|sandboxes)\/(.+)$/;

/**
 * What a host's knit store holds beyond a clean host's: networks other than the predefined
 * ones, any sandbox, endpoint, membership, interface-name claim or pending operation, any
 * address claim that is not a reservation ("gateway", "aux:NAME"), rows of networks that do
 * not exist, and per-sandbox directories under the state directory. A host on which knit
 * never ran is clean. The store is opened only to read and closed again.
 */
export async function findStoreLeaks(host: LabHost): Promise<string[]> {
  const problems: string[] = [];
  const sandboxDirs = join(host.stateDir, "sandboxes");
  if (existsSync(sandboxDirs)) {
    for (const d of readdirSync(sandboxDirs)) problems.push(`sandbox directory ${join(sandboxDirs, d)} left`);
  }
  if (!existsSync(join(host.stateDir, "knit.db"))) return problems;
  const store = await openSqliteStore(host.stateDir);
  try {
    const { items } = await store.list("");
    const networks = new Map<string, Network>();
    for (const kv of items) {
      if (!kv.key.startsWith("networks/")) continue;
      const net = JSON.parse(kv.value) as Network;
      networks.set(net.id, net);
      if (!(net.predefined && PREDEFINED_NETWORKS.has(net.name))) {
        problems.push(`store: network ${net.name} (${net.id.slice(0, 12)}, ${net.state}) left`);
      }
    }
    for (const kv of items) {
      const { key, value } = kv;
      if (TRANSIENT_PREFIXES.some((p) => key.startsWith(p))) {
        problems.push(`store: key ${key} left`);
      } else if (NAME_KEY.test(key)) {
        const [, , kind, name] = NAME_KEY.exec(key) ?? [];
        if (kind === "sandboxes") problems.push(`store: key ${key} left`);
        else if (!PREDEFINED_NETWORKS.has(name ?? "") || !networks.has(value)) problems.push(`store: network name ${key} -> ${value} left`);
      } else if (key.startsWith("ipam/") || key.startsWith("cursor/")) {
        const netId = key.split("/")[1] ?? "";
        if (!networks.has(netId)) problems.push(`store: key ${key} of a network that does not exist`);
        else if (key.startsWith("ipam/") && value !== "gateway" && !value.startsWith("aux:")) problems.push(`store: address claim ${key} -> ${value} left`);
      }
    }
  } finally {
    await store.close();
  }
  return problems;
}

interface NftRuleJson {
  rule?: { comment?: string };
  set?: { name: string; elem?: unknown[] };
}

/**
 * With the predefined bridge network in use, `table inet knit` stays with it (as docker0's
 * rules stay with dockerd): that table may then only know the device knit0 and carry rules
 * of the predefined network alone.
 */
async function defaultBridgeTableLeaks(host: LabHost): Promise<string[]> {
  const r = await host.exec(["nft", "-j", "list", "table", "inet", "knit"], { check: false });
  if (r.code !== 0) return [];
  let bridgeId = "";
  if (existsSync(join(host.stateDir, "knit.db"))) {
    const store = await openSqliteStore(host.stateDir);
    try {
      bridgeId = (await store.list("names/")).items.find((kv) => kv.key.endsWith("/networks/bridge"))?.value ?? "";
    } finally {
      await store.close();
    }
  }
  const problems: string[] = [];
  const doc = JSON.parse(r.stdout) as { nftables: NftRuleJson[] };
  for (const item of doc.nftables) {
    if (item.set?.name === "bridges") {
      const extra = (item.set.elem ?? []).filter((e) => e !== DEFAULT_BRIDGE_DEVICE);
      if (extra.length) problems.push(`nft set inet knit bridges still lists ${JSON.stringify(extra)} in ${host.name}`);
    }
    const comment = item.rule?.comment;
    // Rules of the predefined network, and the table-wide rule for unpublished ports.
    if (comment !== undefined && comment !== `knit ${bridgeId}` && comment !== "knit: unpublished") problems.push(`nft rule "${comment}" left in table inet knit of ${host.name}`);
  }
  return problems;
}

/** What {@link assertHostClean} accepts. */
export interface HostCleanOptions extends LeakCheckOptions {
  /**
   * The predefined `bridge` network was used: its device knit0 and `table inet knit` (with
   * knit0's rules only) may stay, as docker0 stays once dockerd made it.
   */
  defaultBridge?: boolean;
}

/**
 * Throw unless `host` is as clean as knit can leave it: no links, namespaces, mounts,
 * processes or nft tables left by the test ({@link findLeaks}), and a store holding only the
 * predefined networks ({@link findStoreLeaks}).
 */
export async function assertHostClean(host: LabHost, opts: HostCleanOptions = {}): Promise<void> {
  const { defaultBridge, extra, ...rest } = opts;
  const leakOpts: LeakCheckOptions = {
    ...rest,
    allowLinks: [...(rest.allowLinks ?? []), ...(defaultBridge ? [DEFAULT_BRIDGE_DEVICE] : [])],
    allowNftTables: [...(rest.allowNftTables ?? []), ...(defaultBridge ? ["inet knit"] : [])],
    allowIptablesBridges: [...(rest.allowIptablesBridges ?? []), ...(defaultBridge ? [DEFAULT_BRIDGE_DEVICE] : [])],
    extra: async (h) => [
      ...(await findStoreLeaks(h)),
      ...(defaultBridge ? await defaultBridgeTableLeaks(h) : []),
      ...((extra ? await extra(h) : undefined) ?? []),
    ],
  };
  await assertNoLeaks(host, leakOpts);
}

/** Drop what changes when an unchanged ruleset is re-applied (rule handles). */
function stripHandles(v: unknown): unknown {
  if (Array.isArray(v)) return v.map(stripHandles);
  if (v && typeof v === "object") {
    return Object.fromEntries(Object.entries(v).filter(([k]) => k !== "handle").map(([k, x]) => [k, stripHandles(x)]));
  }
  return v;
}

/** knit's nft tables on a host, handles stripped, as one string ("" when there is none): for before/after comparisons. */
export async function knitNftState(host: LabHost): Promise<string> {
  const tables = JSON.parse((await host.exec(["nft", "-j", "list", "tables"])).stdout || "{}") as { nftables?: { table?: { family: string; name: string } }[] };
  const out: unknown[] = [];
  for (const t of tables.nftables ?? []) {
    if (!t.table?.name.startsWith("knit")) continue;
    const doc = JSON.parse((await host.exec(["nft", "-j", "list", "table", t.table.family, t.table.name])).stdout) as { nftables: Record<string, unknown>[] };
    out.push(stripHandles(doc.nftables.filter((o) => !("metainfo" in o))));
  }
  return out.length ? JSON.stringify(out) : "";
}
