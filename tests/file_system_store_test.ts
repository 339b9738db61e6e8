import { describe, it } from "node:test";
import assert from "node:assert/strict";
import {
  mkdir,
  readdir,
  readFile,
  stat,
  truncate,
  unlink,
  utimes,
  writeFile,
} from "node:fs/promises";
import { hostname } from "node:os";
import { join } from "node:path";
import process from "node:process";
import { Hono } from "hono";
import { FileSystemStore, imageCache } from "hono-image-cache";
import {
  assertBytes,
  hexDigest,
  pattern,
  readBody,
  sleep,
  slowStream,
  waitFor,
  withTempDir,
} from "./_helpers.ts";

const IMAGE = pattern(200_000, 3);
const MD5 = hexDigest(IMAGE);

function app(store: FileSystemStore, errors: unknown[] = []) {
  let reads = 0;
  const app = new Hono();
  app.use(imageCache({ store, onError: (e) => errors.push(e) }));
  app.get("/v2/images/:id/file", () => {
    reads++;
    return new Response(slowStream(IMAGE, 50_000), {
      headers: { "content-md5": MD5, "content-length": String(IMAGE.byteLength) },
    });
  });
  return { app, reads: () => reads };
}

/** Every path under `dir`, relative, sorted. */
async function tree(dir: string): Promise<string[]> {
  const entries = await readdir(dir, { recursive: true });
  return entries.map(String).sort();
}

