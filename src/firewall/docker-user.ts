/**
 * Coexistence with Docker. dockerd sets the iptables filter FORWARD policy to DROP (and turns
 * on br_netfilter), and in netfilter a drop in any base chain is final: knit's own accept
 * does not help. Docker documents its `DOCKER-USER` chain as the place where other programs
 * add their own accepts, and runs it first from FORWARD. So, only when that chain exists,
 * knit puts ONE rule there, at the top, and keeps its per-bridge rules in a chain of its own:
 *
 *   -A DOCKER-USER -m comment --comment knit -j KNIT-USER
 *   -A KNIT-USER -i BRIDGE -m comment --comment knit -j DOCKER-ISOLATION-STAGE-2
 *   -A KNIT-USER -i BRIDGE -m comment --comment knit -j ACCEPT
 *   -A KNIT-USER -o BRIDGE -m comment --comment knit -j ACCEPT      (for each knit bridge)
 *
 * The first per-bridge rule sends knit's traffic through Docker's own list of Docker bridges
 * (stage 2 drops what would leave through one of them), so a knit sandbox cannot reach
 * Docker's containers; the reverse direction is dropped in knit's table (new traffic into a
 * knit bridge from any non-knit interface that was not port-forwarded). It is left out when
 * Docker has no such chain. Isolation between knit networks still holds: knit's nft table
 * drops before Docker's chains.
 *
 * Design note: cost. Every change is one `iptables-restore --noflush` per tool, and none runs
 * on a host without Docker's chain (src/kernel/iptables.ts finds that out without a process).
 * Deleting anything in nf_tables makes the process's exit wait for an RCU grace period
 * (10-20 ms); appending does not. So:
 * - a new network appends its three rules to KNIT-USER, guarded by `-C` of the jump (the
 *   restore fails as a whole unless knit's chain is in place);
 * - any other change rewrites KNIT-USER (`:KNIT-USER - [0:0]` flushes it in the same
 *   transaction), also guarded by `-C`; with no bridges left the jump and the chain go;
 * - when knit's chain is not there yet, or a guarded restore fails (Docker restarted, an
 *   admin flushed DOCKER-USER, no DOCKER-ISOLATION-STAGE-2, a second jump left by two
 *   processes racing), the filter table is read (`iptables -S`) and one exact restore
 *   follows: every knit-tagged rule in DOCKER-USER goes but the one jump at the top (so rules
 *   of older knit versions, which sat in DOCKER-USER itself, go too), and KNIT-USER is
 *   rewritten. Every other rule is left alone.
 */
import { checkIfname } from "../net/ifname.ts";
import type { Netns } from "../kernel/exec.ts";
import type { NftChainName } from "../kernel/nft.ts";
import {
  XTABLES_FAMILY,
  XTABLES_TOOLS,
  legacyFilterTableExists,
  listFilterTable,
  xtablesBackend,
  xtablesRestore,
  type XtablesTool,
} from "../kernel/iptables.ts";

/** Docker's chain for other programs' rules. */
export const DOCKER_USER = "DOCKER-USER";
/** knit's chain, jumped to from DOCKER-USER. */
export const KNIT_CHAIN = "KNIT-USER";
const TAG = "knit";
const TAGGED = ["-m", "comment", "--comment", TAG] as const;
const ISOLATION = "DOCKER-ISOLATION-STAGE-2";
/** The one rule knit keeps in DOCKER-USER. */
const JUMP = [...TAGGED, "-j", KNIT_CHAIN] as const;

/** The rule specs knit wants in KNIT-USER for these bridges. */
export function dockerUserRules(bridges: readonly string[], isolation = false): string[][] {
  return bridges.flatMap((b) => {
    const br = checkIfname(b);
    return [
      ...(isolation ? [["-i", br, ...TAGGED, "-j", ISOLATION]] : []),
      ["-i", br, ...TAGGED, "-j", "ACCEPT"],
      ["-o", br, ...TAGGED, "-j", "ACCEPT"],
    ];
  });
}

/** What the host has of one tool's chains, when known without asking the tool. */
interface ToolState {
  /** DOCKER-USER exists (undefined: unknown). */
  readonly docker: boolean | undefined;
  /** KNIT-USER exists (undefined: unknown). */
  readonly knit: boolean | undefined;
  /** DOCKER-ISOLATION-STAGE-2 exists (undefined: unknown). */
  readonly isolation: boolean | undefined;
}

/**
 * What each tool's filter table holds of Docker's and knit's chains. With the nf_tables
 * backend the chain listing from knit's own `nft -f` says it; with the legacy backend only
 * whether a filter table exists at all is known; without the tool there is nothing to do.
 */
function toolState(tool: XtablesTool, chains: readonly NftChainName[] | undefined, ns: Netns | undefined): ToolState {
  const backend = xtablesBackend(tool);
  if (backend === "missing") return { docker: false, knit: false, isolation: false };
  if (backend === "nft" && chains) {
    const has = (name: string): boolean => chains.some((c) => c.family === XTABLES_FAMILY[tool] && c.table === "filter" && c.chain === name);
    return { docker: has(DOCKER_USER), knit: has(KNIT_CHAIN), isolation: has(ISOLATION) };
  }
  if (backend === "legacy" && legacyFilterTableExists(tool, ns) === false) return { docker: false, knit: false, isolation: false };
  return { docker: undefined, knit: undefined, isolation: undefined };
}

const line = (...tokens: readonly string[]): string => tokens.join(" ");
const restoreFile = (lines: readonly string[]): string => `${["*filter", ...lines, "COMMIT"].join("\n")}\n`;

/**
 * The guarded restore file of the common cases (see the design note): it fails as a whole
 * unless knit's jump is in DOCKER-USER. `added`: append only this bridge's rules.
 */
