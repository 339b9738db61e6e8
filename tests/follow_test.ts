/**
 * A process asked for an image that another live process is filling follows
 * that process's file instead of downloading the image a second time, with
 * its own origin answer held in reserve. Two `FileSystemStore` instances on
 * one directory stand for two processes (each has its own owner token and
 * its own fills), as in tests/regressions_test.ts; tests/multiprocess_test.ts
 * does it with real processes.
 *
 * @module
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { Hono } from "hono";
import { FileSystemStore, imageCache, type ImageStore } from "hono-image-cache";
import { FaultyStore } from "hono-image-cache/testing";
import {
  assertBytes,
  hexDigest,
  pattern,
  readBody,
  sleep,
  waitFor,
  withTempDir,
} from "./_helpers.ts";

const SIZE = 2 * 2 ** 20;
const IMAGE = pattern(SIZE, 21);
const CHUNK = 64 * 1024;

interface OriginOptions {
  /** Milliseconds between chunks. */
  delay?: number;
  /** The body fails after this many bytes. */
  failAfter?: number;
  /** The bytes sent (a wrong body for a corrupt origin). */
  bytes?: Uint8Array;
  /** Send no `Content-Length` (a chunked answer). */
  noLength?: boolean;
  /** Milliseconds before the answer's headers. */
  headersDelay?: number;
}

/** An origin for IMAGE that counts, per response, the bytes its body was asked for. */
function origin(options: OriginOptions = {}) {
  const pulled: number[] = [];
  const bytes = options.bytes ?? IMAGE;
  const respond = async () => {
    if (options.headersDelay) await sleep(options.headersDelay);
    const index = pulled.push(0) - 1;
    let at = 0;
    const body = new ReadableStream<Uint8Array>({
      async pull(controller) {
        if (options.delay) await sleep(options.delay);
        if (options.failAfter !== undefined && at >= options.failAfter) {
          return controller.error(new Error("origin connection reset"));
        }
        if (at >= SIZE) return controller.close();
        controller.enqueue(bytes.slice(at, at + CHUNK));
        at += CHUNK;
        pulled[index] = at;
      },
    }, { highWaterMark: 0 });
    const headers: Record<string, string> = { "content-md5": hexDigest(IMAGE) };
    if (!options.noLength) headers["content-length"] = String(SIZE);
    return new Response(body, { headers });
  };
  return { pulled, respond };
}

function appOver(store: ImageStore, respond: () => Promise<Response>): Hono {
  const app = new Hono();
  app.use(imageCache({ store, onError: () => {} }));
  app.get("/v2/images/:id/file", () => respond());
  return app;
}

/** Two "processes" on one directory, each with its own store and origin. */
async function withTwo(
  owner: OriginOptions,
  follower: OriginOptions,
  fn: (
    a: { app: Hono; store: ImageStore; pulled: number[] },
    b: { app: Hono; store: FaultyStore; pulled: number[] },
  ) => Promise<void>,
) {
  await withTempDir(async (directory) => {
    const storeA = new FileSystemStore({ directory });
    const storeB = new FaultyStore(new FileSystemStore({ directory }));
    const originA = origin(owner);
    const originB = origin(follower);
    try {
      await fn(
        { app: appOver(storeA, originA.respond), store: storeA, pulled: originA.pulled },
        { app: appOver(storeB, originB.respond), store: storeB, pulled: originB.pulled },
      );
    } finally {
      await storeA.close();
      await storeB.close();
    }
  });
}

/** Starts the owner's fill and waits until its file holds some bytes. */
async function startOwner(a: { app: Hono; pulled: number[] }) {
  const res = await a.app.request("/v2/images/img/file");
  assert.equal(res.headers.get("cache-status"), "hono-image-cache; fwd=miss; stored");
  await waitFor(() => (a.pulled[0] ?? 0) >= 4 * CHUNK);
  return res;
}

