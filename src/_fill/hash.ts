/**
 * The digest of a fill, computed beside it. Hashing is the largest single
 * cost of a miss (MD5 is about half of the main thread's work on a 1 GiB
 * fill), so a large fill hashes in a worker thread: the fill hands it copies
 * of its bytes, gathered into 1 MiB messages, and goes on reading, writing
 * and serving while the worker hashes. One worker serves every large fill
 * of the process; it starts with the first and stops with the last, so it
 * never keeps a process alive. Small fills hash on the main thread.
 *
 * On Deno only: there a 1 GiB MD5 miss measured +25-30 % with the worker
 * (`deno task bench --only miss`). On Node and Bun it measured no gain, for
 * about 20 MiB more memory (the worker's own heap), so they hash on the main
 * thread. A worker that cannot start costs nothing but speed: until it first
 * answers, the bytes are also hashed here, and the fill goes on with that.
 *
 * Bounded: when the worker trails by more than {@linkcode HASH_AHEAD}
 * bytes, {@linkcode FillHash.ready} tells the fill to wait.
 *
 * @module
 */
import { createHash, type Hash } from "node:crypto";
import { DENO } from "../_runtime.ts";
import type { DigestAlgorithm } from "../image_store.ts";

/** Fills of at least this many bytes (by `Content-Length`) hash in the worker. */
export const WORKER_MIN = 64 * 2 ** 20;
/** Bytes gathered into one message to the worker. */
const BATCH = 2 ** 20;
/** Bytes the worker may trail by before the fill waits for it. */
const HASH_AHEAD = 8 * 2 ** 20;
/** Buffers back from the worker kept for reuse (each about BATCH). */
const SPARE_BUFFERS = 12;

/** The running digest of a fill's bytes. */
export interface FillHash {
  /** Adds bytes (not kept: the bytes are copied or hashed at once). */
  update(bytes: Uint8Array): void;
  /** A promise to await before the next update when the hashing trails too far; else undefined. */
  ready(): Promise<void> | undefined;
  /** The hex digest of everything added. Rejects if the worker failed. */
  digest(): Promise<string>;
  /** Gives the hash up (the fill failed): frees the worker's state. */
  dispose(): void;
}

/**
 * A hash for a fill of `algorithm`: in the worker when the fill is known to
 * be large (`expectedLength` ≥ {@linkcode WORKER_MIN}) and a worker can be
 * had, else on this thread.
 */
export function fillHash(
  algorithm: DigestAlgorithm,
  expectedLength: number | undefined,
): FillHash {
  if (expectedLength !== undefined && expectedLength >= WORKER_MIN) {
    const pool = HashWorker.acquire();
    if (pool !== undefined) return new WorkerHash(pool, algorithm);
  }
  return inlineHash(algorithm);
}

/** For tests: the next worker started fails as it loads, as one that cannot start would. */
export function breakNextHashWorker(): void {
  breakNext = true;
}
let breakNext = false;

/** Whether the hashing worker runs (for tests: it must stop with the last large fill). */
export function hashWorkerRunning(): boolean {
  return HashWorker.running();
}

function inlineHash(algorithm: DigestAlgorithm): FillHash {
  const hash = createHash(algorithm);
  return {
    update: (bytes) => hash.update(bytes),
    ready: () => undefined,
    digest: () => Promise.resolve(hash.digest("hex")),
    dispose: () => {},
  };
}

/** Messages to the worker, and from it. */
type ToWorker =
  | { id: number; op: "start"; algorithm: string }
  | { id: number; op: "update"; bytes: ArrayBuffer; n: number }
  | { id: number; op: "end" }
  | { id: number; op: "drop" };
type FromWorker =
  | { id: number; op: "ack"; n: number; bytes: ArrayBuffer }
  | { id: number; op: "digest"; hex: string };

