/**
 * One benchmark server, runtime-neutral (Deno, Bun, Node with type stripping).
 * Started by `scripts/bench/bench.ts` and `scripts/bench/memory_check.ts`, never by hand.
 *
 * Usage: `<runtime> scripts/bench/server.ts '<json config>'`; prints
 * `READY <port>` on stdout once it listens on 127.0.0.1, and stops on SIGTERM.
 *
 * Modes:
 * - `raw`: the runtime's own file serving, no framework, no cache logic:
 *   `Deno.serve` + `Deno.open().readable`, `Bun.serve` + `Bun.file()`,
 *   `node:http` + `fs.createReadStream().pipe()`. With `digests.json` in the
 *   data directory it also sends `Content-MD5` and `x-image-sha256`, so it
 *   doubles as an origin.
 * - `cache`: `imageCache()` with a `FileSystemStore` in front of a Hono
 *   route that proxies to the origin with `fetch()`.
 * - `pass`: the same Hono proxy route without the cache (the pass-through
 *   baseline of the miss path).
 *
 * @module
 */
import { createReadStream, readFileSync } from "node:fs";
import { stat } from "node:fs/promises";
import process from "node:process";

/** What the orchestrator asks for. */
export interface BenchServerConfig {
  mode: "raw" | "cache" | "pass";
  /** Directory of the image files (`raw`). */
  data?: string;
  /** Cache directory (`cache`). */
  cache?: string;
  /** Origin base URL (`cache`, `pass`). */
  origin?: string;
  /**
   * Digest the fill verifies (`cache`): the origin's `Content-MD5` (default)
   * or its `x-image-sha256`; `none` checks the length only.
   */
  digest?: "md5" | "sha256" | "none";
  /** Print `process.memoryUsage()` as `MEM <json>` on stderr every this many ms. */
  memoryLog?: number;
}

type Fetch = (request: Request) => Response | Promise<Response>;

const PATH = /^\/v2\/images\/([A-Za-z0-9_-]+)\/file$/;

const rt = globalThis as unknown as {
  Deno?: {
    serve(
      options: { port: number; hostname: string; onListen(addr: { port: number }): void },
      handler: Fetch,
    ): unknown;
    open(path: string): Promise<
      { readable: ReadableStream<Uint8Array>; stat(): Promise<{ size: number }> }
    >;
  };
  Bun?: {
    serve(options: Record<string, unknown>): { port: number };
    file(path: string): Blob;
  };
};

function idOf(url: string): string | undefined {
  const start = url.indexOf("/", url.indexOf("://") + 3);
  const query = url.indexOf("?", start);
  return PATH.exec(url.slice(start, query === -1 ? undefined : query))?.[1];
}

function digestHeaders(data: string): Record<string, Record<string, string>> {
  try {
    const digests = JSON.parse(readFileSync(`${data}/digests.json`, "utf8")) as Record<
      string,
      { md5: string; sha256: string }
    >;
    const out: Record<string, Record<string, string>> = {};
    for (const [id, d] of Object.entries(digests)) {
      out[id] = { "content-md5": d.md5, "x-image-sha256": d.sha256 };
    }
    return out;
  } catch {
    return {};
  }
}

function notFound(): Response {
  return new Response("Not found", { status: 404 });
}

