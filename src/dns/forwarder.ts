/**
 * Forwarding: names knit does not know go to upstream servers, one after another (at most
 * MAX_UPSTREAMS), each given `timeoutMs`. A server that answers SERVFAIL or REFUSED is
 * skipped like a silent one (glibc does the same); when none gives a usable answer the
 * caller replies SERVFAIL. A truncated UDP answer is asked again over TCP.
 *
 * Design note. All UDP forwarding shares one socket per address family, bound to an
 * ephemeral port (one socket, not one per query: it keeps forwarding cheap; the price is
 * that the source port adds no entropy against off-path spoofing, only the id does). A reply
 * is matched to its query by (server, message id) and must carry the same question, so a
 * stray or spoofed datagram cannot answer someone else's query. Ids are random (crypto) and
 * never reused while a query to the same server is pending; the number of pending queries
 * is capped so that a flood cannot grow memory without bound.
 */
import type { udp } from "bun";
import { MAX_UPSTREAMS } from "./resolvconf.ts";
import { Rcode, isTruncated, readHeader, sameQuestion, withId, type Question } from "./packet.ts";

/** Queries in flight at most; beyond that new ones fail at once (SERVFAIL). */
const MAX_PENDING = 4096;
const UPSTREAM_PORT = 53;

/** Unpredictable message ids (a guessed id is half of a spoofed answer), drawn in batches. */
const idPool = new Uint16Array(1024);
let idNext = idPool.length;
function randomId(): number {
  if (idNext >= idPool.length) {
    crypto.getRandomValues(idPool);
    idNext = 0;
  }
  return idPool[idNext++] ?? 0;
}

interface Pending {
  readonly question: Question;
  readonly clientId: number;
  readonly resolve: (reply: Uint8Array | undefined) => void;
  readonly timer: ReturnType<typeof setTimeout>;
}

/** What the forwarder counted since start. */
export interface ForwarderStats {
  /** Queries sent upstream (each try counts). */
  sent: number;
  /** Tries that got no answer in time. */
  timeouts: number;
  /** Tries that got SERVFAIL or REFUSED. */
  failures: number;
  /** Retries over TCP after a truncated UDP answer. */
  tcp: number;
  /** Queries refused because too many were pending. */
  overload: number;
}

/** How the forwarder behaves. */
export interface ForwarderOptions {
  /** How long each upstream gets to answer, in milliseconds. */
  timeoutMs: number;
  /** Port of the upstream servers (53; tests may change it). */
  port?: number;
}

/** Sends queries upstream and matches their replies; one per agent. */
export class Forwarder {
  readonly stats: ForwarderStats = { sent: 0, timeouts: 0, failures: 0, tcp: 0, overload: 0 };
  private readonly pending = new Map<string, Pending>();
  private readonly sockets = new Map<4 | 6, Promise<udp.Socket<"uint8array">>>();
  /** The sockets once bound (saves a promise hop per query). */
  private readonly bound = new Map<4 | 6, udp.Socket<"uint8array">>();
  private readonly timeoutMs: number;
  private readonly port: number;
  private closed = false;

  constructor(opts: ForwarderOptions) {
    this.timeoutMs = opts.timeoutMs;
    this.port = opts.port ?? UPSTREAM_PORT;
  }

  /** Queries waiting for an upstream. */
  get inFlight(): number {
    return this.pending.size;
  }

  /**
   * Ask `servers` (the first MAX_UPSTREAMS of them, in order) the query `raw` whose question
   * is `question`. Resolves with the first usable reply, its id set to `clientId`, else the
   * last SERVFAIL/REFUSED reply, else undefined (nobody answered). Never rejects.
   */
  async forward(raw: Uint8Array, question: Question, clientId: number, servers: readonly string[]): Promise<Uint8Array | undefined> {
    let fallback: Uint8Array | undefined;
    for (const server of servers.slice(0, MAX_UPSTREAMS)) {
      if (this.closed) return undefined;
      let reply = await this.viaUdp(server, raw, question, clientId);
      if (reply && isTruncated(reply)) {
        this.stats.tcp++;
        reply = (await this.viaTcp(server, raw, question, clientId)) ?? reply;
      }
      if (!reply) continue;
      const rcode = readHeader(reply)?.rcode;
      if (rcode === Rcode.SERVFAIL || rcode === Rcode.REFUSED) {
        this.stats.failures++;
        fallback ??= reply;
        continue;
      }
      return reply;
    }
    return fallback;
  }

