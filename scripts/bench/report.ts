/**
 * The bench's report: one table of medians with ratios against baselines
 * measured in the same run, the verdict on each target of DESIGN.md §8, and
 * the figures section of docs/benchmarks.md (between `<!-- bench:begin -->`
 * and `<!-- bench:end -->`) and the README's headline (between
 * `<!-- bench:headline:begin -->` and `<!-- bench:headline:end -->`),
 * rewritten from the run's own figures.
 *
 * @module
 */
import { readFile, writeFile } from "node:fs/promises";
import { formatBytes, median, MiB, run, type Runtime, type RuntimeName } from "./lib.ts";
import type { Results, Samples } from "./measure.ts";
import type { Options } from "./options.ts";

/** The machine and the versions of a run. */
export interface Machine {
  cpu: string;
  cores: number;
  memoryGiB: number;
  kernel: string;
  loadAtStart: number[];
  /** `deno 2.x`, `bun 1.x`, `node v24.x`. */
  runtimes: string[];
  /** `nginx version: nginx/1.22.1`, or `none`. */
  nginx: string;
  wrk: string;
}

/** One target of DESIGN.md §8 on one runtime. */
export interface Check {
  /** The measure, as §8 names it. */
  measure: string;
  runtime: RuntimeName;
  value: number;
  /** How the value is shown (`0.93`, `+0.42 s`, `148 MiB`). */
  shown: string;
  target: string;
  met: boolean;
}

/** What the report gives: the table, the verdicts, and the console's lines. */
export interface Report {
  table: string;
  checks: Check[];
  checkLines: string[];
}

export function fmt(value: number, digits = 0): string {
  if (!Number.isFinite(value)) return "–";
  return value.toLocaleString("en-US", {
    maximumFractionDigits: digits,
    minimumFractionDigits: digits,
  });
}

/** The median of one measurement of one server (`NaN` when it did not run). */
function medianOf(group: Record<string, Samples>, target: string, key: string): number {
  return median(group[target]?.[key] ?? []);
}

