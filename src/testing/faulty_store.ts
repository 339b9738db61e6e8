/**
 * A store wrapper that injects faults, to test that the cache never fails a
 * request the origin alone would have served.
 *
 * @module
 */
import type {
  CleanResult,
  CreateWriterOptions,
  ImageEntry,
  ImageFollower,
  ImageStore,
  ImageWriter,
  WriterRefusal,
} from "../image_store.ts";

/** Faults to inject; change them at any time. */
export interface Faults {
  /** Writes fail once this many bytes were written by one writer. */
  failWriteAfter?: number;
  /** The error code writes fail with. @default {"ENOSPC"} */
  writeErrorCode?: string;
  /** `createWriter` rejects. */
  failCreateWriter?: boolean;
  /** `commit` rejects. */
  failCommit?: boolean;
  /** `get` rejects. */
  failGet?: boolean;
  /** `body` rejects. */
  failBody?: boolean;
  /** Writer reads (trailing clients) and follower reads reject. */
  failRead?: boolean;
  /** Each write waits this many milliseconds first: a slow or busy disk. */
  writeDelay?: number;
}

/** Options of {@linkcode FaultyStore}. */
export interface FaultyStoreOptions {
  /** The faults to start with. @default {{}} */
  faults?: Faults;
}

function fault(code: string, what: string): Error {
  return Object.assign(new Error(`${code}: injected fault in ${what}`), { code });
}

/**
 * Wraps a store and fails its operations on demand. `opens` counts data
 * opens (`body` calls), so a test can prove a `HEAD` read no data.
 *
 * @example A full disk
 * ```ts
 * import { Hono } from "hono";
 * import { imageCache } from "hono-image-cache";
 * import { FaultyStore, MemoryStore } from "hono-image-cache/testing";
 * import assert from "node:assert/strict";
 *
 * const store = new FaultyStore(new MemoryStore(), { faults: { failWriteAfter: 0 } });
 * const app = new Hono();
 * app.use(imageCache({ store, onError: () => {} }));
 * app.get("/v2/images/:id/file", (c) => c.body("all the bytes"));
 * const res = await app.request("/v2/images/x/file");
 * assert.equal(await res.text(), "all the bytes");
 * assert.equal(await store.get("x"), undefined);
 * ```
 */
export class FaultyStore implements ImageStore {
  /** The faults in force. */
  faults: Faults;
  /** How many times `body` was called. */
  opens = 0;
  #inner: ImageStore;

  /**
   * @param inner The store to wrap.
   * @param options The faults to start with.
   */
  constructor(inner: ImageStore, options: FaultyStoreOptions = {}) {
    this.#inner = inner;
    this.faults = options.faults ?? {};
  }

  /** The wrapped store's `maxSize`. */
  get maxSize(): number {
    return this.#inner.maxSize;
  }

  /** As the wrapped store. */
  canHold(id: string): boolean {
    return this.#inner.canHold(id);
  }

  /** As the wrapped store, or fails. */
  get(id: string): Promise<ImageEntry | undefined> {
    if (this.faults.failGet) return Promise.reject(fault("EIO", "get"));
    return this.#inner.get(id);
  }

  /** As the wrapped store, counted, or fails. */
  body(entry: ImageEntry, start: number, end: number): Promise<ReadableStream<Uint8Array> | Blob> {
    this.opens++;
    if (this.faults.failBody) return Promise.reject(fault("EIO", "body"));
    return this.#inner.body(entry, start, end);
  }

  /** As the wrapped store. */
  recordHit(id: string): void {
    this.#inner.recordHit(id);
  }

  /** A writer of the wrapped store that fails as told. */
  async createWriter(
    id: string,
    options?: CreateWriterOptions,
  ): Promise<ImageWriter | WriterRefusal> {
    if (this.faults.failCreateWriter) throw fault("EACCES", "createWriter");
    const inner = await this.#inner.createWriter(id, options);
    if (typeof inner === "string") return inner;
    let written = 0;
    const faults = () => this.faults;
    return {
      path: inner.path,
      fileIdentity: inner.fileIdentity,
      async write(chunk) {
        const delay = faults().writeDelay ?? 0;
        if (delay > 0) await new Promise((resolve) => setTimeout(resolve, delay));
        const limit = faults().failWriteAfter;
        if (limit !== undefined && written + chunk.byteLength > limit) {
          throw fault(faults().writeErrorCode ?? "ENOSPC", "write");
        }
        written += chunk.byteLength;
        await inner.write(chunk);
      },
      read(position, length) {
        if (faults().failRead) return Promise.reject(fault("EIO", "read"));
        return inner.read(position, length);
      },
      commit(info) {
        if (faults().failCommit) {
          return inner.abort("discard").then(() => Promise.reject(fault("EIO", "commit")));
        }
        return inner.commit(info);
      },
      abort: (reason) => inner.abort(reason),
      close: () => inner.close(),
      owned: () => inner.owned?.() ?? Promise.resolve(true),
    };
  }

  /** As the wrapped store. */
  delete(id: string): Promise<boolean> {
    return this.#inner.delete(id);
  }
  /** As the wrapped store. */
  list(): Promise<ImageEntry[]> {
    return this.#inner.list();
  }
  /** As the wrapped store. */
  isFilling(id: string): Promise<boolean> {
    return this.#inner.isFilling(id);
  }
  /** As the wrapped store. */
  deleteIncomplete(id: string): Promise<boolean> {
    return this.#inner.deleteIncomplete(id);
  }
  /** As the wrapped store. */
  markDeleted(id?: string): Promise<void> {
    return this.#inner.markDeleted?.(id) ?? Promise.resolve();
  }
  /** As the wrapped store. */
  deletedSince(id: string, since: number): Promise<boolean> {
    return this.#inner.deletedSince?.(id, since) ?? Promise.resolve(false);
  }
  /** As the wrapped store; the follower's reads fail with `failRead`. */
  async follow(id: string): Promise<ImageFollower | undefined> {
    const follower = await this.#inner.follow?.(id);
    if (follower === undefined) return undefined;
    return {
      expected: follower.expected,
      read: (position, length) =>
        this.faults.failRead
          ? Promise.reject(fault("EIO", "read"))
          : follower.read(position, length),
      state: () => follower.state(),
      close: () => follower.close(),
    };
  }
  /** As the wrapped store. */
  listIncomplete(): Promise<string[]> {
    return this.#inner.listIncomplete();
  }
  /** As the wrapped store. */
  enqueue(id: string): Promise<void> {
    return this.#inner.enqueue(id);
  }
  /** As the wrapped store. */
  dequeue(id: string): Promise<boolean> {
    return this.#inner.dequeue(id);
  }
  /** As the wrapped store. */
  queued(): Promise<string[]> {
    return this.#inner.queued();
  }
  /** As the wrapped store. */
  clean(): Promise<CleanResult> {
    return this.#inner.clean();
  }
  /** As the wrapped store. */
  close(): Promise<void> {
    return this.#inner.close();
  }
}
