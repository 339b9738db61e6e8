/**
 * The cache's logic above a store, shared by every middleware and
 * management API bound to the same store: the fills under way (one per
 * image), claims for misses whose origin answer is still awaited, eviction.
 *
 * @module
 */
import { Fill, FillError } from "../_fill/fill.ts";
import { followedSource } from "../_fill/follow.ts";
import { installPruning } from "./prune.ts";
import type { ExpectedDigest } from "../digest.ts";
import type { ImageEntry, ImageStore, ImageWriter } from "../image_store.ts";

/**
 * Counters of one store's cache, for metrics. Monotonic unless named as a gauge.
 */
export interface CacheCounters {
  /** Requests answered from a committed entry. */
  hits: number;
  /** Requests that went to the origin (whatever became of the answer). */
  misses: number;
  /** Requests that joined a fill another request started. */
  coalesced: number;
  /** Bytes announced in answers from committed entries (hits, ranges). */
  bytesFromCache: number;
  /** Bytes read from the origin by fills. */
  bytesFromOrigin: number;
  /** Fills that failed verification (digest or length). */
  verificationFailures: number;
  /** Fills committed. */
  commits: number;
  /** Entries removed by pruning. */
  evictions: number;
  /** Misses not stored, by `Cache-Status` detail. */
  passThrough: Record<string, number>;
}

/**
 * Policy hooks installed by the management layer (pruning, space
 * reservation). The core calls them; they decide.
 */
export interface CacheHooks {
  /**
   * Asked before a fill starts: resolves to a refusal detail (for
   * `Cache-Status`) to pass the answer through uncached, or `undefined` to
   * admit it. May reserve space; `release` is called when the fill ends.
   */
  admit?: (id: string, expectedLength: number | undefined) => Promise<string | undefined>;
  /** Called when a fill ends, committed or not, after `admit` admitted it. */
  release?: (id: string) => void;
  /** Called after an entry is committed. */
  committed?: (entry: ImageEntry) => void | Promise<void>;
  /** Called after {@linkcode CacheCore.evict} removed what `id` had. */
  evicted?: (id: string) => void;
}

/**
 * How long another process's fill may stand still, its owner alive, before a
 * process following it goes on from its own origin answer.
 */
const FOLLOW_STALL = 10_000;

/** A miss whose origin answer is awaited: later requests for the image wait for it. */
export interface Claim {
  /** Settles with the fill the answer became, or `undefined` when it did not. */
  readonly fill: Promise<Fill | undefined>;
  /** Set when the image was deleted meanwhile: the answer must not be stored. */
  evicted: boolean;
  /** When the claim was made (ms): a deletion after it wins, in any process. */
  readonly started: number;
}

interface OwnClaim extends Claim {
  resolve(fill: Fill | undefined): void;
}

/** Options of {@linkcode CacheCore.startFill}. */
export interface StartFillOptions {
  expected?: ExpectedDigest;
  completeOnAbort: boolean;
  onError: (error: unknown) => void;
  /** Claim to settle with the fill (or with `undefined`). */
  claim?: Claim;
  /**
   * When another process is filling the image: still return a fill, one
   * that stores nothing, so the clients waiting on this claim share one
   * origin answer (at most one origin fetch per process).
   */
  shareWhenBusy?: boolean;
}

/** The writer of a fill that stores nothing. */
const NO_WRITER: ImageWriter = {
  write: () => Promise.reject(new Error("This fill stores nothing")),
  read: () => Promise.reject(new Error("This fill stores nothing")),
  commit: () => Promise.reject(new Error("This fill stores nothing")),
  abort: () => Promise.resolve(),
  close: () => Promise.resolve(),
};

/** Headers kept with an entry and replayed on hits. */
const STORED_HEADERS = new Set([
  "content-type",
  "content-disposition",
  "content-encoding",
  "content-language",
]);

/** Hop-by-hop and per-client headers never sent to a client that joins a fill. */
const NOT_FOR_JOINERS = new Set([
  "connection",
  "keep-alive",
  "transfer-encoding",
  "set-cookie",
  "cache-status",
  "x-openstack-request-id",
  "date",
]);

/** The origin headers worth keeping with an entry (never `x-image-meta-location`). */
export function storableHeaders(headers: Headers): Record<string, string> {
  const kept: Record<string, string> = {};
  for (const [name, value] of headers) {
    if (
      STORED_HEADERS.has(name) ||
      (name.startsWith("x-image-meta-") && name !== "x-image-meta-location")
    ) kept[name] = value;
  }
  return kept;
}

