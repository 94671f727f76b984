// A real dockerd in a lab host: starts, runs a container from the busybox image, stops
// without leaving processes, cgroups or mounts behind.
import { afterAll, describe, expect, test } from "bun:test";
import { existsSync } from "node:fs";
import { Lab } from "../src/lab/lab.ts";
import { type DockerDaemon, dockerMissing, startDocker } from "../src/lab/docker.ts";
import { assertNoLeaks } from "./leaks.ts";

const missing = dockerMissing();
const title = missing ? `docker in the lab (skipped: ${missing})` : "docker in the lab";

describe.skipIf(missing !== undefined)(title, () => {
  let lab: Lab | undefined;

  afterAll(async () => {
    await lab?.cleanup();
  });

  test("dockerd starts in a lab host, runs a busybox container and stops cleanly", async () => {
    lab = await Lab.create();
    const host = await lab.host("dk");
    let daemon: DockerDaemon | undefined = await startDocker(host);
    console.log(`dockerd answered after ${daemon.startMs.toFixed(0)} ms`);

    expect(await daemon.ensureBusyboxImage()).toBe("bb");
    const run = await daemon.dockerOk(["run", "--rm", "bb", "echo", "hi"]);
    expect(run.stdout).toBe("hi\n");

    // dockerd made docker0 and its iptables rules in the lab host, not on this machine.
    const links = JSON.parse((await host.exec(["ip", "-j", "link", "show", "docker0"])).stdout) as { ifname: string }[];
    expect(links[0]?.ifname).toBe("docker0");
    const nat = await host.exec(["iptables", "-t", "nat", "-S", "POSTROUTING"]);
    expect(nat.stdout).toContain("172.17.0.0/16");

    // A container on the default bridge reaches the host's docker0 address.
    const ping = await daemon.docker(["run", "--rm", "bb", "ping", "-c1", "-W2", "172.17.0.1"]);
    expect(ping.code).toBe(0);

    const { pid, cgroupParent } = daemon;
    await daemon.stop();
    expect(existsSync(`/proc/${pid}`)).toBe(false);
    expect(existsSync(`/sys/fs/cgroup/pids/${cgroupParent}`)).toBe(false);
    expect(existsSync(`/sys/fs/cgroup/memory/${cgroupParent}`)).toBe(false);
    daemon = undefined;
    // docker0 stays after dockerd exits (as on any machine); nothing else may.
    await assertNoLeaks(host, { allowLinks: ["docker0"] });
  }, 180_000);
});
