/**
 * `deno task soak`: a seeded, randomized workload against real server
 * processes that share one cache directory, with an origin that fails in
 * every way it can, a store that fails at random, `SIGKILL`s at random
 * moments and restarts, judged by an oracle (DESIGN.md §4).
 *
 * ```sh
 * npx -y deno task soak --quick              # about one minute (CI)
 * npx -y deno task soak --duration 30m --seed 42
 * ```
 *
 * The parts: `options.ts` (the command line), `data.ts` (seeded images and
 * ids), `origin.ts` (the lying origin), `server.ts` and `store.ts` (one
 * server process and its fault-injecting store), `cluster.ts` (the server
 * processes: start, kill, restart, memory), `workload.ts` (the clients and
 * request shapes), `oracle.ts` (what each answer and the directory may be),
 * `report.ts` (counts, violations, summary).
 *
 * `--cluster` runs the servers as a cluster (DESIGN.md §7): a directory
 * each, one throwaway PostgreSQL (tests/_postgres.ts) as the index, nodes
 * filling from each other, deletes reaching every node, and the database
 * stopped (immediate mode, as a crash) and started again during the traffic.
 *
 * Prints counts (requests, bytes, faults by kind, kills, violations) and
 * exits with 1 on any violation, printing the seed to replay it (the same
 * seed gives the same images and the same random choices; the timing of a
 * run, and so its interleavings, differ). Exits with 2 when the harness
 * itself fails. Loopback only; the temporary directory and every child
 * process are removed on exit, interrupted or not (killed with SIGKILL, the
 * soak leaves its temporary directory; its servers exit when their stdin
 * closes).
 *
 * @module
 */
import { mkdir, mkdtemp, readdir, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Cluster, HarnessError, mountTmpfs, nodeServer, sleep, unmount } from "./cluster.ts";
import { makeCatalog, Rng } from "./data.ts";
import { checkDirectory, type DirectoryMemory, type World } from "./oracle.ts";
import { MiB, parseArgs, type SoakOptions } from "./options.ts";
import { SoakOrigin } from "./origin.ts";
import { Ledger, printSummary } from "./report.ts";
import { NO_STORE_FAULTS } from "./store.ts";
import { Workload } from "./workload.ts";
import { startPostgres, type TestPostgres } from "../../tests/_postgres.ts";

/** After the database is back, how long the nodes may take to reconnect and resync, ms. */
const RECONNECT_SLACK = 5_000;

