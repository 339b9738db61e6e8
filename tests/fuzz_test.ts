/**
 * A fuzz pass over everything that parses input (issue 9): route matching
 * and ids, `Range` and `If-*` headers on hits, the management API's paths,
 * bodies and headers, and the `FileSystemStore`'s files on disk (metadata,
 * owner records, queue markers, stray files).
 *
 * Seeded: `FUZZ_SEED=<n>` replays a run, `FUZZ_SCALE=<k>` multiplies the
 * iterations (the default keeps the suite fast), `FUZZ_ALL=1` applies every
 * disk corruption to every image and lists all failures at once. Every
 * failure message starts with the seed. Corruptions that reproduce an open
 * finding run in their own `todo` tests (`RUN_OPEN_FINDINGS=1` runs them).
 *
 * @module
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import process from "node:process";
import { mkdir, readdir, readFile, rm, truncate, writeFile } from "node:fs/promises";
import { join, relative, sep } from "node:path";
import { Hono } from "hono";
import {
  cacheApi,
  FileSystemStore,
  glanceRoutes,
  imageCache,
  type ImageStore,
  matchRoute,
} from "hono-image-cache";
import { MemoryStore } from "hono-image-cache/testing";
import { hexDigest, pattern, readBody, withTempDir } from "./_helpers.ts";

const SEED = Number(process.env.FUZZ_SEED ?? 9) >>> 0;
const SCALE = Math.max(0.1, Number(process.env.FUZZ_SCALE ?? 1));
const times = (n: number) => Math.max(1, Math.round(n * SCALE));
const tag = `[FUZZ_SEED=${SEED}]`;

/** mulberry32: small, fast, seeded. */
function rng(seed: number) {
  let a = seed >>> 0;
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  return {
    next,
    int: (min: number, max: number) => min + Math.floor(next() * (max - min + 1)),
    chance: (p: number) => next() < p,
    pick: <T>(items: readonly T[]): T => items[Math.floor(next() * items.length)],
  };
}
type Rng = ReturnType<typeof rng>;

// ---------------------------------------------------------------------------
// Inputs.

const SEGMENT_PIECES = [
  "a",
  "Z9",
  "-",
  "_",
  ".",
  "..",
  "~",
  "~41",
  "%",
  "%2",
  "%zz",
  "%00",
  "%2F",
  "%2f",
  "%5C",
  "%2e",
  "%2E%2E",
  "%C3",
  "%C3%A9",
  "%E2%82",
  "%F0%9F%98%80",
  "é",
  "😀",
  " ",
  "%20",
  "+",
  ":",
  "@",
  "detail",
  "incomplete",
  "queue",
  "invalid",
  ".json",
  ".owner",
  ".tmp",
  "\u0000",
  "\u202e",
  "x".repeat(60),
];

/** A path segment as a client might send it: pieces of encodings, valid or not. */
function segment(r: Rng): string {
  let out = "";
  const n = r.int(1, 6);
  for (let i = 0; i < n; i++) out += r.pick(SEGMENT_PIECES);
  return out;
}

/** An image id: plain, Unicode, control characters, traversal, long. */
function hostileId(r: Rng): string {
  switch (r.int(0, 5)) {
    case 0:
      return r.pick(["..", ".", "", "/", "\\", "../x", "a/b", "a\\b", "a\u0000b", "detail"]);
    case 1:
      return "p".repeat(r.int(95, 205));
    case 2:
      return "é".repeat(r.int(45, 55));
    case 3:
      return Array.from({ length: r.int(1, 12) }, () => String.fromCharCode(r.int(0, 0x2fff)))
        .join("");
    default: {
      const alphabet = "aZ09-_.~%/\\:é😀 ?#&=+\u0000\u007f";
      const chars = Array.from(alphabet);
      return Array.from({ length: r.int(1, 30) }, () => r.pick(chars)).join("");
    }
  }
}

/** The bytes of an image, from its id (any id has content). */
function imageOf(id: string, sizes?: Map<string, number>): Uint8Array<ArrayBuffer> {
  let h = 2166136261;
  for (let i = 0; i < id.length; i++) h = Math.imul(h ^ id.charCodeAt(i), 16777619);
  const size = sizes?.get(id) ?? (h >>> 0) % 5000;
  return pattern(size, (h >>> 0) || 1) as Uint8Array<ArrayBuffer>;
}

/** An origin that serves `imageOf(id)` on Glance's routes, as the cache reads ids. */
function originApp(app: Hono, sizes?: Map<string, number>) {
  app.all("*", (c) => {
    const url = c.req.url;
    const path = url.slice(url.indexOf("/", url.indexOf("://") + 3)).split("?")[0];
    const match = matchRoute(glanceRoutes, c.req.method, path);
    if (match === undefined) return c.text("not found", 404);
    if (match.route.action === "evict") return c.body(null, 204);
    const bytes = imageOf(match.id, sizes);
    const headers = {
      "content-length": String(bytes.byteLength),
      "content-md5": hexDigest(bytes),
      "content-type": "application/octet-stream",
    };
    return c.req.method === "HEAD" ? c.body(null, 200, headers) : c.body(bytes, 200, headers);
  });
}

