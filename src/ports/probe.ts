/**
 * Is a host port free for publishing? knit's DNAT would silently steal traffic from a program
 * that already listens on the port, so a port held by a socket in this (the host's) network
 * namespace is refused. The check binds a socket to the host address and port, exclusively,
 * and closes it again: cheaper than running `ss` (about 60 µs per port against a process
 * spawn) and it asks the kernel's own bind rules, so "0.0.0.0:8080" is busy when anything
 * listens on any address's port 8080, and "10.0.0.5:8080" when something listens on
 * 10.0.0.5:8080 or on 0.0.0.0:8080. The CLI runs in the host's namespace, so the probe sees
 * the host's sockets.
 */
import type { PortProtocol } from "../model.ts";

/** What binding the host address and port showed. */
export type ProbeResult = "free" | "in-use" | "not-local";

function classify(err: NodeJS.ErrnoException): ProbeResult {
  if (err.code === "EADDRNOTAVAIL") return "not-local";
  return "in-use";
}

// node:net and node:dgram are imported on first use: at the top they cost 6-15 ms on every
// start of every knit process, most of which never publish a port.
async function probeTcp(hostIp: string, port: number): Promise<ProbeResult> {
  const { createServer } = await import("node:net");
  return new Promise((resolve) => {
    const server = createServer();
    server.once("error", (err: NodeJS.ErrnoException) => resolve(classify(err)));
    server.listen({ host: hostIp, port, exclusive: true, ipv6Only: hostIp.includes(":") }, () => {
      server.close(() => resolve("free"));
    });
  });
}

async function probeUdp(hostIp: string, port: number): Promise<ProbeResult> {
  const { createSocket } = await import("node:dgram");
  return new Promise((resolve) => {
    const v6 = hostIp.includes(":");
    const socket = createSocket({ type: v6 ? "udp6" : "udp4", ipv6Only: v6 });
    socket.once("error", (err: NodeJS.ErrnoException) => {
      try {
        socket.close();
      } catch {
        // never bound: nothing to close
      }
      resolve(classify(err));
    });
    socket.bind({ address: hostIp, port, exclusive: true }, () => {
      socket.close(() => resolve("free"));
    });
  });
}

/**
 * Bind `hostIp:port` for `proto` in this network namespace and release it at once. "in-use":
 * a socket holds it; "not-local": `hostIp` is no address of this host.
 */
export async function probeHostPort(hostIp: string, port: number, proto: PortProtocol): Promise<ProbeResult> {
  const probe = (): Promise<ProbeResult> => (proto === "tcp" ? probeTcp(hostIp, port) : probeUdp(hostIp, port));
  // Another knit command probing the same port holds it for microseconds: a real listener
  // is still there a moment later, a competing probe is not (then the store decides).
  for (let attempt = 0; ; attempt++) {
    const result = await probe();
    if (result !== "in-use" || attempt === 2) return result;
    await Bun.sleep(5 + Math.random() * 20); // jitter: two probers must not stay in step
  }
}
