/**
 * A knit cluster in the lab, for the cluster demo, the overlay tests and the overlay
 * benchmark:
 *
 *   internet (198.51.100.10) ── rtr 10.80.0.1 ──┐
 *                                              underlay LAN 10.80.0.0/24 (bridge "ul")
 *     h1 eth0 10.80.0.11   h2 eth0 10.80.0.12   h3 eth0 10.80.0.13  ...  m (a LAN machine) .250
 *     h1 eth1 ─┐           h2 eth1 ─┐           h3 eth1 ─┐
 *              └──────────── etcd LAN 10.79.x.0/24 (etcd1 .11; this process .2) ──┘
 *
 * Each host runs `knit agent --store etcd://... --name hN --advertise-address 10.80.0.1N`
 * and its CLI with KNIT_STORE (and KNIT_HOST=hN, which every lab host has). etcd has a LAN of
 * its own so that a host can be cut off from it (a firewall rule on the host's etcd-side
 * interface) while the underlay keeps working. Host N is 10.80.0.(10+N), up to
 * {@link MAX_HOSTS} hosts (the scale benchmark, bench/overlay-scale.ts, runs 50); agents start
 * `agentBatch` at a time, so that many of them starting on a small machine do not all miss
 * their start-up deadline.
 */
import { join } from "node:path";
import { writeFileSync } from "node:fs";
import { type ExecOptions, type ExecResult, INTERNET, type Lab, type LabHost, type LabLan, type LabNode, type LabProcess, LabError, REPO_ROOT, waitFor } from "../lab/lab.ts";
import { type EtcdCluster, startEtcdCluster } from "../lab/etcd.ts";
import { openEtcdStore } from "../store/etcd.ts";
import type { Store } from "../store/store.ts";
import { keys, type Endpoint } from "../model.ts";

/** Options of {@link ClusterLab.create}. */
export interface ClusterLabOptions {
  /** Number of knit hosts (default 3). */
  hosts?: number;
  /** Third octet of the etcd LAN 10.79.X.0/24 (default 80), so several labs can coexist. */
  etcdNet?: number;
  /** Lease TTL of every agent, seconds (default 10). */
  leaseTtl?: number;
  /** Add a router to the lab internet (default true) and a LAN machine "m" (default true). */
  internet?: boolean;
  lanMachine?: boolean;
  /** Log level of the agents (default info). */
  logLevel?: string;
  /** At most this many agents start at the same time (default 10); each start waits for its registration. */
  agentBatch?: number;
  /**
   * Start an agent again, up to this many times, when it exits during start-up (default 0), as a
   * service manager would: on a loaded machine a starting agent can miss the store's 2 s deadline.
   */
  agentRestarts?: number;
}

/** One knit host of the cluster. */
export interface ClusterHost {
  readonly label: string;
  readonly host: LabHost;
  /** Underlay address (no prefix). */
  readonly address: string;
  /** Interface on the etcd LAN. */
  readonly etcdIf: string;
  agent: LabProcess | undefined;
}

/** Underlay subnet of the cluster lab: router .1, host N .(10+N), the LAN machine .250. */
export const UNDERLAY = { prefix: "10.80.0", bits: 24, router: "10.80.0.1", machine: "10.80.0.250" } as const;

/** Most hosts a cluster lab can have (their underlay addresses stay below the LAN machine's). */
export const MAX_HOSTS = 200;

export class ClusterLab {
  readonly hosts: ClusterHost[] = [];
  /** Hosts whose agent exited during start-up and was started again (`agentRestarts`), once per restart. */
  readonly restarted: string[] = [];
  /** A store client in this process (through the etcd LAN), for checks. */
  store!: Store;
  underlay!: LabLan;
  etcd!: EtcdCluster;
  machine: LabNode | undefined;
  /** A resolv.conf without upstreams (agents never ask a real resolver). */
  readonly resolvConf: string;

  private constructor(
    readonly lab: Lab,
    readonly opts: ClusterLabOptions,
  ) {
    this.resolvConf = join(lab.dir, "_cluster-resolv.conf");
  }

