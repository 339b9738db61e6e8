import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { fileBody } from "../../src/_fs/file_body.ts";
import { pattern, withTempDir } from "../_helpers.ts";

async function bytesOf(body: ReadableStream<Uint8Array> | Blob): Promise<Uint8Array> {
  return new Uint8Array(await new Response(body).arrayBuffer());
}

describe("fileBody()", () => {
  it("gives the exact bytes of whole files and of every kind of range, small and large", async () => {
    await withTempDir(async (dir) => {
      for (const size of [1, 1000, 256 * 1024, 256 * 1024 + 1, 3 * 1024 * 1024 + 7]) {
        const data = pattern(size, size);
        const path = join(dir, `f${size}`);
        await writeFile(path, data);
        const ranges: [number, number][] = [
          [0, size - 1], // whole file
          [0, Math.floor(size / 2)], // prefix
          [Math.floor(size / 3), size - 1], // suffix
          [Math.floor(size / 4), Math.floor((3 * size) / 4)], // middle
          [size - 1, size - 1], // last byte
        ];
        for (const [start, end] of ranges) {
          const bytes = await bytesOf(await fileBody(path, start, end, size));
          assert.equal(bytes.byteLength, end + 1 - start, `${size} ${start}-${end}`);
          assert.deepEqual(bytes, data.subarray(start, end + 1), `${size} ${start}-${end}`);
        }
      }
    });
  });

  it("lets a reader cancel a large body after its first chunk", async () => {
    await withTempDir(async (dir) => {
      const size = 4 * 1024 * 1024;
      const path = join(dir, "big");
      await writeFile(path, pattern(size));
      const body = await fileBody(path, 0, size - 1, size);
      const stream = body instanceof Blob ? body.stream() : body;
      const reader = stream.getReader();
      const first = await reader.read();
      assert.ok(!first.done && first.value.byteLength > 0);
      await reader.cancel();
    });
  });

  it("rejects when the file is missing", async () => {
    await withTempDir(async (dir) => {
      const missing = join(dir, "missing");
      // Bun's file body is lazy: it fails when read, not when made.
      await assert.rejects(async () => await bytesOf(await fileBody(missing, 0, 9, 10)));
    });
  });
});
