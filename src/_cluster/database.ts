/**
 * The cluster's PostgreSQL: the client (the `postgres` npm package, an
 * optional peer dependency loaded only in cluster mode), the few calls the
 * cluster makes of it, and the versioned schema migrations.
 *
 * The schema mirrors Glance's `centralized_db` cache driver (2024.1):
 * `node_reference(node_reference_url unique)` and `cached_images(image_id,
 * node_reference_id, last_accessed, last_modified, size, hits, checksum,
 * unique(image_id, node_reference_id))`, plus what cluster mode needs: a
 * heartbeat per node, the entry's full digest, and the fills in progress
 * (each image's cluster-wide fill lease, with its owner and bytes so far).
 *
 * @module
 */

/** The calls the cluster makes of a `postgres` client (porsager's, v3). */
export interface Sql {
  /** Runs a parameterised query (`$1`, `$2`...): the parameters are never spliced in. */
  unsafe(query: string, parameters?: unknown[]): Promise<Record<string, unknown>[]>;
  /** Runs `fn` in a transaction on one connection. */
  begin<T>(fn: (sql: Sql) => Promise<T>): Promise<T>;
  /** LISTEN on `channel` (re-established by the client after a reconnection). */
  listen(
    channel: string,
    onNotify: (payload: string) => void,
    onListen?: () => void,
  ): Promise<{ unlisten(): Promise<void> }>;
  /** Closes the connections. */
  end(options?: { timeout?: number }): Promise<void>;
}

type PostgresFactory = (url: string, options: Record<string, unknown>) => Sql;

/**
 * Connects to `url` with the `postgres` client, which is loaded here, and
 * only here, so that a single node never needs it.
 *
 * @throws {Error} When the client is not installed: the message says how to install it.
 */
export async function connect(url: string, options: { name: string }): Promise<Sql> {
  let factory: PostgresFactory;
  try {
    const module = await import("postgres") as unknown as { default: PostgresFactory };
    factory = module.default;
  } catch (error) {
    throw new Error(
      'Cluster mode needs the PostgreSQL client "postgres": npm install postgres (Deno: add "postgres": "npm:postgres@^3" to your imports)',
      { cause: error },
    );
  }
  return factory(url, {
    max: 4,
    // Fail fast while the database is down: the node serves as a single node meanwhile.
    connect_timeout: 3,
    // Reconnect within half a second once the database is back (the client's default grows to 20 s).
    backoff: () => 0.5,
    idle_timeout: 60,
    max_lifetime: 30 * 60,
    onnotice: () => {},
    connection: { application_name: options.name },
    // Our tables use bigint sizes: read them as JavaScript numbers (below 2^53).
    types: {
      bigint: {
        to: 20,
        from: [20],
        serialize: (value: number) => String(value),
        parse: (value: string) => Number(value),
      },
    },
  });
}

/** A lock key for migrations: nodes starting at once on an empty database take turns. */
const MIGRATION_LOCK = 0x696d6763;

/**
 * The schema, one entry per version, applied in order and recorded in
 * `image_cache_migrations`. Never edit a released entry: add one.
 */
export const MIGRATIONS: readonly (readonly string[])[] = [
  // 1: Glance's two tables (same names, columns and constraints; image ids
  // longer than a UUID allowed), a heartbeat per node, the digest in full,
  // and the fills in progress.
  [
    `CREATE TABLE node_reference (
    node_reference_id bigserial PRIMARY KEY,
    node_reference_url varchar(255) NOT NULL,
    last_seen timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT uq_node_reference_node_reference_url UNIQUE (node_reference_url)
  )`,
    `CREATE TABLE cached_images (
    id bigserial PRIMARY KEY,
    image_id varchar(255) NOT NULL,
    last_accessed timestamp NOT NULL,
    last_modified timestamp NOT NULL,
    size bigint NOT NULL,
    hits integer NOT NULL,
    checksum varchar(32),
    node_reference_id bigint NOT NULL
      REFERENCES node_reference (node_reference_id) ON DELETE CASCADE,
    digest_algorithm varchar(16),
    digest_value varchar(128),
    CONSTRAINT ix_cached_images_image_id_node_reference_id UNIQUE (image_id, node_reference_id)
  )`,
    `CREATE TABLE image_cache_fills (
    image_id varchar(255) PRIMARY KEY,
    node_reference_id bigint NOT NULL
      REFERENCES node_reference (node_reference_id) ON DELETE CASCADE,
    started timestamptz NOT NULL DEFAULT now(),
    updated timestamptz NOT NULL DEFAULT now(),
    bytes bigint NOT NULL DEFAULT 0,
    size bigint
  )`,
    `CREATE INDEX image_cache_fills_node ON image_cache_fills (node_reference_id)`,
  ],
];

