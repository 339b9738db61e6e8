/**
 * Helpers for testing apps that use hono-image-cache: an in-memory store, a
 * fault-injecting store wrapper and a Glance-like origin serving generated
 * images.
 *
 * @example Testing a cached app without a disk
 * ```ts
 * import { Hono } from "hono";
 * import { imageCache } from "hono-image-cache";
 * import { demoOrigin, MemoryStore } from "hono-image-cache/testing";
 * import assert from "node:assert/strict";
 *
 * const { app: origin, stats } = demoOrigin({ images: { img: { size: 1000 } } });
 * const app = new Hono();
 * app.use(imageCache({ store: new MemoryStore() }));
 * app.route("/", origin);
 * await (await app.request("/v2/images/img/file")).arrayBuffer();
 * await (await app.request("/v2/images/img/file")).arrayBuffer();
 * assert.equal(stats.reads.img, 1);
 * ```
 *
 * @module
 */
export { MemoryStore } from "./src/memory_store.ts";
export type { MemoryStoreOptions } from "./src/memory_store.ts";
export { FaultyStore } from "./src/testing/faulty_store.ts";
export type { Faults, FaultyStoreOptions } from "./src/testing/faulty_store.ts";
export { demoOrigin, generatedDigests, generatedImage } from "./src/testing/demo_origin.ts";
export type { DemoImage, DemoOriginOptions, DemoOriginStats } from "./src/testing/demo_origin.ts";