/** The worker's code. */
const HANDLER = `
const hashes = new Map();
function handle(message, reply) {
  const { id, op } = message;
  if (op === "start") hashes.set(id, createHash(message.algorithm));
  else if (op === "update") {
    hashes.get(id)?.update(new Uint8Array(message.bytes, 0, message.n));
    // The buffer goes back, to be filled again: no garbage piles up in either heap.
    reply({ id, op: "ack", n: message.n, bytes: message.bytes }, [message.bytes]);
  } else if (op === "end") {
    const hash = hashes.get(id);
    hashes.delete(id);
    reply({ id, op: "digest", hex: hash.digest("hex") });
  } else if (op === "drop") hashes.delete(id);
}`;
/** Deno: a module worker from a blob URL. */
const WEB_WORKER = `import { createHash } from "node:crypto";${HANDLER}
self.onmessage = (event) => handle(event.data, (answer, transfer) => self.postMessage(answer, transfer ?? []));`;
let webWorkerUrl: string | undefined;

interface AnyWorker {
  post(message: ToWorker, transfer?: ArrayBuffer[]): void;
  stop(): void;
}

/** Listeners of one hash in the worker. */
interface Listener {
  ack(n: number, bytes: ArrayBuffer): void;
  digest(hex: string): void;
  fail(error: Error): void;
}

/** The process's hashing worker, shared by its large fills. */
class HashWorker {
  static #current: HashWorker | undefined;
  #worker: AnyWorker;
  #listeners = new Map<number, Listener>();
  #nextId = 0;
  #users = 0;
  #failed: Error | undefined;

  private constructor(worker: AnyWorker) {
    this.#worker = worker;
  }

  /** Whether a worker runs now. */
  static running(): boolean {
    return HashWorker.#current !== undefined;
  }

  /** The worker, started if need be; `undefined` when this runtime cannot start one. */
  static acquire(): HashWorker | undefined {
    let current = HashWorker.#current;
    if (current === undefined || current.#failed !== undefined) {
      current = HashWorker.#start();
      if (current === undefined) return undefined;
      HashWorker.#current = current;
    }
    current.#users++;
    return current;
  }

