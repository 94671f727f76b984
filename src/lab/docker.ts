/**
 * A real Docker daemon inside a lab host: Debian's dockerd (/usr/sbin/dockerd) with its own
 * data root, exec root, pid file, socket, config file and cgroup parent, and the containerd
 * that dockerd starts and supervises itself. It runs in the host's network namespace (it
 * creates docker0 and its iptables rules there) and in the lab's private mount namespace
 * (`scripts/lab-run` puts tmpfs on /run/docker, /run/containerd and /etc/docker).
 *
 * The client is Debian's /usr/bin/docker, pointed at the daemon by DOCKER_HOST.
 */
import { existsSync, mkdirSync, readdirSync, readFileSync, rmdirSync, symlinkSync, writeFileSync, copyFileSync, chmodSync } from "node:fs";
import { join } from "node:path";
import {
  type ExecOptions,
  type ExecResult,
  type LabHost,
  type LabProcess,
  LabError,
  isDescendant,
  mountsUnder,
  runCommand,
  waitFor,
} from "./lab.ts";

/** Debian's docker.io daemon. */
export const DOCKERD = "/usr/sbin/dockerd";
/** Debian's docker.io client (not /usr/local/bin/docker, which may be another version). */
export const DOCKER_CLI = "/usr/bin/docker";
/** Busybox, statically linked (Debian's busybox-static), for the `bb` image. */
export const BUSYBOX = "/bin/busybox";
/** Name of the image {@link DockerDaemon.ensureBusyboxImage} makes. */
export const BUSYBOX_IMAGE = "bb";

/** Why Docker tests cannot run here, or undefined when they can. */
export function dockerMissing(): string | undefined {
  for (const bin of [DOCKERD, DOCKER_CLI, "/usr/bin/containerd", BUSYBOX]) {
    if (!existsSync(bin)) return `${bin} is not installed (run scripts/setup)`;
  }
  return undefined;
}

/** Options for {@link startDocker}. */
export interface DockerOptions {
  /** Extra dockerd flags (for example `--userland-proxy=false`). */
  args?: readonly string[];
  /** Contents of dockerd's config file (default `{}`). */
  config?: Record<string, unknown>;
  /** How long to wait for the daemon to answer (default 60 s). */
  timeoutMs?: number;
}

/** A running dockerd in a lab host. */
export interface DockerDaemon {
  /** The host it runs in. */
  readonly host: LabHost;
  /** Its private directory: data root, exec root, socket, pid file, logs. */
  readonly dir: string;
  /** DOCKER_HOST value for clients (`unix://…/docker.sock`). */
  readonly dockerHost: string;
  /** PID of dockerd. */
  readonly pid: number;
  /** The dockerd process (its output: `process.output()`). */
  readonly process: LabProcess;
  /** Cgroup parent of its containers (a unique name, removed by `stop`). */
  readonly cgroupParent: string;
  /** Milliseconds from spawning dockerd until it answered `docker version`. */
  readonly startMs: number;
  /** Run the Docker client against this daemon; never throws on a non-zero exit. */
  docker(args: readonly string[], opts?: Omit<ExecOptions, "check">): Promise<ExecResult>;
  /** Like `docker`, but throws a LabError with the output on a non-zero exit. */
  dockerOk(args: readonly string[], opts?: Omit<ExecOptions, "check">): Promise<ExecResult>;
  /** Make image `bb` (busybox and its applet links) unless it exists. */
  ensureBusyboxImage(): Promise<string>;
  /** Stop dockerd and everything it started (by PID), remove its cgroups and directories. */
  stop(): Promise<void>;
}

/** PIDs of processes whose command line mentions `needle`. */
function pidsWithArg(needle: string): number[] {
  const out: number[] = [];
  for (const e of readdirSync("/proc")) {
    if (!/^\d+$/.test(e) || Number(e) === process.pid) continue;
    try {
      if (readFileSync(`/proc/${e}/cmdline`, "utf8").includes(needle)) out.push(Number(e));
    } catch {
      // gone
    }
  }
  return out;
}