/**
 * Brings the schema to the latest version. Safe when several nodes start at
 * once on an empty database: one transaction under an advisory lock.
 * Resolves the versions applied now.
 */
export async function migrate(sql: Sql): Promise<number[]> {
  return await sql.begin(async (tx) => {
    await tx.unsafe("SELECT pg_advisory_xact_lock($1)", [MIGRATION_LOCK]);
    await tx.unsafe(
      `CREATE TABLE IF NOT EXISTS image_cache_migrations (
        version integer PRIMARY KEY,
        applied timestamptz NOT NULL DEFAULT now()
      )`,
    );
    const done = new Set(
      (await tx.unsafe("SELECT version FROM image_cache_migrations")).map((row) =>
        Number(row.version)
      ),
    );
    const applied: number[] = [];
    for (let index = 0; index < MIGRATIONS.length; index++) {
      const version = index + 1;
      if (done.has(version)) continue;
      for (const statement of MIGRATIONS[index]) await tx.unsafe(statement);
      await tx.unsafe("INSERT INTO image_cache_migrations (version) VALUES ($1)", [version]);
      applied.push(version);
    }
    return applied;
  });
}

/**
 * Whether `error` was thrown by the PostgreSQL client's socket callbacks,
 * not by anyone's code: a stack inside the `postgres` package, or a socket
 * error (`ECONNRESET`, `EPIPE`) whose stack has only the runtime's own frames.
 */
export function isClientCrash(error: unknown): boolean {
  if (!(error instanceof Error)) return false;
  const stack = error.stack ?? "";
  if (
    /[\\/]postgres[\\/](?:\d[^\\/]*[\\/])?(?:cjs[\\/]|cf[\\/])?src[\\/]connection\.js/.test(stack)
  ) {
    return true;
  }
  const code = (error as { code?: unknown }).code;
  if (code !== "ECONNRESET" && code !== "EPIPE") return false;
  const frames = stack.split("\n").slice(1).filter((line) => /^\s*at /.test(line));
  return frames.every((line) => /\((?:ext:|node:)|at (?:ext:|node:)/.test(line));
}

let guards = 0;
let removeGuard: (() => void) | undefined;

/**
 * While a cluster node runs: the `postgres` client can throw from its socket
 * callbacks when the server dies under a query (seen on Deno: a write
 * scheduled on a socket already closed; an `ECONNRESET` on a socket it no
 * longer listens to). Such an error must not end the process: the node
 * serves as a single node and rejoins. Only errors {@linkcode isClientCrash}
 * recognises are caught; any other keeps the runtime's default behaviour.
 * Returns the function that removes the guard.
 */
export function guardClientCrashes(onCrash: (error: Error) => void): () => void {
  if (guards++ === 0) {
    const g = globalThis as unknown as {
      Deno?: unknown;
      addEventListener?: (type: string, fn: (event: Event) => void) => void;
      removeEventListener?: (type: string, fn: (event: Event) => void) => void;
      process?: {
        on(event: string, fn: (error: unknown) => void): void;
        off(event: string, fn: (error: unknown) => void): void;
      };
    };
    if (g.Deno !== undefined && g.addEventListener !== undefined) {
      const onEvent = (event: Event) => {
        const error = (event as ErrorEvent).error ?? (event as PromiseRejectionEvent).reason;
        if (isClientCrash(error)) {
          event.preventDefault();
          onCrash(error as Error);
        }
      };
      g.addEventListener("error", onEvent);
      g.addEventListener("unhandledrejection", onEvent);
      removeGuard = () => {
        g.removeEventListener?.("error", onEvent);
        g.removeEventListener?.("unhandledrejection", onEvent);
      };
    } else if (g.process !== undefined) {
      const process = g.process;
      const onException = (error: unknown) => {
        if (isClientCrash(error)) return onCrash(error as Error);
        // Not ours: what the runtime does without a listener (print, exit).
        process.off("uncaughtException", onException);
        throw error;
      };
      const onRejection = (reason: unknown) => {
        if (isClientCrash(reason)) return onCrash(reason as Error);
        throw reason;
      };
      process.on("uncaughtException", onException);
      process.on("unhandledRejection", onRejection);
      removeGuard = () => {
        process.off("uncaughtException", onException);
        process.off("unhandledRejection", onRejection);
      };
    }
  }
  let removed = false;
  return () => {
    if (removed) return;
    removed = true;
    if (--guards === 0) {
      removeGuard?.();
      removeGuard = undefined;
    }
  };
}
