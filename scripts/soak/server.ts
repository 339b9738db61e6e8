/**
 * One soak server process: a Hono app with `cacheApi()` and `imageCache()`
 * over a `FileSystemStore` on the shared directory, wrapped in a
 * fault-injecting store, in front of the soak origin.
 *
 * Started by `scripts/soak/soak.ts` with one argument, a JSON config. Speaks on
 * stdout, one line per event: `READY {"port","pid","features"}` once the
 * store's start sweep is done, `FAULT <kind>` per injected store fault,
 * `ERROR <message>` per fault the cache reported to `onError`. Exits when
 * its stdin closes (the orchestrator is gone), so it never outlives a run.
 *
 * @module
 */
import { Hono } from "hono";
import { cacheApi, FileSystemStore, imageCache } from "../../mod.ts";
import { Rng } from "./data.ts";
import { type StoreFaultRates, withStoreFaults } from "./store.ts";

/** What the orchestrator passes to a server process. */
export interface SoakServerConfig {
  directory: string;
  origin: string;
  maxSize: number;
  seed: number;
  /** This server's index, sent to the origin as `x-soak-server`. */
  index: number;
  storeFaults: StoreFaultRates;
}

const config = JSON.parse(Deno.args[0]) as SoakServerConfig;
const encoder = new TextEncoder();
const out = (line: string) => {
  try {
    Deno.stdout.writeSync(encoder.encode(line + "\n"));
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
const onError = (error: unknown) =>
  out(`ERROR ${String((error as Error)?.message ?? error).slice(0, 200)}`);

const app = new Hono();
app.route(
  "/",
  cacheApi({
    store,
    authorize: () => true,
    onError,
    fetchImage: (id: string, signal: AbortSignal) =>
      fetch(`${config.origin}/v2/images/${encodeURIComponent(id)}/file`, {
        signal,
        headers: { "x-soak-req": "prefetch", "x-soak-server": String(config.index) },
      }),
  }),
);
app.use(imageCache({
  store,
  onError,
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

await store.list(); // The start sweep is over once the store answers.
const server = Deno.serve({
  hostname: "127.0.0.1",
  port: 0,
  onListen: ({ port }) => {
    out(`READY ${
      JSON.stringify({
        port,
        pid: Deno.pid,
        features: { cacheApi: true },
      })
    }`);
  },
}, app.fetch);

const stop = async () => {
  await server.shutdown().catch(() => {});
  await store.close().catch(() => {});
  Deno.exit(0);
};
Deno.addSignalListener("SIGTERM", () => void stop());
// The orchestrator holds our stdin: when it ends (even by SIGKILL), so do we.
(async () => {
  const buffer = new Uint8Array(64);
  while ((await Deno.stdin.read(buffer)) !== null) { /* ignore input */ }
  Deno.exit(0);
})();
