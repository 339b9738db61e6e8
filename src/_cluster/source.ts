/**
 * The bytes of an image from peers, resilient: a peer that dies (the
 * connection fails) or stalls (no byte for `stallTime`) mid-stream is
 * replaced by the next source, from the byte this node needs: another live
 * peer that has the image or is filling it, else the origin (asked for the
 * rest with `Range` when its `fetchImage` can, else its whole answer with
 * the bytes already delivered skipped). Like `followedSource`
 * (src/_fill/follow.ts), the `Fill` reading this stream checks the length
 * and the digest and holds the last byte back, so a client never sees a
 * clean end of a wrong body.
 *
 * When the first peer could not tell the digest (its fill's origin sent
 * none), this stream hashes what it delivers and, before it ends, compares
 * it with the digest the peer committed (asked once its body ended): the
 * stream errors instead of ending on a mismatch. A peer that cannot tell
 * its committed digest leaves the fill's length check, as on a single node.
 *
 * @module
 */
import { createHash, type Hash } from "node:crypto";
import { digestFromHeaders } from "../digest.ts";
import type { Digest, DigestAlgorithm } from "../image_store.ts";
import type { PeerAnswer } from "./peer.ts";

/** Switches to another source at most this many times. */
const MAX_SWITCHES = 8;

/** Where the next bytes can come from, asked when the current source fails. */
export interface SourceChain {
  /** Another peer's answer from `position` (not one of `failed`); `undefined`: none. */
  nextPeer(position: number, failed: ReadonlySet<string>): Promise<PeerAnswer | undefined>;
  /** The origin's answer, asked for bytes from `position` on; `undefined`: no origin to ask. */
  origin?(position: number, signal: AbortSignal): Promise<Response>;
  /** The digest `url` committed, asked once its body ended (no digest was known). */
  committedDigest(url: string): Promise<Digest | undefined>;
  /** Told of each switch, for logs and metrics. */
  switched(from: string, to: string, position: number, why: string): void;
  /** Told when no source could take over (the body then fails), for logs. */
  gaveUp?(from: string, position: number, why: string, error: unknown): void;
  /** Counts bytes received from peers. */
  peerBytes(bytes: number): void;
}

/** Options of {@linkcode resilientSource}. */
export interface ResilientOptions {
  /** The first peer's answer (from byte 0). */
  first: PeerAnswer;
  /** The image's length, when known. */
  length: number | undefined;
  /** Milliseconds without a byte after which a source is given up. */
  stallTime: number;
  chain: SourceChain;
}

class Stalled extends Error {}
/** No source can complete the body: not worth another try. */
class Unrecoverable extends Error {}

const message = (error: unknown) => error instanceof Error ? error.message : String(error);