/** PIDs of processes in a cgroup whose path contains `/<name>/` or ends with `/<name>`. */
function pidsInCgroup(name: string): number[] {
  const out: number[] = [];
  for (const e of readdirSync("/proc")) {
    if (!/^\d+$/.test(e)) continue;
    try {
      const cg = readFileSync(`/proc/${e}/cgroup`, "utf8");
      if (cg.includes(`/${name}/`) || cg.split("\n").some((l) => l.endsWith(`/${name}`))) out.push(Number(e));
    } catch {
      // gone
    }
  }
  return out;
}

/** Remove the (empty) cgroup directories named `name` at the top of each hierarchy. */
function removeCgroups(name: string): string[] {
  const left: string[] = [];
  const roots = ["/sys/fs/cgroup"];
  try {
    for (const d of readdirSync("/sys/fs/cgroup", { withFileTypes: true })) {
      if (d.isDirectory()) roots.push(join("/sys/fs/cgroup", d.name));
    }
  } catch {
    return left;
  }
  const rmTree = (dir: string): void => {
    for (const d of readdirSync(dir, { withFileTypes: true })) {
      if (d.isDirectory()) rmTree(join(dir, d.name));
    }
    rmdirSync(dir); // only empty cgroups can be removed: never touches anything else
  };
  for (const root of roots) {
    const dir = join(root, name);
    if (!existsSync(dir)) continue;
    try {
      rmTree(dir);
    } catch (err) {
      left.push(`${dir}: ${(err as Error).message}`);
    }
  }
  return left;
}

function killAll(pids: readonly number[], signal: NodeJS.Signals): void {
  for (const pid of pids) {
    try {
      process.kill(pid, signal);
    } catch {
      // gone
    }
  }
}

/** Wait until none of `pids` exists any more (or the time is up). */
async function waitGone(pids: readonly number[], timeoutMs: number): Promise<boolean> {
  return waitFor(() => pids.every((p) => !existsSync(`/proc/${p}`)), timeoutMs, 50);
}

/**
 * Start dockerd inside `host` and wait until it answers. The daemon is stopped by
 * {@link DockerDaemon.stop}, and also by the lab's cleanup.
 */
