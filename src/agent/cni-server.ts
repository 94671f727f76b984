/**
 * The agent's side of the CNI handoff (protocol: src/cni/handoff.ts): plugin processes hand
 * the agent whole invocations over `<state dir>/agent-cni.sock` (mode 0600: root only), and
 * the agent runs each with src/cni/main.ts runPlugin, the same code a plugin process runs,
 * with the invocation's own environment and stdin. What the agent saves per invocation is
 * what a plugin process pays before and after its work: loading knit's code, opening the
 * store; and a plugin process that only hands over loads almost nothing (src/cni/client.ts).
 *
 * An invocation is taken only when running it here is the same as running it in the plugin
 * process; otherwise the agent declines, and the plugin runs it itself:
 *   - the plugin is in the agent's network and mount namespaces (the host side of a veth
 *     is made in the caller's network namespace; paths are the caller's), and in its
 *     working directory unless the state directory, CNI_NETNS and CNI_PATH are absolute
 *     (delegated plugins run in the plugin's working directory);
 *   - its configuration and environment name this state directory and this host name, as
 *     the plugin would settle them (config `stateDir`, KNIT_STATE_DIR, the default;
 *     config `host`, KNIT_HOST, `<state dir>/host`, the hostname);
 *   - no fault injection (KNIT_CRASH_AT, KNIT_FAIL_AT) is asked for;
 *   - the agent is not stopping.
 *
 * Many invocations run at once, as many plugin processes would: each has its own context
 * and trace; they share one SQLite connection to the store, whose transactions are
 * synchronous (no other invocation runs inside one), and the agent's event loop, which
 * nothing on the path blocks for long: the agent deletes links on worker threads or in
 * child `ip` processes (src/kernel/link-deleter.ts), not by a netlink request on the loop
 * that would hold it through the kernel's RCU wait. Stopping declines new invocations and
 * waits (bounded) for the ones under way.
 */
import { chmodSync, readFileSync, readlinkSync, rmSync } from "node:fs";
import { hostname } from "node:os";
import { isAbsolute, resolve } from "node:path";
import type { Socket, UnixSocketListener } from "bun";
import type { Engine } from "../engine/engine.ts";
import { hostName } from "../engine/owner.ts";
import { field, isObject } from "../cni/json.ts";
import { LATEST, SupportedVersions, statedVersion } from "../cni/protocol.ts";
import { explicitHost, type CniEnv } from "../cni/context.ts";
import { DEFAULT_STATE_DIR } from "../cni/defaults.ts";
import { CniCodes, CniError } from "../cni/errors.ts";
import { runPlugin, type PluginHost, type RunOutput } from "../cni/main.ts";
import { GO_LINE, HANDOFF_VERSION, MAX_REQUEST_BYTES, type HandoffAck, type HandoffAnswer, type HandoffRequest } from "../cni/handoff.ts";
import type { Logger } from "./log.ts";

/** How long a connection may take to send its request, and to say "go" after the acknowledgement. */
const IDLE_MS = 10_000;

/** One connection: one invocation. */
interface Conn {
  state: "request" | "acked" | "running" | "done";
  chunks: Buffer[];
  size: number;
  request?: HandoffRequest;
  /** Bytes accepted by write() but not yet by the kernel (backpressure). */
  pending: Buffer[];
  closeWhenFlushed: boolean;
  timer?: ReturnType<typeof setTimeout>;
  /** Counted in {@link CniServer.busy} (from the acknowledgement to the answer or the close). */
  counted: boolean;
}

/** What the agent tells the CNI server. */
export interface CniServerOptions {
  stateDir: string;
  /** The socket path (agentPaths(stateDir).cniSocket). */
  socket: string;
  log: Logger;
  /** After each DEL the agent ran: the agent may no longer be needed (an auto-started one stops). */
  onDel?: () => void;
}

/** The agent's network and mount namespaces, to compare a plugin process's with. */
function namespacesOf(pid: number | "self"): string | undefined {
  try {
    return `${readlinkSync(`/proc/${pid}/ns/net`)} ${readlinkSync(`/proc/${pid}/ns/mnt`)}`;
  } catch {
    return undefined;
  }
}

/** The name adoptHostName would settle on for `stateDir` without an explicit one. */
function rememberedHost(stateDir: string): string {
  try {
    return readFileSync(resolve(stateDir, "host"), "utf8").trim() || hostname();
  } catch {
    return hostname();
  }
}

/** A configuration's string field, as Go would read it; undefined when absent, empty or of another type. */
function stringField(conf: unknown, name: string): string | undefined {
  const v = isObject(conf) ? field(conf, name) : undefined;
  return typeof v === "string" && v !== "" ? v : undefined;
}

/** The agent's CNI socket and the invocations it runs. */
export class CniServer {
  private listener: UnixSocketListener<Conn> | undefined;
  private engine: Promise<Engine> | undefined;
  private readonly namespaces = namespacesOf("self");
  private readonly stateDir: string;
  private stopping = false;
  /** Invocations acknowledged and not yet answered (or given up by their plugin). */
  private busy = 0;
  private readonly whenIdle: (() => void)[] = [];
  /** Invocations run since the start, by outcome (for the agent's health). */
  readonly stats = { ran: 0, failed: 0, declined: 0 };

