/** Interface names: the one check used for bridges, veths and in-sandbox names. */
import { invalid } from "../errors.ts";

/**
 * Check an interface name by the kernel's rules (1-15 bytes, not "." or "..", no '/', ':'
 * or whitespace) plus what would change its meaning in nft or iptables: quotes, backslash,
 * control characters, and the wildcards '*' (nft) and '+' (iptables).
 */
export function checkIfname(name: string, what = "bridge name"): string {
  const bytes = new TextEncoder().encode(name).length;
  if (bytes < 1 || bytes > 15) throw invalid(`invalid ${what} "${name}": must be 1 to 15 bytes long`);
  if (name === "." || name === "..") throw invalid(`invalid ${what} "${name}"`);
  const bad = /[\s/:"'\\*+\x00-\x1f\x7f]/.exec(name);
  if (bad) {
    throw invalid(
      `invalid ${what} "${name}": contains ${JSON.stringify(bad[0])}`,
      "use letters, digits, '-', '_' and '.'",
    );
  }
  return name;
}
