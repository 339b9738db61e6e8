import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { Hono } from "hono";
import { imageCache, MemoryStore } from "hono-image-cache";
import type { ImageCacheOptions, ImageStore } from "hono-image-cache";
import { FaultyStore } from "hono-image-cache/testing";
import { assertBytes, hexDigest, pattern, readBody, STORES, withStore } from "./_helpers.ts";

const PATH = "/v2/images/img/file";
const IMAGE = pattern(5000, 41);

/** The cache with `IMAGE` already cached; returns its validators as a hit sends them. */
async function cached(store: ImageStore, options: Partial<ImageCacheOptions> = {}) {
  let originRequests = 0;
  const app = new Hono();
  app.use(imageCache({ store, onError: (e) => assert.fail(String(e)), ...options }));
  app.get("/v2/images/:id/file", () => {
    originRequests++;
    return new Response(IMAGE.slice(), {
      headers: {
        "content-type": "application/x-qcow2",
        "content-length": String(IMAGE.byteLength),
        "content-md5": hexDigest(IMAGE),
      },
    });
  });
  assertBytes((await readBody(await app.request(PATH))).bytes, IMAGE);
  const hit = await app.request(PATH);
  await hit.body?.cancel();
  const etag = hit.headers.get("etag") ?? "";
  const lastModified = hit.headers.get("last-modified") ?? "";
  assert.match(etag, /^"md5-[0-9a-f]{32}"$/);
  return { app, etag, lastModified, originRequests: () => originRequests };
}

const LONG_DAYS = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];

/** The obsolete RFC 850 form of a date: `Sunday, 06-Nov-94 08:49:37 GMT`. */
function rfc850(ms: number): string {
  const d = new Date(ms);
  const [, day, month, year, time] = d.toUTCString().split(" ");
  return `${LONG_DAYS[d.getUTCDay()]}, ${day}-${month}-${year.slice(2)} ${time} GMT`;
}

/** The asctime form of a date: `Sun Nov  6 08:49:37 1994`. */
function asctime(ms: number): string {
  const d = new Date(ms);
  const [weekday, day, month, year, time] = d.toUTCString().split(" ");
  return `${weekday.slice(0, 3)} ${month} ${String(Number(day)).padStart(2, " ")} ${time} ${year}`;
}

/** The two-digit form of the year `ahead` years from now. */
function yy(ahead: number): string {
  return String((new Date().getUTCFullYear() + ahead) % 100).padStart(2, "0");
}

type Row = [label: string, headers: Record<string, string>, status: 200 | 206 | 304 | 412];

