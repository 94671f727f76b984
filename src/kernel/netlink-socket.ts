/**
 * Netlink sockets in-process: libc's socket/send/recv/setns through bun:ffi, and the wire
 * format (nlmsghdr, rtattr) built and read with DataView. src/kernel/netlink.ts speaks
 * rtnetlink on top of this.
 *
 * Why: every `ip` process costs 3-5 ms of wall and CPU here; a netlink request costs tens of
 * microseconds, which is how Docker and the reference CNI plugins talk to the kernel.
 *
 * Namespaces: a netlink socket stays in the network namespace it was created in. For another
 * namespace, the calling thread enters it (setns), creates the socket, and goes back to its
 * own namespace (kept open from /proc/thread-self/ns/net at first use), all synchronously,
 * with no await in between, so no other JavaScript ever runs in the foreign namespace. The
 * thread's namespace is then checked; if it could not go back, every later netlink call
 * fails (the process must not go on talking to the wrong namespace). Only the socket of the
 * process's own namespace is kept; a socket in another namespace is closed after use (kept,
 * it would keep that namespace, and the devices in it, alive). Network parameters of another
 * namespace (/proc/sys/net shows those of the thread's namespace) are written the same way:
 * enter, write with libc, go back (writeNetSysctls).
 *
 * Requests are synchronous: send, then read until the kernel's ACK (or NLMSG_DONE for a
 * dump). Some kernel work happens inside the send (a device deletion waits for RCU grace
 * periods, tens of ms): the event loop waits with it, as it would for `ip` to exit.
 */
import { dlopen, FFIType, ptr, read } from "bun:ffi";
import { readlinkSync } from "node:fs";
import { KnitError } from "../errors.ts";
import { recordNetlink, type Netns } from "./exec.ts";

const AF_NETLINK = 16;
const SOCK_RAW = 3;
const SOCK_CLOEXEC = 0o2000000;
const NETLINK_ROUTE = 0;
const SOL_SOCKET = 1;
const SO_RCVTIMEO = 20;
const SOL_NETLINK = 270;
const NETLINK_CAP_ACK = 10;
const NETLINK_EXT_ACK = 11;
const CLONE_NEWNET = 0x40000000;
const O_RDONLY_CLOEXEC = 0o2000000;
const O_WRONLY_CLOEXEC = 0o2000001;
const MSG_TRUNC = 0x20;
const EINTR = 4;

export const NLM_F_REQUEST = 0x1;
const NLM_F_MULTI = 0x2;
export const NLM_F_ACK = 0x4;
const NLM_F_DUMP_INTR = 0x10;
export const NLM_F_DUMP = 0x300;
export const NLM_F_REPLACE = 0x100;
export const NLM_F_EXCL = 0x200;
export const NLM_F_CREATE = 0x400;
const NLM_F_CAPPED = 0x100;
const NLM_F_ACK_TLVS = 0x200;
const NLMSG_ERROR = 2;
const NLMSG_DONE = 3;
const NLMSGERR_ATTR_MSG = 1;
/** Nested-attribute and byte-order flags in rtattr.type. */
const NLA_TYPE_MASK = 0x3fff;
/** The kernel fills dump messages up to 32 KiB; room for more, and MSG_TRUNC says if not. */
const RECV_BUFFER = 256 * 1024;
/** A request the kernel has not answered in this time is a bug somewhere: fail, do not hang. */
const RECV_TIMEOUT_SEC = 60;
/** An interrupted dump (the table changed under it) is redone this many times, then taken. */
const DUMP_RETRIES = 5;

/** Netlink and the kernel use host byte order. */
export const HOST_LE = new Uint8Array(Uint16Array.of(1).buffer)[0] === 1;

function openLibc() {
  return dlopen("libc.so.6", {
    socket: { args: ["i32", "i32", "i32"], returns: "i32" },
    setsockopt: { args: ["i32", "i32", "i32", "ptr", "u32"], returns: "i32" },
    send: { args: ["i32", "ptr", "u64", "i32"], returns: FFIType.i64_fast },
    recv: { args: ["i32", "ptr", "u64", "i32"], returns: FFIType.i64_fast },
    write: { args: ["i32", "ptr", "u64"], returns: FFIType.i64_fast },
    open: { args: ["ptr", "i32"], returns: "i32" },
    setns: { args: ["i32", "i32"], returns: "i32" },
    close: { args: ["i32"], returns: "i32" },
    strerror: { args: ["i32"], returns: "cstring" },
    __errno_location: { args: [], returns: "ptr" },
  }).symbols;
}
type Libc = ReturnType<typeof openLibc>;
let libc: Libc | undefined;
/** libc, opened at the first netlink call (not at import: most commands never need it). */
function lib(): Libc {
  return (libc ??= openLibc());
}

