/**
 * A fill: one origin body flowing into the store, with any number of
 * clients attached. The fill belongs to the cache, not to a client.
 *
 * Design (DESIGN.md invariants 1, 3, 4, 5, 7):
 *
 * - **One pump** reads the origin at the origin's pace and appends each chunk
 *   to an in-memory window. A write loop beside it stores the window's new
 *   bytes: the chunks that arrived during a write go in one `writev` of up to
 *   1 MiB, as they are (gathering them into one buffer cost more CPU than the
 *   writes). The pump waits only when the store trails by more than 4 MiB, so
 *   backpressure comes from the store, never from a client. No `tee()`.
 * - **The digest** is computed beside the fill (src/_fill/hash.ts): a large
 *   stored fill's worker thread reads the bytes back from the writer's file
 *   once they are written; other fills hand the hash their chunks.
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
 * - **A fill that stores nothing** here (another process owns the image's
 *   fill) has a *backing* instead of a writer: the other process's growing
 *   file (src/_fill/follow.ts). Readers that trail read it back from there,
 *   so a slow one holds no memory and stalls nobody.
 * - **Late readers attach only where they can be served**
 *   ({@linkcode Fill.attachAt}): a request that decided to join, then waited
 *   (a slow `authorize`), attaches afterwards or is told no, and then reads
 *   the committed entry or asks the origin. An attached reader keeps what it
 *   reads from (the writer's read handle, the followed file) open.
 * - **An origin that stands still** longer than `stallTimeout` fails the
 *   fill: its clients are cut rather than left waiting forever.
 *
 * @module
 */
import { type FillHash, fillHash } from "./hash.ts";
import { rescuedRest } from "./rescue.ts";
import { digestMatches, type ExpectedDigest } from "../digest.ts";
import type { DigestAlgorithm, ImageEntry, ImageWriter } from "../image_store.ts";

/** Default of {@linkcode FillInit.stallTimeout}. */
export const STALL_TIMEOUT = 60_000;
/** Bytes of the newest data kept in memory for readers near the head... */
const WINDOW = 2 * 2 ** 20;
/** ...plus this much per attached reader (a cold start's clients spread out)... */
const WINDOW_PER_READER = 256 * 1024;
/** ...up to this. */
const WINDOW_MAX = 16 * 2 ** 20;
/**
 * Longest the pump waits for its fastest reader to come back within the
 * window; a reader that does not stops the pacing until it catches up.
 */
const PACE_WAIT = 20;
/** Bytes a detached fill may hold for readers before it waits for the slowest. */
const DETACHED_LIMIT = 8 * 2 ** 20;
/** Largest read from the store for a reader that trails the window. */
const READ_CHUNK = 512 * 1024;
/** Chunks read back kept for other trailing readers (16 MiB). */
const READ_BACK_CHUNKS = 32;
/** A stored fill's hash worker is told how far the file holds its bytes in steps of this. */
const HASH_STEP = 4 * 2 ** 20;
/** Chunks received during a store write go to the store together, up to this many bytes. */
const WRITE_BATCH = 2 ** 20;
/** Bytes the pump may be ahead of the store before it waits for the disk. */
const WRITE_AHEAD = 4 * 2 ** 20;

/**
 * A reader could not read back bytes that left memory (the store failed to
 * read what it wrote). The fill itself goes on: only this reader is cut,
 * unless it has another way to the rest (src/_fill/rescue.ts).
 */
export class ReadBackError extends Error {
  /** The first byte the reader could not have. */
  readonly position: number;
  constructor(position: number, options?: ErrorOptions) {
    super(`Cannot read back byte ${position} from the store`, options);
    this.name = "ReadBackError";
    this.position = position;
  }
}

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

/**
 * Bytes of a fill that can be read back from somewhere other than memory:
 * `[0, available)`. A stored fill's backing is its writer; a fill that
 * follows another process's file has that file.
 */
