/**
 * The soak's oracle (DESIGN.md §4): what every response may be, and what the
 * cache directory may hold after a restart.
 *
 * - A body that ends cleanly is byte-identical to the image (or the
 *   requested range of it), or, for an answer the cache passed through
 *   uncached, to what the origin sent for that very request.
 * - A body that does not match ends in an error; a hit never carries a
 *   wrong byte.
 * - A body that fails is explained: the server was killed, or the origin
 *   failed this request (or, for a client that joined a fill, that fill's).
 * - After a restart: every entry a store would list is complete and matches
 *   the image's digest; no partial file of a dead owner is left in
 *   `incomplete/`; no file exists outside the cache directory; the cache is
 *   within `maxSize` (when pruning exists).
 *
 * @module
 */
import { Buffer } from "node:buffer";
import { createHash } from "node:crypto";
import { open, readdir, readFile, stat } from "node:fs/promises";
import { join, relative } from "node:path";
import { type Catalog, type CatalogImage, ImageBytes } from "./data.ts";
import { CUTTING_FAULTS, type OriginRecord, parseRange } from "./origin.ts";

/** One broken invariant. */
export interface Violation {
  kind: string;
  message: string;
}

/** What a request asked for, as the oracle needs to judge its answer. */
export interface Expectation {
  req: string;
  server: number;
  /** The id the cache sees (decoded once), and its image. */
  image: CatalogImage;
  method: "GET" | "HEAD";
  range?: string;
  ifNoneMatch?: string;
  ifRange?: string;
  /** When the request was sent, ms since the epoch. */
  started: number;
  /** Bytes after which the client hangs up, if it does. */
  hangUpAfter?: number;
  /** Pauses between chunks (ms), or one long pause after `pauseAt` bytes. */
  chunkPause?: number;
  pauseAt?: number;
  pause?: number;
}

/** How a body ended. */
export type Ending = "complete" | "cut" | "hangup" | "timeout" | "no-body";

/** The oracle's reading of one response. */
export interface Judged {
  status: number;
  cacheStatus: string;
  ending: Ending;
  bytes: number;
  violations: Violation[];
  /** Why a cut was acceptable, when it was cut. */
  explained?: string;
}

/** What the oracle knows about the world while judging. */
export interface World {
  /** Origin records by `x-soak-req`. */
  originByRequest: Map<string, OriginRecord[]>;
  /** Every origin record (for fills another request started). */
  originRecords: OriginRecord[];
  /** Whether server `index` was killed between `from` and `to`. */
  killedBetween(index: number, from: number, to: number): boolean;
  /** Store faults of server `index` between `from` and `to`, by kind. */
  storeFaultsBetween(index: number, from: number, to: number): string[];
  /** Idle time after which a body counts as stuck, ms. */
  idleTimeout: number;
  /** Cluster mode: a directory per server, one index, peers. */
  cluster: boolean;
  /** How many servers the run has. */
  servers: number;
  /** Whether server `index` was down at some moment between `from` and `to`. */
  downBetween(index: number, from: number, to: number): boolean;
  /** Cluster mode: whether the database was down (or the nodes reconnecting) between `from` and `to`. */
  databaseDownBetween(from: number, to: number): boolean;
  /** Cluster mode: when the earliest database outage overlapping `from`..`to` began, if any. */
  databaseDownSince(from: number, to: number): number | undefined;
}

/**
 * Whether an answer's bytes came from a fill this request did not start
 * (so the origin faults of that fill explain its ending): a fill it joined
 * on this server, or (cluster mode) a peer's fill or entry.
 */
function sharedFill(cacheStatus: string): boolean {
  return /collapsed|;\s*peer\b/.test(cacheStatus);
}

/**
 * How long before a request began an origin fault of a fill it shared can
 * still explain its answer, ms. In cluster mode a node's fill goes on from
 * other sources after the origin read of the peer it streamed from failed
 * (a stalled peer is given up after the soak's peerStallTimeout, 4 s).
 */
