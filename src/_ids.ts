/**
 * Ids are data, not paths (DESIGN.md invariant 8): every store names files
 * through {@linkcode fileNameForId}, never from a raw id.
 *
 * @module
 */

const SAFE_ID = /^[A-Za-z0-9_-]{1,200}$/;
/** Longest id, in UTF-8 bytes, that a store accepts. Keeps file names under 255 bytes. */
export const MAX_ID_BYTES = 200;
const encoder = new TextEncoder();
/** Names of the layout's own directories: an id of that name is encoded, never used as is. */
const RESERVED = new Set(["incomplete", "invalid", "queue", "deleted"]);

/**
 * The file name an id is stored under, or `undefined` when the id cannot be
 * held. `[A-Za-z0-9_-]` ids (UUIDs included) keep their own name, as Glance's
 * cache does, except the layout's directory names (`incomplete`, `invalid`,
 * `queue`); any other id is hex-encoded behind a `~` (a character no plain
 * id has, so the two never collide). Empty ids, NUL, `.` and `..` (in any
 * encoding the router may have decoded), and ids with a slash or backslash
 * (traversal), and ids over {@linkcode MAX_ID_BYTES} encoded bytes are refused.
 */
export function fileNameForId(id: string): string | undefined {
  if (SAFE_ID.test(id) && !RESERVED.has(id)) return id;
  if (id.length === 0 || id === "." || id === ".." || /[\0/\\]/.test(id)) return undefined;
  const bytes = encoder.encode(id);
  if (bytes.length > MAX_ID_BYTES / 2) return undefined;
  let hex = "~";
  for (const byte of bytes) hex += byte.toString(16).padStart(2, "0");
  return hex;
}

/** The id a file name stands for, or `undefined` for a name no id maps to. */
export function idForFileName(name: string): string | undefined {
  if (SAFE_ID.test(name)) return RESERVED.has(name) ? undefined : name;
  if (!/^~(?:[0-9a-f]{2})+$/.test(name)) return undefined;
  const bytes = new Uint8Array((name.length - 1) / 2);
  for (let i = 0; i < bytes.length; i++) bytes[i] = parseInt(name.slice(1 + 2 * i, 3 + 2 * i), 16);
  try {
    const id = new TextDecoder("utf-8", { fatal: true }).decode(bytes);
    return fileNameForId(id) === name ? id : undefined;
  } catch {
    return undefined;
  }
}

/** Whether a store can hold `id` at all. */
export function isStorableId(id: string): boolean {
  return fileNameForId(id) !== undefined;
}
