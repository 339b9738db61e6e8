/**
 * A fill's client body (`fillBody`): what it reports when it is cut. Deno-only:
 * it imports src/ (the middleware's tests cover the same bodies end to end).
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { Fill, fillBody } from "../../src/_fill/fill.ts";
import { MemoryStore } from "../../src/memory_store.ts";
import { hexDigest, pattern, sleep } from "../_helpers.ts";

const IMAGE = pattern(256 * 1024, 7);

/** A stored fill of IMAGE whose origin sends a chunk each time `next()` is called. */
async function storedFill(store: MemoryStore) {
  let controller!: ReadableStreamDefaultController<Uint8Array>;
  const source = new ReadableStream<Uint8Array>({ start: (c) => void (controller = c) });
  let at = 0;
  const next = () => {
    if (at >= IMAGE.byteLength) return controller.close();
    controller.enqueue(IMAGE.slice(at, at + 64 * 1024));
    at += 64 * 1024;
  };
  const writer = await store.createWriter("img");
  assert.ok(typeof writer === "object");
  const fill = new Fill({
    id: "img",
    writer,
    source,
    expectedLength: IMAGE.byteLength,
    expected: { algorithm: "md5", value: hexDigest(IMAGE) },
    storedHeaders: {},
    responseHeaders: new Headers(),
    completeOnAbort: true,
    onError: () => {},
  });
  return { fill, next };
}

describe("fillBody()", () => {
  it("reports no cut for a client that left while its next bytes were awaited", async () => {
    const store = new MemoryStore();
    const { fill, next } = await storedFill(store);
    const cuts: unknown[] = [];
    const body = fillBody(fill, fill.attachAt(0), 0, Infinity, { onCut: (e) => cuts.push(e) });
    const reader = body.getReader();
    next();
    assert.equal((await reader.read()).value?.byteLength, 64 * 1024);
    const pending = reader.read(); // Waits for the origin's next chunk.
    await reader.cancel();
    assert.equal((await pending).done, true);
    for (let i = 0; i < 4; i++) next();
    await fill.done;
    assert.equal(fill.state, "verified");
    await sleep(50); // The pull that waited goes on.
    assert.deepEqual(cuts, []);
    await store.close();
  });

  it("reports a cut it makes, with the first byte the client did not get", async () => {
    const store = new MemoryStore();
    const { fill, next } = await storedFill(store);
    const cuts: [unknown, number][] = [];
    // A reader that could not attach (the fill ended before it), and no rescue.
    const body = fillBody(fill, undefined, 1000, Infinity, {
      onCut: (error, position) => cuts.push([error, position]),
    });
    await assert.rejects(body.getReader().read(), /Cannot read back byte 1000/);
    assert.equal(cuts.length, 1);
    assert.equal(cuts[0][1], 1000);
    for (let i = 0; i < 5; i++) next();
    await fill.done;
    await store.close();
  });
});
