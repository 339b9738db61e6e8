/**
 * The metadata of a committed entry of {@linkcode FileSystemStore}
 * (`<id>.json` beside the data), and its strict parser: damaged or
 * hand-edited metadata never reaches a response.
 *
 * @module
 */
import { isDigestAlgorithm } from "../digest.ts";
import type { ImageEntry } from "../image_store.ts";

/** The suffix of an entry's metadata file. */
export const META_SUFFIX = ".json";

const HEX_LENGTH = { md5: 32, sha256: 64, sha512: 128 } as const;

function isHexDigest(algorithm: keyof typeof HEX_LENGTH, value: unknown): boolean {
  return typeof value === "string" && value.length === HEX_LENGTH[algorithm] &&
    /^[0-9a-f]+$/.test(value);
}

/** A header `new Headers()` accepts: a token name, a value without CR, LF or NUL. */
function isHeader(name: string, value: unknown): boolean {
  return /^[!#$%&'*+.^_`|~0-9a-z-]+$/.test(name) && typeof value === "string" &&
    !/[\r\n\0]/.test(value);
}

/** Milliseconds within the range a `Date` can hold. */
function isTime(value: unknown): boolean {
  return typeof value === "number" && value >= 0 && value <= 8.64e15;
}

/** The entry `text` describes, or `undefined` when it is not exactly what a commit writes. */
export function parseEntry(id: string, text: string): ImageEntry | undefined {
  try {
    const value = JSON.parse(text);
    // Damaged or hand-edited metadata must never reach a response: every
    // field is checked to be what a commit writes, or the entry is damaged.
    const valid = value?.id === id && Number.isSafeInteger(value.size) && value.size >= 0 &&
      isDigestAlgorithm(value.digest?.algorithm) &&
      isHexDigest(value.digest.algorithm, value.digest.value) &&
      typeof value.headers === "object" && value.headers !== null &&
      Object.entries(value.headers).every(([k, v]) => isHeader(k, v)) &&
      isTime(value.created) && isTime(value.lastAccessed) &&
      Number.isSafeInteger(value.hits) && value.hits >= 0;
    if (!valid) return undefined;
    return {
      id,
      size: value.size,
      digest: { algorithm: value.digest.algorithm, value: value.digest.value },
      headers: value.headers,
      created: value.created,
      lastAccessed: value.lastAccessed,
      hits: value.hits,
    };
  } catch {
    return undefined;
  }
}