  static #start(): HashWorker | undefined {
    let pool: HashWorker | undefined;
    const prefix = breakNext ? `throw new Error("broken on purpose");\n` : "";
    breakNext = false;
    const onMessage = (message: FromWorker) => {
      if (pool !== undefined) pool.#receive(message);
    };
    const onError = (error: unknown) => {
      if (pool !== undefined) {
        pool.#fail(new Error(`Hash worker failed: ${error}`, { cause: error }));
      }
    };
    try {
      if (DENO !== undefined) {
        // One blob URL for the process, never revoked: a worker loads it asynchronously.
        webWorkerUrl ??= URL.createObjectURL(new Blob([WEB_WORKER], { type: "text/javascript" }));
        const url = prefix === ""
          ? webWorkerUrl
          : URL.createObjectURL(new Blob([prefix + WEB_WORKER], { type: "text/javascript" }));
        const worker = new Worker(url, { type: "module" });
        worker.onmessage = (event) => onMessage(event.data);
        worker.onerror = (event) => {
          event.preventDefault();
          onError(event.message);
        };
        worker.onmessageerror = () => onError("message error");
        pool = new HashWorker({
          post: (message, transfer) => worker.postMessage(message, transfer ?? []),
          stop: () => worker.terminate(),
        });
        return pool;
      }
      return undefined; // Node and Bun hash on the main thread (see the module doc).
    } catch {
      return undefined; // No worker here: hash on this thread.
    }
  }

  /** A new hash in the worker; its messages go to `listener`. */
  open(algorithm: string, listener: Listener): number {
    const id = this.#nextId++;
    if (this.#failed !== undefined) {
      queueMicrotask(() => listener.fail(this.#failed!));
      return id;
    }
    this.#listeners.set(id, listener);
    this.#worker.post({ id, op: "start", algorithm });
    return id;
  }

  post(message: ToWorker, transfer?: ArrayBuffer[]) {
    if (this.#failed === undefined) this.#worker.post(message, transfer);
  }

  /** A hash is done with the worker; the last one stops it. */
  release(id: number) {
    this.#listeners.delete(id);
    if (--this.#users > 0) return;
    if (HashWorker.#current === this) HashWorker.#current = undefined;
    this.#worker.stop();
  }

  #receive(message: FromWorker) {
    const listener = this.#listeners.get(message.id);
    if (listener === undefined) return;
    if (message.op === "ack") listener.ack(message.n, message.bytes);
    else listener.digest(message.hex);
  }

  #fail(error: Error) {
    if (this.#failed !== undefined) return;
    this.#failed = error;
    if (HashWorker.#current === this) HashWorker.#current = undefined;
    for (const listener of this.#listeners.values()) listener.fail(error);
    this.#listeners.clear();
    this.#worker.stop();
  }
}

/** A fill's hash computed by the {@linkcode HashWorker}. */
class WorkerHash implements FillHash {
  #pool: HashWorker;
  #id: number;
  #batch: Uint8Array[] = [];
  #batchBytes = 0;
  /** Bytes sent to the worker and not yet hashed. */
  #backlog = 0;
  /** Buffers the worker sent back, to be filled again. */
  #spare: ArrayBuffer[] = [];
  #wake: (() => void) | undefined;
  #result: Promise<string>;
  #resolve!: (hex: string) => void;
  #reject!: (error: Error) => void;
  #error: Error | undefined;
  #released = false;
  /**
   * The same bytes hashed on this thread until the worker answers for the
   * first time: a worker that cannot start (a runtime without `node:crypto`
   * in workers, say) costs nothing but speed; the fill goes on with this.
   */
  #shadow: Hash | undefined;
  /** Set when the worker failed before it ever answered: hash here from now on. */
  #inline: Hash | undefined;
  /** Whether `digest()` was asked for. */
  #ending = false;

  constructor(pool: HashWorker, algorithm: string) {
    this.#pool = pool;
    this.#shadow = createHash(algorithm);
    this.#result = new Promise((resolve, reject) => {
      this.#resolve = resolve;
      this.#reject = reject;
    });
    this.#result.catch(() => {}); // Observed by digest(); never an unhandled rejection.
    this.#id = pool.open(algorithm, {
      ack: (n, bytes) => {
        this.#shadow = undefined;
        this.#backlog -= n;
        if (this.#spare.length < SPARE_BUFFERS) this.#spare.push(bytes);
        this.#wakeUp();
      },
      digest: (hex) => {
        this.#release();
        this.#resolve(hex);
      },
      fail: (error) => {
        this.#release();
        if (this.#shadow !== undefined) {
          // Never answered: every byte so far is in the shadow; go on with it.
          this.#inline = this.#shadow;
          this.#shadow = undefined;
          this.#batch = [];
          this.#batchBytes = 0;
          this.#backlog = 0;
          if (this.#ending) this.#resolve(this.#inline.digest("hex"));
        } else {
          this.#error = error;
          this.#reject(error);
        }
        this.#wakeUp();
      },
    });
  }

  update(bytes: Uint8Array) {
    if (this.#inline !== undefined) {
      this.#inline.update(bytes);
      return;
    }
    if (this.#error !== undefined || this.#released) return;
    this.#shadow?.update(bytes);
    this.#batch.push(bytes);
    this.#batchBytes += bytes.byteLength;
    if (this.#batchBytes >= BATCH) this.#send();
  }

  ready(): Promise<void> | undefined {
    if (this.#backlog <= HASH_AHEAD || this.#error !== undefined || this.#inline !== undefined) {
      return undefined;
    }
    return new Promise<void>((resolve) => this.#wake = resolve).then(() => this.ready());
  }

  digest(): Promise<string> {
    if (this.#inline !== undefined) return Promise.resolve(this.#inline.digest("hex"));
    this.#ending = true;
    if (this.#error === undefined && !this.#released) {
      this.#send();
      this.#pool.post({ id: this.#id, op: "end" });
    }
    return this.#result;
  }

  dispose() {
    if (this.#released) return;
    this.#pool.post({ id: this.#id, op: "drop" });
    this.#release();
    this.#reject(new Error("Hash disposed"));
  }

  /**
   * Sends the gathered bytes as one copy, transferred (the fill keeps its own
   * chunks), into a buffer the worker sent back when one is large enough.
   */
  #send() {
    if (this.#batchBytes === 0) return;
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
    this.#pool.post({ id: this.#id, op: "update", bytes: buffer, n: size }, [buffer]);
  }

  #wakeUp() {
    const wake = this.#wake;
    this.#wake = undefined;
    wake?.();
  }

  #release() {
    if (this.#released) return;
    this.#released = true;
    this.#pool.release(this.#id);
  }
}