async function rawServer(config: BenchServerConfig): Promise<number> {
  const data = config.data!;
  const extra = digestHeaders(data);
  const base = { "content-type": "application/octet-stream" };
  if (rt.Deno) {
    return await new Promise((resolve) => {
      rt.Deno!.serve({
        port: 0,
        hostname: "127.0.0.1",
        onListen: (addr) => resolve(addr.port),
      }, async (request) => {
        const id = idOf(request.url);
        if (id === undefined) return notFound();
        const file = await rt.Deno!.open(`${data}/${id}`).catch(() => undefined);
        if (file === undefined) return notFound();
        const { size } = await file.stat();
        return new Response(file.readable, {
          headers: { ...base, ...extra[id], "content-length": String(size) },
        });
      });
    });
  }
  if (rt.Bun) {
    const server = rt.Bun.serve({
      port: 0,
      hostname: "127.0.0.1",
      idleTimeout: 120,
      fetch: (request: Request) => {
        const id = idOf(request.url);
        if (id === undefined) return notFound();
        // Bun sends a Bun.file body with sendfile and sets Content-Length itself.
        return new Response(rt.Bun!.file(`${data}/${id}`), { headers: { ...base, ...extra[id] } });
      },
    });
    return server.port;
  }
  const http = await import("node:http");
  const server = http.createServer(async (req, res) => {
    const id = idOf(`http://x${req.url}`);
    const path = `${data}/${id}`;
    const info = id === undefined ? undefined : await stat(path).catch(() => undefined);
    if (info === undefined) {
      res.writeHead(404).end("Not found");
      return;
    }
    res.writeHead(200, { ...base, ...extra[id!], "content-length": info.size });
    createReadStream(path, { highWaterMark: 256 * 1024 }).pipe(res);
  });
  return await listenNode(server);
}

function listenNode(server: import("node:http").Server): Promise<number> {
  server.keepAliveTimeout = 60_000;
  return new Promise((resolve) => {
    server.listen(0, "127.0.0.1", () => {
      resolve((server.address() as { port: number }).port);
    });
  });
}

async function honoServer(config: BenchServerConfig): Promise<number> {
  const { Hono } = await import("hono");
  const app = new Hono();
  const origin = config.origin!;
  if (config.mode === "cache") {
    const { FileSystemStore, imageCache } = await import("../../mod.ts");
    const store = new FileSystemStore({ directory: config.cache!, maxSize: 2 ** 40 });
    app.use(imageCache({
      store,
      expectedDigest: config.digest === "sha256"
        ? (_c, res) => ({ algorithm: "sha256", value: res.headers.get("x-image-sha256") ?? "" })
        : config.digest === "none"
        ? () => undefined
        : undefined,
      onError: (error) => console.error("bench server: cache fault:", error),
    }));
  }
  app.get("/v2/images/:id/file", (c) => fetch(`${origin}${c.req.path}`));
  return await serve(app.fetch);
}

async function serve(fetch: Fetch): Promise<number> {
  if (rt.Deno) {
    return await new Promise((resolve) => {
      rt.Deno!.serve(
        { port: 0, hostname: "127.0.0.1", onListen: (addr) => resolve(addr.port) },
        fetch,
      );
    });
  }
  if (rt.Bun) {
    return rt.Bun.serve({ port: 0, hostname: "127.0.0.1", idleTimeout: 120, fetch }).port;
  }
  const { serve } = await import("@hono/node-server");
  return await new Promise((resolve) => {
    const server = serve({ fetch, port: 0, hostname: "127.0.0.1" }, (info) => resolve(info.port));
    (server as import("node:http").Server).keepAliveTimeout = 60_000;
  });
}

async function main() {
  const config = JSON.parse(process.argv[2] ?? "{}") as BenchServerConfig;
  if (config.mode === "raw" && typeof config.data !== "string") {
    throw new TypeError(`Cannot start bench server: "data" must be a directory`);
  }
  if ((config.mode === "cache" || config.mode === "pass") && typeof config.origin !== "string") {
    throw new TypeError(`Cannot start bench server: "origin" must be a URL`);
  }
  if (config.mode === "cache" && typeof config.cache !== "string") {
    throw new TypeError(`Cannot start bench server: "cache" must be a directory`);
  }
  if (!["raw", "cache", "pass"].includes(config.mode)) {
    throw new TypeError(
      `Cannot start bench server: "mode" must be raw, cache or pass, received ${
        JSON.stringify(config.mode)
      }`,
    );
  }
  const port = config.mode === "raw" ? await rawServer(config) : await honoServer(config);
  process.on("SIGTERM", () => process.exit(0));
  if (config.memoryLog) {
    const timer = setInterval(() => {
      console.error(`MEM ${JSON.stringify(process.memoryUsage())}`);
    }, config.memoryLog);
    (timer as unknown as { unref?: () => void }).unref?.();
  }
  console.log(`READY ${port}`);
}

await main();
