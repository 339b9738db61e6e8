/**
 * Fetching a whole image into the cache without a client: the background
 * fill a `Range` miss starts (`imageCache`'s `fetchImage`), and the shape the
 * management API's prefetch can share.
 *
 * @module
 */
import { isResponse } from "../_http/answer.ts";
import type { CacheCore } from "./core.ts";
import { unrefTimer } from "../_runtime.ts";
import type { ExpectedDigest } from "../digest.ts";

/**
 * How the cache fetches a whole image from the origin (DESIGN.md §3).
 * `options.start` (cluster mode, when a peer failed mid-stream) asks for the
 * bytes from there on: answer `206` to a `Range: bytes=start-`, or a plain
 * `200` of the whole image (the bytes before `start` are then skipped).
 */
export type FetchImage = (
  imageId: string,
  signal: AbortSignal,
  options?: FetchImageOptions,
) => Promise<Response>;

/** What {@linkcode FetchImage} is asked for beyond the image id. */
export interface FetchImageOptions {
  /** The first byte wanted (cluster mode resuming a transfer). @default {0} */
  start?: number;
}

/** Options of {@linkcode prefetchImage}. */
export interface PrefetchOptions {
  /** Cache-side faults (fetch failures, store faults). */
  onError: (error: unknown) => void;
  /**
   * The digest the body must match.
   * @default {digestFromHeaders(response.headers)}
   */
  expectedDigest?: (
    response: Response,
  ) => ExpectedDigest | undefined | Promise<ExpectedDigest | undefined>;
  /** Refuse an answer without a digest. @default {false} */
  requireDigest?: boolean;
  /**
   * Milliseconds to wait for `fetchImage`'s response headers; then the
   * fetch is aborted, so that requests waiting for this claim go on.
   * @default {60000}
   */
  headersTimeout?: number;
  /** Aborts the fetch (shutdown): the fill fails and nothing is committed. */
  signal?: AbortSignal;
}

/**
 * Fetches the whole image `id` through `fetchImage` into a fill of the core,
 * with the same claim, coalescing and verification as a miss: requests that
 * arrive meanwhile wait for the claim and then join the fill.
 *
 * Resolves `undefined` once the image is committed (or was already cached),
 * or the reason it was not (a `Cache-Status` detail: `busy`, `status-404`,
 * `fetch-error`, `digest`, `store-error`...). Never rejects.
 */
export async function prefetchImage(
  core: CacheCore,
  id: string,
  fetchImage: FetchImage,
  options: PrefetchOptions,
): Promise<string | undefined> {
  const { onError } = options;
  // Claim synchronously, before any await, so a request arriving next waits for this fill.
  if (core.busy(id)) return "busy";
  const { own, claim } = core.claim(id);
  if (!own) return "busy";
  const controller = new AbortController();
  const stop = () => controller.abort(options.signal?.reason);
  if (options.signal?.aborted) stop();
  options.signal?.addEventListener("abort", stop, { once: true });
  try {
    try {
      if (await core.store.get(id) !== undefined) return undefined;
    } catch (error) {
      onError(error);
      return "store-error";
    }
    let response;
    try {
      response = await fetchWithin(id, fetchImage, controller, options.headersTimeout ?? 60_000);
    } catch (error) {
      onError(error);
      return "fetch-error";
    }
    const outcome = await core.fillFromOrigin(claim, response, {
      expectedDigest: options.expectedDigest,
      requireDigest: options.requireDigest ?? false,
      completeOnAbort: true,
      shareWhenBusy: false,
      onError,
    });
    if (outcome.fill === undefined) {
      // A body nobody will read: release the connection.
      await response.body?.cancel().catch(() => {});
      return outcome.detail;
    }
    const fill = outcome.fill;
    await fill.done;
    if (fill.committed !== undefined) return undefined;
    return fill.error?.reason ?? fill.detached ?? "not-committed";
  } finally {
    options.signal?.removeEventListener("abort", stop);
    claim.abandon();
  }
}

/**
 * `fetchImage(id)`, aborted (and rejected) when it sends no response
 * headers within `timeout` ms; rejects when it resolves to no `Response`.
 */
async function fetchWithin(
  id: string,
  fetchImage: FetchImage,
  controller: AbortController,
  timeout: number,
): Promise<Response> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    const response = await new Promise<Response>((resolve, reject) => {
      timer = setTimeout(() => {
        const error = new Error(`fetchImage("${id}") sent no response in ${timeout} ms`);
        controller.abort(error);
        reject(error);
      }, timeout);
      unrefTimer(timer);
      fetchImage(id, controller.signal).then(resolve, reject);
    });
    if (!isResponse(response)) {
      throw new TypeError(`fetchImage("${id}") did not resolve to a Response`);
    }
    return response;
  } finally {
    clearTimeout(timer);
  }
}
