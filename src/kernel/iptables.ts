/**
 * iptables and ip6tables, only for Docker's filter table (see src/firewall/docker-user.ts).
 * Changes go in as one `iptables-restore --noflush` file per tool: one process, one
 * transaction (all or nothing). Which binaries run is whatever the host's `iptables` is
 * (Debian's alternatives: iptables-nft by default, as dockerd uses it).
 *
 * Finding out whether a tool is needed at all costs no process: with the nf_tables backend,
 * Docker's chains are nftables chains in `table ip filter` / `table ip6 filter`, seen in the
 * chain listing that knit's own `nft -f` prints (src/kernel/nft.ts); with the legacy backend,
 * /proc/net/ip_tables_names lists the x_tables tables in use.
 */
import { readFileSync, realpathSync } from "node:fs";
import { run, type Netns } from "./exec.ts";

/** The two tools, one per address family. */
export const XTABLES_TOOLS = ["iptables", "ip6tables"] as const;
export type XtablesTool = (typeof XTABLES_TOOLS)[number];

/** The nftables family an iptables-nft tool keeps its tables in. */
export const XTABLES_FAMILY: Record<XtablesTool, "ip" | "ip6"> = { iptables: "ip", ip6tables: "ip6" };

/** How a tool stores its rules: in nftables ("nft"), in x_tables ("legacy"), or not installed. */
export type XtablesBackend = "nft" | "legacy" | "missing";

const backends = new Map<XtablesTool, XtablesBackend>();

/**
 * The backend of `tool` as found on PATH (the binary it links to: xtables-nft-multi or
 * xtables-legacy-multi). Looked up once per process, without spawning anything.
 */
export function xtablesBackend(tool: XtablesTool): XtablesBackend {
  let backend = backends.get(tool);
  if (backend === undefined) {
    const path = Bun.which(tool);
    let target = "";
    try {
      target = path ? realpathSync(path) : "";
    } catch {
      target = "";
    }
    backend = target === "" ? "missing" : /legacy/.test(target) ? "legacy" : "nft";
    backends.set(tool, backend);
  }
  return backend;
}

/**
 * With the legacy backend: whether the kernel has the x_tables filter table of this family in
 * knit's own namespace (false means no chain of Docker's can exist there). Undefined when it
 * cannot tell (another namespace).
 */
export function legacyFilterTableExists(tool: XtablesTool, ns?: Netns): boolean | undefined {
  if (ns) return undefined;
  const file = tool === "iptables" ? "/proc/net/ip_tables_names" : "/proc/net/ip6_tables_names";
  try {
    return readFileSync(file, "utf8").split("\n").includes("filter");
  } catch {
    return false; // no x_tables module loaded: no legacy table at all
  }
}

/**
 * The filter table as `TOOL -S` prints it, one rule or chain per line; undefined when the tool
 * cannot list it (not installed, or the table does not exist).
 */
export async function listFilterTable(tool: XtablesTool, ns?: Netns): Promise<string[] | undefined> {
  try {
    const res = await run([tool, "-w", "-t", "filter", "-S"], { allowFailure: true, ...(ns ? { netns: ns } : {}) });
    return res.code === 0 ? res.stdout.split("\n").filter((line) => line.trim() !== "") : undefined;
  } catch {
    return undefined; // cannot spawn: no iptables on this host, so no Docker chains either
  }
}

/**
 * Apply a restore file with `--noflush` (only the chains it declares are flushed) as one
 * transaction. Returns false when the tool rejected it (nothing changed then); with
 * `mustSucceed` that throws a KnitError("kernel") instead.
 */
export async function xtablesRestore(tool: XtablesTool, script: string, ns?: Netns, mustSucceed = false): Promise<boolean> {
  const res = await run([`${tool}-restore`, "-w", "--noflush"], { stdin: script, allowFailure: !mustSucceed, ...(ns ? { netns: ns } : {}) });
  return res.code === 0;
}
