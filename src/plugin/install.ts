/**
 * `knit install --docker-plugin`: set the Docker plugin up as a service. dockerd needs no
 * configuration (it finds /run/docker/plugins/knit.sock by name); what a host needs is a knit
 * agent serving that socket from boot, started before dockerd so that dockerd finds the
 * plugin when it restores its networks (dockerd also retries a missing plugin for a while).
 * This writes that systemd unit, `knit-agent.service`, atomically; enabling it is the
 * administrator's step (`systemctl enable --now knit-agent`), as is any cluster store option.
 */
import { existsSync, mkdirSync, readFileSync, renameSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { KnitError } from "../errors.ts";

export const DEFAULT_SYSTEMD_DIR = "/etc/systemd/system";
export const UNIT_NAME = "knit-agent.service";
const MARK = "# Installed by `knit install --docker-plugin`.";

/** The unit's text: `<root>/bin/knit agent --docker-plugin` (plus `extraArgs`) from boot, before Docker. */
export function agentUnit(root: string, extraArgs: readonly string[] = []): string {
  const knitBin = join(root, "bin", "knit");
  const quote = (s: string): string => (/^[A-Za-z0-9_./:=@+-]+$/.test(s) ? s : `"${s.replace(/(["\\])/g, "\\$1")}"`);
  return [
    MARK,
    "[Unit]",
    "Description=knit agent: DNS for knit networks, cluster sync, Docker's knit network and IPAM driver",
    `Documentation=file:${join(root, "docs", "docker-plugin.md")}`,
    "After=network-online.target",
    "Wants=network-online.target",
    "Before=docker.service",
    "",
    "[Service]",
    `ExecStart=${[knitBin, "agent", "--docker-plugin", ...extraArgs].map(quote).join(" ")}`,
    "Restart=always",
    "RestartSec=1",
    "",
    "[Install]",
    "WantedBy=multi-user.target",
    "",
  ].join("\n");
}

/** Write the unit into `dir`; refuses to replace a unit of that name that knit did not write. */
export function installAgentUnit(dir: string, root: string, opts: { force?: boolean; extraArgs?: readonly string[] } = {}): string {
  const path = join(dir, UNIT_NAME);
  if (existsSync(path) && !opts.force && !readFileSync(path, "utf8").startsWith(MARK)) {
    throw new KnitError("conflict", `${path} exists and is not knit's`, { hint: "move it away, or replace it with knit install --docker-plugin --force" });
  }
  mkdirSync(dir, { recursive: true });
  const tmp = join(dir, `.${UNIT_NAME}.${process.pid}`);
  writeFileSync(tmp, agentUnit(root, opts.extraArgs), { mode: 0o644 });
  renameSync(tmp, path);
  return path;
}
