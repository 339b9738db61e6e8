/**
 * The `imageCache()` middleware: Glance's transparent image cache for Hono.
 *
 * @module
 */
import type { Context, MiddlewareHandler } from "hono";
import { coreFor, type Fill } from "./_core/core.ts";
import { fillBody, type Reader, STALL_TIMEOUT } from "./_fill/fill.ts";
import {
  type Answer,
  answerBody,
  answerFill,
  answerHit,
  hitHeaders,
  isResponse,
  withHeader,
} from "./_http/answer.ts";
import { hasPreconditions } from "./_http/conditional.ts";
import { requestPath } from "./_http/path.ts";
import { checkFunction, checkSize } from "./_options.ts";
import { type FetchImage, prefetchImage } from "./_core/prefetch.ts";
import type { CacheStatusDetail } from "./cache_status.ts";
import { type Cluster, clusterNode } from "./cluster.ts";
import { PEER_PATH } from "./_cluster/peer.ts";
import { digestFromHeaders, type ExpectedDigest } from "./digest.ts";
import type { ImageEntry, ImageStore } from "./image_store.ts";
import { checkRoutes, glanceRoutes, type ImageRoute, matchRoute } from "./routes.ts";

/**
 * Decides whether a request may be answered from the cache. `false` means
 * 403; a `Response` is sent as is.
 */
export type AuthorizeImage = (
  c: Context,
  imageId: string,
) => boolean | Response | Promise<boolean | Response>;

/** Options of {@linkcode imageCache}. */
export interface ImageCacheOptions {
  /** Where images are kept. */
  store: ImageStore;
  /**
   * Which requests serve or evict images.
   * @default {glanceRoutes}
   */
  routes?: readonly ImageRoute[];
  /**
   * Asked before anything is served from the cache (a hit, or joining a fill
   * another request started). The origin authorizes misses itself.
   * @default {() => true}
   */
  authorize?: AuthorizeImage;
  /**
   * The digest an origin answer must match before it is committed.
   * `undefined`: no digest, the length alone is checked (unless
   * `requireDigest`).
   * @default {`Content-MD5` (hex or base64), else `x-image-meta-checksum`, as MD5}
   */
  expectedDigest?: (
    c: Context,
    response: Response,
  ) => ExpectedDigest | undefined | Promise<ExpectedDigest | undefined>;
  /**
   * Cache only images whose origin answer announced a digest.
   * @default {false}
   */
  requireDigest?: boolean;
  /**
   * The cache's name in the RFC 9211 `Cache-Status` header; `false` omits it.
   * @default {"hono-image-cache"}
   */
  cacheStatus?: string | false;
  /**
   * Cache-side faults; they never fail the request.
   * @default {console.warn}
   */
  onError?: (error: unknown, c?: Context) => void;
  /**
   * Keep filling when the last client of a fill hangs up, so the image is
   * cached anyway. `false` stops a fill nobody reads.
   * @default {true}
   */
  completeOnAbort?: boolean;
  /**
   * How to fetch a whole image from the origin (the same function as
   * `cacheApi`'s). With it, a `Range` request for an uncached image, which
   * the origin answers and the cache does not store, also starts a
   * background fill of the whole image (see `fillOnRange`).
   */
  fetchImage?: FetchImage;
  /**
   * Start a background fill (through `fetchImage`) when a `Range` request
   * misses, so the next request hits.
   * @default {true when fetchImage is given}
   */
  fillOnRange?: boolean;
  /**
   * Milliseconds the origin's body may stand still (no byte arrives) before
   * the fill fails: its clients are cut, nothing is stored, rather than
   * every client of the image waiting forever.
   * @default {60000}
   */
  originStallTimeout?: number;
  /**
   * Cluster mode (see {@linkcode joinCluster}): a miss streams the image
   * from a live peer that has it or is filling it (after `authorize`, as a
   * hit), else this node takes the image's fill lease and asks the origin.
   * The middleware also answers the cluster's peer endpoint.
   */
  cluster?: Cluster;
}

