/**
 * A small Glance-like origin serving generated images: the demo behind
 * `deno task serve`, and an origin for tests and benchmarks.
 *
 * @module
 */
import { createHash } from "node:crypto";
import { Hono } from "hono";

/** How one demo image behaves. */
export interface DemoImage {
  /** Size in bytes. */
  size: number;
  /** Glance status reported by the metadata route. @default {"active"} */
  status?: string;
  /** Send this `Content-MD5` instead of the true one (a corrupt origin). */
  checksum?: string;
  /** End the body after this many bytes (a truncated origin). */
  truncateAt?: number;
}

/** Options of {@linkcode demoOrigin}. */
export interface DemoOriginOptions {
  /**
   * The images, by id.
   * @default {{ cirros: { size: 16 MiB }, ubuntu: { size: 256 MiB } }}
   */
  images?: Record<string, DemoImage>;
  /** Milliseconds to wait between chunks (a slow origin). @default {0} */
  chunkDelay?: number;
  /** Bytes per chunk. @default {65536} */
  chunkSize?: number;
}

/** The counters of a {@linkcode demoOrigin}, for tests and benchmarks. */
export interface DemoOriginStats {
  /** `GET`s of image data, by id. */
  reads: Record<string, number>;
  /** Image data bytes sent. */
  bytesSent: number;
}

const BLOCK = 65536;

/**
 * The byte at each position of a generated image: a deterministic function of
 * the id and the position, so any range can be produced without storing it.
 */
function fillBlock(seed: number, block: number, out: Uint8Array): void {
  let x = (seed ^ Math.imul(block + 1, 0x9e3779b1)) >>> 0 || 1;
  const words = new Uint32Array(out.buffer, out.byteOffset, out.byteLength >> 2);
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    words[i] = x >>> 0;
  }
}

function seedOf(id: string): number {
  let h = 2166136261;
  for (let i = 0; i < id.length; i++) h = Math.imul(h ^ id.charCodeAt(i), 16777619);
  return h >>> 0;
}

/**
 * Bytes `start` to `end` (exclusive) of the generated image `id`, as a stream
 * of at most `chunkSize` bytes per chunk.
 *
 * @example
 * ```ts
 * import { generatedImage } from "hono-image-cache/testing";
 * const bytes = new Uint8Array(await new Response(generatedImage("x", 0, 10)).arrayBuffer());
 * console.log(bytes.length); // 10
 * ```
 */
export function generatedImage(
  id: string,
  start: number,
  end: number,
  chunkSize = BLOCK,
  chunkDelay = 0,
): ReadableStream<Uint8Array> {
  const seed = seedOf(id);
  let position = start;
  const block = new Uint8Array(BLOCK);
  let blockIndex = -1;
  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      if (position >= end) return controller.close();
      if (chunkDelay > 0) await new Promise((r) => setTimeout(r, chunkDelay));
      const out = new Uint8Array(Math.min(chunkSize, end - position));
      let filled = 0;
      while (filled < out.length) {
        const index = Math.floor(position / BLOCK);
        if (index !== blockIndex) {
          fillBlock(seed, index, block);
          blockIndex = index;
        }
        const from = position - index * BLOCK;
        const n = Math.min(BLOCK - from, out.length - filled);
        out.set(block.subarray(from, from + n), filled);
        filled += n;
        position += n;
      }
      controller.enqueue(out);
    },
  }, { highWaterMark: 0 });
}

const digests = new Map<string, Promise<{ md5: string; sha512: string }>>();

/** The MD5 and SHA-512 (hex) of a generated image, computed by streaming it once. */
export function generatedDigests(
  id: string,
  size: number,
): Promise<{ md5: string; sha512: string }> {
  const key = `${id}\0${size}`;
  let digest = digests.get(key);
  if (digest === undefined) {
    digest = (async () => {
      const md5 = createHash("md5");
      const sha512 = createHash("sha512");
      for await (const chunk of generatedImage(id, 0, size, 1 << 20)) {
        md5.update(chunk);
        sha512.update(chunk);
      }
      return { md5: md5.digest("hex"), sha512: sha512.digest("hex") };
    })();
    digests.set(key, digest);
  }
  return digest;
}

/**
 * A Glance-like origin: `GET`/`HEAD /v2/images/{id}` (metadata),
 * `GET`/`HEAD /v2/images/{id}/file` (data with `Content-MD5`, single
 * ranges), `GET /v1/images/{id}` (data with `x-image-meta-*`),
 * `PUT /v2/images/{id}/file` (upload, read and counted), `DELETE` on both
 * versions.
 *
 * @param options The images and the pace.
 * @returns The app and its counters.
 *
 * @example
 * ```ts
 * import { demoOrigin } from "hono-image-cache/testing";
 * import assert from "node:assert/strict";
 *
 * const { app } = demoOrigin({ images: { tiny: { size: 4 } } });
 * const res = await app.request("/v2/images/tiny/file");
 * assert.equal((await res.arrayBuffer()).byteLength, 4);
 * ```
 */
