/**
 * The writer of {@linkcode FileSystemStore}: `incomplete/<id>`, appended by
 * one fill, read back by position for clients that trail it. What it may do
 * to the store's layout (commit, abort, check and refresh its lock) comes
 * from the store as a {@linkcode WriterLock} object, so the store has no
 * public methods for it.
 *
 * @module
 */
import { RUNTIME, unrefTimer } from "../_runtime.ts";
import type { CommitInfo, ImageEntry, ImageWriter } from "../image_store.ts";
import { HEARTBEAT_INTERVAL } from "./files.ts";

/** The part of an open file a writer uses (a `node:fs/promises` `FileHandle`). */
export interface PositionalFile {
  write(
    buffer: Uint8Array,
    offset: number,
    length: number,
    position: number,
  ): Promise<{ bytesWritten: number }>;
  read(
    buffer: Uint8Array,
    offset: number,
    length: number,
    position: number,
  ): Promise<{ bytesRead: number }>;
  writev?(
    buffers: readonly Uint8Array[],
    position: number,
  ): Promise<{ bytesWritten: number }>;
  sync(): Promise<void>;
  datasync(): Promise<void>;
  close(): Promise<void>;
}

/**
 * What a writer may do to the store's layout, given by the store when it
 * takes the fill lock. Each method acts only while the lock is this
 * writer's (another process may have deleted the fill: deletion wins).
 */
export interface WriterLock {
  /** Moves the data into place with its metadata, checks tombstones, drops the lock. */
  commit(info: CommitInfo): Promise<ImageEntry>;
  /** Removes (`discard`) or keeps aside (`invalid`) the data, and drops the lock. */
  abort(reason: "invalid" | "discard"): Promise<void>;
  /** Whether the lock is still this writer's. */
  owns(): Promise<boolean>;
  /** Whether a delete came after the fill's request (a tombstone): it cannot commit. */
  deleted(): Promise<boolean>;
  /** Refreshes the lock's heartbeat. */
  heartbeat(): Promise<void>;
}

/** A fill's writer starts a background flush (`fdatasync`) each time this many bytes were written. */
const FLUSH_EVERY = 32 * 2 ** 20;

/** The writer of one fill: appends, reads back by position, commits or aborts once. */
export class FileWriter implements ImageWriter {
  /** The partial file (`incomplete/<id>`): the cache's hash worker reads it back. */
  readonly path: string;
  /** The identity of the file at `path` when it was created (see `ImageWriter.fileIdentity`). */
  readonly fileIdentity: ImageWriter["fileIdentity"];
  #id: string;
  #lock: WriterLock;
  #handle: PositionalFile;
  #reader: PositionalFile;
  #written = 0;
  #settled = false;
  #readerClosed = false;
  #heartbeat: ReturnType<typeof setInterval>;
  /** Bytes written when the last background flush started. */
  #flushedAt = 0;
  /** The background flush under way; it records its failure instead of rejecting. */
  #flushing: Promise<void> | undefined;
  #flushError: unknown;

  constructor(
    id: string,
    path: string,
    handle: PositionalFile,
    reader: PositionalFile,
    lock: WriterLock,
    identity?: ImageWriter["fileIdentity"],
  ) {
    this.#id = id;
    this.path = path;
    this.fileIdentity = identity;
    this.#lock = lock;
    this.#handle = handle;
    this.#reader = reader;
    this.#heartbeat = setInterval(() => {
      lock.heartbeat().catch(() => {});
    }, HEARTBEAT_INTERVAL);
    unrefTimer(this.#heartbeat);
  }

  async write(chunk: Uint8Array): Promise<void> {
    if (this.#settled) throw new Error(`Writer for "${this.#id}" is closed`);
    await this.#append(chunk);
    this.#flushSometimes();
  }

  /**
   * Appends the chunks with one `writev` where that is cheap (Node, Bun),
   * else one write each (Deno, whose `writev` copies: measured 5 s of CPU
   * per GiB against 0.4 s for per-chunk writes; gathering the chunks into
   * one buffer first costs 2 s). Never a copy of ours.
   */
  async writev(chunks: readonly Uint8Array[]): Promise<void> {
    if (this.#settled) throw new Error(`Writer for "${this.#id}" is closed`);
    const writev = this.#handle.writev;
    if (chunks.length > 1 && writev !== undefined && RUNTIME !== "deno") {
      const { bytesWritten } = await writev.call(this.#handle, chunks, this.#written);
      this.#written += bytesWritten;
      // A short writev (rare: a signal, a full disk's last blocks): the rest one by one.
      let skip = bytesWritten;
      for (const chunk of chunks) {
        if (skip >= chunk.byteLength) {
          skip -= chunk.byteLength;
          continue;
        }
        await this.#append(skip > 0 ? chunk.subarray(skip) : chunk);
        skip = 0;
      }
    } else {
      for (const chunk of chunks) await this.#append(chunk);
    }
    this.#flushSometimes();
  }

  async #append(chunk: Uint8Array): Promise<void> {
    let offset = 0;
    while (offset < chunk.byteLength) {
      const { bytesWritten } = await this.#handle.write(
        chunk,
        offset,
        chunk.byteLength - offset,
        this.#written,
      );
      offset += bytesWritten;
      this.#written += bytesWritten;
    }
  }

  #flushSometimes(): void {
    if (this.#written - this.#flushedAt >= FLUSH_EVERY && this.#flushing === undefined) {
      // Flush in the background while the writes go on, so that the commit's
      // fsync finds little left to write: its wait (the client's last byte)
      // stays short whatever the image's size.
      this.#flushedAt = this.#written;
      this.#flushing = this.#handle.datasync().then(
        () => this.#flushing = undefined,
        (error) => {
          this.#flushError ??= error;
          this.#flushing = undefined;
        },
      );
    }
  }

  async read(position: number, length: number): Promise<Uint8Array> {
    const buffer = new Uint8Array(length);
    const { bytesRead } = await this.#reader.read(buffer, 0, length, position);
    return bytesRead === length ? buffer : buffer.subarray(0, bytesRead);
  }

  async commit(info: CommitInfo): Promise<ImageEntry> {
    this.#settle();
    try {
      try {
        if (info.size !== this.#written) {
          throw new Error(
            `Cannot commit "${this.#id}": wrote ${this.#written} bytes, not ${info.size}`,
          );
        }
        await this.#flushing;
        if (this.#flushError !== undefined) throw this.#flushError;
        await this.#handle.sync();
      } finally {
        await this.#handle.close();
      }
      return await this.#lock.commit(info);
    } catch (error) {
      // Whatever failed, the lock goes: a failed commit must never hold the image.
      await this.#lock.abort("discard").catch(() => {});
      throw error;
    }
  }

  async abort(reason: "invalid" | "discard"): Promise<void> {
    if (this.#settled) return;
    this.#settle();
    await this.#flushing;
    await this.#handle.close().catch(() => {});
    await this.#lock.abort(reason);
  }

  /**
   * Whether the fill is still this writer's to commit: its lock, and no
   * delete since its request (another process's delete may leave the lock
   * of a fill it did not see yet; the tombstone tells).
   */
  async owned(): Promise<boolean> {
    return await this.#lock.owns() && !(await this.#lock.deleted());
  }

  async close(): Promise<void> {
    if (this.#readerClosed) return;
    this.#readerClosed = true;
    await this.#reader.close();
  }

  #settle() {
    if (this.#settled) throw new Error(`Writer for "${this.#id}" already committed or aborted`);
    this.#settled = true;
    clearInterval(this.#heartbeat);
  }
}
