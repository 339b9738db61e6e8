/**
 * Helpers of the management suites (cacheApi, prefetch, prune, metrics,
 * CLI): an origin serving byte images, and an app with `cacheApi` and
 * `imageCache` in front of it.
 *
 * @module
 */
import { Hono } from "hono";
import { cacheApi, imageCache } from "hono-image-cache";
import type { CacheAction, CacheApiOptions, FetchImage, ImageStore } from "hono-image-cache";
import { hexDigest, pattern, slowStream } from "./_helpers.ts";

/** An origin serving `images` on `GET /v2/images/{id}/file`, with `Content-MD5`. */
export interface TestOrigin {
  app: Hono;
  images: Map<string, Uint8Array>;
  /** Data reads by id. */
  reads: Map<string, number>;
  /** Milliseconds between 16 KiB chunks; change at any time. */
  delay: number;
  /** Answer this status instead of the image while > 0 times left. */
  failures: Map<string, { status: number; times: number }>;
}

/** `count` images of `size` bytes named `prefix0`, `prefix1`... */
export function images(count: number, size: number, prefix = "img"): Map<string, Uint8Array> {
  const map = new Map<string, Uint8Array>();
  for (let i = 0; i < count; i++) map.set(`${prefix}${i}`, pattern(size, i + 1));
  return map;
}

export function testOrigin(initial: Map<string, Uint8Array> = new Map()): TestOrigin {
  const origin: TestOrigin = {
    app: new Hono(),
    images: initial,
    reads: new Map(),
    delay: 0,
    failures: new Map(),
  };
  origin.app.get("/v2/images/:id/file", (c) => {
    const id = c.req.param("id");
    const failure = origin.failures.get(id);
    if (failure !== undefined && failure.times > 0) {
      failure.times--;
      return c.text("origin failure", failure.status as 500);
    }
    const bytes = origin.images.get(id);
    if (bytes === undefined) return c.text("Image not found", 404);
    origin.reads.set(id, (origin.reads.get(id) ?? 0) + 1);
    return c.body(slowStream(bytes, 16 * 1024, origin.delay), 200, {
      "content-type": "application/octet-stream",
      "content-length": String(bytes.byteLength),
      "content-md5": hexDigest(bytes),
    });
  });
  return origin;
}

/** An app with the management API and the cache in front of an origin. */
export interface ManagedApp {
  app: Hono;
  origin: TestOrigin;
  /** Actions `authorize` was asked about, as `action` or `action:id`. */
  asked: string[];
  errors: unknown[];
  fetchImage: FetchImage;
  /** Stops the background work of the management API. */
  stop(): void;
}

/** Header that `authorize` accepts. */
export const ADMIN = { "x-auth-token": "admin" };

export function managedApp(
  store: ImageStore,
  origin: TestOrigin = testOrigin(),
  options: Partial<CacheApiOptions> & { prefetch?: boolean } = {},
): ManagedApp {
  const asked: string[] = [];
  const errors: unknown[] = [];
  const controller = new AbortController();
  const fetchImage: FetchImage = (id, signal) =>
    Promise.resolve(origin.app.request(`/v2/images/${encodeURIComponent(id)}/file`, { signal }));
  const { prefetch = true, ...rest } = options;
  const app = new Hono();
  app.route(
    "/",
    cacheApi({
      store,
      authorize: (c, action: CacheAction, id) => {
        asked.push(id === undefined ? action : `${action}:${id}`);
        return c.req.header("x-auth-token") === "admin";
      },
      fetchImage: prefetch ? fetchImage : undefined,
      onError: (error) => errors.push(error),
      prefetchRetryDelay: 20,
      signal: controller.signal,
      ...rest,
    }),
  );
  app.use(imageCache({ store, onError: (error) => errors.push(error) }));
  app.route("/", origin.app);
  return { app, origin, asked, errors, fetchImage, stop: () => controller.abort() };
}

/** Runs `fn` with a managed app; stops its background work and closes the store afterwards. */
export async function withManaged(
  store: ImageStore,
  origin: TestOrigin,
  options: Partial<CacheApiOptions> & { prefetch?: boolean },
  fn: (managed: ManagedApp) => Promise<void>,
): Promise<void> {
  const managed = managedApp(store, origin, options);
  try {
    await fn(managed);
  } finally {
    managed.stop();
    await store.close();
  }
}

/** A management request as admin. */
export function admin(
  app: Hono,
  method: string,
  path: string,
  headers: Record<string, string> = {},
): Promise<Response> {
  return Promise.resolve(app.request(path, { method, headers: { ...ADMIN, ...headers } }));
}

/** `GET /v2/cache` as admin. */
export async function listing(
  app: Hono,
): Promise<{ cached_images: { image_id: string; size: number }[]; queued_images: string[] }> {
  const res = await admin(app, "GET", "/v2/cache");
  if (res.status !== 200) throw new Error(`GET /v2/cache answered ${res.status}`);
  return await res.json();
}

/** Ids of the cached images, sorted. */
export async function cachedIds(app: Hono): Promise<string[]> {
  return (await listing(app)).cached_images.map((image) => image.image_id);
}