export async function startDocker(host: LabHost, opts: DockerOptions = {}): Promise<DockerDaemon> {
  const missing = dockerMissing();
  if (missing) throw new LabError(`cannot start Docker: ${missing}`);
  const lab = host.lab;
  // Short paths: unix socket paths are limited to 107 bytes.
  const dir = join(lab.dir, `_docker-${host.label}`);
  const dataRoot = join(dir, "data");
  const execRoot = join(dir, "exec");
  mkdirSync(dataRoot, { recursive: true, mode: 0o700 });
  mkdirSync(execRoot, { recursive: true, mode: 0o700 });
  const socket = join(dir, "docker.sock");
  const configFile = join(dir, "daemon.json");
  writeFileSync(configFile, JSON.stringify(opts.config ?? {}));
  const clientConfig = join(dir, "client");
  mkdirSync(clientConfig, { recursive: true });
  const cgroupParent = `knit-${lab.id}-${host.label}`;
  const dockerHost = `unix://${socket}`;

  const started = performance.now();
  const proc = host.spawn([
    DOCKERD,
    "--data-root", dataRoot,
    "--exec-root", execRoot,
    "--pidfile", join(dir, "docker.pid"),
    "--host", dockerHost,
    "--config-file", configFile,
    // Never ask systemd for scopes: plain cgroups under a name of our own, removed on stop.
    "--exec-opt", "native.cgroupdriver=cgroupfs",
    "--cgroup-parent", `/${cgroupParent}`,
    ...(opts.args ?? []),
  ]);
  const env = { DOCKER_HOST: dockerHost, DOCKER_CONFIG: clientConfig };
  const docker = (args: readonly string[], o: Omit<ExecOptions, "check"> = {}): Promise<ExecResult> =>
    host.exec([DOCKER_CLI, ...args], { ...o, env: { ...env, ...o.env }, check: false });

  let stopped = false;
  const stop = async (): Promise<void> => {
    if (stopped) return;
    stopped = true;
    const errors: string[] = [];
    // Everything dockerd started: its children (containerd), the shims (which daemonize, and
    // name our containerd socket on their command line), and the containers' processes
    // (in our cgroup parent). All found by what is unique to this daemon, killed by PID.
    const family = (): number[] => {
      const mine = new Set([proc.pid]);
      const all = readdirSync("/proc").filter((e) => /^\d+$/.test(e)).map(Number);
      return [
        ...new Set([
          ...all.filter((p) => p !== proc.pid && isDescendant(p, mine)),
          ...pidsWithArg(execRoot),
          ...pidsInCgroup(cgroupParent),
        ]),
      ].filter((p) => p !== process.pid);
    };
    const before = family();
    await proc.stop(20_000);
    const left = [...new Set([...before, ...family()])].filter((p) => existsSync(`/proc/${p}`));
    killAll(left, "SIGKILL");
    if (!(await waitGone(left, 5000))) errors.push(`processes still alive: ${left.join(", ")}`);
    // dockerd unmounts its overlays on a clean shutdown; after a crash they are still there.
    for (const m of mountsUnder(dir)) await runCommand(["umount", "-l", m.target], { check: false });
    errors.push(...removeCgroups(cgroupParent));
    if (errors.length) throw new LabError(`stopping dockerd in ${host.label}: ${errors.join("; ")}`);
    // The directory itself goes with the lab's directory.
  };
  lab.onCleanup(`dockerd in ${host.label}`, stop);

  const timeoutMs = opts.timeoutMs ?? 60_000;
  let ready = false;
  const deadline = performance.now() + timeoutMs;
  while (performance.now() < deadline) {
    if (!proc.running) break;
    if (existsSync(socket)) {
      const r = await docker(["version", "--format", "{{.Server.Version}}"], { timeoutMs: 10_000 });
      if (r.code === 0) {
        ready = true;
        break;
      }
    }
    await Bun.sleep(50);
  }
  const startMs = performance.now() - started;
  if (!ready) {
    const log = proc.output().split("\n").slice(-30).join("\n");
    await stop().catch(() => undefined);
    throw new LabError(
      `dockerd in ${host.label} ${proc.running ? `did not answer within ${timeoutMs} ms` : "exited"}; its last output:\n${log}`,
    );
  }

  const ensureBusyboxImage = async (): Promise<string> => {
    const have = await docker(["image", "inspect", "--format", "{{.Id}}", BUSYBOX_IMAGE]);
    if (have.code === 0) return BUSYBOX_IMAGE;
    const rootfs = join(dir, "bb-rootfs");
    for (const d of ["bin", "sbin", "usr/bin", "usr/sbin", "etc", "tmp", "proc", "sys", "dev", "root", "var/run"]) {
      mkdirSync(join(rootfs, d), { recursive: true });
    }
    chmodSync(join(rootfs, "tmp"), 0o1777);
    copyFileSync(BUSYBOX, join(rootfs, "bin", "busybox"));
    chmodSync(join(rootfs, "bin", "busybox"), 0o755);
    const applets = (await runCommand([BUSYBOX, "--list"])).stdout.split("\n").filter((a) => /^[\w.[\]-]+$/.test(a));
    for (const a of applets) {
      if (a === "busybox") continue;
      const link = join(rootfs, "bin", a);
      if (!existsSync(link)) symlinkSync("busybox", link);
    }
    writeFileSync(join(rootfs, "etc", "passwd"), "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n");
    writeFileSync(join(rootfs, "etc", "group"), "root:x:0:\nnogroup:x:65534:\n");
    const tarball = join(dir, "bb.tar");
    await runCommand(["tar", "-C", rootfs, "-cf", tarball, "."]);
    const r = await docker(["import", "--change", 'CMD ["sh"]', "--change", "ENV PATH=/bin", tarball, BUSYBOX_IMAGE]);
    if (r.code !== 0) throw new LabError(`docker import of ${BUSYBOX_IMAGE} failed: ${r.stderr.trim()}`, r);
    return BUSYBOX_IMAGE;
  };

  return {
    host,
    dir,
    dockerHost,
    pid: proc.pid,
    process: proc,
    cgroupParent,
    startMs,
    docker,
    async dockerOk(args, o = {}) {
      const r = await docker(args, o);
      if (r.code !== 0) {
        throw new LabError(`docker ${args.join(" ")} failed (exit ${r.code}):\n${r.stderr.trimEnd() || r.stdout.trimEnd()}`, r);
      }
      return r;
    },
    ensureBusyboxImage,
    stop,
  };
}