/**
 * Glance's transparent image cache as a Hono middleware.
 *
 * A `serve` route (Glance: `GET /v1/images/{id}`, `GET /v2/images/{id}/file`)
 * is answered from the store when the image is cached, or joins the fill
 * under way; otherwise the request goes to the origin (the handlers after
 * this middleware). An origin `200` with a body becomes a fill: the body
 * streams to the client while it is written to the store, and only a
 * complete entry whose length and digest check out is committed. An `evict`
 * route answered 2xx removes the image.
 *
 * The cache never fails a request the origin alone would have served: store
 * faults go to `onError` and the origin's answer still reaches the client.
 *
 * @param options The store and how to use it.
 * @returns The middleware.
 * @throws {TypeError} When an option has the wrong shape.
 *
 * @example Glance's cache in front of your routes
 * ```ts
 * import { Hono } from "hono";
 * import { imageCache, MemoryStore } from "hono-image-cache";
 * import assert from "node:assert/strict";
 *
 * let originReads = 0;
 * const app = new Hono();
 * app.use(imageCache({ store: new MemoryStore() }));
 * app.get("/v2/images/:id/file", (c) => {
 *   originReads++;
 *   // Glance sends the MD5 of the image data; the cache checks it before committing.
 *   return c.body("bytes of " + c.req.param("id"), 200, {
 *     "content-md5": "0da28b84f0858d5de6164849b536c2da",
 *   });
 * });
 *
 * const miss = await app.request("/v2/images/cirros/file");
 * assert.equal(miss.headers.get("cache-status"), "hono-image-cache; fwd=miss; stored");
 * assert.equal(await miss.text(), "bytes of cirros");
 * const hit = await app.request("/v2/images/cirros/file");
 * assert.equal(await hit.text(), "bytes of cirros");
 * assert.equal(originReads, 1);
 * ```
 */
