import { describe, expect, test } from "bun:test";
import {
  checkNetworkFilters,
  type FilterableNetwork,
  formatValue,
  joinLabels,
  matchNetworkFilters,
  NetworkFilterKeys,
  parseFilters,
  renderFormat,
  renderTable,
  renderTemplate,
  shortId,
} from "../src/cli/format.ts";
import { KnitError } from "../src/errors.ts";

/** The message of the KnitError a call throws (fails the test when it does not throw one). */
function failure(fn: () => unknown): string {
  try {
    fn();
  } catch (err) {
    if (err instanceof KnitError && err.code === "invalid-argument") return err.message;
    throw err;
  }
  throw new Error("expected a KnitError");
}

const net = {
  ID: "3f1c9a0b7d2e4f5a6b7c8d9e0f1a2b3c",
  Name: "br0",
  Driver: "bridge",
  Internal: false,
  Labels: { env: "dev", team: "net" },
  IPAM: { Driver: "default", Config: [{ Subnet: "10.1.0.0/24", Gateway: "10.1.0.1" }, { Subnet: "fd00::/64" }] },
  Options: {},
  Containers: [] as string[],
  Gone: undefined,
  Nil: null,
  Label: (k: unknown) => (k === "env" ? "dev" : ""),
};

describe("tables", () => {
  test("docker's look: min width 10, three spaces between columns, last column unpadded", () => {
    const out = renderTable(
      ["NETWORK ID", "NAME", "DRIVER", "SCOPE"],
      [
        ["3f1c9a0b7d2e", "bridge", "bridge", "local"],
        ["9d8e7f6a5b4c", "host", "host", "local"],
      ],
    );
    expect(out).toBe(
      "NETWORK ID     NAME      DRIVER    SCOPE\n" +
        "3f1c9a0b7d2e   bridge    bridge    local\n" +
        "9d8e7f6a5b4c   host      host      local\n",
    );
  });

  test("wide and multi-byte cells", () => {
    expect(renderTable(["A", "B"], [["a-very-long-name", "x"], ["é", "y"]])).toBe(
      "A                  B\na-very-long-name   x\né                  y\n",
    );
  });

  test("shortId", () => {
    expect(shortId(net.ID)).toBe("3f1c9a0b7d2e");
    expect(shortId("abc")).toBe("abc");
  });
});

