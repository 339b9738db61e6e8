/**
 * One node of a cluster: its registration and heartbeat, the index rows it
 * keeps current (from the core's commits and removals, and a periodic sync
 * with the store for hits, prunes and cleans), the routing of a miss (a
 * peer that has the image or is filling it, else the image's fill lease and
 * the origin), cluster-wide deletions (NOTIFY and a direct fan-out), and a
 * database outage (the node serves as a single node, then rejoins).
 *
 * The database is never on the path of a hit.
 *
 * @module
 */
import type { Hono } from "hono";
import { type CacheCore, coreFor } from "../_core/core.ts";
import type { FetchImage } from "../_core/prefetch.ts";
import { unrefTimer } from "../_runtime.ts";
import type { ExpectedDigest } from "../digest.ts";
import type { ImageEntry, ImageStore } from "../image_store.ts";
import { connect, guardClientCrashes, migrate, type Sql } from "./database.ts";
import {
  askPeer,
  type Eviction,
  evictOnPeer,
  type PeerAnswer,
  peerApp,
  type PeerClient,
  type PeerHost,
} from "./peer.ts";
import { EVICT_CHANNEL, type Holder, Registry } from "./registry.ts";
import { resilientSource } from "./source.ts";

/** Settings of a node, checked by `joinCluster`. */
export interface NodeSettings {
  store: ImageStore;
  database: string;
  selfUrl: string;
  secret: string;
  fetchImage?: FetchImage;
  heartbeatInterval: number;
  deadAfter: number;
  syncInterval: number;
  peerStallTimeout: number;
  peerHeadersTimeout: number;
  onError: (error: unknown) => void;
  onLog: (line: string) => void;
}

/** Counters of a node, for metrics. */
export interface ClusterCounters {
  /** Misses answered by a peer (not the origin). */
  peerFills: number;
  /** Bytes received from peers. */
  peerBytes: number;
  /** Transfers to peers. */
  servedToPeers: number;
  /** Sources replaced mid-stream (a peer died or stalled). */
  switches: number;
  /** Fill leases taken (this node read the origin for the cluster). */
  leases: number;
  /** Times the database became unreachable. */
  outages: number;
}

/** A peer's answer for a miss, ready for `CacheCore.fillFromOrigin`. */
export interface PeerServe {
  /** A `200` with the image's headers; its body streams from peers (see resilientSource). */
  response: Response;
  /** The digest the body must match (`undefined`: the source itself checks it at the end). */
  expected: ExpectedDigest | undefined;
  /** The first peer's self URL. */
  peer: string;
}

/** Milliseconds a routing query may take before the miss goes to the origin (a slow database is not down). */
const QUERY_TIMEOUT = 5_000;
/**
 * The peers a cluster-wide delete asks directly while the database is up:
 * those it lists as live, and those known from the last syncs. A node just
 * back from a database outage may not be listed yet (its heartbeat is
 * older than `deadAfter`) nor listening again (its NOTIFY is lost), yet it
 * serves, and its peers fill from it: only a direct ask reaches it. A dead
 * URL among them costs at most EVICT_TIMEOUT.
 */
export function evictionTargets(listed: readonly string[], known: readonly string[]): string[] {
  return [...new Set([...listed, ...known])];
}

/** Milliseconds a cluster-wide delete waits for each peer's answer. */
const EVICT_TIMEOUT = 2_000;
/** Syncs in a row that must miss a peer before a delete stops asking it directly. */
const PEER_MISSES = 3;

/** A query that took too long: the database is slow, not (yet) known to be down. */
class Slow extends Error {}

