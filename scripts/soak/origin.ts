/**
 * The soak's origin: a Glance-like image server written on raw sockets, so it
 * can lie the way real origins do (a wrong `Content-Length`, a body cut
 * mid-stream, a wrong checksum, corrupt bytes, a stall), and records what it
 * did to every request. The oracle reads those records: a response passed
 * through uncached is compared with what the origin sent for that request.
 *
 * @module
 */
import { Buffer } from "node:buffer";
import { createServer, type Server, type Socket } from "node:net";
import { type Catalog, type CatalogImage, ImageBytes, type Rng } from "./data.ts";

/** What the origin did wrong on one request. */
export type OriginFault =
  | "none"
  | "slow"
  | "stall"
  | "fail"
  | "corrupt"
  | "bad-checksum"
  | "short-length"
  | "long-length"
  | "status-503"
  | "reset"
  | "no-checksum";

/** Faults after which the origin's body is not the image (the client must see an error or a pass-through). */
export const CUTTING_FAULTS: ReadonlySet<OriginFault> = new Set([
  "fail",
  "corrupt",
  "bad-checksum",
  "short-length",
  "long-length",
  "reset",
]);

/** One request the origin answered. */
export interface OriginRecord {
  /** The client's `x-soak-req`, or `-` (prefetch, or a header the proxy dropped). */
  req: string;
  /** The soak server that asked (`x-soak-server`), -1 when unknown. */
  server: number;
  id: string;
  method: string;
  fault: OriginFault;
  /** `corrupt`: the image offset of the flipped byte; `short-length`: the announced length. */
  detail?: number;
  status: number;
  /** First and one-past-last image offsets of the body sent (a range). */
  start: number;
  end: number;
  /** When the request arrived and when the answer ended, ms since the epoch. */
  at: number;
  done?: number;
}

/** Options of {@linkcode SoakOrigin}. */
export interface SoakOriginOptions {
  catalog: Catalog;
  rng: Rng;
  /** Probability that a data answer is faulty. */
  faultRate: number;
  /** Longest stall, ms. */
  maxStall: number;
  /** Longest total delay of a slow answer, ms. */
  maxSlow: number;
}

const CHUNK = 64 * 1024;

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Why an answer stopped early: the peer went away. */
class Gone extends Error {}

/** Writes with backpressure; rejects with {@linkcode Gone} when the socket closes. */
function send(socket: Socket, data: Uint8Array | string): Promise<void> {
  if (socket.destroyed) return Promise.reject(new Gone());
  if (socket.write(data)) return Promise.resolve();
  return new Promise((resolve, reject) => {
    const done = (error?: Error) => {
      socket.off("drain", onDrain);
      socket.off("close", onClose);
      if (error) reject(error);
      else resolve();
    };
    const onDrain = () => done();
    const onClose = () => done(new Gone());
    socket.on("drain", onDrain);
    socket.on("close", onClose);
  });
}

interface Parsed {
  method: string;
  target: string;
  headers: Map<string, string>;
}

function parseHead(head: string): Parsed | undefined {
  const lines = head.split("\r\n");
  const [method, target] = lines[0].split(" ");
  if (method === undefined || target === undefined) return undefined;
  const headers = new Map<string, string>();
  for (const line of lines.slice(1)) {
    const colon = line.indexOf(":");
    if (colon > 0) {
      headers.set(line.slice(0, colon).trim().toLowerCase(), line.slice(colon + 1).trim());
    }
  }
  return { method, target, headers };
}

/**
 * How the origin reads a request target: the image id (decoded once) and
 * whether it is a v1 route; `undefined` when it answers 404.
 */
