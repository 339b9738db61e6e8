/**
 * {@linkcode glanceAccessCheck}: Glance's access control for cached images.
 *
 * @module
 */
import { createHash } from "node:crypto";
import type { Context, MiddlewareHandler } from "hono";
import { requestPath } from "../_http/path.ts";
import { checkFunction, checkSize } from "../_options.ts";
import type { ExpectedDigest } from "../digest.ts";
import type { AuthorizeImage } from "../image_cache.ts";
import { glanceRoutes, type ImageRoute, matchRoute } from "../routes.ts";
import type { ProxyEvent } from "./access_log.ts";
import {
  fillDigest,
  type GlanceEndpoint,
  GONE_STATUSES,
  imageMetadata,
  serviceCredentials,
} from "./_metadata.ts";
import { askUpstream, credentialsOf, notesOf, parseUpstream, UpstreamFailure } from "./_shared.ts";

/** Options of {@linkcode glanceAccessCheck}. */
export interface GlanceAccessCheckOptions {
  /** The Glance (or Glance-like) upstream that answers `GET /v2/images/{id}/file`. */
  upstream: string | URL;
  /**
   * Milliseconds an answer is reused for the same credential and image.
   * `0` asks the upstream before every hit. An "allowed" outlives a revoked
   * token or a deleted image by up to this long.
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
   * upstream's check and part of the answer's cache key.
   * @default {["x-auth-token", "authorization", "cookie"]}
   */
  credentialHeaders?: readonly string[];
  /**
   * Which requests are image reads and deletes (`serve` and `evict` routes).
   * @default {glanceRoutes}
   */
  routes?: readonly ImageRoute[];
  /**
   * A credential (`X-Auth-Token`) that sees every image: it confirms that an
   * image another credential gets `404` for is deleted (then `onGone`), and
   * reads the metadata a client may not (the digest). A function is asked
   * each time (a token that a job renews).
   */
  serviceToken?: string | (() => string | Promise<string>);
  /**
   * Milliseconds after an "allowed" answer during which a cached image is
   * still served to that credential when the upstream cannot be reached or
   * answers `5xx` (never when it says no): nginx's `proxy_cache_use_stale`,
   * Varnish's grace. `0`: never.
   * @default {0}
   */
  staleIfError?: number;
  /**
   * Called when the upstream reports an image deleted: a `404` to a
   * credential it allowed before, or one the service credential confirms.
   * `proxyApp` evicts the image.
   */
  onGone?: (imageId: string) => void | Promise<void>;
  /** Outages, deletions and stale answers, for the log. */
  onEvent?: (event: ProxyEvent) => void;
  /** Called with each verdict `authorize` acts on (for metrics). */
  onVerdict?: (verdict: AccessVerdict) => void;
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
    /**
     * Allowed by an answer older than the TTL because the upstream could not
     * be asked (`staleIfError`).
     */
    stale?: boolean;
    /** Answered from memory, without asking the upstream. */
    remembered?: boolean;
  }
  | {
    /** The client may not read the image (or the upstream could not say). */
    allowed: false;
    /** The status to answer the client with. */
    status: number;
    /** Why, for the client (never the upstream's address). */
    message: string;
    /** Headers worth passing on (`WWW-Authenticate`). */
    headers: Record<string, string>;
    /** Whether the answer may be reused (a definite "no"; never an outage). */
    cacheable: boolean;
    /** Set when the upstream could not be reached, was too slow, or answered `5xx`. */
    outage?: "unreachable" | "timeout" | "status-5xx";
    /** Answered from memory, without asking the upstream. */
    remembered?: boolean;
  };

/** The pieces {@linkcode glanceAccessCheck} returns, to hand to {@linkcode imageCache}. */
export interface GlanceAccessCheck {
  /**
   * Forgets the answers for an image a `DELETE` through the proxy removed.
   * Mount it before `imageCache`.
   */
  middleware: MiddlewareHandler;
  /** For `imageCache({ authorize })`: the upstream's verdict, asked (or remembered). */
  authorize: AuthorizeImage;
  /**
   * For `imageCache({ expectedDigest })`: the metadata's `os_hash_algo` /
   * `os_hash_value` (else its `checksum`, else `Content-MD5`), asked with
   * the client's credentials (or the service token when they are refused).
   * Rejects when the metadata cannot be had: that fill is not cached.
   */
  expectedDigest: (c: Context, response: Response) => Promise<ExpectedDigest | undefined>;
  /** The verdict for a request and image id (asked, or remembered). */
  check(request: Request, imageId: string): Promise<AccessVerdict>;
  /**
   * Remembers what the upstream answered to this request's own download of
   * `imageId` (a miss): `200`/`206` is Glance's "yes", `401`/`403`/`404`
   * its "no"; other statuses teach nothing.
   */
  learn(request: Request, imageId: string, status: number): void;
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
  /** When this credential was last allowed to read this image, until a "no" (survives refreshes). */
  allowedAt?: number;
  /** Whether this credential was ever allowed to read this image (a later 404: deleted). */
  everAllowed: boolean;
}