const SAFE_NAME = /^[A-Za-z0-9_-]{1,200}$/;

/** Whether a file name in the cache directory is one the layout allows. */
function allowedName(name: string): boolean {
  const base = name.replace(/\.(json|owner)$/, "").replace(/\.json\.[\w-]+\.tmp$/, "");
  return SAFE_NAME.test(base) || /^~(?:[0-9a-f]{2})+$/.test(base) || /\.tmp$/.test(name);
}

/** Every file under `root`, as paths relative to it. */
async function walk(root: string, dir = root, out: string[] = []): Promise<string[]> {
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    out.push(relative(root, path));
    if (entry.isDirectory()) await walk(root, path, out);
  }
  return out;
}

/** Checks that the sandbox holds nothing outside `cache/` and only layout names inside. */
async function checkSandbox(sandbox: string) {
  for (const path of await walk(sandbox)) {
    assert.ok(path === "cache" || path.startsWith("cache" + sep), `${tag} file outside: ${path}`);
    const parts = path.split(sep).slice(1);
    if (parts.length === 0) continue;
    const [top, ...rest] = parts;
    if (rest.length === 0) {
      if (["deleted", "incomplete", "invalid", "queue"].includes(top)) continue;
      assert.ok(allowedName(top), `${tag} unexpected name ${JSON.stringify(path)}`);
    } else {
      assert.ok(
        ["deleted", "incomplete", "invalid", "queue"].includes(top),
        `${tag} nested ${path}`,
      );
      const name = rest[0];
      const tombstone = top === "deleted" && name === ".all"; // the tombstone of a clear
      assert.ok(rest.length === 1 && (tombstone || allowedName(name)), `${tag} unexpected ${path}`);
    }
  }
}

function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.byteLength !== b.byteLength) return false;
  for (let i = 0; i < a.byteLength; i++) if (a[i] !== b[i]) return false;
  return true;
}

// ---------------------------------------------------------------------------
// Range and conditional references (RFC 9110 §13.2.2, §13.1.5, §14).

interface Interval {
  start: number;
  end: number; // exclusive
}

/** The satisfiable ranges of a well-formed `bytes=` header, merged: the bytes a 206 may carry. */
function satisfiable(specs: string[], size: number): Interval[] {
  const out: Interval[] = [];
  for (const spec of specs) {
    const [first, last] = spec.split("-");
    if (first === "") {
      const n = Number(last);
      if (n > 0) out.push({ start: Math.max(0, size - n), end: size });
    } else if (Number(first) < size) {
      out.push({
        start: Number(first),
        end: last === "" ? size : Math.min(size, Number(last) + 1),
      });
    }
  }
  return union(out);
}

function union(intervals: Interval[]): Interval[] {
  const sorted = intervals.filter((i) => i.end > i.start).sort((a, b) => a.start - b.start);
  const merged: Interval[] = [];
  for (const i of sorted) {
    const last = merged[merged.length - 1];
    if (last !== undefined && i.start <= last.end) last.end = Math.max(last.end, i.end);
    else merged.push({ ...i });
  }
  return merged;
}

interface Generated {
  headers: Record<string, string>;
  /** Statuses the reference allows; `undefined` aspects were garbage (lenient). */
  expect?: number;
  /** For a 206: the bytes it may carry. */
  ranges?: Interval[];
}

function httpDate(ms: number): string {
  return new Date(ms).toUTCString();
}

