/**
 * The caching proxy's building blocks: put {@linkcode imageCache} in front of
 * a real Glance (or any origin) with one call.
 *
 * - {@linkcode upstreamProxy}: a streaming reverse-proxy handler (hop-by-hop
 *   headers removed, `X-Forwarded-*` and `Forwarded` added, bodies streamed
 *   both ways, `502` when the upstream cannot be reached, `504` when it sends
 *   no headers in time, redirects passed through).
 * - {@linkcode glanceAccessCheck}: before a cached image is served, asks the
 *   upstream `GET /v2/images/{id}` with the client's own credentials (the
 *   answer is cached briefly per credential and image), and verifies fills
 *   with the `os_hash_algo` / `os_hash_value` that metadata announces.
 * - {@linkcode proxyApp}: both, with the cache, the management API behind an
 *   admin check and an access log, as one Hono app. `deno task serve` is a
 *   command line around it.
 *
 * Runtime-neutral: web `fetch`, `Request`, `Response` and streams, plus
 * `node:crypto`.
 *
 * @example A caching proxy in front of Glance
 * ```ts ignore
 * import { FileSystemStore } from "hono-image-cache";
 * import { proxyApp } from "hono-image-cache/proxy";
 *
 * const store = new FileSystemStore({ directory: "/var/cache/glance-proxy" });
 * const proxy = proxyApp({ upstream: "http://glance.internal:9292", store });
 * Deno.serve({ port: 9292 }, proxy.fetch);
 * ```
 *
 * @module
 */
import { createHash, timingSafeEqual } from "node:crypto";
import { type Context, type Handler, Hono, type MiddlewareHandler } from "hono";
import { coreFor } from "./_cache_core.ts";
import { checkFunction, checkSize } from "./_options.ts";
import { digestFromHeaders, type ExpectedDigest, isDigestAlgorithm } from "./digest.ts";
import { type AuthorizeCacheAction, cacheApi } from "./cache_api.ts";
import { type AuthorizeImage, imageCache } from "./image_cache.ts";
import type { ImageStore } from "./image_store.ts";
import { glanceRoutes, type ImageRoute, matchRoute } from "./routes.ts";

/** Headers that belong to one connection (RFC 9110 §7.6.1), never forwarded. */
const HOP_BY_HOP = new Set([
  "connection",
  "keep-alive",
  "proxy-authenticate",
  "proxy-authorization",
  "proxy-connection",
  "te",
  "trailer",
  "transfer-encoding",
  "upgrade",
]);

/** Methods `fetch` refuses to send. */
const FORBIDDEN_METHODS = new Set(["CONNECT", "TRACE", "TRACK"]);

/** Content codings a `fetch` may decode by itself. */
const DECODED_CODINGS = new Set(["gzip", "x-gzip", "deflate", "br", "zstd"]);

/**
 * Whether this runtime's `fetch` decodes a compressed answer whatever the
 * request asked: Node's and Bun's do; Deno's does not once the request said
 * `Accept-Encoding: identity`. The upstream is asked for `identity`, so this
 * only matters for one that compresses anyway.
 */
const FETCH_DECODES = !("Deno" in globalThis);

/** Options of {@linkcode upstreamProxy}. */
export interface UpstreamProxyOptions {
  /**
   * The origin to forward to, `http:` or `https:`, optionally with a path
   * prefix (`https://cloud.example/image`): a request for `/v2/images` goes
   * to `<prefix>/v2/images`.
   */
  upstream: string | URL;
  /**
   * Milliseconds to wait for the upstream's response headers, counted once
   * the request body (if any) has been sent; `504` after that. A body that
   * takes long, either way, is never timed out.
   * @default {30000}
   */
  headerTimeout?: number;
  /**
   * The `fetch` to use (a custom agent, a test double).
   * @default {globalThis.fetch}
   */
  fetch?: (request: Request) => Promise<Response>;
}

/**
 * A Hono handler that forwards every request to `upstream`, streaming.
 *
 * - Method, path, query and end-to-end headers are forwarded; hop-by-hop
 *   headers (and those a `Connection` header names) are removed both ways;
 *   `X-Forwarded-For` and `Forwarded` get the client appended,
 *   `X-Forwarded-Proto` and `X-Forwarded-Host` are set to what the client
 *   used. `Host` is the upstream's.
 * - Request bodies stream to the upstream (`duplex: "half"`), response
 *   bodies stream to the client: nothing is buffered. A streamed upload is
 *   sent chunked (`fetch` does not keep a client's `Content-Length` on a
 *   stream).
 * - The upstream is asked for `Accept-Encoding: identity` (a `fetch` may
 *   decode a compressed answer by itself). An upstream that compresses
 *   anyway: its body is passed on as it came (Deno), or, where `fetch`
 *   decoded it (Node, Bun), without the `Content-Encoding`: never a
 *   mislabelled body.
 * - Redirects are passed through (`redirect: "manual"`); a `Location` that
 *   points into the upstream is rewritten to point at this proxy.
 * - Cannot connect → `502`; no response headers within `headerTimeout` →
 *   `504`. A failure after the headers cuts the client's connection.
 *
 * @param options Where to forward, and how long to wait.
 * @returns The handler, e.g. for `app.all("*", ...)`.
 * @throws {TypeError} When `upstream` is not an absolute `http:` or `https:` URL.
 * @throws {RangeError} When `headerTimeout` is not a non-negative number.
 *
 * @example Forwarding everything to an origin
 * ```ts
 * import { Hono } from "hono";
 * import { upstreamProxy } from "hono-image-cache/proxy";
 * import assert from "node:assert/strict";
 *
 * const origin = (request: Request) =>
 *   Promise.resolve(new Response(`origin saw ${new URL(request.url).pathname}`));
 * const app = new Hono();
 * app.all("*", upstreamProxy({ upstream: "http://glance.internal:9292", fetch: origin }));
 *
 * const res = await app.request("/v2/images?limit=1");
 * assert.equal(await res.text(), "origin saw /v2/images");
 * ```
 */
