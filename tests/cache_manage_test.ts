import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import process from "node:process";
import { fileURLToPath } from "node:url";
import { MemoryStore } from "hono-image-cache";
import { readBody, startServer, waitFor } from "./_helpers.ts";
import {
  admin,
  cachedIds,
  images,
  listing,
  type ManagedApp,
  managedApp,
  testOrigin,
} from "./_management.ts";

// The CLI lives in scripts/, which the npm package does not ship: these
// tests run on the source tree only.
const SCRIPT = fileURLToPath(new URL("../scripts/cache_manage.ts", import.meta.url));
const skip = existsSync(SCRIPT) ? false : "scripts/cache_manage.ts is not here (npm package)";

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

type Main = (args: string[], io: unknown) => Promise<number>;

/** Runs the CLI in this process against `url`, answering confirmations with `answers`. */
async function cli(url: string, args: string[], answers: (string | null)[] = []): Promise<Run> {
  const { main } = await import(SCRIPT) as { main: Main };
  let stdout = "";
  let stderr = "";
  const code = await main(["--url", url, ...args], {
    stdout: (text: string) => stdout += text,
    stderr: (text: string) => stderr += text,
    readLine: () => Promise.resolve(answers.length > 0 ? answers.shift()! : null),
    env: { IMAGE_CACHE_TOKEN: "admin" },
    isTTY: false,
  });
  return { code, stdout, stderr };
}

/** A running server with the management API and the cache. */
async function withServer(fn: (url: string, managed: ManagedApp) => Promise<void>) {
  const origin = testOrigin(images(3, 64 * 1024));
  const store = new MemoryStore();
  const managed = managedApp(store, origin);
  const server = await startServer(managed.app.fetch);
  try {
    await fn(server.url, managed);
  } finally {
    managed.stop();
    await server.close();
    await store.close();
  }
}

async function cache(managed: ManagedApp, id: string) {
  await readBody(await managed.app.request(`/v2/images/${id}/file`));
}

