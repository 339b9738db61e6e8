import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { chmod, mkdir, readdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import process from "node:process";
import { FileSystemStore } from "hono-image-cache";
import { demoOrigin, generatedDigests } from "hono-image-cache/testing";
import { hexDigest, readBody, sleep, startServer, waitFor, withTempDir } from "./_helpers.ts";
import { startGlance } from "./_glance.ts";
import { manage, serve, signal, skip, stop } from "./_cli.ts";

const MiB = 2 ** 20;
const ADMIN = "admin-token-0123456789abcdef";

describe("deno task serve: arguments", { skip }, () => {
  it("prints its usage with --help and exits 0", async () => {
    const cli = serve(["--help"]);
    assert.equal(await cli.exited, 0);
    const usage = cli.output();
    assert.match(usage, /^Usage: deno task serve/);
    for (
      const word of [
        "--upstream URL",
        "IMAGE_CACHE_UPSTREAM",
        "--max-size",
        "--admin-token-file",
        "IMAGE_CACHE_ADMIN_TOKEN",
        "--serve-stale-on-error",
        "--require-digest",
        "--log-format",
        "--trusted-proxy",
        "/healthz",
      ]
    ) {
      assert.ok(usage.includes(word), word);
    }
    assert.match(
      usage.replace(/\s+/g, " "),
      /An allowed answer outlives a revoked token or a deleted image by up to this long/,
    );
  });

  it("rejects bad arguments with a clear message and exit code 2", async () => {
    const cases: [string[], Record<string, string>, RegExp][] = [
      [["--bogus"], {}, /Unknown option '--bogus'/],
      [["stray"], {}, /Unexpected argument 'stray'/],
      [
        ["--max-size", "10X"],
        {},
        /--max-size must be a size like 500M, 10G or 1\.5T, received "10X"/,
      ],
      [["--listen", "nowhere"], {}, /--listen must be HOST:PORT, :PORT or PORT/],
      [["--upstream", "ftp://glance"], {}, /--upstream must be an http:\/\/ or https:\/\/ URL/],
      [[], { IMAGE_CACHE_ADMIN_TOKEN: "short" }, /IMAGE_CACHE_ADMIN_TOKEN must hold at least 16/],
      [["--access-ttl", "soon"], {}, /--access-ttl must be a duration/],
      [["--log-format", "xml"], {}, /--log-format must be "text", "json"/],
      [["--trusted-proxy", "10.0.0.0/99"], {}, /--trusted-proxy must be addresses or CIDR/],
      [[], { IMAGE_CACHE_MAX_SIZE: "lots" }, /IMAGE_CACHE_MAX_SIZE must be a size/],
      [[], { IMAGE_CACHE_QUIET_HITS: "maybe" }, /IMAGE_CACHE_QUIET_HITS must be 1\/true\/yes/],
    ];
    const runs = cases.map(([args, env]) => serve(args, env));
    const codes = await Promise.all(runs.map((run) => run.exited));
    cases.forEach(([args, env, message], i) => {
      const output = runs[i].output();
      assert.equal(codes[i], 2, `${args.join(" ")} ${JSON.stringify(env)}: ${output}`);
      assert.match(output, message);
      assert.match(output, /Run with --help/);
    });
  });
});

describe("deno task serve: secrets", { skip }, () => {
  it("refuses a token on the command line without ever printing it", async () => {
    const secret = "s3cret-value-that-must-not-show";
    for (const flag of ["--admin-token", "--service-token", "--metrics-token"]) {
      for (const args of [[flag, secret], [`${flag}=${secret}`]]) {
        const cli = serve(args);
        assert.equal(await cli.exited, 2, args.join(" "));
        assert.match(cli.output(), new RegExp(`${flag} is not accepted`));
        assert.match(cli.output(), /IMAGE_CACHE_\w+_TOKEN/);
        assert.ok(!cli.output().includes(secret), cli.output());
      }
    }
    const run = await manage("http://127.0.0.1:9", ["--token", secret, "list-cached"], {});
    assert.equal(run.code, 1);
    assert.match(run.stderr, /--token is not accepted.*IMAGE_CACHE_TOKEN.*--token-file/);
    assert.ok(!run.stderr.includes(secret));
  });

  it("takes tokens from files or the environment, and never prints them", async () => {
    const glance = await startGlance({ images: { img: { size: 1000 } } });
    try {
      await withTempDir(async (dir) => {
        const adminFile = join(dir, "admin-token");
        await writeFile(adminFile, `${ADMIN}\n`, { mode: 0o600 });
        const metrics = "metrics-token-0123456789";
        const cli = serve(
          [
            "--upstream",
            glance.url,
            "--listen",
            "127.0.0.1:0",
            "--cache-dir",
            join(dir, "cache"),
            "--admin-token-file",
            adminFile,
          ],
          { IMAGE_CACHE_METRICS_TOKEN: metrics },
        );
        try {
          const url = await cli.url();
          const listed = await manage(url, ["--token-file", adminFile, "list-cached"], {});
          assert.equal(listed.code, 0, listed.stderr);
          const byEnv = await manage(url, ["list-queued"], { IMAGE_CACHE_TOKEN: ADMIN });
          assert.equal(byEnv.code, 0, byEnv.stderr);
          const res = await fetch(`${url}/metrics`, { headers: { "x-auth-token": metrics } });
          assert.equal(res.status, 200);
          await res.body?.cancel();
          signal(cli);
          assert.equal(await cli.exited, 0);
          assert.ok(!cli.output().includes(ADMIN), "the admin token is never printed");
          assert.ok(!cli.output().includes(metrics), "the metrics token is never printed");
        } finally {
          await stop(cli);
        }
      });
    } finally {
      await glance.close();
    }
  });
});

describe("deno task serve: startup", { skip }, () => {
  it("exits 1 when the cache directory takes no write, even where access(W_OK) says yes", async () => {
    await withTempDir(async (dir) => {
      const file = join(dir, "a-file");
      await writeFile(file, "not a directory");
      const notADirectory = serve(["--cache-dir", join(file, "cache"), "--listen", "127.0.0.1:0"]);
      assert.equal(await notADirectory.exited, 1);
      assert.match(notADirectory.output(), /cannot write to the cache directory/);

      // As root, access(W_OK) passes on /sys (and on a read-only file system); the write
      // test does not. Anyone else: a directory without write permission.
      const root = process.getuid?.() === 0;
      const readOnly = root ? "/sys" : join(dir, "read-only");
      if (!root) {
        await mkdir(readOnly);
        await chmod(readOnly, 0o555);
      }
      const cli = serve(["--cache-dir", readOnly, "--listen", "127.0.0.1:0"]);
      assert.equal(await cli.exited, 1);
      assert.match(cli.output(), /cannot write to the cache directory "[^"]+": E[A-Z]+/);
      assert.doesNotMatch(cli.output(), /^\s+at /m, "no stack trace");
      if (!root) await chmod(readOnly, 0o755);
    });
  });

  it("warns when --max-size is more than the file system holds", async () => {
    await withTempDir(async (dir) => {
      const cli = serve(["--cache-dir", dir, "--listen", "127.0.0.1:0", "--max-size", "1000000T"]);
      try {
        await cli.url();
        assert.match(cli.output(), /level=warn event=config .*more than the whole file system/);
        signal(cli);
        assert.equal(await cli.exited, 0);
      } finally {
        await stop(cli);
      }
    });
  });
});

describe("deno task serve: the demo", { skip }, () => {
  it("starts a token-checking demo Glance with the management API behind a token printed once", async () => {
    await withTempDir(async (dir) => {
      const cli = serve(["--listen", "127.0.0.1:0", "--cache-dir", dir]);
      try {
        const url = await cli.url();
        assert.match(cli.output(), /built-in demo Glance/);
        const token = /export IMAGE_CACHE_TOKEN=(\S+)/.exec(cli.output())?.[1];
        assert.ok(token !== undefined, cli.output());
        assert.equal(cli.output().split(token).length, 2, "printed once");

        const anonymous = await fetch(`${url}/v2/images/cirros/file`);
        await anonymous.body?.cancel();
        assert.equal(anonymous.status, 401);
        const reader = { "x-auth-token": "demo-reader" };
        const { md5 } = await generatedDigests("cirros", 16 * MiB);
        const miss = await fetch(`${url}/v2/images/cirros/file`, { headers: reader });
        assert.equal(miss.headers.get("cache-status"), "hono-image-cache; fwd=miss; stored");
        assert.equal(hexDigest((await readBody(miss)).bytes), md5);
        await waitFor(async () => (await readdir(dir)).includes("cirros"));
        const hit = await fetch(`${url}/v2/images/cirros/file`, { headers: reader });
        assert.equal(hit.headers.get("cache-status"), "hono-image-cache; hit");
        assert.equal(hexDigest((await readBody(hit)).bytes), md5);
        const viewer = await fetch(`${url}/v2/images/cirros/file`, {
          headers: { "x-auth-token": "demo-viewer" },
        });
        await viewer.body?.cancel();
        assert.equal(viewer.status, 403, "metadata visible, download refused: the access check");

        const listed = await manage(url, ["list-cached"], { IMAGE_CACHE_TOKEN: token });
        assert.equal(listed.code, 0, listed.stderr);
        assert.match(listed.stdout, /\| cirros \|/);
        const queued = await manage(url, ["queue-image", "ubuntu", "--wait"], {
          IMAGE_CACHE_TOKEN: token,
        });
        assert.equal(queued.code, 0, queued.stderr);

        signal(cli);
        assert.equal(await cli.exited, 0, cli.output());
        assert.match(cli.output(), /cache=miss bytes=16777216/);
        assert.match(cli.output(), /cache=hit bytes=16777216/);
        assert.match(cli.output(), /SIGTERM: shutting down/);
      } finally {
        await stop(cli);
      }
    });
  });
});

describe("deno task serve: shutdown", { skip }, () => {
  it("drains a download on SIGTERM to deno task's process group, saves hit counts and exits 0", async () => {
    const size = 2 * MiB;
    const glance = await startGlance({
      images: { slow: { size }, quick: { size: 4096 } },
      chunkSize: 64 * 1024,
      chunkDelay: 60,
    });
    const { md5 } = await generatedDigests("slow", size);
    try {
      await withTempDir(async (dir) => {
        const cli = serve(
          ["--upstream", glance.url, "--listen", "127.0.0.1:0", "--cache-dir", dir],
          {},
          true,
        );
        try {
          const url = await cli.url();
          // Two hits to count (the first request fills; under load a second may still miss).
          let hits = 0;
          for (let i = 0; i < 50 && hits < 2; i++) {
            const res = await fetch(`${url}/v2/images/quick/file`);
            await readBody(res);
            if (res.headers.get("cache-status") === "hono-image-cache; hit") hits++;
            else await sleep(50);
          }
          assert.equal(hits, 2, cli.output());
          const res = await fetch(`${url}/v2/images/slow/file`);
          const reader = res.body!.getReader();
          const first = await reader.read();
          signal(cli, "SIGTERM", true);
          const hash = (await import("node:crypto")).createHash("md5");
          hash.update(first.value!);
          let length = first.value!.byteLength;
          for (let i = 0; i < 10_000; i++) {
            const { done, value } = await reader.read();
            if (done) break;
            hash.update(value);
            length += value.byteLength;
          }
          assert.equal(length, size, `the download was not cut\n${cli.output()}`);
          assert.equal(hash.digest("hex"), md5);
          assert.equal(await cli.exited, 0, cli.output());
          // At least the slow one (a hit's delivery may be reported a moment later).
          assert.match(
            cli.output(),
            /SIGTERM: shutting down: [1-9]\d* request\(s\) and 1 fill\(s\)/,
          );
          assert.match(cli.output(), /message="stopped"/);
          assert.ok((await readdir(dir)).includes("slow"), "the fill finished and committed");
          const store = new FileSystemStore({ directory: dir });
          try {
            assert.equal(
              (await store.get("quick"))?.hits,
              2,
              `hit counts were saved\n${cli.output()}`,
            );
          } finally {
            await store.close();
          }
        } finally {
          await stop(cli);
        }
      });
    } finally {
      await glance.close();
    }
  });

  it("ignores a signal relayed at once, and exits at once on one sent later", async () => {
    const glance = await startGlance({
      images: { slow: { size: 4 * MiB } },
      chunkSize: 64 * 1024,
      chunkDelay: 100,
    });
    try {
      await withTempDir(async (dir) => {
        const cli = serve([
          "--upstream",
          glance.url,
          "--listen",
          "127.0.0.1:0",
          "--cache-dir",
          dir,
          "--shutdown-timeout",
          "30s",
        ]);
        try {
          const url = await cli.url();
          const res = await fetch(`${url}/v2/images/slow/file`);
          const reader = res.body!.getReader();
          await reader.read();
          signal(cli, "SIGINT");
          signal(cli, "SIGINT");
          await sleep(1300);
          assert.equal(cli.child.exitCode, null, "the relayed copy did not stop it");
          const started = Date.now();
          signal(cli, "SIGINT");
          assert.equal(await cli.exited, 1);
          assert.ok(Date.now() - started < 5000);
          assert.match(cli.output(), /SIGINT again: exiting now, cutting 1 request/);
          await reader.cancel().catch(() => {});
        } finally {
          await stop(cli);
        }
      });
    } finally {
      await glance.close();
    }
  });

  it("leaves no partial entry to serve after a SIGTERM during a fill", async () => {
    const size = 2 * MiB;
    const origin = demoOrigin({
      images: { slow: { size } },
      chunkSize: 32 * 1024,
      chunkDelay: 15,
    });
    const upstream = await startServer(origin.app.fetch);
    const { md5 } = await generatedDigests("slow", size);
    try {
      await withTempDir(async (dir) => {
        const args = [
          "--upstream",
          upstream.url,
          "--listen",
          "127.0.0.1:0",
          "--cache-dir",
          dir,
          "--shutdown-timeout",
          "300ms",
        ];
        const first = serve(args);
        try {
          const url = await first.url();
          const res = await fetch(`${url}/v2/images/slow/file`);
          assert.equal(res.headers.get("cache-status"), "hono-image-cache; fwd=miss; stored");
          const reader = res.body!.getReader();
          await reader.read();
          await waitFor(async () => (await readdir(join(dir, "incomplete"))).includes("slow"));
          signal(first);
          let failed = false;
          try {
            for (let i = 0; i < 1000 && !(await reader.read()).done; i++);
          } catch {
            failed = true;
          }
          assert.ok(failed, "the cut download fails visibly");
          assert.equal(await first.exited, 0);
          assert.match(first.output(), /abandoned 1 fill\(s\): slow/);
        } finally {
          await stop(first);
        }
        assert.ok(!(await readdir(dir)).includes("slow"), "nothing committed");

        const second = serve(args);
        try {
          const url = await second.url();
          const again = await fetch(`${url}/v2/images/slow/file`);
          assert.equal(again.headers.get("cache-status"), "hono-image-cache; fwd=miss; stored");
          assert.equal(hexDigest((await readBody(again)).bytes), md5);
          await waitFor(async () => (await readdir(dir)).includes("slow"));
          const hit = await fetch(`${url}/v2/images/slow/file`);
          assert.equal(hit.headers.get("cache-status"), "hono-image-cache; hit");
          assert.equal(hexDigest((await readBody(hit)).bytes), md5);
          assert.deepEqual(await readdir(join(dir, "incomplete")), [], "the dead fill was swept");
          assert.equal(origin.stats.reads.slow, 2);
          signal(second);
          assert.equal(await second.exited, 0);
        } finally {
          await stop(second);
        }
      });
    } finally {
      await upstream.close();
    }
  });
});