export function upstreamProxy(options: UpstreamProxyOptions): Handler {
  const base = parseUpstream("upstreamProxy", options?.upstream);
  const headerTimeout = checkSize(
    "upstreamProxy",
    "headerTimeout",
    options.headerTimeout,
    30_000,
  );
  const send = checkFunction(
    "upstreamProxy",
    "fetch",
    options.fetch,
    (request: Request) => fetch(request),
  );
  const basePath = base.pathname.replace(/\/+$/, "");

  return async function upstreamProxy(c: Context): Promise<Response> {
    const incoming = c.req.raw;
    if (FORBIDDEN_METHODS.has(incoming.method)) {
      // fetch cannot send these (and TRACE would echo credentials back).
      return c.text(`Method not allowed through this proxy: ${incoming.method}`, 405);
    }
    const url = c.req.url;
    const pathAndQuery = pathAndQueryOf(url);
    const target = base.origin + basePath + pathAndQuery;
    const headers = forwardHeaders(incoming.headers, url, clientAddress(c));

    const ac = new AbortController();
    let timer: ReturnType<typeof setTimeout> | undefined;
    let timedOut = false;
    const startTimer = () => {
      if (timer !== undefined || ac.signal.aborted) return;
      timer = setTimeout(() => {
        timedOut = true;
        ac.abort(new Error(`No response headers within ${headerTimeout} ms`));
      }, headerTimeout);
    };
    // `incoming.signal` is left alone: Deno warns on any use of it, and a client that
    // leaves before the headers costs at most one upstream request until they come
    // (its unread body is then cancelled). After them, the body belongs to whoever reads
    // it: a fill goes on without the client that started it.

    let body: ReadableStream<Uint8Array> | null = null;
    if (incoming.body !== null && incoming.method !== "GET" && incoming.method !== "HEAD") {
      // The header timeout starts once the whole body is sent: an upload may take hours.
      body = incoming.body.pipeThrough(
        new TransformStream<Uint8Array, Uint8Array>({ flush: startTimer }),
      );
    } else {
      startTimer();
    }

    let response: Response;
    try {
      response = await send(
        new Request(target, {
          method: incoming.method,
          headers,
          body,
          redirect: "manual",
          signal: ac.signal,
          duplex: "half",
        } as RequestInit),
      );
    } catch (error) {
      if (timedOut) {
        return c.text(
          `Gateway timeout: the upstream sent no response headers within ${seconds(headerTimeout)}`,
          504,
        );
      }
      return c.text(
        `Bad gateway: cannot reach the upstream ${base.origin} (${describeError(error)})`,
        502,
      );
    } finally {
      clearTimeout(timer);
    }
    return new Response(response.body, {
      status: response.status,
      statusText: response.statusText,
      headers: responseHeaders(response.headers, base, basePath, url),
    });
  };
}

/** Options of {@linkcode glanceAccessCheck}. */
export interface GlanceAccessCheckOptions {
  /** The Glance (or Glance-like) upstream that answers `GET /v2/images/{id}`. */
  upstream: string | URL;
  /**
   * Milliseconds an answer is reused for the same credential and image.
   * `0` asks the upstream before every hit.
   * @default {30000}
   */
  ttl?: number;
  /**
   * Most answers remembered (least recently used go first).
   * @default {10000}
   */
  maxEntries?: number;
  /**
   * Milliseconds to wait for the upstream's answer; `504` after that.
   * @default {30000}
   */
  timeout?: number;
  /**
   * Request headers that carry the client's identity, forwarded to the
   * metadata request and part of the answer's cache key.
   * @default {["x-auth-token", "authorization", "cookie"]}
   */
  credentialHeaders?: readonly string[];
  /**
   * Which requests are image reads (`serve` routes), to start the check
   * early.
   * @default {glanceRoutes}
   */
  routes?: readonly ImageRoute[];
  /**
   * The `fetch` to use.
   * @default {globalThis.fetch}
   */
  fetch?: (request: Request) => Promise<Response>;
}

/** What the upstream said about one image for one credential. */
export type AccessVerdict =
  | {
    /** The client may read the image. */
    allowed: true;
    /** The digest the metadata announces (`os_hash_algo` / `os_hash_value`), if usable. */
    digest?: ExpectedDigest;
    /** Glance's image status (`active`). */
    imageStatus?: string;
  }
  | {
    /** The client may not read the image (or the upstream could not say). */
    allowed: false;
    /** The status to answer the client with. */
    status: number;
    /** Why, for the client. */
    message: string;
    /** Headers worth passing on (`WWW-Authenticate`). */
    headers: Record<string, string>;
    /** Whether the answer may be reused (a definite "no"; never an outage). */
    cacheable: boolean;
  };

/** The pieces {@linkcode glanceAccessCheck} returns, to hand to {@linkcode imageCache}. */
export interface GlanceAccessCheck {
  /**
   * Starts the check as soon as an image read arrives (so it runs while the
   * cache looks up the entry, or alongside the origin's download on a miss),
   * and forgets the answers for an image a `DELETE` removed. Mount it before
   * `imageCache`.
   */
  middleware: MiddlewareHandler;
  /** For `imageCache({ authorize })`: the upstream's verdict, asked (or remembered). */
  authorize: AuthorizeImage;
  /**
   * For `imageCache({ expectedDigest })`: the metadata's `os_hash_algo` /
   * `os_hash_value` when it announces a supported algorithm (`sha512`,
   * `sha256`, `md5`); otherwise `Content-MD5` / `x-image-meta-checksum`.
   */
  expectedDigest: (c: Context, response: Response) => Promise<ExpectedDigest | undefined>;
  /** The verdict for a request and image id (asked, or remembered). */
  check(request: Request, imageId: string): Promise<AccessVerdict>;
  /** Forgets every remembered answer about `imageId` (all credentials). */
  forget(imageId: string): void;
  /** Answers remembered right now. */
  readonly size: number;
}

interface Remembered {
  verdict: Promise<AccessVerdict>;
  /** When the answer expires; `Infinity` while it is awaited. */
  expires: number;
  imageId: string;
}

