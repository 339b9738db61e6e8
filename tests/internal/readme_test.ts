/**
 * The README says what the code does: its `Cache-Status` table lists every
 * detail of {@linkcode CACHE_STATUS_DETAILS}, and nothing else.
 * Deno-only: it reads the README from the checkout.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { CACHE_STATUS_DETAILS } from "../../mod.ts";

const README = new URL("../../README.md", import.meta.url);

/** The first-column tokens of the first table under the first heading naming `Cache-Status`. */
function detailsInReadme(text: string): string[] {
  const lines = text.split("\n");
  const heading = lines.findIndex((line) => /^#+ .*Cache-Status/.test(line));
  assert.notEqual(heading, -1, "the README has a heading about Cache-Status");
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

describe("README", () => {
  it("lists every Cache-Status detail the code sends, and no other", async () => {
    const documented = detailsInReadme(await readFile(README, "utf8")).sort();
    assert.deepEqual(documented, Object.keys(CACHE_STATUS_DETAILS).sort());
  });
});
