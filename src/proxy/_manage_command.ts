/**
 * The `cache-manage` command: Glance's `glance-cache-manage`, for a
 * hono-image-cache management API (`cacheApi`, the proxy's `/v2/cache`).
 *
 * ```sh
 * export IMAGE_CACHE_TOKEN=...       # or --token-file PATH; never on the command line
 * deno task cache-manage list-cached
 * deno task cache-manage --url http://127.0.0.1:8000 queue-image cirros --wait
 * npx hono-image-cache cache-manage delete-all-cached-images --force
 * ```
 *
 * Exit codes: 0 on success, 1 on any failure (with a message on stderr).
 * Runs on Deno, Bun and Node.
 *
 * @module
 */
import { readFile } from "node:fs/promises";
import process from "node:process";

/** Where the CLI reads and writes; replaced in tests. */
export interface CliIo {
  stdout(text: string): void;
  stderr(text: string): void;
  /** One line typed by the user (confirmation), or `null` at end of input. */
  readLine(): Promise<string | null>;
  env: Record<string, string | undefined>;
  /** Whether stderr is a terminal (the progress bar redraws in place). */
  isTTY: boolean;
}

const USAGE = `Usage: cache-manage [options] <command> [args]

Commands:
  list-cached                 List the cached images: id, last accessed, last modified, size, hits
  list-queued                 List the images queued for prefetching, with their failed attempts
  queue-image ID [--wait]     Queue an image for prefetching; --wait shows a progress bar until cached
  delete-cached-image ID      Remove an image from the cache (and from the queue); --cluster: on every node
  delete-all-cached-images    Remove every cached image (asks first unless --force); --cluster: every node
  list-nodes ID               (cluster mode) List the live nodes that have an image cached
  delete-queued-image ID      Remove an image from the queue
  delete-all-queued-images    Empty the queue (asks first unless --force)
  prune                       Remove least-recently-used images down to the cache's maxSize
  clean                       Remove invalid files and stalled partial files
  help                        Show this help

Options:
  --url URL             Base URL of the management API (env IMAGE_CACHE_URL; default http://127.0.0.1:8000)
  --token-file PATH     The admin token, read from this file (env IMAGE_CACHE_TOKEN_FILE), sent as
                        X-Auth-Token; or set IMAGE_CACHE_TOKEN (else OS_AUTH_TOKEN). Never on the
                        command line: ps and task runners show it
  -f, --force           Do not ask before bulk deletes
  --cluster             (deletes) Delete on every live node of the cluster, not this node only
  --wait                (queue-image) Wait until the image is cached, with a progress bar
  --timeout SECONDS     (queue-image --wait) Give up after this long (default 3600)
  --poll-interval MS    (queue-image --wait) How often to ask for progress (default 250)
  -h, --help            Show this help

Exit codes: 0 on success, 1 on failure.
`;

/** A failure with the message the user should read. */
class CliError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "CliError";
  }
}

interface Options {
  url: string;
  token: string | undefined;
  tokenFile: string | undefined;
  force: boolean;
  cluster: boolean;
  wait: boolean;
  timeout: number;
  pollInterval: number;
  help: boolean;
  positional: string[];
}

