/**
 * Each runtime's fastest body for a byte range of a file (DESIGN.md §6): the
 * hit path of {@linkcode FileSystemStore}.
 *
 * @module
 */
import { type FileHandle, open } from "node:fs/promises";
import { BUN, DENO, type DenoFile } from "../_runtime.ts";

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
  if (BUN) return BUN.file(path).slice(start, end + 1);
  const length = Math.max(0, end + 1 - start);
  if (DENO) {
    const file = await DENO.open(path);
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
