/**
 * The management API: Glance's `/v2/cache` API and its legacy
 * `cached_images` / `queued_images` routes, plus prefetching, background
 * cleaning and metrics.
 *
 * @module
 */
import { isResponse } from "./_http/answer.ts";
import type { Context } from "hono";
import { Hono } from "hono";
import { coreFor } from "./_core/core.ts";
import { requestPath } from "./_http/path.ts";
import { checkFunction, checkSize } from "./_options.ts";
import { unrefTimer } from "./_runtime.ts";
import type { FetchImage } from "./_core/prefetch.ts";
import { PrefetchQueue } from "./_core/prefetch_queue.ts";
import { digestFromHeaders, type ExpectedDigest } from "./digest.ts";
import { type Cluster, clusterNode } from "./cluster.ts";
import type { ImageEntry, ImageStore } from "./image_store.ts";
import { METRICS_CONTENT_TYPE, metricsText } from "./metrics.ts";

export type { FetchImage, FetchImageOptions } from "./_core/prefetch.ts";

/**
 * What a management request wants to do, by Glance's policy name:
 * `cache_list` (`GET /v2/cache`), `cache_image` (`PUT /v2/cache/{id}`),
 * `cache_delete` (`DELETE /v2/cache/{id}`, `DELETE /v2/cache`),
 * `cache_clean`, `cache_prune`, `manage_image_cache` (every legacy
 * `cached_images` / `queued_images` route), `cache_metrics` (the
 * metrics route) and `list_cached_nodes` (`GET /v2/cache/nodes/{id}`).
 */
export type CacheAction =
  | "cache_list"
  | "cache_delete"
  | "cache_image"
  | "cache_clean"
  | "cache_prune"
  | "manage_image_cache"
  | "cache_metrics"
  | "list_cached_nodes";

/**
 * Decides whether a management request may proceed: `true` allows, `false`
 * answers 403, a `Response` is sent as is. Nothing changes unless it
 * allows.
 */
export type AuthorizeCacheAction = (
  c: Context,
  action: CacheAction,
  imageId?: string,
) => boolean | Response | Promise<boolean | Response>;

/** Options of {@linkcode cacheApi}. */
export interface CacheApiOptions {
  /** The store to manage (the same one `imageCache` uses). */
  store: ImageStore;
  /**
   * Required: a management API without a decision is a hole. Asked with
   * Glance's policy name of each request (see {@linkcode CacheAction}).
   */
  authorize: AuthorizeCacheAction;
  /**
   * How a queued image is fetched from the origin. Its answer goes through
   * the same fill path as a miss (coalescing, verification). Without it,
   * `PUT` only queues, and a request for the image fills it.
   */
  fetchImage?: FetchImage;
  /**
   * Prefetches at once.
   * @default {2}
   */
  prefetchConcurrency?: number;
  /**
   * Milliseconds before a failed prefetch is tried again; doubled after
   * each failure, up to 10 minutes.
   * @default {1000}
   */
  prefetchRetryDelay?: number;
  /**
   * Failed prefetch attempts after which a queued image is tried no more:
   * it stays queued, its status says `gave_up`, until it is queued again.
   * @default {Infinity}
   */
  prefetchMaxAttempts?: number;
  /**
   * The digest a prefetched answer must match.
   * @default {`Content-MD5` (hex or base64), else `x-image-meta-checksum`, as MD5}
   */
  expectedDigest?: (
    response: Response,
  ) => ExpectedDigest | undefined | Promise<ExpectedDigest | undefined>;
  /**
   * Store only prefetched answers that announced a digest.
   * @default {false}
   */
  requireDigest?: boolean;
  /**
   * Milliseconds between background runs of `clean` (invalid and stalled
   * files) followed by `prune`; `0` turns it off. The timer does not keep
   * the process alive; `signal` stops it.
   * @default {3600000} (1 hour)
   */
  cleanInterval?: number;
  /**
   * Path of the Prometheus metrics route (authorized as `cache_metrics`);
   * `false` serves none.
   * @default {"/metrics"}
   */
  metricsPath?: string | false;
  /**
   * Stops the background work (prefetch worker, clean timer) when aborted;
   * fetches under way are aborted.
   */
  signal?: AbortSignal;
  /**
   * Cache-side faults: store errors behind a `500`, failed prefetches.
   * @default {console.warn}
   */
  onError?: (error: unknown, c?: Context) => void;
  /**
   * Cluster mode (see {@linkcode joinCluster}): `GET /v2/cache/nodes/{id}`
   * lists the live nodes that have an image; a delete with
   * `x-image-cache-scope: cluster` evicts on every live node; prefetches
   * read from a peer that has the image; `/metrics` adds the cluster's.
   */
  cluster?: Cluster;
}

