import { describe, expect, test } from "bun:test";
import { defineCommand, parseArgs, renderHelp } from "../src/cli/args.ts";
import { thrownKnitError } from "./thrown.ts";

const create = defineCommand({
  name: "network create",
  usage: "[OPTIONS] NETWORK",
  summary: "Create a network",
  args: { min: 1, max: 1 },
  flags: [
    { name: "driver", short: "d", kind: "string", default: "bridge", help: "Driver to manage the Network" },
    { name: "subnet", kind: "list", csv: true, help: "Subnet in CIDR format" },
    { name: "gateway", kind: "string", help: "Gateway for the master subnet" },
    { name: "internal", kind: "bool", help: "Restrict external access to the network" },
    { name: "ipv6", kind: "bool", help: "Enable IPv6 networking" },
    { name: "opt", short: "o", kind: "map", help: "Set driver specific options" },
    { name: "label", kind: "map", help: "Set metadata on a network" },
    { name: "force", short: "f", kind: "bool", help: "Do not ask" },
  ],
});

const run = defineCommand({
  name: "run",
  usage: "[OPTIONS] IMAGE [COMMAND] [ARG...]",
  summary: "Create and run a new sandbox",
  interspersed: false,
  args: { min: 1 },
  flags: [
    { name: "hostname", short: "h", kind: "string", help: "Sandbox host name" },
    { name: "rm", kind: "bool", help: "Remove when it exits" },
    { name: "detach", short: "d", kind: "bool", help: "Run in background" },
  ],
});


