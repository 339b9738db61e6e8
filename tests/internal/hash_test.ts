/**
 * The fill's hash: large fills hash in a worker thread that stops with the
 * last of them. Deno-only: it imports src/ (tests/image_cache_test.ts checks
 * large fills end to end on every runtime).
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import {
  breakNextHashWorker,
  fillHash,
  hashWorkerRunning,
  WORKER_MIN,
} from "../../src/_fill/hash.ts";
import { hexDigest, pattern } from "../_helpers.ts";

const DATA = pattern(3 * 2 ** 20 + 12_345, 17);

function feed(hash: ReturnType<typeof fillHash>, data: Uint8Array, chunk = 60_000) {
  for (let at = 0; at < data.byteLength; at += chunk) hash.update(data.subarray(at, at + chunk));
}

describe("fillHash()", () => {
  it("gives the same digests in the worker as on the main thread, for each algorithm", async () => {
    for (const algorithm of ["md5", "sha256", "sha512"] as const) {
      const inline = fillHash(algorithm, 1000);
      const worker = fillHash(algorithm, WORKER_MIN);
      assert.equal(hashWorkerRunning(), true);
      feed(inline, DATA);
      feed(worker, DATA);
      const expected = hexDigest(DATA, algorithm);
      assert.equal(await inline.digest(), expected);
      assert.equal(await worker.digest(), expected);
      assert.equal(hashWorkerRunning(), false, "the worker stops with its last hash");
    }
  });

  it("shares one worker between fills, and stops it once every one is done or given up", async () => {
    const a = fillHash("md5", WORKER_MIN);
    const b = fillHash("md5", undefined); // unknown length: on this thread
    const c = fillHash("md5", 2 * WORKER_MIN);
    feed(a, DATA);
    feed(b, DATA);
    feed(c, DATA.subarray(0, 1000));
    c.dispose();
    await assert.rejects(c.digest());
    assert.equal(hashWorkerRunning(), true);
    assert.equal(await a.digest(), hexDigest(DATA));
    assert.equal(await b.digest(), hexDigest(DATA));
    assert.equal(hashWorkerRunning(), false);
  });

  it("asks the fill to wait while the worker trails by more than 8 MiB", async () => {
    const hash = fillHash("md5", WORKER_MIN);
    const big = pattern(12 * 2 ** 20, 5);
    let waits = 0;
    for (let at = 0; at < big.byteLength; at += 2 ** 20) {
      hash.update(big.subarray(at, at + 2 ** 20));
      const ready = hash.ready();
      if (ready !== undefined) {
        waits++;
        await ready;
      }
    }
    assert.ok(waits > 0, "it waited at least once");
    assert.equal(await hash.digest(), hexDigest(big));
  });

  it("goes on on this thread, with the same digest, when the worker cannot start", async () => {
    breakNextHashWorker();
    const hash = fillHash("sha256", WORKER_MIN);
    feed(hash, DATA);
    assert.equal(await hash.digest(), hexDigest(DATA, "sha256"));
    assert.equal(hashWorkerRunning(), false);
    // And the next large fill gets a working worker again.
    const next = fillHash("md5", WORKER_MIN);
    feed(next, DATA);
    assert.equal(await next.digest(), hexDigest(DATA));
  });
});