describe("FileSystemStore", () => {
  it("keeps Glance's layout: <id>, <id>.json, incomplete/, invalid/, queue/", async () => {
    await withTempDir(async (dir) => {
      const store = new FileSystemStore({ directory: dir });
      try {
        const { app: a } = app(store);
        await readBody(await a.request("/v2/images/img/file"));
        await store.enqueue("queued-one");
        assert.deepEqual(await tree(dir), [
          "deleted",
          "img",
          "img.json",
          "incomplete",
          "invalid",
          "queue",
          "queue/queued-one",
        ]);
        const meta = JSON.parse(await readFile(join(dir, "img.json"), "utf8"));
        assert.equal(meta.size, IMAGE.byteLength);
        assert.deepEqual(meta.digest, { algorithm: "md5", value: MD5 });
        assert.equal(meta.hits, 0);
        assert.equal(typeof meta.created, "number");
      } finally {
        await store.close();
      }
    });
  });

  it("writes a fill to incomplete/<id> with an owner record, then commits by rename", async () => {
    await withTempDir(async (dir) => {
      const store = new FileSystemStore({ directory: dir });
      try {
        const writer = await store.createWriter("img");
        assert.ok(typeof writer === "object");
        await writer.write(IMAGE.subarray(0, 1000));
        assert.deepEqual((await readdir(join(dir, "incomplete"))).sort(), ["img", "img.owner"]);
        const owner = JSON.parse(await readFile(join(dir, "incomplete", "img.owner"), "utf8"));
        assert.equal(owner.pid, process.pid);
        assert.equal(owner.host, hostname());
        assert.equal(await store.createWriter("img"), "busy", "one writer per image");
        assert.equal(await store.isFilling("img"), true);
        assert.equal(await store.get("img"), undefined, "a fill is never an entry");
        assertBytes(await writer.read(0, 1000), IMAGE.subarray(0, 1000));
        await writer.write(IMAGE.subarray(1000));
        await writer.commit({
          size: IMAGE.byteLength,
          digest: { algorithm: "md5", value: MD5 },
          headers: {},
        });
        await writer.close();
        assert.deepEqual(await readdir(join(dir, "incomplete")), []);
        assert.equal((await store.get("img"))?.size, IMAGE.byteLength);
      } finally {
        await store.close();
      }
    });
  });

  it("commits a long fill, flushed in the background while it was written, byte-exact", async () => {
    await withTempDir(async (dir) => {
      const store = new FileSystemStore({ directory: dir });
      try {
        // Over two background flushes (every 32 MiB), in 1 MiB writes as a fill gathers them.
        const image = pattern(70 * 2 ** 20, 8);
        const writer = await store.createWriter("long");
        assert.ok(typeof writer === "object");
        for (let at = 0; at < image.byteLength; at += 2 ** 20) {
          await writer.write(image.subarray(at, at + 2 ** 20));
        }
        const digest = hexDigest(image);
        await writer.commit({
          size: image.byteLength,
          digest: { algorithm: "md5", value: digest },
          headers: {},
        });
        await writer.close();
        const entry = await store.get("long");
        assert.equal(entry?.size, image.byteLength);
        assertBytes(new Uint8Array(await readFile(join(dir, "long"))), image);
      } finally {
        await store.close();
      }
    });
  });

  it("moves a failed fill to invalid/", async () => {
    await withTempDir(async (dir) => {
      const store = new FileSystemStore({ directory: dir });
      try {
        const writer = await store.createWriter("img");
        assert.ok(typeof writer === "object");
        await writer.write(IMAGE.subarray(0, 10));
        await writer.abort("invalid");
        await writer.close();
        assert.deepEqual(await readdir(join(dir, "invalid")), ["img"]);
        assert.deepEqual(await readdir(join(dir, "incomplete")), []);
        assert.deepEqual(await store.clean(), { invalid: 1, incomplete: 0 });
        assert.deepEqual(await readdir(join(dir, "invalid")), []);
      } finally {
        await store.close();
      }
    });
  });

  it("detects a truncated cache file before headers and serves the origin", async () => {
    await withTempDir(async (dir) => {
      const store = new FileSystemStore({ directory: dir });
      const errors: unknown[] = [];
      try {
        const { app: a, reads } = app(store, errors);
        await readBody(await a.request("/v2/images/img/file"));
        await truncate(join(dir, "img"), 1000);
        const res = await a.request("/v2/images/img/file");
        assert.equal(res.headers.get("cache-status"), "hono-image-cache; fwd=miss; stored");
        assertBytes((await readBody(res)).bytes, IMAGE);
        assert.equal(reads(), 2);
        assert.equal((await stat(join(dir, "img"))).size, IMAGE.byteLength, "re-cached whole");
      } finally {
        await store.close();
      }
    });
  });

  it("never serves data whose metadata is missing or damaged", async () => {
    await withTempDir(async (dir) => {
      const store = new FileSystemStore({ directory: dir });
      try {
        const { app: a, reads } = app(store);
        for (
          const damage of [
            () => unlink(join(dir, "img.json")),
            () => writeFile(join(dir, "img.json"), "{not json"),
            () => writeFile(join(dir, "img.json"), JSON.stringify({ id: "img", size: "big" })),
            () => unlink(join(dir, "img")),
          ]
        ) {
          await readBody(await a.request("/v2/images/img/file"));
          await damage();
          // A fresh instance has nothing in memory: it must read and judge the files.
          const fresh = new FileSystemStore({ directory: dir });
          const { app: b } = app(fresh);
          const res = await b.request("/v2/images/img/file");
          assert.equal(res.headers.get("cache-status"), "hono-image-cache; fwd=miss; stored");
          assertBytes((await readBody(res)).bytes, IMAGE);
          await fresh.close();
          await store.delete("img");
        }
        assert.ok(reads() >= 4);
      } finally {
        await store.close();
      }
    });
  });

  it("keeps hits and last access across a restart", async () => {
    await withTempDir(async (dir) => {
      const store = new FileSystemStore({ directory: dir });
      const { app: a } = app(store);
      await readBody(await a.request("/v2/images/img/file"));
      await readBody(await a.request("/v2/images/img/file"));
      await readBody(await a.request("/v2/images/img/file"));
      const before = await store.get("img");
      await store.close();
      const reopened = new FileSystemStore({ directory: dir });
      try {
        const after = await reopened.get("img");
        assert.equal(after?.hits, 2);
        assert.equal(after?.lastAccessed, before?.lastAccessed);
      } finally {
        await reopened.close();
      }
    });
  });

  it("keeps the hits of a flush under way when it is closed (a process exits right after)", async () => {
    await withTempDir(async (dir) => {
      const store = new FileSystemStore({ directory: dir });
      const { app: a } = app(store);
      await readBody(await a.request("/v2/images/img/file"));
      await readBody(await a.request("/v2/images/img/file"));
      // The flush a hit schedules (2 s later) is under way when close() is called.
      await sleep(2000);
      await store.close();
      const reopened = new FileSystemStore({ directory: dir });
      try {
        assert.equal((await reopened.get("img"))?.hits, 1);
      } finally {
        await reopened.close();
      }
    });
  });

  it("sweeps partial files of dead owners when it starts", async () => {
    await withTempDir(async (dir) => {
      await mkdir(join(dir, "incomplete"), { recursive: true });
      const dead = { pid: 2 ** 22 + 12345, host: hostname(), token: "x", started: Date.now() };
      await writeFile(join(dir, "incomplete", "dead"), "partial");
      await writeFile(join(dir, "incomplete", "dead.owner"), JSON.stringify(dead));
      await writeFile(join(dir, "incomplete", "orphan.owner"), JSON.stringify(dead));
      const staleRemote = { ...dead, host: "elsewhere", pid: 1 };
      await writeFile(join(dir, "incomplete", "remote"), "partial");
      await writeFile(join(dir, "incomplete", "remote.owner"), JSON.stringify(staleRemote));
      const old = new Date(Date.now() - 60_000);
      await utimes(join(dir, "incomplete", "remote.owner"), old, old);
      const liveRemote = { ...staleRemote, token: "y" };
      await writeFile(join(dir, "incomplete", "live"), "partial");
      await writeFile(join(dir, "incomplete", "live.owner"), JSON.stringify(liveRemote));
      await writeFile(join(dir, "incomplete", "legacy"), "a Glance partial file, no owner");
      const store = new FileSystemStore({ directory: dir });
      try {
        await waitFor(async () => (await readdir(join(dir, "incomplete"))).length === 3, 2000);
        assert.deepEqual((await readdir(join(dir, "incomplete"))).sort(), [
          "legacy",
          "live",
          "live.owner",
        ]);
        assert.equal(await store.isFilling("live"), true);
        assert.equal(await store.createWriter("live"), "busy");
        const writer = await store.createWriter("dead");
        assert.ok(typeof writer === "object", "a dead owner never blocks caching again");
        await writer.abort("discard");
        await writer.close();
      } finally {
        await store.close();
      }
    });
  });

  it("cleans incomplete files by owner and by age, never a live fill's", async () => {
    await withTempDir(async (dir) => {
      const store = new FileSystemStore({ directory: dir, stallTime: 10_000 });
      try {
        const live = await store.createWriter("live");
        assert.ok(typeof live === "object");
        await writeFile(join(dir, "incomplete", "old"), "no owner, old");
        await writeFile(join(dir, "incomplete", "fresh"), "no owner, fresh");
        const old = new Date(Date.now() - 20_000);
        await utimes(join(dir, "incomplete", "old"), old, old);
        await utimes(join(dir, "incomplete", "live"), old, old);
        assert.deepEqual(await store.clean(), { invalid: 0, incomplete: 1 });
        assert.deepEqual((await readdir(join(dir, "incomplete"))).sort(), [
          "fresh",
          "live",
          "live.owner",
        ]);
        await live.abort("discard");
        await live.close();
      } finally {
        await store.close();
      }
    });
  });

  it("queues ids in order, once each, across a restart", async () => {
    await withTempDir(async (dir) => {
      const store = new FileSystemStore({ directory: dir });
      for (const id of ["c", "a", "b", "a"]) await store.enqueue(id);
      assert.deepEqual(await store.queued(), ["c", "a", "b"]);
      await store.close();
      const reopened = new FileSystemStore({ directory: dir });
      try {
        assert.deepEqual(await reopened.queued(), ["c", "a", "b"]);
        assert.equal(await reopened.dequeue("a"), true);
        assert.equal(await reopened.dequeue("a"), false);
        assert.deepEqual(await reopened.queued(), ["c", "b"]);
      } finally {
        await reopened.close();
      }
    });
  });

  it("rejects bad options with clear errors", () => {
    assert.throws(() => new FileSystemStore({} as never), {
      name: "TypeError",
      message:
        'Cannot create FileSystemStore: "directory" must be a non-empty string, received undefined',
    });
    assert.throws(() => new FileSystemStore({ directory: "/tmp/x", maxSize: -1 }), {
      name: "RangeError",
      message:
        'Cannot create FileSystemStore: "maxSize" must be a non-negative number, received -1',
    });
    assert.throws(() => new FileSystemStore({ directory: "/tmp/x", stallTime: NaN }), RangeError);
  });
});

