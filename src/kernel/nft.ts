/**
 * nftables. A ruleset is applied as one `nft -f -` transaction (all or nothing); state is
 * read back with `nft -j`.
 */
import { run, runJson, type Netns } from "./exec.ts";

/** Apply an nft script atomically. */
export async function nftApply(script: string, ns?: Netns): Promise<void> {
  await run(["nft", "-f", "-"], ns ? { stdin: script, netns: ns } : { stdin: script });
}

/** One chain of any table, as `nft list chains` names it. */
export interface NftChainName {
  readonly family: string;
  readonly table: string;
  readonly chain: string;
}

/**
 * Apply an nft script atomically and, in the same process, list every chain of every table
 * as it was before the script's transaction (read-only commands in a file run first; the
 * changes are sent as one batch at the end). So knit learns about other programs' chains,
 * Docker's iptables-nft ones included, without another process. Returns undefined when the
 * script was rejected (nothing changed); with `mustSucceed` that throws instead.
 */
export async function nftApplyListingChains(script: string, ns?: Netns, mustSucceed = true): Promise<NftChainName[] | undefined> {
  const stdin = `${script.endsWith("\n") ? script : `${script}\n`}list chains\n`;
  const res = await run(["nft", "-f", "-"], { stdin, allowFailure: !mustSucceed, ...(ns ? { netns: ns } : {}) });
  return res.code === 0 ? parseChainListing(res.stdout) : undefined;
}

/**
 * Parse the text of `nft list chains`: `table FAMILY NAME {` lines, each followed by its
 * `chain NAME {` lines (names may be quoted).
 */
export function parseChainListing(text: string): NftChainName[] {
  const out: NftChainName[] = [];
  let table: { family: string; name: string } | undefined;
  for (const line of text.split("\n")) {
    const t = /^table\s+(\S+)\s+"?([^"\s{]+)"?\s*\{/.exec(line);
    if (t) {
      table = { family: t[1] ?? "", name: t[2] ?? "" };
      continue;
    }
    const c = /^\s+chain\s+"?([^"\s{]+)"?\s*\{/.exec(line);
    if (c && table) out.push({ family: table.family, table: table.name, chain: c[1] ?? "" });
  }
  return out;
}

/** The `nft -j` document: a list of objects, each keyed by its kind. */
export interface NftJson {
  nftables: Record<string, Record<string, unknown>>[];
}

/** List one table as JSON, or undefined when it does not exist. */
export async function nftListTable(family: string, table: string, ns?: Netns): Promise<NftJson | undefined> {
  const argv = ["nft", "-j", "list", "table", family, table];
  const res = await run(argv, ns ? { allowFailure: true, netns: ns } : { allowFailure: true });
  if (res.code !== 0) return undefined;
  return JSON.parse(res.stdout) as NftJson;
}

/** Names of all tables of a family ("inet", "ip", ...). */
export async function nftTables(ns?: Netns): Promise<{ family: string; name: string }[]> {
  const doc = await runJson<NftJson>(["nft", "-j", "list", "tables"], { nftables: [] }, ns ? { netns: ns } : {});
  return doc.nftables.flatMap((o) => (o.table ? [o.table as { family: string; name: string }] : []));
}
