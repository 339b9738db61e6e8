/**
 * HTTP answers from the cache, computed from metadata alone (no I/O): hit
 * headers, editing response headers safely, and what a request gets from
 * a committed entry or a fill under way: `200`, `206` (single range or
 * `multipart/byteranges`), `304`, `412`, `416` (RFC 9110 §13-§15).
 *
 * @module
 */
import {
  evaluatePreconditions,
  hasPreconditions,
  ifRangeHolds,
  parseHttpDate,
} from "./conditional.ts";
import {
  type ByteRange,
  contentRange,
  multipartBody,
  type MultipartLayout,
  multipartLayout,
  type OpenRange,
  parseRange,
  rangeLength,
  type RangeRequest,
} from "./range.ts";
import type { ImageEntry } from "../image_store.ts";
import { rebody } from "./body.ts";

/**
 * The entity tag of an entry (RFC 9110 §8.8.3): the origin's, replayed, so
 * that a hit answers preconditions as the origin would; the digest (a
 * strong validator) when the origin sent none.
 */
export function entityTag(entry: ImageEntry): string {
  return entry.headers["etag"] ?? `"${entry.digest.algorithm}-${entry.digest.value}"`;
}

/** When the entry was last modified (ms): the origin's `Last-Modified`, else its commit time. */
export function lastModified(entry: ImageEntry): number {
  const origin = entry.headers["last-modified"];
  const parsed = origin === undefined ? undefined : parseHttpDate(origin);
  return parsed ?? entry.created;
}

/** An IMF-fixdate (RFC 9110 §5.6.7). */
export function httpDate(ms: number): string {
  return new Date(Math.floor(ms / 1000) * 1000).toUTCString();
}

/**
 * Headers of a hit (DESIGN.md invariant 9): the stored origin headers
 * (content type, `x-image-meta-*` except location), `Content-Length`, a
 * strong `ETag`, `Last-Modified`, `Accept-Ranges` and, for MD5 entries,
 * `Content-MD5` in hex as Glance sends it.
 */
export function hitHeaders(entry: ImageEntry): Headers {
  const headers = new Headers(entry.headers);
  headers.delete("x-image-meta-location");
  if (!headers.has("content-type")) headers.set("content-type", "application/octet-stream");
  // Derived from the verified digest, never replayed: hex, as Glance sends it.
  headers.delete("content-md5");
  if (entry.digest.algorithm === "md5") {
    headers.set("content-md5", entry.digest.value);
  }
  headers.set("content-length", String(entry.size));
  headers.set("etag", entityTag(entry));
  if (!headers.has("last-modified")) headers.set("last-modified", httpDate(entry.created));
  headers.set("accept-ranges", "bytes");
  return headers;
}

/**
 * `response` with a header set, whether or not its headers are immutable
 * (a `fetch()` response's are).
 */
export function withHeader(response: Response, name: string, value: string): Response {
  try {
    response.headers.set(name, value);
    return response;
  } catch {
    const copy = rebody(response);
    copy.headers.set(name, value);
    return copy;
  }
}

/**
 * How far ahead of a fill's position (bytes received from the origin) a
 * range may start and still be served from the fill; a range starting
 * further ahead goes to the origin, which answers it at once instead of
 * making the client wait for the fill to get there.
 */
export const FILL_RANGE_AHEAD = 16 * 2 ** 20;

/** What {@linkcode answerFill} needs to know of a fill under way. */
export interface FillView {
  /** The origin's `Content-Length`, when it sent one. */
  readonly expectedLength: number | undefined;
  /** Bytes received so far. */
  readonly written: number;
  /** The origin's headers, as clients of the fill get them. */
  readonly responseHeaders: Headers;
}

/** What the cache answers: status, headers and what the body is made of. */
export interface Answer {
  /** The status. */
  status: 200 | 206 | 304 | 412 | 416;
  /** The response headers (without `Cache-Status`). */
  headers: Headers;
  /** The data ranges the body is made of, in order; empty: no data to read. */
  ranges: ByteRange[];
  /** The framing when the body is `multipart/byteranges`. */
  multipart?: MultipartLayout;
  /** A short text body (`412`, `416`). */
  text?: string;
  /** Bytes of the body as sent (0 for `HEAD` and `304`). */
  length: number;
}

/** Response headers a `304` keeps (RFC 9110 §15.4.5), besides `ETag`; `Date` is the server's. */
const NOT_MODIFIED_HEADERS = ["cache-control", "expires", "vary", "content-location"];

/**
 * The answer to a request on a committed entry, from metadata alone:
 * preconditions first (RFC 9110 §13.2.2: `412`, `304`), then `Range` on a
 * `GET` (§14.2; with `If-Range`, §13.1.5), else the full `200`. `HEAD`
 * gets the headers of the `GET` and no body; it ignores `Range` (range
 * handling is defined for `GET` only).
 */