/**
 * Access control for cached images, the way Glance decides it: before a
 * cached image is served, the upstream is asked `GET /v2/images/{id}` with
 * the client's own credentials (`X-Auth-Token`, `Authorization`, `Cookie`).
 *
 * - `200` with `status: "active"` → served from the cache.
 * - `401`, `403`, `404` → that status, never cached bytes.
 * - `200` with `deactivated` → `403`; `deleted`, `pending_delete` or any
 *   other status → `404`.
 * - The upstream cannot be reached → `502`; no answer within `timeout` →
 *   `504`; it answers `5xx` or something unreadable → `502`. Cached bytes
 *   are never served without a "yes".
 *
 * Definite answers are remembered for `ttl` per credential and image (a
 * bounded LRU map; credentials are kept as SHA-256 hashes, never raw);
 * concurrent checks of the same pair share one upstream request. An outage
 * is never remembered.
 *
 * The metadata also gives the digest to verify a fill with: Glance's
 * `os_hash_algo` / `os_hash_value` (SHA-512 by default).
 *
 * @param options The upstream and how long to trust an answer.
 * @returns The middleware, `authorize` and `expectedDigest` to give
 *   {@linkcode imageCache}.
 * @throws {TypeError} When `upstream` is not an `http:` / `https:` URL or
 *   `credentialHeaders` is not an array of header names.
 * @throws {RangeError} When `ttl`, `maxEntries` or `timeout` is out of range.
 *
 * @example Glance's access control on cached images
 * ```ts
 * import { Hono } from "hono";
 * import { imageCache, MemoryStore } from "hono-image-cache";
 * import { glanceAccessCheck } from "hono-image-cache/proxy";
 * import assert from "node:assert/strict";
 *
 * // A stand-in for Glance's metadata route: only "alice" may see images.
 * const glance = (request: Request) =>
 *   Promise.resolve(
 *     request.headers.get("x-auth-token") === "alice"
 *       ? Response.json({ status: "active" })
 *       : new Response("Forbidden", { status: 403 }),
 *   );
 * const access = glanceAccessCheck({ upstream: "http://glance.internal:9292", fetch: glance });
 * const app = new Hono();
 * app.use(access.middleware);
 * app.use(imageCache({
 *   store: new MemoryStore(),
 *   authorize: access.authorize,
 *   expectedDigest: access.expectedDigest,
 * }));
 * app.get("/v2/images/:id/file", (c) => c.body("image bytes"));
 *
 * const alice = { headers: { "x-auth-token": "alice" } };
 * await (await app.request("/v2/images/a/file", alice)).text(); // a miss: Glance authorizes it
 * const hit = await app.request("/v2/images/a/file", alice);
 * assert.equal(await hit.text(), "image bytes");
 * const bob = await app.request("/v2/images/a/file", { headers: { "x-auth-token": "bob" } });
 * assert.equal(bob.status, 403);
 * await bob.body?.cancel();
 * ```
 */
export function glanceAccessCheck(options: GlanceAccessCheckOptions): GlanceAccessCheck {
  const owner = "glanceAccessCheck";
  const base = parseUpstream(owner, options?.upstream);
  const basePath = base.pathname.replace(/\/+$/, "");
  const ttl = checkSize(owner, "ttl", options.ttl, 30_000);
  const maxEntries = checkSize(owner, "maxEntries", options.maxEntries, 10_000);
  const timeout = checkSize(owner, "timeout", options.timeout, 30_000);
  const send = checkFunction(owner, "fetch", options.fetch, (request: Request) => fetch(request));
  const routes = options.routes ?? glanceRoutes;
  const credentialHeaders = options.credentialHeaders ??
    ["x-auth-token", "authorization", "cookie"];
  if (
    !Array.isArray(credentialHeaders) ||
    !credentialHeaders.every((name) => typeof name === "string" && /^[\w-]+$/.test(name))
  ) {
    throw new TypeError(
      `Cannot create ${owner}: "credentialHeaders" must be an array of header names, received ${
        JSON.stringify(credentialHeaders)
      }`,
    );
  }
  const credentialNames = credentialHeaders.map((name) => name.toLowerCase());

  const remembered = new Map<string, Remembered>();
  /** The check a request started (the middleware), so `authorize` and `expectedDigest` share it. */
  const started = new WeakMap<Request, { imageId: string; verdict: Promise<AccessVerdict> }>();

  const keyOf = (request: Request, imageId: string) => {
    const hash = createHash("sha256");
    for (const name of credentialNames) {
      hash.update(`${name}\0${request.headers.get(name) ?? ""}\0`);
    }
    return `${hash.digest("base64")} ${imageId}`;
  };

  const ask = async (request: Request, imageId: string): Promise<AccessVerdict> => {
    const headers = new Headers({ accept: "application/json", "accept-encoding": "identity" });
    for (const name of credentialNames) {
      const value = request.headers.get(name);
      if (value !== null) headers.set(name, value);
    }
    const url = `${base.origin}${basePath}/v2/images/${encodeURIComponent(imageId)}`;
    const ac = new AbortController();
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      ac.abort(new Error(`No answer within ${timeout} ms`));
    }, timeout);
    try {
      const response = await send(
        new Request(url, { headers, redirect: "manual", signal: ac.signal }),
      );
      return await judge(response, imageId);
    } catch (error) {
      if (timedOut) {
        return refusal(
          504,
          `Gateway timeout: the upstream did not answer the access check for image ${
            JSON.stringify(imageId)
          } within ${seconds(timeout)}`,
          false,
        );
      }
      return refusal(
        502,
        `Bad gateway: cannot check access to image ${
          JSON.stringify(imageId)
        } with the upstream ${base.origin} (${describeError(error)})`,
        false,
      );
    } finally {
      clearTimeout(timer);
    }
  };

  const check = (request: Request, imageId: string): Promise<AccessVerdict> => {
    const own = started.get(request);
    if (own !== undefined && own.imageId === imageId) return own.verdict;
    const key = keyOf(request, imageId);
    const now = Date.now();
    const known = remembered.get(key);
    if (known !== undefined) {
      remembered.delete(key);
      if (known.expires > now) {
        remembered.set(key, known); // most recently used last
        return known.verdict;
      }
    }
    const verdict = ask(request, imageId);
    const entry: Remembered = { verdict, expires: Infinity, imageId };
    remembered.set(key, entry);
    while (remembered.size > maxEntries) {
      remembered.delete(remembered.keys().next().value as string);
    }
    verdict.then((answer) => {
      if (remembered.get(key) !== entry) return;
      const keep = ttl > 0 && (answer.allowed || answer.cacheable);
      if (keep) entry.expires = Date.now() + ttl;
      else remembered.delete(key);
    });
    return verdict;
  };

  const forget = (imageId: string) => {
    for (const [key, entry] of remembered) {
      if (entry.imageId === imageId) remembered.delete(key);
    }
  };

  const middleware: MiddlewareHandler = async function glanceAccessCheck(c, next) {
    const method = c.req.method;
    const match = matchRoute(routes, method, pathOf(c.req.url));
    if (match === undefined) return next();
    if (match.route.action === "serve") {
      const request = c.req.raw;
      started.set(request, { imageId: match.id, verdict: check(request, match.id) });
      return next();
    }
    await next();
    // Whatever the answer, a DELETE may have changed what the upstream would say.
    forget(match.id);
  };

  const authorize: AuthorizeImage = async (c, imageId) => {
    const verdict = await check(c.req.raw, imageId);
    if (verdict.allowed) return true;
    return new Response(`${verdict.message}\n`, {
      status: verdict.status,
      headers: {
        "content-type": "text/plain; charset=UTF-8",
        "cache-status": `hono-image-cache; detail=${
          verdict.cacheable ? "access-denied" : "access-check-failed"
        }`,
        ...verdict.headers,
      },
    });
  };

  const expectedDigest = async (c: Context, response: Response) => {
    const own = started.get(c.req.raw);
    const match = own ?? matchRoute(routes, c.req.method, pathOf(c.req.url));
    if (match !== undefined) {
      const imageId = "imageId" in match ? match.imageId : match.id;
      const verdict = await check(c.req.raw, imageId);
      if (verdict.allowed && verdict.digest !== undefined) return verdict.digest;
    }
    return digestFromHeaders(response.headers);
  };

  return {
    middleware,
    authorize,
    expectedDigest,
    check,
    forget,
    get size() {
      return remembered.size;
    },
  };
}

