/**
 * Cluster mode's figures: `deno task bench:cluster [--size 64M] [--runs N]`.
 *
 * 1. **Cold start across 3 nodes**: 3 node processes (Deno, FileSystemStore
 *    each, one throwaway PostgreSQL) × 10 clients ask one image at once:
 *    origin bytes / image size (target 1.0), and the last client's time /
 *    a single node's (no cluster) cold start with 30 clients: the same
 *    bytes to the same number of clients, from one process instead of three.
 * 2. **What the index costs a hit**: 64 KiB hits, 16 at a time, on a node
 *    in cluster mode / on a node without (target: nothing measurable).
 *
 * Medians of 3 runs (`--runs N`). Prints a Markdown table and writes it,
 * with the date, machine and versions, into docs/cluster.md and
 * docs/benchmarks.md (between `<!-- bench:cluster:begin -->` and
 * `<!-- bench:cluster:end -->`; `--no-docs` leaves them).
 *
 * @module
 */
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Hono } from "hono";
import { FileSystemStore, imageCache, joinCluster } from "../../mod.ts";
import { demoOrigin, generatedDigests } from "../../testing.ts";
import { startPostgres } from "../../tests/_postgres.ts";
import { replaceBetween } from "./report.ts";

const SECRET = "bench-cluster-secret-0123";

/** A node of the bench: run as a child process with `--node <dir> <origin> [database]`. */
async function runNode(dir: string, origin: string, database?: string) {
  const store = new FileSystemStore({ directory: dir });
  const app = new Hono();
  const server = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: () => {} },
    (request) => app.fetch(request),
  );
  const selfUrl = `http://127.0.0.1:${server.addr.port}`;
  const cluster = database === undefined ? undefined : await joinCluster({
    store,
    database,
    selfUrl,
    secret: SECRET,
    onLog: () => {},
  });
  app.use(imageCache({ store, cluster, onError: () => {} }));
  app.all("*", (c) => fetch(`${origin}${c.req.path}`));
  console.log(JSON.stringify({ port: server.addr.port }));
}

interface Child {
  url: string;
  process: Deno.ChildProcess;
}

async function startNode(dir: string, origin: string, database?: string): Promise<Child> {
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "-A",
      import.meta.filename!,
      "--node",
      dir,
      origin,
      ...(database ? [database] : []),
    ],
    stdout: "piped",
    stderr: "inherit",
  }).spawn();
  const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let output = "";
  for (let i = 0; i < 100; i++) {
    const { done, value } = await reader.read();
    if (done) break;
    output += value;
    const match = /\{"port":(\d+)\}/.exec(output);
    if (match) {
      reader.releaseLock();
      child.stdout.cancel().catch(() => {});
      return { url: `http://127.0.0.1:${match[1]}`, process: child };
    }
  }
  throw new Error(`No port from the node: ${output}`);
}

async function drain(url: string): Promise<number> {
  const res = await fetch(url);
  let n = 0;
  for await (const chunk of res.body!) n += chunk.byteLength;
  return n;
}

/** The time (ms) until the last of `clients` requests per node has its whole body. */
async function coldStart(nodes: Child[], clients: number, size: number): Promise<number> {
  const started = performance.now();
  const sizes = await Promise.all(
    nodes.flatMap((node) =>
      Array.from({ length: clients }, () => drain(`${node.url}/v2/images/img/file`))
    ),
  );
  if (sizes.some((n) => n !== size)) throw new Error(`Short bodies: ${sizes}`);
  return performance.now() - started;
}

/** Hits per second: `total` requests of a small image, `concurrency` at a time. */
async function hitRate(node: Child, total: number, concurrency: number): Promise<number> {
  await drain(`${node.url}/v2/images/small/file`);
  await drain(`${node.url}/v2/images/small/file`);
  let next = 0;
  const started = performance.now();
  await Promise.all(Array.from({ length: concurrency }, async () => {
    while (next++ < total) await drain(`${node.url}/v2/images/small/file`);
  }));
  return total / ((performance.now() - started) / 1000);
}

function parseSize(text: string): number {
  const match = /^(\d+)([KMG]?)$/i.exec(text);
  if (match === null) throw new TypeError(`--size must be like 256M, received ${text}`);
  return Number(match[1]) * 1024 ** " KMG".indexOf(match[2].toUpperCase() || " ");
}

