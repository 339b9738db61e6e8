/**
 * An in-memory {@linkcode ImageStore}, for tests and small caches.
 *
 * @module
 */
import { isStorableId } from "./_ids.ts";
import { checkSize } from "./_options.ts";
import type {
  CleanResult,
  CommitInfo,
  CreateWriterOptions,
  ImageEntry,
  ImageStore,
  ImageWriter,
  WriterRefusal,
} from "./image_store.ts";

/** Options of {@linkcode MemoryStore}. */
export interface MemoryStoreOptions {
  /**
   * Bytes of data the cache may hold.
   * @default {1073741824} (1 GiB)
   */
  maxSize?: number;
  /**
   * Largest image, in bytes, the cache stores; a larger one passes through
   * uncached (`Cache-Status: ...; detail=too-large`).
   * @default {maxSize}
   */
  maxObjectSize?: number;
}

interface StoredImage {
  entry: ImageEntry;
  chunks: Uint8Array[];
}

const READ_CHUNK = 256 * 1024;

/**
 * Keeps images in memory, with the same semantics as
 * {@linkcode FileSystemStore}: exclusive writers, commit or abort, a queue.
 * Nothing survives the process.
 *
 * @example Caching in memory
 * ```ts
 * import { Hono } from "hono";
 * import { imageCache, MemoryStore } from "hono-image-cache";
 * import assert from "node:assert/strict";
 *
 * const store = new MemoryStore({ maxSize: 64 * 2 ** 20 });
 * const app = new Hono();
 * app.use(imageCache({ store }));
 * app.get("/v2/images/:id/file", (c) => c.body("image bytes"));
 *
 * const miss = await app.request("/v2/images/abc/file");
 * assert.equal(await miss.text(), "image bytes");
 * const hit = await app.request("/v2/images/abc/file");
 * assert.equal(hit.headers.get("cache-status"), "hono-image-cache; hit");
 * assert.equal(await hit.text(), "image bytes");
 * ```
 */
export class MemoryStore implements ImageStore {
  /** Bytes of data the cache may hold. */
  readonly maxSize: number;
  /** Largest image, in bytes, the cache stores. */
  readonly maxObjectSize: number;
  #images = new Map<string, StoredImage>();
  #writers = new Set<string>();
  #queue = new Set<string>();

  /**
   * @param options The store's limits.
   * @throws {RangeError} When `maxSize` or `maxObjectSize` is not a non-negative number.
   */
  constructor(options: MemoryStoreOptions = {}) {
    this.maxSize = checkSize("MemoryStore", "maxSize", options.maxSize, 2 ** 30);
    this.maxObjectSize = checkSize(
      "MemoryStore",
      "maxObjectSize",
      options.maxObjectSize,
      this.maxSize,
    );
  }

  /** Whether this store can hold an image of this id. */
  canHold(id: string): boolean {
    return isStorableId(id);
  }

  /** The committed entry for `id`. */
  get(id: string): Promise<ImageEntry | undefined> {
    const image = this.#images.get(id);
    return Promise.resolve(image && { ...image.entry });
  }

  /** A stream of bytes `start` to `end` (inclusive) of an entry. */
  body(entry: ImageEntry, start: number, end: number): Promise<ReadableStream<Uint8Array>> {
    const image = this.#images.get(entry.id);
    if (image === undefined) return Promise.reject(new Error(`Image "${entry.id}" is not cached`));
    return Promise.resolve(sliceStream(image.chunks, start, end + 1));
  }

  /** Counts a hit. */
  recordHit(id: string): void {
    const image = this.#images.get(id);
    if (image === undefined) return;
    image.entry.hits++;
    image.entry.lastAccessed = Date.now();
  }

