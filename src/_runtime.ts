/**
 * Which runtime runs this code, detected once, and the few runtime-specific
 * APIs the cache uses (each typed here by the little it needs, so no public
 * type names a runtime). Everything else is web-standard or `node:*`.
 *
 * @module
 */

/** The runtimes hono-image-cache runs on. */
export type RuntimeName = "deno" | "bun" | "node";

/** What the cache uses of `Bun`. */
export interface BunApi {
  /** A lazily opened file; `slice()` makes a `Blob` the server sends with sendfile. */
  file(path: string): { slice(start: number, end: number): Blob };
}

/** An open file of Deno's (`Deno.FsFile`), as far as the cache uses it. */
export interface DenoFile {
  readonly readable: ReadableStream<Uint8Array>;
  seek(offset: number, whence: number): Promise<number>;
  read(buffer: Uint8Array): Promise<number | null>;
  close(): void;
}

/** What the cache uses of `Deno`. */
export interface DenoApi {
  open(path: string): Promise<DenoFile>;
  unrefTimer(id: number): void;
}

const globals = globalThis as unknown as { Bun?: BunApi; Deno?: DenoApi };

/** `Bun` on Bun, else `undefined`. */
export const BUN: BunApi | undefined = globals.Bun;
/** `Deno` on Deno, else `undefined`. */
export const DENO: DenoApi | undefined = globals.Deno;

/** The runtime running this code. */
export const RUNTIME: RuntimeName = DENO !== undefined
  ? "deno"
  : BUN !== undefined
  ? "bun"
  : "node";

/**
 * Whether `fetch` decodes a compressed answer whatever the request asked:
 * Node's and Bun's do; Deno's does not once the request said
 * `Accept-Encoding: identity`.
 */
export const FETCH_DECODES: boolean = RUNTIME !== "deno";

/**
 * Lets the process exit while `timer` is pending (Node and Bun timers are
 * objects with `unref()`, Deno's are numbers).
 */
export function unrefTimer(timer: unknown): void {
  if (typeof timer === "object" && timer !== null && "unref" in timer) {
    (timer as { unref(): void }).unref();
  } else if (typeof timer === "number") {
    DENO?.unrefTimer(timer);
  }
}
