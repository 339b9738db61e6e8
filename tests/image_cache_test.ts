import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { Hono } from "hono";
import { FileSystemStore, imageCache, MemoryStore } from "hono-image-cache";
import type { ImageCacheOptions, ImageStore } from "hono-image-cache";
import { FaultyStore } from "hono-image-cache/testing";
import {
  assertBytes,
  hexDigest,
  pattern,
  readBody,
  slowStream,
  STORES,
  waitFor,
  withStore,
  withTempDir,
} from "./_helpers.ts";

interface Origin {
  app: Hono;
  reads: () => number;
  errors: unknown[];
}

/** An app with the cache in front of one image route serving `body` with `headers`. */
function cachedApp(
  store: ImageStore,
  respond: (id: string) => Response,
  options: Partial<ImageCacheOptions> = {},
): Origin {
  let reads = 0;
  const errors: unknown[] = [];
  const app = new Hono();
  app.use(imageCache({ store, onError: (e) => errors.push(e), ...options }));
  const handler = (c: { req: { param(name: string): string | undefined } }) => {
    reads++;
    return respond(c.req.param("id") ?? "");
  };
  app.get("/v2/images/:id/file", handler);
  app.get("/v1/images/:id", handler);
  return { app, reads: () => reads, errors };
}

const IMAGE = pattern(300_000, 7);
const MD5 = hexDigest(IMAGE);

function imageResponse(body: Uint8Array = IMAGE, headers: Record<string, string> = {}) {
  return new Response(slowStream(body, 16_384), {
    headers: { "content-length": String(body.byteLength), "content-md5": MD5, ...headers },
  });
}