/** How an entry is listed: Glance's record, times in epoch seconds. */
interface CachedImageRecord {
  image_id: string;
  hits: number;
  last_accessed: number;
  last_modified: number;
  size: number;
}

function record(entry: ImageEntry): CachedImageRecord {
  return {
    image_id: entry.id,
    hits: entry.hits,
    last_accessed: entry.lastAccessed / 1000,
    last_modified: entry.created / 1000,
    size: entry.size,
  };
}

/** Glance lists cached images by id. */
function byId(a: ImageEntry, b: ImageEntry): number {
  return a.id < b.id ? -1 : a.id > b.id ? 1 : 0;
}

type Handler = (c: Context, id: string) => Promise<Response>;

interface Method {
  /** The policy `authorize` is asked about. */
  action: CacheAction;
  run: Handler;
  /** The path segment is not an image id (`POST /v2/cache/clean`). */
  noId?: boolean;
}

const MAX_RETRY_DELAY = 600_000;

/**
 * Glance's image-cache management API for a store, as a Hono app to mount
 * with `app.route("/", cacheApi(...))` before the origin's routes.
 *
 * | Request | Answer |
 * | --- | --- |
 * | `GET /v2/cache` | `200 {"cached_images":[{"image_id","hits","last_accessed","last_modified","size"}],"queued_images":[ids]}` |
 * | `PUT /v2/cache/{id}` | `202`: queued and prefetched; already cached or filling: nothing more |
 * | `DELETE /v2/cache/{id}` | `204`: entry, queue marker and fill removed; `404` when none existed |
 * | `DELETE /v2/cache` | `204`; `x-image-cache-clear-target`: empty or `both`, `cache`, `queue` (else `400`) |
 * | `POST /v2/cache/clean` | `200 {"invalid_files_removed","incomplete_files_removed"}` |
 * | `POST /v2/cache/prune` | `200 {"total_files_pruned","total_bytes_pruned"}` |
 * | `GET /v2/cache/{id}/status` | `200 {"image_id","state","size","bytes",...}`: `cached`, `filling` or `queued`; `404` |
 * | `GET /v2/cache/nodes/{id}` | `200 ["http://node:port",...]`: the live nodes that have it (cluster mode; else `409`) |
 * | `GET /metrics` | Prometheus text (see {@linkcode metricsText}) |
 * | legacy `/v1` and `/v2` `cached_images`, `queued_images` | As Glance's cache-manage middleware |
 *
 * In cluster mode, `DELETE /v2/cache/{id}` and `DELETE /v2/cache` with the
 * header `x-image-cache-scope: cluster` evict on every live node (fills
 * under way included); without it, on this node only (as Glance). With the
 * cluster database unreachable, such a delete asks the peers the last
 * syncs listed directly, and answers `503` when one of them did not answer.
 *
 * Any other method on those paths answers `405` with `Allow`; an id the
 * store cannot hold answers `400`; `authorize` saying no answers `403`.
 * None of them changes anything.
 *
 * @param options The store, the authorization decision, and how to prefetch.
 * @returns The management app.
 * @throws {TypeError} When `store` or `authorize` is missing, or an option has the wrong shape.
 * @throws {RangeError} When a number is out of range.
 *
 * @example Queue, list and delete
 * ```ts
 * import { Hono } from "hono";
 * import { cacheApi, imageCache, MemoryStore } from "hono-image-cache";
 * import assert from "node:assert/strict";
 *
 * const store = new MemoryStore();
 * const origin = (id: string) => new Response(`bytes of ${id}`);
 * const controller = new AbortController();
 * const app = new Hono();
 * app.route("/", cacheApi({
 *   store,
 *   authorize: (c) => c.req.header("x-auth-token") === "admin",
 *   fetchImage: (id) => Promise.resolve(origin(id)),
 *   signal: controller.signal,
 * }));
 * app.use(imageCache({ store }));
 * app.get("/v2/images/:id/file", (c) => origin(c.req.param("id")));
 *
 * const admin = { headers: { "x-auth-token": "admin" } };
 * assert.equal((await app.request("/v2/cache/cirros", { method: "PUT" })).status, 403);
 * assert.equal((await app.request("/v2/cache/cirros", { method: "PUT", ...admin })).status, 202);
 * for (let i = 0; i < 100 && (await store.get("cirros")) === undefined; i++) {
 *   await new Promise((resolve) => setTimeout(resolve, 10));
 * }
 * const listing = await (await app.request("/v2/cache", admin)).json();
 * assert.equal(listing.cached_images[0].image_id, "cirros");
 * assert.equal((await app.request("/v2/cache/cirros", { method: "DELETE", ...admin })).status, 204);
 * controller.abort();
 * ```
 */
