/**
 * The whole test suite on every runtime: `npx -y deno task test`.
 *
 * 1. **Deno, on the source**: `deno test -A --parallel tests/` (tests/internal/ included).
 * 2. **The npm package**: scripts/build_npm.ts builds and checks `npm/`; a
 *    fresh temporary project installs the tarball with `hono` and
 *    `@hono/node-server` (the npm imports of deno.json), TypeScript and
 *    `@types/node`, and gets a copy of tests/ (less tests/internal/ and tests/npm/).
 * 3. **Checks in that project** (tests/npm/): the smoke test (imageCache +
 *    FileSystemStore, a multi-MiB image downloaded twice over HTTP) on Node 22,
 *    Node 24, Bun and Deno; the `hono-image-cache` command (the package's
 *    `bin`: serve in front of its demo Glance, a miss, a hit, a 401, a
 *    download drained on SIGTERM, exit 0) on Node 22, Node 24 and Bun;
 *    `require()` on Node 22, 24 and Bun; `tsc --noEmit`
 *    of a TypeScript consumer with moduleResolution node16 and bundler, and
 *    once more in a project without `@types/node` (TypeScript's default
 *    `types`, `nodenext`, `skipLibCheck: false`): no runtime's types leak
 *    into the published `.d.ts` files.
 * 4. **The same test files on the installed tarball**: `node --test` on
 *    Node 22 and Node 24 (type stripping), `bun test` on Bun. There
 *    `hono-image-cache` resolves to node_modules, not to the source.
 *
 * Runtimes run one after the other; a failure on one does not stop the
 * others, and fails the command. The last lines are a per-runtime summary
 * and `total: N passed, N failed, N skipped`.
 *
 * ```sh
 * npx -y deno task test                               # everything
 * npx -y deno task test tests/routes_test.ts          # these files, on every runtime
 * npx -y deno task test --runtimes=node24,bun         # some runtimes (deno, node22, node24, bun)
 * npx -y deno task test --keep                        # keep the temporary project (its path is printed)
 * ```
 *
 * @module
 */
