/**
 * A fake Glance for the proxy's tests, on a loopback port: the demo origin
 * behind Keystone-like token checks that tell metadata visibility
 * (`get_image`) from the download policy (`download_image`), as Glance does,
 * with switches for what goes wrong (corrupt bytes, an outage, changed
 * metadata); and a caching proxy in front of it. Runtime-neutral.
 *
 * @module
 */
import { type Context, Hono } from "hono";
import { FileSystemStore } from "hono-image-cache";
import { proxyApp } from "hono-image-cache/proxy";
import type { AccessLogEntry, ProxyApp, ProxyAppOptions, ProxyEvent } from "hono-image-cache/proxy";
import { demoOrigin, generatedImage } from "hono-image-cache/testing";
import type { DemoImage, DemoOriginStats } from "hono-image-cache/testing";
import { readBody, startServer, type TestServer, withTempDir } from "./_helpers.ts";

/** What a token may do: images it sees (metadata) and images it may download. */
export interface TokenRights {
  see: "all" | string[];
  download: "all" | string[];
}

/** Options of {@linkcode startGlance}. */
export interface GlanceOptions {
  images: Record<string, DemoImage>;
  chunkDelay?: number;
  chunkSize?: number;
  /**
   * Glance-like auth: a token's rights (`"all"` or a list of ids: both
   * rights). Without a valid token: 401; an image it does not see: 404;
   * one it sees but may not download: 403. Without `tokens`, no auth.
   */
  tokens?: Record<string, "all" | string[] | TokenRights>;
  /** Image data without credentials (a public download), metadata still with them. */
  publicData?: boolean;
  /** Changes the metadata the upstream announces for an image. */
  metadata?: (id: string, fields: Record<string, unknown>) => Record<string, unknown>;
  /** More routes, before the demo origin's. */
  routes?: (app: Hono) => void;
}

/** A running fake Glance. */
export interface Glance {
  url: string;
  stats: DemoOriginStats;
  images: Record<string, DemoImage>;
  /** `GET /v2/images/{id}` requests seen (metadata). */
  metadataCalls: () => number;
  /** `GET /v2/images/{id}/file` requests with a `Range` header (the access check's probes). */
  probeCalls: () => number;
  /** Whole downloads (`GET /v2/images/{id}/file` without `Range`, or v1), by id. */
  downloads: Record<string, number>;
  /** Every request seen, as `METHOD path`. */
  requests: string[];
  /** The `X-Request-Id` of every request seen that had one. */
  requestIds: string[];
  /** Ids whose bytes are corrupted (one byte flipped) and sent without `Content-MD5`. */
  corrupt: Set<string>;
  /** While set, every request is answered with this status (an outage behind a load balancer). */
  failWith: number | undefined;
  close(): Promise<void>;
}

