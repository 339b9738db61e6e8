/**
 * `deno task memory-check`: memory stays bounded (DESIGN.md invariant 5).
 *
 * Streams one uncached image (1 GiB by default) through the cache to 20
 * clients reading at different speeds (4 at full speed, 16 throttled from
 * 48 to 512 MiB/s, starting 100 ms apart, so most of them join the fill
 * late and trail it), then prints the peak resident memory of the server
 * process against its idle memory. Target: peak < idle + 150 MiB. Also
 * checks that every client got the whole body, that two of them (the first
 * and the slowest) got the right bytes, and that the image was committed.
 *
 * A script, not a test: it takes about half a minute and a few GiB of disk
 * and page cache. Exits 1 when the target is missed or a client failed.
 *
 * Usage: `deno task memory-check [--runtime deno|bun|node] [--size-mib N]
 * [--clients N] [--limit-mib N] [--verbose]`.
 *
 * @module
 */
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import {
  download,
  findRuntimes,
  formatBytes,
  MiB,
  prepareData,
  ROOT,
  rss,
  type RuntimeName,
  sleep,
  startBenchServer,
  warmPageCache,
  watchPeak,
  WORK,
} from "./lib.ts";

const USAGE = `deno task memory-check [options]

  --runtime NAME   deno (default), bun or node
  --size-mib N     size of the image (default 1024)
  --clients N      number of clients (default 20)
  --limit-mib N    allowed peak above idle (default 150)
  --verbose        also print process.memoryUsage() of the server at its highest RSS`;

function option(name: string, fallback: number): number {
  const i = Deno.args.indexOf(name);
  if (i === -1) return fallback;
  const value = Number(Deno.args[i + 1]);
  if (!Number.isInteger(value) || value <= 0) {
    throw new RangeError(
      `Cannot run memory-check: "${name}" must be a positive integer, received "${
        Deno.args[i + 1]
      }"`,
    );
  }
  return value;
}

const log = (line: string) => console.error(`[memory-check] ${line}`);

async function main(): Promise<number> {
  if (Deno.args.includes("--help")) {
    console.log(USAGE);
    return 0;
  }
  const runtimeIndex = Deno.args.indexOf("--runtime");
  const runtimeName = (runtimeIndex === -1 ? "deno" : Deno.args[runtimeIndex + 1]) as RuntimeName;
  if (!["deno", "bun", "node"].includes(runtimeName)) {
    throw new TypeError(
      `Cannot run memory-check: "--runtime" must be deno, bun or node, received "${runtimeName}"`,
    );
  }
  const size = option("--size-mib", 1024) * MiB;
  const clients = option("--clients", 20);
  const limit = option("--limit-mib", 150) * MiB;

  const [runtime] = await findRuntimes([runtimeName], log);
  if (runtime === undefined) throw new Error(`${runtimeName} is not available`);
  const [deno] = runtimeName === "deno" ? [runtime] : await findRuntimes(["deno"], log);
  const data = await prepareData({ big: size, small: 64 * 1024 }, log);
  await warmPageCache([join(data.dir, "big")]);

  // The origin: Deno serving the files raw, with Content-MD5.
  const origin = await startBenchServer(deno, { mode: "raw", data: data.dir });
  await mkdir(join(WORK, "caches"), { recursive: true });
  const dir = await mkdtemp(join(WORK, "caches", "memory-"));
  let server;
  try {
    // With --verbose the server reports process.memoryUsage(): keep the sample of highest RSS.
    const verbose = Deno.args.includes("--verbose");
    const memory = { rss: 0, sample: "" };
    server = await startBenchServer(
      runtime,
      { mode: "cache", cache: dir, origin: origin.url, memoryLog: verbose ? 50 : undefined },
      (line) => {
        const sample = JSON.parse(line.slice(4));
        if (sample.rss > memory.rss) Object.assign(memory, { rss: sample.rss, sample: line });
      },
    );
    const url = (id: string) => `${server!.url}/v2/images/${id}/file`;

    // Idle: after one small miss and one small hit, so the code paths are loaded.
    for (let i = 0; i < 2; i++) await download([url("small")]);
    await sleep(500);
    const idle = rss(server.pid);
    log(`${runtime.version}: idle RSS ${(idle / MiB).toFixed(1)} MiB; ${clients} clients ...`);

    // 4 at full speed, the others throttled from 48 to 512 MiB/s, 100 ms apart.
    const rates = Array.from({ length: clients }, (_, i) => {
      if (i < Math.min(4, clients)) return 0;
      const k = (i - 4) / Math.max(1, clients - 5);
      return Math.round(48 * MiB * Math.pow(512 / 48, 1 - k));
    });
    const delays = rates.map((_, i) => i * 100);
    const slowest = rates.indexOf(Math.min(...rates.filter((r) => r > 0)));
    const verify = rates.map((_, i) => i === 0 || i === slowest ? "md5" : "");
    const peak = watchPeak(server.pid);
    const started = performance.now();
    const { results } = await download(Array(clients).fill(url("big")), {
      rates,
      delays,
      verify,
      timeoutS: 600,
    });
    const seconds = (performance.now() - started) / 1000;
    const peakRss = peak.stop();

    const failures: string[] = [];
    results.forEach((r, i) => {
      if (r.status !== 200 || r.bytes !== size || !r.complete) {
        failures.push(`client ${i}: ${r.status}, ${r.bytes} bytes${r.error ? `, ${r.error}` : ""}`);
      }
      if (verify[i] && r.md5 !== data.digests.big.md5) {
        failures.push(`client ${i}: MD5 ${r.md5}, expected ${data.digests.big.md5}`);
      }
    });
    const head = await fetch(url("big"), { method: "HEAD" });
    await head.body?.cancel();
    const status = head.headers.get("cache-status") ?? "";
    if (!status.includes("hit")) failures.push(`image not committed: "${status}"`);

    const above = peakRss - idle;
    const met = above < limit && failures.length === 0;
    const summary = {
      date: new Date().toISOString(),
      runtime: runtime.version,
      image: size,
      clients,
      rates,
      idleRss: idle,
      peakRss,
      aboveIdle: above,
      limit,
      seconds,
      failures,
      met,
    };
    const outDir = join(ROOT, "bench-results");
    await mkdir(outDir, { recursive: true });
    const stamp = new Date().toISOString().replace(/[:.]/g, "-");
    await writeFile(
      join(outDir, `memory-check-${runtime.name}-${stamp}.json`),
      JSON.stringify(summary, null, 2),
    );

    const mib = (b: number) => `${(b / MiB).toFixed(1)} MiB`;
    console.log(
      `memory-check, ${runtime.version}: ${formatBytes(size)} image to ${clients} clients ` +
        `(4 at full speed, ${clients - 4} at 48-512 MiB/s) in ${seconds.toFixed(1)} s`,
    );
    console.log(`  idle RSS ${mib(idle)}, peak RSS ${mib(peakRss)}, above idle ${mib(above)}`);
    console.log(`  target: peak < idle + ${mib(limit)}: ${above < limit ? "met" : "MISSED"}`);
    if (verbose) console.log(`  at the highest RSS the runtime saw: ${memory.sample.slice(4)}`);
    for (const failure of failures) console.log(`  FAILED ${failure}`);
    if (failures.length === 0) {
      console.log(`  every client got ${formatBytes(size)}, 2 verified by MD5, image committed`);
    }
    return met ? 0 : 1;
  } finally {
    await server?.stop();
    await origin.stop();
    await rm(dir, { recursive: true, force: true });
  }
}

Deno.exit(await main());
