/**
 * Bad input through the real CLI (`bin/knit` in a lab host): every case must exit non-zero,
 * say on stderr what was wrong, and leave nothing behind: no new link, address, knit
 * namespace or sandbox directory, the nft table as it was, and no new store row (network,
 * endpoint, sandbox, name, ipam claim ...). "Before" and "after" are read from the kernel's
 * own JSON and from the store file itself.
 *
 * Existing objects the cases collide with (all made in beforeAll and undone in the last
 * test): network "base" 10.20.0.0/24, the lab namespace `a` connected to it with
 * 10.20.0.10, and the knit sandbox "s1" running on it.
 */
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { Lab, NETNS_DIR, type LabHost, type LabNode } from "../src/lab/lab.ts";
import { openSqliteStore } from "../src/store/sqlite.ts";
import { assertHostClean, knitNftState } from "./leaks.ts";

setDefaultTimeout(60_000);

// ---- what the host looks like (kernel + store), to compare before and after ------------

interface Snapshot {
  links: string[];
  addresses: string[];
  netns: string[];
  nft: string;
  store: string[];
  sandboxDirs: string[];
}

interface IpLink {
  ifname: string;
  master?: string;
  linkinfo?: { info_kind?: string };
}
interface IpAddr {
  ifname: string;
  addr_info: { local: string; prefixlen: number; scope: string }[];
}

/** Every key in the host's store. */
async function storeKeys(host: LabHost): Promise<string[]> {
  const store = await openSqliteStore(host.stateDir);
  try {
    return (await store.list("")).items.map((kv) => kv.key);
  } finally {
    await store.close();
  }
}

async function snapshot(host: LabHost): Promise<Snapshot> {
  const links = JSON.parse((await host.exec(["ip", "-j", "-d", "link", "show"])).stdout) as IpLink[];
  const addrs = JSON.parse((await host.exec(["ip", "-j", "addr", "show"])).stdout) as IpAddr[];
  const sbDir = join(host.stateDir, "sandboxes");
  return {
    links: links.map((l) => `${l.ifname} ${l.linkinfo?.info_kind ?? ""} ${l.master ?? ""}`).sort(),
    addresses: addrs.flatMap((a) => a.addr_info.filter((i) => i.scope !== "link").map((i) => `${a.ifname} ${i.local}/${i.prefixlen}`)).sort(),
    netns: existsSync(NETNS_DIR) ? readdirSync(NETNS_DIR).filter((n) => n.startsWith("knit-")).sort() : [],
    nft: await knitNftState(host),
    // meta/* are change counters (a rolled-back change may bump one), not objects.
    store: (await storeKeys(host)).filter((k) => !k.startsWith("meta/")).sort(),
    sandboxDirs: existsSync(sbDir) ? readdirSync(sbDir).sort() : [],
  };
}


function sandboxRunning(): boolean {
  return readdirSync("/proc").some((e) => {
    try {
      return /^\d+$/.test(e) && readFileSync(`/proc/${e}/cmdline`, "utf8").split("\0").join(" ").trim() === `sleep ${MARK}`;
    } catch {
      return false;
    }
  });
}

// ---- the cases ---------------------------------------------------------------------

let lab: Lab;
let h: LabHost;
/** Connected to "base" with 10.20.0.10 in beforeAll. */
let nsA: LabNode;
/** Never connected: the target of failing connects. */
let nsB: LabNode;

interface Case {
  /** Test title. */
  what: string;
  /** knit arguments; `@A` / `@B` stand for the lab namespaces a and b. */
  args: readonly string[];
  /** What stderr must say. */
  says: RegExp;
}

/** The sandbox's command: `sleep MARK`, so a leftover process can be found by its argv. */
const MARK = "86403";
const LONG = "n".repeat(200);
const ODD_NAMES = ["bad name", "a/b", "ünï", LONG, ".hidden", "semi;colon"];
const MTU = "com.docker.network.driver.mtu";

