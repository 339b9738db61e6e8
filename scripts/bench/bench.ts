/**
 * `deno task bench`: the cache's figures, side by side with nginx and each
 * runtime's own file serving, measured in one run on loopback.
 *
 * 1. Hit throughput, one big image, 1 and 4 clients (`client.ts`).
 * 2. Small hits, 64 KiB, `wrk -c 32`: req/s and p99 latency.
 * 3. Miss path, one big image from an origin on loopback: pass-through vs
 *    our fill (write + MD5 / SHA-256) vs nginx `proxy_cache` on its first
 *    request; and the raw hashing speed (`node:crypto`) as the ceiling.
 * 4. Cold start: 50 clients ask for one uncached image at once: bytes read
 *    from the origin, time until the last client is done, vs one client
 *    alone and vs nginx `proxy_cache_lock on`.
 * 5. Peak RSS of the server process in 1 and 4.
 *
 * Every server is started here and stopped at the end: nginx (one worker,
 * sendfile) as the origin and as the reference, and per runtime (Deno, Bun,
 * Node) `scripts/bench/server.ts` in three modes: `raw` (the runtime's own
 * file serving), `pass` (a Hono proxy without cache), `cache` (this
 * middleware with a `FileSystemStore`). Prints one table of medians with
 * ratios against baselines measured in the same run, checks the targets, and
 * writes everything to `bench-results/`.
 *
 * Usage: `deno task bench [--quick] [--runs N] [--runtimes deno,bun,node]
 * [--only hits,small,miss,cold] [--size-mib N] [--cold-mib N] [--clients N]
 * [--wrk-seconds N] [--no-install] [--no-nginx]` (`--help` says more).
 *
 * @module
 */
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import {
  type BenchServer,
  cpuSeconds,
  download,
  type DownloadResult,
  ensureTools,
  fileSize,
  findRuntimes,
  formatBytes,
  GiB,
  loggedBytes,
  median,
  MiB,
  type Nginx,
  prepareData,
  ROOT,
  run,
  type Runtime,
  type RuntimeName,
  startBenchServer,
  startNginx,
  warmPageCache,
  watchPeak,
  WORK,
  wrk,
} from "./lib.ts";

// ---------------------------------------------------------------------------
// Options

const SECTIONS = ["hits", "small", "miss", "cold"] as const;
type Section = typeof SECTIONS[number];

interface Options {
  quick: boolean;
  runs: number;
  runtimes: RuntimeName[];
  sections: Set<Section>;
  install: boolean;
  nginx: boolean;
  bigSize: number;
  smallSize: number;
  coldSize: number;
  coldClients: number;
  wrkSeconds: number;
  wrkConnections: number;
}

function parseOptions(args: string[]): Options {
  const value = (name: string) => {
    const i = args.indexOf(name);
    if (i === -1) return undefined;
    const v = args[i + 1];
    if (v === undefined || v.startsWith("--")) {
      throw new TypeError(`Cannot run bench: "${name}" needs a value`);
    }
    return v;
  };
  const known = new Set([
    "--quick",
    "--runs",
    "--runtimes",
    "--only",
    "--no-install",
    "--no-nginx",
    "--size-mib",
    "--cold-mib",
    "--clients",
    "--wrk-seconds",
    "--help",
  ]);
  for (const arg of args) {
    if (arg.startsWith("--") && !known.has(arg)) {
      throw new TypeError(`Cannot run bench: unknown option "${arg}" (try --help)`);
    }
  }
  const number = (name: string, fallback: number) => {
    const v = value(name);
    if (v === undefined) return fallback;
    const n = Number(v);
    if (!Number.isInteger(n) || n <= 0) {
      throw new RangeError(
        `Cannot run bench: "${name}" must be a positive integer, received "${v}"`,
      );
    }
    return n;
  };
  const quick = args.includes("--quick");
  const runtimes = (value("--runtimes") ?? "deno,bun,node").split(",") as RuntimeName[];
  for (const r of runtimes) {
    if (!["deno", "bun", "node"].includes(r)) {
      throw new TypeError(`Cannot run bench: unknown runtime "${r}" (deno, bun, node)`);
    }
  }
  const only = (value("--only") ?? SECTIONS.join(",")).split(",") as Section[];
  for (const s of only) {
    if (!SECTIONS.includes(s)) {
      throw new TypeError(`Cannot run bench: unknown section "${s}" (${SECTIONS.join(", ")})`);
    }
  }
  return {
    quick,
    runs: number("--runs", quick ? 1 : 3),
    runtimes,
    sections: new Set(only),
    install: !args.includes("--no-install"),
    nginx: !args.includes("--no-nginx"),
    bigSize: number("--size-mib", quick ? 256 : 1024) * MiB,
    smallSize: 64 * 1024,
    coldSize: number("--cold-mib", quick ? 64 : 256) * MiB,
    coldClients: number("--clients", 50),
    wrkSeconds: number("--wrk-seconds", quick ? 2 : 5),
    wrkConnections: 32,
  };
}