function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  return Promise.race([
    promise,
    new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Slow(`${what} took more than ${ms} ms`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

/** Cached holders first (shuffled, to spread the load), then fillers. */
function order(holders: Holder[]): Holder[] {
  const cached = holders.filter((holder) => holder.state === "cached");
  for (let i = cached.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [cached[i], cached[j]] = [cached[j], cached[i]];
  }
  return [...cached, ...holders.filter((holder) => holder.state === "filling")];
}

/** What a cluster-wide delete did. */
export interface EvictionResult {
  /** Whether any node had anything. */
  found: boolean;
  /**
   * Whether it reached every node: through the database (rows, NOTIFY), or,
   * with the database away, every peer known at the last sync answered.
   */
  everywhere: boolean;
}

/** One node of a cluster (the object `joinCluster` resolves). */
export class ClusterNode implements PeerHost, PeerClient {
  readonly store: ImageStore;
  readonly core: CacheCore;
  readonly selfUrl: string;
  readonly secret: string;
  readonly headersTimeout: number;
  readonly counters: ClusterCounters = {
    peerFills: 0,
    peerBytes: 0,
    servedToPeers: 0,
    switches: 0,
    leases: 0,
    outages: 0,
  };
  readonly peerApp: Hono;
  readonly #settings: NodeSettings;
  #sql: Sql;
  readonly #registry: Registry;
  /** Heartbeats failed in a row while the database is down. */
  #failedBeats = 0;
  #up = true;
  #closed = false;
  #timer: ReturnType<typeof setInterval> | undefined;
  #beating: Promise<void> | undefined;
  #lastSync = 0;
  /** Index writes, one at a time, in order (a commit's row before its lease goes). */
  #writes: Promise<void> = Promise.resolve();
  /** Images whose fill lease this node holds. */
  readonly #leases = new Set<string>();
  /**
   * The peers asked directly by a delete while the database is away: each
   * URL a sync listed, with how many syncs in a row have not listed it
   * since. A URL stays known until {@linkcode PEER_MISSES} syncs have missed
   * it: right after an outage a live peer may not have heartbeaten yet, and
   * a delete had better answer 503 for a dead URL than 204 without a live one.
   */
  readonly #peerMisses = new Map<string, number>();
  #unobserve: () => void = () => {};
  #unguard: () => void = () => {};
  #unlisten: (() => Promise<void>) | undefined;

  private constructor(settings: NodeSettings, sql: Sql) {
    this.#settings = settings;
    this.#sql = sql;
    this.store = settings.store;
    this.core = coreFor(settings.store);
    this.selfUrl = settings.selfUrl;
    this.secret = settings.secret;
    this.headersTimeout = settings.peerHeadersTimeout;
    this.#registry = new Registry(sql, settings.selfUrl, settings.deadAfter);
    this.peerApp = peerApp(this);
  }

  /**
   * Connects, migrates, registers, writes this node's rows and listens for
   * deletions. Rejects with one line when the database cannot be used.
   */
  static async start(settings: NodeSettings): Promise<ClusterNode> {
    const sql = await connect(settings.database, { name: `hono-image-cache ${settings.selfUrl}` });
    const node = new ClusterNode(settings, sql);
    try {
      await migrate(sql);
      await node.#registry.register();
      await node.#registry.sync(await node.store.list());
      node.#listed(await node.#registry.peers());
      node.#lastSync = Date.now();
      const listener = await sql.listen(EVICT_CHANNEL, (payload) => node.#notified(payload));
      node.#unlisten = () => listener.unlisten();
    } catch (error) {
      await sql.end({ timeout: 0 }).catch(() => {});
      throw error;
    }
    node.#unguard = guardClientCrashes((error) => node.#down(error));
    node.#unobserve = node.core.observe({
      committed: (entry) => node.#committed(entry),
      removed: (id) => node.#write(() => node.#registry.remove(id)),
    });
    // A heartbeat that hangs is given up, and the client replaced at once: its connection
    // is wedged (a database that restarted under it may never answer it), and a query
    // that never returns would never count as a failure.
    const limit = Math.max(settings.heartbeatInterval * 2, 5_000);
    node.#timer = setInterval(() => {
      node.#beating ??= within(node.#beat(), limit, "The heartbeat").catch(async (error) => {
        if (!(error instanceof Slow) || node.#closed) return;
        node.#down(error);
        await node.#reconnect();
      }).finally(() => node.#beating = undefined);
    }, settings.heartbeatInterval);
    unrefTimer(node.#timer);
    return node;
  }

  /** Whether the database answered last time. */
  get databaseUp(): boolean {
    return this.#up;
  }

  /** How many peers a delete would ask directly while the database is away. */
  get knownPeers(): number {
    return this.#peerMisses.size;
  }

  /** Records the live peers a sync listed (see `#peerMisses`). */
  #listed(peers: readonly string[]): void {
    for (const [url, misses] of this.#peerMisses) {
      if (peers.includes(url)) continue;
      if (misses + 1 >= PEER_MISSES) this.#peerMisses.delete(url);
      else this.#peerMisses.set(url, misses + 1);
    }
    for (const url of peers) this.#peerMisses.set(url, 0);
  }

  /** The settings' fallback fetch (the origin, when a peer fails mid-stream). */
  get fetchImage(): FetchImage | undefined {
    return this.#settings.fetchImage;
  }

  /** The database failed: serve as a single node, say so once. */
  #down(error: unknown): void {
    if (!this.#up || this.#closed) return;
    this.#up = false;
    this.counters.outages++;
    this.#settings.onLog(
      `cluster database unreachable (${
        error instanceof Error ? error.message : error
      }): serving as a single node until it returns`,
    );
  }

  /** Queues an index write; a failure marks the database down (the next sync repairs). */
  #write(fn: () => Promise<void>): void {
    if (this.#closed) return;
    this.#writes = this.#writes.then(async () => {
      if (!this.#up) return;
      try {
        await fn();
      } catch (error) {
        this.#down(error);
      }
    });
  }

  #committed(entry: ImageEntry): void {
    this.#write(async () => {
      await this.#registry.upsert([entry]);
      if (this.#leases.delete(entry.id)) await this.#registry.release(entry.id);
    });
  }

  /** One heartbeat: alive, rejoin after an outage, sweep the dead, fill progress, sync. */
  async #beat(): Promise<void> {
    if (this.#closed) return;
    const registry = this.#registry;
    try {
      const wasDown = !this.#up;
      let full = wasDown;
      // Back after an outage: the database may have come back empty (restored, or a new
      // server at the same address). The migrations are idempotent: tables come back.
      if (wasDown) await migrate(this.#sql);
      if (!await registry.beat()) {
        await registry.register();
        full = true;
      }
      if (wasDown) {
        this.#up = true;
        this.#settings.onLog("cluster database reachable again: rejoined the cluster");
      }
      await registry.sweep();
      const fills = [...this.#leases].map((id) => {
        const fill = this.core.joinable(id);
        return { id, bytes: fill?.written ?? 0, size: fill?.expectedLength };
      });
      await registry.progress(fills);
      if (full || Date.now() - this.#lastSync >= this.#settings.syncInterval) {
        await registry.sync(await this.store.list());
        this.#listed(await registry.peers());
        this.#lastSync = Date.now();
      }
      this.#failedBeats = 0;
    } catch (error) {
      this.#down(error);
      // A client whose pool is wedged (queries that never return) would never rejoin:
      // after five failed heartbeats in a row, a new client.
      if (++this.#failedBeats % 5 === 0 && !this.#closed) await this.#reconnect();
    }
  }

  /** Replaces the database client (the old one is ended), and listens again. */
  async #reconnect(): Promise<void> {
    const old = this.#sql;
    const unlisten = this.#unlisten;
    try {
      const sql = await connect(this.#settings.database, {
        name: `hono-image-cache ${this.selfUrl}`,
      });
      this.#sql = sql;
      this.#registry.use(sql);
      this.#unlisten = undefined;
      sql.listen(EVICT_CHANNEL, (payload) => this.#notified(payload)).then(
        (listener) => this.#unlisten = () => listener.unlisten(),
        () => {},
      );
    } catch {
      return;
    }
    unlisten?.().catch(() => {});
    old.end({ timeout: 0 }).catch(() => {});
  }

  /** Holds the lease of `id` until the miss that took it ends. */
  #leased(id: string): void {
    this.counters.leases++;
    this.#leases.add(id);
    const { own, claim } = this.core.claim(id);
    if (own) {
      // No miss of this node (should not happen): the next heartbeat releases it.
      claim.abandon();
      this.#leases.delete(id);
      this.#write(() => this.#registry.release(id));
      return;
    }
    claim.fill.then((fill) => fill?.done).then(() => {
      if (this.#leases.delete(id)) this.#write(() => this.#registry.release(id));
    });
  }

  /**
   * Where the miss of `id` should read from: a peer's answer, or
   * `undefined` for the origin (this node then holds the image's fill lease,
   * unless the database is unreachable). Never rejects. Called while this
   * node holds the image's claim.
   */
  async route(id: string, fetchImage?: FetchImage): Promise<PeerServe | undefined> {
    if (this.#closed || !this.#up) return undefined;
    const failed = new Set<string>();
    // Bounded: three looks at the index; then the origin, lease or not (never fail a miss).
    for (let round = 0; round < 3; round++) {
      let holders: Holder[];
      try {
        holders = await within(this.#registry.holders(id), QUERY_TIMEOUT, "The index query");
      } catch (error) {
        if (!(error instanceof Slow)) this.#down(error);
        return undefined;
      }
      for (const holder of order(holders)) {
        if (failed.has(holder.url)) continue;
        const answer = await askPeer(this, holder.url, id, 0);
        if (answer === undefined || answer.body === null) {
          failed.add(holder.url);
          continue;
        }
        return this.#serve(id, answer, failed, fetchImage ?? this.#settings.fetchImage);
      }
      let leased;
      try {
        leased = await within(this.#registry.lease(id), QUERY_TIMEOUT, "Taking the fill lease");
      } catch (error) {
        if (!(error instanceof Slow)) this.#down(error);
        return undefined;
      }
      if (leased) {
        this.#leased(id);
        return undefined;
      }
      // Another live node just took the lease: it shows up as filling.
      await new Promise((resolve) => setTimeout(resolve, 25 * (round + 1)));
    }
    return undefined;
  }

  /** A peer's answer as an origin-like response whose body survives the peer. */
  #serve(
    id: string,
    answer: PeerAnswer,
    failed: Set<string>,
    fetchImage: FetchImage | undefined,
  ): PeerServe {
    this.counters.peerFills++;
    const length = answer.size;
    const headers = new Headers(answer.headers);
    for (const name of ["cache-status", "transfer-encoding", "connection", "content-range"]) {
      headers.delete(name);
    }
    if (length !== undefined) headers.set("content-length", String(length));
    const expected = answer.digest;
    const body = resilientSource({
      first: answer,
      length,
      stallTime: this.#settings.peerStallTimeout,
      chain: {
        nextPeer: async (position, tried) => {
          if (!this.#up) return undefined;
          for (const holder of order(await this.#registry.holders(id))) {
            if (tried.has(holder.url)) continue;
            // A holder whose verified digest differs would fail the fill's check anyway.
            if (
              expected !== undefined && holder.digest !== undefined &&
              holder.digest.value !== expected.value.toLowerCase()
            ) continue;
            const next = await askPeer(this, holder.url, id, position);
            if (next !== undefined) return next;
            failed.add(holder.url);
          }
          return undefined;
        },
        origin: fetchImage === undefined
          ? undefined
          : (position, signal) => fetchImage(id, signal, { start: position }),
        committedDigest: async (url) => {
          // The peer's fill ended its body once verified, and commits (an fsync of the
          // whole file, seconds on a busy disk): ask for its digest until it has.
          const deadline = Date.now() + 10_000;
          let missing = 0;
          for (let attempt = 1; Date.now() < deadline; attempt++) {
            const head = await askPeer(this, url, id, 0, "HEAD");
            if (head?.state === "cached") return head.digest;
            // Neither filling nor cached, several times: its commit failed, or it went.
            if (head === undefined && ++missing >= 5) return undefined;
            if (head !== undefined) missing = 0;
            await new Promise((resolve) => setTimeout(resolve, Math.min(50 * attempt, 250)));
          }
          return undefined;
        },
        switched: (from, to, position, why) => {
          this.counters.switches++;
          this.#settings.onLog(
            `image ${JSON.stringify(id)}: ${from} ${why} at byte ${position}; going on from ${to}`,
          );
        },
        gaveUp: (from, position, why, error) => {
          this.#settings.onLog(
            `image ${
              JSON.stringify(id)
            }: ${from} ${why} at byte ${position}; no source took over: ${
              error instanceof Error ? error.message : String(error)
            }`,
          );
        },
        peerBytes: (bytes) => this.counters.peerBytes += bytes,
      },
    });
    return { response: new Response(body, { status: 200, headers }), expected, peer: answer.url };
  }

  /** The digests carried by peer answers handed out by {@linkcode wrapFetch}. */
  readonly #peerDigests = new WeakMap<Response, ExpectedDigest | undefined>();

  /**
   * `fetchImage` for downloads without a client (prefetch, the background
   * fill of a Range miss): a peer's answer when a peer has the image or is
   * filling it, else `fetchImage` itself (under the image's fill lease).
   * Its digest is told by {@linkcode peerDigest}.
   */
  wrapFetch(fetchImage: FetchImage): FetchImage {
    return async (id, signal, options) => {
      if ((options?.start ?? 0) > 0) return await fetchImage(id, signal, options);
      const peer = await this.route(id, fetchImage);
      if (peer === undefined) return await fetchImage(id, signal, options);
      this.#peerDigests.set(peer.response, peer.expected);
      signal.addEventListener("abort", () => peer.response.body?.cancel().catch(() => {}), {
        once: true,
      });
      return peer.response;
    };
  }

  /**
   * The expected digest of an answer: a peer's (from {@linkcode wrapFetch})
   * as it carried it, else `otherwise(response)`.
   */
  peerDigest(
    response: Response,
    otherwise: (
      response: Response,
    ) => ExpectedDigest | undefined | Promise<ExpectedDigest | undefined>,
  ): ExpectedDigest | undefined | Promise<ExpectedDigest | undefined> {
    return this.#peerDigests.has(response) ? this.#peerDigests.get(response) : otherwise(response);
  }

  /** Self URLs of the live nodes that have `id` committed (this one included). */
  async nodes(id: string): Promise<string[]> {
    try {
      const urls = await within(this.#registry.nodesHolding(id), QUERY_TIMEOUT, "The index query");
      if (!this.#up) this.#beat().catch(() => {});
      return urls;
    } catch (error) {
      this.#down(error);
      throw error;
    }
  }

  /**
   * What each recent eviction found, for a second: a cluster-wide delete
   * reaches a node twice (NOTIFY and HTTP), and the second must still say
   * whether the first found anything.
   */
  readonly #recent = new Map<string, { found: boolean; at: number }>();

  /** Evicts here, as a peer's cluster-wide delete asks. */
  async evictHere(eviction: Eviction): Promise<boolean> {
    const key = JSON.stringify([eviction.id ?? null, eviction.target ?? "both"]);
    const now = Date.now();
    for (const [k, v] of this.#recent) if (now - v.at > 2_000) this.#recent.delete(k);
    const found = await this.#evictHere(eviction);
    const earlier = this.#recent.get(key)?.found ?? false;
    this.#recent.set(key, { found: found || earlier, at: now });
    return found || earlier;
  }

  async #evictHere(eviction: Eviction): Promise<boolean> {
    const target = eviction.target ?? "both";
    const core = this.core;
    let found = false;
    if (eviction.id !== undefined) {
      return await core.evict(eviction.id, { keepQueued: target === "cache" });
    }
    if (target !== "queue") found = (await core.evictAll({ keepQueued: true })) > 0;
    if (target !== "cache") {
      for (const id of await this.store.queued()) {
        if (await this.store.dequeue(id)) found = true;
      }
    }
    return found;
  }

  /**
   * Evicts on every live node: here first, then the index rows of every
   * node go, a NOTIFY reaches every listening node, and each live peer is
   * asked directly (at most 2 s each), twice (see below). With the database away, the
   * peers known at the last sync are asked directly. Resolves whether any
   * node had anything (this one, a row, or a peer's answer), and whether
   * every node was reached.
   */
  async evictEverywhere(eviction: Eviction): Promise<EvictionResult> {
    let found = await this.evictHere(eviction);
    let peers = [...this.#peerMisses.keys()];
    let everywhere = false;
    if (this.#up) {
      try {
        if (eviction.target !== "queue") {
          if (await this.#registry.forget(eviction.id) > 0) found = true;
        }
        await this.#registry.notify(JSON.stringify({ ...eviction, from: this.selfUrl }));
        // Every listening node has the NOTIFY: the direct asks are for speed and answers.
        everywhere = true;
        peers = evictionTargets(await this.#registry.peers(), peers);
      } catch (error) {
        this.#down(error);
      }
    }
    const ask = () =>
      Promise.all(peers.map((url) => evictOnPeer(this, url, eviction, EVICT_TIMEOUT)));
    const answers = await ask();
    if (peers.length > 0) {
      // A second round: while the first went round, a node already evicted could
      // fill from a peer not yet evicted, and commit that old copy. Once every
      // node has evicted, no old copy is left to fill from: this round evicts
      // those copies (fills under way included) and none can come back.
      await this.evictHere(eviction);
      const again = await ask();
      for (const [i, answer] of again.entries()) {
        const first = answers[i];
        if (typeof answer !== "boolean") answers[i] = answer;
        else if (typeof first === "boolean") answers[i] = first || answer;
      }
    }
    if (!everywhere) {
      // The database is away: the peers known at the last sync were asked directly.
      const missed = peers.flatMap((url, i) => {
        const answer = answers[i];
        return typeof answer === "boolean" ? [] : [`${url} (${answer.error})`];
      });
      everywhere = missed.length === 0;
      this.#settings.onLog(
        `cluster database unreachable: the delete reached this node and ${
          peers.length - missed.length
        } of ${peers.length} known peer(s) directly${
          missed.length > 0 ? `; not reached: ${missed.join(", ")}` : ""
        }`,
      );
    }
    return { found: found || answers.some((answer) => answer === true), everywhere };
  }

  #notified(payload: string): void {
    let message: Eviction & { from?: string };
    try {
      message = JSON.parse(payload);
    } catch {
      return;
    }
    if (message.from === this.selfUrl) return;
    this.evictHere({ id: message.id, target: message.target }).catch(this.#settings.onError);
  }

  /** One line to the cluster's log. */
  log(line: string): void {
    this.#settings.onLog(line);
  }

  /** Counts a transfer to a peer. */
  served(): void {
    this.counters.servedToPeers++;
  }

  /** Stops the heartbeat, deregisters (this node's rows and leases go) and disconnects. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    clearInterval(this.#timer);
    this.#unobserve();
    await this.#beating?.catch(() => {});
    await this.#writes.catch(() => {});
    await this.#unlisten?.().catch(() => {});
    if (this.#up) await this.#registry.deregister().catch(() => {});
    await this.#sql.end({ timeout: 1 }).catch(() => {});
    this.#unguard();
  }
}
