import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { Hono } from "hono";
import { FileSystemStore, imageCache, MemoryStore } from "hono-image-cache";
import type { ImageCacheOptions, ImageStore } from "hono-image-cache";
import { FaultyStore } from "hono-image-cache/testing";
import {
  assertBytes,
  hexDigest,
  pattern,
  readBody,
  readRest,
  sleep,
  startServer,
  STORES,
  waitFor,
  withStore as withKind,
  withTempDir,
} from "./_helpers.ts";

const SIZE = 4 * 2 ** 20;
const IMAGE = pattern(SIZE, 11);
const MD5 = hexDigest(IMAGE);
const CHUNK = 64 * 1024;

/** An origin that streams IMAGE slowly and counts what it sends. */
function slowOrigin(delay = 2, checksum = MD5) {
  const stats = { reads: 0, sent: 0, finished: 0 };
  const respond = () => {
    stats.reads++;
    let at = 0;
    const body = new ReadableStream<Uint8Array>({
      async pull(controller) {
        await sleep(delay);
        if (at >= SIZE) {
          stats.finished++;
          return controller.close();
        }
        controller.enqueue(IMAGE.slice(at, at + CHUNK));
        at += CHUNK;
        stats.sent = Math.max(stats.sent, at);
      },
    }, { highWaterMark: 0 });
    return new Response(body, {
      headers: { "content-length": String(SIZE), "content-md5": checksum },
    });
  };
  return { stats, respond };
}

function cachedApp(
  store: ImageStore,
  respond: () => Response,
  options: Partial<ImageCacheOptions> = {},
) {
  const app = new Hono();
  app.use(imageCache({ store, onError: () => {}, ...options }));
  app.get("/v2/images/:id/file", () => respond());
  app.delete("/v2/images/:id", () => new Response(null, { status: 204 }));
  return app;
}

