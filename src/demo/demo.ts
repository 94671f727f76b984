/**
 * `knit demo`: knit's main job, shown in a private lab. Re-runs itself under
 * scripts/lab-run (a private network + mount namespace) unless already inside one, builds a
 * host on a LAN behind a router with an "internet", and drives the real `knit` CLI on it:
 * two bridge networks, sandboxes on each, traffic inside a network, isolation across
 * networks, masquerade to the internet, names resolved by knit's DNS. Every claim is checked;
 * the exit code says whether all held. `knit demo --cluster` shows overlay networks across
 * three hosts instead (src/demo/cluster.ts).
 */
import { join } from "node:path";
import { stdoutIsTty, writeOut } from "../cli/output.ts";
import { INTERNET, KNIT_BIN, Lab, REPO_ROOT, waitFor, type LabHost } from "../lab/lab.ts";

const bold = (s: string): string => (stdoutIsTty() ? `\x1b[1m${s}\x1b[0m` : s);

/** Run a knit command on the lab host, echoing it and its output. */
async function knit(host: LabHost, args: string[], quiet = false): Promise<string> {
  writeOut(`\n${bold(`$ knit ${args.join(" ")}`)}\n`);
  const r = await host.knitOk(args);
  if (!quiet) writeOut(r.stdout);
  return r.stdout.trim();
}

export async function demoMain(args: readonly string[]): Promise<number> {
  if (process.env.KNIT_LAB !== "1") {
    const proc = Bun.spawn([join(REPO_ROOT, "scripts", "lab-run"), KNIT_BIN, "demo", ...args], { stdio: ["inherit", "inherit", "inherit"] });
    return proc.exited;
  }
  if (args.includes("--cluster")) {
    const { clusterDemo } = await import("./cluster.ts");
    return clusterDemo();
  }
  const lab = await Lab.create("demo");
  let failures = 0;
  const check = async (what: string, expected: boolean, probe: () => Promise<boolean>): Promise<void> => {
    const got = await probe();
    const ok = got === expected;
    if (!ok) failures++;
    writeOut(`${ok ? "✔" : "✘"} ${what}: ${got ? "reachable" : "unreachable"}${ok ? "" : ` (expected ${expected ? "reachable" : "unreachable"})`}\n`);
  };
  try {
    writeOut(bold("knit demo: a host on a LAN, behind a router to a lab \"internet\"; all in private namespaces\n"));
    const lan = await lab.lan("lan");
    const host = await lab.host("host");
    await lab.plug(host, lan, { ifname: "eth0", addresses: ["10.0.0.2/24"] });
    // A plain machine on the same LAN: it reaches the web server only through the published port.
    const laptop = await lab.ns("laptop");
    await lab.plug(laptop, lan, { ifname: "eth0", addresses: ["10.0.0.3/24"] });
    await lab.router("rtr", [{ lan, addresses: ["10.0.0.1/24"] }], { internet: true });
    // The host's resolver, for names knit does not know: a tiny DNS server on the lab's
    // internet (never a real resolver). knit reads it instead of /etc/resolv.conf.
    const resolver = (await lab.internet()).spawn([process.execPath, join(REPO_ROOT, "src", "dns", "stub-server.ts"), "--listen", INTERNET.server4, "--answer", `example.test=${INTERNET.server4}`, "--quiet"]);
    process.env.KNIT_RESOLV_CONF = join(lab.dir, "resolv.conf");
    await Bun.write(process.env.KNIT_RESOLV_CONF, `nameserver ${INTERNET.server4}\n`);
    for (let i = 0; i < 250 && !resolver.output().includes("ready"); i++) await Bun.sleep(20);

    await knit(host, ["network", "create", "--subnet", "10.10.1.0/24", "front"]);
    await knit(host, ["network", "create", "--subnet", "10.10.2.0/24", "--opt", "com.docker.network.bridge.name=br-back", "back"]);
    for (const [name, net] of [["web", "front"], ["api", "front"], ["db", "back"]] as const) {
      await knit(host, ["run", "-d", "--name", name, "--network", net, "--", "sleep", "3600"], true);
    }
    await knit(host, ["ps"]);
    const ipOf = async (name: string): Promise<string> =>
      (await host.knitOk(["inspect", "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", name])).stdout.trim();
    const [api, db] = [await ipOf("api"), await ipOf("db")];
    const ping = (from: string, to: string) => async () => (await host.knit(["exec", from, "--", "ping", "-c1", "-W1", to])).code === 0;

    writeOut(`\n${bold("Traffic (real pings from inside the sandboxes):")}\n`);
    await check(`web -> api ${api} (same network "front")`, true, ping("web", api));
    await check(`web -> db ${db} (network "back": isolated)`, false, ping("web", db));
    await check(`web -> internet ${INTERNET.server4} (masquerade through the host)`, true, ping("web", INTERNET.server4));
    await check(`db -> internet ${INTERNET.server4}`, true, ping("db", INTERNET.server4));

    writeOut(`\n${bold("A published port (knit run -p 8080:80, DNAT in knit's nft table):")}\n`);
    const www = join(lab.dir, "_www");
    await Bun.write(join(www, "index.html"), "hello from a knit sandbox\n");
    await knit(host, ["run", "-d", "--name", "www", "--network", "front", "-p", "8080:80", "--", "busybox", "httpd", "-f", "-p", "80", "-h", www], true);
    await knit(host, ["port", "www"]);
    await check("laptop on the LAN -> http://10.0.0.2:8080/ (the host's LAN address)", true, async () =>
      waitFor(async () => (await lab.httpGet(laptop, "http://10.0.0.2:8080/"))?.includes("hello from a knit sandbox") === true, 5000),
    );
    await check(`laptop on the LAN -> the sandbox's own address ${api} (not published)`, false, async () => lab.ping(laptop, api));

    writeOut(`\n${bold("Names (knit's DNS, served by the knit agent on each user network's gateway):")}\n`);
    await check(`web -> "api" by name (same network)`, true, ping("web", "api"));
    await check(`web -> "db" by name (network "back": the name is not visible)`, false, ping("web", "db"));
    await check(`web -> "example.test" (forwarded to the host's resolver)`, true, ping("web", "example.test"));

    await knit(host, ["network", "ls"]);
    await knit(host, ["network", "inspect", "front"]);

    writeOut(`\n${bold("Cleaning up:")}\n`);
    await knit(host, ["rm", "-f", "web", "api", "db", "www"]);
    await knit(host, ["network", "rm", "front", "back"]);
    const links = (await host.exec(["ip", "-j", "link"])).stdout;
    const leftovers = (JSON.parse(links) as { ifname: string }[]).map((l) => l.ifname).filter((n) => n !== "lo" && !host.labLinks.has(n));
    const clean = leftovers.length === 0;
    if (!clean) failures++;
    writeOut(`${clean ? "✔" : "✘"} nothing left on the host after rm${clean ? "" : `: ${leftovers.join(", ")}`}\n`);
  } finally {
    await lab.cleanup();
  }
  writeOut(failures === 0 ? `\n${bold("demo: every check held")}\n` : `\n${bold(`demo: ${failures} check(s) failed`)}\n`);
  return failures === 0 ? 0 : 1;
}
