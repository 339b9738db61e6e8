/**
 * The shared index, as one node reads and writes it: its registration and
 * heartbeat, its rows of `cached_images` (Glance's table), the fill leases
 * of `image_cache_fills`, and the queries that route a miss. Every time is
 * the database's `now()`, so the nodes' clocks do not matter.
 *
 * @module
 */
import type { Digest, ImageEntry } from "../image_store.ts";
import { isDigestAlgorithm } from "../digest.ts";
import type { Sql } from "./database.ts";

/** A live node that has an image, or is filling it. */
export interface Holder {
  /** The node's self URL. */
  url: string;
  /** `cached`: committed there; `filling`: it holds the image's fill lease. */
  state: "cached" | "filling";
  /** The digest of its committed entry (verified there). */
  digest?: Digest;
  /** Bytes of the image, when known. */
  size?: number;
}

/** The channel every node listens to for cluster-wide deletions. */
export const EVICT_CHANNEL = "image_cache_evict";

/** The node `n` (node_reference) is alive: seen within the milliseconds of parameter `p`. */
const live = (p: string) => `n.last_seen > now() - ${p} * interval '1 millisecond'`;

/** What this node last wrote of an entry, to write only what changed. */
function rowKey(entry: ImageEntry): string {
  return `${entry.size}:${entry.hits}:${entry.lastAccessed}:${entry.created}:${entry.digest.value}`;
}

/** One node's view of the shared index. */
export class Registry {
  #sql: Sql;
  readonly #url: string;
  readonly #deadAfter: number;
  /** This node's `node_reference_id`, once registered. */
  #node: number | undefined;
  /** Rows this node wrote, by image id (see {@linkcode rowKey}). */
  #written = new Map<string, string>();

  constructor(sql: Sql, selfUrl: string, deadAfter: number) {
    this.#sql = sql;
    this.#url = selfUrl;
    this.#deadAfter = deadAfter;
  }

  /** Uses another client (the node replaced a wedged one). */
  use(sql: Sql): void {
    this.#sql = sql;
  }

  /** This node's id in `node_reference`. */
  get node(): number | undefined {
    return this.#node;
  }

  /** Registers (or re-registers) this node's self URL; its rows are rewritten at the next sync. */
  async register(): Promise<void> {
    const [row] = await this.#sql.unsafe(
      `INSERT INTO node_reference (node_reference_url) VALUES ($1)
       ON CONFLICT (node_reference_url) DO UPDATE SET last_seen = now()
       RETURNING node_reference_id`,
      [this.#url],
    );
    this.#node = Number(row.node_reference_id);
    this.#written.clear();
  }