export function originRoute(
  method: string,
  target: string,
): { id: string; v1: boolean } | undefined {
  const path = target.split("?")[0];
  const v2 = /^\/v2\/images\/([^/]+)\/file$/.exec(path);
  const v1 = /^\/v1\/images\/([^/]+)$/.exec(path);
  const v2Delete = /^\/v2\/images\/([^/]+)$/.exec(path);
  let raw;
  if (method === "DELETE") raw = v1 ?? v2Delete;
  else if (method === "GET" || method === "HEAD") raw = v2 ?? v1;
  if (!raw) return undefined;
  try {
    return { id: decodeURIComponent(raw[1]), v1: raw === v1 };
  } catch {
    return undefined;
  }
}

/** A single byte range of an image of `size`: `undefined` to ignore the header, `"416"` when unsatisfiable. */
export function parseRange(
  value: string | undefined,
  size: number,
): { start: number; end: number } | "416" | undefined {
  if (value === undefined) return undefined;
  const match = /^bytes=(\d*)-(\d*)$/.exec(value.trim());
  if (match === null || (match[1] === "" && match[2] === "")) return undefined;
  if (match[1] === "") {
    const suffix = Number(match[2]);
    if (suffix === 0 || size === 0) return "416";
    return { start: Math.max(0, size - suffix), end: size };
  }
  const start = Number(match[1]);
  const last = match[2] === "" ? size - 1 : Number(match[2]);
  if (last < start) return undefined;
  if (start >= size) return "416";
  return { start, end: Math.min(size, last + 1) };
}

/** The origin. Start it with {@linkcode SoakOrigin.listen}. */
export class SoakOrigin {
  readonly records: OriginRecord[] = [];
  readonly byRequest = new Map<string, OriginRecord[]>();
  readonly faults: Record<string, number> = {};
  bytesSent = 0;
  #options: SoakOriginOptions;
  #server: Server | undefined;
  #sockets = new Set<Socket>();
  #closed = false;

  constructor(options: SoakOriginOptions) {
    this.#options = options;
  }