/** RFC 9110 §13.1 and the evaluation order of §13.2.2, for a GET. */
function rows(etag: string, lastModified: string): Row[] {
  const lm = Date.parse(lastModified);
  const before = new Date(lm - 1000).toUTCString();
  const after = new Date(lm + 1000).toUTCString();
  const other = '"md5-00000000000000000000000000000000"';
  return [
    ["If-None-Match with the ETag", { "if-none-match": etag }, 304],
    ["If-None-Match with the weak form of the ETag", { "if-none-match": `W/${etag}` }, 304],
    ["If-None-Match: *", { "if-none-match": "*" }, 304],
    ["If-None-Match with a list holding the ETag", { "if-none-match": `"a", ${etag}` }, 304],
    ["If-None-Match with a messy list", { "if-none-match": `"a",W/"b" ,  ${etag}` }, 304],
    ["If-None-Match with other tags", { "if-none-match": `"a", ${other}` }, 200],
    ["If-None-Match with an unquoted tag", { "if-none-match": etag.slice(1, -1) }, 200],
    ["If-None-Match that is garbage", { "if-none-match": "garbage" }, 200],
    ["If-Modified-Since the Last-Modified", { "if-modified-since": lastModified }, 304],
    ["If-Modified-Since a later date", { "if-modified-since": after }, 304],
    ["If-Modified-Since an earlier date", { "if-modified-since": before }, 200],
    ["If-Modified-Since in RFC 850 form", { "if-modified-since": rfc850(lm) }, 304],
    ["If-Modified-Since in asctime form", { "if-modified-since": asctime(lm) }, 304],
    ["If-Modified-Since an earlier asctime", { "if-modified-since": asctime(lm - 1000) }, 200],
    ["If-Modified-Since that is garbage", { "if-modified-since": "yesterday" }, 200],
    ["If-Modified-Since an impossible date", {
      "if-modified-since": "Mon, 31 Feb 2099 00:00:00 GMT",
    }, 200],
    ["If-Modified-Since at hour 25", { "if-modified-since": "Thu, 01 Jan 2099 25:00:00 GMT" }, 200],
    [
      "If-Modified-Since, RFC 850 year less than 50 years ahead: this century",
      { "if-modified-since": `Monday, 01-Jan-${yy(10)} 00:00:00 GMT` },
      304,
    ],
    [
      "If-Modified-Since, RFC 850 year more than 50 years ahead: the past century",
      { "if-modified-since": `Monday, 01-Jan-${yy(60)} 00:00:00 GMT` },
      200,
    ],
    ["If-Modified-Since in lower case", { "if-modified-since": lastModified.toLowerCase() }, 200],
    ["If-Modified-Since with two dates", { "if-modified-since": `${after}, ${after}` }, 200],
    [
      "If-Modified-Since ignored beside If-None-Match",
      { "if-none-match": other, "if-modified-since": after },
      200,
    ],
    [
      "If-None-Match decides before If-Modified-Since",
      { "if-none-match": etag, "if-modified-since": before },
      304,
    ],
    ["If-Match with the ETag", { "if-match": etag }, 200],
    ["If-Match: *", { "if-match": "*" }, 200],
    ["If-Match with a list holding the ETag", { "if-match": `${other}, ${etag}` }, 200],
    ["If-Match with the weak form (strong comparison)", { "if-match": `W/${etag}` }, 412],
    ["If-Match with another tag", { "if-match": other }, 412],
    ["If-Match that is garbage", { "if-match": "garbage" }, 412],
    ["If-Unmodified-Since the Last-Modified", { "if-unmodified-since": lastModified }, 200],
    ["If-Unmodified-Since a later date", { "if-unmodified-since": after }, 200],
    ["If-Unmodified-Since an earlier date", { "if-unmodified-since": before }, 412],
    [
      "If-Unmodified-Since an earlier RFC 850 date",
      { "if-unmodified-since": rfc850(lm - 1000) },
      412,
    ],
    ["If-Unmodified-Since that is garbage", { "if-unmodified-since": "garbage" }, 200],
    [
      "If-Unmodified-Since ignored beside If-Match",
      { "if-match": etag, "if-unmodified-since": before },
      200,
    ],
    ["If-Match decides before If-None-Match", { "if-match": other, "if-none-match": etag }, 412],
    [
      "If-Unmodified-Since decides before If-None-Match",
      { "if-unmodified-since": before, "if-none-match": etag },
      412,
    ],
    ["If-Match passing, If-None-Match failing", { "if-match": etag, "if-none-match": etag }, 304],
    ["preconditions before Range: 304", { "if-none-match": etag, range: "bytes=0-0" }, 304],
    ["preconditions before Range: 412", { "if-match": other, range: "bytes=0-0" }, 412],
    ["preconditions passing, then Range", { "if-none-match": other, range: "bytes=0-0" }, 206],
  ];
}

/** Checks a conditional answer: status, the headers RFC 9110 §15.4.5 keeps on a 304, no body. */
async function checkAnswer(res: Response, status: number, etag: string, label: string) {
  const { bytes } = await readBody(res);
  assert.equal(res.status, status, label);
  assert.equal(res.headers.get("cache-status"), "hono-image-cache; hit", label);
  if (status === 304) {
    assert.equal(bytes.byteLength, 0, label);
    assert.equal(res.headers.get("etag"), etag, label);
    for (const name of ["content-type", "content-md5", "content-range", "last-modified"]) {
      assert.equal(res.headers.get(name), null, `${label}: no ${name} on a 304`);
    }
    const length = res.headers.get("content-length");
    assert.ok(length === null || length === String(IMAGE.byteLength), label);
  } else if (status === 412) {
    assert.equal(res.headers.get("content-length"), String(bytes.byteLength), label);
    assert.equal(res.headers.get("content-md5"), null, label);
  } else if (status === 200) {
    assertBytes(bytes, IMAGE, label);
  } else {
    assert.equal(res.headers.get("content-range"), `bytes 0-0/${IMAGE.byteLength}`, label);
    assertBytes(bytes, IMAGE.slice(0, 1), label);
  }
}