import { cp, mkdir, mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { basename, dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { buildNpm, NPM_NAME } from "./build_npm.ts";

const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..");
const TESTS = join(ROOT, "tests");
const MINUTE = 60_000;
/** Per-test limit on Node and Bun (Bun's default is 5 s; Deno and Node have none). */
const TEST_TIMEOUT = 5 * MINUTE;
/** Per-suite limit: a hung suite is killed and counted as failed. */
const SUITE_TIMEOUT = 10 * MINUTE;
const CHECK_TIMEOUT = 2 * MINUTE;
const RUNTIMES = ["deno", "node22", "node24", "bun"] as const;
type Runtime = typeof RUNTIMES[number];

/** One line of the final summary. */
interface Result {
  name: string;
  passed: number;
  failed: number;
  skipped: number;
  ms: number;
  note: string;
  /** The names of the failed tests, as the runner printed them. */
  failures?: string[];
}
const results: Result[] = [];

// ---------------------------------------------------------------- processes

const running = new Set<Deno.ChildProcess>();
/** The temporary directory to remove when the run is interrupted. */
let workDir: string | undefined;

function killGroup(child: Deno.ChildProcess) {
  try {
    // Children are started detached, in their own process group: this also
    // ends the workers `node --test` and `npx` start.
    Deno.kill(-child.pid, "SIGKILL");
  } catch {
    try {
      child.kill("SIGKILL");
    } catch {
      // Already gone.
    }
  }
}

function killChildrenOnSignals() {
  for (const signal of ["SIGINT", "SIGTERM"] as const) {
    Deno.addSignalListener(signal, () => {
      for (const child of running) killGroup(child);
      if (workDir !== undefined) Deno.removeSync(workDir, { recursive: true });
      console.error(`\n${signal}: stopped`);
      Deno.exit(130);
    });
  }
}

interface Exec {
  code: number;
  /** stdout + stderr, ANSI colours removed (the last 2 MiB). */
  output: string;
  timedOut: boolean;
  ms: number;
}

const TAIL = 2 * 2 ** 20;

/** Runs a command, echoing its output as it comes; never throws for a failure. */
async function exec(
  cmd: string,
  args: string[],
  options: { cwd?: string; timeout?: number; env?: Record<string, string>; quiet?: boolean } = {},
): Promise<Exec> {
  const started = performance.now();
  let output = "";
  let child: Deno.ChildProcess;
  try {
    child = new Deno.Command(cmd, {
      args,
      cwd: options.cwd ?? ROOT,
      env: options.env,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
      detached: true,
    }).spawn();
  } catch (error) {
    return { code: 127, output: `${cmd}: ${error}`, timedOut: false, ms: 0 };
  }
  running.add(child);
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    console.error(`\n!! ${basename(cmd)} ${args.join(" ")}: timed out, killed`);
    killGroup(child);
  }, options.timeout ?? SUITE_TIMEOUT);
  const pump = async (stream: ReadableStream<Uint8Array>, to: typeof Deno.stdout) => {
    const decoder = new TextDecoder();
    for await (const chunk of stream) {
      if (!options.quiet) await to.write(chunk);
      output += decoder.decode(chunk, { stream: true });
      if (output.length > 2 * TAIL) output = output.slice(-TAIL);
    }
  };
  const [status] = await Promise.all([
    child.status,
    pump(child.stdout, Deno.stdout),
    pump(child.stderr, Deno.stderr),
  ]);
  clearTimeout(timer);
  running.delete(child);
  return {
    code: status.code,
    // deno-lint-ignore no-control-regex
    output: output.replace(/\x1b\[[0-9;]*m/g, ""),
    timedOut,
    ms: performance.now() - started,
  };
}

function header(title: string) {
  console.log(`\n━━━━ ${title} ${"━".repeat(Math.max(0, 70 - title.length))}`);
}

/** Records a suite's counts; a failed exit without a failed test still counts one failure. */
function record(
  name: string,
  run: Exec,
  counts: Counts | undefined,
  note = "",
  failures: string[] = [],
) {
  let { passed = 0, failed = 0, skipped = 0 } = counts ?? {};
  const notes = [note];
  if (run.timedOut) notes.push("timed out, killed");
  if (run.code !== 0 && failed === 0) {
    failed = 1;
    notes.push(counts ? `exit code ${run.code}` : `exit code ${run.code}, no test summary`);
  }
  if (run.code === 0 && counts === undefined) notes.push("no test summary found");
  if (run.code === 0 && counts !== undefined && passed + failed === 0) {
    failed = 1;
    notes.push("ran no test");
  }
  results.push({
    name,
    passed,
    failed,
    skipped,
    ms: run.ms,
    note: notes.filter(Boolean).join("; "),
    failures,
  });
}

/** Records a check (one command, pass or fail). */
function check(name: string, run: Exec, note = "") {
  results.push({
    name,
    passed: run.code === 0 ? 1 : 0,
    failed: run.code === 0 ? 0 : 1,
    skipped: 0,
    ms: run.ms,
    note: run.code === 0 ? note : `exit code ${run.code}${run.timedOut ? ", timed out" : ""}`,
  });
}

function notRun(name: string, why: string) {
  results.push({ name, passed: 0, failed: 1, skipped: 0, ms: 0, note: `not run: ${why}` });
}

// ------------------------------------------------------------------ parsers

/** What a runner reports: tests (the `it`s, not the `describe`s) by outcome. */
export interface Counts {
  passed: number;
  failed: number;
  skipped: number;
}

/** Counts of Node's spec reporter (`ℹ pass 12` ...) or TAP (`# pass 12`). */
export function nodeCounts(output: string): Counts | undefined {
  const get = (key: string) => {
    const all = [...output.matchAll(new RegExp(`^[ℹ#] ${key} (\\d+)$`, "gm"))];
    return all.length > 0 ? Number(all[all.length - 1][1]) : undefined;
  };
  const passed = get("pass");
  if (passed === undefined) return undefined;
  return {
    passed,
    failed: (get("fail") ?? 0) + (get("cancelled") ?? 0),
    skipped: (get("skipped") ?? 0) + (get("todo") ?? 0),
  };
}

/** Counts of `bun test`: ` 12 pass`, ` 0 fail`, ` 1 skip`, ` 1 error`. */
export function bunCounts(output: string): Counts | undefined {
  const get = (key: string) => {
    const all = [...output.matchAll(new RegExp(`^\\s*(\\d+) ${key}$`, "gm"))];
    return all.length > 0 ? Number(all[all.length - 1][1]) : undefined;
  };
  const passed = get("pass");
  if (passed === undefined) return undefined;
  return {
    passed,
    // `N error`: errors thrown outside any test (an unhandled rejection, a leaked handle).
    failed: (get("fail") ?? 0) + (get("errors?") ?? 0),
    skipped: (get("skip") ?? 0) + (get("todo") ?? 0),
  };
}

/** The failed tests' names: Bun's `(fail) a > b [1.00ms]`, Node's `✖ b (1.2ms)`. */
export function failedNames(output: string): string[] {
  const names = [
    ...output.matchAll(/^\(fail\) (.+?)(?: \[[\d.]+m?s\])?$/gm),
    ...output.matchAll(/^\s*✖ (.+?) \([\d.]+m?s\)$/gm),
  ].map((match) => match[1].trim());
  return [...new Set(names)];
}

/**
 * The leaves of Deno's JUnit report, counted as Node and Bun count: Deno
 * reports a `describe` as a test and each `it` as a step (`group > name`);
 * a test case that has steps is a group, not a test.
 */
function junitLeaves(xml: string): { name: string; body: string }[] {
  const cases = [
    ...xml.matchAll(/<testcase name="([^"]*)"[^>]*?(?:\/>|>([\s\S]*?)<\/testcase>)/g),
  ].map((match) => ({ name: match[1], body: match[2] ?? "" }));
  const names = cases.map((testCase) => testCase.name);
  return cases.filter((testCase) =>
    !names.some((name) => name.startsWith(`${testCase.name} &gt; `))
  );
}

