/**
 * A store wrapper for the soak that injects faults at random: a writer that
 * cannot be created (EACCES), writes that fail (ENOSPC, EIO) or wait, a slow or
 * failing fsync at commit (half of the failures leave the store's lock
 * behind, as a real fsync failure can), lookups and hit opens that fail (EIO), and
 * trailing reads that fail. Every fault is reported, so the orchestrator can
 * count them and explain what a client saw.
 *
 * Deletion, listing, the queue and cleaning are never faulted: a `DELETE`
 * that the store could not carry out would not be a cache bug.
 *
 * @module
 */
import type {
  CreateWriterOptions,
  ImageEntry,
  ImageStore,
  ImageWriter,
  WriterRefusal,
} from "../../mod.ts";
import type { Rng } from "./data.ts";

/** Probability of each fault, per operation. */
export interface StoreFaultRates {
  createWriter: number;
  /** Per write call. */
  write: number;
  /** Per write call: the write waits 5-40 ms first (a busy disk). */
  slowWrite: number;
  /** Per commit: the fsync takes 0.2-2 s. */
  slowCommit: number;
  /** Per commit: the fsync fails (EIO). */
  failCommit: number;
  get: number;
  body: number;
  /** Per trailing read of a fill. */
  read: number;
}

/** No faults. */
export const NO_STORE_FAULTS: StoreFaultRates = {
  createWriter: 0,
  write: 0,
  slowWrite: 0,
  slowCommit: 0,
  failCommit: 0,
  get: 0,
  body: 0,
  read: 0,
};

function fault(code: string, what: string): Error {
  return Object.assign(new Error(`${code}: injected fault in ${what}`), { code });
}

/**
 * Wraps `inner`; `report(kind)` is called for each injected fault. Every
 * other property (present or added to the store interface later) is the
 * inner store's own.
 */
export function withStoreFaults(
  inner: ImageStore,
  rng: Rng,
  rates: StoreFaultRates,
  report: (kind: string) => void,
): ImageStore {
  const roll = (rate: number, kind: string): boolean => {
    if (rate <= 0 || !rng.chance(rate)) return false;
    report(kind);
    return true;
  };
  /**
   * Before each write: a busy disk (a write under way is when a delete or a
   * kill finds a fill: the soak found a bug there), or a failed write.
   */
  const beforeWrite = async () => {
    if (roll(rates.slowWrite, "store-slow-write")) {
      await new Promise((resolve) => setTimeout(resolve, rng.int(5, 40)));
    }
    if (roll(rates.write / 2, "store-write-enospc")) throw fault("ENOSPC", "write");
    if (roll(rates.write / 2, "store-write-eio")) throw fault("EIO", "write");
  };
  const overrides: Partial<ImageStore> = {
    get(id: string): Promise<ImageEntry | undefined> {
      if (roll(rates.get, "store-get-eio")) return Promise.reject(fault("EIO", "get"));
      return inner.get(id);
    },
    body(entry: ImageEntry, start: number, end: number) {
      if (roll(rates.body, "store-body-eio")) return Promise.reject(fault("EIO", "body"));
      return inner.body(entry, start, end);
    },
    async createWriter(
      id: string,
      options?: CreateWriterOptions,
    ): Promise<ImageWriter | WriterRefusal> {
      if (roll(rates.createWriter, "store-create-eacces")) throw fault("EACCES", "createWriter");
      const writer = await inner.createWriter(id, options);
      if (typeof writer === "string") return writer;
      const faulty: Partial<ImageWriter> = {
        async write(chunk) {
          await beforeWrite();
          await writer.write(chunk);
        },
        async writev(chunks) {
          await beforeWrite();
          await (writer.writev ? writer.writev(chunks) : writeEach(writer, chunks));
        },
        read(position, length) {
          if (roll(rates.read, "store-read-eio")) return Promise.reject(fault("EIO", "read"));
          return writer.read(position, length);
        },
        async commit(info) {
          if (roll(rates.failCommit / 2, "store-fsync-eio")) {
            await writer.abort("discard");
            throw fault("EIO", "commit");
          }
          if (roll(rates.failCommit / 2, "store-fsync-eio-held")) {
            // The fsync fails and the store leaves its lock behind: the cache
            // must not let that hold the image (every later GET "busy").
            throw fault("EIO", "commit");
          }
          // A slow fsync: the writer is settled at once (as a real commit settles it
          // before its fsync), and the commit takes 0.2-2 s longer.
          const committed = writer.commit(info);
          committed.catch(() => {}); // Handled below, after the delay.
          if (roll(rates.slowCommit, "store-slow-fsync")) {
            await new Promise((resolve) => setTimeout(resolve, rng.int(200, 2000)));
          }
          return await committed;
        },
      };
      return forwarding(writer, faulty);
    },
  };
  return forwarding(inner, overrides);
}

async function writeEach(writer: ImageWriter, chunks: readonly Uint8Array[]): Promise<void> {
  for (const chunk of chunks) await writer.write(chunk);
}

/**
 * `target` with some methods replaced. Every other property, optional ones
 * included (`ImageWriter.owned`), stays the target's own: a wrapper must
 * not hide what the cache asks of the real store.
 */
function forwarding<T extends object>(target: T, overrides: Partial<T>): T {
  return new Proxy(target, {
    get(object, property) {
      if (Object.hasOwn(overrides, property)) return overrides[property as keyof T];
      const value = Reflect.get(object, property, object);
      return typeof value === "function" ? value.bind(object) : value;
    },
  });
}
