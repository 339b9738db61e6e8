/**
 * What the proxy's parts share: checking an upstream URL, what the server
 * running the app tells about a request (client address, delivery), what
 * the parts learn about a request on its way (its id, upstream timing, the
 * access check), asking the upstream within a timeout, and wording errors
 * and durations for people.
 *
 * @module
 */
import { createHash, timingSafeEqual } from "node:crypto";
import type { Context } from "hono";
import { rebody } from "../_http/body.ts";

/** What the proxy's parts learn about one request on its way, for the access log and metrics. */
export interface RequestNotes {
  /** The request id: the client's `X-Request-Id` when sane, else a new UUID. */
  id: string;
  /** Milliseconds until the upstream's response headers (a forwarded request). */
  upstreamMs?: number;
  /** Why the upstream could not answer, when it could not. */
  upstreamError?: "unreachable" | "timeout";
  /** Milliseconds the access check took (asked, or remembered: about 0). */
  accessMs?: number;
  /** A hit served on an "allowed" answer older than the TTL, the upstream being unreachable. */
  stale?: boolean;
}

const notes = new WeakMap<Request, RequestNotes>();

/** The notes of a request (created by the first part that asks: the observer, normally). */
export function notesOf(request: Request): RequestNotes {
  let found = notes.get(request);
  if (found === undefined) {
    const given = request.headers.get("x-request-id");
    found = { id: given !== null && /^[\w.:@-]{1,128}$/.test(given) ? given : crypto.randomUUID() };
    notes.set(request, found);
  }
  return found;
}

/** The credential headers of a request, as a new `Headers` (nothing else is forwarded). */
export function credentialsOf(source: Headers, names: readonly string[]): Headers {
  const headers = new Headers({ accept: "application/json", "accept-encoding": "identity" });
  for (const name of names) {
    const value = source.get(name);
    if (value !== null) headers.set(name, value);
  }
  return headers;
}

/** How {@linkcode askUpstream} ended when no answer came. */
export class UpstreamFailure extends Error {
  /** `timeout`: no headers within the limit; `unreachable`: no connection, or it broke. */
  readonly kind: "timeout" | "unreachable";
  constructor(kind: "timeout" | "unreachable", message: string, cause?: unknown) {
    super(message, { cause });
    this.name = "UpstreamFailure";
    this.kind = kind;
  }
}

/**
 * Sends `request` through `send`, aborted after `timeout` ms without
 * response headers. Rejects with an {@linkcode UpstreamFailure} whose
 * message names the URL (for the log, never for a client).
 */
export async function askUpstream(
  send: (request: Request) => Promise<Response>,
  url: string,
  init: RequestInit,
  timeout: number,
): Promise<Response> {
  const ac = new AbortController();
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    ac.abort(new Error(`No answer within ${timeout} ms`));
  }, timeout);
  try {
    const response = await send(
      new Request(url, { ...init, redirect: "manual", signal: ac.signal }),
    );
    // A Response of the global class: @hono/node-server replaces the global `Response`,
    // and `fetch` still makes undici's (the cache checks `instanceof Response`).
    return response instanceof Response ? response : rebody(response as Response);
  } catch (error) {
    if (timedOut) {
      throw new UpstreamFailure("timeout", `${url}: no answer within ${seconds(timeout)}`);
    }
    throw new UpstreamFailure("unreachable", `${url}: ${describeError(error)}`, error);
  } finally {
    clearTimeout(timer);
  }
}

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

/**
 * A check that the request carries one of `tokens` (`Authorization:
 * Bearer` or `X-Auth-Token`), compared in constant time: `true`, or the
 * `401` / `403` to answer.
 */
export function tokensCheck(
  tokens: readonly string[],
  need: string,
): (c: Context) => true | Response {
  const expected = tokens.map((token) => createHash("sha256").update(token).digest());
  return (c) => {
    const bearer = /^Bearer\s+(.+)$/i.exec(c.req.header("authorization") ?? "")?.[1];
    const given = bearer ?? c.req.header("x-auth-token");
    if (given === undefined) {
      return c.text(`Unauthorized: ${need}`, 401, {
        "www-authenticate": 'Bearer realm="hono-image-cache"',
      });
    }
    const actual = createHash("sha256").update(given.trim()).digest();
    // Every token is compared, so the time does not tell which one (if any) matched.
    let match = false;
    for (const one of expected) match = timingSafeEqual(actual, one) || match;
    return match ? true : c.text("Forbidden: wrong token", 403);
  };
}
