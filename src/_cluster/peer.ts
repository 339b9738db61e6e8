/**
 * The peer protocol: how one node streams an image to another, and asks it
 * to evict. Its own paths under {@linkcode PEER_PATH}, authenticated by the
 * cluster secret (header {@linkcode SECRET_HEADER}, compared in constant
 * time); never open to clients.
 *
 * `GET {PEER_PATH}/images/{id}` with `x-image-cache-start: N` answers `200`
 * with the bytes from `N` on (not a `Range`: a runtime may answer a `Range`
 * on a file body itself, as Bun's server does), of the committed entry or of the fill under way
 * (which holds its last byte back until verified, as for any client), and:
 *
 * | Header | Meaning |
 * | --- | --- |
 * | `x-image-cache-state` | `cached` or `filling` |
 * | `x-image-cache-digest` | `algorithm:hex` the bytes must match: the entry's (verified there), or the fill's expected digest (the origin's) |
 * | `x-image-cache-digest-algorithm` | the fill's algorithm, when its origin sent no digest: ask again (`HEAD`) once the body ended, for the committed digest |
 * | `x-image-cache-size` | the image's length, when known |
 * | `x-image-cache-offset` | `N` |
 * | `x-image-cache-headers` | the image's own headers (JSON), as a client would get them |
 *
 * `HEAD` answers the same headers without a body; `404` when the node has
 * neither the entry nor a fill. `POST {PEER_PATH}/evict` with
 * `{"id"?: string, "target"?: "cache" | "queue" | "both"}` evicts here.
 *
 * @module
 */
import { createHash, timingSafeEqual } from "node:crypto";
import { Hono } from "hono";
import type { CacheCore } from "../_core/core.ts";
import { type Fill, fillBody } from "../_fill/fill.ts";
import { hitHeaders } from "../_http/answer.ts";
import { isDigestAlgorithm } from "../digest.ts";
import type { Digest, DigestAlgorithm } from "../image_store.ts";

/** Where the peer endpoint lives on every node. */
export const PEER_PATH = "/_image-cache/cluster";
/** The header carrying the cluster secret. */
export const SECRET_HEADER = "x-image-cache-cluster-secret";

/** A cluster-wide eviction, as sent to peers (HTTP and NOTIFY). */
export interface Eviction {
  /** The image; absent: every image. */
  id?: string;
  /** What `DELETE /v2/cache` clears (`x-image-cache-clear-target`). @default {"both"} */
  target?: "cache" | "queue" | "both";
}

/** Whether `given` is the secret, in constant time. */
export function secretMatches(given: string | undefined, secret: string): boolean {
  if (given === undefined) return false;
  const a = createHash("sha256").update(given).digest();
  const b = createHash("sha256").update(secret).digest();
  return timingSafeEqual(a, b);
}

function parseDigest(value: string | null): Digest | undefined {
  const match = /^([a-z0-9]+):([0-9a-f]+)$/.exec(value ?? "");
  if (match === null || !isDigestAlgorithm(match[1])) return undefined;
  return { algorithm: match[1], value: match[2] };
}

/** The request header that names the first byte a peer wants. */
const START_HEADER = "x-image-cache-start";

/** The first byte `x-image-cache-start` asks for (0 without one); `undefined` when malformed. */
function startOf(header: string | undefined): number | undefined {
  if (header === undefined) return 0;
  const match = /^(\d{1,16})$/.exec(header.trim());
  return match === null ? undefined : Number(match[1]);
}

/** What the peer endpoint needs of its node. */
export interface PeerHost {
  readonly core: CacheCore;
  readonly secret: string;
  /** Evicts here (a peer's cluster-wide delete); resolves whether anything existed. */
  evictHere(eviction: Eviction): Promise<boolean>;
  /** Counts a transfer to a peer. */
  served(): void;
}

/**
 * The fill of `id` a peer may read: one under way, or the one a pending
 * miss of this node is about to start (its origin answer is awaited).
 */
async function fillFor(core: CacheCore, id: string): Promise<Fill | undefined> {
  const running = await core.joinableOwned(id);
  if (running !== undefined) return running;
  if (!core.busy(id)) return undefined;
  // The claim of a miss awaiting its origin answer: core.claim() hands the existing one.
  const { own, claim } = core.claim(id);
  if (own) {
    claim.abandon();
    return undefined;
  }
  const fill = await claim.fill;
  return fill?.joinable ? fill : undefined;
}