export function cacheApi(options: CacheApiOptions): Hono {
  const store = options?.store;
  if (store === null || typeof store !== "object" || typeof store.get !== "function") {
    throw new TypeError(
      `Cannot create cacheApi: "store" must be an ImageStore, received ${
        store === null ? "null" : typeof store
      }`,
    );
  }
  if (typeof options.authorize !== "function") {
    throw new TypeError(
      `Cannot create cacheApi: "authorize" must be a function (a management API without a decision is a hole), received ${
        options.authorize === null ? "null" : typeof options.authorize
      }`,
    );
  }
  const authorize = options.authorize;
  const fetchImage = checkFunction("cacheApi", "fetchImage", options.fetchImage, undefined);
  const concurrency = options.prefetchConcurrency ?? 2;
  if (!Number.isInteger(concurrency) || concurrency < 1) {
    throw new RangeError(
      `Cannot create cacheApi: "prefetchConcurrency" must be a positive integer, received ${
        JSON.stringify(concurrency)
      }`,
    );
  }
  const retryDelay = checkSize(
    "cacheApi",
    "prefetchRetryDelay",
    options.prefetchRetryDelay,
    1000,
  );
  const maxAttempts = options.prefetchMaxAttempts ?? Infinity;
  if (typeof maxAttempts !== "number" || !(maxAttempts >= 1)) {
    throw new RangeError(
      `Cannot create cacheApi: "prefetchMaxAttempts" must be a number of at least 1, received ${
        JSON.stringify(maxAttempts)
      }`,
    );
  }
  const cleanInterval = checkSize("cacheApi", "cleanInterval", options.cleanInterval, 3_600_000);
  const metricsPath = options.metricsPath ?? "/metrics";
  if (metricsPath !== false && (typeof metricsPath !== "string" || !metricsPath.startsWith("/"))) {
    throw new TypeError(
      `Cannot create cacheApi: "metricsPath" must be a path starting with "/" or false, received ${
        JSON.stringify(metricsPath)
      }`,
    );
  }
  const signal = options.signal;
  if (signal !== undefined && !(signal instanceof AbortSignal)) {
    throw new TypeError(
      `Cannot create cacheApi: "signal" must be an AbortSignal, received ${typeof signal}`,
    );
  }
  const expectedDigest = checkFunction(
    "cacheApi",
    "expectedDigest",
    options.expectedDigest,
    undefined,
  );
  const onErrorOption = checkFunction(
    "cacheApi",
    "onError",
    options.onError,
    (error: unknown) => console.warn("hono-image-cache:", error),
  );
  const onError = (error: unknown, c?: Context) => {
    try {
      onErrorOption(error, c);
    } catch {
      // A throwing error handler must not break the API.
    }
  };
  const core = coreFor(store);
  const pruner = core.pruner;
  const cluster = clusterNode("cacheApi", options.cluster);
  if (cluster !== undefined && cluster.store !== store) {
    throw new TypeError(
      `Cannot create cacheApi: "cluster" must be joined with the same store as cacheApi's`,
    );
  }
  /** The delete reaches every live node (cluster mode, `x-image-cache-scope: cluster`). */
  const clusterScope = (c: Context): boolean | Response => {
    const scope = (c.req.header("x-image-cache-scope") ?? "").trim().toLowerCase();
    if (scope === "" || scope === "node") return false;
    if (scope !== "cluster") {
      return c.text(
        `Bad x-image-cache-scope ${JSON.stringify(scope)}: use "cluster" or "node"`,
        400,
      );
    }
    if (cluster === undefined) return c.text("This node is not in cluster mode", 409);
    return true;
  };
  /** After a cluster-wide delete: a 503 when some node may not have been reached. */
  const notEverywhere = (c: Context, result: { everywhere: boolean }): Response | undefined =>
    result.everywhere ? undefined : c.text(
      "Deleted on this node and on the peers that answered, but the cluster database is " +
        "unreachable and some known peer did not answer: retry once the database is back.",
      503,
    );

  // Background work: the prefetch worker (resumes the queue at start) and the clean timer.
  let prefetch: PrefetchQueue | undefined;
  if (fetchImage !== undefined && !signal?.aborted) {
    // Cluster mode: a prefetch reads from a peer that has the image, with the digest it carries.
    const digest = expectedDigest ?? ((response: Response) => digestFromHeaders(response.headers));
    prefetch = new PrefetchQueue(core, cluster?.wrapFetch(fetchImage) ?? fetchImage, {
      concurrency,
      retryDelay,
      maxRetryDelay: Math.max(retryDelay, MAX_RETRY_DELAY),
      maxAttempts,
      expectedDigest: cluster === undefined
        ? expectedDigest
        : (response) => cluster.peerDigest(response, digest),
      requireDigest: options.requireDigest ?? false,
      onError: (error) => onError(error),
    });
    prefetch.kick();
  }
  let timer: ReturnType<typeof setInterval> | undefined;
  if (cleanInterval > 0 && !signal?.aborted) {
    let running = false;
    timer = setInterval(async () => {
      if (running) return;
      running = true;
      try {
        await store.clean();
        await pruner.prune();
      } catch (error) {
        onError(error);
      } finally {
        running = false;
      }
    }, cleanInterval);
    unrefTimer(timer);
  }
  signal?.addEventListener("abort", () => {
    clearInterval(timer);
    prefetch?.close().catch(onError);
  }, { once: true });

  const app = new Hono();

  /** Serves one path: methods by name, an image id at `idSegment` from the end. */
  const resource =
    (methods: (segment: string) => Record<string, Method>, idSegment?: number) =>
    async (c: Context): Promise<Response> => {
      const segments = requestPath(c.req.url).split("/");
      const segment = idSegment === undefined ? "" : segments[segments.length - idSegment] ?? "";
      const table = methods(segment);
      // Hono routes HEAD through GET handlers and drops the body.
      const name = c.req.method === "HEAD" ? "GET" : c.req.method;
      const method = table[name];
      if (method === undefined) {
        const allowed = Object.keys(table);
        if (allowed.includes("GET")) allowed.push("HEAD");
        const allow = allowed.sort().join(", ");
        return c.text(`Method ${c.req.method} not allowed here; allowed: ${allow}`, 405, {
          allow,
        });
      }
      let id = "";
      if (idSegment !== undefined && !method.noId) {
        let decoded;
        try {
          decoded = decodeURIComponent(segment);
        } catch {
          return c.text(`Malformed image id ${JSON.stringify(segment)}: bad percent-encoding`, 400);
        }
        if (!store.canHold(decoded)) {
          return c.text(
            `Invalid image id ${JSON.stringify(decoded)}: this store cannot hold it`,
            400,
          );
        }
        id = decoded;
      }
      const verdict = await authorize(c, method.action, id === "" ? undefined : id);
      if (isResponse(verdict)) return verdict;
      if (verdict !== true) {
        return c.text(`Forbidden: not allowed to ${method.action}`, 403);
      }
      try {
        return await method.run(c, id);
      } catch (error) {
        onError(error, c);
        return c.text(`Cache store error: ${error instanceof Error ? error.message : error}`, 500);
      }
    };

  const list = async () => (await store.list()).sort(byId).map(record);

  /** Glance's queue semantics: a cached or filling image is not queued. */
  const queue = async (id: string): Promise<void> => {
    if (await store.get(id) !== undefined) return;
    if (core.busy(id) || prefetch?.running(id) || await store.isFilling(id)) return;
    await store.enqueue(id);
    prefetch?.retryNow(id);
  };

  // Deletion wins over fills under way too (here or in another process) and
  // over misses still awaiting their origin answer: none of them commits.
  const clearCache = (): Promise<number> => core.evictAll({ keepQueued: true });

  const clearQueue = async (): Promise<number> => {
    let deleted = 0;
    for (const id of await store.queued()) {
      if (await store.dequeue(id)) deleted++;
    }
    return deleted;
  };

  const status = async (c: Context, id: string): Promise<Response> => {
    const entry = await store.get(id);
    const queued = (await store.queued()).includes(id);
    const failure = prefetch?.failure(id);
    const common = {
      queued,
      attempts: failure?.attempts ?? 0,
      last_error: failure?.reason ?? null,
      next_attempt: failure === undefined || failure.gaveUp ? null : failure.next / 1000,
      gave_up: failure?.gaveUp ?? false,
    };
    if (entry !== undefined) {
      return c.json({ ...record(entry), state: "cached", bytes: entry.size, ...common });
    }
    const fill = core.joinable(id);
    if (fill !== undefined || core.busy(id) || await store.isFilling(id)) {
      return c.json({
        image_id: id,
        state: "filling",
        size: fill?.expectedLength ?? null,
        bytes: fill?.written ?? null,
        ...common,
      });
    }
    if (queued) {
      return c.json({ image_id: id, state: "queued", size: null, bytes: 0, ...common });
    }
    return c.text(`Image ${JSON.stringify(id)} is neither cached, filling nor queued`, 404);
  };

  // Glance v2 `/cache`.
  app.all(
    "/v2/cache",
    resource(() => ({
      GET: {
        action: "cache_list",
        run: async (c) =>
          c.json({ cached_images: await list(), queued_images: await store.queued() }),
      },
      DELETE: {
        action: "cache_delete",
        run: async (c) => {
          const target = (c.req.header("x-image-cache-clear-target") ?? "").trim().toLowerCase();
          if (!["", "both", "cache", "queue"].includes(target)) {
            return c.text(
              `Bad x-image-cache-clear-target ${
                JSON.stringify(target)
              }: use "cache", "queue", "both" or nothing`,
              400,
            );
          }
          const scope = clusterScope(c);
          if (typeof scope !== "boolean") return scope;
          if (scope) {
            const result = await cluster!.evictEverywhere({
              target: (target || "both") as "cache" | "queue" | "both",
            });
            return notEverywhere(c, result) ?? c.body(null, 204);
          }
          if (target !== "queue") await clearCache();
          if (target !== "cache") await clearQueue();
          return c.body(null, 204);
        },
      },
    })),
  );
  app.all(
    "/v2/cache/:id",
    resource((segment) => {
      const methods: Record<string, Method> = {
        PUT: {
          action: "cache_image",
          run: async (c, id) => {
            await queue(id);
            return c.body(null, 202);
          },
        },
        DELETE: {
          action: "cache_delete",
          run: async (c, id) => {
            const scope = clusterScope(c);
            if (typeof scope !== "boolean") return scope;
            let found;
            if (scope) {
              const result = await cluster!.evictEverywhere({ id });
              const partial = notEverywhere(c, result);
              if (partial !== undefined) return partial;
              found = result.found;
            } else found = await core.evict(id);
            if (found) return c.body(null, 204);
            return c.text(`Image ${JSON.stringify(id)} is neither cached, queued nor filling`, 404);
          },
        },
      };
      if (segment === "clean") {
        methods.POST = {
          action: "cache_clean",
          noId: true,
          run: async (c) => {
            const result = await store.clean();
            return c.json({
              invalid_files_removed: result.invalid,
              incomplete_files_removed: result.incomplete,
            });
          },
        };
      } else if (segment === "prune") {
        methods.POST = {
          action: "cache_prune",
          noId: true,
          run: async (c) => {
            const result = await pruner.prune();
            return c.json({ total_files_pruned: result.files, total_bytes_pruned: result.bytes });
          },
        };
      }
      return methods;
    }, 1),
  );
  app.all(
    "/v2/cache/:id/status",
    resource(() => ({ GET: { action: "cache_list", run: status } }), 2),
  );
  // Glance's centralized_db: the nodes that have an image (409 when not in cluster mode).
  app.all(
    "/v2/cache/nodes/:id",
    resource(() => ({
      GET: {
        action: "list_cached_nodes",
        run: async (c, id) => {
          if (cluster === undefined) return c.text("This node is not in cluster mode", 409);
          try {
            return c.json(await cluster.nodes(id));
          } catch {
            return c.text("The cluster database is unreachable", 503);
          }
        },
      },
    }), 1),
  );

  // Glance's cache-manage middleware, under /v1 and /v2: every route is `manage_image_cache`.
  for (const version of ["v1", "v2"]) {
    app.all(
      `/${version}/cached_images`,
      resource(() => ({
        GET: {
          action: "manage_image_cache",
          run: async (c) => c.json({ cached_images: await list() }),
        },
        DELETE: {
          action: "manage_image_cache",
          run: async (c) => c.json({ num_deleted: await clearCache() }),
        },
      })),
    );
    app.all(
      `/${version}/cached_images/:id`,
      resource(() => ({
        DELETE: {
          action: "manage_image_cache",
          run: async (c, id) => {
            await core.evict(id, { keepQueued: true });
            return c.json(null);
          },
        },
      }), 1),
    );
    app.all(
      `/${version}/queued_images`,
      resource(() => ({
        GET: {
          action: "manage_image_cache",
          run: async (c) => c.json({ queued_images: await store.queued() }),
        },
        DELETE: {
          action: "manage_image_cache",
          run: async (c) => c.json({ num_deleted: await clearQueue() }),
        },
      })),
    );
    app.all(
      `/${version}/queued_images/:id`,
      resource(() => ({
        PUT: {
          action: "manage_image_cache",
          run: async (c, id) => {
            await queue(id);
            return c.json(null);
          },
        },
        DELETE: {
          action: "manage_image_cache",
          run: async (c, id) => {
            await store.dequeue(id);
            return c.json(null);
          },
        },
      }), 1),
    );
  }

  if (metricsPath !== false) {
    app.all(
      metricsPath,
      resource(() => ({
        GET: {
          action: "cache_metrics",
          run: async (c) =>
            c.body(
              await metricsText(store) + (options.cluster?.metricsText() ?? ""),
              200,
              { "content-type": METRICS_CONTENT_TYPE },
            ),
        },
      })),
    );
  }
  return app;
}