  /** Build the lab and start one agent per host (waits until every host is registered). */
  static async create(lab: Lab, opts: ClusterLabOptions = {}): Promise<ClusterLab> {
    const c = new ClusterLab(lab, opts);
    writeFileSync(c.resolvConf, opts.internet === false ? "# no upstreams\n" : `nameserver ${INTERNET.server4}\n`);
    const n = opts.hosts ?? 3;
    if (!Number.isInteger(n) || n < 1 || n > MAX_HOSTS) throw new LabError(`cluster lab hosts ${n}: use 1 to ${MAX_HOSTS}`);
    const batch = opts.agentBatch ?? 10;
    if (!Number.isInteger(batch) || batch < 1) throw new LabError(`cluster lab agentBatch ${batch}: use a positive integer`);
    c.etcd = await startEtcdCluster(lab, { label: "etcd", size: 1, subnet: `10.79.${opts.etcdNet ?? 80}.0/24` });
    c.store = await openEtcdStore({ endpoints: c.etcd.endpoints });
    lab.onCleanup("close the cluster store client", () => c.store.close());
    c.underlay = await lab.lan("ul");
    for (let i = 1; i <= n; i++) {
      const host = await lab.host(`h${i}`);
      const address = `${UNDERLAY.prefix}.${10 + i}`;
      await lab.plug(host, c.underlay, { ifname: "eth0", addresses: [`${address}/${UNDERLAY.bits}`] });
      await c.etcd.plug(host);
      c.hosts.push({ label: `h${i}`, host, address, etcdIf: "eth1", agent: undefined });
    }
    if (opts.lanMachine !== false) {
      c.machine = await lab.ns("m");
      await lab.plug(c.machine, c.underlay, { ifname: "eth0", addresses: [`${UNDERLAY.machine}/${UNDERLAY.bits}`] });
    }
    if (opts.internet !== false) {
      await lab.router("rtr", [{ lan: c.underlay, addresses: [`${UNDERLAY.router}/${UNDERLAY.bits}`] }], { internet: true });
      // The hosts' resolver, for names knit does not know: a tiny DNS server on the lab's
      // internet (never a real resolver), answering `example.test`.
      const stub = (await lab.internet()).spawn([process.execPath, join(REPO_ROOT, "src", "dns", "stub-server.ts"), "--listen", INTERNET.server4, "--answer", `example.test=${INTERNET.server4}`, "--quiet"]);
      if (!(await waitFor(() => stub.output().includes("ready"), 10_000, 20))) throw new LabError(`the lab's DNS server did not start:\n${stub.output()}`);
    }
    for (let i = 0; i < c.hosts.length; i += batch) await Promise.all(c.hosts.slice(i, i + batch).map((h) => c.startAgentRestarting(h)));
    return c;
  }

  /** {@link startAgent}, again after an agent that exited during start-up (`agentRestarts` times). */
  private async startAgentRestarting(h: ClusterHost): Promise<void> {
    for (let attempt = 0; ; attempt++) {
      try {
        await this.startAgent(h);
        return;
      } catch (err) {
        if (attempt >= (this.opts.agentRestarts ?? 0) || h.agent?.running !== false) throw err;
        this.restarted.push(h.label);
      }
    }
  }

  /** The store spec every host uses. */
  get spec(): string {
    return this.etcd.spec;
  }

  /** Environment of knit commands on the hosts. */
  env(extra: Record<string, string> = {}): Record<string, string> {
    return { KNIT_STORE: this.spec, KNIT_RESOLV_CONF: this.resolvConf, KNIT_AGENT_AUTOSTART: "0", ...extra };
  }

  host(label: string): ClusterHost {
    const h = this.hosts.find((x) => x.label === label);
    if (!h) throw new LabError(`no cluster host ${label}`);
    return h;
  }

  /** `knit ARGS` on a host, with the cluster's store; never throws on a non-zero exit. */
  knit(h: ClusterHost, args: readonly string[], opts: Omit<ExecOptions, "check"> = {}): Promise<ExecResult> {
    return h.host.knit(args, { ...opts, env: this.env(opts.env) });
  }

  /** Like {@link knit}, but throws with the output on failure; returns trimmed stdout. */
  async knitOk(h: ClusterHost, args: readonly string[], opts: Omit<ExecOptions, "check"> = {}): Promise<string> {
    const r = await this.knit(h, args, opts);
    if (r.code !== 0) throw new LabError(`knit ${args.join(" ")} on ${h.label} failed (exit ${r.code}):\n${r.stdout}${r.stderr}`, r);
    return r.stdout.trim();
  }