describe("cache-manage CLI", { skip }, () => {
  it("lists cached images as a table with id, times, size and hits", async () => {
    await withServer(async (url, managed) => {
      assert.deepEqual(await cli(url, ["list-cached"]), {
        code: 0,
        stdout: "No cached images.\n",
        stderr: "",
      });
      await cache(managed, "img0");
      await cache(managed, "img0");
      const run = await cli(url, ["list-cached"]);
      assert.equal(run.code, 0);
      const lines = run.stdout.split("\n");
      assert.equal(lines[0], "Found 1 cached images...");
      assert.match(
        lines[2],
        /^\| ID +\| Last Accessed \(UTC\) \| Last Modified \(UTC\) \| +Size \| Hits \|$/,
      );
      assert.match(lines[4], /^\| img0 \| \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \| .+ \| 65536 \| +1 \|$/);
    });
  });

  it("queues an image and, with --wait, shows a progress bar until it is cached", async () => {
    await withServer(async (url, managed) => {
      managed.origin.delay = 10;
      const run = await cli(url, ["queue-image", "img1", "--wait", "--poll-interval", "5"]);
      assert.equal(run.code, 0, run.stderr);
      assert.match(
        run.stdout,
        /^Queued image img1 for caching\nImage img1 is cached \(64\.0 KiB\)\n$/,
      );
      assert.match(run.stderr, /\[#{30}\] 100% 64\.0 KiB \/ 64\.0 KiB/);
      assert.deepEqual(await cachedIds(managed.app), ["img1"]);
      assert.equal(managed.origin.reads.get("img1"), 1);
    });
  });

  it("lists queued images and deletes one or all of them", async () => {
    await withServer(async (url, managed) => {
      managed.stop(); // keep them queued: no prefetching
      assert.equal((await cli(url, ["list-queued"])).stdout, "No queued images.\n");
      for (const id of ["q1", "q2", "q3"]) {
        assert.equal((await cli(url, ["queue-image", id])).code, 0);
      }
      const listed = await cli(url, ["list-queued"]);
      assert.match(listed.stdout, /^Found 3 queued images\.\.\.\n/);
      assert.ok(listed.stdout.indexOf("q1") < listed.stdout.indexOf("q3"));

      assert.equal((await cli(url, ["delete-queued-image", "q2"])).code, 0);
      assert.deepEqual((await listing(managed.app)).queued_images, ["q1", "q3"]);
      const missing = await cli(url, ["delete-queued-image", "q2"]);
      assert.equal(missing.code, 1);
      assert.equal(missing.stderr, "Error: Image q2 is not queued\n");

      const declined = await cli(url, ["delete-all-queued-images"], ["n"]);
      assert.equal(declined.code, 1);
      assert.match(declined.stdout, /Delete all queued images\? \[y\/N\]/);
      assert.equal((await listing(managed.app)).queued_images.length, 2);
      const accepted = await cli(url, ["delete-all-queued-images"], ["y"]);
      assert.equal(accepted.code, 0);
      assert.deepEqual((await listing(managed.app)).queued_images, []);
    });
  });

  it("deletes cached images: one, then all (asking first unless --force)", async () => {
    await withServer(async (url, managed) => {
      for (const id of ["img0", "img1", "img2"]) await cache(managed, id);
      assert.deepEqual(await cli(url, ["delete-cached-image", "img0"]), {
        code: 0,
        stdout: "Deleted cached image img0\n",
        stderr: "",
      });
      const again = await cli(url, ["delete-cached-image", "img0"]);
      assert.equal(again.code, 1);
      assert.equal(again.stderr, "Error: Image img0 is not cached, queued nor being cached\n");

      const noInput = await cli(url, ["delete-all-cached-images"], [null]);
      assert.equal(noInput.code, 1, "no answer (no stdin) means no");
      assert.deepEqual(await cachedIds(managed.app), ["img1", "img2"]);
      const forced = await cli(url, ["delete-all-cached-images", "--force"]);
      assert.equal(forced.code, 0);
      assert.doesNotMatch(forced.stdout, /\[y\/N\]/);
      assert.deepEqual(await cachedIds(managed.app), []);
    });
  });

  it("prunes and cleans", async () => {
    await withServer(async (url) => {
      assert.deepEqual(await cli(url, ["prune"]), {
        code: 0,
        stdout: "Pruned 0 images (0 B)\n",
        stderr: "",
      });
      assert.deepEqual(await cli(url, ["clean"]), {
        code: 0,
        stdout: "Removed 0 invalid and 0 stalled partial files\n",
        stderr: "",
      });
    });
  });

  it("exits 1 with a clear message for 403, a dead server, bad commands and options", async () => {
    await withServer(async (url) => {
      const { main } = await import(SCRIPT) as { main: Main };
      let stderr = "";
      const io = {
        stdout: () => {},
        stderr: (text: string) => stderr += text,
        readLine: () => Promise.resolve(null),
        env: {},
        isTTY: false,
      };
      const wrong = { ...io, env: { IMAGE_CACHE_TOKEN: "wrong" } };
      assert.equal(await main(["--url", url, "list-cached"], wrong), 1);
      assert.match(
        stderr,
        /^Error: Forbidden: GET \/v2\/cache was refused .*Check IMAGE_CACHE_TOKEN/,
      );

      const dead = await startServer(() => new Response());
      const deadUrl = dead.url;
      await dead.close();
      const run = await cli(deadUrl, ["list-cached"]);
      assert.equal(run.code, 1);
      assert.match(run.stderr, new RegExp(`^Error: Cannot connect to ${deadUrl}`));

      for (
        const [args, message] of [
          [["frobnicate"], /Unknown command "frobnicate"/],
          [["queue-image"], /queue-image needs an image ID/],
          [["--bogus", "list-cached"], /Unknown option --bogus/],
          [["--timeout", "soon", "list-cached"], /--timeout must be a positive number/],
        ] as const
      ) {
        const bad = await cli(url, [...args]);
        assert.equal(bad.code, 1, args.join(" "));
        assert.match(bad.stderr, message);
      }
      const notApi = await cli(url + "/elsewhere", ["list-cached"]);
      assert.equal(notApi.code, 1);
      assert.match(notApi.stderr, /Not found: GET .*Is the management API mounted at --url\?/);
    });
  });

  it("runs as a program: exit codes, and a confirmation read from stdin", async () => {
    await withServer(async (url, managed) => {
      await admin(managed.app, "PUT", "/v2/cache/img2");
      await waitFor(async () => (await cachedIds(managed.app)).includes("img2"));
      const ok = await program(["--url", url, "list-cached"], "", { IMAGE_CACHE_TOKEN: "admin" });
      assert.equal(ok.code, 0, ok.stderr);
      assert.match(ok.stdout, /img2/);
      const refused = await program(["--url", url, "list-cached"], "", {
        IMAGE_CACHE_TOKEN: "wrong",
      });
      assert.equal(refused.code, 1);
      assert.match(refused.stderr, /Forbidden/);
      const confirmed = await program(
        ["--url", url, "delete-all-cached-images"],
        "y\n",
        { IMAGE_CACHE_TOKEN: "admin" },
      );
      assert.equal(confirmed.code, 0, confirmed.stderr);
      assert.deepEqual(await cachedIds(managed.app), []);
    });
  });
});

/** Runs the CLI as a child process of this runtime. */
function program(args: string[], input = "", env: Record<string, string> = {}): Promise<Run> {
  const runtime = globalThis as { Deno?: unknown; Bun?: unknown };
  const command = runtime.Deno !== undefined
    ? ["run", "--allow-net", "--allow-env", "--allow-read", SCRIPT]
    : runtime.Bun !== undefined
    ? [SCRIPT]
    : ["--experimental-strip-types", "--no-warnings", SCRIPT];
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [...command, ...args], {
      env: { ...process.env, IMAGE_CACHE_TOKEN: "", OS_AUTH_TOKEN: "", ...env, NO_COLOR: "1" },
      stdio: ["pipe", "pipe", "pipe"],
    });
    let stdout = "";
    let stderr = "";
    const timer = setTimeout(() => child.kill("SIGKILL"), 30_000);
    child.stdout.on("data", (chunk) => stdout += chunk);
    child.stderr.on("data", (chunk) => stderr += chunk);
    child.on("error", reject);
    child.on("close", (code) => {
      clearTimeout(timer);
      resolve({ code: code ?? 1, stdout, stderr });
    });
    child.stdin.end(input);
  });
}
