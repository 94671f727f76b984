/**
 * The host driver: the predefined `host` network. A sandbox on it shares the host's network
 * stack, so there is nothing to create or wire; the endpoint exists only as a record (so the
 * sandbox shows in `network inspect host`). Only one host network exists, as in Docker.
 */
import { recordOnlyDriver } from "./driver.ts";

export const hostDriver = recordOnlyDriver("host");
