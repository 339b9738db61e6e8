/**
 * The cache's metrics in the Prometheus text exposition format (version
 * 0.0.4): counters of requests and bytes, gauges of fills, size and queue.
 *
 * @module
 */
import { coreFor } from "./_core/core.ts";
import type { ImageStore } from "./image_store.ts";

/** The `Content-Type` of the Prometheus text format. */
export const METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8";

type Sample = [labels: Record<string, string>, value: number];

/** Escapes a label value (backslash, double quote, line feed). */
function escapeLabel(value: string): string {
  return value.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, "\\n");
}

function family(
  name: string,
  type: "counter" | "gauge",
  help: string,
  samples: Sample[],
): string {
  let text = `# HELP ${name} ${help}\n# TYPE ${name} ${type}\n`;
  for (const [labels, value] of samples) {
    const pairs = Object.entries(labels).map(([key, v]) => `${key}="${escapeLabel(v)}"`);
    text += `${name}${pairs.length > 0 ? `{${pairs.join(",")}}` : ""} ${value}\n`;
  }
  return text;
}

/**
 * The metrics of the cache kept in `store`, in the Prometheus text format:
 * what every `imageCache` and `cacheApi` bound to this store counted since
 * the process started, and the store's current size.
 *
 * | Metric | Type | Meaning |
 * | --- | --- | --- |
 * | `image_cache_hits_total` | counter | Requests answered from a committed entry |
 * | `image_cache_misses_total` | counter | Requests that went to the origin |
 * | `image_cache_coalesced_total` | counter | Requests that joined a fill another request started |
 * | `image_cache_hit_bytes_total` | counter | Bytes answered from committed entries |
 * | `image_cache_origin_bytes_total` | counter | Bytes fills read from the origin |
 * | `image_cache_verification_failures_total` | counter | Fills whose digest or length did not match |
 * | `image_cache_commits_total` | counter | Fills committed |
 * | `image_cache_commit_failures_total` | counter | Fills whose body verified but the store could not commit |
 * | `image_cache_evictions_total` | counter | Entries removed by pruning |
 * | `image_cache_pass_through_total{reason}` | counter | Misses not stored, by `Cache-Status` detail |
 * | `image_cache_prefetches_total{result}` | counter | Prefetch attempts: `cached` or `failed`; `gave_up`: images tried no more |
 * | `image_cache_fills_in_progress` | gauge | Fills under way in this process |
 * | `image_cache_size_bytes` | gauge | Bytes of committed entries |
 * | `image_cache_reserved_bytes` | gauge | Bytes reserved by fills under way |
 * | `image_cache_max_size_bytes` | gauge | The store's `maxSize` |
 * | `image_cache_entries` | gauge | Committed entries |
 * | `image_cache_queued_images` | gauge | Images in the prefetch queue |
 *
 * @param store The store whose cache to describe.
 * @returns The exposition text, to serve with {@linkcode METRICS_CONTENT_TYPE}.
 *
 * @example Serving metrics on your own route
 * ```ts
 * import { Hono } from "hono";
 * import { imageCache, MemoryStore, metricsText } from "hono-image-cache";
 * import assert from "node:assert/strict";
 *
 * const store = new MemoryStore();
 * const app = new Hono();
 * app.get("/internal/metrics", async (c) => c.text(await metricsText(store)));
 * app.use(imageCache({ store }));
 * app.get("/v2/images/:id/file", (c) => c.body("image"));
 *
 * await (await app.request("/v2/images/a/file")).text();
 * await (await app.request("/v2/images/a/file")).text();
 * const text = await (await app.request("/internal/metrics")).text();
 * assert.match(text, /^image_cache_hits_total 1$/m);
 * assert.match(text, /^image_cache_misses_total 1$/m);
 * ```
 */
export async function metricsText(store: ImageStore): Promise<string> {
  const core = coreFor(store);
  const counters = core.counters;
  const [usage, queued] = await Promise.all([
    core.pruner.usage(),
    store.queued().then((ids) => ids.length),
  ]);
  const reasons = Object.keys(counters.passThrough).sort();
  return [
    family("image_cache_hits_total", "counter", "Requests answered from a committed entry.", [
      [{}, counters.hits],
    ]),
    family("image_cache_misses_total", "counter", "Requests that went to the origin.", [
      [{}, counters.misses],
    ]),
    family(
      "image_cache_coalesced_total",
      "counter",
      "Requests that joined a fill another request started.",
      [[{}, counters.coalesced]],
    ),
    family(
      "image_cache_hit_bytes_total",
      "counter",
      "Bytes answered from committed entries.",
      [[{}, counters.bytesFromCache]],
    ),
    family("image_cache_origin_bytes_total", "counter", "Bytes fills read from the origin.", [
      [{}, counters.bytesFromOrigin],
    ]),
    family(
      "image_cache_verification_failures_total",
      "counter",
      "Fills whose digest or length did not match the origin's.",
      [[{}, counters.verificationFailures]],
    ),
    family("image_cache_commits_total", "counter", "Fills committed.", [[{}, counters.commits]]),
    family(
      "image_cache_commit_failures_total",
      "counter",
      "Fills whose body verified but the store could not commit.",
      [[{}, counters.commitFailures]],
    ),
    family("image_cache_evictions_total", "counter", "Entries removed by pruning.", [
      [{}, counters.evictions],
    ]),
    family(
      "image_cache_pass_through_total",
      "counter",
      "Misses not stored, by Cache-Status detail.",
      reasons.map((reason) => [{ reason }, counters.passThrough[reason]]),
    ),
    family("image_cache_prefetches_total", "counter", "Prefetch attempts, by result.", [
      [{ result: "cached" }, counters.prefetchesCached],
      [{ result: "failed" }, counters.prefetchesFailed],
      [{ result: "gave_up" }, counters.prefetchesGaveUp],
    ]),
    family("image_cache_fills_in_progress", "gauge", "Fills under way in this process.", [
      [{}, core.filling().length],
    ]),
    family("image_cache_size_bytes", "gauge", "Bytes of committed entries.", [[{}, usage.bytes]]),
    family("image_cache_reserved_bytes", "gauge", "Bytes reserved by fills under way.", [
      [{}, usage.reserved],
    ]),
    family("image_cache_max_size_bytes", "gauge", "Bytes the cache may hold.", [
      [{}, store.maxSize],
    ]),
    family("image_cache_entries", "gauge", "Committed entries.", [[{}, usage.entries]]),
    family("image_cache_queued_images", "gauge", "Images in the prefetch queue.", [
      [{}, queued],
    ]),
  ].join("");
}
