import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { readdir, utimes, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { Hono } from "hono";
import { cacheApi, FileSystemStore, MemoryStore } from "hono-image-cache";
import type { CacheApiOptions, ImageStore } from "hono-image-cache";
import { readBody, waitFor, withTempDir } from "./_helpers.ts";
import { admin, cachedIds, images, listing, testOrigin, withManaged } from "./_management.ts";

/** Caches `id` through a plain request, as a client would. */
async function cache(app: Hono, id: string): Promise<void> {
  const res = await app.request(`/v2/images/${id}/file`);
  assert.equal(res.status, 200);
  const { error } = await readBody(res);
  assert.equal(error, undefined);
}

describe("cacheApi options", () => {
  it("throws a TypeError without authorize", () => {
    assert.throws(
      () => cacheApi({ store: new MemoryStore() } as unknown as CacheApiOptions),
      (error: unknown) =>
        error instanceof TypeError && /"authorize" must be a function/.test(error.message),
    );
  });

  it("throws a TypeError without a store", () => {
    assert.throws(
      () => cacheApi({ authorize: () => true } as unknown as CacheApiOptions),
      TypeError,
    );
  });

  it("throws a RangeError for a prefetchConcurrency that is not a positive integer", () => {
    for (const prefetchConcurrency of [0, -1, 1.5, NaN]) {
      assert.throws(
        () => cacheApi({ store: new MemoryStore(), authorize: () => true, prefetchConcurrency }),
        (error: unknown) =>
          error instanceof RangeError && /"prefetchConcurrency"/.test(error.message),
      );
    }
  });

  it("throws for a metricsPath that is not a path", () => {
    assert.throws(
      () => cacheApi({ store: new MemoryStore(), authorize: () => true, metricsPath: "metrics" }),
      TypeError,
    );
  });
});

describe("GET /v2/cache", () => {
  it("lists cached images by id with Glance's fields and queued ids in queue order", async () => {
    const store = new MemoryStore();
    const origin = testOrigin(images(2, 1024));
    await withManaged(store, origin, { prefetch: false }, async ({ app }) => {
      await cache(app, "img1");
      await cache(app, "img0");
      await cache(app, "img0"); // one hit
      for (const id of ["q3", "q1", "q2"]) {
        assert.equal((await admin(app, "PUT", `/v2/cache/${id}`)).status, 202);
      }
      const res = await admin(app, "GET", "/v2/cache");
      assert.equal(res.status, 200);
      assert.match(res.headers.get("content-type") ?? "", /^application\/json/);
      const body = await res.json();
      assert.deepEqual(Object.keys(body), ["cached_images", "queued_images"]);
      assert.deepEqual(body.queued_images, ["q3", "q1", "q2"]);
      assert.deepEqual(body.cached_images.map((i: { image_id: string }) => i.image_id), [
        "img0",
        "img1",
      ]);
      const [first] = body.cached_images;
      assert.deepEqual(Object.keys(first).sort(), [
        "hits",
        "image_id",
        "last_accessed",
        "last_modified",
        "size",
      ]);
      assert.equal(first.hits, 1);
      assert.equal(first.size, 1024);
      const now = Date.now() / 1000;
      for (const field of ["last_accessed", "last_modified"]) {
        assert.equal(typeof first[field], "number");
        assert.ok(Math.abs(first[field] - now) < 60, `${field} is in epoch seconds`);
      }
      assert.ok(first.last_accessed >= first.last_modified);
    });
  });

  it("answers HEAD like GET without a body", async () => {
    await withManaged(new MemoryStore(), testOrigin(), {}, async ({ app }) => {
      const res = await admin(app, "HEAD", "/v2/cache");
      assert.equal(res.status, 200);
      assert.equal(await res.text(), "");
    });
  });
});

describe("PUT /v2/cache/{id}", () => {
  it("answers 202 without a body, queues the image and prefetches it", async () => {
    const origin = testOrigin(images(1, 4096));
    await withManaged(new MemoryStore(), origin, {}, async ({ app, asked }) => {
      const res = await admin(app, "PUT", "/v2/cache/img0");
      assert.equal(res.status, 202);
      assert.equal(await res.text(), "");
      assert.deepEqual(asked, ["cache_image:img0"]);
      await waitFor(async () => (await cachedIds(app)).includes("img0"));
      assert.deepEqual((await listing(app)).queued_images, []);
      assert.equal(origin.reads.get("img0"), 1);
      const hit = await app.request("/v2/images/img0/file");
      assert.equal(hit.headers.get("cache-status"), "hono-image-cache; hit");
      await hit.body?.cancel();
    });
  });

  it("queues nothing for an image already cached", async () => {
    const origin = testOrigin(images(1, 1024));
    await withManaged(new MemoryStore(), origin, {}, async ({ app }) => {
      await cache(app, "img0");
      assert.equal((await admin(app, "PUT", "/v2/cache/img0")).status, 202);
      assert.deepEqual((await listing(app)).queued_images, []);
      assert.equal(origin.reads.get("img0"), 1);
    });
  });

  it("answers 202 for an image being filled, without a second download", async () => {
    const origin = testOrigin(images(1, 256 * 1024));
    origin.delay = 20;
    await withManaged(new MemoryStore(), origin, {}, async ({ app }) => {
      const client = await app.request("/v2/images/img0/file");
      assert.equal(client.status, 200);
      const reading = readBody(client);
      assert.equal((await admin(app, "PUT", "/v2/cache/img0")).status, 202);
      assert.deepEqual((await listing(app)).queued_images, []);
      assert.equal((await reading).error, undefined);
      await waitFor(async () => (await cachedIds(app)).includes("img0"));
      assert.equal(origin.reads.get("img0"), 1);
    });
  });
});

describe("DELETE /v2/cache/{id}", () => {
  it("removes the entry and its queue marker with 204, then answers 404", async () => {
    const origin = testOrigin(images(1, 1024));
    await withManaged(new MemoryStore(), origin, { prefetch: false }, async ({ app, asked }) => {
      await cache(app, "img0");
      await admin(app, "PUT", "/v2/cache/queued");
      assert.equal((await admin(app, "DELETE", "/v2/cache/img0")).status, 204);
      assert.equal((await admin(app, "DELETE", "/v2/cache/queued")).status, 204);
      const body = await listing(app);
      assert.deepEqual(body, { cached_images: [], queued_images: [] });
      const missing = await admin(app, "DELETE", "/v2/cache/img0");
      assert.equal(missing.status, 404);
      assert.match(await missing.text(), /img0/);
      assert.ok(asked.includes("cache_delete:img0"));
      const next = await app.request("/v2/images/img0/file");
      assert.match(next.headers.get("cache-status") ?? "", /fwd=miss/);
      await next.body?.cancel();
    });
  });

  it("stops a fill under way: the image is not committed", async () => {
    const origin = testOrigin(images(1, 512 * 1024));
    origin.delay = 5;
    await withManaged(new MemoryStore(), origin, {}, async ({ app }) => {
      const client = await app.request("/v2/images/img0/file");
      const reading = readBody(client);
      assert.equal((await admin(app, "DELETE", "/v2/cache/img0")).status, 204);
      const { bytes, error } = await reading;
      assert.equal(error, undefined, "the client that was reading still gets every byte");
      assert.equal(bytes.byteLength, 512 * 1024);
      assert.deepEqual(await cachedIds(app), []);
    });
  });
});

describe("DELETE /v2/cache", () => {
  const cases: [string | undefined, boolean, boolean][] = [
    [undefined, true, true],
    ["", true, true],
    ["both", true, true],
    ["cache", true, false],
    ["QUEUE", false, true],
  ];
  for (const [target, clearsCache, clearsQueue] of cases) {
    it(
      `clears ${clearsCache ? "the cache" : ""}${clearsCache && clearsQueue ? " and " : ""}${
        clearsQueue ? "the queue" : ""
      } with x-image-cache-clear-target ${JSON.stringify(target)}`,
      async () => {
        const origin = testOrigin(images(2, 1024));
        await withManaged(new MemoryStore(), origin, { prefetch: false }, async ({ app }) => {
          await cache(app, "img0");
          await cache(app, "img1");
          await admin(app, "PUT", "/v2/cache/q0");
          const headers: Record<string, string> = target === undefined
            ? {}
            : { "x-image-cache-clear-target": target };
          const res = await admin(app, "DELETE", "/v2/cache", headers);
          assert.equal(res.status, 204);
          assert.equal(await res.text(), "");
          const body = await listing(app);
          assert.equal(body.cached_images.length, clearsCache ? 0 : 2);
          assert.deepEqual(body.queued_images, clearsQueue ? [] : ["q0"]);
        });
      },
    );
  }

  it("leaves one tombstone for every image, not one per image (a cluster's peers answer fast)", async () => {
    await withTempDir(async (directory) => {
      const store = new FileSystemStore({ directory });
      await withManaged(
        store,
        testOrigin(images(3, 1024)),
        { prefetch: false },
        async ({ app }) => {
          for (const id of ["img0", "img1", "img2"]) await cache(app, id);
          assert.equal((await admin(app, "DELETE", "/v2/cache")).status, 204);
          assert.deepEqual(await readdir(join(directory, "deleted")), [".all"]);
          assert.equal((await listing(app)).cached_images.length, 0);
        },
      );
    });
  });

  it("answers 400 for any other target and clears nothing", async () => {
    const origin = testOrigin(images(1, 1024));
    await withManaged(new MemoryStore(), origin, { prefetch: false }, async ({ app }) => {
      await cache(app, "img0");
      await admin(app, "PUT", "/v2/cache/q0");
      const res = await admin(app, "DELETE", "/v2/cache", {
        "x-image-cache-clear-target": "everything",
      });
      assert.equal(res.status, 400);
      assert.match(await res.text(), /x-image-cache-clear-target/);
      const body = await listing(app);
      assert.equal(body.cached_images.length, 1);
      assert.deepEqual(body.queued_images, ["q0"]);
    });
  });
});

describe("POST /v2/cache/clean", () => {
  it("removes invalid files and stalled partial files, keeps fresh ones and a live fill's", async () => {
    await withTempDir(async (directory) => {
      const store = new FileSystemStore({ directory, stallTime: 60_000 });
      const origin = testOrigin(images(1, 512 * 1024));
      origin.delay = 5;
      await withManaged(store, origin, {}, async ({ app, asked }) => {
        await admin(app, "GET", "/v2/cache"); // the layout exists
        await writeFile(join(directory, "invalid", "broken"), "x");
        await writeFile(join(directory, "incomplete", "old"), "x");
        const old = new Date(Date.now() - 120_000);
        await utimes(join(directory, "incomplete", "old"), old, old);
        await writeFile(join(directory, "incomplete", "fresh"), "x");
        const client = await app.request("/v2/images/img0/file");
        const reading = readBody(client);
        await waitFor(async () => (await readdir(join(directory, "incomplete"))).includes("img0"));

        const res = await admin(app, "POST", "/v2/cache/clean");
        assert.equal(res.status, 200);
        assert.deepEqual(await res.json(), {
          invalid_files_removed: 1,
          incomplete_files_removed: 1,
        });
        assert.ok(asked.includes("cache_clean"));
        assert.deepEqual(await readdir(join(directory, "invalid")), []);
        const left = await readdir(join(directory, "incomplete"));
        assert.ok(left.includes("fresh"));
        assert.ok(left.includes("img0"), "the live fill's file is kept");
        assert.ok(!left.includes("old"));
        assert.equal((await reading).error, undefined);
        await waitFor(async () => (await cachedIds(app)).includes("img0"));
      });
    });
  });

  it("removes a partial file whose owner record names a dead process", async () => {
    await withTempDir(async (directory) => {
      const store = new FileSystemStore({ directory });
      await withManaged(store, testOrigin(), {}, async ({ app }) => {
        await admin(app, "GET", "/v2/cache");
        await writeFile(join(directory, "incomplete", "orphan"), "x");
        await writeFile(
          join(directory, "incomplete", "orphan.owner"),
          JSON.stringify({ pid: 2 ** 22 + 7, host: "elsewhere", token: "t", started: 0 }),
        );
        const old = new Date(Date.now() - 600_000);
        await utimes(join(directory, "incomplete", "orphan.owner"), old, old);
        const res = await admin(app, "POST", "/v2/cache/clean");
        assert.deepEqual(await res.json(), {
          invalid_files_removed: 0,
          incomplete_files_removed: 1,
        });
        assert.deepEqual(await readdir(join(directory, "incomplete")), []);
      });
    });
  });
});

describe("POST /v2/cache/prune", () => {
  it("answers Glance's counts and prunes down to maxSize", async () => {
    await withTempDir(async (directory) => {
      const origin = testOrigin(images(3, 1024));
      const first = new FileSystemStore({ directory, maxSize: 10 * 1024 });
      await withManaged(first, origin, { prefetch: false }, async ({ app }) => {
        for (const id of ["img0", "img1", "img2"]) await cache(app, id);
      });
      const smaller = new FileSystemStore({ directory, maxSize: 2048 });
      await withManaged(smaller, origin, { prefetch: false }, async ({ app, asked }) => {
        const res = await admin(app, "POST", "/v2/cache/prune");
        assert.equal(res.status, 200);
        assert.deepEqual(await res.json(), { total_files_pruned: 1, total_bytes_pruned: 1024 });
        assert.deepEqual(asked, ["cache_prune"]);
        assert.deepEqual(await cachedIds(app), ["img1", "img2"]);
        const again = await admin(app, "POST", "/v2/cache/prune");
        assert.deepEqual(await again.json(), { total_files_pruned: 0, total_bytes_pruned: 0 });
      });
    });
  });
});

describe("GET /v2/cache/{id}/status", () => {
  it("tells cached, queued (with the last failure) and unknown images apart", async () => {
    const origin = testOrigin(images(1, 1024));
    origin.failures.set("flaky", { status: 503, times: 1000 });
    await withManaged(new MemoryStore(), origin, {}, async ({ app }) => {
      await cache(app, "img0");
      const cached = await (await admin(app, "GET", "/v2/cache/img0/status")).json();
      assert.equal(cached.state, "cached");
      assert.equal(cached.size, 1024);
      await admin(app, "PUT", "/v2/cache/flaky");
      await waitFor(async () =>
        (await (await admin(app, "GET", "/v2/cache/flaky/status")).json()).attempts > 0
      );
      const queued = await (await admin(app, "GET", "/v2/cache/flaky/status")).json();
      assert.equal(queued.state, "queued");
      assert.equal(queued.last_error, "status-503");
      const unknown = await admin(app, "GET", "/v2/cache/nothing/status");
      assert.equal(unknown.status, 404);
      await unknown.body?.cancel();
      await admin(app, "DELETE", "/v2/cache/flaky");
    });
  });
});

describe("methods, authorization and ids", () => {
  const allowed: [string, string][] = [
    ["/v2/cache", "DELETE, GET, HEAD"],
    ["/v2/cache/img0", "DELETE, PUT"],
    ["/v2/cache/clean", "DELETE, POST, PUT"],
    ["/v2/cache/prune", "DELETE, POST, PUT"],
    ["/v2/cache/img0/status", "GET, HEAD"],
    ["/v1/cached_images", "DELETE, GET, HEAD"],
    ["/v2/cached_images/img0", "DELETE"],
    ["/v1/queued_images", "DELETE, GET, HEAD"],
    ["/v2/queued_images/img0", "DELETE, PUT"],
    ["/metrics", "GET, HEAD"],
  ];
  for (const [path, allow] of allowed) {
    it(`answers 405 with Allow: ${allow} for other methods on ${path}`, async () => {
      await withManaged(new MemoryStore(), testOrigin(), { prefetch: false }, async ({ app }) => {
        for (const method of ["POST", "PATCH", "GET", "PUT"]) {
          if (allow.includes(method)) continue;
          const res = await admin(app, method, path);
          assert.equal(res.status, 405, `${method} ${path}`);
          assert.equal(res.headers.get("allow"), allow);
          await res.body?.cancel();
        }
      });
    });
  }

  it("asks authorize with Glance's policy names", async () => {
    await withManaged(new MemoryStore(), testOrigin(), { prefetch: false }, async (managed) => {
      const { app, asked } = managed;
      const requests: [string, string, string][] = [
        ["GET", "/v2/cache", "cache_list"],
        ["PUT", "/v2/cache/a", "cache_image:a"],
        ["DELETE", "/v2/cache/a", "cache_delete:a"],
        ["DELETE", "/v2/cache", "cache_delete"],
        ["POST", "/v2/cache/clean", "cache_clean"],
        ["POST", "/v2/cache/prune", "cache_prune"],
        ["GET", "/v1/cached_images", "manage_image_cache"],
        ["DELETE", "/v2/cached_images/a", "manage_image_cache:a"],
        ["PUT", "/v1/queued_images/a", "manage_image_cache:a"],
        ["GET", "/metrics", "cache_metrics"],
      ];
      for (const [method, path, action] of requests) {
        asked.length = 0;
        const res = await admin(app, method, path);
        await res.body?.cancel();
        assert.deepEqual(asked, [action], `${method} ${path}`);
      }
    });
  });

  it("answers 403 and changes nothing when authorize says no", async () => {
    const origin = testOrigin(images(1, 1024));
    await withManaged(new MemoryStore(), origin, {}, async ({ app }) => {
      await cache(app, "img0");
      await admin(app, "PUT", "/v2/cache/queued");
      await waitFor(async () => (await listing(app)).queued_images.length === 1);
      const before = await listing(app);
      const requests: [string, string][] = [
        ["GET", "/v2/cache"],
        ["PUT", "/v2/cache/img1"],
        ["DELETE", "/v2/cache/img0"],
        ["DELETE", "/v2/cache"],
        ["POST", "/v2/cache/clean"],
        ["POST", "/v2/cache/prune"],
        ["DELETE", "/v1/cached_images"],
        ["DELETE", "/v2/queued_images"],
        ["PUT", "/v1/queued_images/img1"],
        ["DELETE", "/v1/cached_images/img0"],
        ["GET", "/metrics"],
      ];
      for (const [method, path] of requests) {
        const res = await app.request(path, { method, headers: { "x-auth-token": "nope" } });
        assert.equal(res.status, 403, `${method} ${path}`);
        assert.match(await res.text(), /Forbidden/);
      }
      assert.deepEqual(await listing(app), before);
      assert.equal(origin.reads.get("img1"), undefined);
    });
  });

  it("sends a Response from authorize as is", async () => {
    const app = new Hono();
    const controller = new AbortController();
    app.route(
      "/",
      cacheApi({
        store: new MemoryStore(),
        authorize: () => new Response("log in first", { status: 401 }),
        signal: controller.signal,
      }),
    );
    const res = await app.request("/v2/cache");
    assert.equal(res.status, 401);
    assert.equal(await res.text(), "log in first");
    controller.abort();
  });

  it("answers 400 for an id the store cannot hold and touches nothing", async () => {
    await withTempDir(async (directory) => {
      const store: ImageStore = new FileSystemStore({ directory });
      await withManaged(store, testOrigin(), {}, async ({ app, asked }) => {
        // (`%2E%2E` never gets here: the URL parser already resolved it as "..".)
        const ids = ["%ZZ", "a%2Fb", "a%5Cb", "nul%00", "x".repeat(300), "%E2%82"];
        for (const id of ids) {
          for (
            const [method, path] of [
              ["PUT", `/v2/cache/${id}`],
              ["DELETE", `/v2/cache/${id}`],
              ["GET", `/v2/cache/${id}/status`],
              ["PUT", `/v1/queued_images/${id}`],
              ["DELETE", `/v2/cached_images/${id}`],
              ["DELETE", `/v1/queued_images/${id}`],
            ]
          ) {
            const res = await admin(app, method, path);
            assert.equal(res.status, 400, `${method} ${path}`);
            assert.match(await res.text(), /image id/);
          }
        }
        assert.deepEqual(asked, [], "authorize is not even asked");
        assert.deepEqual(await listing(app), { cached_images: [], queued_images: [] });
        assert.deepEqual((await readdir(directory)).sort(), [
          "deleted",
          "incomplete",
          "invalid",
          "queue",
        ]);
      });
    });
  });

  it("leaves other paths to the routes after it", async () => {
    await withManaged(new MemoryStore(), testOrigin(images(1, 10)), {}, async ({ app }) => {
      const res = await app.request("/v2/images/img0/file");
      assert.equal(res.status, 200);
      await res.body?.cancel();
      const none = await app.request("/v2/cache/a/b/c");
      assert.equal(none.status, 404);
      await none.body?.cancel();
    });
  });
});

describe("legacy cached_images and queued_images routes", () => {
  for (const version of ["v1", "v2"]) {
    it(`serves Glance's cache-manage bodies under /${version}`, async () => {
      const origin = testOrigin(images(2, 1024));
      await withManaged(new MemoryStore(), origin, { prefetch: false }, async ({ app, asked }) => {
        await cache(app, "img0");
        await cache(app, "img1");

        const cached = await admin(app, "GET", `/${version}/cached_images`);
        assert.equal(cached.status, 200);
        const cachedBody = await cached.json();
        assert.deepEqual(Object.keys(cachedBody), ["cached_images"]);
        assert.deepEqual(cachedBody.cached_images.map((i: { image_id: string }) => i.image_id), [
          "img0",
          "img1",
        ]);

        const queue = await admin(app, "PUT", `/${version}/queued_images/q0`);
        assert.equal(queue.status, 200);
        assert.equal(await queue.text(), "null");
        await admin(app, "PUT", `/${version}/queued_images/q1`);
        await admin(app, "PUT", `/${version}/queued_images/img0`); // cached: not queued
        const queued = await admin(app, "GET", `/${version}/queued_images`);
        assert.deepEqual(await queued.json(), { queued_images: ["q0", "q1"] });

        const dequeue = await admin(app, "DELETE", `/${version}/queued_images/q0`);
        assert.equal(dequeue.status, 200);
        assert.equal(await dequeue.text(), "null");
        assert.deepEqual((await listing(app)).queued_images, ["q1"]);

        // Deleting a cached image leaves the queue alone, as Glance's delete_cached_image.
        await admin(app, "PUT", `/${version}/queued_images/q2`);
        const uncache = await admin(app, "DELETE", `/${version}/cached_images/img0`);
        assert.equal(uncache.status, 200);
        assert.equal(await uncache.text(), "null");
        assert.deepEqual(await cachedIds(app), ["img1"]);
        assert.deepEqual((await listing(app)).queued_images, ["q1", "q2"]);
        const again = await admin(app, "DELETE", `/${version}/cached_images/img0`);
        assert.equal(again.status, 200, "deleting what is not cached is not an error in Glance");
        await again.body?.cancel();

        const allCached = await admin(app, "DELETE", `/${version}/cached_images`);
        assert.deepEqual(await allCached.json(), { num_deleted: 1 });
        const allQueued = await admin(app, "DELETE", `/${version}/queued_images`);
        assert.deepEqual(await allQueued.json(), { num_deleted: 2 });
        assert.deepEqual(await listing(app), { cached_images: [], queued_images: [] });
        const legacy = asked.filter((action) => action !== "cache_list"); // listing() above
        assert.ok(legacy.length >= 10);
        assert.ok(legacy.every((action) => action.startsWith("manage_image_cache")));
      });
    });
  }
});
