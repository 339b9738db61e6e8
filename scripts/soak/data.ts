/**
 * The soak's ground truth: a seeded random generator, the image catalog, and
 * the bytes and digests of every image. Any id has content (a deterministic
 * function of the id and the position), so the oracle can check any byte of
 * any response, hostile ids included, without storing images.
 *
 * @module
 */
import { Buffer } from "node:buffer";
import { createHash } from "node:crypto";

/** A small, fast, seeded generator (sfc32). */
export class Rng {
  #a: number;
  #b: number;
  #c: number;
  #d: number;

  constructor(seed: number) {
    this.#a = 0x9e3779b9;
    this.#b = 0x243f6a88;
    this.#c = 0xb7e15162;
    this.#d = seed >>> 0;
    for (let i = 0; i < 16; i++) this.next();
  }

  /** A float in [0, 1). */
  next(): number {
    const t = (((this.#a + this.#b) | 0) + this.#d) | 0;
    this.#d = (this.#d + 1) | 0;
    this.#a = this.#b ^ (this.#b >>> 9);
    this.#b = (this.#c + (this.#c << 3)) | 0;
    this.#c = (this.#c << 21) | (this.#c >>> 11);
    this.#c = (this.#c + t) | 0;
    return (t >>> 0) / 4294967296;
  }

  /** An integer in [min, max] (inclusive). */
  int(min: number, max: number): number {
    return min + Math.floor(this.next() * (max - min + 1));
  }

  /** True with probability `p`. */
  chance(p: number): boolean {
    return this.next() < p;
  }

  /** One element of `items`. */
  pick<T>(items: readonly T[]): T {
    return items[Math.floor(this.next() * items.length)];
  }

  /** A key of `weights`, drawn in proportion to its weight. */
  weighted<K extends string>(weights: Readonly<Record<K, number>>): K {
    const entries = Object.entries(weights) as [K, number][];
    let total = 0;
    for (const [, weight] of entries) total += weight;
    let x = this.next() * total;
    for (const [key, weight] of entries) {
      x -= weight;
      if (x < 0) return key;
    }
    return entries[entries.length - 1][0];
  }

  /** A new generator, seeded from this one (an independent stream). */
  fork(): Rng {
    return new Rng(Math.floor(this.next() * 2 ** 32));
  }
}

const BLOCK = 65536;

function seedOf(id: string): number {
  let h = 2166136261;
  for (let i = 0; i < id.length; i++) h = Math.imul(h ^ id.charCodeAt(i), 16777619);
  return h >>> 0;
}

/**
 * Random access to the bytes of one image: `read(position, out)` fills `out`
 * with the bytes from `position`. Generates 64 KiB blocks, keeping the last.
 */
export class ImageBytes {
  readonly id: string;
  #seed: number;
  #block = new Uint8Array(BLOCK);
  #index = -1;

  constructor(id: string) {
    this.id = id;
    this.#seed = seedOf(id);
  }

  #load(index: number) {
    if (index === this.#index) return;
    let x = (this.#seed ^ Math.imul(index + 1, 0x9e3779b1)) >>> 0 || 1;
    const words = new Uint32Array(this.#block.buffer);
    for (let i = 0; i < words.length; i++) {
      x ^= x << 13;
      x ^= x >>> 17;
      x ^= x << 5;
      words[i] = x >>> 0;
    }
    this.#index = index;
  }

  /** Fills `out` with the image's bytes from `position`. */
  read(position: number, out: Uint8Array): Uint8Array {
    let filled = 0;
    while (filled < out.length) {
      const at = position + filled;
      const index = Math.floor(at / BLOCK);
      this.#load(index);
      const from = at - index * BLOCK;
      const n = Math.min(BLOCK - from, out.length - filled);
      out.set(this.#block.subarray(from, from + n), filled);
      filled += n;
    }
    return out;
  }

  /**
   * Whether `chunk` equals the image's bytes at `position`; the index (in
   * the chunk) of the first difference, or -1.
   */
  compare(position: number, chunk: Uint8Array, scratch: Uint8Array): number {
    for (let done = 0; done < chunk.length;) {
      const n = Math.min(scratch.length, chunk.length - done);
      const expected = this.read(position + done, scratch.subarray(0, n));
      const got = chunk.subarray(done, done + n);
      if (Buffer.compare(expected, got) !== 0) {
        for (let i = 0; i < n; i++) if (expected[i] !== got[i]) return done + i;
      }
      done += n;
    }
    return -1;
  }
}

/** How the origin announces an image's digest. */
export type DigestMode = "md5-hex" | "md5-base64" | "none";

/** One image of the catalog. */
export interface CatalogImage {
  id: string;
  size: number;
  digest: DigestMode;
  /** The origin sends it chunked, without `Content-Length`. */
  chunked: boolean;
  /** Lower-case hex MD5 of the content. */
  md5: string;
}

/** Sizes for ids outside the catalog (hostile ids): small, from the id. */
export function sizeOfUnknown(id: string): number {
  return seedOf("size:" + id) % 100_000;
}

/** The MD5 (hex) of bytes `start` to `end` (exclusive) of an image. */
export function md5Of(id: string, start: number, end: number): string {
  const hash = createHash("md5");
  const bytes = new ImageBytes(id);
  const buffer = new Uint8Array(1 << 20);
  for (let at = start; at < end; at += buffer.length) {
    const n = Math.min(buffer.length, end - at);
    hash.update(bytes.read(at, buffer.subarray(0, n)));
  }
  return hash.digest("hex");
}

/** The catalog of a run: every image the workload asks for, by id. */
export class Catalog {
  readonly images: CatalogImage[] = [];
  readonly #byId = new Map<string, CatalogImage>();

  /** Adds an image, computing its digest. */
  add(id: string, size: number, digest: DigestMode, chunked: boolean): CatalogImage {
    const image = { id, size, digest, chunked, md5: md5Of(id, 0, size) };
    this.images.push(image);
    this.#byId.set(id, image);
    return image;
  }

  /**
   * The image an id stands for: a catalog entry, or (any other id) a small
   * image with an MD5, created on first use.
   */
  get(id: string): CatalogImage {
    let image = this.#byId.get(id);
    if (image === undefined) {
      const size = sizeOfUnknown(id);
      image = { id, size, digest: "md5-hex", chunked: false, md5: md5Of(id, 0, size) };
      this.#byId.set(id, image);
    }
    return image;
  }

  /** Whether `id` is in the catalog proper (not a hostile id). */
  has(id: string): boolean {
    return this.images.some((image) => image.id === id);
  }

  /** Sum of the catalog's sizes. */
  get totalSize(): number {
    return this.images.reduce((sum, image) => sum + image.size, 0);
  }
}

const MiB = 2 ** 20;

/**
 * The catalog of a run, drawn from `rng`: empty and one-byte images, small,
 * medium and large ones (up to `largest` bytes), with every digest mode.
 */
export function makeCatalog(rng: Rng, options: { count: number; largest: number }): Catalog {
  const catalog = new Catalog();
  const sizes = [0, 1, 2, 65535, 65536, 65537];
  for (let i = sizes.length; i < options.count - 1; i++) {
    const kind = rng.weighted({ small: 4, medium: 4, large: 2 });
    if (kind === "small") sizes.push(rng.int(3, 256 * 1024));
    else if (kind === "medium") sizes.push(rng.int(256 * 1024, 8 * MiB));
    else sizes.push(rng.int(8 * MiB, options.largest));
  }
  sizes.push(options.largest);
  sizes.forEach((size, i) => {
    const digest = rng.weighted<DigestMode>({ "md5-hex": 5, "md5-base64": 2, "none": 2 });
    const uuid = rng.chance(0.5);
    const id = uuid ? uuidFrom(rng) : `img-${i}-${size}`;
    catalog.add(id, size, digest, rng.chance(0.2));
  });
  return catalog;
}

function uuidFrom(rng: Rng): string {
  const hex = Array.from({ length: 32 }, () => rng.int(0, 15).toString(16)).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-4${hex.slice(13, 16)}-a${hex.slice(17, 20)}-${
    hex.slice(20)
  }`;
}

/** Ids that try to break the store: traversal, NUL, encodings, length, Unicode. */
export const HOSTILE_IDS: readonly string[] = [
  "..",
  ".",
  "../../escape",
  "..\\..\\escape",
  "a/../../escape",
  "/etc/passwd",
  "escape\0nul",
  "%2e%2e",
  "~",
  "~41",
  "~zz",
  "detail",
  "con",
  "a b",
  "ünïcødé-😀",
  "x".repeat(100),
  "y".repeat(101),
  "z".repeat(201),
  "é".repeat(60),
  ".hidden",
  "name.json",
  "name.owner",
  "incomplete",
  "queue",
  "invalid",
  "-",
  "_",
];

/** How an id is written in a request path: percent-encoded, sometimes twice. */
export function encodeId(id: string, rng: Rng): string {
  const once = encodeURIComponent(id).replace(/\./g, (dot) => (rng.chance(0.5) ? "%2E" : dot));
  return rng.chance(0.1) ? encodeURIComponent(once) : once;
}

/** A random id of 1 to 40 characters, drawn from characters that paths and stores mishandle. */
export function randomId(r: Rng): string {
  const alphabet = "aZ09-_.~%/\\:é😀 \0?#&=+";
  const chars = Array.from(alphabet);
  return Array.from({ length: r.int(1, 40) }, () => r.pick(chars)).join("");
}
