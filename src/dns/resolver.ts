/**
 * The resolver: one client packet in, one reply out. Names of sandboxes are answered from
 * the name table at once (synchronously: no promise on the hot path); everything else is
 * forwarded to the asking sandbox's `--dns` servers or, without those, the host's.
 *
 *   malformed (header readable)      -> FORMERR (NOTIMP for other opcodes), never forwarded
 *   too short, or a response          -> dropped
 *   client not on this network        -> REFUSED
 *   sandbox name, A/AAAA/ANY          -> its addresses, authoritative, TTL 0 (NODATA when
 *                                        the name has no address of that family)
 *   sandbox name, other types         -> NOERROR without answers (the name exists)
 *   PTR of a sandbox address          -> the sandbox's name
 *   anything else                     -> forwarded; SERVFAIL when no upstream answers,
 *                                        REFUSED from --internal networks (nothing leaves)
 *
 * TTL 0: a sandbox that leaves a network must stop resolving at once, also for clients
 * that cache (aardvark-dns made the same choice).
 */
import { Forwarder } from "./forwarder.ts";
import { NameTable, type Client } from "./table.ts";
import { RecordClass, RecordType, Rcode, buildReply, parseQuery, udpLimit, type Answer, type Query } from "./packet.ts";

/** What the resolver counted since start. */
export interface ResolverStats {
  queries: number;
  tcp: number;
  /** Answered from the name table. */
  local: number;
  forwarded: number;
  /** SERVFAIL because no upstream answered (or there was none). */
  servfail: number;
  refused: number;
  /** FORMERR, NOTIMP or BADVERS answers to malformed queries. */
  malformed: number;
  /** Packets dropped without an answer. */
  dropped: number;
}

/** Where a packet came from. */
export interface QuerySource {
  /** The network whose address the query arrived on. */
  readonly networkId: string;
  /** The client's address. */
  readonly address: string;
  readonly transport: "udp" | "tcp";
}

/** A reply now, a reply later (forwarded), or nothing to send. */
export type Reply = Uint8Array | Promise<Uint8Array | undefined> | undefined;

const TTL = 0;

/** Turns client packets into replies: local names from the table, the rest forwarded. */
export class Resolver {
  readonly stats: ResolverStats = { queries: 0, tcp: 0, local: 0, forwarded: 0, servfail: 0, refused: 0, malformed: 0, dropped: 0 };

  constructor(
    private readonly table: NameTable,
    private readonly forwarder: Forwarder,
    private readonly hostUpstreams: () => readonly string[],
    /**
     * For a client whose networks are all --internal: whether it has a way out all the same
     * (a Docker container with a network of Docker's own), so its queries are forwarded.
     */
    private readonly wayOut: (client: Client) => boolean | Promise<boolean> = () => false,
  ) {}

  /**
   * Answer one packet. Returns the reply (at once for local names, as a promise when
   * forwarded), or undefined when nothing must be sent. Never throws for any input.
   */
  handle(packet: Uint8Array, from: QuerySource): Reply {
    this.stats.queries++;
    if (from.transport === "tcp") this.stats.tcp++;
    const parsed = parseQuery(packet);
    if (parsed.kind === "drop") {
      this.stats.dropped++;
      return undefined;
    }
    if (parsed.kind === "error") {
      this.stats.malformed++;
      return buildReply(parsed, parsed.rcode);
    }
    const query = parsed.query;
    const maxSize = from.transport === "udp" ? udpLimit(query.edns) : 65535;
    const client = this.table.client(from.networkId, from.address);
    if (!client) return this.refuse(query);
    const q = query.question;
    if (q.plain && (q.klass === RecordClass.IN || q.klass === RecordClass.ANY)) {
      if (q.type === RecordType.PTR) {
        const ptr = this.table.lookupReverse(client, q.name);
        if (ptr) {
          this.stats.local++;
          return buildReply(query, Rcode.NOERROR, [{ type: RecordType.PTR, ttl: TTL, rdata: ptr }], { authoritative: true, maxSize });
        }
      } else {
        const rec = this.table.lookup(client, q.name);
        if (rec) {
          this.stats.local++;
          const answers: Answer[] = [];
          if (q.type === RecordType.A || q.type === RecordType.ANY) for (const rdata of rec.v4) answers.push({ type: RecordType.A, ttl: TTL, rdata });
          if (q.type === RecordType.AAAA || q.type === RecordType.ANY) for (const rdata of rec.v6) answers.push({ type: RecordType.AAAA, ttl: TTL, rdata });
          return buildReply(query, Rcode.NOERROR, answers, { authoritative: true, maxSize });
        }
      }
    }
    if (!client.forward) {
      const out = this.wayOut(client);
      if (typeof out === "boolean") return out ? this.forwardFor(packet, query, client, maxSize) : this.refuse(query);
      return out.then(
        (yes): Reply => (yes ? this.forwardFor(packet, query, client, maxSize) : this.refuse(query)),
        (): Reply => this.refuse(query),
      );
    }
    return this.forwardFor(packet, query, client, maxSize);
  }

  private refuse(query: Query): Uint8Array {
    this.stats.refused++;
    return buildReply(query, Rcode.REFUSED);
  }

  /** Forward to the client's upstreams (its --dns), else the host's; SERVFAIL without any. */
  private forwardFor(packet: Uint8Array, query: Query, client: Client, maxSize: number): Reply {
    const upstreams = client.upstreams.length ? client.upstreams : this.hostUpstreams();
    if (upstreams.length === 0) {
      this.stats.servfail++;
      return buildReply(query, Rcode.SERVFAIL);
    }
    this.stats.forwarded++;
    return this.forward(packet, query, upstreams, maxSize);
  }

  private async forward(packet: Uint8Array, query: Query, upstreams: readonly string[], maxSize: number): Promise<Uint8Array> {
    const reply = await this.forwarder.forward(packet, query.question, query.id, upstreams);
    if (!reply) {
      this.stats.servfail++;
      return buildReply(query, Rcode.SERVFAIL);
    }
    // Too big for the client's UDP: say so (TC); it asks again over TCP.
    if (reply.length > maxSize) return buildReply(query, (reply[3] ?? 0) & 0xf, [], { truncated: true });
    return reply;
  }
}
