/**
 * The plugin's HTTP server: Docker's plugin protocol is HTTP POST with JSON bodies over a unix
 * socket that dockerd finds by name in its plugin directory (`/run/docker/plugins/NAME.sock`;
 * the directory and the name are fixed by dockerd, not configured in it).
 *
 * Answers, as libnetwork's remote driver documentation asks:
 *   - a path the plugin does not serve: 404 (dockerd then treats the method as not implemented);
 *   - a body that is not JSON or not the protocol's shape: 400 with {"Err": ...};
 *   - a well-formed request that cannot be done: 200 with {"Err": ...} (NetworkDriver) or
 *     {"Error": ...} (IpamDriver); dockerd shows the text as "remote: <text>".
 *
 * The socket is made with umask 0177 (mode 0600, no moment with a wider mode) in a directory
 * that is made 0700 when knit creates it: whoever can talk to the plugin can make kernel
 * objects as root.
 */
import { chmodSync, existsSync, mkdirSync, rmSync } from "node:fs";
import { join } from "node:path";
import { KnitError, asKnitError } from "../errors.ts";
import { PLUGIN_CONTENT_TYPE, ProtocolError } from "./protocol.ts";
import type { Logger } from "../agent/log.ts";

/** One served method: its handler and the field its errors go in. */
export interface Route {
  readonly handle: (body: unknown) => Promise<unknown>;
  readonly errorField: "Err" | "Error";
}

export interface PluginServerOptions {
  /** Directory dockerd scans for plugin sockets. */
  readonly dir: string;
  /** Plugin name: the socket is DIR/NAME.sock, and `docker network create -d NAME`. */
  readonly name: string;
  /** Path (e.g. "/NetworkDriver.Join") to route. */
  readonly routes: ReadonlyMap<string, Route>;
  readonly log: Logger;
}

export interface PluginServer {
  readonly socket: string;
  /** Calls served, by method, and failures. */
  readonly stats: { calls: Record<string, number>; errors: number };
  stop(): Promise<void>;
}

/** Text Docker shows for a failure: the message, and the hint when there is one. */
export function dockerMessage(err: unknown): string {
  const e = asKnitError(err);
  return e.hint ? `${e.message} (${e.hint})` : e.message;
}

function reply(status: number, body: unknown): Response {
  return new Response(JSON.stringify(body), { status, headers: { "Content-Type": PLUGIN_CONTENT_TYPE } });
}

/** Decode a request body: empty is null (dockerd sends no body for calls without arguments). */
function decode(text: string): unknown {
  if (text.trim() === "") return null;
  try {
    return JSON.parse(text) as unknown;
  } catch (err) {
    throw new ProtocolError(`the request body is not JSON: ${(err as Error).message}`);
  }
}

/** Start serving; the socket exists (mode 0600) when this returns. */
export function servePlugin(opts: PluginServerOptions): PluginServer {
  if (!/^[a-z0-9][a-z0-9_.-]*$/.test(opts.name)) {
    throw new KnitError("invalid-argument", `invalid plugin name "${opts.name}"`, { hint: "use lower-case letters, digits, '.', '_' and '-' (Docker's driver names)" });
  }
  if (!existsSync(opts.dir)) mkdirSync(opts.dir, { recursive: true, mode: 0o700 });
  const socket = join(opts.dir, `${opts.name}.sock`);
  rmSync(socket, { force: true });
  const stats = { calls: {} as Record<string, number>, errors: 0 };

  const fetch = async (req: Request): Promise<Response> => {
    // Over a unix socket the request line carries the path alone.
    const path = req.url.startsWith("/") ? req.url.split("?")[0] ?? req.url : new URL(req.url).pathname;
    const route = opts.routes.get(path);
    if (!route || req.method !== "POST") {
      opts.log.debug("plugin: not served", { path, method: req.method });
      return new Response("404 page not found\n", { status: 404, headers: { "Content-Type": "text/plain" } });
    }
    stats.calls[path] = (stats.calls[path] ?? 0) + 1;
    const started = performance.now();
    try {
      const out = await route.handle(decode(await req.text()));
      opts.log.debug("plugin call", { path, ms: Math.round((performance.now() - started) * 10) / 10 });
      return reply(200, out ?? {});
    } catch (err) {
      stats.errors++;
      const status = err instanceof ProtocolError ? 400 : 200;
      const message = err instanceof ProtocolError ? err.message : dockerMessage(err);
      opts.log.warn("plugin call failed", { path, status, err: message });
      // dockerd reads the text of a non-200 answer from "Err" alone, for either protocol.
      return reply(status, { [status === 200 ? route.errorField : "Err"]: message });
    }
  };

  const umask = process.umask(0o177);
  let server: ReturnType<typeof Bun.serve>;
  try {
    server = Bun.serve({ unix: socket, development: false, fetch });
  } finally {
    process.umask(umask);
  }
  chmodSync(socket, 0o600);
  return {
    socket,
    stats,
    async stop() {
      await server.stop(true);
      rmSync(socket, { force: true });
    },
  };
}
