/**
 * The short nft script for the commonest change: one bridge network was added, nothing else.
 *
 * Design note. Replacing `table inet knit` deletes the old table, and a transaction that
 * deletes anything makes `nft` wait for an RCU grace period when it exits (10-20 ms, most of
 * a create's firewall time); a transaction that only adds does not (~5 ms). So a new
 * network's set element and rules are added to the table in place, each rule at the index
 * it has in the full ruleset, so the table ends up exactly as a full rebuild would make it.
 * The script is derived from the full builders themselves: the table for all networks and
 * the table without the new one must differ only by rules that carry the new network's
 * comment (and its set element); otherwise there is no short script and the caller rebuilds.
 *
 * It is guarded: `create element` fails when the table does not exist or already knows the
 * bridge, and an index past the end of a chain fails, and a failed script changes nothing,
 * after which the caller rebuilds the whole table. Reconcile, gc and every other change still
 * rebuild the whole table atomically.
 */
import { BRIDGE_SET, TABLE, inetTable, type CheckedNetwork } from "./rules.ts";

/** One block of `table inet knit { ... }`: a set or a chain, with its lines. */
interface Block {
  /** `set bridges` / `chain forward`. */
  readonly head: string;
  /** A chain's hook line, or a set's lines other than its elements. */
  readonly fixed: string[];
  /** A chain's rules (empty for a set). */
  readonly rules: string[];
}

/** Split the lines of {@link inetTable} into its blocks. */
function blocks(lines: readonly string[]): Block[] {
  const out: Block[] = [];
  let current: Block | undefined;
  for (const l of lines) {
    const head = /^\t((?:set|chain) \S+) \{$/.exec(l);
    if (head) {
      current = { head: head[1] ?? "", fixed: [], rules: [] };
      out.push(current);
    } else if (l === "\t}") {
      current = undefined;
    } else if (current && l.startsWith("\t\t")) {
      const text = l.slice(2);
      if (current.head.startsWith("set ")) {
        if (!text.startsWith("elements = ")) current.fixed.push(text);
      } else if (current.fixed.length === 0) {
        current.fixed.push(text); // the hook line comes first
      } else {
        current.rules.push(text);
      }
    }
  }
  return out;
}

/**
 * The nft commands that add rules to one chain so that `before` becomes `after`, where
 * `after` is `before` with some rules inserted, each marked by `mark`; undefined otherwise.
 */
function chainInsertions(chain: string, before: readonly string[], after: readonly string[], mark: string): string[] | undefined {
  const commands: string[] = [];
  let kept = 0;
  let length = before.length;
  for (const [index, rule] of after.entries()) {
    if (kept < before.length && rule === before[kept]) {
      kept++;
      continue;
    }
    if (!rule.endsWith(mark)) return undefined;
    const where = index < length ? `insert rule inet ${TABLE} ${chain} index ${index}` : index === 0 ? `add rule inet ${TABLE} ${chain}` : `add rule inet ${TABLE} ${chain} index ${index - 1}`;
    commands.push(`${where} ${rule}`);
    length++;
  }
  return kept === before.length ? commands : undefined;
}

/**
 * The script that adds network `addedId` (one of `nets`, all validated) to a table built for
 * the other networks, or undefined when that is not a pure addition (no other network, a
 * different table shape, published ports): then the whole table must be rebuilt.
 */
export function additionScript(nets: readonly CheckedNetwork[], addedId: string): { script: string; bridge: string } | undefined {
  const added = nets.find((n) => n.id === addedId);
  const others = nets.filter((n) => n.id !== addedId);
  if (!added || others.length === 0 || added.ports.length > 0) return undefined;
  const before = blocks(inetTable(others));
  const after = blocks(inetTable(nets));
  if (before.length !== after.length) return undefined;
  const mark = `comment "knit ${added.id}"`;
  const commands = [`create element inet ${TABLE} ${BRIDGE_SET} { "${added.bridge}" }`];
  for (const [i, b] of after.entries()) {
    const a = before[i];
    if (!a || a.head !== b.head || a.fixed.join("\n") !== b.fixed.join("\n")) return undefined;
    if (b.head.startsWith("set ")) {
      if (b.head !== `set ${BRIDGE_SET}`) return undefined;
      continue;
    }
    const inserts = chainInsertions(b.head.slice("chain ".length), a.rules, b.rules, mark);
    if (!inserts) return undefined;
    commands.push(...inserts);
  }
  return { script: `${commands.join("\n")}\n`, bridge: added.bridge };
}