for (const [kind, make] of STORES) {
  describe(`imageCache() with ${kind}`, () => {
    it(
      "serves a hit without calling the origin",
      withStore(make, async (store) => {
        const { app, reads } = cachedApp(store, () => imageResponse());
        const miss = await app.request("/v2/images/img/file");
        assert.equal(miss.status, 200);
        assert.equal(miss.headers.get("cache-status"), "hono-image-cache; fwd=miss; stored");
        assertBytes((await readBody(miss)).bytes, IMAGE);
        await waitFor(async () => (await store.get("img")) !== undefined);
        const hit = await app.request("/v2/images/img/file");
        assert.equal(hit.status, 200);
        assert.equal(hit.headers.get("cache-status"), "hono-image-cache; hit");
        assertBytes((await readBody(hit)).bytes, IMAGE);
        assert.equal(reads(), 1);
      }),
    );

    it(
      "answers a hit with length, type, Content-MD5, strong ETag, Last-Modified and Accept-Ranges",
      withStore(make, async (store) => {
        const { app } = cachedApp(
          store,
          () => imageResponse(IMAGE, { "content-type": "application/x-qcow2" }),
        );
        await readBody(await app.request("/v2/images/img/file"));
        const hit = await app.request("/v2/images/img/file");
        assert.equal(hit.headers.get("content-length"), String(IMAGE.byteLength));
        assert.equal(hit.headers.get("content-type"), "application/x-qcow2");
        assert.equal(hit.headers.get("content-md5"), MD5);
        assert.equal(hit.headers.get("etag"), `"md5-${MD5}"`);
        assert.equal(hit.headers.get("accept-ranges"), "bytes");
        assert.ok(Date.parse(hit.headers.get("last-modified") ?? "") > 0);
        await hit.body?.cancel();
      }),
    );

    it(
      "records hits and last access, not for the fill",
      withStore(make, async (store) => {
        const { app } = cachedApp(store, () => imageResponse());
        await readBody(await app.request("/v2/images/img/file"));
        const committed = await store.get("img");
        assert.equal(committed?.hits, 0);
        await new Promise((r) => setTimeout(r, 5));
        await readBody(await app.request("/v2/images/img/file"));
        await readBody(await app.request("/v2/images/img/file", { method: "HEAD" }));
        const entry = await store.get("img");
        assert.equal(entry?.hits, 2);
        assert.ok(entry!.lastAccessed > committed!.lastAccessed);
      }),
    );

    it(
      "replays v1 x-image-meta-* headers on a hit, never x-image-meta-location",
      withStore(make, async (store) => {
        const { app } = cachedApp(store, () =>
          imageResponse(IMAGE, {
            "content-md5": "",
            "x-image-meta-checksum": MD5,
            "x-image-meta-name": "cirros",
            "x-image-meta-location": "swift://secret@host/container/obj",
          }));
        const miss = await app.request("/v1/images/img");
        assert.equal(miss.headers.get("cache-status"), "hono-image-cache; fwd=miss; stored");
        assertBytes((await readBody(miss)).bytes, IMAGE);
        const hit = await app.request("/v1/images/img");
        assert.equal(hit.headers.get("cache-status"), "hono-image-cache; hit");
        assert.equal(hit.headers.get("x-image-meta-name"), "cirros");
        assert.equal(hit.headers.get("x-image-meta-checksum"), MD5);
        assert.equal(hit.headers.get("x-image-meta-location"), null);
        await hit.body?.cancel();
      }),
    );

    it(
      "accepts Content-MD5 in base64 (RFC 1864)",
      withStore(make, async (store) => {
        const base64 = Buffer.from(MD5, "hex").toString("base64");
        const { app } = cachedApp(store, () => imageResponse(IMAGE, { "content-md5": base64 }));
        assertBytes((await readBody(await app.request("/v2/images/img/file"))).bytes, IMAGE);
        assert.equal((await store.get("img"))?.digest.value, MD5);
      }),
    );

    it(
      "accepts x-image-meta-checksum when there is no Content-MD5",
      withStore(make, async (store) => {
        const response = () => {
          const res = imageResponse(IMAGE, { "x-image-meta-checksum": MD5.toUpperCase() });
          res.headers.delete("content-md5");
          return res;
        };
        const { app } = cachedApp(store, response);
        assertBytes((await readBody(await app.request("/v1/images/img"))).bytes, IMAGE);
        assert.equal((await store.get("img"))?.digest.value, MD5);
      }),
    );

    it(
      "caches an image without checksum after checking its length, unless requireDigest",
      withStore(make, async (store) => {
        const bare = () => {
          const res = imageResponse();
          res.headers.delete("content-md5");
          return res;
        };
        const strict = cachedApp(store, bare, { requireDigest: true });
        const res = await strict.app.request("/v2/images/strict/file");
        assert.equal(
          res.headers.get("cache-status"),
          "hono-image-cache; fwd=miss; detail=no-digest",
        );
        assertBytes((await readBody(res)).bytes, IMAGE);
        assert.equal(await store.get("strict"), undefined);

        const lax = cachedApp(store, bare);
        assertBytes((await readBody(await lax.app.request("/v2/images/lax/file"))).bytes, IMAGE);
        const entry = await store.get("lax");
        assert.equal(entry?.size, IMAGE.byteLength);
        assert.equal(entry?.digest.value, MD5, "the cache computes the digest itself");
      }),
    );

    it(
      "uses expectedDigest for SHA-256 and SHA-512",
      withStore(make, async (store) => {
        for (const algorithm of ["sha256", "sha512"] as const) {
          const { app } = cachedApp(
            store,
            () => imageResponse(IMAGE, { "content-md5": "garbage" }),
            {
              expectedDigest: () => ({ algorithm, value: hexDigest(IMAGE, algorithm) }),
            },
          );
          const res = await app.request(`/v2/images/${algorithm}/file`);
          assertBytes((await readBody(res)).bytes, IMAGE);
          const entry = await store.get(algorithm);
          assert.deepEqual(entry?.digest, { algorithm, value: hexDigest(IMAGE, algorithm) });
          const hit = await app.request(`/v2/images/${algorithm}/file`);
          assert.equal(hit.headers.get("content-md5"), null, "only ever the verified digest");
          assert.equal(hit.headers.get("etag"), `"${algorithm}-${entry?.digest.value}"`);
          await hit.body?.cancel();
        }
      }),
    );

    for (
      const [name, respond] of [
        ["a bad checksum", () => imageResponse(IMAGE, { "content-md5": "foobar" })],
        [
          "a wrong but well-formed checksum",
          () => imageResponse(IMAGE, { "content-md5": "0".repeat(32) }),
        ],
        [
          "a body shorter than Content-Length",
          () => imageResponse(IMAGE, { "content-length": String(IMAGE.byteLength + 10) }),
        ],
        [
          "an origin failing mid-stream",
          () => {
            let sent = 0;
            const body = new ReadableStream<Uint8Array>({
              pull(controller) {
                if (sent >= 100_000) return controller.error(new Error("origin died"));
                controller.enqueue(IMAGE.slice(sent, sent + 20_000));
                sent += 20_000;
              },
            });
            return new Response(body, { headers: { "content-md5": MD5 } });
          },
        ],
      ] as [string, () => Response][]
    ) {
      it(
        `errors the client's body on ${name} and commits nothing`,
        withStore(make, async (store) => {
          const { app, reads } = cachedApp(store, respond);
          const res = await app.request("/v2/images/img/file");
          const { bytes, error } = await readBody(res);
          assert.ok(error, "the body must not end cleanly");
          const announced = Number(res.headers.get("content-length") ?? IMAGE.byteLength);
          assert.ok(bytes.byteLength < announced, "never a complete body");
          assertBytes(bytes, IMAGE.subarray(0, bytes.byteLength));
          assert.equal(await store.get("img"), undefined);
          const again = await app.request("/v2/images/img/file");
          assert.equal(again.headers.get("cache-status"), "hono-image-cache; fwd=miss; stored");
          await again.body?.cancel();
          assert.equal(reads(), 2);
        }),
      );
    }

    it(
      "never commits a body cancelled by its only client when completeOnAbort is false",
      withStore(make, async (store) => {
        const { app } = cachedApp(store, () => imageResponse(), { completeOnAbort: false });
        const res = await app.request("/v2/images/img/file");
        const reader = res.body!.getReader();
        await reader.read();
        await reader.cancel();
        await new Promise((r) => setTimeout(r, 100));
        assert.equal(await store.get("img"), undefined);
        assert.equal(await store.isFilling("img"), false);
      }),
    );

    it(
      "completes the fill when its only client cancels (completeOnAbort default)",
      withStore(make, async (store) => {
        const { app } = cachedApp(store, () => imageResponse());
        const res = await app.request("/v2/images/img/file");
        const reader = res.body!.getReader();
        await reader.read();
        await reader.cancel();
        await waitFor(async () => (await store.get("img")) !== undefined);
        const hit = await app.request("/v2/images/img/file");
        assertBytes((await readBody(hit)).bytes, IMAGE);
      }),
    );

    it(
      "passes 204, 206, 403, 404 and 500 through untouched and uncached",
      withStore(make, async (store) => {
        for (const status of [204, 206, 403, 404, 500]) {
          const { app } = cachedApp(
            store,
            () =>
              new Response(status === 204 ? null : `status ${status}`, {
                status,
                headers: status === 206 ? { "content-range": "bytes 0-9/100" } : {},
              }),
          );
          const res = await app.request(`/v2/images/s${status}/file`);
          assert.equal(res.status, status);
          assert.equal(
            res.headers.get("cache-status"),
            `hono-image-cache; fwd=miss; detail=status-${status}`,
          );
          assert.equal(await res.text(), status === 204 ? "" : `status ${status}`);
          assert.equal(await store.get(`s${status}`), undefined);
        }
      }),
    );

    it(
      "verifies a large fill (hashed in a worker thread on Deno) and commits it; a wrong digest commits nothing",
      withStore(make, async (store) => {
        const big = pattern(66 * 2 ** 20, 31);
        const digest = hexDigest(big);
        const { app } = cachedApp(
          store,
          (id) =>
            new Response(slowStream(big, 256 * 1024), {
              headers: {
                "content-length": String(big.byteLength),
                "content-md5": id === "good" ? digest : hexDigest(IMAGE),
              },
            }),
        );
        const good = await readBody(await app.request("/v2/images/good/file"));
        assert.equal(good.error, undefined);
        assert.equal(good.bytes.byteLength, big.byteLength);
        assert.equal((await store.get("good"))?.digest.value, digest);
        const bad = await readBody(await app.request("/v2/images/bad/file"));
        assert.ok(bad.error, "a wrong digest never ends cleanly");
        assert.ok(bad.bytes.byteLength < big.byteLength);
        assert.equal(await store.get("bad"), undefined);
      }),
    );

    it(
      "answers a hit with the headers of the entry cached now, after the image was replaced",
      withStore(make, async (store) => {
        const other = pattern(200_000, 99);
        let body = IMAGE;
        const { app } = cachedApp(
          store,
          () =>
            imageResponse(body, {
              "content-md5": hexDigest(body),
              "x-image-meta-name": `n${body.byteLength}`,
            }),
        );
        app.delete("/v2/images/:id", () => new Response(null, { status: 204 }));
        await readBody(await app.request("/v2/images/img/file"));
        const first = await app.request("/v2/images/img/file");
        assert.equal(first.headers.get("etag"), `"md5-${MD5}"`);
        assert.equal(first.headers.get("x-image-meta-name"), "n300000");
        await first.body?.cancel();

        await app.request("/v2/images/img", { method: "DELETE" });
        body = other;
        await readBody(await app.request("/v2/images/img/file"));
        const second = await app.request("/v2/images/img/file");
        assert.equal(second.headers.get("cache-status"), "hono-image-cache; hit");
        assert.equal(second.headers.get("etag"), `"md5-${hexDigest(other)}"`);
        assert.equal(second.headers.get("content-length"), String(other.byteLength));
        assert.equal(second.headers.get("x-image-meta-name"), "n200000");
        assertBytes((await readBody(second)).bytes, other);
      }),
    );

    it(
      "evicts on a 2xx DELETE only",
      withStore(make, async (store) => {
        let deleteStatus = 500;
        const { app } = cachedApp(store, () => imageResponse());
        app.delete("/v2/images/:id", () => new Response(null, { status: deleteStatus }));
        app.delete("/v1/images/:id", () => new Response("{}", { status: deleteStatus }));
        await readBody(await app.request("/v2/images/img/file"));
        for (const status of [500, 403, 404]) {
          deleteStatus = status;
          const res = await app.request("/v2/images/img", { method: "DELETE" });
          assert.equal(res.status, status);
          assert.ok(await store.get("img"), `still cached after ${status}`);
        }
        deleteStatus = 204;
        await app.request("/v2/images/img", { method: "DELETE" });
        assert.equal(await store.get("img"), undefined);

        await readBody(await app.request("/v1/images/img"));
        assert.ok(await store.get("img"));
        deleteStatus = 200;
        await app.request("/v1/images/img", { method: "DELETE" });
        assert.equal(await store.get("img"), undefined);
      }),
    );

    it(
      "asks authorize before a hit: false is 403, a Response is sent as is",
      withStore(make, async (store) => {
        let verdict: boolean | Response = true;
        const asked: string[] = [];
        const { app, reads } = cachedApp(store, () => imageResponse(), {
          authorize: (_c, id) => {
            asked.push(id);
            return verdict;
          },
        });
        await readBody(await app.request("/v2/images/img/file"));
        assert.deepEqual(asked, [], "a miss is authorized by the origin");
        verdict = false;
        const forbidden = await app.request("/v2/images/img/file");
        assert.equal(forbidden.status, 403);
        assert.match(await forbidden.text(), /Forbidden/);
        verdict = new Response("go away", { status: 401 });
        const custom = await app.request("/v2/images/img/file");
        assert.equal(custom.status, 401);
        assert.equal(await custom.text(), "go away");
        assert.equal((await store.get("img"))?.hits, 0, "refused requests count no hit");
        assert.equal(reads(), 1);
        assert.deepEqual(asked, ["img", "img"]);
      }),
    );

    it(
      "keeps headers set by outer middleware on a hit",
      withStore(make, async (store) => {
        const app = new Hono();
        app.use(async (c, next) => {
          c.header("x-outer", "yes");
          await next();
        });
        app.use(imageCache({ store }));
        app.get("/v2/images/:id/file", () => imageResponse());
        await readBody(await app.request("/v2/images/img/file"));
        const hit = await app.request("/v2/images/img/file");
        assert.equal(hit.headers.get("cache-status"), "hono-image-cache; hit");
        assert.equal(hit.headers.get("x-outer"), "yes");
        await hit.body?.cancel();
      }),
    );

    it(
      "omits Cache-Status when cacheStatus is false and uses a custom name otherwise",
      withStore(make, async (store) => {
        const quiet = cachedApp(store, () => imageResponse(), { cacheStatus: false });
        const res = await quiet.app.request("/v2/images/a/file");
        assert.equal(res.headers.get("cache-status"), null);
        await readBody(res);
        const named = cachedApp(store, () => imageResponse(), { cacheStatus: "edge-7" });
        const hit = await named.app.request("/v2/images/a/file");
        assert.equal(hit.headers.get("cache-status"), "edge-7; hit");
        await hit.body?.cancel();
      }),
    );

    it(
      "sends a HEAD miss to the origin as a HEAD and caches nothing",
      withStore(make, async (store) => {
        const methods: string[] = [];
        const app = new Hono();
        app.use(imageCache({ store }));
        app.get("/v2/images/:id/file", (c) => {
          methods.push(c.req.method);
          return imageResponse();
        });
        const res = await app.request("/v2/images/img/file", { method: "HEAD" });
        assert.equal(res.status, 200);
        assert.equal(res.headers.get("cache-status"), "hono-image-cache; fwd=miss; detail=method");
        await res.body?.cancel();
        assert.deepEqual(methods, ["HEAD"]);
        assert.equal(await store.get("img"), undefined);
      }),
    );
  });
}

