/**
 * `deno task bench:profile`: where a miss spends its time. Starts the
 * benchmark origin (the runtime's raw file server, on Deno) and one cache
 * server under the V8 CPU profiler (Deno and Node: `--cpu-prof`; Bun has none), downloads
 * one image through it, and prints the server's CPU per thread (from
 * `/proc`, exited threads included in the total) and the top functions by
 * self time of each profiled thread. Performance work starts here.
 *
 * ```sh
 * npx -y deno task bench:profile                       # Deno, 1 GiB, MD5
 * npx -y deno task bench:profile --runtime node --digest sha256 --size-mib 256
 * npx -y deno task bench:profile --runtime bun             # CPU by thread only
 * npx -y deno task bench:profile --docs    # every runtime, pass and cache: docs/benchmarks.md
 * npx -y deno task bench:profile --mode pass           # the pass-through, for comparison
 * npx -y deno task bench:profile --mode hit            # a hit (the second download); --mode raw: its baseline
 * npx -y deno task bench:profile --runtime node --v8-flags=--max-semi-space-size=4  # other V8 flags
 * ```
 *
 * `--v8-flags LIST` (space-separated) replaces the V8 flags every benchmark
 * server runs with (`SERVER_FLAGS` in lib.ts; `--v8-flags ""`: none).
 *
 * @module
 */
import { mkdtemp, readdir, readFile, rm } from "node:fs/promises";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { replaceBetween } from "./report.ts";
import {
  cpuSeconds,
  download,
  findRuntimes,
  MiB,
  prepareData,
  type Runtime,
  type RuntimeName,
  startBenchServer,
  watchPeak,
  WORK,
} from "./lib.ts";

interface Node {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
}

/** Self time by function of a `.cpuprofile`, largest first. */
export function topFunctions(profile: {
  nodes: Node[];
  samples: number[];
  timeDeltas: number[];
}, count = 15): { name: string; ms: number; share: number }[] {
  const byNode = new Map<number, number>();
  profile.samples.forEach((id, i) => byNode.set(id, (byNode.get(id) ?? 0) + profile.timeDeltas[i]));
  const frames = new Map(profile.nodes.map((node) => [node.id, node.callFrame]));
  const byName = new Map<string, number>();
  let total = 0;
  for (const [id, us] of byNode) {
    const frame = frames.get(id)!;
    const file = frame.url.split("/").pop() || "";
    const name = `${frame.functionName || "(anonymous)"}${
      file ? ` ${file}:${frame.lineNumber}` : ""
    }`;
    byName.set(name, (byName.get(name) ?? 0) + us);
    total += us;
  }
  return [...byName].sort((a, b) => b[1] - a[1]).slice(0, count)
    .map(([name, us]) => ({ name, ms: us / 1000, share: us / total }));
}

interface ThreadTime {
  name: string;
  seconds: number;
}

/** CPU seconds (user + system) of each thread of `pid`, by thread id, with its name. */
function threadTimes(pid: number): Map<number, ThreadTime> {
  const times = new Map<number, ThreadTime>();
  let tids: string[] = [];
  try {
    tids = [...Deno.readDirSync(`/proc/${pid}/task`)].map((entry) => entry.name);
  } catch {
    return times; // Gone.
  }
  for (const tid of tids) {
    try {
      const stat = Deno.readTextFileSync(`/proc/${pid}/task/${tid}/stat`);
      const name = stat.slice(stat.indexOf("(") + 1, stat.lastIndexOf(")"));
      const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
      times.set(Number(tid), { name, seconds: (Number(fields[11]) + Number(fields[12])) / 100 });
    } catch {
      // Exited meanwhile.
    }
  }
  return times;
}

/** The later sample of each thread, keeping threads that have exited since. */
function mergeThreads(
  earlier: Map<number, ThreadTime>,
  later: Map<number, ThreadTime>,
): Map<number, ThreadTime> {
  return new Map([...earlier, ...later]);
}

/** One profiled download: its speed, the server's CPU by thread and the hottest functions. */
interface Profiled {
  version: string;
  mode: string;
  mibPerSecond: number;
  cpuPerGiB: number;
  /** Peak resident memory of the server during the download, in MiB. */
  peakMiB: number;
  /** CPU seconds per GiB by thread name, largest first. */
  threads: [string, number][];
  /** Top functions by self time, per profiled thread ("main thread", "worker thread"). */
  functions: { thread: string; top: { name: string; ms: number; share: number }[] }[];
}

