/**
 * The DNS server's sockets: for every served network, UDP and TCP port 53 on each of its
 * gateway addresses, in the host's network namespace. The address a query arrives on tells
 * which network asks, so one socket pair per address serves every sandbox of that network
 * and nothing is set up per sandbox.
 *
 * {@link DnsServer.sync} converges the sockets on the wanted set (binding new addresses,
 * closing gone ones); an address that cannot be bound yet (its bridge is being made, or
 * another server holds the port) is retried by the caller's timer and reported in
 * {@link DnsServer.status}.
 *
 * TCP follows RFC 7766: two-byte length framing, several queries per connection, replies in
 * any order, idle connections closed after 10 s, and bounded buffering per connection.
 */
import type { TCPSocketListener, Socket, udp } from "bun";
import type { Resolver, QuerySource, Reply } from "./resolver.ts";

/** DNS port. */
export const DNS_PORT = 53;
const TCP_IDLE_SECONDS = 10;
/** Queries a TCP connection may have unanswered at once; beyond that it is closed. */
const TCP_MAX_INFLIGHT = 64;
/** TCP connections at once, over all addresses. */
const TCP_MAX_CONNECTIONS = 512;
/** Bytes buffered per TCP connection at most (one maximal message plus its length). */
const TCP_MAX_BUFFER = 65537;

/** One address the server listens on. */
interface Listener {
  networkId: string;
  readonly address: string;
  udp?: udp.Socket<"uint8array">;
  tcp?: TCPSocketListener<TcpState>;
  error?: string;
}

interface TcpState {
  buf: Uint8Array;
  inflight: number;
  closed: boolean;
  /** Reply bytes the kernel did not take yet (written on drain). */
  unsent: Uint8Array;
}

const newTcpState = (): TcpState => ({ buf: new Uint8Array(0), inflight: 0, closed: false, unsent: new Uint8Array(0) });

/** How one address is doing, for `knit agent status`. */
export interface ListenerStatus {
  network: string;
  address: string;
  udp: boolean;
  tcp: boolean;
  error?: string;
}

/** How the server listens and reports trouble. */
export interface DnsServerOptions {
  port?: number;
  /** Called with problems worth logging (bind failures, handler bugs). */
  onError?: (what: string, err: unknown, fields: Record<string, unknown>) => void;
}

const message = (err: unknown): string => (err instanceof Error ? err.message : String(err));

/** The sockets of knit's DNS server, one UDP and one TCP per served address. */
export class DnsServer {
  private readonly listeners = new Map<string, Listener>();
  private readonly port: number;
  private readonly onError: NonNullable<DnsServerOptions["onError"]>;
  private tcpConnections = 0;
  private syncing: Promise<void> = Promise.resolve();

  constructor(
    private readonly resolver: Resolver,
    opts: DnsServerOptions = {},
  ) {
    this.port = opts.port ?? DNS_PORT;
    this.onError = opts.onError ?? (() => undefined);
  }

  /**
   * Listen on exactly the addresses of `wanted` (address -> network id). Calls are
   * serialised; resolves when this one is done. Failures are kept per address, not thrown.
   */
  sync(wanted: ReadonlyMap<string, string>): Promise<void> {
    this.syncing = this.syncing.then(() => this.converge(wanted));
    return this.syncing;
  }

  /** True when some wanted address is not fully bound (the caller retries). */
  get incomplete(): boolean {
    return [...this.listeners.values()].some((l) => !l.udp || !l.tcp);
  }

  status(): ListenerStatus[] {
    return [...this.listeners.values()].map((l) => ({
      network: l.networkId,
      address: l.address,
      udp: l.udp !== undefined,
      tcp: l.tcp !== undefined,
      ...(l.error ? { error: l.error } : {}),
    }));
  }

  /** Close every socket. */
  async close(): Promise<void> {
    await this.sync(new Map());
  }

  private async converge(wanted: ReadonlyMap<string, string>): Promise<void> {
    for (const [address, l] of this.listeners) {
      if (wanted.has(address)) continue;
      l.udp?.close();
      l.tcp?.stop(true);
      this.listeners.delete(address);
    }
    for (const [address, networkId] of wanted) {
      let l = this.listeners.get(address);
      if (!l) this.listeners.set(address, (l = { networkId, address }));
      l.networkId = networkId;
      if (l.udp && l.tcp) continue;
      try {
        l.udp ??= await this.bindUdp(l);
        l.tcp ??= this.bindTcp(l);
        delete l.error;
      } catch (err) {
        const text = message(err);
        if (l.error !== text) this.onError("cannot listen", err, { address, network: networkId });
        l.error = text;
      }
    }
  }

