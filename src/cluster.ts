/**
 * Cluster mode (off by default): several nodes, one cache. The nodes share
 * an index in PostgreSQL (Glance's `centralized_db` tables), so that the
 * origin is read once per image for the whole fleet: a node that misses
 * streams the image from a live peer that has it, or is filling it, and
 * only the node holding the image's fill lease reads the origin. See
 * docs/cluster.md.
 *
 * @module
 */
import type { Hono } from "hono";
import type { FetchImage } from "./_core/prefetch.ts";
import { ClusterNode } from "./_cluster/node.ts";
import { checkFunction, checkSize } from "./_options.ts";
import type { ImageStore } from "./image_store.ts";

/** Options of {@linkcode joinCluster}. */
export interface ClusterOptions {
  /** This node's store (the one its `imageCache` and `cacheApi` use). */
  store: ImageStore;
  /** The shared index: a PostgreSQL URL, `postgres://user:password@host:5432/database`. */
  database: string;
  /**
   * How the other nodes reach this one (`http://10.0.0.5:9292`): its peer
   * endpoint is served there by `imageCache` (or {@linkcode Cluster.peerApp}).
   */
  selfUrl: string;
  /** The cluster secret (16+ characters), the same on every node; peers present it. */
  secret: string;
  /**
   * How this node fetches an image from the origin when a peer fails
   * mid-stream and no other peer has it (`options.start`: the first byte
   * wanted). Without it (and without `imageCache`'s `fetchImage`) such a
   * transfer fails visibly (the client's connection is cut).
   */
  fetchImage?: FetchImage;
  /**
   * Milliseconds between heartbeats (and index updates of fill progress).
   * @default {2000}
   */
  heartbeatInterval?: number;
  /**
   * Milliseconds without a heartbeat after which a node is dead for routing
   * and its rows are swept.
   * @default {5 × heartbeatInterval}
   */
  deadAfter?: number;
  /**
   * Milliseconds between syncs of this node's rows with its store (hits and
   * last access, prunes and cleans, other processes sharing its directory).
   * @default {10000}
   */
  syncInterval?: number;
  /**
   * Milliseconds a peer may send no byte before the next source takes over.
   * @default {30000}
   */
  peerStallTimeout?: number;
  /**
   * Lines worth a log: the database lost or back, a source replaced mid-stream.
   * @default {console.warn}
   */
  onLog?: (line: string) => void;
  /**
   * Unexpected faults of cluster mode.
   * @default {console.warn}
   */
  onError?: (error: unknown) => void;
}

/**
 * What {@linkcode Cluster.evict} did.
 *
 * @example A delete that must reach the whole fleet
 * ```ts ignore
 * const { found, everywhere } = await cluster.evict("cirros");
 * if (!everywhere) console.warn("some node was not reached: retry once the database is back");
 * ```
 */
export interface ClusterEviction {
  /** Whether any node had the image (or, without an id, anything). */
  found: boolean;
  /**
   * Whether every node was reached: through the database (index rows and
   * `NOTIFY`), or, with the database away, every peer known at the last
   * sync answered.
   */
  everywhere: boolean;
}

/**
 * A node's membership of a cluster, from {@linkcode joinCluster}: give it
 * to `imageCache`, `cacheApi` and `proxyApp` as their `cluster` option.
 */
export interface Cluster {
  /** How the other nodes reach this one. */
  readonly selfUrl: string;
  /** The store this node caches into. */
  readonly store: ImageStore;
  /**
   * The peer endpoint (under `/_image-cache/cluster/`, secret required).
   * `imageCache({ cluster })` answers it already; mount this app yourself
   * only in front of middleware that would refuse peers.
   */
  readonly peerApp: Hono;
  /** Whether the database answered the last time it was asked. */
  readonly databaseUp: boolean;
  /** Self URLs of the live nodes that have the image committed (this one included). */
  nodes(imageId: string): Promise<string[]>;
  /**
   * Evicts on every live node, fills under way included (deletion wins,
   * fleet-wide): the image's entry, queue marker and fill, or (without an
   * id) what `target` names. With the database away, the peers the last
   * syncs listed are asked directly. Resolves whether any node had
   * anything and whether every node was reached.
   */
  evict(
    imageId?: string,
    options?: { target?: "cache" | "queue" | "both" },
  ): Promise<ClusterEviction>;
  /** The node's cluster metrics in the Prometheus text format (appended to `/metrics`). */
  metricsText(): string;
  /** Stops the heartbeat, deregisters this node (its rows and leases go) and disconnects. */
  close(): Promise<void>;
}