async function profileOnce(
  runtime: Runtime,
  deno: Runtime,
  dataDir: string,
  size: number,
  mode: string,
  digest: string,
  v8Flags: string[] | undefined,
): Promise<Profiled> {
  const origin = await startBenchServer(deno, { mode: "raw", data: dataDir });
  const profiles = await mkdtemp(join(WORK, "profile-"));
  const cache = await mkdtemp(join(WORK, "profile-cache-"));
  // Bun has no V8 profiler: its threads' CPU only.
  const flags = runtime.name === "bun" ? [] : ["--cpu-prof", `--cpu-prof-dir=${profiles}`];
  let serverFlags = runtime.serverFlags;
  if (v8Flags !== undefined && runtime.name !== "bun") {
    serverFlags = runtime.name === "deno" && v8Flags.length > 0
      ? [`--v8-flags=${v8Flags.join(",")}`]
      : v8Flags;
  }
  const gib = size / 2 ** 30;
  try {
    if (mode === "hit") {
      // Filled by a server of its own, so that the profile holds the hit alone.
      const filler = await startBenchServer(runtime, {
        mode: "cache",
        origin: origin.url,
        cache,
        digest,
      });
      try {
        const fill = await download([`${filler.url}/v2/images/profiled/file`]);
        if (fill.results[0].bytes !== size) throw new Error("The fill before the hit failed");
      } finally {
        await filler.stop();
      }
    }
    // `hit`: a cache server that has the image; `raw`: the runtime's own file serving.
    const server = await startBenchServer(
      { ...runtime, serverFlags: [...serverFlags, ...flags] },
      mode === "raw" ? { mode: "raw", data: dataDir } : {
        mode: mode === "hit" ? "cache" : mode as "cache" | "pass",
        origin: origin.url,
        cache,
        digest,
      },
    );
    let threads = new Map<number, ThreadTime>();
    let wall: number, cpu: number, peak: number;
    try {
      const peakWatch = watchPeak(server.pid);
      const before = cpuSeconds(server.pid);
      const start = threadTimes(server.pid);
      // Sampled while it runs, so threads that exit before the end still count.
      const sampler = setInterval(
        () => threads = mergeThreads(threads, threadTimes(server.pid)),
        100,
      );
      const downloaded = await download([`${server.url}/v2/images/profiled/file`]);
      clearInterval(sampler);
      peak = peakWatch.stop();
      wall = downloaded.wall;
      threads = mergeThreads(threads, threadTimes(server.pid));
      for (const [tid, time] of start) {
        const now = threads.get(tid);
        if (now !== undefined) now.seconds -= time.seconds;
      }
      cpu = cpuSeconds(server.pid) - before;
      const bytes = downloaded.results[0].bytes;
      if (bytes !== size) throw new Error(`Downloaded ${bytes} of ${size}`);
    } finally {
      await server.stop();
    }
    const byName = new Map<string, number>();
    for (const { name, seconds } of threads.values()) {
      byName.set(name, (byName.get(name) ?? 0) + seconds / gib);
    }
    const functions = [];
    for (const file of (await readdir(profiles)).sort()) {
      const profile = JSON.parse(await readFile(join(profiles, file), "utf8"));
      functions.push({
        thread: /worker/.test(file) ? "worker thread" : "main thread",
        top: topFunctions(profile),
      });
    }
    return {
      version: runtime.version,
      mode,
      mibPerSecond: size / MiB / wall,
      cpuPerGiB: cpu / gib,
      peakMiB: peak / MiB,
      threads: [...byName].filter(([, s]) => s >= 0.01).sort((a, b) => b[1] - a[1]),
      functions,
    };
  } finally {
    await origin.stop();
    await rm(profiles, { recursive: true, force: true });
    await rm(cache, { recursive: true, force: true });
  }
}

function printProfile(p: Profiled, digest: string) {
  console.log(
    `${p.version} ${p.mode} ${digest}: ${p.mibPerSecond.toFixed(0)} MiB/s, server CPU ${
      p.cpuPerGiB.toFixed(2)
    } s per GiB, peak RSS ${p.peakMiB.toFixed(0)} MiB`,
  );
  console.log("\nCPU by thread (from /proc, during the download), s per GiB:");
  for (const [name, seconds] of p.threads) {
    console.log(`  ${seconds.toFixed(2).padStart(7)} s  ${name}`);
  }
  for (const { thread, top } of p.functions) {
    console.log(`\n${thread}:`);
    for (const { name, ms, share } of top) {
      console.log(
        `  ${ms.toFixed(0).padStart(7)} ms  ${(share * 100).toFixed(1).padStart(5)}%  ${name}`,
      );
    }
  }
}

