/**
 * podman 4.3 (Debian) with its CNI backend running busybox containers on a knit conflist:
 * the real client, with libcni inside it.
 *
 *   lan ─┬─ h       knit host 192.168.62.2: knit network "front" 10.98.0.0/24; podman runs
 *        │          here (nsenter), with a private containers.conf, CNI config dir, storage
 *        └─ client  192.168.62.10
 *
 * podman is kept private: --root/--runroot and its tmp dir under the lab directory, and
 * tmpfs mounts (in the lab's own mount namespace) over the directories it would otherwise
 * write on the machine (/var/lib/cni, /run/libpod, /run/runc, /run/containers,
 * /var/lib/containers). The image is imported from busybox-static. cgroups cannot be kept
 * private (runc needs them): the empty `libpod_parent` cgroups podman leaves behind are
 * removed again when this test made them.
 */
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { copyFileSync, existsSync, mkdirSync, readdirSync, rmdirSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { Lab, type ExecResult, type LabHost, type LabNode } from "../src/lab/lab.ts";
import { assertHostClean } from "./leaks.ts";
import { endpointClaims, installCni, links, storeKeys } from "./cni-lab.ts";

setDefaultTimeout(180_000);

const PRIVATE_DIRS = ["/var/lib/cni", "/run/libpod", "/run/runc", "/run/containers", "/var/lib/containers", "/run/crun"];

let lab: Lab;
let h: LabHost;
let client: LabNode;
let dir: string;
const mounted: string[] = [];

/** podman's parent cgroups (cgroupfs manager), in every hierarchy that has one. */
function podmanCgroups(): string[] {
  const root = "/sys/fs/cgroup";
  let controllers: string[] = [];
  try {
    controllers = readdirSync(root);
  } catch {
    return [];
  }
  return [root, ...controllers.map((c) => join(root, c))].map((d) => join(d, "libpod_parent")).filter((d) => existsSync(d));
}
let cgroupsBefore = true;

function rmdirQuiet(path: string): void {
  try {
    rmdirSync(path);
  } catch {
    // busy (in use) or gone
  }
}

/** podman inside the host, with the private configuration. */
function podman(args: readonly string[], check = true): Promise<ExecResult> {
  return lab.exec(h, ["podman", "--root", join(dir, "root"), "--runroot", join(dir, "runroot"), "--storage-driver", "vfs", ...args], {
    env: h.knitEnv({ CONTAINERS_CONF: join(dir, "containers.conf") }),
    check,
    timeoutMs: 120_000,
  });
}

/** A container's address on a podman network, from podman itself. */
async function podmanIp(name: string, network: string): Promise<string> {
  const r = await podman(["inspect", "--format", `{{(index .NetworkSettings.Networks "${network}").IPAddress}}`, name]);
  return r.stdout.trim();
}

beforeAll(async () => {
  cgroupsBefore = podmanCgroups().length > 0;
  lab = await Lab.create("cnip");
  dir = join(lab.dir, "_podman");
  for (const d of PRIVATE_DIRS) {
    mkdirSync(d, { recursive: true });
    await lab.run(["mount", "-t", "tmpfs", "knit-podman-test", d]);
    mounted.push(d);
  }
  const lan = await lab.lan("lan");
  h = await lab.host("h");
  client = await lab.ns("client");
  await lab.plug(h, lan, { addresses: ["192.168.62.2/24"] });
  await lab.plug(client, lan, { addresses: ["192.168.62.10/24"] });
  const binDir = await installCni(lab, h);
  await h.knitOk(["network", "create", "--subnet", "10.98.0.0/24", "front"]);

  const cniDir = join(dir, "cni");
  mkdirSync(cniDir, { recursive: true });
  writeFileSync(
    join(dir, "containers.conf"),
    [
      "[containers]",
      "default_ulimits = []",
      "[network]",
      'network_backend = "cni"',
      `cni_plugin_dirs = ["${binDir}", "/usr/lib/cni"]`,
      `network_config_dir = "${cniDir}"`,
      "[engine]",
      'cgroup_manager = "cgroupfs"',
      'events_logger = "file"',
      `events_logfile_path = "${join(dir, "events.log")}"`,
      `tmp_dir = "${join(dir, "tmp")}"`,
      "",
    ].join("\n"),
  );
  // podman 4.3's libcni reads results up to 1.0.0.
  writeFileSync(
    join(cniDir, "knitnet.conflist"),
    JSON.stringify({
      cniVersion: "1.0.0",
      name: "knitnet",
      plugins: [
        // State dir and host name in the conflist: podman's cleanup process (run by conmon when
        // a container stops, and doing the DEL) does not have podman's environment.
        { type: "knit", network: "front", stateDir: h.stateDir, host: h.knitEnv().KNIT_HOST, capabilities: { ips: true, mac: true, aliases: true, dns: true } },
        { type: "knit-portmap", stateDir: h.stateDir, host: h.knitEnv().KNIT_HOST, capabilities: { portMappings: true } },
      ],
    }),
  );
  // A busybox image: the static binary and the applets the tests use.
  const rootfs = join(dir, "rootfs");
  mkdirSync(join(rootfs, "bin"), { recursive: true });
  mkdirSync(join(rootfs, "www"), { recursive: true });
  mkdirSync(join(rootfs, "etc"), { recursive: true });
  copyFileSync("/bin/busybox", join(rootfs, "bin", "busybox"));
  for (const applet of ["sh", "sleep", "httpd", "ping", "cat", "ip", "wget", "nslookup"]) symlinkSync("busybox", join(rootfs, "bin", applet));
  writeFileSync(join(rootfs, "www", "index.html"), "served by podman on a knit network\n");
  await lab.run(["sh", "-c", `tar -C '${rootfs}' -c . | podman --root '${join(dir, "root")}' --runroot '${join(dir, "runroot")}' --storage-driver vfs import - knit-bb`], {
    env: { CONTAINERS_CONF: join(dir, "containers.conf") },
    timeoutMs: 120_000,
  });
});

afterAll(async () => {
  if (h) {
    await podman(["rm", "-f", "-a"], false);
    await h.knit(["rm", "-f", "sbx"]);
    await h.knit(["agent", "stop"]);
    await h.knit(["network", "rm", "front"]);
  }
  for (const d of mounted.reverse()) await lab.run(["umount", "-l", d], { check: false });
  await lab?.cleanup();
  // Empty cgroups only: rmdir fails on one that holds a process (podman running elsewhere).
  if (!cgroupsBefore) {
    for (const d of podmanCgroups()) {
      for (const child of [...readdirSync(d, { withFileTypes: true })].filter((e) => e.isDirectory())) rmdirQuiet(join(d, child.name));
      rmdirQuiet(d);
    }
  }
});

describe("podman on a knit network", () => {
  test("containers ping each other and a knit sandbox, resolve names through knit's agent, publish a port to the LAN; podman rm leaves nothing", async () => {
    await podman(["run", "-d", "--name", "web", "--network", "knitnet", "-p", "8080:80", "knit-bb", "httpd", "-f", "-p", "80", "-h", "/www"]);
    await podman(["run", "-d", "--name", "pinger", "--network", "knitnet", "knit-bb", "sleep", "600"]);
    await h.knitOk(["run", "-d", "--name", "sbx", "--network", "front", "--", "sleep", "600"]);
    const web = await podmanIp("web", "knitnet");
    const pinger = await podmanIp("pinger", "knitnet");
    expect(web).toMatch(/^10\.98\.0\.\d+$/);
    expect(pinger).toMatch(/^10\.98\.0\.\d+$/);

    // One network: knit shows podman's containers under their names, next to its sandbox.
    const view = JSON.parse((await h.knitOk(["network", "inspect", "front"])).stdout) as { Containers: Record<string, { Name: string; IPv4Address: string }> }[];
    const members = Object.values(view[0]?.Containers ?? {});
    expect(members.map((m) => m.Name).sort()).toEqual(["pinger", "sbx", "web"]);
    expect(members.find((m) => m.Name === "web")?.IPv4Address).toBe(`${web}/24`);
    const sbx = members.find((m) => m.Name === "sbx")?.IPv4Address.split("/")[0] ?? "";

    // Traffic: container to container, container to sandbox, sandbox to container.
    expect((await podman(["exec", "pinger", "ping", "-c1", "-W2", web], false)).code).toBe(0);
    expect((await podman(["exec", "pinger", "ping", "-c1", "-W2", sbx], false)).code).toBe(0);
    expect((await h.knit(["exec", "sbx", "--", "ping", "-c1", "-W2", pinger])).code).toBe(0);

    // Names, through the agent that the first ADD started.
    // podman writes the result's DNS server (knit's, on the gateway) into resolv.conf.
    expect((await podman(["exec", "pinger", "cat", "/etc/resolv.conf"])).stdout).toMatch(/^nameserver 10\.98\.0\.1$/m);
    expect((await podman(["exec", "pinger", "nslookup", "web"], false)).stdout).toContain(`Address: ${web}`);
    expect((await podman(["exec", "pinger", "nslookup", "sbx"], false)).stdout).toContain(`Address: ${sbx}`);
    expect((await h.knitOk(["exec", "sbx", "--", "dig", "+short", "@10.98.0.1", "pinger"])).stdout.trim()).toBe(pinger);

    // The published port, from a machine on the LAN.
    expect(await lab.httpGet(client, "http://192.168.62.2:8080/")).toBe("served by podman on a knit network\n");

    // podman rm: DEL through both plugins; nothing of the containers is left.
    await podman(["rm", "-f", "web", "pinger"]);
    await h.knitOk(["rm", "-f", "sbx"]);
    expect(await lab.httpGet(client, "http://192.168.62.2:8080/", 1)).toBeUndefined();
    expect(Object.keys(await storeKeys(h, "sandboxes/"))).toEqual([]);
    expect(Object.keys(await storeKeys(h, "ports/"))).toEqual([]);
    expect(await endpointClaims(h)).toEqual([]);
    expect((await links(lab, h)).filter((l) => l.ifname.startsWith("veth")).map((l) => l.ifname)).toEqual([]);
    expect((await h.exec(["nft", "list", "table", "inet", "knit"])).stdout).not.toContain("dport 8080");
  });

  test("the host is clean once the network is removed", async () => {
    await h.knit(["agent", "stop"]);
    await h.knitOk(["network", "rm", "front"]);
    await assertHostClean(h);
    await h.knitOk(["network", "create", "--subnet", "10.98.0.0/24", "front"]);
  });
});