export interface FillBacking {
  /** Bytes that can be read back, from 0. Grows, never shrinks. */
  readonly available: number;
  /** Up to `length` bytes from `position` (below `available`). */
  read(position: number, length: number): Promise<Uint8Array>;
  /** Releases what `read` needs. Idempotent. */
  close(): Promise<void>;
}

/** What starts a fill. */
export interface FillInit {
  id: string;
  /** Where the fill stores the image; `undefined`: it stores nothing (a shared pass-through). */
  writer: ImageWriter | undefined;
  source: ReadableStream<Uint8Array>;
  /** Where a fill that stores nothing reads back what left memory (a followed file). */
  backing?: FillBacking;
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
  /** Whether `source` follows another process's fill (see src/_fill/follow.ts). */
  followed?: boolean;
  /**
   * Milliseconds the source may stand still (a read that does not resolve)
   * before the fill fails.
   * @default {60000}
   */
  stallTimeout?: number;
  /** Cache-side faults (store write failures, commit failures). */
  onError: (error: unknown) => void;
}

/** A client attached to a fill (see {@linkcode Fill.attachAt}). */
export interface Reader {
  /** The next byte this reader needs (`Infinity`: it pins no byte of the fill). */
  position: number;
  /** The last byte of a range, kept aside while it waits for verification. */
  parked?: Uint8Array;
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
  /** Set when the body verified but the store failed to commit it (an fsync error, say). */
  commitFailed = false;
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
  #writer: ImageWriter | undefined;
  #hash: FillHash;
  /**
   * Whether the hash reads the stored bytes back from the writer's file (off
   * the main thread), rather than being handed them: while the fill stores.
   */
  #hashFromFile: boolean;
  /** Bytes handed to the hash so far (from the file or from memory). */
  #hashed = 0;
  #written = 0;
  /** Bytes the writer holds (a stored fill). */
  #durable = 0;
  #detached: string | undefined;
  /**
   * The window: body chunks kept in memory, oldest first, and where each
   * starts. Two arrays, not an object per chunk: V8 pretenures an object
   * literal that often survives a young collection, and an old object
   * holding a chunk kept the chunk (and its buffer) until a full collection,
   * which then ran every few MiB (Node: 100 per GiB, twice the fill's CPU).
   */
  #chunks: Uint8Array[] = [];
  #offsets: number[] = [];
  #readers = new Set<Reader>();
  #tick!: Promise<void>;
  #wake!: () => void;
  #readerTick: Promise<void> | undefined;
  #readerWake: (() => void) | undefined;
  /** Chunks read back for trailing readers, by aligned offset (see {@linkcode #readBack}). */
  #readBacks = new Map<number, Promise<Uint8Array>>();
  /** Where each of {@linkcode #readBacks} ends (a map of its own: no object per chunk). */
  #readBackEnds = new Map<number, number>();
  /** Whether the pump keeps within the window of its fastest reader (see {@linkcode #pace}). */
  #pacing = true;
  #source: ReadableStreamDefaultReader<Uint8Array>;
  #committing: Promise<unknown> | undefined;
  /** Whether what readers read back from (writer, backing) was released. */
  #closed = false;
  /** Whether the write loop runs; it stops when the store holds every byte received. */
  #flushing = false;
  /** The write loop, settled once it stopped. Never rejects. */
  #flushed: Promise<void> = Promise.resolve();
  /** The store write in flight. Never rejects. */
  #batch: Promise<void> = Promise.resolve();
  /** When the pending source read started (ms); `undefined` while none is pending. */
  #readingSince: number | undefined;
  #start!: () => void;

