/** The one map from driver name to driver. Unknown names fail loudly, naming the known ones. */
import { invalid } from "../errors.ts";
import { DriverNames, type DriverName } from "../model.ts";
import { bridgeDriver } from "./bridge.ts";
import { hostDriver } from "./host.ts";
import { macvlanDriver } from "./macvlan.ts";
import { nullDriver } from "./null.ts";
import { overlayDriver } from "./overlay.ts";
import type { NetworkDriver } from "./driver.ts";

export const drivers = {
  bridge: bridgeDriver,
  host: hostDriver,
  null: nullDriver,
  macvlan: macvlanDriver,
  overlay: overlayDriver,
} as const satisfies Record<DriverName, NetworkDriver>;

/** Look a driver up by the name a user typed. */
export function driverFor(name: string): NetworkDriver {
  if ((DriverNames as readonly string[]).includes(name)) return drivers[name as DriverName];
  throw invalid(`unknown driver "${name}"`, `known drivers: ${DriverNames.join(", ")}`);
}
