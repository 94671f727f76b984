/**
 * CNI errors: the spec's error result (`{cniVersion, code, msg, details}` on stdout, exit
 * code 1) and the mapping from knit's own error codes to CNI codes.
 *
 * Codes 0-99 are the spec's (and libcni's: 8 is Go's ErrInvalidNetNS, 999 its ErrInternal);
 * knit's own start at 100 and are documented in docs/cni.md.
 */
import type { KnitError } from "../errors.ts";

/** The well-known codes (SPEC.md "Error"), plus the ones knit uses for its own failures. */
export const CniCodes = {
  incompatibleVersion: 1,
  unsupportedField: 2,
  unknownContainer: 3,
  invalidEnv: 4,
  io: 5,
  decode: 6,
  invalidConfig: 7,
  invalidNetns: 8,
  tryAgain: 11,
  notAvailable: 50,
  limitedConnectivity: 51,
  /** An address, interface name, port or name is already taken. */
  conflict: 100,
  /** A kernel command (ip, nft, tc, sysctl) failed. */
  kernel: 101,
  /** A driver or kernel feature is missing. */
  unsupported: 102,
  /** knit's store failed. */
  store: 103,
  /** CHECK found the attachment missing or different from prevResult. */
  checkFailed: 104,
  /** A delegated plugin (IPAM) failed; its own error is in details. */
  delegate: 105,
  /** A bug. */
  internal: 999,
} as const;

/** An error a CNI plugin reports. */
export class CniError extends Error {
  override readonly name = "CniError";
  constructor(
    readonly code: number,
    message: string,
    readonly details = "",
  ) {
    super(message);
  }
}

/** What knit's error codes mean in CNI terms. */
const FROM_KNIT: Record<KnitError["code"], number> = {
  "invalid-argument": CniCodes.invalidConfig,
  "not-found": CniCodes.invalidConfig,
  conflict: CniCodes.conflict,
  unsupported: CniCodes.unsupported,
  kernel: CniCodes.kernel,
  store: CniCodes.store,
  io: CniCodes.io,
  internal: CniCodes.internal,
};

/** Anything thrown, as a CniError. */
export function toCniError(err: unknown): CniError {
  if (err instanceof CniError) return err;
  // A CniError of another copy of this module (the plugin's client and its full plugin are
  // two bundles, each with its own): the same error.
  if (err instanceof Error && err.name === "CniError" && typeof (err as Partial<CniError>).code === "number") {
    const e = err as CniError;
    return new CniError(e.code, e.message, typeof e.details === "string" ? e.details : "");
  }
  if (err instanceof Error && err.name === "KnitError") {
    const k = err as KnitError;
    const retry = k.code === "store" && /too much concurrent change|busy|locked/i.test(k.message);
    const details = [k.hint, ...k.errors.map((e) => e.message)].filter((s): s is string => !!s).join("; ");
    return new CniError(retry ? CniCodes.tryAgain : FROM_KNIT[k.code], k.message, details);
  }
  if (err instanceof Error) return new CniError(CniCodes.internal, err.message, err.stack ?? "");
  return new CniError(CniCodes.internal, String(err));
}

/** The error result JSON of the spec. */
export function errorJson(err: CniError, cniVersion: string): string {
  const out: { cniVersion: string; code: number; msg: string; details?: string } = { cniVersion, code: err.code, msg: err.message };
  if (err.details) out.details = err.details;
  return JSON.stringify(out);
}
