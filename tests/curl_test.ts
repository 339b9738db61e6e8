/**
 * A real client against a real server: `curl -r` (ranges) and `curl -C -`
 * (resume) give byte-exact files, compared by digest.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { Hono } from "hono";
import { FileSystemStore, imageCache } from "hono-image-cache";
import { demoOrigin, generatedImage } from "hono-image-cache/testing";
import { hexDigest, readBody, startServer, waitFor, withTempDir } from "./_helpers.ts";

/** Runs curl on loopback only; resolves with its stdout, rejects on a non-zero exit. */
function curl(args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(
      "curl",
      ["--silent", "--show-error", "--noproxy", "*", "--max-time", "30", ...args],
      { timeout: 60_000, encoding: "utf8" },
      (error, stdout, stderr) => {
        if (error) reject(new Error(`curl ${args.join(" ")} failed: ${stderr || error.message}`));
        else resolve(stdout);
      },
    );
  });
}

const curlVersion = await curl(["--version"]).then((out) => out.split("\n")[0], () => undefined);
const skip = curlVersion === undefined
  ? "curl is not installed (apt-get install -y curl): the real-client check is skipped"
  : false;
if (skip) console.warn(skip);

const SIZE = 3 * 2 ** 20 + 12_345;
const IMAGE_ID = "cirros";

async function expectedBytes(start: number, end: number): Promise<Uint8Array> {
  return (await readBody(new Response(generatedImage(IMAGE_ID, start, end)))).bytes;
}

/** A caching proxy (FileSystemStore) in front of a demo Glance, on a loopback port. */
async function withProxy(fn: (url: string, dir: string, store: FileSystemStore) => Promise<void>) {
  await withTempDir(async (dir) => {
    const store = new FileSystemStore({ directory: join(dir, "cache") });
    const { app: origin } = demoOrigin({ images: { [IMAGE_ID]: { size: SIZE } } });
    const app = new Hono();
    app.use(imageCache({
      store,
      fetchImage: (id, signal) =>
        Promise.resolve(origin.request(`/v2/images/${id}/file`, { signal })),
    }));
    app.route("/", origin);
    const server = await startServer(app.fetch);
    try {
      await fn(`${server.url}/v2/images/${IMAGE_ID}/file`, dir, store);
    } finally {
      await server.close();
      await store.close();
    }
  });
}

/** `status cache-status` of the last response curl got (`-w`). */
const WRITE_OUT = ["--write-out", "%{http_code} %header{cache-status}"];

describe("curl against a running server", { skip }, () => {
  it("downloads byte-exact ranges of a cached image with curl -r", async () => {
    await withProxy(async (url, dir) => {
      const full = join(dir, "full");
      assert.equal(
        await curl(["--output", full, ...WRITE_OUT, url]),
        "200 hono-image-cache; fwd=miss; stored",
      );
      const all = await expectedBytes(0, SIZE);
      assert.equal(hexDigest(await readFile(full)), hexDigest(all));

      const cases: [string, number, number][] = [
        ["0-0", 0, 1],
        ["1000-1999", 1000, 2000],
        ["-500", SIZE - 500, SIZE],
        [`${2 ** 20}-`, 2 ** 20, SIZE],
        [`${SIZE - 1}-${SIZE + 100}`, SIZE - 1, SIZE],
        ["0-", 0, SIZE],
      ];
      for (const [range, start, end] of cases) {
        const out = join(dir, `range-${start}`);
        const status = await curl(["--range", range, "--output", out, ...WRITE_OUT, url]);
        assert.equal(status, "206 hono-image-cache; hit", `curl -r ${range}`);
        assert.equal(
          hexDigest(await readFile(out)),
          hexDigest(all.subarray(start, end)),
          `curl -r ${range}`,
        );
      }
    });
  });

  it("resumes partial downloads to byte-exact files with curl -C -", async () => {
    await withProxy(async (url, dir, store) => {
      const all = await expectedBytes(0, SIZE);
      const md5 = hexDigest(all);

      // An uncached image: the resume goes to the origin, and a background fill caches it.
      const first = join(dir, "first");
      await writeFile(first, all.subarray(0, 1_000_001));
      assert.equal(
        await curl(["--continue-at", "-", "--output", first, ...WRITE_OUT, url]),
        "206 hono-image-cache; fwd=miss; detail=range",
      );
      assert.equal(hexDigest(await readFile(first)), md5);
      await waitFor(async () => (await store.get(IMAGE_ID)) !== undefined, 20_000);

      // A cached image: the resume is served from the store.
      for (const done of [1, 2 ** 20, SIZE - 1]) {
        const file = join(dir, `resume-${done}`);
        await writeFile(file, all.subarray(0, done));
        assert.equal(
          await curl(["--continue-at", "-", "--output", file, ...WRITE_OUT, url]),
          "206 hono-image-cache; hit",
          `resume after ${done} bytes`,
        );
        assert.equal(hexDigest(await readFile(file)), md5, `resume after ${done} bytes`);
      }

      // A complete file: 416 (bytes */size), which curl takes as "nothing left to get".
      const complete = join(dir, "complete");
      await writeFile(complete, all);
      assert.equal(
        await curl(["--continue-at", "-", "--output", complete, ...WRITE_OUT, url]),
        "416 hono-image-cache; hit",
      );
      assert.equal(hexDigest(await readFile(complete)), md5);
    });
  });

  it("gets the headers of a hit with curl -I", async () => {
    await withProxy(async (url) => {
      await curl(["--output", "/dev/null", url]);
      const headers = await curl(["--head", url]);
      assert.match(headers, /^HTTP\/1\.1 200/);
      assert.match(headers, new RegExp(`content-length: ${SIZE}\\r\\n`, "i"));
      assert.match(headers, /accept-ranges: bytes/i);
      assert.match(headers, /cache-status: hono-image-cache; hit/i);
    });
  });
});