describe("imageCache() with store faults", () => {
  for (
    const [name, faults] of [
      ["writes failing after 50 000 bytes", { failWriteAfter: 50_000 }],
      ["writes failing with EIO at once", { failWriteAfter: 0, writeErrorCode: "EIO" }],
      ["createWriter failing", { failCreateWriter: true }],
      ["commit failing", { failCommit: true }],
    ] as const
  ) {
    it(`delivers a full, correct body with ${name}`, async () => {
      const store = new FaultyStore(new MemoryStore(), { faults: { ...faults } });
      const { app, errors } = cachedApp(store, () => imageResponse());
      const res = await app.request("/v2/images/img/file");
      const { bytes, error } = await readBody(res);
      assert.equal(error, undefined);
      assertBytes(bytes, IMAGE);
      assert.ok(errors.length > 0, "the fault is reported to onError");
      store.faults = {};
      assert.equal(await store.get("img"), undefined);
    });
  }

  it("goes to the origin when looking up the entry fails", async () => {
    const store = new FaultyStore(new MemoryStore(), { faults: { failGet: true } });
    const { app, errors, reads } = cachedApp(store, () => imageResponse());
    for (let i = 0; i < 2; i++) {
      assertBytes((await readBody(await app.request("/v2/images/img/file"))).bytes, IMAGE);
    }
    assert.equal(reads(), 2);
    assert.ok(errors.length >= 2);
  });

  it("serves the origin when the hit's data cannot be opened, and reports why", async () => {
    const store = new FaultyStore(new MemoryStore());
    const { app, reads, errors } = cachedApp(store, () => imageResponse());
    await readBody(await app.request("/v2/images/img/file"));
    store.faults.failBody = true;
    const res = await app.request("/v2/images/img/file");
    assertBytes((await readBody(res)).bytes, IMAGE);
    assert.equal(reads(), 2);
    assert.match(errors.map(String).join("\n"), /injected fault in body/);
  });

  it("serves the origin, reporting nothing, when the hit's file was deleted since the lookup", async () => {
    const store = new FaultyStore(new MemoryStore());
    const { app, reads, errors } = cachedApp(store, () => imageResponse());
    await readBody(await app.request("/v2/images/img/file"));
    // Another process deleted the file between the lookup and the open.
    store.body = () => Promise.reject(Object.assign(new Error("No such file"), { code: "ENOENT" }));
    const res = await app.request("/v2/images/img/file");
    assertBytes((await readBody(res)).bytes, IMAGE);
    assert.equal(reads(), 2);
    assert.deepEqual(errors, []);
  });

  it("delivers full bodies to the origin client when the cache directory is unwritable", async () => {
    await withTempDir(async (dir) => {
      const { writeFile } = await import("node:fs/promises");
      const blocker = `${dir}/not-a-directory`;
      await writeFile(blocker, "a file where the cache directory should be");
      const store = new FileSystemStore({ directory: `${blocker}/cache` });
      try {
        const { app, errors } = cachedApp(store, () => imageResponse());
        const res = await app.request("/v2/images/img/file");
        assertBytes((await readBody(res)).bytes, IMAGE);
        assert.ok(errors.length > 0);
        const again = await app.request("/v2/images/img/file");
        assertBytes((await readBody(again)).bytes, IMAGE);
      } finally {
        await store.close();
      }
    });
  });

  it("survives an onError that throws", async () => {
    const store = new FaultyStore(new MemoryStore(), { faults: { failWriteAfter: 0 } });
    const app = new Hono();
    app.use(imageCache({
      store,
      onError: () => {
        throw new Error("bad handler");
      },
    }));
    app.get("/v2/images/:id/file", () => imageResponse());
    const res = await app.request("/v2/images/img/file");
    assertBytes((await readBody(res)).bytes, IMAGE);
  });
});
