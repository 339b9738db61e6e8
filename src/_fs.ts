/**
 * The file-system helpers of {@linkcode FileSystemStore}: error codes mapped
 * in one place, atomic writes, owner records, and each runtime's fastest
 * file body (DESIGN.md §6).
 *
 * @module
 */
import { type FileHandle, open, rename, unlink, writeFile } from "node:fs/promises";
import { hostname } from "node:os";
import process from "node:process";

/** The Node error code of a file-system error (`ENOENT`, `EEXIST`, ...), or `undefined`. */
export function errorCode(error: unknown): string | undefined {
  const code = (error as { code?: unknown } | null)?.code;
  return typeof code === "string" ? code : undefined;
}

/** Whether `error` means "no such file". */
export function isNotFound(error: unknown): boolean {
  return errorCode(error) === "ENOENT";
}

/** Runs a removal that may find nothing: `true` when something was removed. */
export async function removeIfPresent(path: string): Promise<boolean> {
  try {
    await unlink(path);
    return true;
  } catch (error) {
    if (isNotFound(error)) return false;
    throw error;
  }
}

let tmpSequence = 0;

/** Writes `data` to `path` atomically: a temporary file, fsync, then rename. */
export async function writeFileAtomic(path: string, data: string): Promise<void> {
  const tmp = `${path}.${process.pid}-${++tmpSequence}.tmp`;
  const handle = await open(tmp, "w");
  try {
    await handle.writeFile(data);
    await handle.sync();
  } finally {
    await handle.close();
  }
  try {
    await rename(tmp, path);
  } catch (error) {
    await removeIfPresent(tmp).catch(() => {});
    throw error;
  }
}

/** Fsyncs a directory so a rename in it is durable. Best effort: not every platform allows it. */
export async function syncDirectory(path: string): Promise<void> {
  let handle;
  try {
    handle = await open(path, "r");
    await handle.sync();
  } catch {
    // Directories cannot be opened or synced everywhere; the rename stands anyway.
  } finally {
    await handle?.close().catch(() => {});
  }
}

/**
 * Who owns a fill: enough for another process to tell a live fill from a
 * dead one. The heartbeat is the record file's mtime, refreshed while the
 * fill runs.
 */
export interface OwnerRecord {
  /** Process id of the owner. */
  pid: number;
  /** Host name of the owner. */
  host: string;
  /** Random token of the owning store instance. */
  token: string;
  /** When the fill started, ms since the epoch. */
  started: number;
}

/** This host's name, once. */
export const HOST: string = hostname();

/** Tokens of the live store instances of this process. */
export const LIVE_TOKENS: Set<string> = new Set();

/** How often a live owner refreshes its heartbeat. */
export const HEARTBEAT_INTERVAL = 5_000;
/** A heartbeat older than this means the owner is gone (or hung). */
export const HEARTBEAT_STALE = 30_000;

/** Parses an owner record; `undefined` when it is damaged. */
export function parseOwner(text: string): OwnerRecord | undefined {
  try {
    const value = JSON.parse(text);
    if (
      typeof value?.pid === "number" && typeof value.host === "string" &&
      typeof value.token === "string" && typeof value.started === "number"
    ) return value;
  } catch {
    // A damaged record is as good as none.
  }
  return undefined;
}

/** Whether a process of this host exists. */
export function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    // EPERM: the process exists but belongs to someone else.
    return errorCode(error) === "EPERM";
  }
}

/**
 * Whether an owner is alive. In this process: its store instance is open.
 * On this host: its process exists and its heartbeat is fresh (a reused pid
 * has no fresh heartbeat). Elsewhere: its heartbeat is fresh.
 */
export function ownerAlive(owner: OwnerRecord, heartbeatMs: number, now = Date.now()): boolean {
  const fresh = now - heartbeatMs < HEARTBEAT_STALE;
  if (owner.host !== HOST) return fresh;
  if (owner.pid === process.pid) return LIVE_TOKENS.has(owner.token);
  return fresh && pidAlive(owner.pid);
}

