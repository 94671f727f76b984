// The lab itself: hosts on a LAN reach each other, a router takes them to the internet, the
// helpers work, and cleanup leaves nothing behind.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { existsSync, readdirSync } from "node:fs";
import { INTERNET, Lab, type LabHost, type LabLan, NETNS_DIR, processCommand, processesInNetns, waitFor } from "../src/lab/lab.ts";
import { assertNoLeaks, findLeaks } from "./leaks.ts";

function netnsNames(): string[] {
  return existsSync(NETNS_DIR) ? readdirSync(NETNS_DIR) : [];
}

describe("lab", () => {
  let lab: Lab;
  let lan: LabLan;
  let h1: LabHost;
  let h2: LabHost;

  beforeAll(async () => {
    lab = await Lab.create();
    lan = await lab.lan("lan");
    h1 = await lab.host("h1");
    h2 = await lab.host("h2");
    await lab.plug(h1, lan, { ifname: "eth0", addresses: ["192.168.50.11/24", "fd00:50::11/64"] });
    await lab.plug(h2, lan, { ifname: "eth0", addresses: ["192.168.50.12/24", "fd00:50::12/64"], mtu: 1400 });
  });

  afterAll(async () => {
    expect(await lab.cleanup()).toEqual([]);
  });

  test("runs inside a private lab", () => {
    expect(process.env["KNIT_LAB"]).toBe("1");
    expect(lab.id).toMatch(/^l[0-9a-f]{4}$/);
    expect(h1.name).toBe(`${lab.id}-h1`);
  });

  test("two hosts on a LAN ping each other over IPv4 and IPv6", async () => {
    expect(await h1.waitPing("192.168.50.12")).toBe(true);
    expect(await h2.waitPing("192.168.50.11")).toBe(true);
    expect(await h1.waitPing("fd00:50::12")).toBe(true);
    expect(await h1.ping("192.168.50.99")).toBe(false);
  });

  test("plug applies the MTU and the interface is in the host only", async () => {
    const links = JSON.parse((await h2.exec(["ip", "-j", "link", "show", "eth0"])).stdout) as { mtu: number }[];
    expect(links[0]?.mtu).toBe(1400);
    const root = JSON.parse((await lab.run(["ip", "-j", "link"])).stdout) as { ifname: string }[];
    expect(root.map((l) => l.ifname)).toEqual(["lo"]);
  });

  test("a host reaches the internet through a router, and the internet answers", async () => {
    const r = await lab.router("r1", [{ lan, addresses: ["192.168.50.1/24", "fd00:50::1/64"] }], { internet: true });
    expect(r.uplink?.addresses).toEqual(["203.0.113.2/24", "2001:db8:ffff::2/64"]);
    // h1 and h2 were plugged before the router existed: they got default routes anyway.
    expect(await h1.waitPing(INTERNET.server4)).toBe(true);
    expect(await h2.waitPing(INTERNET.server6)).toBe(true);
    const inet = await lab.internet();
    expect(await inet.waitPing("192.168.50.11")).toBe(true);
    // A host plugged in after the router gets its default route too.
    const h3 = await lab.host("h3");
    await lab.plug(h3, lan, { addresses: ["192.168.50.13/24"] });
    expect(await lab.waitPing(h3, INTERNET.server4)).toBe(true);
    const routes = JSON.parse((await h3.exec(["ip", "-j", "route", "show", "default"])).stdout) as { gateway: string }[];
    expect(routes[0]?.gateway).toBe("192.168.50.1");
  });

  test("a NAT router hides its LAN behind its uplink address", async () => {
    const lan2 = await lab.lan("lan2");
    await lab.router("r2", [{ lan: lan2, addresses: ["10.77.0.1/24"] }], { internet: true, nat: true });
    const h4 = await lab.host("h4");
    await lab.plug(h4, lan2, { addresses: ["10.77.0.4/24"] });
    const inet = await lab.internet();
    const server = await lab.tcpEchoServer(inet, 7000);
    expect(await lab.tcpSend(h4, INTERNET.server4, 7000, "via nat\n")).toBe("via nat\n");
    // No route back to 10.77.0.0/24 exists in the internet: only NAT makes this work.
    expect(await inet.ping("10.77.0.4")).toBe(false);
    await server.stop();
  });

  test("TCP echo and HTTP helpers work across the LAN, over IPv4 and IPv6", async () => {
    const echo = await lab.tcpEchoServer(h2, 5000);
    expect(await lab.tcpSend(h1, "192.168.50.12", 5000, "hello\n")).toBe("hello\n");
    expect(await lab.tcpSend(h1, "fd00:50::12", 5000, "six\n")).toBe("six\n");
    expect(await lab.tcpSend(h1, "192.168.50.12", 5001, "nobody\n", 1)).toBeUndefined();
    const web = await lab.httpServer(h1, 8080, "it works\n");
    expect(await lab.httpGet(h2, "http://192.168.50.11:8080/")).toBe("it works\n");
    expect(web.running).toBe(true);
    await echo.stop();
    await web.stop();
    expect(web.running).toBe(false);
  });

  test("spawn tracks processes by PID and captures their output", async () => {
    const p = h1.spawn(["sh", "-c", "echo started; echo oops >&2; exec sleep 60"]);
    expect(lab.pids).toContain(p.pid);
    expect(await waitFor(() => processesInNetns(h1.path).includes(p.pid) && p.output().includes("oops"))).toBe(true);
    expect(p.output()).toContain("started");
    expect(p.output()).toContain("oops");
    expect(await p.stop()).toBe(128 + 15);
    expect(lab.pids).not.toContain(p.pid);
  });

  test("exec throws with the command's output, unless check is false", async () => {
    const bad = h1.exec(["ip", "link", "show", "nosuchlink"]);
    // eslint-disable-next-line @typescript-eslint/await-thenable -- expect(...).rejects is a promise
    await expect(bad).rejects.toThrow(/nosuchlink.*failed \(exit 1\)/s);
    const r = await h1.exec(["sh", "-c", "echo out; echo err >&2; exit 3"], { check: false });
    expect(r).toEqual({ code: 3, stdout: "out\n", stderr: "err\n" });
    const t = await h1.exec(["sleep", "5"], { check: false, timeoutMs: 200 });
    expect(t.code).toBe(128 + 9);
  });

  test("knit runs inside the host with its own state directory", async () => {
    const r = await lab.exec(h1, ["sh", "-c", "echo $KNIT_STATE_DIR; ip -o link show eth0"], { env: h1.knitEnv() });
    expect(r.stdout).toContain(h1.stateDir);
    expect(r.stdout).toContain("eth0");
  });

  test("the leak check is clean on an untouched host and sees what a test leaves", async () => {
    await assertNoLeaks(h1);
    await h1.exec(["ip", "link", "add", "knit-br9", "type", "bridge"]);
    await h1.exec(["nft", "add", "table", "inet", "knit"]);
    await lab.run(["ip", "netns", "add", "knit-leak"]);
    const tracked = h1.spawn(["sleep", "60"]);
    const stray = Bun.spawn(["nsenter", `--net=${h1.path}`, "--", "sleep", "60"], { stdio: ["ignore", "ignore", "ignore"] });
    expect(await waitFor(() => processesInNetns(h1.path).includes(stray.pid) && processCommand(stray.pid) === "sleep 60")).toBe(true);
    const problems = await findLeaks(h1, { extra: () => ["store has 1 network"] });
    expect(problems).toEqual([
      "link knit-br9 (bridge) left in " + h1.name,
      `nft table inet knit left in ${h1.name}`,
      `named namespace ${NETNS_DIR}/knit-leak left`,
      `process ${stray.pid} (sleep 60) still runs in ${h1.name}`,
      "store has 1 network",
    ]);
    stray.kill();
    await stray.exited;
    await tracked.stop();
    await h1.exec(["ip", "link", "del", "knit-br9"]);
    await h1.exec(["nft", "delete", "table", "inet", "knit"]);
    await lab.run(["ip", "netns", "del", "knit-leak"]);
    await assertNoLeaks(h1);
  });
});

