/**
 * The docs say what the code does: docs/http.md's `Cache-Status` details
 * table lists every detail of {@linkcode CACHE_STATUS_DETAILS}, and nothing
 * else, and the README links to it. Deno-only: it reads the checkout.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { CACHE_STATUS_DETAILS } from "../../mod.ts";

const README = new URL("../../README.md", import.meta.url);
const HTTP = new URL("../../docs/http.md", import.meta.url);

/** The first-column tokens of the first table under the first heading naming `Cache-Status` details. */
function detailsInReadme(text: string): string[] {
  const lines = text.split("\n");
  const heading = lines.findIndex((line) => /^#+ .*Cache-Status. details/.test(line));
  assert.notEqual(heading, -1, "docs/http.md has a heading about Cache-Status details");
  const tokens: string[] = [];
  let inTable = false;
  for (const line of lines.slice(heading + 1)) {
    if (/^#/.test(line)) break;
    if (!line.startsWith("|")) {
      if (inTable) break;
      continue;
    }
    inTable = true;
    const token = /^\|\s*`([a-z0-9-]+|status-NNN)`\s*\|/.exec(line)?.[1];
    if (token !== undefined) tokens.push(token);
  }
  return tokens;
}

describe("README and docs/http.md", () => {
  it("list every Cache-Status detail the code sends, and no other, one link away", async () => {
    const documented = detailsInReadme(await readFile(HTTP, "utf8")).sort();
    assert.deepEqual(documented, Object.keys(CACHE_STATUS_DETAILS).sort());
    assert.match(await readFile(README, "utf8"), /docs\/http\.md#cache-status-details/);
  });
});