async function main(): Promise<number> {
  let options: SoakOptions;
  try {
    options = parseArgs(Deno.args);
  } catch (error) {
    console.error(String((error as Error).message));
    return 2;
  }
  const rng = new Rng(options.seed);
  const started = Date.now();
  const elapsed = () => ((Date.now() - started) / 1000).toFixed(1) + "s";
  const log = (line: string) => console.log(`[soak ${elapsed()}] ${line}`);
  log(
    `seed ${options.seed}, ${
      options.duration / 1000
    }s, ${options.servers} servers, ${options.clients} clients` +
      (options.quick ? " (quick)" : ""),
  );

  const catalog = makeCatalog(rng.fork(), { count: options.images, largest: options.largest });
  const maxSize = Math.floor(catalog.totalSize * 0.5);
  log(
    `${catalog.images.length} images, ${(catalog.totalSize / MiB).toFixed(1)} MiB in all; maxSize ${
      (maxSize / MiB).toFixed(1)
    } MiB`,
  );

  const root = await mkdtemp(join(tmpdir(), "hono-image-cache-soak-"));
  // The Node servers' bundle, outside the directories the soak checks.
  const bundleDir = await mkdtemp(join(tmpdir(), "hono-image-cache-soak-bundle-"));
  const directory = join(root, "cache");
  const origin = new SoakOrigin({
    catalog,
    rng: rng.fork(),
    faultRate: options.originFaults,
    maxStall: options.quick ? 3000 : 6000,
    maxSlow: 3000,
  });
  const ledger = new Ledger(started, log, options.verbose);
  const cluster = new Cluster({
    servers: options.servers,
    seed: options.seed,
    ledger,
    log,
    verbose: options.verbose,
    server: options.runtime === "node" ? await nodeServer(bundleDir) : undefined,
  });
  if (options.runtime === "node") log("servers on Node (a bundle of scripts/soak/server.ts)");
  /** Cluster mode: when the database was down, `to` being when it was back plus the slack. */
  const databaseDown: { from: number; to: number }[] = [];
  const world: World = {
    cluster: options.cluster,
    servers: options.servers,
    downBetween: (index, from, to) => cluster.downBetween(index, from, to),
    databaseDownBetween: (from, to) => databaseDown.some((d) => d.from <= to && d.to >= from),
    databaseDownSince: (from, to) => {
      const overlapping = databaseDown.filter((d) => d.from <= to && d.to >= from);
      return overlapping.length === 0 ? undefined : Math.min(...overlapping.map((d) => d.from));
    },
    originByRequest: origin.byRequest,
    originRecords: origin.records,
    idleTimeout: options.idleTimeout,
    killedBetween: (index, from, to) => cluster.killedBetween(index, from, to),
    storeFaultsBetween: (index, from, to) => cluster.storeFaultsBetween(index, from, to),
  };

  let mounted = false;
  let postgres: TestPostgres | undefined;
  const cleanup = async () => {
    cluster.stopping = true;
    await cluster.killAll().catch(() => {});
    await postgres?.close().catch(() => {});
    await origin.close().catch(() => {});
    if (mounted) {
      if (await unmount(directory)) mounted = false;
      else log(`could not unmount the tmpfs on ${directory}`);
    }
    await rm(bundleDir, { recursive: true, force: true }).catch(() => {});
    if (!options.keep) await rm(root, { recursive: true, force: true }).catch(() => {});
    else log(`kept ${root}`);
  };
  const onSignal = () => {
    log("interrupted: cleaning up");
    cleanup().finally(() => Deno.exit(130));
  };
  Deno.addSignalListener("SIGINT", onSignal);
  Deno.addSignalListener("SIGTERM", onSignal);
  // The harness never outlives its budget, whatever happens.
  const hardLimit = options.duration + 120_000;
  const watchdog = setTimeout(() => {
    log(`harness overran ${hardLimit / 1000}s: aborting (seed ${options.seed})`);
    cleanup().finally(() => Deno.exit(2));
  }, hardLimit);

  const memories = new Map<string, DirectoryMemory>();
  const memoryOf = (dir: string) => {
    let memory = memories.get(dir);
    if (memory === undefined) {
      memory = { verified: new Set(), unowned: new Set(), deadOwners: new Set() };
      memories.set(dir, memory);
    }
    return memory;
  };
  const largest = catalog.images.reduce((max, image) => Math.max(max, image.size), 0);
  /** The oracle's directory check; `quiescent`: no server is writing (strict). */
  const checkpoint = async (why: string, quiescent: boolean) => {
    ledger.counts.checks++;
    for (const dir of cluster.directories) {
      const report = await checkDirectory({
        root,
        directory: dir,
        catalog,
        deadPids: cluster.deadPids,
        maxSize: cluster.hasCacheApi ? maxSize : undefined,
        slack: quiescent ? 0 : largest * (options.cluster ? 1 : options.servers),
        quiescent,
        memory: memoryOf(dir),
      });
      for (const v of report.violations) ledger.violation(v, `directory check (${why})`);
      for (const w of report.warnings) ledger.warn(w);
      if (options.verbose || quiescent) {
        log(
          `check (${why})${dir === directory ? "" : ` of ${dir.slice(directory.length + 1)}`}: ` +
            `${report.entries} entries, ${(report.bytes / MiB).toFixed(1)} MiB, ` +
            `${report.incomplete} partial, ${report.invalid} invalid, ${report.queued} queued, ${report.violations.length} violations`,
        );
      }
    }
  };

  let exitCode = 0;
  try {
    if (options.tmpfs !== undefined) {
      await mkdir(directory);
      log(`tmpfs of ${await mountTmpfs(directory, options.tmpfs)} mounted on the cache directory`);
      mounted = true;
    }
    const originUrl = await origin.listen();
    let clusterConfig: { database: string; secret: string } | undefined;
    if (options.cluster) {
      const started = await startPostgres();
      if (typeof started === "string") throw new HarnessError(`cluster mode: ${started}`);
      postgres = started;
      clusterConfig = { database: started.url, secret: `soak-secret-${options.seed}-0123456789` };
      log(`cluster mode: PostgreSQL on ${started.url}`);
    }
    cluster.configure({
      directory,
      origin: originUrl,
      maxSize,
      storeFaults: options.storeFaults,
      cluster: clusterConfig,
    });
    await Promise.all(cluster.slots.map((slot) => cluster.start(slot)));
    log(
      `origin ${originUrl}; servers on ${cluster.slots.map((s) => s.url).join(", ")}; cacheApi: ${
        cluster.slots[0].features.cacheApi
      }`,
    );

    const deadline = Date.now() + options.duration;
    const workload = new Workload({
      catalog,
      origin,
      cluster,
      ledger,
      world,
      idleTimeout: options.idleTimeout,
    });
    const progress = () =>
      log(
        `${ledger.totalRequests()} requests, ${(ledger.counts.bytes / MiB).toFixed(0)} MiB, ` +
          `${ledger.counts.kills} kills, ${ledger.found.length} violations`,
      );
    // Each client, then the killer, forks the generator in this order: a seed replays them.
    await Promise.all([
      ...Array.from(
        { length: options.clients },
        (_, n) => workload.client(n, rng.fork(), deadline),
      ),
      cluster.killer(
        rng.fork(),
        options.killEvery,
        deadline,
        (slot) => checkpoint(`after restart of server ${slot.index}`, false),
      ),
      cluster.watch(deadline, options.maxRss, progress),
      restartDatabase(postgres, rng.fork(), options.dbRestartEvery, deadline, (down) => {
        databaseDown.push(down);
        ledger.counts.databaseRestarts++;
        if (options.verbose) {
          log(`database restarted (down ${down.to - down.from - RECONNECT_SLACK} ms)`);
        }
      }, () => cluster.stopping),
    ]);
    await workload.drain();

    // The end: crash everything, restart one server (in cluster mode, every
    // node: each sweeps its own directory) without faults, check strictly.
    log(
      `workload over: killing every server, restarting ${
        options.cluster ? "them" : "one"
      }, checking`,
    );
    await cluster.killAll();
    origin.setFaultRate(0);
    for (const slot of options.cluster ? cluster.slots : [cluster.slots[0]]) {
      await cluster.start(slot, NO_STORE_FAULTS);
      ledger.counts.restarts++;
    }
    // A store that starts over maxSize prunes itself at start, asynchronously:
    // give it a moment (bounded) before the strict check.
    for (const dir of cluster.directories) await waitWithinMaxSize(dir, maxSize, 5_000);
    await checkpoint("after crashing every server", true);
    // Everything still cached must be served right, from the cache.
    await workload.finalPass(cluster.slots[0]);
    for (const slot of cluster.slots) if (slot.up) await cluster.kill(slot, "SIGTERM");
  } catch (error) {
    // Once stopping (interrupted, or over budget), a server that cannot start is expected.
    if (!cluster.stopping) {
      const detail = error instanceof HarnessError ? error.message : (error as Error)?.stack;
      log(`harness failure: ${detail ?? error}`);
    }
    exitCode = 2;
  } finally {
    clearTimeout(watchdog);
    await cleanup();
    Deno.removeSignalListener("SIGINT", onSignal);
    Deno.removeSignalListener("SIGTERM", onSignal);
  }

  return await printSummary(ledger, {
    seed: options.seed,
    started,
    duration: options.duration,
    quick: options.quick,
    cluster: options.cluster,
    strict: options.strict,
    servers: options.servers,
    clients: options.clients,
    images: catalog.images.length,
    catalogBytes: catalog.totalSize,
    maxSize,
    originBytesSent: origin.bytesSent,
    originFaults: origin.faults,
    peakRss: cluster.slots.map((s) => s.peakRss),
    json: options.json,
  }, exitCode);
}