/** Random request headers for a hit, with the reference's verdict when they are well-formed. */
function conditionalHeaders(
  r: Rng,
  size: number,
  etag: string,
  lastModified: number,
  method: string,
): Generated {
  const headers: Record<string, string> = {};
  let lenient = false;
  const other = `"other-${r.int(0, 9)}"`;
  const tagList = () => {
    const n = r.int(1, 3);
    const tags = Array.from({ length: n }, () => r.pick([etag, `W/${etag}`, other, `W/${other}`]));
    return { value: tags.join(r.pick([", ", ",", " ,\t"])), tags };
  };
  const dateOf = () =>
    r.pick([
      lastModified - 10_000,
      lastModified,
      lastModified + 10_000,
      0,
      Date.now() + 86_400_000,
    ]);
  const garbage = () =>
    r.pick(['"unterminated', "abc", "W/", "*, *", '""x', "\u00ff\u00fe", "Mon, 32 Foo 2020", "0"]);

  // Step 1: If-Match, else If-Unmodified-Since.
  let failed = false;
  const first = r.next();
  if (first < 0.15) {
    if (r.chance(0.2)) {
      headers["if-match"] = garbage();
      lenient = true;
    } else if (r.chance(0.15)) {
      headers["if-match"] = "*";
    } else {
      const { value, tags } = tagList();
      headers["if-match"] = value;
      failed = !tags.includes(etag);
    }
  } else if (first < 0.3) {
    if (r.chance(0.2)) headers["if-unmodified-since"] = garbage(); // An invalid date is ignored.
    else {
      const date = dateOf();
      headers["if-unmodified-since"] = httpDate(date);
      failed = Math.floor(lastModified / 1000) > Math.floor(date / 1000);
    }
  }
  // Step 3: If-None-Match, else If-Modified-Since (GET, HEAD).
  let notModified = false;
  const third = r.next();
  if (third < 0.2) {
    if (r.chance(0.2)) {
      headers["if-none-match"] = garbage();
      lenient = true;
    } else if (r.chance(0.15)) {
      headers["if-none-match"] = "*";
      notModified = true;
    } else {
      const { value, tags } = tagList();
      headers["if-none-match"] = value;
      notModified = tags.some((t) => t.replace(/^W\//, "") === etag);
    }
  } else if (third < 0.35) {
    if (r.chance(0.2)) headers["if-modified-since"] = garbage();
    else {
      const date = dateOf();
      headers["if-modified-since"] = httpDate(date);
      notModified = Math.floor(lastModified / 1000) <= Math.floor(date / 1000);
    }
  }
  // Step 5: Range (GET), with If-Range.
  let expect = 200;
  let ranges: Interval[] | undefined;
  if (r.chance(0.6)) {
    if (r.chance(0.25)) {
      headers.range = r.pick([
        "bytes=5-3",
        "bytes=abc",
        "items=0-5",
        "bytes 0-5",
        "bytes=--1",
        "bytes=1-2-3",
        "bytes = 0-1",
        "bytes=0 -1",
        "bytes=",
        "=0-1",
        "bytes=0-1;x",
        "bytes=\u00e90-1",
      ]);
    } else {
      const specs = Array.from({ length: r.int(1, 4) }, () => {
        const at = () => r.int(0, size + 3);
        switch (r.int(0, 3)) {
          case 0:
            return `-${r.int(0, size + 3)}`;
          case 1:
            return `${at()}-`;
          default: {
            const a = at();
            return `${a}-${a + r.int(0, size + 3)}`;
          }
        }
      });
      const unit = r.pick(["bytes", "bytes", "Bytes", "BYTES"]);
      headers.range = `${unit}=${specs.join(r.pick([",", ", ", " , ", ",\t"]))}`;
      let rangeApplies = true;
      if (r.chance(0.3)) {
        const value = r.pick([
          etag,
          `W/${etag}`,
          other,
          httpDate(lastModified),
          httpDate(0),
          "garbage",
        ]);
        headers["if-range"] = value;
        rangeApplies = value === etag || value === httpDate(lastModified);
      }
      if (rangeApplies && method === "GET" && size > 0) {
        ranges = satisfiable(specs, size);
        expect = ranges.length === 0 ? 416 : 206;
      }
    }
  }
  if (failed) expect = 412;
  else if (notModified) expect = 304;
  return { headers, expect: lenient ? undefined : expect, ranges };
}

/** The parts of a `multipart/byteranges` body. */
function multipartParts(
  body: Uint8Array,
  contentType: string,
): { range: Interval; size: number; bytes: Uint8Array }[] {
  const boundary = /boundary=("?)([^";]+)\1/.exec(contentType)?.[2];
  assert.ok(boundary !== undefined, `${tag} multipart without a boundary: ${contentType}`);
  let text = "";
  for (let i = 0; i < body.byteLength; i += 8192) {
    text += String.fromCharCode(...body.subarray(i, i + 8192));
  }
  const pieces = text.split(`--${boundary}`);
  assert.ok(pieces.length >= 3, `${tag} multipart with no part`);
  assert.ok(pieces[pieces.length - 1].startsWith("--"), `${tag} multipart without a close`);
  return pieces.slice(1, -1).map((piece) => {
    const headEnd = piece.indexOf("\r\n\r\n");
    const head = piece.slice(0, headEnd);
    const match = /content-range: bytes (\d+)-(\d+)\/(\d+)/i.exec(head);
    assert.ok(match !== null, `${tag} part without Content-Range: ${JSON.stringify(head)}`);
    let data = piece.slice(headEnd + 4);
    assert.ok(data.endsWith("\r\n"), `${tag} part without its CRLF`);
    data = data.slice(0, -2);
    const bytes = new Uint8Array(data.length);
    for (let i = 0; i < data.length; i++) bytes[i] = data.charCodeAt(i);
    return {
      range: { start: Number(match[1]), end: Number(match[2]) + 1 },
      size: Number(match[3]),
      bytes,
    };
  });
}

/** Judges one answer to a hit against the image and the reference. */
async function judgeHit(
  res: Response,
  image: Uint8Array,
  generated: Generated,
  method: string,
  etag: string,
  context: string,
) {
  const size = image.byteLength;
  const where = `${tag} ${context} -> ${res.status}`;
  if (res.status >= 500) assert.fail(`${where}: server error ${await res.text()}`);
  if (generated.expect !== undefined) {
    const allowed = [generated.expect];
    if (generated.expect === 304 && method === "HEAD") allowed.push(304);
    assert.ok(allowed.includes(res.status), `${where}, expected ${generated.expect}`);
  } else {
    assert.ok([200, 206, 304, 412, 416].includes(res.status), `${where}: unexpected status`);
  }
  const { bytes, error } = await readBody(res);
  assert.equal(error, undefined, `${where}: body failed ${error}`);
  if (method === "HEAD") {
    assert.equal(bytes.byteLength, 0, `${where}: HEAD with a body`);
    return;
  }
  switch (res.status) {
    case 200:
      assert.ok(equalBytes(bytes, image), `${where}: 200 body is not the image`);
      assert.equal(res.headers.get("content-length"), String(size), `${where}: Content-Length`);
      break;
    case 206: {
      const type = res.headers.get("content-type") ?? "";
      let parts;
      if (/^multipart\/byteranges/i.test(type)) {
        parts = multipartParts(bytes, type);
      } else {
        const match = /^bytes (\d+)-(\d+)\/(\d+)$/.exec(res.headers.get("content-range") ?? "");
        assert.ok(match !== null, `${where}: Content-Range ${res.headers.get("content-range")}`);
        parts = [{
          range: { start: Number(match[1]), end: Number(match[2]) + 1 },
          size: Number(match[3]),
          bytes,
        }];
      }
      for (const part of parts) {
        assert.equal(part.size, size, `${where}: part of size ${part.size}`);
        assert.ok(
          equalBytes(part.bytes, image.subarray(part.range.start, part.range.end)),
          `${where}: part ${part.range.start}-${part.range.end - 1} has wrong bytes`,
        );
      }
      if (generated.ranges !== undefined) {
        assert.deepEqual(
          union(parts.map((p) => p.range)),
          generated.ranges,
          `${where}: the parts do not cover the requested ranges`,
        );
      }
      break;
    }
    case 304:
      assert.equal(bytes.byteLength, 0, `${where}: 304 with a body`);
      assert.equal(res.headers.get("etag"), etag, `${where}: 304 without the ETag`);
      break;
    case 416:
      assert.equal(res.headers.get("content-range"), `bytes */${size}`, `${where}: 416 range`);
      break;
  }
}

// ---------------------------------------------------------------------------

/** Where a corruption applies, and the randomness it may use. */
interface Target {
  r: Rng;
  directory: string;
  name: string;
  size: number;
}

/** One way to damage the files of an entry (or the layout around it). */
interface Corruption {
  label: string;
  /** An open finding this corruption reproduces (its test is `todo` until fixed). */
  finding?: string;
  apply(t: Target): Promise<void>;
}

const metaPath = (t: Target) => join(t.directory, t.name + ".json");
const dataPath = (t: Target) => join(t.directory, t.name);

/** Rewrites one field of the metadata file (`a.b` for a nested one). */
function field(path: string, value: unknown, finding?: string): Corruption {
  return {
    label: `${path}=${JSON.stringify(value)?.slice(0, 40)}`,
    finding,
    async apply(t) {
      const entry = JSON.parse(await readFile(metaPath(t), "utf8"));
      const [outer, inner] = path.split(".");
      if (inner === undefined) entry[outer] = value;
      else entry[outer] = { ...entry[outer], [inner]: value };
      await writeFile(metaPath(t), JSON.stringify(entry));
    },
  };
}

function owner(record: string, withData: boolean): Corruption {
  return {
    label: `owner record ${record.slice(0, 50)}${withData ? " with partial data" : ""}`,
    async apply(t) {
      await writeFile(join(t.directory, "incomplete", t.name + ".owner"), record);
      if (withData) {
        await writeFile(join(t.directory, "incomplete", t.name), pattern(t.r.int(0, 100)));
      }
    },
  };
}

/** Every corruption the fuzz applies, one at a time. */
const CORRUPTIONS: Corruption[] = [
  { label: "metadata removed", apply: (t) => rm(metaPath(t), { force: true }) },
  {
    label: "metadata truncated",
    async apply(t) {
      const text = await readFile(metaPath(t), "utf8");
      await writeFile(metaPath(t), text.slice(0, t.r.int(0, text.length - 1)));
    },
  },
  {
    label: "metadata random bytes",
    apply: (t) => writeFile(metaPath(t), pattern(t.r.int(0, 300), t.r.int(1, 1000))),
  },
  ...["null", "[]", "5", '"x"', "{}", '{"__proto__":{"size":1}}'].map((text) => ({
    label: `metadata ${text}`,
    apply: (t: Target) => writeFile(metaPath(t), text),
  })),
  ...[-1, 1.5, "0", null, 1e300].map((v) => field("size", v)),
  {
    label: "size off by one",
    async apply(t) {
      const entry = JSON.parse(await readFile(metaPath(t), "utf8"));
      entry.size = t.size + (t.r.chance(0.5) || t.size === 0 ? 1 : -1);
      await writeFile(metaPath(t), JSON.stringify(entry));
    },
  },
  ...["other", "", null, 5].map((v) => field("id", v)),
  ...["sha1", "MD5", null, 5].map((v) => field("digest.algorithm", v)),
  ...["", "zz", "0".repeat(64), "not hex at all", 5, null].map((v) => field("digest.value", v)),
  field("digest", null),
  ...[null, [], { "x-n": 5 }].map((v) => field("headers", v)),
  ...[
    { "content-length": "999999" },
    { etag: '"evil"' },
    { "x-image-meta-location": "file:///secret" },
  ].map((v) => field("headers", v)),
  field("headers", { "content-md5": "forged" }),
  ...[{ "content-type": "a\r\nb" }, { "bad name": "x" }, { "content-type": "\u00e9\u0000" }]
    .map((v) => field("headers", v)),
  ...[-1, "x", null, 1.5].map((v) => field("created", v)),
  ...[1e20, -1e300].map((v) => field("created", v)),
  ...[-1, 1e20, "x", null].map((v) => field("lastAccessed", v)),
  ...[-1, 1.5, 1e300, "3", null].map((v) => field("hits", v)),
  {
    label: "data truncated or grown",
    async apply(t) {
      if (t.size === 0) await writeFile(dataPath(t), "x");
      else await truncate(dataPath(t), t.r.int(0, t.size - 1));
    },
  },
  { label: "data removed", apply: (t) => rm(dataPath(t), { force: true }) },
  {
    label: "data replaced by a directory",
    async apply(t) {
      await rm(dataPath(t), { force: true });
      await mkdir(dataPath(t));
    },
  },
  ...[
    "",
    "{",
    '{"pid":1,"host":"elsewhere","token":"t","started":0}',
    JSON.stringify({ pid: 2 ** 22 + 7, host: "localhost", token: "t", started: 1 }),
    JSON.stringify({ pid: process.pid, host: "x", token: "not-live", started: 1 }),
    JSON.stringify({ pid: 0, host: "x", token: "t", started: 1 }),
    JSON.stringify({ pid: -1, host: "x", token: "t", started: 1 }),
  ].flatMap((record) => [owner(record, false), owner(record, true)]),
  {
    label: "queue marker of random bytes",
    apply: (t) => writeFile(join(t.directory, "queue", t.name), pattern(t.r.int(0, 5000))),
  },
  {
    label: "queue marker of no id",
    apply: (t) => writeFile(join(t.directory, "queue", "..."), "x"),
  },
  { label: "directory in queue/", apply: (t) => mkdir(join(t.directory, "queue", "a-dir")) },
  { label: "stray metadata of no id", apply: (t) => writeFile(join(t.directory, "~zz.json"), "{") },
  {
    label: "invalid/ replaced by a file",
    async apply(t) {
      await rm(join(t.directory, "invalid"), { recursive: true, force: true });
      await writeFile(join(t.directory, "invalid"), "not a directory");
    },
  },
];

const DAMAGED_IDS = ["big", "empty", "one", "~odd é"];
const DAMAGED_SIZES = new Map([["big", 70_000], ["empty", 0], ["one", 1], ["~odd é", 3000]]);

/** The file name of an id (the documented rule: plain ids as is, others hex behind `~`). */
function nameOf(id: string): string {
  if (/^[A-Za-z0-9_-]+$/.test(id) && !["deleted", "incomplete", "invalid", "queue"].includes(id)) {
    return id;
  }
  return "~" + Array.from(new TextEncoder().encode(id), (b) => b.toString(16).padStart(2, "0"))
    .join("");
}

/**
 * Fills every image, damages the files of `target` with `corruption`, then
 * checks a fresh store (as a restarted process): its listing shows no wrong
 * entry, and every image is served whole and right, from the cache or the
 * origin, with well-formed validators on hits.
 */
async function damagedRound(r: Rng, corruption: Corruption, target: string): Promise<void> {
  await withTempDir(async (sandbox) => {
    const directory = join(sandbox, "cache");
    const appOver = (store: ImageStore) => {
      const app = new Hono();
      app.use(imageCache({ store, onError: () => {} }));
      originApp(app, DAMAGED_SIZES);
      return app;
    };
    const first = new FileSystemStore({ directory });
    const app1 = appOver(first);
    for (const id of DAMAGED_IDS) {
      await readBody(await app1.request(`/v2/images/${encodeURIComponent(id)}/file`));
    }
    await first.close();

    await corruption.apply({
      r,
      directory,
      name: nameOf(target),
      size: DAMAGED_SIZES.get(target)!,
    });
    const context = `${tag} ${corruption.label} of ${JSON.stringify(target)}`;

    const store = new FileSystemStore({ directory });
    const app = appOver(store);
    try {
      // The store may refuse (its layout is broken), never crash.
      for (const entry of (await store.list().catch(() => undefined)) ?? []) {
        assert.equal(entry.size, DAMAGED_SIZES.get(entry.id), `${context}: lists ${entry.id}`);
      }
      for (const id of await store.queued().catch(() => [])) {
        assert.equal(typeof id, "string", context);
      }
      for (let round = 0; round < 2; round++) {
        for (const id of DAMAGED_IDS) {
          const res = await app.request(`/v2/images/${encodeURIComponent(id)}/file`);
          const status = res.headers.get("cache-status");
          const where = `${context}: GET ${
            JSON.stringify(id)
          } (round ${round}) -> ${res.status} ${status}`;
          assert.equal(res.status, 200, where);
          const { bytes, error } = await readBody(res);
          assert.equal(error, undefined, `${where}: ${error}`);
          assert.ok(equalBytes(bytes, imageOf(id, DAMAGED_SIZES)), `${where}: wrong bytes`);
          if (status === "hono-image-cache; hit") {
            const md5 = res.headers.get("content-md5");
            const truth = hexDigest(imageOf(id, DAMAGED_SIZES));
            assert.ok(md5 === null || md5 === truth, `${where}: Content-MD5 ${md5}`);
            const etag = res.headers.get("etag") ?? "";
            assert.ok(/^"[\x21\x23-\x7e]+"$/.test(etag), `${where}: ETag ${etag}`);
            const modified = Date.parse(res.headers.get("last-modified") ?? "");
            assert.ok(Number.isFinite(modified), `${where}: Last-Modified`);
            assert.equal(res.headers.get("content-length"), String(bytes.byteLength), where);
          }
        }
      }
      await store.clean().catch(() => {});
    } finally {
      await store.close();
    }
  });
}

// ---------------------------------------------------------------------------

describe(`fuzz: hostile input ${tag}`, () => {
  it("matches routes without throwing, decodes each id once, and never holds a traversal id", () => {
    const r = rng(SEED ^ 0x1001);
    const memory = new MemoryStore();
    const methods = ["GET", "HEAD", "DELETE", "PUT", "POST", "PATCH"];
    for (let i = 0; i < times(4000); i++) {
      const seg = segment(r);
      const path = r.pick([
        `/v1/images/${seg}`,
        `/v2/images/${seg}/file`,
        `/v2/images/${seg}`,
        `/v2/images/${seg}/${segment(r)}`,
        `/${seg}/v2/images/${seg}/file`,
        `/v1/images/${seg}/`,
        `//v2/images/${seg}/file`,
        `/v2/images//file`,
        `/v1/images/detail`,
      ]);
      const method = r.pick(methods);
      const context = `${tag} ${method} ${JSON.stringify(path)}`;
      const match = matchRoute(glanceRoutes, method, path);
      if (match === undefined) continue;
      assert.ok(glanceRoutes.includes(match.route), context);
      const raw = match.route.path.exec(path)?.groups?.id;
      assert.ok(raw !== undefined, context);
      assert.equal(match.id, decodeURIComponent(raw), context);
      assert.ok(!raw.includes("/"), context);
      if (match.route.path.source.includes("v1")) assert.notEqual(raw, "detail", context);
      if (method === "HEAD") assert.equal(match.route.action, "serve", context);
      if (method === "DELETE") assert.equal(match.route.action, "evict", context);
      if (/[\0/\\]/.test(match.id) || ["", ".", ".."].includes(match.id)) {
        assert.equal(
          memory.canHold(match.id),
          false,
          `${context}: holds ${JSON.stringify(match.id)}`,
        );
      }
    }
    for (let i = 0; i < times(2000); i++) {
      const id = hostileId(r);
      const unsafe = /[\0/\\]/.test(id) || ["", ".", ".."].includes(id);
      if (unsafe) assert.equal(memory.canHold(id), false, `${tag} holds ${JSON.stringify(id)}`);
      if (/^[A-Za-z0-9_-]{1,100}$/.test(id)) assert.ok(memory.canHold(id), `${tag} refuses ${id}`);
    }
  });

  it("keeps the files of hostile ids inside the cache directory and serves their exact bytes", async () => {
    await withTempDir(async (sandbox) => {
      const r = rng(SEED ^ 0x2002);
      const directory = join(sandbox, "cache");
      const store = new FileSystemStore({ directory });
      const app = new Hono();
      app.use(imageCache({ store, onError: () => {} }));
      originApp(app);
      const held = new Set<string>();
      try {
        for (let i = 0; i < times(120); i++) {
          const id = hostileId(r);
          const encoded = r.chance(0.8) ? encodeURIComponent(id) : segment(r);
          const path = r.chance(0.5) ? `/v2/images/${encoded}/file` : `/v1/images/${encoded}`;
          let url;
          try {
            url = new URL(`http://localhost${path}`);
          } catch {
            continue;
          }
          const match = matchRoute(glanceRoutes, "GET", url.pathname);
          for (let round = 0; round < 2; round++) {
            const res = await app.request(url.href);
            const context = `${tag} GET ${JSON.stringify(path)} (round ${round}) -> ${res.status}`;
            if (match === undefined) {
              assert.equal(res.status, 404, context);
              await res.body?.cancel();
              continue;
            }
            assert.equal(res.status, 200, context);
            const { bytes, error } = await readBody(res);
            assert.equal(error, undefined, context);
            assert.ok(equalBytes(bytes, imageOf(match.id)), `${context}: wrong bytes`);
            if (store.canHold(match.id)) held.add(match.id);
          }
        }
        await checkSandbox(sandbox);
        const listed = new Set((await store.list()).map((entry) => entry.id));
        for (const id of held) assert.ok(listed.has(id), `${tag} ${JSON.stringify(id)} not listed`);
        for (const id of listed) assert.ok(held.has(id), `${tag} ${JSON.stringify(id)} listed`);
      } finally {
        await store.close();
      }
    });
  });

  it("answers Range and If-* headers on hits with the statuses RFC 9110 gives and exact bytes", async () => {
    await withTempDir(async (directory) => {
      const r = rng(SEED ^ 0x3003);
      const sizes = new Map([
        ["s0", 0],
        ["s1", 1],
        ["s2", 2],
        ["s1000", 1000],
        ["s65537", 65537],
        ["s300000", 300_000],
      ]);
      const stores: [string, ImageStore][] = [
        ["memory", new MemoryStore()],
        ["file-system", new FileSystemStore({ directory })],
      ];
      try {
        for (const [kind, store] of stores) {
          const app = new Hono();
          app.use(imageCache({ store, onError: () => {} }));
          originApp(app, sizes);
          for (const id of sizes.keys()) {
            const image = imageOf(id, sizes);
            await readBody(await app.request(`/v2/images/${id}/file`));
            const head = await app.request(`/v2/images/${id}/file`, { method: "HEAD" });
            assert.equal(head.headers.get("cache-status"), "hono-image-cache; hit", `${tag} ${id}`);
            const etag = head.headers.get("etag") ?? "";
            const lastModified = Date.parse(head.headers.get("last-modified") ?? "");
            assert.ok(/^"[\x21\x23-\x7e]+"$/.test(etag), `${tag} ${kind} ${id}: ETag ${etag}`);
            assert.ok(Number.isFinite(lastModified), `${tag} ${kind} ${id}: Last-Modified`);
            for (let i = 0; i < times(60); i++) {
              const method = r.chance(0.85) ? "GET" : "HEAD";
              const generated = conditionalHeaders(r, image.byteLength, etag, lastModified, method);
              const res = await app.request(`/v2/images/${id}/file`, {
                method,
                headers: generated.headers,
              });
              await judgeHit(
                res,
                image,
                generated,
                method,
                etag,
                `${kind} ${method} ${id} ${JSON.stringify(generated.headers)}`,
              );
            }
          }
        }
      } finally {
        for (const [, store] of stores) await store.close();
      }
    });
  });

  it("answers the management API with a status below 500 and a message, and a refusal changes nothing", async () => {
    await withTempDir(async (sandbox) => {
      const r = rng(SEED ^ 0x4004);
      const directory = join(sandbox, "cache");
      const store = new FileSystemStore({ directory });
      const controller = new AbortController();
      const origin = new Hono();
      originApp(origin);
      const app = new Hono();
      app.route(
        "/",
        cacheApi({
          store,
          authorize: (c) => c.req.header("x-allow") !== "no",
          // No prefetch: a refused request must change nothing, and background fills would.
          signal: controller.signal,
          cleanInterval: 0,
          onError: () => {},
        }),
      );
      app.use(imageCache({ store, onError: () => {} }));
      app.route("/", origin);
      const state = async () =>
        JSON.stringify({
          cached: (await store.list()).map((e) => e.id).sort(),
          queued: await store.queued(),
        });
      try {
        for (const id of ["a", "b", "~x", "é"]) {
          await readBody(await app.request(`/v2/images/${encodeURIComponent(id)}/file`));
        }
        for (let i = 0; i < times(400); i++) {
          const seg = r.chance(0.5) ? r.pick(["a", "b", "c", "%7Ex", "%C3%A9"]) : segment(r);
          const path = r.pick([
            "/v2/cache",
            "/v2/cache/",
            `/v2/cache/${seg}`,
            `/v2/cache/${seg}/status`,
            `/v2/cache/${seg}/${segment(r)}`,
            "/v2/cache/clean",
            "/v2/cache/prune",
            "/v2/cache//status",
            "/v1/cached_images",
            `/v1/cached_images/${seg}`,
            "/v2/cached_images",
            `/v2/cached_images/${seg}`,
            "/v1/queued_images",
            `/v2/queued_images/${seg}`,
            `/v1/queued_images/${seg}`,
            "/metrics",
          ]);
          const method = r.pick(["GET", "HEAD", "PUT", "POST", "DELETE", "PATCH", "OPTIONS"]);
          const headers: Record<string, string> = {};
          if (r.chance(0.3)) {
            headers["x-image-cache-clear-target"] = r.pick([
              "",
              "both",
              " BOTH ",
              "cache",
              "Queue",
              "queue,cache",
              "nonsense",
              "\t",
            ]);
          }
          if (r.chance(0.3)) {
            headers["content-type"] = r.pick(["application/json", "text/plain", "x/y;;"]);
          }
          const refused = r.chance(0.2);
          if (refused) headers["x-allow"] = "no";
          let body: string | undefined;
          if (method !== "GET" && method !== "HEAD" && r.chance(0.4)) {
            body = r.pick([
              '{"image_id":"../x"}',
              "[]",
              "{",
              "\u0000".repeat(10),
              "x".repeat(5000),
            ]);
          }
          let url;
          try {
            url = new URL(`http://localhost${path}`);
          } catch {
            continue;
          }
          const before = refused ? await state() : "";
          const res = await app.request(url.href, { method, headers, body });
          const text = await res.text();
          const context = `${tag} ${method} ${JSON.stringify(path)} ${
            JSON.stringify(headers)
          } -> ${res.status}`;
          assert.ok(res.status < 500, `${context}: ${text.slice(0, 200)}`);
          if (res.status >= 400 && method !== "HEAD") {
            assert.ok(text.length > 0, `${context}: an error without a message`);
          }
          if (res.status === 405) {
            const allow = res.headers.get("allow") ?? "";
            assert.ok(
              allow !== "" && !allow.split(", ").includes(method),
              `${context}: Allow ${allow}`,
            );
          }
          if (refused) {
            assert.ok(res.status !== 204 && res.status !== 202, `${context}: refused but done`);
            assert.equal(await state(), before, `${context}: a refused request changed the cache`);
          }
        }
        controller.abort();
        await checkSandbox(sandbox);
        for (const entry of await store.list()) {
          const res = await app.request(`/v2/images/${encodeURIComponent(entry.id)}/file`);
          const { bytes, error } = await readBody(res);
          assert.equal(error, undefined, `${tag} ${entry.id}`);
          assert.ok(equalBytes(bytes, imageOf(entry.id)), `${tag} ${entry.id}: wrong bytes`);
        }
      } finally {
        controller.abort();
        await store.close();
      }
    });
  });

  it("never crashes nor serves a damaged entry when the files on disk are corrupt", async () => {
    const r = rng(SEED ^ 0x5005);
    const known = CORRUPTIONS.filter((c) => c.finding === undefined);
    // FUZZ_ALL=1 applies each corruption once to each image instead of a random sample.
    const plan = process.env.FUZZ_ALL
      ? CORRUPTIONS.flatMap((c) => DAMAGED_IDS.map((id) => [c, id] as const))
      : Array.from({ length: times(60) }, () => [r.pick(known), r.pick(DAMAGED_IDS)] as const);
    const failures: string[] = [];
    for (const [corruption, id] of plan) {
      try {
        await damagedRound(r, corruption, id);
      } catch (error) {
        if (!process.env.FUZZ_ALL) throw error;
        failures.push(`${corruption.finding ?? "NEW"}: ${(error as Error).message.split("\n")[0]}`);
      }
    }
    assert.deepEqual(failures, [], failures.join("\n"));
  });

  const open = CORRUPTIONS.filter((c) => c.finding !== undefined);
  for (const finding of new Set(open.map((c) => c.finding!))) {
    it(
      `never serves a damaged entry: ${finding.replace(/^finding \d+: /, "")}`,
      process.env.RUN_OPEN_FINDINGS ? {} : { todo: finding },
      async () => {
        const r = rng(SEED ^ 0x6006);
        for (const corruption of open.filter((c) => c.finding === finding)) {
          await damagedRound(r, corruption, "big");
        }
      },
    );
  }
});
