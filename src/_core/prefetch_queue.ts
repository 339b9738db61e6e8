/**
 * The prefetch queue's worker: Glance's prefetcher without cron. Queued
 * ids (`store.queued()`, which survives a restart) are fetched in queue
 * order, at most `concurrency` at once, each through
 * {@linkcode prefetchImage}: the same claim, coalescing and verification
 * as a miss. A commit removes the id from the queue (the store does it); a
 * failure leaves it queued and retried with exponential backoff, up to
 * `maxAttempts` failures: then it stays queued, marked as given up, until
 * it is queued again.
 *
 * @module
 */
import type { CacheCore } from "./core.ts";
import { unrefTimer } from "../_runtime.ts";
import { type FetchImage, prefetchImage, type PrefetchOptions } from "./prefetch.ts";

/** Options of {@linkcode PrefetchQueue}. */
export interface PrefetchQueueOptions
  extends Pick<PrefetchOptions, "expectedDigest" | "requireDigest" | "onError"> {
  /** Prefetches at once. */
  concurrency: number;
  /** Milliseconds before the first retry; doubled after each failure. */
  retryDelay: number;
  /** Longest wait between retries, in milliseconds. */
  maxRetryDelay: number;
  /** Failed attempts after which an image is tried no more (`Infinity`: always retried). */
  maxAttempts: number;
}

/** Why a queued image is still queued after an attempt. */
export interface PrefetchFailure {
  /** Failed attempts so far. */
  attempts: number;
  /** The reason of the last failure (a `Cache-Status` detail such as `status-404`). */
  reason: string;
  /** When the next attempt is due, in milliseconds since the epoch; `Infinity` once given up. */
  next: number;
  /** Whether `maxAttempts` attempts failed and the image is tried no more. */
  gaveUp: boolean;
}

/** Works the prefetch queue of one store. */
export class PrefetchQueue {
  readonly #core: CacheCore;
  readonly #fetchImage: FetchImage;
  readonly #options: PrefetchQueueOptions;
  readonly #running = new Map<string, Promise<void>>();
  readonly #failures = new Map<string, PrefetchFailure>();
  readonly #controller = new AbortController();
  #timer: ReturnType<typeof setTimeout> | undefined;
  #timerDue = Infinity;
  #scanning: Promise<void> | undefined;
  #rescan = false;

  constructor(core: CacheCore, fetchImage: FetchImage, options: PrefetchQueueOptions) {
    this.#core = core;
    this.#fetchImage = fetchImage;
    this.#options = options;
  }

  /** Whether `close()` was called. */
  get closed(): boolean {
    return this.#controller.signal.aborted;
  }

  /** Whether `id` is being prefetched right now. */
  running(id: string): boolean {
    return this.#running.has(id);
  }

  /** The last failure of a queued id still waiting for a retry. */
  failure(id: string): PrefetchFailure | undefined {
    const failure = this.#failures.get(id);
    return failure && { ...failure };
  }

  /** Looks at the queue again: new ids start at once (up to the concurrency). */
  kick(): void {
    if (this.closed) return;
    if (this.#scanning !== undefined) {
      this.#rescan = true;
      return;
    }
    this.#scanning = this.#scan().finally(() => this.#scanning = undefined);
  }

  /** `id` was queued again by hand: forget its backoff and try it now. */
  retryNow(id: string): void {
    this.#failures.delete(id);
    this.kick();
  }

  async #scan(): Promise<void> {
    const { concurrency, retryDelay, onError } = this.#options;
    do {
      this.#rescan = false;
      let queued;
      try {
        queued = await this.#core.store.queued();
      } catch (error) {
        onError(error);
        this.#wakeAt(Date.now() + retryDelay);
        return;
      }
      if (this.closed) return;
      const waiting = new Set(queued);
      for (const id of this.#failures.keys()) {
        if (!waiting.has(id)) this.#failures.delete(id); // Dequeued: no retry.
      }
      const now = Date.now();
      let wake = Infinity;
      for (const id of queued) {
        if (this.#running.size >= concurrency) break;
        if (this.#running.has(id)) continue;
        const failure = this.#failures.get(id);
        if (failure !== undefined && failure.next > now) {
          wake = Math.min(wake, failure.next);
          continue;
        }
        this.#start(id);
      }
      if (wake < Infinity) this.#wakeAt(wake);
    } while (this.#rescan && !this.closed);
  }

  /** Scans again at `time` (one timer, unref'd, for the earliest due retry). */
  #wakeAt(time: number): void {
    if (this.closed || time >= this.#timerDue) return;
    clearTimeout(this.#timer);
    this.#timerDue = time;
    this.#timer = setTimeout(() => {
      this.#timer = undefined;
      this.#timerDue = Infinity;
      this.kick();
    }, Math.max(0, time - Date.now()));
    unrefTimer(this.#timer);
  }

  #start(id: string): void {
    const job = this.#attempt(id)
      .catch((error) => this.#options.onError(error))
      .finally(() => {
        this.#running.delete(id);
        this.kick();
      });
    this.#running.set(id, job);
  }

  async #attempt(id: string): Promise<void> {
    const core = this.#core;
    const store = core.store;
    const options = this.#options;
    // Another process filling it: no second download; look again later.
    let reason = await store.isFilling(id) ? "busy" : undefined;
    if (reason === undefined) {
      reason = await prefetchImage(core, id, this.#fetchImage, {
        onError: options.onError,
        expectedDigest: options.expectedDigest,
        requireDigest: options.requireDigest,
        signal: this.#controller.signal,
      });
    }
    if (this.closed) return;
    if (reason === undefined) {
      this.#failures.delete(id);
      core.counters.prefetchesCached++;
      // Committing dequeues; an image that was cached already still had its marker.
      await store.dequeue(id);
      return;
    }
    const previous = this.#failures.get(id);
    if (reason === "busy") {
      // A fill of this image is under way (here or elsewhere): not a failure.
      this.#failures.set(id, {
        attempts: previous?.attempts ?? 0,
        reason,
        next: Date.now() + options.retryDelay,
        gaveUp: false,
      });
      return;
    }
    if (reason === "deleted") return; // Deleted meanwhile: no longer queued, nothing to retry.
    const attempts = (previous?.attempts ?? 0) + 1;
    core.counters.prefetchesFailed++;
    if (attempts >= options.maxAttempts) {
      // Retrying what keeps failing (a refused credential, an image gone) only loads the origin.
      this.#failures.set(id, { attempts, reason, next: Infinity, gaveUp: true });
      core.counters.prefetchesGaveUp++;
      options.onError(
        new Error(
          `Prefetch of image "${id}" failed (${reason}); gave up after ${attempts} attempts (queue it again to retry)`,
        ),
      );
      return;
    }
    const delay = Math.min(options.maxRetryDelay, options.retryDelay * 2 ** (attempts - 1));
    this.#failures.set(id, { attempts, reason, next: Date.now() + delay, gaveUp: false });
    options.onError(
      new Error(`Prefetch of image "${id}" failed (${reason}); retry in ${Math.round(delay)} ms`),
    );
  }

  /** Stops the worker: no new attempts, fetches under way are aborted. */
  async close(): Promise<void> {
    this.#controller.abort(new Error("The prefetch queue was closed"));
    clearTimeout(this.#timer);
    this.#timer = undefined;
    await this.#scanning;
    await Promise.allSettled([...this.#running.values()]);
  }
}
