// CommonJS consumers: Node 22.12+ and Bun load this ES module package with require().
const assert = require("node:assert/strict");
const { FileSystemStore, imageCache, glanceRoutes } = require("hono-image-cache");
const { MemoryStore } = require("hono-image-cache/testing");

assert.equal(typeof imageCache, "function");
assert.equal(typeof FileSystemStore, "function");
assert.equal(typeof MemoryStore, "function");
assert.ok(Array.isArray(glanceRoutes));
console.log("require ok");
