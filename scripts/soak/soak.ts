/**
 * `deno task soak`: the reliability campaign (issue 9). A seeded, randomized
 * workload against real server processes that share one cache directory,
 * with an origin that fails in every way it can, a store that fails at
 * random, SIGKILLs at random moments and restarts, judged by an oracle
 * (DESIGN.md §4, see scripts/soak/oracle.ts).
 *
 * ```sh
 * npx -y deno task soak --quick              # about one minute (CI)
 * npx -y deno task soak --duration 30m --seed 42
 * ```
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
import { mkdir, mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { type CatalogImage, encodeId, HOSTILE_IDS, makeCatalog, Rng } from "./data.ts";
import {
  checkDirectory,
  type DirectoryMemory,
  type Expectation,
  judge,
  type Judged,
  judgeFailure,
  type Violation,
  type World,
} from "./oracle.ts";
import { originRoute, SoakOrigin } from "./origin.ts";
import type { SoakServerConfig } from "./server.ts";
import { NO_STORE_FAULTS, type StoreFaultRates } from "./store.ts";

// ---------------------------------------------------------------------------
// Options.

interface SoakOptions {
  seed: number;
  /** Milliseconds of workload. */
  duration: number;
  quick: boolean;
  servers: number;
  clients: number;
  images: number;
  largest: number;
  /** Kill a server every `killEvery` ms, on average (0: never). */
  killEvery: number;
  originFaults: number;
  storeFaults: StoreFaultRates;
  idleTimeout: number;
  /** Resident memory a server may reach, bytes (invariant 5). */
  maxRss: number;
  /** Bytes of a tmpfs mounted on the cache directory (real ENOSPC; Linux, root). */
  tmpfs?: number;
  keep: boolean;
  verbose: boolean;
  /** Known issues (open findings) fail the run too. */
  strict: boolean;
  json?: string;
}

const MiB = 2 ** 20;

const USAGE = `Usage: deno task soak [--quick] [--seed N] [--duration 90s|10m|1h]
       [--servers N] [--clients N] [--images N] [--largest MiB] [--kill-every SECONDS]
       [--origin-faults P] [--no-store-faults] [--max-rss MiB] [--tmpfs MiB] [--strict] [--keep] [--verbose] [--json FILE]`;

function parseDuration(value: string): number {
  const match = /^(\d+(?:\.\d+)?)(ms|s|m|h)?$/.exec(value);
  if (match === null) throw new RangeError(`Invalid duration ${JSON.stringify(value)}`);
  const unit = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 }[match[2] ?? "s"] ?? 1000;
  return Number(match[1]) * unit;
}

function parseArgs(args: string[]): SoakOptions {
  const flags = new Map<string, string>();
  for (let i = 0; i < args.length; i++) {
    const arg = args[i];
    if (!arg.startsWith("--")) {
      throw new TypeError(`Unexpected argument ${JSON.stringify(arg)}\n${USAGE}`);
    }
    const eq = arg.indexOf("=");
    if (eq !== -1) flags.set(arg.slice(2, eq), arg.slice(eq + 1));
    else if (
      ["quick", "keep", "verbose", "no-store-faults", "strict", "help"].includes(arg.slice(2))
    ) {
      flags.set(arg.slice(2), "true");
    } else if (i + 1 < args.length) flags.set(arg.slice(2), args[++i]);
    else throw new TypeError(`Missing value for ${arg}\n${USAGE}`);
  }
  if (flags.has("help")) {
    console.log(USAGE);
    Deno.exit(0);
  }
  const known = [
    "quick",
    "seed",
    "duration",
    "servers",
    "clients",
    "images",
    "largest",
    "kill-every",
    "origin-faults",
    "no-store-faults",
    "keep",
    "verbose",
    "strict",
    "json",
    "max-rss",
    "tmpfs",
  ];
  for (const key of flags.keys()) {
    if (!known.includes(key)) throw new TypeError(`Unknown option --${key}\n${USAGE}`);
  }
  const number = (key: string, fallback: number) => {
    const value = flags.get(key);
    if (value === undefined) return fallback;
    const n = Number(value);
    if (!Number.isFinite(n) || n < 0) {
      throw new RangeError(`--${key} must be a non-negative number, received ${value}`);
    }
    return n;
  };
  const quick = flags.has("quick");
  const storeFaults: StoreFaultRates = flags.has("no-store-faults") ? NO_STORE_FAULTS : {
    createWriter: 0.02,
    write: 0.0004,
    slowCommit: 0.05,
    failCommit: 0.02,
    get: 0.005,
    body: 0.01,
    read: 0.0005,
  };
  return {
    seed: Math.floor(number("seed", Math.floor(Math.random() * 2 ** 31))),
    duration: flags.has("duration")
      ? parseDuration(flags.get("duration")!)
      : quick
      ? 40_000
      : 600_000,
    quick,
    servers: Math.max(1, Math.floor(number("servers", 3))),
    clients: Math.max(1, Math.floor(number("clients", quick ? 8 : 12))),
    images: Math.max(8, Math.floor(number("images", quick ? 14 : 24))),
    largest: Math.floor(number("largest", quick ? 40 : 256) * MiB),
    killEvery: number("kill-every", quick ? 5 : 12) * 1000,
    originFaults: number("origin-faults", 0.25),
    storeFaults,
    idleTimeout: 20_000,
    maxRss: number("max-rss", 512) * MiB,
    tmpfs: flags.has("tmpfs") ? number("tmpfs", 0) * MiB : undefined,
    keep: flags.has("keep"),
    strict: flags.has("strict"),
    verbose: flags.has("verbose"),
    json: flags.get("json"),
  };
}

