/**
 * Helpers of `scripts/bench/bench.ts` and `scripts/bench/memory_check.ts` (Deno only):
 * tools and runtimes, test data, server processes, clients (the lean download client, wrk),
 * nginx, and the resident memory of a process tree.
 *
 * @module
 */
import { createHash } from "node:crypto";
import { mkdir, readFile, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import type { DownloadResult } from "./client.ts";

export const MiB = 2 ** 20;
export const GiB = 2 ** 30;

/** Where the benchmark keeps its data, runtimes' node_modules and temporary caches. */
export const WORK = Deno.env.get("BENCH_WORK_DIR") ?? "/tmp/hono-image-cache-bench";
/** The repository root (the grandparent of `scripts/bench/`). */
export const ROOT = new URL("../..", import.meta.url).pathname.replace(/\/$/, "");
/** This folder, `scripts/bench/`: the scripts the bench starts. */
const HERE = new URL(".", import.meta.url).pathname.replace(/\/$/, "");

// ---------------------------------------------------------------------------
// Small utilities

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Median of numbers (`NaN` for none). */
export function median(values: number[]): number {
  const sorted = values.filter((v) => Number.isFinite(v)).sort((a, b) => a - b);
  if (sorted.length === 0) return NaN;
  const mid = sorted.length >> 1;
  return sorted.length % 2 === 1 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

/** Runs a command to the end with a timeout; returns its output. Never throws for an exit code. */
export async function run(
  cmd: string,
  args: string[],
  options: { timeoutMs?: number; cwd?: string; env?: Record<string, string> } = {},
): Promise<{ code: number; stdout: string; stderr: string }> {
  const ac = new AbortController();
  const timer = setTimeout(() => ac.abort(), options.timeoutMs ?? 120_000);
  try {
    const out = await new Deno.Command(cmd, {
      args,
      cwd: options.cwd,
      env: options.env,
      stdout: "piped",
      stderr: "piped",
      stdin: "null",
      signal: ac.signal,
    }).output();
    const decode = (b: Uint8Array) => new TextDecoder().decode(b);
    return { code: out.code, stdout: decode(out.stdout), stderr: decode(out.stderr) };
  } catch (error) {
    return { code: -1, stdout: "", stderr: String(error) };
  } finally {
    clearTimeout(timer);
  }
}

/** The absolute path of a command on `PATH`, or `undefined`. */
export async function which(name: string): Promise<string | undefined> {
  for (const dir of (Deno.env.get("PATH") ?? "").split(":").concat(["/usr/sbin", "/sbin"])) {
    const path = join(dir || ".", name);
    try {
      const info = await Deno.stat(path);
      if (info.isFile && (info.mode ?? 0o111) & 0o111) return path;
    } catch {
      // Not here.
    }
  }
  return undefined;
}

/** A free TCP port on 127.0.0.1 (bound, read, released). */
export function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  return port;
}

// ---------------------------------------------------------------------------
// Tools

export interface Tools {
  wrk?: string;
  nginx?: string;
}

/**
 * Finds wrk and nginx; installs the missing ones from Debian packages
 * (`apt-get install -y wrk nginx-light`, else `nginx`) unless `install` is false.
 */
export async function ensureTools(install: boolean, log: (line: string) => void): Promise<Tools> {
  const find = async () => ({ wrk: await which("wrk"), nginx: await which("nginx") });
  let tools = await find();
  if (install && (!tools.wrk || !tools.nginx)) {
    const apt = await which("apt-get");
    if (apt !== undefined) {
      log("installing wrk and nginx with apt-get (once)...");
      const env = { DEBIAN_FRONTEND: "noninteractive" };
      await run(apt, ["update", "-qq"], { timeoutMs: 300_000, env });
      if (!tools.wrk) await run(apt, ["install", "-y", "-qq", "wrk"], { timeoutMs: 300_000, env });
      if (!tools.nginx) {
        const light = await run(apt, ["install", "-y", "-qq", "nginx-light"], {
          timeoutMs: 300_000,
          env,
        });
        if (light.code !== 0) {
          await run(apt, ["install", "-y", "-qq", "nginx"], { timeoutMs: 300_000, env });
        }
      }
      tools = await find();
    }
  }
  return tools;
}

// ---------------------------------------------------------------------------
// Runtimes

export type RuntimeName = "deno" | "bun" | "node";

/** How to start a script of this repository on one runtime. */
/**
 * The flags the shipped proxy runs with (deno.json's `serve` task, the npm
 * `bin`), given to every benchmark server of a runtime alike. V8's default
 * young generation keeps the chunks of a stream alive until a major
 * collection: with a 1 MiB semi-space, a 1 GiB fill measured 96 MiB of peak
 * RSS instead of 146 (Deno), and pass-through and fills ran faster on Node.
 * Bun's engine has no such setting.
 */
export const SERVER_FLAGS: Record<RuntimeName, string[]> = {
  deno: ["--v8-flags=--max-semi-space-size=1"],
  node: ["--max-semi-space-size=1"],
  bun: [],
};

export interface Runtime {
  name: RuntimeName;
  /** `deno 2.x`, `bun 1.x`, `node v24.x`. */
  version: string;
  /** Command and arguments before the script path. */
  command: string;
  args: string[];
  /** Runtime flags every benchmark server (raw, pass, cache) runs with: {@linkcode SERVER_FLAGS}. */
  serverFlags: string[];
  /** The path of `scripts/bench/<name>.ts` for this runtime (the source, or its bundle). */
  script(name: string): string;
}

async function npxExecPath(pkg: string): Promise<string | undefined> {
  const out = await run("npx", ["-y", pkg, "-e", "console.log(process.execPath)"], {
    timeoutMs: 300_000,
  });
  const path = out.stdout.trim().split("\n").pop();
  return out.code === 0 && path ? path : undefined;
}

const BUNDLED = ["server", "hash"];

/**
 * Bundles the bench scripts with the library and `hono` into plain
 * JavaScript (`deno bundle`, esbuild) in `WORK/lib`, for Node and Bun: no
 * `node_modules`, no type stripping at run time (whose loader would add
 * some 40 MiB to Node's resident memory).
 */
async function bundleScripts(log: (line: string) => void): Promise<string> {
  const lib = join(WORK, "lib");
  await mkdir(lib, { recursive: true });
  log(`bundling ${BUNDLED.join(", ")} for Node and Bun (deno bundle) ...`);
  for (const name of BUNDLED) {
    const out = await run(Deno.execPath(), [
      "bundle",
      "--quiet",
      "--platform",
      "deno",
      "-o",
      join(lib, `${name}.mjs`),
      join(HERE, `${name}.ts`),
    ], { cwd: ROOT, timeoutMs: 300_000 });
    if (out.code !== 0) throw new Error(`deno bundle ${name}.ts failed: ${out.stderr}`);
  }
  return lib;
}

/**
 * The runtimes to measure. Deno is the one running this script, on the
 * source; Bun comes from `npx -y bun` and Node is the machine's `node` when
 * it is 22+, else `npx -y node@24`; both run a bundle of the source.
 */
export async function findRuntimes(
  names: RuntimeName[],
  log: (line: string) => void,
): Promise<Runtime[]> {
  const runtimes: Runtime[] = [];
  let lib: string | undefined;
  for (const name of names) {
    if (name === "deno") {
      runtimes.push({
        name,
        version: `deno ${Deno.version.deno}`,
        command: Deno.execPath(),
        args: ["run", "-A", "--quiet"],
        serverFlags: SERVER_FLAGS.deno,
        script: (file) => join(HERE, `${file}.ts`),
      });
      continue;
    }
    lib ??= await bundleScripts(log);
    const bundle = (file: string) => join(lib!, `${file}.mjs`);
    if (name === "bun") {
      const bun = await npxExecPath("bun");
      if (bun === undefined) {
        log("bun not available (npx -y bun failed): skipped");
        continue;
      }
      const version = (await run(bun, ["--version"])).stdout.trim();
      runtimes.push({
        name,
        version: `bun ${version}`,
        command: bun,
        args: [],
        serverFlags: SERVER_FLAGS.bun,
        script: bundle,
      });
      continue;
    }
    let node = await which("node");
    let version = node ? (await run(node, ["--version"])).stdout.trim() : "";
    if (!node || Number(version.replace(/^v/, "").split(".")[0]) < 22) {
      node = await npxExecPath("node@24");
      version = node ? (await run(node, ["--version"])).stdout.trim() : "";
    }
    if (node === undefined) {
      log("node 22+ not available (npx -y node@24 failed): skipped");
      continue;
    }
    runtimes.push({
      name,
      version: `node ${version}`,
      command: node,
      args: [],
      serverFlags: SERVER_FLAGS.node,
      script: bundle,
    });
  }
  return runtimes;
}

// ---------------------------------------------------------------------------
// Test data

export interface DataSet {
  dir: string;
  /** Size in bytes, by id. */
  sizes: Record<string, number>;
  digests: Record<string, { md5: string; sha256: string }>;
}

/**
 * Images of pseudo-random bytes in `WORK/data` (kept between runs when the
 * sizes match), with their MD5 and SHA-256 in `digests.json`.
 */
export async function prepareData(
  sizes: Record<string, number>,
  log: (line: string) => void,
): Promise<DataSet> {
  const dir = join(WORK, "data");
  await mkdir(dir, { recursive: true });
  const digestsPath = join(dir, "digests.json");
  const known = JSON.parse(await readFile(digestsPath, "utf8").catch(() => "{}")) as Record<
    string,
    { md5: string; sha256: string; size: number }
  >;
  const block = new Uint8Array(MiB);
  for (let at = 0; at < block.length; at += 65536) {
    crypto.getRandomValues(block.subarray(at, at + 65536));
  }
  for (const [id, size] of Object.entries(sizes)) {
    const onDisk = await stat(join(dir, id)).then((s) => s.size, () => -1);
    if (onDisk === size && known[id]?.size === size) continue;
    log(`writing ${id} (${formatBytes(size)}) in ${dir} ...`);
    const md5 = createHash("md5");
    const sha256 = createHash("sha256");
    const file = await Deno.open(join(dir, id), { write: true, create: true, truncate: true });
    try {
      for (let at = 0; at < size; at += MiB) {
        const chunk = block.slice(0, Math.min(MiB, size - at));
        // Vary each MiB, so no two blocks of an image are equal.
        new DataView(chunk.buffer).setUint32(0, (at / MiB) ^ size, true);
        md5.update(chunk);
        sha256.update(chunk);
        for (let done = 0; done < chunk.length;) done += await file.write(chunk.subarray(done));
      }
    } finally {
      file.close();
    }
    known[id] = { md5: md5.digest("hex"), sha256: sha256.digest("hex"), size };
    await writeFile(digestsPath, JSON.stringify(known, null, 2));
  }
  const digests: DataSet["digests"] = {};
  for (const id of Object.keys(sizes)) digests[id] = known[id];
  return { dir, sizes, digests };
}

/** Reads files once so they sit in the page cache. */
export async function warmPageCache(paths: string[]): Promise<void> {
  const buffer = new Uint8Array(4 * MiB);
  for (const path of paths) {
    const file = await Deno.open(path);
    try {
      while ((await file.read(buffer)) !== null) { /* reading is the point */ }
    } finally {
      file.close();
    }
  }
}

export function formatBytes(bytes: number): string {
  if (bytes >= GiB && bytes % GiB === 0) return `${bytes / GiB} GiB`;
  if (bytes >= MiB) return `${Math.round(bytes / MiB)} MiB`;
  return `${Math.round(bytes / 1024)} KiB`;
}

// ---------------------------------------------------------------------------
// Processes and memory

/** A process this script started. */
export interface Proc {
  pid: number;
  /** Stops it: SIGTERM, then SIGKILL after 5 s. */
  stop(): Promise<void>;
  /** The last few KiB of its stderr, for error messages. */
  stderr(): string;
}

function tail(limit: number) {
  let text = "";
  return {
    add(chunk: string) {
      text = (text + chunk).slice(-limit);
    },
    get: () => text,
  };
}

/**
 * Starts a long-running process; resolves once a line of its stdout matches
 * `ready` (returning the match) or rejects after `timeoutMs`.
 */
export async function spawn(
  command: string,
  args: string[],
  options: {
    cwd?: string;
    ready?: RegExp;
    timeoutMs?: number;
    onStderrLine?: (line: string) => void;
  },
): Promise<{ proc: Proc; match: RegExpExecArray | null }> {
  const child = new Deno.Command(command, {
    args,
    cwd: options.cwd,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const errors = tail(8192);
  const status = child.status;
  let exited = false;
  status.then(() => exited = true);
  (async () => {
    let partial = "";
    for await (const chunk of child.stderr.pipeThrough(new TextDecoderStream())) {
      if (options.onStderrLine === undefined) {
        errors.add(chunk);
        continue;
      }
      const lines = (partial + chunk).split("\n");
      partial = lines.pop() ?? "";
      for (const line of lines) {
        if (line.startsWith("MEM ")) options.onStderrLine(line);
        else errors.add(line + "\n");
      }
    }
  })().catch(() => {});
  let resolveReady!: (m: RegExpExecArray | null) => void;
  const ready = new Promise<RegExpExecArray | null>((r) => resolveReady = r);
  if (options.ready === undefined) resolveReady(null);
  (async () => {
    let buffered = "";
    for await (const chunk of child.stdout.pipeThrough(new TextDecoderStream())) {
      if (options.ready === undefined) continue;
      buffered += chunk;
      const lines = buffered.split("\n");
      buffered = lines.pop() ?? "";
      for (const line of lines) {
        const match = options.ready.exec(line);
        if (match !== null) resolveReady(match);
      }
    }
  })().catch(() => {});
  const proc: Proc = {
    pid: child.pid,
    stderr: errors.get,
    async stop() {
      if (exited) return;
      try {
        child.kill("SIGTERM");
      } catch {
        return;
      }
      const timer = setTimeout(() => {
        try {
          child.kill("SIGKILL");
        } catch { /* gone */ }
      }, 5_000);
      await status;
      clearTimeout(timer);
    },
  };
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<"timeout">((r) => {
    timer = setTimeout(() => r("timeout"), options.timeoutMs ?? 60_000);
  });
  const result = await Promise.race([ready, status.then(() => "exited" as const), timeout]);
  clearTimeout(timer);
  if (result === "timeout" || result === "exited") {
    await proc.stop();
    throw new Error(
      `${command} ${args.join(" ")} ${
        result === "exited" ? "exited" : "did not start in time"
      }:\n${errors.get()}`,
    );
  }
  return { proc, match: result };
}

/** A benchmark server (`scripts/bench/server.ts`) on a runtime. */
export interface BenchServer extends Proc {
  url: string;
  runtime: RuntimeName;
}

/** Starts `scripts/bench/server.ts` with `config` on `runtime`. */
export async function startBenchServer(
  runtime: Runtime,
  config: Record<string, unknown>,
  onStderrLine?: (line: string) => void,
): Promise<BenchServer> {
  const { proc, match } = await spawn(
    runtime.command,
    [...runtime.args, ...runtime.serverFlags, runtime.script("server"), JSON.stringify(config)],
    { cwd: ROOT, ready: /^READY (\d+)$/, timeoutMs: 120_000, onStderrLine },
  );
  return { ...proc, url: `http://127.0.0.1:${match![1]}`, runtime: runtime.name };
}

/** `pid` and its descendants. */
export function processTree(pid: number): number[] {
  const pids = [pid];
  for (let i = 0; i < pids.length && i < 64; i++) {
    try {
      for (const task of Deno.readDirSync(`/proc/${pids[i]}/task`)) {
        const children = Deno.readTextFileSync(`/proc/${pids[i]}/task/${task.name}/children`);
        for (const child of children.trim().split(/\s+/)) if (child) pids.push(Number(child));
      }
    } catch {
      // Gone, or no /proc.
    }
  }
  return pids;
}

function statusField(pid: number, field: string): number {
  try {
    const text = Deno.readTextFileSync(`/proc/${pid}/status`);
    const match = new RegExp(`^${field}:\\s+(\\d+) kB`, "m").exec(text);
    return match ? Number(match[1]) * 1024 : 0;
  } catch {
    return 0;
  }
}

/**
 * CPU time (user + system, all threads) used so far by a process tree, in
 * seconds. Unlike throughput, barely moved by other load on the machine.
 */
export function cpuSeconds(pid: number): number {
  let ticks = 0;
  for (const p of processTree(pid)) {
    try {
      const stat = Deno.readTextFileSync(`/proc/${p}/stat`);
      // Fields after the command name (which may hold spaces): utime is 14th, stime 15th.
      const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
      ticks += Number(fields[11]) + Number(fields[12]);
    } catch {
      // Gone.
    }
  }
  return ticks / 100; // USER_HZ
}

/** Current resident memory of a process tree, in bytes. */
export function rss(pid: number): number {
  return processTree(pid).reduce((sum, p) => sum + statusField(p, "VmRSS"), 0);
}

/**
 * Watches the peak resident memory of a process tree: the kernel's
 * high-water mark (`VmHWM`, reset through `clear_refs` where allowed) and
 * samples every 20 ms, whichever is higher.
 */
export function watchPeak(pid: number): { stop(): number } {
  const pids = processTree(pid);
  for (const p of pids) {
    try {
      Deno.writeTextFileSync(`/proc/${p}/clear_refs`, "5");
    } catch {
      // Not allowed: the samples alone tell the peak.
    }
  }
  let sampled = rss(pid);
  const timer = setInterval(() => sampled = Math.max(sampled, rss(pid)), 20);
  return {
    stop() {
      clearInterval(timer);
      const hwm = processTree(pid).reduce((sum, p) => sum + statusField(p, "VmHWM"), 0);
      return Math.max(sampled, hwm, rss(pid));
    },
  };
}

// ---------------------------------------------------------------------------
// Clients

export type { DownloadResult } from "./client.ts";

/**
 * Downloads every URL at once, one connection each, with the lean client
 * (`scripts/bench/client.ts`, its own Deno process); resolves with each
 * result and the wall time from the first connect to the last byte.
 */
export async function download(
  urls: string[],
  options: { rates?: number[]; delays?: number[]; verify?: string[]; timeoutS?: number } = {},
): Promise<{ results: DownloadResult[]; wall: number }> {
  const timeoutS = options.timeoutS ?? 300;
  const job = JSON.stringify({ ...options, urls, timeoutMs: timeoutS * 1000 });
  const out = await run(
    Deno.execPath(),
    ["run", "-A", "--quiet", join(HERE, "client.ts"), job],
    { cwd: ROOT, timeoutMs: (timeoutS + 30) * 1000 },
  );
  try {
    return JSON.parse(out.stdout.trim().split("\n").pop() ?? "");
  } catch {
    throw new Error(`Download client failed (${out.code}): ${out.stderr.slice(-2000)}`);
  }
}

export interface WrkResult {
  rps: number;
  p99ms: number;
  errors: number;
}

function toMs(value: string, unit: string): number {
  const n = Number(value);
  return unit === "us" ? n / 1000 : unit === "s" ? n * 1000 : unit === "m" ? n * 60_000 : n;
}

/** `wrk -t<threads> -c<connections> -d<seconds>s --latency url`. */
export async function wrk(
  url: string,
  options: { connections: number; seconds: number; threads: number },
): Promise<WrkResult> {
  const out = await run("wrk", [
    `-t${options.threads}`,
    `-c${options.connections}`,
    `-d${options.seconds}s`,
    "--timeout",
    "10s",
    "--latency",
    url,
  ], { timeoutMs: (options.seconds + 30) * 1000 });
  const rps = /Requests\/sec:\s+([\d.]+)/.exec(out.stdout);
  const p99 = /^\s+99%\s+([\d.]+)(us|ms|s|m)\s*$/m.exec(out.stdout);
  const socket = /Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)/.exec(
    out.stdout,
  );
  const non2xx = /Non-2xx or 3xx responses: (\d+)/.exec(out.stdout);
  const errors = (socket ? socket.slice(1).reduce((s, v) => s + Number(v), 0) : 0) +
    (non2xx ? Number(non2xx[1]) : 0);
  if (rps === null) throw new Error(`wrk failed: ${out.stdout}${out.stderr}`);
  return { rps: Number(rps[1]), p99ms: p99 ? toMs(p99[1], p99[2]) : NaN, errors };
}

// ---------------------------------------------------------------------------
// nginx

export interface Nginx extends Proc {
  /** Port by server name. */
  ports: Record<string, number>;
  dir: string;
}

/**
 * Starts an nginx (one worker, sendfile, loopback only) in `dir` with the
 * given `server` blocks; `{{port:name}}` in a block is replaced by a free port.
 */
export async function startNginx(
  nginx: string,
  dir: string,
  servers: Record<string, string>,
  httpExtra = "",
  workers = 1,
): Promise<Nginx> {
  await mkdir(join(dir, "tmp"), { recursive: true });
  const ports: Record<string, number> = {};
  for (const name of Object.keys(servers)) ports[name] = freePort();
  const blocks = Object.entries(servers).map(([name, body]) =>
    `  server {\n    listen 127.0.0.1:${ports[name]};\n${body}\n  }`
  );
  const root = Deno.uid?.() === 0 ? "user root;\n" : "";
  const conf = `${root}worker_processes ${workers};
daemon off;
pid ${dir}/nginx.pid;
error_log ${dir}/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 1000000;
  keepalive_timeout 65s;
  default_type application/octet-stream;
  client_body_temp_path ${dir}/tmp/body;
  proxy_temp_path ${dir}/tmp/proxy;
  log_format bytes '$request_uri $status $body_bytes_sent';
${httpExtra}
${blocks.join("\n")}
}
`;
  await writeFile(join(dir, "nginx.conf"), conf);
  const { proc } = await spawn(nginx, ["-p", dir, "-c", join(dir, "nginx.conf")], {
    timeoutMs: 10_000,
  });
  // nginx prints nothing when it is up: wait for its ports.
  for (const port of Object.values(ports)) {
    const deadline = Date.now() + 10_000;
    for (;;) {
      try {
        (await Deno.connect({ hostname: "127.0.0.1", port })).close();
        break;
      } catch {
        if (Date.now() > deadline) {
          await proc.stop();
          const log = await readFile(join(dir, "error.log"), "utf8").catch(() => "");
          throw new Error(`nginx did not listen on ${port}: ${proc.stderr()}${log}`);
        }
        await sleep(50);
      }
    }
  }
  return { ...proc, ports, dir };
}

/** Sum of `$body_bytes_sent` of the access-log lines of `log` from byte `from` on. */
export async function loggedBytes(
  log: string,
  from: number,
): Promise<{ bytes: number; requests: number; size: number }> {
  const text = await readFile(log).catch(() => new Uint8Array());
  const lines = new TextDecoder().decode(text.subarray(from)).split("\n").filter(Boolean);
  let bytes = 0;
  for (const line of lines) bytes += Number(line.split(" ")[2]) || 0;
  return { bytes, requests: lines.length, size: text.byteLength };
}

/** Size of a file, 0 when missing. */
export async function fileSize(path: string): Promise<number> {
  return await stat(path).then((s) => s.size, () => 0);
}
