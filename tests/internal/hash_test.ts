/**
 * The fill's hash: large fills hash in a worker thread that stops with the
 * last of them. Deno-only: it imports src/ (tests/image_cache_test.ts checks
 * large fills end to end on every runtime).
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import {
  breakNextHashWorker,
  type FileIdentity,
  fillHash,
  hashWorkerAvailable,
  hashWorkerBusy,
  stopIdleHashWorker,
  WORKER_MIN,
} from "../../src/_fill/hash.ts";
import { open, writeFile } from "node:fs/promises";
import { renameSync } from "node:fs";
import { join } from "node:path";
import { hexDigest, pattern, withTempDir } from "../_helpers.ts";

const DATA = pattern(3 * 2 ** 20 + 12_345, 17);

function feed(hash: ReturnType<typeof fillHash>, data: Uint8Array, chunk = 60_000) {
  for (let at = 0; at < data.byteLength; at += chunk) hash.update(data.subarray(at, at + chunk));
}

describe("fillHash()", () => {
  it("gives the same digests in the worker as on the main thread, for each algorithm", async () => {
    assert.equal(await hashWorkerAvailable(), true);
    for (const algorithm of ["md5", "sha256", "sha512"] as const) {
      const inline = fillHash(algorithm, 1000);
      const worker = fillHash(algorithm, WORKER_MIN);
      assert.equal(hashWorkerBusy(), true);
      feed(inline, DATA);
      feed(worker, DATA);
      const expected = hexDigest(DATA, algorithm);
      assert.equal(await inline.digest(), expected);
      assert.equal(await worker.digest(), expected);
      assert.equal(hashWorkerBusy(), false, "no fill uses the worker once its last hash is done");
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
    assert.equal(hashWorkerBusy(), true);
    assert.equal(await a.digest(), hexDigest(DATA));
    assert.equal(await b.digest(), hexDigest(DATA));
    assert.equal(hashWorkerBusy(), false);
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
    stopIdleHashWorker();
    breakNextHashWorker();
    const hash = fillHash("sha256", WORKER_MIN);
    feed(hash, DATA);
    assert.equal(await hash.digest(), hexDigest(DATA, "sha256"));
    assert.equal(hashWorkerBusy(), false);
    // And the next large fill gets a working worker again.
    const next = fillHash("md5", WORKER_MIN);
    feed(next, DATA);
    assert.equal(await next.digest(), hexDigest(DATA));
  });

  /** DATA in a file, as a store writes it, and a source that reads it on this thread. */
  async function withFile(
    fn: (
      source: {
        path: string;
        identity: FileIdentity;
        read: (p: number, n: number) => Promise<Uint8Array>;
      },
    ) => Promise<void>,
  ) {
    await withTempDir(async (dir) => {
      const path = join(dir, "partial");
      await writeFile(path, DATA);
      const handle = await open(path, "r");
      const { dev, ino } = await handle.stat();
      const read = async (position: number, length: number) => {
        const buffer = new Uint8Array(length);
        const { bytesRead } = await handle.read(buffer, 0, length, position);
        return buffer.subarray(0, bytesRead);
      };
      try {
        await fn({ path, identity: { dev, ino }, read });
      } finally {
        await handle.close();
      }
    });
  }

  it("hashes a stored fill by reading its file back in the worker, with the same digest", async () => {
    assert.equal(await hashWorkerAvailable(), true);
    await withFile(async (source) => {
      let mainReads = 0;
      const hash = fillHash("sha256", WORKER_MIN, {
        ...source,
        read: (position, length) => {
          mainReads++;
          return source.read(position, length);
        },
      });
      for (let end = 500_000; end < DATA.byteLength; end += 500_000) hash.fromFile(end);
      hash.fromFile(DATA.byteLength);
      assert.equal(await hash.digest(), hexDigest(DATA, "sha256"));
      assert.equal(mainReads, 0, "the main thread read nothing");
      assert.equal(hashWorkerBusy(), false);
    });
  });

  it("goes on from memory after the file: a fill that stopped storing", async () => {
    await withFile(async (source) => {
      const hash = fillHash("md5", WORKER_MIN, source);
      hash.fromFile(1_000_000);
      feed(hash, DATA.subarray(1_000_000));
      assert.equal(await hash.digest(), hexDigest(DATA));
    });
  });

  it("reads the file back on this thread when the worker cannot start, or cannot open it", async () => {
    await withFile(async (source) => {
      stopIdleHashWorker();
      breakNextHashWorker();
      const broken = fillHash("md5", WORKER_MIN, source);
      broken.fromFile(2_000_000);
      feed(broken, DATA.subarray(2_000_000));
      assert.equal(await broken.digest(), hexDigest(DATA));
      const unopened = fillHash("md5", WORKER_MIN, { ...source, path: source.path + ".gone" });
      unopened.fromFile(DATA.byteLength);
      assert.equal(await unopened.digest(), hexDigest(DATA));
    });
  });

  it("hashes the fill's own file, not one a delete put under its name before the worker opened it", async () => {
    await withFile(async (source) => {
      const other = source.path + ".other";
      await writeFile(other, pattern(DATA.byteLength, 99));
      stopIdleHashWorker(); // The worker starts now: the file is replaced before it opens it.
      let mainReads = 0;
      const hash = fillHash("md5", WORKER_MIN, {
        ...source,
        read: (position, length) => {
          mainReads++;
          return source.read(position, length);
        },
      });
      renameSync(other, source.path);
      hash.fromFile(DATA.byteLength);
      assert.equal(await hash.digest(), hexDigest(DATA));
      assert.ok(mainReads > 0, "the fill's own file was read back on this thread");
    });
  });

  it("hashes on this thread from the file for a small fill", async () => {
    await withFile(async (source) => {
      const hash = fillHash("md5", 1000, source);
      hash.fromFile(DATA.byteLength);
      assert.equal(await hash.digest(), hexDigest(DATA));
    });
  });
});
