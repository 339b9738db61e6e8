import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { Hono } from "hono";
import { cacheApi, MemoryStore, METRICS_CONTENT_TYPE, metricsText } from "hono-image-cache";
import { readBody, waitFor } from "./_helpers.ts";
import { admin, images, testOrigin, withManaged } from "./_management.ts";

/** The samples of an exposition, by series (`name` or `name{labels}`). */
function parse(text: string): Map<string, number> {
  const samples = new Map<string, number>();
  for (const line of text.split("\n")) {
    if (line === "" || line.startsWith("#")) continue;
    const match = /^([a-z_]+(?:\{[^}]*\})?) (-?\d+(?:\.\d+)?(?:e[+-]?\d+)?)$/.exec(line);
    assert.ok(match, `a valid sample line: ${JSON.stringify(line)}`);
    samples.set(match[1], Number(match[2]));
  }
  return samples;
}

async function scrape(app: Hono): Promise<Map<string, number>> {
  const res = await admin(app, "GET", "/metrics");
  assert.equal(res.status, 200);
  assert.equal(res.headers.get("content-type"), METRICS_CONTENT_TYPE);
  return parse(await res.text());
}

describe("metrics", () => {
  it("follow the Prometheus text format: HELP and TYPE before each family, counters end in _total", async () => {
    const text = await metricsText(new MemoryStore());
    const lines = text.trimEnd().split("\n");
    const declared = new Map<string, string>();
    for (let i = 0; i < lines.length; i++) {
      const type = /^# TYPE (\S+) (counter|gauge)$/.exec(lines[i]);
      if (type !== null) {
        assert.match(lines[i - 1], new RegExp(`^# HELP ${type[1]} \\S`));
        declared.set(type[1], type[2]);
        if (type[2] === "counter") assert.match(type[1], /_total$/);
        else assert.doesNotMatch(type[1], /_total$/);
      }
    }
    for (const series of parse(text).keys()) {
      assert.ok(declared.has(series.replace(/\{.*/, "")), `${series} is declared`);
    }
    assert.ok(text.endsWith("\n"));
  });

  it("change as requests flow", async () => {
    const origin = testOrigin(images(2, 256 * 1024));
    const store = new MemoryStore({ maxSize: 300 * 1024 });
    await withManaged(store, origin, { prefetch: false }, async ({ app }) => {
      const before = await scrape(app);
      assert.equal(before.get("image_cache_hits_total"), 0);
      assert.equal(before.get("image_cache_entries"), 0);
      assert.equal(before.get("image_cache_max_size_bytes"), 300 * 1024);

      origin.delay = 20;
      const first = await app.request("/v2/images/img0/file");
      const joiner = await app.request("/v2/images/img0/file");
      const during = await scrape(app);
      assert.equal(during.get("image_cache_fills_in_progress"), 1);
      assert.equal(during.get("image_cache_reserved_bytes"), 256 * 1024);
      await Promise.all([readBody(first), readBody(joiner)]);
      origin.delay = 0;
      await waitFor(async () => (await scrape(app)).get("image_cache_commits_total") === 1);
      await readBody(await app.request("/v2/images/img0/file"));

      const after = await scrape(app);
      assert.equal(after.get("image_cache_misses_total"), 1);
      assert.equal(after.get("image_cache_coalesced_total"), 1);
      assert.equal(after.get("image_cache_hits_total"), 1);
      assert.equal(after.get("image_cache_hit_bytes_total"), 256 * 1024);
      assert.equal(after.get("image_cache_origin_bytes_total"), 256 * 1024);
      assert.equal(after.get("image_cache_fills_in_progress"), 0);
      assert.equal(after.get("image_cache_size_bytes"), 256 * 1024);
      assert.equal(after.get("image_cache_entries"), 1);
      assert.equal(after.get("image_cache_reserved_bytes"), 0);

      // A second image does not fit beside the first: the first one is evicted for it.
      await new Promise((resolve) => setTimeout(resolve, 1100)); // past the served-entry grace
      await readBody(await app.request("/v2/images/img1/file"));
      await waitFor(async () => (await scrape(app)).get("image_cache_commits_total") === 2);
      const evicted = await scrape(app);
      assert.equal(evicted.get("image_cache_evictions_total"), 1);
      assert.equal(evicted.get("image_cache_entries"), 1);

      // Pass-through reasons are labelled by Cache-Status detail.
      const head = await app.request("/v2/images/img0/file", { method: "HEAD" });
      await head.body?.cancel();
      const missing = await app.request("/v2/images/nope/file");
      await missing.body?.cancel();
      await admin(app, "PUT", "/v2/cache/queued");
      const last = await scrape(app);
      assert.equal(last.get('image_cache_pass_through_total{reason="method"}'), 1);
      assert.equal(last.get('image_cache_pass_through_total{reason="status-404"}'), 1);
      assert.equal(last.get("image_cache_queued_images"), 1);

      await admin(app, "DELETE", "/v2/cache", { "x-image-cache-clear-target": "cache" });
      const cleared = await scrape(app);
      assert.equal(cleared.get("image_cache_size_bytes"), 0);
      assert.equal(cleared.get("image_cache_entries"), 0);
    });
  });

  it("are served on metricsPath, or not at all with false", async () => {
    const controller = new AbortController();
    const store = new MemoryStore();
    const app = new Hono();
    app.route(
      "/",
      cacheApi({
        store,
        authorize: (_c, action) => action === "cache_metrics",
        metricsPath: "/internal/metrics",
        signal: controller.signal,
      }),
    );
    const res = await app.request("/internal/metrics");
    assert.equal(res.status, 200);
    assert.match(await res.text(), /^image_cache_hits_total 0$/m);
    const none = await app.request("/metrics");
    assert.equal(none.status, 404);
    await none.body?.cancel();

    const off = new Hono();
    off.route(
      "/",
      cacheApi({ store, authorize: () => true, metricsPath: false, signal: controller.signal }),
    );
    const offRes = await off.request("/metrics");
    assert.equal(offRes.status, 404);
    await offRes.body?.cancel();
    controller.abort();
  });
});