/**
 * Access control for cached images, the way Glance decides a download:
 * before a cached image is served, the upstream is asked for its first byte
 * (`GET /v2/images/{id}/file` with `Range: bytes=0-0`) with the client's own
 * credentials (`X-Auth-Token`, `Authorization`, `Cookie`), so Glance applies
 * its `download_image` policy, not only the visibility of the metadata.
 * The probe's body (one byte) is cancelled.
 *
 * - `200`, `206` (or `416`, an empty image) → served from the cache.
 * - `401`, `403`, `404` → that status, never cached bytes; `204` (an image
 *   without data) → `404`.
 * - The upstream cannot be reached → `502`; no answer within `timeout` →
 *   `504`; it answers `5xx` → `502`. Cached bytes are never served without a
 *   "yes", except within `staleIfError` of one.
 *
 * Definite answers are remembered for `ttl` per credential and image (a
 * bounded LRU map; credentials are kept as SHA-256 hashes, never raw);
 * concurrent checks of the same pair share one upstream request. An outage
 * is never remembered. A miss teaches the same thing for free: the
 * upstream's answer to the client's own download ({@linkcode GlanceAccessCheck.learn}).
 *
 * The metadata (`GET /v2/images/{id}`) is asked only for what it alone
 * says: the digest to verify a fill with, and, with `serviceToken`, whether
 * an image is gone.
 *
 * @param options The upstream and how long to trust an answer.
 * @returns The middleware, `authorize` and `expectedDigest` to give
 *   {@linkcode imageCache}.
 * @throws {TypeError} When `upstream` is not an `http:` / `https:` URL or
 *   `credentialHeaders` is not an array of header names.
 * @throws {RangeError} When `ttl`, `maxEntries`, `timeout` or
 *   `staleIfError` is out of range.
 *
 * @example Glance's download policy on cached images
 * ```ts
 * import { Hono } from "hono";
 * import { imageCache, MemoryStore } from "hono-image-cache";
 * import { glanceAccessCheck } from "hono-image-cache/proxy";
 * import assert from "node:assert/strict";
 *
 * // A stand-in for Glance's download route: only "alice" may download images.
 * const glance = (request: Request) =>
 *   Promise.resolve(
 *     request.headers.get("x-auth-token") === "alice"
 *       ? new Response("i", { status: 206, headers: { "content-range": "bytes 0-0/11" } })
 *       : new Response("Forbidden", { status: 403 }),
 *   );
 * const access = glanceAccessCheck({ upstream: "http://glance.internal:9292", fetch: glance });
 * const app = new Hono();
 * app.use(access.middleware);
 * app.use(imageCache({ store: new MemoryStore(), authorize: access.authorize }));
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
  const ttl = checkSize(owner, "ttl", options.ttl, 30_000);
  const maxEntries = checkSize(owner, "maxEntries", options.maxEntries, 10_000);
  const timeout = checkSize(owner, "timeout", options.timeout, 30_000);
  const staleIfError = checkSize(owner, "staleIfError", options.staleIfError, 0);
  const send = checkFunction(owner, "fetch", options.fetch, (request: Request) => fetch(request));
  const onGone = checkFunction(owner, "onGone", options.onGone, undefined);
  const onEvent = checkFunction(owner, "onEvent", options.onEvent, undefined);
  const onVerdict = checkFunction(owner, "onVerdict", options.onVerdict, undefined);
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
  const service = serviceCredentials(owner, options.serviceToken);
  const endpoint: GlanceEndpoint = {
    prefix: base.origin + base.pathname.replace(/\/+$/, ""),
    send,
    timeout,
  };
  const report = (event: ProxyEvent) => {
    try {
      onEvent?.(event);
    } catch {
      // A failing logger must not fail the request.
    }
  };

  const remembered = new Map<string, Remembered>();

  const keyOf = (request: Request, imageId: string) => {
    const hash = createHash("sha256");
    for (const name of credentialNames) {
      hash.update(`${name}\0${request.headers.get(name) ?? ""}\0`);
    }
    return `${hash.digest("base64")} ${imageId}`;
  };

  /** Confirms a 404 with the service credential: is the image gone for everyone? */
  const confirmGone = async (imageId: string): Promise<boolean> => {
    const headers = await service?.();
    if (headers === undefined) return false;
    const answer = await imageMetadata(endpoint, headers, imageId);
    if (answer.kind === "refused") return answer.status === 404;
    return answer.kind === "found" && GONE_STATUSES.has(String(answer.fields.status));
  };

  const gone = (imageId: string, why: string) => {
    forget(imageId);
    report({
      level: "info",
      event: "image-gone",
      imageId,
      message: `The upstream reports image ${
        JSON.stringify(imageId)
      } deleted (${why}): dropped from the cache`,
    });
    Promise.resolve(onGone?.(imageId)).catch((error) =>
      report({
        level: "warn",
        event: "cache-error",
        imageId,
        message: `Cannot drop image ${JSON.stringify(imageId)} from the cache: ${
          (error as Error)?.message ?? error
        }`,
        error,
      })
    );
  };

  const ask = async (
    request: Request,
    imageId: string,
    allowedBefore: boolean,
  ): Promise<AccessVerdict> => {
    const headers = credentialsOf(request.headers, credentialNames);
    headers.set("range", "bytes=0-0");
    headers.set("accept", "*/*");
    const url = `${endpoint.prefix}/v2/images/${encodeURIComponent(imageId)}/file`;
    const quoted = JSON.stringify(imageId);
    const started = performance.now();
    let response;
    try {
      response = await askUpstream(send, url, { headers }, timeout);
    } catch (error) {
      const failure = error instanceof UpstreamFailure ? error.kind : "unreachable";
      report({
        level: "warn",
        event: "access-check-failed",
        imageId,
        requestId: notesOf(request).id,
        message: `Cannot check access to image ${quoted}: ${(error as Error).message}`,
        error,
      });
      return failure === "timeout"
        ? outage(
          504,
          `Gateway timeout: the upstream did not answer the access check for image ${quoted} in time`,
          "timeout",
        )
        : outage(
          502,
          `Bad gateway: cannot check access to image ${quoted} with the upstream`,
          "unreachable",
        );
    } finally {
      notesOf(request).accessMs = performance.now() - started;
    }
    // One byte, or (an upstream that ignores Range) the whole image: either way, unread.
    await response.body?.cancel().catch(() => {});
    const status = response.status;
    if (status === 200 || status === 206 || status === 416) return { allowed: true };
    if (status === 401 || status === 403 || status === 404 || status === 204) {
      const headers: Record<string, string> = {};
      const challenge = response.headers.get("www-authenticate");
      if (challenge !== null) headers["www-authenticate"] = challenge;
      if (status === 404) {
        // Glance answers 404 for an image a credential may not see, too: only a 404 to a
        // credential allowed before, or one the service credential confirms, means deleted.
        if (allowedBefore) gone(imageId, "404 to a credential it allowed before");
        else {
          confirmGone(imageId).then((confirmed) => {
            if (confirmed) gone(imageId, "404, confirmed with the service token");
          }, () => {});
        }
      }
      const reason = status === 401
        ? `Unauthorized: the upstream did not accept the credentials for image ${quoted}`
        : status === 403
        ? `Forbidden: the upstream does not allow downloading image ${quoted}`
        : status === 404
        ? `Not found: the upstream has no image ${quoted} for these credentials`
        : `Not found: image ${quoted} has no data`;
      return {
        allowed: false,
        status: status === 204 ? 404 : status,
        message: reason,
        headers,
        cacheable: true,
      };
    }
    if (status >= 500) {
      report({
        level: "warn",
        event: "access-check-failed",
        imageId,
        requestId: notesOf(request).id,
        message: `Cannot check access to image ${quoted}: ${url} answered ${status}`,
      });
      return outage(
        502,
        `Bad gateway: the upstream answered ${status} to the access check for image ${quoted}`,
        "status-5xx",
      );
    }
    const passOn = status >= 400 && status < 500;
    return refusal(
      passOn ? status : 502,
      `${
        passOn ? "Refused" : "Bad gateway"
      }: the upstream answered ${status} to the access check for image ${quoted}`,
    );
  };

  const remember = (key: string, entry: Remembered) => {
    remembered.delete(key);
    remembered.set(key, entry); // most recently used last
    while (remembered.size > maxEntries) {
      remembered.delete(remembered.keys().next().value as string);
    }
  };

  /** An outage within `staleIfError` of this credential's last "allowed": allowed, stale. */
  const orStale = (
    request: Request,
    imageId: string,
    entry: Remembered,
    answer: AccessVerdict,
  ): AccessVerdict => {
    if (
      answer.allowed || !answer.outage || staleIfError === 0 || entry.allowedAt === undefined ||
      Date.now() - entry.allowedAt > staleIfError
    ) return answer;
    notesOf(request).stale = true;
    report({
      level: "warn",
      event: "stale-access",
      imageId,
      requestId: notesOf(request).id,
      message: `Serving image ${JSON.stringify(imageId)} on an answer ${
        Math.round((Date.now() - entry.allowedAt) / 1000)
      } s old: the upstream cannot be asked (${answer.status})`,
    });
    return { allowed: true, stale: true };
  };

  const check = async (request: Request, imageId: string): Promise<AccessVerdict> => {
    const key = keyOf(request, imageId);
    const known = remembered.get(key);
    if (known !== undefined && known.expires > Date.now()) {
      remember(key, known);
      // A check under way (expires: Infinity) is shared; it may still end in an outage.
      return orStale(request, imageId, known, { ...await known.verdict, remembered: true });
    }
    const verdict = ask(request, imageId, known?.everAllowed ?? false);
    const entry: Remembered = {
      verdict,
      expires: Infinity,
      imageId,
      allowedAt: known?.allowedAt,
      everAllowed: known?.everAllowed ?? false,
    };
    remember(key, entry);
    const answer = await verdict;
    if (remembered.get(key) === entry) {
      if (answer.allowed) {
        entry.allowedAt = Date.now();
        entry.everAllowed = true;
      } else if (answer.cacheable) entry.allowedAt = undefined;
      // An outage is never remembered, but the last "allowed" is (for staleIfError).
      entry.expires = ttl > 0 && (answer.allowed || answer.cacheable) ? Date.now() + ttl : 0;
    }
    return orStale(request, imageId, entry, answer);
  };

  const learn = (request: Request, imageId: string, status: number) => {
    let verdict: AccessVerdict;
    if (status === 200 || status === 206) verdict = { allowed: true };
    else if (status === 401 || status === 403 || status === 404) {
      verdict = { ...refusal(status, `The upstream answered ${status}`), cacheable: true };
    } else return;
    const key = keyOf(request, imageId);
    const known = remembered.get(key);
    const now = Date.now();
    remember(key, {
      verdict: Promise.resolve(verdict),
      expires: now + ttl,
      imageId,
      allowedAt: verdict.allowed ? now : undefined,
      everAllowed: verdict.allowed || (known?.everAllowed ?? false),
    });
  };

  const forget = (imageId: string) => {
    for (const [key, entry] of remembered) {
      if (entry.imageId === imageId) remembered.delete(key);
    }
  };

  const middleware: MiddlewareHandler = async function glanceAccessCheck(c, next) {
    const match = matchRoute(routes, c.req.method, requestPath(c.req.url));
    if (match === undefined || match.route.action !== "evict") return next();
    await next();
    // Whatever the answer, a DELETE may have changed what the upstream would say.
    forget(match.id);
  };

  const authorize: AuthorizeImage = async (c, imageId) => {
    const verdict = await check(c.req.raw, imageId);
    try {
      onVerdict?.(verdict);
    } catch {
      // Metrics must not fail the request.
    }
    return verdict.allowed ? true : refusalResponse(verdict);
  };

  const expectedDigest = (c: Context, response: Response) => {
    const imageId = matchRoute(routes, c.req.method, requestPath(c.req.url))?.id ?? "";
    return fillDigest(endpoint, imageId, response, c.req.raw, credentialNames, service);
  };

  return {
    middleware,
    authorize,
    expectedDigest,
    check,
    learn,
    forget,
    get size() {
      return remembered.size;
    },
  };
}

/** The client's answer for a "no" (or "cannot say") of the access check. */
function refusalResponse(verdict: AccessVerdict & { allowed: false }): Response {
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
}

function refusal(status: number, message: string): AccessVerdict & { allowed: false } {
  return { allowed: false, status, message, headers: {}, cacheable: false };
}

function outage(
  status: number,
  message: string,
  kind: "unreachable" | "timeout" | "status-5xx",
): AccessVerdict & { allowed: false } {
  return { allowed: false, status, message, headers: {}, cacheable: false, outage: kind };
}
