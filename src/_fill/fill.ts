/**
 * A fill: one origin body flowing into the store, with any number of
 * clients attached. The fill belongs to the cache, not to a client.
 *
 * Design (DESIGN.md invariants 1, 3, 4, 5, 7):
 *
 * - **One pump** reads the origin at the origin's pace: each chunk is hashed
 *   and appended to an in-memory window. A write loop beside it stores the
 *   window's new bytes, gathering the chunks that arrived during a write into
 *   one write of up to 1 MiB (a 256 MiB image arrives in some 4,500 chunks:
 *   one write each would leave the pump waiting on the disk a third of the
 *   time). The pump waits only when the store trails by more than 4 MiB, so
 *   backpressure comes from the store, never from a client. No `tee()`.
 * - **Readers** (one per attached client) pull at their own pace: bytes still
 *   in the window come from memory, older bytes from the store through the
 *   writer's positional `read()`. Each reader holds at most one chunk, so a
 *   stalled client slows nobody and memory does not grow with clients.
 * - **Hold-back**: until the length and digest are verified, readers see at
 *   most all bytes but the last one; a failed verification errors every
 *   reader, so no client ever gets a clean end of a wrong body.
 * - **Store faults and deletion** *detach* the fill from the store: it stops
 *   writing and will not commit, and keeps forwarding the origin to the
 *   clients already attached. Bytes the store already holds are still read
 *   from it (the writer's read handle outlives the file's removal); newer
 *   bytes stay in memory until every reader has passed them, and the pump
 *   waits (bounded memory) for the slowest reader. Every attached client
 *   still gets the full, correct body (invariant 2).
 *
 * @module
 */
import { type FillHash, fillHash } from "./hash.ts";
import { digestMatches, type ExpectedDigest } from "../digest.ts";
import type { DigestAlgorithm, ImageEntry, ImageWriter } from "../image_store.ts";

/** Bytes of the newest data kept in memory for readers near the head. */
const WINDOW = 2 * 2 ** 20;
/** Bytes a detached fill may hold for readers before it waits for the slowest. */
const DETACHED_LIMIT = 8 * 2 ** 20;
/** Largest read from the store for a reader that trails the window. */
const READ_CHUNK = 256 * 1024;
/** Chunks received during a store write are gathered into one write of up to this. */
const WRITE_BATCH = 2 ** 20;
/** Bytes the pump may be ahead of the store before it waits for the disk. */
const WRITE_AHEAD = 4 * 2 ** 20;

/** Why a fill did not end in a committed entry. */
export class FillError extends Error {
  /** A short token for `Cache-Status` details and metrics. */
  readonly reason: string;
  constructor(reason: string, message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "FillError";
    this.reason = reason;
  }
}

/** What starts a fill. */
export interface FillInit {
  id: string;
  writer: ImageWriter;
  source: ReadableStream<Uint8Array>;
  /** From `Content-Length`, when the origin sent one. */
  expectedLength?: number;
  /** What the body must hash to; `undefined`: the length alone is checked. */
  expected?: ExpectedDigest;
  /** Origin headers to keep with the entry. */
  storedHeaders: Record<string, string>;
  /** Origin headers to send to clients that join. */
  responseHeaders: Headers;
  /** Keep filling when the last client leaves. */
  completeOnAbort: boolean;
  /** Whether to commit at all (false: a pass-through that still coalesces). */
  commit: boolean;
  /** Whether `source` follows another process's fill (see src/_follow.ts). */
  followed?: boolean;
  /** Cache-side faults (store write failures, commit failures). */
  onError: (error: unknown) => void;
}

interface Reader {
  /** The next byte this reader needs (`Infinity`: it pins no byte of the fill). */
  position: number;
  /** The last byte of a range, kept aside while it waits for verification. */
  parked?: Uint8Array;
}

interface WindowChunk {
  offset: number;
  bytes: Uint8Array;
}