const USAGE = `deno task bench [options]

  --quick               about a minute: 1 run, 256 MiB / 64 MiB images, 2 s of wrk
  --runs N              runs per measurement (default 3; medians are reported)
  --runtimes LIST       deno,bun,node (default: all three)
  --only LIST           hits,small,miss,cold (default: all)
  --size-mib N          the big image (default 1024)
  --cold-mib N          the cold-start image (default 256)
  --clients N           cold-start clients (default 50)
  --wrk-seconds N       duration of each wrk run (default 5)
  --no-install          do not apt-get install nginx / wrk when missing
  --no-nginx            skip the nginx reference`;

// ---------------------------------------------------------------------------
// Results

/** Samples of one measurement of one server. */
type Samples = Record<string, number[]>;

interface Results {
  meta: Record<string, unknown>;
  /** target name (`nginx`, `deno-raw`, `deno-cache`, ...) → samples. */
  hits: Record<string, Samples>;
  small: Record<string, Samples>;
  miss: Record<string, Samples>;
  cold: Record<string, Samples>;
  notes: string[];
}

function push(samples: Record<string, Samples>, target: string, key: string, value: number) {
  ((samples[target] ??= {})[key] ??= []).push(value);
}

const log = (line: string) => console.error(`[bench] ${line}`);

const mibps = (bytes: number, seconds: number) => bytes / MiB / seconds;

// ---------------------------------------------------------------------------
// Measurements

/** A server under test. */
interface Target {
  name: string;
  url: string;
  pid: number;
}

function imageUrl(base: string, id: string, query = ""): string {
  return `${base}/v2/images/${id}/file${query}`;
}

function checkDownload(result: DownloadResult, size: number, what: string) {
  if (result.status !== 200 || result.bytes !== size || !result.complete) {
    throw new Error(
      `${what}: expected 200 and ${size} bytes, got ${result.status} and ${result.bytes}` +
        (result.error ? ` (${result.error})` : ""),
    );
  }
}

async function cacheStatus(url: string): Promise<string> {
  const res = await fetch(url, { method: "HEAD" });
  await res.body?.cancel();
  return res.headers.get("cache-status") ?? "";
}

/** `list` rotated by `r`, so no target is always measured first. */
function rotate<T>(list: T[], r: number): T[] {
  const k = r % Math.max(1, list.length);
  return [...list.slice(k), ...list.slice(0, k)];
}

