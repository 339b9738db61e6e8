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

/** Bytes as a list of chunks, with each chunk's offset for binary search. */
interface Chunks {
  parts: Uint8Array[];
  starts: number[];
}

interface StoredImage {
  entry: ImageEntry;
  chunks: Chunks;
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
    const chunks: Chunks = { parts: [], starts: [] };
    let size = 0;
    let settled = false;
    const settle = () => {
      if (settled) throw new Error(`Writer for "${id}" already committed or aborted`);
      settled = true;
      this.#writers.delete(id);
    };
    const append = (chunk: Uint8Array) => {
      // Copy: the caller's buffer may be reused or transferred.
      chunks.starts.push(size);
      chunks.parts.push(chunk.slice());
      size += chunk.byteLength;
    };
    const writer: ImageWriter = {
      write: (chunk) => {
        if (settled) return Promise.reject(new Error(`Writer for "${id}" is closed`));
        append(chunk);
        return Promise.resolve();
      },
      writev: (list) => {
        if (settled) return Promise.reject(new Error(`Writer for "${id}" is closed`));
        for (const chunk of list) append(chunk);
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

  /** Ids being written. */
  listIncomplete(): Promise<string[]> {
    return Promise.resolve([...this.#writers]);
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

/** Bytes `start` (inclusive) to `end` (exclusive) of chunks, copied into one array. */
function copyRange({ parts, starts }: Chunks, start: number, end: number): Uint8Array {
  // Binary search for the chunk holding `start`.
  let index = 0;
  let high = starts.length - 1;
  while (index < high) {
    const mid = (index + high + 1) >> 1;
    if (starts[mid] <= start) index = mid;
    else high = mid - 1;
  }
  const out = new Uint8Array(Math.max(0, end - start));
  let at = 0;
  for (; index < parts.length && at < out.length; index++) {
    const from = Math.max(start - starts[index], 0);
    const to = Math.min(end - starts[index], parts[index].byteLength);
    if (from >= to) continue;
    out.set(parts[index].subarray(from, to), at);
    at += to - from;
  }
  return at === out.length ? out : out.subarray(0, at);
}

function sliceStream(chunks: Chunks, start: number, end: number) {
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
