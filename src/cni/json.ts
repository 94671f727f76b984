/**
 * Reading CNI JSON the way Go's encoding/json reads it into a struct, because that is what
 * every runtime and reference plugin does and what configurations in the wild rely on:
 *
 * - object keys match field names case-insensitively (`"bandWidth"` is `bandwidth`); when
 *   several keys match one field, the last one in the document wins, as Go assigns each in turn;
 * - `null` leaves a field unset; unknown keys are ignored;
 * - a value of the wrong type is a decoding error (CNI code 6), naming the field and type.
 *
 * Semantic checks (a bad CIDR, a port out of range) are the callers' and give code 7.
 */
import { CniCodes, CniError } from "./errors.ts";

export type JsonObject = Record<string, unknown>;

export const isObject = (v: unknown): v is JsonObject => typeof v === "object" && v !== null && !Array.isArray(v);

const fold = (s: string): string => s.toLowerCase();

/** A JSON type name for messages. */
function typeName(v: unknown): string {
  if (v === null) return "null";
  if (Array.isArray(v)) return "array";
  return typeof v === "object" ? "object" : typeof v;
}

function decodeError(path: string, want: string, got: unknown): CniError {
  return new CniError(CniCodes.decode, `cannot decode ${path}: expected ${want}, got ${typeName(got)}`);
}

/** The value of field `name` of `obj`, matched as Go matches keys; undefined when absent or null. */
export function field(obj: JsonObject, name: string): unknown {
  // JSON.parse keeps the last of exact duplicates; among case variants the last key wins too.
  const want = fold(name);
  let last: string | undefined;
  for (const key of Object.keys(obj)) if (fold(key) === want) last = key;
  const found = last === undefined ? undefined : obj[last];
  return found === null ? undefined : found;
}

/** A typed view of one JSON object, for reading fields with Go's rules. */
export class Fields {
  constructor(
    readonly obj: JsonObject,
    /** Where the object sits, for messages ("config", "config.ipam"). */
    readonly path: string,
  ) {}

  static of(value: unknown, path: string): Fields {
    if (!isObject(value)) throw decodeError(path, "an object", value);
    return new Fields(value, path);
  }

  has(name: string): boolean {
    return field(this.obj, name) !== undefined;
  }

  raw(name: string): unknown {
    return field(this.obj, name);
  }

  string(name: string): string | undefined {
    const v = field(this.obj, name);
    if (v === undefined) return undefined;
    if (typeof v !== "string") throw decodeError(`${this.path}.${name}`, "a string", v);
    return v;
  }

  bool(name: string): boolean | undefined {
    const v = field(this.obj, name);
    if (v === undefined) return undefined;
    if (typeof v !== "boolean") throw decodeError(`${this.path}.${name}`, "true or false", v);
    return v;
  }

  /** A whole number within [min, max] (Go's int/uint fields refuse fractions and overflow). */
  int(name: string, min = Number.MIN_SAFE_INTEGER, max = Number.MAX_SAFE_INTEGER): number | undefined {
    const v = field(this.obj, name);
    if (v === undefined) return undefined;
    if (typeof v !== "number" || !Number.isInteger(v) || v < min || v > max) {
      throw decodeError(`${this.path}.${name}`, `a whole number from ${min} to ${max}`, v);
    }
    return v;
  }

  object(name: string): Fields | undefined {
    const v = field(this.obj, name);
    return v === undefined ? undefined : Fields.of(v, `${this.path}.${name}`);
  }

  array(name: string): unknown[] | undefined {
    const v = field(this.obj, name);
    if (v === undefined) return undefined;
    if (!Array.isArray(v)) throw decodeError(`${this.path}.${name}`, "an array", v);
    return v as unknown[];
  }

  strings(name: string): string[] | undefined {
    const list = this.array(name);
    return list?.map((item, i) => {
      if (typeof item !== "string") throw decodeError(`${this.path}.${name}[${i}]`, "a string", item);
      return item;
    });
  }

  objects(name: string): Fields[] | undefined {
    return this.array(name)?.map((item, i) => Fields.of(item, `${this.path}.${name}[${i}]`));
  }

  /** A map of strings (`{"k": "v"}`), e.g. driver options and labels. */
  stringMap(name: string): Record<string, string> | undefined {
    const o = this.object(name);
    if (!o) return undefined;
    const out: Record<string, string> = {};
    for (const [k, v] of Object.entries(o.obj)) {
      if (v === null) continue;
      if (typeof v !== "string") throw decodeError(`${o.path}.${k}`, "a string", v);
      out[k] = v;
    }
    return out;
  }
}

/** Parse stdin as JSON; malformed text is CNI code 6. */
export function parseJson(text: string, what: string): unknown {
  try {
    return JSON.parse(text) as unknown;
  } catch (err) {
    throw new CniError(CniCodes.decode, `error parsing ${what}: ${(err as Error).message}`);
  }
}
