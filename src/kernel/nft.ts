/**
 * nftables. A ruleset is applied as one `nft -f -` transaction (all or nothing); state is
 * read back with `nft -j`.
 */
import { run, runJson, type Netns } from "./exec.ts";

/** Apply an nft script atomically. */
export async function nftApply(script: string, ns?: Netns): Promise<void> {
  await run(["nft", "-f", "-"], ns ? { stdin: script, netns: ns } : { stdin: script });
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
