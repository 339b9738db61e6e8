/**
 * The pruning policy: the cache manages its own size, without cron.
 *
 * - **Space is reserved when a fill starts.** A fill announcing a
 *   `Content-Length` is admitted only when committed bytes plus every
 *   reservation plus its own length fit in `maxSize` (after evicting
 *   least-recently-used entries if needed), so concurrent fills cannot
 *   overshoot `maxSize` together. A fill that cannot fit even after
 *   eviction, or larger than `maxObjectSize`, passes through uncached.
 * - **A commit that takes the cache over `maxSize`** (an answer without
 *   `Content-Length`, or another process sharing the directory) evicts
 *   least-recently-used entries at once.
 * - **`minFree`** (a store that can tell its free space, as
 *   `FileSystemStore.freeSpace()` does): the disk keeps that many bytes
 *   free; a store that cannot tell skips the check.
 * - Least recently used: oldest `lastAccessed` first, then oldest commit,
 *   fewest hits, id. Stores persist hits and last access, so the order
 *   survives a restart. An entry being filled is never evicted. When
 *   pruning evicts an entry served in the last second, its file is removed
 *   a second later (a hit's file may not be open yet: Bun opens
 *   it lazily); it leaves the accounting at once.
 *
 * The committed entries are listed once, then kept up to date by the core
 * (commit, eviction), so admitting a fill costs no I/O; they are listed again every
 * 30 seconds (or 100 times as long as a listing takes, on a huge cache),
 * since other processes may share the directory, and before an explicit
 * prune. An eviction candidate is checked with `store.get()` (one `stat`)
 * first, which also catches hits since the listing.
 *
 * @module
 */
import type { CacheStatusDetail } from "../cache_status.ts";
import type { ImageEntry, ImageStore } from "../image_store.ts";

/** Automatic pruning removes the file of an entry served this recently (ms) only this much later. */
const SERVE_GRACE = 1_000;
/** Running totals older than this (ms) are re-read from the store before admitting a fill. */
const RESYNC_AFTER = 30_000;

/** The space a fill under way holds (see {@linkcode Pruner.admit}). */
export interface Reservation {
  /** The image filled. */
  readonly id: string;
  /** Bytes held: the fill's announced length (0 when unknown). */
  readonly bytes: number;
}

/** What a prune removed. */
export interface PruneResult {
  /** Entries removed. */
  files: number;
  /** Bytes of data removed. */
  bytes: number;
}

/** The cache's size as the pruner sees it. */
export interface CacheUsage {
  /** Bytes of committed entries. */
  bytes: number;
  /** Committed entries. */
  entries: number;
  /** Bytes reserved by fills under way. */
  reserved: number;
}

/** The optional limits a store may carry beyond `maxSize` (see {@linkcode FileSystemStore}). */
type LimitedStore = ImageStore & {
  readonly maxObjectSize?: number;
  readonly minFree?: number;
  /** Free bytes where the store keeps its data; `undefined` when it cannot tell. */
  freeSpace?(): Promise<number | undefined>;
};

/**
 * Least recently used first: last access, then commit time (of two entries
 * last used in the same millisecond, the older goes: an image just filled
 * stays), then hits, then id.
 */
function lruOrder(a: ImageEntry, b: ImageEntry): number {
  return a.lastAccessed - b.lastAccessed || a.created - b.created || a.hits - b.hits ||
    (a.id < b.id ? -1 : a.id > b.id ? 1 : 0);
}

/** What the pruner needs to know of the fills under way (the cache core). */
export interface PrunerHost {
  /** The store to prune. */
  readonly store: ImageStore;
  /** Whether `id` is being filled (or about to be): never a victim. */
  busy(id: string): boolean;
  /** Bytes the fill of `id` under way has received (0 when none). */
  received(id: string): number;
  /** Told once per entry removed by pruning. */
  evicted(id: string): void;
}

/** The pruning policy of one store's core. */
export class Pruner {
  readonly #core: PrunerHost;
  /**
   * Committed entries as last listed, plus commits and evictions since.
   * Access times in it may be older than the store's: an entry is checked
   * with `store.get()` before it is evicted.
   */
  #entries = new Map<string, ImageEntry>();
  #committedBytes = 0;
  #syncedAt = -Infinity;
  /** How long the last `store.list()` took: a slow listing is repeated less often. */
  #syncCost = 0;
  /** Space held by fills under way: one reservation per fill, several fills of an id apart. */
  #reserved = new Set<Reservation>();
  #lock: Promise<unknown> = Promise.resolve();

  constructor(core: PrunerHost) {
    this.#core = core;
  }

