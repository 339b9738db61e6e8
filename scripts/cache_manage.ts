/**
 * `deno task cache-manage`: Glance's `glance-cache-manage` for the proxy's
 * management API. The command lives in src/proxy/ (the npm package's
 * `hono-image-cache cache-manage` runs the same code on Node and Bun).
 *
 * ```sh
 * export IMAGE_CACHE_TOKEN=...       # or --token-file PATH; never on the command line
 * deno task cache-manage list-cached
 * deno task cache-manage --url http://127.0.0.1:8000 queue-image cirros --wait
 * ```
 *
 * @module
 */
import process from "node:process";
import { manageCommand } from "../src/proxy/_manage_command.ts";

/** Runs the command with `args`; the tests give their own terminal. */
export const main = manageCommand;

const isMain = (import.meta as { main?: boolean }).main ??
  (process.argv[1] !== undefined && import.meta.url.endsWith(process.argv[1].replace(/\\/g, "/")));
if (isMain) process.exit(await manageCommand(process.argv.slice(2)));
