/**
 * Test helpers shared by every suite: temporary directories, real servers on
 * loopback for Deno, Bun and Node, and body utilities. Runtime-neutral.
 *
 * @module
 */
import type { ChildProcess } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { FileSystemStore, type ImageStore, MemoryStore } from "hono-image-cache";

/**
 * Runs `fn` with a fresh temporary directory, removed afterwards with
 * retries (a store may still be moving a failed fill's files as a test
 * ends); a failure of `fn` is never hidden by a failed removal.
 */
export async function withTempDir<T>(fn: (dir: string) => Promise<T>): Promise<T> {
  const dir = await mkdtemp(join(tmpdir(), "hono-image-cache-test-"));
  // Our own retries: not every runtime's `rm` honours `maxRetries` (a fill that
  // failed may still be moving its file to invalid/ while the directory goes).
  const remove = async () => {
    for (let attempt = 1;; attempt++) {
      try {
        return await rm(dir, { recursive: true, force: true });
      } catch (error) {
        if (attempt >= 40) throw error;
        await sleep(50);
      }
    }
  };
  let result: T;
  try {
    result = await fn(dir);
  } catch (error) {
    await remove().catch(() => {});
    throw error;
  }
  await remove();
  return result;
}

/** The two stores every behaviour is checked with, each made fresh in a directory. */
export const STORES: [string, (dir: string) => ImageStore][] = [
  ["MemoryStore", () => new MemoryStore()],
  ["FileSystemStore", (dir) => new FileSystemStore({ directory: dir })],
];

/** A test body run with a fresh store of a kind, closed and removed afterwards. */
export function withStore(
  make: (dir: string) => ImageStore,
  fn: (store: ImageStore) => Promise<void>,
): () => Promise<void> {
  return () =>
    withTempDir(async (dir) => {
      const store = make(dir);
      try {
        await fn(store);
      } finally {
        await store.close();
      }
    });
}

/** Reads what is left of a body from a reader already in use. */
export function readRest(
  reader: ReadableStreamDefaultReader<Uint8Array>,
): Promise<{ bytes: Uint8Array; error?: unknown }> {
  return readBody(
    new Response(
      new ReadableStream<Uint8Array>({
        async pull(controller) {
          const { done, value } = await reader.read();
          if (done) controller.close();
          else controller.enqueue(value);
        },
      }),
    ),
  );
}

/** Reads a body to the end, or returns the error it failed with. */
export async function readBody(
  res: Response,
): Promise<{ bytes: Uint8Array; error?: unknown }> {
  const parts: Uint8Array[] = [];
  let length = 0;
  const reader = res.body?.getReader();
  if (reader === undefined) return { bytes: new Uint8Array() };
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      parts.push(value);
      length += value.byteLength;
    }
  } catch (error) {
    return { bytes: concat(parts, length), error };
  }
  return { bytes: concat(parts, length) };
}

function concat(parts: Uint8Array[], length: number): Uint8Array {
  const out = new Uint8Array(length);
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.byteLength;
  }
  return out;
}

/**
 * Asserts two byte arrays are equal by length and digest: `deepEqual` on
 * megabytes builds a diff that can exhaust memory.
 */
export function assertBytes(actual: Uint8Array, expected: Uint8Array, message?: string): void {
  if (actual.byteLength !== expected.byteLength || hexDigest(actual) !== hexDigest(expected)) {
    throw new Error(
      `${message ?? "Bytes differ"}: got ${actual.byteLength} bytes (md5 ${
        hexDigest(actual)
      }), expected ${expected.byteLength} (md5 ${hexDigest(expected)})`,
    );
  }
}

/** Hex digest of bytes. */
export function hexDigest(bytes: Uint8Array, algorithm = "md5"): string {
  return createHash(algorithm).update(bytes).digest("hex");
}

/** Random-looking bytes, deterministic for a seed. */
export function pattern(size: number, seed = 1): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(size);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < size; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}