function errno(): number {
  const p = lib().__errno_location();
  return p === null ? 0 : read.i32(p, 0);
}

/** Names of the errno values netlink answers with (Linux, x86-64 and arm64 alike). */
const ERRNO_NAMES: Record<number, string> = {
  1: "EPERM", 2: "ENOENT", 3: "ESRCH", 4: "EINTR", 5: "EIO", 6: "ENXIO", 7: "E2BIG", 9: "EBADF", 11: "EAGAIN",
  12: "ENOMEM", 13: "EACCES", 14: "EFAULT", 16: "EBUSY", 17: "EEXIST", 18: "EXDEV", 19: "ENODEV", 20: "ENOTDIR",
  21: "EISDIR", 22: "EINVAL", 23: "ENFILE", 24: "EMFILE", 28: "ENOSPC", 34: "ERANGE", 36: "ENAMETOOLONG",
  38: "ENOSYS", 39: "ENOTEMPTY", 61: "ENODATA", 67: "ENOLINK", 71: "EPROTO", 75: "EOVERFLOW", 90: "EMSGSIZE",
  92: "ENOPROTOOPT", 93: "EPROTONOSUPPORT", 94: "ESOCKTNOSUPPORT", 95: "EOPNOTSUPP", 97: "EAFNOSUPPORT",
  98: "EADDRINUSE", 99: "EADDRNOTAVAIL", 100: "ENETDOWN", 101: "ENETUNREACH", 105: "ENOBUFS", 110: "ETIMEDOUT",
  113: "EHOSTUNREACH", 114: "EALREADY", 115: "EINPROGRESS", 524: "ENOTSUPP",
};

/** "File exists (EEXIST)": libc's text for an errno and its name. */
export function describeErrno(code: number): string {
  return `${lib().strerror(code) ?? `error ${code}`} (${ERRNO_NAMES[code] ?? `errno ${code}`})`;
}

/** A failed netlink or socket call: `errno` says why, the message says what failed. */
export class NetlinkError extends KnitError {
  /** The positive errno value (17 for EEXIST). */
  readonly errno: number;
  /** Its symbolic name ("EEXIST"), or "errno N" when unknown. */
  readonly errnoName: string;

  constructor(what: string, code: number, kernelMessage?: string) {
    super("kernel", `${what}: ${describeErrno(code)}${kernelMessage ? `: ${kernelMessage}` : ""}`);
    this.errno = code;
    this.errnoName = ERRNO_NAMES[code] ?? `errno ${code}`;
  }
}

/** True when `err` is a netlink failure with this errno name. */
export const isErrno = (err: unknown, name: string): boolean => err instanceof NetlinkError && err.errnoName === name;

const cString = (s: string): Uint8Array => new TextEncoder().encode(`${s}\0`);

// ---- namespaces -----------------------------------------------------------------------

const SELF_NS = "/proc/thread-self/ns/net";
/** The calling thread's own namespace: an fd to go back to, and its identity to check. */
let home: { fd: number; id: string } | undefined;
/** Set when the thread could not go back to its namespace: nothing may use netlink then. */
let stranded: KnitError | undefined;

function homeNs(): { fd: number; id: string } {
  if (home) return home;
  const id = readlinkSync(SELF_NS);
  const fd = lib().open(ptr(cString(SELF_NS)), O_RDONLY_CLOEXEC);
  if (fd < 0) throw new NetlinkError(`cannot open ${SELF_NS}`, errno());
  home = { fd, id };
  return home;
}

function openNetns(ns: Netns): number {
  const fd = lib().open(ptr(cString(ns.path)), O_RDONLY_CLOEXEC);
  if (fd < 0) throw new NetlinkError(`cannot open network namespace ${ns.path}`, errno());
  return fd;
}

/**
 * Go back to the thread's own namespace and check that it did. A failure strands the
 * process: it throws now and on every later netlink call.
 */
function goHome(h: { fd: number; id: string }): void {
  const rc = lib().setns(h.fd, CLONE_NEWNET);
  const code = rc === 0 ? 0 : errno();
  let now = "";
  try {
    now = readlinkSync(SELF_NS);
  } catch {
    // reported below as a mismatch
  }
  if (rc === 0 && now === h.id) return;
  stranded = new KnitError(
    "kernel",
    `the thread could not go back to its network namespace (${h.id}) after a netlink call; it is in ${now || "an unknown one"}${code ? `: ${describeErrno(code)}` : ""}`,
  );
  throw stranded;
}

