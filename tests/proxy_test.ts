import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { connect } from "node:net";
import { gunzipSync, gzipSync } from "node:zlib";
import { Hono } from "hono";
import { MemoryStore } from "hono-image-cache";
import { generatedDigests } from "hono-image-cache/testing";
import { glanceAccessCheck, proxyApp, upstreamProxy } from "hono-image-cache/proxy";
import { assertBytes, sleep, startServer, waitFor } from "./_helpers.ts";
import { get, imageBytes, startGlance, withProxy } from "./_glance.ts";

const MiB = 2 ** 20;

const reader = { "x-auth-token": "reader" };

describe("proxyApp in front of a real upstream", () => {
  it("serves a miss then a hit with byte-exact bodies, reading the upstream once", async () => {
    const upstream = await startGlance({ images: { cirros: { size: 3 * MiB + 17 } } });
    try {
      await withProxy(upstream.url, {}, async ({ url, proxy, logs }) => {
        const expected = await imageBytes("cirros", 3 * MiB + 17);
        const miss = await get(`${url}/v2/images/cirros/file`);
        assert.equal(miss.res.status, 200);
        assert.equal(miss.res.headers.get("cache-status"), "hono-image-cache; fwd=miss; stored");
        assert.equal(miss.error, undefined);
        assertBytes(miss.bytes, expected, "miss body");
        await proxy.settle(5000);

        const hit = await get(`${url}/v2/images/cirros/file`);
        assert.equal(hit.res.headers.get("cache-status"), "hono-image-cache; hit");
        assert.equal(hit.res.headers.get("content-length"), String(expected.byteLength));
        assertBytes(hit.bytes, expected, "hit body");
        assert.equal(upstream.downloads.cirros, 1);

        await waitFor(() => logs.length === 2);
        // Bun's server does not report delivery: its hits are logged when handed over.
        const hitOutcome = "Bun" in globalThis ? "sent" : "complete";
        assert.deepEqual(logs.map((l) => [l.cache, l.status, l.bytes, l.outcome]), [
          ["miss", 200, expected.byteLength, "complete"],
          ["hit", 200, expected.byteLength, hitOutcome],
        ]);
        assert.equal(logs[0].path, "/v2/images/cirros/file");
        assert.equal(logs[0].client, "127.0.0.1");
      });
    } finally {
      await upstream.close();
    }
  });

  it("verifies fills with the SHA-512 the metadata announces", async () => {
    const upstream = await startGlance({ images: { img: { size: MiB } } });
    try {
      await withProxy(upstream.url, {}, async ({ url, proxy, store }) => {
        await get(`${url}/v2/images/img/file`);
        await proxy.settle(5000);
        const { sha512 } = await generatedDigests("img", MiB);
        assert.deepEqual((await store.get("img"))?.digest, { algorithm: "sha512", value: sha512 });
        const hit = await get(`${url}/v2/images/img/file`);
        assert.equal(hit.res.headers.get("etag"), `"sha512-${sha512}"`);
      });
    } finally {
      await upstream.close();
    }
  });

  it("does not commit a fill whose SHA-512 does not match the metadata", async () => {
    const upstream = await startGlance({
      images: { bad: { size: MiB } },
      metadata: (_id, fields) => ({ ...fields, os_hash_value: "0".repeat(128) }),
    });
    try {
      await withProxy(upstream.url, {}, async ({ url, proxy, store }) => {
        const first = await get(`${url}/v2/images/bad/file`);
        assert.equal(first.res.status, 200);
        assert.notEqual(first.error, undefined, "a mismatch must cut the connection");
        assert.ok(first.bytes.byteLength < MiB, "never a clean end of an unverified body");
        await proxy.settle(5000);
        assert.equal(await store.get("bad"), undefined);

        const second = await get(`${url}/v2/images/bad/file`);
        assert.match(second.res.headers.get("cache-status") ?? "", /fwd=miss/);
        assert.equal(upstream.downloads.bad, 2);
      });
    } finally {
      await upstream.close();
    }
  });

  it("falls back to MD5 when the metadata announces no hash", async () => {
    const upstream = await startGlance({
      images: { old: { size: 1000 } },
      metadata: (_id, { os_hash_algo: _a, os_hash_value: _v, ...rest }) => rest,
    });
    try {
      await withProxy(upstream.url, {}, async ({ url, proxy, store }) => {
        await get(`${url}/v2/images/old/file`);
        await proxy.settle(5000);
        const { md5 } = await generatedDigests("old", 1000);
        assert.deepEqual((await store.get("old"))?.digest, { algorithm: "md5", value: md5 });
      });
    } finally {
      await upstream.close();
    }
  });

  it("answers with the upstream's 401 or 404 and serves no cached bytes", async () => {
    const upstream = await startGlance({
      images: { private: { size: 64 * 1024 } },
      tokens: { reader: "all", stranger: [] },
    });
    try {
      await withProxy(upstream.url, {}, async ({ url, proxy, logs }) => {
        const expected = await imageBytes("private", 64 * 1024);
        assertBytes((await get(`${url}/v2/images/private/file`, reader)).bytes, expected);
        await proxy.settle(5000);

        const stranger = await get(`${url}/v2/images/private/file`, { "x-auth-token": "stranger" });
        assert.equal(stranger.res.status, 404, "Glance's answer for an image a project cannot see");
        assert.match(new TextDecoder().decode(stranger.bytes), /^Not found/);

        const anonymous = await get(`${url}/v2/images/private/file`);
        assert.equal(anonymous.res.status, 401);
        assert.match(anonymous.res.headers.get("www-authenticate") ?? "", /Keystone/);
        assert.ok(anonymous.bytes.byteLength < 1000);

        const again = await get(`${url}/v2/images/private/file`, reader);
        assert.equal(again.res.headers.get("cache-status"), "hono-image-cache; hit");
        assertBytes(again.bytes, expected);
        assert.equal(upstream.downloads.private, 1);
        await waitFor(() => logs.length === 4);
        assert.deepEqual(logs.map((l) => l.cache), ["miss", "denied", "denied", "hit"]);
      });
    } finally {
      await upstream.close();
    }
  });

  it("reuses an access answer per credential and image for the TTL", async () => {
    const upstream = await startGlance({
      images: { img: { size: 1000 } },
      tokens: { reader: "all", other: "all" },
    });
    try {
      await withProxy(upstream.url, {}, async ({ url, proxy }) => {
        await get(`${url}/v2/images/img/file`, reader);
        await proxy.settle(5000);
        assert.equal(upstream.probeCalls(), 0, "the miss's own download is Glance's answer");
        for (let i = 0; i < 3; i++) {
          const hit = await get(`${url}/v2/images/img/file`, reader);
          assert.equal(hit.res.headers.get("cache-status"), "hono-image-cache; hit");
        }
        assert.equal(upstream.probeCalls(), 0);
        await get(`${url}/v2/images/img/file`, { "x-auth-token": "other" });
        assert.equal(upstream.probeCalls(), 1, "another credential is asked again");
        await get(`${url}/v2/images/img/file`, { "x-auth-token": "other" });
        assert.equal(upstream.probeCalls(), 1);
      });
    } finally {
      await upstream.close();
    }
  });

  it("refuses a deactivated image without dropping it, and serves it again once reactivated", async () => {
    const upstream = await startGlance({ images: { img: { size: 4096 } } });
    try {
      await withProxy(upstream.url, { accessCheck: { ttl: 0 } }, async ({ url, proxy, store }) => {
        await get(`${url}/v2/images/img/file`);
        await proxy.settle(5000);
        upstream.images.img.status = "deactivated";
        const refused = await get(`${url}/v2/images/img/file`);
        assert.equal(refused.res.status, 403);
        assert.ok(refused.bytes.byteLength < 4096);
        assert.match(new TextDecoder().decode(refused.bytes), /^Forbidden/);
        assert.ok(await store.get("img"), "the entry stays: only serving it is refused");
        upstream.images.img.status = "active";
        const back = await get(`${url}/v2/images/img/file`);
        assert.equal(back.res.headers.get("cache-status"), "hono-image-cache; hit");
        assert.equal(upstream.downloads.img, 1);
      });
    } finally {
      await upstream.close();
    }
  });

  it("evicts an image deleted through the proxy", async () => {
    const upstream = await startGlance({
      images: { img: { size: 4096 } },
      tokens: { reader: "all" },
    });
    try {
      await withProxy(upstream.url, {}, async ({ url, proxy, store }) => {
        await get(`${url}/v2/images/img/file`, reader);
        await proxy.settle(5000);
        assert.ok(await store.get("img"));
        const res = await fetch(`${url}/v2/images/img`, { method: "DELETE", headers: reader });
        await res.body?.cancel();
        assert.equal(res.status, 204);
        assert.equal(await store.get("img"), undefined);
        const after = await get(`${url}/v2/images/img/file`, reader);
        assert.equal(after.res.status, 404, "the upstream's answer, not a cached copy");
      });
    } finally {
      await upstream.close();
    }
  });

  it("answers 502 when the upstream is down, and serves no cached entry unchecked", async () => {
    const upstream = await startGlance({ images: { img: { size: 4096 } } });
    let closed = false;
    try {
      await withProxy(upstream.url, { accessCheck: { ttl: 0 } }, async ({ url, proxy, store }) => {
        await get(`${url}/v2/images/img/file`);
        await proxy.settle(5000);
        await upstream.close();
        closed = true;

        const hit = await get(`${url}/v2/images/img/file`);
        assert.equal(hit.res.status, 502);
        assert.equal(
          hit.res.headers.get("cache-status"),
          "hono-image-cache; detail=access-check-failed",
        );
        assert.match(new TextDecoder().decode(hit.bytes), /^Bad gateway/);
        assert.ok(await store.get("img"), "the entry is kept for when the upstream is back");

        const other = await get(`${url}/v2/images`);
        assert.equal(other.res.status, 502);
      });
    } finally {
      if (!closed) await upstream.close();
    }
  });

  it("streams an upload to the upstream untouched and unbuffered", async () => {
    let received = 0;
    const hash = createHash("md5");
    const upstream = await startGlance({
      images: {},
      routes: (app) =>
        app.put("/v2/images/:id/file", async (c) => {
          for await (const chunk of c.req.raw.body!) {
            received += chunk.byteLength;
            hash.update(chunk);
          }
          return c.json({ size: received, type: c.req.header("content-type") }, 201);
        }),
    });
    try {
      await withProxy(upstream.url, {}, async ({ url }) => {
        const sent = createHash("md5");
        let part = 0;
        const body = new ReadableStream<Uint8Array>({
          async pull(controller) {
            if (part === 8) return controller.close();
            if (part === 1) {
              // Only go on once the upstream has the first part: a buffering proxy never would.
              await waitFor(() => received >= 256 * 1024, 5000);
            }
            const chunk = new Uint8Array(256 * 1024).fill(part + 1);
            sent.update(chunk);
            part++;
            controller.enqueue(chunk);
          },
        }, { highWaterMark: 0 });
        const res = await fetch(`${url}/v2/images/new/file`, {
          method: "PUT",
          body,
          headers: { "content-type": "application/octet-stream" },
          duplex: "half",
        } as RequestInit);
        assert.equal(res.status, 201);
        assert.deepEqual(await res.json(), {
          size: 8 * 256 * 1024,
          type: "application/octet-stream",
        });
        assert.equal(hash.digest("hex"), sent.digest("hex"));
      });
    } finally {
      await upstream.close();
    }
  });

  it("answers HEAD of an uncached image from the upstream with its length", async () => {
    const upstream = await startGlance({ images: { img: { size: 5000 } } });
    try {
      await withProxy(upstream.url, {}, async ({ url, store }) => {
        const res = await fetch(`${url}/v2/images/img/file`, { method: "HEAD" });
        await res.body?.cancel();
        assert.equal(res.status, 200);
        assert.equal(res.headers.get("content-length"), "5000");
        assert.equal(upstream.downloads.img, undefined);
        assert.equal(await store.get("img"), undefined);
      });
    } finally {
      await upstream.close();
    }
  });
});