/**
 * Cluster mode: until `deadline` (less 5 s), stops the database (immediate
 * mode, as a crash) every `every` ms on average, for 0.3 to 3 s, and starts
 * it again. Reports each outage twice, as the same object: when it begins
 * (`to` is `Infinity`) and when the database is back (`to` is then).
 */
async function restartDatabase(
  postgres: TestPostgres | undefined,
  r: Rng,
  every: number,
  deadline: number,
  onDown: (down: { from: number; to: number }) => void,
  stopping: () => boolean,
): Promise<void> {
  if (postgres === undefined || every <= 0) return;
  while (!stopping()) {
    const wait = r.int(Math.floor(every / 2), Math.floor(every * 1.5));
    if (Date.now() + wait >= deadline - 5000) return;
    await sleep(wait);
    const down = { from: Date.now(), to: Infinity };
    onDown(down);
    await postgres.stop();
    await sleep(r.int(300, 3000));
    await postgres.start();
    down.to = Date.now();
    onDown(down);
  }
}

/** Waits (at most `timeout` ms) until the committed entries of `directory` fit in `maxSize`. */
async function waitWithinMaxSize(directory: string, maxSize: number, timeout: number) {
  const deadline = Date.now() + timeout;
  while (Date.now() < deadline) {
    const names = new Set(await readdir(directory).catch(() => [] as string[]));
    let bytes = 0;
    for (const name of names) {
      if (!names.has(`${name}.json`)) continue;
      bytes += (await stat(join(directory, name)).catch(() => ({ size: 0 }))).size;
    }
    if (bytes <= maxSize) return;
    await sleep(100);
  }
}

if (import.meta.main) Deno.exit(await main());
