/**
 * `followedSource` with a scripted follower: the stall limit and the
 * hand-over to the origin, which the store-level tests (tests/follow_test.ts)
 * cannot reach in reasonable time. Deno-only: it imports src/.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { followedSource } from "../../src/_fill/follow.ts";
import type { ImageFollower } from "../../src/image_store.ts";
import { assertBytes, pattern, readBody } from "../_helpers.ts";

const IMAGE = pattern(300 * 1024, 4);

/** A follower whose file holds `available` bytes of IMAGE and never grows. */
function stuckFollower(available: number, state: "filling" | "committed" | "gone") {
  const calls = { closed: 0 };
  const follower: ImageFollower = {
    read: (position, length) =>
      Promise.resolve(IMAGE.slice(position, Math.min(available, position + length))),
    state: () => Promise.resolve(state),
    close: () => {
      calls.closed++;
      return Promise.resolve();
    },
  };
  return { follower, calls };
}

function originBody() {
  const stats = { pulled: 0, cancelled: false };
  const body = new ReadableStream<Uint8Array>({
    pull(controller) {
      if (stats.pulled >= IMAGE.byteLength) return controller.close();
      controller.enqueue(IMAGE.slice(stats.pulled, stats.pulled + 50_000));
      stats.pulled += 50_000;
    },
    cancel() {
      stats.cancelled = true;
    },
  }, { highWaterMark: 0 });
  return { body, stats };
}

describe("followedSource()", () => {
  it("hands over to the origin, skipping what it sent, once the file stood still for stallTime", async () => {
    const { follower } = stuckFollower(120_000, "filling");
    const origin = originBody();
    const fallbacks: [number, string][] = [];
    const started = Date.now();
    const followed = followedSource(follower, origin.body, IMAGE.byteLength, {
      stallTime: 100,
      onFallback: (position, why) => fallbacks.push([position, why]),
    });
    const { bytes, error } = await readBody(new Response(followed.stream));
    assert.equal(error, undefined);
    assertBytes(bytes, IMAGE);
    assert.deepEqual(fallbacks, [[120_000, "stalled"]]);
    assert.ok(Date.now() - started >= 100);
    assert.equal(followed.backing.available, 120_000, "what came from the file can be read back");
  });

  it("ends with the file, never reading the origin, when the file is committed", async () => {
    const { follower } = stuckFollower(IMAGE.byteLength, "committed");
    const origin = originBody();
    const followed = followedSource(follower, origin.body, undefined, { stallTime: 10_000 });
    const { bytes } = await readBody(new Response(followed.stream));
    assertBytes(bytes, IMAGE);
    assert.equal(origin.stats.pulled, 0);
    assert.equal(origin.stats.cancelled, true);
    assert.equal(followed.backing.available, IMAGE.byteLength);
  });

  it("hands over at once when the owner is gone", async () => {
    const { follower } = stuckFollower(70_000, "gone");
    const origin = originBody();
    const fallbacks: string[] = [];
    const followed = followedSource(follower, origin.body, IMAGE.byteLength, {
      stallTime: 10_000,
      onFallback: (_, why) => fallbacks.push(why),
    });
    const { bytes } = await readBody(new Response(followed.stream));
    assertBytes(bytes, IMAGE);
    assert.deepEqual(fallbacks, ["owner-gone"]);
  });

  it("keeps the file open for readers that trail until its backing closes, once", async () => {
    const { follower, calls } = stuckFollower(IMAGE.byteLength, "committed");
    const origin = originBody();
    const followed = followedSource(follower, origin.body, undefined, { stallTime: 10_000 });
    await readBody(new Response(followed.stream));
    assert.equal(calls.closed, 0);
    assertBytes(await followed.backing.read(1000, 500), IMAGE.slice(1000, 1500));
    await followed.backing.close();
    await followed.backing.close();
    assert.equal(calls.closed, 1);
  });

  it("cancels the origin when its client cancels", async () => {
    const { follower } = stuckFollower(IMAGE.byteLength, "filling");
    const origin = originBody();
    const followed = followedSource(follower, origin.body, IMAGE.byteLength, {
      stallTime: 10_000,
    });
    const reader = followed.stream.getReader();
    await reader.read();
    await reader.cancel();
    assert.equal(origin.stats.cancelled, true);
  });
});
