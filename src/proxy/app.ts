/**
 * {@linkcode proxyApp}: the whole caching proxy as one Hono app.
 *
 * @module
 */
import { type Context, Hono } from "hono";
import { coreFor } from "../_core/core.ts";
import { requestPath } from "../_http/path.ts";
import { checkFunction, checkSize } from "../_options.ts";
import { digestFromHeaders, type ExpectedDigest } from "../digest.ts";
import { type AuthorizeCacheAction, cacheApi, type FetchImageOptions } from "../cache_api.ts";
import type { Cluster } from "../cluster.ts";
import { imageCache } from "../image_cache.ts";
import type { ImageStore } from "../image_store.ts";
import { METRICS_CONTENT_TYPE, metricsText } from "../metrics.ts";
import { glanceRoutes, type ImageRoute, matchRoute } from "../routes.ts";
import {
  type AccessVerdict,
  type GlanceAccessCheck,
  glanceAccessCheck,
  type GlanceAccessCheckOptions,
} from "./access_check.ts";
import { type AccessLogEntry, type ProxyEvent, requestObserver } from "./access_log.ts";
import { adminTokenCheck } from "./admin.ts";
import { trustedProxies } from "./_client.ts";
import { liveness, readiness } from "./_health.ts";
import {
  DigestUnknown,
  fillDigest,
  type GlanceEndpoint,
  imageMetadata,
  type MetadataAnswer,
  serviceCredentials,
} from "./_metadata.ts";
import { ProxyMetrics } from "./_metrics.ts";
import {
  credentialsOf,
  describeError,
  notesOf,
  parseUpstream,
  tokensCheck,
  UpstreamFailure,
} from "./_shared.ts";
import { upstreamProxy } from "./upstream.ts";
import { rebody } from "../_http/body.ts";

/** Options of {@linkcode proxyApp}. */
export interface ProxyAppOptions {
  /** The origin: a Glance endpoint (`http://glance.internal:9292`) or any HTTP origin. */
  upstream: string | URL;
  /** Where images are kept. */
  store: ImageStore;
  /**
   * Glance's access check on hits (see {@linkcode glanceAccessCheck}), with
   * its options; `false` serves hits without asking (only for an origin
   * whose images are public). Fills are verified either way.
   * @default {true}
   */
  accessCheck?:
    | boolean
    | Omit<GlanceAccessCheckOptions, "upstream" | "fetch" | "routes" | "serviceToken">;
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
   * A read-only credential for `GET /metrics` alone (the admin token also
   * reads it). With either, `/metrics` is the cache's metrics followed by
   * the proxy's own; with neither, it goes to the upstream.
   */
  metricsToken?: string;
  /**
   * The credential (`X-Auth-Token`) the cache downloads with when no client
   * is there: prefetches (`PUT /v2/cache/{id}`) and the background fill a
   * `Range` miss starts. It also reads metadata a client may not, and
   * confirms that an image is deleted. Without it, prefetches go without
   * credentials (enough for an origin without authentication) and `Range`
   * misses start no background fill. A function is asked before each
   * download, so a token that expires (Keystone's do) can be renewed
   * without a restart.
   */
  serviceToken?: string | (() => string | Promise<string>);
  /**
   * Cache only what can be verified: a fill whose metadata announces no
   * digest and whose answer has no `Content-MD5` is passed through uncached
   * (`detail=no-digest`).
   * @default {false}
   */
  requireDigest?: boolean;
  /**
   * Milliseconds during which a credential the upstream allowed may still
   * read a cached image when the upstream cannot be reached (or answers
   * `5xx`; never when it says no). See `staleIfError` of
   * {@linkcode glanceAccessCheck}.
   * @default {0}
   */
  serveStaleOnError?: number;
  /**
   * Prefetches at once.
   * @default {2}
   */
  prefetchConcurrency?: number;
  /**
   * Failed attempts after which a queued image is no longer prefetched (it
   * stays queued, marked `gave_up`, until queued again).
   * @default {5}
   */
  prefetchAttempts?: number;
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
  /**
   * Addresses or CIDR ranges (`10.0.0.0/8`, `fd00::/8`) of the proxies in
   * front of this one: from them, the client's address in the access log is
   * taken from `X-Forwarded-For`. From anyone else that header is ignored.
   * @default {[]}
   */
  trustedProxies?: readonly string[];
  /**
   * Mounts `GET /healthz` (liveness: no token, no upstream request) and
   * `GET /readyz` (the cache directory takes a write, the upstream answers).
   * @default {true}
   */
  health?: boolean;
  /** Called once per request when its body ended (see {@linkcode formatAccessLog}). */
  onLog?: (entry: AccessLogEntry) => void;
  /**
   * Log hits too; `false` keeps the log to misses and everything else.
   * @default {true}
   */
  logHits?: boolean;
  /**
   * Things worth an operator's attention, one event each (see
   * {@linkcode formatProxyEvent}): upstream errors, failed access checks,
   * images gone, fills not cached, cache faults (unless `onError` takes
   * them).
   * @default {warnings and errors to console.warn}
   */
  onEvent?: (event: ProxyEvent) => void;
  /**
   * Cache-side faults, as errors; without it they become `cache-error`
   * events.
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
  /** The Hono app: observer, health, metrics, management API, access check, cache, proxy. */
  readonly app: Hono;
  /** `app.fetch`, for `Deno.serve`, `Bun.serve` or `@hono/node-server`. */
  readonly fetch: (request: Request, env?: unknown) => Response | Promise<Response>;
  /** Whether the management API is mounted. */
  readonly managed: boolean;
  /** Stops the background work (prefetch worker, cleaning timer); prefetches under way are aborted. */
  close(): void;
  /** From now on `/readyz` answers `503` (shutdown began: load balancers look elsewhere). */
  beginShutdown(): void;
  /** Requests whose response has not ended yet. */
  inFlight(): number;
  /** Ids of the fills under way. */
  filling(): string[];
  /**
   * Waits for the fills under way, at most `timeout` ms (shutdown).
   * Resolves `true` when none is left.
   */
  settle(timeout: number): Promise<boolean>;
  /** The metrics `/metrics` serves: the cache's, then the proxy's own. */
  metricsText(): Promise<string>;
}