  /** Start a host's agent (`--lease-ttl` from the options unless given) and wait for its registration. */
  async startAgent(h: ClusterHost, extra: readonly string[] = []): Promise<LabProcess> {
    const args = ["agent", "--store", this.spec, "--name", h.label, "--advertise-address", h.address, "--log-level", this.opts.logLevel ?? "info"];
    if (!extra.includes("--lease-ttl")) args.push("--lease-ttl", String(this.opts.leaseTtl ?? 10));
    const agent = h.host.spawnKnit([...args, ...extra], { env: this.env() });
    h.agent = agent;
    const ready = await waitFor(async () => !agent.running || (await this.agentReady(h)), 20_000, 50);
    if (!ready || !agent.running) throw new LabError(`agent of ${h.label} did not start:\n${agent.output().slice(-3000)}`);
    return agent;
  }

  /** True when the host's agent wrote agent.pid (it is ready) and its registration exists. */
  async agentReady(h: ClusterHost): Promise<boolean> {
    const file = Bun.file(join(h.host.stateDir, "agent.pid"));
    if (!(await file.exists())) return false;
    const rec = JSON.parse(await file.text()) as { pid: number };
    return rec.pid === h.agent?.pid && (await this.store.get(keys.host(h.label))) !== undefined;
  }

  /** Stop a host's agent (SIGTERM, or SIGKILL as a crash); waits until it is gone. */
  async stopAgent(h: ClusterHost, signal: "SIGTERM" | "SIGKILL" = "SIGTERM"): Promise<void> {
    const agent = h.agent;
    if (!agent) return;
    if (signal === "SIGKILL") agent.kill("SIGKILL");
    else await agent.stop(5000);
    await agent.exited;
    h.agent = undefined;
  }

  /** Forget a host at once (revoke its lease), as if its TTL had passed. */
  async expire(h: ClusterHost): Promise<void> {
    const kv = await this.store.get(keys.host(h.label));
    if (kv?.lease) await this.store.revokeLease(kv.lease);
  }

  // ---- reading the kernel and the store (tests, demo, benchmark) ----

  /** The vxlan device of a network on a host (`ip -j -d link`), or undefined. */
  async vxlan(h: ClusterHost, netId: string): Promise<VxlanLink | undefined> {
    const r = await h.host.exec(["ip", "-j", "-d", "link", "show", "dev", `vx-${netId.slice(0, 12)}`], { check: false });
    return r.code === 0 ? (JSON.parse(r.stdout) as VxlanLink[])[0] : undefined;
  }

  /** FDB entries with a destination on a network's vxlan device (`bridge -j fdb show`). */
  async fdb(h: ClusterHost, netId: string): Promise<{ mac: string; dst: string }[]> {
    const r = await h.host.exec(["bridge", "-j", "fdb", "show", "dev", `vx-${netId.slice(0, 12)}`], { check: false });
    if (r.code !== 0) return [];
    return (JSON.parse(r.stdout) as { mac: string; dst?: string }[]).filter((e) => e.dst !== undefined).map((e) => ({ mac: e.mac, dst: e.dst ?? "" }));
  }

  /** The bridge's entries on the vxlan port (`master`): static ones knit set, learned ones (state ""). */
  async bridged(h: ClusterHost, netId: string): Promise<{ mac: string; state: string }[]> {
    const r = await h.host.exec(["bridge", "-j", "fdb", "show", "dev", `vx-${netId.slice(0, 12)}`], { check: false });
    if (r.code !== 0) return [];
    const all = JSON.parse(r.stdout) as { mac: string; master?: string; state?: string }[];
    // "permanent" is the port's own address.
    return all.filter((e) => e.master !== undefined && e.state !== "permanent").map((e) => ({ mac: e.mac, state: e.state ?? "" }));
  }

  /** Neighbour entries on a network's vxlan device (`ip -j neigh show`). */
  async neigh(h: ClusterHost, netId: string): Promise<{ ip: string; mac: string }[]> {
    const r = await h.host.exec(["ip", "-j", "neigh", "show", "dev", `vx-${netId.slice(0, 12)}`], { check: false });
    if (r.code !== 0) return [];
    return (JSON.parse(r.stdout) as { dst: string; lladdr?: string }[]).map((n) => ({ ip: n.dst, mac: n.lladdr ?? "" }));
  }

