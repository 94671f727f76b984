/**
 * A worker thread of src/kernel/link-deleter.ts: deletes one link at a time with a netlink
 * request (src/kernel/netlink.ts), so that the kernel's wait inside that request holds this
 * thread, not the event loop of the process that asked.
 *
 * In: `{ id, name, ns? }`. Out: `{ id, deleted, ms }`, or `{ id, error }` with the message of
 * the KnitError the request failed with.
 */
import { deleteLink } from "./netlink.ts";
import type { Netns } from "./exec.ts";

/** A deletion asked for. */
export interface DeleteRequest {
  id: number;
  name: string;
  ns?: Netns;
}

/** Its outcome. */
export type DeleteReply = { id: number; deleted: boolean; ms: number } | { id: number; error: string };

declare const self: Worker;

self.onmessage = (event: MessageEvent<DeleteRequest>) => {
  const { id, name, ns } = event.data;
  const started = performance.now();
  let reply: DeleteReply;
  try {
    reply = { id, deleted: deleteLink(name, ns), ms: performance.now() - started };
  } catch (err) {
    reply = { id, error: err instanceof Error ? err.message : String(err) };
  }
  self.postMessage(reply);
};
