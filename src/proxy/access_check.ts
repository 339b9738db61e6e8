/**
 * {@linkcode glanceAccessCheck}: Glance's access control for cached images.
 *
 * @module
 */
import { createHash } from "node:crypto";
import type { Context, MiddlewareHandler } from "hono";
import { requestPath } from "../_http/path.ts";
import { checkFunction, checkSize } from "../_options.ts";
import { digestFromHeaders, type ExpectedDigest, isDigestAlgorithm } from "../digest.ts";
import type { AuthorizeImage } from "../image_cache.ts";
import { glanceRoutes, type ImageRoute, matchRoute } from "../routes.ts";
import { describeError, parseUpstream, seconds } from "./_shared.ts";

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
    const match = matchRoute(routes, method, requestPath(c.req.url));
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
    const match = own ?? matchRoute(routes, c.req.method, requestPath(c.req.url));
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