/** A stream of `bytes` in chunks of `chunkSize`, waiting `delay` ms before each chunk. */
export function slowStream(
  bytes: Uint8Array,
  chunkSize = 64 * 1024,
  delay = 0,
): ReadableStream<Uint8Array> {
  let at = 0;
  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      if (delay > 0) await sleep(delay);
      if (at >= bytes.byteLength) return controller.close();
      controller.enqueue(bytes.slice(at, at + chunkSize));
      at += chunkSize;
    },
  }, { highWaterMark: 0 });
}

/** Waits `ms` milliseconds. */
export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Polls `check` every 10 ms until it holds, for at most `timeout` ms. */
export async function waitFor(check: () => boolean | Promise<boolean>, timeout = 5000) {
  const deadline = Date.now() + timeout;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error("Condition not met in time");
    await sleep(10);
  }
}

/**
 * The port a child process prints as `{"port":N}` on its stdout, waiting
 * at most `timeout` ms; `onOutput` sees all it printed so far, each time.
 */
export function childPort(
  child: ChildProcess,
  timeout: number,
  onOutput?: (output: string) => void,
): Promise<number> {
  return new Promise<number>((resolve, reject) => {
    let output = "";
    const timer = setTimeout(() => reject(new Error(`No port from the child: ${output}`)), timeout);
    child.stdout!.on("data", (data) => {
      output += String(data);
      onOutput?.(output);
      const match = /\{"port":(\d+)\}/.exec(output);
      if (match) {
        clearTimeout(timer);
        resolve(Number(match[1]));
      }
    });
    child.once("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`The child exited with ${code}: ${output}`));
    });
  });
}

/** A server listening on loopback. */
export interface TestServer {
  /** `http://127.0.0.1:<port>` */
  url: string;
  /** Stops the server and closes its connections. */
  close(): Promise<void>;
}

type Fetch = (request: Request) => Response | Promise<Response>;

const runtime = globalThis as unknown as {
  Deno?: {
    serve(
      options: { port: number; hostname: string; onListen?: () => void },
      handler: Fetch,
    ): { addr: { port: number }; shutdown(): Promise<void> };
  };
  Bun?: {
    serve(options: { port: number; hostname: string; fetch: Fetch }): {
      port: number;
      stop(force?: boolean): Promise<void> | void;
    };
  };
};

/**
 * Starts `fetch` (e.g. `app.fetch`) on a free loopback port with the
 * runtime's own server: `Deno.serve`, `Bun.serve`, or `@hono/node-server`.
 */
export async function startServer(fetch: Fetch): Promise<TestServer> {
  if (runtime.Deno) {
    const ac = new AbortController();
    const server = runtime.Deno.serve(
      { port: 0, hostname: "127.0.0.1", onListen: () => {}, signal: ac.signal } as never,
      fetch,
    );
    return {
      url: `http://127.0.0.1:${server.addr.port}`,
      close: async () => {
        ac.abort();
        await server.shutdown().catch(() => {});
      },
    };
  }
  if (runtime.Bun) {
    const server = runtime.Bun.serve({ port: 0, hostname: "127.0.0.1", fetch });
    return {
      url: `http://127.0.0.1:${server.port}`,
      close: async () => {
        await server.stop(true);
      },
    };
  }
  const { serve } = await import("@hono/node-server");
  return await new Promise((resolve) => {
    const server = serve({ fetch, port: 0, hostname: "127.0.0.1" }, (info) => {
      resolve({
        url: `http://127.0.0.1:${info.port}`,
        close: () =>
          new Promise<void>((done) => {
            (server as unknown as { closeAllConnections?: () => void }).closeAllConnections?.();
            server.close(() => done());
          }),
      });
    });
  });
}

/** The arguments that run a TypeScript file with the runtime running this test (child processes). */
export function runtimeArgs(script: string): string[] {
  const g = globalThis as { Deno?: unknown; Bun?: unknown };
  if (g.Deno) return ["run", "-A", "--no-check", script];
  if (g.Bun) return [script];
  return ["--experimental-strip-types", "--no-warnings", script];
}
