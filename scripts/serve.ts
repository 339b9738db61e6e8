/**
 * The caching proxy from the command line: `deno task serve`, or the binary
 * `deno task compile` builds (`dist/hono-image-cache`). The command itself
 * lives in src/proxy/ (the npm package's `hono-image-cache serve` runs the
 * same code on Node and Bun); run with `--help` for the options.
 *
 * @module
 */
import process from "node:process";
import { serveCommand } from "../src/proxy/_serve_command.ts";

if (import.meta.main) {
  const compiled = /hono-image-cache$/.test(process.execPath);
  process.exit(
    await serveCommand(process.argv.slice(2), compiled ? "hono-image-cache" : "deno task serve"),
  );
}
