/**
 * `knit demo --cluster`: multi-host overlay networks without Swarm, in a private lab. Three
 * knit hosts on an underlay LAN, one etcd, a LAN machine and an "internet"
 * (src/demo/cluster-lab.ts); each host runs `knit agent --store etcd://...`. The demo drives
 * the real CLI on the hosts: the issue's `docker network create ... --driver=overlay`
 * command verbatim, a sandbox on each host, pings by name across hosts, egress to the
 * internet, a published port, and what a LAN machine can and cannot reach. Every claim is
 * checked; the exit code says whether all held.
 */
import { stdoutIsTty, writeOut } from "../cli/output.ts";
import { INTERNET, Lab, waitFor } from "../lab/lab.ts";
import { ClusterLab, UNDERLAY, type ClusterHost } from "./cluster-lab.ts";

const bold = (s: string): string => (stdoutIsTty() ? `\x1b[1m${s}\x1b[0m` : s);

/** Run the cluster demo (inside a lab); returns the exit code. */
export async function clusterDemo(): Promise<number> {
  const lab = await Lab.create("demc");
  let failures = 0;
  const check = async (what: string, expected: boolean, probe: () => Promise<boolean>): Promise<void> => {
    const got = await probe();
    const ok = got === expected;
    if (!ok) failures++;
    writeOut(`${ok ? "✔" : "✘"} ${what}: ${got ? "reachable" : "unreachable"}${ok ? "" : ` (expected ${expected ? "reachable" : "unreachable"})`}\n`);
  };
  try {
    writeOut(bold("knit demo --cluster: three hosts on a LAN, one etcd, a LAN machine and a lab \"internet\"; all in private namespaces\n"));
    const c = await ClusterLab.create(lab, { etcdNet: 84, logLevel: "warn" });
    const [h1, h2, h3] = c.hosts as [ClusterHost, ClusterHost, ClusterHost];
    writeOut(`etcd at ${c.etcd.endpoints.join(",")}; on each host: knit agent --store ${c.spec} --name hN --advertise-address 10.80.0.1N\n`);
    const knit = async (h: ClusterHost, args: string[], quiet = false): Promise<string> => {
      writeOut(`\n${bold(`${h.label}$ knit ${args.join(" ")}`)}\n`);
      const out = await c.knitOk(h, args);
      if (!quiet && out) writeOut(`${out}\n`);
      return out;
    };

    await knit(h1, ["network", "create", "--attachable", "--driver=overlay", "--gateway=192.168.1.1", "--subnet=192.168.1.0/24", "--opt", "com.docker.network.bridge.name=vlan0", "vlan0"]);
    await knit(h3, ["network", "ls"]);
    const www = `${lab.dir}/_www`;
    await Bun.write(`${www}/index.html`, "hello from web on h1\n");
    await knit(h1, ["run", "-d", "--name", "web", "--network", "vlan0", "-p", "8080:80", "--", "busybox", "httpd", "-f", "-p", "80", "-h", www], true);
    await knit(h2, ["run", "-d", "--name", "api", "--network", "vlan0", "--", "sleep", "3600"], true);
    await knit(h3, ["run", "-d", "--name", "db", "--network", "vlan0", "--", "sleep", "3600"], true);
    await knit(h2, ["host", "ls"]);

    const sbs = { web: await c.sandbox(h1, "web"), api: await c.sandbox(h2, "api"), db: await c.sandbox(h3, "db") };
    const pingName = (from: keyof typeof sbs, to: string) => async () => (await c.inSandbox(sbs[from].pid, ["ping", "-c1", "-W2", to])).code === 0;
    writeOut(`\n${bold("Across hosts, by name (knit's DNS in each host's agent, fed from etcd):")}\n`);
    await c.peersConverged(await c.knitOk(h1, ["network", "inspect", "--format", "{{.Id}}", "vlan0"]));
    for (const [from, to] of [["web", "api"], ["api", "db"], ["db", "web"]] as const) {
      await check(`${from} (${sbs[from].ip["vlan0"]}, on ${from === "web" ? "h1" : from === "api" ? "h2" : "h3"}) -> "${to}"`, true, pingName(from, to));
    }
    writeOut(`\n${bold("Egress (docker_gwbridge on each host: masquerade, no traffic between its sandboxes):")}\n`);
    await check(`db -> internet ${INTERNET.server4}`, true, async () => lab.waitPing(sbs.db.ns, INTERNET.server4));
    await check(`api -> "example.test" (forwarded to the host's resolver)`, true, pingName("api", "example.test"));

    const m = c.machine;
    if (!m) throw new Error("no LAN machine");
    writeOut(`\n${bold(`From a machine on the LAN (${UNDERLAY.machine}):`)}\n`);
    await check(`published port http://${h1.address}:8080/ (web runs on h1)`, true, async () => waitFor(async () => (await lab.httpGet(m, `http://${h1.address}:8080/`)) !== undefined, 5000));
    await lab.exec(m, ["ip", "route", "replace", "192.168.1.0/24", "via", h1.address]);
    await check(`overlay address ${sbs.web.ip["vlan0"]} (even with a route via h1)`, false, async () => lab.ping(m, sbs.web.ip["vlan0"] ?? "?", { waitSec: 1 }));
    await lab.exec(m, ["ip", "route", "del", "192.168.1.0/24"]);

    writeOut(`\n${bold("Cleaning up:")}\n`);
    await knit(h1, ["rm", "-f", "web"]);
    await knit(h2, ["rm", "-f", "api"]);
    await knit(h3, ["rm", "-f", "db"]);
    await knit(h2, ["network", "rm", "vlan0"]);
    for (const h of c.hosts) await c.knitOk(h, ["network", "rm", "docker_gwbridge"]);
    const leftovers: string[] = [];
    const clean = await waitFor(async () => {
      leftovers.length = 0;
      for (const h of c.hosts) {
        const links = JSON.parse((await h.host.exec(["ip", "-j", "link"])).stdout) as { ifname: string }[];
        leftovers.push(...links.map((l) => l.ifname).filter((n) => n !== "lo" && !h.host.labLinks.has(n)).map((n) => `${h.label}:${n}`));
      }
      return leftovers.length === 0;
    }, 5000);
    if (!clean) failures++;
    writeOut(`${clean ? "✔" : "✘"} no device left on any host after rm${clean ? "" : `: ${leftovers.join(", ")}`}\n`);
  } finally {
    await lab.cleanup();
  }
  writeOut(failures === 0 ? `\n${bold("demo --cluster: every check held")}\n` : `\n${bold(`demo --cluster: ${failures} check(s) failed`)}\n`);
  return failures === 0 ? 0 : 1;
}
