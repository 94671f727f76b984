/**
 * Pure address arithmetic and the rules that turn `network create` flags into IPAM config:
 * src/net/ip.ts (parse/format, RFC 5952 compression), src/engine/network-spec.ts (pairing
 * gateways, ranges and aux addresses with subnets) and src/ipam/pools.ts (Docker's default
 * pool order). No kernel, no store.
 */
import { describe, expect, test } from "bun:test";
import { KnitError } from "../src/errors.ts";
import { cidrContains, cidrCovers, cidrOverlaps, formatCidr, formatIp, parseCidr, parseIp, splitCidr, tryParseIp, type Cidr } from "../src/net/ip.ts";
import { buildSubnetConfigs, parseAuxAddresses, type IpamRequest } from "../src/engine/network-spec.ts";
import { defaultV4Candidates, pickV4Pool, pickV6Pool } from "../src/ipam/pools.ts";

/** The KnitError a call throws (fails the test when it does not throw one). */
function failure(fn: () => unknown, what = "the call"): KnitError {
  try {
    fn();
  } catch (err) {
    if (err instanceof KnitError) return err;
    throw err;
  }
  throw new Error(`expected a KnitError, but ${what} succeeded`);
}

describe("ip: parse and format", () => {
  test("IPv4 round trips and refuses what Docker (Go) refuses", () => {
    for (const s of ["0.0.0.0", "10.0.0.1", "192.168.255.254", "255.255.255.255"]) expect(formatIp(parseIp(s))).toBe(s);
    expect(parseIp("10.1.2.3").value).toBe(0x0a010203n);
    for (const bad of ["1.2.3", "1.2.3.4.5", "256.0.0.1", "01.2.3.4", "1.2.3.-4", "+1.2.3.4", "a.b.c.d", "", "1..2.3", "1.2.3.4/24"]) {
      expect(tryParseIp(bad)).toBeUndefined();
    }
    expect(failure(() => parseIp("notanip", "--ip")).message).toBe('invalid --ip "notanip": not an IPv4 or IPv6 address');
    expect(failure(() => parseIp("1.2.3")).code).toBe("invalid-argument");
  });

  test("IPv6 is printed in RFC 5952 form", () => {
    const cases: [string, string][] = [
      ["0:0:0:0:0:0:0:0", "::"],
      ["0:0:0:0:0:0:0:1", "::1"],
      ["1:0:0:0:0:0:0:0", "1::"],
      ["2001:DB8:0:0:0:0:0:1", "2001:db8::1"],
      // The longest run of zero groups is compressed...
      ["2001:db8:0:0:1:0:0:0", "2001:db8:0:0:1::"],
      // ...the first one when two runs tie...
      ["2001:db8:0:0:1:0:0:1", "2001:db8::1:0:0:1"],
      // ...and a single zero group never is.
      ["2001:db8:0:1:1:1:1:1", "2001:db8:0:1:1:1:1:1"],
      ["2001:0db8:0000:0000:0000:0000:0002:0001", "2001:db8::2:1"],
      ["fe80::0001", "fe80::1"],
      ["1:2:3:4:5:6:7:8", "1:2:3:4:5:6:7:8"],
      ["1:2:3:4:5:6:7::", "1:2:3:4:5:6:7:0"],
      ["::2:3:4:5:6:7:8", "0:2:3:4:5:6:7:8"],
      ["fd00:0:0:1::", "fd00:0:0:1::"],
      ["::ffff:10.1.2.3", "::ffff:a01:203"],
      ["64:ff9b::192.0.2.33", "64:ff9b::c000:221"],
    ];
    for (const [input, canonical] of cases) {
      const ip = parseIp(input);
      expect(ip.family).toBe(6);
      expect(formatIp(ip)).toBe(canonical);
      // Printing is a fixed point: the canonical text parses back to the same value.
      expect(parseIp(canonical).value).toBe(ip.value);
    }
  });

  test("IPv6 refuses malformed text", () => {
    for (const bad of [
      ":",
      ":::",
      "1::2::3",
      "1:2:3:4:5:6:7:8:9",
      "1:2:3:4:5:6:7",
      "::1:2:3:4:5:6:7:8",
      "12345::1",
      "g::1",
      ":1::",
      "1::2:",
      "fe80::1%eth0",
      "1:2:3:4:5:6:7:1.2.3.4",
      "::1.2.3",
      "::1.2.3.4:5",
      "1.2.3.4::",
    ]) {
      expect(tryParseIp(bad)).toBeUndefined();
    }
  });

  test("random addresses round trip in both families", () => {
    for (let i = 0; i < 500; i++) {
      const bytes = crypto.getRandomValues(new Uint8Array(16));
      // Zero some groups so that compression paths are exercised.
      for (let g = 0; g < 8; g++) if (bytes[g] !== undefined && bytes[g]! < 96) bytes.fill(0, g * 2, g * 2 + 2);
      let value = 0n;
      for (const b of bytes) value = (value << 8n) | BigInt(b);
      const text = formatIp({ family: 6, value });
      expect(text).not.toMatch(/:::|(^|:)0[0-9a-f]|[A-F]/);
      expect(text.split("::").length).toBeLessThanOrEqual(2);
      expect(parseIp(text).value).toBe(value);
      const v4 = value & 0xffffffffn;
      expect(parseIp(formatIp({ family: 4, value: v4 })).value).toBe(v4);
    }
  });

  test("CIDR parsing: prefix bounds, host bits, canonical output", () => {
    expect(formatCidr(parseCidr("10.1.0.0/16"))).toBe("10.1.0.0/16");
    expect(formatCidr(parseCidr("2001:DB8:0:0::/32"))).toBe("2001:db8::/32");
    expect(formatCidr(parseCidr("0.0.0.0/0"))).toBe("0.0.0.0/0");
    expect(formatCidr(parseCidr("::/0"))).toBe("::/0");
    expect(formatCidr(parseCidr("10.1.2.3/32"))).toBe("10.1.2.3/32");
    expect(failure(() => parseCidr("10.0.0.0/33")).message).toContain('invalid subnet "10.0.0.0/33"');
    expect(failure(() => parseCidr("fd00::/129")).message).toContain("invalid subnet");
    const hostBits = failure(() => parseCidr("10.0.0.1/24"));
    expect(hostBits.message).toBe('invalid subnet "10.0.0.1/24": host bits are set');
    expect(hostBits.hint).toBe("use 10.0.0.0/24");
    expect(failure(() => parseCidr("fd00::1/64")).hint).toBe("use fd00::/64");
    // Non-strict parsing masks host bits off (routes, addresses with their prefix).
    expect(formatCidr(parseCidr("10.0.0.1/24", "route", false))).toBe("10.0.0.0/24");
    for (const bad of ["abc", "10.0.0.0", "10.0.0.0/", "/24", "10.0.0.0/-1", "10.0.0.0/24/1", "10.0.0.0/ 24", "10.0.0.0/1e1"]) {
      expect(failure(() => parseCidr(bad)).message).toMatch(/^invalid subnet ".*": expected ADDRESS\/LENGTH/);
    }
  });

  test("containment, coverage, overlap and splitting", () => {
    const net = parseCidr("10.1.0.0/16");
    expect(cidrContains(net, parseIp("10.1.255.255"))).toBe(true);
    expect(cidrContains(net, parseIp("10.2.0.0"))).toBe(false);
    expect(cidrContains(net, parseIp("::a01:1"))).toBe(false); // other family, same bits
    expect(cidrCovers(net, parseCidr("10.1.4.0/24"))).toBe(true);
    expect(cidrCovers(parseCidr("10.1.4.0/24"), net)).toBe(false);
    expect(cidrOverlaps(parseCidr("10.1.4.0/24"), net)).toBe(true);
    expect(cidrOverlaps(net, parseCidr("10.1.4.0/24"))).toBe(true);
    expect(cidrOverlaps(parseCidr("10.0.0.0/16"), net)).toBe(false);
    expect(cidrOverlaps(parseCidr("0.0.0.0/0"), parseCidr("::/0"))).toBe(false);
    const parts = [...splitCidr(parseCidr("192.168.0.0/22"), 24)].map(formatCidr);
    expect(parts).toEqual(["192.168.0.0/24", "192.168.1.0/24", "192.168.2.0/24", "192.168.3.0/24"]);
  });
});

