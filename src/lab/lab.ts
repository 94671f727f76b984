/**
 * The private test lab: hosts, LANs, routers and an "internet" built out of network
 * namespaces, veth pairs and Linux bridges. Tests, the demo and the benchmarks use it; all of
 * them run inside `scripts/lab-run`, which gives the whole process tree its own network and
 * mount namespace, so nothing made here can reach the machine's own network.
 *
 * Every namespace a {@link Lab} makes is named `<lab id>-<label>` (the lab id is unique among
 * the labs that exist at the same time) and every process it starts is tracked by PID, so that
 * {@link Lab.cleanup} can remove exactly what this lab made and nothing else.
 *
 * Namespaces are entered with `nsenter --net=PATH`, never with `ip netns exec`: the latter
 * also creates a mount namespace of its own, and namespaces that knit creates under
 * /run/netns from inside it would not be visible outside.
 */
import { closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { formatCidr, parseCidr, parseIpWithPrefix, formatIp } from "../net/ip.ts";

/** The repository root (this file is `<repo>/src/lab/lab.ts`). */
export const REPO_ROOT = process.env.KNIT_ROOT ?? resolve(import.meta.dir, "..", "..");

/** The knit command line, as the lab runs it inside a host. */
export const KNIT_BIN = join(REPO_ROOT, "bin", "knit");

/** The script that gives a command its private lab (network, mount and PID namespaces). */
export const LAB_RUN = join(REPO_ROOT, "scripts", "lab-run");

/** True inside `scripts/lab-run` (where a {@link Lab} may be created). */
export function inLab(): boolean {
  return process.env["KNIT_LAB"] === "1";
}

/**
 * Run `argv` inside a fresh private lab (`scripts/lab-run`), with this process's standard
 * input, output and error; resolves with its exit code. For front ends that need a lab and
 * may be started outside one (the demo, the benchmarks): `if (!inLab()) process.exit(await
 * runInLab([...process.argv]))`.
 */
export async function runInLab(argv: readonly string[]): Promise<number> {
  const proc = Bun.spawn([LAB_RUN, ...argv], { stdio: ["inherit", "inherit", "inherit"] });
  return proc.exited;
}

/** Where `ip netns` keeps named namespaces (a private tmpfs inside `scripts/lab-run`). */
export const NETNS_DIR = "/run/netns";

/** Well-known addresses of the lab's internet (documentation prefixes, RFC 5737 / 3849). */
export const INTERNET = {
  /** The internet side of the uplink segment that routers attach to. */
  gateway4: "203.0.113.1",
  /** Its IPv6 address. */
  gateway6: "2001:db8:ffff::1",
  /** Prefix lengths of the uplink segment. */
  prefix4: 24,
  prefix6: 64,
  /** A "server on the internet": addresses on the internet namespace's loopback. */
  server4: "198.51.100.10",
  /** The server's IPv6 address. */
  server6: "2001:db8:5e::10",
} as const;

/** Result of a command run in the lab. */
export interface ExecResult {
  /** Exit code; 128+N when killed by signal N (for example by a timeout). */
  readonly code: number;
  /** Standard output, complete. */
  readonly stdout: string;
  /** Standard error, complete. */
  readonly stderr: string;
}

/** Options for running a command in a lab namespace. */
export interface ExecOptions {
  /** Text fed to standard input (default: no input). */
  stdin?: string;
  /** Extra environment variables, added to the test process's own environment. */
  env?: Record<string, string>;
  /** Throw a {@link LabError} on a non-zero exit (default true). */
  check?: boolean;
  /** Kill the command after this many milliseconds (default 60000). */
  timeoutMs?: number;
  /** Working directory. */
  cwd?: string;
}

/** Options for a background process. */
export interface SpawnOptions {
  /** Extra environment variables. */
  env?: Record<string, string>;
  /** Working directory. */
  cwd?: string;
}

/** A failed lab command: the message carries the command line, exit code and output. */
export class LabError extends Error {
  override readonly name = "LabError";
  /** The result of the command, when the error is a command failure. */
  readonly result: ExecResult | undefined;

  /** @param message what went wrong; @param result the failed command's result, if any. */
  constructor(message: string, result?: ExecResult) {
    super(message);
    this.result = result;
  }
}

/** A network namespace path, compatible with the kernel layer's `Netns`. */
export interface NetnsRef {
  readonly path: string;
}

/**
 * Something in the lab that has a network namespace: a plain namespace, a host, a LAN, a
 * router. Other code may pass any object with a `name` in /run/netns and its `path`.
 */
export interface LabNsLike {
  /** The namespace's name under /run/netns (what `ip -n` takes). */
  readonly name: string;
  /** Path of the namespace file. */
  readonly path: string;
}

/** How a node is attached to a LAN. */
export interface PlugOptions {
  /** Interface name inside the node (at most 15 characters; default `eth<N>`). */
  ifname?: string;
  /** Addresses in CIDR form, IPv4 and/or IPv6 (IPv6 is added with `nodad`). */
  addresses?: readonly string[];
  /** MTU of both ends of the veth pair. */
  mtu?: number;
  /** MAC address of the node's end. */
  mac?: string;
  /**
   * Add a default route via the LAN's router (when the LAN has one) for each family the
   * node gets an address in, unless the node already has a default route (default true).
   */
  defaultRoute?: boolean;
}

/** One LAN a router is attached to. */
export interface RouterLink {
  lan: LabLan;
  /** The router's addresses on that LAN (CIDR); hosts use them as their default gateway. */
  addresses: readonly string[];
  /** Interface name inside the router (default `eth<N>`). */
  ifname?: string;
  mtu?: number;
}

/** Options for {@link Lab.router}. */
export interface RouterOptions {
  /** Connect the router to the lab's internet (created on first use). */
  internet?: boolean;
  /**
   * Masquerade IPv4 from the LANs behind the router's uplink (like a home router) instead of
   * giving the internet routes back to the LAN subnets. IPv6 is always routed.
   */
  nat?: boolean;
}

/** A background process started by {@link Lab.spawn}. */
export class LabProcess {
  /** Process id (nsenter execs the command, so this is the command's own PID). */
  readonly pid: number;
  /** The command line. */
  readonly argv: readonly string[];
  /** Log file that receives both standard output and standard error. */
  readonly logFile: string;
  /** Resolves with the exit code (128+N when killed by signal N). */
  readonly exited: Promise<number>;
  #done = false;

  /** @internal Created by {@link Lab.spawn}. */
  constructor(pid: number, argv: readonly string[], logFile: string, exited: Promise<number>) {
    this.pid = pid;
    this.argv = argv;
    this.logFile = logFile;
    this.exited = exited.then((code) => {
      this.#done = true;
      return code;
    });
  }

  /** True while the process has not exited. */
  get running(): boolean {
    return !this.#done;
  }

  /** Everything the process wrote so far (stdout and stderr interleaved). */
  output(): string {
    try {
      return readFileSync(this.logFile, "utf8");
    } catch {
      return "";
    }
  }

  /** Send a signal to the process, by PID; no-op once it has exited. */
  kill(signal: NodeJS.Signals = "SIGTERM"): void {
    if (this.#done) return;
    try {
      process.kill(this.pid, signal);
    } catch {
      // already gone
    }
  }

  /** SIGTERM, then SIGKILL after `graceMs`; resolves when the process has exited. */
  async stop(graceMs = 3000): Promise<number> {
    if (!this.#done) {
      this.kill("SIGTERM");
      const timer = setTimeout(() => this.kill("SIGKILL"), graceMs);
      try {
        await this.exited;
      } finally {
        clearTimeout(timer);
      }
    }
    return this.exited;
  }
}

/** A network namespace made by the lab. */
export class LabNode implements LabNsLike {
  /** The short name given by the test (`h1`, `lan`). */
  readonly label: string;
  /** The namespace's name under /run/netns: `<lab id>-<label>`. */
  readonly name: string;
  /** Path of the namespace file. */
  readonly path: string;
  /** The namespace as the kernel layer's `Netns` (`{ path }`). */
  readonly netns: NetnsRef;
  /** The lab that made this node. */
  readonly lab: Lab;
  /** Interfaces the lab created in this namespace (besides `lo`). */
  readonly labLinks = new Set<string>();

  /** @internal Created by the {@link Lab}. */
  constructor(lab: Lab, label: string, name: string) {
    this.lab = lab;
    this.label = label;
    this.name = name;
    this.path = join(NETNS_DIR, name);
    this.netns = { path: this.path };
  }

  /** Run a command in this namespace; see {@link Lab.exec}. */
  exec(argv: readonly string[], opts: ExecOptions = {}): Promise<ExecResult> {
    return this.lab.exec(this, argv, opts);
  }

  /** Start a background process in this namespace; see {@link Lab.spawn}. */
  spawn(argv: readonly string[], opts: SpawnOptions = {}): LabProcess {
    return this.lab.spawn(this, argv, opts);
  }

  /** Ping an address from this namespace; see {@link Lab.ping}. */
  ping(addr: string, opts: PingOptions = {}): Promise<boolean> {
    return this.lab.ping(this, addr, opts);
  }

  /** Ping until a reply comes back or `timeoutMs` passes; see {@link Lab.waitPing}. */
  waitPing(addr: string, timeoutMs = 5000): Promise<boolean> {
    return this.lab.waitPing(this, addr, timeoutMs);
  }
}

/** A "knit host": a namespace plus a private knit state directory. */
export class LabHost extends LabNode {
  /** Private state directory, given to knit as KNIT_STATE_DIR. */
  readonly stateDir: string;

  /** @internal Created by {@link Lab.host}. */
  constructor(lab: Lab, label: string, name: string, stateDir: string) {
    super(lab, label, name);
    this.stateDir = stateDir;
  }

  /** The environment knit runs with on this host. */
  knitEnv(extra: Record<string, string> = {}): Record<string, string> {
    // KNIT_HOST: each lab host is its own knit host, also when several share one cluster store.
    return { KNIT_STATE_DIR: this.stateDir, KNIT_HOST: this.label, ...extra };
  }

  /**
   * Run `<repo>/bin/knit ARGS...` on this host (inside its namespace, with its state
   * directory). Never throws on a non-zero exit: the caller checks `code`.
   */
  knit(args: readonly string[], opts: Omit<ExecOptions, "check"> = {}): Promise<ExecResult> {
    return this.lab.exec(this, [KNIT_BIN, ...args], { ...opts, env: this.knitEnv(opts.env), check: false });
  }

  /** Like {@link LabHost.knit}, but throws a {@link LabError} with stdout and stderr on failure. */
  async knitOk(args: readonly string[], opts: Omit<ExecOptions, "check"> = {}): Promise<ExecResult> {
    const r = await this.knit(args, opts);
    if (r.code !== 0) throw commandError([KNIT_BIN, ...args], r, this);
    return r;
  }

  /** Start a long-running knit command (an agent) on this host in the background. */
  spawnKnit(args: readonly string[], opts: SpawnOptions = {}): LabProcess {
    return this.lab.spawn(this, [KNIT_BIN, ...args], { ...opts, env: this.knitEnv(opts.env) });
  }
}

/** A LAN: a namespace that holds one Linux bridge (the "switch") that nodes are plugged into. */
export class LabLan extends LabNode {
  /** Name of the bridge inside the LAN namespace. */
  readonly bridge = "br0";
  /** The router's addresses on this LAN (no prefix), once a router is attached. */
  readonly gateways: string[] = [];
  /** Nodes plugged into this LAN. */
  readonly members: { node: LabNsLike; ifname: string; addresses: readonly string[]; router: boolean }[] = [];
  #ports = 0;

  /** @internal Next unique port name inside the LAN namespace. */
  nextPort(): string {
    return `p${this.#ports++}`;
  }
}

/** A router: a namespace with forwarding on, attached to LANs and optionally the internet. */
export class LabRouter extends LabNode {
  /** The uplink to the internet, when the router has one. */
  uplink: { ifname: string; addresses: string[] } | undefined;
}

/** The lab's internet: an uplink segment (a bridge with the gateway addresses) plus a server. */
export class LabInternet extends LabLan {
  /** Number of routers attached (each gets the next uplink address). */
  routers = 0;
}

/** Options for {@link Lab.ping}. */
export interface PingOptions {
  /** Replies needed (default 1). */
  count?: number;
  /**
   * Seconds to keep trying (default 1): a request goes out every 0.2 s until `count` replies
   * came back or the time is up, so one lost first packet (ARP, a port still coming up)
   * does not fail the check, while a negative check still takes only this long.
   */
  waitSec?: number;
}

const IFNAME_RE = /^[A-Za-z0-9_.-]{1,15}$/;
const LABEL_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,19}$/;

function commandError(argv: readonly string[], r: ExecResult, where?: LabNsLike): LabError {
  const inNs = where ? ` (in ${where.name})` : "";
  const out = [r.stdout.trim() && `stdout:\n${r.stdout.trimEnd()}`, r.stderr.trim() && `stderr:\n${r.stderr.trimEnd()}`]
    .filter(Boolean)
    .join("\n");
  return new LabError(`${argv.join(" ")}${inNs} failed (exit ${r.code})${out ? `\n${out}` : ""}`, r);
}

function isV6(cidrOrAddr: string): boolean {
  return cidrOrAddr.includes(":");
}

function addrOnly(cidr: string): string {
  const slash = cidr.indexOf("/");
  return slash < 0 ? cidr : cidr.slice(0, slash);
}

function subnetOf(cidr: string): string {
  return formatCidr(parseCidr(cidr, "address", false));
}

function randomId(): string {
  const b = new Uint8Array(2);
  crypto.getRandomValues(b);
  return `l${Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("")}`;
}

/** Inode of a namespace file (identifies the namespace). */
function nsInode(path: string): number | undefined {
  try {
    return statSync(path).ino;
  } catch {
    return undefined;
  }
}

/** PIDs of the processes whose network namespace is the one at `nsPath`. */
export function processesInNetns(nsPath: string): number[] {
  const ino = nsInode(nsPath);
  if (ino === undefined) return [];
  const pids: number[] = [];
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    if (nsInode(`/proc/${entry}/ns/net`) === ino) pids.push(Number(entry));
  }
  return pids;
}

