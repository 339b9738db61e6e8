/**
 * The digest of a fill, computed beside it. Hashing is the largest single
 * cost of a miss (MD5 alone is about 2 s of CPU per GiB), so a large fill
 * hashes in a worker thread, on every runtime, and the main thread does
 * only I/O:
 *
 * - **From the file** (a store that writes to a file: {@linkcode
 *   HashSource.path}): the fill tells the worker how far the file holds
 *   its bytes; the worker reads that region back by position (from the
 *   page cache) and hashes it. The main thread copies nothing.
 * - **From memory** (any other store, or a fill that stopped storing): the
 *   fill hands the worker copies of its bytes, gathered into 1 MiB
 *   messages; buffers come back to be filled again. Bounded: when the
 *   worker trails by more than {@linkcode HASH_AHEAD} bytes,
 *   {@linkcode FillHash.ready} tells the fill to wait.
 *
 * One worker serves every large fill of the process; it starts with the
 * first, and once the last is done it no longer keeps the process alive
 * and stops after half a minute without a fill. Small
 * fills hash on the main thread. A worker that cannot start, or fails,
 * costs only speed: the main thread then hashes, reading back from the
 * file what it did not see (the file outlives its own removal while the
 * fill holds it open).
 *
 * @module
 */
import { createHash, type Hash } from "node:crypto";
import { unrefTimer } from "../_runtime.ts";
import type { DigestAlgorithm, ImageWriter } from "../image_store.ts";

/** Fills of at least this many bytes (by `Content-Length`) hash in the worker. */
export const WORKER_MIN = 64 * 2 ** 20;
/** Bytes gathered into one message to the worker. */
const BATCH = 2 ** 20;
/** Bytes of copies the worker may trail by before the fill waits for it. */
const HASH_AHEAD = 8 * 2 ** 20;
/** Milliseconds an idle worker is kept (unref'd) for the next large fill: starting one costs 80-240 ms. */
const IDLE_KEEP = 30_000;
/** Buffers back from the worker kept for reuse (each about BATCH). */
const SPARE_BUFFERS = 12;
/** Largest read back from the file when the main thread must hash it itself. */
const READ_BACK = 2 ** 20;

/** A file's identity, as `stat` tells it (`ImageWriter.fileIdentity`). */
export type FileIdentity = NonNullable<ImageWriter["fileIdentity"]>;

/** Where the bytes a fill stored can be read back: for hashing them off the main thread. */
export interface HashSource {
  /** A file holding the fill's bytes from position 0; read by the worker. */
  path: string;
  /**
   * The identity of the writer's file (`stat`'s `dev` and `ino`). The
   * worker opens `path` a moment later, on its own thread: by then a delete
   * may have put another fill's file under that name. It hashes the file
   * only when these match, else the bytes are read back on this thread.
   */
  identity: FileIdentity;
  /** Reads the same bytes on this thread (when no worker can). */
  read(position: number, length: number): Promise<Uint8Array>;
}

/**
 * The running digest of a fill's bytes, fed in order: from the file
 * ({@linkcode fromFile}) or from memory ({@linkcode update}), in any mix.
 */
export interface FillHash {
  /**
   * Whether this hash reads bytes back from the file off the main thread
   * (then the fill tells it {@linkcode fromFile} how far the file holds
   * them); otherwise the fill hands it the bytes.
   */
  readonly readsFile: boolean;
  /** Bytes from what was fed so far up to `end` are in the file: hash them from there. */
  fromFile(end: number): void;
  /** The next bytes (not kept: copied or hashed at once). */
  update(bytes: Uint8Array): void;
  /** A promise to await before the next update when the hashing trails too far; else undefined. */
  ready(): Promise<void> | undefined;
  /** The hex digest of everything fed. Rejects when it cannot be had. */
  digest(): Promise<string>;
  /** Gives the hash up (the fill failed): frees the worker's state. */
  dispose(): void;
}

/**
 * A hash for a fill of `algorithm`: in the worker when the fill is known to
 * be large (`expectedLength` ≥ {@linkcode WORKER_MIN}) and a worker can be
 * had, else on this thread. `source`: where its bytes can be read back.
 */
export function fillHash(
  algorithm: DigestAlgorithm,
  expectedLength: number | undefined,
  source?: HashSource,
): FillHash {
  if (expectedLength !== undefined && expectedLength >= WORKER_MIN) {
    const worker = HashWorker.acquire();
    if (worker !== undefined) return new WorkerHash(worker, algorithm, source);
  }
  return new InlineHash(algorithm, source);
}

