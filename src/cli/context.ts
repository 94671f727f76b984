/**
 * What every CLI command gets: the engine (opened lazily, so `--help` never touches the
 * store), output functions, and the error printer.
 */
import type { CommandSpec } from "./args.ts";
import type { Engine } from "../engine/engine.ts";

export interface CommandContext {
  engine(): Promise<Engine>;
  out(text: string): void;
  /** Print an error the way the CLI does (message, then hint), without exiting. */
  error(err: unknown): void;
  /** Print a command's help; returns exit code 0. */
  help(spec: CommandSpec): number;
}