/** Builds the table of medians and checks every target of DESIGN.md §8 that the run measured. */
export function report(results: Results, options: Options, runtimes: Runtime[]): Report {
  const m = medianOf;
  const big = formatBytes(options.bigSize);
  const cold = formatBytes(options.coldSize);
  const names = runtimes.map((r) => r.name);
  const checks: Check[] = [];
  const check = (
    measure: string,
    runtime: RuntimeName,
    value: number,
    target: string,
    met: boolean,
    shown = fmt(value, 2),
  ) => {
    if (Number.isFinite(value)) checks.push({ measure, runtime, value, shown, target, met });
  };

  type Row = { label: string; nginx: string; cells: string[] };
  const rows: Row[] = [];
  /** A row: per runtime baseline, cache, ratio (cache / baseline or as given). */
  const row = (
    label: string,
    nginx: number,
    per: (rt: RuntimeName) => [number, number, number?],
    digits = 0,
    ratioDigits = 2,
  ) => {
    const cells: string[] = [];
    for (const rt of names) {
      const [base, cache, ratio] = per(rt);
      const r = ratio ?? cache / base;
      cells.push(fmt(base, digits), fmt(cache, digits), fmt(r, ratioDigits));
    }
    rows.push({ label, nginx: fmt(nginx, digits), cells });
  };
  const sec = options.sections;

  if (sec.has("hits")) {
    for (const [key, label] of [["oneClient", "1 client"], ["fourClients", "4 clients"]]) {
      const ng = m(results.hits, "nginx", key);
      row(`Hit ${big}, ${label}, MiB/s (base: raw)`, ng, (rt) => {
        const raw = m(results.hits, `${rt}-raw`, key);
        const cache = m(results.hits, `${rt}-cache`, key);
        check(`hit ${big}, ${label} / raw`, rt, cache / raw, "≥ 0.9", cache / raw >= 0.9);
        if (rt === "bun") {
          check(`hit ${big}, ${label} / nginx`, rt, cache / ng, "≥ 0.8", cache / ng >= 0.8);
        }
        return [raw, cache];
      });
    }
    row("Hit server CPU per GiB, s (1 client)", m(results.hits, "nginx", "cpuPerGiB"), (rt) => [
      m(results.hits, `${rt}-raw`, "cpuPerGiB"),
      m(results.hits, `${rt}-cache`, "cpuPerGiB"),
    ], 2);
  }
  if (sec.has("small")) {
    const ng = m(results.small, "nginx", "rps");
    row(`Small hits 64 KiB, wrk -c ${options.wrkConnections}, req/s (base: raw)`, ng, (rt) => {
      const raw = m(results.small, `${rt}-raw`, "rps");
      const cache = m(results.small, `${rt}-cache`, "rps");
      check("small hits, 64 KiB / raw", rt, cache / raw, "≥ 0.9", cache / raw >= 0.9);
      return [raw, cache];
    });
    row(
      "Small hits server CPU per request, µs (base: raw)",
      m(results.small, "nginx", "cpuUsPerRequest"),
      (rt) => [
        m(results.small, `${rt}-raw`, "cpuUsPerRequest"),
        m(results.small, `${rt}-cache`, "cpuUsPerRequest"),
      ],
    );
    row("Small hits p99 latency, ms (base: raw)", m(results.small, "nginx", "p99ms"), (rt) => [
      m(results.small, `${rt}-raw`, "p99ms"),
      m(results.small, `${rt}-cache`, "p99ms"),
    ], 2);
  }
  if (sec.has("hits")) {
    row(
      "Peak RSS during hits (1 and 4 clients), MiB",
      m(results.hits, "nginx", "peakRss") / MiB,
      (rt) => [
        m(results.hits, `${rt}-raw`, "peakRss") / MiB,
        m(results.hits, `${rt}-cache`, "peakRss") / MiB,
      ],
    );
  }
  if (sec.has("miss")) {
    const ng = m(results.miss, "nginx", "passThrough");
    row(`Miss ${big}: pass-through, MiB/s (nginx: proxy_cache 1st request)`, ng, (rt) => {
      const pass = m(results.miss, rt, "passThrough");
      return [pass, NaN, NaN];
    });
    const digests = [["md5", "MD5"], ["sha256", "SHA-256"]] as const;
    for (const [digest, label] of digests) {
      row(`Hashing ceiling ${label} (node:crypto, one core), MiB/s`, NaN, (rt) => [
        m(results.miss, rt, `${digest}Ceiling`),
        NaN,
        NaN,
      ]);
    }
    for (const [digest, label] of digests) {
      row(`Miss ${big}: fill with ${label}, MiB/s (base: min(hash, pass))`, NaN, (rt) => {
        const ceiling = m(results.miss, rt, `${digest}Ceiling`);
        const base = Math.min(ceiling, m(results.miss, rt, "passThrough"));
        const fill = m(results.miss, rt, `${digest}Fill`);
        check(
          `fill ${big}, ${label} / min(hash, pass)`,
          rt,
          fill / base,
          "≥ 0.8",
          fill / base >= 0.8,
        );
        return [base, fill];
      });
    }
    row("Server CPU per GiB, s: pass-through", NaN, (rt) => [
      m(results.miss, rt, "passCpuPerGiB"),
      NaN,
      NaN,
    ], 2);
    for (const [digest, label] of digests) {
      row(`CPU per GiB, s: ${label} alone (node:crypto)`, NaN, (rt) => [
        m(results.miss, rt, `${digest}HashCpuPerGiB`),
        NaN,
        NaN,
      ], 2);
    }
    for (const [digest, label] of digests) {
      row(`Server CPU per GiB, s: fill with ${label} (base: pass + hash)`, NaN, (rt) => {
        const base = m(results.miss, rt, "passCpuPerGiB") +
          m(results.miss, rt, `${digest}HashCpuPerGiB`);
        const fill = m(results.miss, rt, `${digest}CpuPerGiB`);
        const over = fill - base;
        check(
          `server CPU per GiB of a ${label} fill − (pass + hash)`,
          rt,
          over,
          "≤ 0.5 s",
          over <= 0.5,
          `${over >= 0 ? "+" : ""}${fmt(over, 2)} s`,
        );
        return [base, fill];
      }, 2);
    }
    row("Peak RSS during a fill (1 client), MiB", NaN, (rt) => {
      const peak = m(results.miss, rt, "peakRss") / MiB;
      check("peak RSS, a fill", rt, peak, "≤ 101 MiB", peak <= 101, `${fmt(peak)} MiB`);
      return [NaN, peak, NaN];
    });
  }
  if (sec.has("cold")) {
    const n = options.coldClients;
    row(`Cold start ${cold}: one client alone, s`, m(results.cold, "nginx", "single"), (rt) => [
      NaN,
      m(results.cold, rt, "single"),
      NaN,
    ], 2);
    const floor = m(results.cold, "nginx", "floor");
    row(
      `Cold start ${cold}: ${n} clients, last done, s (base: nginx floor)`,
      m(results.cold, "nginx", "last"),
      (rt) => {
        const last = m(results.cold, rt, "last");
        check(
          `cold start, ${n} clients: last / nginx floor`,
          rt,
          last / floor,
          "≤ 1.2",
          last / floor <= 1.2,
        );
        return [floor, last];
      },
      2,
    );
    row(
      `Cold start: images read from the origin (worst run)`,
      Math.max(...(results.cold.nginx?.originImages ?? [NaN])),
      (rt) => {
        const images = Math.max(...(results.cold[rt]?.originImages ?? [NaN]));
        check("cold start: origin reads", rt, images, "= 1", images === 1);
        return [NaN, images, NaN];
      },
      2,
    );
    row(
      `Peak RSS, cold start (${n} clients), MiB`,
      m(results.cold, "nginx", "peakRss") / MiB,
      (rt) => {
        const peak = m(results.cold, rt, "peakRss") / MiB;
        const limit = 100 + n;
        check(
          `peak RSS, cold start (${n} clients)`,
          rt,
          peak,
          `≤ ${limit} MiB`,
          peak <= limit,
          `${fmt(peak)} MiB`,
        );
        return [NaN, peak, NaN];
      },
    );
  }

  const header = ["Measurement", "nginx"];
  for (const rt of names) header.push(`${rt} base`, `${rt} cache`, `${rt} ×`);
  const lines = [
    `| ${header.join(" | ")} |`,
    `| ${header.map((_, i) => i === 0 ? "---" : "---:").join(" | ")} |`,
    ...rows.map((r) => `| ${[r.label, r.nginx, ...r.cells].join(" | ")} |`),
  ];
  const checkLines = checks.map((c) =>
    `- ${c.met ? "met" : "MISSED"}: ${c.runtime} ${c.measure} = ${c.shown} (target ${c.target})`
  );
  return { table: lines.join("\n"), checks, checkLines };
}

