/**
 * A new `Response` around another's body stream, keeping the other alive as
 * long as the stream is. Node's `fetch` (undici) cancels the body of a
 * `Response` that is garbage collected while its body is neither locked nor
 * read, even when a new `Response` took the stream over: a body passed on
 * this way could end after 0 bytes under memory pressure. Every
 * `new Response(res.body, …)` of ours goes through here.
 *
 * @module
 */

const owners = new WeakMap<ReadableStream<Uint8Array>, Response>();

/**
 * `new Response(response.body, init)`, the original kept alive with its body.
 *
 * @param response The response whose body the new one carries.
 * @param init Status and headers of the new one (default: the original's).
 * @returns The new response.
 */
export function rebody(response: Response, init?: ResponseInit): Response {
  if (response.body !== null) owners.set(response.body, response);
  // A copy of the headers: with another response as its init, @hono/node-server's
  // Response shares that response's Headers, immutable for a `fetch()` answer.
  return new Response(
    response.body,
    init ?? {
      status: response.status,
      statusText: response.statusText,
      headers: new Headers(response.headers),
    },
  );
}