/**
 * Joins (or forms) a cluster: connects to PostgreSQL, brings its schema up
 * to date (safe when several nodes start at once), registers this node,
 * writes its index rows and starts its heartbeat.
 *
 * The PostgreSQL client is the `postgres` npm package, an optional peer
 * dependency: `npm install postgres` (Deno: `"postgres": "npm:postgres@^3"`
 * in the imports). It is loaded here only.
 *
 * @param options The store, the database, this node's URL and the secret.
 * @returns The node's membership.
 * @throws {TypeError} When an option has the wrong shape.
 * @throws {RangeError} When the secret is shorter than 16 characters, or a duration is negative.
 * @throws {Error} When the database cannot be reached or the client is not installed (one line).
 *
 * @example Three nodes, one origin read per image (each node runs this)
 * ```ts ignore
 * import { Hono } from "hono";
 * import { cacheApi, FileSystemStore, imageCache, joinCluster } from "hono-image-cache";
 *
 * const store = new FileSystemStore({ directory: "/var/cache/images" });
 * const cluster = await joinCluster({
 *   store,
 *   database: "postgres://cache:secret@db.internal:5432/image_cache",
 *   selfUrl: "http://10.0.0.5:9292",
 *   secret: Deno.env.get("IMAGE_CACHE_CLUSTER_SECRET")!,
 * });
 * const app = new Hono();
 * app.route("/", cacheApi({ store, authorize: (c) => c.req.header("x-admin") === "yes", cluster }));
 * app.use(imageCache({ store, cluster }));
 * app.get("/v2/images/:id/file", (c) => fetch(`http://glance.internal:9292${c.req.path}`));
 * Deno.serve({ port: 9292 }, app.fetch);
 * ```
 *
 * @example A missing database is one clear line
 * ```ts
 * import { joinCluster, MemoryStore } from "hono-image-cache";
 * import assert from "node:assert/strict";
 *
 * await assert.rejects(
 *   joinCluster({
 *     store: new MemoryStore(),
 *     database: "postgres://nobody@127.0.0.1:1/none",
 *     selfUrl: "http://127.0.0.1:8000",
 *     secret: "0123456789abcdef",
 *   }),
 *   /^Error: Cannot join the cluster: the database postgres:\/\/nobody@127\.0\.0\.1:1\/none/,
 * );
 * ```
 */
export async function joinCluster(options: ClusterOptions): Promise<Cluster> {
  const owner = "joinCluster";
  const store = options?.store;
  if (store === null || typeof store !== "object" || typeof store.get !== "function") {
    throw new TypeError(
      `Cannot create ${owner}: "store" must be an ImageStore, received ${typeof store}`,
    );
  }
  const database = options.database;
  if (typeof database !== "string" || !/^postgres(ql)?:\/\//.test(database)) {
    throw new TypeError(
      `Cannot create ${owner}: "database" must be a postgres:// URL, received ${
        typeof database === "string" ? JSON.stringify(redact(database)) : typeof database
      }`,
    );
  }
  const selfUrl = options.selfUrl;
  let url: URL | undefined;
  try {
    url = new URL(selfUrl);
  } catch {
    url = undefined;
  }
  if (
    url === undefined || (url.protocol !== "http:" && url.protocol !== "https:") ||
    url.pathname !== "/" || url.search !== "" || url.username !== ""
  ) {
    throw new TypeError(
      `Cannot create ${owner}: "selfUrl" must be an http(s) URL without a path, like http://10.0.0.5:9292, received ${
        JSON.stringify(selfUrl)
      }`,
    );
  }
  const secret = options.secret;
  if (typeof secret !== "string" || secret.length < 16) {
    throw new RangeError(
      `Cannot create ${owner}: "secret" must be a string of at least 16 characters, received ${
        typeof secret === "string" ? `${secret.length} characters` : typeof secret
      }`,
    );
  }
  const heartbeatInterval = checkSize(owner, "heartbeatInterval", options.heartbeatInterval, 2000);
  if (heartbeatInterval < 10) {
    throw new RangeError(
      `Cannot create ${owner}: "heartbeatInterval" must be at least 10 ms, received ${heartbeatInterval}`,
    );
  }
  const deadAfter = checkSize(owner, "deadAfter", options.deadAfter, 5 * heartbeatInterval);
  if (deadAfter <= heartbeatInterval) {
    throw new RangeError(
      `Cannot create ${owner}: "deadAfter" must be more than "heartbeatInterval" (${heartbeatInterval}), received ${deadAfter}`,
    );
  }
  const onError = checkFunction(
    owner,
    "onError",
    options.onError,
    (error: unknown) => console.warn("hono-image-cache:", error),
  );
  const onLog = checkFunction(
    owner,
    "onLog",
    options.onLog,
    (line: string) => console.warn(`hono-image-cache: ${line}`),
  );
  let node: ClusterNode;
  try {
    node = await ClusterNode.start({
      store,
      database,
      selfUrl: url.origin,
      secret,
      fetchImage: checkFunction(owner, "fetchImage", options.fetchImage, undefined),
      heartbeatInterval,
      deadAfter,
      syncInterval: checkSize(owner, "syncInterval", options.syncInterval, 10_000),
      peerStallTimeout: checkSize(owner, "peerStallTimeout", options.peerStallTimeout, 30_000),
      peerHeadersTimeout: 10_000,
      onError,
      onLog,
    });
  } catch (error) {
    const reason = error instanceof Error ? error.message : String(error);
    if (/npm install postgres/.test(reason)) throw error;
    throw new Error(
      `Cannot join the cluster: the database ${redact(database)} is unreachable or unusable (${
        reason.split("\n")[0]
      }); check the URL, that PostgreSQL runs and accepts this node, then start again`,
      { cause: error },
    );
  }
  return {
    selfUrl: node.selfUrl,
    store,
    peerApp: node.peerApp,
    get databaseUp() {
      return node.databaseUp;
    },
    nodes: (imageId) => node.nodes(imageId),
    evict: (imageId, evictOptions) =>
      node.evictEverywhere({ id: imageId, target: evictOptions?.target }),
    metricsText: () => clusterMetrics(node),
    close: () => node.close(),
    [NODE]: node,
  } as Cluster;
}