describe("renderTemplate", () => {
  const cases: [string, string][] = [
    ["{{.Name}}", "br0"],
    ["name={{ .Name }} driver={{.Driver}}", "name=br0 driver=bridge"],
    ["{{.IPAM.Driver}}", "default"],
    ["{{.Internal}}", "false"],
    ["{{.Labels}}", "map[env:dev team:net]"],
    ["{{.IPAM.Config}}", "[map[Gateway:10.1.0.1 Subnet:10.1.0.0/24] map[Subnet:fd00::/64]]"],
    ["{{.Containers}} {{.Options}}", "[] map[]"],
    ["{{.Gone}} {{.Nil}}", "<no value> <nil>"],
    ["{{json .Labels}}", '{"env":"dev","team":"net"}'],
    ["{{json .Gone}}", "null"],
    ['{{index .Labels "env"}}/{{index .Labels "nope"}}/', "dev//"],
    ["{{index .IPAM.Config 1 \"Subnet\"}}", "fd00::/64"],
    ["{{upper .Name}} {{lower `ABC`}} {{.Name | upper}}", "BR0 abc BR0"],
    ['{{printf "%s:%d:%q:%v%%" .Name 42 .Driver .Internal}}', 'br0:42:"bridge":false%'],
    ['{{printf "%s %s" .Name}}', "br0 %!s(MISSING)"],
    ['{{printf "%s" (upper (lower .Name))}}', "BR0"],
    ['{{join (split "a,b,c" ",") "+"}}', "a+b+c"],
    ["{{len .IPAM.Config}} {{len .Labels}} {{len .Name}}", "2 2 3"],
    ["{{range .IPAM.Config}}[{{.Subnet}}]{{end}}", "[10.1.0.0/24][fd00::/64]"],
    ["{{range .Containers}}x{{else}}none{{end}}", "none"],
    ["{{if .Internal}}internal{{else}}external{{end}} {{if .Labels}}labelled{{end}}", "external labelled"],
    ['{{.Label "env"}}', "dev"],
    ["a\\tb\\nc", "a\tb\nc"],
    ["plain", "plain"],
  ];
  for (const [tpl, want] of cases) {
    test(tpl, () => expect(renderTemplate(tpl, net)).toBe(want));
  }

  test("json of the whole value", () => {
    expect(JSON.parse(renderTemplate("{{json .}}", { a: 1, b: ["x"] }))).toEqual({ a: 1, b: ["x"] });
  });

  test("errors", () => {
    const errors: [string, string][] = [
      ["{{.Foo}}", "template: can't evaluate field Foo"],
      ["{{.IPAM.Nope}}", "template: can't evaluate field Nope"],
      ["{{.Name.Length}}", "template: can't evaluate field Length"],
      ["{{.Nil.X}}", "template: can't evaluate field X"],
      ["{{.constructor}}", "template: can't evaluate field constructor"],
      ["x {{.Name", 'template: unclosed action at offset 2 (missing "}}")'],
      ["{{nope .Name}}", 'template: function "nope" not defined'],
      ["{{}}", "template: missing value for command"],
      ["{{.Name |}}", "template: missing value for command"],
      ["{{(upper .Name}}", "template: unclosed left paren"],
      ["{{upper .Name)}}", "template: unexpected right paren"],
      ["{{range .Containers}}", "template: unexpected EOF (missing {{end}})"],
      ["{{end}}", "template: unexpected {{end}}"],
      ["{{if .Name}}{{else}}{{else}}{{end}}", "template: unexpected {{else}}"],
      ["{{json}}", "template: wrong number of args for json: got 0"],
      ["{{.Name 1}}", "template: can't give argument to non-function br0"],
      ["{{index .IPAM.Config 5}}", "template: index out of range: 5"],
      ['{{index .Name.x "a"}}', "template: can't evaluate field x"],
      ['{{index 3 "a"}}', "template: can't index item of type number"],
      ['{{"unterminated}}', 'template: bad syntax in {{"unterminated}}'],
      ["{{.Name ,}}", "template: bad token ,"],
    ];
    for (const [tpl, message] of errors) expect(failure(() => renderTemplate(tpl, net))).toBe(message);
  });

  test("formatValue", () => {
    expect(formatValue([1, "a", true, null])).toBe("[1 a true <nil>]");
    expect(formatValue({ b: { c: 1 }, a: [] })).toBe("map[a:[] b:map[c:1]]");
  });
});

