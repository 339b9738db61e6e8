/**
 * The cache's logic above a store, shared by every middleware and
 * management API bound to the same store: claims for misses whose origin
 * answer is still awaited, the fills under way (one per image), the one
 * path by which an origin answer becomes a fill
 * ({@linkcode CacheCore.fillFromOrigin}), eviction, and the pruning policy
 * and counters of the store.
 *
 * @module
 */
import { Fill, FillError } from "../_fill/fill.ts";
import { followedSource } from "../_fill/follow.ts";
import { unrefTimer } from "../_runtime.ts";
import type { CacheStatusDetail } from "../cache_status.ts";
import { digestFromHeaders, type ExpectedDigest, isDigestAlgorithm } from "../digest.ts";
import type { ImageEntry, ImageStore } from "../image_store.ts";
import { Pruner, type Reservation } from "./prune.ts";

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
  /** Fills whose body verified but whose commit the store failed (fsync, rename). */
  commitFailures: number;
  /** Entries removed by pruning. */
  evictions: number;
  /** Misses not stored, by `Cache-Status` detail. */
  passThrough: Record<string, number>;
  /** Prefetches that ended with the image cached (committed, or found cached). */
  prefetchesCached: number;
  /** Queued images whose prefetch failed `maxAttempts` times and is tried no more. */
  prefetchesGaveUp: number;
  /** Prefetch attempts that failed (each is retried, up to `maxAttempts`). */
  prefetchesFailed: number;
}

/**
 * How long another process's fill may stand still, its owner alive, before a
 * process following it goes on from its own origin answer.
 */
const FOLLOW_STALL = 10_000;

/**
 * A miss whose origin answer is awaited: later requests for the image wait
 * for it ({@linkcode Claim.fill}) instead of asking the origin too. Settled
 * exactly once, by {@linkcode CacheCore.fillFromOrigin} or
 * {@linkcode Claim.abandon}.
 */
export class Claim {
  /** The image. */
  readonly id: string;
  /** When the claim was made (ms): a deletion after it wins, in any process. */
  readonly started: number = Date.now();
  /** Settles with the fill the answer became, or `undefined` when it did not. */
  readonly fill: Promise<Fill | undefined>;
  /** Set when the image was deleted meanwhile: the answer must not be stored. */
  evicted = false;
  #resolve!: (fill: Fill | undefined) => void;
  #settled = false;
  #onSettle: () => void;

