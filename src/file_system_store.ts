/**
 * A {@linkcode ImageStore} on the local file system, with Glance's layout.
 *
 * @module
 */
import { randomUUID } from "node:crypto";
import { statSync } from "node:fs";
import {
  mkdir,
  open,
  readdir,
  readFile,
  rename,
  stat,
  statfs,
  utimes,
  writeFile,
} from "node:fs/promises";
import { join } from "node:path";
import process from "node:process";
import { fileNameForId, idForFileName } from "./_ids.ts";
import { checkSize } from "./_options.ts";
import { unrefTimer } from "./_runtime.ts";
import { META_SUFFIX, parseEntry } from "./_fs/entry.ts";
import { fileBody } from "./_fs/file_body.ts";
import {
  createOwnerFile,
  errorCode,
  HEARTBEAT_INTERVAL,
  HOST,
  isNotFound,
  LIVE_TOKENS,
  ownerAlive,
  type OwnerRecord,
  parseOwner,
  pidAlive,
  removeIfPresent,
  syncDirectory,
  writeFileAtomic,
} from "./_fs/files.ts";
import { fileFollower } from "./_fs/follower.ts";
import { FileWriter, type WriterLock } from "./_fs/writer.ts";
import { isDigestAlgorithm } from "./digest.ts";
import type {
  CleanResult,
  CommitInfo,
  CreateWriterOptions,
  Digest,
  ImageEntry,
  ImageFollower,
  ImageStore,
  ImageWriter,
  WriterRefusal,
} from "./image_store.ts";

/** Options of {@linkcode FileSystemStore}. */
export interface FileSystemStoreOptions {
  /** The cache directory; created when missing. */
  directory: string;
  /**
   * Bytes of data the cache may hold.
   * @default {10737418240} (10 GiB)
   */
  maxSize?: number;
  /**
   * Milliseconds after which a partial file that no live fill owns is
   * removed by `clean()`.
   * @default {86400000} (24 hours)
   */
  stallTime?: number;
  /**
   * Bytes to keep free on the disk: fills evict least-recently-used
   * entries, or pass through uncached, rather than go below it (measured
   * with `statfs`; skipped where the runtime cannot tell).
   * @default {0}
   */
  minFree?: number;
  /**
   * Largest image, in bytes, the cache stores; a larger one passes through
   * uncached (`Cache-Status: ...; detail=too-large`).
   * @default {maxSize}
   */
  maxObjectSize?: number;
}

const OWNER_SUFFIX = ".owner";
/** The tombstone of a clear: a name no id maps to. */
const ALL_DELETED = ".all";
/** Tombstones older than this are swept: no miss waits that long for its origin. */
const TOMBSTONE_AGE = 3_600_000;
const HIT_FLUSH_DELAY = 2_000;

interface KnownEntry {
  entry: ImageEntry;
  /** Identity of the data file the entry was read for: a replaced file is re-read. */
  ino: number;
  mtimeMs: number;
}

/**
 * Keeps images as files, in Glance's layout under `directory`:
 *
 * - `<id>`: committed data, with its metadata in `<id>.json` beside it;
 * - `incomplete/<id>`: a fill under way, owned by the process named in
 *   `incomplete/<id>.owner` (created exclusively: the fill lock);
 * - `invalid/<id>`: a failed fill, kept for inspection;
 * - `queue/<id>`: a queued image.
 *
 * An id of `[A-Za-z0-9_-]` is stored under its own name; any other id under
 * an encoded name; an id that cannot be held safely is refused. Several
 * processes may share one directory. Partial files of dead owners are swept
 * when the store starts.
 *
 * @example Caching on disk
 * ```ts
 * import { Hono } from "hono";
 * import { FileSystemStore, imageCache } from "hono-image-cache";
 * import { mkdtemp, rm } from "node:fs/promises";
 * import { tmpdir } from "node:os";
 * import { join } from "node:path";
 * import assert from "node:assert/strict";
 *
 * const directory = await mkdtemp(join(tmpdir(), "image-cache-"));
 * const store = new FileSystemStore({ directory, maxSize: 2 ** 30 });
 * try {
 *   const app = new Hono();
 *   app.use(imageCache({ store }));
 *   app.get("/v2/images/:id/file", (c) => c.body("image bytes"));
 *   await (await app.request("/v2/images/abc/file")).text();
 *   const hit = await app.request("/v2/images/abc/file");
 *   assert.equal(await hit.text(), "image bytes");
 *   assert.equal(hit.headers.get("cache-status"), "hono-image-cache; hit");
 * } finally {
 *   await store.close();
 *   await rm(directory, { recursive: true });
 * }
 * ```
 */
