/**
 * GC's input (SPEC.md, GC): the attachments that are still valid, from
 * `cni.dev/valid-attachments` and the older `cni.dev/attachments` that libcni also sends.
 * Everything a plugin holds for an attachment not in this set is stale.
 */
import { CniCodes, CniError } from "./errors.ts";
import type { Fields } from "./json.ts";
import { Labels } from "./attachments.ts";
import type { Sandbox } from "../model.ts";

/** The (container id, ifname) pair of an attachment, as {@link gcValidSet} keys it. */
export const attachmentKey = (sb: Sandbox): string => `${sb.labels[Labels.containerId] ?? ""}\0${sb.labels[Labels.ifname] ?? ""}`;

/** Keys "containerID\0ifname" of the valid attachments. Missing both lists is an error: GC would remove everything. */
export function gcValidSet(conf: Fields): Set<string> {
  const lists = ["cni.dev/valid-attachments", "cni.dev/attachments"].map((k) => conf.objects(k));
  if (lists.every((l) => l === undefined)) {
    throw new CniError(CniCodes.invalidConfig, "GC needs cni.dev/valid-attachments", "without the list of valid attachments every attachment would be removed");
  }
  const out = new Set<string>();
  for (const list of lists) {
    for (const a of list ?? []) out.add(`${a.string("containerID") ?? ""}\0${a.string("ifname") ?? ""}`);
  }
  return out;
}
