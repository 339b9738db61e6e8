/**
 * What the proxy gives its operators: health probes, metrics behind their
 * own token, request ids and access-log fields, the client behind trusted
 * proxies, and prefetches that give up visibly.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { rm } from "node:fs/promises";
import { formatAccessLog } from "hono-image-cache/proxy";
import { waitFor } from "./_helpers.ts";
import { get, startGlance, withProxy } from "./_glance.ts";

const ADMIN = "admin-token-0123456789";
const METRICS = "metrics-token-0123456789";

describe("the proxy's health probes", () => {
  it("answers /healthz without a token or an upstream request, /readyz after checking both", async () => {
    const glance = await startGlance({ images: {}, tokens: { alice: "all" } });
    try {
      await withProxy(glance.url, {}, async ({ url, store, proxy }) => {
        const live = await get(`${url}/healthz`);
        assert.equal(live.res.status, 200);
        assert.equal(glance.requests.length, 0, "liveness asks nothing upstream");

        const ready = await fetch(`${url}/readyz`);
        assert.equal(ready.status, 200);
        assert.deepEqual(await ready.json(), {
          status: "ready",
          checks: { cache: "ok", upstream: "ok" },
        });

        glance.failWith = 503;
        const upstreamDown = await fetch(`${url}/readyz`);
        assert.equal(upstreamDown.status, 503);
        assert.equal((await upstreamDown.json()).checks.upstream, "answered 503");
        glance.failWith = undefined;

        await rm(store.directory, { recursive: true, force: true });
        const cacheGone = await fetch(`${url}/readyz`);
        assert.equal(cacheGone.status, 503);
        assert.equal((await cacheGone.json()).checks.cache, "not writable");

        proxy.beginShutdown();
        const stopping = await fetch(`${url}/readyz`);
        assert.equal(stopping.status, 503);
        assert.equal((await stopping.json()).checks.process, "shutting down");
      });
    } finally {
      await glance.close();
    }
  });
});

describe("the proxy's metrics", () => {
  it("are read with the metrics token or the admin token, and the metrics token reads nothing else", async () => {
    const glance = await startGlance({ images: {} });
    try {
      await withProxy(
        glance.url,
        { adminToken: ADMIN, metricsToken: METRICS },
        async ({ url }) => {
          for (const token of [METRICS, ADMIN]) {
            const res = await fetch(`${url}/metrics`, { headers: { "x-auth-token": token } });
            assert.equal(res.status, 200);
            assert.match(await res.text(), /^image_cache_hits_total 0$/m);
          }
          const anonymous = await get(`${url}/metrics`);
          assert.equal(anonymous.res.status, 401);
          const wrong = await get(`${url}/metrics`, { authorization: "Bearer nope" });
          assert.equal(wrong.res.status, 403);
          const management = await get(`${url}/v2/cache`, { "x-auth-token": METRICS });
          assert.equal(management.res.status, 403, "read-only: no management API");
          assert.equal(glance.requests.length, 0);
        },
      );
      await withProxy(glance.url, { metricsToken: METRICS }, async ({ url, proxy }) => {
        assert.equal(proxy.managed, false);
        const res = await fetch(`${url}/metrics`, { headers: { "x-auth-token": METRICS } });
        assert.equal(res.status, 200, "mounted by the metrics token alone");
        await res.body?.cancel();
      });
    } finally {
      await glance.close();
    }
  });

  it("count requests by status and cache status, latencies, access checks and upstream errors", async () => {
    const glance = await startGlance({
      images: { img: { size: 4096 } },
      tokens: { alice: "all" },
    });
    try {
      await withProxy(glance.url, { metricsToken: METRICS }, async ({ url, proxy }) => {
        await get(`${url}/v2/images/img/file`, { "x-auth-token": "alice" });
        await proxy.settle(5000);
        await get(`${url}/v2/images/img/file`, { "x-auth-token": "alice" });
        await get(`${url}/v2/images/img/file`);
        glance.failWith = 503;
        await get(`${url}/v2/images/img/file`, { "x-auth-token": "other" });
        await get(`${url}/v2/images`);
        glance.failWith = undefined;
        await waitFor(() => proxy.inFlight() === 0);
        const text = await proxy.metricsText();
        for (
          const line of [
            'image_cache_proxy_requests_total{code="200",cache="miss"} 1',
            'image_cache_proxy_requests_total{code="200",cache="hit"} 1',
            'image_cache_proxy_requests_total{code="401",cache="denied"} 1',
            'image_cache_proxy_requests_total{code="502",cache="check-failed"} 1',
            'image_cache_proxy_requests_total{code="503",cache="none"} 1',
            'image_cache_proxy_time_to_first_byte_seconds_count{cache="hit"} 1',
            'image_cache_proxy_request_duration_seconds_count{cache="miss"} 1',
            'image_cache_proxy_access_checks_total{outcome="allowed",source="remembered"} 1',
            'image_cache_proxy_access_checks_total{outcome="denied",source="upstream"} 1',
            'image_cache_proxy_access_checks_total{outcome="failed",source="upstream"} 1',
            'image_cache_proxy_upstream_errors_total{source="access-check",kind="status-5xx"} 1',
            'image_cache_proxy_upstream_errors_total{source="request",kind="status-5xx"} 1',
            "image_cache_proxy_requests_in_flight 0",
          ]
        ) {
          assert.ok(text.includes(`${line}\n`), `${line}\n---\n${text}`);
        }
        assert.match(text, /^image_cache_hits_total 1$/m, "after the cache's own metrics");
      });
    } finally {
      await glance.close();
    }
  });
});

describe("the proxy's access log", () => {
  it("gives each request an id, sent back and upstream, with its user agent and upstream time", async () => {
    const glance = await startGlance({ images: { img: { size: 1000 } } });
    try {
      await withProxy(glance.url, {}, async ({ url, proxy, logs }) => {
        const own = await get(`${url}/v2/images/img/file`, {
          "x-request-id": "req-42",
          "user-agent": "qemu-img/8",
        });
        assert.equal(own.res.headers.get("x-request-id"), "req-42");
        assert.ok(glance.requestIds.includes("req-42"), "forwarded upstream");
        await proxy.settle(5000);
        const minted = await get(`${url}/v2/images/img/file`, { "x-request-id": "bad id\u00e9" });
        assert.match(minted.res.headers.get("x-request-id") ?? "", /^[0-9a-f-]{36}$/);
        await waitFor(() => logs.length === 2);
        const [miss, hit] = logs;
        assert.equal(miss.requestId, "req-42");
        assert.equal(miss.userAgent, "qemu-img/8");
        assert.equal(miss.imageId, "img");
        assert.ok(miss.upstreamMs !== undefined && miss.upstreamMs >= 0);
        assert.ok(miss.ttfbMs !== undefined && miss.ttfbMs <= miss.durationMs);
        assert.equal(hit.upstreamMs, undefined, "a hit with a remembered answer asks nothing");
        const json = JSON.parse(formatAccessLog(miss, "json"));
        assert.equal(json.request_id, "req-42");
        assert.equal(json.user_agent, "qemu-img/8");
        assert.equal(json.cache, "miss");
        assert.equal(json.bytes, 1000);
        assert.equal(typeof json.upstream_ms, "number");
      });
    } finally {
      await glance.close();
    }
  });

  it("takes the client from X-Forwarded-For only behind a trusted proxy", async () => {
    const glance = await startGlance({ images: {} });
    try {
      const forwarded = { "x-forwarded-for": "203.0.113.9, 10.1.2.3" };
      await withProxy(glance.url, {}, async ({ url, logs }) => {
        await get(`${url}/v2/images`, forwarded);
        await waitFor(() => logs.length === 1);
        assert.equal(logs[0].client, "127.0.0.1", "anyone can send the header");
      });
      await withProxy(
        glance.url,
        { trustedProxies: ["127.0.0.0/8", "10.0.0.0/8"] },
        async ({ url, logs }) => {
          await get(`${url}/v2/images`, forwarded);
          await waitFor(() => logs.length === 1);
          assert.equal(logs[0].client, "203.0.113.9", "the nearest untrusted hop");
        },
      );
    } finally {
      await glance.close();
    }
  });
});

describe("the proxy's prefetches", () => {
  it("give up after a bounded number of attempts, naming the missing service token", async () => {
    const glance = await startGlance({ images: { img: { size: 1000 } }, tokens: { alice: "all" } });
    try {
      await withProxy(
        glance.url,
        { adminToken: ADMIN, prefetchAttempts: 2 },
        async ({ url, events, proxy }) => {
          const admin = { "x-auth-token": ADMIN };
          const queued = await fetch(`${url}/v2/cache/img`, { method: "PUT", headers: admin });
          await queued.body?.cancel();
          assert.equal(queued.status, 202);
          let status: Record<string, unknown> = {};
          await waitFor(async () => {
            status = await (await fetch(`${url}/v2/cache/img/status`, { headers: admin })).json();
            return status.gave_up === true;
          }, 10_000);
          assert.equal(status.attempts, 2);
          assert.equal(status.last_error, "status-401");
          assert.equal(status.next_attempt, null);
          const listing = await (await fetch(`${url}/v2/cache`, { headers: admin })).json();
          assert.deepEqual(listing.queued_images, ["img"], "still queued, until queued again");
          const refused = events.find((e) => e.event === "prefetch-refused");
          assert.match(
            refused?.message ?? "",
            /without credentials: give the proxy a service token/,
          );
          assert.match(refused?.message ?? "", /--service-token-file/);
          assert.match(
            await proxy.metricsText(),
            /^image_cache_prefetches_total\{result="gave_up"\} 1$/m,
          );
          const before = glance.downloads.img;
          await new Promise((resolve) => setTimeout(resolve, 1500));
          assert.equal(glance.downloads.img, before, "no more attempts");
        },
      );
    } finally {
      await glance.close();
    }
  });
});