/** Starts a {@linkcode Glance} on a loopback port. */
export async function startGlance(options: GlanceOptions): Promise<Glance> {
  const origin = demoOrigin({
    images: options.images,
    chunkDelay: options.chunkDelay,
    chunkSize: options.chunkSize,
  });
  let metadataCalls = 0;
  let probeCalls = 0;
  const glance = {
    requests: [] as string[],
    requestIds: [] as string[],
    corrupt: new Set<string>(),
    failWith: undefined as number | undefined,
    downloads: {} as Record<string, number>,
  };
  const app = new Hono();
  app.use("*", async (c, next) => {
    glance.requests.push(`${c.req.method} ${new URL(c.req.url).pathname}`);
    const requestId = c.req.header("x-request-id");
    if (requestId !== undefined) glance.requestIds.push(requestId);
    if (glance.failWith !== undefined) return c.text("Service unavailable", glance.failWith as 503);
    await next();
  });
  app.use("/v2/images/:id", async (c, next) => {
    if (c.req.method === "GET") metadataCalls++;
    await next();
  });
  app.use("/v2/images/:id/file", async (c, next) => {
    if (c.req.method === "GET") {
      if (c.req.header("range") !== undefined) probeCalls++;
      else glance.downloads[c.req.param("id")] = (glance.downloads[c.req.param("id")] ?? 0) + 1;
    }
    await next();
  });
  if (options.tokens !== undefined) {
    const tokens = options.tokens;
    const rights = (token: string | undefined): TokenRights | undefined => {
      const given = token === undefined ? undefined : tokens[token];
      if (given === undefined) return undefined;
      return given === "all" || Array.isArray(given) ? { see: given, download: given } : given;
    };
    const has = (list: "all" | string[], id: string) => list === "all" || list.includes(id);
    const guard = (download: boolean) => async (c: Context, next: () => Promise<void>) => {
      const own = rights(c.req.header("x-auth-token"));
      if (own === undefined) {
        return c.text("Authentication required", 401, {
          "www-authenticate": "Keystone uri='http://keystone.invalid'",
        });
      }
      const id = c.req.param("id") ?? "";
      // Glance: an image a project cannot see is "not found"; one it sees but may not
      // download (the download_image policy) is "forbidden".
      if (!has(own.see, id)) return c.json({ message: "Image not found" }, 404);
      if (download && c.req.method === "GET" && !has(own.download, id)) {
        return c.text("Forbidden: download_image", 403);
      }
      await next();
    };
    app.use("/v2/images/:id", guard(false));
    if (!options.publicData) app.use("/v2/images/:id/file", guard(true));
  }
  // Glance refuses the data of a deactivated image to non-admins (403).
  app.get("/v2/images/:id/file", async (c, next) => {
    const image = origin.images[c.req.param("id")];
    if (image?.status === "deactivated") return c.text("Forbidden: image deactivated", 403);
    if (!glance.corrupt.has(c.req.param("id"))) return next();
    const res = await origin.app.request(c.req.raw.url, { headers: c.req.raw.headers });
    let first = true;
    const flipped = res.body!.pipeThrough(
      new TransformStream<Uint8Array, Uint8Array>({
        transform(chunk, controller) {
          if (first && chunk.byteLength > 0) {
            chunk = chunk.slice();
            chunk[0] ^= 0xff;
            first = false;
          }
          controller.enqueue(chunk);
        },
      }),
    );
    const headers = new Headers(res.headers);
    headers.delete("content-md5");
    return new Response(flipped, { status: res.status, headers });
  });
  if (options.metadata !== undefined) {
    const edit = options.metadata;
    app.get("/v2/images/:id", async (c) => {
      const res = await origin.app.request(c.req.raw.url);
      if (res.status !== 200) return res;
      return c.json(edit(c.req.param("id"), await res.json()));
    });
  }
  options.routes?.(app);
  app.route("/", origin.app);
  const server = await startServer(app.fetch);
  return Object.assign(glance, {
    url: server.url,
    stats: origin.stats,
    images: origin.images,
    metadataCalls: () => metadataCalls,
    probeCalls: () => probeCalls,
    close: () => server.close(),
  });
}

/** A caching proxy under test, on a loopback port. */
export interface TestProxy {
  url: string;
  store: FileSystemStore;
  proxy: ProxyApp;
  logs: AccessLogEntry[];
  events: ProxyEvent[];
  errors: unknown[];
  server: TestServer;
}

/**
 * Runs `fn` with a caching proxy in front of `upstream` (a fresh
 * FileSystemStore in a temporary directory), on a loopback port; access
 * log entries, events and cache faults are collected.
 */
export function withProxy(
  upstream: string,
  options: Partial<ProxyAppOptions>,
  fn: (proxy: TestProxy) => Promise<void>,
): Promise<void> {
  return withTempDir(async (dir) => {
    const store = new FileSystemStore({ directory: dir });
    // The store sets its directory up in the background: let it finish before any cleanup.
    await store.list();
    const logs: AccessLogEntry[] = [];
    const events: ProxyEvent[] = [];
    const errors: unknown[] = [];
    const proxy = proxyApp({
      upstream,
      store,
      onLog: (entry) => logs.push(entry),
      onEvent: (event) => events.push(event),
      onError: (error) => errors.push(error),
      ...options,
    });
    const server = await startServer(proxy.fetch);
    try {
      await fn({ url: server.url, store, proxy, logs, events, errors, server });
    } finally {
      await server.close();
      proxy.close();
      await proxy.settle(5000);
      await store.close();
    }
  });
}

/** The bytes of a generated image. */
export async function imageBytes(id: string, size: number): Promise<Uint8Array> {
  return new Uint8Array(await new Response(generatedImage(id, 0, size)).arrayBuffer());
}

/** GET `url`, read to the end (or to the error that cut it). */
export async function get(url: string, headers: Record<string, string> = {}) {
  const res = await fetch(url, { headers });
  const { bytes, error } = await readBody(res);
  return { res, bytes, error };
}
