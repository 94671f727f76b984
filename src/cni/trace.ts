/**
 * Where a plugin invocation spends its time, for the benchmark's breakdown: with
 * KNIT_CNI_TRACE=1 the plugin prints one JSON line to stderr at the end: each phase marked
 * on the way (ms), the time from the first line of knit code to the end (`inProcess`; the
 * caller's wall clock minus this is the runtime's own start and exit), and the number and
 * total time of the kernel tool processes it ran (ip, nft, tc ...) and of its netlink requests.
 */
import { writeSync } from "node:fs";

const enabled = process.env.KNIT_CNI_TRACE === "1";
const phases: [string, number][] = [["start", performance.now()]];

/** Record that a phase ends now. */
export function mark(phase: string): void {
  if (enabled) phases.push([phase, performance.now()]);
}

/**
 * Print the trace (when enabled): phases as durations in ms, kernel tool processes, and
 * in-process netlink requests (src/kernel/netlink.ts).
 */
export function printTrace(kernel: { spawns: number; millis: number; netlink?: number; netlinkMillis?: number } | undefined): void {
  if (!enabled) return;
  const out: Record<string, number> = {};
  for (let i = 1; i < phases.length; i++) {
    const [name, at] = phases[i] ?? ["", 0];
    out[name] = Math.round((at - (phases[i - 1]?.[1] ?? 0)) * 10) / 10;
  }
  out.inProcess = Math.round((performance.now() - (phases[0]?.[1] ?? 0)) * 10) / 10;
  if (kernel) {
    out.kernelCalls = kernel.spawns;
    out.kernelMs = Math.round(kernel.millis);
    out.netlinkCalls = kernel.netlink ?? 0;
    out.netlinkMs = Math.round((kernel.netlinkMillis ?? 0) * 10) / 10;
  }
  writeSync(2, `knit-cni-trace ${JSON.stringify(out)}\n`);
}