/** One origin body being stored while clients read it. */
export class Fill {
  readonly id: string;
  readonly responseHeaders: Headers;
  readonly expectedLength: number | undefined;
  /** `running` until the body ended and was verified (or not). */
  state: "running" | "verified" | "failed" = "running";
  /** Why the fill failed, once `state` is `failed`. */
  error: FillError | undefined;
  /** The committed entry, once committed. */
  committed: ImageEntry | undefined;
  /** Whether the bytes come from another process's fill (not stored here). */
  readonly followed: boolean;
  /** Settles when the pump is done and the commit (if any) is over. Never rejects. */
  readonly done: Promise<void>;
  /**
   * Settles once the writer is committed or aborted, so the store's name for
   * the image is free for a new fill. Never rejects.
   */
  readonly released: Promise<void>;
  #release!: () => void;

  #init: FillInit;
  #hash: FillHash;
  #written = 0;
  #durable = 0;
  #detached: string | undefined;
  #window: WindowChunk[] = [];
  #readers = new Set<Reader>();
  #tick!: Promise<void>;
  #wake!: () => void;
  #readerTick: Promise<void> | undefined;
  #readerWake: (() => void) | undefined;
  #source: ReadableStreamDefaultReader<Uint8Array>;
  #committing: Promise<unknown> | undefined;
  #writerClosed = false;
  /** Whether the write loop runs; it stops when the store holds every byte received. */
  #flushing = false;
  /** The write loop, settled once it stopped. Never rejects. */
  #flushed: Promise<void> = Promise.resolve();
  /** The store write in flight. Never rejects. */
  #batch: Promise<void> = Promise.resolve();
  #start!: () => void;

  constructor(init: FillInit) {
    this.id = init.id;
    this.#init = init;
    this.responseHeaders = init.responseHeaders;
    this.expectedLength = init.expectedLength;
    this.followed = init.followed ?? false;
    this.#hash = fillHash(init.expected?.algorithm ?? "md5", init.expectedLength);
    this.#source = init.source.getReader();
    this.#newTick();
    this.released = new Promise((resolve) => this.#release = resolve);
    // A stored fill runs at once (a prefetch has no client). A pass-through
    // shared by clients starts with its first client, so no byte is read
    // before someone can take it.
    const started = new Promise<void>((resolve) => this.#start = resolve);
    if (init.commit) {
      this.#start();
    } else {
      this.#detached = "not-stored";
      this.#release();
    }
    this.done = started.then(() => this.#pump()).finally(() => this.#release());
  }

  /** Bytes received from the origin so far. */
  get written(): number {
    return this.#written;
  }

  /** Whether a new client may still join (the fill will commit if it verifies). */
  get joinable(): boolean {
    return this.state === "running" && this.#detached === undefined;
  }

  /**
   * Whether a client may still join from the first byte: a stored fill
   * while it runs, or a pass-through that has dropped nothing yet.
   */
  get joinableFromStart(): boolean {
    if (this.joinable) return true;
    return this.state === "running" && this.#detached === "not-stored" &&
      (this.#window[0]?.offset ?? this.#written) === 0;
  }

  /** Whether the fill stopped storing (store fault, deletion, or never meant to). */
  get detached(): string | undefined {
    return this.#detached;
  }

  /** The digest the body must match (`undefined`: the length alone); cluster mode sends it to peers. */
  get expected(): ExpectedDigest | undefined {
    return this.#init.expected;
  }

  /** The algorithm the fill hashes with. */
  get algorithm(): DigestAlgorithm {
    return this.#init.expected?.algorithm ?? "md5";
  }

  /** Number of attached clients. */
  get readers(): number {
    return this.#readers.size;
  }

  #newTick() {
    this.#tick = new Promise((resolve) => this.#wake = resolve);
  }

  #progress() {
    const wake = this.#wake;
    this.#newTick();
    wake();
  }

  async #pump(): Promise<void> {
    const init = this.#init;
    try {
      for (;;) {
        const { done, value } = await this.#source.read();
        // A cancelled source also ends with `done`: that is never a complete body.
        if (this.state !== "running") break;
        if (done) {
          await this.#flushed;
          await this.#finish();
          break;
        }
        if (value.byteLength === 0) continue;
        this.#hash.update(value);
        this.#window.push({ offset: this.#written, bytes: value });
        this.#written += value.byteLength;
        if (init.expectedLength !== undefined && this.#written > init.expectedLength) {
          throw new FillError(
            "length",
            `Origin sent more than its Content-Length of ${init.expectedLength} bytes`,
          );
        }
        this.#progress();
        if (this.#detached === undefined) {
          this.#flush();
          // The store trails by more than WRITE_AHEAD: wait for the disk (memory stays bounded).
          while (this.#flushing && this.#written - this.#durable > WRITE_AHEAD) await this.#batch;
        }
        // A large fill hashes in a worker: wait when it trails too far (bounded memory).
        const hashing = this.#hash.ready();
        if (hashing !== undefined) await hashing;
        this.#trim();
        if (this.#detached !== undefined) await this.#waitForReaders();
      }
    } catch (error) {
      await this.#flushed;
      await this.#fail(
        error instanceof FillError
          ? error
          : new FillError("origin-error", `Origin body failed: ${error}`, { cause: error }),
      );
    }
    if (this.#readers.size === 0) await this.#closeWriter();
  }

  /** Starts the write loop unless it runs. */
  #flush() {
    if (this.#flushing) return;
    this.#flushing = true;
    this.#flushed = this.#writeLoop();
  }

  /**
   * Writes the bytes received and not yet stored, in order, a batch at a
   * time, until the store holds them all. A store fault detaches the fill.
   * Never rejects. The loop's last check of its condition and the reset of
   * `#flushing` happen in one turn, so bytes received later start a new loop.
   */
  async #writeLoop(): Promise<void> {
    try {
      while (this.#detached === undefined && this.#durable < this.#written) {
        const bytes = this.#unstored();
        const end = this.#durable + bytes.byteLength;
        let failure: { error: unknown } | undefined;
        this.#batch = this.#init.writer.write(bytes).catch((error) => {
          failure = { error };
        });
        await this.#batch;
        if (failure !== undefined) {
          if (this.#detached === undefined) {
            this.#init.onError(failure.error);
            await this.#detach("store-error");
          }
          return;
        }
        this.#durable = end;
      }
    } finally {
      this.#flushing = false;
    }
  }

