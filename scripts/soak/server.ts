/**
 * One soak server process: a Hono app with `cacheApi()` and `imageCache()`
 * over a `FileSystemStore` on the shared directory, wrapped in a
 * fault-injecting store, in front of the soak origin. In cluster mode each
 * server has a directory of its own and joins the cluster (`joinCluster`)
 * on the soak's PostgreSQL, retrying while the database is away.
 *
 * Started by `scripts/soak/soak.ts` with one argument, a JSON config. Speaks on
 * stdout, one line per event: `READY {"port","pid","features"}` once the
 * store's start sweep is done, `FAULT <kind>` per injected store fault,
 * `ERROR <message>` per fault the cache reported to `onError`, `LOG <line>`
 * per line of the cluster's log (cluster mode). Exits when
 * its stdin closes (the orchestrator is gone), so it never outlives a run.
 *
 * @module
 */
import process from "node:process";
import { Hono } from "hono";
import { cacheApi, type Cluster, FileSystemStore, imageCache, joinCluster } from "../../mod.ts";
import { Rng } from "./data.ts";
import { type StoreFaultRates, withStoreFaults } from "./store.ts";
import { startServer } from "../../tests/_helpers.ts";
import { guardPausedParser } from "../../src/proxy/_undici_guard.ts";

/** What the orchestrator passes to a server process. */
export interface SoakServerConfig {
  directory: string;
  origin: string;
  maxSize: number;
  seed: number;
  /** This server's index, sent to the origin as `x-soak-server`. */
  index: number;
  storeFaults: StoreFaultRates;
  /** Cluster mode: the index's database and the cluster secret. */
  cluster?: { database: string; secret: string };
}

/** Deno when this runs on Deno (the source); else Node runs a bundle of it (`--runtime node`). */
const DENO = (globalThis as { Deno?: typeof Deno }).Deno;
const config = JSON.parse(DENO ? DENO.args[0] : process.argv[2]) as SoakServerConfig;
const encoder = new TextEncoder();
const out = (line: string) => {
  try {
    if (DENO) DENO.stdout.writeSync(encoder.encode(line + "\n"));
    else process.stdout.write(line + "\n"); // A pipe: written synchronously on Linux.
  } catch {
    // The orchestrator is gone; stdin's end will stop us.
  }
};

const inner = new FileSystemStore({ directory: config.directory, maxSize: config.maxSize });
const store = withStoreFaults(
  inner,
  new Rng(config.seed),
  config.storeFaults,
  (kind) => out(`FAULT ${kind}`),
);

/** Cache-side faults, counted by the orchestrator. */
const onError = (error: unknown): void =>
  out(`ERROR ${String((error as Error)?.message ?? error).slice(0, 200)}`);

const fetchOrigin = (id: string, signal: AbortSignal, options?: { start?: number }) =>
  fetch(`${config.origin}/v2/images/${encodeURIComponent(id)}/file`, {
    signal,
    headers: {
      "x-soak-req": options === undefined ? "prefetch" : "peer-failover",
      "x-soak-server": String(config.index),
      ...(options?.start ? { range: `bytes=${options.start}-` } : {}),
    },
  });

/** The app, once this server knows its cluster (its self URL needs the port). */
function makeApp(cluster: Cluster | undefined): Hono {
  const app = new Hono();
  app.route(
    "/",
    cacheApi({ store, authorize: () => true, onError, cluster, fetchImage: fetchOrigin }),
  );
  app.use(imageCache({
    store,
    onError,
    cluster,
    fetchImage: fetchOrigin,
    // A slow access check, as the orchestrator asks: the fill may end (or move
    // on far past the window) while a request that joined it waits here.
    authorize: async (c) => {
      const delay = Number(c.req.header("x-soak-authorize-delay") ?? 0);
      if (delay > 0) await new Promise((resolve) => setTimeout(resolve, Math.min(delay, 5000)));
      return true;
    },
  }));
  app.all("*", async (c) => {
    const url = c.req.url;
    const path = url.slice(url.indexOf("/", url.indexOf("://") + 3));
    const headers = new Headers(c.req.raw.headers);
    headers.delete("host");
    headers.set("x-soak-server", String(config.index));
    try {
      // No client signal: a client hanging up must not cancel a fill (invariant 4).
      return await fetch(config.origin + path, {
        method: c.req.method,
        headers,
        redirect: "manual",
      });
    } catch {
      return c.text("origin unreachable", 502, { "x-soak-proxy-error": "1" });
    }
  });
  app.onError((error, c) => {
    out(`ERROR unhandled ${String(error?.message ?? error).slice(0, 200)}`);
    return c.text("internal error", 500);
  });
  return app;
}

/** Joins the cluster, retrying (at most 30 s) while the database is away (restarted by the soak). */
async function join(selfUrl: string): Promise<Cluster> {
  const deadline = Date.now() + 30_000;
  for (;;) {
    try {
      return await joinCluster({
        store,
        database: config.cluster!.database,
        selfUrl,
        secret: config.cluster!.secret,
        fetchImage: fetchOrigin,
        heartbeatInterval: 250,
        deadAfter: 2000,
        syncInterval: 1000,
        peerStallTimeout: 4000,
        onLog: (line) => out(`LOG ${line.slice(0, 300)}`),
        onError,
      });
    } catch (error) {
      if (Date.now() > deadline) throw error;
      await new Promise((resolve) => setTimeout(resolve, 250));
    }
  }
}

// On Node, the proxy command's guard against nodejs/undici#5360 (src/proxy/_undici_guard.ts):
// the soak checks what the shipped command does (without it, Node's fetch kills a server
// every few seconds here).
guardPausedParser((message) => out(`ERROR ${message}`));
await store.list(); // The start sweep is over once the store answers.
/** The app, set once this server knows its cluster (a request before that gets a 503). */
const ready: { app?: Hono } = {};
const handler = (request: Request) =>
  ready.app?.fetch(request) ?? new Response("starting", { status: 503 });
let server: { url: string; close(): Promise<void> };
if (DENO) {
  let listening!: (port: number) => void;
  const port = new Promise<number>((resolve) => listening = resolve);
  const served = DENO.serve(
    { hostname: "127.0.0.1", port: 0, onListen: ({ port }) => listening(port) },
    handler,
  );
  server = {
    url: `http://127.0.0.1:${await port}`,
    close: () => served.shutdown(),
  };
} else {
  server = await startServer(handler); // @hono/node-server
}
const cluster = config.cluster === undefined ? undefined : await join(server.url);
ready.app = makeApp(cluster);
out(`READY ${
  JSON.stringify({
    port: Number(new URL(server.url).port),
    pid: process.pid,
    features: { cacheApi: true },
  })
}`);

const stop = async () => {
  await cluster?.close().catch(() => {});
  await server.close().catch(() => {});
  await store.close().catch(() => {});
  process.exit(0);
};
process.on("SIGTERM", () => void stop());
// The orchestrator holds our stdin: when it ends (even by SIGKILL), so do we.
if (DENO) {
  (async () => {
    const buffer = new Uint8Array(64);
    while ((await DENO.stdin.read(buffer)) !== null) { /* ignore input */ }
    Deno.exit(0);
  })();
} else {
  process.stdin.on("end", () => process.exit(0)).on("close", () => process.exit(0)).resume();
}
