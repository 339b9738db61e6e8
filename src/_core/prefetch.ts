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
import { digestFromHeaders, type ExpectedDigest, isDigestAlgorithm } from "../digest.ts";

/** How the cache fetches a whole image from the origin (DESIGN.md §3). */
export type FetchImage = (imageId: string, signal: AbortSignal) => Promise<Response>;

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
  const claimed = core.claim(id);
  if (!claimed.own) return "busy";
  const claim = claimed.claim;
  let settled = false;
  const settle = (fill?: Parameters<typeof claim.resolve>[0]) => {
    if (!settled) claim.resolve(fill);
    settled = true;
  };
  const controller = new AbortController();
  const stop = () => controller.abort(options.signal?.reason);
  if (options.signal?.aborted) stop();
  options.signal?.addEventListener("abort", stop, { once: true });
  let response: Response | undefined;
  try {
    try {
      if (await core.store.get(id) !== undefined) return undefined;
    } catch (error) {
      onError(error);
      return "store-error";
    }
    const timeout = options.headersTimeout ?? 60_000;
    let timer: ReturnType<typeof setTimeout> | undefined;
    try {
      response = await new Promise<Response>((resolve, reject) => {
        timer = setTimeout(() => {
          const error = new Error(`fetchImage("${id}") sent no response in ${timeout} ms`);
          controller.abort(error);
          reject(error);
        }, timeout);
        unrefTimer(timer);
        fetchImage(id, controller.signal).then(resolve, reject);
      });
    } catch (error) {
      onError(error);
      return "fetch-error";
    } finally {
      clearTimeout(timer);
    }
    if (!isResponse(response)) {
      onError(new TypeError(`fetchImage("${id}") did not resolve to a Response`));
      response = undefined;
      return "fetch-error";
    }
    if (response.status !== 200 || response.headers.has("content-range")) {
      return `status-${response.status}`;
    }
    let expected;
    try {
      expected = options.expectedDigest === undefined
        ? digestFromHeaders(response.headers)
        : await options.expectedDigest(response);
      if (expected !== undefined && !isDigestAlgorithm(expected.algorithm)) {
        throw new TypeError(`Unsupported digest algorithm ${JSON.stringify(expected.algorithm)}`);
      }
    } catch (error) {
      onError(error);
      return "digest-error";
    }
    if (expected === undefined && options.requireDigest) return "no-digest";
    const result = await core.startFill(id, response, {
      expected,
      completeOnAbort: true,
      onError,
      claim,
    });
    if (typeof result === "string") return result;
    response = undefined; // the fill owns the body now
    settle(result);
    await result.done;
    if (result.committed !== undefined) return undefined;
    return result.error?.reason ?? result.detached ?? "not-committed";
  } finally {
    options.signal?.removeEventListener("abort", stop);
    settle(undefined);
    // A body nobody will read: release the connection.
    await response?.body?.cancel().catch(() => {});
  }
}
