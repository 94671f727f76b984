/**
 * The README's demo must keep working: run `knit demo` (and the cluster demo) exactly as a
 * user would, inside this test run's private lab, and require every check it makes to hold.
 * The demos build their own labs and clean them up; the leak check below proves it.
 */
import { describe, expect, test } from "bun:test";
import { existsSync, readdirSync } from "node:fs";
import { KNIT_BIN, NETNS_DIR, runCommand } from "../src/lab/lab.ts";

const namespaces = (): string[] => (existsSync(NETNS_DIR) ? readdirSync(NETNS_DIR).sort() : []);

describe("knit demo", () => {
  for (const args of [["demo"], ["demo", "--cluster"]]) {
    test(`knit ${args.join(" ")}: every check holds and nothing is left`, async () => {
      const before = namespaces();
      const r = await runCommand([KNIT_BIN, ...args], { check: false, timeoutMs: 240_000 });
      expect(r.stdout).toContain(`${args.join(" ")}: every check held`);
      expect(r.stdout).not.toContain("✘");
      expect(r.code).toBe(0);
      expect(namespaces()).toEqual(before);
    }, 300_000);
  }
});