/** The failed leaves of Deno's JUnit report, by name. */
export function denoFailedNames(xml: string): string[] {
  return junitLeaves(xml).filter((leaf) => /<failure|<error/.test(leaf.body)).map((leaf) =>
    leaf.name.replaceAll("&gt;", ">").replaceAll("&lt;", "<").replaceAll("&quot;", '"')
      .replaceAll("&amp;", "&")
  );
}

/** Deno's JUnit report, counted by its leaves (see {@linkcode junitLeaves}). */
export function denoCounts(xml: string): Counts | undefined {
  const leaves = junitLeaves(xml);
  if (leaves.length === 0) return undefined;
  const counts: Counts = { passed: 0, failed: 0, skipped: 0 };
  for (const leaf of leaves) {
    if (/<failure|<error/.test(leaf.body)) counts.failed++;
    else if (/<skipped/.test(leaf.body)) counts.skipped++;
    else counts.passed++;
  }
  return counts;
}

// ------------------------------------------------------------------ steps

async function testFiles(filter: string[]): Promise<{ portable: string[]; denoOnly: string[] }> {
  const portable = (await readdir(TESTS)).filter((name) => /_test\.(ts|mts|js|mjs)$/.test(name))
    .sort().map((name) => `tests/${name}`);
  if (filter.length === 0) return { portable, denoOnly: ["tests/"] };
  const wanted = filter.map((file) => relative(ROOT, resolve(file)).replace(/\\/g, "/"));
  return {
    portable: portable.filter((file) => wanted.includes(file)),
    denoOnly: wanted,
  };
}

async function runDeno(targets: string[], work: string) {
  header(`deno ${Deno.version.deno} (source): deno test -A --parallel ${targets.join(" ")}`);
  const junit = join(work, "deno-junit.xml");
  const run = await exec(Deno.execPath(), [
    "test",
    "-A",
    "--parallel",
    `--junit-path=${junit}`,
    ...targets,
  ]);
  const xml = await readFile(junit, "utf8").catch(() => "");
  record(`deno ${Deno.version.deno} (source)`, run, denoCounts(xml), "", denoFailedNames(xml));
}

