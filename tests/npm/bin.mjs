/**
 * The npm package's command, from a fresh project, on the runtime that runs
 * this file (Node 22, Node 24 or Bun): `hono-image-cache serve` as
 * `npx hono-image-cache serve` starts it (node_modules/.bin), in front of its
 * demo Glance; an image downloaded twice with the demo token (a miss, then a
 * hit, both byte-exact), refused without a token, a third download under way
 * (read slowly) when SIGTERM comes finishes, and the command exits 0.
 *
 * Run by scripts/test_all.ts in the temporary project where the tarball is
 * installed: `node bin.mjs`, `bun bin.mjs`. Exits 1 with a message on
 * failure, within 90 s.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import process from "node:process";
import { generatedDigests } from "hono-image-cache/testing";

const runtime = globalThis.Bun ? `bun ${globalThis.Bun.version}` : `node ${process.version}`;
const deadline = setTimeout(() => {
  console.error(`bin FAILED on ${runtime}: no result within 90 s`);
  process.exit(1);
}, 90_000);

/** Downloads `url` with `headers`, hashing the body as it streams. */
async function download(url, headers = {}) {
  const res = await fetch(url, { headers });
  const hash = createHash("md5");
  let length = 0;
  for await (const chunk of res.body) {
    hash.update(chunk);
    length += chunk.byteLength;
  }
  return { res, length, md5: hash.digest("hex") };
}

const directory = await mkdtemp(join(tmpdir(), "hono-image-cache-bin-"));
let child;
let output = "";
try {
  const bin = join(process.cwd(), "node_modules", ".bin", "hono-image-cache");
  const help = spawn(process.execPath, [bin, "help"], { stdio: ["ignore", "pipe", "pipe"] });
  let helpText = "";
  help.stdout.on("data", (chunk) => helpText += chunk);
  assert.equal(await new Promise((resolve) => help.on("close", resolve)), 0);
  assert.match(helpText, /serve +The caching proxy/);

  child = spawn(
    process.execPath,
    [
      bin,
      "serve",
      "--listen",
      "127.0.0.1:0",
      "--cache-dir",
      directory,
      "--shutdown-timeout",
      "60s",
    ],
    { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, NO_COLOR: "1" } },
  );
  child.stdout.on("data", (chunk) => output += chunk);
  child.stderr.on("data", (chunk) => output += chunk);
  const exited = new Promise((resolve) => child.on("close", (code) => resolve(code)));
  for (let i = 0; i < 300 && !/listening on http:\/\/\S+/.test(output); i++) {
    if (child.exitCode !== null) break;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  const url = /listening on (http:\/\/\S+)/.exec(output)?.[1];
  assert.ok(url, `the command did not start:\n${output}`);

  const image = `${url}/v2/images/cirros/file`;
  const reader = { "x-auth-token": "demo-reader" };
  const { md5 } = await generatedDigests("cirros", 16 * 2 ** 20);
  const miss = await download(image, reader);
  assert.equal(miss.res.status, 200);
  assert.equal(miss.md5, md5, "the miss has the origin's bytes");
  assert.match(miss.res.headers.get("cache-status") ?? "", /fwd=miss; stored/);
  let hit;
  for (let i = 0; i < 100; i++) {
    hit = await download(image, reader);
    if (hit.res.headers.get("cache-status") === "hono-image-cache; hit") break;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  assert.equal(hit.res.headers.get("cache-status"), "hono-image-cache; hit");
  assert.equal(hit.md5, md5, "the hit has the origin's bytes");
  const anonymous = await fetch(image);
  await anonymous.body?.cancel();
  assert.equal(anonymous.status, 401, "the access check");

  // A download under way when SIGTERM comes, read slowly: it finishes, then the command
  // exits 0.
  const slow = await fetch(image, { headers: reader });
  const body = slow.body.getReader();
  const hash = createHash("md5");
  const chunk = (await body.read()).value;
  hash.update(chunk);
  let length = chunk.byteLength;
  child.kill("SIGTERM");
  for (;;) {
    await new Promise((resolve) => setTimeout(resolve, 2));
    const { done, value } = await body.read();
    if (done) break;
    hash.update(value);
    length += value.byteLength;
  }
  assert.equal(length, 16 * 2 ** 20, "the download under way was not cut");
  assert.equal(hash.digest("hex"), md5);
  assert.equal(await exited, 0, output);
  assert.match(output, /message="stopped"/);
  console.log(`bin ok on ${runtime}: serve, miss, hit, 401, drained on SIGTERM, exit 0`);
} catch (error) {
  console.error(`bin FAILED on ${runtime}:`, error, `\n--- the command's output:\n${output}`);
  process.exitCode = 1;
  child?.kill("SIGKILL");
} finally {
  await rm(directory, { recursive: true, force: true });
  clearTimeout(deadline);
}