/** The peer endpoint of a node, as a Hono app. */
export function peerApp(host: PeerHost): Hono {
  const app = new Hono();
  const { core, secret } = host;
  const store = core.store;
  app.use(`${PEER_PATH}/*`, async (c, next) => {
    const given = c.req.header(SECRET_HEADER);
    if (given === undefined) return c.text("The cluster secret is required here", 401);
    if (!secretMatches(given, secret)) return c.text("Wrong cluster secret", 403);
    await next();
  });
  app.on(["GET", "HEAD"], `${PEER_PATH}/images/:id`, async (c) => {
    const id = c.req.param("id");
    const start = startOf(c.req.header(START_HEADER));
    if (start === undefined) return c.text(`${START_HEADER} must be a byte position`, 400);
    if (!store.canHold(id)) return c.text("Not here", 404);
    const head = c.req.method === "HEAD";
    const entry = await store.get(id);
    if (entry !== undefined) {
      if (start > entry.size) return c.text("Beyond the end", 416);
      const headers: Record<string, string> = {
        "x-image-cache-state": "cached",
        "x-image-cache-digest": `${entry.digest.algorithm}:${entry.digest.value}`,
        "x-image-cache-size": String(entry.size),
        "x-image-cache-offset": String(start),
        "x-image-cache-headers": JSON.stringify(Object.fromEntries(hitHeaders(entry))),
        "content-length": String(entry.size - start),
      };
      if (head || start === entry.size) return c.body(null, 200, headers);
      host.served();
      return c.body(await store.body(entry, start, entry.size - 1), 200, headers);
    }
    const fill = await fillFor(core, id);
    if (fill === undefined) return c.text("Not here", 404);
    const expected = fill.expected;
    const headers: Record<string, string> = {
      "x-image-cache-state": "filling",
      "x-image-cache-offset": String(start),
      "x-image-cache-headers": JSON.stringify(Object.fromEntries(fill.responseHeaders)),
    };
    if (expected !== undefined) {
      headers["x-image-cache-digest"] = `${expected.algorithm}:${expected.value.toLowerCase()}`;
    } else {
      headers["x-image-cache-digest-algorithm"] = fill.algorithm;
    }
    if (fill.expectedLength !== undefined) {
      headers["x-image-cache-size"] = String(fill.expectedLength);
      if (start > fill.expectedLength) return c.text("Beyond the end", 416);
    }
    if (head) return c.body(null, 200, headers);
    const reader = fill.attachAt(start);
    if (reader === undefined) return c.text("Not here any more", 404); // It just ended.
    host.served();
    return c.body(fillBody(fill, reader, start), 200, headers);
  });
  app.post(`${PEER_PATH}/evict`, async (c) => {
    let eviction: Eviction;
    try {
      eviction = await c.req.json();
    } catch {
      return c.text("Expected a JSON eviction", 400);
    }
    return c.json({ found: await host.evictHere(eviction) });
  });
  return app;
}

/** A peer's answer, parsed. */
export interface PeerAnswer {
  /** The peer's self URL. */
  url: string;
  state: "cached" | "filling";
  /** The digest the bytes must match, when the peer knows it. */
  digest?: Digest;
  /** The algorithm of the peer's fill (its committed digest comes later). */
  algorithm: DigestAlgorithm;
  /** The image's length, when known. */
  size?: number;
  /** The image's own headers. */
  headers: Headers;
  /** The bytes from the offset asked for; `null` for `HEAD`. */
  body: ReadableStream<Uint8Array> | null;
}

/** How a node reaches its peers. */
export interface PeerClient {
  readonly secret: string;
  /** Milliseconds to wait for a peer's response headers. */
  readonly headersTimeout: number;
}

/**
 * Asks `url` (a peer's self URL) for the image `id` from byte `start`;
 * resolves `undefined` when the peer does not have it (or cannot be
 * reached in time).
 */
export async function askPeer(
  client: PeerClient,
  url: string,
  id: string,
  start: number,
  method: "GET" | "HEAD" = "GET",
): Promise<PeerAnswer | undefined> {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), client.headersTimeout);
  let response: Response;
  try {
    response = await fetch(`${url}${PEER_PATH}/images/${encodeURIComponent(id)}`, {
      method,
      headers: { [SECRET_HEADER]: client.secret, [START_HEADER]: String(start) },
      signal: controller.signal,
    });
  } catch {
    return undefined;
  } finally {
    clearTimeout(timer);
  }
  if (response.status !== 200 || Number(response.headers.get("x-image-cache-offset")) !== start) {
    await response.body?.cancel().catch(() => {});
    return undefined;
  }
  const digest = parseDigest(response.headers.get("x-image-cache-digest"));
  const algorithm = digest?.algorithm ?? response.headers.get("x-image-cache-digest-algorithm");
  const size = response.headers.get("x-image-cache-size");
  let headers: Headers;
  try {
    headers = new Headers(JSON.parse(response.headers.get("x-image-cache-headers") ?? "{}"));
  } catch {
    headers = new Headers();
  }
  if (!isDigestAlgorithm(algorithm)) {
    await response.body?.cancel().catch(() => {});
    return undefined;
  }
  return {
    url,
    state: response.headers.get("x-image-cache-state") === "cached" ? "cached" : "filling",
    digest,
    algorithm,
    size: size === null ? undefined : Number(size),
    headers,
    body: method === "HEAD" ? null : response.body,
  };
}

/** Asks `url` to evict; resolves whether it had anything, or why it did not answer. */
export async function evictOnPeer(
  client: PeerClient,
  url: string,
  eviction: Eviction,
  timeout: number,
): Promise<boolean | { error: string }> {
  try {
    const response = await fetch(`${url}${PEER_PATH}/evict`, {
      method: "POST",
      headers: { [SECRET_HEADER]: client.secret, "content-type": "application/json" },
      body: JSON.stringify(eviction),
      signal: AbortSignal.timeout(timeout),
    });
    if (!response.ok) {
      await response.body?.cancel().catch(() => {});
      return { error: `answered ${response.status}` };
    }
    return ((await response.json()) as { found?: boolean }).found === true;
  } catch (error) {
    const timedOut = error instanceof Error && error.name === "TimeoutError";
    return { error: timedOut ? `no answer within ${timeout} ms` : String(error) };
  }
}