for (const [kind, make] of STORES) {
  describe(`coalesced fills with ${kind}`, () => {
    const withStore = (fn: (store: ImageStore) => Promise<void>) => withKind(make, fn);

    for (const clients of [10, 100]) {
      it(
        `serves ${clients} concurrent GETs with one origin read, byte-identical bodies`,
        withStore(async (store) => {
          const origin = slowOrigin(1);
          const app = cachedApp(store, origin.respond);
          const responses = await Promise.all(
            Array.from({ length: clients }, () => app.request("/v2/images/img/file")),
          );
          const statuses = responses.map((r) => r.headers.get("cache-status"));
          assert.equal(statuses.filter((s) => s?.endsWith("stored")).length, 1);
          assert.equal(statuses.filter((s) => s?.endsWith("collapsed")).length, clients - 1);
          const bodies = await Promise.all(responses.map(readBody));
          for (const { bytes, error } of bodies) {
            assert.equal(error, undefined);
            assertBytes(bytes, IMAGE);
          }
          assert.equal(origin.stats.reads, 1);
          assert.equal((await store.get("img"))?.size, SIZE);
        }),
      );
    }

    it(
      "gives a late joiner its first bytes before the fill has finished",
      withStore(async (store) => {
        const origin = slowOrigin(3);
        const app = cachedApp(store, origin.respond);
        const first = await app.request("/v2/images/img/file");
        const firstBody = readBody(first);
        await waitFor(() => origin.stats.sent >= SIZE / 4);
        const late = await app.request("/v2/images/img/file");
        assert.equal(late.headers.get("cache-status"), "hono-image-cache; fwd=miss; collapsed");
        const reader = late.body!.getReader();
        const { value } = await reader.read();
        assert.ok(value && value.byteLength > 0);
        assert.ok(
          origin.stats.finished === 0,
          "first bytes arrived while the origin was still sending",
        );
        assert.ok(origin.stats.sent < SIZE);
        const rest = await readRest(reader);
        const whole = new Uint8Array(value!.byteLength + rest.bytes.byteLength);
        whole.set(value!);
        whole.set(rest.bytes, value!.byteLength);
        assertBytes(whole, IMAGE);
        assertBytes((await firstBody).bytes, IMAGE);
        assert.equal(origin.stats.reads, 1);
      }),
    );

    it(
      "lets a client that reads nothing stall nobody: others finish and the fill commits",
      withStore(async (store) => {
        const origin = slowOrigin(0);
        const app = cachedApp(store, origin.respond);
        const stalled = await app.request("/v2/images/img/file");
        const reader = stalled.body!.getReader();
        await reader.read(); // one chunk, then nothing
        const other = await app.request("/v2/images/img/file");
        assertBytes((await readBody(other)).bytes, IMAGE);
        await waitFor(async () => (await store.get("img")) !== undefined);
        // The stalled client can still read everything, from the store.
        const rest = await readRest(reader);
        assert.equal(rest.error, undefined);
        assert.equal(rest.bytes.byteLength + CHUNK, SIZE);
      }),
    );

    it(
      "finishes the others and caches the image when the first client cancels",
      withStore(async (store) => {
        const origin = slowOrigin(1);
        const app = cachedApp(store, origin.respond);
        const first = await app.request("/v2/images/img/file");
        const others = await Promise.all([1, 2, 3].map(() => app.request("/v2/images/img/file")));
        const reader = first.body!.getReader();
        await reader.read();
        await reader.cancel();
        for (const res of others) assertBytes((await readBody(res)).bytes, IMAGE);
        await waitFor(async () => (await store.get("img")) !== undefined);
        assert.equal(origin.stats.reads, 1);
      }),
    );

    it(
      "stops a fill nobody reads with completeOnAbort: false, committing nothing",
      withStore(async (store) => {
        const origin = slowOrigin(2);
        const app = cachedApp(store, origin.respond, { completeOnAbort: false });
        const responses = await Promise.all([1, 2].map(() => app.request("/v2/images/img/file")));
        for (const res of responses) {
          const reader = res.body!.getReader();
          await reader.read();
          await reader.cancel();
        }
        await sleep(50);
        const sentAtCancel = origin.stats.sent;
        await sleep(100);
        assert.ok(origin.stats.sent <= sentAtCancel + CHUNK, "the origin is no longer read");
        assert.equal(await store.get("img"), undefined);
        assert.equal(await store.isFilling("img"), false);
      }),
    );

    it(
      "errors every attached client on a bad checksum and commits nothing",
      withStore(async (store) => {
        const origin = slowOrigin(0, "0".repeat(32));
        const app = cachedApp(store, origin.respond);
        const responses = await Promise.all(
          Array.from({ length: 5 }, () => app.request("/v2/images/img/file")),
        );
        for (const { bytes, error } of await Promise.all(responses.map(readBody))) {
          assert.ok(error, "no clean end");
          assert.ok(bytes.byteLength < SIZE);
        }
        assert.equal(await store.get("img"), undefined);
        assert.equal(origin.stats.reads, 1);
      }),
    );

    it(
      "never serves from the cache after a DELETE that came during a fill",
      withStore(async (store) => {
        const origin = slowOrigin(2);
        const app = cachedApp(store, origin.respond);
        const before = await app.request("/v2/images/img/file");
        const body = readBody(before);
        await waitFor(() => origin.stats.sent >= SIZE / 4);
        const deleted = await app.request("/v2/images/img", { method: "DELETE" });
        assert.equal(deleted.status, 204);
        const after = await app.request("/v2/images/img/file");
        assert.notEqual(
          after.headers.get("cache-status"),
          "hono-image-cache; fwd=miss; collapsed",
          "a request after the DELETE never joins the old fill",
        );
        assert.equal(origin.stats.reads, 2);
        await after.body?.cancel();
        assertBytes((await body).bytes, IMAGE, "the client attached before still gets it all");
        await sleep(20);
        const later = await app.request("/v2/images/img/file");
        assert.notEqual(later.headers.get("cache-status"), "hono-image-cache; hit");
        await later.body?.cancel();
      }),
    );

    it(
      "delivers full bodies to every attached client when the store fails mid-fill",
      withStore(async (inner) => {
        const store = new FaultyStore(inner, { faults: { failWriteAfter: SIZE / 2 } });
        const origin = slowOrigin(0);
        const app = cachedApp(store, origin.respond);
        const fast = await app.request("/v2/images/img/file");
        const slow = await app.request("/v2/images/img/file");
        const slowReader = slow.body!.getReader();
        const fastBody = readBody(fast);
        const slowChunks: Uint8Array[] = [];
        let slowLength = 0;
        for (;;) {
          const { done, value } = await slowReader.read();
          if (done) break;
          slowChunks.push(value);
          slowLength += value.byteLength;
          await sleep(1);
        }
        const slowBytes = new Uint8Array(slowLength);
        let at = 0;
        for (const chunk of slowChunks) {
          slowBytes.set(chunk, at);
          at += chunk.byteLength;
        }
        assertBytes(slowBytes, IMAGE);
        assertBytes((await fastBody).bytes, IMAGE);
        store.faults = {};
        assert.equal(await store.get("img"), undefined);
      }),
    );
  });
}

/** A MemoryStore whose writes wait for `gate`, then take `delay` ms each, and are recorded by size. */
/** A store whose writes take `delay` ms, with `writev` (`vectored`) or `write` alone. */
class SlowDiskStore extends MemoryStore {
  /** Bytes of each store write. */
  writes: number[] = [];
  gate: Promise<void>;
  open!: () => void;
  readonly delay: number;
  readonly vectored: boolean;
  // No parameter property: Node's type stripping does not take them.
  constructor(delay = 0, vectored = true) {
    super();
    this.delay = delay;
    this.vectored = vectored;
    this.gate = new Promise((resolve) => this.open = resolve);
  }
  override async createWriter(id: string) {
    const writer = await super.createWriter(id);
    if (typeof writer === "string") return writer;
    const write = writer.write.bind(writer);
    const writev = writer.writev!.bind(writer);
    const slowly = async (bytes: number) => {
      this.writes.push(bytes);
      await this.gate;
      if (this.delay > 0) await sleep(this.delay);
    };
    writer.write = async (chunk: Uint8Array) => {
      await slowly(chunk.byteLength);
      await write(chunk);
    };
    if (this.vectored) {
      writer.writev = async (chunks: readonly Uint8Array[]) => {
        await slowly(chunks.reduce((sum, chunk) => sum + chunk.byteLength, 0));
        await writev(chunks);
      };
    } else {
      delete writer.writev;
    }
    return writer;
  }
}

