import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { readdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import process from "node:process";
import { fileURLToPath } from "node:url";
import { demoOrigin, generatedDigests } from "hono-image-cache/testing";
import { hexDigest, readBody, startServer, waitFor, withTempDir } from "./_helpers.ts";

const deno = (globalThis as { Deno?: { execPath(): string } }).Deno;
const ROOT = fileURLToPath(new URL("..", import.meta.url));
const MiB = 2 ** 20;

interface Cli {
  child: ChildProcess;
  /** Everything written to stdout and stderr so far. */
  output(): string;
  /** Resolves with the exit code once the process ended and its pipes closed. */
  exited: Promise<number | null>;
  /** The address from the startup banner. */
  url(): Promise<string>;
}

/** Runs `scripts/serve.ts` in a child process, with no IMAGE_CACHE_* from the outside. */
function serve(args: string[], env: Record<string, string> = {}): Cli {
  const clean: Record<string, string> = { NO_COLOR: "1" };
  for (const [name, value] of Object.entries(process.env)) {
    if (!name.startsWith("IMAGE_CACHE_") && value !== undefined) clean[name] = value;
  }
  const child = spawn(deno!.execPath(), ["run", "-A", "scripts/serve.ts", ...args], {
    cwd: ROOT,
    env: { ...clean, ...env },
    stdio: ["ignore", "pipe", "pipe"],
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
      const match = /listening on (http:\/\/\S+)/.exec(output);
      if (match === null) throw new Error(`The proxy did not start:\n${output}`);
      return match[1];
    },
  };
}

/**
 * Sends SIGTERM by pid: Deno's `child.kill()` reports the signal instead of
 * the exit code the process chose.
 */
function terminate(cli: Cli) {
  process.kill(cli.child.pid!, "SIGTERM");
}

/** Ends a child that is still running (a failed test), by its pid. */
async function stop(cli: Cli) {
  if (cli.child.exitCode === null && cli.child.signalCode === null) cli.child.kill("SIGKILL");
  await cli.exited;
}

describe("deno task serve", { skip: deno === undefined ? "the CLI runs on Deno" : false }, () => {
  it("prints its usage with --help and exits 0", async () => {
    const cli = serve(["--help"]);
    assert.equal(await cli.exited, 0);
    const usage = cli.output();
    assert.match(usage, /^Usage: deno task serve/);
    for (const word of ["--upstream URL", "IMAGE_CACHE_UPSTREAM", "--max-size", "--admin-token"]) {
      assert.ok(usage.includes(word), word);
    }
  });

  it("rejects bad arguments with a clear message and exit code 2", async () => {
    const cases: [string[], Record<string, string>, RegExp][] = [
      [["--bogus"], {}, /Unknown option '--bogus'/],
      [["stray"], {}, /Unexpected argument 'stray'/],
      [
        ["--max-size", "10X"],
        {},
        /--max-size must be a size like 500M, 10G or 1\.5T, received "10X"/,
      ],
      [["--listen", "nowhere"], {}, /--listen must be HOST:PORT, :PORT or PORT/],
      [["--upstream", "ftp://glance"], {}, /--upstream must be an http:\/\/ or https:\/\/ URL/],
      [["--admin-token", "short"], {}, /--admin-token must be at least 16 characters/],
      [["--access-ttl", "soon"], {}, /--access-ttl must be a duration/],
      [[], { IMAGE_CACHE_MAX_SIZE: "lots" }, /IMAGE_CACHE_MAX_SIZE must be a size/],
      [[], { IMAGE_CACHE_QUIET_HITS: "maybe" }, /IMAGE_CACHE_QUIET_HITS must be 1\/true\/yes/],
    ];
    const runs = cases.map(([args, env]) => serve(args, env));
    const codes = await Promise.all(runs.map((run) => run.exited));
    cases.forEach(([args, env, message], i) => {
      const output = runs[i].output();
      assert.equal(codes[i], 2, `${args.join(" ")} ${JSON.stringify(env)}: ${output}`);
      assert.match(output, message);
      assert.match(output, /Run with --help/);
    });
  });

  it("exits 1 with a message when the cache directory is unusable", async () => {
    await withTempDir(async (dir) => {
      const file = join(dir, "a-file");
      await writeFile(file, "not a directory");
      const cli = serve(["--cache-dir", join(file, "cache"), "--listen", "127.0.0.1:0"]);
      assert.equal(await cli.exited, 1);
      assert.match(cli.output(), /cannot use the cache directory/);
    });
  });

  it("runs in front of the built-in demo origin without --upstream and stops on SIGTERM", async () => {
    await withTempDir(async (dir) => {
      const cli = serve(["--listen", "127.0.0.1:0", "--cache-dir", dir]);
      try {
        const url = await cli.url();
        assert.match(cli.output(), /built-in demo Glance/);
        const { md5 } = await generatedDigests("cirros", 16 * MiB);
        const miss = await fetch(`${url}/v2/images/cirros/file`);
        assert.equal(miss.headers.get("cache-status"), "hono-image-cache; fwd=miss; stored");
        assert.equal(hexDigest((await readBody(miss)).bytes), md5);
        await waitFor(async () => (await readdir(dir)).includes("cirros"));
        const hit = await fetch(`${url}/v2/images/cirros/file`);
        assert.equal(hit.headers.get("cache-status"), "hono-image-cache; hit");
        assert.equal(hexDigest((await readBody(hit)).bytes), md5);

        terminate(cli);
        assert.equal(await cli.exited, 0, cli.output());
        assert.match(cli.output(), /cache=miss bytes=16777216/);
        assert.match(cli.output(), /cache=hit bytes=16777216/);
        assert.match(cli.output(), /SIGTERM: shutting down/);
      } finally {
        await stop(cli);
      }
    });
  });

  it("leaves no partial entry to serve after a SIGTERM during a fill", async () => {
    const size = 2 * MiB;
    const origin = demoOrigin({
      images: { slow: { size } },
      chunkSize: 32 * 1024,
      chunkDelay: 15,
    });
    const upstream = await startServer(origin.app.fetch);
    const { md5 } = await generatedDigests("slow", size);
    try {
      await withTempDir(async (dir) => {
        const args = [
          "--upstream",
          upstream.url,
          "--listen",
          "127.0.0.1:0",
          "--cache-dir",
          dir,
          "--shutdown-timeout",
          "300ms",
        ];
        const first = serve(args);
        try {
          const url = await first.url();
          const res = await fetch(`${url}/v2/images/slow/file`);
          assert.equal(res.headers.get("cache-status"), "hono-image-cache; fwd=miss; stored");
          const reader = res.body!.getReader();
          await reader.read();
          await waitFor(async () => (await readdir(join(dir, "incomplete"))).includes("slow"));
          terminate(first);
          let failed = false;
          try {
            for (let i = 0; i < 1000 && !(await reader.read()).done; i++);
          } catch {
            failed = true;
          }
          assert.ok(failed, "the cut download fails visibly");
          assert.equal(await first.exited, 0);
          assert.match(first.output(), /abandoned 1 fill\(s\): slow/);
        } finally {
          await stop(first);
        }
        assert.ok(!(await readdir(dir)).includes("slow"), "nothing committed");

        const second = serve(args);
        try {
          const url = await second.url();
          const again = await fetch(`${url}/v2/images/slow/file`);
          assert.equal(again.headers.get("cache-status"), "hono-image-cache; fwd=miss; stored");
          assert.equal(hexDigest((await readBody(again)).bytes), md5);
          await waitFor(async () => (await readdir(dir)).includes("slow"));
          const hit = await fetch(`${url}/v2/images/slow/file`);
          assert.equal(hit.headers.get("cache-status"), "hono-image-cache; hit");
          assert.equal(hexDigest((await readBody(hit)).bytes), md5);
          assert.deepEqual(await readdir(join(dir, "incomplete")), [], "the dead fill was swept");
          assert.equal(origin.stats.reads.slow, 2);
          terminate(second);
          assert.equal(await second.exited, 0);
        } finally {
          await stop(second);
        }
      });
    } finally {
      await upstream.close();
    }
  });
});