  /** Listens on a free loopback port; resolves the base URL. */
  listen(): Promise<string> {
    const server = createServer((socket) => this.#accept(socket));
    this.#server = server;
    return new Promise((resolve, reject) => {
      server.once("error", reject);
      server.listen(0, "127.0.0.1", () => {
        const address = server.address();
        if (address === null || typeof address === "string") return reject(new Error("No port"));
        resolve(`http://127.0.0.1:${address.port}`);
      });
    });
  }

  /** Changes the probability of a faulty answer from now on. */
  setFaultRate(rate: number): void {
    this.#options = { ...this.#options, faultRate: rate };
  }

  /** Stops listening and drops every connection. */
  close(): Promise<void> {
    this.#closed = true;
    for (const socket of this.#sockets) socket.destroy();
    return new Promise((resolve) => {
      if (this.#server === undefined) return resolve();
      this.#server.close(() => resolve());
    });
  }

  #accept(socket: Socket) {
    this.#sockets.add(socket);
    socket.on("close", () => this.#sockets.delete(socket));
    socket.on("error", () => {});
    let buffered = "";
    const onData = (data: Buffer) => {
      buffered += data.toString("latin1");
      const end = buffered.indexOf("\r\n\r\n");
      if (end === -1) {
        if (buffered.length > 64 * 1024) socket.destroy();
        return;
      }
      socket.off("data", onData);
      const parsed = parseHead(buffered.slice(0, end));
      if (parsed === undefined) {
        socket.end("HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n");
        return;
      }
      this.#answer(socket, parsed).catch(() => socket.destroy());
    };
    socket.on("data", onData);
  }

  #record(record: OriginRecord) {
    this.records.push(record);
    let list = this.byRequest.get(record.req);
    if (list === undefined) this.byRequest.set(record.req, list = []);
    list.push(record);
    if (record.fault !== "none") this.faults[record.fault] = (this.faults[record.fault] ?? 0) + 1;
  }

  async #answer(socket: Socket, request: Parsed) {
    const { method, headers } = request;
    const req = headers.get("x-soak-req") ?? "-";
    const server = Number(headers.get("x-soak-server") ?? -1);
    const route = originRoute(method, request.target);
    const id = route?.id;
    const v1 = route?.v1 ?? false;
    if (id === undefined) {
      await send(
        socket,
        "HTTP/1.1 404 Not Found\r\nconnection: close\r\ncontent-length: 9\r\n\r\nnot found",
      );
      socket.end();
      return;
    }
    const at = Date.now();
    if (method === "DELETE") {
      // The image stays at the origin with the same bytes (as if re-uploaded), so the truth never changes.
      this.#record({
        req,
        server,
        id,
        method,
        fault: "none",
        status: v1 ? 200 : 204,
        start: 0,
        end: 0,
        at,
        done: at,
      });
      await send(
        socket,
        v1
          ? "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
          : "HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n",
      );
      socket.end();
      return;
    }
    const image = this.#options.catalog.get(id);
    await this.#data(socket, request, image, v1, { req, server, at });
  }

  #pickFault(image: CatalogImage, ranged: boolean, head: boolean): OriginFault {
    const rng = this.#options.rng;
    if (head || !rng.chance(this.#options.faultRate)) return "none";
    const fault = rng.weighted<OriginFault>({
      none: 0,
      slow: 3,
      stall: 1,
      fail: 3,
      corrupt: 2,
      "bad-checksum": 2,
      "short-length": 2,
      "long-length": 2,
      "status-503": 1,
      reset: 1,
      // The right bytes without their checksum: processes that share a cache
      // directory then hold answers that disagree on what they can verify.
      "no-checksum": 2,
    });
    const detectable = image.digest !== "none";
    if (ranged && !["slow", "stall", "fail", "status-503", "reset"].includes(fault)) return "slow";
    if (fault === "no-checksum" && !detectable) return "slow";
    if ((fault === "corrupt" || fault === "short-length") && (!detectable || image.size === 0)) {
      return "fail";
    }
    if (fault === "long-length" && image.chunked) return "fail";
    return fault;
  }

  async #data(
    socket: Socket,
    request: Parsed,
    image: CatalogImage,
    v1: boolean,
    who: { req: string; server: number; at: number },
  ) {
    const { req, server, at } = who;
    const rng = this.#options.rng;
    const head = request.method === "HEAD";
    const size = image.size;
    const etag = `"md5-${image.md5}"`;
    const lines: string[] = ["content-type: application/octet-stream", "connection: close"];
    lines.push(`etag: ${etag}`, "accept-ranges: bytes");
    const inm = request.headers.get("if-none-match");
    if (
      inm !== undefined &&
      (inm.trim() === "*" || inm.split(",").some((t) => t.trim().replace(/^W\//, "") === etag))
    ) {
      this.#record({
        req,
        server,
        id: image.id,
        method: request.method,
        fault: "none",
        status: 304,
        start: 0,
        end: 0,
        at,
        done: Date.now(),
      });
      await send(socket, `HTTP/1.1 304 Not Modified\r\n${lines.join("\r\n")}\r\n\r\n`);
      socket.end();
      return;
    }
    const ifRange = request.headers.get("if-range");
    let range = parseRange(request.headers.get("range"), size);
    if (ifRange !== undefined && ifRange !== etag) range = undefined;
    if (range === "416") {
      this.#record({
        req,
        server,
        id: image.id,
        method: request.method,
        fault: "none",
        status: 416,
        start: 0,
        end: 0,
        at,
        done: Date.now(),
      });
      await send(
        socket,
        `HTTP/1.1 416 Range Not Satisfiable\r\n${
          lines.join("\r\n")
        }\r\ncontent-range: bytes */${size}\r\ncontent-length: 0\r\n\r\n`,
      );
      socket.end();
      return;
    }
    const start = range?.start ?? 0;
    const end = range?.end ?? size;
    const fault = this.#pickFault(image, range !== undefined, head);
    const record: OriginRecord = {
      req,
      server,
      id: image.id,
      method: request.method,
      fault,
      status: range ? 206 : 200,
      start,
      end,
      at,
    };
    this.#record(record);
    if (fault === "reset") {
      socket.resetAndDestroy?.() ?? socket.destroy();
      record.done = Date.now();
      return;
    }
    if (fault === "status-503") {
      record.status = 503;
      await send(
        socket,
        "HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-length: 11\r\n\r\nunavailable",
      );
      socket.end();
      record.done = Date.now();
      return;
    }
    let announced = end - start;
    let sent = end - start;
    if (fault === "short-length") {
      announced = sent = rng.int(0, size - 1);
      record.detail = announced;
    } else if (fault === "long-length") {
      announced = sent + rng.int(1, 100_000);
    } else if (fault === "fail") {
      sent = sent === 0 ? 0 : rng.int(0, sent - 1);
    }
    if (!range) {
      let digest: string | undefined;
      if (image.digest === "md5-base64" && !v1) {
        digest = Buffer.from(image.md5, "hex").toString("base64");
      } else if (image.digest !== "none") digest = image.md5;
      if (fault === "no-checksum") digest = undefined;
      if (fault === "bad-checksum") {
        digest = rng.chance(0.3)
          ? "foobar"
          : Array.from({ length: 32 }, () => rng.int(0, 15).toString(16)).join("");
      }
      if (digest !== undefined) {
        lines.push(v1 ? `x-image-meta-checksum: ${digest}` : `content-md5: ${digest}`);
      }
      if (v1) {
        lines.push(
          `x-image-meta-id: ${encodeURIComponent(image.id)}`,
          `x-image-meta-size: ${size}`,
          "x-image-meta-status: active",
          `x-image-meta-location: file:///var/lib/glance/images/${encodeURIComponent(image.id)}`,
        );
      }
    } else {
      lines.push(`content-range: bytes ${start}-${end - 1}/${size}`);
    }
    const chunked = image.chunked && !range && fault !== "long-length";
    if (chunked) lines.push("transfer-encoding: chunked");
    else lines.push(`content-length: ${announced}`);
    const status = range ? "206 Partial Content" : "200 OK";
    if (fault === "corrupt") record.detail = start + rng.int(0, sent - 1);
    const stallAt = fault === "stall" ? rng.int(0, Math.max(0, sent - 1)) : -1;
    const slowDelay = fault === "slow"
      ? Math.max(1, Math.floor(this.#options.maxSlow / Math.max(1, Math.ceil(sent / CHUNK))))
      : 0;
    try {
      await send(socket, `HTTP/1.1 ${status}\r\n${lines.join("\r\n")}\r\n\r\n`);
      if (head) {
        socket.end();
        return;
      }
      const bytes = new ImageBytes(image.id);
      let position = start;
      let stalled = false;
      while (position < start + sent) {
        if (this.#closed) throw new Gone();
        if (!stalled && stallAt >= 0 && position - start >= stallAt) {
          stalled = true;
          await sleep(rng.int(500, this.#options.maxStall));
        }
        if (slowDelay > 0) await sleep(Math.min(slowDelay, 50));
        let n = Math.min(CHUNK, start + sent - position);
        if (stallAt >= 0 && !stalled) n = Math.min(n, Math.max(1, start + stallAt - position));
        const chunk = bytes.read(position, new Uint8Array(n));
        if (record.detail !== undefined && fault === "corrupt") {
          const flip = record.detail - position;
          if (flip >= 0 && flip < n) chunk[flip] ^= 0xff;
        }
        if (chunked) {
          await send(socket, `${n.toString(16)}\r\n`);
          await send(socket, chunk);
          await send(socket, "\r\n");
        } else {
          await send(socket, chunk);
        }
        this.bytesSent += n;
        position += n;
      }
      if (fault === "fail" || fault === "long-length") {
        socket.destroy();
        return;
      }
      if (chunked) await send(socket, "0\r\n\r\n");
      socket.end();
    } catch (error) {
      if (!(error instanceof Gone)) throw error;
    } finally {
      record.done = Date.now();
    }
  }
}