/** Largest metadata answer read (Glance's are a few KiB). */
const METADATA_LIMIT = 1 << 20;

async function judge(response: Response, imageId: string): Promise<AccessVerdict> {
  const status = response.status;
  const quoted = JSON.stringify(imageId);
  if (status === 401 || status === 403 || status === 404) {
    await response.body?.cancel();
    const headers: Record<string, string> = {};
    const challenge = response.headers.get("www-authenticate");
    if (challenge !== null) headers["www-authenticate"] = challenge;
    const reason = status === 401
      ? `Unauthorized: the upstream did not accept the credentials for image ${quoted}`
      : status === 403
      ? `Forbidden: the upstream does not allow reading image ${quoted}`
      : `Not found: the upstream has no image ${quoted} for these credentials`;
    return { allowed: false, status, message: reason, headers, cacheable: true };
  }
  if (status !== 200) {
    await response.body?.cancel();
    const passOn = status >= 400 && status < 500;
    return refusal(
      passOn ? status : 502,
      `${
        passOn ? "Refused" : "Bad gateway"
      }: the upstream answered ${status} to the access check for image ${quoted}`,
      false,
    );
  }
  let metadata: unknown;
  try {
    metadata = JSON.parse(await limitedText(response, METADATA_LIMIT));
  } catch {
    metadata = undefined;
  }
  if (metadata === null || typeof metadata !== "object" || Array.isArray(metadata)) {
    return refusal(
      502,
      `Bad gateway: the upstream's metadata for image ${quoted} is not a JSON object`,
      false,
    );
  }
  const fields = metadata as Record<string, unknown>;
  const imageStatus = typeof fields.status === "string" ? fields.status : undefined;
  if (imageStatus !== undefined && imageStatus !== "active") {
    return imageStatus === "deactivated"
      ? refusal(403, `Forbidden: image ${quoted} is deactivated`, true)
      : refusal(404, `Not found: image ${quoted} is ${imageStatus}, not active`, true);
  }
  const algorithm = typeof fields.os_hash_algo === "string"
    ? fields.os_hash_algo.toLowerCase()
    : undefined;
  const value = fields.os_hash_value;
  const digest = isDigestAlgorithm(algorithm) && typeof value === "string"
    ? { algorithm, value }
    : undefined;
  return { allowed: true, digest, imageStatus };
}

function refusal(status: number, message: string, cacheable: boolean): AccessVerdict {
  return { allowed: false, status, message, headers: {}, cacheable };
}

/** A body as text, refusing more than `limit` bytes (a metadata answer, never an image). */
async function limitedText(response: Response, limit: number): Promise<string> {
  const reader = response.body?.getReader();
  if (reader === undefined) return "";
  const parts: Uint8Array[] = [];
  let length = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    length += value.byteLength;
    if (length > limit) {
      await reader.cancel();
      throw new RangeError(`Answer larger than ${limit} bytes`);
    }
    parts.push(value);
  }
  const bytes = new Uint8Array(length);
  let at = 0;
  for (const part of parts) {
    bytes.set(part, at);
    at += part.byteLength;
  }
  return new TextDecoder().decode(bytes);
}

/** One request, as the access log sees it. */
export interface AccessLogEntry {
  /** When the request arrived. */
  time: Date;
  /** The client's address, when the server tells it. */
  client: string | undefined;
  /** Request method. */
  method: string;
  /** Request path, without the query (which may carry secrets). */
  path: string;
  /** Response status. */
  status: number;
  /**
   * What the cache did: `hit`, `miss` (stored), `collapsed` (joined a fill),
   * `pass:<detail>` (went to the origin, not stored), `denied` (the access
   * check said no), `check-failed` (it could not be asked), `-` (not an
   * image request).
   */
  cache: string;
  /**
   * Body bytes sent to the client; `undefined` when not known (a hit the
   * client hung up on, on Deno, where hit bodies are not wrapped to be
   * counted).
   */
  bytes: number | undefined;
  /** Milliseconds from the request to the end of the body. */
  durationMs: number;
  /**
   * How the body ended: sent in full, the client hung up, or it failed (a
   * cut connection). `sent`: a hit handed to a server that does not report
   * delivery (Bun); logged at once.
   */
  outcome: "complete" | "aborted" | "error" | "sent";
}

