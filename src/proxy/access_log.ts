/**
 * The proxy's access log: one entry per request, once its body ended.
 *
 * @module
 */
import type { MiddlewareHandler } from "hono";
import { requestPath } from "../_http/path.ts";
import { clientAddress, deliveryOf } from "./_shared.ts";

/** One request, as the access log sees it. */
export interface AccessLogEntry {
  /** When the request arrived. */
  time: Date;
  /** The client's address, when the server tells it. */
  client: string | undefined;
  /** Request method. */
  method: string;
  /** Request path, without the query (which may carry secrets). */
  path: string;
  /** Response status. */
  status: number;
  /**
   * What the cache did: `hit`, `miss` (stored), `collapsed` (joined a fill),
   * `pass:<detail>` (went to the origin, not stored), `denied` (the access
   * check said no), `check-failed` (it could not be asked), `-` (not an
   * image request).
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
  /**
   * How the body ended: sent in full, the client hung up, or it failed (a
   * cut connection). `sent`: a hit handed to a server that does not report
   * delivery (Bun); logged at once.
   */
  outcome: "complete" | "aborted" | "error" | "sent";
}

/**
 * One access-log line: time, client, method, path, status, cache status,
 * bytes, duration and throughput, as `key=value` pairs.
 *
 * @param entry The request.
 * @returns The line, without a newline.
 *
 * @example One line per request
 * ```ts
 * import { formatAccessLog } from "hono-image-cache/proxy";
 * import assert from "node:assert/strict";
 *
 * const line = formatAccessLog({
 *   time: new Date(0), client: "10.0.0.7", method: "GET", path: "/v2/images/a/file",
 *   status: 200, cache: "hit", bytes: 16777216, durationMs: 80, outcome: "complete",
 * });
 * assert.equal(
 *   line,
 *   '1970-01-01T00:00:00.000Z client=10.0.0.7 method=GET path="/v2/images/a/file" status=200 cache=hit bytes=16777216 ms=80.0 MiB/s=200.0 end=complete',
 * );
 * ```
 */
export function formatAccessLog(entry: AccessLogEntry): string {
  const seconds = entry.durationMs / 1000;
  const rate = seconds > 0 && entry.bytes !== undefined
    ? (entry.bytes / 2 ** 20 / seconds).toFixed(1)
    : "-";
  return [
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
  ].join(" ");
}

/** What a `Cache-Status` header says, in a word for the log. */
function cacheWord(header: string | null): string {
  if (header === null) return "-";
  if (/;\s*hit\b/.test(header)) return "hit";
  if (/\bcollapsed\b/.test(header)) return "collapsed";
  if (/\bstored\b/.test(header)) return "miss";
  const detail = /detail=([^;,\s]+)/.exec(header)?.[1];
  if (detail === "access-denied" || detail === "forbidden") return "denied";
  if (detail === "access-check-failed") return "check-failed";
  return detail === undefined ? "-" : `pass:${detail}`;
}

/** The access-log middleware: counts body bytes without buffering, logs when the body ends. */
export function accessLog(
  onLog: (entry: AccessLogEntry) => void,
  logHits: boolean,
): MiddlewareHandler {
  return async function accessLog(c, next) {
    const time = new Date();
    const start = performance.now();
    await next();
    const res = c.res;
    const cache = cacheWord(res.headers.get("cache-status"));
    if (!logHits && cache === "hit") return;
    let bytes = 0;
    let bytesKnown = true;
    // Read now: Deno's request is gone once the response has been sent.
    const client = clientAddress(c);
    const method = c.req.method;
    const path = requestPath(c.req.url);
    const log = (outcome: AccessLogEntry["outcome"]) => {
      try {
        onLog({
          time,
          client,
          method,
          path,
          status: res.status,
          cache,
          bytes: bytesKnown ? bytes : undefined,
          durationMs: performance.now() - start,
          outcome,
        });
      } catch {
        // A failing logger must not fail the request.
      }
    };
    if (res.body === null) return log("complete");
    const length = res.headers.get("content-length");
    const announced = length === null ? -1 : Number(length);
    // A hit keeps its file-backed body: the runtime sends it without a round trip through
    // JavaScript per chunk (Deno), with sendfile and its Content-Length (Bun). Wrapping it
    // to count would lose that (it halved the throughput of large hits on Deno). The
    // server says when it was delivered where it can; Bun cannot, so its hits are logged
    // as "sent" when handed over.
    if (cache === "hit" && announced >= 0) {
      const delivered = deliveryOf(c);
      if (delivered === undefined) {
        bytes = announced;
        log("sent");
        return;
      }
      delivered.then(() => {
        bytes = announced;
        log("complete");
      }, () => {
        bytesKnown = false;
        log("aborted");
      });
      return;
    }
    const reader = res.body.getReader();
    let ended = false;
    const end = (outcome: AccessLogEntry["outcome"]) => {
      if (ended) return;
      ended = true;
      log(outcome);
    };
    const counted = new ReadableStream<Uint8Array>({
      async pull(controller) {
        let result;
        try {
          result = await reader.read();
        } catch (error) {
          end("error");
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
