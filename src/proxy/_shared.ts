/**
 * What the proxy's parts share: checking an upstream URL, what the server
 * running the app tells about a request (client address, delivery), and
 * wording errors and durations for people.
 *
 * @module
 */
import type { Context } from "hono";

/** Checks an upstream URL: absolute, `http:` or `https:`, no query, fragment or credentials. */
export function parseUpstream(owner: string, value: unknown): URL {
  let url: URL | undefined;
  try {
    url = value instanceof URL ? new URL(value.href) : new URL(String(value));
  } catch {
    url = undefined;
  }
  if (
    (typeof value !== "string" && !(value instanceof URL)) || url === undefined ||
    (url.protocol !== "http:" && url.protocol !== "https:") || url.search !== "" ||
    url.hash !== "" || url.username !== "" || url.password !== ""
  ) {
    throw new TypeError(
      `Cannot create ${owner}: "upstream" must be an absolute http: or https: URL without query, fragment or credentials, received ${
        JSON.stringify(value instanceof URL ? value.href : value)
      }`,
    );
  }
  return url;
}

/**
 * Settles when the server has delivered the response (rejects when it could
 * not), from whichever server runs the app: Deno's `info.completed`, the
 * Node response's `finish` / `close` events; `undefined` elsewhere (Bun).
 */
export function deliveryOf(c: Context): Promise<void> | undefined {
  const env = c.env as Record<string, unknown> | undefined;
  if (env === null || typeof env !== "object") return undefined;
  if (env.completed instanceof Promise) return env.completed as Promise<void>;
  const outgoing = env.outgoing as {
    writableFinished?: boolean;
    once?: (event: string, listener: () => void) => void;
  } | undefined;
  if (typeof outgoing?.once === "function") {
    return new Promise<void>((resolve, reject) => {
      outgoing.once!("finish", () => resolve());
      outgoing.once!("close", () => {
        if (outgoing.writableFinished) resolve();
        else reject(new Error("The connection closed before the response was sent"));
      });
    });
  }
  return undefined;
}

/** The client's address, from whichever server runs the app. */
export function clientAddress(c: Context): string | undefined {
  const env = c.env as Record<string, unknown> | undefined;
  if (env === null || typeof env !== "object") return undefined;
  // Deno.serve: the handler's second argument, `{ remoteAddr: { hostname } }`.
  const remote = env.remoteAddr as { hostname?: unknown } | undefined;
  if (typeof remote?.hostname === "string") return remote.hostname;
  // @hono/node-server: `{ incoming: IncomingMessage }`.
  const incoming = env.incoming as { socket?: { remoteAddress?: unknown } } | undefined;
  if (typeof incoming?.socket?.remoteAddress === "string") return incoming.socket.remoteAddress;
  // Bun.serve: the server, with `requestIP(request)`.
  const requestIP = (env as { requestIP?: unknown }).requestIP;
  if (typeof requestIP === "function") {
    try {
      const address = requestIP.call(env, c.req.raw) as { address?: unknown } | null;
      if (typeof address?.address === "string") return address.address;
    } catch {
      // Not Bun's server after all.
    }
  }
  return undefined;
}

export function describeError(error: unknown): string {
  let current = error;
  for (let depth = 0; depth < 5 && current instanceof Error; depth++) {
    const code = (current as { code?: unknown }).code;
    if (typeof code === "string") return `${code}: ${current.message}`;
    if (current.cause === undefined) return current.message;
    current = current.cause;
  }
  return String(current);
}

export function seconds(ms: number): string {
  return ms % 1000 === 0 ? `${ms / 1000} s` : `${ms} ms`;
}
