/**
 * Output formatting shared by the CLI commands: docker-style tables, a subset of Go
 * templates for `--format` / `-f`, and `--filter` parsing and network matching.
 *
 * Templates support `{{.Field}}`, `{{.A.B}}`, `{{.}}`, pipes (`{{.Name | upper}}`),
 * parentheses, string/number/bool literals, `{{range .X}}…{{else}}…{{end}}`,
 * `{{if .X}}…{{else}}…{{end}}`, and the functions json, upper, lower, join, split,
 * index, len and printf (%s %v %d %q %t %%). A field that holds a function is called with
 * the arguments that follow it (`{{.Label "k"}}`). Values print as Go's fmt would:
 * arrays as `[a b]`, objects as `map[k:v k2:v2]` (sorted keys), null as `<nil>`, undefined
 * as `<no value>`; use `json` for anything structured. A missing field is an error, also
 * on maps (use `index` there: a missing key gives ""). `\t` and `\n` in a template are
 * turned into tab and newline.
 */
import { invalid, type KnitError } from "../errors.ts";

/** First 12 characters of an id, as docker shows them. */
export const shortId = (id: string): string => id.slice(0, 12);

const width = (s: string): number => [...s].length;

/**
 * Align cells like docker's tabwriter (min width 10, padding 3): every cell but the last of
 * a line is padded to its column's width. Returns lines each ending in "\n".
 */
export function tabulate(lines: readonly (readonly string[])[]): string {
  const widths: number[] = [];
  for (const cells of lines) {
    cells.slice(0, -1).forEach((c, j) => (widths[j] = Math.max(widths[j] ?? 10, width(c) + 3)));
  }
  const pad = (c: string, j: number, cells: readonly string[]): string =>
    j < cells.length - 1 ? c + " ".repeat((widths[j] ?? 0) - width(c)) : c;
  return lines.map((cells) => `${cells.map((c, j) => pad(c, j, cells)).join("")}\n`).join("");
}

/** A docker-style table: `NETWORK ID     NAME      DRIVER    SCOPE`. Lines end in "\n". */
export const renderTable = (headers: readonly string[], rows: readonly (readonly string[])[]): string =>
  tabulate([headers, ...rows]);

// ---- templates ------------------------------------------------------------------------

type Arg =
  | { k: "field"; path: string[] }
  | { k: "lit"; v: unknown }
  | { k: "fn"; name: string }
  | { k: "sub"; p: Pipeline };
type Pipeline = Arg[][];
type Block = { k: "range" | "if"; p: Pipeline; body: Node[]; alt: Node[] };
type Node = string | { k: "out"; p: Pipeline } | Block;

const tplError = (msg: string): KnitError => invalid(`template: ${msg}`);

function lex(src: string): string[] {
  const re = /\s*("(?:[^"\\]|\\.)*"|`[^`]*`|[()|]|[^\s()|"`]+)/y;
  const out: string[] = [];
  while (!/^\s*$/.test(src.slice(re.lastIndex))) {
    const tok = re.exec(src)?.[1];
    if (tok === undefined) throw tplError(`bad syntax in {{${src}}}`);
    out.push(tok);
  }
  return out;
}

function operand(t: string): Arg {
  if (t.startsWith("`")) return { k: "lit", v: t.slice(1, -1) };
  if (t.startsWith('"')) {
    try {
      return { k: "lit", v: JSON.parse(t) as string };
    } catch {
      throw tplError(`bad string ${t}`);
    }
  }
  if (t === ".") return { k: "field", path: [] };
  if (/^(\.[A-Za-z_]\w*)+$/.test(t)) return { k: "field", path: t.slice(1).split(".") };
  if (/^-?\d+(\.\d+)?$/.test(t)) return { k: "lit", v: Number(t) };
  if (t === "true" || t === "false") return { k: "lit", v: t === "true" };
  if (Object.hasOwn(FUNCS, t)) return { k: "fn", name: t };
  if (/^[A-Za-z_]\w*$/.test(t)) throw tplError(`function "${t}" not defined`);
  throw tplError(`bad token ${t}`);
}

function parsePipeline(toks: readonly string[], pos: { i: number }, inParen: boolean): Pipeline {
  const cmds: Pipeline = [];
  let cur: Arg[] = [];
  const close = (): void => {
    if (cur.length === 0) throw tplError("missing value for command");
    cmds.push(cur);
    cur = [];
  };
  let closed = false;
  while (pos.i < toks.length && !closed) {
    const t = toks[pos.i++] ?? "";
    if (t === ")" && !inParen) throw tplError("unexpected right paren");
    if (t === ")") closed = true;
    else if (t === "|") close();
    else if (t === "(") cur.push({ k: "sub", p: parsePipeline(toks, pos, true) });
    else cur.push(operand(t));
  }
  if (inParen !== closed) throw tplError("unclosed left paren");
  close();
  return cmds;
}

