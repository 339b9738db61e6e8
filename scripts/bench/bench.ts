/**
 * `deno task bench`: the cache's figures, side by side with nginx and each
 * runtime's own file serving, measured in one run on loopback, checked
 * against the targets of DESIGN.md §8 and written into docs/benchmarks.md.
 *
 * Every server is started here and stopped at the end: nginx (one worker,
 * sendfile) as the origin and as the reference, and per runtime (Deno, Bun,
 * Node) `server.ts` in three modes: `raw` (the runtime's own file serving),
 * `pass` (a Hono proxy without cache), `cache` (this middleware with a
 * `FileSystemStore`). What is measured and how: `measure.ts`; the table,
 * the targets and the figures written into the docs: `report.ts`; tools,
 * runtimes, processes and clients: `lib.ts`. Everything (each sample, the
 * machine, the versions) also goes to `bench-results/`.
 *
 * Usage: `deno task bench [--quick] [--runs N] [--runtimes deno,bun,node]
 * [--only hits,small,miss,cold] [--size-mib N] [--cold-mib N] [--clients N]
 * [--wrk-seconds N] [--no-install] [--no-nginx] [--no-docs]` (`--help` says more).
 *
 * @module
 */
import { mkdir, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import {
  type BenchServer,
  download,
  ensureTools,
  findRuntimes,
  GiB,
  type Nginx,
  prepareData,
  ROOT,
  run,
  type Runtime,
  type RuntimeName,
  startBenchServer,
  startNginx,
  warmPageCache,
  WORK,
} from "./lib.ts";
import {
  cacheStatus,
  checkDownload,
  imageUrl,
  log,
  measureCold,
  measureHits,
  measureMiss,
  type Results,
  type Target,
} from "./measure.ts";
import { parseOptions, SECTIONS, USAGE } from "./options.ts";
import { type Machine, report, writeFigures } from "./report.ts";

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
// Main

async function machine(tools: { nginx?: string }, runtimes: Runtime[]): Promise<Machine> {
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

  const result = report(results, options, runtimes);
  const seconds = (Date.now() - started) / 1000;
  results.meta.seconds = seconds;
  const summary = { ...results, table: result.table, checks: result.checks };
  const outDir = join(ROOT, "bench-results");
  await mkdir(outDir, { recursive: true });
  const stamp = new Date().toISOString().replace(/[:.]/g, "-");
  const file = join(outDir, `bench-${options.quick ? "quick-" : ""}${stamp}.json`);
  await writeFile(file, JSON.stringify(summary, null, 2));
  await writeFile(join(outDir, "latest.json"), JSON.stringify(summary, null, 2));

  const m = results.meta.machine as Machine;
  console.log(
    `\nhono-image-cache benchmark${
      options.quick ? " (--quick)" : ""
    }: medians of ${options.runs} run(s), ` +
      `${m.cpu}, ${m.cores} cores, ${m.memoryGiB} GiB, ${m.runtimes.join(", ")}, ` +
      `${m.nginx}; load at start ${m.loadAtStart.map((l) => l.toFixed(2)).join(" ")}\n`,
  );
  console.log(result.table);
  console.log(
    `\n"base" is the baseline named in the row, measured in this run; × = cache / base.\n`,
  );
  console.log(result.checkLines.join("\n"));
  for (const note of results.notes) console.log(`- note: ${note}`);

  // The docs hold the figures of a run that measured everything (a full or a quick run).
  const complete = failed.length === 0 && SECTIONS.every((s) => options.sections.has(s)) &&
    runtimes.length === 3 && useNginx;
  if (options.docs && complete) {
    const written = await writeFigures(ROOT, results, result, {
      command: results.meta.command as string,
      date: results.meta.date as string,
      seconds,
      machine: m,
      options,
      notes: results.notes,
    }, runtimes);
    console.log(`\nfigures written to ${written.join(" and ")}`);
  } else if (options.docs) {
    console.log(
      "\nfigures not written to docs/benchmarks.md: a section, a runtime or nginx was missing",
    );
  }
  console.log(`\n${Math.round(seconds)} s; results in ${file}`);
  return failed.length === 0 ? 0 : 1;
}

Deno.exit(await main());