const networkCases: Case[] = [
  { what: "unknown driver", args: ["network", "create", "-d", "overlay2", "x1"], says: /unknown driver "overlay2"/ },
  { what: "unknown IPAM driver", args: ["network", "create", "--ipam-driver", "dhcp", "x1"], says: /unknown IPAM driver "dhcp"/ },
  { what: "prefix length 33", args: ["network", "create", "--subnet", "10.0.0.0/33", "x1"], says: /invalid subnet "10\.0\.0\.0\/33"/ },
  { what: "host bits set", args: ["network", "create", "--subnet", "10.0.0.1/24", "x1"], says: /invalid subnet "10\.0\.0\.1\/24": host bits are set/ },
  { what: "subnet that is no CIDR", args: ["network", "create", "--subnet", "abc", "x1"], says: /invalid subnet "abc"/ },
  { what: "IPv6 subnet without --ipv6", args: ["network", "create", "--subnet", "fd00:30::/64", "x1"], says: /fd00:30::\/64 given without --ipv6/ },
  { what: "gateway outside the subnet", args: ["network", "create", "--subnet", "10.30.0.0/24", "--gateway", "10.31.0.1", "x1"], says: /no matching subnet for gateway 10\.31\.0\.1/ },
  { what: "gateway at the broadcast address", args: ["network", "create", "--subnet", "10.30.0.0/24", "--gateway", "10.30.0.255", "x1"], says: /invalid gateway 10\.30\.0\.255: it is the broadcast address/ },
  {
    what: "two gateways for one subnet",
    args: ["network", "create", "--subnet", "10.30.0.0/24", "--gateway", "10.30.0.1", "--gateway", "10.30.0.2", "x1"],
    says: /cannot configure multiple gateways \(10\.30\.0\.1, 10\.30\.0\.2\)/,
  },
  { what: "ip-range outside the subnet", args: ["network", "create", "--subnet", "10.30.0.0/24", "--ip-range", "10.31.0.0/25", "x1"], says: /no matching subnet for ip-range 10\.31\.0\.0\/25/ },
  { what: "subnet overlapping an existing network", args: ["network", "create", "--subnet", "10.20.0.128/25", "x1"], says: /subnet 10\.20\.0\.128\/25 overlaps network "base"/ },
  { what: "two --subnet that overlap", args: ["network", "create", "--subnet", "10.30.0.0/16", "--subnet", "10.30.1.0/24", "x1"], says: /subnets 10\.30\.0\.0\/16 and 10\.30\.1\.0\/24 overlap/ },
  { what: "duplicate network name", args: ["network", "create", "--subnet", "10.32.0.0/24", "base"], says: /network with name base already exists/ },
  { what: "unknown -o option", args: ["network", "create", "-o", "foo=bar", "x1"], says: /unknown option "foo" for the bridge driver/ },
  { what: "mtu abc", args: ["network", "create", "-o", `${MTU}=abc`, "x1"], says: /invalid value "abc" for option com\.docker\.network\.driver\.mtu/ },
  { what: "mtu 0", args: ["network", "create", "-o", `${MTU}=0`, "x1"], says: /invalid value "0" for option com\.docker\.network\.driver\.mtu/ },
  { what: "mtu 70000", args: ["network", "create", "-o", `${MTU}=70000`, "x1"], says: /invalid value "70000" for option com\.docker\.network\.driver\.mtu/ },
  { what: "mtu 1000 with --ipv6", args: ["network", "create", "--ipv6", "-o", `${MTU}=1000`, "x1"], says: /IPv6 needs an MTU of at least 1280/ },
  { what: "enable_icc=maybe", args: ["network", "create", "-o", "com.docker.network.bridge.enable_icc=maybe", "x1"], says: /invalid value "maybe" for option com\.docker\.network\.bridge\.enable_icc/ },
  { what: "host_binding_ipv4=notanip", args: ["network", "create", "-o", "com.docker.network.bridge.host_binding_ipv4=notanip", "x1"], says: /"notanip".*not an IPv4|host_binding_ipv4.*notanip/ },
  { what: "bridge name too long", args: ["network", "create", "-o", "com.docker.network.bridge.name=abcdefghijklmnop", "x1"], says: /"abcdefghijklmnop": must be 1 to 15 bytes long/ },
  { what: "bridge name with '/'", args: ["network", "create", "-o", "com.docker.network.bridge.name=br/x", "x1"], says: /"br\/x": contains "\/"/ },
  { what: "bridge name of an existing interface", args: ["network", "create", "-o", "com.docker.network.bridge.name=lo", "x1"], says: /interface "lo" already exists/ },
  { what: "-d host (only one instance)", args: ["network", "create", "-d", "host", "x1"], says: /only one instance of "host" network is allowed/ },
  { what: "-d null (only one instance)", args: ["network", "create", "-d", "null", "x1"], says: /only one instance of "null" network is allowed/ },
  { what: "unknown flag", args: ["network", "create", "--bogus", "x1"], says: /unknown flag: --bogus/ },
  { what: "missing flag value", args: ["network", "create", "x1", "--subnet"], says: /flag needs an argument: --subnet/ },
  { what: "no network name", args: ["network", "create", "--subnet", "10.30.0.0/24"], says: /requires exactly 1 argument/ },
  { what: "network name -x", args: ["network", "create", "-x"], says: /unknown shorthand flag: 'x' in -x/ },
  ...ODD_NAMES.map((n): Case => ({ what: `network name ${JSON.stringify(n.slice(0, 20))}`, args: ["network", "create", n], says: /invalid network name/ })),
  { what: "rm of a network in use", args: ["network", "rm", "base"], says: /network base id [0-9a-f]{64} has active endpoints/ },
  { what: "rm of the predefined bridge", args: ["network", "rm", "bridge"], says: /bridge is a pre-defined network and cannot be removed/ },
  { what: "rm of a missing network", args: ["network", "rm", "nosuch"], says: /network nosuch not found/ },
];

