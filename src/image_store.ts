/**
 * The storage contract behind {@linkcode imageCache} and {@linkcode cacheApi}.
 *
 * A store holds bytes and metadata only. Routes, fills, coalescing,
 * verification, HTTP semantics and the pruning policy live once, above the
 * store, so an implementation stays small: see {@linkcode FileSystemStore} and
 * {@linkcode MemoryStore}.
 *
 * @module
 */

/** A digest algorithm the cache can verify and record. */
export type DigestAlgorithm = "md5" | "sha256" | "sha512";

/**
 * A digest as the cache records it: an algorithm and a lower-case hex value.
 *
 * @example Usage
 * ```ts
 * import type { Digest } from "hono-image-cache";
 * const digest: Digest = { algorithm: "md5", value: "d41d8cd98f00b204e9800998ecf8427e" };
 * ```
 */
export interface Digest {
  /** The algorithm that produced `value`. */
  algorithm: DigestAlgorithm;
  /** Lower-case hexadecimal digest. */
  value: string;
}

/**
 * A committed, verified cache entry.
 *
 * @example Reading an entry
 * ```ts
 * import { MemoryStore } from "hono-image-cache";
 * const store = new MemoryStore();
 * const entry = await store.get("no-such-image");
 * if (entry !== undefined) console.log(entry.size, entry.digest.value);
 * ```
 */
export interface ImageEntry {
  /** The image id, as given by the route. */
  id: string;
  /** Size of the data in bytes. */
  size: number;
  /** Digest of the data, computed while it was filled and checked against the origin's. */
  digest: Digest;
  /** Origin response headers replayed on hits (content type, `x-image-meta-*`, ...). */
  headers: Record<string, string>;
  /** When the entry was committed, in milliseconds since the epoch. */
  created: number;
  /** When the entry was last served, in milliseconds since the epoch (`created` if never). */
  lastAccessed: number;
  /** How many requests were answered from this entry. */
  hits: number;
}

/**
 * What a writer is given to commit: everything of an {@linkcode ImageEntry}
 * the fill knows.
 */
export type CommitInfo = Pick<ImageEntry, "size" | "digest" | "headers">;

/**
 * An exclusive writer for one image: the store's side of a fill.
 *
 * Only one writer per id exists at a time (across processes for stores that
 * share a directory). Bytes written are readable with {@linkcode read} at
 * once, and stay readable after `commit` or `abort` until `close`, so
 * clients that trail a fill keep reading while the entry is committed.
 *
 * @example Writing an entry by hand
 * ```ts
 * import { MemoryStore } from "hono-image-cache";
 * import assert from "node:assert/strict";
 *
 * const store = new MemoryStore();
 * const writer = await store.createWriter("img");
 * if (typeof writer === "string") throw new Error(`No writer: ${writer}`);
 * await writer.write(new TextEncoder().encode("hello"));
 * await writer.commit({
 *   size: 5,
 *   digest: { algorithm: "md5", value: "5d41402abc4b2a76b9719d911017c592" },
 *   headers: {},
 * });
 * await writer.close();
 * assert.equal((await store.get("img"))?.size, 5);
 * ```
 */
