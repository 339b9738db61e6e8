import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { mkdir, readdir, stat, unlink, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { Hono } from "hono";
import { FileSystemStore, imageCache, MemoryStore } from "hono-image-cache";
import {
  assertBytes,
  pattern,
  readBody,
  sleep,
  slowStream,
  waitFor,
  withTempDir,
} from "./_helpers.ts";
import { admin, cachedIds, images, testOrigin, withManaged } from "./_management.ts";

/** Requests `id` and reads the whole body; returns its Cache-Status. */
async function fetchImage(app: Hono, id: string): Promise<string> {
  const res = await app.request(`/v2/images/${id}/file`);
  assert.equal(res.status, 200);
  const { error } = await readBody(res);
  assert.equal(error, undefined);
  return res.headers.get("cache-status") ?? "";
}

/** Bytes of data (not metadata) in the cache directory, committed and partial. */
async function dataBytes(directory: string): Promise<number> {
  let total = 0;
  for (
    const [dir, names] of [
      [directory, await readdir(directory)],
      [join(directory, "incomplete"), await readdir(join(directory, "incomplete"))],
    ] as const
  ) {
    for (const name of names) {
      if (name.endsWith(".json") || name.endsWith(".owner") || name.endsWith(".tmp")) continue;
      try {
        const info = await stat(join(dir, name));
        if (info.isFile()) total += info.size;
      } catch {
        // Renamed or removed while we looked.
      }
    }
  }
  return total;
}

describe("pruning by least recent use", () => {
  it("keeps the five most recently read of eleven 1 KiB images when pruned to 5 KiB after a restart", async () => {
    await withTempDir(async (directory) => {
      const origin = testOrigin(images(11, 1024));
      const first = new FileSystemStore({ directory, maxSize: 64 * 1024 });
      await withManaged(first, origin, { prefetch: false }, async ({ app }) => {
        for (let i = 0; i < 10; i++) await fetchImage(app, `img${i}`);
        for (let i = 0; i < 10; i++) {
          assert.match(await fetchImage(app, `img${i}`), /hit/);
          await sleep(3); // distinct access times
        }
        await fetchImage(app, "img10");
      }); // closing the store writes the hit counts and access times

      const restarted = new FileSystemStore({ directory, maxSize: 5 * 1024 });
      await withManaged(restarted, origin, { prefetch: false }, async ({ app }) => {
        const res = await admin(app, "POST", "/v2/cache/prune");
        assert.deepEqual(await res.json(), { total_files_pruned: 6, total_bytes_pruned: 6144 });
        assert.deepEqual(await cachedIds(app), ["img10", "img6", "img7", "img8", "img9"]);
      });
    });
  });

  it("prunes everything when maxSize is 0", async () => {
    await withTempDir(async (directory) => {
      const origin = testOrigin(images(3, 1024));
      const first = new FileSystemStore({ directory });
      await withManaged(first, origin, { prefetch: false }, async ({ app }) => {
        for (let i = 0; i < 3; i++) await fetchImage(app, `img${i}`);
      });
      const empty = new FileSystemStore({ directory, maxSize: 0 });
      await withManaged(empty, origin, { prefetch: false }, async ({ app }) => {
        const res = await admin(app, "POST", "/v2/cache/prune");
        assert.deepEqual(await res.json(), { total_files_pruned: 3, total_bytes_pruned: 3072 });
        assert.deepEqual(await cachedIds(app), []);
      });
      assert.deepEqual((await readdir(directory)).sort(), [
        "deleted",
        "incomplete",
        "invalid",
        "queue",
      ]);
    });
  });

  it("counts an entry whose file went missing as 0 bytes", async () => {
    await withTempDir(async (directory) => {
      const origin = testOrigin(images(3, 1024));
      const store = new FileSystemStore({ directory });
      await withManaged(store, origin, { prefetch: false }, async ({ app }) => {
        for (let i = 0; i < 3; i++) await fetchImage(app, `img${i}`);
      });
      await unlink(join(directory, "img1"));
      const empty = new FileSystemStore({ directory, maxSize: 0 });
      await withManaged(empty, origin, { prefetch: false }, async ({ app }) => {
        const res = await admin(app, "POST", "/v2/cache/prune");
        assert.deepEqual(await res.json(), { total_files_pruned: 2, total_bytes_pruned: 2048 });
      });
    });
  });

  it("handles data files without metadata, and names it cannot remove, without looping", async () => {
    await withTempDir(async (directory) => {
      const origin = testOrigin(images(2, 1024));
      const store = new FileSystemStore({ directory, maxSize: 1024 });
      await withManaged(store, origin, { prefetch: false }, async ({ app }) => {
        await fetchImage(app, "img0");
        await writeFile(join(directory, "orphan"), pattern(4096));
        await mkdir(join(directory, "adirectory"));
        const started = Date.now();
        const res = await admin(app, "POST", "/v2/cache/prune");
        assert.equal(res.status, 200);
        assert.deepEqual(await res.json(), { total_files_pruned: 0, total_bytes_pruned: 0 });
        assert.ok(Date.now() - started < 5000);
        assert.deepEqual(await cachedIds(app), ["img0"]);
        // A fill still makes room by evicting the real entry.
        assert.match(await fetchImage(app, "img1"), /stored/);
        assert.deepEqual(await cachedIds(app), ["img1"]);
      });
    });
  });
});

describe("automatic pruning", () => {
  it("evicts the least recently used entry when a fill needs the room", async () => {
    const origin = testOrigin(images(4, 1024));
    const store = new MemoryStore({ maxSize: 3 * 1024 });
    await withManaged(store, origin, { prefetch: false }, async ({ app }) => {
      for (let i = 0; i < 3; i++) await fetchImage(app, `img${i}`);
      await sleep(1100); // past the grace of recently served entries
      assert.match(await fetchImage(app, "img0"), /hit/);
      assert.match(await fetchImage(app, "img3"), /stored/);
      assert.deepEqual(await cachedIds(app), ["img0", "img2", "img3"]);
    });
  });

  it("evicts the least recently used entry though it was served in the last second, removing its file a second later", async () => {
    const origin = testOrigin(images(3, 1024));
    const store = new MemoryStore({ maxSize: 2 * 1024 });
    await withManaged(store, origin, { prefetch: false }, async ({ app }) => {
      // A few milliseconds apart: access times are in milliseconds.
      for (const [id, status] of [["img0"], ["img1"], ["img0", /hit/], ["img1", /hit/]] as const) {
        const answer = await fetchImage(app, id);
        if (status !== undefined) assert.match(answer, status);
        await sleep(3);
      }
      assert.equal(await fetchImage(app, "img2"), "hono-image-cache; fwd=miss; stored");
      // img0's file stays a moment: a hit just answered may not have opened it yet.
      assert.deepEqual(await cachedIds(app), ["img0", "img1", "img2"]);
      await waitFor(async () => (await cachedIds(app)).length === 2, 3_000);
      assert.deepEqual(await cachedIds(app), ["img1", "img2"]);
    });
  });

  it("never exceeds maxSize on disk with concurrent fills, and every client gets its bytes", async () => {
    await withTempDir(async (directory) => {
      const size = 64 * 1024;
      const maxSize = 4 * size;
      const origin = testOrigin(images(20, size));
      origin.delay = 3;
      const store = new FileSystemStore({ directory, maxSize });
      await withManaged(store, origin, { prefetch: false }, async ({ app }) => {
        let peak = 0;
        let sampling = true;
        const sampler = (async () => {
          while (sampling) {
            peak = Math.max(peak, await dataBytes(directory));
            await sleep(2);
          }
        })();
        const statuses: string[] = [];
        for (const wave of [0, 10]) {
          await Promise.all(Array.from({ length: 10 }, async (_, i) => {
            const id = `img${wave + i}`;
            const res = await app.request(`/v2/images/${id}/file`);
            statuses.push(res.headers.get("cache-status") ?? "");
            const { bytes, error } = await readBody(res);
            assert.equal(error, undefined);
            assertBytes(bytes, origin.images.get(id)!);
          }));
          await sleep(20);
        }
        sampling = false;
        await sampler;
        assert.ok(peak <= maxSize, `peak ${peak} <= ${maxSize}`);
        assert.ok(statuses.filter((s) => s.endsWith("stored")).length >= 8);
        assert.ok(statuses.some((s) => s.endsWith("detail=no-space")));
        const cached = await cachedIds(app);
        assert.ok(cached.length <= 4);
        assert.ok(
          cached.every((id) => Number(id.slice(3)) >= 10),
          "the second wave evicted the first",
        );
      });
    });
  });

  it("passes an image larger than the cache through with its full body", async () => {
    const origin = testOrigin(images(1, 8192));
    const store = new MemoryStore({ maxSize: 4096 });
    await withManaged(store, origin, { prefetch: false }, async ({ app }) => {
      const res = await app.request("/v2/images/img0/file");
      assert.equal(res.headers.get("cache-status"), "hono-image-cache; fwd=miss; detail=too-large");
      const { bytes, error } = await readBody(res);
      assert.equal(error, undefined);
      assertBytes(bytes, origin.images.get("img0")!);
      assert.deepEqual(await cachedIds(app), []);
    });
  });

  it("passes an image over maxObjectSize through, though the cache has room", async () => {
    const origin = testOrigin(images(2, 8192));
    origin.images.set("small", pattern(100));
    const store = new MemoryStore({ maxSize: 2 ** 20, maxObjectSize: 4096 });
    await withManaged(store, origin, { prefetch: false }, async ({ app }) => {
      assert.equal(await fetchImage(app, "img0"), "hono-image-cache; fwd=miss; detail=too-large");
      assert.match(await fetchImage(app, "small"), /stored/);
      assert.deepEqual(await cachedIds(app), ["small"]);
    });
  });

  it("removes at commit an image without Content-Length that turned out too large", async () => {
    const bytes = pattern(8192);
    const store = new MemoryStore({ maxSize: 4096 });
    const app = new Hono();
    app.use(imageCache({ store }));
    app.get("/v2/images/:id/file", (c) => c.body(slowStream(bytes, 1024)));
    const res = await app.request("/v2/images/big/file");
    assert.match(res.headers.get("cache-status") ?? "", /stored/);
    const body = await readBody(res);
    assert.equal(body.error, undefined);
    assertBytes(body.bytes, bytes);
    for (let i = 0; i < 100 && (await store.list()).length > 0; i++) await sleep(10);
    assert.deepEqual(await store.list(), []);
  });

  it("keeps minFree bytes free on the disk: a fill that would go below passes through", async () => {
    await withTempDir(async (directory) => {
      const origin = testOrigin(images(1, 1024));
      const store = new FileSystemStore({ directory, minFree: 2 ** 60 });
      await withManaged(store, origin, { prefetch: false }, async ({ app }) => {
        assert.equal(await fetchImage(app, "img0"), "hono-image-cache; fwd=miss; detail=no-space");
        assert.deepEqual(await cachedIds(app), []);
      });
    });
  });

  it("rejects a negative maxObjectSize", () => {
    assert.throws(() => new MemoryStore({ maxObjectSize: -1 }), RangeError);
    assert.throws(
      () => new FileSystemStore({ directory: "unused", maxObjectSize: -5 }),
      (error: unknown) => error instanceof RangeError && /"maxObjectSize"/.test(error.message),
    );
  });
});
