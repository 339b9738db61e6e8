/**
 * The `hono-image-cache` command: the caching proxy (`serve`) and its
 * management client (`cache-manage`), the same on Deno, Node (22+) and Bun.
 * The npm package installs it as a `bin`; `deno task serve` and
 * `deno task cache-manage` run the same code.
 *
 * ```sh
 * npx hono-image-cache serve --upstream http://glance.internal:9292 --listen :9292
 * IMAGE_CACHE_TOKEN_FILE=/etc/image-cache/admin-token npx hono-image-cache cache-manage list-cached
 * ```
 *
 * @module
 */
import process from "node:process";
import { manageCommand } from "./_manage_command.ts";
import { serveCommand } from "./_serve_command.ts";

const USAGE = `Usage: hono-image-cache <command> [options]

Commands:
  serve          The caching proxy in front of Glance (or any origin); serve --help for its options
  cache-manage   Glance's glance-cache-manage for the proxy's management API; cache-manage --help
  help           Show this help

Without a command: this help, exit 1.`;

/**
 * Runs the `hono-image-cache` command: `serve [options]` (runs until
 * SIGINT or SIGTERM), `cache-manage [options] <command>`, or `help`.
 *
 * @param args The arguments after the program's name (`process.argv.slice(2)`).
 * @param program How messages name the program.
 * @returns The exit code: 0 on success; `serve`: 1 when it cannot start, 2
 *   for bad arguments; `cache-manage`: 1 on failure; 1 without a command.
 *
 * @example The help, and a bad argument
 * ```ts
 * import { main } from "hono-image-cache/cli";
 * import assert from "node:assert/strict";
 *
 * assert.equal(await main(["help"]), 0);
 * assert.equal(await main(["serve", "--max-size", "lots"]), 2);
 * assert.equal(await main(["frobnicate"]), 1);
 * ```
 */
export async function main(args: string[], program = "hono-image-cache"): Promise<number> {
  const [command, ...rest] = args;
  switch (command) {
    case "serve":
      return await serveCommand(rest, `${program} serve`);
    case "cache-manage":
      return await manageCommand(rest);
    case "help":
    case "--help":
    case "-h":
      process.stdout.write(USAGE + "\n");
      return 0;
    default:
      process.stderr.write(
        `${
          command === undefined ? "" : `${program}: unknown command ${JSON.stringify(command)}\n`
        }${USAGE}\n`,
      );
      return 1;
  }
}