// ---------------------------------------------------------------------------
// docs/benchmarks.md and the README's headline

const BEGIN = "<!-- bench:begin -->";
const END = "<!-- bench:end -->";
const HEADLINE_BEGIN = "<!-- bench:headline:begin -->";
const HEADLINE_END = "<!-- bench:headline:end -->";

/** What the written figures say about the run. */
export interface RunFacts {
  command: string;
  date: string;
  seconds: number;
  machine: Machine;
  options: Options;
  notes: string[];
}

function describeRun(facts: RunFacts): string {
  const o = facts.options;
  const kind = o.quick ? "a quick run" : "a full run";
  const runs = o.runs === 1 ? "one run" : `medians of ${o.runs} runs`;
  return `${kind}: ${runs}, ${formatBytes(o.bigSize)} and ${
    formatBytes(o.coldSize)
  } images, ${o.coldClients} cold-start clients, ${o.wrkSeconds} s of wrk`;
}

/** `deno 2.9.6` → `Deno 2.9.6`, `node v24.1.0` → `Node 24.1.0`. */
function runtimeVersion(version: string): string {
  return version.replace(/^(\w)/, (c) => c.toUpperCase()).replace(/ v(\d)/, " $1");
}

/** `Deno / Bun / Node`. */
function runtimeNames(runtimes: Runtime[]): string {
  return runtimes.map((r) => runtimeVersion(r.name)).join(" / ");
}

/** The figures section of docs/benchmarks.md, between its markers. */
export function figuresMarkdown(result: Report, facts: RunFacts, runtimes: Runtime[]): string {
  const mc = facts.machine;
  const met = result.checks.filter((c) => c.met).length;
  const verdicts = result.checks.map((c) =>
    `| ${c.measure} | ${c.runtime} | ${c.shown} | ${c.target} | ${c.met ? "met" : "**missed**"} |`
  );
  const lines = [
    BEGIN,
    "<!-- Written by scripts/bench/bench.ts at the end of each run: edits here are overwritten. -->",
    "",
    `Last run: \`${facts.command}\` on ${facts.date.slice(0, 10)} (${describeRun(facts)}), ${
      Math.round(facts.seconds)
    } s.`,
    "",
    "| Machine | |",
    "| --- | --- |",
    `| CPU | ${mc.cpu}, ${mc.cores} cores |`,
    `| Memory | ${mc.memoryGiB} GiB |`,
    `| Kernel | Linux ${mc.kernel} |`,
    `| Load at start | ${mc.loadAtStart.map((l) => l.toFixed(2)).join(" ")} |`,
    `| Runtimes | ${runtimes.map((r) => runtimeVersion(r.version)).join(", ")} |`,
    `| References | ${mc.nginx.replace(/^nginx version: /, "")} (one worker, sendfile), wrk ${
      /\d+(\.\d+)+/.exec(mc.wrk)?.[0] ?? "–"
    } |`,
    "",
    "### Medians",
    "",
    result.table,
    "",
    '"base" is the baseline named in the row, measured in the same run; × = cache / base. The nginx',
    "column is nginx itself: sendfile for hits, `proxy_cache` for a miss, `proxy_cache_lock on` for",
    "the cold start.",
    "",
    "### Targets",
    "",
    `${met} of ${result.checks.length} checks met.`,
    "",
    "| Target (DESIGN.md §8) | Runtime | Measured | Target | Verdict |",
    "| --- | --- | ---: | --- | --- |",
    ...verdicts,
  ];
  lines.push(
    "| cluster, 3 nodes × 10 clients cold: origin bytes / image size | – | – | 1.0 | " +
      "`deno task bench:cluster`: [Cluster mode](#cluster-mode) |",
  );
  if (facts.notes.length > 0) {
    lines.push(
      "",
      "Notes of the run:",
      "",
      ...facts.notes.map((n) => `- ${n.replace(/\s+/g, " ")}`),
    );
  }
  lines.push(END);
  return lines.join("\n");
}

