/**
 * Connection tracking (`conntrack` from conntrack-tools). Used to flush UDP flows when a
 * port is published or unpublished: a UDP client that keeps sending to a host port keeps its
 * conntrack entry alive, and the NAT table is only consulted for a flow's first packet, so
 * without a flush the old decision ("deliver to the host", or "DNAT to a sandbox that is
 * gone") stays in force for as long as the client keeps sending (the CNI portmap blackhole,
 * containernetworking/plugins#123).
 */
import { KnitError } from "../errors.ts";
import { run, type Netns } from "./exec.ts";

/** Which flows to delete: by protocol and original destination port, optionally address. */
export interface ConntrackFilter {
  family: 4 | 6;
  proto: "tcp" | "udp";
  /** Original destination port (what the client sent to). */
  dport: number;
  /** Original destination address; every address when left out. */
  daddr?: string;
}

/**
 * Delete the matching conntrack entries; returns how many were deleted. conntrack exits 1
 * when nothing matched, which is success here.
 */
export async function conntrackDelete(f: ConntrackFilter, ns?: Netns): Promise<number> {
  const argv = ["conntrack", "-D", "-f", f.family === 4 ? "ipv4" : "ipv6", "-p", f.proto, "--orig-port-dst", String(f.dport)];
  if (f.daddr) argv.push("--orig-dst", f.daddr);
  const res = await run(argv, { allowFailure: true, ...(ns ? { netns: ns } : {}) });
  const m = /(\d+) flow entries have been deleted/.exec(res.stderr + res.stdout);
  if (m) return Number(m[1]);
  if (res.code === 0) return 0;
  throw new KnitError("kernel", `${argv.join(" ")} failed (exit ${res.code}): ${res.stderr.trim() || res.stdout.trim()}`, {
    hint: "install conntrack-tools (the conntrack command): run the README's setup command",
  });
}
