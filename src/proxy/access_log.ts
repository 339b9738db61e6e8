/**
 * The proxy's logs: the access log (one entry per request, once its body
 * ended) and events (one per thing worth an operator's attention), each
 * formatted as one `key=value` line or one JSON object.
 *
 * @module
 */
import type { Context, MiddlewareHandler } from "hono";
import { requestPath } from "../_http/path.ts";
import { type ImageRoute, matchRoute } from "../routes.ts";
import { clientBehind } from "./_client.ts";
import type { CacheWord, ProxyMetrics } from "./_metrics.ts";
import { clientAddress, deliveryOf, notesOf } from "./_shared.ts";

/** One request, as the access log sees it. */
export interface AccessLogEntry {
  /** When the request arrived. */
  time: Date;
  /**
   * The request id: the client's `X-Request-Id` when it sent a sane one,
   * else a new UUID. Sent back as `X-Request-Id` and forwarded upstream.
   */
  requestId?: string;
  /**
   * The client's address, when the server tells it; behind a trusted proxy
   * (`trustedProxies`), the address it gave in `X-Forwarded-For`.
   */
  client: string | undefined;
  /** Request method. */
  method: string;
  /** Request path, without the query (which may carry secrets). */
  path: string;
  /** The image id, for an image request (a `serve` or `evict` route). */
  imageId?: string;
  /** The client's `User-Agent`. */
  userAgent?: string;
  /** Response status. */
  status: number;
  /**
   * What the cache did: `hit`, `stale` (a hit allowed by an older answer,
   * the upstream being unreachable: `serveStaleOnError`), `miss` (stored),
   * `collapsed` (joined a fill), `pass:<detail>` (went to the origin, not
   * stored), `denied` (the access check said no), `check-failed` (it could
   * not be asked), `-` (not an image request).
   */
  cache: string;
  /**
   * Body bytes sent to the client; `undefined` when not known (a hit the
   * client hung up on, on Deno, where hit bodies are not wrapped to be
   * counted).
   */
  bytes: number | undefined;
  /** Milliseconds from the request to the end of the body. */
  durationMs: number;
  /** Milliseconds from the request to the response headers. */
  ttfbMs?: number;
  /** Milliseconds the upstream took to send its headers, when the request went there. */
  upstreamMs?: number;
  /**
   * How the body ended: sent in full, the client hung up, or it failed (a
   * cut connection). `sent`: a hit handed to a server that does not report
   * delivery (Bun); logged at once.
   */
  outcome: "complete" | "aborted" | "error" | "sent";
}

/** Something worth an operator's attention, as the proxy reports it (`onEvent`). */
export interface ProxyEvent {
  /** How much it matters: `error`, `warn`, `info` or `debug`. */
  level: "error" | "warn" | "info" | "debug";
  /** What happened, as a stable kebab-case name (`upstream-error`, `image-gone`...). */
  event: string;
  /** What happened, for people: one line, never a secret. */
  message: string;
  /** The image it is about, if any. */
  imageId?: string;
  /** The request it is about, if any. */
  requestId?: string;
  /** The error behind it, if any (its stack is worth showing only when debugging). */
  error?: unknown;
}

/** The line formats of {@linkcode formatAccessLog} and {@linkcode formatProxyEvent}. */
export type LogFormat = "text" | "json";

/**
 * One access-log line: time, client, method, path, status, cache status,
 * bytes, duration, throughput and how the body ended, then the request id,
 * the upstream's time to headers and the user agent when known; as
 * `key=value` pairs (`text`) or one JSON object (`json`).
 *
 * @param entry The request.
 * @param format `text` (default) or `json`.
 * @returns The line, without a newline.
 *
 * @example One line per request
 * ```ts
 * import { formatAccessLog } from "hono-image-cache/proxy";
 * import assert from "node:assert/strict";
 *
 * const entry = {
 *   time: new Date(0), client: "10.0.0.7", method: "GET", path: "/v2/images/a/file",
 *   status: 200, cache: "hit", bytes: 16777216, durationMs: 80, outcome: "complete" as const,
 *   requestId: "req-1",
 * };
 * assert.equal(
 *   formatAccessLog(entry),
 *   '1970-01-01T00:00:00.000Z client=10.0.0.7 method=GET path="/v2/images/a/file" status=200 cache=hit bytes=16777216 ms=80.0 MiB/s=200.0 end=complete id=req-1',
 * );
 * assert.equal(JSON.parse(formatAccessLog(entry, "json")).cache, "hit");
 * ```
 */
