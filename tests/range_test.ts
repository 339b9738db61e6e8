import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { Hono } from "hono";
import { imageCache, MemoryStore } from "hono-image-cache";
import type { ImageCacheOptions, ImageStore } from "hono-image-cache";
import {
  assertBytes,
  hexDigest,
  pattern,
  readBody,
  readRest,
  sleep,
  STORES,
  waitFor,
  withStore,
} from "./_helpers.ts";

const PATH = "/v2/images/img/file";

/** An origin that serves `image` (full, or a single range) and counts its requests. */
function originFor(image: Uint8Array) {
  const requests: { method: string; range: string | null }[] = [];
  const handler = (request: Request): Response => {
    const range = request.headers.get("range");
    requests.push({ method: request.method, range });
    const headers: Record<string, string> = {
      "content-type": "application/x-qcow2",
      "content-md5": hexDigest(image),
    };
    const match = /^bytes=(\d+)-(\d*)$/.exec(range ?? "");
    if (match !== null && Number(match[1]) < image.byteLength) {
      const start = Number(match[1]);
      const end = match[2] === ""
        ? image.byteLength - 1
        : Math.min(Number(match[2]), image.byteLength - 1);
      return new Response(image.slice(start, end + 1), {
        status: 206,
        headers: {
          ...headers,
          "content-length": String(end - start + 1),
          "content-range": `bytes ${start}-${end}/${image.byteLength}`,
        },
      });
    }
    return new Response(image.slice(), {
      headers: { ...headers, "content-length": String(image.byteLength) },
    });
  };
  return { handler, requests };
}

/** The cache in front of an origin serving `image`, with the image already cached. */
async function cached(
  store: ImageStore,
  image: Uint8Array,
  options: Partial<ImageCacheOptions> = {},
) {
  const origin = originFor(image);
  const app = new Hono();
  app.use(imageCache({ store, onError: (e) => assert.fail(String(e)), ...options }));
  app.get("/v2/images/:id/file", (c) => origin.handler(c.req.raw));
  const miss = await app.request(PATH);
  assert.equal(miss.status, 200);
  assertBytes((await readBody(miss)).bytes, image);
  assert.ok(await store.get("img"), "the image is cached");
  return { app, origin };
}

/** Splits a `multipart/byteranges` body, checking its framing byte for byte (RFC 9110 §14.6). */
function parseMultipart(body: Uint8Array, boundary: string) {
  const text = Buffer.from(body).toString("latin1");
  const parts: { contentType: string; contentRange: string; bytes: Uint8Array }[] = [];
  let at = 0;
  const expect = (literal: string) => {
    assert.equal(text.slice(at, at + literal.length), literal, `framing at byte ${at}`);
    at += literal.length;
  };
  expect(`--${boundary}`);
  for (let i = 0; i < 1000; i++) {
    if (text.startsWith("--\r\n", at)) {
      at += 4;
      assert.equal(at, text.length, "nothing after the closing delimiter");
      return parts;
    }
    expect("\r\n");
    const headEnd = text.indexOf("\r\n\r\n", at);
    assert.ok(headEnd > 0, "part headers end");
    const headers = new Headers();
    for (const line of text.slice(at, headEnd).split("\r\n")) {
      const colon = line.indexOf(":");
      headers.set(line.slice(0, colon), line.slice(colon + 1).trim());
    }
    at = headEnd + 4;
    const contentRange = headers.get("content-range") ?? "";
    const match = /^bytes (\d+)-(\d+)\/\d+$/.exec(contentRange);
    assert.ok(match, `part Content-Range ${contentRange}`);
    const length = Number(match[2]) - Number(match[1]) + 1;
    parts.push({
      contentType: headers.get("content-type") ?? "",
      contentRange,
      bytes: body.slice(at, at + length),
    });
    at += length;
    expect(`\r\n--${boundary}`);
  }
  throw new Error("Too many parts");
}

