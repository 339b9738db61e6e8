/**
 * Expected digests: where a fill's checksum comes from, and how it is compared.
 *
 * @module
 */
import { Buffer } from "node:buffer";
import type { DigestAlgorithm } from "./image_store.ts";

/**
 * The digest a fill must match before it is committed. `value` is hex; a
 * value that is not a valid digest of `algorithm` is a mismatch, never
 * "no checksum".
 *
 * @example
 * ```ts
 * import type { ExpectedDigest } from "hono-image-cache";
 * const expected: ExpectedDigest = { algorithm: "sha256", value: "e3b0c442..." };
 * ```
 */
export interface ExpectedDigest {
  /** The algorithm to hash the body with. */
  algorithm: DigestAlgorithm;
  /** The expected value, hex (any case). */
  value: string;
}

const HEX_LENGTH: Record<DigestAlgorithm, number> = { md5: 32, sha256: 64, sha512: 128 };

/** Whether `algorithm` is one the cache can compute. */
export function isDigestAlgorithm(algorithm: unknown): algorithm is DigestAlgorithm {
  return algorithm === "md5" || algorithm === "sha256" || algorithm === "sha512";
}

/**
 * The expected digest an origin response announces, as Glance sends it:
 * `Content-MD5` (hex as Glance sends it, or base64 as RFC 1864 says), else
 * `x-image-meta-checksum` (hex), both MD5. `undefined` when neither header
 * is present.
 *
 * @param headers The origin response's headers.
 * @returns The announced digest, possibly malformed (then it never matches).
 *
 * @example
 * ```ts
 * import { digestFromHeaders } from "hono-image-cache";
 * import assert from "node:assert/strict";
 *
 * const headers = new Headers({ "content-md5": "XUFAKrxLKna5cZ2REBfFkg==" });
 * assert.deepEqual(digestFromHeaders(headers), {
 *   algorithm: "md5",
 *   value: "5d41402abc4b2a76b9719d911017c592",
 * });
 * ```
 */
export function digestFromHeaders(headers: Headers): ExpectedDigest | undefined {
  // An empty header is no value at all; anything else that is not a digest is a mismatch.
  const contentMd5 = headers.get("content-md5")?.trim() || undefined;
  if (contentMd5 !== undefined) return { algorithm: "md5", value: md5FromHeader(contentMd5) };
  const checksum = headers.get("x-image-meta-checksum")?.trim() || undefined;
  if (checksum !== undefined) return { algorithm: "md5", value: checksum };
  return undefined;
}

function md5FromHeader(value: string): string {
  if (/^[0-9a-fA-F]{32}$/.test(value)) return value;
  // RFC 1864: base64 of the 16 digest bytes.
  if (/^[A-Za-z0-9+/]{22}==$/.test(value)) return Buffer.from(value, "base64").toString("hex");
  return value;
}

/**
 * Whether the computed hex digest matches what was expected. A malformed
 * expected value never matches.
 */
export function digestMatches(expected: ExpectedDigest, actualHex: string): boolean {
  const value = expected.value.toLowerCase();
  return value.length === HEX_LENGTH[expected.algorithm] && /^[0-9a-f]+$/.test(value) &&
    value === actualHex;
}

/** The RFC 1864 `Content-MD5` form (base64) of a hex MD5. */
export function hexToBase64(hex: string): string {
  return Buffer.from(hex, "hex").toString("base64");
}