export function fastScript(bridges: readonly string[], isolation: boolean, added?: string): string {
  const jump = line("-C", DOCKER_USER, ...JUMP);
  if (added !== undefined) {
    return restoreFile([jump, ...dockerUserRules([added], isolation).map((spec) => line("-A", KNIT_CHAIN, ...spec))]);
  }
  if (bridges.length === 0) {
    return restoreFile([line("-D", DOCKER_USER, ...JUMP), line("-F", KNIT_CHAIN), line("-X", KNIT_CHAIN)]);
  }
  return restoreFile([`:${KNIT_CHAIN} - [0:0]`, jump, ...dockerUserRules(bridges, isolation).map((spec) => line("-A", KNIT_CHAIN, ...spec))]);
}

const isKnitRule = (spec: readonly string[]): boolean =>
  spec.some((t, i) => t === "--comment" && (spec[i + 1] === TAG || spec[i + 1] === `"${TAG}"`));

/**
 * The exact restore file that takes a filter table, as `iptables -S` printed it, to knit's
 * wanted state for these bridges; undefined when nothing needs to change.
 */
export function exactScript(listing: readonly string[], bridges: readonly string[]): string | undefined {
  const tokens = listing.map((l) => l.trim().split(/\s+/));
  const chains = new Set(tokens.filter((t) => t[0] === "-N").map((t) => t[1]));
  const ownChain = chains.has(KNIT_CHAIN);
  if (!chains.has(DOCKER_USER)) {
    // Docker's chains are gone (flushed by hand): knit's chain, unreferenced now, goes too.
    return ownChain ? restoreFile([line("-F", KNIT_CHAIN), line("-X", KNIT_CHAIN)]) : undefined;
  }
  const userRules = tokens.filter((t) => t[0] === "-A" && t[1] === DOCKER_USER).map((t) => t.slice(2));
  const jumpOnTop = bridges.length > 0 && ownChain && userRules[0]?.join(" ") === JUMP.join(" ");
  // Keeping the jump on top, the other knit rules (a duplicate jump among them) go by number,
  // highest first: by spec, a duplicate's deletion would take the top one. Otherwise every
  // knit rule goes by spec and the jump is inserted again on top.
  const deletions = jumpOnTop
    ? userRules.flatMap((spec, i) => (i > 0 && isKnitRule(spec) ? [line("-D", DOCKER_USER, String(i + 1))] : [])).reverse()
    : userRules.filter(isKnitRule).map((spec) => line("-D", DOCKER_USER, ...spec));
  if (bridges.length === 0) {
    const drop = ownChain ? [line("-F", KNIT_CHAIN), line("-X", KNIT_CHAIN)] : [];
    return deletions.length + drop.length > 0 ? restoreFile([...deletions, ...drop]) : undefined;
  }
  const wanted = dockerUserRules(bridges, chains.has(ISOLATION)).map((spec) => line("-A", KNIT_CHAIN, ...spec));
  const current = tokens.filter((t) => t[0] === "-A" && t[1] === KNIT_CHAIN).map((t) => line(...t));
  if (jumpOnTop && deletions.length === 0 && current.join("\n") === wanted.join("\n")) return undefined;
  // `-N` when the chain was not there: it fails if another process made it meanwhile, and
  // the caller reads again (two jumps could follow otherwise).
  return restoreFile([
    ownChain ? `:${KNIT_CHAIN} - [0:0]` : line("-N", KNIT_CHAIN),
    ...deletions,
    ...(jumpOnTop ? [] : [line("-I", DOCKER_USER, "1", ...JUMP)]),
    ...wanted,
  ]);
}

/**
 * Read one tool's filter table and apply the exact change, if any. Another process may change
 * the table between the read and the write (the restore then fails as a whole): read again.
 */
async function syncExact(tool: XtablesTool, bridges: readonly string[], ns: Netns | undefined): Promise<void> {
  for (let attempt = 1; ; attempt++) {
    const listing = await listFilterTable(tool, ns);
    if (!listing) return; // no filter table (or no tool): no Docker chains
    const script = exactScript(listing, bridges);
    if (!script || (await xtablesRestore(tool, script, ns, attempt === 3))) return;
  }
}

/** How {@link syncDockerUserChain} may take its short cuts. */
export interface DockerUserSyncOptions {
  /**
   * Every chain of the host's nftables tables, listed just before (by knit's own `nft -f`):
   * tells whether Docker's or knit's chains exist, so a host without them runs no process.
   * Without it each tool reads its filter table.
   */
  chains?: readonly NftChainName[];
  /** The only change since the last sync is this new bridge (its rules are appended). */
  added?: string;
}

/**
 * When Docker's `DOCKER-USER` chain exists (iptables and/or ip6tables, filter table), make
 * knit's rules there exactly "the jump to KNIT-USER, and accept in from / out to each of
 * `bridges` there"; otherwise do nothing (and remove knit's chain if it is left). Idempotent;
 * an empty list removes all of knit's rules and its chain.
 */
export async function syncDockerUserChain(bridges: readonly string[], ns?: Netns, opts: DockerUserSyncOptions = {}): Promise<void> {
  bridges.forEach((b) => checkIfname(b));
  const added = opts.added !== undefined && bridges.includes(opts.added) ? opts.added : undefined;
  for (const tool of XTABLES_TOOLS) {
    const state = toolState(tool, opts.chains, ns);
    if (state.docker === false && state.knit === false) continue;
    if (state.knit === false || (opts.chains === undefined && xtablesBackend(tool) === "nft")) {
      await syncExact(tool, bridges, ns);
      continue;
    }
    if (await xtablesRestore(tool, fastScript(bridges, state.isolation !== false, added), ns)) continue;
    await syncExact(tool, bridges, ns);
  }
}
