/**
 * {@linkcode upstreamProxy}: a streaming reverse-proxy handler.
 *
 * @module
 */
import type { Context, Handler } from "hono";
import { requestPath, requestPathAndQuery } from "../_http/path.ts";
import { checkFunction, checkSize } from "../_options.ts";
import { FETCH_DECODES } from "../_runtime.ts";
import { clientAddress, describeError, notesOf, parseUpstream, seconds } from "./_shared.ts";
import { rebody } from "../_http/body.ts";

/** Headers that belong to one connection (RFC 9110 §7.6.1), never forwarded. */
const HOP_BY_HOP = new Set([
  "connection",
  "keep-alive",
  "proxy-authenticate",
  "proxy-authorization",
  "proxy-connection",
  "te",
  "trailer",
  "transfer-encoding",
  "upgrade",
]);

/** Methods `fetch` refuses to send. */
const FORBIDDEN_METHODS = new Set(["CONNECT", "TRACE", "TRACK"]);

/** Content codings a `fetch` may decode by itself. */
const DECODED_CODINGS = new Set(["gzip", "x-gzip", "deflate", "br", "zstd"]);

/** Options of {@linkcode upstreamProxy}. */
export interface UpstreamProxyOptions {
  /**
   * The origin to forward to, `http:` or `https:`, optionally with a path
   * prefix (`https://cloud.example/image`): a request for `/v2/images` goes
   * to `<prefix>/v2/images`.
   */
  upstream: string | URL;
  /**
   * Milliseconds to wait for the upstream's response headers, counted once
   * the request body (if any) has been sent; `504` after that. A body that
   * takes long, either way, is never timed out.
   * @default {30000}
   */
  headerTimeout?: number;
  /**
   * The `fetch` to use (a custom agent, a test double).
   * @default {globalThis.fetch}
   */
  fetch?: (request: Request) => Promise<Response>;
  /**
   * Called when the upstream cannot be reached or sends no headers in time,
   * with an error naming the upstream's URL and the cause: for the log. The
   * client's `502` / `504` names neither.
   */
  onError?: (error: Error, c: Context) => void;
}

/**
 * A Hono handler that forwards every request to `upstream`, streaming.
 *
 * - Method, path, query and end-to-end headers are forwarded; hop-by-hop
 *   headers (and those a `Connection` header names) are removed both ways;
 *   `X-Forwarded-For` and `Forwarded` get the client appended,
 *   `X-Forwarded-Proto` and `X-Forwarded-Host` are set to what the client
 *   used. `Host` is the upstream's.
 * - Request bodies stream to the upstream (`duplex: "half"`), response
 *   bodies stream to the client: nothing is buffered. A streamed upload is
 *   sent chunked (`fetch` does not keep a client's `Content-Length` on a
 *   stream).
 * - The upstream is asked for `Accept-Encoding: identity` (a `fetch` may
 *   decode a compressed answer by itself). An upstream that compresses
 *   anyway: its body is passed on as it came (Deno), or, where `fetch`
 *   decoded it (Node, Bun), without the `Content-Encoding`: never a
 *   mislabelled body.
 * - Redirects are passed through (`redirect: "manual"`); a `Location` that
 *   points into the upstream is rewritten to point at this proxy.
 * - Cannot connect → `502`; no response headers within `headerTimeout` →
 *   `504`. Neither answer shows the upstream's address (`onError` gets it).
 *   A failure after the headers cuts the client's connection.
 * - The request id (`X-Request-Id`, the client's or a new one) is sent
 *   upstream, for logs on both sides to meet.
 *
 * @param options Where to forward, and how long to wait.
 * @returns The handler, e.g. for `app.all("*", ...)`.
 * @throws {TypeError} When `upstream` is not an absolute `http:` or `https:` URL.
 * @throws {RangeError} When `headerTimeout` is not a non-negative number.
 *
 * @example Forwarding everything to an origin
 * ```ts
 * import { Hono } from "hono";
 * import { upstreamProxy } from "hono-image-cache/proxy";
 * import assert from "node:assert/strict";
 *
 * const origin = (request: Request) =>
 *   Promise.resolve(new Response(`origin saw ${new URL(request.url).pathname}`));
 * const app = new Hono();
 * app.all("*", upstreamProxy({ upstream: "http://glance.internal:9292", fetch: origin }));
 *
 * const res = await app.request("/v2/images?limit=1");
 * assert.equal(await res.text(), "origin saw /v2/images");
 * ```
 */
