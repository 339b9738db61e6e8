/**
 * The checks behind `deno task test` and `deno task build:npm`: how each
 * runtime's test output is counted, and what the npm package may hold.
 * Deno-only: it imports scripts/.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { mkdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { checkPackage, declarationProblems } from "../../scripts/build_npm.ts";
import {
  bunCounts,
  denoCounts,
  denoFailedNames,
  failedNames,
  nodeCounts,
} from "../../scripts/test_all.ts";
import { withTempDir } from "../_helpers.ts";

describe("test output counting", () => {
  it("reads node --test's spec summary, counting cancelled tests as failed", () => {
    const output = "✔ a (1ms)\nℹ tests 7\nℹ suites 2\nℹ pass 4\nℹ fail 1\nℹ cancelled 1\n" +
      "ℹ skipped 1\nℹ todo 0\nℹ duration_ms 12\n";
    assert.deepEqual(nodeCounts(output), { passed: 4, failed: 2, skipped: 1 });
    assert.equal(nodeCounts("no summary here"), undefined);
  });

  it("reads bun test's summary, counting errors outside tests as failed", () => {
    const output = "(pass) a > b [1ms]\n\n 198 pass\n 2 skip\n 3 fail\n 1 error\n" +
      "Ran 203 tests across 10 files.\n";
    assert.deepEqual(bunCounts(output), { passed: 198, failed: 4, skipped: 2 });
  });

  it("counts Deno's JUnit leaves: a describe with steps is a group, not a test", () => {
    const xml = `<testsuites>
      <testsuite name="./a_test.ts">
        <testcase name="group" classname="./a_test.ts"></testcase>
        <testcase name="top" classname="./a_test.ts"></testcase>
      </testsuite>
      <testsuite name="ext:deno_node/testing.ts">
        <testcase name="group &gt; passes" classname="x"></testcase>
        <testcase name="group &gt; nested" classname="x"></testcase>
        <testcase name="group &gt; nested &gt; deep" classname="x"><failure message="no">no</failure></testcase>
        <testcase name="group &gt; skipped" classname="x"><skipped/></testcase>
      </testsuite>
    </testsuites>`;
    assert.deepEqual(denoCounts(xml), { passed: 2, failed: 1, skipped: 1 });
    assert.equal(denoCounts(""), undefined);
    assert.deepEqual(denoFailedNames(xml), ["group > nested > deep"]);
  });

  it("names the failed tests of Bun and Node, once each", () => {
    const bun = "(pass) a > b [1.00ms]\n(fail) a > c [5.20ms]\n(fail) d\n";
    assert.deepEqual(failedNames(bun), ["a > c", "d"]);
    const node = "▶ a\n  ✖ c (5.2ms)\n✖ a (6ms)\n✖ failing tests:\n\n  ✖ c (5.2ms)\n";
    assert.deepEqual(failedNames(node), ["c", "a"]);
  });
});

describe("npm package content check", () => {
  async function pkg(dir: string, files: Record<string, string>): Promise<string[]> {
    const all: Record<string, string> = {
      "package.json": JSON.stringify({
        exports: { ".": { types: "./mod.d.ts", import: "./mod.js", default: "./mod.js" } },
      }),
      "README.md": "# x",
      "LICENSE": "x",
      ...files,
    };
    for (const [name, text] of Object.entries(all)) {
      await mkdir(join(dir, name, ".."), { recursive: true });
      await writeFile(join(dir, name), text);
    }
    return Object.keys(all).sort();
  }

  it("accepts ESM with relative, node: and hono imports and their .d.ts, and a worker's source in a string", async () => {
    await withTempDir(async (dir) => {
      const files = await pkg(dir, {
        "mod.js": '/** import x from "nope"; */\nimport { a } from "./src/a.js";\n' +
          'import { Hono } from "hono";\nimport { createHash } from "node:crypto";\n',
        "mod.d.ts": 'export * from "./src/a.js";\n',
        "src/a.js": 'export const a = 1;\nconst worker = `const { x } = require("node:os");`;\n',
        "src/a.d.ts": "export declare const a: number;\n",
      });
      assert.deepEqual(await checkPackage(dir, files), []);
    });
  });

  it("flags a test file, a bundled or unknown import, CommonJS and a missing .d.ts", async () => {
    await withTempDir(async (dir) => {
      const files = await pkg(dir, {
        "mod.js": 'import "./src/a.js";\nimport "left-pad";\nconst x = require("y");\n',
        "mod.d.ts": 'export * from "./src/a.js";\n',
        "src/a.js": "export const a = 1;\n",
        "tests/a_test.js": "",
        "src/b.ts": "",
      });
      const problems = await checkPackage(dir, files);
      for (
        const expected of [
          /test file is packed: tests\/a_test\.js/,
          /mod\.js imports "left-pad"/,
          /mod\.js is not ESM/,
          /mod\.d\.ts imports "\.\/src\/a\.js" but src\/a\.d\.ts is not packed/,
          /unexpected file: src\/b\.ts/,
        ]
      ) {
        assert.ok(problems.some((problem) => expected.test(problem)), `${expected}: ${problems}`);
      }
    });
  });
});

describe("published declarations", () => {
  it("flag a runtime's types and private members, never doc examples", () => {
    const code = `import type { FileHandle } from "node:fs/promises";
/** \`\`\`ts
 * import assert from "node:assert/strict";
 * \`\`\` */ export declare class Store {
  #private;
  /** Called by a writer. */ _commit(writer: unknown): Promise<void>;
  readonly _state?: number;
  handle(): import("node:fs/promises").FileHandle;
  open(_options?: object): void;
}`;
    assert.deepEqual(declarationProblems("a.d.ts", code), [
      'a.d.ts names a runtime\'s types ("node:fs/promises")',
      'a.d.ts names a runtime\'s types ("node:fs/promises")',
      "a.d.ts publishes a private member _commit",
      "a.d.ts publishes a private member _state",
    ]);
    assert.deepEqual(declarationProblems("b.d.ts", '/// <reference types="node" />\n'), [
      "b.d.ts references a runtime's types (/// <reference types>)",
    ]);
  });
});
