/**
 * Cluster mode against a real PostgreSQL (tests/_postgres.ts starts a
 * throwaway one), with several node processes on loopback
 * (tests/fixtures/cluster_node.ts) in front of one origin that counts the
 * bytes it sends. Skipped, with the reason, only when PostgreSQL can be
 * neither found nor installed.
 */
import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { existsSync } from "node:fs";
import process from "node:process";
import { fileURLToPath } from "node:url";
import { Hono } from "hono";
import { cacheApi, imageCache, joinCluster, MemoryStore } from "hono-image-cache";
import { demoOrigin, generatedDigests } from "hono-image-cache/testing";
import {
  childPort,
  hexDigest,
  readBody,
  runtimeArgs,
  sleep,
  startServer,
  waitFor,
  withTempDir,
} from "./_helpers.ts";
import { manage } from "./_cli.ts";
import { startPostgres, type TestPostgres } from "./_postgres.ts";

const SCRIPT = fileURLToPath(new URL("./fixtures/cluster_node.ts", import.meta.url));
const SECRET = "cluster-secret-0123456789";
const SIZE = 4 * 2 ** 20;

// cache-manage lives in scripts/, which the npm package does not ship.
const CACHE_MANAGE = fileURLToPath(new URL("../scripts/cache_manage.ts", import.meta.url));

/** Runs cache-manage in this process against `url`; resolves its exit code and output. */
const cacheManage = (url: string, args: string[]) => manage(url, args, {});

let pg: TestPostgres | undefined;
let skip: string | false = false;
let databases = 0;

/** A fresh database of the test server, so each test starts on an empty schema. */
async function freshDatabase(): Promise<string> {
  const { default: postgres } = await import("postgres");
  const sql = postgres(pg!.url, { max: 1, onnotice: () => {} });
  const name = `cluster_${process.pid}_${++databases}`;
  try {
    await sql.unsafe(`CREATE DATABASE ${name}`);
  } finally {
    await sql.end({ timeout: 1 });
  }
  return pg!.url.replace(/\/postgres$/, `/${name}`);
}

interface Node {
  process: ChildProcess;
  url: string;
  exited: Promise<void>;
  logs: string[];
}

