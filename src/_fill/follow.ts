/**
 * Following another process's fill. When a store answers `"busy"` (another
 * live process owns the fill of this image), this process still has the
 * origin's answer in hand: its headers are in, its body not yet read. The
 * body of {@linkcode followedSource} takes the bytes from the other
 * process's growing file instead, and keeps the origin's body in reserve:
 * if that file stops (its owner died, failed or was deleted, or it stood
 * still too long), it goes on from the origin, skipping the bytes already
 * sent. The origin's own length and digest verify the whole (the `Fill`
 * that reads this source checks them and holds the last byte back), so a
 * client never gets a clean end of bytes that do not match.
 *
 * The followed file also backs the fill: clients that trail read what they
 * need back from it, as from a store, so they hold no memory.
 *
 * @module
 */
import type { ImageFollower } from "../image_store.ts";
import type { FillBacking } from "./fill.ts";

/** Largest read of the followed file. */
const READ_CHUNK = 256 * 1024;
/** First wait when the followed file has no new bytes; it doubles up to POLL_MAX. */
const POLL_MIN = 2;
const POLL_MAX = 50;

/** Options of {@linkcode followedSource}. */
export interface FollowOptions {
  /** How long the file may stand still, its owner alive, before the origin takes over (ms). */
  stallTime: number;
  /** Told when the source switches to the origin, with the byte it goes on from. */
  onFallback?: (position: number, why: string) => void;
}

/** What {@linkcode followedSource} makes: the bytes, and where they can be read back. */
export interface FollowedSource {
  /** The image's bytes, from the followed file, then (if it stops) from the origin. */
  stream: ReadableStream<Uint8Array>;
  /**
   * The followed file as the fill's backing: `available` counts the bytes
   * the stream took from it. Owns the follower: closing it closes the file.
   */
  backing: FillBacking;
}

/**
 * The bytes of an image: from `follower` while it delivers, then from
 * `origin` (its first bytes skipped). `length` is the origin's
 * `Content-Length`; without one, the followed file ends the body once it is
 * committed. Cancels `origin` unread when the followed file had every byte.
 */
export function followedSource(
  follower: ImageFollower,
  origin: ReadableStream<Uint8Array>,
  length: number | undefined,
  options: FollowOptions,
): FollowedSource {
  let position = 0;
  // Locked at once, though read only on a fall-back: an unlocked, unread body
  // may be cancelled under us (undici cancels the body of a Response that was
  // garbage-collected unread: the cache keeps the body, not the Response).
  const originReader = origin.getReader();
  let fromOrigin = false;
  /** Origin bytes still to drop: they were sent from the followed file. */
  let skip = 0;
  /** Bytes taken from the followed file: they can be read back from it. */
  let fromFile = 0;
  let closed = false;
  const backing: FillBacking = {
    get available() {
      return fromFile;
    },
    read: (at, count) => follower.read(at, count),
    close: async () => {
      if (closed) return;
      closed = true;
      await follower.close();
    },
  };
  const fallBack = (why: string) => {
    options.onFallback?.(position, why);
    skip = position;
    fromOrigin = true;
  };
  const read = () => follower.read(position, Math.min(READ_CHUNK, (length ?? Infinity) - position));

  /**
   * The next bytes of the followed file; `null` at its end (committed, all
   * read); `undefined` once it will give no more (the origin takes over).
   */
  const nextFromFile = async (): Promise<Uint8Array | null | undefined> => {
    let delay = POLL_MIN;
    const idleSince = Date.now();
    // Bounded: each turn waits, and the loop ends once the file stood still for stallTime.
    for (;;) {
      let bytes;
      try {
        bytes = await read();
      } catch {
        fallBack("read-error");
        return undefined;
      }
      if (bytes.byteLength > 0) return bytes;
      if (Date.now() - idleSince > options.stallTime) {
        fallBack("stalled");
        return undefined;
      }
      const state = await follower.state().catch(() => "gone" as const);
      if (state !== "filling") {
        // One more read: the owner may have written its last bytes, then committed and gone.
        const last = await read().catch(() => new Uint8Array());
        if (last.byteLength > 0) return last;
        if (state === "committed") return null;
        fallBack("owner-gone");
        return undefined;
      }
      await new Promise((resolve) => setTimeout(resolve, delay));
      delay = Math.min(delay * 2, POLL_MAX);
    }
  };

  const finish = (controller: ReadableStreamDefaultController<Uint8Array>) => {
    originReader.cancel().catch(() => {});
    controller.close();
  };

  const stream = new ReadableStream<Uint8Array>({
    async pull(controller) {
      if (!fromOrigin) {
        if (length !== undefined && position >= length) return finish(controller);
        const bytes = await nextFromFile();
        if (bytes === null) return finish(controller);
        if (bytes !== undefined) {
          position += bytes.byteLength;
          fromFile = position;
          controller.enqueue(bytes);
          return;
        }
      }
      // From the origin, dropping what the followed file already gave.
      for (;;) {
        const { done, value } = await originReader.read();
        if (done) {
          controller.close();
          return;
        }
        if (skip >= value.byteLength) {
          skip -= value.byteLength;
          continue;
        }
        const bytes = skip > 0 ? value.subarray(skip) : value;
        skip = 0;
        position += bytes.byteLength;
        controller.enqueue(bytes);
        return;
      }
    },
    async cancel(reason) {
      await originReader.cancel(reason).catch(() => {});
    },
  }, { highWaterMark: 0 });
  return { stream, backing };
}
