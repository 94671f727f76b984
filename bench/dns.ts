/**
 * Benchmark of knit's DNS server against aardvark-dns (podman's), side by side in one lab:
 *
 *   scripts/lab-run node_modules/.bin/bun bench/dns.ts [--seconds N] [--rounds N] [--window N]
 *
 * Both servers serve the same names (the sandboxes of one knit network) on the same bridge:
 * knit's agent on the gateway 10.78.0.1, aardvark-dns on a second address of that bridge,
 * 10.78.0.254, with a config file listing the same sandboxes. Both forward other names to
 * the same lab upstream (dnsmasq on the LAN, else knit's stub server). The load generator
 * (this file with --client) runs inside a sandbox of that network, so every query takes
 * the path a real one takes: veth, bridge, host.
 *
 * For "known" names (A records of sandboxes) and "forwarded" names, two loads:
 *   load   WINDOW queries in flight (default 64): queries per second, p50, p99 latency
 *   light  2 queries in flight: p50 and p99 latency without queueing
 * Rounds alternate knit, aardvark, knit, ... so both see the same machine; the medians of
 * the rounds and the ratios (knit / aardvark) are printed, then one JSON line. Targets:
 * qps ratio >= 1, p99 ratio <= 1.
 *
 *   lan ─┬─ h (knit host) 10.77.0.2   bench network 10.78.0.0/24 on a knit bridge:
 *        │                              knit DNS .1, aardvark .254, sandboxes s0.., client
 *        └─ up (upstream) 10.77.0.53  dnsmasq: *.fwd.test -> 192.0.2.77
 */
import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { udp } from "bun";
import { Lab, REPO_ROOT, type LabHost, type LabProcess, waitFor } from "../src/lab/lab.ts";
import { RecordType, buildQuery } from "../src/dns/packet.ts";

function argValue(name: string, dflt: number): number {
  const i = process.argv.indexOf(`--${name}`);
  const v = i >= 0 ? Number(process.argv[i + 1]) : dflt;
  if (!Number.isFinite(v) || v <= 0) throw new Error(`--${name} needs a positive number`);
  return v;
}

const BUN = process.execPath;
const SELF = join(REPO_ROOT, "bench", "dns.ts");
const AARDVARK = "/usr/lib/podman/aardvark-dns";
const SANDBOXES = 16;
const UPSTREAM = "10.77.0.53";
const KNIT_DNS = "10.78.0.1";
const AARDVARK_DNS = "10.78.0.254";

const median = (xs: readonly number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  return s.length % 2 ? (s[mid] ?? 0) : ((s[mid - 1] ?? 0) + (s[mid] ?? 0)) / 2;
};
const quantile = (sorted: Float64Array, q: number): number => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] ?? NaN;

// ---- the load generator (runs inside the client sandbox) ---------------------------------

/** What one client run reports. */
interface ClientResult {
  qps: number;
  p50: number;
  p99: number;
  sent: number;
  answered: number;
  /** Answers whose rcode was not NOERROR, or that had no answer record. */
  bad: number;
}

/**
 * Keep `window` queries in flight against `server` for `seconds` (after a 0.5 s warm-up),
 * spread over 4 sockets, cycling through `names`. Latency is measured per query.
 */