async function startNode(dir: string, origin: string, database: string): Promise<Node> {
  const child = spawn(process.execPath, [...runtimeArgs(SCRIPT), dir, origin, database, SECRET], {
    stdio: ["ignore", "pipe", "inherit"],
  });
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  const logs: string[] = [];
  const port = await childPort(child, 60_000, (output) => {
    for (const match of output.matchAll(/\{"log":("(?:[^"\\]|\\.)*")\}/g)) {
      if (!logs.includes(JSON.parse(match[1]))) logs.push(JSON.parse(match[1]));
    }
  });
  return { process: child, url: `http://127.0.0.1:${port}`, exited, logs };
}

async function stop(node: Node | undefined, signal: NodeJS.Signals = "SIGKILL") {
  if (node === undefined || node.process.exitCode !== null || node.process.signalCode !== null) {
    return;
  }
  node.process.kill(signal);
  await node.exited;
}

/** Runs `fn` with `count` nodes on one fresh database, in front of a counting origin. */
async function withCluster(
  count: number,
  origin: { chunkDelay?: number; chunkSize?: number; images?: Record<string, number> },
  fn: (
    nodes: Node[],
    stats: { bytesSent: number; reads: Record<string, number> },
    database: string,
  ) => Promise<void>,
) {
  const images = origin.images ?? { img: SIZE };
  const demo = demoOrigin({
    images: Object.fromEntries(Object.entries(images).map(([id, size]) => [id, { size }])),
    chunkDelay: origin.chunkDelay,
    chunkSize: origin.chunkSize,
  });
  for (const [id, size] of Object.entries(images)) await generatedDigests(id, size);
  const server = await startServer(demo.app.fetch);
  const database = await freshDatabase();
  const nodes: Node[] = [];
  try {
    await withTempDir(async (dir) => {
      try {
        const started = await Promise.all(
          Array.from(
            { length: count },
            (_, i) => startNode(`${dir}/node${i}`, server.url, database),
          ),
        );
        nodes.push(...started);
        await fn(nodes, demo.stats, database);
      } finally {
        for (const node of nodes) await stop(node, "SIGTERM");
      }
    });
  } finally {
    for (const node of nodes) await stop(node);
    await server.close();
  }
}

async function md5Of(res: Response): Promise<string> {
  const { bytes, error } = await readBody(res);
  assert.equal(error, undefined, `the body failed: ${error}`);
  return hexDigest(bytes);
}

async function nodesHolding(node: Node, id: string): Promise<string[]> {
  const res = await fetch(`${node.url}/v2/cache/nodes/${id}`);
  assert.equal(res.status, 200);
  return await res.json();
}

async function metric(node: Node, name: string): Promise<number> {
  const text = await (await fetch(`${node.url}/metrics`)).text();
  const match = new RegExp(`^${name} (\\d+)$`, "m").exec(text);
  return match === null ? NaN : Number(match[1]);
}

describe("cluster mode over PostgreSQL", () => {
  before(async () => {
    const started = await startPostgres();
    if (typeof started === "string") skip = `cluster tests skipped: ${started}`;
    else pg = started;
    if (skip) console.warn(skip);
  });
  after(async () => {
    await pg?.close();
  });

  it("serves an image committed on another node from that node, not the origin", async (t) => {
    if (skip) return t.skip(skip);
    await withCluster(2, {}, async ([a, b], stats) => {
      const { md5 } = await generatedDigests("img", SIZE);
      const first = await fetch(`${a.url}/v2/images/img/file`);
      assert.equal(first.headers.get("cache-status"), "hono-image-cache; fwd=miss; stored");
      assert.equal(await md5Of(first), md5);
      await waitFor(async () => (await nodesHolding(b, "img")).includes(a.url), 5000);

      const second = await fetch(`${b.url}/v2/images/img/file`);
      assert.equal(second.headers.get("cache-status"), "hono-image-cache; fwd=miss; stored; peer");
      assert.equal(second.headers.get("content-md5"), md5);
      assert.equal(await md5Of(second), md5);
      assert.equal(stats.reads.img, 1, "the origin was read once");
      assert.equal(stats.bytesSent, SIZE);

      const hit = await fetch(`${b.url}/v2/images/img/file`);
      assert.equal(hit.headers.get("cache-status"), "hono-image-cache; hit");
      assert.equal(await md5Of(hit), md5);
      await waitFor(async () => (await nodesHolding(a, "img")).length === 2, 5000);
      assert.deepEqual(await nodesHolding(a, "img"), [a.url, b.url].sort());
      assert.ok(await metric(b, "image_cache_cluster_peer_bytes_total") >= SIZE);

      if (!existsSync(CACHE_MANAGE)) return;
      const listed = await cacheManage(a.url, ["list-nodes", "img"]);
      assert.equal(listed.code, 0, listed.stderr);
      assert.match(listed.stdout, /^Found 2 nodes with image img\.\.\.$/m);
      for (const node of [a, b]) {
        assert.ok(listed.stdout.includes(`| ${node.url} |`), listed.stdout);
      }
      const deleted = await cacheManage(b.url, ["delete-cached-image", "img", "--cluster"]);
      assert.deepEqual(deleted, {
        code: 0,
        stdout: "Deleted cached image img on every node\n",
        stderr: "",
      });
      assert.deepEqual(await nodesHolding(a, "img"), []);
      assert.equal((await fetch(`${a.url}/v2/cache/img/status`)).status, 404);
    });
  });

  it("3 nodes × 10 clients cold on one image: the origin sends its bytes once", async (t) => {
    if (skip) return t.skip(skip);
    await withCluster(3, { chunkDelay: 2 }, async (nodes, stats) => {
      const { md5 } = await generatedDigests("img", SIZE);
      const responses = await Promise.all(
        nodes.flatMap((node) =>
          Array.from({ length: 10 }, () => fetch(`${node.url}/v2/images/img/file`))
        ),
      );
      const digests = await Promise.all(responses.map(md5Of));
      assert.deepEqual(new Set(digests), new Set([md5]));
      assert.equal(stats.bytesSent, SIZE, `origin bytes / image size = ${stats.bytesSent / SIZE}`);
      assert.equal(stats.reads.img, 1);
      for (const node of nodes) {
        const hit = await fetch(`${node.url}/v2/images/img/file`);
        assert.equal(hit.headers.get("cache-status"), "hono-image-cache; hit");
        await hit.body?.cancel();
      }
    });
  });

  it("the node filling an image killed mid-fill: the others finish from another source with exact bytes", async (t) => {
    if (skip) return t.skip(skip);
    await withCluster(3, { chunkDelay: 10 }, async ([owner, b, c], stats) => {
      const { md5 } = await generatedDigests("img", SIZE);
      const first = await fetch(`${owner.url}/v2/images/img/file`);
      const reader = first.body!.getReader();
      await reader.read(); // the owner's fill is under way, from the origin
      const followers = [
        await fetch(`${b.url}/v2/images/img/file`),
        await fetch(`${c.url}/v2/images/img/file`),
      ];
      for (const res of followers) {
        assert.equal(res.headers.get("cache-status"), "hono-image-cache; fwd=miss; stored; peer");
      }
      const reading = followers.map(md5Of);
      await sleep(200);
      await stop(owner); // SIGKILL mid-fill
      await reader.cancel().catch(() => {});
      assert.deepEqual(await Promise.all(reading), [md5, md5]);
      assert.ok(stats.bytesSent < 3 * SIZE, `origin bytes ${stats.bytesSent}`);
      for (const node of [b, c]) {
        const hit = await fetch(`${node.url}/v2/images/img/file`);
        assert.equal(hit.headers.get("cache-status"), "hono-image-cache; hit");
        assert.equal(await md5Of(hit), md5);
      }
    });
  });

  it("a cluster DELETE during fills evicts on every node within a second, fills included", async (t) => {
    if (skip) return t.skip(skip);
    await withCluster(3, { chunkDelay: 10 }, async ([a, b, c]) => {
      const { md5 } = await generatedDigests("img", SIZE);
      const first = await fetch(`${a.url}/v2/images/img/file`);
      const follower = await fetch(`${b.url}/v2/images/img/file`);
      await sleep(100);
      const started = Date.now();
      const deleted = await fetch(`${c.url}/v2/cache/img`, {
        method: "DELETE",
        headers: { "x-image-cache-scope": "cluster" },
      });
      assert.equal(deleted.status, 204);
      assert.ok(Date.now() - started < 1500, `the delete took ${Date.now() - started} ms`);
      for (const node of [a, b, c]) {
        const status = await fetch(`${node.url}/v2/cache/img/status`);
        assert.equal(status.status, 404, `${node.url} still has it: ${await status.text()}`);
      }
      // Clients already reading still get the whole, correct body (not stored).
      const bodies = await Promise.all([readBody(first), readBody(follower)]);
      for (const body of bodies) assert.equal(body.error, undefined, String(body.error));
      await sleep(300);
      for (const node of [a, b]) {
        assert.equal((await fetch(`${node.url}/v2/cache/img/status`)).status, 404);
        assert.deepEqual(await nodesHolding(node, "img"), []);
      }
      // Without the header, a delete is this node's only (as Glance).
      const again = await fetch(`${a.url}/v2/images/img/file`);
      assert.equal(await md5Of(again), md5);
      await waitFor(async () => (await nodesHolding(c, "img")).length === 1, 5000);
      assert.equal((await fetch(`${a.url}/v2/cache/img`, { method: "DELETE" })).status, 204);
      assert.equal((await fetch(`${c.url}/v2/cache/img`, { method: "DELETE" })).status, 404);
    });
  });

  it("once a cluster DELETE is answered, no node serves the old copy (nor fills from one)", async (t) => {
    if (skip) return t.skip(skip);
    const images = { empty: 0, tiny: 2, small: 66877 };
    await withCluster(3, { images }, async ([a, b, c], stats) => {
      // Rounds of: two nodes hold the image, the third is filling it from them, one deletes.
      for (let round = 0; round < 5; round++) {
        for (const id of Object.keys(images)) {
          await (await fetch(`${a.url}/v2/images/${id}/file`)).arrayBuffer();
          await (await fetch(`${b.url}/v2/images/${id}/file`)).arrayBuffer();
          const inflight = fetch(`${c.url}/v2/images/${id}/file`).then((r) => r.arrayBuffer());
          const reads = stats.reads[id] ?? 0;
          const deleted = await fetch(`${a.url}/v2/cache/${id}`, {
            method: "DELETE",
            headers: { "x-image-cache-scope": "cluster" },
          });
          assert.equal(deleted.status, 204);
          await inflight;
          for (const node of [a, b, c]) {
            const res = await fetch(`${node.url}/v2/images/${id}/file`);
            await res.arrayBuffer();
            // From the cache only a copy read from the origin after the delete was sent.
            const status = res.headers.get("cache-status") ?? "";
            assert.ok(
              (stats.reads[id] ?? 0) > reads || !/hit|peer|collapsed/.test(status),
              `round ${round} ${id} on ${node.url}: ${status}`,
            );
          }
          for (const node of [a, b, c]) {
            await fetch(`${node.url}/v2/cache/${id}`, { method: "DELETE" });
          }
        }
      }
    });
  });

  it("the database restarted during traffic: nodes serve as single nodes, deletes reach known peers directly, then they rejoin", async (t) => {
    if (skip) return t.skip(skip);
    const images = { one: 2 ** 20, two: 2 ** 20, three: 2 ** 20 };
    await withCluster(2, { images }, async ([a, b], stats) => {
      const digest = async (id: string) => (await generatedDigests(id, 2 ** 20)).md5;
      assert.equal(await md5Of(await fetch(`${a.url}/v2/images/one/file`)), await digest("one"));
      assert.equal(
        await md5Of(await fetch(`${a.url}/v2/images/three/file`)),
        await digest("three"),
      );
      // B learned of A at a sync (it asks the peers it knows when the database is away).
      await waitFor(async () => await metric(b, "image_cache_cluster_peers") === 1, 5000);
      await pg!.stop();
      try {
        // A hit on A and a miss on B, both without the database.
        const hit = await fetch(`${a.url}/v2/images/one/file`);
        assert.equal(hit.headers.get("cache-status"), "hono-image-cache; hit");
        assert.equal(await md5Of(hit), await digest("one"));
        const miss = await fetch(`${b.url}/v2/images/two/file`);
        assert.equal(miss.headers.get("cache-status"), "hono-image-cache; fwd=miss; stored");
        assert.equal(await md5Of(miss), await digest("two"));
        await waitFor(async () => await metric(b, "image_cache_cluster_database_up") === 0, 5000);
        assert.equal((await fetch(`${b.url}/v2/cache/nodes/two`)).status, 503);
        // A cluster-wide delete asks the peers B knew directly: A evicts.
        const deleted = await fetch(`${b.url}/v2/cache/three`, {
          method: "DELETE",
          headers: { "x-image-cache-scope": "cluster" },
        });
        assert.equal(deleted.status, 204);
        const again = await fetch(`${a.url}/v2/images/three/file`);
        assert.equal(again.headers.get("cache-status"), "hono-image-cache; fwd=miss; stored");
        assert.equal(await md5Of(again), await digest("three"));
      } finally {
        await pg!.start();
      }
      for (const node of [a, b]) {
        await waitFor(
          async () => await metric(node, "image_cache_cluster_database_up") === 1,
          15_000,
        ).catch((error) => {
          throw new Error(`${node.url} did not rejoin: ${node.logs.join("\n")}`, { cause: error });
        });
      }
      assert.ok(b.logs.some((line) => /unreachable/.test(line)), b.logs.join("\n"));
      assert.ok(b.logs.some((line) => /rejoined/.test(line)), b.logs.join("\n"));
      // B's rows written during the outage are in the index again, and routing works.
      await waitFor(async () => (await nodesHolding(a, "two")).includes(b.url), 10_000);
      const fromPeer = await fetch(`${a.url}/v2/images/two/file`);
      assert.equal(
        fromPeer.headers.get("cache-status"),
        "hono-image-cache; fwd=miss; stored; peer",
      );
      assert.equal(await md5Of(fromPeer), await digest("two"));
      assert.equal(stats.reads.two, 1);
      // The database away and a known peer dead: the delete says it may not have reached it.
      await waitFor(async () => await metric(b, "image_cache_cluster_peers") === 1, 5000);
      await pg!.stop();
      try {
        await stop(a);
        const partial = await fetch(`${b.url}/v2/cache/two`, {
          method: "DELETE",
          headers: { "x-image-cache-scope": "cluster" },
        });
        assert.equal(partial.status, 503);
        assert.match(await partial.text(), /some known peer did not answer/);
      } finally {
        await pg!.start();
      }
    });
  });

  it("a database that comes back empty gets its tables again, and the nodes rejoin", async (t) => {
    if (skip) return t.skip(skip);
    await withCluster(2, {}, async ([a, b], _stats, database) => {
      const { md5 } = await generatedDigests("img", SIZE);
      assert.equal(await md5Of(await fetch(`${a.url}/v2/images/img/file`)), md5);
      await waitFor(async () => (await nodesHolding(b, "img")).includes(a.url), 5000);
      const { default: postgres } = await import("postgres");
      const sql = postgres(database, { max: 1, onnotice: () => {} });
      try {
        // As a database restored from an empty backup: every table gone.
        await sql.unsafe("DROP SCHEMA public CASCADE; CREATE SCHEMA public");
      } finally {
        await sql.end({ timeout: 1 });
      }
      await waitFor(async () => {
        const res = await fetch(`${b.url}/v2/cache/nodes/img`);
        const body = res.status === 200 ? await res.json() : await res.body?.cancel();
        return Array.isArray(body) && body.includes(a.url);
      }, 15_000).catch((error) => {
        throw new Error(`no rejoin:\nA: ${a.logs.join("\n")}\nB: ${b.logs.join("\n")}`, {
          cause: error,
        });
      });
    });
  });

  it("two nodes starting at once on an empty database both join, with one schema", async (t) => {
    if (skip) return t.skip(skip);
    await withCluster(2, {}, async ([a, b], _stats, database) => {
      const { default: postgres } = await import("postgres");
      const sql = postgres(database, { max: 1, onnotice: () => {} });
      try {
        const versions = await sql.unsafe("SELECT version FROM image_cache_migrations");
        assert.deepEqual(versions.map((row) => row.version), [1]);
        const urls = await sql.unsafe(
          "SELECT node_reference_url AS url FROM node_reference ORDER BY 1",
        );
        assert.deepEqual(urls.map((row) => row.url), [a.url, b.url].sort());
      } finally {
        await sql.end({ timeout: 1 });
      }
    });
  });

  it("a miss this node cannot store (too large here) gets its origin's answer, never a peer's unchecked bytes", async (t) => {
    if (skip) return t.skip(skip);
    const database = await freshDatabase();
    const demo = demoOrigin({ images: { img: { size: 64 * 1024 } } });
    const { md5 } = await generatedDigests("img", 64 * 1024);
    const stores = [new MemoryStore(), new MemoryStore({ maxSize: 1024 })];
    const servers: Awaited<ReturnType<typeof startServer>>[] = [];
    const clusters: Awaited<ReturnType<typeof joinCluster>>[] = [];
    let ownOrigin = 0;
    try {
      for (const [i, store] of stores.entries()) {
        const app = new Hono();
        const server = await startServer((request) => app.fetch(request));
        servers.push(server);
        const cluster = await joinCluster({
          store,
          database,
          selfUrl: server.url,
          secret: SECRET,
          onLog: () => {},
        });
        clusters.push(cluster);
        app.use(imageCache({ store, cluster, onError: () => {} }));
        // Node 0 reads the demo origin; node 1's origin answers bytes of its own.
        if (i === 0) app.route("/", demo.app);
        else {
          app.all("*", (c) => {
            ownOrigin++;
            return c.body("the origin of node 1");
          });
        }
      }
      const [a, b] = servers;
      const filled = await fetch(`${a.url}/v2/images/img/file`);
      assert.equal(await md5Of(filled), md5);
      await waitFor(async () => (await clusters[1].nodes("img")).includes(a.url), 5000);

      const miss = await fetch(`${b.url}/v2/images/img/file`);
      assert.equal(
        miss.headers.get("cache-status"),
        "hono-image-cache; fwd=miss; detail=too-large",
      );
      assert.equal(await miss.text(), "the origin of node 1");
      assert.equal(ownOrigin, 1);
      assert.equal(demo.stats.reads.img, 1, "the peer read the origin once, for its own fill");
    } finally {
      for (const cluster of clusters) await cluster.close();
      for (const server of servers) await server.close();
      for (const store of stores) await store.close();
    }
  });

  it("refuses the peer endpoint without the cluster secret, and never forwards it to the origin", async (t) => {
    if (skip) return t.skip(skip);
    const database = await freshDatabase();
    const store = new MemoryStore();
    let originCalls = 0;
    const cluster = await joinCluster({
      store,
      database,
      selfUrl: "http://127.0.0.1:9",
      secret: SECRET,
      onLog: () => {},
    });
    try {
      const app = new Hono();
      app.use(imageCache({ store, cluster }));
      app.all("*", (c) => {
        originCalls++;
        return c.text("origin");
      });
      const path = "/_image-cache/cluster/images/img";
      assert.equal((await app.request(path)).status, 401);
      const wrong = await app.request(path, {
        headers: { "x-image-cache-cluster-secret": "not-the-secret-at-all" },
      });
      assert.equal(wrong.status, 403);
      const right = await app.request(path, {
        headers: { "x-image-cache-cluster-secret": SECRET },
      });
      assert.equal(right.status, 404);
      await right.body?.cancel();
      assert.equal(originCalls, 0);
    } finally {
      await cluster.close();
      await store.close();
    }
  });
});

// The proxy CLI runs on Deno only (Deno.serve), from the source tree.
const SERVE = fileURLToPath(new URL("../scripts/serve.ts", import.meta.url));
const serveSkip = (globalThis as { Deno?: unknown }).Deno !== undefined && existsSync(SERVE)
  ? false
  : "scripts/serve.ts runs on Deno, from the source tree";

describe("the proxy CLI in cluster mode", { skip: serveSkip }, () => {
  it("exits 1 with one line saying what and how to fix when the cluster database is unreachable", async () => {
    await withTempDir(async (dir) => {
      const child = spawn(process.execPath, [
        "run",
        "-A",
        "--no-check",
        SERVE,
        "--listen",
        "127.0.0.1:0",
        "--cache-dir",
        dir,
        "--self-url",
        "http://127.0.0.1:9",
      ], {
        stdio: ["ignore", "pipe", "pipe"],
        // Secrets from the environment, never from the command line.
        env: {
          ...process.env,
          IMAGE_CACHE_CLUSTER_DB: "postgres://cache:hunter2@127.0.0.1:1/index",
          IMAGE_CACHE_CLUSTER_SECRET: SECRET,
        },
      });
      let stderr = "";
      child.stderr!.on("data", (data) => stderr += String(data));
      child.stdout!.resume();
      const code = await new Promise<number | null>((resolve) => child.once("exit", resolve));
      assert.equal(code, 1);
      const lines = stderr.trim().split("\n");
      assert.equal(lines.length, 1, stderr);
      assert.match(
        lines[0],
        /^serve: Cannot join the cluster: the database postgres:\/\/cache:\*\*\*@127\.0\.0\.1:1\/index is unreachable/,
      );
      assert.match(lines[0], /then start again$/);
    });
  });

  it("refuses cluster flags without the database, a short secret, and secrets on the command line", async () => {
    const run = async (args: string[], env: Record<string, string> = {}) => {
      const child = spawn(process.execPath, ["run", "-A", "--no-check", SERVE, ...args], {
        stdio: ["ignore", "ignore", "pipe"],
        env: { ...process.env, ...env },
      });
      let stderr = "";
      child.stderr!.on("data", (data) => stderr += String(data));
      const code = await new Promise<number | null>((resolve) => child.once("exit", resolve));
      return { code, stderr };
    };
    const alone = await run(["--self-url", "http://127.0.0.1:9"]);
    assert.equal(alone.code, 2);
    assert.match(alone.stderr, /need --cluster-db/);
    const short = await run(
      ["--cluster-db", "postgres://x@127.0.0.1:1/db", "--self-url", "http://127.0.0.1:9"],
      { IMAGE_CACHE_CLUSTER_SECRET: "short" },
    );
    assert.equal(short.code, 2);
    assert.match(
      short.stderr,
      /at least 16 characters \(it guards the peer endpoint\), received 5/,
    );
    const flag = await run(["--cluster-secret", SECRET]);
    assert.equal(flag.code, 2);
    assert.match(flag.stderr, /--cluster-secret is not accepted/);
    assert.doesNotMatch(flag.stderr, new RegExp(SECRET));
    const password = await run(
      ["--cluster-db", "postgres://x:hunter2@127.0.0.1:1/db", "--self-url", "http://127.0.0.1:9"],
      { IMAGE_CACHE_CLUSTER_SECRET: SECRET },
    );
    assert.equal(password.code, 2);
    assert.match(password.stderr, /must not hold a password/);
    assert.doesNotMatch(password.stderr, /hunter2/);
  });
});

describe("cluster mode's management routes on a single node", () => {
  it("answers GET /v2/cache/nodes/{id} with 409 when not in cluster mode, as Glance", async () => {
    const store = new MemoryStore();
    const app = cacheApi({ store, authorize: () => true, cleanInterval: 0 });
    const res = await app.request("/v2/cache/nodes/img");
    assert.equal(res.status, 409);
    await res.body?.cancel();
    const scoped = await app.request("/v2/cache/img", {
      method: "DELETE",
      headers: { "x-image-cache-scope": "cluster" },
    });
    assert.equal(scoped.status, 409);
    await scoped.body?.cancel();
    await store.close();
  });

  it("rejects joining a cluster whose database is unreachable with one line saying how to fix it", async () => {
    await assert.rejects(
      joinCluster({
        store: new MemoryStore(),
        database: "postgres://cache:hunter2@127.0.0.1:1/index",
        selfUrl: "http://127.0.0.1:8000",
        secret: SECRET,
      }),
      (error: Error) => {
        assert.match(
          error.message,
          /^Cannot join the cluster: the database postgres:\/\/cache:\*\*\*@/,
        );
        assert.doesNotMatch(error.message, /hunter2|\n/);
        return true;
      },
    );
  });
});
