/**
 * The soak's cluster: server processes (scripts/soak/server.ts) sharing one
 * cache directory (or, in cluster mode, a directory each and one index). Starts them, reads what they report (store faults,
 * errors the cache passed to `onError`), kills them (`SIGKILL` at random
 * moments, or `SIGTERM`), restarts them, restarts one that crashed by itself
 * and watches their resident memory. A process that exits by itself is a
 * violation.
 *
 * @module
 */
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import type { Rng } from "./data.ts";
import { bump, type Ledger } from "./report.ts";
import type { SoakServerConfig } from "./server.ts";
import type { StoreFaultRates } from "./store.ts";

/** The server's source: Deno runs it; Node runs a bundle of it ({@linkcode nodeServer}). */
export const SERVER_SCRIPT = fileURLToPath(new URL("./server.ts", import.meta.url));
const MiB = 2 ** 20;

/** One server process, across its restarts. */
export interface Slot {
  index: number;
  child?: Deno.ChildProcess;
  pid?: number;
  url?: string;
  client?: Deno.HttpClient;
  up: boolean;
  incarnation: number;
  /** Kill times. */
  kills: number[];
  /** Times it was up and listening (each start). */
  starts: number[];
  /** Store faults reported, with their time. */
  faults: { at: number; kind: string }[];
  /** The last second's health, from `/proc` (for reports of a server that stopped answering). */
  health?: string;
  stderr: string[];
  expectExit: boolean;
  /** Exited by itself: the monitor restarts it. */
  crashed: boolean;
  peakRss: number;
  features: { cacheApi: boolean };
}

/** The harness itself failed (a server that cannot start, a tmpfs that cannot be mounted). */
export class HarnessError extends Error {}

/** What every server of a run shares. */
export type ClusterConfig = Omit<SoakServerConfig, "seed" | "index">;

/** Options of {@linkcode Cluster}. */
export interface ClusterOptions {
  servers: number;
  seed: number;
  ledger: Ledger;
  log: (line: string) => void;
  verbose: boolean;
  /** The command and arguments that run a server (default: Deno on scripts/soak/server.ts). */
  server?: string[];
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** The server processes of a run. */
export class Cluster {
  readonly slots: Slot[];
  /** Pids of processes that have exited (their owner records are dead). */
  readonly deadPids: Set<number> = new Set();
  /** Set once the run is being torn down: exits are expected from then on. */
  stopping = false;
  #config: ClusterConfig | undefined;
  readonly #options: ClusterOptions;

  constructor(options: ClusterOptions) {
    this.#options = options;
    this.slots = Array.from({ length: options.servers }, (_, index) => ({
      index,
      up: false,
      incarnation: 0,
      kills: [],
      starts: [],
      faults: [],
      stderr: [],
      expectExit: false,
      crashed: false,
      peakRss: 0,
      features: { cacheApi: false },
    }));
  }

  /** Sets what the servers are started with (the origin's URL is known once it listens). */
  configure(config: ClusterConfig): void {
    this.#config = config;
  }

  /** Whether a server mounts the management API. */
  get hasCacheApi(): boolean {
    return this.slots.some((s) => s.features.cacheApi);
  }

  /** A server that is up, picked at random, or `undefined` when none is. */
  pickUp(r: Rng): Slot | undefined {
    const up = this.slots.filter((s) => s.up);
    return up.length === 0 ? undefined : r.pick(up);
  }

  /** Whether server `index` was killed between `from` and `to`. */
  killedBetween(index: number, from: number, to: number): boolean {
    return this.slots[index].kills.some((at) => at >= from && at <= to);
  }

  /**
   * Whether server `index` was down (killed, not yet up again) at some
   * moment between `from` and `to`.
   */
  downBetween(index: number, from: number, to: number): boolean {
    const slot = this.slots[index];
    return slot.kills.some((killed) => {
      if (killed > to) return false;
      const back = slot.starts.find((at) => at >= killed);
      return back === undefined || back >= from;
    });
  }

  /** The cache directory of server `index`: one shared, or one each in cluster mode. */
  directoryOf(index: number): string {
    const config = this.#config!;
    return config.cluster === undefined ? config.directory : join(config.directory, `node${index}`);
  }