describe("FileSystemStore with hostile ids", () => {
  const HOSTILE = [
    "..",
    "%2e%2e",
    "%2E%2E%2F%2E%2E%2Fescaped",
    "a%2Fb",
    "..%2F..%2Fetc%2Fpasswd",
    "%5C..%5Cwin",
    "nul%00byte",
    ".",
    "x".repeat(10_000),
    "%C3%A9t%C3%A9-%F0%9F%90%A7",
    "with%20space",
    "~7e",
    "queue",
    "incomplete",
  ];
  it("never touches a file outside the directory, and the origin's answer arrives", async () => {
    await withTempDir(async (root) => {
      const dir = join(root, "cache");
      const store = new FileSystemStore({ directory: dir });
      try {
        const { app: a } = app(store);
        const origin = new Hono();
        origin.get("/v2/images/:id/file", () => new Response(IMAGE));
        for (const id of HOSTILE) {
          // The cache answers exactly what the origin alone answers (URL parsing
          // resolves a literal "..": that request never reaches the image route).
          const alone = await origin.request(`/v2/images/${id}/file`);
          const expected = (await readBody(alone)).bytes;
          for (let attempt = 0; attempt < 2; attempt++) {
            const res = await a.request(`/v2/images/${id}/file`);
            assert.equal(res.status, alone.status, id);
            assertBytes((await readBody(res)).bytes, expected, id);
          }
        }
        assert.deepEqual(await readdir(root), ["cache"], "nothing beside the cache directory");
        for (const name of await tree(dir)) {
          assert.match(name, /^(deleted|incomplete|invalid|queue|[~A-Za-z0-9_-]+(\.json)?)$/, name);
        }
        const ids = (await store.list()).map((e) => e.id).sort();
        assert.deepEqual(ids, ["incomplete", "queue", "with space", "~7e", "été-🐧"].sort());
      } finally {
        await store.close();
      }
    });
  });

  it("says which ids it can hold", () => {
    const store = new FileSystemStore({ directory: "/nonexistent/never-created" });
    assert.equal(store.canHold("8a2b3c4d-aaaa-bbbb-cccc-1234567890ab"), true);
    assert.equal(store.canHold("été"), true);
    for (const id of ["", ".", "..", "a/b", "a\\b", "a\0b", "é".repeat(51)]) {
      assert.equal(store.canHold(id), false, JSON.stringify(id));
    }
    return store.close();
  });
});