/** 1, 2 and 5: hit throughput, small hits, peak RSS; targets interleaved run by run. */
async function measureHits(targets: Target[], options: Options, results: Results) {
  const sizes = { big: options.bigSize, small: options.smallSize };
  for (const target of targets) {
    // Warm-up: JIT, page cache, connection paths; and a check that the answers are right.
    for (const id of ["big", "small"] as const) {
      const { results: [result] } = await download([imageUrl(target.url, id)]);
      checkDownload(result, sizes[id], `${target.name} ${id}`);
      if (target.name.endsWith("-cache") && !result.headers["cache-status"]?.includes("hit")) {
        throw new Error(`${target.name} did not answer a hit: ${result.headers["cache-status"]}`);
      }
    }
  }
  const peaks: Record<string, number> = {};
  if (options.sections.has("hits")) {
    for (let r = 0; r < options.runs; r++) {
      log(`hits: run ${r + 1}/${options.runs}`);
      for (const target of rotate(targets, r)) {
        const big = imageUrl(target.url, "big");
        const peak = watchPeak(target.pid);
        const cpu = cpuSeconds(target.pid);
        const one = await download([big]);
        const cpuPerGiB = (cpuSeconds(target.pid) - cpu) / (options.bigSize / GiB);
        push(results.hits, target.name, "cpuPerGiB", cpuPerGiB);
        checkDownload(one.results[0], options.bigSize, `${target.name} hit`);
        push(results.hits, target.name, "oneClient", mibps(options.bigSize, one.wall));
        const four = await download([big, big, big, big]);
        for (const d of four.results) checkDownload(d, options.bigSize, `${target.name} hit`);
        push(results.hits, target.name, "fourClients", mibps(4 * options.bigSize, four.wall));
        peaks[target.name] = Math.max(peaks[target.name] ?? 0, peak.stop());
      }
    }
    for (const [name, peak] of Object.entries(peaks)) push(results.hits, name, "peakRss", peak);
  }
  if (options.sections.has("small")) {
    const params = { connections: options.wrkConnections, threads: 2 };
    for (const target of targets) {
      await wrk(imageUrl(target.url, "small"), { ...params, seconds: 1 });
    }
    for (let r = 0; r < options.runs; r++) {
      log(`small hits: run ${r + 1}/${options.runs}`);
      for (const target of rotate(targets, r)) {
        const cpu = cpuSeconds(target.pid);
        const result = await wrk(imageUrl(target.url, "small"), {
          ...params,
          seconds: options.wrkSeconds,
        });
        if (result.errors > 0) {
          results.notes.push(`${target.name}: wrk saw ${result.errors} errors or non-2xx answers`);
        }
        const requests = result.rps * options.wrkSeconds;
        push(
          results.small,
          target.name,
          "cpuUsPerRequest",
          (cpuSeconds(target.pid) - cpu) * 1e6 / requests,
        );
        push(results.small, target.name, "rps", result.rps);
        push(results.small, target.name, "p99ms", result.p99ms);
      }
    }
  }
}

async function freshCacheDir(): Promise<string> {
  await mkdir(join(WORK, "caches"), { recursive: true });
  return await mkdtemp(join(WORK, "caches", "run-"));
}

/**
 * Runs `fn` against a cache server on a fresh, empty cache directory, and
 * removes both afterwards.
 */
async function withFreshCache<T>(
  runtime: Runtime,
  config: Record<string, unknown>,
  fn: (server: BenchServer) => Promise<T>,
): Promise<T> {
  const dir = await freshCacheDir();
  const server = await startBenchServer(runtime, { ...config, mode: "cache", cache: dir });
  try {
    return await fn(server);
  } catch (error) {
    throw new Error(`${error}\n${runtime.name} server stderr:\n${server.stderr()}`);
  } finally {
    await server.stop();
    await rm(dir, { recursive: true, force: true });
  }
}

async function hashCeiling(runtime: Runtime, options: Options, results: Results) {
  const out = await run(
    runtime.command,
    [...runtime.args, runtime.script("hash"), String(options.bigSize / MiB)],
    { cwd: ROOT, timeoutMs: 120_000 },
  );
  try {
    const ceiling = JSON.parse(out.stdout.trim().split("\n").pop() ?? "");
    push(results.miss, runtime.name, "md5Ceiling", ceiling.md5);
    push(results.miss, runtime.name, "sha256Ceiling", ceiling.sha256);
  } catch {
    results.notes.push(`${runtime.name}: hashing ceiling failed: ${out.stderr.slice(-500)}`);
  }
}

