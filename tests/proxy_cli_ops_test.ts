/**
 * The proxy's issue-14 behaviours from the command line, against a
 * token-checking fake Glance: verification with the access check off, no
 * internal address in a 502, deleted images dropped, stale answers through
 * an outage, JSON logs without stack traces, trusted proxies, health and
 * metrics, and prefetches that give up naming the missing service token.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { readdir } from "node:fs/promises";
import { readBody, waitFor, withTempDir } from "./_helpers.ts";
import { type Glance, startGlance } from "./_glance.ts";
import { type Cli, manage, serve, signal, skip, stop } from "./_cli.ts";

const ADMIN = "admin-token-0123456789abcdef";
const alice = { "x-auth-token": "alice" };

/** Runs `fn` with `serve` in front of `glance`, stopped with SIGTERM (exit 0) afterwards. */
function withServe(
  glance: Glance,
  args: string[],
  env: Record<string, string>,
  fn: (url: string, cli: Cli, dir: string) => Promise<void>,
): Promise<void> {
  return withTempDir(async (dir) => {
    const cli = serve(
      ["--upstream", glance.url, "--listen", "127.0.0.1:0", "--cache-dir", dir, ...args],
      env,
    );
    try {
      const url = await cli.url();
      await fn(url, cli, dir);
      signal(cli);
      assert.equal(await cli.exited, 0, cli.output());
    } finally {
      await stop(cli);
    }
  });
}

describe("deno task serve: integrity and security", { skip }, () => {
  it("with --access-check off, commits no corrupted bytes the metadata's hash rejects", async () => {
    const glance = await startGlance({ images: { img: { size: 2 ** 20 } } });
    glance.corrupt.add("img");
    try {
      await withServe(glance, ["--access-check", "off"], {}, async (url, cli, dir) => {
        const res = await fetch(`${url}/v2/images/img/file`);
        const { bytes, error } = await readBody(res);
        assert.notEqual(error, undefined, "the connection is cut");
        assert.ok(bytes.byteLength < 2 ** 20, "before the last byte");
        await waitFor(() =>
          /level=warn event=response-cut image=img .*Checksum mismatch/.test(cli.output())
        );
        assert.doesNotMatch(cli.output(), /^\s+at /m, "no stack trace at the default level");
        assert.ok(!(await readdir(dir)).includes("img"), "nothing committed");
      });
    } finally {
      await glance.close();
    }
  });

  it("answers 502 without the upstream's address, and logs it", async () => {
    const glance = await startGlance({ images: {} });
    const host = new URL(glance.url).host;
    await glance.close();
    await withServe(glance, [], {}, async (url, cli) => {
      const res = await fetch(`${url}/v2/images`);
      const body = await res.text();
      assert.equal(res.status, 502);
      assert.ok(!body.includes(host), body);
      await waitFor(() => cli.output().includes(`event=upstream-error`));
      assert.ok(cli.output().includes(host), "the log has it");
      assert.doesNotMatch(cli.output(), /^\s+at /m, "no stack trace at the default level");
    });
  });

  it("drops an image the upstream deleted, confirmed with the service token", async () => {
    const glance = await startGlance({
      images: { img: { size: 4096 } },
      tokens: { alice: "all", carol: [], service: "all" },
    });
    try {
      await withServe(
        glance,
        ["--access-ttl", "0"],
        { IMAGE_CACHE_SERVICE_TOKEN: "service" },
        async (url, cli, dir) => {
          await readBody(await fetch(`${url}/v2/images/img/file`, { headers: alice }));
          await waitFor(async () => (await readdir(dir)).includes("img"));
          delete glance.images.img;
          const res = await fetch(`${url}/v2/images/img/file`, {
            headers: { "x-auth-token": "carol" },
          });
          await res.body?.cancel();
          assert.equal(res.status, 404);
          await waitFor(async () => !(await readdir(dir)).includes("img"));
          assert.match(cli.output(), /event=image-gone image=img/);
        },
      );
    } finally {
      await glance.close();
    }
  });

  it("with --serve-stale-on-error, serves a credential it allowed through an upstream outage", async () => {
    const glance = await startGlance({ images: { img: { size: 4096 } }, tokens: { alice: "all" } });
    try {
      await withServe(
        glance,
        ["--access-ttl", "0", "--serve-stale-on-error", "10m"],
        {},
        async (url, cli, dir) => {
          await readBody(await fetch(`${url}/v2/images/img/file`, { headers: alice }));
          await waitFor(async () => (await readdir(dir)).includes("img"));
          glance.failWith = 503;
          const res = await fetch(`${url}/v2/images/img/file`, { headers: alice });
          assert.equal(res.status, 200);
          assert.equal(
            res.headers.get("cache-status"),
            "hono-image-cache; hit; detail=stale-access",
          );
          assert.equal((await readBody(res)).bytes.byteLength, 4096);
          const other = await fetch(`${url}/v2/images/img/file`);
          await other.body?.cancel();
          assert.equal(other.status, 502);
          await waitFor(() => /cache=stale/.test(cli.output()));
          assert.match(cli.output(), /event=stale-access image=img/);
          assert.match(cli.output(), /served up to 600 s after an "allowed"/);
        },
      );
    } finally {
      await glance.close();
    }
  });
});

