/**
 * A TypeScript consumer of the npm package: type-checked with `tsc --noEmit`
 * (moduleResolution node16 and bundler) against the installed tarball's
 * `.d.ts` files by scripts/test_all.ts. Never run; `deno check` also checks
 * it against the source.
 */
import { Hono } from "hono";
import {
  type ExpectedDigest,
  FileSystemStore,
  glanceRoutes,
  imageCache,
  type ImageCacheOptions,
  type ImageEntry,
  type ImageRoute,
  type ImageStore,
  MemoryStore,
} from "hono-image-cache";
import {
  demoOrigin,
  FaultyStore,
  MemoryStore as TestingMemoryStore,
} from "hono-image-cache/testing";
import type { MiddlewareHandler } from "hono";

const store: ImageStore = new FileSystemStore({ directory: "./.image-cache", maxSize: 2 ** 30 });
const routes: ImageRoute[] = [
  ...glanceRoutes,
  { method: "GET", path: /^\/blobs\/(?<id>[^/]+)$/, action: "serve" },
];
const expectedDigest = (): ExpectedDigest | undefined => undefined;
const options: ImageCacheOptions = {
  store,
  routes,
  expectedDigest,
  cacheStatus: "edge",
  onError: (error: unknown) => console.error(error),
};
const middleware: MiddlewareHandler = imageCache(options);

const app = new Hono();
app.use(middleware);
app.use(imageCache({ store: new MemoryStore({ maxSize: 2 ** 20 }) }));
app.use(imageCache({ store: new FaultyStore(new TestingMemoryStore(), {}) }));
app.route("/", demoOrigin({ images: { a: { size: 10 } } }).app);

export async function sizeOf(id: string): Promise<number | undefined> {
  const entry: ImageEntry | undefined = await store.get(id);
  return entry?.size;
}

// @ts-expect-error: a store is required.
imageCache({});
// @ts-expect-error: the action is "serve" or "evict".
const wrong: ImageRoute = { method: "GET", path: /x/, action: "fetch" };

export { app, wrong };
