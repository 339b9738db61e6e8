/**
 * The proxy's security and integrity, end to end against a token-checking
 * fake Glance: Glance's download policy on hits, verification that does not
 * depend on the access check, no internal address in answers, deleted
 * images dropped, stale answers only within their window.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { generatedDigests } from "hono-image-cache/testing";
import { assertBytes, waitFor } from "./_helpers.ts";
import { get, imageBytes, startGlance, withProxy } from "./_glance.ts";

const MiB = 2 ** 20;
const alice = { "x-auth-token": "alice" };
const bob = { "x-auth-token": "bob" };
const text = (bytes: Uint8Array) => new TextDecoder().decode(bytes);

describe("the proxy's access check", () => {
  it("refuses cached bytes to a credential that sees the metadata but may not download the image", async () => {
    const glance = await startGlance({
      images: { img: { size: 64 * 1024 } },
      tokens: { alice: "all", bob: { see: "all", download: [] } },
    });
    try {
      await withProxy(glance.url, {}, async ({ url, proxy, logs }) => {
        const metadata = await fetch(`${glance.url}/v2/images/img`, { headers: bob });
        await metadata.body?.cancel();
        assert.equal(metadata.status, 200, "bob sees the image's metadata");

        const expected = await imageBytes("img", 64 * 1024);
        assertBytes((await get(`${url}/v2/images/img/file`, alice)).bytes, expected);
        await proxy.settle(5000);

        for (let i = 0; i < 2; i++) {
          const refused = await get(`${url}/v2/images/img/file`, bob);
          assert.equal(refused.res.status, 403);
          assert.equal(
            refused.res.headers.get("cache-status"),
            "hono-image-cache; detail=access-denied",
          );
          assert.match(text(refused.bytes), /^Forbidden/);
        }
        assert.equal(glance.probeCalls(), 1, "one probe per credential, image and TTL");
        assert.ok(
          glance.requests.every((request) => request !== "HEAD /v2/images/img/file"),
          "never a HEAD, which Glance does not route",
        );
        const hit = await get(`${url}/v2/images/img/file`, alice);
        assert.equal(hit.res.headers.get("cache-status"), "hono-image-cache; hit");
        assert.equal(glance.downloads.img, 1);
        await waitFor(() => logs.length === 4);
        assert.deepEqual(logs.map((l) => l.cache), ["miss", "denied", "denied", "hit"]);
      });
    } finally {
      await glance.close();
    }
  });

  it("asks with the client's own credentials: no token, a bad token, another project's token are refused", async () => {
    const glance = await startGlance({
      images: { img: { size: 4096 } },
      tokens: { alice: "all", carol: [] },
    });
    try {
      await withProxy(glance.url, {}, async ({ url, proxy }) => {
        await get(`${url}/v2/images/img/file`, alice);
        await proxy.settle(5000);
        const cases: [Record<string, string>, number][] = [
          [{}, 401],
          [{ "x-auth-token": "forged" }, 401],
          [{ "x-auth-token": "carol" }, 404],
        ];
        for (const [headers, status] of cases) {
          const res = await get(`${url}/v2/images/img/file`, headers);
          assert.equal(res.res.status, status, JSON.stringify(headers));
          assert.ok(res.bytes.byteLength < 4096);
        }
        assert.equal(glance.downloads.img, 1);
      });
    } finally {
      await glance.close();
    }
  });
});

describe("the proxy's verification", () => {
  it("commits no corrupted bytes with the access check off when the metadata announces a hash", async () => {
    const glance = await startGlance({ images: { img: { size: MiB } } });
    glance.corrupt.add("img");
    try {
      await withProxy(glance.url, { accessCheck: false }, async ({ url, proxy, store }) => {
        const first = await get(`${url}/v2/images/img/file`);
        assert.equal(first.res.status, 200);
        assert.equal(first.res.headers.get("content-md5"), null, "no Content-MD5 to check");
        assert.notEqual(first.error, undefined, "a mismatch must cut the connection");
        assert.ok(first.bytes.byteLength < MiB, "cut before the last byte");
        await proxy.settle(5000);
        assert.equal(await store.get("img"), undefined, "nothing committed");
        const again = await get(`${url}/v2/images/img/file`);
        assert.match(again.res.headers.get("cache-status") ?? "", /fwd=miss/);
        assert.equal(glance.metadataCalls(), 2, "the metadata was asked for the digest");
      });
    } finally {
      await glance.close();
    }
  });

  it("caches nothing when the metadata cannot be read, and still serves the whole body", async () => {
    const glance = await startGlance({
      images: { img: { size: 256 * 1024 } },
      routes: (app) => app.get("/v2/images/:id", (c) => c.text("overloaded", 503)),
    });
    try {
      await withProxy(glance.url, { accessCheck: false }, async ({ url, proxy, store, errors }) => {
        const res = await get(`${url}/v2/images/img/file`);
        assert.equal(res.res.status, 200);
        assert.equal(res.error, undefined);
        assertBytes(res.bytes, await imageBytes("img", 256 * 1024));
        assert.equal(
          res.res.headers.get("cache-status"),
          "hono-image-cache; fwd=miss; detail=digest-error",
        );
        await proxy.settle(5000);
        assert.equal(await store.get("img"), undefined);
        assert.match(String(errors[0]), /Not caching image "img": its metadata .* unavailable/);
      });
    } finally {
      await glance.close();
    }
  });

  it("with requireDigest, caches nothing that cannot be verified", async () => {
    const glance = await startGlance({
      images: { img: { size: 4096 } },
      metadata: (_id, { os_hash_algo: _a, os_hash_value: _v, checksum: _c, ...rest }) => rest,
      routes: (app) =>
        app.get("/v2/images/:id/file", async (c, next) => {
          await next();
          c.res.headers.delete("content-md5");
        }),
    });
    try {
      await withProxy(glance.url, { requireDigest: true }, async ({ url, proxy, store }) => {
        const res = await get(`${url}/v2/images/img/file`);
        assert.equal(res.res.status, 200);
        assert.equal(res.bytes.byteLength, 4096);
        assert.equal(
          res.res.headers.get("cache-status"),
          "hono-image-cache; fwd=miss; detail=no-digest",
        );
        await proxy.settle(5000);
        assert.equal(await store.get("img"), undefined);
      });
      await withProxy(glance.url, {}, async ({ url, proxy, store }) => {
        await get(`${url}/v2/images/img/file`);
        await proxy.settle(5000);
        assert.ok(await store.get("img"), "without it, the length alone is checked (Glance's way)");
      });
    } finally {
      await glance.close();
    }
  });

  it("verifies a fill with the metadata the service token reads when the client's credentials may not", async () => {
    const glance = await startGlance({
      images: { img: { size: 8192 } },
      tokens: { service: "all" },
      publicData: true,
    });
    try {
      await withProxy(
        glance.url,
        { accessCheck: false, serviceToken: "service" },
        async ({ url, proxy, store }) => {
          const res = await get(`${url}/v2/images/img/file`);
          assert.equal(res.res.status, 200);
          await proxy.settle(5000);
          const { sha512 } = await generatedDigests("img", 8192);
          assert.deepEqual((await store.get("img"))?.digest, {
            algorithm: "sha512",
            value: sha512,
          });
        },
      );
    } finally {
      await glance.close();
    }
  });
});

describe("the proxy's answers", () => {
  it("answers 502 without the upstream's address, which goes to the log", async () => {
    const glance = await startGlance({ images: { img: { size: 4096 } } });
    const upstreamHost = new URL(glance.url).host;
    await glance.close();
    await withProxy(glance.url, {}, async ({ url, events }) => {
      for (const path of ["/v2/images", "/v2/images/img/file"]) {
        const res = await get(`${url}${path}`);
        assert.equal(res.res.status, 502, path);
        const body = text(res.bytes);
        assert.match(body, /^Bad gateway/);
        assert.ok(!body.includes(upstreamHost), `${path}: ${body}`);
        assert.ok(!body.includes("127.0.0.1"), `${path}: ${body}`);
      }
      assert.ok(
        events.some((e) => e.event === "upstream-error" && e.message.includes(upstreamHost)),
        "the log has the address",
      );
    });
  });
});

describe("images the upstream deleted", () => {
  it("are dropped when the upstream answers 404 to a credential it allowed before", async () => {
    const glance = await startGlance({ images: { img: { size: 4096 } }, tokens: { alice: "all" } });
    try {
      await withProxy(
        glance.url,
        { accessCheck: { ttl: 0 } },
        async ({ url, proxy, store, events }) => {
          await get(`${url}/v2/images/img/file`, alice);
          await proxy.settle(5000);
          assert.ok(await store.get("img"));
          delete glance.images.img;
          const res = await get(`${url}/v2/images/img/file`, alice);
          assert.equal(res.res.status, 404);
          await waitFor(async () => (await store.get("img")) === undefined);
          assert.ok(events.some((e) => e.event === "image-gone" && e.imageId === "img"));
        },
      );
    } finally {
      await glance.close();
    }
  });

  it("are dropped when the service token confirms a 404, and kept when only another project gets 404", async () => {
    const glance = await startGlance({
      images: { img: { size: 4096 } },
      tokens: { alice: "all", carol: [], service: "all" },
    });
    try {
      const options = { serviceToken: "service", accessCheck: { ttl: 0 } };
      await withProxy(glance.url, options, async ({ url, proxy, store }) => {
        const carol = { "x-auth-token": "carol" };
        await get(`${url}/v2/images/img/file`, alice);
        await proxy.settle(5000);
        const hidden = await get(`${url}/v2/images/img/file`, carol);
        assert.equal(hidden.res.status, 404);
        await waitFor(() => glance.metadataCalls() >= 2); // the service token's confirmation
        await proxy.settle(100);
        assert.ok(await store.get("img"), "carol's project cannot see it: not deleted");

        delete glance.images.img;
        const gone = await get(`${url}/v2/images/img/file`, carol);
        assert.equal(gone.res.status, 404);
        await waitFor(async () => (await store.get("img")) === undefined);
      });
    } finally {
      await glance.close();
    }
  });
});

describe("serveStaleOnError", () => {
  it("serves a credential allowed within the window while the upstream is down, never one it refused", async () => {
    const glance = await startGlance({
      images: { img: { size: 4096 } },
      tokens: { alice: "all", bob: "all" },
    });
    try {
      await withProxy(
        glance.url,
        { accessCheck: { ttl: 0 }, serveStaleOnError: 60_000 },
        async ({ url, proxy, logs }) => {
          await get(`${url}/v2/images/img/file`, alice);
          await proxy.settle(5000);
          glance.failWith = 503;
          const stale = await get(`${url}/v2/images/img/file`, alice);
          assert.equal(stale.res.status, 200);
          assert.equal(
            stale.res.headers.get("cache-status"),
            "hono-image-cache; hit; detail=stale-access",
          );
          assertBytes(stale.bytes, await imageBytes("img", 4096));
          const never = await get(`${url}/v2/images/img/file`, bob);
          assert.equal(never.res.status, 502, "bob was never allowed");

          glance.failWith = undefined;
          glance.images.img.status = "deactivated";
          const no = await get(`${url}/v2/images/img/file`, alice);
          assert.equal(no.res.status, 403);
          glance.failWith = 503;
          const after = await get(`${url}/v2/images/img/file`, alice);
          assert.equal(after.res.status, 502, "a no is never overridden by an outage");
          await waitFor(() => logs.length >= 5);
          assert.equal(logs[1].cache, "stale");
        },
      );
      await withProxy(glance.url, { accessCheck: { ttl: 0 } }, async ({ url, proxy }) => {
        glance.failWith = undefined;
        glance.images.img.status = "active";
        await get(`${url}/v2/images/img/file`, alice);
        await proxy.settle(5000);
        glance.failWith = 503;
        const off = await get(`${url}/v2/images/img/file`, alice);
        assert.equal(off.res.status, 502, "off by default");
      });
    } finally {
      await glance.close();
    }
  });
});
