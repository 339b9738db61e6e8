/**
 * Regressions found by the reliability campaign (`deno task soak`, issue 9),
 * each reduced to a deterministic test. Two `FileSystemStore` instances on
 * one directory stand for two processes sharing it: each has its own core
 * (fills, claims) and its own owner token, as separate processes do.
 *
 * Each test reproduces a finding of the soak report. A finding still open
 * gets a test marked `{ todo: "…" }`, which counts once `RUN_OPEN_FINDINGS=1`
 * is set; the soak prints its violations as `KNOWN` (scripts/soak/report.ts).
 *
 * @module
 */
import { describe, it } from "node:test";
import process from "node:process";
import assert from "node:assert/strict";
import { readdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { type Context, Hono } from "hono";
import { cacheApi, FileSystemStore, imageCache, type ImageStore } from "hono-image-cache";
import { FaultyStore, MemoryStore } from "hono-image-cache/testing";
import {
  assertBytes,
  hexDigest,
  pattern,
  readBody,
  sleep,
  slowStream,
  startServer,
  withTempDir,
} from "./_helpers.ts";

/** A gate a test opens once. */
function gate(): { wait: Promise<void>; open: () => void } {
  let open!: () => void;
  const wait = new Promise<void>((resolve) => open = resolve);
  return { wait, open };
}

const IMAGE = pattern(256 * 1024, 9);

/**
 * An origin for `IMAGE` on `GET /v2/images/:id/file` and `DELETE`: the body
 * sends its first half, then waits for `midBody` (when given).
 */
function originRoutes(
  app: Hono,
  options: { beforeHeaders?: Promise<void>; midBody?: () => Promise<void> },
) {
  app.get("/v2/images/:id/file", async (c) => {
    await options.beforeHeaders;
    const half = IMAGE.byteLength / 2;
    let step = 0;
    const body = new ReadableStream<Uint8Array>({
      async pull(controller) {
        if (step === 0) controller.enqueue(IMAGE.slice(0, half));
        else if (step === 1) {
          await options.midBody?.();
          controller.enqueue(IMAGE.slice(half));
        } else controller.close();
        step++;
      },
    }, { highWaterMark: 0 });
    return c.body(body, 200, {
      "content-length": String(IMAGE.byteLength),
      "content-md5": hexDigest(IMAGE),
    });
  });
  app.delete("/v2/images/:id", (c) => c.body(null, 204));
}

/** An app: the management API (when `api`), the cache, and the origin. */
function appOver(
  store: ImageStore,
  origin: { beforeHeaders?: Promise<void>; midBody?: () => Promise<void> },
  signal?: AbortSignal,
): Hono {
  const app = new Hono();
  if (signal !== undefined) {
    app.route("/", cacheApi({ store, authorize: () => true, signal, onError: () => {} }));
  }
  app.use(imageCache({ store, onError: () => {} }));
  originRoutes(app, origin);
  return app;
}

/** Reads the first chunk of a body (the fill is under way once it arrives). */
async function firstChunk(res: Response): Promise<ReadableStreamDefaultReader<Uint8Array>> {
  const reader = res.body!.getReader();
  const { value } = await reader.read();
  assert.ok(value !== undefined && value.byteLength > 0);
  return reader;
}

async function drain(reader: ReadableStreamDefaultReader<Uint8Array>): Promise<void> {
  for (;;) {
    const { done } = await reader.read();
    if (done) return;
  }
}

describe("regressions found by the soak", () => {
  it(
    "a clear (DELETE /v2/cache) also stops a miss whose origin answer was still awaited",
    async () => {
      const store = new MemoryStore();
      const controller = new AbortController();
      const headers = gate();
      const app = appOver(store, { beforeHeaders: headers.wait }, controller.signal);
      try {
        const pending = app.request("/v2/images/a/file");
        await sleep(20); // The miss now waits for the origin's headers.
        const cleared = await app.request("/v2/cache", { method: "DELETE" });
        assert.equal(cleared.status, 204);
        headers.open();
        const { bytes } = await readBody(await pending);
        assert.equal(bytes.byteLength, IMAGE.byteLength);
        const after = await app.request("/v2/images/a/file");
        assert.notEqual(after.headers.get("cache-status"), "hono-image-cache; hit");
        await after.body?.cancel();
      } finally {
        controller.abort();
      }
    },
  );

  it(
    "a clear (DELETE /v2/cache) also stops a fill that another process has under way",
    async () => {
      await withTempDir(async (directory) => {
        const storeA = new FileSystemStore({ directory });
        const storeB = new FileSystemStore({ directory });
        const controller = new AbortController();
        const mid = gate();
        const appA = appOver(storeA, {}, controller.signal);
        const appB = appOver(storeB, { midBody: () => mid.wait });
        try {
          const reader = await firstChunk(await appB.request("/v2/images/a/file"));
          const cleared = await appA.request("/v2/cache", { method: "DELETE" });
          assert.equal(cleared.status, 204);
          mid.open();
          await drain(reader).catch(() => {});
          await sleep(50);
          const after = await appA.request("/v2/images/a/file");
          assert.notEqual(after.headers.get("cache-status"), "hono-image-cache; hit");
          await after.body?.cancel();
        } finally {
          mid.open();
          controller.abort();
          await storeA.close();
          await storeB.close();
        }
      });
    },
  );

  it(
    "after a DELETE in one process, another process lets no new request join its fill from before",
    async () => {
      await withTempDir(async (directory) => {
        const storeA = new FileSystemStore({ directory });
        const storeB = new FileSystemStore({ directory });
        const mid = gate();
        const appA = appOver(storeA, {});
        const appB = appOver(storeB, { midBody: () => mid.wait });
        try {
          const reader = await firstChunk(await appB.request("/v2/images/a/file"));
          const deleted = await appA.request("/v2/images/a", { method: "DELETE" });
          assert.equal(deleted.status, 204);
          const later = await appB.request("/v2/images/a/file");
          assert.notEqual(
            later.headers.get("cache-status"),
            "hono-image-cache; fwd=miss; collapsed",
          );
          mid.open();
          await readBody(later);
          await drain(reader).catch(() => {});
        } finally {
          mid.open();
          await storeA.close();
          await storeB.close();
        }
      });
    },
  );

  it(
    "a DELETE wins over a commit that another process completes while the DELETE runs",
    async () => {
      await withTempDir(async (directory) => {
        const storeA = new FileSystemStore({ directory });
        const storeB = new FileSystemStore({ directory });
        const mid = gate();
        // Process A's DELETE pauses between removing the entry and the rest.
        const removed = gate();
        const resume = gate();
        const slowA = new Proxy(storeA, {
          get(target, property) {
            const value = Reflect.get(target, property, target);
            if (property === "delete") {
              // Evict removes the lock first, then the entry: B commits in between.
              return async (id: string) => {
                removed.open();
                await resume.wait;
                return await target.delete(id);
              };
            }
            return typeof value === "function" ? value.bind(target) : value;
          },
        });
        const appA = appOver(slowA, {});
        const appB = appOver(storeB, { midBody: () => mid.wait });
        try {
          const reader = await firstChunk(await appB.request("/v2/images/a/file"));
          const deleting = appA.request("/v2/images/a", { method: "DELETE" });
          await removed.wait; // A removed B's lock; B now tries to commit.
          mid.open();
          await drain(reader);
          await sleep(50);
          resume.open();
          assert.equal((await deleting).status, 204);
          const after = await appA.request("/v2/images/a/file");
          assert.notEqual(after.headers.get("cache-status"), "hono-image-cache; hit");
          await after.body?.cancel();
        } finally {
          mid.open();
          resume.open();
          await storeA.close();
          await storeB.close();
        }
      });
    },
  );

  it(
    "a range served from a fill under way never ends cleanly when the fill fails verification",
    async () => {
      const store = new MemoryStore();
      const mid = gate();
      const corrupt = IMAGE.slice();
      corrupt[10] ^= 0xff; // The origin sends a wrong byte; its Content-MD5 is the true image's.
      const app = new Hono();
      app.use(imageCache({ store, onError: () => {} }));
      app.get("/v2/images/:id/file", (c) => {
        let step = 0;
        const body = new ReadableStream<Uint8Array>({
          async pull(controller) {
            if (step === 0) controller.enqueue(corrupt.slice(0, 1000));
            else if (step === 1) {
              await mid.wait;
              controller.enqueue(corrupt.slice(1000));
            } else controller.close();
            step++;
          },
        }, { highWaterMark: 0 });
        return c.body(body, 200, {
          "content-length": String(IMAGE.byteLength),
          "content-md5": hexDigest(IMAGE),
        });
      });
      try {
        const reader = await firstChunk(await app.request("/v2/images/a/file"));
        const ranged = await app.request("/v2/images/a/file", { headers: { range: "bytes=0-99" } });
        assert.equal(ranged.headers.get("cache-status"), "hono-image-cache; fwd=miss; collapsed");
        const reading = readBody(ranged);
        await sleep(20);
        mid.open();
        const { bytes, error } = await reading;
        await drain(reader).catch(() => {});
        // Either the body is the image's own bytes 0-99, or it fails visibly.
        const right = bytes.byteLength === 100 && bytes.every((b, i) => b === IMAGE[i]);
        assert.ok(right || error !== undefined, "a wrong range ended cleanly");
      } finally {
        mid.open();
      }
    },
  );

  it(
    "removes the metadata temp files a killed process left behind",
    async () => {
      await withTempDir(async (directory) => {
        // A pid above Linux's largest possible pid (2^22) belongs to no process.
        const dead = 2 ** 22 + 12345;
        const leftover = `abc.json.${dead}-7.tmp`;
        await writeFile(join(directory, leftover), "{");
        const store = new FileSystemStore({ directory });
        try {
          await store.list();
          await store.clean();
          assert.ok(!(await readdir(directory)).includes(leftover));
        } finally {
          await store.close();
        }
      });
    },
  );

  it("marks a passed-through fetch() answer (immutable headers) without a fault, on every runtime", async () => {
    // Found by the soak on Node: @hono/node-server's Response shared the fetch answer's
    // immutable Headers when copied, so the Cache-Status header threw ("immutable").
    const upstream = await startServer(() =>
      new Response("partial", { status: 206, headers: { "content-range": "bytes 0-6/100" } })
    );
    const errors: unknown[] = [];
    try {
      const app = new Hono();
      app.use(imageCache({ store: new MemoryStore(), onError: (error) => errors.push(error) }));
      app.get("/v2/images/:id/file", () => fetch(upstream.url));
      const res = await app.request("/v2/images/a/file", { headers: { range: "bytes=0-6" } });
      assert.equal(res.status, 206);
      assert.equal(res.headers.get("cache-status"), "hono-image-cache; fwd=miss; detail=range");
      assert.equal(await res.text(), "partial");
      assert.deepEqual(errors, []);
    } finally {
      await upstream.close();
    }
  });

  describe("a client trailing a fill when the store cannot read back what it wrote", () => {
    /** A fill of `image` with a trailing client whose first bytes left memory, reads failing. */
    async function trailing(
      origin: (c: Context, calls: number) => Response,
      options: { range?: string; fetchImage?: boolean } = {},
    ) {
      const store = new FaultyStore(new MemoryStore());
      const app = new Hono();
      let calls = 0;
      const errors: unknown[] = [];
      const fetchImage = options.fetchImage
        ? async (id: string) => await app.request(`/origin/${id}`)
        : undefined;
      const onError = (error: unknown) => errors.push(error);
      app.use("/v2/*", imageCache({ store, onError, fetchImage, fillOnRange: false }));
      const handler = (c: Context) => origin(c, ++calls);
      app.get("/v2/images/:id/file", handler);
      app.get("/origin/:id", handler);
      const first = await app.request("/v2/images/a/file");
      const headers: Record<string, string> = options.range ? { range: options.range } : {};
      const late = await app.request("/v2/images/a/file", { headers });
      return { store, first, late, calls: () => calls, errors };
    }
    const big = pattern(6 * 2 ** 20, 4);
    const good = (c: Context) =>
      c.body(slowStream(big, 64 * 1024), 200, {
        "content-length": String(big.byteLength),
        "content-md5": hexDigest(big),
      });

    it("gets every byte from the origin instead of a cut (finding 9)", async () => {
      const { store, first, late, calls } = await trailing(good);
      assert.equal(late.headers.get("cache-status"), "hono-image-cache; fwd=miss; collapsed");
      await readBody(first); // The fill is done; the trailing client has read nothing yet.
      store.faults.failRead = true; // Its first bytes are no longer in memory: EIO.
      const { bytes, error } = await readBody(late);
      assert.equal(error, undefined);
      assertBytes(bytes, big);
      assert.equal(calls(), 2, "the origin was asked once more, for this client");
    });

    /** A range joined to the fill, whose reads then fail: it must still get its bytes. */
    async function rescuedRange(origin: (c: Context) => Response, fetchImage?: boolean) {
      const trailed = await trailing(origin, { range: "bytes=100-199999", fetchImage });
      assert.equal(trailed.late.status, 206);
      await readBody(trailed.first);
      trailed.store.faults.failRead = true;
      const { bytes, error } = await readBody(trailed.late);
      assert.equal(error, undefined);
      assertBytes(bytes, big.subarray(100, 200_000));
      return trailed.calls();
    }

    it("a range joined to the fill gets its bytes from the origin too", async () => {
      await rescuedRange(good);
    });

    it("a range joined to the fill is rescued through fetchImage when its origin answers ranges", async () => {
      // Found by the cluster soak: the request's own origin answer was a 206, which cannot be
      // checked from byte 0, and the client was cut.
      const ranged = (c: Context) => {
        const range = /^bytes=(\d+)-(\d+)$/.exec(c.req.header("range") ?? "");
        if (range === null) return good(c);
        const [start, end] = [Number(range[1]), Number(range[2])];
        return c.body(big.slice(start, end + 1), 206, {
          "content-range": `bytes ${start}-${end}/${big.byteLength}`,
        });
      };
      const calls = await rescuedRange(ranged, true);
      assert.equal(calls, 2, "the whole image once more, through fetchImage");
    });

    it("is cut, never ends cleanly, and reported, when the origin's second answer is not the image", async () => {
      const { store, first, late, errors } = await trailing((c, calls) => {
        const body = calls === 1 ? big : big.slice();
        if (calls > 1) body[body.byteLength - 10] ^= 1;
        return c.body(slowStream(body, 64 * 1024), 200, {
          "content-length": String(big.byteLength),
          "content-md5": hexDigest(big),
        });
      });
      await readBody(first);
      store.faults.failRead = true;
      const { bytes, error } = await readBody(late);
      assert.match(String(error), /Checksum mismatch/);
      assert.ok(bytes.byteLength < big.byteLength, "the last byte was held back");
      // The fill itself succeeded: the cut is this client's alone, and onError says so.
      const cut = errors.map(String).filter((e) => e.includes("was cut at byte"));
      assert.equal(cut.length, 1);
      assert.match(cut[0], /A client of the fill of "a" was cut at byte \d+: .*Checksum mismatch/);
    });

    it("the client that started the fill is rescued through fetchImage", async () => {
      const store = new FaultyStore(new MemoryStore());
      const app = new Hono();
      let calls = 0;
      const fetchImage = async (id: string) => await app.request(`/origin/${id}`);
      app.use("/v2/*", imageCache({ store, onError: () => {}, fetchImage, fillOnRange: false }));
      app.get("/v2/images/:id/file", (c) => (calls++, good(c)));
      app.get("/origin/:id", (c) => (calls++, good(c)));
      // The first client reads nothing until a second, fast one has taken the fill to its end.
      const owner = await app.request("/v2/images/a/file");
      const fast = await app.request("/v2/images/a/file");
      await readBody(fast);
      store.faults.failRead = true;
      const { bytes, error } = await readBody(owner);
      assert.equal(error, undefined);
      assertBytes(bytes, big);
      assert.equal(calls, 2);
    });
  });

  it(
    "a process that starts on a directory over maxSize brings it back within maxSize",
    async () => {
      await withTempDir(async (directory) => {
        const maxSize = Math.floor(IMAGE.byteLength * 1.5);
        // Two processes fill one image each: neither sees the other's commit, so together
        // they go over maxSize (each resyncs its view of the directory every 30 s).
        const storeA = new FileSystemStore({ directory, maxSize });
        const storeB = new FileSystemStore({ directory, maxSize });
        const appA = appOver(storeA, {});
        const appB = appOver(storeB, {});
        await readBody(await appB.request("/v2/images/warm/file")); // B lists the directory now.
        await storeB.delete("warm");
        await readBody(await appA.request("/v2/images/a/file"));
        await readBody(await appB.request("/v2/images/b/file"));
        await storeA.close();
        await storeB.close();
        const size = async () => {
          let total = 0;
          for (const name of await readdir(directory)) {
            if (name === "a" || name === "b") total += IMAGE.byteLength;
          }
          return total;
        };
        assert.ok((await size()) > maxSize, "the setup did not go over maxSize");
        // A restarted process, with the cache in front of it, and no traffic.
        const restarted = new FileSystemStore({ directory, maxSize });
        appOver(restarted, {});
        try {
          const deadline = Date.now() + 3000;
          while ((await size()) > maxSize && Date.now() < deadline) await sleep(50);
          assert.ok((await size()) <= maxSize, "still over maxSize 3 s after the restart");
        } finally {
          await restarted.close();
        }
      });
    },
  );

  // The clear is stopped by its tombstone for every image alone: the miss takes its lock after.
  for (const [what, path] of [["a DELETE", "/v2/images/a"], ["a clear", "/v2/cache"]]) {
    it(`${what} in one process wins over a miss another process is still waiting on`, async () => {
      await withTempDir(async (directory) => {
        const storeA = new FileSystemStore({ directory });
        const storeB = new FileSystemStore({ directory });
        const headers = gate();
        const controller = new AbortController(); // (It stops the management API's prefetcher.)
        const appA = appOver(storeA, {}, controller.signal);
        const appB = appOver(storeB, { beforeHeaders: headers.wait });
        try {
          const pending = appB.request("/v2/images/a/file"); // B waits for the origin's headers.
          await sleep(20);
          const deleted = await appA.request(path, { method: "DELETE" });
          assert.equal(deleted.status, 204);
          headers.open();
          const { bytes } = await readBody(await pending);
          assert.equal(bytes.byteLength, IMAGE.byteLength);
          await sleep(50);
          assert.equal(await storeB.get("a"), undefined, "the miss from before did not commit");
          const after = await appA.request("/v2/images/a/file");
          assert.notEqual(after.headers.get("cache-status"), "hono-image-cache; hit");
          await after.body?.cancel();
        } finally {
          headers.open();
          controller.abort();
          await storeA.close();
          await storeB.close();
        }
      });
    });
  }

  it(
    "a range joined to a fill that then loses its store does not stall the fill nor its clients",
    async () => {
      const image = pattern(24 * 2 ** 20, 5);
      // The store fails after 1 MiB: the fill goes on without it, bounded by its slowest client.
      const store = new FaultyStore(new MemoryStore(), { faults: { failWriteAfter: 2 ** 20 } });
      const app = new Hono();
      app.use(imageCache({ store, onError: () => {} }));
      app.get(
        "/v2/images/:id/file",
        (c) =>
          c.body(slowStream(image, 64 * 1024), 200, {
            "content-length": String(image.byteLength),
            "content-md5": hexDigest(image),
          }),
      );
      const full = await app.request("/v2/images/a/file");
      const ranged = await app.request("/v2/images/a/file", { headers: { range: "bytes=0-99" } });
      assert.equal(ranged.headers.get("cache-status"), "hono-image-cache; fwd=miss; collapsed");
      // Read both; if nothing moves for 5 s, hang up (a stalled fill has nothing left to do).
      const readers = [full.body!.getReader(), ranged.body!.getReader()];
      const received = [0, 0];
      const failed = [false, false];
      let last = Date.now();
      const reading = readers.map(async (reader, i) => {
        try {
          for (;;) {
            const { done, value } = await reader.read();
            if (done) return;
            received[i] += value.byteLength;
            last = Date.now();
          }
        } catch {
          failed[i] = true;
        }
      });
      let stalled = false;
      const watch = (async () => {
        while (received[0] < image.byteLength && !failed[0]) {
          await sleep(100);
          if (Date.now() - last > 5000) {
            stalled = true;
            for (const reader of readers) await reader.cancel().catch(() => {});
            return;
          }
        }
      })();
      await Promise.all(reading);
      await watch;
      assert.ok(
        !stalled,
        `the fill and its clients stalled at ${received[0]} and ${received[1]} bytes`,
      );
      assert.equal(failed[0], false);
      assert.equal(received[0], image.byteLength);
      assert.ok(failed[1] || received[1] === 100);
    },
  );

  it(
    "a miss that starts in the millisecond a DELETE answered in is still cached",
    async () => {
      // Found by CI on Bun: the tombstone's millisecond equalled the next
      // request's, and the fill was refused as if the DELETE came after it.
      await withTempDir(async (directory) => {
        const store = new FileSystemStore({ directory });
        const app = appOver(store, {});
        try {
          for (let round = 0; round < 20; round++) {
            const deleted = await app.request("/v2/images/a", { method: "DELETE" });
            assert.equal(deleted.status, 204);
            assert.equal(await store.get("a"), undefined);
            const { bytes, error } = await readBody(await app.request("/v2/images/a/file"));
            assert.equal(error, undefined);
            assert.equal(bytes.byteLength, IMAGE.byteLength);
            assert.ok(await store.get("a"), `round ${round}: the miss after the DELETE is cached`);
          }
        } finally {
          await store.close();
        }
      });
    },
  );
});

/** The finding (as scripts/soak/report.ts's `KNOWN` names it). */
const LYING_LENGTH =
  "a Range joined to a fill trusts the Content-Length of an origin answer not yet proven by its body";

/** Open findings: their tests fail until fixed, and count once `RUN_OPEN_FINDINGS=1` is set. */
const openFinding = (finding: string) => process.env.RUN_OPEN_FINDINGS ? {} : { todo: finding };

describe("open findings of the soak", () => {
  it(
    "a Range joined to a fill states no length the origin has not proven",
    openFinding(LYING_LENGTH),
    async () => {
      // Node soak, seed 1455523737: an origin answer announces more bytes than it sends, and
      // its body then stands still (Node's fetch after the origin closed the connection). A
      // Range request joined to that fill got a 206 whose Content-Range total was that false
      // length. The origin alone answers the range with the image's real size.
      const image = pattern(64 * 1024, 12);
      const size = image.byteLength;
      let calls = 0;
      const app = new Hono();
      app.use(imageCache({ store: new MemoryStore(), onError: () => {}, originStallTimeout: 300 }));
      app.get("/v2/images/:id/file", (c) => {
        if (++calls === 1) {
          const body = new ReadableStream<Uint8Array>({ start: (ctl) => ctl.enqueue(image) });
          return c.body(body, 200, { "content-length": String(2 * size) });
        }
        const suffix = Number(/^bytes=-(\d+)$/.exec(c.req.header("range") ?? "")?.[1] ?? size);
        return c.body(image.slice(size - suffix), 206, {
          "content-range": `bytes ${size - suffix}-${size - 1}/${size}`,
        });
      });
      const first = await app.request("/v2/images/img/file");
      const ranged = await app.request("/v2/images/img/file", { headers: { range: "bytes=-100" } });
      try {
        assert.match(ranged.headers.get("content-range") ?? "", new RegExp(`/(${size}|\\*)$`));
      } finally {
        await ranged.body?.cancel();
        await first.body?.cancel();
        await sleep(400); // The fill fails on its stall timeout.
      }
    },
  );
});
