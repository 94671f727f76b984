/**
 * The little of Docker's Engine API the plugin reads: Docker does not tell a remote driver the
 * names of its networks and containers, so the plugin asks the daemon (`GET /networks/{id}`,
 * `GET /containers/{id}/json`, `GET /networks`). Only reads, each with a short timeout; when
 * the daemon cannot be asked (no socket, another daemon), knit keeps working under names made
 * from Docker's ids.
 *
 * Never ask about a container from inside a Join: dockerd holds the container's lock while it
 * starts it, and would answer only after the Join it is waiting for (a deadlock until the
 * timeout). Network inspection takes no such lock.
 */
import { KnitError } from "../errors.ts";

/** Docker's `GET /networks/{id}` answer, the parts knit reads. */
export interface DockerNetworkInfo {
  Name: string;
  Id: string;
  Driver: string;
  IPAM: { Driver: string; Config: { Subnet?: string }[] | null };
  /** Keyed by container id, or by "ep-<endpoint id>" while a container is still joining. */
  Containers: Record<string, { Name: string; EndpointID: string }> | null;
}

/** Docker's `GET /containers/{id}/json` answer, the parts knit reads. */
export interface DockerContainerInfo {
  Id: string;
  Name: string;
  Config: { Hostname: string };
  NetworkSettings: { Networks: Record<string, { NetworkID: string; EndpointID: string; Aliases: string[] | null }> | null };
}

/** A client for one daemon, `unix:///path/docker.sock` or `tcp://host:port`. */
export class DockerApi {
  private readonly socket: string | undefined;
  private readonly base: string;

  constructor(
    readonly host: string,
    private readonly timeoutMs = 2000,
  ) {
    if (host.startsWith("unix://")) {
      this.socket = host.slice("unix://".length);
      this.base = "http://docker";
    } else if (host.startsWith("tcp://") || host.startsWith("http://")) {
      this.socket = undefined;
      this.base = `http://${host.replace(/^[a-z]+:\/\//, "")}`;
    } else {
      throw new KnitError("invalid-argument", `invalid Docker host "${host}"`, { hint: "use unix:///var/run/docker.sock or tcp://HOST:PORT" });
    }
  }

  /** One request; undefined on 404; throws on anything else that is not 2xx. */
  private async request<T>(method: "GET" | "POST", path: string, body?: unknown, timeoutMs = this.timeoutMs): Promise<T | undefined> {
    const init: RequestInit & { unix?: string } = { method, signal: AbortSignal.timeout(timeoutMs) };
    if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers = { "Content-Type": "application/json" };
    }
    if (this.socket) init.unix = this.socket;
    const res = await fetch(`${this.base}${path}`, init);
    if (res.status === 404) {
      await res.body?.cancel();
      return undefined;
    }
    if (!res.ok) {
      const text = (await res.text()).trim();
      let message = text;
      try {
        message = (JSON.parse(text) as { message?: string }).message ?? text;
      } catch {
        // not JSON: the text as it is
      }
      throw new KnitError("io", `Docker API ${method} ${path}: HTTP ${res.status}: ${message}`);
    }
    return (await res.json()) as T;
  }

  private get<T>(path: string): Promise<T | undefined> {
    return this.request<T>("GET", path);
  }

  network(id: string): Promise<DockerNetworkInfo | undefined> {
    return this.get<DockerNetworkInfo>(`/networks/${encodeURIComponent(id)}`);
  }

  async networks(): Promise<DockerNetworkInfo[]> {
    return (await this.get<DockerNetworkInfo[]>("/networks")) ?? [];
  }

  container(id: string): Promise<DockerContainerInfo | undefined> {
    return this.get<DockerContainerInfo>(`/containers/${encodeURIComponent(id)}/json`);
  }

  /** `docker network create` through the API; returns the new network's id. */
  async createNetwork(spec: {
    Name: string;
    Driver: string;
    Options?: Record<string, string>;
    IPAM?: { Driver: string; Options?: Record<string, string>; Config?: { Subnet: string; Gateway?: string }[] };
  }): Promise<string> {
    const res = await this.request<{ Id: string }>("POST", "/networks/create", { CheckDuplicate: true, ...spec }, 15_000);
    return res?.Id ?? "";
  }
}

/** The Docker host to ask by default: DOCKER_HOST, else the standard socket. */
export function defaultDockerHost(): string {
  return process.env.DOCKER_HOST || "unix:///var/run/docker.sock";
}