/** The real binary behind `npx -y <pkg>` (so a timeout can kill its whole process group). */
async function binary(pkg: string): Promise<string | undefined> {
  const run = await exec("npx", ["-y", pkg, "-p", "process.execPath"], {
    timeout: 5 * MINUTE,
    quiet: true,
  });
  const path = run.output.trim().split("\n").pop()?.trim();
  if (run.code !== 0 || !path) {
    console.error(`npx -y ${pkg} failed:\n${run.output}`);
    return undefined;
  }
  return path;
}

/** deno.json's npm imports (`hono`, `@hono/node-server`), as npm install specs. */
async function npmImports(): Promise<string[]> {
  const denoJson = JSON.parse(await readFile(join(ROOT, "deno.json"), "utf8"));
  return Object.entries(denoJson.imports as Record<string, string>)
    .filter(([name, target]) => !name.endsWith("/") && target.startsWith("npm:"))
    .map(([, target]) => target.slice(4));
}

async function makeProject(work: string, tarball: string): Promise<string | undefined> {
  const project = join(work, "project");
  header(`a fresh project: npm install ${basename(tarball)} in ${project}`);
  await rm(project, { recursive: true, force: true });
  await cp(TESTS, join(project, "tests"), {
    recursive: true,
    filter: (source) => !/[\\/]tests[\\/](internal|npm)([\\/]|$)/.test(source),
  });
  for (const file of await readdir(join(TESTS, "npm"))) {
    await cp(join(TESTS, "npm", file), join(project, file));
  }
  await writeFile(
    join(project, "package.json"),
    JSON.stringify({ name: "hono-image-cache-consumer", private: true, type: "module" }, null, 2),
  );
  for (const resolution of ["node16", "bundler"]) {
    await writeFile(
      join(project, `tsconfig.${resolution}.json`),
      JSON.stringify({
        compilerOptions: {
          module: resolution === "node16" ? "node16" : "esnext",
          moduleResolution: resolution,
          target: "es2022",
          lib: ["es2022"],
          types: ["node"],
          strict: true,
          noEmit: true,
          skipLibCheck: false,
        },
        files: ["consumer.ts"],
      }),
    );
  }
  const specs = [tarball, ...await npmImports(), "typescript", "@types/node"];
  const run = await npmInstall(project, specs);
  check("npm install of the tarball", run);
  if (run.code !== 0) return undefined;
  const installed = JSON.parse(
    await readFile(join(project, "node_modules", NPM_NAME, "package.json"), "utf8"),
  );
  const hono = JSON.parse(
    await readFile(join(project, "node_modules", "hono", "package.json"), "utf8"),
  );
  console.log(`installed ${installed.name}@${installed.version} with hono@${hono.version}`);
  return project;
}

async function npmInstall(project: string, specs: string[]): Promise<Exec> {
  console.log(`npm install ${specs.join(" ")}`);
  return await exec("npm", [
    "install",
    "--no-audit",
    "--no-fund",
    "--prefer-offline",
    "--loglevel=error",
    ...specs,
  ], { cwd: project, timeout: 5 * MINUTE });
}

/**
 * A second fresh project, as a strict TypeScript user has it: the tarball,
 * hono and TypeScript only (no `@types/node`), TypeScript's default `types`
 * and `lib`, `nodenext`, `skipLibCheck: false`. Our `.d.ts` files must
 * type-check there: no runtime's types may leak into them.
 */
async function makePlainProject(work: string, tarball: string): Promise<string | undefined> {
  const project = join(work, "plain");
  await rm(project, { recursive: true, force: true });
  await mkdir(project, { recursive: true });
  await cp(join(TESTS, "npm", "consumer.ts"), join(project, "consumer.ts"));
  await writeFile(
    join(project, "package.json"),
    JSON.stringify({ name: "hono-image-cache-plain", private: true, type: "module" }, null, 2),
  );
  await writeFile(
    join(project, "tsconfig.json"),
    JSON.stringify({
      compilerOptions: {
        module: "nodenext",
        moduleResolution: "nodenext",
        strict: true,
        noEmit: true,
        skipLibCheck: false,
      },
      files: ["consumer.ts"],
    }),
  );
  const hono = (await npmImports()).filter((spec) => spec.startsWith("hono@"));
  const run = await npmInstall(project, [tarball, ...hono, "typescript"]);
  if (run.code !== 0) {
    check("npm install (no @types/node)", run);
    return undefined;
  }
  return project;
}

