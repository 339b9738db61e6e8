/**
 * The soak's options: `deno task soak [--quick] [--seed N] [--duration D] ...`
 * (`--help` lists them). `--quick` is the CI profile; every other option
 * defaults to the full profile.
 *
 * @module
 */
import { NO_STORE_FAULTS, type StoreFaultRates } from "./store.ts";

/** What one run does. */
export interface SoakOptions {
  seed: number;
  /** Milliseconds of workload. */
  duration: number;
  quick: boolean;
  servers: number;
  clients: number;
  images: number;
  largest: number;
  /**
   * Cluster mode: a directory per server, one PostgreSQL index, nodes that
   * fill from each other, database restarts.
   */
  cluster: boolean;
  /** The servers' runtime: Deno on the source, or Node on a bundle of it (single node only). */
  runtime: "deno" | "node";
  /** Cluster mode: restart the database every `dbRestartEvery` ms, on average (0: never). */
  dbRestartEvery: number;
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

export const MiB = 2 ** 20;

const USAGE = `Usage: deno task soak [--quick] [--seed N] [--duration 90s|10m|1h]
       [--servers N] [--clients N] [--images N] [--largest MiB] [--kill-every SECONDS]
       [--origin-faults P] [--no-store-faults] [--cluster] [--db-restart-every SECONDS] [--runtime deno|node] [--max-rss MiB] [--tmpfs MiB] [--strict] [--keep] [--verbose] [--json FILE]`;

function parseDuration(value: string): number {
  const match = /^(\d+(?:\.\d+)?)(ms|s|m|h)?$/.exec(value);
  if (match === null) throw new RangeError(`Invalid duration ${JSON.stringify(value)}`);
  const unit = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 }[match[2] ?? "s"] ?? 1000;
  return Number(match[1]) * unit;
}

export function parseArgs(args: string[]): SoakOptions {
  const flags = new Map<string, string>();
  for (let i = 0; i < args.length; i++) {
    const arg = args[i];
    if (!arg.startsWith("--")) {
      throw new TypeError(`Unexpected argument ${JSON.stringify(arg)}\n${USAGE}`);
    }
    const eq = arg.indexOf("=");
    if (eq !== -1) flags.set(arg.slice(2, eq), arg.slice(eq + 1));
    else if (
      ["quick", "keep", "verbose", "no-store-faults", "strict", "help", "cluster"].includes(
        arg.slice(2),
      )
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
    "cluster",
    "db-restart-every",
    "runtime",
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
  const runtime = flags.get("runtime") ?? "deno";
  if (runtime !== "deno" && runtime !== "node") {
    throw new TypeError(`--runtime must be deno or node, received ${runtime}\n${USAGE}`);
  }
  if (runtime === "node" && flags.has("cluster")) {
    throw new TypeError(`--runtime node runs single-node soaks only (no --cluster)\n${USAGE}`);
  }
  const storeFaults: StoreFaultRates = flags.has("no-store-faults") ? NO_STORE_FAULTS : {
    createWriter: 0.02,
    write: 0.0004,
    slowWrite: 0.01,
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
    cluster: flags.has("cluster"),
    runtime,
    dbRestartEvery: number("db-restart-every", quick ? 12 : 40) * 1000,
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
