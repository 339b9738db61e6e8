import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { fileNameForId, idForFileName } from "../../src/_ids.ts";

describe("fileNameForId()", () => {
  it("keeps plain ids, UUIDs included, as their own name", () => {
    for (const id of ["cirros", "8a2b3c4d-aaaa-bbbb-cccc-1234567890ab", "A_b-9"]) {
      assert.equal(fileNameForId(id), id);
      assert.equal(idForFileName(id), id);
    }
  });

  it("encodes other ids and the layout's directory names to a safe name that maps back", () => {
    for (const id of ["queue", "incomplete", "invalid", "a b", "été", "~x", "a.json", "🐧"]) {
      const name = fileNameForId(id);
      assert.ok(name !== undefined, id);
      assert.match(name, /^~[0-9a-f]+$/);
      assert.equal(idForFileName(name), id);
    }
  });

  it("refuses ids that are empty, dots, with separators or NUL, or too long", () => {
    for (
      const id of [
        "",
        ".",
        "..",
        "a/b",
        "/etc/passwd",
        "a\\b",
        "a\0",
        "x".repeat(201),
        "é".repeat(51),
      ]
    ) {
      assert.equal(fileNameForId(id), undefined, JSON.stringify(id));
    }
  });

  it("maps no file name of the layout or of metadata back to an id", () => {
    for (
      const name of ["queue", "incomplete", "invalid", "img.json", "img.owner", "~zz", "~0", "~2f"]
    ) {
      assert.equal(idForFileName(name), undefined, name);
    }
  });

  it("round-trips random ids or refuses them, never yielding a path separator", () => {
    let seed = 42;
    const random = () => (seed = (seed * 1103515245 + 12345) & 0x7fffffff) / 0x7fffffff;
    for (let i = 0; i < 2000; i++) {
      const length = Math.floor(random() * 40);
      let id = "";
      for (let j = 0; j < length; j++) id += String.fromCharCode(Math.floor(random() * 0x3000));
      const name = fileNameForId(id);
      if (name === undefined) continue;
      assert.ok(!/[/\\\0]/.test(name) && name !== "." && name !== "..");
      assert.equal(idForFileName(name), id);
    }
  });
});