describe("deno task serve: operations", { skip }, () => {
  it("logs one JSON object per line with --log-format json, stack traces only at debug", async () => {
    const glance = await startGlance({ images: { img: { size: 1000 } } });
    try {
      await withServe(
        glance,
        ["--log-format", "json", "--trusted-proxy", "127.0.0.1,10.0.0.0/8"],
        {},
        async (url, cli) => {
          const res = await fetch(`${url}/v2/images/img/file`, {
            headers: {
              "user-agent": "nova-compute/29",
              "x-request-id": "req-7",
              "x-forwarded-for": "198.51.100.4",
            },
          });
          await readBody(res);
          await waitFor(() => cli.output().includes('"request_id":"req-7"'));
          const lines = cli.output().trim().split("\n");
          const parsed = lines.map((line) => JSON.parse(line));
          const access = parsed.find((line) => line.type === "access");
          assert.equal(access.request_id, "req-7");
          assert.equal(access.user_agent, "nova-compute/29");
          assert.equal(
            access.client,
            "198.51.100.4",
            "from X-Forwarded-For, behind a trusted proxy",
          );
          assert.equal(access.image_id, "img");
          assert.equal(access.cache, "miss");
          assert.equal(access.bytes, 1000);
          assert.equal(typeof access.upstream_ms, "number");
          assert.equal(parsed[0].event, "listening");
        },
      );
      await glance.close();
      await withServe(glance, ["--log-level", "debug"], {}, async (url, cli) => {
        const res = await fetch(`${url}/v2/images`);
        await res.body?.cancel();
        await waitFor(() => /event=upstream-error/.test(cli.output()));
        await waitFor(() => /^\s+at /m.test(cli.output()), 5000);
      });
    } finally {
      await glance.close();
    }
  });

  it("answers /healthz and /readyz, and /metrics to the metrics token", async () => {
    const glance = await startGlance({ images: {} });
    try {
      const metrics = "metrics-token-0123456789";
      await withServe(glance, [], { IMAGE_CACHE_METRICS_TOKEN: metrics }, async (url) => {
        assert.equal(await (await fetch(`${url}/healthz`)).text(), "ok\n");
        const ready = await fetch(`${url}/readyz`);
        assert.equal(ready.status, 200);
        assert.equal((await ready.json()).status, "ready");
        const res = await fetch(`${url}/metrics`, {
          headers: { authorization: `Bearer ${metrics}` },
        });
        const text = await res.text();
        assert.match(text, /^# TYPE image_cache_proxy_time_to_first_byte_seconds histogram$/m);
        assert.match(text, /^image_cache_proxy_requests_total\{code="200",cache="none"\} 2$/m);
        const management = await fetch(`${url}/v2/cache`, {
          headers: { "x-auth-token": metrics },
        });
        await management.body?.cancel();
        assert.notEqual(management.status, 200, "no management API for the metrics token");
      });
    } finally {
      await glance.close();
    }
  });

  it("names the missing service token and gives up prefetching, visibly in cache-manage", async () => {
    const glance = await startGlance({ images: { img: { size: 1000 } }, tokens: { alice: "all" } });
    try {
      await withServe(
        glance,
        ["--prefetch-attempts", "2"],
        { IMAGE_CACHE_ADMIN_TOKEN: ADMIN },
        async (url, cli) => {
          const env = { IMAGE_CACHE_TOKEN: ADMIN };
          const queued = await manage(url, [
            "queue-image",
            "img",
            "--wait",
            "--poll-interval",
            "50",
          ], env);
          assert.equal(queued.code, 1);
          assert.match(
            queued.stderr,
            /gave up prefetching image img after 2 attempts \(status-401\): .*IMAGE_CACHE_SERVICE_TOKEN or --service-token-file/,
          );
          const listed = await manage(url, ["list-queued"], env);
          assert.equal(listed.code, 0, listed.stderr);
          assert.match(listed.stdout, /\| img \| gave up \| +2 \| status-401 \|/);
          assert.match(cli.output(), /event=prefetch-refused image=img .*--service-token-file/);
          assert.equal(glance.downloads.img, 2);
          const metrics = await fetch(`${url}/metrics`, { headers: { "x-auth-token": ADMIN } });
          assert.match(
            await metrics.text(),
            /^image_cache_prefetches_total\{result="gave_up"\} 1$/m,
          );
        },
      );
    } finally {
      await glance.close();
    }
  });
});