/**
 * The whole caching proxy as one Hono app: every request is forwarded to
 * `upstream` ({@linkcode upstreamProxy}); Glance's image reads are answered
 * from `store` once cached, after the upstream said the client may
 * download the image ({@linkcode glanceAccessCheck}); fills are verified
 * with the metadata's SHA-512 (or `checksum`, or `Content-MD5`), whether
 * the access check is on or not; a `DELETE` through the proxy evicts, and
 * so does the upstream reporting an image deleted; the management API and
 * the metrics are mounted behind tokens; `/healthz` and `/readyz` answer
 * probes; each request is counted, and logged once its body ends.
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
  const onEvent = checkFunction(owner, "onEvent", options.onEvent, undefined);
  const onError = checkFunction(owner, "onError", options.onError, undefined);
  const service = serviceCredentials(owner, options.serviceToken);
  const requireDigest = options.requireDigest ?? false;
  const staleIfError = checkSize(owner, "serveStaleOnError", options.serveStaleOnError, 0);
  const prefetchAttempts = options.prefetchAttempts ?? 5;
  const trusted = options.trustedProxies === undefined || options.trustedProxies.length === 0
    ? undefined
    : trustedProxies(owner, options.trustedProxies);
  const authorizeAdmin = options.authorizeAdmin !== undefined
    ? checkFunction(owner, "authorizeAdmin", options.authorizeAdmin, undefined)
    : options.adminToken !== undefined
    ? adminTokenCheck(options.adminToken)
    : undefined;
  const metricsToken = options.metricsToken;
  if (
    metricsToken !== undefined && (typeof metricsToken !== "string" || metricsToken.length < 16)
  ) {
    throw new TypeError(
      `Cannot create ${owner}: "metricsToken" must be a string of at least 16 characters, received ${
        typeof metricsToken === "string" ? `${metricsToken.length} characters` : typeof metricsToken
      }`,
    );
  }

  const metrics = new ProxyMetrics();
  const emit = (event: ProxyEvent) => {
    try {
      if (onEvent !== undefined) onEvent(event);
      else if (event.level === "error" || event.level === "warn") {
        console.warn(`hono-image-cache: ${event.message}`);
      }
    } catch {
      // A failing logger must not fail the request.
    }
  };
  const imageOf = (c: Context | undefined) =>
    c === undefined ? undefined : matchRoute(routes, c.req.method, requestPath(c.req.url))?.id;
  /** Cache-side faults: to `onError` when given, else as events. */
  const cacheFault = (error: unknown, c?: Context) => {
    if (onError !== undefined) {
      try {
        onError(error, c);
      } catch {
        // A throwing error handler must not fail the request.
      }
      return;
    }
    const message = error instanceof Error ? error.message : String(error);
    emit({
      level: "warn",
      event: error instanceof DigestUnknown ? "digest-unknown" : "cache-error",
      imageId: imageOf(c) ?? /image "([^"]+)"/.exec(message)?.[1],
      requestId: c === undefined ? undefined : notesOf(c.req.raw).id,
      message,
      error,
    });
  };

  const endpoint: GlanceEndpoint = {
    prefix: upstream.origin + upstream.pathname.replace(/\/+$/, ""),
    send,
    timeout: headerTimeout,
  };
  /** Metadata asked for the digest; a failure is counted once, here. */
  const askMetadata = (headers: Headers, imageId: string): Promise<MetadataAnswer> =>
    imageMetadata(endpoint, headers, imageId).then((answer) => {
      if (answer.kind === "failed") metrics.upstreamError("metadata", answer.failure);
      return answer;
    });

  const app = new Hono();
  app.use(requestObserver({
    onLog,
    logHits: options.logHits ?? true,
    metrics,
    routes,
    trusted,
    onCut: (error, request) =>
      emit({
        level: "warn",
        event: "response-cut",
        imageId: request.imageId,
        requestId: request.id,
        message: `The response to ${request.method} ${request.path} was cut before its end: ${
          describeError(error)
        }`,
        error,
      }),
  }));

  let stopping = false;
  if (options.health ?? true) {
    app.get("/healthz", liveness);
    const directory = (store as { directory?: unknown }).directory;
    app.get("/readyz", (c) =>
      readiness(c, {
        directory: typeof directory === "string" ? directory : undefined,
        prefix: endpoint.prefix,
        send,
        timeout: Math.min(headerTimeout, 5000),
        stopping: () => stopping,
        onFailure: (check, detail) =>
          emit({ level: "warn", event: "not-ready", message: `Not ready: ${check}: ${detail}` }),
      }));
  }

  const cacheMetrics = async () => (await metricsText(store)) + metrics.text();
  if (metricsToken !== undefined || authorizeAdmin !== undefined) {
    const byToken = metricsToken === undefined
      ? undefined
      : tokensCheck([metricsToken], "the metrics need the metrics token or the admin token");
    app.get("/metrics", async (c) => {
      const byMetricsToken = byToken?.(c);
      if (byMetricsToken !== true && authorizeAdmin !== undefined) {
        // Not the metrics token: it may still be the admin's.
        const admin = await authorizeAdmin(c, "cache_metrics");
        if (admin !== true) {
          return admin instanceof Response
            ? admin
            : c.text("Forbidden: not allowed to read the metrics", 403);
        }
      } else if (byMetricsToken !== true) {
        return byMetricsToken!;
      }
      return c.body(await cacheMetrics(), 200, { "content-type": METRICS_CONTENT_TYPE });
    });
  }

  const credentialNames = (options.accessCheck !== false && options.accessCheck !== true &&
    options.accessCheck?.credentialHeaders) ||
    ["x-auth-token", "authorization", "cookie"];

  let access: GlanceAccessCheck | undefined;
  const accessOptions = options.accessCheck ?? true;
  const core = coreFor(store);
  if (accessOptions !== false) {
    const given = accessOptions === true ? {} : accessOptions;
    access = glanceAccessCheck({
      ...given,
      upstream,
      routes,
      timeout: given.timeout ?? headerTimeout,
      staleIfError: given.staleIfError ?? staleIfError,
      serviceToken: options.serviceToken,
      fetch: send,
      onGone: async (imageId) => {
        await given.onGone?.(imageId);
        await core.evict(imageId);
      },
      onEvent: (event) => {
        given.onEvent?.(event);
        emit(event);
      },
      onVerdict: (verdict: AccessVerdict) => {
        given.onVerdict?.(verdict);
        const outcome = verdict.allowed
          ? verdict.stale ? "stale" : "allowed"
          : verdict.cacheable
          ? "denied"
          : "failed";
        metrics.accessCheck(outcome, verdict.remembered === true);
        if (!verdict.allowed && verdict.outage && !verdict.remembered) {
          metrics.upstreamError("access-check", verdict.outage);
        }
      },
    });
    app.use(access.middleware);
  }

  // Downloads without a client (prefetch, the background fill of a Range miss): with
  // the service token, verified with the digest the metadata announces to it.
  const serviceDigests = new WeakMap<Response, () => Promise<ExpectedDigest | undefined>>();
  const fetchImage = async (
    imageId: string,
    signal: AbortSignal,
    fetchOptions?: FetchImageOptions,
  ): Promise<Response> => {
    const headers = (await service?.()) ??
      new Headers({ accept: "application/json", "accept-encoding": "identity" });
    const metadata = askMetadata(headers, imageId);
    const fileHeaders = new Headers(headers);
    fileHeaders.set("accept", "*/*");
    // Cluster mode resuming a transfer a peer dropped: the rest only.
    const start = fetchOptions?.start ?? 0;
    if (start > 0) fileHeaders.set("range", `bytes=${start}-`);
    const quoted = JSON.stringify(imageId);
    let response;
    try {
      response = await send(
        new Request(`${endpoint.prefix}/v2/images/${encodeURIComponent(imageId)}/file`, {
          headers: fileHeaders,
          signal,
          redirect: "manual",
        }),
      );
    } catch (error) {
      if (!signal.aborted) metrics.upstreamError("prefetch", "unreachable");
      throw new UpstreamFailure(
        "unreachable",
        `Cannot download image ${quoted} from ${endpoint.prefix}: ${describeError(error)}`,
        error,
      );
    }
    // A Response of the global class: @hono/node-server replaces the global `Response`,
    // and `fetch` still makes undici's (the cache checks `instanceof Response`).
    const answer: Response = response instanceof Response ? response : rebody(response as Response);
    if (answer.status === 401 || answer.status === 403) {
      emit({
        level: "warn",
        event: "prefetch-refused",
        imageId,
        message: service === undefined
          ? `The upstream answered ${answer.status} to the download of image ${quoted} without credentials: give the proxy a service token (serviceToken; serve: IMAGE_CACHE_SERVICE_TOKEN or --service-token-file)`
          : `The upstream answered ${answer.status} to the download of image ${quoted} with the service token: renew it, or give it the right to download every image`,
      });
    } else if (answer.status >= 500) {
      metrics.upstreamError("prefetch", "status-5xx");
    }
    serviceDigests.set(
      answer,
      () => fillDigest(endpoint, imageId, answer, headers, [], undefined, metadata),
    );
    return answer;
  };
  const serviceDigest = (response: Response) =>
    serviceDigests.get(response)?.() ?? digestFromHeaders(response.headers);

  // The metadata a client's miss asks for, started alongside its download.
  const clientMetadata = new WeakMap<Request, Promise<MetadataAnswer>>();
  const expectedDigest = (c: Context, response: Response) => {
    const own = serviceDigests.get(response);
    if (own !== undefined) return own();
    const imageId = imageOf(c);
    if (imageId === undefined) return digestFromHeaders(response.headers);
    const first = clientMetadata.get(c.req.raw);
    return fillDigest(endpoint, imageId, response, c.req.raw, credentialNames, service, first);
  };

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
        requireDigest,
        prefetchConcurrency: options.prefetchConcurrency,
        prefetchMaxAttempts: prefetchAttempts,
        metricsPath: false,
        onError: cacheFault,
        signal: background.signal,
        cluster: options.cluster,
      }),
    );
  }

  // A hit allowed on a stale answer says so (RFC 9211 `detail`), for clients and the log.
  app.use(async function staleMark(c, next) {
    await next();
    if (!notesOf(c.req.raw).stale) return;
    const status = c.res.headers.get("cache-status");
    if (status === null || !/;\s*hit\b/.test(status)) return;
    try {
      c.res.headers.set("cache-status", `${status}; detail=stale-access`);
    } catch {
      // Immutable headers: the log still counts it as a hit.
    }
  });

  app.use(imageCache({
    store,
    routes,
    authorize: access?.authorize,
    expectedDigest,
    requireDigest,
    onError: cacheFault,
    // Cluster mode: also the origin a transfer falls back to when a peer fails mid-stream.
    fetchImage: service === undefined && options.cluster === undefined ? undefined : fetchImage,
    fillOnRange: service !== undefined,
    cluster: options.cluster,
  }));

  const forward = upstreamProxy({
    upstream,
    headerTimeout,
    fetch: send,
    onError: (error, c) => {
      const notes = notesOf(c.req.raw);
      metrics.upstreamError("request", notes.upstreamError ?? "unreachable");
      emit({
        level: "warn",
        event: "upstream-error",
        imageId: imageOf(c),
        requestId: notes.id,
        message: `Cannot forward ${c.req.method} to the upstream: ${error.message}`,
        error,
      });
    },
  });
  app.all("*", async function origin(c) {
    const match = matchRoute(routes, c.req.method, requestPath(c.req.url));
    const download = match?.route.action === "serve" && c.req.method === "GET" ? match : undefined;
    if (download !== undefined && c.req.header("range") === undefined) {
      // The digest to verify the fill with, asked while the upstream starts sending.
      const metadata = askMetadata(credentialsOf(c.req.raw.headers, credentialNames), download.id);
      clientMetadata.set(c.req.raw, metadata);
    }
    const response = await forward(c, () => Promise.resolve()) as Response;
    // The upstream's answer to this client's own download is Glance's decision: remember it.
    if (download !== undefined) access?.learn(c.req.raw, download.id, response.status);
    if (response.status >= 500 && notesOf(c.req.raw).upstreamError === undefined) {
      metrics.upstreamError("request", "status-5xx");
    }
    return response;
  });

  return {
    app,
    fetch: app.fetch,
    managed,
    close: () => background.abort(),
    beginShutdown: () => {
      stopping = true;
    },
    inFlight: () => metrics.inFlight,
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
    metricsText: cacheMetrics,
  };
}
