/**
 * Where a plugin invocation spends its time, for the benchmark's breakdown: with
 * KNIT_CNI_TRACE=1 (in the invocation's environment) the plugin prints one line to stderr at
 * the end, `knit-cni-trace {JSON}`: each phase marked on the way (ms), the time from the first
 * line of knit code to the end (`inProcess`; the caller's wall clock minus this is the
 * runtime's own start and exit), the number and total time of the kernel tool processes it
 * ran (ip, nft, tc ...) and of its netlink requests, and which path ran it: `path` is
 * "in-process" (the plugin process did the work; `reason` says why it did not hand it to
 * the agent) or "agent" (src/cni/client.ts handed it over: the phases and kernel counts are
 * the agent's, `agentMs` its time, `handoffMs` the plugin process's own around it, and
 * `inProcess` still the plugin process's whole time). In the agent the kernel counts are
 * the agent's during the invocation: with others under way at once, theirs too.
 *
 * One trace per invocation: the agent runs many at once, each with its own.
 */

/** Kernel work counters (src/kernel/exec.ts execStats). */
export interface KernelStats {
  spawns: number;
  millis: number;
  netlink?: number;
  netlinkMillis?: number;
}

/** What a trace line holds: durations and counts, and the path's name and reason. */
export type TraceRecord = Record<string, number | string>;

/** The trace of one invocation; inert unless enabled. */
export class CniTrace {
  private readonly phases: [string, number][];

  constructor(
    readonly enabled: boolean,
    start = performance.now(),
  ) {
    this.phases = [["start", start]];
  }

  /** The trace an environment asks for (KNIT_CNI_TRACE=1). */
  static of(env: Record<string, string | undefined>, start?: number): CniTrace {
    return new CniTrace(env.KNIT_CNI_TRACE === "1", start);
  }

  /** Record that a phase ends now. */
  mark(phase: string): void {
    if (this.enabled) this.phases.push([phase, performance.now()]);
  }

  /**
   * The phases as durations in ms, the whole time (`inProcess`), and the kernel work done
   * meanwhile (`kernel`: counters at the end minus those at the start). Undefined when not
   * enabled.
   */
  record(kernel?: { end: KernelStats; start?: KernelStats }): TraceRecord | undefined {
    if (!this.enabled) return undefined;
    const out: TraceRecord = {};
    for (let i = 1; i < this.phases.length; i++) {
      const [name, at] = this.phases[i] ?? ["", 0];
      out[name] = round1(at - (this.phases[i - 1]?.[1] ?? 0));
    }
    out.inProcess = round1(performance.now() - (this.phases[0]?.[1] ?? 0));
    if (kernel) {
      const { end, start } = kernel;
      out.kernelCalls = end.spawns - (start?.spawns ?? 0);
      out.kernelMs = Math.round(end.millis - (start?.millis ?? 0));
      out.netlinkCalls = (end.netlink ?? 0) - (start?.netlink ?? 0);
      out.netlinkMs = round1((end.netlinkMillis ?? 0) - (start?.netlinkMillis ?? 0));
    }
    return out;
  }
}

const round1 = (n: number): number => Math.round(n * 10) / 10;

/** The line a trace is printed as (on stderr). */
export const traceLine = (rec: TraceRecord): string => `knit-cni-trace ${JSON.stringify(rec)}\n`;