export interface ImageWriter {
  /**
   * Appends bytes. Rejects on a store fault (ENOSPC, EIO...). The store
   * must copy what it keeps: the caller may reuse `chunk`.
   */
  write(chunk: Uint8Array): Promise<void>;
  /**
   * Appends several chunks in order, as one write would (optional). With it
   * the cache hands over the chunks it received as they are; without it, it
   * gathers them into one buffer for {@linkcode write}.
   */
  writev?(chunks: readonly Uint8Array[]): Promise<void>;
  /**
   * Reads up to `length` already written bytes from `position`. Works
   * until {@linkcode close}, even after `commit` or `abort`.
   */
  read(position: number, length: number): Promise<Uint8Array>;
  /** Makes the written bytes a committed entry, durably. */
  commit(info: CommitInfo): Promise<ImageEntry>;
  /**
   * Gives the fill up: `"invalid"` keeps the bytes for inspection
   * (`invalid/<id>`), `"discard"` removes them.
   */
  abort(reason: "invalid" | "discard"): Promise<void>;
  /** Releases what {@linkcode read} needs. Idempotent. */
  close(): Promise<void>;
  /**
   * A file that holds the bytes written so far from position 0, readable by
   * another thread of this process. With it, the cache hashes a large fill
   * off the main thread by reading the file back, instead of copying each
   * byte to a worker. Used only with {@linkcode fileIdentity}. Absent: the
   * bytes are handed over in memory.
   */
  readonly path?: string;
  /**
   * The identity of the file at {@linkcode path} when the writer opened it
   * (`stat`'s `dev` and `ino`). The worker opens `path` a moment after the
   * fill starts; by then a delete may have put another fill's file under
   * that name, and the worker hashes the file only if it is still this one.
   */
  readonly fileIdentity?: { readonly dev: number; readonly ino: number };
  /**
   * Whether this writer still holds its lock. A store shared by processes
   * answers `false` once another process deleted the fill; the cache then
   * lets no new client join it. Absent: always owned.
   */
  owned?(): Promise<boolean>;
}

/**
 * How a store answers {@linkcode ImageStore.createWriter} when it cannot give
 * a writer: `"busy"` when another live writer owns the id (another process),
 * `"unsupported-id"` when the store cannot hold this id.
 */
export type WriterRefusal = "busy" | "unsupported-id";

/** Options of {@linkcode ImageStore.createWriter}. */
export interface CreateWriterOptions {
  /** Announced size, when the origin sent a `Content-Length`. */
  expectedSize?: number;
  /**
   * The digest the fill will be verified against, when known. A store shared
   * by processes records it with the fill (see {@linkcode ImageFollower.expected}).
   */
  expectedDigest?: Digest;
  /**
   * When the request that leads to this fill started (ms since the epoch).
   * A store shared by processes refuses to commit when the image was deleted
   * (see {@linkcode ImageStore.markDeleted}) at or after that time.
   * @default {now}
   */
  since?: number;
}

/**
 * Reads the partial data of a fill that another process owns, as it grows
 * (see {@linkcode ImageStore.follow}).
 *
 * @example Following another process's fill
 * ```ts
 * import { FileSystemStore } from "hono-image-cache";
 * import { mkdtemp, rm } from "node:fs/promises";
 * import { tmpdir } from "node:os";
 * import { join } from "node:path";
 * import assert from "node:assert/strict";
 *
 * const directory = await mkdtemp(join(tmpdir(), "follow-"));
 * // Two stores on one directory stand for two processes.
 * const owner = new FileSystemStore({ directory });
 * const other = new FileSystemStore({ directory });
 * const writer = await owner.createWriter("img");
 * if (typeof writer === "string") throw new Error(writer);
 * await writer.write(new TextEncoder().encode("hello"));
 * assert.equal(await other.createWriter("img"), "busy");
 * const follower = await other.follow("img");
 * assert.ok(follower);
 * assert.equal(new TextDecoder().decode(await follower.read(0, 5)), "hello");
 * assert.equal((await follower.read(5, 5)).byteLength, 0); // nothing more yet
 * assert.equal(await follower.state(), "filling");
 * await follower.close();
 * await writer.abort("discard");
 * await writer.close();
 * await owner.close();
 * await other.close();
 * await rm(directory, { recursive: true });
 * ```
 */
export interface ImageFollower {
  /**
   * What the followed fill will be verified against before it commits: its
   * announced size and digest. A follower follows only a fill that checks
   * at least what its own origin answer would be checked against (the
   * owner's commit then proves its bytes); absent: unknown, never followed
   * by a process that has a digest of its own.
   */
  readonly expected?: { size?: number; digest?: Digest };
  /**
   * Up to `length` bytes from `position`; empty when none are there (yet).
   * Bytes once read never change: the owner only appends.
   */
  read(position: number, length: number): Promise<Uint8Array>;
  /**
   * Where the followed fill is: `"filling"`, its owner alive and still
   * writing this very file; `"committed"`, complete under its name (every
   * byte is there: a read at the end is the end); `"gone"`, its owner died,
   * failed or was deleted, and no more bytes will come (what was read is
   * trustworthy only once verified).
   */
  state(): Promise<"filling" | "committed" | "gone">;
  /** Releases the file. Idempotent. */
  close(): Promise<void>;
}