async function runClient(server: string, names: readonly string[], window: number, seconds: number): Promise<ClientResult> {
  const SOCKETS = Math.min(4, window);
  const packets = names.map((n) => buildQuery(0, n, RecordType.A));
  const lat: number[] = [];
  let sent = 0;
  let answered = 0;
  let bad = 0;
  const start = performance.now();
  const measureFrom = start + 500;
  const end = measureFrom + seconds * 1000;
  let measuredSent = 0;
  const socks: { sock: udp.Socket<"uint8array">; t0: Float64Array; next: number; outstanding: number; lastReply: number; n: number }[] = [];
  const send = (s: (typeof socks)[number]): void => {
    const id = (s.next = (s.next + 1) & 0xffff);
    const pkt = packets[s.n++ % packets.length] ?? new Uint8Array(0);
    pkt[0] = id >> 8;
    pkt[1] = id & 0xff;
    const now = performance.now();
    s.t0[id] = now;
    s.outstanding++;
    sent++;
    if (now >= measureFrom && now < end) measuredSent++;
    s.sock.send(pkt, 53, server);
  };
  for (let k = 0; k < SOCKETS; k++) {
    const state = { t0: new Float64Array(65536), next: k * 7919, outstanding: 0, lastReply: performance.now(), n: k } as (typeof socks)[number];
    state.sock = await Bun.udpSocket({
      binaryType: "uint8array",
      socket: {
        data: (_s, buf) => {
          const now = performance.now();
          const id = ((buf[0] ?? 0) << 8) | (buf[1] ?? 0);
          const t0 = state.t0[id] ?? 0;
          state.outstanding = Math.max(0, state.outstanding - 1);
          state.lastReply = now;
          if (t0 >= measureFrom && now < end) {
            answered++;
            lat.push(now - t0);
            // rcode in the low bits of byte 3; answer count in bytes 6-7.
            if (((buf[3] ?? 0) & 0xf) !== 0 || (((buf[6] ?? 0) << 8) | (buf[7] ?? 0)) === 0) bad++;
          }
          if (now < end) send(state);
        },
      },
    });
    socks.push(state);
  }
  const perSocket = Math.ceil(window / SOCKETS);
  for (const s of socks) for (let i = 0; i < perSocket; i++) send(s);
  // A lost datagram would shrink the window for good: top it up when a socket goes quiet.
  while (performance.now() < end) {
    await Bun.sleep(50);
    const now = performance.now();
    for (const s of socks) {
      if (now - s.lastReply > 200) {
        s.outstanding = 0;
        s.lastReply = now;
        for (let i = 0; i < perSocket; i++) send(s);
      }
    }
  }
  await Bun.sleep(100);
  for (const s of socks) s.sock.close();
  const sorted = Float64Array.from(lat).sort();
  void sent;
  return { qps: answered / seconds, p50: quantile(sorted, 0.5), p99: quantile(sorted, 0.99), sent: measuredSent, answered, bad };
}

// ---- the orchestrator --------------------------------------------------------------------

interface SandboxView {
  Id: string;
  Name: string;
  NetworkSettings: { Networks: Record<string, { IPAddress: string }> };
}

async function inspect(host: LabHost, name: string): Promise<SandboxView> {
  const [view] = JSON.parse((await host.knitOk(["inspect", name])).stdout) as SandboxView[];
  if (!view) throw new Error(`no sandbox ${name}`);
  return view;
}

/** Start the upstream: dnsmasq if installed (fast, C), else knit's stub server. */
async function startUpstream(lab: Lab, node: { path: string }, dir: string): Promise<{ proc: LabProcess; kind: string }> {
  if (existsSync("/usr/sbin/dnsmasq")) {
    const proc = lab.spawn(node, [
      "/usr/sbin/dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-poll", "--bind-interfaces",
      `--listen-address=${UPSTREAM}`, "--except-interface=lo", "--port=53", "--user=root", "--pid-file=", "--cache-size=0",
      "--dns-forward-max=10000", "--address=/fwd.test/192.0.2.77", `--conf-file=${join(dir, "empty.conf")}`,
    ]);
    return { proc, kind: "dnsmasq" };
  }
  const proc = lab.spawn(node, [BUN, join(REPO_ROOT, "src", "dns", "stub-server.ts"), "--listen", UPSTREAM, "--quiet",
    ...Array.from({ length: 32 }, (_, i) => ["--answer", `f${i}.fwd.test=192.0.2.77`]).flat()]);
  return { proc, kind: "knit stub server" };
}

/** dig once, to see that a server answers (used to wait for it). */
async function answers(lab: Lab, node: { path: string }, server: string, name: string): Promise<boolean> {
  const r = await lab.exec(node, ["dig", "+short", "+time=1", "+tries=1", `@${server}`, name], { check: false });
  return r.code === 0 && /^\d+\.\d+\.\d+\.\d+$/m.test(r.stdout);
}

interface Row {
  scenario: string;
  load: string;
  server: string;
  qps: number;
  p50: number;
  p99: number;
  bad: number;
}