  private bindUdp(l: Listener): Promise<udp.Socket<"uint8array">> {
    return Bun.udpSocket({
      hostname: l.address,
      port: this.port,
      binaryType: "uint8array",
      socket: {
        data: (sock, packet, port, address) => {
          const from: QuerySource = { networkId: l.networkId, address, transport: "udp" };
          this.answer(packet, from, (reply) => {
            if (!sock.closed) sock.send(reply, port, address);
          });
        },
        error: (_sock, err) => this.onError("udp socket error", err, { address: l.address }),
      },
    });
  }

  private bindTcp(l: Listener): TCPSocketListener<TcpState> {
    return Bun.listen<TcpState>({
      hostname: l.address,
      port: this.port,
      data: newTcpState(),
      socket: {
        open: (s) => {
          s.data = newTcpState();
          if (++this.tcpConnections > TCP_MAX_CONNECTIONS) s.end();
          else s.timeout(TCP_IDLE_SECONDS);
        },
        data: (s, chunk) => this.onTcpData(s, chunk, l),
        timeout: (s) => {
          s.end();
        },
        drain: (s) => writeTcp(s, new Uint8Array(0)),
        close: (s) => {
          s.data.closed = true;
          this.tcpConnections--;
        },
        error: () => undefined,
      },
    });
  }

  private onTcpData(s: Socket<TcpState>, chunk: Uint8Array, l: Listener): void {
    const st = s.data;
    if (st.buf.length + chunk.length > TCP_MAX_BUFFER * 2) {
      s.end();
      return;
    }
    let buf = st.buf.length ? concat(st.buf, chunk) : chunk;
    while (buf.length >= 2) {
      const len = ((buf[0] ?? 0) << 8) | (buf[1] ?? 0);
      if (len === 0) {
        s.end();
        return;
      }
      if (buf.length < 2 + len) break;
      const packet = buf.slice(2, 2 + len);
      buf = buf.subarray(2 + len);
      if (++st.inflight > TCP_MAX_INFLIGHT) {
        s.end();
        return;
      }
      s.timeout(TCP_IDLE_SECONDS);
      this.answer(packet, { networkId: l.networkId, address: s.remoteAddress, transport: "tcp" }, (reply) => {
        if (st.closed) return;
        const framed = new Uint8Array(reply.length + 2);
        framed[0] = reply.length >> 8;
        framed[1] = reply.length & 0xff;
        framed.set(reply, 2);
        writeTcp(s, framed);
      }, () => st.inflight--);
    }
    st.buf = buf.length ? buf.slice() : new Uint8Array(0);
  }

  /** Run the resolver on a packet and hand the reply (if any) to `send`; never throws. */
  private answer(packet: Uint8Array, from: QuerySource, send: (reply: Uint8Array) => void, done?: () => void): void {
    let reply: Reply;
    try {
      reply = this.resolver.handle(packet, from);
    } catch (err) {
      this.onError("resolver failed", err, { client: from.address });
      done?.();
      return;
    }
    if (reply instanceof Uint8Array) {
      send(reply);
      done?.();
    } else if (reply) {
      reply.then(
        (r) => {
          if (r) send(r);
          done?.();
        },
        (err: unknown) => {
          this.onError("resolver failed", err, { client: from.address });
          done?.();
        },
      );
    } else done?.();
  }
}

/** Write `bytes` after whatever is still unsent; keep what the kernel does not take. */
function writeTcp(s: Socket<TcpState>, bytes: Uint8Array): void {
  const st = s.data;
  const all = st.unsent.length ? concat(st.unsent, bytes) : bytes;
  if (all.length === 0) return;
  const n = s.write(all);
  st.unsent = n >= all.length ? new Uint8Array(0) : all.slice(Math.max(n, 0));
  if (st.unsent.length > TCP_MAX_BUFFER * 4) s.end();
}

function concat(a: Uint8Array, b: Uint8Array): Uint8Array {
  const out = new Uint8Array(a.length + b.length);
  out.set(a);
  out.set(b, a.length);
  return out;
}