// ---------------------------------------------------------------------------
// Server processes.

const SERVER_SCRIPT = fileURLToPath(new URL("./server.ts", import.meta.url));

interface Slot {
  index: number;
  child?: Deno.ChildProcess;
  pid?: number;
  url?: string;
  client?: Deno.HttpClient;
  up: boolean;
  incarnation: number;
  /** Kill times. */
  kills: number[];
  /** Store faults reported, with their time. */
  faults: { at: number; kind: string }[];
  stderr: string[];
  expectExit: boolean;
  /** Exited by itself: the monitor restarts it. */
  crashed: boolean;
  peakRss: number;
  features: { cacheApi: boolean };
}

class HarnessError extends Error {}

// ---------------------------------------------------------------------------
// The run.

interface Counts {
  requests: Record<string, number>;
  endings: Record<string, number>;
  statuses: Record<string, number>;
  cacheStatus: Record<string, number>;
  explained: Record<string, number>;
  storeFaults: Record<string, number>;
  cacheErrors: Record<string, number>;
  bytes: number;
  kills: number;
  restarts: number;
  checks: number;
  warnings: Record<string, number>;
}

/** A violation with what is needed to reproduce it. */
interface Found extends Violation {
  at: number;
  context: string;
  /** The open finding it reproduces, when it is a known one. */
  known?: string;
}

/**
 * Violations that reproduce an open finding, each kept as a `todo` test in
 * tests/regressions_test.ts. They are printed and counted apart, and fail
 * the run only with `--strict`. Remove an entry when its finding is fixed.
 */