const connectCases: Case[] = [
  { what: "--ip outside the subnet", args: ["network", "connect", "--ip", "10.21.0.5", "base", "@B"], says: /invalid --ip 10\.21\.0\.5: no configured subnet contains it/ },
  { what: "--ip used by another sandbox", args: ["network", "connect", "--ip", "10.20.0.10", "base", "@B"], says: /invalid --ip 10\.20\.0\.10: Address already in use/ },
  { what: "--ip equal to the gateway", args: ["network", "connect", "--ip", "10.20.0.1", "base", "@B"], says: /invalid --ip 10\.20\.0\.1: Address already in use/ },
  { what: "--ip at the network address", args: ["network", "connect", "--ip", "10.20.0.0", "base", "@B"], says: /network or broadcast address/ },
  { what: "--ip that is no address", args: ["network", "connect", "--ip", "10.20.0.300", "base", "@B"], says: /invalid --ip "10\.20\.0\.300"/ },
  { what: "--ip6 on a network without IPv6", args: ["network", "connect", "--ip6", "fd00::5", "base", "@B"], says: /invalid --ip6 fd00::5: network base has no IPv6/ },
  { what: "connect to a missing network", args: ["network", "connect", "nosuch", "@B"], says: /network nosuch not found/ },
  { what: "connect a missing container", args: ["network", "connect", "base", "nosuch-container"], says: /no such container: nosuch-container/ },
  { what: "connect a missing namespace path", args: ["network", "connect", "base", "/run/netns/nosuch"], says: /network namespace path \/run\/netns\/nosuch does not exist/ },
  { what: "connect twice to the same network", args: ["network", "connect", "base", "@A"], says: /already exists in network base/ },
  { what: "connect to the host network", args: ["network", "connect", "host", "@B"], says: /cannot be connected to the host network/ },
  { what: "connect to the none network", args: ["network", "connect", "none", "@B"], says: /cannot be connected to the none network/ },
  { what: "static IP on the predefined bridge", args: ["network", "connect", "--ip", "172.17.0.50", "bridge", "@B"], says: /user specified IP address is supported on user defined networks only/ },
  { what: "bad alias", args: ["network", "connect", "--alias", "bad alias", "base", "@B"], says: /invalid alias "bad alias"/ },
  { what: "disconnect a sandbox that is not connected", args: ["network", "disconnect", "bridge", "s1"], says: /sandbox s1 is not connected to network bridge/ },
  { what: "disconnect a namespace knit does not know", args: ["network", "disconnect", "base", "@B"], says: /no such sandbox/ },
  { what: "connect without a container", args: ["network", "connect", "base"], says: /requires exactly 2 arguments/ },
];