for (const [storeName, make] of STORES) {
  describe(`Conditional requests on a cached image (${storeName})`, () => {
    it(
      "evaluates If-Match, If-Unmodified-Since, If-None-Match and If-Modified-Since in RFC 9110 order",
      withStore(make, async (store) => {
        const { app, etag, lastModified, originRequests } = await cached(store);
        const table = rows(etag, lastModified);
        for (const [label, headers, status] of table) {
          const res = await app.request(PATH, { headers });
          await checkAnswer(res, status, etag, label);
        }
        assert.equal(originRequests(), 1, "conditional requests never reach the origin");
        // The warm-up hit, then one per request, whatever the status.
        assert.equal((await store.get("img"))?.hits, table.length + 1);
      }),
    );

    it(
      "answers a conditional HEAD with the same status and no body",
      withStore(make, async (store) => {
        const { app, etag } = await cached(store);
        const notModified = await app.request(PATH, {
          method: "HEAD",
          headers: { "if-none-match": etag },
        });
        assert.equal(notModified.status, 304);
        assert.equal(notModified.headers.get("etag"), etag);
        assert.equal((await readBody(notModified)).bytes.byteLength, 0);
        const failed = await app.request(PATH, {
          method: "HEAD",
          headers: { "if-match": '"other"' },
        });
        assert.equal(failed.status, 412);
        assert.equal((await readBody(failed)).bytes.byteLength, 0);
      }),
    );
  });
}

describe("Conditional requests and the store", () => {
  it(
    "answers 304 and 412 from metadata without opening the data",
    withStore(() => new FaultyStore(new MemoryStore()), async (store) => {
      const faulty = store as FaultyStore;
      const { app, etag } = await cached(store);
      const opens = faulty.opens;
      faulty.faults.failBody = true; // any data open would now fall back to the origin
      const res = await app.request(PATH, { headers: { "if-none-match": etag } });
      assert.equal(res.status, 304);
      await res.body?.cancel();
      const failed = await app.request(PATH, { headers: { "if-match": '"x"' } });
      assert.equal(failed.status, 412);
      await failed.body?.cancel();
      assert.equal(faulty.opens, opens);
    }),
  );

  it(
    "asks authorize before any conditional answer, and counts no hit when it refuses",
    withStore(() => new MemoryStore(), async (store) => {
      const { app, etag } = await cached(store, {
        authorize: (c) => c.req.header("x-user") !== "mallory",
      });
      const hits = (await store.get("img"))?.hits;
      const res = await app.request(PATH, {
        headers: { "if-none-match": etag, "x-user": "mallory" },
      });
      assert.equal(res.status, 403);
      assert.equal(res.headers.get("etag"), null);
      await res.body?.cancel();
      assert.equal((await store.get("img"))?.hits, hits);
    }),
  );

  it(
    "passes a conditional miss to the origin with its validators",
    withStore(() => new MemoryStore(), async (store) => {
      const seen: (string | undefined)[] = [];
      const app = new Hono();
      app.use(imageCache({ store }));
      app.get("/v2/images/:id/file", (c) => {
        seen.push(c.req.header("if-none-match"));
        return c.body(null, 304, { etag: '"v1"' });
      });
      const res = await app.request(PATH, { headers: { "if-none-match": '"v1"' } });
      assert.equal(res.status, 304);
      assert.equal(
        res.headers.get("cache-status"),
        "hono-image-cache; fwd=miss; detail=status-304",
      );
      assert.deepEqual(seen, ['"v1"']);
      assert.equal(await store.get("img"), undefined);
    }),
  );
});