export class FileSystemStore implements ImageStore {
  /** Bytes of data the cache may hold. */
  readonly maxSize: number;
  /** Milliseconds after which an unowned partial file is stale. */
  readonly stallTime: number;
  /** Bytes to keep free on the disk. */
  readonly minFree: number;
  /** Largest image, in bytes, the cache stores. */
  readonly maxObjectSize: number;
  /** The cache directory. */
  readonly directory: string;
  #token = randomUUID();
  #ready: Promise<void> | undefined;
  #known = new Map<string, KnownEntry>();
  #dirtyHits = new Set<string>();
  #flushTimer: ReturnType<typeof setTimeout> | undefined;
  /** The hit flushes, in order (see `#flushHits`). Never rejects. */
  #flushes: Promise<void> = Promise.resolve();
  #queueSequence = 0;
  #closed = false;

  /**
   * @param options Where and how much to cache.
   * @throws {TypeError} When `directory` is not a non-empty string.
   * @throws {RangeError} When a size or time is not a non-negative number.
   */
  constructor(options: FileSystemStoreOptions) {
    const directory = options?.directory;
    if (typeof directory !== "string" || directory === "") {
      throw new TypeError(
        `Cannot create FileSystemStore: "directory" must be a non-empty string, received ${
          JSON.stringify(directory)
        }`,
      );
    }
    this.directory = directory;
    this.maxSize = checkSize("FileSystemStore", "maxSize", options.maxSize, 10 * 2 ** 30);
    this.stallTime = checkSize("FileSystemStore", "stallTime", options.stallTime, 86_400_000);
    this.minFree = checkSize("FileSystemStore", "minFree", options.minFree, 0);
    this.maxObjectSize = checkSize(
      "FileSystemStore",
      "maxObjectSize",
      options.maxObjectSize,
      this.maxSize,
    );
    LIVE_TOKENS.add(this.#token);
    // Start now, so dead owners' leftovers go at start, not at the first request.
    this.#init().catch(() => {});
  }

  /** Creates the layout and sweeps partial files of dead owners. Retried after a failure. */
  #init(): Promise<void> {
    this.#ready ??= (async () => {
      for (const sub of ["incomplete", "invalid", "queue", "deleted"]) {
        await mkdir(join(this.directory, sub), { recursive: true });
      }
      await this.#sweepIncomplete(false);
      await this.#sweepTemporary();
    })().catch((error) => {
      this.#ready = undefined;
      throw error;
    });
    return this.#ready;
  }

  #path(...parts: string[]): string {
    return join(this.directory, ...parts);
  }

  /** Whether this store can hold an image of this id. */
  canHold(id: string): boolean {
    return fileNameForId(id) !== undefined;
  }

  /**
   * Bytes free for this process on the file system of `directory` (what
   * `minFree` keeps), or `undefined` when the runtime cannot tell.
   */
  async freeSpace(): Promise<number | undefined> {
    if (typeof statfs !== "function") return undefined;
    try {
      const info = await statfs(this.directory);
      return Number(info.bavail) * Number(info.bsize);
    } catch {
      return undefined;
    }
  }

  /** The committed entry for `id`, checked against its data file. */
  async get(id: string): Promise<ImageEntry | undefined> {
    const name = fileNameForId(id);
    if (name === undefined) return undefined;
    await this.#init();
    return this.#load(id, name);
  }

  async #load(id: string, name: string): Promise<ImageEntry | undefined> {
    let info;
    try {
      // Synchronous on purpose: one local stat per hit costs microseconds,
      // the promise machinery around an async one 15-45 µs of CPU (measured:
      // +45-70% small-hit req/s on Bun, +5-35% on Deno and Node). A cache
      // directory on a slow network file system would pay for it.
      info = statSync(this.#path(name));
    } catch (error) {
      if (!isNotFound(error)) throw error;
      this.#known.delete(id);
      return undefined;
    }
    if (!info.isFile()) return undefined; // Never judge, let alone remove, what is not a data file.
    let known = this.#known.get(id);
    if (known === undefined || known.ino !== info.ino || known.mtimeMs !== info.mtimeMs) {
      const entry = await this.#readMeta(id, name);
      known = entry && { entry, ino: info.ino, mtimeMs: info.mtimeMs };
    }
    if (known === undefined || known.entry.size !== info.size) {
      // Data without metadata, or of the wrong size: damaged, never served.
      this.#known.delete(id);
      await this.#removeEntry(name);
      return undefined;
    }
    this.#known.set(id, known);
    return { ...known.entry, headers: { ...known.entry.headers } };
  }

  async #readMeta(id: string, name: string): Promise<ImageEntry | undefined> {
    let text;
    try {
      text = await readFile(this.#path(name + META_SUFFIX), "utf8");
    } catch (error) {
      if (isNotFound(error)) return undefined;
      throw error;
    }
    return parseEntry(id, text);
  }

  async #removeEntry(name: string): Promise<boolean> {
    const removed = await removeIfPresent(this.#path(name));
    await removeIfPresent(this.#path(name + META_SUFFIX));
    return removed;
  }

  /** A body of bytes `start` to `end` (inclusive), the runtime's fastest. */
  body(entry: ImageEntry, start: number, end: number): Promise<ReadableStream<Uint8Array> | Blob> {
    const name = fileNameForId(entry.id);
    if (name === undefined) return Promise.reject(new TypeError(`Unsupported id "${entry.id}"`));
    return fileBody(this.#path(name), start, end, entry.size);
  }

  /** Counts a hit; written to the metadata file shortly after, or at `close()`. */
  recordHit(id: string): void {
    const known = this.#known.get(id);
    if (known === undefined) return;
    known.entry.hits++;
    known.entry.lastAccessed = Date.now();
    this.#dirtyHits.add(id);
    if (this.#flushTimer === undefined && !this.#closed) {
      this.#flushTimer = setTimeout(() => {
        this.#flushTimer = undefined;
        this.#flushHits().catch(() => {});
      }, HIT_FLUSH_DELAY);
      unrefTimer(this.#flushTimer);
    }
  }

  /**
   * Writes the hit counts recorded since the last flush. Flushes run one
   * after the other: `close()` waits for one a timer started, so a process
   * that exits once its store is closed loses no count.
   */
  #flushHits(): Promise<void> {
    const run = this.#flushes.then(() => this.#writeHits());
    this.#flushes = run.catch(() => {});
    return run;
  }

  async #writeHits(): Promise<void> {
    const ids = [...this.#dirtyHits];
    this.#dirtyHits.clear();
    for (const id of ids) {
      const known = this.#known.get(id);
      const name = fileNameForId(id);
      if (known === undefined || name === undefined) continue;
      try {
        // Only where the entry still exists: a flush must not resurrect a deleted entry.
        await stat(this.#path(name));
        await writeFileAtomic(this.#path(name + META_SUFFIX), JSON.stringify(known.entry));
      } catch {
        // Hit counts are advisory; a failed write loses a few counts, nothing else.
      }
    }
  }

  /** An exclusive writer for `id`: `"busy"` while another live process fills it. */
  async createWriter(
    id: string,
    options?: CreateWriterOptions,
  ): Promise<ImageWriter | WriterRefusal> {
    const name = fileNameForId(id);
    if (name === undefined) return "unsupported-id";
    await this.#init();
    const dataPath = this.#path("incomplete", name);
    const ownerPath = dataPath + OWNER_SUFFIX;
    const owner: OwnerRecord = {
      pid: process.pid,
      host: HOST,
      token: this.#token,
      started: Date.now(),
      size: options?.expectedSize,
      digest: options?.expectedDigest && {
        algorithm: options.expectedDigest.algorithm,
        value: options.expectedDigest.value.toLowerCase(),
      },
    };
    for (let attempt = 0;; attempt++) {
      try {
        await createOwnerFile(ownerPath, owner);
        break;
      } catch (error) {
        if (errorCode(error) !== "EEXIST" || attempt > 0) {
          if (errorCode(error) === "EEXIST") return "busy";
          throw error;
        }
        if (await this.#ownerLive(name)) return "busy";
        // The owner is gone: take its leftovers away and try once more.
        await removeIfPresent(dataPath);
        await removeIfPresent(ownerPath);
      }
    }
    let handle, reader, info;
    try {
      handle = await open(dataPath, "w");
      reader = await open(dataPath, "r");
      info = await handle.stat();
    } catch (error) {
      await reader?.close().catch(() => {});
      await handle?.close().catch(() => {});
      await removeIfPresent(dataPath).catch(() => {});
      await removeIfPresent(ownerPath).catch(() => {});
      throw error;
    }
    return new FileWriter(
      id,
      dataPath,
      handle,
      reader,
      this.#lockOf(id, name, owner, options?.since),
      { dev: info.dev, ino: info.ino },
    );
  }

  async #ownerLive(name: string): Promise<boolean> {
    const ownerPath = this.#path("incomplete", name + OWNER_SUFFIX);
    let text, info;
    try {
      [text, info] = await Promise.all([readFile(ownerPath, "utf8"), stat(ownerPath)]);
    } catch (error) {
      if (isNotFound(error)) return false;
      throw error;
    }
    const record = parseOwner(text);
    // A record being written right now is empty for an instant: judge it by age.
    if (record === undefined) return Date.now() - info.mtimeMs < HEARTBEAT_INTERVAL * 2;
    return ownerAlive(record, info.mtimeMs);
  }

  /**
   * Reads the fill of `id` that another process owns (`incomplete/<id>`),
   * as it grows; `undefined` when there is none. The open file outlives a
   * rename, so a commit does not interrupt the reader.
   */
  async follow(id: string): Promise<ImageFollower | undefined> {
    const name = fileNameForId(id);
    if (name === undefined) return undefined;
    await this.#init();
    const ownerPath = this.#path("incomplete", name + OWNER_SUFFIX);
    const record = parseOwner(await readFile(ownerPath, "utf8").catch(() => ""));
    return await fileFollower(
      this.#path("incomplete", name),
      this.#path(name),
      () => this.#ownerLive(name),
      record && expectationOf(record),
    );
  }

  /**
   * The capabilities of the writer that took the lock `owner` of `id`: each
   * acts only while the lock is still the one it took.
   */
  #lockOf(id: string, name: string, owner: OwnerRecord, since = owner.started): WriterLock {
    const ownerPath = this.#path("incomplete", name + OWNER_SUFFIX);
    const owns = async () => {
      const current = parseOwner(await readFile(ownerPath, "utf8").catch(() => ""));
      return current?.token === this.#token && current.started === owner.started;
    };
    return {
      owns,
      deleted: () => this.#deletedSince(name, since),
      commit: (info) => this.#commit(id, name, since, info, owns),
      abort: async (reason) => {
        if (!(await owns())) return; // Someone else removed it and may own the name now.
        const dataPath = this.#path("incomplete", name);
        if (reason === "invalid") {
          await rename(dataPath, this.#path("invalid", name)).catch(() =>
            removeIfPresent(dataPath)
          );
        } else {
          await removeIfPresent(dataPath);
        }
        await removeIfPresent(ownerPath);
      },
      heartbeat: async () => {
        const now = new Date();
        await utimes(ownerPath, now, now);
      },
    };
  }

  async #commit(
    id: string,
    name: string,
    since: number,
    info: CommitInfo,
    owns: () => Promise<boolean>,
  ): Promise<ImageEntry> {
    const now = Date.now();
    const entry: ImageEntry = {
      id,
      size: info.size,
      digest: info.digest,
      headers: info.headers,
      created: now,
      lastAccessed: now,
      hits: 0,
    };
    const ownerPath = this.#path("incomplete", name + OWNER_SUFFIX);
    // Deletion wins: if the lock is no longer ours, someone removed this fill;
    // if a tombstone is as new as the request behind it, someone deleted the
    // image (or cleared the cache) while it waited for the origin.
    if (!(await owns())) {
      throw new Error(`Fill of "${id}" lost its lock (deleted while filling)`);
    }
    if (await this.#deletedSince(name, since)) {
      throw new Error(`Fill of "${id}" was deleted while it waited for the origin`);
    }
    await writeFileAtomic(this.#path(name + META_SUFFIX), JSON.stringify(entry));
    await rename(this.#path("incomplete", name), this.#path(name));
    // Checked again after the rename: a DELETE in another process that wrote its
    // tombstone between the check above and the rename may have listed the
    // directory before the entry appeared. Either it sees the entry, or this does.
    if (await this.#deletedSince(name, since)) {
      await this.#removeEntry(name);
      await removeIfPresent(ownerPath);
      throw new Error(`Fill of "${id}" was deleted while it committed`);
    }
    await syncDirectory(this.directory);
    await removeIfPresent(ownerPath);
    await removeIfPresent(this.#path("queue", name)).catch(() => {});
    const data = await stat(this.#path(name));
    this.#known.set(id, { entry, ino: data.ino, mtimeMs: data.mtimeMs });
    return { ...entry };
  }
  async #deletedSince(name: string, since: number): Promise<boolean> {
    for (const file of [name, ALL_DELETED]) {
      const info = await stat(this.#path("deleted", file)).catch(() => undefined);
      if (info !== undefined && info.mtimeMs >= since) return true;
    }
    return false;
  }

  /**
   * Leaves a tombstone (`deleted/<id>`, or `deleted/.all` for every image)
   * so that a fill another process started before now cannot commit.
   * Tombstones older than an hour are swept by `clean()`.
   */
  async markDeleted(id?: string): Promise<void> {
    const name = id === undefined ? ALL_DELETED : fileNameForId(id);
    if (name === undefined) return;
    await this.#init();
    const path = this.#path("deleted", name);
    await writeFile(path, "");
    const now = new Date();
    await utimes(path, now, now);
    // Fills are refused when their request started at or before the tombstone's
    // millisecond. Return only once the clock has moved past it, so that a request
    // that starts after this DELETE has answered is never mistaken for an older one.
    for (let spins = 0; Date.now() <= now.getTime() && spins < 50; spins++) {
      await new Promise((resolve) => setTimeout(resolve, 1));
    }
  }

  /** Whether `id` (or every image) was marked deleted at or after `since` (ms). */
  async deletedSince(id: string, since: number): Promise<boolean> {
    const name = fileNameForId(id);
    if (name === undefined) return false;
    await this.#init();
    return await this.#deletedSince(name, since);
  }

  /** Removes a committed entry. */
  async delete(id: string): Promise<boolean> {
    const name = fileNameForId(id);
    if (name === undefined) return false;
    await this.#init();
    this.#known.delete(id);
    this.#dirtyHits.delete(id);
    return await this.#removeEntry(name);
  }

  /** Every committed, intact entry. */
  async list(): Promise<ImageEntry[]> {
    await this.#init();
    const entries: ImageEntry[] = [];
    for (const name of await readdir(this.directory)) {
      const id = idForFileName(name);
      if (id === undefined) continue;
      const entry = await this.#load(id, name).catch(() => undefined);
      if (entry !== undefined) entries.push(entry);
    }
    return entries;
  }

  /** Whether a live writer (any process) holds `id`. */
  async isFilling(id: string): Promise<boolean> {
    const name = fileNameForId(id);
    if (name === undefined) return false;
    await this.#init();
    return await this.#ownerLive(name);
  }

  /**
   * Removes the partial data of `id`, even a live fill's: that fill then
   * cannot commit (its lock is gone), so deletion wins across processes.
   */
  async deleteIncomplete(id: string): Promise<boolean> {
    const name = fileNameForId(id);
    if (name === undefined) return false;
    await this.#init();
    const data = await removeIfPresent(this.#path("incomplete", name));
    const owner = await removeIfPresent(this.#path("incomplete", name + OWNER_SUFFIX));
    return data || owner;
  }

  /** Ids with partial data in `incomplete/`. */
  async listIncomplete(): Promise<string[]> {
    await this.#init();
    const ids = new Set<string>();
    for (const file of await readdir(this.#path("incomplete"))) {
      const id = idForFileName(
        file.endsWith(OWNER_SUFFIX) ? file.slice(0, -OWNER_SUFFIX.length) : file,
      );
      if (id !== undefined) ids.add(id);
    }
    return [...ids];
  }

  /** Queues `id` (a `queue/<id>` marker holding the time it was queued). */
  async enqueue(id: string): Promise<void> {
    const name = fileNameForId(id);
    if (name === undefined) throw new TypeError(`Cannot queue image id ${JSON.stringify(id)}`);
    await this.#init();
    const stamp = `${Date.now()} ${String(++this.#queueSequence).padStart(12, "0")}`;
    try {
      await writeFile(this.#path("queue", name), stamp, { flag: "wx" });
    } catch (error) {
      if (errorCode(error) !== "EEXIST") throw error;
    }
  }

  /** Unqueues `id`. */
  async dequeue(id: string): Promise<boolean> {
    const name = fileNameForId(id);
    if (name === undefined) return false;
    await this.#init();
    return await removeIfPresent(this.#path("queue", name));
  }

  /** Queued ids, in the order they were queued. */
  async queued(): Promise<string[]> {
    await this.#init();
    const marked: { id: string; stamp: string }[] = [];
    for (const name of await readdir(this.#path("queue"))) {
      const id = idForFileName(name);
      if (id === undefined) continue;
      const stamp = await readFile(this.#path("queue", name), "utf8").catch(() => undefined);
      if (stamp !== undefined) marked.push({ id, stamp });
    }
    return marked.sort((a, b) => compareStamps(a.stamp, b.stamp)).map((m) => m.id);
  }

  /**
   * Removes `invalid/` files, and `incomplete/` files whose owner is dead,
   * or that have no owner record and are older than `stallTime`. A live
   * fill's file is never touched.
   */
  async clean(): Promise<CleanResult> {
    await this.#init();
    let invalid = 0;
    for (const name of await readdir(this.#path("invalid"))) {
      if (await removeIfPresent(this.#path("invalid", name)).catch(() => false)) invalid++;
    }
    const incomplete = await this.#sweepIncomplete(true);
    await this.#sweepTemporary();
    await this.#sweepTombstones();
    return { invalid, incomplete };
  }

  async #sweepTombstones(): Promise<void> {
    const now = Date.now();
    for (const file of await readdir(this.#path("deleted"))) {
      const path = this.#path("deleted", file);
      const info = await stat(path).catch(() => undefined);
      if (info !== undefined && now - info.mtimeMs > TOMBSTONE_AGE) {
        await removeIfPresent(path).catch(() => {});
      }
    }
  }

  /**
   * Removes metadata temporary files (`<name>.json.<pid>-<n>.tmp`) that a
   * killed process left: its pid is gone, or the file is over a minute old.
   */
  async #sweepTemporary(): Promise<void> {
    const now = Date.now();
    for (const file of await readdir(this.directory)) {
      const match = /\.(\d+)-\d+\.tmp$/.exec(file);
      if (match === null) continue;
      const path = this.#path(file);
      try {
        const pid = Number(match[1]);
        const dead = pid !== process.pid && !pidAlive(pid);
        if (dead || now - (await stat(path)).mtimeMs > 60_000) await removeIfPresent(path);
      } catch {
        // Judged again at the next sweep.
      }
    }
  }

  /** Removes partial files of dead owners; with `byAge`, also unowned files older than `stallTime`. */
  async #sweepIncomplete(byAge: boolean): Promise<number> {
    let removed = 0;
    const dir = this.#path("incomplete");
    const names = await readdir(dir);
    const now = Date.now();
    for (const file of names) {
      if (file.endsWith(".tmp")) continue;
      const name = file.endsWith(OWNER_SUFFIX) ? file.slice(0, -OWNER_SUFFIX.length) : file;
      if (file !== name && names.includes(name)) continue; // Judged with its data file.
      try {
        const hasOwner = names.includes(name + OWNER_SUFFIX);
        let stale;
        if (hasOwner) {
          stale = !(await this.#ownerLive(name));
        } else {
          const info = await stat(join(dir, name));
          stale = byAge && now - info.mtimeMs > this.stallTime;
        }
        if (!stale) continue;
        const data = await removeIfPresent(join(dir, name));
        await removeIfPresent(join(dir, name + OWNER_SUFFIX));
        if (data) removed++;
      } catch {
        // One file that cannot be judged or removed does not stop the sweep.
      }
    }
    return removed;
  }

  /**
   * Writes pending hit counts and stops timers. Fills this instance still
   * owns count as dead from now on (another instance may take them over).
   */
  async close(): Promise<void> {
    this.#closed = true;
    // Let a set-up under way finish, so nothing is written after close resolves.
    await this.#ready?.catch(() => {});
    if (this.#flushTimer !== undefined) clearTimeout(this.#flushTimer);
    this.#flushTimer = undefined;
    LIVE_TOKENS.delete(this.#token);
    await this.#flushHits();
  }
}

/** What an owner record says its fill will be verified against (damaged fields dropped). */
function expectationOf(record: OwnerRecord): { size?: number; digest?: Digest } {
  const expected: { size?: number; digest?: Digest } = {};
  if (Number.isSafeInteger(record.size) && record.size! >= 0) expected.size = record.size;
  const digest = record.digest;
  if (
    isDigestAlgorithm(digest?.algorithm) && typeof digest.value === "string" &&
    /^[0-9a-f]+$/.test(digest.value)
  ) expected.digest = { algorithm: digest.algorithm, value: digest.value };
  return expected;
}

function compareStamps(a: string, b: string): number {
  const [timeA, seqA] = a.split(" ");
  const [timeB, seqB] = b.split(" ");
  return Number(timeA) - Number(timeB) || (seqA ?? "").localeCompare(seqB ?? "");
}