describe("proxyApp's management API", () => {
  const ADMIN = "admin-token-0123456789";

  it("is mounted behind the admin token", async () => {
    const upstream = await startGlance({ images: { img: { size: 1000 } } });
    try {
      await withProxy(upstream.url, { adminToken: ADMIN }, async ({ url, proxy }) => {
        await get(`${url}/v2/images/img/file`);
        await proxy.settle(5000);
        const anonymous = await get(`${url}/v2/cache`);
        assert.equal(anonymous.res.status, 401);
        const wrong = await get(`${url}/v2/cache`, { "x-auth-token": "not-the-admin-token" });
        assert.equal(wrong.res.status, 403);
        const ways: Record<string, string>[] = [
          { "x-auth-token": ADMIN },
          { authorization: `Bearer ${ADMIN}` },
        ];
        for (const headers of ways) {
          const listing = await fetch(`${url}/v2/cache`, { headers });
          assert.equal(listing.status, 200);
          const body = await listing.json();
          assert.deepEqual(body.cached_images.map((i: { image_id: string }) => i.image_id), [
            "img",
          ]);
        }
        const removed = await fetch(`${url}/v2/cache/img`, {
          method: "DELETE",
          headers: { "x-auth-token": ADMIN },
        });
        await removed.body?.cancel();
        assert.equal(removed.status, 204);
        const miss = await get(`${url}/v2/images/img/file`);
        assert.match(miss.res.headers.get("cache-status") ?? "", /fwd=miss/);
      });
    } finally {
      await upstream.close();
    }
  });

  it("is not mounted without an admin token: /v2/cache goes to the upstream", async () => {
    const upstream = await startGlance({
      images: {},
      routes: (app) => app.get("/v2/cache", (c) => c.json({ from: "upstream" })),
    });
    try {
      await withProxy(upstream.url, {}, async ({ url, proxy }) => {
        assert.equal(proxy.managed, false);
        const res = await fetch(`${url}/v2/cache`);
        assert.deepEqual(await res.json(), { from: "upstream" });
      });
    } finally {
      await upstream.close();
    }
  });

  it("prefetches through the upstream with the service token, verified by SHA-512", async () => {
    const upstream = await startGlance({
      images: { img: { size: 300 * 1024 } },
      tokens: { service: "all", reader: "all" },
    });
    try {
      await withProxy(
        upstream.url,
        { adminToken: ADMIN, serviceToken: "service" },
        async ({ url, store }) => {
          const queued = await fetch(`${url}/v2/cache/img`, {
            method: "PUT",
            headers: { "x-auth-token": ADMIN },
          });
          await queued.body?.cancel();
          assert.equal(queued.status, 202);
          await waitFor(async () => (await store.get("img")) !== undefined);
          const { sha512 } = await generatedDigests("img", 300 * 1024);
          assert.deepEqual((await store.get("img"))?.digest, {
            algorithm: "sha512",
            value: sha512,
          });
          const hit = await get(`${url}/v2/images/img/file`, reader);
          assert.equal(hit.res.headers.get("cache-status"), "hono-image-cache; hit");
          assertBytes(hit.bytes, await imageBytes("img", 300 * 1024));
          assert.equal(upstream.downloads.img, 1);
          const stranger = await get(`${url}/v2/images/img/file`);
          assert.equal(stranger.res.status, 401, "a prefetched image is access-checked too");
        },
      );
    } finally {
      await upstream.close();
    }
  });
});