  /**
   * The next bytes to store: the window's chunks from `#durable` on (they
   * are in the window: it keeps every byte the store does not hold yet),
   * gathered up to about WRITE_BATCH. One chunk goes as it is.
   */
  #unstored(): Uint8Array {
    const window = this.#window;
    let first = window.length - 1;
    while (first > 0 && window[first].offset > this.#durable) first--;
    const chunks: Uint8Array[] = [];
    let total = 0;
    for (let i = first; i < window.length && total < WRITE_BATCH; i++) {
      const skip = Math.max(0, this.#durable - window[i].offset);
      const chunk = skip === 0 ? window[i].bytes : window[i].bytes.subarray(skip);
      chunks.push(chunk);
      total += chunk.byteLength;
    }
    if (chunks.length === 1) return chunks[0];
    const bytes = new Uint8Array(total);
    let offset = 0;
    for (const chunk of chunks) {
      bytes.set(chunk, offset);
      offset += chunk.byteLength;
    }
    return bytes;
  }

  #closeWriter(): Promise<void> {
    if (this.#writerClosed) return Promise.resolve();
    this.#writerClosed = true;
    return this.#init.writer.close().catch((e) => this.#init.onError(e));
  }

  async #finish() {
    const init = this.#init;
    const size = this.#written;
    if (init.expectedLength !== undefined && size !== init.expectedLength) {
      throw new FillError(
        "length",
        `Origin body ended after ${size} of ${init.expectedLength} bytes`,
      );
    }
    let hex;
    try {
      hex = await this.#hash.digest();
    } catch (error) {
      throw new FillError("hash-error", `Cannot hash the body: ${error}`, { cause: error });
    }
    if (init.expected !== undefined && !digestMatches(init.expected, hex)) {
      throw new FillError(
        "digest",
        `Checksum mismatch: expected ${init.expected.algorithm} ${init.expected.value}, got ${hex}`,
      );
    }
    if (this.#detached === undefined && this.state === "running") {
      const headers = init.storedHeaders;
      this.#committing = init.writer.commit({
        size,
        digest: { algorithm: this.algorithm, value: hex },
        headers,
      }).then(
        (entry) => this.committed = entry,
        (error) => init.onError(error),
      );
      await this.#committing;
      this.#release();
    }
    this.state = "verified";
    this.#progress();
  }

  async #fail(error: FillError) {
    if (this.state !== "running") return;
    this.state = "failed";
    this.error = error;
    this.#hash.dispose();
    this.#progress();
    this.#readerWake?.();
    this.#source.cancel(error).catch(() => {});
    if (this.#detached === undefined) {
      this.#detached = error.reason;
      await this.#init.writer.abort(error.reason === "cancelled" ? "discard" : "invalid")
        .catch((e) => this.#init.onError(e));
      this.#release();
    }
  }

  /** Stops storing: the store failed, or the image was deleted. Attached clients go on. */
  async #detach(reason: string) {
    if (this.#detached !== undefined) return;
    this.#detached = reason;
    await this.#init.writer.abort("discard").catch((e) => this.#init.onError(e));
    this.#release();
  }

  /**
   * Whether the fill still holds the store's lock; when another process
   * deleted it, the fill stops storing (so nobody new joins) and this
   * resolves `false`.
   */
  async checkOwned(): Promise<boolean> {
    if (!this.joinable) return false;
    let owned = true;
    try {
      owned = await (this.#init.writer.owned?.() ?? true);
    } catch {
      owned = false;
    }
    if (!owned) await this.#detach("deleted");
    return owned && this.joinable;
  }

  /**
   * Deletion wins (invariant 7): the fill will not commit; a commit already
   * under way is awaited, so that the caller's delete comes after it.
   */
  async evict(): Promise<void> {
    if (this.#committing !== undefined) {
      await this.#committing;
      return;
    }
    await this.#detach("deleted");
  }

  /**
   * Frees memory no reader needs: bytes older than the window that the store
   * holds; once detached (no one joins any more), also bytes every reader passed.
   */
  #trim() {
    let keep = this.#durable;
    if (this.#detached !== undefined) {
      let slowest = Infinity;
      for (const reader of this.#readers) slowest = Math.min(slowest, reader.position);
      keep = Math.max(keep, slowest);
    }
    const floor = Math.min(this.#written - WINDOW, keep);
    let drop = 0;
    while (
      drop < this.#window.length &&
      this.#window[drop].offset + this.#window[drop].bytes.byteLength <= floor
    ) drop++;
    if (drop > 0) this.#window.splice(0, drop);
  }

  /** A detached fill waits while it holds too many bytes that only memory has. */
  async #waitForReaders() {
    for (;;) {
      if (this.#readers.size === 0) {
        throw new FillError("cancelled", "No client left to forward a fill that is not stored");
      }
      if (this.state !== "running") return;
      let slowest = Infinity;
      for (const reader of this.#readers) slowest = Math.min(slowest, reader.position);
      if (this.#written - Math.max(this.#durable, slowest) <= DETACHED_LIMIT) return;
      this.#readerTick ??= new Promise((resolve) => this.#readerWake = resolve);
      await this.#readerTick;
    }
  }

  #readerMoved() {
    const wake = this.#readerWake;
    if (wake === undefined) return;
    this.#readerTick = this.#readerWake = undefined;
    this.#trim();
    wake();
  }

  /** Attaches a client that starts reading at `position`. */
  attach(position = 0): Reader {
    const reader = { position };
    this.#readers.add(reader);
    this.#start();
    return reader;
  }

  /** Detaches a client (done, failed, or hung up). */
  detach(reader: Reader): void {
    if (!this.#readers.delete(reader)) return;
    this.#readerMoved();
    if (this.#readers.size > 0) return;
    if (this.state !== "running") {
      this.#closeWriter();
    } else if (!this.#init.completeOnAbort || this.#detached !== undefined) {
      this.#fail(new FillError("cancelled", "Every client left the fill"));
    }
  }

  /** How far readers may read now: all bytes once verified, else all but the last. */
  #readable(): number {
    if (this.state === "verified") return this.#written;
    const length = this.#init.expectedLength;
    return length === undefined ? this.#written - 1 : Math.min(this.#written, length - 1);
  }

  /**
   * The next bytes for `reader` from `position`, up to `end` (exclusive);
   * `null` at the end. Waits for the fill; rejects when it fails.
   */
  async read(reader: Reader, position: number, end = Infinity): Promise<Uint8Array | null> {
    reader.position = reader.parked === undefined ? position : Infinity;
    for (;;) {
      if (position >= end) return null;
      if (this.state === "failed") throw this.error;
      if (reader.parked !== undefined) {
        if (this.state !== "verified") {
          await this.#tick;
          continue;
        }
        const last = reader.parked;
        reader.parked = undefined;
        reader.position = position + last.byteLength;
        return last;
      }
      // Every reader's last byte waits for verification, a range's included:
      // a client never sees a clean end of bytes that may fail it.
      const stop = this.state === "verified"
        ? Math.min(end, this.#written)
        : Math.min(end - 1, this.#readable());
      if (position < stop) {
        const bytes = await this.#bytesAt(position, stop);
        reader.position = position + bytes.byteLength;
        this.#readerMoved();
        return bytes;
      }
      if (this.state === "verified" && position >= Math.min(end, this.#written)) return null;
      if (this.state === "running" && position === end - 1 && this.#written >= end) {
        // A range with every byte but its last, which waits for verification:
        // keep that byte aside, so this reader holds no memory of the fill and
        // a detached fill never waits for it (it would wait forever).
        reader.parked = (await this.#bytesAt(position, end)).slice();
        reader.position = Infinity;
        this.#readerMoved();
        continue;
      }
      await this.#tick;
    }
  }

  async #bytesAt(position: number, stop: number): Promise<Uint8Array> {
    const window = this.#window;
    if (window.length > 0 && position >= window[0].offset) {
      // Binary search for the chunk that holds `position`.
      let low = 0;
      let high = window.length - 1;
      while (low < high) {
        const mid = (low + high + 1) >> 1;
        if (window[mid].offset <= position) low = mid;
        else high = mid - 1;
      }
      const chunk = window[low];
      const from = position - chunk.offset;
      const to = Math.min(chunk.bytes.byteLength, stop - chunk.offset);
      return from === 0 && to === chunk.bytes.byteLength
        ? chunk.bytes
        : chunk.bytes.subarray(from, to);
    }
    const length = Math.min(READ_CHUNK, stop - position, this.#durable - position);
    let bytes: Uint8Array = new Uint8Array();
    if (length > 0) {
      // One retry: a transient read fault should not cut a client that trails the fill.
      bytes = await this.#init.writer.read(position, length).catch(() =>
        new Promise<Uint8Array>((resolve, reject) =>
          setTimeout(() => this.#init.writer.read(position, length).then(resolve, reject), 10)
        )
      );
    }
    if (bytes.byteLength === 0) {
      throw new FillError("store-error", `Cannot read back byte ${position} of "${this.id}"`);
    }
    return bytes;
  }

  /** Waits until the fill is verified or failed. */
  settled(): Promise<void> {
    return this.done;
  }
}

/**
 * A body that follows `fill` from byte `start` to `end` (exclusive). The
 * client detaches when it finishes, fails or cancels.
 */
export function fillBody(fill: Fill, start = 0, end = Infinity): ReadableStream<Uint8Array> {
  const reader = fill.attach(start);
  let position = start;
  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      try {
        const bytes = await fill.read(reader, position, end);
        if (bytes === null) {
          fill.detach(reader);
          controller.close();
          return;
        }
        position += bytes.byteLength;
        controller.enqueue(bytes);
      } catch (error) {
        fill.detach(reader);
        controller.error(error);
      }
    },
    cancel() {
      fill.detach(reader);
    },
  }, { highWaterMark: 0 });
}
