/**
 * Health of the proxy: liveness (`/healthz`: the process answers; no
 * token, no upstream request) and readiness (`/readyz`: the cache directory
 * takes a write, the upstream answers), and the write test that startup
 * runs too.
 *
 * @module
 */
import { randomBytes } from "node:crypto";
import { open, rm, statfs } from "node:fs/promises";
import { join } from "node:path";
import process from "node:process";
import type { Context } from "hono";
import { askUpstream, describeError } from "./_shared.ts";

/**
 * Proves `directory` writable by writing, syncing and removing a file:
 * `access(W_OK)` passes for root on a read-only file system. The name
 * starts with a dot, which no store entry does.
 *
 * @throws The file system's error (`EROFS`, `EACCES`, `ENOSPC`...).
 */
export async function proveWritable(directory: string): Promise<void> {
  const path = join(directory, `.write-test-${process.pid}-${randomBytes(4).toString("hex")}`);
  const file = await open(path, "wx");
  try {
    await file.writeFile("hono-image-cache write test\n");
    await file.sync();
  } finally {
    await file.close();
    await rm(path, { force: true });
  }
}

/** The size in bytes of the file system holding `directory`; `undefined` where the runtime cannot tell. */
export async function fileSystemSize(directory: string): Promise<number | undefined> {
  if (typeof statfs !== "function") return undefined;
  try {
    const info = await statfs(directory);
    const size = Number(info.blocks) * Number(info.bsize);
    return Number.isFinite(size) && size > 0 ? size : undefined;
  } catch {
    return undefined;
  }
}

/** What readiness checks. */
export interface Readiness {
  /** The cache directory, when the store has one. */
  directory?: string;
  /** The upstream's origin and path prefix (its `/` is asked: Glance lists its versions there). */
  prefix: string;
  send: (request: Request) => Promise<Response>;
  /** Milliseconds each check may take. */
  timeout: number;
  /** Set once shutdown began: not ready, so load balancers look elsewhere. */
  stopping: () => boolean;
  /** Why a check failed, with details a client must not see. */
  onFailure: (check: "cache" | "upstream", detail: string) => void;
}

/** `GET /healthz`: the process is alive. */
export function liveness(c: Context): Response {
  return c.text("ok\n", 200, { "cache-control": "no-store" });
}

/** `GET /readyz`: `200` when the cache takes a write and the upstream answers (below 500), else `503`. */
export async function readiness(c: Context, ready: Readiness): Promise<Response> {
  const checks: Record<string, string> = {};
  if (ready.stopping()) checks.process = "shutting down";
  const cache = async () => {
    if (ready.directory === undefined) return;
    try {
      await withTimeout(proveWritable(ready.directory), ready.timeout);
      checks.cache = "ok";
    } catch (error) {
      checks.cache = "not writable";
      ready.onFailure("cache", `${ready.directory}: ${describeError(error)}`);
    }
  };
  const upstream = async () => {
    try {
      const response = await askUpstream(ready.send, `${ready.prefix}/`, {}, ready.timeout);
      await response.body?.cancel().catch(() => {});
      if (response.status >= 500) {
        checks.upstream = `answered ${response.status}`;
        ready.onFailure("upstream", `${ready.prefix}/ answered ${response.status}`);
      } else {
        checks.upstream = "ok";
      }
    } catch (error) {
      checks.upstream = "unreachable";
      ready.onFailure("upstream", (error as Error).message);
    }
  };
  await Promise.all([cache(), upstream()]);
  const ok = Object.values(checks).every((value) => value === "ok");
  return c.json({ status: ok ? "ready" : "not ready", checks }, ok ? 200 : 503, {
    "cache-control": "no-store",
  });
}

function withTimeout<T>(promise: Promise<T>, timeout: number): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  return Promise.race([
    promise,
    new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`No answer within ${timeout} ms`)), timeout);
    }),
  ]).finally(() => clearTimeout(timer));
}