/** 3: the miss path, every target once per run. */
async function measureMiss(
  runtimes: Runtime[],
  passServers: Map<RuntimeName, BenchServer>,
  nginx: Nginx | undefined,
  origin: string,
  options: Options,
  results: Results,
) {
  const size = options.bigSize;
  for (let r = 0; r < options.runs; r++) {
    log(`miss: run ${r + 1}/${options.runs}`);
    if (nginx) {
      const base = `http://127.0.0.1:${nginx.ports.proxy}`;
      const url = imageUrl(base, "big", `?miss=${crypto.randomUUID()}`);
      const { results: [result] } = await download([url]);
      checkDownload(result, size, "nginx proxy_cache miss");
      if (result.headers["x-cache-status"] !== "MISS") {
        results.notes.push(`nginx: first request was ${result.headers["x-cache-status"]}`);
      }
      push(results.miss, "nginx", "passThrough", mibps(size, result.seconds));
    }
    for (const runtime of rotate(runtimes, r)) {
      const name = runtime.name;
      await hashCeiling(runtime, options, results);
      const passServer = passServers.get(name)!;
      const cpu = cpuSeconds(passServer.pid);
      const { results: [pass] } = await download([imageUrl(passServer.url, "big")]);
      push(results.miss, name, "passCpuPerGiB", (cpuSeconds(passServer.pid) - cpu) / (size / GiB));
      checkDownload(pass, size, `${name} pass-through`);
      push(results.miss, name, "passThrough", mibps(size, pass.seconds));
      for (const digest of ["md5", "sha256"] as const) {
        await withFreshCache(runtime, { origin, digest }, async (server) => {
          const peak = watchPeak(server.pid);
          const cpu = cpuSeconds(server.pid);
          const { results: [fill] } = await download([imageUrl(server.url, "big")]);
          const cpuPerGiB = (cpuSeconds(server.pid) - cpu) / (size / GiB);
          push(results.miss, name, `${digest}CpuPerGiB`, cpuPerGiB);
          push(results.miss, name, "peakRss", peak.stop());
          checkDownload(fill, size, `${name} ${digest} fill`);
          const status = await cacheStatus(imageUrl(server.url, "big"));
          if (!status.includes("hit")) {
            throw new Error(`${name} ${digest} fill was not committed: "${status}"`);
          }
          push(results.miss, name, `${digest}Fill`, mibps(size, fill.seconds));
        });
      }
    }
  }
}

/** 4: cold start, one client alone then `coldClients` at once, every target once per run. */
async function measureCold(
  runtimes: Runtime[],
  nginx: Nginx | undefined,
  origin: string,
  originLog: string,
  options: Options,
  results: Results,
) {
  const size = options.coldSize;
  const n = options.coldClients;
  for (let r = 0; r < options.runs; r++) {
    log(`cold start: run ${r + 1}/${options.runs}`);
    if (nginx) {
      const base = `http://127.0.0.1:${nginx.ports.proxy}`;
      const { results: [single] } = await download([
        imageUrl(base, "mid", `?cold=${crypto.randomUUID()}`),
      ]);
      checkDownload(single, size, "nginx cold start");
      push(results.cold, "nginx", "single", single.seconds);
      // The delivery floor: the same bytes to the same clients, from nginx, already on disk.
      const floor = await download(
        Array(n).fill(imageUrl(`http://127.0.0.1:${nginx.ports.static}`, "mid")),
      );
      for (const d of floor.results) checkDownload(d, size, "nginx static, cold start floor");
      push(results.cold, "nginx", "floor", floor.wall);
      const url = imageUrl(base, "mid", `?cold=${crypto.randomUUID()}`);
      const before = await fileSize(originLog);
      const peak = watchPeak(nginx.pid);
      const many = await download(Array(n).fill(url));
      push(results.cold, "nginx", "peakRss", peak.stop());
      for (const d of many.results) checkDownload(d, size, "nginx cold start");
      push(results.cold, "nginx", "last", many.wall);
      const fromOrigin = await loggedBytes(originLog, before);
      push(results.cold, "nginx", "originImages", fromOrigin.bytes / size);
    }
    for (const runtime of rotate(runtimes, r)) {
      const name = runtime.name;
      await withFreshCache(runtime, { origin }, async (server) => {
        const { results: [single] } = await download([imageUrl(server.url, "mid")]);
        checkDownload(single, size, `${name} cold start, one client`);
        push(results.cold, name, "single", single.seconds);
      });
      await withFreshCache(runtime, { origin }, async (server) => {
        const before = await fileSize(originLog);
        const peak = watchPeak(server.pid);
        const many = await download(Array(n).fill(imageUrl(server.url, "mid")));
        push(results.cold, name, "peakRss", peak.stop());
        for (const d of many.results) checkDownload(d, size, `${name} cold start`);
        push(results.cold, name, "last", many.wall);
        const fromOrigin = await loggedBytes(originLog, before);
        push(results.cold, name, "originImages", fromOrigin.bytes / size);
      });
    }
  }
}