function parse(template: string): Node[] {
  const src = template.replaceAll("\\t", "\t").replaceAll("\\n", "\n");
  const root: Node[] = [];
  const stack: { node: Block; inAlt: boolean }[] = [];
  const target = (): Node[] => {
    const top = stack.at(-1);
    return top === undefined ? root : top.inAlt ? top.node.alt : top.node.body;
  };
  let at = 0;
  while (at < src.length) {
    const open = src.indexOf("{{", at);
    if (open < 0) break;
    if (open > at) target().push(src.slice(at, open));
    const end = src.indexOf("}}", open + 2);
    if (end < 0) throw tplError(`unclosed action at offset ${open} (missing "}}")`);
    const toks = lex(src.slice(open + 2, end));
    at = end + 2;
    const [word, ...more] = toks;
    const top = stack.at(-1);
    if (word === "end" || word === "else") {
      if (top === undefined || more.length > 0 || (word === "else" && top.inAlt)) {
        throw tplError(`unexpected {{${word}}}`);
      }
      if (word === "end") stack.pop();
      else top.inAlt = true;
    } else if (word === "range" || word === "if") {
      const node: Block = { k: word, p: parsePipeline(more, { i: 0 }, false), body: [], alt: [] };
      target().push(node);
      stack.push({ node, inAlt: false });
    } else {
      target().push({ k: "out", p: parsePipeline(toks, { i: 0 }, false) });
    }
  }
  if (stack.length > 0) throw tplError("unexpected EOF (missing {{end}})");
  if (at < src.length) target().push(src.slice(at));
  return root;
}

/** Go's default formatting of a value (`{{.X}}`). */
export function formatValue(v: unknown): string {
  if (v === undefined) return "<no value>";
  if (v === null) return "<nil>";
  if (typeof v === "string") return v;
  if (typeof v === "number" || typeof v === "boolean" || typeof v === "bigint") return String(v);
  if (Array.isArray(v)) return `[${v.map(formatValue).join(" ")}]`;
  if (typeof v === "object") {
    const items = Object.entries(v).map(([k, x]) => `${k}:${formatValue(x)}`);
    return `map[${items.sort().join(" ")}]`;
  }
  return "<func>";
}

/** A property of an object (own, or a getter of its class; not Object.prototype's). */
function field(obj: unknown, name: string): unknown {
  const ok = typeof obj === "object" && obj !== null && name in obj;
  if (ok && (Object.hasOwn(obj, name) || !(name in Object.prototype))) return (obj as Record<string, unknown>)[name];
  throw tplError(`can't evaluate field ${name}`);
}

function index(obj: unknown, ...keys: unknown[]): unknown {
  for (const k of keys) {
    if (Array.isArray(obj) || typeof obj === "string") {
      const i = typeof k === "number" ? k : NaN;
      if (!Number.isInteger(i) || i < 0 || i >= obj.length) {
        throw tplError(`index out of range: ${formatValue(k)}`);
      }
      obj = obj[i];
    } else if (typeof obj === "object" && obj !== null) {
      obj = Object.hasOwn(obj, String(k)) ? (obj as Record<string, unknown>)[String(k)] : "";
    } else throw tplError(`can't index item of type ${obj === null ? "nil" : typeof obj}`);
  }
  return obj;
}

function printf(format: unknown, ...args: unknown[]): string {
  let n = 0;
  return String(format).replace(/%([svdqt%])/g, (_m, verb: string) => {
    if (verb === "%") return "%";
    if (n >= args.length) return `%!${verb}(MISSING)`;
    const a = args[n++];
    if (verb === "q") return JSON.stringify(formatValue(a));
    return verb === "d" && typeof a !== "number" ? `%!d(${formatValue(a)})` : formatValue(a);
  });
}

const str = (v: unknown): string => formatValue(v);
const FUNCS: Record<string, { min: number; max: number; fn: (...a: unknown[]) => unknown }> = {
  json: { min: 1, max: 1, fn: (v) => JSON.stringify(v) ?? "null" },
  upper: { min: 1, max: 1, fn: (v) => str(v).toUpperCase() },
  lower: { min: 1, max: 1, fn: (v) => str(v).toLowerCase() },
  join: { min: 2, max: 2, fn: (l, sep) => (Array.isArray(l) ? l.map(str).join(str(sep)) : str(l)) },
  split: { min: 2, max: 2, fn: (s, sep) => str(s).split(str(sep)) },
  index: { min: 1, max: Infinity, fn: index },
  len: { min: 1, max: 1, fn: (v) => items(v).length },
  printf: { min: 1, max: Infinity, fn: printf },
};

