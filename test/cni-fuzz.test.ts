/**
 * Bad input, end to end: the installed plugins (knit, knit-ipam, knit-portmap) are run as a
 * runtime runs them, inside a lab host, with random, truncated, mistyped, binary and huge
 * stdin and broken environments, for every command. Every run must end with the spec's
 * error JSON on stdout and the right code where the input decides it (or succeed), never a
 * crash; and when it is all over, the host holds nothing that a failed call made.
 */
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { Lab, type LabHost, type LabNode } from "../src/lab/lab.ts";
import { agentMode, cniTrace, endpointClaims, installCni, links, randomJson, storeKeys } from "./cni-lab.ts";

setDefaultTimeout(300_000);

let lab: Lab;
let h: LabHost;
let binDir: string;
let ctr: LabNode;

beforeAll(async () => {
  lab = await Lab.create("cnif");
  h = await lab.host("h");
  ctr = await lab.ns("ctr");
  binDir = await installCni(lab, h);
  await h.knitOk(["network", "create", "--subnet", "10.94.0.0/24", "front"]);
});

afterAll(async () => {
  await h?.knit(["network", "rm", "front"]);
  await lab?.cleanup();
});

function prng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

interface Case {
  plugin: string;
  env: Record<string, string>;
  stdin: string | Uint8Array;
  /** The code the input decides, or undefined when any error code (or success) is right. */
  want?: number;
  what: string;
}

const CODES = [1, 2, 3, 4, 5, 6, 7, 8, 11, 50, 51, 100, 101, 102, 103, 104, 105, 999];
const COMMANDS = ["ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION"] as const;
const PLUGINS = ["knit", "knit-ipam", "knit-portmap"] as const;

async function runCase(c: Case): Promise<{ code: number; stdout: string; stderr: string }> {
  const proc = Bun.spawn(["nsenter", `--net=${h.path}`, "--", `${binDir}/${c.plugin}`], {
    env: { PATH: process.env.PATH ?? "/usr/bin:/bin", ...h.knitEnv({ KNIT_AGENT_AUTOSTART: "0", ...(agentMode ? { KNIT_CNI_TRACE: "1" } : {}) }), ...c.env },
    stdin: typeof c.stdin === "string" ? new TextEncoder().encode(c.stdin) : c.stdin,
    stdout: "pipe",
    stderr: "pipe",
  });
  const [stdout, stderr, code] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
  return { code, stdout, stderr };
}

