/**
 * Terminal output. Plain write(2) calls: `process.stdout` builds a Node stream on first use,
 * which costs tens of milliseconds per CLI start under Bun.
 */
import { writeSync } from "node:fs";
import { isatty } from "node:tty";

export const writeOut = (text: string): void => {
  writeSync(1, text);
};
export const writeErr = (text: string): void => {
  writeSync(2, text);
};
/** True when standard output is a terminal (for colour). */
/** True when standard output is a terminal (for colour). */
export const stdoutIsTty = (): boolean => isatty(1);