async function orchestrate(): Promise<void> {
  const seconds = argValue("seconds", 3);
  const rounds = argValue("rounds", 3);
  const window = argValue("window", 64);
  if (!existsSync(AARDVARK)) throw new Error(`${AARDVARK} is missing: run scripts/setup (Debian package aardvark-dns)`);
  const lab = await Lab.create("bd");
  try {
    const lan = await lab.lan("lan");
    const h = await lab.host("h");
    const up = await lab.ns("up");
    await lab.plug(h, lan, { addresses: ["10.77.0.2/24"] });
    await lab.plug(up, lan, { addresses: [`${UPSTREAM}/24`] });
    writeFileSync(join(lab.dir, "empty.conf"), "");
    const upstream = await startUpstream(lab, up, lab.dir);
    const resolv = join(lab.dir, "upstream-resolv.conf");
    writeFileSync(resolv, `nameserver ${UPSTREAM}\n`);
    if (!(await waitFor(() => answers(lab, h, UPSTREAM, "f1.fwd.test"), 5000))) throw new Error(`the upstream (${upstream.kind}) does not answer:\n${upstream.proc.output()}`);

    // knit: the agent (explicit, so it is stopped by PID at the end), a network, sandboxes.
    const env = { KNIT_RESOLV_CONF: resolv, KNIT_AGENT_AUTOSTART: "0" };
    const agent = h.spawnKnit(["agent", "--log-level", "warn"], { env });
    await h.knitOk(["network", "create", "--subnet", "10.78.0.0/24", "bench"], { env });
    const names: string[] = [];
    for (let i = 0; i < SANDBOXES; i++) {
      await h.knitOk(["run", "-d", "--name", `s${i}`, "--network", "bench", "--alias", `svc${i}`, "--", "sleep", "3600"], { env });
      names.push(`s${i}`, `svc${i}`);
    }
    await h.knitOk(["run", "-d", "--name", "client", "--network", "bench", "--", "sleep", "3600"], { env });
    const client = await inspect(h, "client");
    const clientNs = { path: `/run/netns/knit-${client.Id.slice(0, 12)}` };
    if (!(await waitFor(() => answers(lab, clientNs, KNIT_DNS, "s1"), 5000))) throw new Error(`knit's agent does not answer:\n${agent.output()}`);

    // aardvark-dns: same names, on a second address of the same bridge, same upstream.
    const dev = await findBridge(h, KNIT_DNS);
    await h.exec(["ip", "addr", "add", `${AARDVARK_DNS}/24`, "dev", dev]);
    const conf = join(lab.dir, "aardvark");
    mkdirSync(conf, { recursive: true });
    const lines = [AARDVARK_DNS];
    for (const name of [...Array.from({ length: SANDBOXES }, (_, i) => `s${i}`), "client"]) {
      const v = await inspect(h, name);
      const ip = v.NetworkSettings.Networks["bench"]?.IPAddress ?? "";
      const i = name.slice(1);
      lines.push(`${v.Id} ${ip}  ${name}${name === "client" ? "" : `,svc${i}`}`);
    }
    writeFileSync(join(conf, "bench"), `${lines.join("\n")}\n`);
    // Its upstream is the host's resolv.conf: give it the lab's, in a mount namespace of its own.
    const aardvark = lab.spawn(h, ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
      'mount --bind "$1" /etc/resolv.conf && exec "$2" --config "$3" -p 53 run', "sh", resolv, AARDVARK, conf]);
    if (!(await waitFor(() => answers(lab, clientNs, AARDVARK_DNS, "s1"), 5000))) throw new Error(`aardvark-dns does not answer:\n${aardvark.output()}`);
    if (!(await answers(lab, clientNs, AARDVARK_DNS, "f1.fwd.test")) || !(await answers(lab, clientNs, KNIT_DNS, "f1.fwd.test"))) {
      throw new Error("a server does not forward to the lab upstream");
    }

    const fwdNames = Array.from({ length: 32 }, (_, i) => `f${i}.fwd.test`);
    const rows: Row[] = [];
    const servers = [["knit", KNIT_DNS], ["aardvark-dns", AARDVARK_DNS]] as const;
    for (const [scenario, list] of [["known", names], ["forwarded", fwdNames]] as const) {
      for (const [load, w] of [["load", window], ["light", 2]] as const) {
        for (let r = 0; r < rounds; r++) {
          for (const [server, addr] of r % 2 ? [...servers].reverse() : servers) {
            const out = await lab.exec(clientNs, [BUN, SELF, "--client", addr, "--window", String(w), "--seconds", String(seconds), "--names", list.join(",")], { timeoutMs: (seconds + 30) * 1000 });
            const res = JSON.parse(out.stdout) as ClientResult;
            rows.push({ scenario, load, server, qps: res.qps, p50: res.p50, p99: res.p99, bad: res.bad });
          }
        }
      }
    }
    report(rows, { seconds, rounds, window, upstream: upstream.kind, client: client.Name });

    await aardvark.stop();
    await stopAardvark(conf);
    for (let i = 0; i < SANDBOXES; i++) await h.knitOk(["rm", "-f", `s${i}`]);
    await h.knitOk(["rm", "-f", "client"]);
    await h.knitOk(["network", "rm", "bench"]);
    await agent.stop();
    await upstream.proc.stop();
  } finally {
    await lab.cleanup();
  }
}