describe("a fill and a slow disk", () => {
  for (const vectored of [true, false]) {
    it(`gathers the chunks that arrive during a store write into writes of about 1 MiB (${vectored ? "writev" : "write alone"})`, async () => {
      // Each write takes 20 ms: meanwhile 64 KiB chunks keep arriving, and are gathered.
      const store = new SlowDiskStore(20, vectored);
      store.open();
      const origin = slowOrigin(0);
      const app = new Hono();
      app.use(imageCache({ store, onError: () => {} }));
      app.get("/v2/images/:id/file", origin.respond);
      const res = await app.request("/v2/images/a/file");
      const { bytes, error } = await readBody(res);
      assert.equal(error, undefined);
      assertBytes(bytes, IMAGE);
      assert.ok(await store.get("a"), "committed");
      assert.equal(store.writes.reduce((sum, size) => sum + size, 0), SIZE);
      assert.ok(store.writes.length < SIZE / CHUNK / 4, `${store.writes.length} writes`);
      assert.ok(store.writes.every((size) => size <= 2 ** 20 + CHUNK), String(store.writes));
    });
  }

  it("stops reading the origin while the store trails by more than 4 MiB", async () => {
    const store = new SlowDiskStore();
    const image = pattern(16 * 2 ** 20, 3);
    let pulled = 0;
    const app = new Hono();
    app.use(imageCache({ store, onError: () => {} }));
    app.get("/v2/images/:id/file", (c) =>
      c.body(
        new ReadableStream<Uint8Array>({
          pull(controller) {
            if (pulled >= image.byteLength) return controller.close();
            controller.enqueue(image.slice(pulled, pulled + CHUNK));
            pulled += CHUNK;
          },
        }, { highWaterMark: 0 }),
        200,
        { "content-length": String(image.byteLength), "content-md5": hexDigest(image) },
      ));
    const res = await app.request("/v2/images/a/file");
    await sleep(200);
    // 4 MiB ahead of the store, plus the chunks in flight: memory stays bounded.
    assert.ok(pulled <= 4 * 2 ** 20 + 4 * CHUNK, `read ${pulled} bytes ahead of a stalled disk`);
    store.open();
    const { bytes, error } = await readBody(res);
    assert.equal(error, undefined);
    assertBytes(bytes, image);
    assert.ok(await store.get("a"), "committed");
  });
});

describe("coalesced fills over a real server", () => {
  it("serves 10 concurrent HTTP clients from one origin read, and clients that hang up cost nothing", async () => {
    await withTempDir(async (dir) => {
      const store = new FileSystemStore({ directory: dir });
      const origin = slowOrigin(1);
      const app = cachedApp(store, origin.respond);
      const server = await startServer(app.fetch);
      try {
        const hangUp = new AbortController();
        const quitter = await fetch(`${server.url}/v2/images/img/file`, { signal: hangUp.signal });
        const quitterReader = quitter.body!.getReader();
        await quitterReader.read();
        hangUp.abort();
        await quitterReader.cancel().catch(() => {});
        const responses = await Promise.all(
          Array.from({ length: 10 }, () => fetch(`${server.url}/v2/images/img/file`)),
        );
        for (const res of responses) {
          assert.equal(res.status, 200);
          assertBytes((await readBody(res)).bytes, IMAGE);
        }
        assert.equal(origin.stats.reads, 1);
        await waitFor(async () => (await store.get("img")) !== undefined);
        const hit = await fetch(`${server.url}/v2/images/img/file`);
        assert.equal(hit.headers.get("cache-status"), "hono-image-cache; hit");
        assertBytes((await readBody(hit)).bytes, IMAGE);
      } finally {
        await server.close();
        await store.close();
      }
    });
  });

  it("cuts the connection before the last byte when the checksum fails", async () => {
    const store = new MemoryStore();
    const origin = slowOrigin(0, "f".repeat(32));
    const app = cachedApp(store, origin.respond);
    const server = await startServer(app.fetch);
    try {
      const res = await fetch(`${server.url}/v2/images/img/file`);
      const { bytes, error } = await readBody(res);
      assert.ok(error, "the client sees a failed transfer");
      assert.ok(bytes.byteLength < SIZE);
    } finally {
      await server.close();
    }
  });
});