const BEGIN = "<!-- profile:begin -->";
const END = "<!-- profile:end -->";

/** The docs' table: each runtime's pass-through and fill, CPU by thread and the main thread's top costs. */
function profileMarkdown(profiles: Profiled[], digest: string, sizeMiB: number): string {
  const cell = (p: Profiled) =>
    p.threads.slice(0, 5).map(([name, s]) => `${name.trim()} ${s.toFixed(2)}`).join(", ");
  const hottest = (p: Profiled) => {
    const main = p.functions.find((f) => f.thread === "main thread");
    if (main === undefined) return "(no profiler)";
    return main.top.filter((f) => f.name !== "(idle)" && f.name !== "(program)").slice(0, 3)
      .map((f) => `${f.name.replace(/\|/g, "\\|")} ${(f.ms / (sizeMiB / 1024) / 1000).toFixed(2)}`)
      .join(", ");
  };
  const load = Deno.loadavg()[0].toFixed(2);
  return [
    BEGIN,
    "<!-- Written by `deno task bench:profile --docs`: edits here are overwritten. -->",
    "",
    `One client, ${sizeMiB} MiB, ${digest.toUpperCase()}, one run each, ${
      new Date().toISOString().slice(0, 10)
    } (${Deno.build.os}, ${navigator.hardwareConcurrency} cores, load ${load} at the end). CPU in s per GiB.`,
    "",
    "| runtime | mode | MiB/s | server CPU | by thread | main thread's top self time |",
    "| --- | --- | --- | --- | --- | --- |",
    ...profiles.map((p) =>
      `| ${p.version} | ${p.mode} | ${p.mibPerSecond.toFixed(0)} | ${p.cpuPerGiB.toFixed(2)} | ${
        cell(p)
      } | ${hottest(p)} |`
    ),
    "",
    END,
  ].join("\n");
}

async function main() {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      runtime: { type: "string", default: "deno" },
      mode: { type: "string", default: "cache" },
      digest: { type: "string", default: "md5" },
      "size-mib": { type: "string", default: "1024" },
      docs: { type: "boolean", default: false },
      "v8-flags": { type: "string" },
    },
  });
  const names = (values.docs ? ["deno", "bun", "node"] : [values.runtime]) as RuntimeName[];
  for (const name of names) {
    if (!["deno", "node", "bun"].includes(name)) {
      throw new TypeError(`Cannot profile: --runtime must be deno, bun or node, received ${name}`);
    }
  }
  const size = Number(values["size-mib"]) * MiB;
  const log = (line: string) => console.error(`[profile] ${line}`);
  const data = await prepareData({ profiled: size }, log);
  const [deno] = await findRuntimes(["deno"], log);
  const runtimes = await findRuntimes(names, log);
  const modes = values.docs ? ["pass", "cache", "raw", "hit"] : [values.mode];
  for (const mode of modes) {
    if (!["pass", "cache", "raw", "hit"].includes(mode)) {
      throw new TypeError(
        `Cannot profile: --mode must be pass, cache, raw or hit, received ${mode}`,
      );
    }
  }
  const profiles: Profiled[] = [];
  for (const runtime of runtimes) {
    for (const mode of modes) {
      const v8Flags = values["v8-flags"]?.split(/\s+/).filter((flag) => flag !== "");
      const p = await profileOnce(runtime, deno, data.dir, size, mode, values.digest, v8Flags);
      printProfile(p, values.digest);
      profiles.push(p);
    }
  }
  if (values.docs) {
    const root = new URL("../..", import.meta.url).pathname;
    await replaceBetween(
      join(root, "docs/benchmarks.md"),
      BEGIN,
      END,
      profileMarkdown(profiles, values.digest, Number(values["size-mib"])),
    );
    await new Deno.Command(Deno.execPath(), {
      args: ["fmt", "--quiet", "docs/benchmarks.md"],
      cwd: root,
    }).output();
    log("wrote docs/benchmarks.md");
  }
}

if (import.meta.main) await main();
