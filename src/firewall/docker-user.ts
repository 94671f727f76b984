/**
 * Coexistence with Docker. dockerd sets the iptables filter FORWARD policy to DROP (and turns
 * on br_netfilter), and in netfilter a drop in any base chain is final: knit's own accept
 * does not help. Docker documents its `DOCKER-USER` chain as the place where other programs
 * add their own accepts, and runs it first from FORWARD. So, only when that chain exists,
 * knit keeps exactly these rules per knit bridge in it, all tagged `--comment knit`:
 *
 *   -I DOCKER-USER -i BRIDGE -m comment --comment knit -j DOCKER-ISOLATION-STAGE-2
 *   -I DOCKER-USER -i BRIDGE -m comment --comment knit -j ACCEPT
 *   -I DOCKER-USER -o BRIDGE -m comment --comment knit -j ACCEPT
 *
 * The first sends knit's traffic through Docker's own list of Docker bridges (stage 2 drops
 * what would leave through one of them), so a knit sandbox cannot reach Docker's containers;
 * the reverse direction is dropped in knit's table (new traffic into a knit bridge from any
 * non-knit interface that was not port-forwarded). It is left out when Docker has no such
 * chain.
 *
 * Knit-tagged rules for bridges that are gone are deleted; every other rule is left alone.
 * Isolation between knit networks still holds: knit's nft table drops before Docker's chains.
 */
import { run, type Netns, type RunResult } from "../kernel/exec.ts";
import { checkIfname } from "../net/ifname.ts";

const CHAIN = "DOCKER-USER";
const TAG = "knit";
const TAIL = ["-m", "comment", "--comment", TAG, "-j", "ACCEPT"] as const;
const ISOLATION = "DOCKER-ISOLATION-STAGE-2";
const TOOLS = ["iptables", "ip6tables"] as const;

/** The rule specs knit wants in DOCKER-USER for these bridges. */
export function dockerUserRules(bridges: readonly string[], isolation = false): string[][] {
  return bridges.flatMap((b) => {
    const br = checkIfname(b);
    return [
      ...(isolation ? [["-i", br, "-m", "comment", "--comment", TAG, "-j", ISOLATION]] : []),
      ["-i", br, ...TAIL],
      ["-o", br, ...TAIL],
    ];
  });
}

/** Run one iptables command; undefined when the tool is not installed at all. */
async function xtables(argv: string[], ns: Netns | undefined, allowFailure = false): Promise<RunResult | undefined> {
  try {
    return await run(argv, { allowFailure, ...(ns ? { netns: ns } : {}) });
  } catch (err) {
    if (!allowFailure) throw err;
    return undefined; // cannot spawn: no iptables on this host, so no Docker chains either
  }
}

/** The specs of DOCKER-USER's rules (after `-A DOCKER-USER`), or undefined without the chain. */
async function listChain(tool: string, ns: Netns | undefined): Promise<{ rules: string[][]; isolation: boolean } | undefined> {
  const res = await xtables([tool, "-w", "-t", "filter", "-S"], ns, true);
  if (!res || res.code !== 0) return undefined;
  const lines = res.stdout.split("\n").map((line) => line.trim().split(/\s+/));
  if (!lines.some((t) => t[0] === "-N" && t[1] === CHAIN)) return undefined;
  return {
    rules: lines.filter((t) => t[0] === "-A" && t[1] === CHAIN).map((t) => t.slice(2)),
    isolation: lines.some((t) => t[0] === "-N" && t[1] === ISOLATION),
  };
}

const isKnitRule = (spec: readonly string[]): boolean =>
  spec.some((t, i) => t === "--comment" && (spec[i + 1] === TAG || spec[i + 1] === `"${TAG}"`));

/** Bring one tool's DOCKER-USER chain to exactly knit's wanted rules (others untouched). */
async function syncChain(tool: string, bridges: readonly string[], ns: Netns | undefined): Promise<void> {
  const current = await listChain(tool, ns);
  if (!current) return;
  const wanted = dockerUserRules(bridges, current.isolation);
  const missing = new Map(wanted.map((spec) => [spec.join(" "), spec]));
  for (const spec of current.rules.filter(isKnitRule)) {
    const key = spec.join(" ");
    if (missing.delete(key)) continue; // wanted and present (a duplicate is deleted below)
    await xtables([tool, "-w", "-t", "filter", "-D", CHAIN, ...spec], ns);
  }
  for (const spec of [...missing.values()].reverse()) {
    await xtables([tool, "-w", "-t", "filter", "-I", CHAIN, ...spec], ns);
  }
}

/**
 * When Docker's `DOCKER-USER` chain exists (iptables and/or ip6tables, filter table), make
 * its knit-tagged rules exactly "accept in from / out to each of `bridges`"; otherwise do
 * nothing. Idempotent; an empty list removes all of knit's rules there.
 */
export async function syncDockerUserChain(bridges: readonly string[], ns?: Netns): Promise<void> {
  for (const tool of TOOLS) await syncChain(tool, bridges, ns);
}