describe("network-spec: buildSubnetConfigs", () => {
  const req = (r: Partial<IpamRequest>): IpamRequest => ({ subnets: [], gateways: [], ipRanges: [], auxAddresses: {}, ipv6: false, ...r });

  test("gateways, ranges and aux addresses pair with the subnet that holds them, in any order", () => {
    const configs = buildSubnetConfigs(
      req({
        subnets: ["10.5.0.0/16", "fd00:5::/64", "10.6.0.0/24"],
        gateways: ["fd00:5::fe", "10.6.0.254", "10.5.0.9"],
        ipRanges: ["10.6.0.128/25", "10.5.8.0/21"],
        auxAddresses: { router: "10.5.0.2", v6host: "fd00:5::2" },
        ipv6: true,
      }),
    );
    expect(configs).toEqual([
      { subnet: "10.5.0.0/16", gateway: "10.5.0.9", ipRange: "10.5.8.0/21", auxAddresses: { router: "10.5.0.2" } },
      { subnet: "fd00:5::/64", gateway: "fd00:5::fe", auxAddresses: { v6host: "fd00:5::2" } },
      { subnet: "10.6.0.0/24", gateway: "10.6.0.254", ipRange: "10.6.0.128/25", auxAddresses: {} },
    ]);
  });

  test("a subnet without --gateway gets its first address; text is canonicalised", () => {
    const configs = buildSubnetConfigs(req({ subnets: ["10.7.0.0/24", "FD00:7:0:0::/64"], gateways: ["FD00:7::0:1"], ipv6: true }));
    expect(configs).toEqual([
      { subnet: "10.7.0.0/24", gateway: "10.7.0.1", auxAddresses: {} },
      { subnet: "fd00:7::/64", gateway: "fd00:7::1", auxAddresses: {} },
    ]);
    expect(buildSubnetConfigs(req({}))).toEqual([]);
  });

  test("refuses what Docker refuses, naming the offending value", () => {
    const cases: [Partial<IpamRequest>, RegExp][] = [
      [{ subnets: ["10.8.0.0/24"], gateways: ["10.9.0.1"] }, /no matching subnet for gateway 10\.9\.0\.1/],
      [{ subnets: ["10.8.0.0/24"], gateways: ["10.8.0.1", "10.8.0.2"] }, /cannot configure multiple gateways \(10\.8\.0\.1, 10\.8\.0\.2\) for the same subnet \(10\.8\.0\.0\/24\)/],
      [{ subnets: ["10.8.0.0/24"], gateways: ["10.8.0.0"] }, /invalid gateway 10\.8\.0\.0: it is the network address/],
      [{ subnets: ["10.8.0.0/24"], gateways: ["10.8.0.255"] }, /invalid gateway 10\.8\.0\.255: it is the broadcast address/],
      [{ subnets: ["10.8.0.0/24"], gateways: ["10.8.0.1/24"] }, /invalid gateway "10\.8\.0\.1\/24"/],
      [{ subnets: ["10.8.0.0/24"], ipRanges: ["10.8.1.0/25"] }, /no matching subnet for ip-range 10\.8\.1\.0\/25/],
      [{ subnets: ["10.8.0.0/24"], ipRanges: ["10.8.0.0/23"] }, /no matching subnet for ip-range/],
      [{ subnets: ["10.8.0.0/24"], ipRanges: ["10.8.0.0/25", "10.8.0.128/25"] }, /cannot configure multiple ranges/],
      [{ subnets: ["10.8.0.0/24"], ipRanges: ["10.8.0.1/25"] }, /invalid ip-range "10\.8\.0\.1\/25": host bits are set/],
      [{ subnets: ["10.8.0.0/24"], auxAddresses: { a: "10.9.0.1" } }, /no matching subnet for aux-address a=10\.9\.0\.1/],
      [{ subnets: ["10.8.0.0/16", "10.8.4.0/24"] }, /subnets 10\.8\.0\.0\/16 and 10\.8\.4\.0\/24 overlap/],
      [{ subnets: ["10.8.0.0/24", "10.8.0.0/24"] }, /overlap/],
      [{ subnets: ["fd00:8::/64"] }, /IPv6 subnet fd00:8::\/64 given without --ipv6/],
      [{ subnets: ["10.8.0.0/31"] }, /a \/31 has no room/],
      [{ subnets: ["fd00:8::/127"], ipv6: true }, /a \/127 has no room/],
      [{ subnets: ["10.8.0.1/24"] }, /host bits are set/],
      [{ gateways: ["10.8.0.1"] }, /no matching subnet for gateway|need a --subnet/],
      [{ ipRanges: ["10.8.0.0/25"] }, /no matching subnet for ip-range|need a --subnet/],
    ];
    for (const [r, pattern] of cases) {
      const err = failure(() => buildSubnetConfigs(req(r)), JSON.stringify(r));
      expect(err.code).toBe("invalid-argument");
      expect(err.message).toMatch(pattern);
    }
  });

  test("aux addresses are NAME=IP, each name once", () => {
    expect(parseAuxAddresses(["a=10.0.0.2", "b=fd00::2"])).toEqual({ a: "10.0.0.2", b: "fd00::2" });
    expect(failure(() => parseAuxAddresses(["a"])).message).toContain('invalid --aux-address "a"');
    expect(failure(() => parseAuxAddresses(["=10.0.0.2"])).message).toContain("expected NAME=IP");
    expect(failure(() => parseAuxAddresses(["a="])).message).toContain("expected NAME=IP");
    expect(failure(() => parseAuxAddresses(["a=10.0.0.2", "a=10.0.0.3"])).message).toContain('duplicate --aux-address name "a"');
  });
});