  constructor(id: string, onSettle: () => void) {
    this.id = id;
    this.#onSettle = onSettle;
    this.fill = new Promise((resolve) => this.#resolve = resolve);
  }

  /** Whether the claim was settled. */
  get settled(): boolean {
    return this.#settled;
  }

  /** Settles the claim with `fill` (idempotent: the first settlement stands). */
  settle(fill: Fill | undefined): void {
    if (this.#settled) return;
    this.#settled = true;
    this.#onSettle();
    this.#resolve(fill);
  }

  /** Settles the claim without a fill (the origin failed, or the request went away). */
  abandon(): void {
    this.settle(undefined);
  }
}

/** How {@linkcode CacheCore.fillFromOrigin} treats an origin answer. */
export interface FillPolicy {
  /**
   * The digest the body must match.
   * @default {digestFromHeaders(response.headers)}
   */
  expectedDigest?: (
    response: Response,
  ) => ExpectedDigest | undefined | Promise<ExpectedDigest | undefined>;
  /** Refuse an answer that announces no digest. */
  requireDigest: boolean;
  /** Keep filling when the last client leaves. */
  completeOnAbort: boolean;
  /**
   * When another process is filling the image: still return a fill, one
   * that stores nothing (it follows the other process's file, with this
   * answer in reserve), so that the clients waiting on this claim share one
   * origin answer. Otherwise such an answer is refused as `busy`.
   */
  shareWhenBusy: boolean;
  /**
   * Milliseconds the origin's body may stand still before the fill fails.
   * @default {60000}
   */
  stallTimeout?: number;
  /** Cache-side faults. */
  onError: (error: unknown) => void;
}

/**
 * What became of an origin answer: a fill (`stored` false when it only
 * shares another process's fill), or why the answer passes through
 * uncached.
 */
export type FillOutcome =
  | { fill: Fill; stored: boolean; detail?: undefined }
  | { fill?: undefined; detail: CacheStatusDetail };

/**
 * Headers kept with an entry and replayed on hits: the representation's
 * metadata and its validators (RFC 9110 §8.8), so that a hit answers
 * preconditions as the origin would.
 */
const STORED_HEADERS = new Set([
  "content-type",
  "content-disposition",
  "content-encoding",
  "content-language",
  "etag",
  "last-modified",
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

/**
 * Whether this answer may take its bytes from another process's fill
 * verified against `theirs`: only when this answer has a digest of its own
 * (its own check then covers every byte, whatever their source) and the
 * other fill checks at least as much (the same length and digest, so its
 * commit proves the bytes to this answer too). An answer without a digest
 * could not tell the bytes of a fill that fails from right ones: it is
 * served itself.
 */
function checksAtLeast(
  theirs: { size?: number; digest?: { algorithm: string; value: string } } | undefined,
  size: number | undefined,
  digest: ExpectedDigest | undefined,
): boolean {
  if (digest === undefined) return false;
  if (size !== undefined && theirs?.size !== size) return false;
  return theirs?.digest?.algorithm === digest.algorithm &&
    theirs.digest.value === digest.value.toLowerCase();
}

/**
 * What the core tells its observers (cluster mode, src/_cluster/, keeps the
 * shared index current with them). Called synchronously; an observer must
 * not throw, and never blocks the core.
 */
export interface CoreObserver {
  /** A fill of this process committed `entry`. */
  committed?(entry: ImageEntry): void;
  /** `id` was removed from the store (evicted, deleted or pruned). */
  removed?(id: string): void;
}

/** One store's claims, fills, pruning policy and counters. */
export class CacheCore {
  readonly store: ImageStore;
  readonly #fills = new Map<string, Fill>();
  readonly #claims = new Map<string, Claim>();
  /** Counters for metrics. */
  readonly counters: CacheCounters = {
    hits: 0,
    misses: 0,
    coalesced: 0,
    bytesFromCache: 0,
    bytesFromOrigin: 0,
    verificationFailures: 0,
    commits: 0,
    commitFailures: 0,
    evictions: 0,
    passThrough: {},
    prefetchesCached: 0,
    prefetchesFailed: 0,
    prefetchesGaveUp: 0,
  };
  /** The store's size policy: admission, automatic and explicit pruning. */
  readonly pruner: Pruner;
  // Cluster mode's seam (src/_cluster/): see observe().
  readonly #observers = new Set<CoreObserver>();

  constructor(store: ImageStore) {
    this.store = store;
    this.pruner = new Pruner({
      store,
      busy: (id) => this.busy(id),
      received: (id) => this.joinable(id)?.written ?? 0,
      evicted: (id) => {
        this.counters.evictions++;
        this.#tell("removed", id);
      },
    });
    // A store may start over its limit (other processes committed, or the
    // limit was lowered): bring it within maxSize at start, not at the first
    // commit. The timer does not keep the process alive.
    const timer = setTimeout(() => {
      this.pruner.prune().catch(() => {});
    }, 0);
    unrefTimer(timer);
  }

  /**
   * Adds an observer of commits and removals (cluster mode's seam);
   * returns the function that removes it.
   */
  observe(observer: CoreObserver): () => void {
    this.#observers.add(observer);
    return () => this.#observers.delete(observer);
  }

  #tell<K extends keyof CoreObserver>(
    event: K,
    value: Parameters<NonNullable<CoreObserver[K]>>[0],
  ) {
    for (const observer of this.#observers) {
      try {
        (observer[event] as ((value: unknown) => void) | undefined)?.(value);
      } catch {
        // An observer must not break the core.
      }
    }
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

  /** Whether this process is filling (or about to fill) `id`. */
  busy(id: string): boolean {
    return this.#fills.has(id) || this.#claims.has(id);
  }

  /** Ids of the fills under way in this process. */
  filling(): string[] {
    return [...this.#fills.keys()];
  }

  /** Counts a request answered from a committed entry, with the bytes its answer announced. */
  countHit(bytes: number): void {
    this.counters.hits++;
    this.counters.bytesFromCache += bytes;
  }

  /** Counts a request that went to the origin. */
  countMiss(): void {
    this.counters.misses++;
  }

  /** Counts a request that joined a fill another request started. */
  countCoalesced(): void {
    this.counters.coalesced++;
  }

  /** Counts a miss not stored, by its `Cache-Status` detail. */
  countPassThrough(detail: CacheStatusDetail): void {
    this.counters.passThrough[detail] = (this.counters.passThrough[detail] ?? 0) + 1;
  }

  /**
   * Claims the miss of `id` for the caller: `own` is true when the caller
   * must ask the origin and then call {@linkcode fillFromOrigin} (or
   * {@linkcode Claim.abandon}); otherwise `claim.fill` tells what the
   * owner's answer became.
   */
  claim(id: string): { own: boolean; claim: Claim } {
    const existing = this.#claims.get(id);
    if (existing !== undefined) return { own: false, claim: existing };
    const claim: Claim = new Claim(id, () => {
      if (this.#claims.get(id) === claim) this.#claims.delete(id);
    });
    this.#claims.set(id, claim);
    return { own: true, claim };
  }

  /**
   * The one path by which an origin answer becomes a fill: checks the
   * answer (a full `200` with a body), finds the digest it must match,
   * admits it (size, space), takes the store's writer and starts the fill.
   * Settles `claim` either way. Never rejects: a fault of the store (or of
   * a policy callback) is reported to `onError` and the answer passes
   * through (`store-error`, `digest-error`).
   */
  async fillFromOrigin(
    claim: Claim,
    response: Response,
    policy: FillPolicy,
  ): Promise<FillOutcome> {
    let outcome: FillOutcome;
    try {
      outcome = await this.#admit(claim, response, policy);
    } catch (error) {
      policy.onError(error);
      outcome = { detail: "store-error" };
    }
    claim.settle(outcome.fill);
    return outcome;
  }

  async #admit(claim: Claim, response: Response, policy: FillPolicy): Promise<FillOutcome> {
    if (response.status !== 200 || response.headers.has("content-range")) {
      return { detail: `status-${response.status}` };
    }
    let expected;
    try {
      expected = policy.expectedDigest === undefined
        ? digestFromHeaders(response.headers)
        : await policy.expectedDigest(response);
      if (expected !== undefined && !isDigestAlgorithm(expected.algorithm)) {
        throw new TypeError(`Unsupported digest algorithm ${JSON.stringify(expected.algorithm)}`);
      }
    } catch (error) {
      policy.onError(error);
      return { detail: "digest-error" };
    }
    if (expected === undefined && policy.requireDigest) return { detail: "no-digest" };
    return await this.#startFill(claim, response, expected, policy);
  }

  async #startFill(
    claim: Claim,
    response: Response,
    expected: ExpectedDigest | undefined,
    policy: FillPolicy,
  ): Promise<FillOutcome> {
    const { id } = claim;
    const store = this.store;
    const expectedLength = contentLength(response.headers);
    if (response.body === null) return { detail: "no-body" };
    if (claim.evicted) return { detail: "deleted" };
    const previous = this.#fills.get(id);
    if (previous?.joinable) return { detail: "busy" };
    // A fill that failed or stopped storing is letting go of the store's name: wait for it.
    await previous?.released;
    if (expectedLength !== undefined && expectedLength > store.maxSize) {
      return { detail: "too-large" };
    }
    const pruner = this.pruner;
    let reservation;
    try {
      reservation = await pruner.admit(id, expectedLength);
    } catch (error) {
      policy.onError(error);
      return { detail: "store-error" };
    }
    if (typeof reservation === "string") return { detail: reservation };
    let writer;
    try {
      writer = await store.createWriter(id, {
        expectedSize: expectedLength,
        expectedDigest: expected,
        since: claim.started,
      });
    } catch (error) {
      pruner.release(reservation);
      policy.onError(error);
      return { detail: "store-error" };
    }
    if (typeof writer === "string") {
      pruner.release(reservation);
      if (writer !== "busy" || !policy.shareWhenBusy) return { detail: writer };
    }
    if (typeof writer === "object" && (claim.evicted || this.#fills.get(id)?.joinable)) {
      pruner.release(reservation);
      await writer.abort("discard").catch(policy.onError);
      await writer.close().catch(policy.onError);
      return { detail: claim.evicted ? "deleted" : "busy" };
    }
    const responseHeaders = new Headers();
    for (const [name, value] of response.headers) {
      if (!NOT_FOR_JOINERS.has(name)) responseHeaders.set(name, value);
    }
    if (typeof writer === "string") {
      // Another process owns the fill: not stored here, shared by this process's
      // waiters. Its bytes come from the other process's file while it grows,
      // with the origin's body held in reserve (src/_fill/follow.ts).
      let follower = await store.follow?.(id).catch((error) => {
        policy.onError(error);
        return undefined;
      });
      if (follower !== undefined && !checksAtLeast(follower.expected, expectedLength, expected)) {
        // Its commit would not prove its bytes to this answer's checks: this
        // answer's own body is served instead (never another origin's bytes).
        await follower.close().catch(policy.onError);
        follower = undefined;
      }
      const followed = follower === undefined
        ? undefined
        : followedSource(follower, response.body, expectedLength, { stallTime: FOLLOW_STALL });
      const fill = new Fill({
        id,
        writer: undefined,
        source: followed?.stream ?? response.body,
        backing: followed?.backing,
        followed: followed !== undefined,
        expectedLength,
        expected,
        storedHeaders: {},
        responseHeaders,
        completeOnAbort: false,
        stallTimeout: policy.stallTimeout,
        onError: policy.onError,
      });
      return { fill, stored: false };
    }
    const fill = new Fill({
      id,
      writer,
      source: response.body,
      expectedLength,
      expected,
      storedHeaders: storableHeaders(response.headers),
      responseHeaders,
      completeOnAbort: policy.completeOnAbort,
      stallTimeout: policy.stallTimeout,
      onError: policy.onError,
    });
    this.#fills.set(id, fill);
    fill.done.then(() => this.#ended(fill, reservation, policy.onError));
    return { fill, stored: true };
  }

  /** Accounts a stored fill that ended, committed or not. */
  async #ended(
    fill: Fill,
    reservation: Reservation,
    onError: (error: unknown) => void,
  ): Promise<void> {
    if (this.#fills.get(fill.id) === fill) this.#fills.delete(fill.id);
    const counters = this.counters;
    counters.bytesFromOrigin += fill.written;
    const reason = fill.error?.reason;
    if (reason === "digest" || reason === "length") counters.verificationFailures++;
    if (reason !== undefined && reason !== "cancelled") {
      // Its clients were cut (not one left: "cancelled"): worth a line, with why.
      onError(new Error(`The fill of "${fill.id}" failed (${reason}): ${fill.error!.message}`));
    }
    if (fill.committed === undefined) {
      if (fill.commitFailed) counters.commitFailures++;
      this.pruner.release(reservation);
      return;
    }
    counters.commits++;
    this.#tell("committed", fill.committed);
    try {
      await this.pruner.committed(fill.committed, reservation);
    } catch (error) {
      onError(error);
    }
  }

  /**
   * Deletion wins (invariant 7): the fill under way will not commit, later
   * requests do not join it, a pending claim will not be stored, and the
   * entry, its queue marker (unless `keepQueued`) and partial data are
   * removed. Resolves whether anything existed.
   */
  async evict(
    id: string,
    options: { keepQueued?: boolean; tombstoned?: boolean } = {},
  ): Promise<boolean> {
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
    if (!options.tombstoned) await store.markDeleted?.(id);
    if (await store.deleteIncomplete(id)) found = true;
    if (await store.delete(id)) found = true;
    if (!options.keepQueued && await store.dequeue(id)) found = true;
    this.pruner.evicted(id);
    this.#tell("removed", id);
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
    // The tombstone of every image is down: one per image would only slow a cluster-wide
    // delete, whose peers have EVICT_TIMEOUT (src/_cluster/node.ts) to answer.
    for (const id of ids) {
      if (await this.evict(id, { ...options, tombstoned: true }) && committed.has(id)) removed++;
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
    cores.set(store, core);
  }
  return core;
}
