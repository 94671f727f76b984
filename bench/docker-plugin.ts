/**
 * Benchmark of knit as Docker's network plugin, against Docker's own bridge driver on the
 * same daemon, in the same run:
 *
 *   scripts/lab-run node_modules/.bin/bun bench/docker-plugin.ts [--rounds N] [--warmup N] [--runs N]
 *
 * 1. `docker network connect NET c` + `docker network disconnect NET c` of one running
 *    container, on a network of Docker's bridge driver and on knit bridge networks (with
 *    knit's IPAM driver and with Docker's), interleaved round by round so that both see the
 *    same machine load. The time is the two CLI commands' wall time, as a user sees it.
 *    Target: knit / Docker <= 1.2 (median of the rounds).
 * 2. `docker run --rm --network NET bb true` on a knit overlay network against a knit bridge
 *    network, on a one-host cluster (etcd store, the agent registered: overlays need one).
 *
 * Each part runs in a lab host of its own: dockerd (Debian's 20.10, private data and exec
 * roots) and a knit agent serving the plugin socket (part 1: the default SQLite store).
 */
import { existsSync } from "node:fs";
import { Lab, inLab, runInLab, waitFor } from "../src/lab/lab.ts";
import { startDocker, dockerMissing, type DockerDaemon } from "../src/lab/docker.ts";
import { etcdMissing } from "../src/lab/etcd.ts";
import { ClusterLab } from "../src/demo/cluster-lab.ts";
import { argNumber, interleaved, printTable, ratio, round, summarize, writeResults, type Variant } from "./lib.ts";

if (!inLab()) process.exit(await runInLab([process.execPath, ...process.argv.slice(1)]));

const ROUNDS = argNumber("rounds", 30);
const WARMUP = argNumber("warmup", 3);
const RUNS = argNumber("runs", 15);
const SOCKET = "/run/docker/plugins/knit.sock";

async function timedDocker(d: DockerDaemon, args: readonly string[]): Promise<number> {
  const started = performance.now();
  await d.dockerOk(args);
  return performance.now() - started;
}

/** One connect + disconnect of the bench container, in ms. */
const connectCycle = (d: DockerDaemon, net: string) => async (): Promise<number> =>
  (await timedDocker(d, ["network", "connect", net, "bench"])) + (await timedDocker(d, ["network", "disconnect", net, "bench"]));

/** `docker run` on knit overlay and bridge networks of a one-host cluster; undefined without etcd. */
async function dockerRunOverlay(lab: Lab): Promise<Record<string, number[]> | undefined> {
  const why = etcdMissing();
  if (why) {
    console.log(`\ndocker run on a knit overlay network: not measured (${why})`);
    return undefined;
  }
  const cl = await ClusterLab.create(lab, { hosts: 1, lanMachine: false, internet: false, etcdNet: 88, logLevel: "warn" });
  const c = cl.hosts[0];
  if (!c) throw new Error("no cluster host");
  const d = await startDocker(c.host);
  await d.ensureBusyboxImage();
  await cl.stopAgent(c);
  await cl.startAgent(c, ["--docker-plugin", "--docker-host", d.dockerHost]);
  await d.dockerOk(["network", "create", "-d", "knit", "--ipam-driver", "knit", "--subnet", "10.84.0.0/24", "knit-bridge"]);
  await d.dockerOk(["network", "create", "-d", "knit", "--ipam-driver", "knit", "-o", "knit.driver=overlay", "--subnet", "10.83.0.0/24", "knit-overlay"]);
  const run = (net: string) => () => timedDocker(d, ["run", "--rm", "--network", net, "bb", "true"]);
  const variants: Variant[] = [
    { name: "knit bridge", sample: run("knit-bridge") },
    { name: "knit overlay", sample: run("knit-overlay") },
  ];
  await interleaved(variants, 1);
  const out = await interleaved(variants, RUNS, (i) => process.stderr.write(`\rdocker run round ${i + 1}/${RUNS}`));
  process.stderr.write("\n");
  for (const n of ["knit-bridge", "knit-overlay", "docker_gwbridge"]) await d.docker(["network", "rm", n]);
  await d.stop();
  return out;
}