function parseArgs(args: string[], env: CliIo["env"]): Options {
  const options: Options = {
    url: env.IMAGE_CACHE_URL || "http://127.0.0.1:8000",
    token: env.IMAGE_CACHE_TOKEN || env.OS_AUTH_TOKEN || undefined,
    tokenFile: env.IMAGE_CACHE_TOKEN_FILE || undefined,
    force: false,
    cluster: false,
    wait: false,
    timeout: 3600,
    pollInterval: 250,
    help: false,
    positional: [],
  };
  for (let i = 0; i < args.length; i++) {
    const arg = args[i];
    const [flag, inline] = arg.startsWith("--") && arg.includes("=")
      ? [arg.slice(0, arg.indexOf("=")), arg.slice(arg.indexOf("=") + 1)]
      : [arg, undefined];
    const value = () => {
      const v = inline ?? args[++i];
      if (v === undefined || (inline === undefined && v.startsWith("-") && v.length > 1)) {
        throw new CliError(`Option ${flag} needs a value`);
      }
      return v;
    };
    const number = (name: string) => {
      const v = value();
      const n = Number(v);
      if (!Number.isFinite(n) || n <= 0) {
        throw new CliError(
          `Option ${name} must be a positive number, received ${JSON.stringify(v)}`,
        );
      }
      return n;
    };
    switch (flag) {
      case "--url":
        options.url = value();
        break;
      case "--token":
        // The value is never repeated: it is a secret that should not be on a command line.
        throw new CliError(
          "--token is not accepted: a command line shows in ps and in task runners' output. Set IMAGE_CACHE_TOKEN, or give --token-file PATH",
        );
      case "--token-file":
        options.tokenFile = value();
        break;
      case "-f":
      case "--force":
        options.force = true;
        break;
      case "--wait":
        options.wait = true;
        break;
      case "--cluster":
        options.cluster = true;
        break;
      case "--timeout":
        options.timeout = number("--timeout");
        break;
      case "--poll-interval":
        options.pollInterval = number("--poll-interval");
        break;
      case "-h":
      case "--help":
        options.help = true;
        break;
      default:
        if (arg.startsWith("-") && arg !== "-") throw new CliError(`Unknown option ${arg}`);
        options.positional.push(arg);
    }
  }
  let base;
  try {
    base = new URL(options.url);
  } catch {
    throw new CliError(`--url must be an absolute URL, received ${JSON.stringify(options.url)}`);
  }
  if (base.protocol !== "http:" && base.protocol !== "https:") {
    throw new CliError(`--url must be http or https, received ${JSON.stringify(options.url)}`);
  }
  options.url = base.href.replace(/\/+$/, "");
  return options;
}

/** Queued images whose attempts `list-queued` shows (one request each). */
const STATUS_LIMIT = 50;

/** The management API at `--url`. */
class Client {
  readonly #options: Options;
  constructor(options: Options) {
    this.#options = options;
  }