describe("lab cleanup", () => {
  test("removes every namespace, process and directory, and is idempotent", async () => {
    const before = netnsNames();
    const lab = await Lab.create();
    const lan = await lab.lan("lan");
    const a = await lab.host("a");
    const b = await lab.ns("b");
    await lab.plug(a, lan, { addresses: ["10.9.0.1/24"] });
    await lab.plug(b, lan, { addresses: ["10.9.0.2/24"] });
    await lab.router("r", [{ lan, addresses: ["10.9.0.254/24"] }], { internet: true });
    const p = a.spawn(["sleep", "300"]);
    // A process the lab did not spawn itself (as a daemon's child would be).
    const orphan = Bun.spawn(["nsenter", `--net=${b.path}`, "--", "sleep", "300"], { stdio: ["ignore", "ignore", "ignore"] });
    // Wait until nsenter has entered the namespace and exec'd sleep.
    expect(await waitFor(() => processesInNetns(b.path).includes(orphan.pid) && processCommand(orphan.pid) === "sleep 300")).toBe(true);
    expect(netnsNames().filter((n) => n.startsWith(`${lab.id}-`)).sort()).toEqual(
      ["a", "b", "inet", "lan", "r"].map((n) => `${lab.id}-${n}`),
    );
    expect(existsSync(a.stateDir)).toBe(true);
    const strays = await lab.cleanup();
    expect(strays).toEqual([`${orphan.pid} (sleep 300) in ${b.name}`]);
    expect(netnsNames()).toEqual(before);
    expect(existsSync(lab.dir)).toBe(false);
    expect(await p.exited).toBe(128 + 15);
    expect(await orphan.exited).toBe(128 + 9);
    expect(await lab.cleanup()).toEqual([]);
    // eslint-disable-next-line @typescript-eslint/await-thenable -- expect(...).rejects is a promise
    await expect(lab.host("late")).rejects.toThrow(/cleaned up/);
  });

  test("labs made at the same time never share a name", async () => {
    const labs = await Promise.all([Lab.create(), Lab.create(), Lab.create()]);
    try {
      expect(new Set(labs.map((l) => l.id)).size).toBe(3);
      await Promise.all(labs.map((l) => l.host("h")));
    } finally {
      await Promise.all(labs.map((l) => l.cleanup()));
    }
  });

  test("bad names are refused before anything is made", async () => {
    const lab = await Lab.create();
    try {
      // eslint-disable-next-line @typescript-eslint/await-thenable -- expect(...).rejects is a promise
      await expect(lab.host("has space")).rejects.toThrow(/lab name/);
      const lan = await lab.lan("lan");
      const h = await lab.host("h");
      // eslint-disable-next-line @typescript-eslint/await-thenable -- expect(...).rejects is a promise
      await expect(lab.plug(h, lan, { ifname: "a-very-long-interface-name" })).rejects.toThrow(/interface name/);
      // eslint-disable-next-line @typescript-eslint/await-thenable -- expect(...).rejects is a promise
      await expect(lab.plug(h, lan, { addresses: ["10.0.0.1"] })).rejects.toThrow(/invalid/);
      await assertNoLeaks(h);
    } finally {
      await lab.cleanup();
    }
  });
});