/** The parent PID of a process, or undefined when it is gone. */
function parentPid(pid: number): number | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    // pid (comm) state ppid ...; comm may contain spaces and parentheses.
    const rest = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return Number(rest[1]);
  } catch {
    return undefined;
  }
}

/** True when `pid` is `ancestor` or one of its descendants. */
export function isDescendant(pid: number, ancestors: ReadonlySet<number>): boolean {
  let p: number | undefined = pid;
  for (let i = 0; i < 64 && p !== undefined && p > 1; i++) {
    if (ancestors.has(p)) return true;
    p = parentPid(p);
  }
  return false;
}

/** The command line of a process (for messages). */
export function processCommand(pid: number): string {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0").filter(Boolean).join(" ");
  } catch {
    return "?";
  }
}

/** Mount points (from /proc/self/mountinfo) at or under `dir`, deepest first. */
export function mountsUnder(dir: string): { target: string; fstype: string }[] {
  const out: { target: string; fstype: string }[] = [];
  let text = "";
  try {
    text = readFileSync("/proc/self/mountinfo", "utf8");
  } catch {
    return out;
  }
  const unescape = (s: string): string => s.replace(/\\(\d{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
  for (const line of text.split("\n")) {
    const fields = line.split(" ");
    const target = unescape(fields[4] ?? "");
    const sep = fields.indexOf("-");
    const fstype = sep >= 0 ? (fields[sep + 1] ?? "") : "";
    if (target === dir || target.startsWith(`${dir}/`)) out.push({ target, fstype });
  }
  return out.sort((a, b) => b.target.length - a.target.length);
}

/** Lab ids in use by labs of this process (other processes see their own /run/netns). */
const liveIds = new Set<string>();

/**
 * A private lab. Create with {@link Lab.create}; always call {@link Lab.cleanup} (it is
 * idempotent), typically in `afterAll`.
 *
 * ```ts
 * const lab = await Lab.create();
 * const lan = await lab.lan("lan");
 * await lab.router("r", [{ lan, addresses: ["192.168.1.1/24"] }], { internet: true });
 * const h1 = await lab.host("h1");
 * await lab.plug(h1, lan, { addresses: ["192.168.1.10/24"] });
 * expect(await h1.ping(INTERNET.server4)).toBe(true);
 * await lab.cleanup();
 * ```
 */
export class Lab {
  /** Unique short id; every namespace of this lab is named `<id>-<label>`. */
  readonly id: string;
  /** Temporary directory of this lab: host state directories are `<dir>/<label>`; the lab's own files start with `_`. */
  readonly dir: string;
  readonly #nodes = new Map<string, LabNode>();
  readonly #procs = new Map<number, LabProcess>();
  readonly #plugCount = new Map<string, number>();
  readonly #cleanups: { what: string; fn: () => Promise<void> | void }[] = [];
  #internet: LabInternet | undefined;
  #internetPending: Promise<LabInternet> | undefined;
  #logs = 0;
  #closed = false;

  /**
   * Named namespaces that existed when this lab was made. Every lab of one test run shares
   * /run/netns, so leak checks ignore these: what an earlier test file left is that file's
   * failure, not this one's.
   */
  readonly netnsAtStart: ReadonlySet<string>;

  private constructor(id: string, dir: string) {
    this.id = id;
    this.dir = dir;
    this.netnsAtStart = new Set(existsSync(NETNS_DIR) ? readdirSync(NETNS_DIR) : []);
  }

  /**
   * Make a new lab. Requires root and, outside `scripts/lab-run`, refuses to run (so a test
   * can never build its lab in the machine's own network namespace) unless
   * `KNIT_LAB_UNSAFE=1` is set.
   *
   * @param prefix first letters of the lab id (default `l`); the id gets 4 random hex digits.
   */
  static async create(prefix = "l"): Promise<Lab> {
    if (!inLab() && process.env["KNIT_LAB_UNSAFE"] !== "1") {
      throw new LabError("the lab must run inside scripts/lab-run (KNIT_LAB=1 is not set): it would change this machine's network");
    }
    if (process.getuid?.() !== 0) throw new LabError("the lab needs root (network namespaces)");
    if (!/^[a-z][a-z0-9]{0,3}$/.test(prefix)) throw new LabError(`lab prefix "${prefix}": use 1-4 lowercase letters/digits`);
    let id = "";
    for (let i = 0; i < 100; i++) {
      const candidate = prefix + randomId().slice(1);
      if (liveIds.has(candidate)) continue;
      const taken = existsSync(NETNS_DIR) && readdirSync(NETNS_DIR).some((n) => n.startsWith(`${candidate}-`));
      if (!taken) {
        id = candidate;
        break;
      }
    }
    if (!id) throw new LabError("cannot find a free lab id");
    liveIds.add(id);
    const dir = mkdtempSync(join(tmpdir(), `knit-${id}-`));
    return new Lab(id, dir);
  }

  /** Every namespace this lab made and has not deleted. */
  get nodes(): readonly LabNode[] {
    return [...this.#nodes.values()];
  }

  /** PIDs of background processes started by this lab that are still running. */
  get pids(): number[] {
    return [...this.#procs.values()].filter((p) => p.running).map((p) => p.pid);
  }

  /** Register a function that {@link Lab.cleanup} runs first (last registered runs first). */
  onCleanup(what: string, fn: () => Promise<void> | void): void {
    this.#cleanups.push({ what, fn });
  }

  #check(label: string): string {
    if (this.#closed) throw new LabError(`lab ${this.id} is cleaned up`);
    if (!LABEL_RE.test(label)) throw new LabError(`lab name "${label}": use up to 20 letters, digits, '-', '_', '.'`);
    const name = `${this.id}-${label}`;
    if (this.#nodes.has(name)) throw new LabError(`lab ${this.id} already has a namespace "${label}"`);
    return name;
  }

  async #addNs<T extends LabNode>(node: T): Promise<T> {
    this.#nodes.set(node.name, node);
    await this.run(["ip", "netns", "add", node.name]);
    await this.run(["ip", "-n", node.name, "link", "set", "lo", "up"]);
    if (!(node instanceof LabHost) && node.constructor !== LabNode) {
      // LANs, routers and the internet are pure lab plumbing: no DAD on any of their links.
      await this.sysctl(node, { "net.ipv6.conf.all.accept_dad": "0", "net.ipv6.conf.default.accept_dad": "0" });
    }
    return node;
  }

  /** Create a plain namespace with `lo` up. */
  async ns(label: string): Promise<LabNode> {
    return this.#addNs(new LabNode(this, label, this.#check(label)));
  }

  /** Create a knit host: a namespace with `lo` up and a private state directory. */
  async host(label: string): Promise<LabHost> {
    const name = this.#check(label);
    const stateDir = join(this.dir, label);
    mkdirSync(stateDir, { recursive: true, mode: 0o700 });
    return this.#addNs(new LabHost(this, label, name, stateDir));
  }

  /** Create a LAN: a namespace holding bridge `br0` (no STP, forwarding at once). */
  async lan(label: string): Promise<LabLan> {
    const lan = await this.#addNs(new LabLan(this, label, this.#check(label)));
    await this.#setupBridge(lan, []);
    return lan;
  }

  async #setupBridge(lan: LabLan, addresses: readonly string[]): Promise<void> {
    const lines = [
      `link add ${lan.bridge} type bridge stp_state 0 forward_delay 0 mcast_snooping 0`,
      ...addresses.map((a) => `addr add ${a} dev ${lan.bridge}${isV6(a) ? " nodad" : ""}`),
      `link set ${lan.bridge} up`,
    ];
    await this.ipBatch(lan, lines);
    lan.labLinks.add(lan.bridge);
  }

  /**
   * Plug a node into a LAN with a veth pair: one end (`ifname`) in the node with the given
   * addresses, the other enslaved to the LAN's bridge. Returns the node's interface name.
   */
  async plug(node: LabNsLike, lan: LabLan, opts: PlugOptions = {}): Promise<string> {
    return this.#plug(node, lan, opts, false);
  }

  async #plug(node: LabNsLike, lan: LabLan, opts: PlugOptions, router: boolean): Promise<string> {
    const labNode = this.#nodes.get(node.name);
    const plugs = this.#plugCount.get(node.path) ?? 0;
    this.#plugCount.set(node.path, plugs + 1);
    const ifname = opts.ifname ?? `eth${plugs}`;
    if (!IFNAME_RE.test(ifname)) throw new LabError(`interface name "${ifname}": at most 15 characters, no spaces or '/'`);
    const port = lan.nextPort();
    const addresses = opts.addresses ?? [];
    for (const a of addresses) parseIpWithPrefix(a); // validate early: bad input leaves nothing
    const mtu = opts.mtu === undefined ? [] : ["mtu", String(opts.mtu)];
    // Created from inside the node, so the node needs only a path; the peer goes straight
    // into the LAN namespace, so no name can collide with anything in between.
    await this.exec(node, ["ip", "link", "add", ifname, ...mtu, "type", "veth", "peer", "name", port, ...mtu, "netns", lan.name]);
    labNode?.labLinks.add(ifname);
    lan.labLinks.add(port);
    // No duplicate address detection on lab links: a tentative link-local address holds back
    // neighbor discovery, so IPv6 would need ~2 s after every plug before it works.
    await this.sysctl(node, { [`net/ipv6/conf/${ifname}/accept_dad`]: "0" });
    await this.ipBatch(lan, [`link set ${port} master ${lan.bridge}`, `link set ${port} up`]);
    const lines = [
      ...(opts.mac ? [`link set ${ifname} address ${opts.mac}`] : []),
      ...addresses.map((a) => `addr add ${a} dev ${ifname}${isV6(a) ? " nodad" : ""}`),
      `link set ${ifname} up`,
    ];
    await this.ipBatch(node, lines);
    lan.members.push({ node, ifname, addresses, router });
    if (!router && opts.defaultRoute !== false) {
      for (const gw of lan.gateways) {
        if (addresses.some((a) => isV6(a) === isV6(gw))) await this.#defaultRoute(node, gw, ifname);
      }
    }
    return ifname;
  }

  /** Add a default route via `gateway` unless the node already has one for that family. */
  async #defaultRoute(node: LabNsLike, gateway: string, dev?: string): Promise<void> {
    const fam = isV6(gateway) ? "-6" : "-4";
    const r = await this.exec(node, ["ip", fam, "route", "add", "default", "via", gateway, ...(dev ? ["dev", dev] : [])], { check: false });
    if (r.code !== 0 && !/File exists/.test(r.stderr)) throw commandError(["ip", fam, "route", "add", "default", "via", gateway], r, node);
  }

  /** Add a route in a node: `ip route replace DST via VIA` (`dst` may be `default`). */
  async route(node: LabNsLike, dst: string, via: string): Promise<void> {
    await this.exec(node, ["ip", isV6(via) ? "-6" : "-4", "route", "replace", dst, "via", via]);
  }

  /**
   * Create the lab's internet (once; later calls return the same one): a namespace with a
   * bridge `br0` carrying {@link INTERNET}.gateway4/6 that routers attach to, and a server
   * at {@link INTERNET}.server4/6 on its loopback.
   */
  async internet(): Promise<LabInternet> {
    if (this.#internet) return this.#internet;
    this.#internetPending ??= (async () => {
      const inet = await this.#addNs(new LabInternet(this, "inet", this.#check("inet")));
      await this.#setupBridge(inet, [`${INTERNET.gateway4}/${INTERNET.prefix4}`, `${INTERNET.gateway6}/${INTERNET.prefix6}`]);
      await this.ipBatch(inet, [`addr add ${INTERNET.server4}/32 dev lo`, `addr add ${INTERNET.server6}/128 dev lo nodad`]);
      this.#internet = inet;
      return inet;
    })();
    return this.#internetPending;
  }

  /**
   * Create a router attached to LANs (and, with `internet`, to the lab's internet). It
   * forwards IPv4 and IPv6, becomes the default gateway of every node on its LANs (also of
   * nodes plugged in before it), and, when it has an uplink, the internet routes the LANs'
   * subnets back to it (or it masquerades IPv4, with `nat`).
   */
  async router(label: string, links: readonly RouterLink[], opts: RouterOptions = {}): Promise<LabRouter> {
    const r = await this.#addNs(new LabRouter(this, label, this.#check(label)));
    await this.sysctl(r, {
      "net.ipv4.ip_forward": "1",
      "net.ipv6.conf.all.forwarding": "1",
      "net.ipv6.conf.default.forwarding": "1",
    });
    let n = 0;
    for (const link of links) {
      const ifname = link.ifname ?? `eth${n++}`;
      await this.#plug(r, link.lan, { ifname, addresses: link.addresses, ...(link.mtu === undefined ? {} : { mtu: link.mtu }) }, true);
      const gws = link.addresses.map(addrOnly);
      link.lan.gateways.push(...gws);
      for (const m of link.lan.members) {
        if (m.router) continue;
        for (const gw of gws) {
          if (m.addresses.some((a) => isV6(a) === isV6(gw))) await this.#defaultRoute(m.node, gw, m.ifname);
        }
      }
    }
    if (opts.internet) {
      const inet = await this.internet();
      const k = 1 + ++inet.routers;
      const v4 = `${formatIp({ family: 4, value: (203n << 24n) | (113n << 8n) | BigInt(k) })}`;
      const v6 = `2001:db8:ffff::${k.toString(16)}`;
      const addresses = [`${v4}/${INTERNET.prefix4}`, `${v6}/${INTERNET.prefix6}`];
      await this.#plug(r, inet, { ifname: "wan0", addresses }, true);
      r.uplink = { ifname: "wan0", addresses };
      await this.#defaultRoute(r, INTERNET.gateway4, "wan0");
      await this.#defaultRoute(r, INTERNET.gateway6, "wan0");
      const back: string[] = [];
      for (const link of links) {
        for (const a of link.addresses) {
          if (!isV6(a) && opts.nat) continue;
          back.push(`route replace ${subnetOf(a)} via ${isV6(a) ? v6 : v4}`);
        }
      }
      await this.ipBatch(inet, back);
      if (opts.nat) {
        await this.exec(r, ["nft", "-f", "-"], {
          stdin: `table ip lab_nat {\n chain postrouting {\n  type nat hook postrouting priority srcnat; policy accept;\n  oifname "wan0" masquerade\n }\n}\n`,
        });
      }
    }
    return r;
  }

  /** Set sysctls inside a node's namespace (`sysctl -w` under nsenter). */
  async sysctl(node: LabNsLike, values: Record<string, string>): Promise<void> {
    const args = Object.entries(values).map(([k, v]) => `${k}=${v}`);
    if (args.length) await this.exec(node, ["sysctl", "-q", "-w", ...args]);
  }

  /** Run many `ip` commands (without the leading `ip`) in one `ip -batch` in a namespace. */
  async ipBatch(node: LabNsLike, lines: readonly string[]): Promise<void> {
    if (lines.length === 0) return;
    await this.exec(node, ["ip", "-batch", "-"], { stdin: `${lines.join("\n")}\n` });
  }

  /** Run a command in the lab's own (root) namespace, outside every node. */
  async run(argv: readonly string[], opts: ExecOptions = {}): Promise<ExecResult> {
    return runCommand(argv, opts);
  }

  /**
   * Run a command inside a node's namespace (`nsenter --net=PATH -- ARGV`) and collect its
   * output. Throws a {@link LabError} on a non-zero exit unless `check: false`.
   */
  async exec(node: NetnsRef & { name?: string }, argv: readonly string[], opts: ExecOptions = {}): Promise<ExecResult> {
    const full = ["nsenter", `--net=${node.path}`, "--", ...argv];
    const r = await runCommand(full, { ...opts, check: false });
    if (r.code !== 0 && opts.check !== false) {
      throw commandError(argv, r, { name: node.name ?? node.path, path: node.path });
    }
    return r;
  }

  /**
   * Start a background process in a node's namespace. Its PID is tracked: {@link Lab.cleanup}
   * stops it. Output goes to a log file ({@link LabProcess.output}).
   */
  spawn(node: NetnsRef, argv: readonly string[], opts: SpawnOptions = {}): LabProcess {
    if (this.#closed) throw new LabError(`lab ${this.id} is cleaned up`);
    const logFile = join(this.dir, `_proc-${this.#logs++}.log`);
    const fd = openSync(logFile, "a");
    let proc;
    try {
      proc = Bun.spawn(["nsenter", `--net=${node.path}`, "--", ...argv], {
        stdin: "ignore",
        stdout: fd,
        stderr: fd,
        env: { ...process.env, ...opts.env },
        ...(opts.cwd === undefined ? {} : { cwd: opts.cwd }),
      });
    } finally {
      closeSync(fd);
    }
    const lp = new LabProcess(proc.pid, argv, logFile, proc.exited);
    this.#procs.set(proc.pid, lp);
    return lp;
  }

  /** Ping `addr` from a node (`ping -c1 -i0.2 -w1`); true when a reply came back in time. */
  async ping(node: NetnsRef, addr: string, opts: PingOptions = {}): Promise<boolean> {
    const count = String(opts.count ?? 1);
    const wait = String(opts.waitSec ?? 1);
    const r = await this.exec(node, ["ping", "-n", "-q", "-c", count, "-i", "0.2", "-w", wait, addr], { check: false });
    return r.code === 0;
  }

  /**
   * Ping until a reply comes back or `timeoutMs` passes; returns whether it succeeded. Use it
   * for positive checks right after building or changing a path: on a loaded machine the
   * first packets through fresh links can take over a second (seen with 2 CPUs at load 7+).
   */
  async waitPing(node: NetnsRef, addr: string, timeoutMs = 5000): Promise<boolean> {
    return waitFor(() => this.ping(node, addr), timeoutMs);
  }

  /** Wait until a TCP port is listening inside a node (checked with `ss`). */
  async waitListening(node: NetnsRef, port: number, timeoutMs = 5000): Promise<void> {
    const ok = await waitFor(async () => {
      const r = await this.exec(node, ["ss", "-Hltn", `sport = :${port}`], { check: false });
      return r.stdout.trim() !== "";
    }, timeoutMs);
    if (!ok) throw new LabError(`nothing listens on TCP port ${port} in ${nodeName(node)} after ${timeoutMs} ms`);
  }

  /**
   * Start a TCP echo server (`busybox nc -ll -p PORT -e cat`) in a node, on all addresses
   * (IPv4 and IPv6), and wait until it listens.
   */
  async tcpEchoServer(node: NetnsRef, port: number): Promise<LabProcess> {
    const p = this.spawn(node, ["busybox", "nc", "-ll", "-p", String(port), "-e", "cat"]);
    await this.waitListening(node, port);
    return p;
  }

  /**
   * Connect from a node to `addr:port`, send `text`, and return what came back before the
   * server closed (with an echo server: `text`). Returns undefined when the connection failed.
   */
  async tcpSend(node: NetnsRef, addr: string, port: number, text: string, timeoutSec = 3): Promise<string | undefined> {
    const r = await this.exec(node, ["busybox", "nc", "-w", String(timeoutSec), addr, String(port)], {
      stdin: text,
      check: false,
      timeoutMs: (timeoutSec + 2) * 1000,
    });
    return r.code === 0 ? r.stdout : undefined;
  }

  /**
   * Start an HTTP server (`busybox httpd -f`) in a node serving `body` at `/`, and wait until
   * it listens.
   */
  async httpServer(node: NetnsRef, port: number, body: string): Promise<LabProcess> {
    const root = mkdtempSync(join(this.dir, "_www-"));
    await Bun.write(join(root, "index.html"), body);
    const p = this.spawn(node, ["busybox", "httpd", "-f", "-p", String(port), "-h", root]);
    await this.waitListening(node, port);
    return p;
  }

  /**
   * HTTP/1.0 GET from a node, sent with `busybox nc` (Debian's static busybox `wget`
   * crashes). Returns status and body, or undefined when no connection could be made.
   */
  async httpRequest(node: NetnsRef, url: string, timeoutSec = 3): Promise<{ status: number; body: string } | undefined> {
    const u = new URL(url);
    const host = u.hostname.replace(/^\[(.*)\]$/, "$1");
    const port = u.port || "80";
    const request = `GET ${u.pathname}${u.search} HTTP/1.0\r\nHost: ${u.host}\r\nConnection: close\r\n\r\n`;
    const raw = await this.tcpSend(node, host, Number(port), request, timeoutSec);
    if (raw === undefined || raw === "") return undefined;
    const m = /^HTTP\/\d\.\d (\d{3})/.exec(raw);
    const split = raw.indexOf("\r\n\r\n");
    return { status: m ? Number(m[1]) : 0, body: split < 0 ? "" : raw.slice(split + 4) };
  }

  /** HTTP GET from a node: the body of a 2xx answer, otherwise undefined. */
  async httpGet(node: NetnsRef, url: string, timeoutSec = 3): Promise<string | undefined> {
    const r = await this.httpRequest(node, url, timeoutSec);
    return r && r.status >= 200 && r.status < 300 ? r.body : undefined;
  }

  /**
   * Remove everything this lab made: run {@link Lab.onCleanup} hooks, stop its processes (by
   * PID), kill any process still inside one of its namespaces, delete its namespaces,
   * unmount what is mounted under its directory and remove the directory. Idempotent; keeps
   * going after errors and throws them together at the end.
   *
   * @returns the stray processes it had to kill (`PID (command) in NAMESPACE`): processes
   *   the lab did not start itself that still lived in its namespaces, a leak worth a look.
   */
  async cleanup(): Promise<string[]> {
    if (this.#closed && this.#nodes.size === 0) return [];
    this.#closed = true;
    const errors: string[] = [];
    const attempt = async (what: string, fn: () => unknown): Promise<void> => {
      try {
        await fn();
      } catch (err) {
        errors.push(`${what}: ${(err as Error).message}`);
      }
    };
    while (this.#cleanups.length) {
      const c = this.#cleanups.pop();
      if (c) await attempt(c.what, c.fn);
    }
    await Promise.all([...this.#procs.values()].map((p) => attempt(`stop pid ${p.pid}`, () => p.stop(2000))));
    this.#procs.clear();
    // Processes the tests started indirectly (a sandbox, a daemon's child) that still live in
    // one of our namespaces: they were started by this run, and would keep it alive.
    const strays: string[] = [];
    for (const node of this.#nodes.values()) {
      for (const pid of processesInNetns(node.path)) {
        if (pid === process.pid) continue;
        strays.push(`${pid} (${processCommand(pid)}) in ${node.name}`);
        try {
          process.kill(pid, "SIGKILL");
        } catch {
          // gone
        }
      }
    }
    if (strays.length) console.warn(`lab ${this.id}: killed stray processes: ${strays.join("; ")}`);
    const names = [...this.#nodes.keys()];
    if (names.length) {
      await attempt("delete namespaces", async () => {
        const r = await runCommand(["ip", "-force", "-batch", "-"], {
          stdin: names.map((n) => `netns delete ${n}`).join("\n") + "\n",
          check: false,
        });
        const left = names.filter((n) => existsSync(join(NETNS_DIR, n)));
        if (left.length) throw new LabError(`namespaces still there: ${left.join(", ")}: ${r.stderr.trim()}`);
      });
    }
    this.#nodes.clear();
    await attempt("remove lab directory", async () => {
      for (const m of mountsUnder(this.dir)) {
        await runCommand(["umount", "-l", m.target], { check: false });
      }
      if (mountsUnder(this.dir).length === 0) rmSync(this.dir, { recursive: true, force: true });
      else throw new LabError(`cannot unmount everything under ${this.dir}`);
    });
    liveIds.delete(this.id);
    if (errors.length) throw new LabError(`lab ${this.id} cleanup: ${errors.join("; ")}`);
    return strays;
  }
}

function nodeName(node: NetnsRef & { name?: string }): string {
  return node.name ?? node.path;
}

/** Run a command (no namespace change) and collect its output. */
export async function runCommand(argv: readonly string[], opts: ExecOptions = {}): Promise<ExecResult> {
  let proc;
  try {
    proc = Bun.spawn([...argv], {
      stdin: opts.stdin === undefined ? "ignore" : new TextEncoder().encode(opts.stdin),
      stdout: "pipe",
      stderr: "pipe",
      env: { ...process.env, ...opts.env },
      timeout: opts.timeoutMs ?? 60_000,
      killSignal: "SIGKILL",
      ...(opts.cwd === undefined ? {} : { cwd: opts.cwd }),
    });
  } catch (err) {
    throw new LabError(`cannot run ${argv[0] ?? "?"}: ${(err as Error).message} (run scripts/setup)`);
  }
  const [stdout, stderr, code] = await Promise.all([
    new Response(proc.stdout).text(),
    new Response(proc.stderr).text(),
    proc.exited,
  ]);
  const r = { code, stdout, stderr };
  if (code !== 0 && opts.check !== false) throw commandError(argv, r);
  return r;
}

/** Poll `pred` every `intervalMs` until it is true or `timeoutMs` passed; returns the last answer. */
export async function waitFor(pred: () => Promise<boolean> | boolean, timeoutMs = 5000, intervalMs = 100): Promise<boolean> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    if (await pred()) return true;
    if (performance.now() >= deadline) return false;
    await Bun.sleep(intervalMs);
  }
}
