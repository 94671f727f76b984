/**
 * A real etcd inside the lab, for tests, the demo and the benchmarks: Debian's etcd-server
 * (/usr/bin/etcd, 3.4) run in a lab namespace, listening only on that namespace's lab
 * addresses, with its data directory under the lab's temporary directory. A member is a
 * tracked lab process, stopped by PID (and by {@link Lab.cleanup} at the latest).
 *
 * {@link startEtcdCluster} builds the usual setup: a LAN, one namespace per member on it, and
 * (by default) a veth from this process's own namespace (the lab's root inside
 * `scripts/lab-run`) into the LAN, so that a Store opened in the test process reaches the
 * cluster over TCP like any host would. Deleting the LAN deletes that veth too.
 */
import { existsSync, mkdirSync } from "node:fs";
import { join } from "node:path";
import { cidrAt, formatIp, parseCidr, parseIp, type Cidr } from "../net/ip.ts";
import { type Lab, type LabLan, type LabNode, type LabNsLike, type LabProcess, LabError, inLab, waitFor } from "./lab.ts";

/** Debian's etcd server. */
export const ETCD = "/usr/bin/etcd";
/** Client and peer ports of every lab member. */
export const ETCD_CLIENT_PORT = 2379;
export const ETCD_PEER_PORT = 2380;

/** Why etcd tests cannot run here, or undefined when they can. */
export function etcdMissing(): string | undefined {
  return existsSync(ETCD) ? undefined : `${ETCD} is not installed (apt-get install etcd-server)`;
}

/** How to run one member. */
export interface EtcdMemberOptions {
  /** Member name (`--name`), unique in its cluster. */
  readonly name: string;
  /** Client URL, `http://IP:PORT`, an address of the member's namespace. */
  readonly clientUrl: string;
  /** Peer URL, `http://IP:PORT`, an address of the member's namespace. */
  readonly peerUrl: string;
  /** Data directory (default `<lab dir>/_etcd-<name>`); kept across {@link EtcdMember.start}. */
  readonly dataDir?: string;
  /** `--initial-cluster` (default: this member alone, `name=peerUrl`). */
  readonly initialCluster?: string;
  /** `--initial-cluster-token` (default `knit-lab`). */
  readonly clusterToken?: string;
  /** Further etcd flags. */
  readonly args?: readonly string[];
  /** How long to wait for the member to report healthy (default 30 s). */
  readonly timeoutMs?: number;
}

/** A running (or stopped) etcd member in a lab namespace. */
export interface EtcdMember {
  readonly name: string;
  /** The namespace it runs in. */
  readonly node: LabNode;
  /** `IP:PORT` of its client URL, as clients take it. */
  readonly endpoint: string;
  readonly clientUrl: string;
  readonly dataDir: string;
  /** Its current process (a new one after each {@link EtcdMember.start}). */
  readonly process: LabProcess;
  /** True while the process runs. */
  readonly running: boolean;
  /** True when `GET /health` answers `{"health":"true"}` (the member sees a leader). */
  healthy(): Promise<boolean>;
  /** Stops the process by PID (SIGTERM, then SIGKILL after 5 s); idempotent. A leader hands its leadership over first. */
  stop(): Promise<void>;
  /** Kills the process with SIGKILL, as a crash would (no leadership handover); idempotent. */
  crash(): Promise<void>;
  /** Starts it again on the same data directory (it rejoins its cluster); waits until healthy. */
  start(): Promise<void>;
}

/** Start one member in `node` and wait until it is healthy. */
export async function startEtcd(node: LabNode, opts: EtcdMemberOptions): Promise<EtcdMember> {
  const member = new LabEtcdMember(node, opts);
  await member.start();
  return member;
}

class LabEtcdMember implements EtcdMember {
  readonly name: string;
  readonly endpoint: string;
  readonly clientUrl: string;
  readonly dataDir: string;
  readonly #argv: readonly string[];
  readonly #timeoutMs: number;
  #process: LabProcess | undefined;