  /** Close the sockets; pending queries resolve with undefined. */
  close(): void {
    this.closed = true;
    for (const p of this.pending.values()) {
      clearTimeout(p.timer);
      p.resolve(undefined);
    }
    this.pending.clear();
    for (const s of this.sockets.values()) void s.then((sock) => sock.close(), () => undefined);
    this.sockets.clear();
    this.bound.clear();
  }

  private socket(family: 4 | 6): Promise<udp.Socket<"uint8array">> {
    let sock = this.sockets.get(family);
    if (!sock) {
      sock = Bun.udpSocket({
        hostname: family === 4 ? "0.0.0.0" : "::",
        port: 0,
        binaryType: "uint8array",
        socket: {
          data: (_s, buf, port, address) => this.onReply(buf, port, address),
          // An upstream that is down answers with ICMP port unreachable, which the socket
          // reports as ECONNREFUSED without saying for which query: that query times out and
          // the next server is asked. Unhandled, the error would end the agent.
          error: () => undefined,
        },
      });
      // A failed bind is retried on the next query.
      sock.then(
        (s) => this.bound.set(family, s),
        () => this.sockets.delete(family),
      );
      this.sockets.set(family, sock);
    }
    return sock;
  }

  private onReply(buf: Uint8Array, port: number, address: string): void {
    if (port !== this.port || buf.length < 12) return;
    const key = `${address}#${((buf[0] ?? 0) << 8) | (buf[1] ?? 0)}`;
    const p = this.pending.get(key);
    if (!p || !sameQuestion(buf, p.question)) return;
    this.pending.delete(key);
    clearTimeout(p.timer);
    p.resolve(withId(buf, p.clientId));
  }

  private async viaUdp(server: string, raw: Uint8Array, question: Question, clientId: number): Promise<Uint8Array | undefined> {
    if (this.pending.size >= MAX_PENDING) {
      this.stats.overload++;
      return undefined;
    }
    const family = server.includes(":") ? 6 : 4;
    let sock = this.bound.get(family);
    if (!sock) {
      try {
        sock = await this.socket(family);
      } catch {
        return undefined;
      }
    }
    let id = 0;
    let key = "";
    for (let i = 0; i < 64; i++) {
      id = randomId();
      key = `${server}#${id}`;
      if (!this.pending.has(key)) break;
    }
    if (this.pending.has(key)) return undefined;
    return new Promise<Uint8Array | undefined>((resolve) => {
      const timer = setTimeout(() => {
        if (this.pending.get(key)?.timer !== timer) return;
        this.pending.delete(key);
        this.stats.timeouts++;
        resolve(undefined);
      }, this.timeoutMs);
      this.pending.set(key, { question, clientId, resolve, timer });
      this.stats.sent++;
      let sent = false;
      try {
        sent = sock.send(withId(raw, id), this.port, server);
      } catch {
        sent = false;
      }
      if (!sent) {
        // No route, no buffer space: this server is out for this query.
        this.pending.delete(key);
        clearTimeout(timer);
        resolve(undefined);
      }
    });
  }

  /** One query over TCP (two-byte length framing, RFC 7766), with the same time limit. */
  private async viaTcp(server: string, raw: Uint8Array, question: Question, clientId: number): Promise<Uint8Array | undefined> {
    const id = randomId();
    const msg = withId(raw, id);
    const framed = new Uint8Array(msg.length + 2);
    framed[0] = msg.length >> 8;
    framed[1] = msg.length & 0xff;
    framed.set(msg, 2);
    return new Promise<Uint8Array | undefined>((resolve) => {
      let got = new Uint8Array(0);
      let done = false;
      let conn: { end(): void } | undefined;
      const finish = (reply: Uint8Array | undefined): void => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        conn?.end();
        resolve(reply);
      };
      const timer = setTimeout(() => {
        this.stats.timeouts++;
        finish(undefined);
      }, this.timeoutMs);
      Bun.connect({
        hostname: server,
        port: this.port,
        socket: {
          open: (s) => {
            s.write(framed);
          },
          data: (_s, chunk) => {
            const joined = new Uint8Array(got.length + chunk.length);
            joined.set(got);
            joined.set(chunk, got.length);
            got = joined;
            if (got.length < 2) return;
            const len = ((got[0] ?? 0) << 8) | (got[1] ?? 0);
            if (got.length < 2 + len) return;
            const reply = got.subarray(2, 2 + len);
            const h = readHeader(reply);
            finish(h && h.id === id && sameQuestion(reply, question) ? withId(reply, clientId) : undefined);
          },
          close: () => finish(undefined),
          error: () => finish(undefined),
          connectError: () => finish(undefined),
        },
      }).then(
        (s) => {
          conn = s;
          if (done) s.end();
        },
        () => finish(undefined),
      );
    });
  }
}