async function main() {
  const flag = (name: string) => {
    const at = Deno.args.indexOf(name);
    return at === -1 ? undefined : Deno.args[at + 1];
  };
  const size = parseSize(flag("--size") ?? "256M");
  const runs = Number(flag("--runs") ?? 3);
  const pg = await startPostgres();
  if (typeof pg === "string") throw new Error(pg);
  const origin = demoOrigin({ images: { img: { size }, small: { size: 64 * 1024 } } });
  await generatedDigests("img", size);
  const originServer = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: () => {} },
    origin.app.fetch,
  );
  const originUrl = `http://127.0.0.1:${originServer.addr.port}`;
  const work = await mkdtemp(join(tmpdir(), "bench-cluster-"));
  const children: Child[] = [];
  const stopAll = async () => {
    for (const child of children.splice(0)) {
      child.process.kill("SIGKILL");
      await child.process.status;
    }
  };
  const singles: number[] = [];
  const clusters: number[] = [];
  const ratios: number[] = [];
  const plain: number[] = [];
  const clustered: number[] = [];
  try {
    for (let run = 0; run < runs; run++) {
      // A single node, no cluster: the reference cold start and hits.
      children.push(await startNode(join(work, `single${run}`), originUrl));
      singles.push(await coldStart(children, 30, size));
      plain.push(await hitRate(children[0], 3000, 16));
      await stopAll();

      const before = origin.stats.bytesSent;
      const database = await freshDatabase(pg.url, `bench_${run}`);
      for (let i = 0; i < 3; i++) {
        children.push(await startNode(join(work, `node${run}-${i}`), originUrl, database));
      }
      clusters.push(await coldStart(children, 10, size));
      ratios.push((origin.stats.bytesSent - before) / size);
      clustered.push(await hitRate(children[0], 3000, 16));
      await stopAll();
    }
  } finally {
    await stopAll();
    await originServer.shutdown();
    await pg.close();
    await rm(work, { recursive: true, force: true });
  }
  const single = median(singles);
  const cluster = median(clusters);
  const hits = median(plain);
  const clusterHits = median(clustered);
  const mib = (size / 2 ** 20).toFixed(0);
  const rows = [
    [
      `cold start, 3 nodes × 10 clients, ${mib} MiB: origin bytes / image size`,
      `${median(ratios).toFixed(2)} (every run: ${ratios.map((r) => r.toFixed(2)).join(", ")})`,
      "1.0",
    ],
    [
      "cold start: last client, 3 nodes × 10 clients / 1 node × 30 clients (no cluster)",
      `${(cluster / single).toFixed(2)} (${cluster.toFixed(0)} ms / ${single.toFixed(0)} ms)`,
      "—",
    ],
    [
      "64 KiB hits, 16 at a time: cluster node / single node",
      `${(clusterHits / hits).toFixed(2)} (${clusterHits.toFixed(0)} / ${hits.toFixed(0)} req/s)`,
      "nothing measurable (≈ 1.0)",
    ],
  ];
  const machine =
    `${Deno.build.os}, ${navigator.hardwareConcurrency} cores, deno ${Deno.version.deno}, ${
      (await Deno.readTextFile("/proc/loadavg").catch(() => "? ")).split(" ")[0]
    } load`;
  const table = [
    BEGIN,
    "",
    `Medians of ${runs} runs, ${new Date().toISOString().slice(0, 10)} (${machine}), written by`,
    "`deno task bench:cluster`.",
    "",
    "| measure | result | target |",
    "| --- | --- | --- |",
    ...rows.map((row) => `| ${row.join(" | ")} |`),
    "",
    END,
  ].join("\n");
  console.log(table);
  if (!Deno.args.includes("--no-docs")) {
    const root = new URL("../..", import.meta.url).pathname;
    for (const doc of ["docs/cluster.md", "docs/benchmarks.md"]) {
      await replaceBetween(join(root, doc), BEGIN, END, table);
    }
    await new Deno.Command(Deno.execPath(), {
      args: ["fmt", "--quiet", "docs/cluster.md", "docs/benchmarks.md"],
      cwd: root,
    }).output();
  }
}

const BEGIN = "<!-- bench:cluster:begin -->";
const END = "<!-- bench:cluster:end -->";

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 === 1 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

/** A new, empty database on the throwaway server: each run starts with no index. */
async function freshDatabase(url: string, name: string): Promise<string> {
  const { default: postgres } = await import("postgres");
  const sql = postgres(url, { max: 1, onnotice: () => {} });
  try {
    await sql.unsafe(`DROP DATABASE IF EXISTS ${name}`);
    await sql.unsafe(`CREATE DATABASE ${name}`);
  } finally {
    await sql.end({ timeout: 1 });
  }
  return url.replace(/\/[^/]*$/, `/${name}`);
}

if (import.meta.main) {
  if (Deno.args[0] === "--node") await runNode(Deno.args[1], Deno.args[2], Deno.args[3]);
  else await main();
}
