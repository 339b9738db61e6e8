/**
 * Smoke test of the installed npm package, from a fresh project, on the
 * runtime that runs it: Node (`@hono/node-server`), Bun (`Bun.serve`) or
 * Deno (`Deno.serve`). Plain ESM JavaScript in a `.mjs` file, so it also
 * proves the package imports from `.mjs` on Node.
 *
 * A server with `imageCache` + `FileSystemStore` in front of an origin that
 * streams a generated multi-MiB image; the image is downloaded twice over
 * HTTP: the first answer is a miss (filled while streamed), the second a hit
 * from disk; both digests must match and the origin is asked once.
 *
 * Run by scripts/test_all.ts in the temporary project where the tarball is
 * installed: `node smoke.mjs`, `bun smoke.mjs`, `deno run -A smoke.mjs`.
 * Exits 1 with a message on failure, within 60 s.
 */
import { Hono } from "hono";
import { FileSystemStore, imageCache } from "hono-image-cache";
import { demoOrigin, MemoryStore } from "hono-image-cache/testing";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { mkdtemp, readdir, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import process from "node:process";

const SIZE = 24 * 2 ** 20 + 12_345;
const CHUNK = 256 * 1024;
const ID = "0b6c1f2e-5d4a-4c3b-9a8f-7e6d5c4b3a21";

const runtime = globalThis.Deno
  ? `deno ${globalThis.Deno.version.deno}`
  : globalThis.Bun
  ? `bun ${globalThis.Bun.version}`
  : `node ${process.version}`;

const deadline = setTimeout(() => {
  console.error(`smoke FAILED on ${runtime}: no result within 60 s`);
  process.exit(1);
}, 60_000);

/** A deterministic image, made once (the origin slices it into a stream). */
function makeImage(size) {
  const bytes = new Uint8Array(size);
  const words = new Uint32Array(bytes.buffer, 0, size >> 2);
  let x = 2463534242;
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    words[i] = x >>> 0;
  }
  return bytes;
}

/** Starts `fetch` on a free loopback port with this runtime's own server. */
async function serve(fetch) {
  if (globalThis.Deno) {
    const server = globalThis.Deno.serve(
      { port: 0, hostname: "127.0.0.1", onListen() {} },
      fetch,
    );
    return { url: `http://127.0.0.1:${server.addr.port}`, close: () => server.shutdown() };
  }
  if (globalThis.Bun) {
    const server = globalThis.Bun.serve({ port: 0, hostname: "127.0.0.1", fetch });
    return { url: `http://127.0.0.1:${server.port}`, close: () => server.stop(true) };
  }
  const { serve } = await import("@hono/node-server");
  return await new Promise((resolve) => {
    const server = serve({ fetch, port: 0, hostname: "127.0.0.1" }, (info) => {
      resolve({
        url: `http://127.0.0.1:${info.port}`,
        close: () =>
          new Promise((done) => {
            server.closeAllConnections?.();
            server.close(() => done());
          }),
      });
    });
  });
}

/** Downloads `url`, hashing the body as it streams. */
async function download(url) {
  const started = performance.now();
  const res = await fetch(url);
  assert.equal(res.status, 200, `${url} answered ${res.status}`);
  const hash = createHash("md5");
  let length = 0;
  for await (const chunk of res.body) {
    hash.update(chunk);
    length += chunk.byteLength;
  }
  const seconds = (performance.now() - started) / 1000;
  return { res, length, md5: hash.digest("hex"), mibps: length / 2 ** 20 / seconds };
}

async function waitFor(check, what, timeout = 10_000) {
  const until = Date.now() + timeout;
  while (!(await check())) {
    if (Date.now() > until) throw new Error(`Timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

const image = makeImage(SIZE);
const md5 = createHash("md5").update(image).digest("hex");
let originReads = 0;

const directory = await mkdtemp(join(tmpdir(), "hono-image-cache-smoke-"));
let server;
try {
  const store = new FileSystemStore({ directory, maxSize: 256 * 2 ** 20 });
  const app = new Hono();
  app.use(imageCache({ store }));
  app.get("/v2/images/:id/file", (c) => {
    originReads++;
    let at = 0;
    const body = new ReadableStream({
      pull(controller) {
        if (at >= image.byteLength) return controller.close();
        controller.enqueue(image.slice(at, at + CHUNK));
        at += CHUNK;
      },
    }, { highWaterMark: 0 });
    return c.body(body, 200, {
      "content-type": "application/octet-stream",
      "content-length": String(SIZE),
      "content-md5": md5,
    });
  });
  server = await serve(app.fetch);
  const url = `${server.url}/v2/images/${ID}/file`;

  const miss = await download(url);
  assert.equal(miss.length, SIZE, "the miss has the full length");
  assert.equal(miss.md5, md5, "the miss has the origin's bytes");
  assert.match(miss.res.headers.get("cache-status") ?? "", /fwd=miss/);

  await waitFor(async () => (await store.get(ID)) !== undefined, "the fill to commit");
  assert.ok((await readdir(directory)).includes(ID), "the image is a file named by its id");

  const hit = await download(url);
  assert.equal(hit.length, SIZE, "the hit has the full length");
  assert.equal(hit.md5, md5, "the hit has the origin's bytes");
  assert.equal(hit.res.headers.get("cache-status"), "hono-image-cache; hit");
  assert.equal(hit.res.headers.get("content-length"), String(SIZE));
  assert.ok(hit.res.headers.get("etag"), "a hit has an ETag");
  assert.equal(originReads, 1, "the origin is asked once");

  // The ./testing subpath export.
  const { app: origin } = demoOrigin({ images: { tiny: { size: 10 } } });
  const testApp = new Hono();
  testApp.use(imageCache({ store: new MemoryStore() }));
  testApp.route("/", origin);
  const tiny = await testApp.request("/v2/images/tiny/file");
  assert.equal((await tiny.arrayBuffer()).byteLength, 10);

  console.log(
    `smoke ok on ${runtime}: ${(SIZE / 2 ** 20).toFixed(1)} MiB, miss ${
      miss.mibps.toFixed(0)
    } MiB/s, hit ${hit.mibps.toFixed(0)} MiB/s, md5 ${md5}`,
  );
} catch (error) {
  console.error(`smoke FAILED on ${runtime}:`, error);
  process.exitCode = 1;
} finally {
  await server?.close();
  await rm(directory, { recursive: true, force: true });
  clearTimeout(deadline);
}
