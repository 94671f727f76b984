/**
 * The null driver: the predefined `none` network. A sandbox on it has a namespace of its
 * own with only loopback; the endpoint is a record only.
 */
import { recordOnlyDriver } from "./driver.ts";

export const nullDriver = recordOnlyDriver("null");