function evalArg(a: Arg, dot: unknown): unknown {
  if (a.k === "lit") return a.v;
  if (a.k === "sub") return evalPipeline(a.p, dot);
  if (a.k === "fn") return call(a.name, []);
  let cur = dot;
  for (const seg of a.path) cur = field(cur, seg);
  return cur;
}

function call(name: string, args: unknown[]): unknown {
  const f = FUNCS[name];
  if (f === undefined) throw tplError(`function "${name}" not defined`);
  if (args.length < f.min || args.length > f.max) {
    throw tplError(`wrong number of args for ${name}: got ${args.length}`);
  }
  return f.fn(...args);
}

function evalPipeline(p: Pipeline, dot: unknown): unknown {
  let piped: unknown[] = [];
  for (const [head, ...tail] of p) {
    if (head === undefined) continue;
    const args = [...tail.map((a) => evalArg(a, dot)), ...piped];
    let v: unknown;
    if (head.k === "fn") v = call(head.name, args);
    else {
      const target = evalArg(head, dot);
      if (typeof target === "function") v = (target as (...a: unknown[]) => unknown)(...args);
      else if (args.length > 0) throw tplError(`can't give argument to non-function ${formatValue(target)}`);
      else v = target;
    }
    piped = [v];
  }
  return piped[0];
}

/** Elements of an array, values of an object by sorted key (range and len), characters of a string. */
const items = (v: unknown): unknown[] => {
  if (Array.isArray(v)) return v;
  if (typeof v === "string") return [...v];
  if (typeof v !== "object" || v === null) return [];
  return Object.entries(v).sort(([a], [b]) => (a < b ? -1 : 1)).map(([, x]) => x as unknown);
};
const truthy = (v: unknown): boolean =>
  typeof v === "object" && v !== null ? items(v).length > 0 : Boolean(v);

function execute(nodes: readonly Node[], dot: unknown, header?: (p: Pipeline) => string): string {
  let out = "";
  for (const n of nodes) {
    if (typeof n === "string") out += n;
    else if (header !== undefined) out += header(n.p);
    else if (n.k === "out") out += formatValue(evalPipeline(n.p, dot));
    else {
      const v = evalPipeline(n.p, dot);
      if (n.k === "if") out += execute(truthy(v) ? n.body : n.alt, dot);
      else {
        const list = typeof v === "object" && v !== null ? items(v) : [];
        out += list.length === 0 ? execute(n.alt, dot) : list.map((x) => execute(n.body, x)).join("");
      }
    }
  }
  return out;
}

/** Render a Go-style template (see the module doc) against one value. */
export function renderTemplate(template: string, value: unknown): string {
  return execute(parse(template), value);
}

/** Options for `renderFormat`. */
export interface FormatOptions {
  /**
   * Column header per field path or name (`ID` -> `NETWORK ID`); other headers are derived
   * from the field's last name (`CreatedAt` -> `CREATED AT`).
   */
  readonly headers?: Readonly<Record<string, string>>;
  /** The template a bare `table` format stands for. */
  readonly defaultTable?: string;
}

const derive = (name: string): string => name.replace(/([a-z0-9])([A-Z])/g, "$1 $2").toUpperCase();

/**
 * Render rows for a `--format` value: `json` gives one JSON object per line; `table TEMPLATE`
 * gives a header row and aligned columns (cells split on tabs); anything else is a template
 * rendered once per row. Every row's output ends in "\n".
 */
export function renderFormat(
  format: string,
  rows: readonly unknown[],
  options: FormatOptions = {},
): string {
  const fmt = format.trim();
  if (fmt === "json") return rows.map((r) => `${JSON.stringify(r)}\n`).join("");
  if (!fmt.startsWith("table")) {
    const nodes = parse(fmt);
    return rows.map((r) => `${execute(nodes, r)}\n`).join("");
  }
  const tpl = fmt.slice(5).trim() || options.defaultTable;
  if (tpl === undefined) throw tplError(`"table" needs a template, e.g. table {{.Name}}`);
  const nodes = parse(tpl);
  const header = (p: Pipeline): string => {
    const path = firstField(p);
    if (path === undefined || path.length === 0) return "";
    const name = path.at(-1) ?? "";
    return options.headers?.[path.join(".")] ?? options.headers?.[name] ?? derive(name);
  };
  const lines = [execute(nodes, undefined, header), ...rows.map((r) => execute(nodes, r))];
  return tabulate(lines.flatMap((l) => l.split("\n")).map((l) => l.split("\t")));
}