/** For tests: the next worker started fails as it loads, as one that cannot start would. */
export function breakNextHashWorker(): void {
  breakNext = true;
}
let breakNext = false;

/** Resolves whether this runtime can start the hashing worker (it is looked up at load). */
export async function hashWorkerAvailable(): Promise<boolean> {
  await loading;
  return WorkerClass !== null;
}

/** Whether the hashing worker runs and a fill uses it (for tests). */
export function hashWorkerBusy(): boolean {
  return HashWorker.busy();
}

/** For tests: stops the hashing worker if no fill uses it. */
export function stopIdleHashWorker(): void {
  HashWorker.stopIdle();
}

/**
 * A hash on this thread. Bytes only in the file are read back as soon as
 * they are announced; bytes handed over meanwhile wait their turn (bounded:
 * {@linkcode ready} holds the fill while they exceed {@linkcode HASH_AHEAD}).
 */
class InlineHash implements FillHash {
  readonly readsFile = false;
  #hash: Hash;
  #source: HashSource | undefined;
  /** Bytes hashed. */
  #at = 0;
  /** Bytes in the file not hashed yet: `[#at, #fileEnd)`. */
  #fileEnd = 0;
  #pending: Uint8Array[] = [];
  #pendingBytes = 0;
  /** The read-back under way; it records its failure instead of rejecting. */
  #catchingUp: Promise<void> | undefined;
  #error: unknown;

  constructor(algorithm: string, source: HashSource | undefined) {
    this.#hash = createHash(algorithm);
    this.#source = source;
  }