export function answerHit(entry: ImageEntry, method: string, request: Headers): Answer {
  const validators = { etag: entityTag(entry), lastModified: lastModified(entry) };
  const head = method === "HEAD";
  const verdict = evaluatePreconditions(method, request, validators);
  if (verdict === "not-modified") {
    const headers = new Headers({ etag: validators.etag });
    for (const name of NOT_MODIFIED_HEADERS) {
      const value = new Headers(entry.headers).get(name);
      if (value !== null) headers.set(name, value);
    }
    return { status: 304, headers, ranges: [], length: 0 };
  }
  if (verdict === "failed") {
    const answer = textAnswer(412, "Precondition failed: the cached image does not match", head);
    answer.headers.set("etag", validators.etag);
    return answer;
  }
  const headers = hitHeaders(entry);
  const full: Answer = {
    status: 200,
    headers,
    ranges: head || entry.size === 0 ? [] : [{ start: 0, end: entry.size - 1 }],
    length: head ? 0 : entry.size,
  };
  const range = request.get("range");
  if (method !== "GET" || range === null) return full;
  if (!ifRangeHolds(request.get("if-range"), validators)) return full;
  return rangeAnswer(parseRange(range, entry.size), headers, entry.size) ?? full;
}

/**
 * What a request may get from a fill under way:
 *
 * - `"join"`: no `Range` (or one to ignore): join the fill for the full body.
 * - an {@linkcode Answer}: a `206` (or `416`) from the fill, served as soon
 *   as the bytes are in; the held-back last byte follows verification.
 * - `{ forward }`: go to the origin. Preconditions (the fill's validators
 *   are only known once it is verified), a fill of unknown length, or a
 *   range starting more than {@linkcode FILL_RANGE_AHEAD} bytes beyond the
 *   fill's position.
 */
export function answerFill(
  fill: FillView,
  method: string,
  request: Headers,
): Answer | "join" | { forward: "range" | "conditional" } {
  if (hasPreconditions(method, request)) return { forward: "conditional" };
  const range = request.get("range");
  if (method !== "GET" || range === null) return "join";
  const size = fill.expectedLength;
  if (size === undefined) return { forward: "range" };
  const parsed = parseRange(range, size);
  if (parsed.type === "full") return "join";
  if (
    parsed.type === "ranges" &&
    parsed.ranges.some((r) => r.start > fill.written + FILL_RANGE_AHEAD)
  ) return { forward: "range" };
  const headers = new Headers(fill.responseHeaders);
  headers.set("accept-ranges", "bytes");
  return rangeAnswer(parsed, headers, size) as Answer;
}

/**
 * The body of an answer. The first (or only) range is opened before this
 * resolves, so a store fault surfaces before any header is sent; further
 * parts of a multipart body are opened one at a time as the client reads.
 * `release` is called once when a multipart body ends, fails or is
 * cancelled (parts it never opened may hold something).
 */
export async function answerBody(
  answer: Answer,
  open: OpenRange,
  release?: () => void,
): Promise<ReadableStream<Uint8Array> | Blob | string | null> {
  if (answer.text !== undefined) return answer.text;
  if (answer.ranges.length === 0) return null;
  const first = answer.ranges[0];
  const body = await open(first.start, first.end);
  if (answer.multipart === undefined) return body;
  return multipartBody(answer.multipart, open, body, release);
}

/** `206` or `416` for a parsed `Range`; `undefined`: ignore it (send `200`). */
function rangeAnswer(request: RangeRequest, headers: Headers, size: number): Answer | undefined {
  if (request.type === "full") return undefined;
  if (request.type === "unsatisfiable") {
    const answer = textAnswer(416, `Range not satisfiable: the image has ${size} bytes`, false);
    answer.headers.set("content-range", `bytes */${size}`);
    answer.headers.set("accept-ranges", "bytes");
    return answer;
  }
  // Content-MD5 is the digest of the whole image, not of this content.
  headers.delete("content-md5");
  const ranges = request.ranges;
  if (ranges.length === 1) {
    const length = rangeLength(ranges[0]);
    headers.set("content-range", contentRange(ranges[0], size));
    headers.set("content-length", String(length));
    return { status: 206, headers, ranges, length };
  }
  const type = headers.get("content-type") ?? "application/octet-stream";
  const multipart = multipartLayout(ranges, size, type);
  headers.delete("content-range");
  headers.set("content-type", `multipart/byteranges; boundary=${multipart.boundary}`);
  headers.set("content-length", String(multipart.length));
  return { status: 206, headers, ranges, multipart, length: multipart.length };
}

function textAnswer(status: 412 | 416, text: string, head: boolean): Answer {
  const length = new TextEncoder().encode(text).byteLength;
  const headers = new Headers({
    "content-type": "text/plain; charset=UTF-8",
    "content-length": String(length),
  });
  return head
    ? { status, headers, ranges: [], length: 0 }
    : { status, headers, ranges: [], text, length };
}

/**
 * Whether `value` is a `Response`. Not `instanceof`: under
 * `@hono/node-server` the global `Response` is replaced while `fetch` still
 * returns undici's, so a real response may fail `instanceof`.
 */
export function isResponse(value: unknown): value is Response {
  if (value instanceof Response) return true;
  const v = value as Partial<Response> | null;
  return typeof v === "object" && v !== null && typeof v.status === "number" &&
    typeof v.headers?.get === "function" && "body" in v && typeof v.arrayBuffer === "function";
}