  get #store(): LimitedStore {
    return this.#core.store as LimitedStore;
  }

  /** The largest entry the store accepts. */
  get #maxObjectSize(): number {
    const limit = this.#store.maxObjectSize;
    return typeof limit === "number" ? Math.min(limit, this.#store.maxSize) : this.#store.maxSize;
  }

  /** Runs `fn` after every earlier admission or prune: decisions never interleave. */
  #exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.#lock.then(fn, fn);
    this.#lock = run.catch(() => {});
    return run;
  }

  #set(id: string, entry: ImageEntry | undefined): void {
    this.#committedBytes -= this.#entries.get(id)?.size ?? 0;
    if (entry === undefined) {
      this.#entries.delete(id);
    } else {
      this.#entries.set(id, entry);
      this.#committedBytes += entry.size;
    }
  }

  /** Committed bytes plus reservations; an id both listed and reserved counts once. */
  #usage(): number {
    let usage = this.#committedBytes;
    for (const { id, bytes } of this.#reserved) {
      usage += Math.max(0, bytes - (this.#entries.get(id)?.size ?? 0));
    }
    return usage;
  }

  /** Reserved bytes not yet written to the disk (for `minFree`). */
  #unwritten(): number {
    let pending = 0;
    for (const { id, bytes } of this.#reserved) {
      pending += Math.max(0, bytes - this.#core.received(id));
    }
    return pending;
  }

  /** Whether the entries should be listed again (other processes may share the directory). */
  #stale(): boolean {
    return Date.now() - this.#syncedAt > Math.max(RESYNC_AFTER, 100 * this.#syncCost);
  }

  /** Re-reads the committed entries from the store. */
  async #resync(): Promise<void> {
    const started = Date.now();
    const entries = await this.#store.list();
    this.#entries.clear();
    this.#committedBytes = 0;
    for (const entry of entries) this.#set(entry.id, entry);
    this.#syncedAt = Date.now();
    this.#syncCost = this.#syncedAt - started;
  }

  /** Free bytes on the store's disk, when the store keeps `minFree` and the runtime can tell. */
  async #freeBytes(): Promise<number | undefined> {
    const store = this.#store;
    if (!(typeof store.minFree === "number" && store.minFree > 0)) return undefined;
    if (typeof store.freeSpace !== "function") return undefined;
    try {
      return await store.freeSpace();
    } catch {
      return undefined;
    }
  }

  /**
   * Bytes to evict so that `need` more bytes fit: over `maxSize`, or under
   * `minFree` on the disk. Zero when it fits.
   */
  #shortfall(need: number, free: number | undefined): number {
    const over = this.#usage() + need - this.#store.maxSize;
    const short = free === undefined
      ? 0
      : (this.#store.minFree ?? 0) + need + this.#unwritten() - free;
    return Math.max(0, over, short);
  }

  /**
   * Removes least-recently-used entries until `needed()` bytes are freed.
   * Never one being filled; the file of one served in the last second is
   * removed a second later. Each victim is checked with
   * `store.get()` first: an entry served since it was listed takes its new
   * place in the order; an entry gone meanwhile (a missing file) frees 0
   * bytes and is forgotten.
   * Unless `all`, removes nothing when it cannot free enough.
   */
  async #evict(
    needed: () => number,
    options: { all: boolean },
  ): Promise<PruneResult & { enough: boolean; later: Promise<void>[] }> {
    const result = { files: 0, bytes: 0, enough: needed() <= 0, later: [] as Promise<void>[] };
    if (result.enough) return result;
    const core = this.#core;
    const store = this.#store;
    const now = Date.now();
    const recent = (entry: ImageEntry) => entry.hits > 0 && now - entry.lastAccessed < SERVE_GRACE;
    const victims: ImageEntry[] = [];
    let planned = 0;
    // Least recently used first, by what the store says now: an entry served
    // since it was listed (by another process, say) takes its place again.
    const pending = [...this.#entries.values()].filter((entry) => !core.busy(entry.id))
      .sort(lruOrder);
    const checked = new Set<string>();
    while (pending.length > 0 && planned < needed()) {
      const listed = pending.shift()!;
      if (!checked.has(listed.id)) {
        checked.add(listed.id);
        let current;
        try {
          current = await store.get(listed.id);
        } catch {
          continue; // Cannot be judged now: not a victim.
        }
        if (current === undefined) {
          this.#set(listed.id, undefined); // Gone already: frees nothing, needs less.
          continue;
        }
        if (current.lastAccessed !== listed.lastAccessed || current.hits !== listed.hits) {
          this.#set(current.id, current);
          let at = 0;
          while (at < pending.length && lruOrder(pending[at], current) <= 0) at++;
          pending.splice(at, 0, current);
          continue;
        }
      }
      victims.push(listed);
      planned += listed.size;
    }
    if (planned < needed() && !options.all) return result;
    for (const entry of victims) {
      if (needed() <= 0) break;
      this.#set(entry.id, undefined);
      if (recent(entry)) {
        // Served within the grace: its body may not have opened its file yet
        // (Bun opens lazily), so the file goes a moment later. It leaves the
        // cache's accounting now: least recently used goes first, always.
        result.later.push(this.#removeLater(entry));
      } else {
        let removed = false;
        try {
          removed = await store.delete(entry.id);
        } catch {
          // An entry that cannot be removed (permissions) is skipped, not retried: no loop.
        }
        if (!removed) continue;
      }
      result.files++;
      result.bytes += entry.size;
      core.evicted(entry.id);
    }
    result.enough = needed() <= 0;
    return result;
  }

  /**
   * Removes `entry` once {@linkcode SERVE_GRACE} has passed, unless it was
   * replaced meanwhile. Never rejects.
   */
  #removeLater(entry: ImageEntry): Promise<void> {
    // Not unref'd: an explicit prune waits for it; it keeps a process alive a second at most.
    return new Promise<void>((resolve) => {
      setTimeout(async () => {
        try {
          const current = await this.#store.get(entry.id);
          if (current?.created === entry.created) await this.#store.delete(entry.id);
        } catch {
          // Gone, or cannot be removed: the next prune judges it again.
        }
        resolve();
      }, SERVE_GRACE);
    });
  }

  /**
   * Admits a fill of `expectedLength` bytes (unknown: nothing reserved),
   * evicting least-recently-used entries to make room. Resolves the fill's
   * {@linkcode Reservation} (to hand back to {@linkcode release} or
   * {@linkcode committed}), or a `Cache-Status` detail when it cannot fit:
   * `too-large` (over `maxObjectSize` or `maxSize`), `no-space` (the room is
   * held by fills under way, or the disk's `minFree`).
   */
  admit(
    id: string,
    expectedLength: number | undefined,
  ): Promise<Reservation | CacheStatusDetail> {
    const need = expectedLength ?? 0;
    if (need > this.#maxObjectSize) return Promise.resolve("too-large");
    return this.#exclusive(async () => {
      if (this.#stale()) await this.#resync();
      const free = await this.#freeBytes();
      if (this.#shortfall(need, free) > 0) {
        const { enough } = await this.#evict(() => this.#shortfall(need, free), { all: false });
        if (!enough) return "no-space";
      }
      const reservation = { id, bytes: need };
      this.#reserved.add(reservation);
      return reservation;
    });
  }

  /** Ends the reservation of a fill that ended. Idempotent. */
  release(reservation: Reservation): void {
    this.#reserved.delete(reservation);
  }

  /**
   * Accounts a committed entry (its reservation becomes committed bytes)
   * and prunes when the cache went over `maxSize`: an entry larger than
   * allowed is removed itself, otherwise least-recently-used ones.
   */
  committed(entry: ImageEntry, reservation?: Reservation): Promise<void> {
    // Synchronously, so no admission sees the bytes neither reserved nor committed.
    if (reservation !== undefined) this.#reserved.delete(reservation);
    this.#set(entry.id, entry);
    const tooLarge = entry.size > this.#maxObjectSize;
    if (!tooLarge && this.#usage() <= this.#store.maxSize) return Promise.resolve();
    return this.#exclusive(async () => {
      if (tooLarge) {
        if (await this.#store.delete(entry.id).catch(() => false)) {
          this.#core.evicted(entry.id);
        }
        this.#set(entry.id, undefined);
        return;
      }
      const maxSize = this.#store.maxSize;
      await this.#evict(() => this.#usage() - maxSize, { all: true });
    });
  }

  /** Forgets an entry removed by `CacheCore.evict`. */
  evicted(id: string): void {
    this.#set(id, undefined);
  }

  /**
   * Removes least-recently-used entries until committed bytes plus
   * reservations fit in `target` bytes (default `maxSize`), after listing
   * the store again. Entries being filled are never removed.
   */
  prune(target: number = this.#store.maxSize): Promise<PruneResult> {
    return this.#exclusive(async () => {
      await this.#resync();
      const { files, bytes, later } = await this.#evict(() => this.#usage() - target, {
        all: true,
      });
      // An explicit prune answers once the files are gone.
      await Promise.all(later);
      return { files, bytes };
    });
  }

  /** Committed bytes and entries (listed again when stale) and reserved bytes. */
  usage(): Promise<CacheUsage> {
    return this.#exclusive(async () => {
      if (this.#stale()) await this.#resync();
      let reserved = 0;
      for (const { bytes } of this.#reserved) reserved += bytes;
      return { bytes: this.#committedBytes, entries: this.#entries.size, reserved };
    });
  }
}
