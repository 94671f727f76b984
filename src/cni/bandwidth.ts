/**
 * `runtimeConfig.bandwidth` as tc objects (rates in bit/s, bursts in bits, the CNI
 * convention). Traffic towards the container is shaped by a token bucket (tbf) at the root of
 * the device that sends it to the container; traffic from the container arrives at that
 * device's ingress, where a u32 filter redirects it (mirred) to an ifb device whose root tbf
 * shapes it. This is what the kernel offers here (no act_police, no matchall), and shaping
 * beats dropping for TCP anyway.
 *
 * Bridge endpoints are shaped on their host-side veth, out of the container's reach. Drivers
 * without a host-side device (macvlan) are shaped on the container's own interface, with the
 * roles swapped and the ifb made inside the container's namespace.
 *
 * The ifb is named `kb` + 13 digits of the endpoint id and carries the endpoint's `knit:<id>`
 * alias, so that `knit gc` deletes it if a DEL never came. Everything runs as one `tc -batch`
 * per namespace. tc has no door in src/kernel yet; this file goes through its `run`.
 */
import { CniCodes, CniError } from "./errors.ts";
import type { Bandwidth } from "./config.ts";
import { run, netnsName, type Netns } from "../kernel/exec.ts";
import { batchToken, getLink, ip, ipBatch } from "../kernel/ip.ts";

/** A checked bandwidth limit: what tc gets. */
export interface Shaping {
  /** Towards the container. */
  ingress?: { rate: number; burstBytes: number };
  /** From the container. */
  egress?: { rate: number; burstBytes: number };
}

const MAX_RATE = 1e13; // 10 Tbit/s
const MAX_BURST_BYTES = 0xffffffff;

function limit(rate: number | undefined, burst: number | undefined, dir: "ingress" | "egress") {
  const r = rate ?? 0;
  const b = burst ?? 0;
  if (r === 0 && b === 0) return undefined;
  if (r <= 0 || b <= 0) throw new CniError(CniCodes.invalidConfig, `bandwidth: ${dir}Rate and ${dir}Burst must be given together`, `got ${dir}Rate=${r}, ${dir}Burst=${b}`);
  if (r > MAX_RATE) throw new CniError(CniCodes.invalidConfig, `bandwidth: ${dir}Rate ${r} is more than ${MAX_RATE} bit/s`);
  const burstBytes = Math.ceil(b / 8);
  if (burstBytes > MAX_BURST_BYTES) throw new CniError(CniCodes.invalidConfig, `bandwidth: ${dir}Burst ${b} is more than ${MAX_BURST_BYTES * 8} bits`);
  return { rate: r, burstBytes };
}

/** Validate a bandwidth request; undefined when it limits nothing. */
export function checkBandwidth(bw: Bandwidth | undefined): Shaping | undefined {
  if (!bw) return undefined;
  const ingress = limit(bw.ingressRate, bw.ingressBurst, "ingress");
  const egress = limit(bw.egressRate, bw.egressBurst, "egress");
  if (!ingress && !egress) return undefined;
  return { ...(ingress ? { ingress } : {}), ...(egress ? { egress } : {}) };
}

/** The ifb device of an endpoint. */
export const ifbName = (endpointId: string): string => `kb${endpointId.slice(0, 13)}`;

async function tcBatch(lines: readonly string[], ns: Netns | undefined): Promise<void> {
  if (lines.length === 0) return;
  const name = ns ? netnsName(ns) : undefined;
  const argv = name ? ["tc", "-n", name, "-batch", "-"] : ["tc", "-batch", "-"];
  const stdin = lines.join("\n") + "\n";
  await run(argv, ns && !name ? { stdin, netns: ns } : { stdin });
}

const tbf = (dev: string, l: { rate: number; burstBytes: number }): string =>
  `qdisc replace dev ${dev} root tbf rate ${l.rate}bit burst ${l.burstBytes} latency 25ms`;

/**
 * Shape an endpoint. `dev` is the device facing the container (host veth) with `ns`
 * undefined, or the container's interface with `ns` its namespace (then "towards the
 * container" is that device's ingress).
 */
export async function applyShaping(s: Shaping, dev: string, ns: Netns | undefined, endpointId: string): Promise<void> {
  const inward = ns ? s.egress : s.ingress; // shaped at dev's root (dev sends it)
  const outward = ns ? s.ingress : s.egress; // arrives at dev's ingress: via the ifb
  const d = batchToken(dev);
  const lines: string[] = [];
  if (inward) lines.push(tbf(d, inward));
  if (outward) {
    const ifb = ifbName(endpointId);
    await ipBatch([`link add ${ifb} type ifb`, `link set dev ${ifb} alias ${batchToken(`knit:${endpointId}`)} up`], ns);
    lines.push(`qdisc add dev ${d} handle ffff: ingress`);
    lines.push(`filter add dev ${d} parent ffff: protocol all prio 1 u32 match u32 0 0 action mirred egress redirect dev ${ifb}`);
    lines.push(tbf(ifb, outward));
  }
  await tcBatch(lines, ns);
}

/** Remove an endpoint's ifb (qdiscs go with their devices); already gone is fine. */
export async function removeShaping(endpointId: string, ns: Netns | undefined): Promise<void> {
  const ifb = ifbName(endpointId);
  if (ns && !(await Bun.file(ns.path).exists())) return;
  if (await getLink(ifb, ns)) await ip(["link", "del", "dev", ifb], ns, true);
}

interface QdiscJson {
  kind: string;
  root?: boolean;
  options?: { rate?: number; burst?: number };
}

/** Problems with an endpoint's shaping, as CHECK reports them (empty when all is in place). */
export async function checkShaping(s: Shaping, dev: string, ns: Netns | undefined, endpointId: string): Promise<string[]> {
  const problems: string[] = [];
  const qdiscs = async (device: string): Promise<QdiscJson[]> => {
    const name = ns ? netnsName(ns) : undefined;
    const argv = name ? ["tc", "-n", name, "-j", "qdisc", "show", "dev", device] : ["tc", "-j", "qdisc", "show", "dev", device];
    const res = await run(argv, { allowFailure: true, ...(ns && !name ? { netns: ns } : {}) });
    return res.code === 0 ? (JSON.parse(res.stdout || "[]") as QdiscJson[]) : [];
  };
  const expectTbf = async (device: string, l: { rate: number; burstBytes: number }, what: string) => {
    const root = (await qdiscs(device)).find((q) => q.root);
    if (root?.kind !== "tbf") problems.push(`${what}: no tbf qdisc at the root of ${device}`);
    else if (root.options?.rate !== undefined && Math.abs(root.options.rate * 8 - l.rate) > l.rate / 100 + 8) {
      problems.push(`${what}: ${device} is shaped to ${root.options.rate * 8} bit/s, not ${l.rate}`);
    }
  };
  const inward = ns ? s.egress : s.ingress;
  const outward = ns ? s.ingress : s.egress;
  if (inward) await expectTbf(dev, inward, ns ? "egress" : "ingress");
  if (outward) {
    if (!(await qdiscs(dev)).some((q) => q.kind === "ingress")) problems.push(`no ingress qdisc on ${dev}`);
    await expectTbf(ifbName(endpointId), outward, ns ? "ingress" : "egress");
  }
  return problems;
}