  /**
   * What a host's vxlan device of `netId` must hold, from the store: one FDB entry per endpoint
   * on another live host (MAC -> that host's underlay address), one neighbour entry per address.
   */
  async expectedPeers(h: ClusterHost, netId: string): Promise<PeerView> {
    const hosts = new Map((await this.store.list(keys.hosts())).items.map((kv) => [kv.key.slice(keys.hosts().length), JSON.parse(kv.value) as { address: string }]));
    const eps = (await this.store.list(keys.endpointsOf(netId))).items.map((kv) => JSON.parse(kv.value) as Endpoint);
    const remote = eps.filter((ep) => ep.host !== undefined && ep.host !== h.label && hosts.has(ep.host) && ep.state !== "deleting");
    const sort = <T extends { mac: string }>(xs: T[]): T[] => xs.sort((a, b) => JSON.stringify(a).localeCompare(JSON.stringify(b)));
    return {
      fdb: sort(remote.map((ep) => ({ mac: ep.mac, dst: hosts.get(ep.host ?? "")?.address ?? "" }))),
      neigh: sort(remote.flatMap((ep) => (ep.ipv4 ? [{ ip: ep.ipv4.split("/")[0] ?? "", mac: ep.mac }] : []))),
      bridged: sort(remote.map((ep) => ({ mac: ep.mac, state: "static" }))),
    };
  }

  /** The kernel's peers on a host, sorted as {@link expectedPeers} sorts. */
  async actualPeers(h: ClusterHost, netId: string): Promise<PeerView> {
    const sort = <T extends { mac: string }>(xs: T[]): T[] => xs.sort((a, b) => JSON.stringify(a).localeCompare(JSON.stringify(b)));
    return { fdb: sort(await this.fdb(h, netId)), neigh: sort(await this.neigh(h, netId)), bridged: sort(await this.bridged(h, netId)) };
  }

  /** Wait until every host's peers match the store (true), or `timeoutMs` passes (false). */
  async peersConverged(netId: string, timeoutMs = 5000, hosts: readonly ClusterHost[] = this.hosts): Promise<boolean> {
    return waitFor(async () => {
      for (const h of hosts) {
        if (!(await this.vxlan(h, netId))) continue;
        if (JSON.stringify(await this.actualPeers(h, netId)) !== JSON.stringify(await this.expectedPeers(h, netId))) return false;
      }
      return true;
    }, timeoutMs, 50);
  }

  /** A sandbox as `knit inspect` shows it: id, namespace, and address per network. */
  async sandbox(h: ClusterHost, name: string): Promise<{ id: string; ns: { path: string; name: string }; ip: Record<string, string>; pid: number }> {
    const [view] = JSON.parse(await this.knitOk(h, ["inspect", name])) as {
      Id: string;
      State: { Pid: number };
      NetworkSettings: { SandboxKey: string; Networks: Record<string, { IPAddress: string }> };
    }[];
    if (!view) throw new LabError(`no sandbox ${name} on ${h.label}`);
    const ip = Object.fromEntries(Object.entries(view.NetworkSettings.Networks).map(([net, v]) => [net, v.IPAddress]));
    return { id: view.Id, ns: { path: view.NetworkSettings.SandboxKey, name: view.NetworkSettings.SandboxKey }, ip, pid: view.State.Pid };
  }

  /** Run a command inside a sandbox's network and mount namespaces (its resolv.conf), by PID. */
  inSandbox(pid: number, argv: readonly string[], opts: ExecOptions = {}): Promise<ExecResult> {
    return this.lab.run(["nsenter", "-t", String(pid), "--net", "--mount", "--", ...argv], { check: false, ...opts });
  }
}

/** A host's peers of one network: vxlan FDB (MAC -> host), neighbours (IP -> MAC), bridge entries on the vxlan port. */
export interface PeerView {
  fdb: { mac: string; dst: string }[];
  neigh: { ip: string; mac: string }[];
  bridged: { mac: string; state: string }[];
}

/** The part of `ip -j -d link` of a vxlan device that the checks read. */
export interface VxlanLink {
  ifname: string;
  mtu: number;
  master?: string;
  flags: string[];
  linkinfo?: {
    info_kind?: string;
    info_data?: { id?: number; port?: number; local?: string; link?: string; learning?: boolean; proxy?: boolean };
    info_slave_data?: { learning?: boolean };
  };
}