type Expect =
  | { full: true }
  | { unsatisfiable: true }
  | { single: [number, number] }
  | { multipart: [number, number][] };

type Row = [range: string, expect: Expect];

/** Checks status, Content-Range, Content-Length and the exact bytes of a ranged answer. */
async function checkAnswer(res: Response, expect: Expect, image: Uint8Array, label: string) {
  const size = image.byteLength;
  const { bytes, error } = await readBody(res);
  assert.equal(error, undefined, label);
  assert.equal(res.headers.get("cache-status"), "hono-image-cache; hit", label);
  assert.equal(res.headers.get("content-length"), String(bytes.byteLength), label);
  if ("full" in expect) {
    assert.equal(res.status, 200, label);
    assert.equal(res.headers.get("content-range"), null, label);
    assertBytes(bytes, image, label);
  } else if ("unsatisfiable" in expect) {
    assert.equal(res.status, 416, label);
    assert.equal(res.headers.get("content-range"), `bytes */${size}`, label);
  } else if ("single" in expect) {
    const [start, end] = expect.single;
    assert.equal(res.status, 206, label);
    assert.equal(res.headers.get("content-range"), `bytes ${start}-${end}/${size}`, label);
    assert.equal(res.headers.get("content-length"), String(end - start + 1), label);
    assert.equal(res.headers.get("content-md5"), null, `${label}: no digest of the whole image`);
    assert.match(res.headers.get("etag") ?? "", /^"md5-/, label);
    assertBytes(bytes, image.slice(start, end + 1), label);
  } else {
    assert.equal(res.status, 206, label);
    assert.equal(res.headers.get("content-range"), null, label);
    assert.equal(res.headers.get("content-md5"), null, label);
    const type = res.headers.get("content-type") ?? "";
    const boundary = /^multipart\/byteranges; boundary=(.+)$/.exec(type)?.[1];
    assert.ok(boundary, `${label}: ${type}`);
    const parts = parseMultipart(bytes, boundary);
    assert.equal(parts.length, expect.multipart.length, label);
    expect.multipart.forEach(([start, end], i) => {
      assert.equal(parts[i].contentType, "application/x-qcow2", label);
      assert.equal(parts[i].contentRange, `bytes ${start}-${end}/${size}`, label);
      assertBytes(parts[i].bytes, image.slice(start, end + 1), `${label} part ${i}`);
    });
  }
}

const S = 10_000;
const many = (n: number, step: number) =>
  Array.from({ length: n }, (_, i) => `${i * step}-${i * step + 1}`).join(",");

/** RFC 9110 §14.1.2 examples (a 10000-byte representation) and edge cases. */
const ROWS_10000: Row[] = [
  ["bytes=0-499", { single: [0, 499] }], // the first 500 bytes
  ["bytes=500-999", { single: [500, 999] }], // the second 500 bytes
  ["bytes=-500", { single: [9500, 9999] }], // the final 500 bytes
  ["bytes=9500-", { single: [9500, 9999] }], // the final 500 bytes
  ["bytes=0-0,-1", { multipart: [[0, 0], [9999, 9999]] }], // the first and last bytes only
  ["bytes=500-600,601-999", { single: [500, 999] }], // non-canonical second 500: coalesced
  ["bytes=500-700,601-999", { single: [500, 999] }], // overlapping second 500: coalesced
  ["bytes=0-0", { single: [0, 0] }],
  ["bytes=9999-9999", { single: [9999, 9999] }],
  ["bytes=9999-", { single: [9999, 9999] }],
  ["bytes=-1", { single: [9999, 9999] }],
  ["bytes=0-9999", { single: [0, 9999] }],
  ["bytes=0-", { single: [0, 9999] }],
  ["bytes=-10000", { single: [0, 9999] }],
  ["bytes=-20000", { single: [0, 9999] }], // a suffix longer than the image: all of it
  ["bytes=9000-20000", { single: [9000, 9999] }], // an overrun is clamped
  ["bytes=0-99999999999999999999999", { single: [0, 9999] }],
  ["bytes=007-009", { single: [7, 9] }],
  ["Bytes=3-5", { single: [3, 5] }], // the unit is case-insensitive
  ["bytes=10000-", { unsatisfiable: true }],
  ["bytes=10000-10005", { unsatisfiable: true }],
  ["bytes=99999999999999999999-", { unsatisfiable: true }],
  ["bytes=-0", { unsatisfiable: true }],
  ["bytes=-0,10000-", { unsatisfiable: true }],
  ["bytes=0-99,10000-", { single: [0, 99] }], // unsatisfiable specs are dropped
  ["bytes=0-99,200-299", { multipart: [[0, 99], [200, 299]] }],
  ["bytes=200-299,0-99", { multipart: [[200, 299], [0, 99]] }], // the request's order
  ["bytes=0-99,50-149,400-499", { multipart: [[0, 149], [400, 499]] }],
  ["bytes=400-499,0-99,50-149", { multipart: [[0, 149], [400, 499]] }], // merged: sorted
  ["bytes=0-1,1-2,2-3,3-4,0-4", { single: [0, 4] }],
  ["bytes=0-5 , 7-9", { multipart: [[0, 5], [7, 9]] }], // OWS around the comma
  ["bytes=0-5,\t7-9", { multipart: [[0, 5], [7, 9]] }],
  ["bytes= 0-5", { single: [0, 5] }], // OWS before a spec
  ["bytes=,0-5,", { single: [0, 5] }], // empty list elements are ignored
  [`bytes=${many(64, 10)}`, {
    multipart: Array.from({ length: 64 }, (_, i) => [i * 10, i * 10 + 1]),
  }],
  [`bytes=${many(65, 10)}`, { full: true }], // past 64 ranges: ignored
  [`bytes=${Array(65).fill("0-9999").join(",")}`, { full: true }],
  ["bytes=5-3", { full: true }], // invalid: last < first
  ["bytes=abc", { full: true }],
  ["bytes=0-5,abc", { full: true }],
  ["bytes=1-2-3", { full: true }],
  ["bytes=--1", { full: true }],
  ["bytes=-", { full: true }],
  ["bytes=0x10-20", { full: true }],
  ["bytes=1.5-3", { full: true }],
  ["bytes=0 -5", { full: true }], // whitespace inside a spec
  ["bytes = 0-5", { full: true }], // whitespace around "="
  ["bytes 0-5", { full: true }],
  ["bytes=", { full: true }],
  ["bytes=,", { full: true }],
  ["items=0-5", { full: true }], // a unit the cache does not know
  ["none", { full: true }],
  ["", { full: true }],
];

const ROWS_ONE: Row[] = [
  ["bytes=0-0", { single: [0, 0] }],
  ["bytes=0-", { single: [0, 0] }],
  ["bytes=-1", { single: [0, 0] }],
  ["bytes=-5", { single: [0, 0] }],
  ["bytes=0-5", { single: [0, 0] }],
  ["bytes=0-0,0-0", { single: [0, 0] }],
  ["bytes=1-", { unsatisfiable: true }],
  ["bytes=1-1", { unsatisfiable: true }],
  ["bytes=-0", { unsatisfiable: true }],
];

/** A zero-length image ignores Range (RFC 9110 §14.2): 200 and no bytes. */
const ROWS_EMPTY: Row[] = [
  ["bytes=0-0", { full: true }],
  ["bytes=0-", { full: true }],
  ["bytes=-1", { full: true }],
  ["bytes=-0", { full: true }],
];

for (const [storeName, make] of STORES) {
  describe(`Range on a cached image (${storeName})`, () => {
    for (const [size, rows] of [[S, ROWS_10000], [1, ROWS_ONE], [0, ROWS_EMPTY]] as const) {
      it(
        `answers ${rows.length} ranges of a ${size}-byte image from the store without the origin`,
        withStore(make, async (store) => {
          const image = pattern(size, 11);
          const { app, origin } = await cached(store, image);
          for (const [range, expect] of rows) {
            const res = await app.request(PATH, { headers: { range } });
            await checkAnswer(res, expect, image, `${size} bytes, Range: ${JSON.stringify(range)}`);
          }
          assert.equal(origin.requests.length, 1, "only the first miss reached the origin");
          assert.equal((await store.get("img"))?.hits, rows.length, "one hit per request");
        }),
      );
    }

    it(
      "applies If-Range: a strong ETag or the exact Last-Modified gives 206, anything else 200",
      withStore(make, async (store) => {
        const image = pattern(S, 12);
        const { app } = await cached(store, image);
        const hit = await app.request(PATH);
        await hit.body?.cancel();
        const etag = hit.headers.get("etag") ?? "";
        const lastModified = hit.headers.get("last-modified") ?? "";
        const earlier = new Date(Date.parse(lastModified) - 1000).toUTCString();
        const rows: [string, Expect][] = [
          [etag, { single: [3, 5] }],
          [` ${etag} `, { single: [3, 5] }],
          [lastModified, { single: [3, 5] }],
          [`W/${etag}`, { full: true }], // a weak tag never matches
          ['"md5-00000000000000000000000000000000"', { full: true }],
          [earlier, { full: true }],
          [`${etag}, ${etag}`, { full: true }],
          ["garbage", { full: true }],
          ["", { full: true }],
        ];
        for (const [ifRange, expect] of rows) {
          const res = await app.request(PATH, {
            headers: { range: "bytes=3-5", "if-range": ifRange },
          });
          await checkAnswer(res, expect, image, `If-Range: ${JSON.stringify(ifRange)}`);
        }
      }),
    );
  });
}

/**
 * An origin whose body the test releases chunk by chunk: `push(n)` sends
 * the next `n` bytes, `end()` closes the body.
 */
function controlledOrigin(image: Uint8Array, md5 = hexDigest(image)) {
  let controller!: ReadableStreamDefaultController<Uint8Array>;
  let sent = 0;
  let fullRequests = 0;
  const rangeRequests: string[] = [];
  const handler = (request: Request) => {
    const range = request.headers.get("range");
    if (range !== null) {
      rangeRequests.push(range);
      const m = /^bytes=(\d+)-(\d+)$/.exec(range);
      if (m === null) return new Response("unexpected range", { status: 500 });
      const [start, end] = [Number(m[1]), Number(m[2])];
      return new Response(image.slice(start, end + 1), {
        status: 206,
        headers: { "content-range": `bytes ${start}-${end}/${image.byteLength}` },
      });
    }
    fullRequests++;
    const body = new ReadableStream<Uint8Array>({ start: (c) => void (controller = c) });
    return new Response(body, {
      headers: { "content-length": String(image.byteLength), "content-md5": md5 },
    });
  };
  return {
    handler,
    rangeRequests,
    fullRequests: () => fullRequests,
    push(n: number) {
      controller.enqueue(image.slice(sent, sent + n));
      sent += n;
    },
    end: () => controller.close(),
    sent: () => sent,
  };
}

/** Reads from `reader` until `n` bytes came, with a deadline. */
async function readAtLeast(reader: ReadableStreamDefaultReader<Uint8Array>, n: number) {
  const parts: Uint8Array[] = [];
  let length = 0;
  while (length < n) {
    const next = await Promise.race([reader.read(), sleep(5000).then(() => "timeout" as const)]);
    if (next === "timeout") throw new Error(`Only ${length} of ${n} bytes came in time`);
    if (next.done) break;
    parts.push(next.value);
    length += next.value.byteLength;
  }
  return Buffer.concat(parts);
}

describe("Range on an image being filled", () => {
  const image = pattern(300_000, 21);

  function fillingApp(
    store: ImageStore,
    origin: ReturnType<typeof controlledOrigin>,
    options = {},
  ) {
    const app = new Hono();
    app.use(imageCache({ store, onError: () => {}, ...options }));
    app.get("/v2/images/:id/file", (c) => origin.handler(c.req.raw));
    return app;
  }

  for (const [storeName, make] of STORES) {
    it(
      `serves a range of a running fill as soon as its bytes are in (${storeName})`,
      withStore(make, async (store) => {
        const origin = controlledOrigin(image);
        const app = fillingApp(store, origin);
        const first = await app.request(PATH);
        origin.push(100_000);
        const firstReader = first.body!.getReader();
        await readAtLeast(firstReader, 50_000);

        const res = await app.request(PATH, { headers: { range: "bytes=1000-49999" } });
        assert.equal(res.status, 206);
        assert.equal(res.headers.get("cache-status"), "hono-image-cache; fwd=miss; collapsed");
        assert.equal(res.headers.get("content-range"), `bytes 1000-49999/${image.byteLength}`);
        assert.equal(res.headers.get("content-length"), "49000");
        assert.equal(res.headers.get("content-md5"), null);
        const rangeReader = res.body!.getReader();
        const head = await readAtLeast(rangeReader, 48_999);
        assertBytes(head, image.slice(1000, 49_999));
        assert.equal(origin.sent(), 100_000, "served before the origin sent the rest");

        const multi = await app.request(PATH, { headers: { range: "bytes=0-9,-10" } });
        assert.equal(multi.status, 206);
        assert.match(multi.headers.get("content-type") ?? "", /^multipart\/byteranges; boundary=/);
        const multiBody = readBody(multi);

        // The range's last byte waits for verification (invariant 1).
        origin.push(image.byteLength - 100_000);
        origin.end();
        const { bytes: tail, error } = await readRest(rangeReader);
        assert.equal(error, undefined);
        assertBytes(Buffer.concat([head, tail]), image.slice(1000, 50_000));
        await readAtLeast(firstReader, image.byteLength); // drains the first client to its end
        const { bytes: multiBytes, error: multiError } = await multiBody;
        assert.equal(multiError, undefined);
        assert.equal(multiBytes.byteLength, Number(multi.headers.get("content-length")));
        assert.equal(origin.fullRequests(), 1);
        assert.equal(origin.rangeRequests.length, 0);
        await waitFor(async () => (await store.get("img")) !== undefined);
      }),
    );
  }

  it(
    "holds back the last byte of a range until the fill is verified",
    withStore(() => new MemoryStore(), async (store) => {
      const origin = controlledOrigin(image);
      const app = fillingApp(store, origin);
      const first = await app.request(PATH);
      origin.push(image.byteLength); // every byte sent, the body not yet ended
      const res = await app.request(PATH, { headers: { range: "bytes=-10" } });
      assert.equal(res.status, 206);
      assert.equal(res.headers.get("content-range"), `bytes 299990-299999/${image.byteLength}`);
      const reader = res.body!.getReader();
      const head = await readAtLeast(reader, 9);
      assert.equal(head.byteLength, 9);
      const pending = reader.read();
      const early = await Promise.race([pending, sleep(100).then(() => "waiting")]);
      assert.equal(early, "waiting", "the last byte waits for verification");
      origin.end();
      const last = await pending;
      assert.equal(last.done, false);
      assertBytes(Buffer.concat([head, last.value!]), image.slice(299_990));
      assert.equal((await reader.read()).done, true);
      await first.body?.cancel();
    }),
  );

  it(
    "cuts a range of a fill whose digest does not match",
    withStore(() => new MemoryStore(), async (store) => {
      const origin = controlledOrigin(image, "0".repeat(32));
      const app = fillingApp(store, origin);
      const first = await app.request(PATH);
      origin.push(1000);
      const res = await app.request(PATH, { headers: { range: "bytes=299000-" } });
      assert.equal(res.status, 206);
      const body = readBody(res);
      origin.push(image.byteLength - 1000);
      origin.end();
      const { bytes, error } = await body;
      assert.ok(error, "the connection is cut");
      assert.ok(bytes.byteLength < 1000, "never a clean end of an unverified range");
      await first.body?.cancel();
      assert.equal(await store.get("img"), undefined);
    }),
  );

  it(
    "sends a range starting more than 16 MiB beyond the fill position to the origin",
    withStore(() => new MemoryStore(), async (store) => {
      const big = new Uint8Array(20 * 2 ** 20);
      big.set(pattern(64 * 1024, 5), big.byteLength - 64 * 1024);
      const origin = controlledOrigin(big);
      const app = fillingApp(store, origin, { completeOnAbort: false });
      const first = await app.request(PATH);
      origin.push(65_536);
      const far = `bytes=${big.byteLength - 1000}-${big.byteLength - 1}`;
      const res = await app.request(PATH, { headers: { range: far } });
      assert.equal(res.status, 206);
      assert.equal(res.headers.get("cache-status"), "hono-image-cache; fwd=miss; detail=range");
      assertBytes((await readBody(res)).bytes, big.slice(big.byteLength - 1000));
      assert.deepEqual(origin.rangeRequests, [far]);

      const near = await app.request(PATH, { headers: { range: "bytes=100000-100099" } });
      assert.equal(near.headers.get("cache-status"), "hono-image-cache; fwd=miss; collapsed");
      await near.body?.cancel();
      await first.body?.cancel(); // the last client leaves: the fill stops
    }),
  );

  it(
    "asks authorize before serving a range of a fill",
    withStore(() => new MemoryStore(), async (store) => {
      const origin = controlledOrigin(image);
      const app = fillingApp(store, origin, {
        authorize: (c: { req: { header(name: string): string | undefined } }) =>
          c.req.header("x-user") !== "mallory",
      });
      const first = await app.request(PATH);
      origin.push(10_000);
      const res = await app.request(PATH, {
        headers: { range: "bytes=0-9", "x-user": "mallory" },
      });
      assert.equal(res.status, 403);
      assert.equal(res.headers.get("cache-status"), "hono-image-cache; detail=forbidden");
      await res.body?.cancel();
      origin.push(image.byteLength - 10_000);
      origin.end();
      await readBody(first);
    }),
  );

  it(
    "answers 416 from the fill's announced length, and sends conditional requests to the origin",
    withStore(() => new MemoryStore(), async (store) => {
      const origin = controlledOrigin(image);
      const app = fillingApp(store, origin);
      const first = await app.request(PATH);
      origin.push(10_000);
      const res = await app.request(PATH, { headers: { range: "bytes=300000-" } });
      assert.equal(res.status, 416);
      assert.equal(res.headers.get("content-range"), `bytes */${image.byteLength}`);
      assert.equal(res.headers.get("cache-status"), "hono-image-cache; fwd=miss; collapsed");
      await res.body?.cancel();
      const conditional = await app.request(PATH, {
        headers: { range: "bytes=0-9", "if-range": '"abc"' },
      });
      assert.equal(
        conditional.headers.get("cache-status"),
        "hono-image-cache; fwd=miss; detail=conditional",
      );
      assert.deepEqual(origin.rangeRequests, ["bytes=0-9"]);
      await conditional.body?.cancel();
      origin.push(image.byteLength - 10_000);
      origin.end();
      await readBody(first);
    }),
  );
});

describe("Range on an uncached image", () => {
  const image = pattern(100_000, 31);

  /** The cache in front of an origin app; `fetch: true` hands the cache a fetchImage. */
  function setup(
    store: ImageStore,
    options: Partial<ImageCacheOptions> & { fetch?: boolean } = {},
  ) {
    const origin = originFor(image);
    const fetched: string[] = [];
    const originApp = new Hono();
    originApp.get(
      "/v2/images/:id/file",
      (c) => c.req.param("id") === "img" ? origin.handler(c.req.raw) : c.text("Not found", 404),
    );
    const fetchImage = (id: string, signal: AbortSignal) => {
      fetched.push(id);
      return Promise.resolve(originApp.request(`/v2/images/${id}/file`, { signal }));
    };
    const { fetch, ...rest } = options;
    const app = new Hono();
    app.use(imageCache({
      store,
      onError: (e) => assert.fail(String(e)),
      ...(fetch ? { fetchImage } : {}),
      ...rest,
    }));
    app.route("/", originApp);
    return { app, origin, fetched };
  }

  it(
    "passes a range miss to the origin and stores nothing",
    withStore(() => new MemoryStore(), async (store) => {
      const { app, origin } = setup(store);
      const res = await app.request(PATH, { headers: { range: "bytes=10-19" } });
      assert.equal(res.status, 206);
      assert.equal(res.headers.get("content-range"), "bytes 10-19/100000");
      assert.equal(res.headers.get("cache-status"), "hono-image-cache; fwd=miss; detail=range");
      assertBytes((await readBody(res)).bytes, image.slice(10, 20));
      assert.deepEqual(origin.requests, [{ method: "GET", range: "bytes=10-19" }]);
      await sleep(20);
      assert.equal(await store.get("img"), undefined);
      assert.deepEqual(await store.list(), []);
    }),
  );

  for (const [storeName, make] of STORES) {
    it(
      `starts a background fill through fetchImage so the next request hits (${storeName})`,
      withStore(make, async (store) => {
        const { app, origin, fetched } = setup(store, { fetch: true });
        const res = await app.request(PATH, { headers: { range: "bytes=99900-" } });
        assert.equal(res.status, 206);
        assert.equal(res.headers.get("cache-status"), "hono-image-cache; fwd=miss; detail=range");
        assertBytes((await readBody(res)).bytes, image.slice(-100));
        await waitFor(async () => (await store.get("img")) !== undefined);
        assert.deepEqual(fetched, ["img"]);
        const hit = await app.request(PATH, { headers: { range: "bytes=0-9" } });
        assert.equal(hit.headers.get("cache-status"), "hono-image-cache; hit");
        assertBytes((await readBody(hit)).bytes, image.slice(0, 10));
        assert.deepEqual(origin.requests, [
          { method: "GET", range: "bytes=99900-" },
          { method: "GET", range: null },
        ]);
      }),
    );
  }

  it(
    "starts no background fill with fillOnRange: false, nor when the origin does not have the image",
    withStore(() => new MemoryStore(), async (store) => {
      const off = setup(store, { fetch: true, fillOnRange: false });
      const res = await off.app.request(PATH, { headers: { range: "bytes=0-9" } });
      assert.equal(res.status, 206);
      await res.body?.cancel();
      const on = setup(new MemoryStore(), { fetch: true });
      const missing = await on.app.request("/v2/images/nope/file", {
        headers: { range: "bytes=0-9" },
      });
      assert.equal(missing.status, 404);
      await missing.body?.cancel();
      await sleep(50);
      assert.deepEqual(off.fetched, []);
      assert.deepEqual(on.fetched, []);
      assert.equal(await store.get("img"), undefined);
    }),
  );

  it("rejects fillOnRange without fetchImage and a fetchImage that is not a function", () => {
    const store = new MemoryStore();
    assert.throws(() => imageCache({ store, fillOnRange: true }), {
      name: "TypeError",
      message: /"fillOnRange" needs "fetchImage"/,
    });
    assert.throws(() => imageCache({ store, fetchImage: "http://origin" as never }), {
      name: "TypeError",
      message: 'Cannot create imageCache: "fetchImage" must be a function, received string',
    });
    assert.throws(() => imageCache({ store, fillOnRange: "yes" as never }), TypeError);
  });
});