function firstField(p: Pipeline): string[] | undefined {
  for (const a of p.flat()) {
    const found = a.k === "field" ? a.path : a.k === "sub" ? firstField(a.p) : undefined;
    if (found !== undefined) return found;
  }
  return undefined;
}

// ---- filters ------------------------------------------------------------------------

/** Parsed `--filter` values: key -> values (repeated key = OR, different keys = AND). */
export type Filters = Map<string, string[]>;

/** Filter keys `knit network ls` accepts (docker's set). */
export const NetworkFilterKeys = ["dangling", "driver", "id", "label", "name", "scope", "type"] as const;

/** Parse repeated `--filter key=value` flags, rejecting keys outside `allowed`. */
export function parseFilters(list: readonly string[], allowed: readonly string[]): Filters {
  const filters: Filters = new Map();
  for (const item of list) {
    const eq = item.indexOf("=");
    if (eq < 0) throw invalid("bad format of filter (expected name=value)");
    const key = item.slice(0, eq).trim().toLowerCase();
    const value = item.slice(eq + 1).trim();
    if (!allowed.includes(key)) throw invalid(`invalid filter '${key}'`);
    const values = filters.get(key) ?? [];
    if (!values.includes(value)) values.push(value);
    filters.set(key, values);
  }
  return filters;
}

/** What network filters look at; a model `Network` fits. Pass `inUse` when allowing `dangling`. */
export interface FilterableNetwork {
  readonly id: string;
  readonly name: string;
  readonly driver: string;
  readonly scope: string;
  readonly labels: Readonly<Record<string, string>>;
  readonly predefined: boolean;
  readonly inUse?: boolean;
}

/** Docker's Match: exact, else the value as an unanchored regular expression (substring if invalid). */
const matches = (value: string, source: string): boolean => {
  try {
    return value === source || new RegExp(value).test(source);
  } catch {
    return source.includes(value);
  }
};

/** Check filter values that have a fixed domain (`type`, `dangling`); throws like docker. */
export function checkNetworkFilters(filters: Filters): void {
  for (const t of filters.get("type") ?? []) {
    if (t !== "custom" && t !== "builtin") throw invalid(`invalid filter: 'type'='${t}'`);
  }
  const dangling = filters.get("dangling") ?? [];
  if (dangling.length > 1) throw invalid(`got more than one value for filter key "dangling"`);
  if (dangling[0] !== undefined && !["0", "1", "true", "false"].includes(dangling[0])) {
    throw invalid(`invalid value for filter 'dangling', must be "true" (or "1"), or "false" (or "0")`);
  }
}

/**
 * Docker's network filter semantics: `driver`, `scope` exact; `name`, `id` exact or regular
 * expression (so any substring matches); `label` = `key` or `key=value`, where every label
 * filter must match; `type` = custom|builtin; `dangling` = true (custom and unused) or false
 * (the others). Several values of another key match when any does.
 */
export function matchNetworkFilters(filters: Filters, net: FilterableNetwork): boolean {
  checkNetworkFilters(filters);
  const label = (l: string): boolean => {
    const [key = "", value] = l.split(/=(.*)/s);
    return Object.hasOwn(net.labels, key) && (value === undefined || net.labels[key] === value);
  };
  const dangling = !net.predefined && net.inUse !== true;
  const tests: Record<string, (v: string) => boolean> = {
    driver: (v) => v === net.driver,
    scope: (v) => v === net.scope,
    name: (v) => matches(v, net.name),
    id: (v) => matches(v, net.id),
    type: (v) => v === (net.predefined ? "builtin" : "custom"),
    dangling: (v) => (v === "1" || v === "true") === dangling,
  };
  return [...filters].every(([key, values]) =>
    key === "label" ? values.every(label) : values.some((v) => tests[key]?.(v) ?? true),
  );
}

/** Labels as `k=v,k2=v2` (sorted), as `knit network ls --format '{{.Labels}}'` shows them. */
export const joinLabels = (labels: Readonly<Record<string, string>>): string =>
  Object.keys(labels)
    .sort()
    .map((k) => `${k}=${labels[k] ?? ""}`)
    .join(",");