/** Writes `record` to `path`, failing when the file exists (the fill lock). */
export async function createOwnerFile(path: string, record: OwnerRecord): Promise<void> {
  await writeFile(path, JSON.stringify(record), { flag: "wx" });
}

interface BunFile {
  slice(start: number, end: number): Blob;
}
interface DenoFile {
  readonly readable: ReadableStream<Uint8Array>;
  seek(offset: number, whence: number): Promise<number>;
  read(buffer: Uint8Array): Promise<number | null>;
  close(): void;
}
const runtime = globalThis as unknown as {
  Bun?: { file(path: string): BunFile };
  Deno?: { open(path: string): Promise<DenoFile> };
};

/** Largest read of a Node file body: big reads keep the per-chunk cost of web streams low. */
const READ_CHUNK = 512 * 1024;
/** On Node, a range up to this size is read at once and sent as one chunk. */
const SMALL_BODY = 256 * 1024;

/**
 * Bytes `start` to `end` (inclusive) of a file, in the fastest body the
 * runtime sends (measured with `deno task bench`): `Bun.file().slice()` on
 * Bun (sendfile); `Deno.open()`'s stream on Deno, which the server reads
 * without JavaScript in between (a range that does not reach the end of the
 * file is read in JavaScript); on Node, a stream of 512 KiB reads, or one
 * chunk read at once for a range up to 256 KiB, about twice as fast as
 * `fs.createReadStream` through `Readable.toWeb`.
 */
export async function fileBody(
  path: string,
  start: number,
  end: number,
  size: number,
): Promise<ReadableStream<Uint8Array> | Blob> {
  if (runtime.Bun) return runtime.Bun.file(path).slice(start, end + 1);
  const length = Math.max(0, end + 1 - start);
  if (runtime.Deno) {
    const file = await runtime.Deno.open(path);
    try {
      if (start > 0) await file.seek(start, 0);
    } catch (error) {
      file.close();
      throw error;
    }
    // `readable` reads to the end of the file: the range, when it ends at the last byte.
    if (end === size - 1) return file.readable;
    return limitedFileStream(file, length);
  }
  const handle = await open(path, "r");
  if (length <= SMALL_BODY) {
    try {
      const bytes = await readFully(handle, start, length);
      return new ReadableStream<Uint8Array>({
        start(controller) {
          if (length > 0) controller.enqueue(bytes);
          controller.close();
        },
      });
    } finally {
      await handle.close();
    }
  }
  let position = start;
  const stop = start + length;
  let closed = false;
  const close = () => {
    if (closed) return;
    closed = true;
    handle.close().catch(() => {});
  };
  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      try {
        const bytes = await readFully(handle, position, Math.min(READ_CHUNK, stop - position));
        position += bytes.byteLength;
        controller.enqueue(bytes);
        if (position >= stop) {
          close();
          controller.close();
        }
      } catch (error) {
        close();
        controller.error(error);
      }
    },
    cancel: close,
  }, { highWaterMark: 0 });
}

/** Reads exactly `length` bytes at `position`; rejects when the file is shorter. */
async function readFully(
  handle: FileHandle,
  position: number,
  length: number,
): Promise<Uint8Array> {
  const buffer = new Uint8Array(length);
  let filled = 0;
  while (filled < length) {
    const { bytesRead } = await handle.read(buffer, filled, length - filled, position + filled);
    if (bytesRead === 0) throw new Error("File ended before the requested range");
    filled += bytesRead;
  }
  return buffer;
}

function limitedFileStream(file: DenoFile, length: number): ReadableStream<Uint8Array> {
  let left = length;
  let closed = false;
  const close = () => {
    if (!closed) file.close();
    closed = true;
  };
  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      if (left <= 0) {
        close();
        return controller.close();
      }
      const buffer = new Uint8Array(Math.min(left, READ_CHUNK));
      const read = await file.read(buffer);
      if (read === null) {
        close();
        return controller.error(new Error("File ended before the requested range"));
      }
      left -= read;
      controller.enqueue(buffer.subarray(0, read));
    },
    cancel: close,
  }, { highWaterMark: 0 });
}
