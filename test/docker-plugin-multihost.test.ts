/**
 * Two Docker hosts without Swarm: each lab host runs Debian's dockerd and a knit agent on one
 * etcd store, serving Docker's knit driver. One knit overlay network, created through Docker
 * on both hosts, connects their containers: by address, by name, and with a way out.
 *
 *   internet ── rtr ── underlay 10.80.0.0/24 ── h1 (dockerd, agent --plugin-name knit-h1)
 *                                             └ h2 (dockerd, agent --plugin-name knit-h2)
 *   etcd on a LAN of its own (src/demo/cluster-lab.ts)
 *
 * dockerd finds plugins in /run/docker/plugins, a fixed path, and the lab's hosts share one
 * /run/docker (the lab's private tmpfs): so each host's agent serves its own name there
 * (`knit-h1`, `knit-h2`), which is what `docker network create -d` names on that host. On real
 * machines it is `knit` everywhere.
 */
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { existsSync } from "node:fs";
import { INTERNET, Lab, waitFor } from "../src/lab/lab.ts";
import { type DockerDaemon, dockerMissing, startDocker } from "../src/lab/docker.ts";
import { etcdMissing } from "../src/lab/etcd.ts";
import { ClusterLab, type ClusterHost } from "../src/demo/cluster-lab.ts";
import { assertClusterClean } from "./overlay-lab.ts";

setDefaultTimeout(180_000);

const missing = dockerMissing() ?? etcdMissing();
const title = missing ? `Docker hosts on one knit overlay network (skipped: ${missing})` : "Docker hosts on one knit overlay network";

interface Host {
  c: ClusterHost;
  d: DockerDaemon;
  /** The plugin's name on this host. */
  driver: string;
}

