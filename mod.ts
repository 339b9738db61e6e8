/**
 * hono-image-cache: OpenStack Glance's transparent image cache, rebuilt as a
 * Hono middleware for large immutable objects (VM images, model weights,
 * artifacts) on Deno, Bun and Node.
 *
 * - {@linkcode imageCache}: the middleware. Hits come from the store; misses
 *   stream from the origin to every client at once while one verified copy
 *   is written.
 * - {@linkcode FileSystemStore} and {@linkcode MemoryStore}: where images live.
 * - {@linkcode cacheApi}: Glance's cache management API (list, queue,
 *   delete, clean, prune) with a prefetcher; {@linkcode metricsText}: metrics.
 * - {@linkcode joinCluster}: cluster mode, several nodes over one PostgreSQL
 *   index, the origin read once per image for the fleet.
 *
 * @example Quick start
 * ```ts
 * import { Hono } from "hono";
 * import { imageCache, MemoryStore } from "hono-image-cache";
 * import assert from "node:assert/strict";
 *
 * const app = new Hono();
 * app.use(imageCache({ store: new MemoryStore() }));
 * app.get("/v2/images/:id/file", (c) => c.body("image data"));
 *
 * await (await app.request("/v2/images/a/file")).text();
 * const hit = await app.request("/v2/images/a/file");
 * assert.equal(hit.headers.get("cache-status"), "hono-image-cache; hit");
 * await hit.body?.cancel();
 * ```
 *
 * @module
 */
export { imageCache } from "./src/image_cache.ts";
export type { AuthorizeImage, ImageCacheOptions } from "./src/image_cache.ts";
export { cacheApi } from "./src/cache_api.ts";
export type {
  AuthorizeCacheAction,
  CacheAction,
  CacheApiOptions,
  FetchImage,
  FetchImageOptions,
} from "./src/cache_api.ts";
export { joinCluster } from "./src/cluster.ts";
export type { Cluster, ClusterEviction, ClusterOptions } from "./src/cluster.ts";
export { CACHE_STATUS_DETAILS } from "./src/cache_status.ts";
export type { CacheStatusDetail } from "./src/cache_status.ts";
export { METRICS_CONTENT_TYPE, metricsText } from "./src/metrics.ts";
export { glanceRoutes, matchRoute } from "./src/routes.ts";
export type { ImageRoute, RouteMatch } from "./src/routes.ts";
export { digestFromHeaders } from "./src/digest.ts";
export type { ExpectedDigest } from "./src/digest.ts";
export { FileSystemStore } from "./src/file_system_store.ts";
export type { FileSystemStoreOptions } from "./src/file_system_store.ts";
export { MemoryStore } from "./src/memory_store.ts";
export type { MemoryStoreOptions } from "./src/memory_store.ts";
export type {
  CleanResult,
  CommitInfo,
  CreateWriterOptions,
  Digest,
  DigestAlgorithm,
  ImageEntry,
  ImageFollower,
  ImageStore,
  ImageWriter,
  WriterRefusal,
} from "./src/image_store.ts";