// ---------------------------------------------------------------------------
// nginx configurations

function originServer(data: string, digests: Record<string, { md5: string; sha256: string }>) {
  const locations = Object.entries(digests).map(([id, d]) =>
    `    location = /v2/images/${id}/file {
      alias ${data}/${id};
      add_header Content-MD5 ${d.md5};
      add_header X-Image-Sha256 ${d.sha256};
    }`
  );
  return `    access_log ${WORK}/nginx-origin/origin.log bytes;\n${locations.join("\n")}`;
}

const STATIC_SERVER = (data: string) =>
  `    location ~ ^/v2/images/(?<id>[A-Za-z0-9_-]+)/file$ { alias ${data}/$id; }`;

const PROXY_SERVER = (originPort: number) =>
  `    location / {
      proxy_pass http://127.0.0.1:${originPort};
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_cache bench;
      proxy_cache_valid 200 1h;
      proxy_cache_lock on;
      proxy_cache_lock_timeout 120s;
      proxy_cache_lock_age 120s;
      proxy_buffer_size 256k;
      proxy_buffers 8 256k;
      proxy_busy_buffers_size 512k;
      add_header X-Cache-Status $upstream_cache_status;
    }`;

// ---------------------------------------------------------------------------
// The table

function fmt(value: number, digits = 0): string {
  if (!Number.isFinite(value)) return "–";
  return value.toLocaleString("en-US", {
    maximumFractionDigits: digits,
    minimumFractionDigits: digits,
  });
}

interface Check {
  what: string;
  value: number;
  target: string;
  met: boolean;
}

