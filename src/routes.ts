/**
 * Which requests the cache serves or evicts.
 *
 * @module
 */

/**
 * One route of {@linkcode imageCache}: a method, a path pattern with a named
 * group `id`, and what the cache does with a match.
 *
 * - `serve`: answered from the cache when the image is cached (or joins a
 *   fill under way); a miss goes to the origin and may become a fill. A
 *   `serve` route also answers `HEAD`.
 * - `evict`: passed to the origin; a 2xx answer evicts the image.
 *
 * @example A custom route
 * ```ts
 * import { Hono } from "hono";
 * import { glanceRoutes, imageCache, MemoryStore, type ImageRoute } from "hono-image-cache";
 *
 * const routes: ImageRoute[] = [
 *   ...glanceRoutes,
 *   { method: "GET", path: /^\/models\/(?<id>[\w-]+)\/weights$/, action: "serve" },
 * ];
 * const app = new Hono();
 * app.use(imageCache({ store: new MemoryStore(), routes }));
 * ```
 */
export interface ImageRoute {
  /** Request method, upper case. */
  method: string;
  /** Matched against the request path (no query string); must have a named group `id`. */
  path: RegExp;
  /** What the cache does with a matching request. */
  action: "serve" | "evict";
}

/**
 * Glance's four image-data routes: v1 `GET`/`DELETE /v1/images/{id}` (the id
 * `detail` never matches), v2 `GET /v2/images/{id}/file` and v2
 * `DELETE /v2/images/{id}`.
 *
 * @example
 * ```ts
 * import { glanceRoutes, matchRoute } from "hono-image-cache";
 * import assert from "node:assert/strict";
 *
 * assert.equal(matchRoute(glanceRoutes, "GET", "/v2/images/abc/file")?.id, "abc");
 * assert.equal(matchRoute(glanceRoutes, "GET", "/v1/images/detail"), undefined);
 * ```
 */
export const glanceRoutes: readonly ImageRoute[] = Object.freeze([
  { method: "GET", path: /^\/v1\/images\/(?<id>(?!detail$)[^/]+)$/, action: "serve" },
  { method: "DELETE", path: /^\/v1\/images\/(?<id>(?!detail$)[^/]+)$/, action: "evict" },
  { method: "GET", path: /^\/v2\/images\/(?<id>[^/]+)\/file$/, action: "serve" },
  { method: "DELETE", path: /^\/v2\/images\/(?<id>[^/]+)$/, action: "evict" },
]);

/** A request matched to a route, with its decoded image id. */
export interface RouteMatch {
  /** The matched route. */
  route: ImageRoute;
  /** The image id, percent-decoded. */
  id: string;
}

/**
 * Validates routes once, when the middleware is created.
 *
 * @throws {TypeError} When a route is not of the {@linkcode ImageRoute} shape.
 */
export function checkRoutes(routes: readonly ImageRoute[], caller: string): readonly ImageRoute[] {
  if (!Array.isArray(routes)) {
    throw new TypeError(`Cannot create ${caller}: "routes" must be an array, received ${routes}`);
  }
  for (const route of routes) {
    if (
      typeof route?.method !== "string" || !(route.path instanceof RegExp) ||
      (route.action !== "serve" && route.action !== "evict")
    ) {
      throw new TypeError(
        `Cannot create ${caller}: each route needs "method", "path" (RegExp) and "action" ("serve" or "evict"), received ${
          JSON.stringify(route)
        }`,
      );
    }
    if (!/\(\?<id>/.test(route.path.source)) {
      throw new TypeError(
        `Cannot create ${caller}: route path must have a named group "id", received ${route.path}`,
      );
    }
  }
  return routes.map((route) => ({ ...route, method: route.method.toUpperCase() }));
}

/**
 * Matches a request against routes. `HEAD` matches `GET` `serve` routes.
 * The path is matched as sent (percent-encoded, no query); the id is then
 * decoded. An id that does not decode is no match.
 *
 * @param routes The routes, in order; the first match wins.
 * @param method The request method.
 * @param path The request path without the query string.
 * @returns The match, or `undefined`.
 *
 * @example
 * ```ts
 * import { glanceRoutes, matchRoute } from "hono-image-cache";
 * import assert from "node:assert/strict";
 *
 * assert.equal(matchRoute(glanceRoutes, "HEAD", "/v1/images/a%20b")?.id, "a b");
 * assert.equal(matchRoute(glanceRoutes, "DELETE", "/v2/images/x")?.route.action, "evict");
 * ```
 */
export function matchRoute(
  routes: readonly ImageRoute[],
  method: string,
  path: string,
): RouteMatch | undefined {
  for (const route of routes) {
    const served = method === route.method ||
      (method === "HEAD" && route.method === "GET" && route.action === "serve");
    if (!served) continue;
    const raw = route.path.exec(path)?.groups?.id;
    if (raw === undefined) continue;
    try {
      return { route, id: decodeURIComponent(raw) };
    } catch {
      return undefined;
    }
  }
  return undefined;
}