const runCases: Case[] = [
  { what: "run without a command", args: ["run", "--network", "base"], says: /knit run needs a command/ },
  { what: "run on a missing network", args: ["run", "--network", "nosuch", "--", "true"], says: /network nosuch not found/ },
  { what: "run with --ip outside the subnet", args: ["run", "--network", "base", "--ip", "10.21.0.5", "--", "true"], says: /invalid --ip 10\.21\.0\.5: no configured subnet contains it/ },
  { what: "run with --ip in use", args: ["run", "--network", "base", "--ip", "10.20.0.10", "--", "true"], says: /invalid --ip 10\.20\.0\.10: Address already in use/ },
  { what: "run with --ip equal to the gateway", args: ["run", "--network", "base", "--ip", "10.20.0.1", "--", "true"], says: /Address already in use/ },
  { what: "run with --ip6 on a network without IPv6", args: ["run", "--network", "base", "--ip6", "fd00::5", "--", "true"], says: /network base has no IPv6/ },
  { what: "run with a static IP on the predefined bridge", args: ["run", "--ip", "172.17.0.50", "--", "true"], says: /user specified IP address is supported on user defined networks only/ },
  { what: "run on host and a user network", args: ["run", "--network", "host", "--network", "base", "--", "true"], says: /conflicting options/ },
  { what: "run on the same network twice", args: ["run", "--network", "base", "--network", "base", "--", "true"], says: /the same network is given twice/ },
  { what: "run with a name in use", args: ["run", "--name", "s1", "--network", "base", "--", "true"], says: /the sandbox name "s1" is already in use/ },
  { what: "run with a bad hostname", args: ["run", "--hostname", "bad host", "--network", "base", "--", "true"], says: /invalid hostname "bad host"/ },
  { what: "run with an unknown flag", args: ["run", "--bogus", "--", "true"], says: /unknown flag: --bogus/ },
  { what: "run with a missing flag value", args: ["run", "--name"], says: /flag needs an argument: --name/ },
  { what: "run --name -x", args: ["run", "--name", "-x", "--network", "base", "--", "true"], says: /invalid sandbox name "-x"/ },
  ...ODD_NAMES.map((n): Case => ({ what: `run --name ${JSON.stringify(n.slice(0, 20))}`, args: ["run", "--name", n, "--network", "base", "--", "true"], says: /invalid sandbox name/ })),
  { what: "rm of a missing sandbox", args: ["rm", "nosuch"], says: /no such sandbox: nosuch/ },
  { what: "rm of a running sandbox without -f", args: ["rm", "s1"], says: /you cannot remove a running sandbox s1/ },
  { what: "unknown command", args: ["frobnicate"], says: /unknown command "frobnicate"/ },
];

beforeAll(async () => {
  lab = await Lab.create();
  h = await lab.host("h");
  nsA = await lab.ns("a");
  nsB = await lab.ns("b");
  await h.knitOk(["network", "create", "--subnet", "10.20.0.0/24", "base"]);
  await h.knitOk(["network", "connect", "--ip", "10.20.0.10", "base", nsA.name]);
  await h.knitOk(["run", "-d", "--name", "s1", "--network", "base", "--ip", "10.20.0.11", "--", "sleep", MARK]);
});

afterAll(async () => {
  await lab.cleanup();
});

function expand(args: readonly string[]): string[] {
  return args.map((a) => (a === "@A" ? nsA.name : a === "@B" ? nsB.name : a));
}

async function expectRefused(c: Case): Promise<void> {
  const before = await snapshot(h);
  const args = expand(c.args);
  const r = await h.knit(args);
  const shown = `knit ${args.join(" ")}\nexit ${r.code}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`;
  // Docker's exit codes: 125 when `run` itself fails, 1 for everything else.
  expect({ shown, code: r.code }).toEqual({ shown, code: args[0] === "run" ? 125 : 1 });
  const firstLine = r.stderr.split("\n")[0] ?? "";
  expect(firstLine).toMatch(/^Error: /);
  expect(r.stderr).toMatch(c.says);
  expect(r.stderr).not.toMatch(/^\s+at .*\(.*:\d+:\d+\)$/m); // no stack trace
  expect(await snapshot(h)).toEqual(before);
}

describe("bad input: network create / rm", () => {
  for (const c of networkCases) test(c.what, () => expectRefused(c));
});

describe("bad input: connect / disconnect", () => {
  for (const c of connectCases) test(c.what, () => expectRefused(c));
});

describe("bad input: run / rm", () => {
  for (const c of runCases) test(c.what, () => expectRefused(c));
});

describe("bad input: the end", () => {
  test("the predefined bridge was never brought up by a refused command", async () => {
    const r = await h.exec(["ip", "-j", "link", "show", "knit0"], { check: false });
    expect(r.code).not.toBe(0);
  });

  test("what existed before is untouched and still works", async () => {
    const addrs = JSON.parse((await nsA.exec(["ip", "-j", "-4", "addr", "show", "eth0"])).stdout) as IpAddr[];
    expect(addrs.flatMap((a) => a.addr_info.map((i) => `${i.local}/${i.prefixlen}`))).toEqual(["10.20.0.10/24"]);
    expect(await h.ping("10.20.0.10")).toBe(true);
    expect(await h.ping("10.20.0.11")).toBe(true);
    expect(await nsA.ping("10.20.0.11")).toBe(true);
  });

  test("undoing the setup leaves nothing behind", async () => {
    await h.knitOk(["rm", "-f", "s1"]);
    await h.knitOk(["network", "disconnect", "base", nsA.name]);
    await h.knitOk(["network", "rm", "base"]);
    await assertHostClean(h, { extra: () => (sandboxRunning() ? [`a sandbox process (sleep ${MARK}) still runs`] : []) });
    const links = JSON.parse((await nsA.exec(["ip", "-j", "link", "show"])).stdout) as IpLink[];
    expect(links.map((l) => l.ifname)).toEqual(["lo"]);
  });
});
