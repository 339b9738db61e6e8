/**
 * {@linkcode proxyApp}: the whole caching proxy as one Hono app.
 *
 * @module
 */
import { type Context, Hono } from "hono";
import { coreFor } from "../_core/core.ts";
import { checkFunction, checkSize } from "../_options.ts";
import { digestFromHeaders, type ExpectedDigest } from "../digest.ts";
import { type AuthorizeCacheAction, cacheApi, type FetchImageOptions } from "../cache_api.ts";
import type { Cluster } from "../cluster.ts";
import { imageCache } from "../image_cache.ts";
import type { ImageStore } from "../image_store.ts";
import { glanceRoutes, type ImageRoute } from "../routes.ts";
import {
  type GlanceAccessCheck,
  glanceAccessCheck,
  type GlanceAccessCheckOptions,
} from "./access_check.ts";
import { accessLog, type AccessLogEntry } from "./access_log.ts";
import { adminTokenCheck } from "./admin.ts";
import { parseUpstream } from "./_shared.ts";
import { upstreamProxy } from "./upstream.ts";

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
  /**
   * Cluster mode (see `joinCluster`): misses read from a peer that has the
   * image (after the access check), the origin once per image for the
   * cluster; `GET /v2/cache/nodes/{id}` and cluster-scoped deletes.
   */
  cluster?: Cluster;
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
  const fetchImage = async (
    imageId: string,
    signal: AbortSignal,
    fetchOptions?: FetchImageOptions,
  ): Promise<Response> => {
    const serviceHeaders = new Headers({ "accept-encoding": "identity" });
    // Cluster mode resuming a transfer a peer dropped: the rest only.
    const start = fetchOptions?.start ?? 0;
    const range: Record<string, string> = start > 0 ? { range: `bytes=${start}-` } : {};
    const token = typeof serviceToken === "function" ? await serviceToken() : serviceToken;
    if (token !== undefined && token !== "") serviceHeaders.set("x-auth-token", token.trim());
    const metadata = access?.check(
      new Request(`${upstream.origin}/`, { headers: serviceHeaders }),
      imageId,
    );
    const response = await send(
      new Request(`${upstream.origin}${basePath}/v2/images/${encodeURIComponent(imageId)}/file`, {
        headers: { ...Object.fromEntries(serviceHeaders), ...range },
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
        cluster: options.cluster,
      }),
    );
  }

  app.use(imageCache({
    store,
    routes,
    authorize: access?.authorize,
    expectedDigest: access?.expectedDigest,
    onError: options.onError,
    // Cluster mode: also the origin a transfer falls back to when a peer fails mid-stream.
    fetchImage: serviceToken === undefined && options.cluster === undefined
      ? undefined
      : fetchImage,
    fillOnRange: serviceToken !== undefined,
    cluster: options.cluster,
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
