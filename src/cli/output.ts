/**
 * Terminal output. Plain write(2) calls: `process.stdout` builds a Node stream on first use,
 * which costs tens of milliseconds per CLI start under Bun.
 */
import { readlinkSync, writeSync } from "node:fs";

export const writeOut = (text: string): void => {
  writeSync(1, text);
};
export const writeErr = (text: string): void => {
  writeSync(2, text);
};
/**
 * True when standard output is a terminal (for colour): what /proc says file descriptor 1 is.
 * Not node:tty's isatty, whose import alone costs about 10 ms of CPU on every CLI start.
 */
export const stdoutIsTty = (): boolean => {
  try {
    return /^\/dev\/(pts\/\d+|tty\w*|console)$/.test(readlinkSync("/proc/self/fd/1"));
  } catch {
    return false;
  }
};