  constructor(
    readonly node: LabNode,
    opts: EtcdMemberOptions,
  ) {
    if (!/^[A-Za-z0-9][A-Za-z0-9_.-]*$/.test(opts.name)) throw new LabError(`etcd member name "${opts.name}": use letters, digits, '-', '_', '.'`);
    this.name = opts.name;
    this.endpoint = labUrl(opts.clientUrl, "client URL");
    labUrl(opts.peerUrl, "peer URL");
    this.clientUrl = opts.clientUrl;
    this.dataDir = opts.dataDir ?? join(node.lab.dir, `_etcd-${opts.name}`);
    this.#timeoutMs = opts.timeoutMs ?? 30_000;
    this.#argv = [
      ETCD,
      ...["--name", opts.name, "--data-dir", this.dataDir],
      ...["--listen-client-urls", opts.clientUrl, "--advertise-client-urls", opts.clientUrl],
      ...["--listen-peer-urls", opts.peerUrl, "--initial-advertise-peer-urls", opts.peerUrl],
      ...["--initial-cluster", opts.initialCluster ?? `${opts.name}=${opts.peerUrl}`],
      ...["--initial-cluster-state", "new", "--initial-cluster-token", opts.clusterToken ?? "knit-lab"],
      ...["--logger", "zap", "--log-outputs", "stderr"],
      ...(opts.args ?? []),
    ];
  }

  get process(): LabProcess {
    if (!this.#process) throw new LabError(`etcd member ${this.name} was never started`);
    return this.#process;
  }

  get running(): boolean {
    return this.#process?.running ?? false;
  }

  async healthy(): Promise<boolean> {
    const body = await this.node.lab.httpGet(this.node, `${this.clientUrl}/health`, 2);
    return body !== undefined && /"health"\s*:\s*"true"/.test(body);
  }

  async start(): Promise<void> {
    if (this.running) return;
    mkdirSync(this.dataDir, { recursive: true, mode: 0o700 });
    const proc = this.node.spawn(this.#argv);
    this.#process = proc;
    const ready = await waitFor(async () => !proc.running || (await this.healthy()), this.#timeoutMs, 100);
    if (!proc.running || !ready) {
      await proc.stop();
      const why = proc.running ? `not healthy after ${this.#timeoutMs} ms` : `exited with code ${await proc.exited}`;
      throw new LabError(`etcd member ${this.name} in ${this.node.name} ${why}:\n${proc.output().slice(-3000)}`);
    }
  }

  async stop(): Promise<void> {
    await this.#process?.stop(5000);
  }

  async crash(): Promise<void> {
    this.#process?.kill("SIGKILL");
    await this.#process?.exited;
  }
}

/** Checks that `url` is `http://IP:PORT` with a concrete IP (not 0.0.0.0 or ::); returns `IP:PORT`. */
function labUrl(url: string, what: string): string {
  const m = /^http:\/\/(\[[0-9a-fA-F:.]+\]|[0-9.]+):(\d{1,5})$/.exec(url);
  const host = m?.[1]?.replace(/^\[(.*)\]$/, "$1") ?? "";
  const ip = m ? parseIp(host, what) : undefined;
  if (!m || !ip || ip.value === 0n) {
    throw new LabError(`etcd ${what} "${url}": use http://IP:PORT with an address of the member's lab namespace`);
  }
  return `${m[1] ?? ""}:${m[2] ?? ""}`;
}

/** Options for {@link startEtcdCluster}. */
export interface EtcdClusterOptions {
  /** Names start with this (default `etcd`): namespaces `<label>1..N`, LAN `<label>-lan`. */
  readonly label?: string;
  /** Number of members (default 1; 3 for a cluster that survives losing one). */
  readonly size?: number;
  /** IPv4 subnet of the LAN (default `10.79.0.0/24`): this process .2, members .11.., plugged nodes .100.. */
  readonly subnet?: string;
  /**
   * Also plug this process's own network namespace into the LAN, so clients in this process
   * reach the members (default true).
   */
  readonly attachSelf?: boolean;
  /** Further flags for every member. */
  readonly args?: readonly string[];
}

/** A cluster of lab members on one LAN. */
export interface EtcdCluster {
  readonly members: readonly EtcdMember[];
  /** The LAN the members are on. */
  readonly lan: LabLan;
  /** `IP:PORT` of every member. */
  readonly endpoints: readonly string[];
  /** The store spec naming the cluster: `etcd://IP:PORT,...`. */
  readonly spec: string;
  /** Plug a node (a knit host) into the cluster's LAN; returns its address (CIDR). */
  plug(node: LabNsLike): Promise<string>;
  /** Stops every member (by PID). */
  stop(): Promise<void>;
}

/** Build a LAN with `size` etcd members on it and wait until all are healthy. */
export async function startEtcdCluster(lab: Lab, opts: EtcdClusterOptions = {}): Promise<EtcdCluster> {
  const label = opts.label ?? "etcd";
  const size = opts.size ?? 1;
  if (!Number.isInteger(size) || size < 1 || size > 7) throw new LabError(`etcd cluster size ${size}: use 1 to 7 members`);
  const subnet: Cidr = parseCidr(opts.subnet ?? "10.79.0.0/24", "etcd LAN subnet");
  if (subnet.family !== 4 || subnet.prefix > 24) throw new LabError(`etcd LAN subnet ${opts.subnet ?? ""}: use an IPv4 /24 or larger`);
  const address = (host: number): string => formatIp(cidrAt(subnet, BigInt(host)));
  const lan = await lab.lan(`${label}-lan`);
  if (opts.attachSelf !== false) {
    // Only inside scripts/lab-run is this process's namespace the lab's own, never the machine's.
    if (!inLab()) throw new LabError("startEtcdCluster: attachSelf needs scripts/lab-run (it plugs this process's network namespace into the lab)");
    const self = { name: `${lab.id}-self`, path: `/proc/${process.pid}/ns/net` };
    await lab.plug(self, lan, { ifname: `${lab.id}-${label}`.slice(0, 15), addresses: [`${address(2)}/${subnet.prefix}`], defaultRoute: false });
  }
  const names = Array.from({ length: size }, (_, i) => `${label}${i + 1}`);
  const peerUrl = (i: number): string => `http://${address(11 + i)}:${ETCD_PEER_PORT}`;
  const initialCluster = names.map((name, i) => `${name}=${peerUrl(i)}`).join(",");
  const nodes: LabNode[] = [];
  for (const [i, name] of names.entries()) {
    const node = await lab.ns(name);
    await lab.plug(node, lan, { ifname: "eth0", addresses: [`${address(11 + i)}/${subnet.prefix}`] });
    nodes.push(node);
  }
  // Members of a new cluster wait for each other: start them together.
  const members = await Promise.all(
    nodes.map((node, i) =>
      startEtcd(node, {
        name: names[i] ?? "",
        clientUrl: `http://${address(11 + i)}:${ETCD_CLIENT_PORT}`,
        peerUrl: peerUrl(i),
        initialCluster,
        clusterToken: `knit-${lab.id}-${label}`,
        ...(opts.args === undefined ? {} : { args: opts.args }),
      }),
    ),
  );
  const endpoints = members.map((member) => member.endpoint);
  let plugged = 0;
  return {
    members,
    lan,
    endpoints,
    spec: `etcd://${endpoints.join(",")}`,
    async plug(node: LabNsLike): Promise<string> {
      const cidr = `${address(100 + plugged++)}/${subnet.prefix}`;
      await lab.plug(node, lan, { addresses: [cidr], defaultRoute: false });
      return cidr;
    },
    async stop(): Promise<void> {
      await Promise.all(members.map((member) => member.stop()));
    },
  };
}
