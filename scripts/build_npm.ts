/**
 * Builds the npm package into `npm/` (git-ignored) and checks it.
 *
 * ```sh
 * npx -y deno task build:npm          # version from deno.json
 * npx -y deno task build:npm 0.2.0    # or given
 * ```
 *
 * 1. `deno pack` (built into Deno; dnt is unreachable) transpiles mod.ts and
 *    testing.ts to ESM JavaScript with `.d.ts` files, and adds README and
 *    LICENSE.
 * 2. The tarball is unpacked into `npm/` and its package.json rewritten for
 *    npm: the name `hono-image-cache` (deno.json's name is JSR's scoped one),
 *    `hono` as a peer dependency (never bundled), `postgres` as an optional
 *    one (cluster mode loads it on demand), `@hono/node-server` (the
 *    command's server on Node) as a dependency, exports with types, the
 *    `hono-image-cache` command as a `bin` (`bin/hono-image-cache.js`, which
 *    runs the `./cli` export on Node 22+ and Bun), engines, license,
 *    repository, keywords.
 * 3. `npm pack` makes `npm/hono-image-cache-<version>.tgz`, and its file
 *    list is checked: ESM JavaScript, `.d.ts` for every public module,
 *    README, LICENSE, no tests; every import is relative, `node:*`, `hono`
 *    or a declared dependency; the `bin` exists and starts with a shebang.
 * 4. `deno publish --dry-run` proves the source has no slow types, so the
 *    same package is ready for JSR (skip with `--no-publish-check`).
 *
 * Prints the tarball's path on its last line.
 *
 * @module
 */
import { mkdir, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";
import { specifiers } from "./check_layout.ts";

/** The npm name: deno.json's `name` is the scoped one JSR and `deno pack` require. */
export const NPM_NAME = "hono-image-cache";
/** Where the project lives; change it here when the repository moves. */
const REPOSITORY = "https://github.com/image-cache/hono-image-cache";
/** Node versions the whole test suite runs on (scripts/test_all.ts). */
const NODE_ENGINES = ">=22";
/** Dependencies the user brings: never bundled, never installed twice. */
const PEERS = new Set(["hono", "postgres"]);
/** Peers only some users need: `postgres` is loaded in cluster mode only (src/_cluster/). */
const OPTIONAL_PEERS = ["postgres"];
/** The command the package installs, and the file that runs it. */
const BIN = { name: NPM_NAME, file: "bin/hono-image-cache.js" };
/** What the `bin` file holds: the `./cli` export, run with the process's arguments. */
const BIN_SOURCE = `#!/usr/bin/env node
// The hono-image-cache command (serve, cache-manage) on Node 22+ and Bun; see src/proxy/cli.js.
import process from "node:process";
import { main } from "../src/proxy/cli.js";

process.exit(await main(process.argv.slice(2)));
`;
const KEYWORDS = [
  "hono",
  "middleware",
  "cache",
  "image-cache",
  "glance",
  "openstack",
  "proxy",
  "streaming",
  "deno",
  "bun",
  "node",
];

const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..");
const OUT = join(ROOT, "npm");

/** What {@linkcode buildNpm} made. */
export interface BuildResult {
  /** The unpacked package, ready for `npm publish`. */
  directory: string;
  /** The tarball made by `npm pack`. */
  tarball: string;
  /** The version built. */
  version: string;
  /** Paths inside the tarball. */
  files: string[];
}

/** Options of {@linkcode buildNpm}. */
export interface BuildOptions {
  /** The version to build. @default {deno.json's version} */
  version?: string;
  /** Run `deno publish --dry-run` (slow types). @default {true} */
  publishCheck?: boolean;
}

async function run(cmd: string, args: string[], cwd = ROOT): Promise<string> {
  const out = await new Deno.Command(cmd, { args, cwd, stdout: "piped", stderr: "piped" })
    .output();
  const text = new TextDecoder().decode(out.stdout);
  if (!out.success) {
    const err = new TextDecoder().decode(out.stderr);
    throw new Error(`${cmd} ${args.join(" ")} failed (exit ${out.code}):\n${text}${err}`);
  }
  return text;
}

async function listFiles(dir: string, base = dir): Promise<string[]> {
  const out: string[] = [];
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) out.push(...await listFiles(path, base));
    else out.push(relative(base, path));
  }
  return out.sort();
}

/**
 * Checks what the tarball holds; returns the problems found (empty: fine).
 * Exported for the test runner.
 */
