/**
 * `deno task check:layout`: the architecture the tree shows, checked.
 *
 * 1. **No import circles** among the project's own modules (root front
 *    doors, `src/`, `scripts/`), type-only imports included.
 * 2. **Each folder depends only on what it may** (DESIGN.md §2): the rules
 *    in {@linkcode RULES}, e.g. `src/_http/` computes answers from metadata
 *    and imports no I/O and no fill; the library never imports the proxy,
 *    the test aids or the scripts.
 *
 * Prints each problem on one line and exits 1 when there is any.
 *
 * @module
 */
import { readdir, readFile } from "node:fs/promises";
import { dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..");

/** A rule: modules under `from` must not import what `forbid` matches. */
export interface LayoutRule {
  /** Path prefix (relative to the root) of the importing modules. */
  from: string;
  /** Path prefixes (relative) or `node:` specifiers they must not import. */
  forbid: string[];
  /** Why, printed with a violation. */
  why: string;
}

/** What each part of the tree may not depend on. */
export const RULES: LayoutRule[] = [
  {
    from: "src/",
    forbid: ["scripts/", "tests/", "proxy.ts", "testing.ts", "mod.ts"],
    why: "the library never imports its front doors, scripts or tests",
  },
  {
    from: "src/_",
    forbid: ["src/proxy/", "src/testing/"],
    why: "the cache's internals know nothing of the proxy or the test aids",
  },
  {
    from: "src/_http/",
    forbid: [
      "src/_fill/",
      "src/_core/",
      "src/_fs/",
      "src/_cluster/",
      "node:fs",
      "node:fs/promises",
    ],
    why: "HTTP answers are computed from metadata alone, with no I/O",
  },
  {
    from: "src/_fill/",
    forbid: ["src/_core/", "src/_fs/", "src/_http/", "src/_cluster/"],
    why: "a fill knows its source, its writer and its readers, nothing above them",
  },
  {
    from: "src/_cluster/",
    forbid: ["src/image_cache.ts", "src/cache_api.ts", "src/cluster.ts", "src/_fs/"],
    why:
      "cluster mode works on the core, its fills and the peer protocol; the public fronts use it",
  },
  {
    from: "src/_fs/",
    forbid: ["src/_core/", "src/_fill/", "src/_http/", "src/_cluster/"],
    why: "the file system store's internals serve the store, not the cache's logic",
  },
];

/** Modules whose imports are checked. */
async function modules(): Promise<string[]> {
  const found = ["mod.ts", "testing.ts", "proxy.ts"];
  const walk = async (dir: string) => {
    for (const entry of await readdir(join(ROOT, dir), { withFileTypes: true })) {
      const path = join(dir, entry.name);
      if (entry.isDirectory()) await walk(path);
      else if (entry.name.endsWith(".ts")) found.push(path);
    }
  };
  await walk("src");
  await walk("scripts");
  return found;
}

/** Import and export specifiers of a module (comments removed). */
export function specifiers(code: string): string[] {
  const stripped = code.replace(/\/\*[\s\S]*?\*\//g, "").replace(/^\s*\/\/.*$/gm, "");
  const found: string[] = [];
  const pattern =
    /(?:^|[;\s])(?:import|export)\s*(?:type\s+)?(?:[\w*{}\s,$]+from\s*)?["']([^"']+)["']|import\(\s*["']([^"']+)["']\s*\)/g;
  for (const match of stripped.matchAll(pattern)) found.push(match[1] ?? match[2]);
  return found;
}

/** The import graph: module → the project modules and `node:` specifiers it imports. */
export async function importGraph(): Promise<Map<string, string[]>> {
  const graph = new Map<string, string[]>();
  for (const module of await modules()) {
    const code = await readFile(join(ROOT, module), "utf8");
    const targets = specifiers(code).map((spec) =>
      spec.startsWith(".") ? relative(ROOT, resolve(ROOT, dirname(module), spec)) : spec
    );
    graph.set(module, targets);
  }
  return graph;
}

/** Every import circle, each once, as the list of modules around it. */
export function circles(graph: Map<string, string[]>): string[][] {
  const found: string[][] = [];
  const seen = new Set<string>();
  const state = new Map<string, "open" | "done">();
  const stack: string[] = [];
  const visit = (node: string) => {
    state.set(node, "open");
    stack.push(node);
    for (const next of graph.get(node) ?? []) {
      if (!graph.has(next)) continue;
      if (state.get(next) === "open") {
        const circle = stack.slice(stack.indexOf(next));
        const key = [...circle].sort().join(" ");
        if (!seen.has(key)) {
          seen.add(key);
          found.push(circle);
        }
      } else if (state.get(next) === undefined) {
        visit(next);
      }
    }
    stack.pop();
    state.set(node, "done");
  };
  for (const node of [...graph.keys()].sort()) {
    if (state.get(node) === undefined) visit(node);
  }
  return found;
}

/** The rule violations of a graph, one line each. */
export function violations(graph: Map<string, string[]>, rules = RULES): string[] {
  const problems: string[] = [];
  for (const [module, targets] of graph) {
    for (const rule of rules) {
      if (!module.startsWith(rule.from)) continue;
      for (const target of targets) {
        const hit = rule.forbid.find((prefix) =>
          prefix.startsWith("node:") ? target === prefix : target.startsWith(prefix)
        );
        if (hit !== undefined) problems.push(`${module} imports ${target}: ${rule.why}`);
      }
    }
  }
  return problems;
}

if (import.meta.main) {
  const graph = await importGraph();
  const problems = [
    ...circles(graph).map((circle) => `import circle: ${[...circle, circle[0]].join(" -> ")}`),
    ...violations(graph),
  ];
  for (const problem of problems) console.error(problem);
  if (problems.length > 0) {
    console.error(`${problems.length} layout problem(s)`);
    Deno.exit(1);
  }
  console.log(`layout: ${graph.size} modules, no import circle, every folder within its rules`);
}