/**
 * Run `fn` with the calling thread inside `ns`, synchronously, and bring the thread back
 * (checked). `fn` must not be async: nothing else may run in that namespace.
 */
function insideNetns<T>(ns: Netns, fn: () => T): T {
  const h = homeNs();
  const target = openNetns(ns);
  try {
    if (lib().setns(target, CLONE_NEWNET) !== 0) throw new NetlinkError(`cannot enter network namespace ${ns.path}`, errno());
    try {
      return fn();
    } finally {
      goHome(h);
    }
  } finally {
    lib().close(target);
  }
}

/**
 * Write `value` to the existing file at `path` with libc calls; a failure throws a
 * NetlinkError (for its errno) whose message starts with `what`.
 */
function writeFile(path: string, value: string, what: string): void {
  const c = lib();
  const fd = c.open(ptr(cString(path)), O_WRONLY_CLOEXEC);
  if (fd < 0) throw new NetlinkError(what, errno());
  try {
    const bytes = new TextEncoder().encode(value);
    for (;;) {
      const n = Number(c.write(fd, ptr(bytes), bytes.length));
      if (n === bytes.length) return;
      const code = n < 0 ? errno() : 0;
      if (code !== EINTR) throw new NetlinkError(what, code || 5);
    }
  } finally {
    c.close(fd);
  }
}

const PROC_SYS = "/proc/sys/";

/**
 * Set network parameters of `ns` (`[key, value]`, keys as /proc/sys paths without the
 * prefix: `net/ipv4/conf/eth0/arp_notify`): the calling thread enters the namespace, whose
 * parameters /proc/sys/net then shows it, writes each file in order with libc calls (not
 * node:fs, which need not run on this thread), and goes back, all synchronously. An error
 * ("cannot set KEY=VALUE in NS: No such file or directory (ENOENT)") stops at that key and
 * still brings the thread home. Traced as one `netlink` entry: no process is spawned.
 */
export function writeNetSysctls(ns: Netns, settings: readonly (readonly [key: string, value: string])[]): void {
  if (stranded) throw stranded;
  for (const [key] of settings) {
    if (!key.startsWith("net/") || key.split("/").some((part) => part === "" || part === "." || part === "..")) {
      throw new KnitError("internal", `not a network parameter: ${key}`);
    }
  }
  const started = performance.now();
  try {
    insideNetns(ns, () => {
      for (const [key, value] of settings) writeFile(`${PROC_SYS}${key}`, value, `cannot set ${key}=${value} in ${ns.path}`);
    });
  } finally {
    recordNetlink(`set ${settings.map(([k, v]) => `${k}=${v}`).join(" ")} in ${ns.path}`, performance.now() - started);
  }
}

/**
 * A file descriptor of a namespace, for IFLA_NET_NS_FD, open while `fn` runs. `fn` must not
 * be async.
 */
export function withNetnsFd<T>(ns: Netns, fn: (fd: number) => T): T {
  const fd = openNetns(ns);
  try {
    return fn(fd);
  } finally {
    lib().close(fd);
  }
}

// ---- messages -------------------------------------------------------------------------

const align4 = (n: number): number => (n + 3) & ~3;

/** One netlink request being built: header, a fixed struct, then attributes (4-byte aligned). */
export class NlRequest {
  #buf = new Uint8Array(512);
  #view = new DataView(this.#buf.buffer);
  #len = 16;
  readonly type: number;
  readonly flags: number;

  constructor(type: number, flags: number) {
    this.type = type;
    this.flags = flags;
  }