export function formatAccessLog(entry: AccessLogEntry, format: LogFormat = "text"): string {
  const seconds = entry.durationMs / 1000;
  const rate = seconds > 0 && entry.bytes !== undefined
    ? (entry.bytes / 2 ** 20 / seconds).toFixed(1)
    : "-";
  if (format === "json") {
    return JSON.stringify({
      time: entry.time.toISOString(),
      type: "access",
      request_id: entry.requestId,
      client: entry.client,
      method: entry.method,
      path: entry.path,
      image_id: entry.imageId,
      status: entry.status,
      cache: entry.cache,
      bytes: entry.bytes,
      duration_ms: round(entry.durationMs),
      ttfb_ms: entry.ttfbMs === undefined ? undefined : round(entry.ttfbMs),
      upstream_ms: entry.upstreamMs === undefined ? undefined : round(entry.upstreamMs),
      user_agent: entry.userAgent,
      end: entry.outcome,
    });
  }
  const line = [
    entry.time.toISOString(),
    `client=${entry.client ?? "-"}`,
    `method=${entry.method}`,
    `path=${JSON.stringify(entry.path)}`,
    `status=${entry.status}`,
    `cache=${entry.cache}`,
    `bytes=${entry.bytes ?? "-"}`,
    `ms=${entry.durationMs.toFixed(1)}`,
    `MiB/s=${rate}`,
    `end=${entry.outcome}`,
  ];
  if (entry.requestId !== undefined) line.push(`id=${entry.requestId}`);
  if (entry.upstreamMs !== undefined) line.push(`upstream_ms=${entry.upstreamMs.toFixed(1)}`);
  if (entry.userAgent !== undefined) line.push(`ua=${JSON.stringify(entry.userAgent)}`);
  return line.join(" ");
}

function round(ms: number): number {
  return Math.round(ms * 10) / 10;
}

/**
 * One event line: time, level, event name, image and request ids, message;
 * with `stack`, the error's stack trace too (on the following lines in
 * `text`, as a field in `json`).
 *
 * @param event The event.
 * @param options `format` (`text` or `json`), `stack` (include the stack
 *   trace of `event.error`), `time` (default now).
 * @returns The line, without a final newline.
 *
 * @example An event as text and as JSON
 * ```ts
 * import { formatProxyEvent } from "hono-image-cache/proxy";
 * import assert from "node:assert/strict";
 *
 * const event = {
 *   level: "warn" as const, event: "upstream-error", imageId: "cirros",
 *   message: "cannot reach the upstream",
 * };
 * const time = new Date(0);
 * assert.equal(
 *   formatProxyEvent(event, { time }),
 *   '1970-01-01T00:00:00.000Z level=warn event=upstream-error image=cirros message="cannot reach the upstream"',
 * );
 * assert.equal(JSON.parse(formatProxyEvent(event, { format: "json", time })).image_id, "cirros");
 * ```
 */
export function formatProxyEvent(
  event: ProxyEvent,
  options: { format?: LogFormat; stack?: boolean; time?: Date } = {},
): string {
  const time = (options.time ?? new Date()).toISOString();
  const stack = options.stack && event.error instanceof Error ? event.error.stack : undefined;
  if (options.format === "json") {
    return JSON.stringify({
      time,
      type: "event",
      level: event.level,
      event: event.event,
      image_id: event.imageId,
      request_id: event.requestId,
      message: event.message,
      stack,
    });
  }
  const line = [time, `level=${event.level}`, `event=${event.event}`];
  if (event.imageId !== undefined) line.push(`image=${quoteIfNeeded(event.imageId)}`);
  if (event.requestId !== undefined) line.push(`id=${quoteIfNeeded(event.requestId)}`);
  line.push(`message=${JSON.stringify(event.message)}`);
  return line.join(" ") + (stack === undefined ? "" : `\n${stack}`);
}

function quoteIfNeeded(value: string): string {
  return /^[\w.:@-]+$/.test(value) ? value : JSON.stringify(value);
}

/** What a `Cache-Status` header says, in a word for the log. */
function cacheWord(header: string | null): string {
  if (header === null) return "-";
  if (/\bdetail=stale-access\b/.test(header)) return "stale";
  if (/;\s*hit\b/.test(header)) return "hit";
  if (/\bcollapsed\b/.test(header)) return "collapsed";
  if (/\bstored\b/.test(header)) return "miss";
  const detail = /detail=([^;,\s]+)/.exec(header)?.[1];
  if (detail === "access-denied" || detail === "forbidden") return "denied";
  if (detail === "access-check-failed") return "check-failed";
  return detail === undefined ? "-" : `pass:${detail}`;
}

/** The bounded form of a log word, for metric labels. */
function metricWord(word: string): CacheWord {
  if (word === "-") return "none";
  if (word.startsWith("pass:")) return "pass";
  return word as CacheWord;
}

