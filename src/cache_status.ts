/**
 * What the cache tells a client in the RFC 9211 `Cache-Status` response
 * header: `hit`, `fwd=miss; stored`, `fwd=miss; collapsed`, or
 * `fwd=miss; detail=<reason>` when the origin's answer was passed through
 * without being stored. Every reason is one entry of
 * {@linkcode CACHE_STATUS_DETAILS}; metrics count pass-throughs by the same
 * names.
 *
 * @module
 */

/**
 * Every `detail=` reason the cache sends, with its meaning. `status-NNN`
 * stands for the origin's status (`status-404`, `status-206`...).
 *
 * @example Explaining a response
 * ```ts
 * import { CACHE_STATUS_DETAILS } from "hono-image-cache";
 * import assert from "node:assert/strict";
 *
 * const header = "hono-image-cache; fwd=miss; detail=too-large";
 * const detail = /detail=([^;,\s]+)/.exec(header)?.[1] as keyof typeof CACHE_STATUS_DETAILS;
 * assert.match(CACHE_STATUS_DETAILS[detail], /larger than/);
 * ```
 */
export const CACHE_STATUS_DETAILS = {
  "unsupported-id": "The store cannot hold this id (too long, NUL, a path): passed through",
  "method": "A HEAD that missed: the origin answered it, nothing was stored",
  "range": "A Range request the cache could not answer: the origin answered it, not stored",
  "conditional": "A conditional request on an image still being filled: the origin answered it",
  "uncacheable": "Waited on another request's miss or fill of this image, which could not serve it",
  "status-NNN": "The origin answered this status, not a full 200: passed through",
  "no-body": "The origin's 200 had no body: nothing to store",
  "digest-error":
    "The expected digest could not be had (expectedDigest failed or named an unknown algorithm)",
  "no-digest": "requireDigest is on and the origin announced no digest",
  "deleted": "The image was deleted while its miss waited for the origin: not stored",
  "busy": "Another fill of this image (here or in another process) owns the store's copy",
  "too-large": "The image is larger than maxObjectSize (or maxSize): passed through",
  "no-space": "No room even after evicting: fills under way, recent hits or minFree hold it",
  "store-error":
    "The store failed (cannot open, ENOSPC, EIO...): the origin's answer still arrives",
  "forbidden": "authorize said no: nothing was served from the cache",
  "access-denied": "The proxy's access check: the upstream refused these credentials",
  "access-check-failed": "The proxy's access check could not ask the upstream (502, 504)",
} as const satisfies Record<string, string>;

/**
 * A `detail=` reason of `Cache-Status`: a key of
 * {@linkcode CACHE_STATUS_DETAILS}, with `status-NNN` carrying the origin's
 * status.
 *
 * @example Typing a pass-through reason
 * ```ts
 * import type { CacheStatusDetail } from "hono-image-cache";
 * const reasons: CacheStatusDetail[] = ["too-large", "status-404"];
 * ```
 */
export type CacheStatusDetail =
  | Exclude<keyof typeof CACHE_STATUS_DETAILS, "status-NNN">
  | `status-${number}`;