export function imageCache(options: ImageCacheOptions): MiddlewareHandler {
  const store = options?.store;
  if (store === null || typeof store !== "object" || typeof store.get !== "function") {
    throw new TypeError(
      `Cannot create imageCache: "store" must be an ImageStore, received ${typeof store}`,
    );
  }
  const routes = checkRoutes(options.routes ?? glanceRoutes, "imageCache");
  const authorize = checkFunction("imageCache", "authorize", options.authorize, () => true);
  const expectedDigest = checkFunction(
    "imageCache",
    "expectedDigest",
    options.expectedDigest,
    (_c: Context, response: Response) => digestFromHeaders(response.headers),
  );
  const onError = checkFunction(
    "imageCache",
    "onError",
    options.onError,
    (error: unknown) => console.warn("hono-image-cache:", error),
  );
  const requireDigest = options.requireDigest ?? false;
  const completeOnAbort = options.completeOnAbort ?? true;
  const stallTimeout = checkSize(
    "imageCache",
    "originStallTimeout",
    options.originStallTimeout,
    STALL_TIMEOUT,
  );
  const fetchImage = checkFunction("imageCache", "fetchImage", options.fetchImage, undefined);
  const fillOnRange = options.fillOnRange ?? fetchImage !== undefined;
  if (typeof fillOnRange !== "boolean") {
    throw new TypeError(
      `Cannot create imageCache: "fillOnRange" must be a boolean, received ${typeof fillOnRange}`,
    );
  }
  if (fillOnRange && fetchImage === undefined) {
    throw new TypeError(
      `Cannot create imageCache: "fillOnRange" needs "fetchImage", received fillOnRange: true without it`,
    );
  }
  const name = options.cacheStatus ?? "hono-image-cache";
  if (name !== false && (typeof name !== "string" || !/^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/.test(name))) {
    throw new TypeError(
      `Cannot create imageCache: "cacheStatus" must be a token or false, received ${
        JSON.stringify(name)
      }`,
    );
  }
  const core = coreFor(store);
  const cluster = clusterNode("imageCache", options.cluster);
  if (cluster !== undefined && cluster.store !== store) {
    throw new TypeError(
      `Cannot create imageCache: "cluster" must be joined with the same store as imageCache's`,
    );
  }

  /** Sets `Cache-Status` on the response the context holds. */
  const mark = (c: Context, params: string) => {
    if (name === false || c.res === undefined) return;
    const res = c.res;
    const marked = withHeader(res, "cache-status", `${name}; ${params}`);
    if (marked !== res) {
      c.res = undefined;
      c.res = marked;
    }
  };
  const statusHeaders = (params: string): Record<string, string> =>
    name === false ? {} : { "cache-status": `${name}; ${params}` };

  /** `undefined` when allowed; otherwise the answer to send. */
  const denied = async (c: Context, id: string): Promise<Response | undefined> => {
    const verdict = await authorize(c, id);
    if (verdict === true) return undefined;
    if (isResponse(verdict)) return verdict;
    return c.text("Forbidden: not allowed to read this image from the cache", 403, {
      ...statusHeaders("detail=forbidden"),
    });
  };

  const report = (c: Context) => (error: unknown) => {
    try {
      onError(error, c);
    } catch {
      // A throwing error handler must not fail the request either.
    }
  };

  /** Reports a client of a fill cut by the cache's side (the fill's own failure is reported once). */
  const cutReport = (c: Context, id: string) => (error: unknown, position: number) =>
    report(c)(
      new Error(
        `A client of the fill of ${JSON.stringify(id)} was cut at byte ${position}: ${
          error instanceof Error ? error.message : error
        }`,
        { cause: error },
      ),
    );

  /**
   * Whether another process deleted `id` at or after `since`. A store that
   * cannot tell says yes: the request then goes to the origin, which is safe.
   */
  const deletedSince = async (c: Context, id: string, since: number): Promise<boolean> => {
    if (store.deletedSince === undefined) return false;
    try {
      return await store.deletedSince(id, since);
    } catch (error) {
      report(c)(error);
      return true;
    }
  };

  /**
   * The headers of a plain `200` hit (no `Range`, no precondition), built
   * once per committed entry: most hits are plain, and these headers are
   * the same each time. Bounded; an entry replaced under the same id gets
   * new ones (its digest, size or date differ).
   */
  const plainHitHeaders = new Map<string, { key: string; record: Record<string, string> }>();
  const headersOfPlainHit = (entry: ImageEntry): Record<string, string> => {
    const key = `${entry.digest.algorithm}:${entry.digest.value}:${entry.size}:${entry.created}`;
    let cached = plainHitHeaders.get(entry.id);
    if (cached?.key !== key) {
      const headers = hitHeaders(entry);
      if (name !== false) headers.set("cache-status", `${name}; hit`);
      cached = { key, record: Object.fromEntries(headers) };
      plainHitHeaders.delete(entry.id);
      if (plainHitHeaders.size >= PLAIN_HIT_HEADERS) {
        plainHitHeaders.delete(plainHitHeaders.keys().next().value!);
      }
      plainHitHeaders.set(entry.id, cached);
    }
    return cached.record;
  };

  /** Sends an answer computed by `answerHit` or `answerFill`. */
  const respond = (
    c: Context,
    answer: Answer,
    body: ReadableStream<Uint8Array> | Blob | string | null,
    status: string,
  ) => {
    if (name !== false) answer.headers.set("cache-status", `${name}; ${status}`);
    return c.newResponse(body, answer.status, Object.fromEntries(answer.headers));
  };

  /**
   * A request that joins a fill under way: the full body, or `answer` (a
   * `206` or `416` computed from the fill's headers). `authorize` is asked
   * first, and may take long enough for the fill to end: only then are
   * readers attached (at once, synchronously), one per range. A fill that
   * can no longer serve them leaves the request to the committed entry (a
   * hit) or, failing that, to the origin.
   */
  const join = async (
    c: Context,
    next: () => Promise<void>,
    id: string,
    fill: Fill,
    answer?: Answer,
  ): Promise<Response | void> => {
    const refusal = await denied(c, id);
    if (refusal !== undefined) return refusal;
    const starts = answer === undefined ? [0] : answer.ranges.map((range) => range.start);
    const readers: Reader[] = [];
    for (const start of starts) {
      const reader = fill.attachAt(start);
      if (reader === undefined) break;
      readers.push(reader);
    }
    if (readers.length < starts.length) {
      for (const reader of readers) fill.detach(reader);
      const entry = await store.get(id).catch(report(c));
      const hit = entry ? await answerFromEntry(c, entry) : undefined;
      return hit ?? forward(c, next, "uncacheable");
    }
    core.countCoalesced();
    // This request has not asked the origin: if the store cannot read back what it
    // needs, it may, once (invariant 2).
    let rescued = false;
    const rescue = async () => {
      if (rescued) return undefined;
      rescued = true;
      // The rescue checks a whole answer from byte 0: for a Range (or a precondition) this
      // request's own origin answer is a 206 (or a 304...), so `fetchImage` asks, when given.
      if (answer !== undefined && fetchImage !== undefined) {
        return await fetchImage(id, new AbortController().signal);
      }
      c.finalized = false; // Hono keeps the origin's answer only in a context not finalized.
      await next();
      return c.res;
    };
    if (answer === undefined) {
      const headers = new Headers(fill.responseHeaders);
      if (name !== false) headers.set("cache-status", `${name}; fwd=miss; collapsed`);
      const body = fillBody(fill, readers[0], 0, Infinity, { rescue, onCut: cutReport(c, id) });
      return c.newResponse(body, 200, Object.fromEntries(headers));
    }
    let opened = 0;
    const open = (start: number, end: number) =>
      Promise.resolve(
        fillBody(fill, readers[opened++], start, end + 1, { rescue, onCut: cutReport(c, id) }),
      );
    // Parts never opened (the client left early) let go of their readers.
    const release = () => {
      for (const reader of readers.slice(opened)) fill.detach(reader);
    };
    return respond(c, answer, await answerBody(answer, open, release), "fwd=miss; collapsed");
  };

  /** After a Range miss: fetch the whole image through `fetchImage`, so the next request hits. */
  const fillInBackground = (c: Context, id: string) => {
    const status = c.res.status;
    if (!fillOnRange || fetchImage === undefined || core.busy(id)) return;
    if (status >= 300 && status !== 416) return; // the origin does not have it (or refuses)
    const digest = (response: Response) => expectedDigest(c, response);
    prefetchImage(core, id, cluster?.wrapFetch(fetchImage) ?? fetchImage, {
      onError: report(c),
      expectedDigest: cluster === undefined
        ? digest
        : (response) => cluster.peerDigest(response, digest),
      requireDigest,
    }).catch(report(c));
  };

  /** Marks a miss that is not stored. */
  const passThrough = (c: Context, detail: CacheStatusDetail) => {
    core.countPassThrough(detail);
    mark(c, `fwd=miss; detail=${detail}`);
  };

  /** The origin's answer, passed through uncached. */
  const forward = async (
    c: Context,
    next: () => Promise<void>,
    detail: CacheStatusDetail,
  ) => {
    core.countMiss();
    await next();
    passThrough(c, detail);
  };

  /**
   * A request answered from a committed entry, once `authorize` allowed it;
   * `undefined` when its data cannot be opened (the origin answers then).
   * A plain `200` (`GET` or `HEAD`, no `Range`, no precondition: most hits)
   * uses headers built once per entry; anything else, `answerHit`:
   * `200`, `206`, `304`, `412` or `416` from metadata (`HEAD`, `304`, `412`
   * and `416` open no data).
   */
  const answerFromEntry = async (c: Context, entry: ImageEntry) => {
    const method = c.req.method;
    const request = c.req.raw.headers;
    const plain = (method === "GET" || method === "HEAD") && request.get("range") === null &&
      !hasPreconditions(method, request);
    const answer = plain ? undefined : answerHit(entry, method, request);
    let body = null;
    try {
      if (answer !== undefined) {
        body = await answerBody(answer, (start, end) => store.body(entry, start, end));
      } else if (method === "GET" && entry.size > 0) {
        body = await store.body(entry, 0, entry.size - 1);
      }
    } catch (error) {
      // A file deleted since the lookup (by another process, say) is no fault: the origin answers.
      if ((error as { code?: unknown } | null)?.code !== "ENOENT") report(c)(error);
      return undefined;
    }
    // One hit per request answered from the entry, whatever its status.
    try {
      store.recordHit(entry.id);
    } catch (error) {
      report(c)(error); // The count is advisory; the answer stands.
    }
    if (answer !== undefined) {
      core.countHit(answer.length);
      return respond(c, answer, body, "hit");
    }
    core.countHit(method === "GET" ? entry.size : 0);
    return c.newResponse(body, 200, headersOfPlainHit(entry));
  };

  const serve = async (
    c: Context,
    next: () => Promise<void>,
    id: string,
  ): Promise<Response | void> => {
    const head = c.req.method === "HEAD";
    if (!store.canHold(id)) return forward(c, next, "unsupported-id");
    // (A store method that throws, synchronously or not, is caught by the middleware.)

    let entry;
    try {
      entry = await store.get(id);
    } catch (error) {
      report(c)(error);
    }
    if (entry !== undefined) {
      const refusal = await denied(c, id);
      if (refusal !== undefined) return refusal;
      const hit = await answerFromEntry(c, entry);
      if (hit !== undefined) return hit;
      // The data vanished between the check and the open: serve from the origin.
    }

    if (head) return forward(c, next, "method");
    const running = await core.joinableOwned(id);
    if (running !== undefined) {
      const answer = answerFill(running, c.req.method, c.req.raw.headers);
      if (answer === "join") return join(c, next, id, running);
      if ("forward" in answer) return forward(c, next, answer.forward);
      return join(c, next, id, running, answer);
    }
    if (c.req.method === "GET" && c.req.header("range") !== undefined) {
      // The origin answers the range (206); it is not stored. The whole image may be fetched.
      await forward(c, next, "range");
      fillInBackground(c, id);
      return;
    }

    const { own, claim } = core.claim(id);
    if (!own) {
      const fill = await claim.fill;
      // Deletion wins: a delete in another process since stops the fill storing (no joining),
      // and keeps this request off a fill that stores nothing here (its answer may predate it).
      if (fill?.joinable) await fill.checkOwned();
      else if (fill?.joinableFromStart && await deletedSince(c, id, claim.started)) {
        return forward(c, next, "deleted");
      }
      if (fill?.joinableFromStart) return join(c, next, id, fill);
      return forward(c, next, "uncacheable");
    }
    core.countMiss();
    // Cluster mode (src/_cluster/): a peer that has the image, or is filling it, answers
    // the miss (after authorize: the origin does not see this request); otherwise this
    // node holds the image's fill lease and asks the origin.
    const peer = await cluster?.route(id, fetchImage);
    if (peer !== undefined) {
      const refusal = await denied(c, id);
      if (refusal !== undefined) {
        claim.abandon();
        await peer.response.body?.cancel().catch(() => {});
        return refusal;
      }
    } else {
      try {
        await next();
      } catch (error) {
        claim.abandon();
        throw error;
      }
    }
    // (A peer's answer is not put in `c.res` yet: Hono keeps a handler's answer
    // only while the context is not finalized, and the origin may still be asked.)
    const res = peer !== undefined ? peer.response : c.res;
    const outcome = await core.fillFromOrigin(claim, res, {
      expectedDigest: peer !== undefined
        ? () => peer.expected
        : (response) => expectedDigest(c, response),
      requireDigest: requireDigest && peer === undefined,
      completeOnAbort,
      shareWhenBusy: true,
      stallTimeout,
      onError: report(c),
    });
    if (outcome.fill === undefined) {
      if (peer !== undefined) {
        // A peer's bytes reach a client only through a fill that checks them
        // against the digest: declined (deleted meanwhile, too large, a store
        // error), the request gets the origin's answer instead.
        await res.body?.cancel().catch(() => {});
        await next();
      }
      return passThrough(c, outcome.detail);
    }
    const { fill, stored } = outcome;
    if (peer !== undefined) {
      // A transfer that fails after every source switch is worth a line in the cluster's log.
      fill.done.then(() => {
        if (fill.state === "failed") {
          cluster!.log(
            `image ${
              JSON.stringify(id)
            }: the fill from peer ${peer.peer} failed: ${fill.error?.message}`,
          );
        }
      });
    }
    const headers = new Headers(res.headers);
    if (!stored) core.countPassThrough("busy");
    if (name !== false) {
      const status = stored ? "stored" : fill.followed ? "collapsed; detail=busy" : "detail=busy";
      headers.set("cache-status", `${name}; fwd=miss; ${status}${peer ? "; peer" : ""}`);
    }
    // This request's own origin answer feeds the fill: a rescue needs `fetchImage`.
    const rescue = fetchImage === undefined
      ? undefined
      : () => fetchImage(id, new AbortController().signal);
    c.res = undefined;
    // (A fill that ended before this attaches, which it should not, is rescued or reported.)
    const body = fillBody(fill, fill.attachAt(0), 0, Infinity, {
      rescue,
      onCut: cutReport(c, id),
    });
    c.res = new Response(body, { status: 200, headers });
  };

  return async function imageCache(c, next) {
    const path = requestPath(c.req.url);
    // Cluster mode: the peer endpoint (secret required), never passed to the origin.
    if (cluster !== undefined && path.startsWith(PEER_PATH)) {
      return cluster.peerApp.fetch(c.req.raw);
    }
    const match = matchRoute(routes, c.req.method, path);
    if (match === undefined) return next();
    const { route, id } = match;
    if (route.action === "serve") {
      // The origin is asked at most once, and whatever the cache's side throws
      // (a store method that should not), the origin's answer still goes out.
      let asked = false;
      let failed: { error: unknown } | undefined;
      const origin = async () => {
        asked = true;
        try {
          await next();
        } catch (error) {
          failed = { error };
          throw error;
        }
      };
      try {
        return await serve(c, origin, id);
      } catch (error) {
        if (failed !== undefined && failed.error === error) throw error; // The origin's own.
        report(c)(error);
        if (!asked) return forward(c, origin, "store-error");
        return; // The origin answered: `c.res` holds its answer.
      }
    }
    await next();
    if (c.res.status >= 200 && c.res.status < 300) {
      try {
        // Deleted at the origin: evicted on every node in cluster mode.
        if (cluster !== undefined) await cluster.evictEverywhere({ id });
        else await core.evict(id);
      } catch (error) {
        report(c)(error);
      }
    }
  };
}

/** Entries whose plain-hit headers are kept (per middleware). */
const PLAIN_HIT_HEADERS = 1024;