function report(results: Results, options: Options, runtimes: Runtime[]) {
  const m = (group: Record<string, Samples>, target: string, key: string) =>
    median(group[target]?.[key] ?? []);
  const big = formatBytes(options.bigSize);
  const cold = formatBytes(options.coldSize);
  const names = runtimes.map((r) => r.name);
  const checks: Check[] = [];
  const check = (what: string, value: number, target: string, met: boolean) => {
    if (Number.isFinite(value)) checks.push({ what, value, target, met });
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
        check(`${rt} hit ${label}: cache / raw`, cache / raw, "≥ 0.9", cache / raw >= 0.9);
        if (rt === "bun") {
          check(`bun hit ${label}: cache / nginx`, cache / ng, "≥ 0.8", cache / ng >= 0.8);
        }
        return [raw, cache];
      });
    }
  }
  if (sec.has("hits")) {
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
      check(`${rt} small hits: cache / raw`, cache / raw, "≥ 0.9", cache / raw >= 0.9);
      if (rt === "bun") {
        check("bun small hits: cache / nginx", cache / ng, "≥ 0.8", cache / ng >= 0.8);
      }
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
      (rt) => {
        const cache = m(results.hits, `${rt}-cache`, "peakRss") / MiB;
        check(`${rt} peak RSS, hits (4 clients)`, cache, "≤ 104 MiB", cache <= 104);
        return [m(results.hits, `${rt}-raw`, "peakRss") / MiB, cache];
      },
    );
  }
  if (sec.has("miss")) {
    const ng = m(results.miss, "nginx", "passThrough");
    row(`Miss ${big}: pass-through, MiB/s (nginx: proxy_cache 1st request)`, ng, (rt) => {
      const pass = m(results.miss, rt, "passThrough");
      return [pass, NaN, NaN];
    });
    for (const [digest, label] of [["md5", "MD5"], ["sha256", "SHA-256"]]) {
      row(`Miss ${big}: fill with ${label}, MiB/s (base: min(hash, pass))`, NaN, (rt) => {
        const ceiling = m(results.miss, rt, `${digest}Ceiling`);
        const base = Math.min(ceiling, m(results.miss, rt, "passThrough"));
        const fill = m(results.miss, rt, `${digest}Fill`);
        check(
          `${rt} miss ${label}: fill / min(hash, pass)`,
          fill / base,
          "≥ 0.8",
          fill / base >= 0.8,
        );
        return [base, fill];
      });
    }
    for (const [digest, label] of [["md5", "MD5"], ["sha256", "SHA-256"]]) {
      row(`Hashing ceiling ${label} (node:crypto), MiB/s`, NaN, (rt) => [
        m(results.miss, rt, `${digest}Ceiling`),
        NaN,
        NaN,
      ]);
    }
    row("Server CPU per GiB, s: pass-through (base) vs fill with MD5", NaN, (rt) => [
      m(results.miss, rt, "passCpuPerGiB"),
      m(results.miss, rt, "md5CpuPerGiB"),
    ], 2);
    row(
      "Peak RSS during a fill, MiB",
      NaN,
      (rt) => [NaN, m(results.miss, rt, "peakRss") / MiB, NaN],
    );
  }
  if (sec.has("cold")) {
    const n = options.coldClients;
    const ngLast = m(results.cold, "nginx", "last");
    row(`Cold start ${cold}: ${n} clients, last done, s (base: 1 client)`, ngLast, (rt) => {
      const single = m(results.cold, rt, "single");
      const last = m(results.cold, rt, "last");
      check(`${rt} cold start: last / single client`, last / single, "≤ 1.3", last / single <= 1.3);
      check(`${rt} cold start: last / nginx last`, last / ngLast, "< 1", last < ngLast);
      return [single, last];
    }, 2);
    const floor = m(results.cold, "nginx", "floor");
    row(
      `Cold start floor: nginx sendfile, ${n} clients, image already on disk, s`,
      floor,
      (rt) => [floor, m(results.cold, rt, "last")],
      2,
    );
    row(
      `Cold start: images read from the origin`,
      m(results.cold, "nginx", "originImages"),
      (rt) => {
        const images = Math.max(...(results.cold[rt]?.originImages ?? [NaN]));
        check(`${rt} cold start: origin reads (worst run)`, images, "= 1", images === 1);
        return [NaN, images, NaN];
      },
      2,
    );
    row(
      `Peak RSS, cold start (${n} clients), MiB`,
      m(results.cold, "nginx", "peakRss") / MiB,
      (rt) => {
        const peak = m(results.cold, rt, "peakRss") / MiB;
        check(`${rt} peak RSS, cold start`, peak, `≤ ${100 + n} MiB`, peak <= 100 + n);
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
    `- ${c.met ? "met" : "MISSED"}: ${c.what} = ${fmt(c.value, 2)} (target ${c.target})`
  );
  return { table: lines.join("\n"), checks, checkLines };
}

// ---------------------------------------------------------------------------
// Main

async function machine(tools: { nginx?: string }, runtimes: Runtime[]) {
  const cpuinfo = await Deno.readTextFile("/proc/cpuinfo").catch(() => "");
  const cpu = /model name\s*:\s*(.+)/.exec(cpuinfo)?.[1] ?? "unknown CPU";
  const nginx = tools.nginx ? (await run(tools.nginx, ["-v"])).stderr.trim() : "none";
  return {
    cpu,
    cores: navigator.hardwareConcurrency,
    memoryGiB: Math.round(Deno.systemMemoryInfo().total / GiB),
    kernel: Deno.osRelease(),
    loadAtStart: Deno.loadavg(),
    runtimes: runtimes.map((r) => r.version),
    nginx,
    wrk: (await run("wrk", ["-v"])).stdout.split("\n")[0].trim(),
  };
}

async function main() {
  const args = Deno.args;
  if (args.includes("--help")) {
    console.log(USAGE);
    return 0;
  }
  const options = parseOptions(args);
  const started = Date.now();
  const tools = await ensureTools(options.install, log);
  const useNginx = options.nginx && tools.nginx !== undefined;
  if (!tools.nginx) log("nginx not found: no nginx reference, origin is Deno");
  if (!tools.wrk && options.sections.has("small")) {
    log("wrk not found: small hits skipped");
    options.sections.delete("small");
  }
  const runtimes = await findRuntimes(options.runtimes, log);
  const data = await prepareData(
    { big: options.bigSize, small: options.smallSize, mid: options.coldSize },
    log,
  );
  await warmPageCache(Object.keys(data.sizes).map((id) => join(data.dir, id)));
  const results: Results = {
    meta: {
      date: new Date().toISOString(),
      command: `deno task bench ${args.join(" ")}`.trim(),
      options: { ...options, sections: [...options.sections] },
      machine: await machine(tools, runtimes),
    },
    hits: {},
    small: {},
    miss: {},
    cold: {},
    notes: [],
  };
  log(`machine: ${JSON.stringify(results.meta.machine)}`);

  const stops: (() => Promise<void>)[] = [];
  const failed: string[] = [];
  const cleanup = async () => {
    for (const stop of stops.reverse()) await stop().catch(() => {});
    stops.length = 0;
  };
  const onSignal = () => {
    cleanup().finally(() => Deno.exit(130));
  };
  Deno.addSignalListener("SIGINT", onSignal);
  try {
    // The origin: nginx with sendfile (fast enough never to be the bottleneck), else Deno raw.
    let origin: string;
    let originLog = "";
    let nginxOrigin: Nginx | undefined;
    if (tools.nginx) {
      const dir = join(WORK, "nginx-origin");
      await rm(dir, { recursive: true, force: true });
      nginxOrigin = await startNginx(tools.nginx, dir, {
        origin: originServer(data.dir, data.digests),
      });
      stops.push(() => nginxOrigin!.stop());
      origin = `http://127.0.0.1:${nginxOrigin.ports.origin}`;
      originLog = join(dir, "origin.log");
    } else {
      const deno = runtimes.find((r) => r.name === "deno") ??
        (await findRuntimes(["deno"], log))[0];
      const raw = await startBenchServer(deno, { mode: "raw", data: data.dir });
      stops.push(() => raw.stop());
      origin = raw.url;
    }

    let nginx: Nginx | undefined;
    if (useNginx) {
      const dir = join(WORK, "nginx");
      await rm(dir, { recursive: true, force: true });
      nginx = await startNginx(
        tools.nginx!,
        dir,
        {
          static: STATIC_SERVER(data.dir),
          proxy: PROXY_SERVER(nginxOrigin!.ports.origin),
        },
        `  proxy_cache_path ${dir}/cache levels=1:2 keys_zone=bench:10m max_size=100g ` +
          `inactive=1h use_temp_path=off;`,
      );
      stops.push(async () => {
        await nginx!.stop();
        await rm(dir, { recursive: true, force: true });
      });
    }

    /** Runs one section; a failure is reported and the other sections still run. */
    const section = async (name: string, fn: () => Promise<void>) => {
      const mark = stops.length;
      try {
        await fn();
      } catch (error) {
        failed.push(name);
        const message = error instanceof Error ? error.message : String(error);
        results.notes.push(`${name} failed: ${message.slice(0, 2000)}`);
        log(`${name} FAILED: ${message}`);
      } finally {
        // Stop the section's own servers: idle, but they hold memory.
        for (const stop of stops.splice(mark).reverse()) await stop().catch(() => {});
      }
    };

    if (options.sections.has("hits") || options.sections.has("small")) {
      await section("hits", async () => {
        // One cache directory filled once, by the first runtime, then served by every runtime.
        const hitDir = join(WORK, "caches", "hits");
        await rm(hitDir, { recursive: true, force: true });
        await mkdir(hitDir, { recursive: true });
        stops.push(() => rm(hitDir, { recursive: true, force: true }));
        const filler = runtimes[0];
        log(`filling the hit cache with ${filler.name} ...`);
        const fill = await startBenchServer(filler, { mode: "cache", cache: hitDir, origin });
        try {
          for (const id of ["big", "small"]) {
            const { results: [result] } = await download([imageUrl(fill.url, id)]);
            checkDownload(result, data.sizes[id], `fill ${id}`);
            const status = await cacheStatus(imageUrl(fill.url, id));
            if (!status.includes("hit")) {
              throw new Error(`fill of ${id} not committed: ${status}\n${fill.stderr()}`);
            }
          }
        } finally {
          await fill.stop();
        }
        await warmPageCache([join(hitDir, "big"), join(hitDir, "small")]);

        const targets: Target[] = [];
        if (nginx) {
          targets.push({
            name: "nginx",
            url: `http://127.0.0.1:${nginx.ports.static}`,
            pid: nginx.pid,
          });
        }
        for (const runtime of runtimes) {
          const raw = await startBenchServer(runtime, { mode: "raw", data: data.dir });
          stops.push(() => raw.stop());
          const cache = await startBenchServer(runtime, { mode: "cache", cache: hitDir, origin });
          stops.push(() => cache.stop());
          targets.push({ name: `${runtime.name}-raw`, url: raw.url, pid: raw.pid });
          targets.push({ name: `${runtime.name}-cache`, url: cache.url, pid: cache.pid });
        }
        await measureHits(targets, options, results);
      });
    }

    if (options.sections.has("miss")) {
      await section("miss", async () => {
        const passServers = new Map<RuntimeName, BenchServer>();
        for (const runtime of runtimes) {
          const pass = await startBenchServer(runtime, { mode: "pass", origin });
          stops.push(() => pass.stop());
          passServers.set(runtime.name, pass);
          // Warm-up of the proxy path.
          const { results: [warm] } = await download([imageUrl(pass.url, "small")]);
          checkDownload(warm, options.smallSize, `${runtime.name} pass-through`);
        }
        await measureMiss(runtimes, passServers, nginx, origin, options, results);
      });
    }

    if (options.sections.has("cold")) {
      if (!originLog) {
        results.notes.push("cold start needs the nginx origin (to count its bytes): skipped");
      } else {
        await section(
          "cold",
          () => measureCold(runtimes, nginx, origin, originLog, options, results),
        );
      }
    }
  } finally {
    await cleanup();
    await rm(join(WORK, "caches"), { recursive: true, force: true });
    Deno.removeSignalListener("SIGINT", onSignal);
  }

  const { table, checks, checkLines } = report(results, options, runtimes);
  const seconds = (Date.now() - started) / 1000;
  results.meta.seconds = seconds;
  const summary = { ...results, table, checks };
  const outDir = join(ROOT, "bench-results");
  await mkdir(outDir, { recursive: true });
  const stamp = new Date().toISOString().replace(/[:.]/g, "-");
  const file = join(outDir, `bench-${options.quick ? "quick-" : ""}${stamp}.json`);
  await writeFile(file, JSON.stringify(summary, null, 2));
  await writeFile(join(outDir, "latest.json"), JSON.stringify(summary, null, 2));

  const m = results.meta.machine as Record<string, unknown>;
  console.log(
    `\nhono-image-cache benchmark${
      options.quick ? " (--quick)" : ""
    }: medians of ${options.runs} run(s), ` +
      `${m.cpu}, ${m.cores} cores, ${m.memoryGiB} GiB, ${(m.runtimes as string[]).join(", ")}, ` +
      `${m.nginx}; load at start ${
        (m.loadAtStart as number[]).map((l) => l.toFixed(2)).join(" ")
      }\n`,
  );
  console.log(table);
  console.log(
    `\n"base" is the same runtime's baseline measured in this run; × = cache / base ` +
      `(cold start: last client / one client alone).\n`,
  );
  console.log(checkLines.join("\n"));
  for (const note of results.notes) console.log(`- note: ${note}`);
  console.log(`\n${Math.round(seconds)} s; results in ${file}`);
  return failed.length === 0 ? 0 : 1;
}

Deno.exit(await main());
