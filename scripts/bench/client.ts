/**
 * A lean HTTP/1.1 download client for the benchmarks (Deno): one connection
 * per URL, bodies counted in a 1 MiB buffer and thrown away. curl reads in
 * 16 KiB pieces and tops out near 1.7 GB/s on loopback, below what nginx and
 * Bun send; this client does not. Handles `Content-Length` and chunked bodies.
 *
 * Usage: `deno run -A scripts/bench/client.ts '<json>'` with
 * `{ "urls": [...], "rates"?: [bytes/s | 0], "delays"?: [ms], "verify"?: [md5 hex | ""],
 * "timeoutMs"?: n }`; prints one JSON line: `{ "results": [...], "wall": s }`.
 * Started by `scripts/bench/bench.ts` and `scripts/bench/memory_check.ts`.
 *
 * @module
 */
import { createHash, type Hash } from "node:crypto";

/** What one download gave. */
export interface DownloadResult {
  status: number;
  /** Body bytes received. */
  bytes: number;
  /** From the connect to the last body byte. */
  seconds: number;
  headers: Record<string, string>;
  /** Whether the body ended cleanly (the full `Content-Length`, or the last chunk). */
  complete: boolean;
  /** MD5 of the body (hex), when asked to verify. */
  md5?: string;
  error?: string;
}

interface Job {
  urls: string[];
  rates?: number[];
  delays?: number[];
  verify?: string[];
  timeoutMs?: number;
}

const BUFFER = 1 << 20;
const decoder = new TextDecoder();

function sleep(ms: number) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function indexOfCrlf(bytes: Uint8Array, from: number, to: number): number {
  for (let i = from; i + 1 < to; i++) if (bytes[i] === 13 && bytes[i + 1] === 10) return i;
  return -1;
}

function indexOfHeaderEnd(bytes: Uint8Array, to: number): number {
  for (let i = 0; i + 3 < to; i++) {
    if (bytes[i] === 13 && bytes[i + 1] === 10 && bytes[i + 2] === 13 && bytes[i + 3] === 10) {
      return i;
    }
  }
  return -1;
}

async function download(
  url: string,
  rate: number,
  hash: Hash | undefined,
  deadline: number,
): Promise<DownloadResult> {
  const target = new URL(url);
  const start = performance.now();
  const result: DownloadResult = {
    status: 0,
    bytes: 0,
    seconds: 0,
    headers: {},
    complete: false,
  };
  const conn = await Deno.connect({ hostname: target.hostname, port: Number(target.port) });
  const timer = setTimeout(() => {
    result.error = "timeout";
    try {
      conn.close();
    } catch { /* closed */ }
  }, Math.max(1, deadline - Date.now()));
  try {
    await conn.write(
      new TextEncoder().encode(
        `GET ${target.pathname}${target.search} HTTP/1.1\r\nHost: ${target.host}\r\n` +
          `Connection: close\r\n\r\n`,
      ),
    );
    // A rate-limited client reads small pieces, so TCP flow control slows the server.
    const buffer = new Uint8Array(rate > 0 ? 64 * 1024 : BUFFER);
    let filled = 0;
    let headerEnd = -1;
    while (headerEnd === -1) {
      const n = await conn.read(buffer.subarray(filled));
      if (n === null) throw new Error("Connection closed before the headers");
      filled += n;
      headerEnd = indexOfHeaderEnd(buffer, filled);
      if (headerEnd === -1 && filled === buffer.length) throw new Error("Headers too long");
    }
    const head = decoder.decode(buffer.subarray(0, headerEnd)).split("\r\n");
    result.status = Number(head[0].split(" ")[1]);
    for (const line of head.slice(1)) {
      const colon = line.indexOf(":");
      if (colon > 0) {
        result.headers[line.slice(0, colon).toLowerCase()] = line.slice(colon + 1).trim();
      }
    }
    const length = result.headers["content-length"];
    const chunked = /chunked/i.test(result.headers["transfer-encoding"] ?? "");
    let at = headerEnd + 4;
    // Chunked state: bytes left in the current chunk; -1 while reading a size line.
    let chunkLeft = -1;
    let crlfLeft = 0;
    const expected = length === undefined ? Infinity : Number(length);
    for (;;) {
      if (!chunked) {
        const take = filled - at;
        if (take > 0) {
          hash?.update(buffer.subarray(at, filled));
          result.bytes += take;
          at = filled;
        }
        if (result.bytes >= expected) {
          result.complete = result.bytes === expected;
          break;
        }
      } else {
        let done = false;
        while (at < filled) {
          if (crlfLeft > 0) {
            // The CRLF after a chunk's data: may straddle reads.
            const skip = Math.min(crlfLeft, filled - at);
            at += skip;
            crlfLeft -= skip;
            continue;
          }
          if (chunkLeft === -1) {
            const eol = indexOfCrlf(buffer, at, filled);
            if (eol === -1) {
              // Keep the partial size line at the start of the buffer.
              buffer.copyWithin(0, at, filled);
              filled -= at;
              at = 0;
              break;
            }
            chunkLeft = parseInt(decoder.decode(buffer.subarray(at, eol)), 16);
            at = eol + 2;
            if (chunkLeft === 0) {
              done = true;
              break;
            }
            continue;
          }
          const take = Math.min(chunkLeft, filled - at);
          hash?.update(buffer.subarray(at, at + take));
          result.bytes += take;
          chunkLeft -= take;
          at += take;
          if (chunkLeft === 0) {
            chunkLeft = -1;
            crlfLeft = 2;
          }
        }
        if (done) {
          result.complete = true;
          break;
        }
      }
      if (at >= filled) {
        at = 0;
        filled = 0;
      }
      if (rate > 0) {
        const ahead = result.bytes / rate - (performance.now() - start) / 1000;
        if (ahead > 0) await sleep(ahead * 1000);
      }
      const n = await conn.read(buffer.subarray(filled));
      if (n === null) {
        result.complete = !chunked && length === undefined;
        break;
      }
      filled += n;
    }
  } catch (error) {
    result.error ??= String(error);
  } finally {
    clearTimeout(timer);
    try {
      conn.close();
    } catch { /* closed */ }
  }
  result.seconds = (performance.now() - start) / 1000;
  if (hash) result.md5 = hash.digest("hex");
  return result;
}

const job = JSON.parse(Deno.args[0] ?? "{}") as Job;
if (!Array.isArray(job.urls) || job.urls.length === 0) {
  throw new TypeError(`Cannot download: "urls" must be a non-empty array`);
}
const deadline = Date.now() + (job.timeoutMs ?? 600_000);
const started = performance.now();
const results = await Promise.all(job.urls.map(async (url, i) => {
  const delay = job.delays?.[i] ?? 0;
  if (delay > 0) await sleep(delay);
  const verify = job.verify?.[i];
  try {
    return await download(
      url,
      job.rates?.[i] ?? 0,
      verify ? createHash("md5") : undefined,
      deadline,
    );
  } catch (error) {
    return {
      status: 0,
      bytes: 0,
      seconds: 0,
      headers: {},
      complete: false,
      error: String(error),
    } as DownloadResult;
  }
}));
console.log(JSON.stringify({ results, wall: (performance.now() - started) / 1000 }));