/** Options of {@linkcode requestObserver}. */
export interface RequestObserverOptions {
  /** Where access-log entries go; none without it. */
  onLog?: (entry: AccessLogEntry) => void;
  /** Log hits too. */
  logHits: boolean;
  /** Counted in any case. */
  metrics: ProxyMetrics;
  /** Which requests are image requests (for the entry's `imageId`). */
  routes: readonly ImageRoute[];
  /** Peers whose `X-Forwarded-For` names the client. */
  trusted?: (peer: string) => boolean;
  /** A body that failed after the headers (the connection is cut): why, and which request. */
  onCut?: (
    error: unknown,
    request: { id: string; method: string; path: string; imageId?: string },
  ) => void;
}

/**
 * The first middleware of the proxy: gives each request its id (answered as
 * `X-Request-Id`), counts it in the metrics, and logs it once its body ends,
 * counting body bytes without buffering.
 */
export function requestObserver(options: RequestObserverOptions): MiddlewareHandler {
  const { onLog, logHits, metrics, routes, trusted, onCut } = options;
  return async function requestObserver(c: Context, next) {
    const time = new Date();
    const start = performance.now();
    const request = c.req.raw;
    const notes = notesOf(request);
    // Read now: Deno's request is gone once the response has been sent.
    const client = clientBehind(clientAddress(c), request.headers.get("x-forwarded-for"), trusted);
    const method = c.req.method;
    const path = requestPath(c.req.url);
    const userAgent = request.headers.get("user-agent") ?? undefined;
    metrics.inFlight++;
    let ended = false;
    let res: Response;
    try {
      await next();
      res = c.res;
    } catch (error) {
      metrics.inFlight--;
      throw error;
    }
    const ttfbMs = performance.now() - start;
    const word = cacheWord(res.headers.get("cache-status"));
    const metricCache = metricWord(word);
    metrics.responded(res.status, metricCache, ttfbMs);
    if (!res.headers.has("x-request-id")) {
      try {
        res.headers.set("x-request-id", notes.id);
      } catch {
        // Immutable headers (a fetch response passed on as is): the log still has the id.
      }
    }
    const log = !(onLog === undefined || (!logHits && word === "hit"));
    let bytes = 0;
    let bytesKnown = true;
    const end = (outcome: AccessLogEntry["outcome"]) => {
      if (ended) return;
      ended = true;
      metrics.inFlight--;
      const durationMs = performance.now() - start;
      metrics.ended(metricCache, durationMs);
      if (!log) return;
      try {
        onLog!({
          time,
          requestId: notes.id,
          client,
          method,
          path,
          imageId: matchRoute(routes, method, path)?.id,
          userAgent,
          status: res.status,
          cache: word,
          bytes: bytesKnown ? bytes : undefined,
          durationMs,
          ttfbMs,
          upstreamMs: notes.upstreamMs,
          outcome,
        });
      } catch {
        // A failing logger must not fail the request.
      }
    };
    if (res.body === null) return end("complete");
    const length = res.headers.get("content-length");
    const announced = length === null ? -1 : Number(length);
    // A hit keeps its file-backed body: the runtime sends it without a round trip through
    // JavaScript per chunk (Deno), with sendfile and its Content-Length (Bun). Wrapping it
    // to count would lose that (it halved the throughput of large hits on Deno). The
    // server says when it was delivered where it can; Bun cannot, so its hits are logged
    // as "sent" when handed over.
    if ((word === "hit" || word === "stale") && announced >= 0) {
      const delivered = deliveryOf(c);
      if (delivered === undefined) {
        bytes = announced;
        end("sent");
        return;
      }
      delivered.then(() => {
        bytes = announced;
        end("complete");
      }, () => {
        bytesKnown = false;
        end("aborted");
      });
      return;
    }
    const reader = res.body.getReader();
    const counted = new ReadableStream<Uint8Array>({
      async pull(controller) {
        let result;
        try {
          result = await reader.read();
        } catch (error) {
          end("error");
          try {
            onCut?.(error, {
              id: notes.id,
              method,
              path,
              imageId: matchRoute(routes, method, path)?.id,
            });
          } catch {
            // A failing logger must not fail the request.
          }
          controller.error(error);
          return;
        }
        if (result.done) {
          end("complete");
          controller.close();
          return;
        }
        bytes += result.value.byteLength;
        controller.enqueue(result.value);
      },
      cancel(reason) {
        // A server may cancel the body once it sent `Content-Length` bytes (Deno does).
        end(bytes === announced ? "complete" : "aborted");
        return reader.cancel(reason);
      },
    }, { highWaterMark: 0 });
    c.res = undefined;
    c.res = new Response(counted, res);
  };
}