describe("renderFormat", () => {
  const rows = [
    { ID: "3f1c9a0b7d2e", Name: "bridge", Driver: "bridge", CreatedAt: "2024-01-01" },
    { ID: "9d8e7f6a5b4c", Name: "my-long-network", Driver: "bridge", CreatedAt: "2024-01-02" },
  ];
  const headers = { ID: "NETWORK ID" };

  test("table with header map and derived headers", () => {
    expect(renderFormat("table {{.ID}}\\t{{upper .Name}}\\t{{.CreatedAt}}", rows, { headers })).toBe(
      "NETWORK ID     NAME              CREATED AT\n" +
        "3f1c9a0b7d2e   BRIDGE            2024-01-01\n" +
        "9d8e7f6a5b4c   MY-LONG-NETWORK   2024-01-02\n",
    );
  });

  test("bare table uses the default; the header is printed without rows", () => {
    const options = { headers, defaultTable: "{{.ID}}\t{{.Name}}" };
    expect(renderFormat("table", [], options)).toBe("NETWORK ID   NAME\n");
    expect(renderFormat("  table  ", rows.slice(0, 1), options)).toBe("NETWORK ID     NAME\n3f1c9a0b7d2e   bridge\n");
    expect(failure(() => renderFormat("table", rows))).toBe('template: "table" needs a template, e.g. table {{.Name}}');
  });

  test("plain templates and json", () => {
    expect(renderFormat("{{.Name}}\\t{{.Driver}}", rows)).toBe("bridge\tbridge\nmy-long-network\tbridge\n");
    expect(renderFormat("{{.Name}}", [])).toBe("");
    expect(renderFormat("json", rows.slice(0, 1))).toBe(`${JSON.stringify(rows[0])}\n`);
  });

  test("nested fields take the header of their last name", () => {
    expect(renderFormat("table {{.IPAM.Driver}}\\t{{json .}}", [net])).toMatch(/^DRIVER {4}\ndefault {3}\{"ID"/);
  });
});

describe("filters", () => {
  test("parseFilters", () => {
    const f = parseFilters(["name=a", "Driver = bridge ", "name=b", "name=a", "label=x=y"], NetworkFilterKeys);
    expect([...f]).toEqual([
      ["name", ["a", "b"]],
      ["driver", ["bridge"]],
      ["label", ["x=y"]],
    ]);
    expect(failure(() => parseFilters(["foo=bar"], NetworkFilterKeys))).toBe("invalid filter 'foo'");
    expect(failure(() => parseFilters(["name"], NetworkFilterKeys))).toBe("bad format of filter (expected name=value)");
  });

  const nets: FilterableNetwork[] = [
    { id: "aaa111", name: "bridge", driver: "bridge", scope: "local", labels: {}, predefined: true },
    { id: "bbb222", name: "host", driver: "host", scope: "local", labels: {}, predefined: true },
    { id: "ccc333", name: "front-net", driver: "bridge", scope: "local", labels: { env: "prod", tier: "web" }, predefined: false, inUse: true },
    { id: "ddd444", name: "back-net", driver: "bridge", scope: "local", labels: { env: "dev" }, predefined: false },
  ];
  const names = (...filters: string[]): string[] => {
    const f = parseFilters(filters, NetworkFilterKeys);
    return nets.filter((n) => matchNetworkFilters(f, n)).map((n) => n.name);
  };

  test("matchNetworkFilters", () => {
    expect(names()).toEqual(["bridge", "host", "front-net", "back-net"]);
    expect(names("driver=bridge")).toEqual(["bridge", "front-net", "back-net"]);
    expect(names("driver=bri")).toEqual([]);
    expect(names("driver=host", "driver=bridge", "name=net")).toEqual(["front-net", "back-net"]);
    expect(names("name=net")).toEqual(["front-net", "back-net"]);
    expect(names("name=^b")).toEqual(["bridge", "back-net"]);
    expect(names("name=net(")).toEqual([]); // not a valid expression: substring match
    const odd = { ...nets[3], name: "odd(net" } as FilterableNetwork;
    expect(matchNetworkFilters(parseFilters(["name=d(n"], NetworkFilterKeys), odd)).toBe(true);
    expect(names("id=ccc")).toEqual(["front-net"]);
    expect(names("id=333")).toEqual(["front-net"]);
    expect(names("label=env")).toEqual(["front-net", "back-net"]);
    expect(names("label=env=dev")).toEqual(["back-net"]);
    expect(names("label=env", "label=tier=web")).toEqual(["front-net"]);
    expect(names("scope=local", "scope=swarm")).toHaveLength(4);
    expect(names("scope=global")).toEqual([]);
    expect(names("type=builtin")).toEqual(["bridge", "host"]);
    expect(names("type=custom")).toEqual(["front-net", "back-net"]);
    expect(names("type=custom", "type=builtin")).toHaveLength(4);
    expect(names("dangling=true")).toEqual(["back-net"]);
    expect(names("dangling=0")).toEqual(["bridge", "host", "front-net"]);
  });

  test("bad filter values", () => {
    expect(failure(() => names("type=x"))).toBe("invalid filter: 'type'='x'");
    expect(failure(() => checkNetworkFilters(parseFilters(["type=x"], NetworkFilterKeys)))).toBe("invalid filter: 'type'='x'");
    expect(failure(() => names("dangling=yes"))).toBe(
      `invalid value for filter 'dangling', must be "true" (or "1"), or "false" (or "0")`,
    );
    expect(failure(() => names("dangling=1", "dangling=0"))).toBe(`got more than one value for filter key "dangling"`);
  });

  test("joinLabels", () => {
    expect(joinLabels({ z: "1", a: "" })).toBe("a=,z=1");
    expect(joinLabels({})).toBe("");
  });
});
