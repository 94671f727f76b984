/**
 * Helper process of overlay.test.ts: connects (or disconnects) many existing namespaces to a
 * network through the engine, all at once, from one knit host. Run inside the host's network
 * namespace with the host's environment (KNIT_STATE_DIR, KNIT_HOST, KNIT_STORE):
 *
 *   bun test/overlay-burst.ts connect|disconnect NETWORK START_AT_MS NS...
 *
 * With one such process per host, every connect of every host is in flight at the same
 * moment (each process waits until the wall clock reaches START_AT_MS), which a burst of CLI
 * processes cannot guarantee: their start-up spreads them out. Prints one JSON line:
 * `{ "ok": n, "errors": [...] }`.
 */
import { openStore } from "../src/store/open.ts";
import { adoptHostName } from "../src/engine/owner.ts";
import { resolveContainer } from "../src/engine/containers.ts";
import { connectSandbox, disconnectSandbox } from "../src/engine/endpoints.ts";
import { findSandbox } from "../src/engine/engine.ts";

const [mode = "", network = "", startAt = "0", ...namespaces] = process.argv.slice(2);
const stateDir = process.env.KNIT_STATE_DIR ?? "";
adoptHostName(stateDir, process.env.KNIT_HOST);
const engine = { store: await openStore(process.env.KNIT_STORE, stateDir), stateDir };
const errors: string[] = [];
let ok = 0;
try {
  const sandboxes = mode === "connect" ? await Promise.all(namespaces.map((ns) => resolveContainer(engine, ns))) : [];
  await Bun.sleep(Math.max(0, Number(startAt) - Date.now()));
  await Promise.all(
    namespaces.map(async (ns, i) => {
      try {
        if (mode === "connect") await connectSandbox(engine, network, sandboxes[i] ?? (await resolveContainer(engine, ns)));
        else {
          const sb = await findSandbox(engine, ns);
          if (sb) await disconnectSandbox(engine, network, sb);
        }
        ok++;
      } catch (err) {
        errors.push(`${ns}: ${err instanceof Error ? err.message : String(err)}`);
      }
    }),
  );
} finally {
  await engine.store.close();
}
console.log(JSON.stringify({ ok, errors }));
process.exit(0);