export function upstreamProxy(options: UpstreamProxyOptions): Handler {
  const base = parseUpstream("upstreamProxy", options?.upstream);
  const headerTimeout = checkSize(
    "upstreamProxy",
    "headerTimeout",
    options.headerTimeout,
    30_000,
  );
  const send = checkFunction(
    "upstreamProxy",
    "fetch",
    options.fetch,
    (request: Request) => fetch(request),
  );
  const onError = checkFunction("upstreamProxy", "onError", options.onError, undefined);
  const basePath = base.pathname.replace(/\/+$/, "");

  return async function upstreamProxy(c: Context): Promise<Response> {
    const incoming = c.req.raw;
    if (FORBIDDEN_METHODS.has(incoming.method)) {
      // fetch cannot send these (and TRACE would echo credentials back).
      return c.text(`Method not allowed through this proxy: ${incoming.method}`, 405);
    }
    const url = c.req.url;
    const pathAndQuery = requestPathAndQuery(url);
    const target = base.origin + basePath + pathAndQuery;
    const headers = forwardHeaders(incoming.headers, url, clientAddress(c));
    const notes = notesOf(incoming);
    headers.set("x-request-id", notes.id);

    const ac = new AbortController();
    let timer: ReturnType<typeof setTimeout> | undefined;
    let timedOut = false;
    const startTimer = () => {
      if (timer !== undefined || ac.signal.aborted) return;
      timer = setTimeout(() => {
        timedOut = true;
        ac.abort(new Error(`No response headers within ${headerTimeout} ms`));
      }, headerTimeout);
    };
    // `incoming.signal` is left alone: Deno warns on any use of it, and a client that
    // leaves before the headers costs at most one upstream request until they come
    // (its unread body is then cancelled). After them, the body belongs to whoever reads
    // it: a fill goes on without the client that started it.

    let body: ReadableStream<Uint8Array> | null = null;
    if (incoming.body !== null && incoming.method !== "GET" && incoming.method !== "HEAD") {
      // The header timeout starts once the whole body is sent: an upload may take hours.
      body = incoming.body.pipeThrough(
        new TransformStream<Uint8Array, Uint8Array>({ flush: startTimer }),
      );
    } else {
      startTimer();
    }

    let response: Response;
    const started = performance.now();
    try {
      response = await send(
        new Request(target, {
          method: incoming.method,
          headers,
          body,
          redirect: "manual",
          signal: ac.signal,
          duplex: "half",
        } as RequestInit),
      );
    } catch (error) {
      notes.upstreamError = timedOut ? "timeout" : "unreachable";
      // Without the query: it may carry secrets.
      const where = base.origin + basePath + requestPath(url);
      try {
        onError?.(
          new Error(
            timedOut
              ? `${where}: no response headers within ${seconds(headerTimeout)}`
              : `${where}: ${describeError(error)}`,
            { cause: error },
          ),
          c,
        );
      } catch {
        // A failing logger must not fail the request.
      }
      // The upstream's address and the cause stay in the log: they describe the inside.
      if (timedOut) {
        return c.text(
          `Gateway timeout: the upstream sent no response headers within ${
            seconds(headerTimeout)
          } (request ${notes.id})`,
          504,
        );
      }
      return c.text(`Bad gateway: cannot reach the upstream (request ${notes.id})`, 502);
    } finally {
      clearTimeout(timer);
      notes.upstreamMs = performance.now() - started;
    }
    return rebody(response, {
      status: response.status,
      statusText: response.statusText,
      headers: responseHeaders(response.headers, base, basePath, url),
    });
  };
}

/** Names a `Connection` header lists: more hop-by-hop headers (RFC 9110 §7.6.1). */
function connectionListed(headers: Headers): Set<string> {
  const listed = new Set<string>();
  for (const name of (headers.get("connection") ?? "").split(",")) {
    const trimmed = name.trim().toLowerCase();
    if (trimmed !== "") listed.add(trimmed);
  }
  return listed;
}

/** The headers to send upstream. */
function forwardHeaders(incoming: Headers, url: string, client: string | undefined): Headers {
  const listed = connectionListed(incoming);
  const headers = new Headers();
  for (const [name, value] of incoming) {
    if (
      HOP_BY_HOP.has(name) || listed.has(name) || name === "host" || name === "content-length" ||
      name === "expect" || name === "accept-encoding"
    ) continue;
    headers.append(name, value);
  }
  headers.set("accept-encoding", "identity");
  const proto = url.startsWith("https:") ? "https" : "http";
  const host = incoming.get("host") ?? new URL(url).host;
  const forwardedFor = incoming.get("x-forwarded-for");
  if (client !== undefined) {
    headers.set("x-forwarded-for", forwardedFor ? `${forwardedFor}, ${client}` : client);
  }
  headers.set("x-forwarded-proto", proto);
  headers.set("x-forwarded-host", host);
  // RFC 7239 §4: an IPv6 node is quoted and bracketed; an unknown one is "unknown".
  const node = client === undefined ? "unknown" : client.includes(":") ? `"[${client}]"` : client;
  const element = `for=${node};host=${JSON.stringify(host)};proto=${proto}`;
  const forwarded = incoming.get("forwarded");
  headers.set("forwarded", forwarded ? `${forwarded}, ${element}` : element);
  return headers;
}

/** The upstream's response headers, for the client. */
function responseHeaders(
  upstream: Headers,
  base: URL,
  basePath: string,
  requestUrl: string,
): Headers {
  const listed = connectionListed(upstream);
  const headers = new Headers();
  for (const [name, value] of upstream) {
    if (HOP_BY_HOP.has(name) || listed.has(name)) continue;
    headers.append(name, value);
  }
  const coding = upstream.get("content-encoding")?.trim().toLowerCase();
  if (FETCH_DECODES && coding !== undefined && DECODED_CODINGS.has(coding)) {
    // fetch already decoded the body: the coding and its length no longer describe it.
    headers.delete("content-encoding");
    headers.delete("content-length");
  }
  const location = upstream.get("location");
  // A relative Location already points at this proxy; only an absolute one is rewritten.
  if (location !== null && /^[a-z][a-z0-9+.-]*:/i.test(location)) {
    try {
      const resolved = new URL(location);
      if (
        resolved.origin === base.origin &&
        (resolved.pathname === basePath || resolved.pathname.startsWith(basePath + "/"))
      ) {
        const own = new URL(requestUrl);
        const path = resolved.pathname.slice(basePath.length) || "/";
        headers.set("location", own.origin + path + resolved.search + resolved.hash);
      }
    } catch {
      // A Location that is not a URL is passed on as the upstream sent it.
    }
  }
  return headers;
}
