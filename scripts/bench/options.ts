/**
 * The bench's command line: `deno task bench [options]` (`--help` lists them).
 *
 * @module
 */
import { MiB, type RuntimeName } from "./lib.ts";

export const SECTIONS = ["hits", "small", "miss", "cold"] as const;
export type Section = typeof SECTIONS[number];

/** What one run measures, and how. */
export interface Options {
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
  /** Rewrite the figures of docs/benchmarks.md at the end of the run. */
  docs: boolean;
}

export function parseOptions(args: string[]): Options {
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
    "--no-docs",
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
    docs: !args.includes("--no-docs"),
  };
}

export const USAGE = `deno task bench [options]

  --quick               1 run, 256 MiB / 64 MiB images, 2 s of wrk
  --runs N              runs per measurement (default 3; medians are reported)
  --runtimes LIST       deno,bun,node (default: all three)
  --only LIST           hits,small,miss,cold (default: all)
  --size-mib N          the big image (default 1024)
  --cold-mib N          the cold-start image (default 256)
  --clients N           cold-start clients (default 50)
  --wrk-seconds N       duration of each wrk run (default 5)
  --no-install          do not apt-get install nginx / wrk when missing
  --no-nginx            skip the nginx reference
  --no-docs             do not rewrite the figures in docs/benchmarks.md`;