export function demoOrigin(
  options: DemoOriginOptions = {},
): { app: Hono; stats: DemoOriginStats; images: Record<string, DemoImage> } {
  const images: Record<string, DemoImage> = options.images ??
    { cirros: { size: 16 * 2 ** 20 }, ubuntu: { size: 256 * 2 ** 20 } };
  const chunkSize = options.chunkSize ?? BLOCK;
  const chunkDelay = options.chunkDelay ?? 0;
  const stats: DemoOriginStats = { reads: {}, bytesSent: 0 };
  const app = new Hono();

  const counted = (stream: ReadableStream<Uint8Array>) =>
    stream.pipeThrough(
      new TransformStream<Uint8Array, Uint8Array>({
        transform(chunk, controller) {
          stats.bytesSent += chunk.byteLength;
          controller.enqueue(chunk);
        },
      }),
    );

  const metadata = async (id: string, image: DemoImage) => {
    const { md5, sha512 } = await generatedDigests(id, image.size);
    return {
      id,
      name: id,
      status: image.status ?? "active",
      size: image.size,
      checksum: md5,
      os_hash_algo: "sha512",
      os_hash_value: sha512,
      disk_format: "qcow2",
      container_format: "bare",
    };
  };

  app.get("/v2/images/:id", async (c) => {
    const id = c.req.param("id");
    const image = images[id];
    if (image === undefined) return c.json({ message: "Image not found" }, 404);
    return c.json(await metadata(id, image));
  });

  const data = async (c: import("hono").Context, v1: boolean) => {
    const id = c.req.param("id") ?? "";
    const image = images[id];
    if (image === undefined || (image.status ?? "active") !== "active") {
      return c.text("Image not found", 404);
    }
    const { md5 } = await generatedDigests(id, image.size);
    const headers: Record<string, string> = { "content-type": "application/octet-stream" };
    if (v1) {
      Object.assign(headers, {
        "x-image-meta-id": id,
        "x-image-meta-name": id,
        "x-image-meta-size": String(image.size),
        "x-image-meta-checksum": image.checksum ?? md5,
        "x-image-meta-status": "active",
        "x-image-meta-location": `file:///var/lib/glance/images/${id}`,
      });
    } else {
      headers["content-md5"] = image.checksum ?? md5;
    }
    const range = /^bytes=(\d+)-(\d*)$/.exec(c.req.header("range") ?? "");
    let start = 0;
    let end = image.size;
    let status: 200 | 206 = 200;
    if (range !== null && Number(range[1]) < image.size) {
      start = Number(range[1]);
      end = range[2] === "" ? image.size : Math.min(image.size, Number(range[2]) + 1);
      status = 206;
      headers["content-range"] = `bytes ${start}-${end - 1}/${image.size}`;
    }
    headers["content-length"] = String(end - start);
    headers["accept-ranges"] = "bytes";
    if (c.req.method === "HEAD") return c.body(null, status, headers);
    stats.reads[id] = (stats.reads[id] ?? 0) + 1;
    const sent = image.truncateAt === undefined ? end : Math.min(end, image.truncateAt);
    return c.body(counted(generatedImage(id, start, sent, chunkSize, chunkDelay)), status, headers);
  };
  app.get("/v2/images/:id/file", (c) => data(c, false));
  app.get("/v1/images/:id", (c) => data(c, true));

  app.put("/v2/images/:id/file", async (c) => {
    let size = 0;
    const hash = createHash("md5");
    for await (const chunk of c.req.raw.body ?? new ReadableStream<Uint8Array>()) {
      size += chunk.byteLength;
      hash.update(chunk);
    }
    return c.json({ id: c.req.param("id"), size, checksum: hash.digest("hex") }, 201);
  });
  const remove = (c: import("hono").Context, status: 200 | 204) => {
    const id = c.req.param("id") ?? "";
    if (images[id] === undefined) return c.json({ message: "Image not found" }, 404);
    delete images[id];
    return status === 204 ? c.body(null, 204) : c.json({ deleted: id });
  };
  app.delete("/v2/images/:id", (c) => remove(c, 204));
  app.delete("/v1/images/:id", (c) => remove(c, 200));
  return { app, stats, images };
}