  /** An exclusive writer for `id`. */
  createWriter(id: string, _options?: CreateWriterOptions): Promise<ImageWriter | WriterRefusal> {
    if (!this.canHold(id)) return Promise.resolve("unsupported-id");
    if (this.#writers.has(id)) return Promise.resolve("busy");
    this.#writers.add(id);
    const chunks: Uint8Array[] = [];
    let size = 0;
    let settled = false;
    const settle = () => {
      if (settled) throw new Error(`Writer for "${id}" already committed or aborted`);
      settled = true;
      this.#writers.delete(id);
    };
    const writer: ImageWriter = {
      write: (chunk) => {
        if (settled) return Promise.reject(new Error(`Writer for "${id}" is closed`));
        // Copy: the caller's buffer may be reused or transferred.
        chunks.push(chunk.slice());
        size += chunk.byteLength;
        return Promise.resolve();
      },
      read: (position, length) => Promise.resolve(copyRange(chunks, position, position + length)),
      commit: (info: CommitInfo) => {
        settle();
        if (info.size !== size) {
          return Promise.reject(
            new Error(`Cannot commit "${id}": wrote ${size} bytes, not ${info.size}`),
          );
        }
        const now = Date.now();
        const entry: ImageEntry = { id, ...info, created: now, lastAccessed: now, hits: 0 };
        this.#images.set(id, { entry, chunks });
        this.#queue.delete(id);
        return Promise.resolve({ ...entry });
      },
      abort: () => {
        if (!settled) settle();
        return Promise.resolve();
      },
      close: () => Promise.resolve(),
    };
    return Promise.resolve(writer);
  }

  /** Removes a committed entry. */
  delete(id: string): Promise<boolean> {
    return Promise.resolve(this.#images.delete(id));
  }

  /** Every committed entry. */
  list(): Promise<ImageEntry[]> {
    return Promise.resolve([...this.#images.values()].map((image) => ({ ...image.entry })));
  }

  /** Whether a writer holds `id`. */
  isFilling(id: string): Promise<boolean> {
    return Promise.resolve(this.#writers.has(id));
  }

  /** Memory has no partial data without a live writer: nothing to remove. */
  deleteIncomplete(_id: string): Promise<boolean> {
    return Promise.resolve(false);
  }

  /** Queues `id`. */
  enqueue(id: string): Promise<void> {
    if (!this.canHold(id)) return Promise.reject(new TypeError(`Cannot queue image id "${id}"`));
    this.#queue.add(id);
    return Promise.resolve();
  }

  /** Unqueues `id`. */
  dequeue(id: string): Promise<boolean> {
    return Promise.resolve(this.#queue.delete(id));
  }

  /** Queued ids, oldest first. */
  queued(): Promise<string[]> {
    return Promise.resolve([...this.#queue]);
  }

  /** Memory keeps no invalid or stalled files. */
  clean(): Promise<CleanResult> {
    return Promise.resolve({ invalid: 0, incomplete: 0 });
  }

  /** Nothing to flush. */
  close(): Promise<void> {
    return Promise.resolve();
  }
}

/** Bytes `start` (inclusive) to `end` (exclusive) of a chunk list, copied into one array. */
function copyRange(chunks: readonly Uint8Array[], start: number, end: number): Uint8Array {
  const parts: Uint8Array[] = [];
  let offset = 0;
  let length = 0;
  for (const chunk of chunks) {
    const from = Math.max(start - offset, 0);
    const to = Math.min(end - offset, chunk.byteLength);
    if (from < to) {
      parts.push(chunk.subarray(from, to));
      length += to - from;
    }
    offset += chunk.byteLength;
    if (offset >= end) break;
  }
  const out = new Uint8Array(length);
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.byteLength;
  }
  return out;
}

function sliceStream(chunks: readonly Uint8Array[], start: number, end: number) {
  let position = start;
  return new ReadableStream<Uint8Array>({
    pull(controller) {
      if (position >= end) return controller.close();
      const bytes = copyRange(chunks, position, Math.min(end, position + READ_CHUNK));
      position += bytes.byteLength;
      controller.enqueue(bytes);
    },
  }, { highWaterMark: 0 });
}
