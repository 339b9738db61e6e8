/**
 * HTTP details of answers from the cache: hit headers, `Cache-Status`
 * (RFC 9211), editing response headers safely.
 *
 * @module
 */
import type { ImageEntry } from "./image_store.ts";

/** The strong validator of an entry: its digest (RFC 9110 §8.8.3). */
export function entityTag(entry: ImageEntry): string {
  return `"${entry.digest.algorithm}-${entry.digest.value}"`;
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
  if (entry.digest.algorithm === "md5" && !headers.has("content-md5")) {
    headers.set("content-md5", entry.digest.value);
  }
  headers.set("content-length", String(entry.size));
  headers.set("etag", entityTag(entry));
  headers.set("last-modified", httpDate(entry.created));
  headers.set("accept-ranges", "bytes");
  return headers;
}

/**
 * A `Cache-Status` member (RFC 9211 §2): `name; hit`, `name; fwd=miss; stored`,
 * `name; fwd=miss; collapsed`, `name; fwd=miss; detail=<reason>`.
 */
export function cacheStatusValue(name: string, params: string): string {
  return `${name}; ${params}`;
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
    const copy = new Response(response.body, response);
    copy.headers.set(name, value);
    return copy;
  }
}