/**
 * One access-log line: time, client, method, path, status, cache status,
 * bytes, duration and throughput, as `key=value` pairs.
 *
 * @param entry The request.
 * @returns The line, without a newline.
 *
 * @example One line per request
 * ```ts
 * import { formatAccessLog } from "hono-image-cache/proxy";
 * import assert from "node:assert/strict";
 *
 * const line = formatAccessLog({
 *   time: new Date(0), client: "10.0.0.7", method: "GET", path: "/v2/images/a/file",
 *   status: 200, cache: "hit", bytes: 16777216, durationMs: 80, outcome: "complete",
 * });
 * assert.equal(
 *   line,
 *   '1970-01-01T00:00:00.000Z client=10.0.0.7 method=GET path="/v2/images/a/file" status=200 cache=hit bytes=16777216 ms=80.0 MiB/s=200.0 end=complete',
 * );
 * ```
 */
export function formatAccessLog(entry: AccessLogEntry): string {
  const seconds = entry.durationMs / 1000;
  const rate = seconds > 0 && entry.bytes !== undefined
    ? (entry.bytes / 2 ** 20 / seconds).toFixed(1)
    : "-";
  return [
    entry.time.toISOString(),
    `client=${entry.client ?? "-"}`,
    `method=${entry.method}`,
    `path=${JSON.stringify(entry.path)}`,
    `status=${entry.status}`,
    `cache=${entry.cache}`,
    `bytes=${entry.bytes ?? "-"}`,
    `ms=${entry.durationMs.toFixed(1)}`,
    `MiB/s=${rate}`,
    `end=${entry.outcome}`,
  ].join(" ");
}

/** What a `Cache-Status` header says, in a word for the log. */
function cacheWord(header: string | null): string {
  if (header === null) return "-";
  if (/;\s*hit\b/.test(header)) return "hit";
  if (/\bcollapsed\b/.test(header)) return "collapsed";
  if (/\bstored\b/.test(header)) return "miss";
  const detail = /detail=([^;,\s]+)/.exec(header)?.[1];
  if (detail === "access-denied" || detail === "forbidden") return "denied";
  if (detail === "access-check-failed") return "check-failed";
  return detail === undefined ? "-" : `pass:${detail}`;
}

/** The access-log middleware: counts body bytes without buffering, logs when the body ends. */
function accessLog(
  onLog: (entry: AccessLogEntry) => void,
  logHits: boolean,
): MiddlewareHandler {
  return async function accessLog(c, next) {
    const time = new Date();
    const start = performance.now();
    await next();
    const res = c.res;
    const cache = cacheWord(res.headers.get("cache-status"));
    if (!logHits && cache === "hit") return;
    let bytes = 0;
    let bytesKnown = true;
    // Read now: Deno's request is gone once the response has been sent.
    const client = clientAddress(c);
    const method = c.req.method;
    const path = pathOf(c.req.url);
    const log = (outcome: AccessLogEntry["outcome"]) => {
      try {
        onLog({
          time,
          client,
          method,
          path,
          status: res.status,
          cache,
          bytes: bytesKnown ? bytes : undefined,
          durationMs: performance.now() - start,
          outcome,
        });
      } catch {
        // A failing logger must not fail the request.
      }
    };
    if (res.body === null) return log("complete");
    const length = res.headers.get("content-length");
    const announced = length === null ? -1 : Number(length);
    // A hit keeps its file-backed body: the runtime sends it without a round trip through
    // JavaScript per chunk (Deno), with sendfile and its Content-Length (Bun). Wrapping it
    // to count would lose that (it halved the throughput of large hits on Deno). The
    // server says when it was delivered where it can; Bun cannot, so its hits are logged
    // as "sent" when handed over.
    if (cache === "hit" && announced >= 0) {
      const delivered = deliveryOf(c);
      if (delivered === undefined) {
        bytes = announced;
        log("sent");
        return;
      }
      delivered.then(() => {
        bytes = announced;
        log("complete");
      }, () => {
        bytesKnown = false;
        log("aborted");
      });
      return;
    }
    const reader = res.body.getReader();
    let ended = false;
    const end = (outcome: AccessLogEntry["outcome"]) => {
      if (ended) return;
      ended = true;
      log(outcome);
    };
    const counted = new ReadableStream<Uint8Array>({
      async pull(controller) {
        let result;
        try {
          result = await reader.read();
        } catch (error) {
          end("error");
          controller.error(error);
          return;
        }
        if (result.done) {
          end("complete");
          controller.close();
          return;
        }
        bytes += result.value.byteLength;
        controller.enqueue(result.value);
      },
      cancel(reason) {
        // A server may cancel the body once it sent `Content-Length` bytes (Deno does).
        end(bytes === announced ? "complete" : "aborted");
        return reader.cancel(reason);
      },
    }, { highWaterMark: 0 });
    c.res = undefined;
    c.res = new Response(counted, res);
  };
}

/**
 * An admin check for the management API: the request must carry `token` as
 * `Authorization: Bearer <token>` or `X-Auth-Token: <token>`. Compared in
 * constant time.
 *
 * @param token The admin token (at least 16 characters).
 * @returns An `authorize` function for `cacheApi`: `401` without a token,
 *   `403` with a wrong one.
 * @throws {TypeError} When `token` is not a string of at least 16 characters.
 *
 * @example Guarding a route with the admin token
 * ```ts
 * import { Hono } from "hono";
 * import { adminTokenCheck } from "hono-image-cache/proxy";
 * import assert from "node:assert/strict";
 *
 * const authorize = adminTokenCheck("s3cret-admin-token-0123");
 * const app = new Hono();
 * app.get("/admin", async (c) => {
 *   const verdict = await authorize(c, "cache_list");
 *   return verdict === true ? c.text("ok") : verdict as Response;
 * });
 * const ok = await app.request("/admin", {
 *   headers: { authorization: "Bearer s3cret-admin-token-0123" },
 * });
 * assert.equal(await ok.text(), "ok");
 * const no = await app.request("/admin");
 * assert.equal(no.status, 401);
 * await no.body?.cancel();
 * ```
 */
