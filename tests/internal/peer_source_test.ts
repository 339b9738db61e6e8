/**
 * `resilientSource` with scripted peers and origins: what a node does when
 * the peer it streams from fails, which the multi-process cluster tests
 * (tests/cluster_test.ts) reach only by chance. Deno-only: it imports src/.
 */
import { describe, it } from "node:test";
import { createHash } from "node:crypto";
import assert from "node:assert/strict";
import { resilientSource, type SourceChain } from "../../src/_cluster/source.ts";
import type { PeerAnswer } from "../../src/_cluster/peer.ts";
import { assertBytes, pattern, readBody } from "../_helpers.ts";

const IMAGE = pattern(200 * 1024, 7);

/** A body of `bytes` that errors after them when `fails`, else ends. */
function body(bytes: Uint8Array, fails: boolean): ReadableStream<Uint8Array> {
  let sent = false;
  return new ReadableStream<Uint8Array>({
    pull(controller) {
      if (!sent) {
        sent = true;
        controller.enqueue(bytes);
      } else if (fails) controller.error(new TypeError("error reading a body from connection"));
      else controller.close();
    },
  }, { highWaterMark: 0 });
}

function peerAnswer(size: number, bytes: Uint8Array, fails: boolean): PeerAnswer {
  return {
    url: "http://127.0.0.1:1",
    state: "filling",
    algorithm: "md5",
    size,
    headers: new Headers(),
    body: body(bytes, fails),
  };
}

function chain(origin: (position: number) => Response): SourceChain & { asked: number[] } {
  const asked: number[] = [];
  return {
    asked,
    nextPeer: () => Promise.resolve(undefined),
    origin: (position) => {
      asked.push(position);
      return Promise.resolve(origin(position));
    },
    committedDigest: () => Promise.resolve(undefined),
    switched: () => {},
    peerBytes: () => {},
  };
}

/** The origin's answer for the rest of IMAGE from `position`: a `206`. */
const rest = (position: number) =>
  new Response(IMAGE.slice(position), {
    status: 206,
    headers: { "content-range": `bytes ${position}-${IMAGE.length - 1}/${IMAGE.length}` },
  });

/** Reads what `resilientSource` makes of a peer that sends `sent` of an image of `length`, then fails. */
function readFrom(c: SourceChain, sent: Uint8Array, length = IMAGE.length) {
  const stream = resilientSource({
    first: peerAnswer(length, sent, true),
    length,
    stallTime: 1000,
    chain: c,
  });
  return readBody(new Response(stream));
}

describe("resilientSource()", () => {
  it("goes on from the origin with Range when the peer fails mid-stream", async () => {
    const c = chain(rest);
    const { bytes, error } = await readFrom(c, IMAGE.slice(0, 50_000));
    assert.equal(error, undefined);
    assertBytes(bytes, IMAGE);
    assert.deepEqual(c.asked, [50_000]);
  });

  it("asks the origin again after a pause when it answers 503, and completes", async () => {
    let calls = 0;
    const c = chain((position) =>
      ++calls === 1 ? new Response("busy", { status: 503 }) : rest(position)
    );
    const { bytes, error } = await readFrom(c, IMAGE.slice(0, 70_000));
    assert.equal(error, undefined);
    assertBytes(bytes, IMAGE);
    assert.deepEqual(c.asked, [70_000, 70_000]);
  });

  it("gives up at once, and says why, when the origin refuses (404)", async () => {
    const gaveUp: string[] = [];
    const c = chain(() => new Response("gone", { status: 404 }));
    c.gaveUp = (from, position, why, error) =>
      gaveUp.push(`${from} ${why} at ${position}: ${(error as Error).message}`);
    const { error } = await readFrom(c, IMAGE.slice(0, 70_000));
    assert.match(String(error), /The origin answered 404 when asked for byte 70000/);
    assert.equal(c.asked.length, 1);
    assert.equal(gaveUp.length, 1);
    assert.match(
      gaveUp[0],
      /^peer http:\/\/127\.0\.0\.1:1 failed: .* at 70000: The origin answered 404/,
    );
  });

  it("without any digest, checks a clean end against the peer's committed digest, else leaves the length", async () => {
    const md5 = createHash("md5").update(IMAGE).digest("hex");
    for (
      const [told, ok] of [
        [{ algorithm: "md5" as const, value: md5 }, true],
        [{ algorithm: "md5" as const, value: "0".repeat(32) }, false],
        [undefined, true], // Its commit failed: the fill's length check stands, as on one node.
      ] as const
    ) {
      const c = chain(rest);
      c.committedDigest = () => Promise.resolve(told);
      const stream = resilientSource({
        first: peerAnswer(IMAGE.length, IMAGE, false),
        length: IMAGE.length,
        stallTime: 1000,
        chain: c,
      });
      const { bytes, error } = await readBody(new Response(stream));
      if (ok) {
        assert.equal(error, undefined);
        assertBytes(bytes, IMAGE);
      } else assert.match(String(error), /Checksum mismatch/);
    }
  });

  it("fails at once, asking the origin once, when the origin's length is not the one the peer announced", async () => {
    // The peer passed on its own origin's wrong Content-Length (longer than the image).
    const wrong = IMAGE.length + 1000;
    for (const status of [200, 206]) {
      const c = chain((position) =>
        status === 200
          ? new Response(IMAGE, { headers: { "content-length": String(IMAGE.length) } })
          : rest(position)
      );
      const { bytes, error } = await readFrom(c, IMAGE, wrong);
      assert.match(String(error), /The origin says the image has 204800 bytes, not 205800/);
      assert.equal(bytes.length, IMAGE.length, "what was sent is the image's own bytes");
      assert.deepEqual(c.asked, [IMAGE.length], `status ${status}: the origin was asked once`);
    }
  });
});