/** aardvark-dns forks into the background and records its PID in the config directory. */
async function stopAardvark(conf: string): Promise<void> {
  const pid = Number(readFileSync(join(conf, "aardvark.pid"), "utf8").trim());
  if (!(pid > 1)) return;
  try {
    process.kill(pid, "SIGTERM");
  } catch {
    return;
  }
  await waitFor(() => !existsSync(`/proc/${pid}/stat`) || readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1]?.startsWith("Z") === true, 5000, 20);
}

async function findBridge(h: LabHost, gateway: string): Promise<string> {
  const addrs = JSON.parse((await h.exec(["ip", "-j", "-4", "addr", "show"])).stdout) as { ifname: string; addr_info: { local: string }[] }[];
  const dev = addrs.find((a) => a.addr_info.some((i) => i.local === gateway))?.ifname;
  if (!dev) throw new Error(`no device holds ${gateway}`);
  return dev;
}

function report(rows: readonly Row[], meta: Record<string, unknown>): void {
  const pick = (scenario: string, load: string, server: string, key: "qps" | "p50" | "p99"): number =>
    median(rows.filter((r) => r.scenario === scenario && r.load === load && r.server === server).map((r) => r[key]));
  const out: string[] = [`DNS benchmark (${String(meta.rounds)} rounds of ${String(meta.seconds)} s, window ${String(meta.window)}, upstream ${String(meta.upstream)}; medians)`, ""];
  out.push(`${"scenario".padEnd(11)}${"load".padEnd(7)}${"server".padEnd(14)}${"qps".padStart(9)}${"p50 ms".padStart(9)}${"p99 ms".padStart(9)}`);
  const summary: Record<string, unknown> = { ...meta };
  for (const scenario of ["known", "forwarded"]) {
    for (const load of ["load", "light"]) {
      for (const server of ["knit", "aardvark-dns"]) {
        out.push(`${scenario.padEnd(11)}${load.padEnd(7)}${server.padEnd(14)}${pick(scenario, load, server, "qps").toFixed(0).padStart(9)}${pick(scenario, load, server, "p50").toFixed(3).padStart(9)}${pick(scenario, load, server, "p99").toFixed(3).padStart(9)}`);
      }
      const ratio = (key: "qps" | "p50" | "p99"): number => pick(scenario, load, "knit", key) / pick(scenario, load, "aardvark-dns", key);
      out.push(`${"".padEnd(18)}${"knit/aardvark".padEnd(14)}${ratio("qps").toFixed(2).padStart(9)}${ratio("p50").toFixed(2).padStart(9)}${ratio("p99").toFixed(2).padStart(9)}`);
      summary[`${scenario}.${load}`] = {
        knit: { qps: pick(scenario, load, "knit", "qps"), p50: pick(scenario, load, "knit", "p50"), p99: pick(scenario, load, "knit", "p99") },
        aardvark: { qps: pick(scenario, load, "aardvark-dns", "qps"), p50: pick(scenario, load, "aardvark-dns", "p50"), p99: pick(scenario, load, "aardvark-dns", "p99") },
        ratio: { qps: ratio("qps"), p50: ratio("p50"), p99: ratio("p99") },
      };
    }
  }
  const bad = rows.filter((r) => r.bad > 0);
  if (bad.length) out.push("", `warning: ${bad.length} run(s) had failed answers: ${bad.map((r) => `${r.server} ${r.scenario}/${r.load}: ${r.bad}`).join("; ")}`);
  console.log(out.join("\n"));
  console.log(JSON.stringify(summary));
}

if (process.argv[2] === "--client") {
  const server = process.argv[3] ?? "";
  const i = process.argv.indexOf("--names");
  const names = (process.argv[i + 1] ?? "").split(",").filter(Boolean);
  const res = await runClient(server, names, argValue("window", 64), argValue("seconds", 3));
  console.log(JSON.stringify(res));
} else {
  await orchestrate();
}