export function adminTokenCheck(token: string): AuthorizeCacheAction {
  if (typeof token !== "string" || token.length < 16) {
    throw new TypeError(
      `Cannot create adminTokenCheck: "token" must be a string of at least 16 characters, received ${
        typeof token === "string" ? `${token.length} characters` : typeof token
      }`,
    );
  }
  const expected = createHash("sha256").update(token).digest();
  return function adminTokenCheck(c) {
    const bearer = /^Bearer\s+(.+)$/i.exec(c.req.header("authorization") ?? "")?.[1];
    const given = bearer ?? c.req.header("x-auth-token");
    if (given === undefined) {
      return c.text("Unauthorized: the management API needs the admin token", 401, {
        "www-authenticate": 'Bearer realm="hono-image-cache"',
      });
    }
    const actual = createHash("sha256").update(given.trim()).digest();
    if (timingSafeEqual(actual, expected)) return true;
    return c.text("Forbidden: wrong admin token", 403);
  };
}

/** Options of {@linkcode proxyApp}. */
export interface ProxyAppOptions {
  /** The origin: a Glance endpoint (`http://glance.internal:9292`) or any HTTP origin. */
  upstream: string | URL;
  /** Where images are kept. */
  store: ImageStore;
  /**
   * Glance's access check on hits (see {@linkcode glanceAccessCheck}), with
   * its options; `false` serves hits without asking (only for an origin
   * whose images are public).
   * @default {true}
   */
  accessCheck?: boolean | Omit<GlanceAccessCheckOptions, "upstream" | "fetch" | "routes">;
  /**
   * Mounts the management API (`/v2/cache`...) behind this token
   * (`Authorization: Bearer` or `X-Auth-Token`). Without it (and without
   * `authorizeAdmin`) the management API is not mounted and those paths go
   * to the upstream.
   */
  adminToken?: string;
  /** Mounts the management API behind this decision instead of a token. */
  authorizeAdmin?: AuthorizeCacheAction;
  /**
   * The credential (`X-Auth-Token`) the cache downloads with when no client
   * is there: prefetches (`PUT /v2/cache/{id}`) and the background fill a
   * `Range` miss starts. Without it, prefetches go without credentials
   * (enough for an origin without authentication) and `Range` misses start
   * no background fill. A function is asked before each download, so a
   * token that expires (Keystone's do) can be renewed without a restart.
   */
  serviceToken?: string | (() => string | Promise<string>);
  /**
   * Prefetches at once.
   * @default {2}
   */
  prefetchConcurrency?: number;
  /**
   * Milliseconds to wait for upstream response headers; see
   * {@linkcode UpstreamProxyOptions.headerTimeout}.
   * @default {30000}
   */
  headerTimeout?: number;
  /**
   * Which requests are image reads and deletes.
   * @default {glanceRoutes}
   */
  routes?: readonly ImageRoute[];
  /** Called once per request when its body ended (see {@linkcode formatAccessLog}). */
  onLog?: (entry: AccessLogEntry) => void;
  /**
   * Log hits too; `false` keeps the log to misses and everything else (and
   * hit bodies are not even wrapped to be counted).
   * @default {true}
   */
  logHits?: boolean;
  /**
   * Cache-side faults.
   * @default {console.warn}
   */
  onError?: (error: unknown, c?: Context) => void;
  /**
   * The `fetch` to reach the upstream with.
   * @default {globalThis.fetch}
   */
  fetch?: (request: Request) => Promise<Response>;
}

/** What {@linkcode proxyApp} builds. */
export interface ProxyApp {
  /** The Hono app: access log, access check, management API, cache, proxy. */
  readonly app: Hono;
  /** `app.fetch`, for `Deno.serve`, `Bun.serve` or `@hono/node-server`. */
  readonly fetch: (request: Request, env?: unknown) => Response | Promise<Response>;
  /** Whether the management API is mounted. */
  readonly managed: boolean;
  /** Stops the background work (prefetch worker, cleaning timer); prefetches under way are aborted. */
  close(): void;
  /** Ids of the fills under way. */
  filling(): string[];
  /**
   * Waits for the fills under way, at most `timeout` ms (shutdown).
   * Resolves `true` when none is left.
   */
  settle(timeout: number): Promise<boolean>;
}

/**
 * The whole caching proxy as one Hono app: every request is forwarded to
 * `upstream` ({@linkcode upstreamProxy}); Glance's image reads are answered
 * from `store` once cached, after the upstream said the client may read the
 * image ({@linkcode glanceAccessCheck}); fills are verified with the
 * metadata's SHA-512 (or `Content-MD5`); a `DELETE` through the proxy
 * evicts; the management API is mounted behind an admin check; each request
 * is logged once its body ends.
 *
 * @param options The upstream, the store, and the checks.
 * @returns The app and what shutdown needs.
 * @throws {TypeError} When `upstream` or `store` is missing or malformed.
 * @throws {RangeError} When a timeout or size is out of range.
 *
 * @example A caching proxy, tested without a network
 * ```ts
 * import { MemoryStore } from "hono-image-cache";
 * import { demoOrigin } from "hono-image-cache/testing";
 * import { proxyApp } from "hono-image-cache/proxy";
 * import assert from "node:assert/strict";
 *
 * const { app: glance, stats } = demoOrigin({ images: { cirros: { size: 1000 } } });
 * const proxy = proxyApp({
 *   upstream: "http://glance.internal:9292",
 *   store: new MemoryStore(),
 *   fetch: (request) => Promise.resolve(glance.fetch(request)),
 * });
 * await (await proxy.app.request("/v2/images/cirros/file")).arrayBuffer();
 * const hit = await proxy.app.request("/v2/images/cirros/file");
 * assert.equal(hit.headers.get("cache-status"), "hono-image-cache; hit");
 * assert.equal(hit.headers.get("etag")?.startsWith('"sha512-'), true);
 * await hit.body?.cancel();
 * assert.equal(stats.reads.cirros, 1);
 * ```
 */
