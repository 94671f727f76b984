/**
 * Opening the store named by a store spec (`--store`):
 *
 * - `etcd://HOST:PORT[,HOST:PORT...][/PREFIX/]`: the cluster store ({@link EtcdStore}); knit's
 *   keys live under PREFIX (default `/knit/`).
 * - `sqlite:DIR`, or a plain directory: the embedded store in `DIR/knit.db`.
 * - nothing (undefined or ""): the embedded store in the state directory.
 *
 * The gRPC etcd client (etcd3, grpc-js, protobuf) takes 150 to 350 ms to load under Bun, and
 * the CLI starts once per container: short-lived processes talk to etcd's JSON gateway with
 * fetch instead ({@link EtcdClient}); the gRPC client is imported only by the agent.
 */
import { resolve } from "node:path";
import { invalid } from "../errors.ts";
import { openSqliteStore } from "./sqlite.ts";
import type { Store } from "./store.ts";

/** A parsed store spec. */
export type StoreSpec =
  | { readonly kind: "sqlite"; readonly dir: string }
  | { readonly kind: "etcd"; readonly endpoints: readonly string[]; readonly prefix?: string };

const ETCD_SCHEME = "etcd://";

/** Parses a store spec; relative directories are resolved against the working directory. */
export function parseStoreSpec(spec: string | undefined, stateDir: string): StoreSpec {
  const text = (spec ?? "").trim();
  if (text === "") return { kind: "sqlite", dir: stateDir };
  if (text.startsWith(ETCD_SCHEME)) return parseEtcdSpec(text);
  if (text.startsWith("sqlite:")) {
    const dir = text.slice("sqlite:".length);
    if (dir === "") throw invalid(`store "${text}" names no directory`, "use sqlite:DIR, for example sqlite:/var/lib/knit");
    return { kind: "sqlite", dir: resolve(dir) };
  }
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(text)) {
    throw invalid(`unknown store "${text}"`, "use etcd://HOST:PORT[,HOST:PORT...] or sqlite:DIR (or a directory)");
  }
  return { kind: "sqlite", dir: resolve(text) };
}

function parseEtcdSpec(text: string): StoreSpec {
  const rest = text.slice(ETCD_SCHEME.length);
  const slash = rest.indexOf("/");
  const hosts = slash < 0 ? rest : rest.slice(0, slash);
  const path = slash < 0 ? "" : rest.slice(slash);
  const endpoints = hosts.split(",").map((endpoint) => endpoint.trim());
  for (const endpoint of endpoints) checkEndpoint(endpoint, ` in "${text}"`);
  if (path === "" || path === "/") return { kind: "etcd", endpoints };
  return { kind: "etcd", endpoints, prefix: path.endsWith("/") ? path : `${path}/` };
}

/** Throws unless `endpoint` is `host:port` (IPv6 as `[addr]:port`); `where` ends the message. */
export function checkEndpoint(endpoint: string, where = ""): void {
  const port = Number(endpoint.slice(endpoint.lastIndexOf(":") + 1));
  if (!/^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):\d{1,5}$/.test(endpoint) || port < 1 || port > 65535) {
    throw invalid(`bad etcd endpoint "${endpoint}"${where}: use host:port`, "for example etcd://10.0.0.1:2379,10.0.0.2:2379");
  }
}

/**
 * Which etcd client a process uses: `http` (etcd's JSON gateway through fetch, nothing to
 * load: for the CLI and the CNI plugin, which start once per container) or `grpc` (the etcd3
 * package: for the agent, which runs for days on watch streams). See src/store/etcd-http.ts.
 * KNIT_ETCD_CLIENT=grpc|http overrides the choice.
 */
export type EtcdClient = "http" | "grpc";

/** Opens the store a spec names (see the file comment); `stateDir` is the default. */
export async function openStore(spec: string | undefined, stateDir: string, opts: { etcdClient?: EtcdClient } = {}): Promise<Store> {
  const parsed = parseStoreSpec(spec, stateDir);
  if (parsed.kind === "sqlite") return openSqliteStore(parsed.dir);
  const options = parsed.prefix === undefined ? { endpoints: parsed.endpoints } : { endpoints: parsed.endpoints, prefix: parsed.prefix };
  const env = process.env.KNIT_ETCD_CLIENT;
  if (env !== undefined && env !== "" && env !== "http" && env !== "grpc") throw invalid(`KNIT_ETCD_CLIENT="${env}": use http or grpc`);
  const client = env === "http" || env === "grpc" ? env : (opts.etcdClient ?? "http");
  if (client === "http") {
    const { openEtcdHttpStore } = await import("./etcd-http.ts");
    return openEtcdHttpStore(options);
  }
  const { openEtcdStore } = await import("./etcd.ts");
  return openEtcdStore(options);
}
