import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { FileSystemStore, MemoryStore } from "hono-image-cache";
import type { FetchImage } from "hono-image-cache";
import { assertBytes, hexDigest, pattern, readBody, waitFor, withTempDir } from "./_helpers.ts";
import { admin, cachedIds, images, listing, testOrigin, withManaged } from "./_management.ts";

async function status(app: Parameters<typeof admin>[0], id: string) {
  const res = await admin(app, "GET", `/v2/cache/${id}/status`);
  if (res.status === 404) {
    await res.body?.cancel();
    return undefined;
  }
  return await res.json();
}

describe("prefetch queue", () => {
  it("keeps one entry at its first position when an image is queued twice", async () => {
    await withManaged(new MemoryStore(), testOrigin(), { prefetch: false }, async ({ app }) => {
      for (const id of ["a", "b", "a"]) {
        assert.equal((await admin(app, "PUT", `/v2/cache/${id}`)).status, 202);
      }
      assert.deepEqual((await listing(app)).queued_images, ["a", "b"]);
    });
  });

  it("without fetchImage only queues; a request that fills the image removes it from the queue", async () => {
    const origin = testOrigin(images(1, 2048));
    await withManaged(new MemoryStore(), origin, { prefetch: false }, async ({ app }) => {
      await admin(app, "PUT", "/v2/cache/img0");
      assert.deepEqual((await listing(app)).queued_images, ["img0"]);
      const res = await app.request("/v2/images/img0/file");
      await readBody(res);
      await waitFor(async () => (await listing(app)).queued_images.length === 0);
      assert.deepEqual(await cachedIds(app), ["img0"]);
    });
  });

  it("survives a restart and resumes in queue order, at most prefetchConcurrency at once", async () => {
    await withTempDir(async (directory) => {
      const origin = testOrigin(images(6, 64 * 1024));
      origin.delay = 5;
      const first = new FileSystemStore({ directory });
      await withManaged(first, origin, { prefetch: false }, async ({ app }) => {
        for (const id of ["img3", "img0", "img5", "img1", "img4", "img2"]) {
          await admin(app, "PUT", `/v2/cache/${id}`);
        }
      });
      assert.equal(origin.reads.size, 0);

      const started: string[] = [];
      let inFlight = 0;
      let peak = 0;
      const fetchImage: FetchImage = async (id, signal) => {
        started.push(id);
        inFlight++;
        peak = Math.max(peak, inFlight);
        const res = await origin.app.request(`/v2/images/${id}/file`, { signal });
        // Count the download as finished when its body ends.
        const body = res.body!.pipeThrough(
          new TransformStream({ flush: () => void inFlight-- }),
        );
        return new Response(body, res);
      };
      const restarted = new FileSystemStore({ directory });
      await withManaged(
        restarted,
        origin,
        { fetchImage, prefetchConcurrency: 2 },
        async ({ app }) => {
          await waitFor(async () => (await cachedIds(app)).length === 6, 10_000);
          // Started in queue order; two started together may reach fetchImage in either order.
          const queue = ["img3", "img0", "img5", "img1", "img4", "img2"];
          assert.deepEqual([...started].sort(), [...queue].sort());
          started.forEach((id, i) => assert.ok(queue.slice(0, i + 2).includes(id), `${started}`));
          assert.equal(peak, 2);
          assert.deepEqual((await listing(app)).queued_images, []);
          for (const id of started) assert.equal(origin.reads.get(id), 1);
        },
      );
    });
  });

  it("keeps a failing image queued and listed, retries it with backoff, and caches it later", async () => {
    const origin = testOrigin(images(1, 4096));
    origin.failures.set("img0", { status: 503, times: 2 });
    await withManaged(new MemoryStore(), origin, {}, async ({ app, errors }) => {
      await admin(app, "PUT", "/v2/cache/img0");
      await waitFor(async () => (await status(app, "img0"))?.attempts >= 1);
      assert.deepEqual((await listing(app)).queued_images, ["img0"]);
      await waitFor(async () => (await cachedIds(app)).includes("img0"));
      assert.deepEqual((await listing(app)).queued_images, []);
      assert.equal(origin.failures.get("img0")?.times, 0);
      assert.equal(origin.reads.get("img0"), 1);
      assert.ok(errors.some((e) => /Prefetch of image "img0" failed \(status-503\)/.test(`${e}`)));
    });
  });

  it("retries a failing image at once when it is queued again", async () => {
    const origin = testOrigin(images(1, 1024));
    origin.failures.set("img0", { status: 500, times: 1 });
    await withManaged(
      new MemoryStore(),
      origin,
      { prefetchRetryDelay: 60_000 },
      async ({ app }) => {
        await admin(app, "PUT", "/v2/cache/img0");
        await waitFor(async () => (await status(app, "img0"))?.attempts === 1);
        await admin(app, "PUT", "/v2/cache/img0");
        await waitFor(async () => (await cachedIds(app)).includes("img0"), 2000);
      },
    );
  });

  it("does not commit a prefetched body that fails verification, and retries it", async () => {
    const bytes = pattern(8192);
    let calls = 0;
    const fetchImage: FetchImage = () => {
      calls++;
      const md5 = calls === 1 ? "0".repeat(32) : hexDigest(bytes);
      return Promise.resolve(
        new Response(bytes as Uint8Array<ArrayBuffer>, {
          headers: { "content-md5": md5, "content-length": String(bytes.byteLength) },
        }),
      );
    };
    await withManaged(new MemoryStore(), testOrigin(), { fetchImage }, async ({ app }) => {
      await admin(app, "PUT", "/v2/cache/x");
      await waitFor(async () => (await cachedIds(app)).includes("x"));
      assert.equal(calls, 2);
      const metrics = await (await admin(app, "GET", "/metrics")).text();
      assert.match(metrics, /^image_cache_verification_failures_total 1$/m);
      const hit = await app.request("/v2/images/x/file");
      assertBytes((await readBody(hit)).bytes, bytes);
    });
  });

  it("lets a request join a prefetch under way: one download", async () => {
    const origin = testOrigin(images(1, 512 * 1024));
    origin.delay = 10;
    await withManaged(new MemoryStore(), origin, {}, async ({ app }) => {
      await admin(app, "PUT", "/v2/cache/img0");
      await waitFor(async () => (await status(app, "img0"))?.state === "filling");
      const res = await app.request("/v2/images/img0/file");
      assert.equal(res.headers.get("cache-status"), "hono-image-cache; fwd=miss; collapsed");
      const { bytes, error } = await readBody(res);
      assert.equal(error, undefined);
      assertBytes(bytes, origin.images.get("img0")!);
      await waitFor(async () => (await cachedIds(app)).includes("img0"));
      assert.equal(origin.reads.get("img0"), 1);
    });
  });

  it("reports a fill's progress while it prefetches", async () => {
    const origin = testOrigin(images(1, 512 * 1024));
    origin.delay = 10;
    await withManaged(new MemoryStore(), origin, {}, async ({ app }) => {
      await admin(app, "PUT", "/v2/cache/img0");
      await waitFor(async () => (await status(app, "img0"))?.bytes > 0);
      const filling = await status(app, "img0");
      assert.equal(filling.state, "filling");
      assert.equal(filling.size, 512 * 1024);
      await waitFor(async () => (await status(app, "img0"))?.state === "cached");
    });
  });

  it("stops when its signal is aborted: the fetch under way is aborted, the image stays queued", async () => {
    let seen: AbortSignal | undefined;
    const fetchImage: FetchImage = (_id, signal) => {
      seen = signal;
      return new Promise((_resolve, reject) => {
        signal.addEventListener("abort", () => reject(signal.reason), { once: true });
      });
    };
    const store = new MemoryStore();
    await withManaged(store, testOrigin(), { fetchImage }, async ({ app, stop }) => {
      await admin(app, "PUT", "/v2/cache/slow");
      await waitFor(() => seen !== undefined);
      stop();
      await waitFor(() => seen!.aborted);
      assert.deepEqual(await store.queued(), ["slow"]);
    });
  });
});