  constructor(init: FillInit) {
    this.id = init.id;
    this.#init = init;
    this.#writer = init.writer;
    this.responseHeaders = init.responseHeaders;
    this.expectedLength = init.expectedLength;
    this.followed = init.followed ?? false;
    const path = init.writer?.path;
    const identity = init.writer?.fileIdentity;
    this.#hash = fillHash(
      init.expected?.algorithm ?? "md5",
      init.expectedLength,
      path === undefined || identity === undefined ? undefined : {
        path,
        identity,
        read: (position, length) => init.writer!.read(position, length),
      },
    );
    // Only a worker reads the file back; on this thread, hashing the chunks in hand is cheaper.
    this.#hashFromFile = this.#hash.readsFile;
    this.#source = init.source.getReader();
    this.#newTick();
    this.released = new Promise((resolve) => this.#release = resolve);
    // A stored fill runs at once (a prefetch has no client). A pass-through
    // shared by clients starts with its first client, so no byte is read
    // before someone can take it.
    const started = new Promise<void>((resolve) => this.#start = resolve);
    if (init.writer !== undefined) {
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
   * while it runs, or a pass-through that can still serve its first byte.
   */
  get joinableFromStart(): boolean {
    if (this.joinable) return true;
    return this.state === "running" && this.#detached === "not-stored" && this.#servable(0);
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

  /** Bytes that can be read back from the writer or the backing, from 0. */
  #available(): number {
    if (this.#writer !== undefined) return this.#durable;
    return this.#init.backing?.available ?? 0;
  }

  /** Whether a reader attached now could be served from `position` on. */
  #servable(position: number): boolean {
    if (this.state === "failed") return false;
    if (position < this.#available() && !this.#closed) return true;
    const first = this.#offsets.length > 0 ? this.#offsets[0] : this.#written;
    return position >= first && (position < this.#written || this.state === "running");
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
    const timeout = init.stallTimeout ?? STALL_TIMEOUT;
    // One watchdog per fill, not a timer per read: an origin that stands still fails the fill.
    const watchdog = setInterval(() => {
      const since = this.#readingSince;
      if (since !== undefined && Date.now() - since > timeout) {
        this.#fail(
          new FillError("origin-stalled", `Origin body sent nothing for ${timeout} ms`),
        );
      }
    }, Math.max(10, Math.min(timeout / 4, 5_000)));
    // Not unref'd: a fill whose origin stands still is work under way, and ends by this timer.
    try {
      for (;;) {
        this.#readingSince = Date.now();
        const { done, value } = await this.#source.read();
        this.#readingSince = undefined;
        // A cancelled source also ends with `done`: that is never a complete body.
        if (this.state !== "running") break;
        if (done) {
          await this.#flushed;
          await this.#finish();
          break;
        }
        if (value.byteLength === 0) continue;
        this.#chunks.push(value);
        this.#offsets.push(this.#written);
        this.#written += value.byteLength;
        this.#feedHash();
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
          await this.#waitForStore();
        }
        // A large fill hashes in a worker: wait when it trails too far (bounded memory).
        const hashing = this.#hash.ready();
        if (hashing !== undefined) await hashing;
        this.#trim();
        if (this.#detached !== undefined) await this.#waitForReaders();
        else await this.#pace();
      }
    } catch (error) {
      this.#readingSince = undefined;
      await this.#flushed;
      await this.#fail(
        error instanceof FillError
          ? error
          : new FillError("origin-error", `Origin body failed: ${error}`, { cause: error }),
      );
    } finally {
      clearInterval(watchdog);
    }
    if (this.#readers.size === 0) await this.#closeBacking();
  }

  /**
   * Hands the hash the bytes received since it was last fed, unless it reads
   * them from the writer's file (then the write loop tells it how far).
   * Once the fill stops storing, the bytes not in the file are still in the
   * window (it keeps every byte the store does not hold), and go from there.
   */
  #feedHash(last = false) {
    if (this.#hashFromFile) {
      if (this.#detached === undefined) {
        if (last) {
          // The end: every byte is in the file (the write loop is done).
          this.#hash.fromFile(this.#durable);
          this.#hashed = this.#durable;
        }
        return;
      }
      // The fill stopped storing: the file still holds every byte written (the hash
      // reads it through its own open handle); the rest comes from memory.
      this.#hash.fromFile(this.#durable);
      this.#hashed = this.#durable;
      this.#hashFromFile = false;
    }
    const chunks = this.#chunks;
    for (let i = 0; i < chunks.length; i++) {
      const offset = this.#offsets[i];
      const end = offset + chunks[i].byteLength;
      if (end <= this.#hashed) continue;
      const skip = this.#hashed - offset;
      this.#hash.update(skip > 0 ? chunks[i].subarray(skip) : chunks[i]);
      this.#hashed = end;
    }
  }

  /**
   * Waits while the store trails the origin by more than WRITE_AHEAD. Each
   * turn waits for a write that has not settled yet: once the write in
   * flight settled and no new one started (the loop is detaching the fill
   * after a store fault, or ending), it waits for the loop's end. Awaiting a
   * settled promise again and again would never yield to I/O, and the whole
   * process would stop.
   */
  async #waitForStore(): Promise<void> {
    while (
      this.#flushing && this.#detached === undefined &&
      this.#written - this.#durable > WRITE_AHEAD
    ) {
      const batch = this.#batch;
      await batch;
      if (this.#batch === batch) await this.#flushed;
    }
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
    const writer = this.#writer!;
    try {
      while (this.#detached === undefined && this.#durable < this.#written) {
        const chunks = this.#unstored();
        let end = this.#durable;
        for (const chunk of chunks) end += chunk.byteLength;
        let failure: { error: unknown } | undefined;
        const write = writer.writev !== undefined
          ? writer.writev(chunks)
          : writer.write(chunks.length === 1 ? chunks[0] : concat(chunks, end - this.#durable));
        this.#batch = write.catch((error) => {
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
        // The worker is told in steps of HASH_STEP: a message per write cost more than the writes.
        if (this.#hashFromFile && this.#detached === undefined && end - this.#hashed >= HASH_STEP) {
          this.#hash.fromFile(end);
          this.#hashed = end;
        }
      }
    } finally {
      this.#flushing = false;
    }
  }

  /**
   * The next bytes to store: the window's chunks from `#durable` on (they
   * are in the window: it keeps every byte the store does not hold yet), up
   * to about WRITE_BATCH, as they are (no copy).
   */
  #unstored(): Uint8Array[] {
    const offsets = this.#offsets;
    let first = offsets.length - 1;
    while (first > 0 && offsets[first] > this.#durable) first--;
    let last = first;
    let total = 0;
    while (last < offsets.length && total < WRITE_BATCH) {
      total += this.#chunks[last].byteLength;
      last++;
    }
    // (`slice`, not a literal: a pretenured array would keep the chunks to a full collection.)
    const chunks = this.#chunks.slice(first, last);
    const skip = this.#durable - offsets[first];
    if (skip > 0) chunks[0] = chunks[0].subarray(skip);
    return chunks;
  }

  /** Releases what readers read back from: the writer's read handle, the followed file. */
  async #closeBacking(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#readBacks.clear();
    this.#readBackEnds.clear();
    const onError = this.#init.onError;
    await this.#writer?.close().catch(onError);
    await this.#init.backing?.close().catch(onError);
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
    this.#feedHash(true);
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
      const writer = this.#writer!;
      this.#committing = writer.commit({
        size,
        digest: { algorithm: this.algorithm, value: hex },
        headers,
      }).then(
        (entry) => this.committed = entry,
        async (error) => {
          this.commitFailed = true;
          init.onError(error);
          // A store whose failed commit left the fill's lock behind must not
          // hold the image: give it up (a no-op for a writer that settled).
          await writer.abort("discard").catch(init.onError);
        },
      );
      await this.#committing;
      this.#release();
    }
    if (this.state !== "running") return; // Failed meanwhile (stalled, cancelled).
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
      await this.#writer!.abort(error.reason === "cancelled" ? "discard" : "invalid")
        .catch((e) => this.#init.onError(e));
      this.#release();
    }
  }

  /** Stops storing: the store failed, or the image was deleted. Attached clients go on. */
  async #detach(reason: string) {
    if (this.#detached !== undefined) return;
    this.#detached = reason;
    await this.#writer!.abort("discard").catch((e) => this.#init.onError(e));
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
      owned = await (this.#writer!.owned?.() ?? true);
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
    if (this.#writer !== undefined) await this.#detach("deleted");
  }

  /**
   * Frees memory no reader needs: bytes older than the window that the
   * writer or backing holds; once detached (no one joins any more), also
   * bytes every reader passed.
   */
  #trim() {
    let keep = this.#available();
    if (this.#detached !== undefined) {
      let slowest = Infinity;
      for (const reader of this.#readers) slowest = Math.min(slowest, reader.position);
      keep = Math.max(keep, slowest);
    }
    // Never a byte the hash still needs from memory: past what it reads from the file
    // (a fill that just stopped storing has not told it yet), or past what it was fed.
    const hashNeeds = this.#hashFromFile ? this.#durable : this.#hashed;
    const floor = Math.min(this.#written - this.#window_size(), keep, hashNeeds);
    const chunks = this.#chunks;
    let drop = 0;
    while (drop < chunks.length && this.#offsets[drop] + chunks[drop].byteLength <= floor) drop++;
    if (drop > 0) {
      chunks.splice(0, drop);
      this.#offsets.splice(0, drop);
    }
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
      if (this.#written - Math.max(this.#available(), slowest) <= DETACHED_LIMIT) return;
      this.#readerTick ??= new Promise((resolve) => this.#readerWake = resolve);
      await this.#readerTick;
    }
  }

  /** Bytes kept in memory behind the newest: more when more clients read. */
  #window_size(): number {
    return Math.min(WINDOW_MAX, WINDOW + WINDOW_PER_READER * this.#readers.size);
  }

  /** The position of the reader furthest ahead (`-Infinity` without readers). */
  #lead(): number {
    let lead = -Infinity;
    for (const reader of this.#readers) {
      if (reader.position !== Infinity && reader.position > lead) lead = reader.position;
    }
    return lead;
  }

  /**
   * Keeps the pump within the window of its fastest reader, so that reader
   * reads from memory instead of back from the store (one copy less per
   * byte, and no read per 512 KiB). Bounded (invariant 4): the pump waits at
   * most PACE_WAIT ms at a time; a reader that does not come back within
   * the window meanwhile turns the pacing off until it catches up, so a
   * slow client never slows the fill beyond that.
   */
  async #pace(): Promise<void> {
    if (!this.#pacing || this.#readers.size === 0) return;
    if (this.#written - this.#lead() <= this.#window_size()) return;
    let expired = false;
    const timer = setTimeout(() => {
      expired = true;
      this.#wakePump();
    }, PACE_WAIT);
    try {
      while (this.state === "running" && this.#written - this.#lead() > this.#window_size()) {
        if (expired || this.#readers.size === 0) {
          this.#pacing = false;
          return;
        }
        this.#readerTick ??= new Promise((resolve) => this.#readerWake = resolve);
        await this.#readerTick;
      }
    } finally {
      clearTimeout(timer);
    }
  }

  /** Wakes the pump when it waits for readers. */
  #wakePump() {
    const wake = this.#readerWake;
    if (wake === undefined) return;
    this.#readerTick = this.#readerWake = undefined;
    wake();
  }

  #readerMoved() {
    if (!this.#pacing && this.#written - this.#lead() <= this.#window_size()) this.#pacing = true;
    if (this.#readerWake === undefined) return;
    this.#trim();
    this.#wakePump();
  }

  /**
   * Attaches a client that starts reading at `position`, or `undefined`
   * when the fill can no longer serve it from there (it failed, or ended
   * and released what it read back from): the caller then reads the
   * committed entry, or asks the origin. Synchronous, so that a check and
   * the attachment cannot be separated by the fill's end.
   */
  attachAt(position: number): Reader | undefined {
    if (!this.#servable(position)) return undefined;
    const reader = { position };
    this.#readers.add(reader);
    this.#start();
    return reader;
  }

  /** Detaches a client (done, failed, or hung up). Idempotent. */
  detach(reader: Reader): void {
    if (!this.#readers.delete(reader)) return;
    this.#readerMoved();
    if (this.#readers.size > 0) return;
    if (this.state !== "running") {
      this.#closeBacking();
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
        let bytes: Uint8Array;
        try {
          bytes = await this.#bytesAt(position, stop);
        } catch (error) {
          // (try/catch, not a `.catch` closure: this runs for every chunk of every reader.)
          // (The state may have changed during the await; TypeScript narrowed it before.)
          if ((this.state as Fill["state"]) === "failed") throw this.error;
          throw new ReadBackError(position, { cause: error });
        }
        reader.position = position + bytes.byteLength;
        this.#readerMoved();
        return bytes;
      }
      if (this.state === "verified" && position >= Math.min(end, this.#written)) return null;
      if (this.state === "running" && position === end - 1 && this.#written >= end) {
        // A range with every byte but its last, which waits for verification:
        // keep that byte aside, so this reader holds no memory of the fill and
        // a detached fill never waits for it (it would wait forever).
        try {
          reader.parked = (await this.#bytesAt(position, end)).slice();
        } catch (error) {
          throw new ReadBackError(position, { cause: error });
        }
        reader.position = Infinity;
        this.#readerMoved();
        continue;
      }
      await this.#tick;
    }
  }

  async #bytesAt(position: number, stop: number): Promise<Uint8Array> {
    const offsets = this.#offsets;
    if (offsets.length > 0 && position >= offsets[0]) {
      // Binary search for the chunk that holds `position`.
      let low = 0;
      let high = offsets.length - 1;
      while (low < high) {
        const mid = (low + high + 1) >> 1;
        if (offsets[mid] <= position) low = mid;
        else high = mid - 1;
      }
      const chunk = this.#chunks[low];
      const from = position - offsets[low];
      const to = Math.min(chunk.byteLength, stop - offsets[low]);
      return from === 0 && to === chunk.byteLength ? chunk : chunk.subarray(from, to);
    }
    const aligned = position - position % READ_CHUNK;
    const chunk = await this.#readBack(aligned, Math.min(aligned + READ_CHUNK, this.#available()));
    const from = position - aligned;
    const to = Math.min(chunk.byteLength, stop - aligned);
    if (to <= from) {
      throw new FillError("store-error", `Cannot read back byte ${position} of "${this.id}"`);
    }
    return from === 0 && to === chunk.byteLength ? chunk : chunk.subarray(from, to);
  }

  /**
   * Bytes `start` (READ_CHUNK-aligned) to `end` read back from the writer or
   * the backing, shared by every reader that needs them: clients that trail
   * a fill together (a cold start) make one read and hold one buffer, not
   * one each. Kept while a reader may still need them (at most the last
   * READ_BACK_CHUNKS): a chunk every reader passed is let go at once, so a
   * lone trailing client's buffers die young instead of piling up for the
   * garbage collector's full collections.
   */
  #readBack(start: number, end: number): Promise<Uint8Array> {
    let slowest = Infinity;
    for (const reader of this.#readers) slowest = Math.min(slowest, reader.position);
    const readBacks = this.#readBacks;
    const ends = this.#readBackEnds;
    for (const [offset, chunkEnd] of ends) {
      if (chunkEnd <= slowest && offset !== start) this.#dropReadBack(offset);
    }
    const cached = readBacks.get(start);
    if (cached !== undefined && ends.get(start)! >= end) {
      // Most recently used last.
      readBacks.delete(start);
      readBacks.set(start, cached);
      return cached;
    }
    const backing = this.#writer ?? this.#init.backing;
    const length = end - start;
    const read = async (): Promise<Uint8Array> => {
      if (length <= 0 || backing === undefined) return new Uint8Array();
      // One retry: a transient read fault should not cut a client that trails the fill.
      return await backing.read(start, length).catch(() =>
        new Promise<Uint8Array>((resolve, reject) =>
          setTimeout(() => backing.read(start, length).then(resolve, reject), 10)
        )
      );
    };
    const bytes = read();
    readBacks.set(start, bytes);
    ends.set(start, end);
    if (readBacks.size > READ_BACK_CHUNKS) this.#dropReadBack(readBacks.keys().next().value!);
    // A failed read is not kept: the next reader tries again.
    bytes.catch(() => {
      if (readBacks.get(start) === bytes) this.#dropReadBack(start);
    });
    return bytes;
  }

  #dropReadBack(offset: number) {
    this.#readBacks.delete(offset);
    this.#readBackEnds.delete(offset);
  }

  /** Waits until the fill is verified or failed. */
  settled(): Promise<void> {
    return this.done;
  }
}

/** `chunks` gathered into one buffer of `length` bytes. */
function concat(chunks: readonly Uint8Array[], length: number): Uint8Array {
  const bytes = new Uint8Array(length);
  let offset = 0;
  for (const chunk of chunks) {
    bytes.set(chunk, offset);
    offset += chunk.byteLength;
  }
  return bytes;
}

/** How a {@linkcode fillBody} recovers and reports. */
export interface FillBodyOptions {
  /**
   * Asked for the origin's whole answer when the store cannot read back
   * bytes this reader needs (or the reader could not attach); the rest
   * comes from it, checked (src/_fill/rescue.ts).
   */
  rescue?: () => Promise<Response | undefined>;
  /**
   * Told when the body is cut for a reason other than the fill's own
   * failure (which the core reports once): a read back and its rescue that
   * both failed, say. `position` is the first byte the client did not get.
   */
  onCut?: (error: unknown, position: number) => void;
}

/**
 * A body that follows `fill` from byte `start` to `end` (exclusive), for a
 * reader attached at `start` ({@linkcode Fill.attachAt}); `undefined`: the
 * reader could not attach (the fill ended meanwhile), and the body is
 * rescued from `start` (or cut). The reader detaches when the body
 * finishes, fails or is cancelled.
 */
export function fillBody(
  fill: Fill,
  reader: Reader | undefined,
  start: number,
  end = Infinity,
  options: FillBodyOptions = {},
): ReadableStream<Uint8Array> {
  const { rescue, onCut } = options;
  let position = start;
  let rest: ReadableStreamDefaultReader<Uint8Array> | undefined;
  /** Whether the client's side cancelled this body (it left): nothing to cut, nothing to report. */
  let cancelled = false;
  const cut = (controller: ReadableStreamDefaultController<Uint8Array>, error: unknown) => {
    if (cancelled) return;
    if (error !== fill.error) onCut?.(error, position);
    controller.error(error);
  };
  const pull = async (controller: ReadableStreamDefaultController<Uint8Array>): Promise<void> => {
    if (rest !== undefined) {
      let next: ReadableStreamReadResult<Uint8Array>;
      try {
        next = await rest.read();
      } catch (error) {
        return cut(controller, error);
      }
      if (cancelled) return;
      if (next.done) return controller.close();
      position += next.value.byteLength;
      controller.enqueue(next.value);
      return;
    }
    let bytes: Uint8Array | null;
    try {
      if (reader === undefined) throw new ReadBackError(position);
      bytes = await fill.read(reader, position, end);
    } catch (error) {
      if (reader !== undefined) fill.detach(reader);
      if (cancelled) return;
      // The store could not read back what this client needs: the rest from the origin.
      const answer = error instanceof ReadBackError && rescue !== undefined
        ? await rescue().catch(() => undefined)
        : undefined;
      const stream = answer === undefined ? undefined : rescuedRest(answer, fill, position, end);
      if (stream === undefined) return cut(controller, error);
      if (cancelled) {
        await stream.cancel().catch(() => {});
        return;
      }
      rest = stream.getReader();
      return pull(controller);
    }
    // The client may have left while this pull waited (an empty body may be
    // cancelled by the server at once): its stream takes nothing more.
    if (cancelled) return;
    if (bytes === null) {
      fill.detach(reader);
      controller.close();
      return;
    }
    position += bytes.byteLength;
    controller.enqueue(bytes);
  };
  return new ReadableStream<Uint8Array>({
    pull,
    cancel(reason) {
      cancelled = true;
      if (reader !== undefined) fill.detach(reader);
      return rest?.cancel(reason);
    },
  }, { highWaterMark: 0 });
}
