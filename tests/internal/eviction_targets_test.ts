/**
 * Whom a cluster-wide delete asks directly (src/_cluster/node.ts). Deno-only:
 * it imports src/ (tests/cluster_test.ts checks deletes end to end).
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { evictionTargets } from "../../src/_cluster/node.ts";

describe("evictionTargets()", () => {
  it("asks the peers known from the last syncs too, not only those the index lists as live", () => {
    // B is back from a database outage: not listed yet (old heartbeat), its NOTIFY lost.
    const listed = ["http://a:1"];
    const known = ["http://a:1", "http://b:2"];
    assert.deepEqual(evictionTargets(listed, known), ["http://a:1", "http://b:2"]);
  });

  it("asks each peer once, and a peer the index lists though no sync knew it yet", () => {
    assert.deepEqual(evictionTargets(["http://c:3", "http://a:1"], ["http://a:1"]), [
      "http://c:3",
      "http://a:1",
    ]);
    assert.deepEqual(evictionTargets([], []), []);
  });
});
