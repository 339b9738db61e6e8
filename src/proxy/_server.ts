/**
 * Serving a `fetch` handler with the runtime's own HTTP server: `Deno.serve`
 * on Deno, `Bun.serve` on Bun, `@hono/node-server` on Node (loaded only
 * there), each with a graceful close that lets the requests under way
 * finish. Runtime-neutral: each runtime's API is typed here by the little
 * that is used.
 *
 * @module
 */
import { Server as NetServer, type Socket } from "node:net";
import { RUNTIME } from "../_runtime.ts";
import { guardPausedParser } from "./_undici_guard.ts";

/** A `fetch` handler with the server's per-request value (Deno's info, Bun's server...). */
export type FetchHandler = (request: Request, env?: unknown) => Response | Promise<Response>;

/** A listening server. */
export interface Listener {
  /** The address it listens on. */
  readonly hostname: string;
  /** The port it listens on (the one picked, for port 0). */
  readonly port: number;
  /**
   * Stops accepting connections and resolves once the requests under way
   * have ended (idle keep-alive connections are closed).
   */
  close(): Promise<void>;
}

/**
 * Called when a response body failed after its headers were sent (the
 * connection is cut): the cause was reported where it happened (a fill
 * that failed verification, an upstream that broke off), so the servers'
 * own printing of it (with a stack trace) is replaced by this.
 */
export type OnCut = (error: unknown) => void;

interface DenoServer {
  addr: { hostname: string; port: number };
  shutdown(): Promise<void>;
}
interface BunServer {
  hostname: string;
  port: number;
  pendingRequests: number;
  stop(closeActiveConnections?: boolean): Promise<void> | void;
}
interface NodeServer {
  address(): { address: string; port: number } | string | null;
  once(event: "error", listener: (error: Error) => void): void;
  once(event: "listening", listener: () => void): void;
  on(event: "connection", listener: (socket: Socket) => void): void;
  on(
    event: "request",
    listener: (
      request: { socket: Socket },
      response: { on(event: "close", f: () => void): void },
    ) => void,
  ): void;
}

const runtime = globalThis as unknown as {
  Deno?: {
    serve(
      options: {
        hostname: string;
        port: number;
        onListen: () => void;
        onError: (error: unknown) => Response;
      },
      handler: FetchHandler,
    ): DenoServer;
  };
  Bun?: {
    serve(options: {
      hostname: string;
      port: number;
      idleTimeout: number;
      fetch: FetchHandler;
    }): BunServer;
  };
};

/**
 * Serves `fetch` on `hostname:port`.
 *
 * @throws When the address cannot be bound (port taken, no such address).
 */
export async function listen(
  fetch: FetchHandler,
  hostname: string,
  port: number,
  onCut: OnCut = () => {},
): Promise<Listener> {
  if (RUNTIME === "deno") {
    // Deno.serve binds at once: a taken port throws here. Its onError also gets the errors
    // of response bodies (the handler's own are Hono's to answer).
    const server = runtime.Deno!.serve({
      hostname,
      port,
      onListen: () => {},
      onError: (error) => {
        onCut(error);
        return new Response("Internal error\n", { status: 500 });
      },
    }, fetch);
    return {
      hostname: server.addr.hostname,
      port: server.addr.port,
      close: () => server.shutdown(),
    };
  }
  if (RUNTIME === "bun") {
    // idleTimeout 0: a download whose client reads slowly is not cut after 10 s of quiet.
    const server = runtime.Bun!.serve({ hostname, port, idleTimeout: 0, fetch });
    return {
      hostname: server.hostname,
      port: server.port,
      async close() {
        await server.stop(false);
        for (let i = 0; i < 36_000 && server.pendingRequests > 0; i++) await sleep(100);
      },
    };
  }
  guardPausedParser((message) => onCut(new Error(message)));
  const { serve } = await import("@hono/node-server");
  const server = await new Promise<NodeServer>((resolve, reject) => {
    const created = serve({
      fetch: cutQuietly(fetch, onCut),
      hostname,
      port,
    }) as unknown as NodeServer;
    created.once("error", reject);
    created.once("listening", () => resolve(created));
  });
  // A graceful close that loses no byte: http.Server's close() destroys the connections it
  // deems idle, and a response whose end() was called is "idle" while its last bytes are
  // still on their way. Here a connection is ended (a FIN after its data) once it has had no
  // response under way for a second: a client still reading the end of a body (Node 22's
  // fetch gives up on a FIN it sees before the last bytes it has not read) has read it by then.
  const idleSince = new Map<Socket, number>(); // 0: a response under way
  server.on("connection", (socket) => {
    idleSince.set(socket, Date.now());
    socket.once("close", () => idleSince.delete(socket));
  });
  const under = new Map<Socket, number>();
  server.on("request", (request, response) => {
    const socket = request.socket;
    under.set(socket, (under.get(socket) ?? 0) + 1);
    idleSince.set(socket, 0);
    response.on("close", () => {
      const left = (under.get(socket) ?? 1) - 1;
      under.set(socket, left);
      if (left === 0) idleSince.set(socket, Date.now());
    });
  });
  const address = server.address();
  return {
    hostname: typeof address === "object" && address !== null ? address.address : hostname,
    port: typeof address === "object" && address !== null ? address.port : port,
    close: () =>
      new Promise<void>((resolve) => {
        const endIdle = () => {
          const now = Date.now();
          for (const [socket, since] of idleSince) {
            if (since !== 0 && now - since >= IDLE_GRACE) {
              idleSince.delete(socket);
              socket.end();
            }
          }
        };
        const timer = setInterval(endIdle, 100);
        // net.Server's close: stop listening, call back once every connection has ended.
        NetServer.prototype.close.call(server as unknown as NetServer, () => {
          clearInterval(timer);
          resolve();
        });
        endIdle();
      }),
  };
}

/** Milliseconds a connection stays open after its last response, once closing. */
const IDLE_GRACE = 1000;

/**
 * On Node, a body that fails is cut by destroying the response (what
 * @hono/node-server would do after printing the error): the client sees the
 * connection cut before the last byte, never a clean end. Hits keep their
 * file body untouched.
 */
function cutQuietly(fetch: FetchHandler, onCut: OnCut): FetchHandler {
  return async (request, env) => {
    const response = await fetch(request, env);
    const outgoing = (env as { outgoing?: { destroy(error?: Error): void } } | undefined)
      ?.outgoing;
    const body = response.body;
    if (
      body === null || outgoing === undefined ||
      /;\s*hit\b/.test(response.headers.get("cache-status") ?? "")
    ) return response;
    const reader = body.getReader();
    const guarded = new ReadableStream<Uint8Array>({
      async pull(controller) {
        let result;
        try {
          result = await reader.read();
        } catch (error) {
          onCut(error);
          outgoing.destroy();
          controller.close(); // the socket is gone: this ends nothing the client sees
          return;
        }
        if (result.done) controller.close();
        else controller.enqueue(result.value);
      },
      cancel: (reason) => reader.cancel(reason),
    }, { highWaterMark: 0 });
    return new Response(guarded, response);
  };
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
