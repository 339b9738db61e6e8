/**
 * `deno task bench:profile`: where a miss spends its time. Starts the
 * benchmark origin (the runtime's raw file server, on Deno) and one cache
 * server under the V8 CPU profiler (Deno and Node: `--cpu-prof`), downloads
 * one image through it, and prints the server's CPU per thread (from
 * `/proc`, exited threads included in the total) and the top functions by
 * self time of each profiled thread. Performance work starts here.
 *
 * ```sh
 * npx -y deno task bench:profile                       # Deno, 1 GiB, MD5
 * npx -y deno task bench:profile --runtime node --digest sha256 --size-mib 256
 * npx -y deno task bench:profile --mode pass           # the pass-through, for comparison
 * ```
 *
 * @module
 */
import { mkdtemp, readdir, readFile, rm } from "node:fs/promises";
import { join } from "node:path";
import { parseArgs } from "node:util";
import {
  cpuSeconds,
  download,
  findRuntimes,
  MiB,
  prepareData,
  type RuntimeName,
  startBenchServer,
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

async function main() {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      runtime: { type: "string", default: "deno" },
      mode: { type: "string", default: "cache" },
      digest: { type: "string", default: "md5" },
      "size-mib": { type: "string", default: "1024" },
    },
  });
  const name = values.runtime as RuntimeName;
  if (!["deno", "node"].includes(name)) {
    throw new TypeError(`Cannot profile: --runtime must be deno or node, received ${name}`);
  }
  const size = Number(values["size-mib"]) * MiB;
  const log = (line: string) => console.error(`[profile] ${line}`);
  const data = await prepareData({ profiled: size }, log);
  const [deno] = await findRuntimes(["deno"], log);
  const [runtime] = await findRuntimes([name], log);
  const origin = await startBenchServer(deno, { mode: "raw", data: data.dir });
  const profiles = await mkdtemp(join(WORK, "profile-"));
  const cache = await mkdtemp(join(WORK, "profile-cache-"));
  const flags = name === "deno"
    ? ["--cpu-prof", `--cpu-prof-dir=${profiles}`]
    : ["--cpu-prof", `--cpu-prof-dir=${profiles}`];
  const server = await startBenchServer(
    { ...runtime, serverFlags: [...runtime.serverFlags, ...flags] },
    { mode: values.mode, origin: origin.url, cache, digest: values.digest },
  );
  try {
    const before = cpuSeconds(server.pid);
    const { results, wall } = await download([`${server.url}/v2/images/profiled/file`]);
    const cpu = cpuSeconds(server.pid) - before;
    if (results[0].bytes !== size) throw new Error(`Downloaded ${results[0].bytes} of ${size}`);
    console.log(
      `${runtime.version} ${values.mode} ${values.digest}: ${values["size-mib"]} MiB in ${
        wall.toFixed(2)
      } s (${(size / MiB / wall).toFixed(0)} MiB/s), server CPU ${cpu.toFixed(2)} s (${
        (cpu / (size / 2 ** 30)).toFixed(2)
      } s per GiB)`,
    );
  } finally {
    await server.stop();
    await origin.stop();
  }
  for (const file of (await readdir(profiles)).sort()) {
    const profile = JSON.parse(await readFile(join(profiles, file), "utf8"));
    const thread = /worker/.test(file) ? "worker thread" : "main thread";
    console.log(`\n${thread} (${file}):`);
    for (const { name, ms, share } of topFunctions(profile)) {
      console.log(
        `  ${ms.toFixed(0).padStart(7)} ms  ${(share * 100).toFixed(1).padStart(5)}%  ${name}`,
      );
    }
  }
  await rm(profiles, { recursive: true, force: true });
  await rm(cache, { recursive: true, force: true });
}

if (import.meta.main) await main();
