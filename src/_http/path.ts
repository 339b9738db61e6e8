/**
 * Paths of request URLs as the client sent them: routes match the raw path
 * (still percent-encoded), so an id is decoded exactly once.
 *
 * @module
 */

/** The path of a URL as sent (still percent-encoded), without the query or fragment. */
export function requestPath(url: string): string {
  const start = url.indexOf("/", url.indexOf("://") + 3);
  if (start === -1) return "/";
  const end = url.search(/[?#]/);
  return url.slice(start, end === -1 ? undefined : end);
}

/** The path and query of a URL as sent, without the fragment. */
export function requestPathAndQuery(url: string): string {
  const start = url.indexOf("/", url.indexOf("://") + 3);
  if (start === -1) return "/";
  const hash = url.indexOf("#", start);
  return url.slice(start, hash === -1 ? undefined : hash);
}