describe("bad input for every command", () => {
  test("random, truncated, mistyped, binary and huge stdin; broken environments: error JSON with the right code, nothing left", async () => {
    const rnd = prng(4711);
    const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rnd() * xs.length)] as T;
    const env = (cmd: string, n: number): Record<string, string> => ({ CNI_COMMAND: cmd, CNI_CONTAINERID: `fz${n}`, CNI_NETNS: ctr.path, CNI_IFNAME: `e${n % 1000}`, CNI_PATH: binDir });
    const valid = (n: number) => ({ cniVersion: "1.1.0", name: "fuzznet", type: "knit", network: "front", ipam: { type: "knit-ipam", network: "front" }, runtimeConfig: { portMappings: [{ hostPort: 20000 + n, containerPort: 80, protocol: "tcp" }] }, "cni.dev/valid-attachments": [] });
    const cases: Case[] = [];
    let n = 0;
    for (const plugin of PLUGINS) {
      for (const cmd of COMMANDS) {
        for (let i = 0; i < 6; i++) {
          n++;
          cases.push({ plugin, env: env(cmd, n), stdin: JSON.stringify(randomJson(rnd)), what: "random JSON" });
        }
        if (cmd === "VERSION") continue;
        n++;
        const text = JSON.stringify(valid(n));
        cases.push({ plugin, env: env(cmd, n), stdin: text.slice(0, 1 + Math.floor(rnd() * (text.length - 2))), want: 6, what: "truncated" });
        n++;
        cases.push({ plugin, env: env(cmd, n), stdin: JSON.stringify({ ...valid(n), name: pick([5, true, [], {}]) }), want: 6, what: "name of the wrong type" });
        n++;
        cases.push({ plugin, env: env(cmd, n), stdin: JSON.stringify({ ...valid(n), cniVersion: pick([1, false, ["1.1.0"]]) }), want: 6, what: "cniVersion of the wrong type" });
        n++;
        cases.push({ plugin, env: env(cmd, n), stdin: JSON.stringify({ ...valid(n), cniVersion: "9.9.9" }), want: 1, what: "unknown version" });
        n++;
        cases.push({ plugin, env: env(cmd, n), stdin: crypto.getRandomValues(new Uint8Array(64 + Math.floor(rnd() * 512))), want: 6, what: "binary" });
        n++;
        cases.push({ plugin, env: env(cmd, n), stdin: "x".repeat(17 << 20), want: 5, what: "huge (17 MiB)" });
        n++;
        cases.push({ plugin, env: { ...env(cmd, n), CNI_PATH: "" }, stdin: JSON.stringify(valid(n)), want: 4, what: "no CNI_PATH" });
        if (cmd === "ADD" || cmd === "DEL" || cmd === "CHECK") {
          n++;
          cases.push({ plugin, env: { ...env(cmd, n), CNI_IFNAME: pick(["", "x".repeat(16), "a/b", "a b", "..", "a:b"]) }, stdin: JSON.stringify(valid(n)), want: 4, what: "bad CNI_IFNAME" });
          n++;
          cases.push({ plugin, env: { ...env(cmd, n), CNI_CONTAINERID: pick(["-x", "a b", "a/b", "ü"]) }, stdin: JSON.stringify(valid(n)), want: 4, what: "bad CNI_CONTAINERID" });
          n++;
          cases.push({ plugin, env: { ...env(cmd, n), CNI_ARGS: pick(["novalue", "FOO=bar", "a=b;c"]) }, stdin: JSON.stringify(valid(n)), want: 4, what: "bad CNI_ARGS" });
          n++;
          cases.push({ plugin, env: { ...env(cmd, n), CNI_ARGS: "IgnoreUnknown=1;A=b" }, stdin: JSON.stringify({ ...valid(n), runtimeConfig: { ips: "10.94.0.9" } }), want: 6, what: "runtimeConfig.ips of the wrong type" });
        }
      }
      n++;
      cases.push({ plugin, env: { ...env("FOO", n) }, stdin: "{}", want: 4, what: "unknown command" });
      n++;
      cases.push({ plugin, env: { CNI_COMMAND: "" }, stdin: "{}", want: 4, what: "no command" });
    }
    // Mistyped fields of an otherwise valid ADD of the knit plugin, field by field.
    for (const key of ["network", "ipam", "runtimeConfig", "prevResult", "dns", "mtu", "bridge", "args", "ipMasq"]) {
      for (const bad of [5, "x", [], true]) {
        n++;
        const conf: Record<string, unknown> = { ...valid(n), [key]: bad };
        cases.push({ plugin: "knit", env: env("ADD", n), stdin: JSON.stringify(conf), what: `knit ADD with ${key}=${JSON.stringify(bad)}` });
      }
    }

    const added: Case[] = [];
    const failures: string[] = [];
    for (let i = 0; i < cases.length; i += 8) {
      const batch = cases.slice(i, i + 8);
      const outs = await Promise.all(batch.map(runCase));
      for (const [j, out] of outs.entries()) {
        const c = batch[j] as Case;
        const label = `${c.plugin} ${c.env.CNI_COMMAND ?? ""} ${c.what}`;
        if (/panic|Segmentation|TypeError|ReferenceError|at .*\.ts:\d+/.test(out.stderr)) failures.push(`${label}: crash on stderr: ${out.stderr.slice(0, 300)}`);
        // With an agent (KNIT_TEST_CNI_AGENT=1), all of it goes through the agent but what the
        // plugin keeps: VERSION, and stdin it cannot read.
        const path = cniTrace(out.stderr)?.path;
        const kept = c.env.CNI_COMMAND === "VERSION" || c.what.startsWith("huge");
        if (agentMode && path !== (kept ? "in-process" : "agent")) failures.push(`${label}: path ${String(path)}`);
        if (out.code === 0) {
          if (c.want !== undefined) failures.push(`${label}: succeeded, expected code ${c.want}`);
          if (c.env.CNI_COMMAND === "ADD") {
            const res = JSON.parse(out.stdout) as { cniVersion?: string };
            if (typeof res.cniVersion !== "string") failures.push(`${label}: ADD printed no result`);
            added.push(c);
          }
          continue;
        }
        let err: { code?: unknown; msg?: unknown; cniVersion?: unknown };
        try {
          err = JSON.parse(out.stdout) as typeof err;
        } catch {
          failures.push(`${label}: exit ${out.code} without error JSON: ${out.stdout.slice(0, 200)} ${out.stderr.slice(0, 200)}`);
          continue;
        }
        if (typeof err.code !== "number" || !CODES.includes(err.code) || typeof err.msg !== "string" || typeof err.cniVersion !== "string") {
          failures.push(`${label}: malformed error ${out.stdout.slice(0, 200)}`);
        } else if (c.want !== undefined && err.code !== c.want) failures.push(`${label}: code ${err.code} (${err.msg}), expected ${c.want}`);
      }
    }
    expect(failures).toEqual([]);

    // Whatever succeeded is taken back by DEL; what failed must have left nothing at all.
    for (const c of added) {
      const out = await runCase({ ...c, env: { ...c.env, CNI_COMMAND: "DEL" } });
      expect(out.code).toBe(0);
    }
    expect(Object.keys(await storeKeys(h, "sandboxes/"))).toEqual([]);
    expect(Object.keys(await storeKeys(h, "pending/"))).toEqual([]);
    expect(Object.keys(await storeKeys(h, "ports/"))).toEqual([]);
    expect(await endpointClaims(h)).toEqual([]);
    expect((await links(lab, h)).filter((l) => /^(veth|kb)/.test(l.ifname)).map((l) => l.ifname)).toEqual([]);
    expect((await links(lab, ctr)).map((l) => l.ifname)).toEqual(["lo"]);
    // Networks made by ADDs from random configurations (their names came from the input) go too.
    const nets = (await h.knitOk(["network", "ls", "--format", "{{.Name}}"])).stdout.split("\n").filter((s) => s && !["bridge", "host", "none", "front"].includes(s));
    for (const net of nets) await h.knitOk(["network", "rm", net]);
    console.log(`fuzz: ${cases.length} runs, ${added.length} ADDs succeeded`);
  });
});
