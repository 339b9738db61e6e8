/**
 * The guard against undici's paused-parser crash (src/proxy/_undici_guard.ts):
 * which errors it lets pass. Deno-only: it imports src/.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { isPausedParserCrash } from "../../src/proxy/_undici_guard.ts";

describe("isPausedParserCrash()", () => {
  it("recognizes undici's assertion from the socket's end handler, and nothing else", () => {
    const crash = new Error(
      "The expression evaluated to a falsy value:\n\n  assert(!this.paused)\n",
    );
    crash.name = "AssertionError";
    crash.stack = `AssertionError [ERR_ASSERTION]: ${crash.message}
    at Parser.finish (node:internal/deps/undici/undici:7388:9)
    at Socket.onHttpSocketEnd (node:internal/deps/undici/undici:7827:34)`;
    assert.equal(isPausedParserCrash(crash), true);

    const elsewhere = new Error(crash.message);
    elsewhere.stack = `AssertionError: ${crash.message}\n    at somewhere (file.js:1:1)`;
    assert.equal(isPausedParserCrash(elsewhere), false);
    assert.equal(isPausedParserCrash(new TypeError("fetch failed")), false);
    assert.equal(isPausedParserCrash("assert(!this.paused) onHttpSocketEnd"), false);
  });
});
