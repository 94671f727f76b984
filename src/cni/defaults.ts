/**
 * Constants of a plugin invocation shared by the plugin process's two entries (src/cni/main.ts
 * and the lean src/cni/client.ts, which must not load the configuration layer to learn them),
 * so that both read the same state directory and refuse the same input with the same error.
 */
import { CniCodes, CniError } from "./errors.ts";

/** knit's state directory when neither the configuration nor KNIT_STATE_DIR names one. */
export const DEFAULT_STATE_DIR = "/var/lib/knit";

/** Largest configuration read from stdin. */
export const MAX_STDIN = 16 << 20;

/** The error for a larger one (code 5). */
export const stdinTooLarge = (): CniError => new CniError(CniCodes.io, `network config on stdin is larger than ${MAX_STDIN} bytes`);

/** Where the kernel tools are looked for when a runtime starts a plugin with no PATH. */
export const DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
