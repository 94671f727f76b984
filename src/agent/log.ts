/**
 * The agent's log: one JSON object per line (`time`, `level`, `msg`, then fields), on
 * standard error. An auto-started agent's standard error is `<state dir>/agent.log`; under
 * systemd it is the journal. Lines are written synchronously, so a crash loses none.
 */
import { writeSync } from "node:fs";

/** Log levels, least severe first. */
export const LogLevels = ["debug", "info", "warn", "error"] as const;
/** One of {@link LogLevels}. */
export type LogLevel = (typeof LogLevels)[number];

/** Extra fields of a log line (Errors are logged as their message). */
export type LogFields = Record<string, unknown>;

/** A structured logger. */
export interface Logger {
  debug(msg: string, fields?: LogFields): void;
  info(msg: string, fields?: LogFields): void;
  warn(msg: string, fields?: LogFields): void;
  error(msg: string, fields?: LogFields): void;
}

/** Errors as their message (JSON.stringify turns an Error into `{}`). */
function plain(fields: LogFields): LogFields {
  const out: LogFields = {};
  for (const [k, v] of Object.entries(fields)) out[k] = v instanceof Error ? v.message : v;
  return out;
}

/** A logger writing lines at `level` and above to `fd` (default: standard error). */
export function jsonLogger(level: LogLevel, fd = 2): Logger {
  const min = LogLevels.indexOf(level);
  const write = (lvl: LogLevel, msg: string, fields: LogFields = {}): void => {
    if (LogLevels.indexOf(lvl) < min) return;
    const line = JSON.stringify({ time: new Date().toISOString(), level: lvl, msg, ...plain(fields) });
    try {
      writeSync(fd, `${line}\n`);
    } catch {
      // the log is gone (its file was removed, the terminal closed): keep serving
    }
  };
  return {
    debug: (msg, fields) => write("debug", msg, fields),
    info: (msg, fields) => write("info", msg, fields),
    warn: (msg, fields) => write("warn", msg, fields),
    error: (msg, fields) => write("error", msg, fields),
  };
}