/** The README's five-line headline: hits, small hits, fills, cold start, verdicts. */
export function headlineMarkdown(
  results: Results,
  result: Report,
  facts: RunFacts,
  runtimes: Runtime[],
): string {
  const m = medianOf;
  const names = runtimes.map((r) => r.name);
  const order = runtimeNames(runtimes);
  const per = (f: (rt: RuntimeName) => number, digits = 2) =>
    names.map((rt) => fmt(f(rt), digits)).join(" / ");
  const o = facts.options;
  const big = formatBytes(o.bigSize);
  const cold = formatBytes(o.coldSize);
  const lines = [HEADLINE_BEGIN];
  if (o.sections.has("hits")) {
    lines.push(
      `- Hits, ${big}, 1 client: ${
        per((rt) =>
          m(results.hits, `${rt}-cache`, "oneClient") / m(results.hits, `${rt}-raw`, "oneClient")
        )
      } × the runtime's own file serving (${order}).`,
    );
  }
  if (o.sections.has("small")) {
    lines.push(
      `- Small hits, 64 KiB: ${
        per((rt) => m(results.small, `${rt}-cache`, "rps") / m(results.small, `${rt}-raw`, "rps"))
      } × raw req/s (${order}).`,
    );
  }
  if (o.sections.has("miss")) {
    lines.push(
      `- Fill of ${big} with MD5: ${per((rt) => m(results.miss, rt, "md5Fill"), 0)} MiB/s, ${
        per((rt) =>
          m(results.miss, rt, "md5Fill") /
          Math.min(m(results.miss, rt, "md5Ceiling"), m(results.miss, rt, "passThrough"))
        )
      } × min(hash, pass-through).`,
    );
  }
  if (o.sections.has("cold")) {
    const floor = m(results.cold, "nginx", "floor");
    lines.push(
      `- Cold start, ${o.coldClients} clients × ${cold}: one origin read; last client ${
        per((rt) => m(results.cold, rt, "last") / floor)
      } × nginx's floor.`,
    );
  }
  const met = result.checks.filter((c) => c.met).length;
  lines.push(
    `- ${met} of ${result.checks.length} target checks met on ${facts.machine.cores} cores (${
      facts.date.slice(0, 10)
    }${o.quick ? ", quick run" : ""}): [docs/benchmarks.md](docs/benchmarks.md).`,
    HEADLINE_END,
  );
  return lines.join("\n");
}

/** Replaces what lies between `begin` and `end` in `path` (markers included) by `block`. */
export async function replaceBetween(path: string, begin: string, end: string, block: string) {
  const text = await readFile(path, "utf8");
  const from = text.indexOf(begin);
  const to = text.indexOf(end, from);
  if (from === -1 || to === -1) {
    throw new Error(`Cannot write the figures: ${path} has no ${begin} ... ${end} section`);
  }
  await writeFile(path, text.slice(0, from) + block + text.slice(to + end.length));
}

/**
 * Writes the run's figures into docs/benchmarks.md and its headline into
 * README.md, then formats both with `deno fmt` (tables aligned, as
 * `deno fmt --check` wants them).
 */
export async function writeFigures(
  root: string,
  results: Results,
  result: Report,
  facts: RunFacts,
  runtimes: Runtime[],
): Promise<string[]> {
  const docs = `${root}/docs/benchmarks.md`;
  const readme = `${root}/README.md`;
  await replaceBetween(docs, BEGIN, END, figuresMarkdown(result, facts, runtimes));
  await replaceBetween(
    readme,
    HEADLINE_BEGIN,
    HEADLINE_END,
    headlineMarkdown(results, result, facts, runtimes),
  );
  const formatted = await run(Deno.execPath(), ["fmt", "--quiet", docs, readme], { cwd: root });
  if (formatted.code !== 0) throw new Error(`deno fmt failed: ${formatted.stderr}`);
  return [docs, readme];
}