const LABEL: Record<Runtime, string> = {
  deno: "deno",
  node22: "node 22",
  node24: "node 24",
  bun: "bun",
};

async function runChecks(
  project: string,
  plain: string | undefined,
  bins: Partial<Record<Runtime, string>>,
) {
  header("checks of the installed package (tests/npm/)");
  for (const runtime of RUNTIMES) {
    const bin = bins[runtime];
    if (bin === undefined) continue;
    const args = runtime === "deno" ? ["run", "-A", "smoke.mjs"] : ["smoke.mjs"];
    const run = await exec(bin, args, { cwd: project, timeout: CHECK_TIMEOUT });
    const line = run.output.match(/smoke ok on [^:]+: (.*), md5/)?.[1] ?? "";
    check(`smoke ${LABEL[runtime]} (npm package)`, run, line);
  }
  for (const runtime of ["node22", "node24", "bun"] as const) {
    const bin = bins[runtime];
    if (bin === undefined) continue;
    const run = await exec(bin, ["bin.mjs"], { cwd: project, timeout: CHECK_TIMEOUT });
    check(`bin ${LABEL[runtime]} (hono-image-cache serve)`, run);
  }
  for (const runtime of ["node22", "node24", "bun"] as const) {
    const bin = bins[runtime];
    if (bin === undefined) continue;
    check(
      `require() ${LABEL[runtime]}`,
      await exec(bin, ["require.cjs"], { cwd: project, timeout: CHECK_TIMEOUT }),
    );
  }
  const node = bins.node24 ?? bins.node22;
  if (node === undefined) return;
  const tsc = join(project, "node_modules", "typescript", "bin", "tsc");
  const version = (await exec(node, [tsc, "--version"], { cwd: project, quiet: true })).output
    .trim();
  for (const resolution of ["node16", "bundler"]) {
    console.log(`tsc --noEmit -p tsconfig.${resolution}.json (${version})`);
    check(
      `tsc --noEmit (${resolution})`,
      await exec(node, [tsc, "-p", `tsconfig.${resolution}.json`], {
        cwd: project,
        timeout: CHECK_TIMEOUT,
      }),
      version,
    );
  }
  if (plain === undefined) return;
  const plainTsc = join(plain, "node_modules", "typescript", "bin", "tsc");
  console.log(`tsc --noEmit without @types/node, skipLibCheck false (${plain})`);
  check(
    "tsc --noEmit (no @types/node)",
    await exec(node, [plainTsc, "-p", "tsconfig.json"], { cwd: plain, timeout: CHECK_TIMEOUT }),
    version,
  );
}

async function runSuite(runtime: Runtime, bin: string, project: string, files: string[]) {
  const version = (await exec(bin, ["--version"], { quiet: true })).output.trim();
  const name = `${runtime === "bun" ? "bun" : "node"} ${version.replace(/^v/, "")} (npm package)`;
  if (runtime === "bun") {
    header(`${name}: bun test (${files.length} files)`);
    const run = await exec(bin, [
      "test",
      `--timeout=${TEST_TIMEOUT}`,
      ...files.map((file) => `./${file}`),
    ], { cwd: project });
    record(name, run, bunCounts(run.output), "", failedNames(run.output));
  } else {
    header(`${name}: node --test (${files.length} files)`);
    const run = await exec(bin, [
      "--test",
      "--test-reporter=spec",
      `--test-timeout=${TEST_TIMEOUT}`,
      "--test-concurrency=2",
      ...files,
    ], { cwd: project });
    record(name, run, nodeCounts(run.output), "", failedNames(run.output));
  }
}