  /**
   * Sends a request; answers with a `CliError` carrying a clear message
   * for connection errors, 401/403, 404 (`notFound` when given) and
   * anything else not 2xx.
   */
  async request(
    method: string,
    path: string,
    options: { headers?: Record<string, string>; notFound?: string } = {},
  ): Promise<Response> {
    const url = this.#options.url + path;
    const headers: Record<string, string> = { ...options.headers };
    if (this.#options.token !== undefined) headers["x-auth-token"] = this.#options.token;
    let res;
    try {
      res = await fetch(url, { method, headers, signal: AbortSignal.timeout(30_000) });
    } catch (error) {
      const cause = (error as { cause?: { code?: string; message?: string } })?.cause;
      let detail = cause?.code ?? cause?.message ?? (error as Error)?.message ?? String(error);
      if (/connection refused/i.test(detail)) detail = "ECONNREFUSED"; // Deno's long message
      throw new CliError(`Cannot connect to ${this.#options.url}: ${detail}`);
    }
    if (res.ok) return res;
    const text = (await res.text().catch(() => "")).trim().slice(0, 500);
    if (res.status === 401 || res.status === 403) {
      throw new CliError(
        `${res.status === 401 ? "Unauthorized" : "Forbidden"}: ${method} ${path} was refused${
          text ? ` (${text})` : ""
        }. Check IMAGE_CACHE_TOKEN (or --token-file).`,
      );
    }
    if (res.status === 404) {
      throw new CliError(
        options.notFound ??
          `Not found: ${method} ${url}. Is the management API mounted at --url?`,
      );
    }
    throw new CliError(
      `${method} ${path} failed: ${res.status} ${res.statusText}${text ? `: ${text}` : ""}`,
    );
  }

  async json<T>(method: string, path: string, options = {}): Promise<T> {
    const res = await this.request(method, path, options);
    try {
      return await res.json() as T;
    } catch {
      throw new CliError(`${method} ${path} did not answer JSON: is --url a hono-image-cache?`);
    }
  }
}

interface CachedImage {
  image_id: string;
  hits: number;
  last_accessed: number;
  last_modified: number;
  size: number;
}

interface ImageStatus {
  image_id: string;
  state: "cached" | "filling" | "queued";
  size: number | null;
  bytes: number | null;
  attempts: number;
  last_error: string | null;
  next_attempt?: number | null;
  gave_up?: boolean;
}

/** What an operator can do about a prefetch failure, when its reason says. */
function hint(reason: string | null): string {
  if (reason === "status-401" || reason === "status-403") {
    return ": the upstream refused the proxy's credentials; give serve a service token (IMAGE_CACHE_SERVICE_TOKEN or --service-token-file) that may download every image";
  }
  if (reason === "status-404") return ": the upstream has no such image";
  return "";
}

function utc(seconds: number): string {
  if (!seconds) return "N/A";
  return new Date(seconds * 1000).toISOString().slice(0, 19).replace("T", " ");
}

/** A table with a header row, Glance style. */
function table(headers: string[], rows: string[][], right: boolean[]): string {
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = "+" + widths.map((w) => "-".repeat(w + 2)).join("+") + "+\n";
  const row = (cells: string[]) =>
    "|" +
    cells.map((cell, i) => ` ${right[i] ? cell.padStart(widths[i]) : cell.padEnd(widths[i])} `)
      .join("|") +
    "|\n";
  return line + row(headers) + line + rows.map(row).join("") + line;
}

/** Bytes for humans: 1.5 MiB. */
function humanBytes(bytes: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return unit === 0 ? `${bytes} B` : `${value.toFixed(1)} ${units[unit]}`;
}

function progressLine(id: string, status: ImageStatus): string {
  const width = 30;
  const size = status.size ?? 0;
  const bytes = status.state === "cached" ? size : status.bytes ?? 0;
  if (status.state === "queued") {
    if (status.gave_up) {
      return `${id}: gave up after ${status.attempts} attempts (${status.last_error})${
        hint(status.last_error)
      }`;
    }
    return status.last_error
      ? `${id}: queued, attempt ${status.attempts} failed (${status.last_error}); retrying${
        hint(status.last_error)
      }`
      : `${id}: queued, waiting for a download slot`;
  }
  if (size <= 0) return `${id}: downloading, ${humanBytes(bytes)}`;
  const fraction = Math.min(1, bytes / size);
  const filled = Math.round(fraction * width);
  return `[${"#".repeat(filled)}${"-".repeat(width - filled)}] ${
    String(Math.floor(fraction * 100)).padStart(3)
  }% ${humanBytes(bytes)} / ${humanBytes(size)}`;
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

async function waitUntilCached(client: Client, id: string, options: Options, io: CliIo) {
  const path = `/v2/cache/${encodeURIComponent(id)}/status`;
  const deadline = Date.now() + options.timeout * 1000;
  let last = "";
  /** Redraws in place on a terminal; elsewhere prints a line when `key` changes (quiet logs). */
  const show = (line: string, key: string, final = false) => {
    if (io.isTTY) {
      io.stderr(`\r\x1b[2K${line}${final ? "\n" : ""}`);
    } else if (key !== last) {
      io.stderr(line + "\n");
    }
    last = key;
  };
  for (;;) {
    const status = await client.json<ImageStatus>("GET", path, {
      notFound: `Image ${id} is no longer queued nor cached (deleted, or the prefetch gave up)`,
    }).catch((error) => {
      if (io.isTTY && last !== "") io.stderr("\n");
      throw error;
    });
    if (status.state === "cached") {
      show(progressLine(id, { ...status, bytes: status.size }), "cached", true);
      return status;
    }
    if (status.gave_up) {
      if (io.isTTY && last !== "") io.stderr("\n");
      throw new CliError(
        `The proxy gave up prefetching image ${id} after ${status.attempts} attempts (${status.last_error})${
          hint(status.last_error)
        }; queue it again to retry`,
      );
    }
    const tenth = status.size ? Math.floor(((status.bytes ?? 0) / status.size) * 10) : "";
    show(progressLine(id, status), `${status.state} ${status.attempts} ${tenth}`);
    if (Date.now() > deadline) {
      if (io.isTTY) io.stderr("\n");
      throw new CliError(`Gave up waiting for image ${id} after ${options.timeout} s (--timeout)`);
    }
    await sleep(options.pollInterval);
  }
}

async function confirm(io: CliIo, question: string): Promise<boolean> {
  io.stdout(`${question} [y/N] `);
  const answer = await io.readLine();
  if (answer === null) io.stdout("\n");
  return /^\s*y(es)?\s*$/i.test(answer ?? "");
}

function needId(positional: string[], command: string): string {
  const id = positional[1];
  if (id === undefined || id === "") throw new CliError(`${command} needs an image ID`);
  if (positional.length > 2) throw new CliError(`${command} takes one image ID`);
  return id;
}

/**
 * Runs the `cache-manage` command with `args` (without the program name).
 *
 * @returns The exit code: 0 on success, 1 on failure.
 */
export async function manageCommand(args: string[], io: CliIo = processIo()): Promise<number> {
  try {
    const options = parseArgs(args, io.env);
    const [command] = options.positional;
    if (options.help || command === undefined || command === "help") {
      io.stdout(USAGE);
      return options.help || command === "help" ? 0 : 1;
    }
    if (options.tokenFile !== undefined) {
      try {
        options.token = (await readFile(options.tokenFile, "utf8")).trim();
      } catch (error) {
        throw new CliError(
          `Cannot read the token from ${JSON.stringify(options.tokenFile)}: ${
            (error as Error).message
          }`,
        );
      }
    }
    const client = new Client(options);
    const id = (name: string) => encodeURIComponent(needId(options.positional, name));
    const noArgs = () => {
      if (options.positional.length > 1) throw new CliError(`${command} takes no arguments`);
    };
    /** `--cluster`: the delete reaches every live node (x-image-cache-scope). */
    const scope: Record<string, string> = options.cluster
      ? { "x-image-cache-scope": "cluster" }
      : {};
    switch (command) {
      case "list-cached": {
        noArgs();
        const { cached_images: images } = await client.json<{ cached_images: CachedImage[] }>(
          "GET",
          "/v2/cache",
        );
        if (images.length === 0) {
          io.stdout("No cached images.\n");
          return 0;
        }
        io.stdout(`Found ${images.length} cached images...\n`);
        io.stdout(table(
          ["ID", "Last Accessed (UTC)", "Last Modified (UTC)", "Size", "Hits"],
          images.map((image) => [
            image.image_id,
            utc(image.last_accessed),
            utc(image.last_modified),
            String(image.size),
            String(image.hits),
          ]),
          [false, false, false, true, true],
        ));
        return 0;
      }
      case "list-queued": {
        noArgs();
        const { queued_images: queued } = await client.json<{ queued_images: string[] }>(
          "GET",
          "/v2/cache",
        );
        if (queued.length === 0) {
          io.stdout("No queued images.\n");
          return 0;
        }
        io.stdout(`Found ${queued.length} queued images...\n`);
        // Each image's attempts, for the first ones (one request each).
        const shown = queued.slice(0, STATUS_LIMIT);
        const statuses = await Promise.all(
          shown.map((q) =>
            client.json<ImageStatus>("GET", `/v2/cache/${encodeURIComponent(q)}/status`)
              .catch(() => undefined)
          ),
        );
        const state = (status: ImageStatus | undefined) => {
          if (status === undefined) return "?";
          if (status.state !== "queued") return status.state;
          if (status.gave_up) return "gave up";
          return status.attempts > 0 ? "retrying" : "waiting";
        };
        io.stdout(table(
          ["ID", "State", "Failed attempts", "Last error"],
          queued.map((q, i) => {
            const status = statuses[i];
            return [
              q,
              i < STATUS_LIMIT ? state(status) : "",
              String(status?.attempts ?? ""),
              status?.last_error ?? "",
            ];
          }),
          [false, false, true, false],
        ));
        const refused = statuses.find((status) => status?.gave_up || status?.last_error);
        if (refused !== undefined && hint(refused.last_error ?? null) !== "") {
          io.stderr(`Note${hint(refused.last_error ?? null)}\n`);
        }
        return 0;
      }
      case "queue-image": {
        const image = needId(options.positional, command);
        await client.request("PUT", `/v2/cache/${id(command)}`);
        io.stdout(`Queued image ${image} for caching\n`);
        if (options.wait) {
          const status = await waitUntilCached(client, image, options, io);
          io.stdout(`Image ${image} is cached (${humanBytes(status.size ?? 0)})\n`);
        }
        return 0;
      }
      case "delete-cached-image": {
        const image = needId(options.positional, command);
        await client.request("DELETE", `/v2/cache/${id(command)}`, {
          headers: scope,
          notFound: `Image ${image} is not cached, queued nor being cached${
            options.cluster ? " on any node" : ""
          }`,
        });
        io.stdout(`Deleted cached image ${image}${options.cluster ? " on every node" : ""}\n`);
        return 0;
      }
      case "delete-all-cached-images":
      case "delete-all-queued-images": {
        noArgs();
        const what = command === "delete-all-cached-images" ? "cached" : "queued";
        if (!options.force && !(await confirm(io, `Delete all ${what} images?`))) {
          io.stderr(`Not deleting ${what} images (confirm with y, or use --force)\n`);
          return 1;
        }
        await client.request("DELETE", "/v2/cache", {
          headers: {
            "x-image-cache-clear-target": what === "cached" ? "cache" : "queue",
            ...(what === "cached" ? scope : {}),
          },
        });
        io.stdout(`Deleted all ${what} images${options.cluster ? " on every node" : ""}\n`);
        return 0;
      }
      case "list-nodes": {
        const image = needId(options.positional, command);
        const res = await client.request("GET", `/v2/cache/nodes/${id(command)}`, {
          notFound: `Not found: is the management API mounted at --url?`,
        }).catch((error) => {
          if (error instanceof CliError && / 409 /.test(error.message)) {
            throw new CliError(`${options.url} is not in cluster mode (no --cluster-db)`);
          }
          throw error;
        });
        const nodes = await res.json() as string[];
        if (nodes.length === 0) {
          io.stdout(`No live node has image ${image} cached.\n`);
          return 0;
        }
        io.stdout(`Found ${nodes.length} nodes with image ${image}...\n`);
        io.stdout(table(["Node"], nodes.map((node) => [node]), [false]));
        return 0;
      }
      case "delete-queued-image": {
        const image = needId(options.positional, command);
        const { queued_images: queued } = await client.json<{ queued_images: string[] }>(
          "GET",
          "/v2/cache",
        );
        if (!queued.includes(image)) throw new CliError(`Image ${image} is not queued`);
        // Glance's v2 API has no dequeue-only route; its cache-manage route does.
        await client.request("DELETE", `/v2/queued_images/${id(command)}`);
        io.stdout(`Deleted queued image ${image}\n`);
        return 0;
      }
      case "prune": {
        noArgs();
        const result = await client.json<
          { total_files_pruned: number; total_bytes_pruned: number }
        >(
          "POST",
          "/v2/cache/prune",
        );
        io.stdout(
          `Pruned ${result.total_files_pruned} images (${humanBytes(result.total_bytes_pruned)})\n`,
        );
        return 0;
      }
      case "clean": {
        noArgs();
        const result = await client.json<
          { invalid_files_removed: number; incomplete_files_removed: number }
        >("POST", "/v2/cache/clean");
        io.stdout(
          `Removed ${result.invalid_files_removed} invalid and ${result.incomplete_files_removed} stalled partial files\n`,
        );
        return 0;
      }
      default:
        throw new CliError(`Unknown command ${JSON.stringify(command)}; see cache-manage --help`);
    }
  } catch (error) {
    if (error instanceof CliError) {
      io.stderr(`Error: ${error.message}\n`);
    } else {
      io.stderr(`Error: ${error instanceof Error ? error.stack ?? error.message : error}\n`);
    }
    return 1;
  }
}

/** The real terminal: stdout, stderr, one line of stdin. */
function processIo(): CliIo {
  return {
    stdout: (text) => void process.stdout.write(text),
    stderr: (text) => void process.stderr.write(text),
    readLine: () =>
      new Promise((resolve) => {
        let buffer = "";
        const stdin = process.stdin;
        const finish = (line: string | null) => {
          stdin.off("data", onData);
          stdin.off("end", onEnd);
          stdin.pause();
          resolve(line);
        };
        const onData = (chunk: unknown) => {
          buffer += String(chunk);
          const newline = buffer.indexOf("\n");
          if (newline !== -1) finish(buffer.slice(0, newline));
        };
        const onEnd = () => finish(buffer === "" ? null : buffer);
        stdin.on("data", onData);
        stdin.on("end", onEnd);
        stdin.resume();
      }),
    env: process.env,
    isTTY: Boolean(process.stderr.isTTY),
  };
}