describe("following another process's fill", () => {
  it("serves the image from the other process's file, reading its own origin answer not at all", async () => {
    await withTwo({ delay: 2 }, {}, async (a, b) => {
      const first = await startOwner(a);
      const second = await b.app.request("/v2/images/img/file");
      assert.equal(
        second.headers.get("cache-status"),
        "hono-image-cache; fwd=miss; collapsed; detail=busy",
      );
      assert.equal(second.headers.get("content-length"), String(SIZE));
      const [one, two] = await Promise.all([readBody(first), readBody(second)]);
      assert.equal(one.error, undefined);
      assert.equal(two.error, undefined);
      assertBytes(one.bytes, IMAGE);
      assertBytes(two.bytes, IMAGE);
      assert.deepEqual(b.pulled, [0], "the follower's origin body was never read");
      assert.ok(await a.store.get("img"), "the owner committed");
      assert.ok(await b.store.get("img"), "and the follower sees the entry");
    });
  });

  it("follows a fill of unknown length (no Content-Length) to its commit", async () => {
    await withTwo({ delay: 2, noLength: true }, { noLength: true }, async (a, b) => {
      const first = await startOwner(a);
      const second = await b.app.request("/v2/images/img/file");
      assert.equal(
        second.headers.get("cache-status"),
        "hono-image-cache; fwd=miss; collapsed; detail=busy",
      );
      const [one, two] = await Promise.all([readBody(first), readBody(second)]);
      assert.equal(one.error, undefined);
      assert.equal(two.error, undefined);
      assertBytes(two.bytes, IMAGE);
      assert.deepEqual(b.pulled, [0]);
    });
  });

  it("goes on from its own origin answer when the owner's origin fails mid-fill", async () => {
    await withTwo({ delay: 2, failAfter: SIZE / 2 }, {}, async (a, b) => {
      const first = await startOwner(a);
      const second = await b.app.request("/v2/images/img/file");
      const [one, two] = await Promise.all([readBody(first), readBody(second)]);
      assert.ok(one.error, "the owner's client sees its origin fail");
      assert.equal(two.error, undefined);
      assertBytes(two.bytes, IMAGE);
      assert.equal(b.pulled.length, 1);
      assert.equal(b.pulled[0], SIZE, "the follower read its own origin to the end");
      assert.equal(await b.store.get("img"), undefined, "nothing committed");
    });
  });

  it("goes on from its own origin answer of unknown length when the owner's origin fails", async () => {
    await withTwo(
      { delay: 2, failAfter: SIZE / 2, noLength: true },
      { noLength: true },
      async (a, b) => {
        const first = await startOwner(a);
        const second = await b.app.request("/v2/images/img/file");
        const [one, two] = await Promise.all([readBody(first), readBody(second)]);
        assert.ok(one.error);
        assert.equal(two.error, undefined);
        assertBytes(two.bytes, IMAGE);
        assert.equal(b.pulled[0], SIZE);
      },
    );
  });

  it("goes on from its own origin answer when the followed file cannot be read", async () => {
    await withTwo({ delay: 2 }, {}, async (a, b) => {
      const first = await startOwner(a);
      b.store.faults = { failRead: true };
      const second = await b.app.request("/v2/images/img/file");
      const [one, two] = await Promise.all([readBody(first), readBody(second)]);
      assert.equal(one.error, undefined);
      assert.equal(two.error, undefined);
      assertBytes(two.bytes, IMAGE);
      assert.equal(b.pulled[0], SIZE);
    });
  });

  it("never ends cleanly a body whose followed bytes fail its own origin's digest", async () => {
    const corrupt = IMAGE.slice();
    corrupt[SIZE - 10] ^= 0xff;
    await withTwo({ delay: 2, bytes: corrupt }, {}, async (a, b) => {
      const first = await startOwner(a);
      const second = await b.app.request("/v2/images/img/file");
      const [one, two] = await Promise.all([readBody(first), readBody(second)]);
      assert.ok(one.error, "the owner's client: checksum mismatch");
      assert.ok(two.error, "the follower's client: no clean end either");
      assert.ok(two.bytes.byteLength < SIZE, "the last byte is held back");
      assert.equal(await a.store.get("img"), undefined);
    });
  });

  it("lets no request join a fill that a delete in another process came after, though its lock stayed", async () => {
    await withTwo({ delay: 5 }, {}, async (a, b) => {
      const first = await startOwner(a);
      // Process B's delete wrote its tombstone, and listed the partial files before
      // A's fill took its lock: the lock stays, the tombstone says the fill cannot commit.
      await b.store.markDeleted!("img");
      const late = await a.app.request("/v2/images/img/file");
      assert.doesNotMatch(late.headers.get("cache-status") ?? "", /collapsed/);
      const body = await readBody(late);
      assert.equal(body.error, undefined);
      assertBytes(body.bytes, IMAGE);
      await first.body?.cancel();
    });
  });

  it("lets no request join a followed fill that a delete in another process came after", async () => {
    await withTwo({ delay: 5 }, { headersDelay: 100 }, async (a, b) => {
      const first = await startOwner(a);
      // B's first request waits for its origin's headers; a DELETE elsewhere comes
      // meanwhile; a second request of B must not share the first one's answer.
      const one = b.app.request("/v2/images/img/file");
      await sleep(20);
      await a.store.markDeleted!("img");
      const two = await b.app.request("/v2/images/img/file");
      assert.equal(two.headers.get("cache-status"), "hono-image-cache; fwd=miss; detail=deleted");
      const bodies = await Promise.all([readBody(await one), readBody(two)]);
      for (const body of bodies) {
        assert.equal(body.error, undefined);
        assertBytes(body.bytes, IMAGE);
      }
      await first.body?.cancel();
    });
  });

  it("stops following a fill that another process's DELETE removed, and serves the whole image", async () => {
    await withTwo({ delay: 5 }, {}, async (a, b) => {
      const first = await startOwner(a);
      const second = await b.app.request("/v2/images/img/file");
      const reading = readBody(second);
      await sleep(20);
      // The management path of process B: the owner's fill loses its lock and file.
      await b.store.deleteIncomplete("img");
      const two = await reading;
      assert.equal(two.error, undefined);
      assertBytes(two.bytes, IMAGE);
      assert.equal(b.pulled[0], SIZE, "the rest came from the follower's own origin answer");
      await first.body?.cancel();
    });
  });
});