/** Parses a `Content-Length`: `undefined` when absent or not a plain decimal. */
export function contentLength(headers: Headers): number | undefined {
  const value = headers.get("content-length");
  if (value === null || !/^\d{1,16}$/.test(value.trim())) return undefined;
  return Number(value.trim());
}

/** One store's fills and claims. */
export class CacheCore {
  readonly store: ImageStore;
  readonly #fills = new Map<string, Fill>();
  readonly #claims = new Map<string, OwnClaim>();
  /** Counters for metrics. */
  readonly counters: CacheCounters = {
    hits: 0,
    misses: 0,
    coalesced: 0,
    bytesFromCache: 0,
    bytesFromOrigin: 0,
    verificationFailures: 0,
    commits: 0,
    evictions: 0,
    passThrough: {},
  };
  /** Policy hooks; see {@linkcode CacheHooks}. */
  readonly hooks: CacheHooks = {};

  constructor(store: ImageStore) {
    this.store = store;
  }

  /** The fill a new request for `id` may join. */
  joinable(id: string): Fill | undefined {
    const fill = this.#fills.get(id);
    return fill?.joinable ? fill : undefined;
  }

  /**
   * The fill a new request for `id` may join, after checking it still holds
   * the store's lock: another process may have deleted it (deletion wins).
   */
  async joinableOwned(id: string): Promise<Fill | undefined> {
    const fill = this.joinable(id);
    if (fill === undefined || await fill.checkOwned()) return fill;
    if (this.#fills.get(id) === fill) this.#fills.delete(id);
    return undefined;
  }

  /** Ids whose origin answer is awaited by a miss in this process. */
  claimed(): string[] {
    return [...this.#claims.keys()];
  }

  /** Whether this process is filling (or about to fill) `id`. */
  busy(id: string): boolean {
    return this.#fills.has(id) || this.#claims.has(id);
  }

  /** Ids of the fills under way in this process. */
  filling(): string[] {
    return [...this.#fills.keys()];
  }

  /** Counts a miss not stored, by its `Cache-Status` detail. */
  countPassThrough(detail: string): void {
    this.counters.passThrough[detail] = (this.counters.passThrough[detail] ?? 0) + 1;
  }

  /**
   * Claims the miss of `id` for the caller: `own` is true when the caller
   * must ask the origin and settle the claim; otherwise `claim.fill` tells
   * what the owner's answer became.
   */
  claim(id: string): { own: true; claim: OwnClaim } | { own: false; claim: Claim } {
    const existing = this.#claims.get(id);
    if (existing !== undefined) return { own: false, claim: existing };
    let resolve!: (fill: Fill | undefined) => void;
    const claim: OwnClaim = {
      fill: new Promise((r) => resolve = r),
      evicted: false,
      started: Date.now(),
      resolve: (fill) => {
        if (this.#claims.get(id) === claim) this.#claims.delete(id);
        resolve(fill);
      },
    };
    this.#claims.set(id, claim);
    return { own: true, claim };
  }

  /**
   * Turns an origin `200` into a fill of the store. Returns the fill, or
   * the reason it is not stored (a `Cache-Status` detail).
   */
  async startFill(
    id: string,
    response: Response,
    options: StartFillOptions,
  ): Promise<Fill | string> {
    const store = this.store;
    const expectedLength = contentLength(response.headers);
    if (response.body === null) return "no-body";
    if (options.claim?.evicted) return "deleted";
    const previous = this.#fills.get(id);
    if (previous?.joinable) return "busy";
    // A fill that failed or stopped storing is letting go of the store's name: wait for it.
    await previous?.released;
    if (expectedLength !== undefined && expectedLength > store.maxSize) return "too-large";
    const hooks = this.hooks;
    let writer;
    try {
      const refusal = await hooks.admit?.(id, expectedLength);
      if (refusal !== undefined) return refusal;
    } catch (error) {
      options.onError(error);
      return "store-error";
    }
    const release = () => hooks.release?.(id);
    try {
      writer = await store.createWriter(id, {
        expectedSize: expectedLength,
        since: options.claim?.started,
      });
    } catch (error) {
      release();
      options.onError(error);
      return "store-error";
    }
    if (typeof writer === "string") {
      release();
      if (writer !== "busy" || !options.shareWhenBusy) return writer;
    }
    if (typeof writer === "object" && (options.claim?.evicted || this.#fills.get(id)?.joinable)) {
      release();
      await writer.abort("discard").catch(options.onError);
      await writer.close().catch(options.onError);
      return options.claim?.evicted ? "deleted" : "busy";
    }
    const responseHeaders = new Headers();
    for (const [name, value] of response.headers) {
      if (!NOT_FOR_JOINERS.has(name)) responseHeaders.set(name, value);
    }
    if (typeof writer === "string") {
      // Another process owns the fill: not stored here, shared by this process's
      // waiters. Its bytes come from the other process's file while it grows,
      // with the origin's body held in reserve (src/_follow.ts).
      const follower = await store.follow?.(id).catch((error) => {
        options.onError(error);
        return undefined;
      });
      const source = follower === undefined
        ? response.body
        : followedSource(follower, response.body, expectedLength, { stallTime: FOLLOW_STALL });
      return new Fill({
        id,
        writer: NO_WRITER,
        source,
        followed: follower !== undefined,
        expectedLength,
        expected: options.expected,
        storedHeaders: {},
        responseHeaders,
        completeOnAbort: false,
        commit: false,
        onError: options.onError,
      });
    }
    const fill = new Fill({
      id,
      writer,
      source: response.body,
      expectedLength,
      expected: options.expected,
      storedHeaders: storableHeaders(response.headers),
      responseHeaders,
      completeOnAbort: options.completeOnAbort,
      commit: true,
      onError: options.onError,
    });
    this.#fills.set(id, fill);
    fill.done.then(async () => {
      if (this.#fills.get(id) === fill) this.#fills.delete(id);
      const counters = this.counters;
      counters.bytesFromOrigin += fill.written;
      if (fill.error?.reason === "digest" || fill.error?.reason === "length") {
        counters.verificationFailures++;
      }
      release();
      if (fill.committed !== undefined) {
        counters.commits++;
        try {
          await hooks.committed?.(fill.committed);
        } catch (error) {
          options.onError(error);
        }
      }
    });
    return fill;
  }

  /**
   * Deletion wins (invariant 7): the fill under way will not commit, later
   * requests do not join it, a pending claim will not be stored, and the
   * entry, its queue marker (unless `keepQueued`) and partial data are
   * removed. Resolves whether anything existed.
   */
  async evict(id: string, options: { keepQueued?: boolean } = {}): Promise<boolean> {
    const claim = this.#claims.get(id);
    if (claim !== undefined) {
      claim.evicted = true;
      this.#claims.delete(id);
    }
    const fill = this.#fills.get(id);
    let found = claim !== undefined;
    if (fill !== undefined) {
      found = true;
      this.#fills.delete(id);
      await fill.evict();
    }
    const store = this.store;
    // A tombstone first: a miss another process started before now will not
    // commit. Then the lock: a fill of another process cannot commit either,
    // and what it committed before is removed next.
    await store.markDeleted?.(id);
    if (await store.deleteIncomplete(id)) found = true;
    if (await store.delete(id)) found = true;
    if (!options.keepQueued && await store.dequeue(id)) found = true;
    this.hooks.evicted?.(id);
    return found;
  }

  /**
   * Evicts every image: committed entries, fills under way here or in
   * another process, misses awaiting their origin answer. Queue markers
   * stay with `keepQueued`. Resolves how many committed entries were removed.
   */
  async evictAll(options: { keepQueued?: boolean } = {}): Promise<number> {
    const store = this.store;
    await store.markDeleted?.();
    const entries = (await store.list()).map((entry) => entry.id);
    const ids = new Set([
      ...entries,
      ...this.#fills.keys(),
      ...this.#claims.keys(),
      ...await store.listIncomplete(),
    ]);
    let removed = 0;
    const committed = new Set(entries);
    for (const id of ids) {
      if (await this.evict(id, options) && committed.has(id)) removed++;
    }
    return removed;
  }

  /** Waits for every fill under way (tests, shutdown). */
  async settle(): Promise<void> {
    await Promise.all([...this.#fills.values()].map((fill) => fill.done));
  }
}

export { Fill, FillError };

const cores = new WeakMap<ImageStore, CacheCore>();

/** The core of `store`: one per store, shared by middleware and management API. */
export function coreFor(store: ImageStore): CacheCore {
  let core = cores.get(store);
  if (core === undefined) {
    core = new CacheCore(store);
    installPruning(core);
    cores.set(store, core);
  }
  return core;
}