/** The garbage collector, where a test can have it (Node: through `node:v8`), else undefined. */
async function garbageCollector(): Promise<(() => void) | undefined> {
  if ((globalThis as { Deno?: unknown; Bun?: unknown }).Deno !== undefined) return undefined;
  if ((globalThis as { Bun?: unknown }).Bun !== undefined) return undefined;
  const v8 = await import("node:v8");
  const vm = await import("node:vm");
  v8.setFlagsFromString("--expose-gc");
  return vm.runInNewContext("gc") as () => void;
}

describe("upstreamProxy", () => {
  it("passes on a body that outlives the upstream's Response object (Node's fetch cancels those when collected)", async (t) => {
    const gc = await garbageCollector();
    if (gc === undefined) return t.skip("needs node:v8's --expose-gc (Node only)");
    const size = 4 * 2 ** 20;
    const bytes = new Uint8Array(size).map((_, i) => i % 251);
    const upstream = await startServer(() => new Response(bytes));
    try {
      const handler = upstreamProxy({ upstream: upstream.url });
      const app = new Hono();
      app.get("*", handler);
      const res = await app.request("/v2/images/a/file");
      // Only the proxy's answer is kept: the upstream's own Response object may go.
      for (let i = 0; i < 5; i++) {
        gc();
        await sleep(20);
      }
      const got = new Uint8Array(await res.arrayBuffer());
      assert.equal(got.byteLength, size);
      assertBytes(got, bytes);
    } finally {
      await upstream.close();
    }
  });

  /** An upstream that echoes what it received. */
  function echoRoutes(app: Hono) {
    app.all("/echo/*", async (c) => {
      const headers: Record<string, string> = {};
      for (const [name, value] of c.req.raw.headers) headers[name] = value;
      const url = new URL(c.req.url);
      return c.json(
        {
          method: c.req.method,
          path: url.pathname + url.search,
          headers,
          body: await c.req.text(),
        },
        200,
        { "x-upstream": "yes", "keep-alive": "timeout=5", "x-drop": "1", connection: "x-drop" },
      );
    });
  }

  it("forwards method, path, query and headers, without hop-by-hop headers", async () => {
    const upstream = await startGlance({ images: {}, routes: echoRoutes });
    try {
      await withProxy(upstream.url, {}, async ({ url }) => {
        const port = new URL(url).port;
        // A raw request, so that hop-by-hop headers can be sent at all.
        const raw = await rawRequest(
          Number(port),
          [
            "POST /echo/a%20b?x=1&y=%2F HTTP/1.1",
            `Host: 127.0.0.1:${port}`,
            "Connection: close, X-Secret-Hop",
            "X-Secret-Hop: 1",
            "Keep-Alive: timeout=5",
            "Proxy-Authorization: Basic abc",
            "TE: trailers",
            "X-Custom: kept",
            "X-Forwarded-For: 10.0.0.1",
            "Content-Type: text/plain",
            "Content-Length: 5",
            "",
            "hello",
          ].join("\r\n"),
        );
        assert.match(raw.head, /^HTTP\/1\.1 200/);
        assert.match(raw.head, /x-upstream: yes/i);
        assert.doesNotMatch(raw.head, /x-drop/i, "a header the upstream's Connection names");
        assert.doesNotMatch(raw.head, /keep-alive: timeout/i);
        const echo = JSON.parse(raw.body);
        assert.equal(echo.method, "POST");
        assert.equal(echo.path, "/echo/a%20b?x=1&y=%2F");
        assert.equal(echo.body, "hello");
        const headers = echo.headers as Record<string, string>;
        assert.equal(headers["x-custom"], "kept");
        assert.equal(headers["content-type"], "text/plain");
        for (const name of ["x-secret-hop", "keep-alive", "proxy-authorization", "te"]) {
          assert.equal(headers[name], undefined, name);
        }
        assert.equal(headers["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert.equal(headers["x-forwarded-proto"], "http");
        assert.equal(headers["x-forwarded-host"], `127.0.0.1:${port}`);
        assert.equal(headers.forwarded, `for=127.0.0.1;host="127.0.0.1:${port}";proto=http`);
        assert.equal(headers.host, new URL(upstream.url).host);
        assert.equal(headers["accept-encoding"], "identity");

        const trace = await rawRequest(
          Number(port),
          `TRACE /echo/x HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nConnection: close\r\n\r\n`,
        );
        assert.match(trace.head, /^HTTP\/1\.1 405/, "fetch cannot send TRACE: refused, not 502");
      });
    } finally {
      await upstream.close();
    }
  });

  it("keeps an upstream path prefix", async () => {
    const upstream = await startGlance({ images: {}, routes: echoRoutes });
    try {
      await withProxy(`${upstream.url}/echo/prefix/`, {}, async ({ url }) => {
        const res = await fetch(`${url}/v2/images?limit=2`);
        assert.equal((await res.json()).path, "/echo/prefix/v2/images?limit=2");
      });
    } finally {
      await upstream.close();
    }
  });

  it("passes redirects through, pointing them at the proxy", async () => {
    let upstreamUrl = "";
    const upstream = await startGlance({
      images: {},
      routes: (app) => {
        app.get("/absolute", (c) => c.redirect(`${upstreamUrl}/v2/images?marker=1`, 302));
        app.get("/relative", (c) => c.redirect("/v2/schemas/image", 301));
        app.get("/elsewhere", (c) => c.redirect("http://keystone.invalid/v3", 303));
      },
    });
    upstreamUrl = upstream.url;
    try {
      await withProxy(upstream.url, {}, async ({ url }) => {
        const cases: [string, number, string][] = [
          ["/absolute", 302, `${url}/v2/images?marker=1`],
          ["/relative", 301, "/v2/schemas/image"],
          ["/elsewhere", 303, "http://keystone.invalid/v3"],
        ];
        for (const [path, status, location] of cases) {
          const res = await fetch(`${url}${path}`, { redirect: "manual" });
          await res.body?.cancel();
          assert.equal(res.status, status, path);
          assert.equal(res.headers.get("location"), location, path);
        }
      });
    } finally {
      await upstream.close();
    }
  });

  it("answers 504 when the upstream sends no headers in time, never timing out a long body", async () => {
    let release!: () => void;
    const released = new Promise<void>((resolve) => release = resolve);
    const upstream = await startGlance({
      images: {},
      routes: (app) => {
        app.get("/stuck", async (c) => {
          await released;
          return c.text("late");
        });
        app.get("/slow-body", (c) => {
          let sent = 0;
          const body = new ReadableStream<Uint8Array>({
            async pull(controller) {
              if (sent === 8) return controller.close();
              await sleep(60);
              sent++;
              controller.enqueue(new Uint8Array(1000).fill(sent));
            },
          }, { highWaterMark: 0 });
          return c.body(body, 200, { "content-length": "8000" });
        });
      },
    });
    try {
      await withProxy(upstream.url, { headerTimeout: 200 }, async ({ url }) => {
        const started = Date.now();
        const stuck = await get(`${url}/stuck`);
        assert.equal(stuck.res.status, 504);
        assert.match(new TextDecoder().decode(stuck.bytes), /^Gateway timeout/);
        assert.ok(Date.now() - started < 3000);

        const slow = await get(`${url}/slow-body`);
        assert.equal(slow.res.status, 200);
        assert.equal(slow.error, undefined);
        assert.equal(slow.bytes.byteLength, 8000, "a body longer than the header timeout");
      });
    } finally {
      release();
      await upstream.close();
    }
  });

  it("never passes a body with the wrong Content-Encoding", async () => {
    const upstream = await startGlance({
      images: {},
      routes: (app) =>
        app.get(
          "/gz",
          (c) =>
            c.body(new Uint8Array(gzipSync(new TextEncoder().encode("plain text, decoded"))), 200, {
              "content-encoding": "gzip",
              "content-type": "text/plain",
            }),
        ),
    });
    try {
      await withProxy(upstream.url, {}, async ({ url }) => {
        const res = await fetch(`${url}/gz`, { headers: { "accept-encoding": "identity" } });
        const bytes = new Uint8Array(await res.arrayBuffer());
        // Passed on as it came (Deno), or decoded by fetch without its label (Node, Bun).
        const text = new TextDecoder().decode(
          res.headers.get("content-encoding") === "gzip" ? gunzipSync(bytes) : bytes,
        );
        assert.equal(text, "plain text, decoded");
      });
    } finally {
      await upstream.close();
    }
  });
});

describe("proxy configuration", () => {
  it("throws a TypeError for an upstream that is not an http URL", async () => {
    const store = new MemoryStore();
    try {
      assert.throws(
        () => proxyApp({ upstream: "ftp://glance", store }),
        (error: Error) =>
          error instanceof TypeError &&
          error.message.startsWith('Cannot create proxyApp: "upstream" must be') &&
          error.message.includes('"ftp://glance"'),
      );
      assert.throws(() => proxyApp({ upstream: "http://x", store: undefined as never }), TypeError);
      assert.throws(() => upstreamProxy({ upstream: "glance:9292" }), TypeError);
      assert.throws(
        () => proxyApp({ upstream: "http://x", store, adminToken: "short" }),
        /at least 16 characters/,
      );
    } finally {
      await store.close();
    }
  });

  it("throws a RangeError for a negative TTL or timeout", () => {
    assert.throws(() => glanceAccessCheck({ upstream: "http://x", ttl: -1 }), RangeError);
    assert.throws(() => upstreamProxy({ upstream: "http://x", headerTimeout: NaN }), RangeError);
  });

  it("leaves hits out of the access log when asked", async () => {
    const upstream = await startGlance({ images: { img: { size: 1000 } } });
    try {
      await withProxy(upstream.url, { logHits: false }, async ({ url, proxy, logs }) => {
        await get(`${url}/v2/images/img/file`);
        await proxy.settle(5000);
        await get(`${url}/v2/images/img/file`);
        await get(`${url}/v2/images/img`);
        await waitFor(() => logs.length === 2);
        await sleep(50);
        assert.deepEqual(logs.map((l) => l.cache), ["miss", "-"]);
      });
    } finally {
      await upstream.close();
    }
  });
});

/** Sends `request` as is over a TCP connection (`Connection: close`) and reads the answer. */
function rawRequest(port: number, request: string): Promise<{ head: string; body: string }> {
  return new Promise((resolve, reject) => {
    const socket = connect(port, "127.0.0.1");
    const chunks: Uint8Array[] = [];
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error("No answer in time"));
    }, 5000);
    socket.on("data", (chunk: Uint8Array) => chunks.push(chunk));
    socket.on("error", (error) => {
      clearTimeout(timer);
      reject(error);
    });
    socket.on("end", () => {
      clearTimeout(timer);
      socket.destroy();
      const text = new TextDecoder().decode(
        chunks.reduce((all, chunk) => {
          const out = new Uint8Array(all.byteLength + chunk.byteLength);
          out.set(all);
          out.set(chunk, all.byteLength);
          return out;
        }, new Uint8Array()),
      );
      const split = text.indexOf("\r\n\r\n");
      const head = text.slice(0, split);
      let body = text.slice(split + 4);
      if (/transfer-encoding: chunked/i.test(head)) body = dechunk(body);
      resolve({ head, body });
    });
    socket.write(request);
  });
}

function dechunk(text: string): string {
  let out = "";
  let at = 0;
  for (let i = 0; i < 1000; i++) {
    const line = text.indexOf("\r\n", at);
    const size = parseInt(text.slice(at, line), 16);
    if (!(size > 0)) break;
    out += text.slice(line + 2, line + 2 + size);
    at = line + 2 + size + 2;
  }
  return out;
}
