/**
 * The layout check behind `deno task check:layout`: circles and folder rules
 * are found on made-up graphs, and the project's own graph has none.
 * Deno-only: it imports scripts/.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { circles, importGraph, violations } from "../../scripts/check_layout.ts";

describe("layout check", () => {
  it("finds an import circle once, type-only imports included", () => {
    const graph = new Map([
      ["src/_core/core.ts", ["src/_core/prune.ts", "src/image_store.ts"]],
      ["src/_core/prune.ts", ["src/_core/core.ts"]],
      ["src/image_store.ts", []],
    ]);
    assert.deepEqual(circles(graph), [["src/_core/core.ts", "src/_core/prune.ts"]]);
  });

  it("finds a folder that imports what its rule forbids", () => {
    const graph = new Map([
      ["src/_http/answer.ts", ["src/_fill/fill.ts", "node:fs/promises", "src/image_store.ts"]],
      ["src/_core/core.ts", ["src/proxy/app.ts"]],
    ]);
    const found = violations(graph);
    assert.equal(found.length, 3);
    assert.match(found[0], /^src\/_http\/answer\.ts imports src\/_fill\/fill\.ts: /);
    assert.match(found[1], /node:fs\/promises/);
    assert.match(found[2], /src\/_core\/core\.ts imports src\/proxy\/app\.ts/);
  });

  it("holds for the project's own tree", async () => {
    const graph = await importGraph();
    assert.deepEqual(circles(graph), []);
    assert.deepEqual(violations(graph), []);
  });
});