  fromFile(end: number) {
    if (end <= this.#fileEnd) return;
    this.#fileEnd = end;
    this.#catchingUp ??= this.#catchUp().finally(() => this.#catchingUp = undefined);
  }

  update(bytes: Uint8Array) {
    if (this.#catchingUp === undefined && this.#pending.length === 0) {
      this.#hash.update(bytes);
      this.#at += bytes.byteLength;
      return;
    }
    // Bytes after a region only in the file wait until it is read back.
    this.#pending.push(bytes.slice());
    this.#pendingBytes += bytes.byteLength;
  }

  ready(): Promise<void> | undefined {
    if (this.#pendingBytes <= HASH_AHEAD) return undefined;
    return this.#catchingUp;
  }

  async #catchUp(): Promise<void> {
    try {
      const source = this.#source;
      while (this.#at < this.#fileEnd) {
        if (source === undefined) throw new Error("Bytes to hash are in a file no one can read");
        const length = Math.min(READ_BACK, this.#fileEnd - this.#at);
        const at = this.#at;
        // One retry: a transient read fault should not fail the fill.
        const bytes = await source.read(at, length).catch(() =>
          new Promise<Uint8Array>((resolve, reject) =>
            setTimeout(() => source.read(at, length).then(resolve, reject), 10)
          )
        );
        if (bytes.byteLength === 0) throw new Error(`Cannot read back byte ${this.#at} to hash it`);
        this.#hash.update(bytes);
        this.#at += bytes.byteLength;
      }
      for (const bytes of this.#pending) {
        this.#hash.update(bytes);
        this.#at += bytes.byteLength;
      }
      this.#pending = [];
      this.#pendingBytes = 0;
    } catch (error) {
      this.#error ??= error;
    }
  }

  async digest(): Promise<string> {
    while (this.#catchingUp !== undefined) await this.#catchingUp;
    if (this.#error !== undefined) throw this.#error;
    return this.#hash.digest("hex");
  }

  dispose() {
    this.#pending = [];
  }
}

/** Messages to the worker, and from it. */
type ToWorker =
  | { id: number; op: "start"; algorithm: string; path?: string; dev?: number; ino?: number }
  | { id: number; op: "file"; end: number }
  | { id: number; op: "update"; bytes: ArrayBuffer; n: number }
  | { id: number; op: "end" }
  | { id: number; op: "drop" };
type FromWorker =
  | { id: number; op: "ack"; n: number; bytes: ArrayBuffer }
  | { id: number; op: "digest"; hex: string }
  | { id: number; op: "error"; message: string };

/**
 * The worker's code: CommonJS for `node:worker_threads` with `eval`, which
 * Deno, Bun and Node all run. File reads are synchronous: the worker has
 * nothing else to do meanwhile.
 */
const WORKER_CODE = `
const { parentPort } = require("node:worker_threads");
const { createHash } = require("node:crypto");
const { openSync, readSync, closeSync, fstatSync } = require("node:fs");
const jobs = new Map();
const buffer = new Uint8Array(${READ_BACK});
function close(job) {
  if (job.fd !== undefined) closeSync(job.fd);
  job.fd = undefined;
}
function handle(message) {
  const { id, op } = message;
  const job = jobs.get(id);
  if (op === "start") {
    const job = { hash: createHash(message.algorithm), fd: undefined, at: 0, failed: false };
    jobs.set(id, job);
    // Opened at once, and only if it is still the writer's file: a delete may have
    // put another fill's file under that name since the fill started.
    try {
      if (message.path !== undefined) {
        job.fd = openSync(message.path, "r");
        const info = fstatSync(job.fd);
        if (info.dev !== message.dev || info.ino !== message.ino) {
          throw new Error("the file at " + message.path + " is no longer the fill's");
        }
      }
    } catch (error) {
      close(job);
      job.failed = true;
      parentPort.postMessage({ id, op: "error", message: String(error && error.message || error) });
    }
  } else if (job === undefined || job.failed) {
    if (op === "update") parentPort.postMessage({ id, op: "ack", n: message.n, bytes: message.bytes }, [message.bytes]);
    if (op === "end" || op === "drop") jobs.delete(id);
  } else if (op === "file") {
    try {
      while (job.at < message.end) {
        const n = readSync(job.fd, buffer, 0, Math.min(buffer.length, message.end - job.at), job.at);
        if (n === 0) throw new Error("the file ended at byte " + job.at);
        job.hash.update(buffer.subarray(0, n));
        job.at += n;
      }
    } catch (error) {
      job.failed = true;
      close(job);
      parentPort.postMessage({ id, op: "error", message: String(error && error.message || error) });
    }
  } else if (op === "update") {
    job.hash.update(new Uint8Array(message.bytes, 0, message.n));
    job.at += message.n;
    // The buffer goes back, to be filled again: no garbage piles up in either heap.
    parentPort.postMessage({ id, op: "ack", n: message.n, bytes: message.bytes }, [message.bytes]);
  } else if (op === "end") {
    jobs.delete(id);
    close(job);
    parentPort.postMessage({ id, op: "digest", hex: job.hash.digest("hex") });
  } else if (op === "drop") {
    jobs.delete(id);
    close(job);
  }
}
parentPort.on("message", handle);`;

/** What the cache uses of a `node:worker_threads` worker. */
interface ThreadWorker {
  postMessage(message: ToWorker, transfer?: ArrayBuffer[]): void;
  ref(): void;
  unref(): void;
  on(event: "message", listener: (message: FromWorker) => void): void;
  on(event: "error" | "exit", listener: (value: unknown) => void): void;
  terminate(): Promise<number>;
}

type WorkerConstructor = new (code: string, options: { eval: true }) => ThreadWorker;

/** `node:worker_threads`' Worker, once loaded; `null` when the runtime has none. */
let WorkerClass: WorkerConstructor | null | undefined;
/** Loads `node:worker_threads` in the background, so the first large fill finds it ready. */
const loading = import("node:worker_threads").then(
  (module) => WorkerClass = module.Worker as unknown as WorkerConstructor,
  () => WorkerClass = null,
);
void loading;

/** Listeners of one hash in the worker. */
interface Listener {
  ack(n: number, bytes: ArrayBuffer): void;
  digest(hex: string): void;
  fail(error: Error): void;
}

/** The process's hashing worker, shared by its large fills. */
class HashWorker {
  static #current: HashWorker | undefined;
  #worker: ThreadWorker;
  #listeners = new Map<number, Listener>();
  #nextId = 0;
  #users = 0;
  #failed: Error | undefined;
  #idle: ReturnType<typeof setTimeout> | undefined;

  private constructor(worker: ThreadWorker) {
    this.#worker = worker;
  }

  /** Whether a worker runs and a fill uses it. */
  static busy(): boolean {
    const current = HashWorker.#current;
    return current !== undefined && current.#users > 0;
  }

  /** The worker, started if need be; `undefined` when this runtime cannot start one (yet). */
  static acquire(): HashWorker | undefined {
    let current = HashWorker.#current;
    if (current === undefined || current.#failed !== undefined) {
      current = HashWorker.#start();
      if (current === undefined) return undefined;
      HashWorker.#current = current;
    }
    if (current.#users++ === 0) {
      clearTimeout(current.#idle);
      current.#idle = undefined;
      current.#worker.ref(); // A fill awaits its answers.
    }
    return current;
  }

  static #start(): HashWorker | undefined {
    if (!WorkerClass) return undefined;
    const code = breakNext ? `throw new Error("broken on purpose");\n${WORKER_CODE}` : WORKER_CODE;
    breakNext = false;
    let pool: HashWorker | undefined;
    try {
      const worker = new WorkerClass(code, { eval: true });
      pool = new HashWorker(worker);
      const started = pool;
      worker.on("message", (message) => started.#receive(message));
      worker.on("error", (error) => started.#fail(new Error(`Hash worker failed: ${error}`)));
      worker.on("exit", () => started.#fail(new Error("Hash worker exited")));
      return pool;
    } catch {
      return undefined; // No worker here: hash on this thread.
    }
  }

  /** A new hash in the worker; its messages go to `listener`. */
  open(algorithm: string, file: HashSource | undefined, listener: Listener): number {
    const id = this.#nextId++;
    if (this.#failed !== undefined) {
      queueMicrotask(() => listener.fail(this.#failed!));
      return id;
    }
    this.#listeners.set(id, listener);
    this.#worker.postMessage({
      id,
      op: "start",
      algorithm,
      path: file?.path,
      dev: file?.identity.dev,
      ino: file?.identity.ino,
    });
    return id;
  }

  post(message: ToWorker, transfer?: ArrayBuffer[]) {
    if (this.#failed === undefined) this.#worker.postMessage(message, transfer);
  }

  /**
   * A hash is done with the worker. Once none uses it, it no longer keeps
   * the process alive, and stops after IDLE_KEEP unless a fill takes it.
   */
  release(id: number) {
    this.#listeners.delete(id);
    if (--this.#users > 0) return;
    this.#worker.unref();
    this.#idle = setTimeout(() => this.#stop(), IDLE_KEEP);
    unrefTimer(this.#idle);
  }

  /** Stops the worker (idle, or for tests). */
  #stop() {
    clearTimeout(this.#idle);
    if (HashWorker.#current === this) HashWorker.#current = undefined;
    this.#failed ??= new Error("Hash worker stopped");
    this.#worker.terminate().catch(() => {});
  }

  /** For tests: stops the worker if no fill uses it. */
  static stopIdle(): void {
    const current = HashWorker.#current;
    if (current !== undefined && current.#users === 0) current.#stop();
  }

  #receive(message: FromWorker) {
    const listener = this.#listeners.get(message.id);
    if (listener === undefined) return;
    if (message.op === "ack") listener.ack(message.n, message.bytes);
    else if (message.op === "digest") listener.digest(message.hex);
    else listener.fail(new Error(`Hash worker: ${message.message}`));
  }

  #fail(error: Error) {
    if (this.#failed !== undefined) return;
    this.#failed = error;
    if (HashWorker.#current === this) HashWorker.#current = undefined;
    for (const listener of this.#listeners.values()) listener.fail(error);
    this.#listeners.clear();
    this.#worker.terminate().catch(() => {});
  }
}

/**
 * A fill's hash computed by the {@linkcode HashWorker}. Should the worker
 * fail, what it was fed from the file is read back and hashed on this
 * thread, and copies it was handed are kept until it acknowledges them, so
 * the digest is the same either way.
 */
class WorkerHash implements FillHash {
  #worker: HashWorker;
  /** Whether the worker reads the file (a store that writes one), rather than copies. */
  readonly readsFile: boolean;
  #id: number;
  #algorithm: string;
  #source: HashSource | undefined;
  #batch: Uint8Array[] = [];
  #batchBytes = 0;
  /** Bytes fed so far (from the file and from memory). */
  #fed = 0;
  /** Bytes fed from the file: always a prefix (a fill stores, then maybe stops). */
  #fileFed = 0;
  /** Bytes of copies sent to the worker and not yet acknowledged. */
  #backlog = 0;
  /** Buffers the worker sent back, to be filled again. */
  #spare: ArrayBuffer[] = [];
  #wake: (() => void) | undefined;
  #result: Promise<string>;
  #resolve!: (hex: string) => void;
  #reject!: (error: Error) => void;
  #released = false;
  /** The fallback, once the worker failed: everything goes through it. */
  #inline: InlineHash | undefined;
  /** Whether the worker acknowledged a copy (then a failure cannot be recovered from copies). */
  #answered = false;
  /** Copies sent and not acknowledged, kept in case the worker fails before it answers. */
  #unacknowledged: Uint8Array[] = [];
  /** Whether `digest()` was asked for. */
  #ending = false;

  constructor(worker: HashWorker, algorithm: string, source: HashSource | undefined) {
    this.#worker = worker;
    this.readsFile = source !== undefined;
    this.#algorithm = algorithm;
    this.#source = source;
    this.#result = new Promise((resolve, reject) => {
      this.#resolve = resolve;
      this.#reject = reject;
    });
    this.#result.catch(() => {}); // Observed by digest(); never an unhandled rejection.
    this.#id = worker.open(algorithm, source, {
      ack: (n, bytes) => {
        this.#answered = true;
        this.#unacknowledged.shift();
        this.#backlog -= n;
        if (this.#spare.length < SPARE_BUFFERS) this.#spare.push(bytes);
        this.#wakeUp();
      },
      digest: (hex) => {
        this.#release();
        this.#resolve(hex);
      },
      fail: (error) => this.#fallBack(error),
    });
  }

  fromFile(end: number) {
    if (end <= this.#fed) return;
    if (this.#inline !== undefined) {
      this.#inline.fromFile(end);
    } else if (!this.#released) {
      this.#send();
      this.#worker.post({ id: this.#id, op: "file", end });
    }
    this.#fed = this.#fileFed = end;
  }

  update(bytes: Uint8Array) {
    this.#fed += bytes.byteLength;
    if (this.#inline !== undefined) {
      this.#inline.update(bytes);
      return;
    }
    if (this.#released) return;
    this.#batch.push(bytes);
    this.#batchBytes += bytes.byteLength;
    if (this.#batchBytes >= BATCH) this.#send();
  }

  ready(): Promise<void> | undefined {
    if (this.#inline !== undefined) return this.#inline.ready();
    if (this.#backlog <= HASH_AHEAD || this.#released) return undefined;
    return new Promise<void>((resolve) => this.#wake = resolve).then(() => this.ready());
  }

  digest(): Promise<string> {
    if (this.#inline !== undefined) return this.#inline.digest();
    this.#ending = true;
    if (!this.#released) {
      this.#send();
      this.#worker.post({ id: this.#id, op: "end" });
    }
    return this.#result;
  }

  dispose() {
    if (this.#released) return;
    this.#worker.post({ id: this.#id, op: "drop" });
    this.#release();
    this.#reject(new Error("Hash disposed"));
  }

  /**
   * The worker failed: hash on this thread from now on. Bytes fed from the
   * file are read back; copies the worker never acknowledged are kept.
   * Bytes it acknowledged from memory cannot be had again: then the
   * digest fails (the fill's clients are cut, nothing is committed).
   */
  #fallBack(error: Error) {
    const wasReleased = this.#released;
    this.#release();
    if (wasReleased && !this.#ending) return;
    if (this.#answered) {
      this.#reject(error); // Copies it acknowledged are gone with it.
    } else {
      // What it was fed from the file can be read back; every copy is still here.
      const inline = new InlineHash(this.#algorithm, this.#source);
      if (this.#fileFed > 0) inline.fromFile(this.#fileFed);
      for (const bytes of [...this.#unacknowledged, ...this.#batch]) inline.update(bytes);
      this.#inline = inline;
      this.#batch = [];
      this.#batchBytes = 0;
      this.#backlog = 0;
      this.#unacknowledged = [];
      if (this.#ending) inline.digest().then(this.#resolve, this.#reject);
    }
    this.#wakeUp();
  }

  /**
   * Sends the gathered bytes as one copy, transferred (the fill keeps its own
   * chunks), into a buffer the worker sent back when one is large enough.
   */
  #send() {
    if (this.#batchBytes === 0 || this.#released) return;
    const size = this.#batchBytes;
    const spare = this.#spare.findIndex((buffer) => buffer.byteLength >= size);
    const buffer = spare === -1
      ? new ArrayBuffer(Math.max(size, BATCH + BATCH / 4))
      : this.#spare.splice(spare, 1)[0];
    const bytes = new Uint8Array(buffer, 0, size);
    let offset = 0;
    for (const chunk of this.#batch) {
      bytes.set(chunk, offset);
      offset += chunk.byteLength;
    }
    this.#batch = [];
    this.#backlog += this.#batchBytes;
    this.#batchBytes = 0;
    if (!this.#answered) this.#unacknowledged.push(bytes.slice());
    this.#worker.post({ id: this.#id, op: "update", bytes: buffer, n: size }, [buffer]);
  }

  #wakeUp() {
    const wake = this.#wake;
    this.#wake = undefined;
    wake?.();
  }

  #release() {
    if (this.#released) return;
    this.#released = true;
    this.#worker.release(this.#id);
  }
}