  constructor(private readonly opts: CniServerOptions) {
    this.stateDir = resolve(opts.stateDir);
  }

  /** Listen on the socket (a stale socket file is replaced); only root may connect. */
  start(): void {
    rmSync(this.opts.socket, { force: true });
    // The file is created with the umask's mode: 0600 from the start, no window for others.
    const umask = process.umask(0o177);
    try {
      this.listener = Bun.listen<Conn>({
        unix: this.opts.socket,
        socket: {
          open: (sock) => {
            sock.data = { state: "request", chunks: [], size: 0, pending: [], closeWhenFlushed: false, counted: false };
            this.arm(sock);
          },
          data: (sock, chunk) => this.receive(sock, chunk),
          drain: (sock) => this.flush(sock),
          close: (sock) => this.closed(sock),
          error: (sock) => this.closed(sock),
        },
      });
    } finally {
      process.umask(umask);
    }
    chmodSync(this.opts.socket, 0o600);
  }

  /** Invocations under way. */
  get inFlight(): number {
    return this.busy;
  }

  /**
   * Stop taking invocations (new ones are declined, and run by their plugins), wait up to
   * `graceMs` for those under way, close the store.
   */
  async stop(graceMs = 4000): Promise<void> {
    this.stopping = true;
    this.listener?.stop(false);
    this.listener = undefined;
    rmSync(this.opts.socket, { force: true });
    if (this.busy > 0) {
      await Promise.race([new Promise<void>((resolve) => this.whenIdle.push(resolve)), Bun.sleep(graceMs)]);
      if (this.busy > 0) this.opts.log.warn("stopping with CNI invocations under way", { count: this.busy });
    }
    const engine = await this.engine?.catch(() => undefined);
    this.engine = undefined;
    await engine?.store.close().catch(() => undefined);
  }

  private arm(sock: Socket<Conn>): void {
    clearTimeout(sock.data.timer);
    sock.data.timer = setTimeout(() => sock.end(), IDLE_MS);
  }

  private receive(sock: Socket<Conn>, chunk: Buffer): void {
    const c = sock.data;
    if (c.state === "request") {
      c.chunks.push(chunk);
      c.size += chunk.length;
      if (chunk.indexOf(10) < 0) {
        if (c.size > MAX_REQUEST_BYTES) this.answerAck(sock, { ok: false, reason: `request larger than ${MAX_REQUEST_BYTES} bytes` });
        return;
      }
      const text = Buffer.concat(c.chunks).toString("utf8");
      c.chunks = [];
      const nl = text.indexOf("\n");
      const rest = text.slice(nl + 1);
      const ack = this.acknowledge(text.slice(0, nl), c);
      this.answerAck(sock, ack);
      if (ack.ok && rest) this.receive(sock, Buffer.from(rest));
      return;
    }
    if (c.state === "acked") {
      c.chunks.push(chunk);
      const text = Buffer.concat(c.chunks).toString("utf8");
      if (text.length < GO_LINE.length) return;
      if (text !== GO_LINE) {
        this.settle(c);
        sock.end();
        return;
      }
      clearTimeout(c.timer);
      c.state = "running";
      void this.run(sock);
    }
    // running or done: the plugin has nothing more to say
  }

  private answerAck(sock: Socket<Conn>, ack: HandoffAck): void {
    const c = sock.data;
    if (!ack.ok) {
      this.stats.declined++;
      this.opts.log.debug("CNI invocation declined", { reason: ack.reason });
      c.state = "done";
      this.send(sock, `${JSON.stringify(ack)}\n`, true);
      return;
    }
    c.state = "acked";
    c.counted = true;
    this.busy++;
    this.arm(sock);
    this.send(sock, `${JSON.stringify(ack)}\n`, false);
  }

