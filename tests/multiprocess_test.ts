import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { readdir, stat } from "node:fs/promises";
import { join } from "node:path";
import process from "node:process";
import { fileURLToPath } from "node:url";
import { demoOrigin, generatedDigests } from "hono-image-cache/testing";
import {
  childPort,
  hexDigest,
  readBody,
  runtimeArgs,
  startServer,
  waitFor,
  withTempDir,
} from "./_helpers.ts";

const SCRIPT = fileURLToPath(new URL("./fixtures/cache_server.ts", import.meta.url));
const SIZE = 6 * 2 ** 20;

interface Child {
  process: ChildProcess;
  url: string;
  exited: Promise<void>;
}

async function startChild(dir: string, origin: string): Promise<Child> {
  const child = spawn(process.execPath, [...runtimeArgs(SCRIPT), dir, origin], {
    stdio: ["ignore", "pipe", "inherit"],
  });
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  const port = await childPort(child, 30_000);
  return { process: child, url: `http://127.0.0.1:${port}`, exited };
}

async function stop(child: Child | undefined, signal: NodeJS.Signals = "SIGKILL") {
  if (child === undefined || child.process.exitCode !== null) return;
  child.process.kill(signal);
  await child.exited;
}

async function withOrigin<T>(
  chunkDelay: number,
  fn: (url: string, reads: () => number) => Promise<T>,
  chunkSize?: number,
) {
  const origin = demoOrigin({ images: { img: { size: SIZE } }, chunkDelay, chunkSize });
  await generatedDigests("img", SIZE);
  const server = await startServer(origin.app.fetch);
  try {
    return await fn(server.url, () => origin.stats.reads.img ?? 0);
  } finally {
    await server.close();
  }
}

describe("processes sharing one cache directory", () => {
  it("after a SIGKILL mid-fill, a new process sweeps the leftover and serves the full body", async () => {
    await withTempDir((dir) =>
      withOrigin(5, async (originUrl) => {
        const { md5 } = await generatedDigests("img", SIZE);
        let first: Child | undefined;
        let second: Child | undefined;
        try {
          first = await startChild(dir, originUrl);
          const res = await fetch(`${first.url}/v2/images/img/file`);
          const reader = res.body!.getReader();
          await reader.read();
          await waitFor(async () => {
            const info = await stat(join(dir, "incomplete", "img")).catch(() => undefined);
            return (info?.size ?? 0) > 256 * 1024;
          }, 10_000);
          await stop(first);
          await reader.cancel().catch(() => {});
          assert.deepEqual((await readdir(join(dir, "incomplete"))).sort(), ["img", "img.owner"]);
          assert.deepEqual(
            await readdir(dir).then((n) => n.filter((x) => x.startsWith("img"))),
            [],
          );

          const started = Date.now();
          second = await startChild(dir, originUrl);
          await waitFor(async () => (await readdir(join(dir, "incomplete"))).length === 0, 2000);
          assert.ok(Date.now() - started < 30_000);
          const again = await fetch(`${second.url}/v2/images/img/file`);
          assert.equal(again.headers.get("cache-status"), "hono-image-cache; fwd=miss; stored");
          const { bytes, error } = await readBody(again);
          assert.equal(error, undefined);
          assert.equal(hexDigest(bytes), md5);
          const hit = await fetch(`${second.url}/v2/images/img/file`);
          assert.equal(hit.headers.get("cache-status"), "hono-image-cache; hit");
          assert.equal(hexDigest((await readBody(hit)).bytes), md5);
        } finally {
          await stop(first);
          await stop(second);
        }
      })
    );
  });

  it("two live processes asked for one image: correct bodies, one writer, one committed file", async () => {
    await withTempDir((dir) =>
      withOrigin(2, async (originUrl, reads) => {
        const { md5 } = await generatedDigests("img", SIZE);
        const children: Child[] = [];
        try {
          children.push(await startChild(dir, originUrl), await startChild(dir, originUrl));
          const responses = await Promise.all(
            children.flatMap((child) => [1, 2].map(() => fetch(`${child.url}/v2/images/img/file`))),
          );
          const statuses = responses.map((r) => r.headers.get("cache-status") ?? "");
          for (const res of responses) {
            const { bytes, error } = await readBody(res);
            assert.equal(error, undefined);
            assert.equal(hexDigest(bytes), md5);
          }
          assert.equal(statuses.filter((s) => s.endsWith("; stored")).length, 1, statuses.join());
          assert.ok(reads() <= 2, `at most one origin fetch per process, got ${reads()}`);
          const files = (await readdir(dir)).filter((name) => name.startsWith("img"));
          assert.deepEqual(files.sort(), ["img", "img.json"]);
          assert.deepEqual(await readdir(join(dir, "incomplete")), []);
        } finally {
          for (const child of children) await stop(child);
        }
      })
    );
  });

  it("a process following another's fill serves the whole image when that process is killed", async () => {
    await withTempDir((dir) =>
      withOrigin(10, async (originUrl) => {
        const { md5 } = await generatedDigests("img", SIZE);
        let owner: Child | undefined;
        let follower: Child | undefined;
        try {
          owner = await startChild(dir, originUrl);
          follower = await startChild(dir, originUrl);
          const first = await fetch(`${owner.url}/v2/images/img/file`);
          const reader = first.body!.getReader();
          await reader.read(); // The owner's fill is under way.
          await waitFor(async () =>
            (await readdir(join(dir, "incomplete"))).some((name) => name === "img")
          );
          const second = await fetch(`${follower.url}/v2/images/img/file`);
          assert.equal(
            second.headers.get("cache-status"),
            "hono-image-cache; fwd=miss; collapsed; detail=busy",
          );
          const reading = readBody(second);
          await stop(owner); // SIGKILL mid-fill.
          await reader.cancel().catch(() => {});
          const { bytes, error } = await reading;
          assert.equal(error, undefined);
          assert.equal(hexDigest(bytes), md5);
          // The owner died before its commit: the follower's tail of the body came from its origin.
          assert.ok(!(await readdir(dir)).includes("img"), "the owner never committed");
        } finally {
          await stop(owner);
          await stop(follower);
        }
      }, 64 * 1024)
    );
  });
});