function summary(startedAt: number) {
  const width = Math.max(...results.map((result) => result.name.length));
  header(`summary (${((performance.now() - startedAt) / 1000).toFixed(0)} s)`);
  const total = { passed: 0, failed: 0, skipped: 0 };
  for (const result of results) {
    total.passed += result.passed;
    total.failed += result.failed;
    total.skipped += result.skipped;
    const mark = result.failed > 0 ? "FAIL" : "ok  ";
    const counts = `${result.passed} passed, ${result.failed} failed` +
      (result.skipped > 0 ? `, ${result.skipped} skipped` : "");
    console.log(
      `${mark} ${result.name.padEnd(width)}  ${counts.padEnd(34)} ${
        (result.ms / 1000).toFixed(1).padStart(6)
      } s${result.note ? `  ${result.note}` : ""}`,
    );
    // The failed tests' names, so that the last lines of a run say what failed.
    const failures = result.failures ?? [];
    for (const failure of failures.slice(0, 10)) console.log(`       failed: ${failure}`);
    if (failures.length > 10) console.log(`       ... and ${failures.length - 10} more`);
  }
  console.log(`total: ${total.passed} passed, ${total.failed} failed, ${total.skipped} skipped`);
  return total.failed === 0;
}

// ------------------------------------------------------------------ main

async function main(): Promise<boolean> {
  const startedAt = performance.now();
  killChildrenOnSignals();
  const flags = Deno.args.filter((arg) => arg.startsWith("--"));
  const filter = Deno.args.filter((arg) => !arg.startsWith("--"));
  const only = flags.find((flag) => flag.startsWith("--runtimes="))?.split("=")[1].split(",");
  for (const name of only ?? []) {
    if (!(RUNTIMES as readonly string[]).includes(name)) {
      throw new TypeError(
        `Cannot run the tests: "--runtimes" takes ${RUNTIMES.join(", ")}, received "${name}"`,
      );
    }
  }
  const wanted = (runtime: Runtime) => only === undefined || only.includes(runtime);
  const keep = flags.includes("--keep");
  const { portable, denoOnly } = await testFiles(filter);
  const work = await mkdtemp(join(tmpdir(), "hono-image-cache-test-all-"));
  if (!keep) workDir = work;
  try {
    if (wanted("deno")) await runDeno(denoOnly, work);
    const npmRuntimes = RUNTIMES.filter((runtime) => runtime !== "deno" && wanted(runtime));
    if (npmRuntimes.length === 0) return summary(startedAt);

    header("npm package: scripts/build_npm.ts");
    const buildStart = performance.now();
    let tarball: string;
    try {
      const built = await buildNpm();
      tarball = built.tarball;
      results.push({
        name: "npm package build and content",
        passed: 1,
        failed: 0,
        skipped: 0,
        ms: performance.now() - buildStart,
        note: `${basename(tarball)}, ${built.files.length} files`,
      });
    } catch (error) {
      console.error(error);
      results.push({
        name: "npm package build and content",
        passed: 0,
        failed: 1,
        skipped: 0,
        ms: performance.now() - buildStart,
        note: String((error as Error).message).split("\n")[0],
      });
      for (const runtime of npmRuntimes) notRun(`${LABEL[runtime]} (npm package)`, "no package");
      return summary(startedAt);
    }

    const project = await makeProject(work, tarball);
    if (project === undefined) {
      for (const runtime of npmRuntimes) notRun(`${LABEL[runtime]} (npm package)`, "no project");
      return summary(startedAt);
    }
    if (keep) console.log(`keeping ${project}`);

    const bins: Partial<Record<Runtime, string>> = {};
    if (wanted("deno")) bins.deno = Deno.execPath();
    for (const runtime of npmRuntimes) {
      const pkg = runtime === "bun" ? "bun" : `node@${runtime.slice(4)}`;
      bins[runtime] = await binary(pkg);
      if (bins[runtime] === undefined) notRun(`${LABEL[runtime]}`, `npx -y ${pkg} failed`);
    }
    await runChecks(project, await makePlainProject(work, tarball), bins);
    for (const runtime of npmRuntimes) {
      const bin = bins[runtime];
      if (bin === undefined) continue;
      if (portable.length === 0) {
        // Files named on the command line that are all Deno-only: nothing to run here.
        if (filter.length > 0) continue;
        notRun(`${LABEL[runtime]} (npm package)`, "no tests/*_test.ts file");
        continue;
      }
      await runSuite(runtime, bin, project, portable);
    }
    return summary(startedAt);
  } finally {
    if (!keep) await rm(work, { recursive: true, force: true });
  }
}

if (import.meta.main) Deno.exit(await main() ? 0 : 1);