const missing = dockerMissing();
if (missing) {
  console.error(`cannot run: ${missing}`);
  process.exit(2);
}

const lab = await Lab.create("bdp");
try {
  const h = await lab.host("h");
  const d = await startDocker(h);
  await d.ensureBusyboxImage();
  const agent = h.spawnKnit(["agent", "--docker-plugin", "--docker-host", d.dockerHost, "--log-level", "warn"]);
  if (!(await waitFor(() => existsSync(SOCKET) && existsSync(`${h.stateDir}/agent.pid`), 20_000, 20))) throw new Error(`the agent did not start:\n${agent.output()}`);

  await d.dockerOk(["network", "create", "-d", "bridge", "--subnet", "10.80.0.0/24", "docker-bridge"]);
  await d.dockerOk(["network", "create", "-d", "knit", "--ipam-driver", "knit", "--subnet", "10.81.0.0/24", "knit-bridge"]);
  await d.dockerOk(["network", "create", "-d", "knit", "--subnet", "10.82.0.0/24", "knit-bridge-dipam"]);
  await d.dockerOk(["run", "-d", "--init", "--name", "bench", "bb", "sleep", "36000"]);
  // The knit network works before anything is timed.
  await d.dockerOk(["network", "connect", "knit-bridge", "bench"]);
  await d.dockerOk(["exec", "bench", "ping", "-c1", "-W2", "10.81.0.1"]);
  await d.dockerOk(["network", "disconnect", "knit-bridge", "bench"]);

  const variants: Variant[] = [
    { name: "docker bridge", sample: connectCycle(d, "docker-bridge") },
    { name: "knit bridge (knit IPAM)", sample: connectCycle(d, "knit-bridge") },
    { name: "knit bridge (Docker IPAM)", sample: connectCycle(d, "knit-bridge-dipam") },
  ];
  await interleaved(variants, WARMUP);
  const samples = await interleaved(variants, ROUNDS, (i) => process.stderr.write(`\rconnect+disconnect round ${i + 1}/${ROUNDS}`));
  process.stderr.write("\n");
  const base = summarize(samples["docker bridge"] ?? []);
  const rows = variants.map((v) => {
    const s = summarize(samples[v.name] ?? []);
    return [v.name, round(s.median), round(s.p90), round(s.min), ratio(s.median, base.median)] as const;
  });
  printTable(`docker network connect + disconnect, ms (${ROUNDS} rounds, interleaved)`, ["network", "median", "p90", "min", "x docker"], rows);
  const verdict = ratio(summarize(samples["knit bridge (knit IPAM)"] ?? []).median, base.median);
  console.log(`\nknit bridge (knit IPAM) / docker bridge = ${verdict} (target <= 1.2): ${verdict <= 1.2 ? "PASS" : "FAIL"}`);

  await d.dockerOk(["rm", "-f", "bench"]);
  for (const n of ["docker-bridge", "knit-bridge", "knit-bridge-dipam"]) await d.dockerOk(["network", "rm", n]);
  await agent.stop();
  await d.stop();

  // 2. docker run on a knit overlay network vs a knit bridge network: a one-host cluster
  // (etcd store, the agent registered), since overlay networks need one.
  const runs = await dockerRunOverlay(lab);
  if (runs) {
    const b = summarize(runs["knit bridge"] ?? []);
    const o = summarize(runs["knit overlay"] ?? []);
    printTable(`docker run --rm --network NET bb true, ms (${RUNS} rounds, interleaved; cluster store)`, ["network", "median", "p90", "x bridge"], [
      ["knit bridge", round(b.median), round(b.p90), 1],
      ["knit overlay", round(o.median), round(o.p90), ratio(o.median, b.median)],
    ]);
  }

  const path = writeResults("docker-plugin", {
    rounds: ROUNDS,
    connectDisconnectMs: Object.fromEntries(Object.entries(samples).map(([k, v]) => [k, summarize(v)])),
    ratioKnitToDocker: verdict,
    dockerRunMs: Object.fromEntries(Object.entries(runs ?? {}).map(([k, v]) => [k, summarize(v)])),
  });
  console.log(`\nresults: ${path}`);
} finally {
  await lab.cleanup();
}