describe("pools: Docker's default address pools", () => {
  test("IPv4 candidates come in Docker's order", () => {
    const all = [...defaultV4Candidates()].map(formatCidr);
    const expected = [
      "172.17.0.0/16",
      "172.18.0.0/16",
      "172.19.0.0/16",
      ...Array.from({ length: 12 }, (_, i) => `172.${20 + i}.0.0/16`),
      ...Array.from({ length: 16 }, (_, i) => `192.168.${i * 16}.0/20`),
    ];
    expect(all).toEqual(expected);
  });

  test("the first candidate that overlaps nothing taken wins", () => {
    const pick = (...taken: string[]): string => formatCidr(pickV4Pool(taken.map((t) => parseCidr(t, "subnet", false))));
    expect(pick()).toBe("172.17.0.0/16");
    expect(pick("172.17.0.0/16")).toBe("172.18.0.0/16");
    expect(pick("172.17.0.0/16", "172.18.5.0/24")).toBe("172.19.0.0/16");
    expect(pick("172.16.0.0/12")).toBe("192.168.0.0/20");
    expect(pick("172.16.0.0/12", "192.168.0.0/24", "192.168.20.1/32")).toBe("192.168.32.0/20");
    expect(pick("10.0.0.0/8", "fd00::/8")).toBe("172.17.0.0/16");
    const err = failure(() => pick("172.16.0.0/12", "192.168.0.0/16"));
    expect(err.code).toBe("conflict");
    expect(err.message).toContain("all predefined address pools have been fully subnetted");
  });

  test("IPv6 pools are random unique-local /64s that avoid what is taken", () => {
    const seen = new Set<string>();
    const taken: Cidr[] = [parseCidr("fd00::/9")]; // half of fd00::/8 is taken
    for (let i = 0; i < 50; i++) {
      const c = pickV6Pool(taken);
      expect(c.family).toBe(6);
      expect(c.prefix).toBe(64);
      expect(cidrCovers(parseCidr("fd00::/8"), c)).toBe(true);
      expect(cidrOverlaps(c, taken[0]!)).toBe(false);
      seen.add(formatCidr(c));
    }
    expect(seen.size).toBeGreaterThan(45);
    expect(failure(() => pickV6Pool([parseCidr("fd00::/8")])).message).toContain("could not find a free IPv6 pool");
  });
});