/** Where a {@linkcode Cluster} keeps its node, for `imageCache` and `cacheApi`. */
const NODE = Symbol("hono-image-cache cluster node");

/**
 * The node behind a {@linkcode Cluster}, for `imageCache` and `cacheApi`.
 *
 * @throws {TypeError} When `cluster` did not come from {@linkcode joinCluster}.
 */
export function clusterNode(owner: string, cluster: Cluster | undefined): ClusterNode | undefined {
  if (cluster === undefined) return undefined;
  const node = (cluster as unknown as Record<symbol, unknown> | null)?.[NODE];
  if (!(node instanceof ClusterNode)) {
    throw new TypeError(
      `Cannot create ${owner}: "cluster" must come from joinCluster(), received ${typeof cluster}`,
    );
  }
  return node;
}

/** The database URL without its password, for messages. */
function redact(database: string): string {
  return database.replace(/^(postgres(?:ql)?:\/\/[^:@/]*):[^@/]*@/, "$1:***@");
}

/** The cluster's metrics in the Prometheus text format. */
function clusterMetrics(node: ClusterNode): string {
  const c = node.counters;
  const lines: [string, "counter" | "gauge", string, number][] = [
    [
      "image_cache_cluster_database_up",
      "gauge",
      "1 when the cluster database answered last time, else 0 (serving as a single node).",
      node.databaseUp ? 1 : 0,
    ],
    [
      "image_cache_cluster_peers",
      "gauge",
      "Peers a cluster delete asks directly while the database is away (listed by one of the last 3 syncs).",
      node.knownPeers,
    ],
    [
      "image_cache_cluster_database_outages_total",
      "counter",
      "Times the cluster database became unreachable.",
      c.outages,
    ],
    ["image_cache_cluster_peer_fills_total", "counter", "Misses answered by a peer.", c.peerFills],
    ["image_cache_cluster_peer_bytes_total", "counter", "Bytes received from peers.", c.peerBytes],
    [
      "image_cache_cluster_served_to_peers_total",
      "counter",
      "Transfers to peers.",
      c.servedToPeers,
    ],
    [
      "image_cache_cluster_source_switches_total",
      "counter",
      "Sources replaced mid-stream (a peer died or stalled).",
      c.switches,
    ],
    [
      "image_cache_cluster_leases_total",
      "counter",
      "Fill leases taken: this node read the origin for the cluster.",
      c.leases,
    ],
  ];
  return lines.map(([name, type, help, value]) =>
    `# HELP ${name} ${help}\n# TYPE ${name} ${type}\n${name} ${value}\n`
  ).join("");
}
