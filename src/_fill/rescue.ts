/**
 * The rest of a fill's body for a client that can no longer read it back:
 * the bytes it needs left memory, and the store failed to read what it
 * wrote (a disk fault). The fill goes on for everyone else; this client
 * gets the rest from a fresh origin answer instead of a cut (invariant 2).
 *
 * That answer is checked as a fill is: it is hashed from its first byte
 * (the part the client already has is read and dropped), and the client's
 * last byte is held back until the length and the digest match what the
 * fill verifies. A mismatch errors the stream: never a clean end of a wrong
 * body.
 *
 * @module
 */
import { createHash } from "node:crypto";
import { digestMatches, type ExpectedDigest } from "../digest.ts";
import type { DigestAlgorithm } from "../image_store.ts";

/** What the rescue needs of the fill the client was reading (src/_fill/fill.ts). */
export interface RescuedFill {
  readonly expectedLength: number | undefined;
  readonly expected: ExpectedDigest | undefined;
  readonly algorithm: DigestAlgorithm;
  readonly committed: { digest: ExpectedDigest } | undefined;
  settled(): Promise<void>;
}

/**
 * Bytes `position` to `end` (exclusive) of the image from `response` (the
 * origin's whole answer, `200`), checked against what `fill` verifies.
 *
 * @param response The origin's answer for the whole image.
 * @param fill The fill the client was reading.
 * @param position The first byte the client still needs.
 * @param end One past the last byte the client wants (`Infinity`: to the end).
 * @returns The stream of those bytes, or `undefined` when the answer is not a usable `200`.
 */
export function rescuedRest(
  response: Response,
  fill: RescuedFill,
  position: number,
  end: number,
): ReadableStream<Uint8Array> | undefined {
  if (response.status !== 200 || response.body === null) {
    response.body?.cancel().catch(() => {});
    return undefined;
  }
  const announced = response.headers.get("content-length");
  const length = fill.expectedLength ?? (announced === null ? undefined : Number(announced));
  const source = response.body.getReader();
  const hash = createHash(fill.algorithm);
  let offset = 0;
  let held: Uint8Array | undefined;

  /** The digest the body must match: the fill's expected one, else the one it committed. */
  const expected = async (): Promise<ExpectedDigest | undefined> => {
    if (fill.expected !== undefined) return fill.expected;
    await fill.settled();
    return fill.committed?.digest;
  };

  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      // Bounded: each turn reads one chunk of the origin's finite body.
      for (;;) {
        const { done, value } = await source.read();
        if (done) {
          if (length !== undefined && offset !== length) {
            throw new Error(`The origin sent ${offset} bytes, not ${length}`);
          }
          const digest = await expected();
          const actual = hash.digest("hex");
          if (digest !== undefined && !digestMatches(digest, actual)) {
            throw new Error(`Checksum mismatch: expected ${digest.value}, got ${actual}`);
          }
          if (held !== undefined) controller.enqueue(held);
          controller.close();
          return;
        }
        hash.update(value);
        const from = Math.max(position - offset, 0);
        const to = Math.min(value.byteLength, end - offset);
        offset += value.byteLength;
        if (length !== undefined && offset > length) {
          throw new Error(`The origin sent more than ${length} bytes`);
        }
        if (to <= from) continue;
        // Hold back the last byte delivered until the whole answer is checked.
        const wanted = value.subarray(from, to);
        const before = held;
        held = wanted.subarray(wanted.byteLength - 1);
        if (before !== undefined) controller.enqueue(before);
        if (wanted.byteLength > 1) controller.enqueue(wanted.subarray(0, wanted.byteLength - 1));
        if (before !== undefined || wanted.byteLength > 1) return;
      }
    },
    cancel(reason) {
      return source.cancel(reason);
    },
  }, { highWaterMark: 0 });
}