  /** Whether running the request here is the same as in its plugin process; see the file's comment. */
  private acknowledge(line: string, c: Conn): HandoffAck {
    const no = (reason: string): HandoffAck => ({ ok: false, reason });
    if (this.stopping) return no("the agent is stopping");
    let req: HandoffRequest;
    try {
      req = JSON.parse(line) as HandoffRequest;
    } catch {
      return no("malformed request");
    }
    if (!isObject(req) || req.v !== HANDOFF_VERSION) return no(`handoff protocol version ${String((req as { v?: unknown } | null)?.v)}, the agent speaks ${HANDOFF_VERSION}`);
    if (typeof req.plugin !== "string" || typeof req.stdin !== "string" || !isObject(req.env) || typeof req.pid !== "number" || typeof req.cwd !== "string") return no("malformed request");
    const env = req.env as CniEnv;
    if (Object.values(env).some((v) => typeof v !== "string")) return no("malformed request");
    if (env.KNIT_CRASH_AT || env.KNIT_FAIL_AT) return no("fault injection is asked for");
    if (env.CNI_COMMAND === "VERSION") return no("VERSION is answered by the plugin");
    const theirs = namespacesOf(req.pid);
    if (!theirs || theirs !== this.namespaces) return no("the plugin runs in other namespaces than the agent");
    let conf: unknown;
    let parsed = true;
    try {
      conf = JSON.parse(req.stdin) as unknown;
    } catch {
      parsed = false;
    }
    const dir = stringField(conf, "stateDir") ?? (env.KNIT_STATE_DIR || DEFAULT_STATE_DIR);
    const relative = [dir, env.CNI_NETNS ?? "", ...(env.CNI_PATH ?? "").split(":")].some((p) => p !== "" && !isAbsolute(p));
    if (relative && req.cwd !== process.cwd()) return no("relative paths, and another working directory than the agent's");
    if (resolve(dir) !== this.stateDir) return no(`state directory ${dir} is not the agent's (${this.stateDir})`);
    const host = stringField(conf, "host") ?? (env.KNIT_HOST || undefined) ?? rememberedHost(dir);
    if (host !== hostName()) return no(`host name ${host} is not the agent's (${hostName()})`);
    c.request = req;
    // The version errors carry, as runPlugin settles it before it knows more.
    let cniVersion: string = LATEST;
    try {
      const v = parsed ? statedVersion(conf) : LATEST;
      if ((SupportedVersions as readonly string[]).includes(v)) cniVersion = v;
    } catch {
      // a version of the wrong type: errors carry the latest version, as the plugin's would
    }
    return { ok: true, cniVersion };
  }

  /** The engine invocations share: this state directory's SQLite store, as the plugin opens it. */
  private host(cwd: string): PluginHost {
    return {
      path: "agent",
      cwd,
      engine: async (conf, env) => {
        // Checked at the acknowledgement from the same inputs; a mismatch here is a bug.
        const host = explicitHost(conf, env) ?? rememberedHost(conf.stateDir);
        if (resolve(conf.stateDir) !== this.stateDir || host !== hostName()) {
          throw new CniError(CniCodes.internal, `the agent for ${this.stateDir} (host ${hostName()}) was handed an invocation for ${conf.stateDir} (host ${host})`);
        }
        this.engine ??= this.openEngine();
        const engine = await this.engine.catch((err: unknown) => {
          this.engine = undefined;
          throw err;
        });
        const { ensurePredefined } = await import("../engine/networks.ts");
        await ensurePredefined(engine);
        return engine;
      },
      release: async () => undefined,
      delegateStderr: "collect",
    };
  }

  private async openEngine(): Promise<Engine> {
    const { openSqliteStore } = await import("../store/sqlite.ts");
    return { store: await openSqliteStore(this.stateDir), stateDir: this.stateDir };
  }

  private async run(sock: Socket<Conn>): Promise<void> {
    const c = sock.data;
    const req = c.request;
    if (!req) return;
    const started = performance.now();
    let out: RunOutput;
    try {
      out = await runPlugin(req.plugin, req.env, () => req.stdin, this.host(req.cwd), started);
    } catch (err) {
      // runPlugin turns every failure into an answer; this is a bug, answered as one.
      out = { code: 1, stdout: JSON.stringify({ cniVersion: LATEST, code: CniCodes.internal, msg: err instanceof Error ? err.message : String(err) }), stderr: "" };
    }
    this.stats.ran++;
    if (out.code !== 0) this.stats.failed++;
    const answer: HandoffAnswer = { code: out.code, stdout: out.stdout, stderr: out.stderr, ...(out.trace ? { trace: out.trace } : {}) };
    this.opts.log.debug("CNI invocation", { plugin: req.plugin, command: req.env.CNI_COMMAND, container: req.env.CNI_CONTAINERID, code: out.code, ms: Math.round(performance.now() - started) });
    c.state = "done";
    this.send(sock, `${JSON.stringify(answer)}\n`, true);
    this.settle(c);
    if (req.env.CNI_COMMAND === "DEL") this.opts.onDel?.();
  }

  /** The invocation is over (answered, or its plugin went away before "go"). */
  private settle(c: Conn): void {
    clearTimeout(c.timer);
    if (!c.counted) return;
    c.counted = false;
    this.busy--;
    if (this.busy === 0) for (const wake of this.whenIdle.splice(0)) wake();
  }

  private send(sock: Socket<Conn>, text: string, close: boolean): void {
    const c = sock.data;
    c.pending.push(Buffer.from(text));
    c.closeWhenFlushed ||= close;
    this.flush(sock);
  }

  private flush(sock: Socket<Conn>): void {
    const c = sock.data;
    while (c.pending.length) {
      const buf = c.pending[0] as Buffer;
      const n = sock.write(buf);
      if (n < 0) {
        c.pending = [];
        return;
      }
      if (n < buf.length) {
        c.pending[0] = buf.subarray(n);
        return; // drain calls again
      }
      c.pending.shift();
    }
    if (c.closeWhenFlushed) sock.end();
  }

  private closed(sock: Socket<Conn>): void {
    const c = sock.data;
    // A plugin that goes away after the acknowledgement but before "go" started nothing.
    if (c.state !== "running") this.settle(c);
    c.pending = [];
  }
}
