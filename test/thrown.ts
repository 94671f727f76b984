import { KnitError } from "../src/errors.ts";

/** The KnitError a synchronous call throws (fails the test when it throws none, or another error). */
export function thrownKnitError(fn: () => unknown): KnitError {
  try {
    fn();
  } catch (err) {
    if (err instanceof KnitError) return err;
    throw err;
  }
  throw new Error("expected the call to fail with a KnitError");
}