function sharedSlack(world: World): number {
  return world.cluster ? 6000 : 1000;
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** The etag the cache gives an MD5 entry (src/_http.ts), which the soak origin also uses. */
export function etagOf(image: CatalogImage): string {
  return `"md5-${image.md5}"`;
}

function etagListMatches(header: string, etag: string, weak: boolean): boolean {
  if (header.trim() === "*") return true;
  return header.split(",").some((tag) => {
    const t = tag.trim();
    return weak ? t.replace(/^W\//, "") === etag : t === etag;
  });
}

/** The content range of a response, parsed: `undefined` when malformed. */
function parseContentRange(
  value: string | null,
): { start: number; end: number; size: number } | undefined {
  const match = /^bytes (\d+)-(\d+)\/(\d+)$/.exec(value ?? "");
  if (match === null) return undefined;
  return { start: Number(match[1]), end: Number(match[2]) + 1, size: Number(match[3]) };
}

/**
 * Reads `res` to its end (or hang-up, or timeout) as the expectation says,
 * comparing every byte with the truth, and judges it.
 */
export async function judge(res: Response, exp: Expectation, world: World): Promise<Judged> {
  const image = exp.image;
  const size = image.size;
  const status = res.status;
  const cacheStatus = res.headers.get("cache-status") ?? "";
  const violations: Violation[] = [];
  const fail = (kind: string, message: string) => violations.push({ kind, message });
  const hit = /;\s*hit\b/.test(cacheStatus);
  const passThrough = cacheStatus === "" || /detail=/.test(cacheStatus);
  const origin = world.originByRequest.get(exp.req) ?? [];
  const originStatus = (code: number) => origin.some((r) => r.status === code);

  // A length that is not the image's (Content-Length, or the size in a Content-Range
  // computed from it) is the origin's own lie, for a miss: such an answer may carry it,
  // but must not end cleanly with a body.
  const lengthFault = (r: OriginRecord) => r.fault === "short-length" || r.fault === "long-length";
  const originLied = !hit && (origin.some(lengthFault) ||
    (sharedFill(cacheStatus) &&
      world.originRecords.some((r) =>
        r.id === image.id && lengthFault(r) &&
        (r.done ?? Infinity) >= exp.started - sharedSlack(world)
      )));
  let mustFail = false;

  // What this status allows the body to be.
  let bodyStart = 0;
  let bodyEnd = size;
  let checkBody = exp.method === "GET";
  const requested = exp.range === undefined ? undefined : parseRange(exp.range, size);
  const ifRangeOk = exp.ifRange === undefined || exp.ifRange === etagOf(image);
  const multi = exp.range !== undefined && exp.range.includes(",");
  switch (status) {
    case 200:
      if (hit && res.headers.get("etag") !== etagOf(image)) {
        fail("hit-metadata", `hit ETag ${res.headers.get("etag")} is not ${etagOf(image)}`);
      }
      if (hit) {
        const md5 = res.headers.get("content-md5");
        if (
          md5 !== null && md5 !== image.md5 &&
          Buffer.from(image.md5, "hex").toString("base64") !== md5
        ) {
          fail("hit-metadata", `hit Content-MD5 ${md5} is not ${image.md5}`);
        }
      }
      break;
    case 206: {
      if (exp.range === undefined) fail("http", "206 without a Range");
      else if (!ifRangeOk) fail("http", `206 although If-Range ${exp.ifRange} does not match`);
      if (multi && /multipart\/byteranges/.test(res.headers.get("content-type") ?? "")) {
        checkBody = false; // Multipart bodies are not reassembled here; their status is.
        break;
      }
      const range = parseContentRange(res.headers.get("content-range"));
      if (range === undefined || (range.size !== size && !originLied)) {
        fail("http", `206 with Content-Range ${res.headers.get("content-range")} (size ${size})`);
        checkBody = false;
        break;
      }
      if (range.size !== size) {
        mustFail = true; // The fill announced a wrong length: it fails before the last byte.
        bodyStart = Math.min(range.start, size);
        bodyEnd = Math.min(range.end, size);
        break;
      }
      if (
        !multi &&
        (typeof requested !== "object" || requested.start !== range.start ||
          requested.end !== range.end)
      ) {
        fail("http", `206 ${range.start}-${range.end - 1} for Range ${exp.range} of ${size} bytes`);
      }
      bodyStart = range.start;
      bodyEnd = range.end;
      break;
    }
    case 304:
      if (exp.ifNoneMatch === undefined || !etagListMatches(exp.ifNoneMatch, etagOf(image), true)) {
        fail("http", `304 for If-None-Match ${exp.ifNoneMatch} (etag ${etagOf(image)})`);
      }
      checkBody = false;
      break;
    case 416:
      if (
        requested !== "416" && !originLied &&
        !(requested === undefined && exp.range !== undefined && !multi)
      ) {
        fail("http", `416 for a satisfiable Range ${exp.range} of ${size} bytes`);
      }
      checkBody = false;
      break;
    case 503:
      if (!originStatus(503)) fail("status", "503 that the origin did not send");
      checkBody = false;
      break;
    case 502:
      if (
        res.headers.get("x-soak-proxy-error") !== "1" || !origin.some((r) => r.fault === "reset")
      ) {
        fail("status", "502 without an origin reset");
      }
      checkBody = false;
      break;
    default:
      fail("status", `unexpected status ${status}`);
      checkBody = false;
  }
  const expectedLength = bodyEnd - bodyStart;

  // What the origin itself framed as complete: a pass-through carries the
  // origin's answer as sent (a flipped byte included). A miss whose origin
  // announced fewer bytes than the image ends cleanly at that length when
  // there is no byte left to hold back (`Content-Length: 0`): the origin's
  // own framing, which no cache can cut.
  const own = origin.find((r) => r.method === exp.method && (r.status === 200 || r.status === 206));
  let allowedFlip = -1;
  if (passThrough && own?.fault === "corrupt" && own.detail !== undefined) allowedFlip = own.detail;
  const allowedLengths = new Set<number>();
  if (!hit) {
    const shortOf = (r: OriginRecord) => r.fault === "short-length" && r.detail !== undefined;
    if (own !== undefined && shortOf(own)) allowedLengths.add(own.detail!);
    if (sharedFill(cacheStatus)) {
      for (const r of world.originRecords) {
        if (
          r.id === image.id && shortOf(r) &&
          (r.done ?? Infinity) >= exp.started - sharedSlack(world)
        ) {
          allowedLengths.add(r.detail!);
        }
      }
    }
  }
  const announced = res.headers.get("content-length");
  if (checkBody && announced !== null && !originLied && Number(announced) !== expectedLength) {
    fail("http", `Content-Length ${announced}, expected ${expectedLength}`);
  }

  if (exp.method === "HEAD" || !checkBody) {
    await res.body?.cancel().catch(() => {});
    return { status, cacheStatus, ending: "no-body", bytes: 0, violations };
  }

  // Stream the body, comparing as it comes.
  const bytes = new ImageBytes(image.id);
  const scratch = new Uint8Array(64 * 1024);
  const reader = res.body!.getReader();
  let received = 0;
  let mismatches = 0;
  let firstMismatch = -1;
  let ending: Ending = "complete";
  let paused = false;
  for (;;) {
    if (exp.hangUpAfter !== undefined && received >= exp.hangUpAfter) {
      ending = "hangup";
      await reader.cancel().catch(() => {});
      break;
    }
    let timer: ReturnType<typeof setTimeout> | undefined;
    const idle = new Promise<"timeout">((resolve) => {
      timer = setTimeout(() => resolve("timeout"), world.idleTimeout);
    });
    let result;
    try {
      result = await Promise.race([reader.read(), idle]);
    } catch {
      ending = "cut";
      break;
    } finally {
      clearTimeout(timer);
    }
    if (result === "timeout") {
      ending = "timeout";
      await reader.cancel().catch(() => {});
      break;
    }
    if (result.done) break;
    const chunk = result.value;
    const position = bodyStart + received;
    const inRange = Math.max(0, Math.min(chunk.length, bodyEnd - position));
    if (inRange > 0) {
      let from = 0;
      while (from < inRange) {
        const at = bytes.compare(position + from, chunk.subarray(from, inRange), scratch);
        if (at === -1) break;
        mismatches++;
        if (firstMismatch === -1) firstMismatch = position + from + at;
        from += at + 1;
        if (mismatches > 16) break;
      }
    }
    received += chunk.length;
    if (exp.chunkPause !== undefined) await sleep(exp.chunkPause);
    if (!paused && exp.pauseAt !== undefined && received >= exp.pauseAt) {
      paused = true;
      await sleep(exp.pause ?? 0);
    }
  }
  const endedAt = Date.now();

  if (hit && mismatches > 0) {
    fail("hit-wrong-bytes", `hit with ${mismatches} wrong byte(s), first at ${firstMismatch}`);
  }
  let explained: string | undefined;
  if (ending === "complete" && mustFail) {
    fail("clean-wrong-body", `a 206 of a fill that announced a wrong length ended cleanly`);
  } else if (ending === "complete") {
    const exact = received === expectedLength && mismatches === 0;
    const originsOwn = (passThrough && received === expectedLength && mismatches === 1 &&
      firstMismatch === allowedFlip) ||
      (mismatches === 0 && allowedLengths.has(received) &&
        (passThrough || received === Number(announced)));
    if (!exact && !originsOwn) {
      fail(
        "clean-wrong-body",
        `body ended cleanly after ${received} of ${expectedLength} bytes with ${mismatches} wrong byte(s)` +
          (firstMismatch >= 0 ? `, first at ${firstMismatch}` : ""),
      );
    }
  } else if (ending === "cut") {
    // A server that crashed counts as killed once its exit is seen, which may be just
    // after its clients saw their connections cut.
    await sleep(300);
    explained = explainCut(exp, cacheStatus, endedAt, world);
    // Whether the bytes before the cut were right tells a wrong source from a wrong check.
    const wrong = mismatches === 0
      ? "all right"
      : `${mismatches > 16 ? "over 16" : mismatches} wrong, the first at ${firstMismatch}`;
    if (explained === undefined) {
      fail("unexplained-cut", `body cut after ${received} of ${expectedLength} bytes (${wrong})`);
    } else if (explained === "store-read-fault") {
      // Invariant 2: a client the store cannot serve gets the rest from the origin (src/_fill/rescue.ts).
      fail("store-fault-cut", `body cut after ${received} of ${expectedLength} bytes (${wrong})`);
    }
  } else if (ending === "timeout") {
    explained = world.killedBetween(exp.server, exp.started, endedAt) ? "killed" : undefined;
    if (explained === undefined) {
      // A range of a fill waits for the fill's verdict before its last byte (finding 12).
      const lastByte = status === 206 && sharedFill(cacheStatus) &&
        received === expectedLength - 1;
      fail(
        lastByte ? "stuck-range-last-byte" : "stuck",
        `no byte for ${world.idleTimeout} ms after ${received} of ${expectedLength} bytes`,
      );
    }
  }
  return { status, cacheStatus, ending, bytes: received, violations, explained };
}

/**
 * Why a body may have been cut: the server was killed, the origin failed
 * this request, or (for a client that joined a fill) the origin failed that
 * fill. A store fault that cut a body is named, so the summary can count it.
 */
export function explainCut(
  exp: Expectation,
  cacheStatus: string,
  endedAt: number,
  world: World,
): string | undefined {
  if (world.killedBetween(exp.server, exp.started, endedAt + 1000)) return "killed";
  const own = world.originByRequest.get(exp.req) ?? [];
  if (own.some((r) => CUTTING_FAULTS.has(r.fault))) return "origin-fault";
  if (sharedFill(cacheStatus)) {
    // A node's fill that lost its peer asks the origin for the rest (`peer-failover`):
    // an error answer there ends the fill too.
    const cuts = (r: OriginRecord) =>
      CUTTING_FAULTS.has(r.fault) ||
      (r.req === "peer-failover" && ["status-503", "reset", "stall"].includes(r.fault));
    const shared = world.originRecords.some((r) =>
      r.id === exp.image.id && cuts(r) && r.at <= endedAt &&
      (r.done === undefined || r.done >= exp.started - sharedSlack(world))
    );
    if (shared) return "origin-fault-of-fill";
  }
  const faults = world.storeFaultsBetween(exp.server, exp.started - 1000, endedAt + 1000);
  if (faults.includes("store-read-eio")) return "store-read-fault";
  return undefined;
}

/** A `DELETE` answered 2xx: when it was sent and answered, on which server. */
export interface Deletion {
  sent: number;
  at: number;
  server: number;
  /** The request, for the report. */
  what: string;
}

/**
 * Deletion wins (invariant 7): a request sent after a `DELETE` was answered
 * 2xx is served from the cache only by a fill whose origin fetch began
 * after that `DELETE` was sent.
 *
 * In cluster mode the `DELETE` reaches every node that is up and connected
 * to the index (docs/cluster.md): a node that was down meanwhile (or every
 * node but the deleting one, when the database was) keeps its copy, as
 * documented.
 */
export function checkDeletionWins(
  exp: Expectation,
  judged: Judged,
  deleted: Deletion | undefined,
  records: OriginRecord[],
  world: World,
): Violation | undefined {
  if (
    deleted === undefined || exp.started <= deleted.at ||
    !/;\s*(hit|fwd=miss; collapsed)|;\s*peer\b/.test(judged.cacheStatus)
  ) return undefined;
  if (world.cluster && unreached(deleted, world)) return undefined;
  const id = exp.image.id;
  const refilled = records.some((r) =>
    r.id === id && r.method === "GET" && r.status === 200 && r.at > deleted.sent
  );
  if (refilled) return undefined;
  const fetches = records.filter((r) => r.id === id && r.method === "GET")
    .slice(-4).map((r) => `${r.req}@${r.at - deleted.sent}ms:s${r.server}:${r.status}/${r.fault}`);
  // Another process fetched the image shortly before the DELETE was sent: its
  // miss may have been waiting for the origin then.
  const crossProcess = records.some((r) =>
    r.id === id && r.method === "GET" && r.status === 200 && r.server >= 0 &&
    r.server !== deleted.server && r.at <= deleted.sent && r.at >= deleted.sent - 10_000
  );
  return {
    kind: crossProcess ? "deleted-but-served-cross-process" : "deleted-but-served",
    message: `"${judged.cacheStatus}" ${exp.started - deleted.at} ms after ${deleted.what} ` +
      `on server ${deleted.server}; last origin GETs (relative to sent): ${fetches.join(" ")}`,
  };
}

/**
 * Cluster mode: whether some node may have missed `deleted` (the database
 * was away, or a node other than the deleting one was down meanwhile). Such
 * a node keeps its copy, serves it and offers it to its peers, the deleting
 * node included: any answer from the cache may then come from it.
 */
function unreached(deleted: Deletion, world: World): boolean {
  const { sent, at, server } = deleted;
  if (world.databaseDownBetween(sent, at)) return true;
  for (let index = 0; index < world.servers; index++) {
    if (index !== server && world.downBetween(index, sent, at)) return true;
  }
  return false;
}

/** A request that could not be sent or got no answer: explained only by a kill. */
export function judgeFailure(exp: Expectation, world: World, error: unknown): Judged {
  const now = Date.now();
  const violations: Violation[] = [];
  let explained: string | undefined;
  if (world.killedBetween(exp.server, exp.started, now + 1000)) explained = "killed";
  else if ((world.originByRequest.get(exp.req) ?? []).some((r) => r.fault === "reset")) {
    explained = "origin-fault";
  } else {
    violations.push({
      kind: "request-failed",
      message: `no answer: ${String(error).slice(0, 200)}`,
    });
  }
  return { status: 0, cacheStatus: "", ending: "cut", bytes: 0, violations, explained };
}

// ---------------------------------------------------------------------------
// The cache directory.

const SAFE = /^[A-Za-z0-9_-]{1,200}$/;

/** The id a file name stands for (the rule of src/_ids.ts, restated), or `undefined`. */
export function idForName(name: string): string | undefined {
  if (SAFE.test(name)) return name;
  if (!/^~(?:[0-9a-f]{2})+$/.test(name)) return undefined;
  try {
    const id = new TextDecoder("utf-8", { fatal: true }).decode(Buffer.from(name.slice(1), "hex"));
    return id;
  } catch {
    return undefined;
  }
}

/** What a directory check found. */
export interface DirectoryReport {
  violations: Violation[];
  warnings: string[];
  entries: number;
  bytes: number;
  incomplete: number;
  invalid: number;
  queued: number;
}

/** State kept between directory checks (verified files, partial files seen before). */
export interface DirectoryMemory {
  /** `name ino size mtime` of data files already hashed and found right. */
  verified: Set<string>;
  /** `name ino` of partial files without an owner record, seen at the last check. */
  unowned: Set<string>;
  /** Owner records naming a dead process, seen at the last check. */
  deadOwners: Set<string>;
}

/** Options of {@linkcode checkDirectory}. */
export interface DirectoryCheck {
  /** The run's root: nothing may exist in it but `cache`. */
  root: string;
  directory: string;
  catalog: Catalog;
  /** Pids known dead (killed, or exited). */
  deadPids: ReadonlySet<number>;
  /** Check the size limit (when the library prunes). */
  maxSize?: number;
  /** Allowed excess over `maxSize` (fills committing right now, in other processes). */
  slack: number;
  /** No process is filling: every leftover counts at once. */
  quiescent: boolean;
  memory: DirectoryMemory;
}

async function md5File(path: string): Promise<string> {
  const hash = createHash("md5");
  const handle = await open(path, "r");
  try {
    const buffer = new Uint8Array(1 << 20);
    for (;;) {
      const { bytesRead } = await handle.read(buffer, 0, buffer.length, null);
      if (bytesRead === 0) break;
      hash.update(buffer.subarray(0, bytesRead));
    }
  } finally {
    await handle.close();
  }
  return hash.digest("hex");
}

async function walk(path: string, out: string[]) {
  let names;
  try {
    names = await readdir(path, { withFileTypes: true });
  } catch {
    return;
  }
  for (const entry of names) {
    const full = join(path, entry.name);
    out.push(full);
    if (entry.isDirectory()) await walk(full, out);
  }
}

function parseMeta(
  text: string,
): { id?: unknown; size?: unknown; digest?: { algorithm?: unknown; value?: unknown } } | undefined {
  try {
    const value = JSON.parse(text);
    return typeof value === "object" && value !== null ? value : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Checks the cache directory against the oracle: see the module doc. Safe
 * to run while servers work (files may vanish under it).
 */
export async function checkDirectory(check: DirectoryCheck): Promise<DirectoryReport> {
  const { directory, catalog, memory } = check;
  const violations: Violation[] = [];
  const warnings: string[] = [];
  const fail = (kind: string, message: string) => violations.push({ kind, message });
  const report: DirectoryReport = {
    violations,
    warnings,
    entries: 0,
    bytes: 0,
    incomplete: 0,
    invalid: 0,
    queued: 0,
  };

  // Nothing outside the cache directory.
  const all: string[] = [];
  await walk(check.root, all);
  for (const path of all) {
    const rel = relative(check.root, path);
    const top = rel.split("/")[0];
    if (top !== "cache") fail("file-outside", `unexpected file ${rel}`);
  }

  let names: string[];
  try {
    names = await readdir(directory);
  } catch (error) {
    fail("directory", `cannot read the cache directory: ${error}`);
    return report;
  }
  for (const name of names) {
    if (["deleted", "incomplete", "invalid", "queue"].includes(name)) continue;
    const tmp = /^(.*)\.json\.(\d+)-\d+\.tmp$/.exec(name);
    if (tmp !== null) {
      if (check.deadPids.has(Number(tmp[2]))) {
        warnings.push(`metadata temp file of dead pid ${tmp[2]}: ${name}`);
      }
      continue;
    }
    const base = name.endsWith(".json") ? name.slice(0, -5) : name;
    if (idForName(base) === undefined) {
      fail("stray-file", `unexpected name in the cache directory: ${JSON.stringify(name)}`);
    }
  }

  // Every entry a store would list is complete and right.
  for (const name of names) {
    const id = idForName(name);
    if (id === undefined || !names.includes(name + ".json")) continue;
    let info, text;
    try {
      info = await stat(join(directory, name));
      text = await readFile(join(directory, name + ".json"), "utf8");
    } catch {
      continue; // Removed meanwhile.
    }
    const meta = parseMeta(text);
    if (meta === undefined || meta.id !== id || meta.size !== info.size) continue; // Not listed: damaged.
    report.entries++;
    report.bytes += info.size;
    const image = catalog.get(id);
    if (info.size !== image.size) {
      fail(
        "bad-entry",
        `entry ${JSON.stringify(id)} has ${info.size} bytes, the image ${image.size}`,
      );
      continue;
    }
    if (meta.digest?.algorithm === "md5" && meta.digest.value !== image.md5) {
      fail(
        "bad-entry",
        `entry ${
          JSON.stringify(id)
        } records digest ${meta.digest.value}, the image's is ${image.md5}`,
      );
    }
    const key = `${name} ${info.ino} ${info.size} ${info.mtimeMs}`;
    if (memory.verified.has(key)) continue;
    let md5;
    try {
      md5 = await md5File(join(directory, name));
      const after = await stat(join(directory, name));
      if (after.ino !== info.ino) continue; // Replaced while hashed: judged next time.
    } catch {
      continue;
    }
    if (md5 !== image.md5) {
      fail(
        "bad-entry",
        `entry ${JSON.stringify(id)} data hashes to ${md5}, the image to ${image.md5}`,
      );
    } else memory.verified.add(key);
  }
  if (check.maxSize !== undefined && report.bytes > check.maxSize + check.slack) {
    fail(
      "over-max-size",
      `${report.bytes} bytes cached, maxSize ${check.maxSize} (+${check.slack} in flight)`,
    );
  }

  // incomplete/: no partial file of a dead owner, no partial file without one.
  const incompleteDir = join(directory, "incomplete");
  const partials = await readdir(incompleteDir).catch(() => [] as string[]);
  const unowned = new Set<string>();
  const deadOwners = new Set<string>();
  for (const file of partials) {
    if (file.endsWith(".tmp")) continue;
    const owner = file.endsWith(".owner");
    const base = owner ? file.slice(0, -6) : file;
    if (idForName(base) === undefined) {
      fail("stray-file", `unexpected name in incomplete/: ${JSON.stringify(file)}`);
      continue;
    }
    if (!owner) {
      report.incomplete++;
      if (partials.includes(file + ".owner")) continue;
      const info = await stat(join(incompleteDir, file)).catch(() => undefined);
      if (info === undefined) continue;
      const key = `${file} ${info.ino}`;
      unowned.add(key);
      if (check.quiescent || memory.unowned.has(key)) {
        fail(
          "orphan-partial",
          `incomplete/${file} (${info.size} bytes) has no owner record and stays`,
        );
      }
      continue;
    }
    const text = await readFile(join(incompleteDir, file), "utf8").catch(() => undefined);
    if (text === undefined) continue;
    let pid: unknown;
    try {
      pid = JSON.parse(text)?.pid;
    } catch {
      warnings.push(
        `unreadable owner record incomplete/${file}: ${JSON.stringify(text.slice(0, 80))}`,
      );
      continue;
    }
    if (typeof pid === "number" && check.deadPids.has(pid)) {
      const key = `${file} ${text}`;
      deadOwners.add(key);
      if (check.quiescent || memory.deadOwners.has(key)) {
        fail("dead-leftover", `incomplete/${file} belongs to dead pid ${pid} and was not swept`);
      }
    }
  }
  memory.unowned = unowned;
  memory.deadOwners = deadOwners;
  for (const sub of ["invalid", "queue", "deleted"] as const) {
    for (const file of await readdir(join(directory, sub)).catch(() => [] as string[])) {
      if (file.endsWith(".tmp") || (sub === "deleted" && file === ".all")) continue;
      if (idForName(file) === undefined) {
        fail("stray-file", `unexpected name in ${sub}/: ${JSON.stringify(file)}`);
      } else if (sub === "invalid") report.invalid++;
      else if (sub === "queue") report.queued++;
    }
  }
  return report;
}
