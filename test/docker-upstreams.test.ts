/**
 * Which servers dockerd forwards a container's unknown names to (pure logic over files): the
 * Join of an internal network routes exactly those through knit's DNS address.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { dockerUpstreams, internalDnsRoutes } from "../src/plugin/dns-redirect.ts";
import type { Network } from "../src/model.ts";

const dir = mkdtempSync(join(tmpdir(), "knit-upstreams-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
let n = 0;
function file(text: string): string {
  const p = join(dir, `resolv${n++}.conf`);
  writeFileSync(p, text);
  return p;
}
const missing = join(dir, "missing.conf");

describe("dockerUpstreams", () => {
  test("the host's servers, loopback ones left out, per family", () => {
    const etc = file("nameserver 127.0.0.1\nnameserver 10.1.2.3\nnameserver fd00::53\nnameserver ::1\nsearch lan\n");
    expect(dockerUpstreams(4, etc, missing)).toEqual(["10.1.2.3"]);
    expect(dockerUpstreams(6, etc, missing)).toEqual(["fd00::53"]);
  });
  test("systemd-resolved's stub alone: its upstream file", () => {
    const etc = file("nameserver 127.0.0.53\noptions edns0 trust-ad\n");
    expect(dockerUpstreams(4, etc, file("nameserver 192.0.2.53\nnameserver 192.0.2.54\n"))).toEqual(["192.0.2.53", "192.0.2.54"]);
  });
  test("nothing usable: Docker's defaults (IPv6 ones for IPv6 only)", () => {
    expect(dockerUpstreams(4, file("nameserver 127.0.0.1\n"), missing)).toEqual(["8.8.8.8", "8.8.4.4"]);
    expect(dockerUpstreams(4, missing, missing)).toEqual(["8.8.8.8", "8.8.4.4"]);
    expect(dockerUpstreams(6, missing, missing)).toEqual(["2001:4860:4860::8888", "2001:4860:4860::8844"]);
  });
});

describe("internalDnsRoutes", () => {
  const base: Network = {
    id: "a".repeat(64),
    name: "n",
    driver: "bridge",
    subnets: [{ subnet: "10.65.0.0/24", gateway: "10.65.0.1" }],
    internal: true,
    state: "ready",
  } as unknown as Network;
  test("none on networks with a way out, and on predefined ones", () => {
    expect(internalDnsRoutes({ ...base, internal: false }, { v4: true, v6: false })).toEqual([]);
    expect(internalDnsRoutes({ ...base, predefined: true } as Network, { v4: true, v6: false })).toEqual([]);
  });
  test("an internal bridge: each upstream through the gateway; an internal overlay: through 169.254.53.53 on the link", () => {
    const bridge = internalDnsRoutes(base, { v4: true, v6: false });
    expect(bridge.length).toBeGreaterThan(0);
    for (const r of bridge) expect(r).toMatchObject({ RouteType: 0, NextHop: "10.65.0.1" });
    const overlay = internalDnsRoutes({ ...base, driver: "overlay" }, { v4: true, v6: false });
    expect(overlay[0]).toEqual({ Destination: "169.254.53.53/32", RouteType: 1, NextHop: "" });
    expect(overlay.slice(1).map((r) => r.NextHop)).toEqual(bridge.map(() => "169.254.53.53"));
    expect(internalDnsRoutes({ ...base, driver: "overlay" }, { v4: false, v6: true })).toEqual([]);
  });
});
