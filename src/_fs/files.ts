/**
 * The file-system helpers of {@linkcode FileSystemStore}: error codes mapped
 * in one place, atomic writes, and owner records (the fill lock).
 *
 * @module
 */
import { open, rename, unlink, writeFile } from "node:fs/promises";
import { hostname } from "node:os";
import process from "node:process";

/** The Node error code of a file-system error (`ENOENT`, `EEXIST`, ...), or `undefined`. */
export function errorCode(error: unknown): string | undefined {
  const code = (error as { code?: unknown } | null)?.code;
  return typeof code === "string" ? code : undefined;
}

/** Whether `error` means "no such file". */
export function isNotFound(error: unknown): boolean {
  return errorCode(error) === "ENOENT";
}

/** Runs a removal that may find nothing: `true` when something was removed. */
export async function removeIfPresent(path: string): Promise<boolean> {
  try {
    await unlink(path);
    return true;
  } catch (error) {
    if (isNotFound(error)) return false;
    throw error;
  }
}

let tmpSequence = 0;

/** Writes `data` to `path` atomically: a temporary file, fsync, then rename. */
export async function writeFileAtomic(path: string, data: string): Promise<void> {
  const tmp = `${path}.${process.pid}-${++tmpSequence}.tmp`;
  const handle = await open(tmp, "w");
  try {
    await handle.writeFile(data);
    await handle.sync();
  } finally {
    await handle.close();
  }
  try {
    await rename(tmp, path);
  } catch (error) {
    await removeIfPresent(tmp).catch(() => {});
    throw error;
  }
}

/** Fsyncs a directory so a rename in it is durable. Best effort: not every platform allows it. */
export async function syncDirectory(path: string): Promise<void> {
  let handle;
  try {
    handle = await open(path, "r");
    await handle.sync();
  } catch {
    // Directories cannot be opened or synced everywhere; the rename stands anyway.
  } finally {
    await handle?.close().catch(() => {});
  }
}

/**
 * Who owns a fill: enough for another process to tell a live fill from a
 * dead one. The heartbeat is the record file's mtime, refreshed while the
 * fill runs.
 */
export interface OwnerRecord {
  /** Process id of the owner. */
  pid: number;
  /** Host name of the owner. */
  host: string;
  /** Random token of the owning store instance. */
  token: string;
  /** When the fill started, ms since the epoch. */
  started: number;
  /** The size the fill will be verified against, when announced. */
  size?: number;
  /** The digest the fill will be verified against, when known. */
  digest?: { algorithm: string; value: string };
}

/** This host's name, once. */
export const HOST: string = hostname();

/** Tokens of the live store instances of this process. */
export const LIVE_TOKENS: Set<string> = new Set();

/** How often a live owner refreshes its heartbeat. */
export const HEARTBEAT_INTERVAL = 5_000;
/** A heartbeat older than this means the owner is gone (or hung). */
export const HEARTBEAT_STALE = 30_000;

/** Parses an owner record; `undefined` when it is damaged. */
export function parseOwner(text: string): OwnerRecord | undefined {
  try {
    const value = JSON.parse(text);
    if (
      typeof value?.pid === "number" && typeof value.host === "string" &&
      typeof value.token === "string" && typeof value.started === "number"
    ) return value;
  } catch {
    // A damaged record is as good as none.
  }
  return undefined;
}

/** Whether a process of this host exists. */
export function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    // EPERM: the process exists but belongs to someone else.
    return errorCode(error) === "EPERM";
  }
}

/**
 * Whether an owner is alive. In this process: its store instance is open.
 * On this host: its process exists and its heartbeat is fresh (a reused pid
 * has no fresh heartbeat). Elsewhere: its heartbeat is fresh.
 */
export function ownerAlive(owner: OwnerRecord, heartbeatMs: number, now = Date.now()): boolean {
  const fresh = now - heartbeatMs < HEARTBEAT_STALE;
  if (owner.host !== HOST) return fresh;
  if (owner.pid === process.pid) return LIVE_TOKENS.has(owner.token);
  return fresh && pidAlive(owner.pid);
}

/** Writes `record` to `path`, failing when the file exists (the fill lock). */
export async function createOwnerFile(path: string, record: OwnerRecord): Promise<void> {
  await writeFile(path, JSON.stringify(record), { flag: "wx" });
}