const KNOWN: { finding: string; matches(found: Found): boolean }[] = [
  {
    finding: "finding 9: a read-back fault cuts a trailing client",
    matches: (found) => found.kind === "store-fault-cut",
  },
];

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
  const directory = join(root, "cache");
  const origin = new SoakOrigin({
    catalog,
    rng: rng.fork(),
    faultRate: options.originFaults,
    maxStall: options.quick ? 3000 : 6000,
    maxSlow: 3000,
  });
  const slots: Slot[] = Array.from({ length: options.servers }, (_, index) => ({
    index,
    up: false,
    incarnation: 0,
    kills: [],
    faults: [],
    stderr: [],
    expectExit: false,
    crashed: false,
    peakRss: 0,
    features: { cacheApi: false },
  }));
  const deadPids = new Set<number>();
  const counts: Counts = {
    requests: {},
    endings: {},
    statuses: {},
    cacheStatus: {},
    explained: {},
    storeFaults: {},
    cacheErrors: {},
    bytes: 0,
    kills: 0,
    restarts: 0,
    checks: 0,
    warnings: {},
  };
  const found: Found[] = [];
  const bump = (table: Record<string, number>, key: string, by = 1) =>
    table[key] = (table[key] ?? 0) + by;
  const violation = (v: Violation, context: string) => {
    const f: Found = { ...v, at: Date.now() - started, context };
    f.known = KNOWN.find((k) => k.matches(f))?.finding;
    found.push(f);
    const label = f.known === undefined ? "VIOLATION" : `KNOWN (${f.known.split(":")[0]})`;
    if (found.length <= 30) log(`${label} ${v.kind}: ${v.message}\n    ${context}`);
  };
  const warn = (message: string) => {
    const key = message.replace(/[0-9a-f]{8,}|\d+/g, "N").slice(0, 80);
    if ((counts.warnings[key] ?? 0) === 0 && options.verbose) log(`warning: ${message}`);
    bump(counts.warnings, key);
  };
  let serverConfig: Omit<SoakServerConfig, "seed" | "index"> | undefined;
  let stopping = false;

  const world: World = {
    originByRequest: origin.byRequest,
    originRecords: origin.records,
    idleTimeout: options.idleTimeout,
    killedBetween: (index, from, to) => slots[index].kills.some((at) => at >= from && at <= to),
    storeFaultsBetween: (index, from, to) =>
      slots[index].faults.filter((f) => f.at >= from && f.at <= to).map((f) => f.kind),
  };

  // -- Server processes --------------------------------------------------

  const startServer = async (slot: Slot, faults = options.storeFaults): Promise<void> => {
    slot.incarnation++;
    const config: SoakServerConfig = {
      ...serverConfig!,
      storeFaults: faults,
      seed: (options.seed * 31 + slot.index * 7919 + slot.incarnation) >>> 0,
      index: slot.index,
    };
    const child = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", "--quiet", SERVER_SCRIPT, JSON.stringify(config)],
      stdin: "piped",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    slot.child = child;
    slot.pid = child.pid;
    slot.expectExit = false;
    const pid = child.pid;
    let ready!: (port: number) => void;
    const readyPromise = new Promise<number>((resolve) => ready = resolve);
    (async () => {
      let buffer = "";
      for await (const text of child.stdout.pipeThrough(new TextDecoderStream())) {
        buffer += text;
        let nl;
        while ((nl = buffer.indexOf("\n")) !== -1) {
          const line = buffer.slice(0, nl);
          buffer = buffer.slice(nl + 1);
          if (line.startsWith("READY ")) {
            const info = JSON.parse(line.slice(6));
            slot.features = info.features;
            ready(info.port);
          } else if (line.startsWith("FAULT ")) {
            const kind = line.slice(6);
            slot.faults.push({ at: Date.now(), kind });
            bump(counts.storeFaults, kind);
          } else if (line.startsWith("ERROR ")) {
            const message = line.slice(6);
            if (message.startsWith("unhandled")) {
              violation({ kind: "server-error", message }, `server ${slot.index} (pid ${pid})`);
            }
            bump(
              counts.cacheErrors,
              message.replace(/"[^"]*"/g, '"…"').replace(/\d+/g, "N").slice(0, 90),
            );
          }
        }
      }
    })().catch(() => {});
    (async () => {
      for await (const text of child.stderr.pipeThrough(new TextDecoderStream())) {
        for (const line of text.split("\n")) {
          if (line === "") continue;
          slot.stderr.push(`[pid ${pid}] ${line}`);
          if (slot.stderr.length > 60) slot.stderr.shift();
        }
      }
    })().catch(() => {});
    child.status.then((status) => {
      deadPids.add(pid);
      if (slot.pid === pid) slot.up = false;
      if (!slot.expectExit && !stopping) {
        violation(
          {
            kind: "server-crash",
            message: `server ${slot.index} exited by itself (${status.code}${
              status.signal ? ", " + status.signal : ""
            })`,
          },
          slot.stderr.slice(-15).join("\n    "),
        );
        slot.kills.push(Date.now()); // Its clients were cut by the crash, already counted.
        if (slot.pid === pid) slot.crashed = true;
      }
    });
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        const stderr = slot.stderr.join("\n");
        reject(new HarnessError(`server ${slot.index} did not start in 30 s:\n${stderr}`));
      }, 30_000);
    });
    const port = await Promise.race([
      readyPromise,
      timeout,
      child.status.then(() => {
        throw new HarnessError(`server ${slot.index} exited at start:\n${slot.stderr.join("\n")}`);
      }),
    ]).finally(() => clearTimeout(timer));
    slot.url = `http://127.0.0.1:${port}`;
    slot.client = Deno.createHttpClient({});
    slot.up = true;
  };

  const killServer = async (slot: Slot, signal: Deno.Signal = "SIGKILL") => {
    const child = slot.child;
    if (child === undefined) return;
    slot.up = false;
    slot.expectExit = true;
    if (signal === "SIGKILL") slot.kills.push(Date.now());
    try {
      child.kill(signal);
    } catch {
      // Already gone.
    }
    const exited = await Promise.race([
      child.status.then(() => true),
      sleep(5000).then(() => false),
    ]);
    if (!exited) {
      try {
        child.kill("SIGKILL");
      } catch { /* gone */ }
      await child.status;
    }
    if (slot.pid !== undefined) deadPids.add(slot.pid);
    const client = slot.client;
    slot.client = undefined;
    slot.child = undefined;
    // In-flight requests on the old client end with the process; close it after they noticed.
    setTimeout(() => client?.close(), 2000);
  };

  let mounted = false;
  const cleanup = async () => {
    stopping = true;
    await Promise.all(slots.map((slot) => killServer(slot).catch(() => {})));
    await origin.close().catch(() => {});
    if (mounted) {
      const umount = await new Deno.Command("umount", { args: [directory], stderr: "piped" })
        .output().catch(() => undefined);
      if (!umount?.success) log(`could not unmount the tmpfs on ${directory}`);
      else mounted = false;
    }
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

  const memory: DirectoryMemory = {
    verified: new Set(),
    unowned: new Set(),
    deadOwners: new Set(),
  };
  const largest = catalog.images.reduce((max, image) => Math.max(max, image.size), 0);
  const checkpoint = async (why: string, quiescent: boolean) => {
    counts.checks++;
    const report = await checkDirectory({
      root,
      directory,
      catalog,
      deadPids,
      maxSize: slots.some((s) => s.features.cacheApi) ? maxSize : undefined,
      slack: quiescent ? 0 : largest * options.servers,
      quiescent,
      memory,
    });
    for (const v of report.violations) violation(v, `directory check (${why})`);
    for (const w of report.warnings) warn(w);
    if (options.verbose || quiescent) {
      log(
        `check (${why}): ${report.entries} entries, ${(report.bytes / MiB).toFixed(1)} MiB, ` +
          `${report.incomplete} partial, ${report.invalid} invalid, ${report.queued} queued, ${report.violations.length} violations`,
      );
    }
    return report;
  };

  let exitCode = 0;
  try {
    if (options.tmpfs !== undefined) {
      // A small file system gives real ENOSPC (data, metadata, owner records, queue markers).
      await mkdir(directory);
      const size = `size=${Math.max(1, Math.ceil(options.tmpfs / MiB))}m`;
      const mount = await new Deno.Command("mount", {
        args: ["-t", "tmpfs", "-o", size, "tmpfs", directory],
        stderr: "piped",
      }).output().catch((error) => ({ success: false, stderr: new TextEncoder().encode(error) }));
      if (!mount.success) {
        throw new HarnessError(
          `cannot mount a tmpfs (Linux, root only): ${new TextDecoder().decode(mount.stderr)}`,
        );
      }
      mounted = true;
      log(`tmpfs of ${size} mounted on the cache directory`);
    }
    const originUrl = await origin.listen();
    serverConfig = { directory, origin: originUrl, maxSize, storeFaults: options.storeFaults };
    await Promise.all(slots.map((slot) => startServer(slot)));
    const features = slots[0].features;
    log(
      `origin ${originUrl}; servers on ${
        slots.map((s) => s.url).join(", ")
      }; cacheApi: ${features.cacheApi}`,
    );

    // -- Workload -----------------------------------------------------------
    const deadline = Date.now() + options.duration;
    /** The last DELETE answered 2xx, by id: when it was sent and answered. */
    const deletedAt = new Map<
      string,
      { sent: number; at: number; server: number; what: string }
    >();
    const inFlight = new Set<Promise<void>>();
    let sequence = 0;

    const popular = catalog.images.map((image, rank) => ({ image, weight: 1 / (rank + 1) }));
    const pickImage = (r: Rng): CatalogImage => {
      let x = r.next() * popular.reduce((s, p) => s + p.weight, 0);
      for (const p of popular) {
        x -= p.weight;
        if (x < 0) return p.image;
      }
      return popular[0].image;
    };
    const pickSlot = (r: Rng): Slot | undefined => {
      const up = slots.filter((s) => s.up);
      return up.length === 0 ? undefined : r.pick(up);
    };

    const rangeFor = (r: Rng, size: number): string => {
      const at = () => r.int(0, Math.max(0, size - 1));
      switch (
        r.weighted({
          within: 6,
          open: 2,
          suffix: 2,
          beyond: 1,
          invalid: 1,
          garbage: 1,
          multi: 1,
          huge: 1,
        })
      ) {
        case "within": {
          const a = at();
          return `bytes=${a}-${r.int(a, Math.max(a, size - 1 + r.int(0, 2)))}`;
        }
        case "open":
          return `bytes=${at()}-`;
        case "suffix":
          return `bytes=-${r.int(0, size + 2)}`;
        case "beyond":
          return `bytes=${size + r.int(0, 10)}-`;
        case "invalid":
          return `bytes=${size + 5}-${r.int(0, 3)}`;
        case "garbage":
          return r.pick([
            "bytes=abc",
            "items=0-5",
            "bytes=",
            "bytes=--1",
            "bytes 0-1",
            "bytes=1-2-3",
          ]);
        case "multi":
          return `bytes=0-0,${at()}-`;
        default:
          return `bytes=0-${"9".repeat(r.int(16, 30))}`;
      }
    };

    const readingStyle = (r: Rng, exp: Expectation, size: number) => {
      const style = r.weighted({ fast: 14, hangup: 2, pause: 2, slow: 1 });
      if (style === "hangup") exp.hangUpAfter = r.int(0, Math.max(0, size));
      else if (style === "pause") {
        exp.pauseAt = r.int(0, Math.max(0, size));
        exp.pause = r.int(200, 2500);
      } else if (style === "slow") {
        exp.chunkPause = Math.max(1, Math.min(20, Math.floor(3000 / Math.max(1, size / 65536))));
      }
    };

    const record = (
      action: string,
      exp: Expectation,
      judged: Judged,
      path: string,
      headers: Record<string, string>,
    ) => {
      bump(counts.requests, action);
      bump(counts.endings, judged.ending);
      bump(counts.statuses, String(judged.status));
      const cs = judged.cacheStatus.replace(/^[^;]*;\s*/, "") || "(none)";
      bump(counts.cacheStatus, cs);
      if (judged.explained) bump(counts.explained, judged.explained);
      counts.bytes += judged.bytes;
      // Deletion wins (invariant 7): a request sent after a DELETE answered 2xx is
      // served from the cache only by a fill whose origin fetch began after it.
      const deleted = deletedAt.get(exp.image.id);
      if (
        deleted !== undefined && exp.started > deleted.at &&
        /;\s*(hit|fwd=miss; collapsed)/.test(judged.cacheStatus)
      ) {
        const refilled = origin.records.some((r) =>
          r.id === exp.image.id && r.method === "GET" && r.status === 200 && r.at > deleted.sent
        );
        if (!refilled) {
          const fetches = origin.records.filter((r) => r.id === exp.image.id && r.method === "GET")
            .slice(-4).map((r) =>
              `${r.req}@${r.at - deleted.sent}ms:s${r.server}:${r.status}/${r.fault}`
            );
          // Another process fetched the image shortly before the DELETE was sent: its
          // miss may have been waiting for the origin then (finding 11).
          const crossProcess = origin.records.some((r) =>
            r.id === exp.image.id && r.method === "GET" && r.status === 200 && r.server >= 0 &&
            r.server !== deleted.server && r.at <= deleted.sent && r.at >= deleted.sent - 10_000
          );
          judged.violations.push({
            kind: crossProcess ? "deleted-but-served-cross-process" : "deleted-but-served",
            message:
              `"${judged.cacheStatus}" ${exp.started - deleted.at} ms after ${deleted.what} ` +
              `on server ${deleted.server}; last origin GETs (relative to sent): ${
                fetches.join(" ")
              }`,
          });
        }
      }
      for (const v of judged.violations) {
        violation(
          v,
          `origin: ${JSON.stringify(origin.byRequest.get(exp.req) ?? [])}; image ${
            JSON.stringify({ ...exp.image, md5: undefined })
          }\n    ` +
            `req ${exp.req} server ${exp.server} ${exp.method} ${path} ${
              JSON.stringify(headers)
            } -> ${judged.status} "${judged.cacheStatus}" ${judged.ending} ${judged.bytes}B`,
        );
      }
    };

    /** One request with a body judged by the oracle. */
    const dataRequest = async (r: Rng, client: number, action: string) => {
      const slot = pickSlot(r);
      if (slot === undefined) return sleep(100);
      const req = `${client}-${++sequence}`;
      let image: CatalogImage;
      let path: string;
      const v1 = r.chance(0.3);
      if (action === "hostile") {
        const id = r.chance(0.7) ? r.pick(HOSTILE_IDS) : randomId(r);
        const encoded = encodeId(id, r);
        path = v1 ? `/v1/images/${encoded}` : `/v2/images/${encoded}/file`;
        const target = new URL(slot.url! + path).pathname;
        const route = originRoute("GET", target);
        if (route === undefined) {
          // Neither the cache nor the origin has a route for it: a plain 404 is right.
          return plainRequest(slot, req, action, "GET", path, {}, [404]);
        }
        image = catalog.get(route.id);
      } else {
        image = pickImage(r);
        const encoded = encodeURIComponent(image.id);
        path = v1 ? `/v1/images/${encoded}` : `/v2/images/${encoded}/file`;
      }
      const exp: Expectation = {
        req,
        server: slot.index,
        image,
        method: action === "head" ? "HEAD" : "GET",
        started: 0,
      };
      const headers: Record<string, string> = { "x-soak-req": req };
      if (action === "range") {
        exp.range = headers.range = rangeFor(r, image.size);
        if (r.chance(0.2)) {
          exp.ifRange = headers["if-range"] = r.chance(0.6)
            ? `"md5-${image.md5}"`
            : r.pick(['"other"', "Wed, 21 Oct 2015 07:28:00 GMT"]);
        }
      } else if (action === "conditional") {
        exp.ifNoneMatch = headers["if-none-match"] = r.pick([
          `"md5-${image.md5}"`,
          `W/"md5-${image.md5}"`,
          `"nope", "md5-${image.md5}"`,
          `"nope"`,
          "*",
        ]);
      }
      if (exp.method === "GET") readingStyle(r, exp, image.size);
      exp.started = Date.now();
      let judged: Judged;
      const abort = new AbortController();
      const timer = setTimeout(() => abort.abort(), options.idleTimeout);
      try {
        const res = await fetch(slot.url + path, {
          method: exp.method,
          headers,
          client: slot.client,
          signal: abort.signal,
        });
        clearTimeout(timer);
        judged = await judge(res, exp, world);
      } catch (error) {
        clearTimeout(timer);
        judged =
          abort.signal.aborted && !world.killedBetween(slot.index, exp.started, Date.now() + 1000)
            ? {
              status: 0,
              cacheStatus: "",
              ending: "timeout",
              bytes: 0,
              violations: [{ kind: "stuck", message: `no answer in ${options.idleTimeout} ms` }],
            }
            : judgeFailure(exp, world, error);
      }
      record(action, exp, judged, path, headers);
    };

    /** A request whose answer is judged by its status (and a JSON check). */
    const plainRequest = async (
      slot: Slot,
      req: string,
      action: string,
      method: string,
      path: string,
      headers: Record<string, string>,
      allowed: number[],
      check?: (res: Response, body: string) => string | undefined,
    ): Promise<Response | undefined> => {
      const exp: Expectation = {
        req,
        server: slot.index,
        image: catalog.images[0],
        method: "GET",
        started: Date.now(),
      };
      const abort = new AbortController();
      const timer = setTimeout(() => abort.abort(), options.idleTimeout);
      let judged: Judged;
      let res: Response | undefined;
      try {
        res = await fetch(slot.url + path, {
          method,
          headers: { ...headers, "x-soak-req": req },
          client: slot.client,
          signal: abort.signal,
        });
        const body = await res.text();
        const violations: Violation[] = [];
        if (!allowed.includes(res.status)) {
          const originSaid = (origin.byRequest.get(req) ?? []).some((r) =>
            r.status === res!.status
          );
          // A store fault behind a management answer is a 500 with its message.
          const storeFault = res.status === 500 && /^Cache store error: /.test(body);
          if (storeFault) bump(counts.explained, "api-500-store-fault");
          if (!originSaid && !storeFault) {
            violations.push({
              kind: "status",
              message: `${method} ${path}: ${res.status} (expected ${allowed.join("/")}): ${
                body.slice(0, 120)
              }`,
            });
          }
        } else {
          const problem = check?.(res, body);
          if (problem !== undefined) {
            violations.push({ kind: "api", message: `${method} ${path}: ${problem}` });
          }
        }
        judged = {
          status: res.status,
          cacheStatus: res.headers.get("cache-status") ?? "",
          ending: "complete",
          bytes: body.length,
          violations,
        };
      } catch (error) {
        judged = judgeFailure(exp, world, error);
        res = undefined;
      } finally {
        clearTimeout(timer);
      }
      bump(counts.requests, action);
      bump(counts.statuses, String(judged.status));
      if (judged.explained) bump(counts.explained, judged.explained);
      for (const v of judged.violations) {
        violation(
          v,
          `req ${req} server ${slot.index} ${method} ${path} ${JSON.stringify(headers)}`,
        );
      }
      return judged.status === 0 ? undefined : res;
    };

    const deleteRequest = async (r: Rng, client: number, action: string) => {
      const slot = pickSlot(r);
      if (slot === undefined) return sleep(100);
      const req = `${client}-${++sequence}`;
      const image = pickImage(r);
      const encoded = encodeURIComponent(image.id);
      let path: string;
      let allowed: number[];
      let targets = [image.id];
      const headers: Record<string, string> = {};
      if (action === "delete") {
        path = r.chance(0.5) ? `/v1/images/${encoded}` : `/v2/images/${encoded}`;
        allowed = [200, 204];
      } else if (action === "api-delete") {
        path = `/v2/cache/${encoded}`;
        allowed = [204, 404];
      } else {
        path = "/v2/cache";
        const target = r.pick([undefined, "", "both", "cache", "queue", "nonsense"]);
        if (target !== undefined) headers["x-image-cache-clear-target"] = target;
        allowed = target === "nonsense" ? [400] : [204];
        targets = target === "queue" || target === "nonsense"
          ? []
          : catalog.images.map((i) => i.id);
      }
      const sent = Date.now();
      const res = await plainRequest(slot, req, action, "DELETE", path, headers, allowed);
      if (res !== undefined && res.status >= 200 && res.status < 300 && res.status !== 404) {
        const at = Date.now();
        const what = `${req} DELETE ${path} ${JSON.stringify(headers)} -> ${res.status}`;
        for (const id of targets) deletedAt.set(id, { sent, at, server: slot.index, what });
      }
    };

    const apiRequest = async (r: Rng, client: number, action: string) => {
      const slot = pickSlot(r);
      if (slot === undefined) return sleep(100);
      const req = `${client}-${++sequence}`;
      const image = r.chance(0.1) ? catalog.get(r.pick(HOSTILE_IDS)) : pickImage(r);
      switch (action) {
        case "api-queue": {
          const hostile = !catalog.has(image.id);
          const path = `/v2/cache/${encodeId(image.id, r)}`;
          const route = new URL(slot.url + path).pathname;
          if (route !== path) return; // The URL parser resolved a dot segment: not a cache route any more.
          await plainRequest(slot, req, action, "PUT", path, {}, hostile ? [202, 400] : [202]);
          return;
        }
        case "api-list":
          await plainRequest(slot, req, action, "GET", "/v2/cache", {}, [200], (_res, body) => {
            let value;
            try {
              value = JSON.parse(body);
            } catch {
              return `not JSON: ${body.slice(0, 100)}`;
            }
            if (!Array.isArray(value?.cached_images) || !Array.isArray(value?.queued_images)) {
              return `unexpected shape: ${body.slice(0, 200)}`;
            }
            for (const entry of value.cached_images) {
              const known = catalog.get(String(entry.image_id));
              if (entry.size !== known.size) {
                return `lists ${JSON.stringify(entry)} but the image has ${known.size} bytes`;
              }
            }
            return undefined;
          });
          return;
        case "api-prune":
          await plainRequest(
            slot,
            req,
            action,
            "POST",
            "/v2/cache/prune",
            {},
            [200],
            (_res, body) => {
              try {
                const value = JSON.parse(body);
                if (
                  !Number.isInteger(value.total_files_pruned) ||
                  !Number.isInteger(value.total_bytes_pruned)
                ) {
                  return `unexpected prune answer ${body}`;
                }
              } catch {
                return `not JSON: ${body.slice(0, 100)}`;
              }
              return undefined;
            },
          );
          return;
        case "api-clean":
          await plainRequest(slot, req, action, "POST", "/v2/cache/clean", {}, [200]);
          return;
      }
    };

    const client = async (n: number) => {
      const r = rng.fork();
      while (Date.now() < deadline && !stopping) {
        const api = slots.some((s) => s.features.cacheApi);
        const action = r.weighted({
          get: 40,
          range: 18,
          conditional: 6,
          head: 5,
          hostile: 5,
          delete: 3,
          "api-queue": api ? 4 : 0,
          "api-delete": api ? 2 : 0,
          "api-list": api ? 2 : 0,
          "api-prune": api ? 1 : 0,
          "api-clean": api ? 1 : 0,
          "api-clear": api ? 0.2 : 0,
        });
        let task: Promise<unknown>;
        if (action === "delete" || action === "api-delete" || action === "api-clear") {
          task = deleteRequest(r, n, action);
        } else if (action.startsWith("api-")) task = apiRequest(r, n, action);
        else task = dataRequest(r, n, action);
        const p = task.then(
          () => {},
          (error) =>
            violation({ kind: "harness", message: String(error?.stack ?? error) }, `client ${n}`),
        );
        inFlight.add(p);
        await p;
        inFlight.delete(p);
        if (r.chance(0.1)) await sleep(r.int(0, 200));
      }
    };

    const killer = async () => {
      const r = rng.fork();
      if (options.killEvery <= 0) return;
      while (!stopping) {
        const wait = r.int(Math.floor(options.killEvery / 2), Math.floor(options.killEvery * 1.5));
        if (Date.now() + wait >= deadline - 2000) break;
        await sleep(wait);
        const slot = r.pick(slots);
        if (!slot.up) continue;
        await killServer(slot);
        counts.kills++;
        if (options.verbose) log(`killed server ${slot.index} (pid ${slot.pid})`);
        await sleep(r.int(0, 500));
        await startServer(slot);
        counts.restarts++;
        await checkpoint(`after restart of server ${slot.index}`, false);
      }
    };

    const monitor = async () => {
      let last = Date.now();
      while (!stopping && Date.now() < deadline) {
        await sleep(1000);
        for (const slot of slots) {
          if (slot.pid === undefined || !slot.up) continue;
          const status = await readFile(`/proc/${slot.pid}/status`, "utf8").catch(() => "");
          const rss = Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? 0) * 1024;
          if (rss > options.maxRss && slot.peakRss <= options.maxRss) {
            violation(
              { kind: "memory", message: `server ${slot.index} at ${Math.round(rss / MiB)} MiB` },
              `pid ${slot.pid}, limit ${options.maxRss / MiB} MiB`,
            );
          }
          slot.peakRss = Math.max(slot.peakRss, rss);
        }
        // Restart a server that crashed by itself.
        for (const slot of slots) {
          if (!slot.crashed || stopping) continue;
          slot.crashed = false;
          slot.child = undefined;
          await startServer(slot);
          counts.restarts++;
        }
        if (Date.now() - last >= 10_000) {
          last = Date.now();
          const total = Object.values(counts.requests).reduce((a, b) => a + b, 0);
          log(
            `${total} requests, ${
              (counts.bytes / MiB).toFixed(0)
            } MiB, ${counts.kills} kills, ${found.length} violations`,
          );
        }
      }
    };

    await Promise.all([
      ...Array.from({ length: options.clients }, (_, n) => client(n)),
      killer(),
      monitor(),
    ]);
    // In-flight requests end by themselves (every read has an idle timeout).
    await Promise.race([Promise.all([...inFlight]), sleep(options.idleTimeout + 10_000)]);

    // -- The end: crash everything, restart one server, check strictly ---------
    log("workload over: killing every server, restarting one, checking");
    await Promise.all(slots.map((slot) => killServer(slot)));
    origin.setFaultRate(0);
    await startServer(slots[0], NO_STORE_FAULTS);
    counts.restarts++;
    // A store that starts over maxSize prunes itself at start, asynchronously:
    // give it a moment (bounded) before the strict check.
    await waitWithinMaxSize(directory, maxSize, 5_000);
    await checkpoint("after crashing every server", true);
    // Everything still cached must be served right, from the cache.
    const entries = catalog.images;
    for (const image of entries) {
      const slot = slots[0];
      const req = `final-${image.id}`;
      const exp: Expectation = { req, server: 0, image, method: "GET", started: Date.now() };
      const res = await fetch(`${slot.url}/v2/images/${encodeURIComponent(image.id)}/file`, {
        headers: { "x-soak-req": req },
        client: slot.client,
      });
      const judged = await judge(res, exp, world);
      record("final-get", exp, judged, `/v2/images/${image.id}/file`, {});
      if (judged.ending !== "complete") {
        violation(
          { kind: "final", message: `final GET of ${image.id} ended ${judged.ending}` },
          "final pass",
        );
      }
    }
    await killServer(slots[0], "SIGTERM");
  } catch (error) {
    // Once stopping (interrupted, or over budget), a server that cannot start is expected.
    if (!stopping) {
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

  // -- Summary ----------------------------------------------------------------
  const total = Object.values(counts.requests).reduce((a, b) => a + b, 0);
  const byKind: Record<string, number> = {};
  for (const f of found) bump(byKind, f.kind);
  const summary = {
    seed: options.seed,
    seconds: Math.round((Date.now() - started) / 1000),
    workloadSeconds: options.duration / 1000,
    servers: options.servers,
    clients: options.clients,
    images: catalog.images.length,
    catalogMiB: Math.round(catalog.totalSize / MiB),
    maxSizeMiB: Math.round(maxSize / MiB),
    requests: total,
    requestsByKind: counts.requests,
    statuses: counts.statuses,
    cacheStatus: counts.cacheStatus,
    endings: counts.endings,
    cutsExplainedBy: counts.explained,
    bytesReceivedMiB: Math.round(counts.bytes / MiB),
    originBytesSentMiB: Math.round(origin.bytesSent / MiB),
    originFaults: origin.faults,
    storeFaults: counts.storeFaults,
    cacheErrorsReported: counts.cacheErrors,
    kills: counts.kills,
    restarts: counts.restarts,
    directoryChecks: counts.checks,
    peakRssMiB: slots.map((s) => Math.round(s.peakRss / MiB)),
    warnings: counts.warnings,
    violations: found.filter((f) => f.known === undefined).length,
    violationsByKind: byKind,
    knownIssues: Object.fromEntries(
      KNOWN.map((k) => [k.finding, found.filter((f) => f.known === k.finding).length]),
    ),
  };
  console.log("\n== soak summary ==");
  console.log(JSON.stringify(summary, null, 2));
  if (options.json !== undefined) {
    await Deno.writeTextFile(options.json, JSON.stringify(summary, null, 2) + "\n");
  }
  const replay = `deno task soak --seed ${options.seed} --duration ${options.duration / 1000}s` +
    (options.quick ? " --quick" : "");
  const failing = found.filter((f) => f.known === undefined || options.strict);
  const known: Record<string, number> = {};
  for (const f of found) if (f.known !== undefined) bump(known, f.known);
  for (const [finding, count] of Object.entries(known)) {
    console.log(`KNOWN${options.strict ? "" : ", not counted"}: ${count} × ${finding}`);
  }
  if (failing.length > 0) {
    console.log(`\n${failing.length} violation(s). Replay with: ${replay}`);
    for (const f of failing.slice(0, 50)) {
      console.log(`- [${(f.at / 1000).toFixed(1)}s] ${f.kind}: ${f.message}\n    ${f.context}`);
    }
    return exitCode || 1;
  }
  console.log(
    exitCode === 0
      ? `\nNo violations (seed ${options.seed}).`
      : `\nHarness failed (seed ${options.seed}). Replay with: ${replay}`,
  );
  return exitCode;
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function randomId(r: Rng): string {
  const alphabet = "aZ09-_.~%/\\:é😀 \0?#&=+";
  const chars = Array.from(alphabet);
  return Array.from({ length: r.int(1, 40) }, () => r.pick(chars)).join("");
}

if (import.meta.main) Deno.exit(await main());

/** Waits (at most `timeout` ms) until the committed entries of `directory` fit in `maxSize`. */
async function waitWithinMaxSize(directory: string, maxSize: number, timeout: number) {
  const { readdir, stat } = await import("node:fs/promises");
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
