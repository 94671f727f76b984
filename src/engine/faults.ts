/**
 * Fault injection for crash-safety tests. `KNIT_CRASH_AT=<point>` kills the process with
 * SIGKILL when it reaches that point; `KNIT_FAIL_AT=<point>` throws there instead, to prove
 * that rollback leaves nothing behind. Both are inert unless the variables are set.
 */
import { KnitError } from "../errors.ts";

const crashAt = process.env.KNIT_CRASH_AT;
const failAt = process.env.KNIT_FAIL_AT;

/** Every named point, so tests can iterate over them. */
export const FaultPoints = [
  "network-create:after-store",
  "network-create:after-kernel",
  "network-rm:after-mark",
  "network-rm:after-kernel",
  "connect:after-claim",
  "connect:after-kernel",
  "disconnect:after-mark",
  "disconnect:after-kernel",
  "run:after-record",
  "run:after-netns",
  "run:after-connect",
  "rm:after-mark",
  "rm:after-disconnect",
] as const;
export type FaultPoint = (typeof FaultPoints)[number];

/** Crash or fail here if a test asked for it. */
export function faultPoint(point: FaultPoint): void {
  if (crashAt === point) process.kill(process.pid, "SIGKILL");
  if (failAt === point) throw new KnitError("internal", `injected failure at ${point}`);
}