/** A readable that fails with `Stalled` when `read()` waits longer than `ms`. */
async function readWithin(
  reader: ReadableStreamDefaultReader<Uint8Array>,
  ms: number,
): Promise<ReadableStreamReadResult<Uint8Array>> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([
      reader.read(),
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Stalled(`No byte for ${ms} ms`)), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/** The current source: a peer, or the origin. */
interface Current {
  name: string;
  peer?: string;
  reader: ReadableStreamDefaultReader<Uint8Array>;
  /** Bytes of this source to drop first (an origin that answered the whole image). */
  skip: number;
  /** The origin's headers, for its digest. */
  headers?: Headers;
}

/** See the module documentation. */
export function resilientSource(options: ResilientOptions): ReadableStream<Uint8Array> {
  const { chain, length, stallTime } = options;
  let position = 0;
  let switches = 0;
  const failed = new Set<string>();
  /** The digest the bytes must match, when a source told it. */
  let known = options.first.digest;
  /** Hashing what is delivered: only when no digest was known at the start. */
  const algorithm: DigestAlgorithm = options.first.algorithm;
  const hash: Hash | undefined = known === undefined ? createHash(algorithm) : undefined;
  let current: Current = {
    name: `peer ${options.first.url}`,
    peer: options.first.url,
    reader: options.first.body!.getReader(),
    skip: 0,
  };
  const controllerAbort = new AbortController();

  const fromPeer = (answer: PeerAnswer): Current => {
    if (known === undefined && answer.digest !== undefined) known = answer.digest;
    return {
      name: `peer ${answer.url}`,
      peer: answer.url,
      reader: answer.body!.getReader(),
      skip: 0,
    };
  };

  /**
   * The next source from `position`; throws when there is none. A source
   * that cannot be had (an origin answering 503, a connection refused) is
   * tried again after a pause, within MAX_SWITCHES in all.
   */
  const next = async (why: string): Promise<void> => {
    const from = current.name;
    if (current.peer !== undefined) failed.add(current.peer);
    current.reader.cancel().catch(() => {});
    let last: unknown;
    for (;;) {
      try {
        if (++switches > MAX_SWITCHES) {
          throw new Unrecoverable(
            `Gave up after ${MAX_SWITCHES} sources (${why})${last ? `: ${message(last)}` : ""}`,
          );
        }
        await switchFrom(from, why);
        return;
      } catch (error) {
        if (error instanceof Unrecoverable || controllerAbort.signal.aborted) {
          chain.gaveUp?.(from, position, why, error);
          throw error;
        }
        last = error;
        await new Promise((resolve) => setTimeout(resolve, 100 * switches));
      }
    }
  };
  const switchFrom = async (from: string, why: string): Promise<void> => {
    const peer = await chain.nextPeer(position, failed).catch(() => undefined);
    if (peer !== undefined && peer.body !== null) {
      current = fromPeer(peer);
    } else if (chain.origin !== undefined) {
      const response = await chain.origin(position, controllerAbort.signal);
      const range = /^bytes (\d+)-\d+\/(\d+|\*)$/.exec(response.headers.get("content-range") ?? "");
      let skip: number;
      if (response.status === 206 && range !== null && Number(range[1]) === position) {
        skip = 0;
      } else if (response.status === 200) {
        skip = position;
      } else {
        await response.body?.cancel().catch(() => {});
        // A refusal (4xx) stands; an error (5xx) may pass.
        const Failure = response.status >= 400 && response.status < 500 ? Unrecoverable : Error;
        throw new Failure(`The origin answered ${response.status} when asked for byte ${position}`);
      }
      // The origin's word on the length: a peer may have passed on a wrong one
      // (its own origin's), and no source can then complete this body.
      const total = response.status === 206
        ? Number(range![2])
        : Number(response.headers.get("content-length") ?? NaN);
      if (length !== undefined && Number.isInteger(total) && total !== length) {
        await response.body?.cancel().catch(() => {});
        throw new Unrecoverable(`The origin says the image has ${total} bytes, not ${length}`);
      }
      if (response.body === null) throw new Error("The origin answered without a body");
      current = {
        name: "origin",
        reader: response.body.getReader(),
        skip,
        headers: response.headers,
      };
    } else {
      throw new Error(`No other source for byte ${position} (${why})`);
    }
    chain.switched(from, current.name, position, why);
  };

  /** Before the end: the digest a hashed body must match, if any can be had. */
  const verifyEnd = async (): Promise<void> => {
    if (hash === undefined) return;
    let expected = known;
    if (expected === undefined && current.peer !== undefined) {
      // The peer ended its body once its fill verified; its digest checks the transfer too.
      // A peer that cannot tell it (its commit failed, or it went away) leaves the length:
      // the origin sent no digest, so that is all a single node would check.
      expected = await chain.committedDigest(current.peer);
    }
    if (expected === undefined && current.headers !== undefined) {
      // Fell back to an origin that sent no digest: the length alone, as on a single node.
      expected = digestFromHeaders(current.headers);
    }
    if (expected === undefined) return;
    const actual = hash.digest("hex");
    if (expected.algorithm !== algorithm || expected.value.toLowerCase() !== actual) {
      throw new Error(
        `Checksum mismatch: expected ${expected.algorithm} ${expected.value}, got ${algorithm} ${actual}`,
      );
    }
  };

  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      // Bounded: each turn delivers bytes, ends, or switches (at most MAX_SWITCHES times).
      for (;;) {
        let result: ReadableStreamReadResult<Uint8Array>;
        try {
          result = await readWithin(current.reader, stallTime);
        } catch (error) {
          try {
            await next(error instanceof Stalled ? "stalled" : `failed: ${error}`);
          } catch (fatal) {
            controller.error(fatal);
            return;
          }
          continue;
        }
        if (result.done) {
          if (length !== undefined && position < length) {
            try {
              await next(`ended after ${position} of ${length} bytes`);
            } catch (fatal) {
              controller.error(fatal);
              return;
            }
            continue;
          }
          try {
            await verifyEnd();
          } catch (error) {
            chain.gaveUp?.(current.name, position, "ended", error);
            controller.error(error);
            return;
          }
          controller.close();
          return;
        }
        let bytes = result.value;
        if (current.skip > 0) {
          if (current.skip >= bytes.byteLength) {
            current.skip -= bytes.byteLength;
            continue;
          }
          bytes = bytes.subarray(current.skip);
          current.skip = 0;
        }
        if (bytes.byteLength === 0) continue;
        if (length !== undefined && position + bytes.byteLength > length) {
          controller.error(new Error(`A source sent more than the ${length} bytes of the image`));
          return;
        }
        position += bytes.byteLength;
        hash?.update(bytes);
        if (current.peer !== undefined) chain.peerBytes(bytes.byteLength);
        controller.enqueue(bytes);
        return;
      }
    },
    cancel(reason) {
      controllerAbort.abort(reason);
      current.reader.cancel(reason).catch(() => {});
    },
  }, { highWaterMark: 0 });
}