  /** Every cache directory of the run. */
  get directories(): string[] {
    return this.#config?.cluster === undefined
      ? [this.#config!.directory]
      : this.slots.map((slot) => this.directoryOf(slot.index));
  }

  /** Store faults of server `index` between `from` and `to`, by kind. */
  storeFaultsBetween(index: number, from: number, to: number): string[] {
    return this.slots[index].faults.filter((f) => f.at >= from && f.at <= to).map((f) => f.kind);
  }

  /** Starts (or restarts) the server of `slot`; resolves once it listens. */
  async start(slot: Slot, faults?: StoreFaultRates): Promise<void> {
    const { ledger, seed } = this.#options;
    slot.incarnation++;
    const config: SoakServerConfig = {
      ...this.#config!,
      storeFaults: faults ?? this.#config!.storeFaults,
      seed: (seed * 31 + slot.index * 7919 + slot.incarnation) >>> 0,
      index: slot.index,
      directory: this.directoryOf(slot.index),
    };
    const [command, ...args] = this.#options.server ??
      [Deno.execPath(), "run", "-A", "--quiet", SERVER_SCRIPT];
    const child = new Deno.Command(command, {
      args: [...args, JSON.stringify(config)],
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
            bump(ledger.counts.storeFaults, kind);
          } else if (line.startsWith("LOG ")) {
            // The cluster's own log (database lost or back, sources replaced): kept with
            // the server's stderr for a crash report, printed with --verbose.
            slot.stderr.push(`[pid ${pid}] ${line}`);
            if (slot.stderr.length > 60) slot.stderr.shift();
            if (this.#options.verbose) this.#options.log(`server ${slot.index}: ${line.slice(4)}`);
          } else if (line.startsWith("ERROR ")) {
            const message = line.slice(6);
            if (this.#options.verbose) this.#options.log(`server ${slot.index}: error: ${message}`);
            if (message.startsWith("unhandled")) {
              ledger.violation(
                { kind: "server-error", message },
                `server ${slot.index} (pid ${pid})`,
              );
            }
            bump(
              ledger.counts.cacheErrors,
              message.replace(/"[^"]*"/g, '"…"').replace(/[0-9a-f]{8,}|\d+/g, "N").slice(0, 90),
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
      this.deadPids.add(pid);
      if (slot.pid === pid) slot.up = false;
      if (!slot.expectExit && !this.stopping) {
        ledger.violation(
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
        reject(new HarnessError(`server ${slot.index} did not start in 45 s:\n${stderr}`));
      }, 45_000);
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
    slot.starts.push(Date.now());
  }

  /** Stops the server of `slot` (`SIGKILL` by default, counted as a kill); waits for its exit. */
  async kill(slot: Slot, signal: Deno.Signal = "SIGKILL"): Promise<void> {
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
    if (slot.pid !== undefined) this.deadPids.add(slot.pid);
    const client = slot.client;
    slot.client = undefined;
    slot.child = undefined;
    // In-flight requests on the old client end with the process; close it after they noticed.
    setTimeout(() => client?.close(), 2000);
  }

  /** Kills every server and waits for them. */
  async killAll(): Promise<void> {
    await Promise.all(this.slots.map((slot) => this.kill(slot)));
  }

  /**
   * Until `deadline` (less 2 s), `SIGKILL`s a random server every
   * `killEvery` ms on average, restarts it and calls `afterRestart`.
   */
  async killer(
    r: Rng,
    killEvery: number,
    deadline: number,
    afterRestart: (slot: Slot) => Promise<unknown>,
  ): Promise<void> {
    const { ledger, log, verbose } = this.#options;
    if (killEvery <= 0) return;
    while (!this.stopping) {
      const wait = r.int(Math.floor(killEvery / 2), Math.floor(killEvery * 1.5));
      if (Date.now() + wait >= deadline - 2000) break;
      await sleep(wait);
      const slot = r.pick(this.slots);
      if (!slot.up) continue;
      await this.kill(slot);
      ledger.counts.kills++;
      if (verbose) log(`killed server ${slot.index} (pid ${slot.pid})`);
      await sleep(r.int(0, 500));
      await this.start(slot);
      ledger.counts.restarts++;
      await afterRestart(slot);
    }
  }

  /**
   * Until `deadline`, once a second: records each server's resident memory
   * (a violation above `maxRss`), restarts a server that crashed by itself,
   * and calls `progress` every 10 s.
   */
  async watch(deadline: number, maxRss: number, progress: () => void): Promise<void> {
    const { ledger } = this.#options;
    let last = Date.now();
    while (!this.stopping && Date.now() < deadline) {
      await sleep(1000);
      for (const slot of this.slots) {
        if (slot.pid === undefined || !slot.up) continue;
        const status = await readFile(`/proc/${slot.pid}/status`, "utf8").catch(() => "");
        const rss = Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? 0) * 1024;
        if (rss > maxRss && slot.peakRss <= maxRss) {
          ledger.violation(
            { kind: "memory", message: `server ${slot.index} at ${Math.round(rss / MiB)} MiB` },
            `pid ${slot.pid}, limit ${maxRss / MiB} MiB`,
          );
        }
        slot.peakRss = Math.max(slot.peakRss, rss);
        slot.health = await health(slot.pid, slot.health, rss);
      }
      // Restart a server that crashed by itself.
      for (const slot of this.slots) {
        if (!slot.crashed || this.stopping) continue;
        slot.crashed = false;
        slot.child = undefined;
        await this.start(slot);
        ledger.counts.restarts++;
      }
      if (Date.now() - last >= 10_000) {
        last = Date.now();
        progress();
      }
    }
  }
}

/** Mounts a tmpfs of `bytes` on `directory` (Linux, root): real `ENOSPC` for everything the store writes. */
export async function mountTmpfs(directory: string, bytes: number): Promise<string> {
  const size = `size=${Math.max(1, Math.ceil(bytes / MiB))}m`;
  const mount = await new Deno.Command("mount", {
    args: ["-t", "tmpfs", "-o", size, "tmpfs", directory],
    stderr: "piped",
  }).output().catch((error) => ({ success: false, stderr: new TextEncoder().encode(error) }));
  if (!mount.success) {
    throw new HarnessError(
      `cannot mount a tmpfs (Linux, root only): ${new TextDecoder().decode(mount.stderr)}`,
    );
  }
  return size;
}

/** Unmounts what {@linkcode mountTmpfs} mounted; resolves whether it worked. */
export async function unmount(directory: string): Promise<boolean> {
  const umount = await new Deno.Command("umount", { args: [directory], stderr: "piped" })
    .output().catch(() => undefined);
  return umount?.success === true;
}

/**
 * The command that runs a soak server on Node (`--runtime node`): a bundle
 * of scripts/soak/server.ts (`deno bundle`: the library and its npm
 * dependencies inlined, no type stripping) in `directory`, run by the
 * machine's `node` when it is 22+, else by `npx -y node@24`.
 */
export async function nodeServer(directory: string): Promise<string[]> {
  const bundle = join(directory, "server.mjs");
  const bundled = await new Deno.Command(Deno.execPath(), {
    args: ["bundle", "--quiet", "--platform", "deno", "-o", bundle, SERVER_SCRIPT],
    stdout: "piped",
    stderr: "piped",
  }).output();
  if (!bundled.success) {
    throw new HarnessError(
      `Cannot bundle the soak server for Node: ${new TextDecoder().decode(bundled.stderr)}`,
    );
  }
  const version = async (node: string) => {
    const out = await new Deno.Command(node, {
      args: ["-p", "process.versions.node"],
      stdout: "piped",
    })
      .output().catch(() => undefined);
    return out?.success ? Number(new TextDecoder().decode(out.stdout).split(".")[0]) : 0;
  };
  let node = "node";
  if (await version(node) < 22) {
    const out = await new Deno.Command("npx", {
      args: ["-y", "node@24", "-p", "process.execPath"],
      stdout: "piped",
      stderr: "piped",
    }).output();
    node = new TextDecoder().decode(out.stdout).trim().split("\n").pop() ?? "";
    if (!out.success || await version(node) < 22) {
      throw new HarnessError("Cannot find Node 22 or later (node, npx -y node@24)");
    }
  }
  return [node, bundle];
}

/**
 * One line on a server process, from `/proc`: its main thread's state, its
 * CPU over the last second (100 % per busy core: a spinning event loop
 * shows), open files (a leak shows) and memory. `previous` carries the CPU ticks of the last sample.
 */
async function health(pid: number, previous: string | undefined, rss: number): Promise<string> {
  const stat = await readFile(`/proc/${pid}/stat`, "utf8").catch(() => "");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  const ticks = Number(fields[11]) + Number(fields[12]);
  const before = Number(/ticks=(\d+)/.exec(previous ?? "")?.[1] ?? NaN);
  const fds = await Array.fromAsync(Deno.readDir(`/proc/${pid}/fd`)).then(
    (e) => e.length,
    () => -1,
  );
  const cpu = Number.isNaN(before) ? "?" : `${ticks - before}%`;
  // The main thread's state: R running, S waiting for an event, D in the kernel (a disk wait).
  const state = fields[0] || "?";
  return `state ${state}, CPU ${cpu} over the last second, ${fds} open files, ${
    Math.round(rss / MiB)
  } MiB, ticks=${ticks}`;
}