export async function checkPackage(directory: string, files: string[]): Promise<string[]> {
  const problems: string[] = [];
  const has = new Set(files);
  for (const need of ["package.json", "README.md", "LICENSE"]) {
    if (!has.has(need)) problems.push(`missing ${need}`);
  }
  const pkg = JSON.parse(await readFile(join(directory, "package.json"), "utf8"));
  const dependencies = new Set(Object.keys(pkg.dependencies ?? {}));
  for (const [name, target] of Object.entries((pkg.bin ?? {}) as Record<string, string>)) {
    const file = target.replace(/^\.\//, "");
    if (!has.has(file)) problems.push(`bin "${name}" points to missing ${target}`);
    else if (!(await readFile(join(directory, file), "utf8")).startsWith("#!/usr/bin/env node\n")) {
      problems.push(`bin "${name}" (${target}) does not start with #!/usr/bin/env node`);
    }
  }
  for (const [subpath, target] of Object.entries(pkg.exports as Record<string, ExportTarget>)) {
    for (const file of [target.import, target.types]) {
      if (!has.has(file.replace(/^\.\//, ""))) {
        problems.push(`export "${subpath}" points to missing ${file}`);
      }
    }
  }
  for (const file of files) {
    if (/(^|\/)tests?\/|_test\.|\.test\.|(^|\/)_helpers\./.test(file)) {
      problems.push(`a test file is packed: ${file}`);
    }
    if (/(^|\/)node_modules\//.test(file)) problems.push(`a dependency is bundled: ${file}`);
    if (!/\.(js|d\.ts)$/.test(file) && !["package.json", "README.md", "LICENSE"].includes(file)) {
      problems.push(`unexpected file: ${file}`);
    }
    if (!file.endsWith(".js") && !file.endsWith(".d.ts")) continue;
    const code = await readFile(join(directory, file), "utf8");
    if (file.endsWith(".js") && /\brequire\s*\(|\bmodule\.exports\b/.test(withoutStrings(code))) {
      problems.push(`${file} is not ESM`);
    }
    if (file.endsWith(".d.ts")) problems.push(...declarationProblems(file, code));
    for (const spec of specifiers(code)) {
      if (spec.startsWith(".")) {
        if (!spec.endsWith(".js")) {
          problems.push(`${file} imports "${spec}" (not a .js path)`);
          continue;
        }
        const target = join(dirname(file), spec).replace(/\\/g, "/");
        const wanted = file.endsWith(".d.ts") ? target.replace(/\.js$/, ".d.ts") : target;
        if (!has.has(wanted)) {
          problems.push(`${file} imports "${spec}" but ${wanted} is not packed`);
        }
      } else if (
        !spec.startsWith("node:") && !PEERS.has(spec.split("/")[0]) &&
        !dependencies.has(packageName(spec))
      ) {
        problems.push(
          `${file} imports "${spec}" (only relative, node:*, peers and dependencies are allowed)`,
        );
      }
    }
  }
  return problems;
}

/** The package a bare specifier names: `@scope/name` or `name`. */
function packageName(spec: string): string {
  const parts = spec.split("/");
  return spec.startsWith("@") ? parts.slice(0, 2).join("/") : parts[0];
}

/**
 * `code` with the contents of its string and template literals blanked (a
 * worker's source text may say `require(`; the module itself must not).
 */
function withoutStrings(code: string): string {
  return code.replace(/`(?:\\[\s\S]|[^`\\])*`|"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*'/g, '""');
}

/**
 * What a published declaration file must not hold: a runtime's types (a
 * `node:` import, a `/// <reference types>`), which a user without them
 * cannot type-check, or a `_`-prefixed member, which is private.
 */
export function declarationProblems(file: string, code: string): string[] {
  const problems: string[] = [];
  for (const spec of specifiers(code)) {
    if (spec.startsWith("node:")) problems.push(`${file} names a runtime's types ("${spec}")`);
  }
  if (/^\s*\/\/\/\s*<reference\s+types=/m.test(code)) {
    problems.push(`${file} references a runtime's types (/// <reference types>)`);
  }
  const declarations = code.replace(/\/\*[\s\S]*?\*\//g, "").replace(/\/\/.*$/gm, "");
  for (
    const match of declarations.matchAll(
      /^\s*(?:(?:readonly|static|abstract|public|protected|get|set|async)\s+)*(_\w*)\s*[?!]?\s*[(:<]/gm,
    )
  ) {
    problems.push(`${file} publishes a private member ${match[1]}`);
  }
  return problems;
}

interface ExportTarget {
  types: string;
  import: string;
  default: string;
}

/** Builds and checks the npm package; throws when something is wrong. */
export async function buildNpm(options: BuildOptions = {}): Promise<BuildResult> {
  const denoJson = JSON.parse(await readFile(join(ROOT, "deno.json"), "utf8"));
  const version = options.version ?? denoJson.version;
  if (typeof version !== "string" || !/^\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?$/.test(version)) {
    throw new TypeError(
      `Cannot build the npm package: the version must be semver (1.2.3), received ${
        JSON.stringify(version)
      }`,
    );
  }

  if (options.publishCheck ?? true) {
    console.log("deno publish --dry-run (slow types) ...");
    await run(Deno.execPath(), ["publish", "--dry-run", "--allow-dirty", "--quiet"]);
  }

  await rm(OUT, { recursive: true, force: true });
  await mkdir(OUT, { recursive: true });
  const packed = join(OUT, "deno-pack.tgz");
  console.log(`deno pack ${denoJson.name}@${version} ...`);
  await run(Deno.execPath(), [
    "pack",
    "--allow-dirty",
    "--no-source-maps",
    "--set-version",
    version,
    "--output",
    packed,
  ]);
  // A tarball unpacked with the system tar: present on Linux, macOS and Windows 10+.
  await run("tar", ["xzf", packed, "--strip-components=1", "-C", OUT]);
  await rm(packed);

  // deno pack copies every file of deno.json's publish list; a TypeScript file it did not
  // transpile is reachable from no export. Dead code has no place in the npm package.
  for (const file of await listFiles(OUT)) {
    if (/\.(ts|mts|tsx)$/.test(file) && !/\.d\.ts$/.test(file)) {
      console.warn(`warning: ${file} is imported by no export; left out of the npm package`);
      await rm(join(OUT, file));
    }
  }
  await mkdir(join(OUT, "bin"), { recursive: true });
  await writeFile(join(OUT, BIN.file), BIN_SOURCE, { mode: 0o755 });
  const packedFiles = await listFiles(OUT);
  const denoPkg = JSON.parse(await readFile(join(OUT, "package.json"), "utf8"));
  const dependencies: Record<string, string> = {};
  const peerDependencies: Record<string, string> = {};
  for (const [name, range] of Object.entries(denoPkg.dependencies ?? {}) as [string, string][]) {
    (PEERS.has(name) ? peerDependencies : dependencies)[name] = range;
  }
  const exports: Record<string, ExportTarget> = {};
  for (const [subpath, target] of Object.entries(denoJson.exports as Record<string, string>)) {
    const js = target.replace(/\.ts$/, ".js");
    exports[subpath] = { types: js.replace(/\.js$/, ".d.ts"), import: js, default: js };
  }
  // Top-level entries of what deno pack made; npm adds package.json, README and LICENSE itself.
  const included = [
    ...new Set(packedFiles.map((file) => file.split("/")[0])),
  ].filter((name) => !["package.json", "README.md", "LICENSE"].includes(name))
    .map((name) => packedFiles.includes(name) ? name : `${name}/`);

  const pkg = {
    name: NPM_NAME,
    version,
    description: "OpenStack Glance's transparent image cache as a Hono middleware: " +
      "large immutable objects streamed, verified and cached on disk, on Deno, Bun and Node.",
    keywords: KEYWORDS,
    license: denoJson.license ?? "Apache-2.0",
    repository: { type: "git", url: `git+${REPOSITORY}.git` },
    homepage: `${REPOSITORY}#readme`,
    bugs: { url: `${REPOSITORY}/issues` },
    type: "module",
    // The bin runs the command when imported; the library's modules have no side effects.
    sideEffects: [`./${BIN.file}`],
    main: exports["."].import,
    types: exports["."].types,
    exports,
    bin: { [BIN.name]: `./${BIN.file}` },
    files: included,
    engines: { node: NODE_ENGINES },
    ...(Object.keys(dependencies).length > 0 ? { dependencies } : {}),
    peerDependencies,
    peerDependenciesMeta: Object.fromEntries(
      OPTIONAL_PEERS.filter((name) => name in peerDependencies).map((name) => [
        name,
        { optional: true },
      ]),
    ),
  };
  await writeFile(join(OUT, "package.json"), JSON.stringify(pkg, null, 2) + "\n");

  console.log("npm pack ...");
  const packJson = await run("npm", ["pack", "--json", "--silent"], OUT);
  const info = JSON.parse(packJson.slice(packJson.indexOf("[")))[0];
  const tarball = join(OUT, info.filename as string);
  const files = (info.files as { path: string }[]).map((file) => file.path).sort();

  const problems = await checkPackage(OUT, files);
  if (problems.length > 0) {
    throw new Error(`The npm package is wrong:\n  ${problems.join("\n  ")}`);
  }
  const js = files.filter((file) => file.endsWith(".js")).length;
  const dts = files.filter((file) => file.endsWith(".d.ts")).length;
  console.log(
    `${NPM_NAME}@${version}: ${files.length} files (${js} .js, ${dts} .d.ts, README.md, ` +
      `LICENSE), ${(info.size / 1024).toFixed(1)} KiB packed; peer ${
        JSON.stringify(peerDependencies)
      }`,
  );
  return { directory: OUT, tarball, version, files };
}

if (import.meta.main) {
  const args = Deno.args.filter((arg) => !arg.startsWith("--"));
  const result = await buildNpm({
    version: args[0],
    publishCheck: !Deno.args.includes("--no-publish-check"),
  });
  console.log(result.tarball);
}