describe("parseArgs", () => {
  test("defaults and types", () => {
    const r = parseArgs(create, ["br0"]);
    const driver: string = r.flags.driver;
    const gateway: string | undefined = r.flags.gateway;
    const subnets: string[] = r.flags.subnet;
    const opts: Record<string, string> = r.flags.opt;
    const internal: boolean = r.flags.internal;
    expect([driver, gateway, subnets, opts, internal]).toEqual(["bridge", undefined, [], {}, false]);
    expect(r.positionals).toEqual(["br0"]);
    expect(r.rest).toBeUndefined();
    expect(r.help).toBe(false);
    expect(r.given.size).toBe(0);
    // @ts-expect-error only declared flags exist on the parsed record
    expect(r.flags.nope).toBeUndefined();
  });

  test("long, inline and short forms, flags after positionals", () => {
    const r = parseArgs(create, [
      "--driver=bridge",
      "br0",
      "--subnet",
      "10.1.0.0/24",
      "--subnet=10.2.0.0/24,fd00::/64",
      "-o",
      "mtu=1400",
      "-ocom.docker.network.bridge.name=kbr0",
      "-o=a=b=c",
      "--label",
      "x",
      "--label=env=dev",
      "--label=env=prod",
      "--gateway",
      "-weird",
    ]);
    expect(r.flags.driver).toBe("bridge");
    expect(r.flags.subnet).toEqual(["10.1.0.0/24", "10.2.0.0/24", "fd00::/64"]);
    expect(r.flags.opt).toEqual({ mtu: "1400", "com.docker.network.bridge.name": "kbr0", a: "b=c" });
    expect(r.flags.label).toEqual({ x: "", env: "prod" });
    expect(Object.entries(parseArgs(create, ["n", "--label", "__proto__=x"]).flags.label)).toEqual([["__proto__", "x"]]);
    expect(r.flags.gateway).toBe("-weird");
    expect(r.positionals).toEqual(["br0"]);
    expect([...r.given].sort()).toEqual(["driver", "gateway", "label", "opt", "subnet"]);
  });

  test("bools: bare, =value, bundled, explicit false is recorded as given", () => {
    expect(parseArgs(create, ["n", "--internal"]).flags.internal).toBe(true);
    for (const v of ["false", "0", "f", "F", "FALSE", "False"]) {
      const r = parseArgs(create, ["n", `--internal=${v}`]);
      expect(r.flags.internal).toBe(false);
      expect(r.given.has("internal")).toBe(true);
    }
    expect(parseArgs(create, ["n", "--ipv6=1"]).flags.ipv6).toBe(true);
    const r = parseArgs(create, ["-fdnull", "n"]);
    expect(r.flags.force).toBe(true);
    expect(r.flags.driver).toBe("null");
    expect(parseArgs(create, ["-f=false", "n"]).flags.force).toBe(false);
    expect(parseArgs(create, ["-fd", "host", "n"]).flags.driver).toBe("host");
  });

  test("-- ends flags; a lone - is a positional", () => {
    const r = parseArgs(create, ["-", "--", "--internal", "x"]);
    expect(r.positionals).toEqual(["-"]);
    expect(r.rest).toEqual(["--internal", "x"]);
    expect(r.flags.internal).toBe(false);
    expect(parseArgs(create, ["n", "--"]).rest).toEqual([]);
  });

  test("non-interspersed commands stop at the first positional", () => {
    const r = parseArgs(run, ["--rm", "-h", "web", "alpine", "ping", "-c", "1", "--rm", "--", "x"]);
    expect(r.flags.rm).toBe(true);
    expect(r.flags.hostname).toBe("web");
    expect(r.help).toBe(false);
    expect(r.positionals).toEqual(["alpine", "ping", "-c", "1", "--rm", "--", "x"]);
    expect(r.rest).toBeUndefined();
  });

  test("--help and -h stop parsing and skip the argument count", () => {
    expect(parseArgs(create, ["--help"]).help).toBe(true);
    expect(parseArgs(create, ["-h", "--bogus"]).help).toBe(true);
    expect(parseArgs(create, ["-fh"]).help).toBe(true);
    expect(parseArgs(run, ["--help"]).help).toBe(true);
    expect(thrownKnitError(() => parseArgs(run, ["-h"])).message).toBe("flag needs an argument: 'h' in -h");
  });

  test("errors", () => {
    const cases: [readonly string[], string][] = [
      [["n", "--foo"], "unknown flag: --foo"],
      [["n", "--foo=1"], "unknown flag: --foo"],
      [["n", "-x"], "unknown shorthand flag: 'x' in -x"],
      [["n", "-fx"], "unknown shorthand flag: 'x' in -fx"],
      [["n", "--subnet"], "flag needs an argument: --subnet"],
      [["n", "-o"], "flag needs an argument: 'o' in -o"],
      [["n", "--internal=yes"], 'invalid value "yes" for --internal: expected true or false'],
      [["n", "-f=maybe"], 'invalid value "maybe" for -f: expected true or false'],
      [["n", "--opt", "=x"], 'invalid value "=x" for --opt: expected KEY=VALUE'],
      [["n", "-o", ""], 'invalid value "" for -o: expected KEY=VALUE'],
      [[], '"knit network create" requires exactly 1 argument.'],
      [["a", "b"], '"knit network create" requires exactly 1 argument.'],
    ];
    for (const [argv, message] of cases) {
      const err = thrownKnitError(() => parseArgs(create, argv));
      expect(err.code).toBe("invalid-argument");
      expect(err.message).toBe(message);
      expect(err.hint).toBe("See 'knit network create --help'.");
    }
  });

  test("argument count messages", () => {
    const spec = (args: { min?: number; max?: number }) => ({ name: "x", summary: "", flags: [], args });
    const msg = (args: { min?: number; max?: number }, argv: string[]) => thrownKnitError(() => parseArgs(spec(args), argv)).message;
    expect(msg({ max: 0 }, ["a"])).toBe('"knit x" accepts no arguments.');
    expect(msg({ min: 1 }, [])).toBe('"knit x" requires at least 1 argument.');
    expect(msg({ min: 2 }, [])).toBe('"knit x" requires at least 2 arguments.');
    expect(msg({ max: 2 }, ["a", "b", "c"])).toBe('"knit x" requires at most 2 arguments.');
    expect(msg({ min: 1, max: 2 }, [])).toBe('"knit x" requires at least 1 and at most 2 arguments.');
  });

  test("bad specs are bugs", () => {
    const dup = { name: "x", summary: "", flags: [{ name: "a", kind: "bool", help: "" }, { name: "a", kind: "bool", help: "" }] } as const;
    expect(thrownKnitError(() => defineCommand(dup)).code).toBe("internal");
    const help = { name: "x", summary: "", flags: [{ name: "help", kind: "bool", help: "" }] } as const;
    expect(thrownKnitError(() => parseArgs(help, [])).code).toBe("internal");
    const short = { name: "x", summary: "", flags: [{ name: "a", short: "ab", kind: "bool", help: "" }] } as const;
    expect(thrownKnitError(() => parseArgs(short, [])).code).toBe("internal");
  });
});

describe("renderHelp", () => {
  test("docker-style layout", () => {
    expect(renderHelp(create)).toBe(
      [
        "Usage:  knit network create [OPTIONS] NETWORK",
        "",
        "Create a network",
        "",
        "Options:",
        '  -d, --driver string    Driver to manage the Network (default "bridge")',
        "      --subnet list      Subnet in CIDR format",
        "      --gateway string   Gateway for the master subnet",
        "      --internal         Restrict external access to the network",
        "      --ipv6             Enable IPv6 networking",
        "  -o, --opt map          Set driver specific options",
        "      --label map        Set metadata on a network",
        "  -f, --force            Do not ask",
        "",
      ].join("\n"),
    );
  });

  test("group commands list their subcommands", () => {
    const group = defineCommand({
      name: "network",
      usage: "COMMAND",
      summary: "Manage networks",
      flags: [],
      commands: [
        { name: "create", summary: "Create a network" },
        { name: "ls", summary: "List networks" },
      ],
    });
    expect(renderHelp(group)).toBe(
      [
        "Usage:  knit network COMMAND",
        "",
        "Manage networks",
        "",
        "Commands:",
        "  create   Create a network",
        "  ls       List networks",
        "",
        "Run 'knit network COMMAND --help' for more information on a command.",
        "",
      ].join("\n"),
    );
  });
});
