/**
 * Glance's image metadata (`GET /v2/images/{id}`), for what only it tells:
 * the digest to verify a fill with (`os_hash_algo` / `os_hash_value`, else
 * `checksum`), and whether an image is gone. Never for access: that is
 * Glance's `download_image` decision (see access_check.ts).
 *
 * @module
 */
import { digestFromHeaders, type ExpectedDigest, isDigestAlgorithm } from "../digest.ts";
import { askUpstream, credentialsOf, UpstreamFailure } from "./_shared.ts";

/** How to reach Glance. */
export interface GlanceEndpoint {
  /** The upstream's origin and path prefix, without a trailing slash. */
  prefix: string;
  send: (request: Request) => Promise<Response>;
  /** Milliseconds to wait for headers. */
  timeout: number;
}

/** What Glance said about an image's metadata. */
export type MetadataAnswer =
  | { kind: "found"; fields: Record<string, unknown> }
  | { kind: "refused"; status: number }
  | {
    kind: "failed";
    /** Why, with the upstream's URL: for the log. */
    error: Error;
    /** `unreachable`, `timeout`, `status-5xx` or `bad-answer`. */
    failure: string;
  };

/** Largest metadata answer read (Glance's are a few KiB). */
const METADATA_LIMIT = 1 << 20;

/** Image statuses after which Glance has no data to serve any more. */
export const GONE_STATUSES: ReadonlySet<string> = new Set(["deleted", "pending_delete", "killed"]);

/** Asks Glance for the metadata of `imageId` with `headers` (credentials). */
export async function imageMetadata(
  endpoint: GlanceEndpoint,
  headers: Headers,
  imageId: string,
): Promise<MetadataAnswer> {
  const url = `${endpoint.prefix}/v2/images/${encodeURIComponent(imageId)}`;
  let response;
  try {
    response = await askUpstream(endpoint.send, url, { headers }, endpoint.timeout);
  } catch (error) {
    const failure = error instanceof UpstreamFailure ? error.kind : "unreachable";
    return { kind: "failed", error: error as Error, failure };
  }
  if (response.status !== 200) {
    await response.body?.cancel().catch(() => {});
    if (response.status >= 500) {
      return {
        kind: "failed",
        error: new Error(`${url}: answered ${response.status}`),
        failure: "status-5xx",
      };
    }
    return { kind: "refused", status: response.status };
  }
  let fields: unknown;
  try {
    fields = JSON.parse(await limitedText(response, METADATA_LIMIT));
  } catch {
    fields = undefined;
  }
  if (fields === null || typeof fields !== "object" || Array.isArray(fields)) {
    return {
      kind: "failed",
      error: new Error(`${url}: the answer is not a JSON object`),
      failure: "bad-answer",
    };
  }
  return { kind: "found", fields: fields as Record<string, unknown> };
}

/**
 * The digest metadata announces: `os_hash_algo` / `os_hash_value` when the
 * algorithm is one the cache checks (`sha512`, `sha256`, `md5`), else
 * `checksum` (MD5); `undefined` when neither.
 */
export function metadataDigest(fields: Record<string, unknown>): ExpectedDigest | undefined {
  const algorithm = typeof fields.os_hash_algo === "string"
    ? fields.os_hash_algo.toLowerCase()
    : undefined;
  const value = fields.os_hash_value;
  if (isDigestAlgorithm(algorithm) && typeof value === "string" && value !== "") {
    return { algorithm, value: value.toLowerCase() };
  }
  const checksum = fields.checksum;
  if (typeof checksum === "string" && checksum !== "") {
    return { algorithm: "md5", value: checksum.toLowerCase() };
  }
  return undefined;
}

/** A fill whose digest could not be learnt: not cached (the client still gets the body). */
export class DigestUnknown extends Error {
  constructor(message: string, cause?: unknown) {
    super(message, { cause });
    this.name = "DigestUnknown";
  }
}

/**
 * The digest a fill of `imageId` (the origin's `response`) must match, from
 * Glance's metadata (`first`, when it was asked already), asked with the
 * credentials `from` carries (the `names` headers of a client's request,
 * or all of a `Headers`); when they are refused (401/403) and a service
 * credential is given, with it. A `404` means an origin without Glance's
 * metadata route (Glance itself answers a download it would 404 with 404
 * too): the answer's own `Content-MD5` then.
 *
 * @throws {DigestUnknown} When Glance could not be asked, or refused every
 *   credential: the metadata may announce a digest this fill would not be
 *   checked against, so it is not cached.
 */
export async function fillDigest(
  endpoint: GlanceEndpoint,
  imageId: string,
  response: Response,
  from: Request | Headers,
  names: readonly string[],
  service: (() => Promise<Headers | undefined>) | undefined,
  first?: Promise<MetadataAnswer>,
): Promise<ExpectedDigest | undefined> {
  const responseHeaders = response.headers;
  const credentials = from instanceof Headers ? from : credentialsOf(from.headers, names);
  let answer = await (first ?? imageMetadata(endpoint, credentials, imageId));
  if (answer.kind === "refused" && (answer.status === 401 || answer.status === 403)) {
    const headers = await service?.();
    if (headers !== undefined) answer = await imageMetadata(endpoint, headers, imageId);
  }
  if (answer.kind === "found") {
    return metadataDigest(answer.fields) ?? digestFromHeaders(responseHeaders);
  }
  if (answer.kind === "refused" && answer.status === 404) return digestFromHeaders(responseHeaders);
  const quoted = JSON.stringify(imageId);
  throw answer.kind === "refused"
    ? new DigestUnknown(
      `Not caching image ${quoted}: its metadata (the digest to verify it with) was refused (${answer.status})`,
    )
    : new DigestUnknown(
      `Not caching image ${quoted}: its metadata (the digest to verify it with) is unavailable (${answer.error.message})`,
      answer.error,
    );
}

/** A body as text, refusing more than `limit` bytes (a metadata answer, never an image). */
async function limitedText(response: Response, limit: number): Promise<string> {
  const reader = response.body?.getReader();
  if (reader === undefined) return "";
  const parts: Uint8Array[] = [];
  let length = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    length += value.byteLength;
    if (length > limit) {
      await reader.cancel();
      throw new RangeError(`Answer larger than ${limit} bytes`);
    }
    parts.push(value);
  }
  const bytes = new Uint8Array(length);
  let at = 0;
  for (const part of parts) {
    bytes.set(part, at);
    at += part.byteLength;
  }
  return new TextDecoder().decode(bytes);
}

/**
 * The headers of the service credential (`X-Auth-Token`), read each time
 * (a function may renew it); `undefined` without one.
 *
 * @throws {TypeError} When `token` is neither a printable ASCII string nor a function.
 */
export function serviceCredentials(
  owner: string,
  token: string | (() => string | Promise<string>) | undefined,
): (() => Promise<Headers | undefined>) | undefined {
  if (token === undefined) return undefined;
  if (
    typeof token !== "function" && (typeof token !== "string" || !/^[\x21-\x7e]+$/.test(token))
  ) {
    throw new TypeError(
      `Cannot create ${owner}: "serviceToken" must be a non-empty string of printable ASCII or a function, received ${typeof token}`,
    );
  }
  return async () => {
    const value = typeof token === "function" ? await token() : token;
    if (typeof value !== "string" || value.trim() === "") return undefined;
    return new Headers({
      "x-auth-token": value.trim(),
      accept: "application/json",
      "accept-encoding": "identity",
    });
  };
}