/** What {@linkcode ImageStore.clean} removed. */
export interface CleanResult {
  /** Files removed from `invalid/`. */
  invalid: number;
  /** Files removed from `incomplete/` (dead owner or stalled). */
  incomplete: number;
}

/**
 * The storage interface. Implement it to keep images somewhere else; the
 * cache's logic stays the same.
 *
 * Ids are data: a store must never use an id as a raw path. `canHold(id)`
 * says whether the id can be stored at all (too long, NUL, traversal...).
 *
 * @example A store is handed to the middleware
 * ```ts
 * import { Hono } from "hono";
 * import { imageCache, MemoryStore, type ImageStore } from "hono-image-cache";
 *
 * const store: ImageStore = new MemoryStore({ maxSize: 2 ** 30 });
 * const app = new Hono();
 * app.use(imageCache({ store }));
 * ```
 */
export interface ImageStore {
  /** Bytes of committed data the cache may hold. */
  readonly maxSize: number;
  /** Whether this store can hold an image of this id. */
  canHold(id: string): boolean;
  /**
   * The committed entry for `id`, after checking that its data is intact
   * (present, and of the recorded size). A damaged entry is removed and
   * `undefined` returned.
   */
  get(id: string): Promise<ImageEntry | undefined>;
  /**
   * A body for the bytes `start` to `end` inclusive of a committed entry, in
   * the fastest form the runtime can send (a `Blob` on Bun, a stream
   * elsewhere). Rejects when the data is gone.
   */
  body(entry: ImageEntry, start: number, end: number): Promise<ReadableStream<Uint8Array> | Blob>;
  /** Counts one request answered from the entry and updates its last access. */
  recordHit(id: string): void;
  /** An exclusive writer for `id`, or why none can be had. Rejects on a store fault. */
  createWriter(
    id: string,
    options?: CreateWriterOptions,
  ): Promise<ImageWriter | WriterRefusal>;
  /** Removes a committed entry. Resolves `true` when there was one. */
  delete(id: string): Promise<boolean>;
  /** Every committed entry. */
  list(): Promise<ImageEntry[]>;
  /** Whether a writer (any process) is filling `id` right now. */
  isFilling(id: string): Promise<boolean>;
  /**
   * Removes the partial data of `id`, even a live fill's (that fill then
   * cannot commit: deletion wins). Resolves `true` when there was some.
   */
  deleteIncomplete(id: string): Promise<boolean>;
  /** Ids with partial data (fills under way, in any process, or left by dead ones). */
  listIncomplete(): Promise<string[]>;
  /**
   * Records that `id` (or, without an id, every image) was deleted now, so
   * that a fill another process started before cannot commit it. Only
   * stores shared by processes need it.
   */
  markDeleted?(id?: string): Promise<void>;
  /**
   * Whether `id` (or every image) was marked deleted at or after `since`
   * (milliseconds since the epoch), by any process: a request that waited
   * on a fill which stores nothing here checks it before joining, so that a
   * DELETE elsewhere wins over an answer asked for before it. Pairs with
   * {@linkcode ImageStore.markDeleted}.
   */
  deletedSince?(id: string, since: number): Promise<boolean>;
  /**
   * Reads the fill of `id` that another process owns (when `createWriter`
   * answered `"busy"`), or `undefined` when there is none to read. The
   * cache then serves its own clients from that file instead of a second
   * origin download, with the origin's answer held in reserve. Only stores
   * shared by processes need it.
   */
  follow?(id: string): Promise<ImageFollower | undefined>;
  /** Adds `id` to the prefetch queue (idempotent). */
  enqueue(id: string): Promise<void>;
  /** Removes `id` from the queue. Resolves `true` when it was queued. */
  dequeue(id: string): Promise<boolean>;
  /** Queued ids, oldest first. */
  queued(): Promise<string[]>;
  /** Removes invalid files and partial files whose owner is gone or that stalled. */
  clean(): Promise<CleanResult>;
  /** Flushes what is pending (hit counts) and stops timers. */
  close(): Promise<void>;
}
