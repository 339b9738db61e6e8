import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { Hono } from "hono";
import { glanceRoutes, imageCache, matchRoute, MemoryStore } from "hono-image-cache";
import type { ImageRoute } from "hono-image-cache";

describe("matchRoute() with glanceRoutes", () => {
  const cases: [string, string, string | undefined, string | undefined][] = [
    ["GET", "/v1/images/abc", "serve", "abc"],
    ["HEAD", "/v1/images/abc", "serve", "abc"],
    ["DELETE", "/v1/images/abc", "evict", "abc"],
    ["GET", "/v2/images/abc/file", "serve", "abc"],
    ["HEAD", "/v2/images/abc/file", "serve", "abc"],
    ["DELETE", "/v2/images/abc", "evict", "abc"],
    ["GET", "/v1/images/detail", undefined, undefined],
    ["DELETE", "/v1/images/detail", undefined, undefined],
    ["GET", "/v1/images/detailed", "serve", "detailed"],
    ["GET", "/v2/images/abc", undefined, undefined],
    ["DELETE", "/v2/images/abc/file", undefined, undefined],
    ["GET", "/v2/images/abc/file/extra", undefined, undefined],
    ["GET", "/v2/images/abc/members", undefined, undefined],
    ["GET", "/v1/images/abc/members", undefined, undefined],
    ["GET", "/v3/images/abc/file", undefined, undefined],
    ["PUT", "/v2/images/abc/file", undefined, undefined],
    ["POST", "/v1/images/abc", undefined, undefined],
    ["PATCH", "/v2/images/abc", undefined, undefined],
    ["GET", "/v1/images/", undefined, undefined],
    ["GET", "/v2/images//file", undefined, undefined],
    ["GET", "/v2/images/a%20b/file", "serve", "a b"],
    ["GET", "/v2/images/%2e%2e/file", "serve", ".."],
    ["GET", "/v2/images/%E0%A4%A/file", undefined, undefined],
  ];
  for (const [method, path, action, id] of cases) {
    it(`${method} ${path} → ${action ?? "no match"}`, () => {
      const match = matchRoute(glanceRoutes, method, path);
      assert.equal(match?.route.action, action);
      assert.equal(match?.id, id);
    });
  }
});

describe("imageCache() routes", () => {
  it("matches the path without its query string", async () => {
    const store = new MemoryStore();
    const app = new Hono();
    app.use(imageCache({ store }));
    app.get("/v2/images/:id/file", (c) => c.body("data"));
    const miss = await app.request("/v2/images/q/file?foo=bar");
    assert.equal(miss.headers.get("cache-status"), "hono-image-cache; fwd=miss; stored");
    await miss.text();
    const hit = await app.request("/v2/images/q/file?other=1");
    assert.equal(hit.headers.get("cache-status"), "hono-image-cache; hit");
    assert.equal(await hit.text(), "data");
  });

  it("passes other methods and paths through untouched", async () => {
    const store = new MemoryStore();
    const app = new Hono();
    app.use(imageCache({ store }));
    app.all("*", (c) => c.text(`origin ${c.req.method}`));
    for (const [method, path] of [["PUT", "/v2/images/x/file"], ["GET", "/v2/images/x"]]) {
      const res = await app.request(path, { method });
      assert.equal(res.headers.get("cache-status"), null);
      assert.equal(await res.text(), `origin ${method}`);
    }
    assert.deepEqual(await store.list(), []);
  });

  it("serves custom routes with a named group", async () => {
    const routes: ImageRoute[] = [
      { method: "get", path: /^\/models\/(?<id>[\w-]+)\/weights$/, action: "serve" },
      { method: "DELETE", path: /^\/models\/(?<id>[\w-]+)$/, action: "evict" },
    ];
    const store = new MemoryStore();
    let reads = 0;
    const app = new Hono();
    app.use(imageCache({ store, routes }));
    app.get("/models/:id/weights", (c) => {
      reads++;
      return c.body("weights");
    });
    app.delete("/models/:id", (c) => c.body(null, 204));
    await (await app.request("/models/llama/weights")).text();
    const hit = await app.request("/models/llama/weights");
    assert.equal(await hit.text(), "weights");
    assert.equal(reads, 1);
    // Glance's routes are not in force any more.
    const v2 = await app.request("/v2/images/llama/file");
    assert.equal(v2.headers.get("cache-status"), null);
    await v2.body?.cancel();
    await app.request("/models/llama", { method: "DELETE" });
    assert.equal(await store.get("llama"), undefined);
  });

  it("rejects routes without a named group id", () => {
    assert.throws(
      () =>
        imageCache({
          store: new MemoryStore(),
          routes: [{ method: "GET", path: /^\/x\/([^/]+)$/, action: "serve" }],
        }),
      { name: "TypeError", message: /named group "id"/ },
    );
    assert.throws(
      () =>
        imageCache({
          store: new MemoryStore(),
          routes: [{ method: "GET", path: "/x" as unknown as RegExp, action: "serve" }],
        }),
      TypeError,
    );
  });

  it("rejects a missing store and bad options", () => {
    assert.throws(() => imageCache({} as never), { name: "TypeError", message: /"store"/ });
    assert.throws(
      () => imageCache({ store: new MemoryStore(), cacheStatus: "bad name" }),
      { name: "TypeError", message: /cacheStatus/ },
    );
    assert.throws(
      () => imageCache({ store: new MemoryStore(), authorize: "yes" as never }),
      { name: "TypeError", message: /"authorize" must be a function/ },
    );
  });
});