  /**
   * One heartbeat; resolves `false` when this node's row was swept
   * meanwhile (it was taken for dead): it must register again.
   */
  async beat(): Promise<boolean> {
    if (this.#node === undefined) return false;
    // By id and URL: a database that came back empty may have given this id to another node.
    const rows = await this.#sql.unsafe(
      `UPDATE node_reference SET last_seen = now()
       WHERE node_reference_id = $1 AND node_reference_url = $2 RETURNING 1`,
      [this.#node, this.#url],
    );
    return rows.length > 0;
  }

  /** Removes the nodes that missed their heartbeats, and with them their rows and leases. */
  async sweep(): Promise<number> {
    const rows = await this.#sql.unsafe(
      `DELETE FROM node_reference n WHERE NOT (${live("$1")})
       RETURNING node_reference_id`,
      [this.#deadAfter],
    );
    return rows.length;
  }

  /**
   * Makes this node's `cached_images` rows match `entries`: rows of entries
   * gone are deleted, new or changed ones (hits, last access) written, in
   * two statements whatever the number.
   */
  async sync(entries: ImageEntry[]): Promise<void> {
    const node = this.#node;
    if (node === undefined) return;
    const changed = entries.filter((entry) => this.#written.get(entry.id) !== rowKey(entry));
    const ids = entries.map((entry) => entry.id);
    await this.#sql.unsafe(
      "DELETE FROM cached_images WHERE node_reference_id = $1 AND NOT (image_id = ANY($2::text[]))",
      [node, ids],
    );
    const present = new Set(ids);
    for (const id of this.#written.keys()) if (!present.has(id)) this.#written.delete(id);
    await this.upsert(changed);
  }

  /** Writes (or rewrites) this node's rows of `entries`. */
  async upsert(entries: ImageEntry[]): Promise<void> {
    const node = this.#node;
    if (node === undefined || entries.length === 0) return;
    await this.#sql.unsafe(
      `INSERT INTO cached_images (image_id, node_reference_id, last_accessed, last_modified,
         size, hits, checksum, digest_algorithm, digest_value)
       SELECT t.i, $1, to_timestamp(t.a / 1000.0) AT TIME ZONE 'UTC',
         to_timestamp(t.m / 1000.0) AT TIME ZONE 'UTC', t.s::bigint, t.h::integer,
         CASE WHEN t.da = 'md5' THEN t.dv END, t.da, t.dv
       FROM unnest($2::text[], $3::float8[], $4::float8[], $5::float8[], $6::float8[],
         $7::text[], $8::text[]) AS t(i, a, m, s, h, da, dv)
       ON CONFLICT (image_id, node_reference_id) DO UPDATE SET
         last_accessed = EXCLUDED.last_accessed, last_modified = EXCLUDED.last_modified,
         size = EXCLUDED.size, hits = EXCLUDED.hits, checksum = EXCLUDED.checksum,
         digest_algorithm = EXCLUDED.digest_algorithm, digest_value = EXCLUDED.digest_value`,
      [
        node,
        entries.map((e) => e.id),
        entries.map((e) => e.lastAccessed),
        entries.map((e) => e.created),
        entries.map((e) => e.size),
        entries.map((e) => e.hits),
        entries.map((e) => e.digest.algorithm),
        entries.map((e) => e.digest.value),
      ],
    );
    for (const entry of entries) this.#written.set(entry.id, rowKey(entry));
  }

  /** Deletes this node's row of `id`. */
  async remove(id: string): Promise<void> {
    if (this.#node === undefined) return;
    this.#written.delete(id);
    await this.#sql.unsafe(
      "DELETE FROM cached_images WHERE node_reference_id = $1 AND image_id = $2",
      [this.#node, id],
    );
  }

  /** The other live nodes that have `id` committed (first) or hold its fill lease. */
  async holders(id: string): Promise<Holder[]> {
    const rows = await this.#sql.unsafe(
      `SELECT n.node_reference_url AS url, 'cached' AS state, c.digest_algorithm AS algorithm,
         c.digest_value AS value, c.size::float8 AS size
       FROM cached_images c JOIN node_reference n USING (node_reference_id)
       WHERE c.image_id = $1 AND c.node_reference_id <> $2 AND ${live("$3")}
       UNION ALL
       SELECT n.node_reference_url, 'filling', NULL, NULL, f.size::float8
       FROM image_cache_fills f JOIN node_reference n USING (node_reference_id)
       WHERE f.image_id = $1 AND f.node_reference_id <> $2 AND ${live("$3")}`,
      [id, this.#node ?? -1, this.#deadAfter],
    );
    return rows.map((row) => {
      const algorithm = row.algorithm;
      return {
        url: String(row.url),
        state: row.state === "cached" ? "cached" : "filling",
        digest: isDigestAlgorithm(algorithm) && typeof row.value === "string"
          ? { algorithm, value: row.value }
          : undefined,
        size: row.size === null ? undefined : Number(row.size),
      };
    });
  }

  /** Self URLs of the live nodes (this one included) that have `id` committed, sorted. */
  async nodesHolding(id: string): Promise<string[]> {
    const rows = await this.#sql.unsafe(
      `SELECT n.node_reference_url AS url FROM cached_images c
       JOIN node_reference n USING (node_reference_id)
       WHERE c.image_id = $1 AND ${live("$2")} ORDER BY 1`,
      [id, this.#deadAfter],
    );
    return rows.map((row) => String(row.url));
  }

  /** Self URLs of the other live nodes. */
  async peers(): Promise<string[]> {
    const rows = await this.#sql.unsafe(
      `SELECT node_reference_url AS url FROM node_reference n
       WHERE node_reference_id <> $1 AND ${live("$2")} ORDER BY 1`,
      [this.#node ?? -1, this.#deadAfter],
    );
    return rows.map((row) => String(row.url));
  }

  /**
   * Takes the cluster-wide fill lease of `id`: resolves `true` when this
   * node now holds it (it was free, already ours, or its owner is dead).
   */
  async lease(id: string): Promise<boolean> {
    if (this.#node === undefined) return false;
    const rows = await this.#sql.unsafe(
      `INSERT INTO image_cache_fills AS f (image_id, node_reference_id) VALUES ($1, $2)
       ON CONFLICT (image_id) DO UPDATE SET node_reference_id = EXCLUDED.node_reference_id,
         started = now(), updated = now(), bytes = 0, size = NULL
       WHERE f.node_reference_id = EXCLUDED.node_reference_id OR NOT EXISTS (
         SELECT 1 FROM node_reference n WHERE n.node_reference_id = f.node_reference_id AND ${
        live("$3")
      })
       RETURNING image_id`,
      [id, this.#node, this.#deadAfter],
    );
    return rows.length > 0;
  }

  /** Gives up this node's lease of `id`. */
  async release(id: string): Promise<void> {
    if (this.#node === undefined) return;
    await this.#sql.unsafe(
      "DELETE FROM image_cache_fills WHERE image_id = $1 AND node_reference_id = $2",
      [id, this.#node],
    );
  }

  /** Records the progress of this node's leased fills, and drops its leases not in `fills`. */
  async progress(fills: { id: string; bytes: number; size?: number }[]): Promise<void> {
    if (this.#node === undefined) return;
    await this.#sql.unsafe(
      "DELETE FROM image_cache_fills WHERE node_reference_id = $1 AND NOT (image_id = ANY($2::text[]))",
      [this.#node, fills.map((fill) => fill.id)],
    );
    if (fills.length === 0) return;
    await this.#sql.unsafe(
      `UPDATE image_cache_fills f SET bytes = t.b::bigint, size = t.s::bigint, updated = now()
       FROM unnest($2::text[], $3::float8[], $4::float8[]) AS t(i, b, s)
       WHERE f.image_id = t.i AND f.node_reference_id = $1`,
      [
        this.#node,
        fills.map((fill) => fill.id),
        fills.map((fill) => fill.bytes),
        fills.map((fill) => fill.size ?? null),
      ],
    );
  }

  /**
   * Deletes every node's rows and leases of `id` (every image without one),
   * so no node routes to them any more; resolves how many rows there were.
   */
  async forget(id?: string): Promise<number> {
    const where = id === undefined ? "" : " WHERE image_id = $1";
    const parameters = id === undefined ? [] : [id];
    const rows = await this.#sql.unsafe(
      `DELETE FROM cached_images${where} RETURNING 1`,
      parameters,
    );
    const fills = await this.#sql.unsafe(
      `DELETE FROM image_cache_fills${where} RETURNING 1`,
      parameters,
    );
    return rows.length + fills.length;
  }

  /** Sends `payload` to every node listening on {@linkcode EVICT_CHANNEL}. */
  async notify(payload: string): Promise<void> {
    await this.#sql.unsafe("SELECT pg_notify($1, $2)", [EVICT_CHANNEL, payload]);
  }

  /** Deregisters this node: its rows and leases go with it. */
  async deregister(): Promise<void> {
    if (this.#node === undefined) return;
    await this.#sql.unsafe("DELETE FROM node_reference WHERE node_reference_id = $1", [
      this.#node,
    ]);
    this.#node = undefined;
  }
}
