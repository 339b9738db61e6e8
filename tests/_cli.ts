/**
 * Running the proxy's command line in child processes, for the CLI tests
 * (Deno only: they run scripts/ from the checkout).
 *
 * @module
 */
import { type ChildProcess, spawn } from "node:child_process";
import process from "node:process";
import { fileURLToPath } from "node:url";
import { waitFor } from "./_helpers.ts";

const deno = (globalThis as { Deno?: { execPath(): string } }).Deno;
const ROOT = fileURLToPath(new URL("..", import.meta.url));

/** A `serve` child process. */
export interface Cli {
  child: ChildProcess;
  /** Everything written to stdout and stderr so far. */
  output(): string;
  /** Resolves with the exit code once the process ended and its pipes closed. */
  exited: Promise<number | null>;
  /** The address from the startup banner. */
  url(): Promise<string>;
}

/**
 * Runs `scripts/serve.ts` in a child process (or `deno task serve`, in its
 * own process group, as a terminal or a service manager runs it), with no
 * IMAGE_CACHE_* from the outside.
 */
export function serve(args: string[], env: Record<string, string> = {}, task = false): Cli {
  const clean: Record<string, string> = { NO_COLOR: "1" };
  for (const [name, value] of Object.entries(process.env)) {
    if (!name.startsWith("IMAGE_CACHE_") && value !== undefined) clean[name] = value;
  }
  const command = task ? ["task", "serve", ...args] : ["run", "-A", "scripts/serve.ts", ...args];
  const child = spawn(deno!.execPath(), command, {
    cwd: ROOT,
    env: { ...clean, ...env },
    stdio: ["ignore", "pipe", "pipe"],
    detached: task,
  });
  let output = "";
  child.stdout!.on("data", (chunk) => output += chunk);
  child.stderr!.on("data", (chunk) => output += chunk);
  const exited = new Promise<number | null>((resolve) =>
    child.on("close", (code) => resolve(code))
  );
  return {
    child,
    output: () => output,
    exited,
    async url() {
      await waitFor(
        () => /listening on http:\/\/\S+/.test(output) || child.exitCode !== null,
        30_000,
      );
      const match = /listening on (http:\/\/[^\s"]+)/.exec(output);
      if (match === null) throw new Error(`The proxy did not start:\n${output}`);
      return match[1];
    },
  };
}

/**
 * Sends a signal by pid (to the whole process group for `deno task`): Deno's
 * `child.kill()` reports the signal instead of the exit code the process chose.
 */
export function signal(cli: Cli, name: "SIGTERM" | "SIGINT" = "SIGTERM", group = false) {
  process.kill(group ? -cli.child.pid! : cli.child.pid!, name);
}

/** Ends a child that is still running (a failed test), by its pid (or group). */
export async function stop(cli: Cli) {
  if (cli.child.exitCode === null && cli.child.signalCode === null) {
    try {
      process.kill(-cli.child.pid!, "SIGKILL");
    } catch {
      cli.child.kill("SIGKILL");
    }
  }
  await cli.exited;
}

/** Runs the cache-manage command in this process. */
export async function manage(url: string, args: string[], env: Record<string, string>) {
  const { main } = await import("../scripts/cache_manage.ts");
  let stdout = "";
  let stderr = "";
  const code = await main(["--url", url, ...args], {
    stdout: (text: string) => stdout += text,
    stderr: (text: string) => stderr += text,
    readLine: () => Promise.resolve(null),
    env,
    isTTY: false,
  });
  return { code, stdout, stderr };
}

/** Why the CLI tests do not run here (they run on Deno; npm: tests/npm/bin.mjs). */
export const skip: string | false = deno === undefined
  ? "the CLI's own tests run on Deno (npm: tests/npm/bin.mjs)"
  : false;
