/**
 * Reading another process's fill of {@linkcode FileSystemStore} as it grows
 * (`ImageStore.follow`): the open file outlives a rename, so the owner's
 * commit does not interrupt the reader.
 *
 * @module
 */
import { open, stat } from "node:fs/promises";
import type { Digest, ImageFollower } from "../image_store.ts";
import { isNotFound } from "./files.ts";

/**
 * A follower of the partial file at `dataPath`, or `undefined` when there is
 * none. `committedPath` is where the owner commits it; `ownerLive` tells
 * whether the fill's owner still holds its lock; `expected` is what the
 * owner recorded it will verify.
 */
export async function fileFollower(
  dataPath: string,
  committedPath: string,
  ownerLive: () => Promise<boolean>,
  expected: { size?: number; digest?: Digest } | undefined,
): Promise<ImageFollower | undefined> {
  let handle;
  try {
    handle = await open(dataPath, "r");
  } catch (error) {
    if (isNotFound(error)) return undefined;
    throw error;
  }
  let ino: number;
  try {
    ino = (await handle.stat()).ino;
  } catch (error) {
    await handle.close().catch(() => {});
    throw error;
  }
  const file = handle;
  let closed = false;
  /** A buffer a read found nothing for: the next poll reuses it instead of allocating. */
  let unused: Uint8Array | undefined;
  return {
    expected,
    read: async (position, length) => {
      const buffer = unused !== undefined && unused.byteLength >= length
        ? unused
        : new Uint8Array(length);
      unused = undefined;
      const { bytesRead } = await file.read(buffer, 0, length, position);
      if (bytesRead === 0) unused = buffer;
      return bytesRead === buffer.byteLength ? buffer : buffer.subarray(0, bytesRead);
    },
    state: async () => {
      // Still the file being filled, by a live owner; or committed under its name.
      const filling = await stat(dataPath).catch(() => undefined);
      if (filling?.ino === ino) return await ownerLive() ? "filling" : "gone";
      const committed = await stat(committedPath).catch(() => undefined);
      return committed?.ino === ino ? "committed" : "gone";
    },
    close: async () => {
      if (closed) return;
      closed = true;
      await file.close();
    },
  };
}