  #reserve(n: number): number {
    const at = this.#len;
    const need = align4(at + n);
    if (need > this.#buf.length) {
      const bigger = new Uint8Array(Math.max(need, this.#buf.length * 2));
      bigger.set(this.#buf.subarray(0, this.#len));
      this.#buf = bigger;
      this.#view = new DataView(bigger.buffer);
    }
    this.#len = need;
    return at;
  }

  /** Append a zeroed struct of `size` bytes; `fill` writes its fields (offsets from its start). */
  struct(size: number, fill: (v: DataView, at: number) => void): this {
    const at = this.#reserve(size);
    fill(this.#view, at);
    return this;
  }

  /** Append one attribute with raw payload bytes. */
  attr(type: number, payload: Uint8Array): this {
    const at = this.#reserve(4 + payload.length);
    this.#view.setUint16(at, 4 + payload.length, HOST_LE);
    this.#view.setUint16(at + 2, type, HOST_LE);
    this.#buf.set(payload, at + 4);
    return this;
  }

  u8(type: number, v: number): this {
    return this.attr(type, Uint8Array.of(v));
  }

  u32(type: number, v: number): this {
    const b = new Uint8Array(4);
    new DataView(b.buffer).setUint32(0, v, HOST_LE);
    return this.attr(type, b);
  }

  /** A NUL-terminated string attribute (names). */
  str(type: number, s: string): this {
    return this.attr(type, cString(s));
  }

  /** A string attribute without the NUL, as iproute2 sends kinds and aliases. */
  text(type: number, s: string): this {
    return this.attr(type, new TextEncoder().encode(s));
  }

  /** A nested attribute: `fill` appends its members (and may nest further). */
  nest(type: number, fill: (r: this) => void): this {
    const at = this.#reserve(4);
    this.#view.setUint16(at + 2, type, HOST_LE);
    fill(this);
    this.#view.setUint16(at, this.#len - at, HOST_LE);
    return this;
  }

  /** The finished message with sequence number `seq`. */
  bytes(seq: number): Uint8Array {
    this.#view.setUint32(0, this.#len, HOST_LE);
    this.#view.setUint16(4, this.type, HOST_LE);
    this.#view.setUint16(6, this.flags, HOST_LE);
    this.#view.setUint32(8, seq, HOST_LE);
    this.#view.setUint32(12, 0, HOST_LE);
    return this.#buf.subarray(0, this.#len);
  }
}

/** One message from the kernel: its type and its payload after the nlmsghdr. */
export interface NlMessage {
  type: number;
  flags: number;
  data: DataView;
}

/** Attributes from `start` to `end` of `v`, by type (flags masked off); payloads as views. */
export function parseAttrs(v: DataView, start: number, end: number): Map<number, DataView> {
  const out = new Map<number, DataView>();
  let at = start;
  while (at + 4 <= end) {
    const len = v.getUint16(at, HOST_LE);
    if (len < 4 || at + len > end) break;
    out.set(v.getUint16(at + 2, HOST_LE) & NLA_TYPE_MASK, new DataView(v.buffer, v.byteOffset + at + 4, len - 4));
    at += align4(len);
  }
  return out;
}

/** A string attribute (NUL-terminated or not). */
export function attrString(v: DataView | undefined): string | undefined {
  if (!v) return undefined;
  let bytes = new Uint8Array(v.buffer, v.byteOffset, v.byteLength);
  const nul = bytes.indexOf(0);
  if (nul >= 0) bytes = bytes.subarray(0, nul);
  return new TextDecoder().decode(bytes);
}

export const attrU8 = (v: DataView | undefined): number | undefined => (v && v.byteLength >= 1 ? v.getUint8(0) : undefined);
export const attrU16 = (v: DataView | undefined): number | undefined => (v && v.byteLength >= 2 ? v.getUint16(0, HOST_LE) : undefined);
export const attrU32 = (v: DataView | undefined): number | undefined => (v && v.byteLength >= 4 ? v.getUint32(0, HOST_LE) : undefined);
export const attrBytes = (v: DataView | undefined): Uint8Array | undefined => (v ? new Uint8Array(v.buffer, v.byteOffset, v.byteLength) : undefined);

// ---- sockets --------------------------------------------------------------------------

/** An rtnetlink socket in one namespace. Requests are synchronous (see the file's notes). */
export class NetlinkSocket {
  readonly fd: number;
  #seq = Math.floor(Math.random() * 0x7fffffff);
  #buf = new Uint8Array(RECV_BUFFER);
  #closed = false;

  private constructor(fd: number) {
    this.fd = fd;
  }

  /** A new socket in the thread's current namespace. */
  static create(): NetlinkSocket {
    const c = lib();
    const fd = c.socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
    if (fd < 0) throw new NetlinkError("cannot open a netlink socket", errno());
    const one = new Int32Array([1]);
    // Error messages from the kernel ("Error: ..." in iproute2), and errors that do not echo
    // the whole request back. Both are best effort: old kernels lack them.
    c.setsockopt(fd, SOL_NETLINK, NETLINK_EXT_ACK, ptr(one), 4);
    c.setsockopt(fd, SOL_NETLINK, NETLINK_CAP_ACK, ptr(one), 4);
    const timeout = new BigInt64Array([BigInt(RECV_TIMEOUT_SEC), 0n]);
    c.setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, ptr(timeout), 16);
    return new NetlinkSocket(fd);
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    lib().close(this.fd);
  }

  /**
   * Send one request and collect the messages it gets back: for a dump, everything up to
   * NLMSG_DONE (redone when the kernel says the dump was interrupted); otherwise the replies
   * up to the ACK (the request must carry NLM_F_ACK). An error answer throws a
   * NetlinkError whose message starts with `what`.
   */
  exchange(req: NlRequest, what: string): NlMessage[] {
    if (stranded) throw stranded;
    if (this.#closed) throw new KnitError("internal", `netlink socket used after close (${what})`);
    const dump = (req.flags & NLM_F_DUMP) === NLM_F_DUMP;
    const started = performance.now();
    try {
      for (let attempt = 0; ; attempt++) {
        const { messages, interrupted } = this.#once(req, what, dump);
        if (!interrupted || attempt >= DUMP_RETRIES) return messages;
      }
    } finally {
      // Traced as what was done ("create veth pair ..."), not as the failure it would be.
      recordNetlink(what.replace(/^cannot /, ""), performance.now() - started);
    }
  }

  #once(req: NlRequest, what: string, dump: boolean): { messages: NlMessage[]; interrupted: boolean } {
    const c = lib();
    const seq = (this.#seq = (this.#seq + 1) >>> 0);
    const out = req.bytes(seq);
    for (;;) {
      const n = Number(c.send(this.fd, ptr(out), out.length, 0));
      if (n === out.length) break;
      const code = n < 0 ? errno() : 0;
      if (code === EINTR) continue;
      throw new NetlinkError(`${what}: sending the request`, code || 5);
    }
    const messages: NlMessage[] = [];
    let interrupted = false;
    for (;;) {
      const n = Number(c.recv(this.fd, ptr(this.#buf), this.#buf.length, MSG_TRUNC));
      if (n < 0) {
        const code = errno();
        if (code === EINTR) continue;
        throw new NetlinkError(`${what}: reading the kernel's answer`, code);
      }
      if (n > this.#buf.length) throw new KnitError("kernel", `${what}: a netlink message of ${n} bytes does not fit the ${this.#buf.length}-byte buffer`);
      const view = new DataView(this.#buf.buffer.slice(0, n));
      for (let at = 0; at + 16 <= n; ) {
        const len = view.getUint32(at, HOST_LE);
        if (len < 16 || at + len > n) break;
        const type = view.getUint16(at + 4, HOST_LE);
        const flags = view.getUint16(at + 6, HOST_LE);
        const mseq = view.getUint32(at + 8, HOST_LE);
        const data = new DataView(view.buffer, at + 16, len - 16);
        at += align4(len);
        if (mseq !== seq) continue; // left over from an earlier request
        if (type === NLMSG_ERROR) {
          const code = -data.getInt32(0, HOST_LE);
          if (code === 0) return { messages, interrupted };
          throw new NetlinkError(what, code, extAckMessage(data, flags));
        }
        if (type === NLMSG_DONE) {
          const code = data.byteLength >= 4 ? -data.getInt32(0, HOST_LE) : 0;
          if (code > 0) throw new NetlinkError(what, code);
          return { messages, interrupted };
        }
        if (flags & NLM_F_DUMP_INTR) interrupted = true;
        messages.push({ type, flags, data });
        if (!dump && !(flags & NLM_F_MULTI) && !(req.flags & NLM_F_ACK)) return { messages, interrupted };
      }
    }
  }
}

/** The kernel's own words in an extended ACK (NLMSGERR_ATTR_MSG), when it sent some. */
function extAckMessage(data: DataView, flags: number): string | undefined {
  if (!(flags & NLM_F_ACK_TLVS) || data.byteLength < 20) return undefined;
  const origLen = flags & NLM_F_CAPPED ? 16 : data.getUint32(4, HOST_LE);
  const start = 4 + align4(origLen);
  if (start >= data.byteLength) return undefined;
  return attrString(parseAttrs(data, start, data.byteLength).get(NLMSGERR_ATTR_MSG));
}

/** The socket of the process's own namespace, made at first use and kept. */
let homeSocket: NetlinkSocket | undefined;

/**
 * Run `fn` with an rtnetlink socket in `ns` (the process's own namespace when undefined).
 * `fn` must be synchronous; a socket made for another namespace is closed when it returns.
 */
export function withSocket<T>(ns: Netns | undefined, fn: (sock: NetlinkSocket) => T): T {
  if (stranded) throw stranded;
  if (!ns) return fn((homeSocket ??= NetlinkSocket.create()));
  const started = performance.now();
  const sock = insideNetns(ns, () => NetlinkSocket.create());
  recordNetlink(`open socket in ${ns.path}`, performance.now() - started);
  try {
    return fn(sock);
  } finally {
    sock.close();
  }
}
