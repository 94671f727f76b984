/**
 * Link deletions off the event loop, for a process that serves many callers at once (the
 * agent; see setLinkDeletionAside in src/kernel/ip.ts).
 *
 * Why not an asynchronous netlink request: the kernel handles an rtnetlink request inside
 * the sending syscall, and a link deletion waits there for RCU grace periods (15-45 ms), so
 * there is no "send now, read the answer later" for it. The wait has to happen on another
 * thread or in another process. Here, a few worker threads (src/kernel/link-deleter-worker.ts)
 * each make the same netlink request as a plain deleteLink, one at a time, about 1 ms of CPU
 * per deletion; when all of them are busy, the deletion runs in a child `ip` process instead
 * (2-3 ms of CPU), so deletions never queue behind each other's kernel waits. Workers start
 * on first use and do not keep the process alive.
 */
import { join } from "node:path";
import { KnitError } from "../errors.ts";
import { recordNetlink, type Netns } from "./exec.ts";
import type { DeleteReply, DeleteRequest } from "./link-deleter-worker.ts";

/** Worker threads at most (each holds a JavaScript heap of its own). */
const MAX_WORKERS = 4;
const WORKER = join(import.meta.dir, "..", "kernel", "link-deleter-worker.ts");

interface Slot {
  worker: Worker;
  /** The deletion under way, if any. */
  current: { id: number; name: string; resolve(v: boolean): void; reject(e: unknown): void } | undefined;
  dead: boolean;
}

const slots: Slot[] = [];
let nextId = 1;

function startWorker(): Slot {
  const slot: Slot = { worker: new Worker(WORKER), current: undefined, dead: false };
  slot.worker.unref();
  slot.worker.onmessage = (event: MessageEvent<DeleteReply>) => {
    const job = slot.current;
    if (!job || job.id !== event.data.id) return;
    slot.current = undefined;
    const reply = event.data;
    if ("error" in reply) job.reject(new KnitError("kernel", reply.error));
    else {
      recordNetlink(`delete link ${job.name} (worker thread)`, reply.ms);
      job.resolve(reply.deleted);
    }
  };
  slot.worker.onerror = (event) => {
    // The thread is gone: its deletion is told (the caller may try again), the slot dropped.
    slot.dead = true;
    slots.splice(slots.indexOf(slot), 1);
    const job = slot.current;
    slot.current = undefined;
    job?.reject(new KnitError("internal", `the link deletion thread failed: ${event.message}`));
  };
  slots.push(slot);
  return slot;
}

/**
 * Delete a link on a worker thread (true when deleted, false when no link has that name),
 * or with `aside` (a child process) when every worker is busy or a worker cannot be had.
 */
export async function deleteLinkOffLoop(name: string, ns: Netns | undefined, aside: (name: string, ns?: Netns) => Promise<boolean>): Promise<boolean> {
  let slot = slots.find((s) => !s.current && !s.dead);
  if (!slot && slots.length < MAX_WORKERS) {
    try {
      slot = startWorker();
    } catch {
      slot = undefined;
    }
  }
  if (!slot) return aside(name, ns);
  const target = slot;
  const id = nextId++;
  const done = new Promise<boolean>((resolve, reject) => {
    target.current = { id, name, resolve, reject };
  });
  const req: DeleteRequest = { id, name, ...(ns ? { ns } : {}) };
  target.worker.postMessage(req);
  try {
    return await done;
  } catch (err) {
    // A thread that died half way: the child process finds out whether the link is still there.
    if (err instanceof KnitError && err.code === "internal") return aside(name, ns);
    throw err;
  }
}