export function proxyApp(options: ProxyAppOptions): ProxyApp {
  const owner = "proxyApp";
  const store = options?.store;
  if (store === null || typeof store !== "object" || typeof store.get !== "function") {
    throw new TypeError(
      `Cannot create ${owner}: "store" must be an ImageStore, received ${typeof store}`,
    );
  }
  const upstream = parseUpstream(owner, options.upstream);
  const routes = options.routes ?? glanceRoutes;
  const send = checkFunction(owner, "fetch", options.fetch, (request: Request) => fetch(request));
  const headerTimeout = checkSize(owner, "headerTimeout", options.headerTimeout, 30_000);
  const onLog = checkFunction(owner, "onLog", options.onLog, undefined);
  const serviceToken = options.serviceToken;
  if (
    serviceToken !== undefined && typeof serviceToken !== "function" &&
    (typeof serviceToken !== "string" || !/^[\x21-\x7e]+$/.test(serviceToken))
  ) {
    throw new TypeError(
      `Cannot create ${owner}: "serviceToken" must be a non-empty string of printable ASCII or a function, received ${typeof serviceToken}`,
    );
  }
  const authorizeAdmin = options.authorizeAdmin !== undefined
    ? checkFunction(owner, "authorizeAdmin", options.authorizeAdmin, undefined)
    : options.adminToken !== undefined
    ? adminTokenCheck(options.adminToken)
    : undefined;

  const app = new Hono();
  if (onLog !== undefined) app.use(accessLog(onLog, options.logHits ?? true));

  let access: GlanceAccessCheck | undefined;
  const accessOptions = options.accessCheck ?? true;
  if (accessOptions !== false) {
    access = glanceAccessCheck({
      ...(accessOptions === true ? {} : accessOptions),
      upstream,
      routes,
      timeout: accessOptions !== true && accessOptions.timeout !== undefined
        ? accessOptions.timeout
        : headerTimeout,
      fetch: send,
    });
    app.use(access.middleware);
  }

  // Downloads without a client (prefetch, the background fill of a Range miss): with
  // the service token, and verified with the metadata's digest that credential sees.
  const serviceDigests = new WeakMap<Response, ExpectedDigest>();
  const basePath = upstream.pathname.replace(/\/+$/, "");
  const fetchImage = async (imageId: string, signal: AbortSignal): Promise<Response> => {
    const serviceHeaders = new Headers({ "accept-encoding": "identity" });
    const token = typeof serviceToken === "function" ? await serviceToken() : serviceToken;
    if (token !== undefined && token !== "") serviceHeaders.set("x-auth-token", token.trim());
    const metadata = access?.check(
      new Request(`${upstream.origin}/`, { headers: serviceHeaders }),
      imageId,
    );
    const response = await send(
      new Request(`${upstream.origin}${basePath}/v2/images/${encodeURIComponent(imageId)}/file`, {
        headers: serviceHeaders,
        signal,
        redirect: "manual",
      }),
    );
    // A Response of the global class: @hono/node-server replaces the global `Response`,
    // and `fetch` still makes undici's (the cache checks `instanceof Response`).
    const answer: Response = response instanceof Response
      ? response
      : new Response((response as Response).body, response as Response);
    const verdict = await metadata;
    if (verdict?.allowed && verdict.digest !== undefined) {
      serviceDigests.set(answer, verdict.digest);
    }
    return answer;
  };
  const serviceDigest = (response: Response) =>
    serviceDigests.get(response) ?? digestFromHeaders(response.headers);

  const background = new AbortController();
  const managed = authorizeAdmin !== undefined;
  if (authorizeAdmin !== undefined) {
    app.route(
      "/",
      cacheApi({
        store,
        authorize: authorizeAdmin,
        fetchImage,
        expectedDigest: serviceDigest,
        prefetchConcurrency: options.prefetchConcurrency,
        onError: options.onError,
        signal: background.signal,
      }),
    );
  }

  app.use(imageCache({
    store,
    routes,
    authorize: access?.authorize,
    expectedDigest: access?.expectedDigest,
    onError: options.onError,
    fetchImage: serviceToken === undefined ? undefined : fetchImage,
  }));
  app.all("*", upstreamProxy({ upstream, headerTimeout, fetch: send }));

  const core = coreFor(store);
  return {
    app,
    fetch: app.fetch,
    managed,
    close: () => background.abort(),
    filling: () => core.filling(),
    async settle(timeout: number) {
      let timer: ReturnType<typeof setTimeout> | undefined;
      const expired = new Promise<false>((resolve) => {
        timer = setTimeout(() => resolve(false), timeout);
      });
      try {
        return await Promise.race([core.settle().then(() => true), expired]);
      } finally {
        clearTimeout(timer);
      }
    },
  };
}

/** Checks an upstream URL: absolute, `http:` or `https:`, no query, fragment or credentials. */
function parseUpstream(owner: string, value: unknown): URL {
  let url: URL | undefined;
  try {
    url = value instanceof URL ? new URL(value.href) : new URL(String(value));
  } catch {
    url = undefined;
  }
  if (
    (typeof value !== "string" && !(value instanceof URL)) || url === undefined ||
    (url.protocol !== "http:" && url.protocol !== "https:") || url.search !== "" ||
    url.hash !== "" || url.username !== "" || url.password !== ""
  ) {
    throw new TypeError(
      `Cannot create ${owner}: "upstream" must be an absolute http: or https: URL without query, fragment or credentials, received ${
        JSON.stringify(value instanceof URL ? value.href : value)
      }`,
    );
  }
  return url;
}

