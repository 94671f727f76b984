/**
 * One error class for all of knit. Every failure a user can see carries a stable `code`
 * (used by the CLI exit path, the CNI error mapping and the Docker plugin's {"Err"}),
 * a message that says what was wrong, and optionally a hint that says how to fix it.
 */

/** Stable error codes. Front ends map these to their own protocols. */
export const ErrorCodes = [
  "invalid-argument", // bad flag, option, CIDR, name ...
  "not-found", // network, sandbox, endpoint, container does not exist
  "conflict", // duplicate name, overlapping subnet, address in use, network in use
  "unsupported", // driver or kernel feature missing
  "kernel", // a kernel command failed
  "store", // the store failed or is unreachable
  "io", // file system or process I/O
  "internal", // a bug
] as const;
export type ErrorCode = (typeof ErrorCodes)[number];

export interface KnitErrorOptions {
  /** How to fix it, shown to CLI users on its own line. */
  hint?: string;
  cause?: unknown;
  /** Further errors collected during best-effort work (teardown). */
  errors?: readonly Error[];
}

/** The error type every layer of knit throws. */
export class KnitError extends Error {
  override readonly name = "KnitError";
  readonly code: ErrorCode;
  readonly hint: string | undefined;
  readonly errors: readonly Error[];

  constructor(code: ErrorCode, message: string, options: KnitErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.code = code;
    this.hint = options.hint;
    this.errors = options.errors ?? [];
  }
}

/** Shorthand constructors, so call sites read as the kind of failure they report. */
export const invalid = (message: string, hint?: string): KnitError =>
  new KnitError("invalid-argument", message, hint === undefined ? {} : { hint });
export const notFound = (message: string, hint?: string): KnitError =>
  new KnitError("not-found", message, hint === undefined ? {} : { hint });
export const conflict = (message: string, hint?: string): KnitError =>
  new KnitError("conflict", message, hint === undefined ? {} : { hint });
export const unsupported = (message: string, hint?: string): KnitError =>
  new KnitError("unsupported", message, hint === undefined ? {} : { hint });

/** Wrap anything thrown into a KnitError, keeping KnitErrors as they are. */
export function asKnitError(err: unknown): KnitError {
  if (err instanceof KnitError) return err;
  if (err instanceof Error) return new KnitError("internal", err.message, { cause: err });
  return new KnitError("internal", String(err));
}

/**
 * Run every step even when some fail (best-effort teardown), then throw one error that
 * lists all failures. Deleting what is already gone is the steps' own business (idempotent).
 */
export async function runAll(what: string, steps: readonly (() => Promise<unknown>)[]): Promise<void> {
  const errors: Error[] = [];
  for (const step of steps) {
    try {
      await step();
    } catch (err) {
      errors.push(err instanceof Error ? err : new Error(String(err)));
    }
  }
  if (errors.length === 1 && errors[0] instanceof KnitError) throw errors[0];
  if (errors.length > 0) {
    const detail = errors.map((e) => e.message).join("; ");
    throw new KnitError("kernel", `${what}: ${detail}`, { errors });
  }
}