describe.skipIf(missing !== undefined)(title, () => {
  let lab: Lab;
  let cl: ClusterLab;
  const hosts: Host[] = [];
  let overlayId = "";

  const h = (i: number): Host => {
    const x = hosts[i];
    if (!x) throw new Error(`no host ${i}`);
    return x;
  };
  async function addrOf(x: Host, container: string, network: string): Promise<string> {
    return (await x.d.dockerOk(["inspect", "-f", `{{(index .NetworkSettings.Networks "${network}").IPAddress}}`, container])).stdout.trim();
  }
  async function knitId(x: Host, network: string): Promise<string> {
    return (JSON.parse(await cl.knitOk(x.c, ["network", "inspect", network])) as { Id: string }[])[0]?.Id ?? "";
  }
  async function pingFrom(x: Host, container: string, target: string): Promise<string | undefined> {
    const r = await x.d.docker(["exec", container, "ping", "-c1", "-W2", target]);
    return r.code === 0 ? r.stdout : undefined;
  }

  beforeAll(async () => {
    lab = await Lab.create("dkm");
    cl = await ClusterLab.create(lab, { hosts: 2, lanMachine: false, etcdNet: 86 });
    for (const c of cl.hosts) {
      const d = await startDocker(c.host);
      await d.ensureBusyboxImage();
      const driver = `knit-${c.label}`;
      // The cluster agent again, now also Docker's driver on this host.
      await cl.stopAgent(c);
      await cl.startAgent(c, ["--docker-plugin", "--plugin-name", driver, "--docker-host", d.dockerHost]);
      if (!existsSync(`/run/docker/plugins/${driver}.sock`)) throw new Error(`no plugin socket for ${driver}`);
      hosts.push({ c, d, driver });
    }
  }, 300_000);

  afterAll(async () => {
    await lab.cleanup();
  });

  test("one overlay network made through Docker on both hosts is one knit network", async () => {
    for (const x of hosts) {
      const r = await x.d.dockerOk(["network", "create", "-d", x.driver, "--ipam-driver", x.driver, "-o", "knit.driver=overlay", "--subnet", "10.90.0.0/24", "ov"]);
      if (x === h(0)) overlayId = r.stdout.trim();
    }
    // knit has one overlay network, with the first host's Docker id and Docker's name.
    for (const x of hosts) {
      expect(await waitFor(async () => (await cl.knit(x.c, ["network", "ls", "--filter", "driver=overlay", "--format", "{{.ID}} {{.Name}} {{.Scope}}"])).stdout.trim() === `${overlayId.slice(0, 12)} ov global`, 5000, 50)).toBe(true);
    }
    // Each dockerd has its own record of the network (no Swarm), of its host's driver.
    const second = JSON.parse((await h(1).d.dockerOk(["network", "inspect", "ov"])).stdout) as { Id: string; Driver: string; Scope: string }[];
    expect(second[0]?.Id).not.toBe(overlayId);
    expect(second[0]).toMatchObject({ Driver: "knit-h2", Scope: "local" });
    // Docker on the second host cannot hand out the overlay's addresses twice: its own IPAM is refused.
    const plain = await h(1).d.docker(["network", "create", "-d", h(1).driver, "-o", "knit.driver=overlay", "--subnet", "10.91.0.0/24", "ov2"]);
    expect(plain.code).not.toBe(0);
    expect(plain.stderr).toContain("needs knit's IPAM driver");
  });

  // On a Docker host (iptables FORWARD policy DROP, bridge-nf-call-iptables=1) bridged
  // overlay frames pass only because the overlay bridge is a knit bridge in DOCKER-USER.
  test("containers on the two hosts reach each other by address and by name, and get out", async () => {
    await h(0).d.dockerOk(["run", "-d", "--init", "--name", "a1", "--network", "ov", "bb", "sleep", "3600"]);
    await h(1).d.dockerOk(["run", "-d", "--init", "--name", "a2", "--network", "ov", "bb", "sleep", "3600"]);
    const a1 = await addrOf(h(0), "a1", "ov");
    const a2 = await addrOf(h(1), "a2", "ov");
    // One IPAM for the cluster: different addresses of the one subnet.
    expect(a1).toMatch(/^10\.90\.0\.\d+$/);
    expect(a2).toMatch(/^10\.90\.0\.\d+$/);
    expect(a1).not.toBe(a2);
    // knit lists each host's container on the one network.
    for (const [x, name] of [[h(0), "a1"], [h(1), "a2"]] as const) {
      const view = JSON.parse(await cl.knitOk(x.c, ["network", "inspect", "ov"])) as { Containers: Record<string, { Name: string }> }[];
      expect(Object.values(view[0]?.Containers ?? {}).map((c) => c.Name)).toContain(name);
    }
    // The data path: each host's vxlan device knows the other host's endpoint, and only that.
    expect(await cl.peersConverged(overlayId, 10_000)).toBe(true);
    const mac2 = (await h(1).d.dockerOk(["inspect", "-f", '{{(index .NetworkSettings.Networks "ov").MacAddress}}', "a2"])).stdout.trim();
    expect(await cl.fdb(h(0).c, overlayId)).toContainEqual({ mac: mac2, dst: h(1).c.address });

    expect(await pingFrom(h(0), "a1", a2)).toBeDefined();
    expect(await pingFrom(h(1), "a2", a1)).toBeDefined();
    // Names across hosts come from knit's DNS (Docker's knows its own host's containers only).
    expect(await pingFrom(h(0), "a1", "a2")).toContain(a2);
    expect(await pingFrom(h(1), "a2", "a1")).toContain(a1);
    // The way out is Docker's gateway service, on knit's docker_gwbridge: masqueraded to the internet.
    const gw = JSON.parse((await h(0).d.dockerOk(["network", "inspect", "docker_gwbridge"])).stdout) as { Driver: string }[];
    expect(gw[0]?.Driver).toBe("knit-h1");
    expect(await pingFrom(h(0), "a1", INTERNET.server4)).toBeDefined();
  });

  test("knit sandboxes on the same overlay, and containers, find each other across hosts", async () => {
    await cl.knitOk(h(1).c, ["run", "-d", "--name", "k2", "--network", "ov", "--", "sleep", "3600"]);
    try {
      const k2 = await cl.sandbox(h(1).c, "k2");
      expect(await pingFrom(h(0), "a1", "k2")).toContain(k2.ip.ov ?? "?");
      const a1 = await addrOf(h(0), "a1", "ov");
      const r = await cl.inSandbox(k2.pid, ["ping", "-c1", "-W2", "a1"]);
      expect(r.stdout).toContain(a1);
    } finally {
      await cl.knitOk(h(1).c, ["rm", "-f", "k2"]);
    }
  });

  test("Docker's gateway network is knit's docker_gwbridge: knit's DNS and the way out", async () => {
    // Docker's gateway network is knit's docker_gwbridge (same subnet), knit's DNS answers a
    // container with the other host's container (the redirect works), and the container gets
    // out to the internet through knit's masquerade.
    const gw = JSON.parse((await h(0).d.dockerOk(["network", "inspect", "docker_gwbridge"])).stdout) as { Driver: string; IPAM: { Config: { Subnet: string }[] } }[];
    expect(gw[0]?.Driver).toBe("knit-h1");
    const knitGw = JSON.parse(await cl.knitOk(h(0).c, ["network", "inspect", "docker_gwbridge"])) as { IPAM: { Config: { Subnet: string }[] } }[];
    expect(gw[0]?.IPAM.Config[0]?.Subnet).toBe(knitGw[0]?.IPAM.Config[0]?.Subnet);
    const a2 = await addrOf(h(1), "a2", "ov");
    const lookup = await h(0).d.docker(["exec", "a1", "nslookup", "a2"]);
    expect(lookup.stdout).toContain(`Address: ${a2}`);
    expect(await pingFrom(h(0), "a1", INTERNET.server4)).toBeDefined();
  });

  test("an --internal overlay: containers of both hosts resolve each other through knit's DNS on 169.254.53.53; nothing gets out", async () => {
    for (const x of hosts) {
      await x.d.dockerOk(["network", "create", "-d", x.driver, "--ipam-driver", x.driver, "-o", "knit.driver=overlay", "--internal", "--subnet", "10.92.0.0/24", "iov"]);
    }
    await h(0).d.dockerOk(["run", "-d", "--init", "--name", "i1", "--network", "iov", "bb", "sleep", "3600"]);
    await h(1).d.dockerOk(["run", "-d", "--init", "--name", "i2", "--network", "iov", "bb", "sleep", "3600"]);
    try {
      const i1 = await addrOf(h(0), "i1", "iov");
      const i2 = await addrOf(h(1), "i2", "iov");
      // No default route, no docker_gwbridge interface: one interface, on the overlay, with
      // the DNS address on the link and the daemon's upstreams through it.
      const routes = (await h(0).d.dockerOk(["exec", "i1", "ip", "-4", "route", "show"])).stdout.trim().split("\n");
      expect(routes.some((r) => r.startsWith("default"))).toBe(false);
      expect(routes).toContain("169.254.53.53 dev eth0 scope link");
      const upstreams = routes.filter((r) => r.includes(" via "));
      expect(upstreams.length).toBeGreaterThan(0);
      for (const r of upstreams) expect(r).toMatch(/^[\d.]+ via 169\.254\.53\.53 dev eth0/);
      expect((await h(0).d.dockerOk(["exec", "i1", "ip", "-o", "link", "show"])).stdout).not.toContain("eth1");
      expect(await cl.peersConverged(await knitId(h(0), "iov"), 10_000)).toBe(true);
      // By name across hosts, both ways, and a knit sandbox on the same network.
      expect(await pingFrom(h(0), "i1", "i2")).toContain(i2);
      expect(await pingFrom(h(1), "i2", "i1")).toContain(i1);
      await cl.knitOk(h(1).c, ["run", "-d", "--name", "k3", "--network", "iov", "--", "sleep", "3600"]);
      const k3 = await cl.sandbox(h(1).c, "k3");
      expect(await pingFrom(h(0), "i1", "k3")).toContain(k3.ip.iov ?? "?");
      // Internal: the internet stays out of reach.
      expect(await pingFrom(h(0), "i1", INTERNET.server4)).toBeUndefined();
    } finally {
      await cl.knit(h(1).c, ["rm", "-f", "k3"]);
      await h(0).d.docker(["rm", "-f", "i1"]);
      await h(1).d.docker(["rm", "-f", "i2"]);
      for (const x of hosts) await x.d.docker(["network", "rm", "iov"]);
    }
  });

  test("the knit network goes with the last Docker network on it; nothing is left", async () => {
    await h(0).d.dockerOk(["rm", "-f", "a1"]);
    await h(1).d.dockerOk(["rm", "-f", "a2"]);
    await h(0).d.dockerOk(["network", "rm", "ov"]);
    // The second host still has its Docker network: the knit network stays for it.
    expect((await cl.knit(h(1).c, ["network", "inspect", "ov"])).code).toBe(0);
    await h(1).d.dockerOk(["network", "rm", "ov"]);
    expect((await cl.knit(h(1).c, ["network", "inspect", "ov"])).code).not.toBe(0);
    for (const x of hosts) {
      await x.d.dockerOk(["network", "rm", "docker_gwbridge"]);
      await x.d.stop();
      // dockerd leaves its own docker0 when it stops; the lab's leak check counts every link.
      await x.c.host.exec(["ip", "link", "del", "docker0"]);
    }
    const left = (await cl.store.list("docker/")).items.map((kv) => kv.key);
    expect(left).toEqual([]);
    await assertClusterClean(cl);
  });
});
