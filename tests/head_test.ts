import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { Hono } from "hono";
import { imageCache, MemoryStore } from "hono-image-cache";
import type { ImageStore } from "hono-image-cache";
import { demoOrigin, FaultyStore } from "hono-image-cache/testing";
import { readBody, STORES, withStore } from "./_helpers.ts";

const SIZE = 200_000;

/** The cache in front of a demo Glance, recording the methods the origin sees. */
function cachedDemo(store: ImageStore) {
  const { app: origin, stats } = demoOrigin({ images: { img: { size: SIZE } } });
  const methods: string[] = [];
  const app = new Hono();
  app.use(imageCache({ store, onError: (e) => assert.fail(String(e)) }));
  app.use(async (c, next) => {
    methods.push(c.req.method);
    await next();
  });
  app.route("/", origin);
  return { app, stats, methods };
}

for (const [storeName, make] of STORES) {
  describe(`HEAD on a serve route (${storeName})`, () => {
    it(
      "answers HEAD on a hit with the GET's headers and no body, without opening the data",
      withStore((dir) => new FaultyStore(make(dir)), async (store) => {
        const faulty = store as FaultyStore;
        const { app, stats, methods } = cachedDemo(store);
        for (const path of ["/v2/images/img/file", "/v1/images/img"]) {
          await readBody(await app.request(path)); // v2 fills, v1 hits
          const get = await app.request(path);
          await get.body?.cancel();
          const opens = faulty.opens;
          faulty.faults.failBody = true; // an open would now send the request to the origin
          const head = await app.request(path, { method: "HEAD" });
          faulty.faults.failBody = false;
          assert.equal(head.status, 200);
          assert.equal(head.headers.get("cache-status"), "hono-image-cache; hit");
          assert.equal((await readBody(head)).bytes.byteLength, 0);
          assert.equal(faulty.opens, opens, "HEAD opened no data");
          const expected = Object.fromEntries(get.headers);
          assert.deepEqual(Object.fromEntries(head.headers), expected);
          assert.equal(head.headers.get("content-length"), String(SIZE));
        }
        assert.equal(stats.reads.img, 1, "one origin read in all");
        assert.deepEqual(methods, ["GET"]);
        // Each request answered from the entry counts one hit, HEAD included: v2 GET and
        // HEAD, then v1 (same id) GET, GET and HEAD.
        assert.equal((await store.get("img"))?.hits, 5);
      }),
    );

    it(
      "passes a HEAD miss to the origin as a HEAD and caches nothing",
      withStore(make, async (store) => {
        const { app, stats, methods } = cachedDemo(store);
        const head = await app.request("/v2/images/img/file", { method: "HEAD" });
        assert.equal(head.status, 200);
        assert.equal(head.headers.get("content-length"), String(SIZE));
        assert.equal(head.headers.get("cache-status"), "hono-image-cache; fwd=miss; detail=method");
        assert.equal((await readBody(head)).bytes.byteLength, 0);
        assert.deepEqual(methods, ["HEAD"]);
        assert.equal(stats.reads.img, undefined, "the origin sent no image data");
        assert.equal(stats.bytesSent, 0);
        assert.equal(await store.get("img"), undefined);
        assert.deepEqual(await store.list(), []);
      }),
    );

    it(
      "ignores Range on HEAD: the headers of the full GET",
      withStore(make, async (store) => {
        const { app } = cachedDemo(store);
        await readBody(await app.request("/v2/images/img/file"));
        const head = await app.request("/v2/images/img/file", {
          method: "HEAD",
          headers: { range: "bytes=0-9" },
        });
        assert.equal(head.status, 200);
        assert.equal(head.headers.get("content-range"), null);
        assert.equal(head.headers.get("content-length"), String(SIZE));
        assert.equal(head.headers.get("accept-ranges"), "bytes");
        await head.body?.cancel();
      }),
    );
  });
}

describe("HEAD during a fill", () => {
  it(
    "goes to the origin as a HEAD and does not disturb the fill",
    withStore(() => new MemoryStore(), async (store) => {
      const { app: origin, stats } = demoOrigin({
        images: { img: { size: SIZE } },
        chunkDelay: 5,
        chunkSize: 16_384,
      });
      const methods: string[] = [];
      const app = new Hono();
      app.use(imageCache({ store }));
      app.use(async (c, next) => {
        methods.push(c.req.method);
        await next();
      });
      app.route("/", origin);
      const get = await app.request("/v2/images/img/file");
      const body = readBody(get);
      const head = await app.request("/v2/images/img/file", { method: "HEAD" });
      assert.equal(head.headers.get("cache-status"), "hono-image-cache; fwd=miss; detail=method");
      await head.body?.cancel();
      const { bytes, error } = await body;
      assert.equal(error, undefined);
      assert.equal(bytes.byteLength, SIZE);
      assert.deepEqual(methods, ["GET", "HEAD"]);
      assert.equal(stats.reads.img, 1);
      assert.ok(await store.get("img"));
    }),
  );
});
