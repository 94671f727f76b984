/**
 * The agent's status socket: HTTP over `<state dir>/agent.sock`. `GET /health` answers the
 * agent's health as JSON; `knit agent status` prints it. A unix socket, not a TCP port:
 * only local users who can reach the state directory can ask, and nothing is exposed on
 * any network.
 */
import { rmSync } from "node:fs";
import { KnitError } from "../errors.ts";

/** Serve `health()` on the unix socket at `path` (a stale socket file is replaced). */
export function serveStatus(path: string, health: () => unknown): { stop(): Promise<void> } {
  rmSync(path, { force: true });
  const server = Bun.serve({
    unix: path,
    fetch(req) {
      const url = new URL(req.url);
      if (req.method === "GET" && url.pathname === "/health") return Response.json(health());
      return new Response("not found\n", { status: 404 });
    },
  });
  return {
    async stop() {
      await server.stop(true);
      rmSync(path, { force: true });
    },
  };
}

/** Ask the agent at `path` for its health. */
export async function fetchHealth(path: string, timeoutMs = 2000): Promise<unknown> {
  try {
    const res = await fetch("http://knit-agent/health", { unix: path, signal: AbortSignal.timeout(timeoutMs) });
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    return await res.json();
  } catch (err) {
    throw new KnitError("io", `the knit agent does not answer on ${path}: ${err instanceof Error ? err.message : String(err)}`, { cause: err });
  }
}
