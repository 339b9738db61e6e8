/**
 * The caching proxy's building blocks: put {@linkcode imageCache} in front of
 * a real Glance (or any origin) with one call.
 *
 * - {@linkcode upstreamProxy}: a streaming reverse-proxy handler (hop-by-hop
 *   headers removed, `X-Forwarded-*` and `Forwarded` added, bodies streamed
 *   both ways, `502` when the upstream cannot be reached, `504` when it sends
 *   no headers in time, redirects passed through).
 * - {@linkcode glanceAccessCheck}: before a cached image is served, asks the
 *   upstream what Glance would decide for a download with the client's own
 *   credentials (the first byte of `GET /v2/images/{id}/file`; the answer is
 *   cached briefly per credential and image), and verifies fills with the
 *   `os_hash_algo` / `os_hash_value` that metadata announces.
 * - {@linkcode proxyApp}: both, with the cache, the management API and the
 *   metrics behind tokens, health probes, an access log and events, as one
 *   Hono app. `deno task serve` (and the npm package's `hono-image-cache
 *   serve`) is a command line around it.
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
export { upstreamProxy } from "./src/proxy/upstream.ts";
export type { UpstreamProxyOptions } from "./src/proxy/upstream.ts";
export { glanceAccessCheck } from "./src/proxy/access_check.ts";
export type {
  AccessVerdict,
  GlanceAccessCheck,
  GlanceAccessCheckOptions,
} from "./src/proxy/access_check.ts";
export { formatAccessLog, formatProxyEvent } from "./src/proxy/access_log.ts";
export type { AccessLogEntry, LogFormat, ProxyEvent } from "./src/proxy/access_log.ts";
export { adminTokenCheck } from "./src/proxy/admin.ts";
export { proxyApp } from "./src/proxy/app.ts";
export type { ProxyApp, ProxyAppOptions } from "./src/proxy/app.ts";
