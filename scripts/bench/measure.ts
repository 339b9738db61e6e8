/**
 * The bench's measurements, each run in turn on every server under test so
 * that load from elsewhere on the machine hits them alike:
 *
 * - hits: one big image to 1 and 4 clients, with the server's CPU per GiB
 *   and its peak RSS; small hits with `wrk` (req/s, CPU per request, p99);
 * - the miss path: pass-through, a fill with MD5 and with SHA-256 (each on a
 *   fresh cache and a fresh server), the server's CPU per GiB of each, and
 *   the hash alone (its one-core ceiling and its own CPU per GiB);
 * - cold start: one client alone, then N clients at once on a fresh cache:
 *   time until the last is done, bytes read from the origin, peak RSS; and
 *   the nginx floor (the same bytes to N clients by sendfile from disk).
 *
 * @module
 */
import { mkdir, mkdtemp, rm } from "node:fs/promises";
import { join } from "node:path";
import {
  type BenchServer,
  cpuSeconds,
  download,
  type DownloadResult,
  fileSize,
  GiB,
  loggedBytes,
  MiB,
  type Nginx,
  ROOT,
  run,
  type Runtime,
  type RuntimeName,
  startBenchServer,
  watchPeak,
  WORK,
  wrk,
} from "./lib.ts";
import type { Options } from "./options.ts";

/** Samples of one measurement of one server. */
export type Samples = Record<string, number[]>;

export interface Results {
  meta: Record<string, unknown>;
  /** target name (`nginx`, `deno-raw`, `deno-cache`, ...) → samples. */
  hits: Record<string, Samples>;
  small: Record<string, Samples>;
  miss: Record<string, Samples>;
  cold: Record<string, Samples>;
  notes: string[];
}

export function push(samples: Record<string, Samples>, target: string, key: string, value: number) {
  ((samples[target] ??= {})[key] ??= []).push(value);
}

export const log = (line: string) => console.error(`[bench] ${line}`);

const mibps = (bytes: number, seconds: number) => bytes / MiB / seconds;

/** A server under test. */
export interface Target {
  name: string;
  url: string;
  pid: number;
}

export function imageUrl(base: string, id: string, query = ""): string {
  return `${base}/v2/images/${id}/file${query}`;
}

export function checkDownload(result: DownloadResult, size: number, what: string) {
  if (result.status !== 200 || result.bytes !== size || !result.complete) {
    throw new Error(
      `${what}: expected 200 and ${size} bytes, got ${result.status} and ${result.bytes}` +
        (result.error ? ` (${result.error})` : ""),
    );
  }
}

export async function cacheStatus(url: string): Promise<string> {
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
export async function measureHits(targets: Target[], options: Options, results: Results) {
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
    push(results.miss, runtime.name, "md5HashCpuPerGiB", ceiling.md5CpuPerGiB);
    push(results.miss, runtime.name, "sha256HashCpuPerGiB", ceiling.sha256CpuPerGiB);
  } catch {
    results.notes.push(`${runtime.name}: hashing ceiling failed: ${out.stderr.slice(-500)}`);
  }
}

/** 3: the miss path, every target once per run. */
export async function measureMiss(
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
          // Warm-up of the fill path (a 64 KiB fill), as the pass-through server had its own.
          const { results: [warm] } = await download([imageUrl(server.url, "small")]);
          checkDownload(warm, options.smallSize, `${name} ${digest} warm-up fill`);
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
export async function measureCold(
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