/** The path of a URL as sent (still percent-encoded), without the query. */
function pathOf(url: string): string {
  const start = url.indexOf("/", url.indexOf("://") + 3);
  if (start === -1) return "/";
  const end = url.search(/[?#]/);
  return url.slice(start, end === -1 ? undefined : end);
}

/** The path and query of a URL as sent, without the fragment. */
function pathAndQueryOf(url: string): string {
  const start = url.indexOf("/", url.indexOf("://") + 3);
  if (start === -1) return "/";
  const hash = url.indexOf("#", start);
  return url.slice(start, hash === -1 ? undefined : hash);
}

/** Names a `Connection` header lists: more hop-by-hop headers (RFC 9110 §7.6.1). */
function connectionListed(headers: Headers): Set<string> {
  const listed = new Set<string>();
  for (const name of (headers.get("connection") ?? "").split(",")) {
    const trimmed = name.trim().toLowerCase();
    if (trimmed !== "") listed.add(trimmed);
  }
  return listed;
}

/** The headers to send upstream. */
function forwardHeaders(incoming: Headers, url: string, client: string | undefined): Headers {
  const listed = connectionListed(incoming);
  const headers = new Headers();
  for (const [name, value] of incoming) {
    if (
      HOP_BY_HOP.has(name) || listed.has(name) || name === "host" || name === "content-length" ||
      name === "expect" || name === "accept-encoding"
    ) continue;
    headers.append(name, value);
  }
  headers.set("accept-encoding", "identity");
  const proto = url.startsWith("https:") ? "https" : "http";
  const host = incoming.get("host") ?? new URL(url).host;
  const forwardedFor = incoming.get("x-forwarded-for");
  if (client !== undefined) {
    headers.set("x-forwarded-for", forwardedFor ? `${forwardedFor}, ${client}` : client);
  }
  headers.set("x-forwarded-proto", proto);
  headers.set("x-forwarded-host", host);
  // RFC 7239 §4: an IPv6 node is quoted and bracketed; an unknown one is "unknown".
  const node = client === undefined ? "unknown" : client.includes(":") ? `"[${client}]"` : client;
  const element = `for=${node};host=${JSON.stringify(host)};proto=${proto}`;
  const forwarded = incoming.get("forwarded");
  headers.set("forwarded", forwarded ? `${forwarded}, ${element}` : element);
  return headers;
}

/** The upstream's response headers, for the client. */
function responseHeaders(
  upstream: Headers,
  base: URL,
  basePath: string,
  requestUrl: string,
): Headers {
  const listed = connectionListed(upstream);
  const headers = new Headers();
  for (const [name, value] of upstream) {
    if (HOP_BY_HOP.has(name) || listed.has(name)) continue;
    headers.append(name, value);
  }
  const coding = upstream.get("content-encoding")?.trim().toLowerCase();
  if (FETCH_DECODES && coding !== undefined && DECODED_CODINGS.has(coding)) {
    // fetch already decoded the body: the coding and its length no longer describe it.
    headers.delete("content-encoding");
    headers.delete("content-length");
  }
  const location = upstream.get("location");
  // A relative Location already points at this proxy; only an absolute one is rewritten.
  if (location !== null && /^[a-z][a-z0-9+.-]*:/i.test(location)) {
    try {
      const resolved = new URL(location);
      if (
        resolved.origin === base.origin &&
        (resolved.pathname === basePath || resolved.pathname.startsWith(basePath + "/"))
      ) {
        const own = new URL(requestUrl);
        const path = resolved.pathname.slice(basePath.length) || "/";
        headers.set("location", own.origin + path + resolved.search + resolved.hash);
      }
    } catch {
      // A Location that is not a URL is passed on as the upstream sent it.
    }
  }
  return headers;
}

/**
 * Settles when the server has delivered the response (rejects when it could
 * not), from whichever server runs the app: Deno's `info.completed`, the
 * Node response's `finish` / `close` events; `undefined` elsewhere (Bun).
 */
function deliveryOf(c: Context): Promise<void> | undefined {
  const env = c.env as Record<string, unknown> | undefined;
  if (env === null || typeof env !== "object") return undefined;
  if (env.completed instanceof Promise) return env.completed as Promise<void>;
  const outgoing = env.outgoing as {
    writableFinished?: boolean;
    once?: (event: string, listener: () => void) => void;
  } | undefined;
  if (typeof outgoing?.once === "function") {
    return new Promise<void>((resolve, reject) => {
      outgoing.once!("finish", () => resolve());
      outgoing.once!("close", () => {
        if (outgoing.writableFinished) resolve();
        else reject(new Error("The connection closed before the response was sent"));
      });
    });
  }
  return undefined;
}

/** The client's address, from whichever server runs the app. */
function clientAddress(c: Context): string | undefined {
  const env = c.env as Record<string, unknown> | undefined;
  if (env === null || typeof env !== "object") return undefined;
  // Deno.serve: the handler's second argument, `{ remoteAddr: { hostname } }`.
  const remote = env.remoteAddr as { hostname?: unknown } | undefined;
  if (typeof remote?.hostname === "string") return remote.hostname;
  // @hono/node-server: `{ incoming: IncomingMessage }`.
  const incoming = env.incoming as { socket?: { remoteAddress?: unknown } } | undefined;
  if (typeof incoming?.socket?.remoteAddress === "string") return incoming.socket.remoteAddress;
  // Bun.serve: the server, with `requestIP(request)`.
  const requestIP = (env as { requestIP?: unknown }).requestIP;
  if (typeof requestIP === "function") {
    try {
      const address = requestIP.call(env, c.req.raw) as { address?: unknown } | null;
      if (typeof address?.address === "string") return address.address;
    } catch {
      // Not Bun's server after all.
    }
  }
  return undefined;
}

function describeError(error: unknown): string {
  let current = error;
  for (let depth = 0; depth < 5 && current instanceof Error; depth++) {
    const code = (current as { code?: unknown }).code;
    if (typeof code === "string") return `${code}: ${current.message}`;
    if (current.cause === undefined) return current.message;
    current = current.cause;
  }
  return String(current);
}

function seconds(ms: number): string {
  return ms % 1000 === 0 ? `${ms / 1000} s` : `${ms} ms`;
}
