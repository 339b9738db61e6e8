/**
 * The `serve` command: the caching proxy from the command line, on Deno
 * (`deno task serve`, the compiled binary), Node and Bun (the npm package's
 * `hono-image-cache serve`).
 *
 * With no `--upstream`, a demo Glance that wants a token starts on a
 * loopback port, with the management API behind an admin token generated
 * and printed once, so the command shows everything on a fresh machine.
 * Secrets come from the environment or from files, never from the command
 * line (which `ps` and task runners show).
 *
 * Exit codes: 0 after a clean shutdown (SIGINT/SIGTERM) or `--help`, 1 when
 * the proxy cannot start (port taken, cache directory not writable), 2 for
 * bad arguments.
 *
 * @module
 */
import { randomBytes } from "node:crypto";
import { mkdir, readFile } from "node:fs/promises";
import process from "node:process";
import { parseArgs } from "node:util";
import { type Cluster, joinCluster } from "../cluster.ts";
import { FileSystemStore } from "../file_system_store.ts";
import {
  type AccessLogEntry,
  formatAccessLog,
  formatProxyEvent,
  type LogFormat,
  type ProxyEvent,
} from "./access_log.ts";
import { proxyApp } from "./app.ts";
import { trustedProxies } from "./_client.ts";
import { DEMO_TOKENS, demoGlance } from "./_demo.ts";
import { fileSystemSize, proveWritable } from "./_health.ts";
import { listen, type Listener } from "./_server.ts";
import { describeError } from "./_shared.ts";

/** One setting: its flag, environment variable, default and help text. */
interface Setting {
  flag: string;
  env: string;
  value?: string;
  boolean?: true;
  /** Can be given more than once (or as a comma-separated list). */
  multiple?: true;
  default?: string;
  help: string;
}

/** The secrets: each from its environment variable, or from a file (flag or variable). */
const SECRETS = {
  "admin-token": {
    env: "IMAGE_CACHE_ADMIN_TOKEN",
    what: "the admin token",
  },
  "service-token": {
    env: "IMAGE_CACHE_SERVICE_TOKEN",
    what: "the service token",
  },
  "metrics-token": {
    env: "IMAGE_CACHE_METRICS_TOKEN",
    what: "the metrics token",
  },
  "cluster-secret": {
    env: "IMAGE_CACHE_CLUSTER_SECRET",
    what: "the cluster secret",
  },
} as const;
type Secret = keyof typeof SECRETS;

const SETTINGS: Setting[] = [
  {
    flag: "upstream",
    env: "IMAGE_CACHE_UPSTREAM",
    value: "URL",
    help:
      "Glance (or any HTTP origin) to proxy to. Default: a built-in demo Glance on loopback, which wants a token",
  },
  {
    flag: "listen",
    env: "IMAGE_CACHE_LISTEN",
    value: "HOST:PORT",
    default: "127.0.0.1:8000",
    help: "Address to listen on (`:9292` for every interface, port 0 for any free port)",
  },
  {
    flag: "cache-dir",
    env: "IMAGE_CACHE_DIR",
    value: "DIR",
    default: "./.image-cache",
    help: "Cache directory (Glance's layout; created when missing; a write is tested at start)",
  },
  {
    flag: "max-size",
    env: "IMAGE_CACHE_MAX_SIZE",
    value: "SIZE",
    default: "10G",
    help: "Most image data to keep; least recently used images go first (K, M, G, T: binary)",
  },
  {
    flag: "min-free",
    env: "IMAGE_CACHE_MIN_FREE",
    value: "SIZE",
    default: "0",
    help: "Disk space to leave free",
  },
  {
    flag: "admin-token-file",
    env: "IMAGE_CACHE_ADMIN_TOKEN_FILE",
    value: "PATH",
    help:
      "Mounts the management API (/v2/cache...) for requests with the token in this file (Bearer or X-Auth-Token, 16+ characters); or set IMAGE_CACHE_ADMIN_TOKEN. Without either, those paths go to the upstream",
  },
  {
    flag: "service-token-file",
    env: "IMAGE_CACHE_SERVICE_TOKEN_FILE",
    value: "PATH",
    help:
      "The credential (X-Auth-Token) for downloads without a client (prefetches), read before each download so that a job can renew it; or set IMAGE_CACHE_SERVICE_TOKEN. It also confirms deletions and reads metadata clients may not",
  },
  {
    flag: "metrics-token-file",
    env: "IMAGE_CACHE_METRICS_TOKEN_FILE",
    value: "PATH",
    help:
      "A read-only token for GET /metrics alone (the admin token reads it too); or set IMAGE_CACHE_METRICS_TOKEN",
  },
  {
    flag: "access-check",
    env: "IMAGE_CACHE_ACCESS_CHECK",
    value: "glance|off",
    default: "glance",
    help:
      "Before a hit, ask the upstream what Glance decides for a download with the client's credentials (a 1-byte GET of /v2/images/{id}/file); `off` only for public origins. Fills are verified either way",
  },
  {
    flag: "access-ttl",
    env: "IMAGE_CACHE_ACCESS_TTL",
    value: "DURATION",
    default: "30s",
    help:
      "How long an access answer is reused for the same credential and image (0: never). An allowed answer outlives a revoked token or a deleted image by up to this long",
  },
  {
    flag: "serve-stale-on-error",
    env: "IMAGE_CACHE_SERVE_STALE_ON_ERROR",
    value: "DURATION",
    default: "0",
    help:
      "When the upstream cannot be reached (or answers 5xx; never when it says no), still serve a cached image to a credential it allowed within this long: an edge site keeps working through an outage, at the price of not seeing revocations meanwhile (0: off)",
  },
  {
    flag: "require-digest",
    env: "IMAGE_CACHE_REQUIRE_DIGEST",
    boolean: true,
    help:
      "Cache only what can be verified: an image whose metadata announces no hash and which comes without Content-MD5 is passed through uncached",
  },
  {
    flag: "header-timeout",
    env: "IMAGE_CACHE_HEADER_TIMEOUT",
    value: "DURATION",
    default: "30s",
    help: "Wait this long for upstream response headers, then 504 (bodies are never timed out)",
  },
  {
    flag: "shutdown-timeout",
    env: "IMAGE_CACHE_SHUTDOWN_TIMEOUT",
    value: "DURATION",
    default: "10s",
    help:
      "On SIGINT/SIGTERM, wait this long for requests and fills to finish (the same signal relayed within a second is ignored; a later one exits at once)",
  },
  {
    flag: "prefetch-concurrency",
    env: "IMAGE_CACHE_PREFETCH_CONCURRENCY",
    value: "N",
    default: "2",
    help: "Prefetches (PUT /v2/cache/{id}) downloading at once",
  },
  {
    flag: "prefetch-attempts",
    env: "IMAGE_CACHE_PREFETCH_ATTEMPTS",
    value: "N",
    default: "5",
    help:
      "Failed attempts after which a queued image is no longer prefetched (it stays queued, marked gave_up, until queued again)",
  },
  {
    flag: "trusted-proxy",
    env: "IMAGE_CACHE_TRUSTED_PROXIES",
    value: "CIDR",
    multiple: true,
    help:
      "A proxy in front of this one (address or range, repeatable or comma-separated): from it, the client's address is taken from X-Forwarded-For. From anyone else that header is ignored",
  },
  {
    flag: "log-level",
    env: "IMAGE_CACHE_LOG_LEVEL",
    value: "LEVEL",
    default: "info",
    help: "error, warn, info (the access log) or debug (also stack traces)",
  },
  {
    flag: "log-format",
    env: "IMAGE_CACHE_LOG_FORMAT",
    value: "text|json",
    default: "text",
    help: "One line per request and per event: key=value text, or a JSON object",
  },
  {
    flag: "quiet-hits",
    env: "IMAGE_CACHE_QUIET_HITS",
    boolean: true,
    help: "Leave cache hits out of the access log",
  },
  {
    flag: "no-access-log",
    env: "IMAGE_CACHE_NO_ACCESS_LOG",
    boolean: true,
    help: "No access log at all (events are still logged)",
  },
  {
    flag: "cluster-db",
    env: "IMAGE_CACHE_CLUSTER_DB",
    value: "URL",
    help:
      "Cluster mode: the PostgreSQL index the nodes share (postgres://user@host:5432/db; a password only from the environment: this variable, or PGPASSWORD); needs --self-url and the cluster secret. Off by default",
  },
  {
    flag: "self-url",
    env: "IMAGE_CACHE_SELF_URL",
    value: "URL",
    help: "Cluster mode: the URL the other nodes reach this one at (http://10.0.0.5:9292)",
  },
  {
    flag: "cluster-secret-file",
    env: "IMAGE_CACHE_CLUSTER_SECRET_FILE",
    value: "PATH",
    help:
      "Cluster mode: the secret every node shares (16+ characters), guarding the peer endpoint; or set IMAGE_CACHE_CLUSTER_SECRET",
  },
  { flag: "help", env: "", boolean: true, help: "Show this help (also -h)" },
];

const LEVELS = ["error", "warn", "info", "debug"] as const;
type Level = typeof LEVELS[number];

/** A bad argument or environment variable: a message and exit code 2. */
class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "UsageError";
  }
}

/** Where a secret comes from: a file (read at start, or before each use), or the environment. */
type SecretSource = { file: string } | { value: string } | undefined;

/** The settings, checked. */
interface Config {
  upstream: string | undefined;
  hostname: string;
  port: number;
  cacheDir: string;
  maxSize: number;
  minFree: number;
  secrets: Record<Secret, SecretSource>;
  accessCheck: boolean;
  accessTtl: number;
  staleOnError: number;
  requireDigest: boolean;
  headerTimeout: number;
  shutdownTimeout: number;
  prefetchConcurrency: number;
  prefetchAttempts: number;
  trustedProxies: string[];
  logLevel: Level;
  logFormat: LogFormat;
  quietHits: boolean;
  accessLog: boolean;
  /** Cluster mode: the index and this node's URL (the secret is among `secrets`). */
  cluster: { database: string; selfUrl: string } | undefined;
}

function usage(program: string): string {
  const lines = [
    `Usage: ${program} [OPTIONS]`,
    "",
    "A caching reverse proxy for OpenStack Glance (or any origin): image downloads come from",
    "local disk, verified, with the upstream's access control intact. Everything else is",
    "forwarded as is.",
    "",
    "Options (each also read from the environment variable shown; the flag wins):",
  ];
  for (const setting of SETTINGS) {
    const flag = `--${setting.flag}${setting.value ? ` ${setting.value}` : ""}`;
    lines.push(`  ${flag.padEnd(31)} ${setting.env}`.trimEnd());
    const text = setting.help + (setting.default ? ` (default: ${setting.default})` : "");
    for (const line of wrap(text, 74)) lines.push(`      ${line}`);
  }
  lines.push(
    "",
    "Secrets are never taken from the command line (ps and task runners show it): set",
    "IMAGE_CACHE_ADMIN_TOKEN, IMAGE_CACHE_SERVICE_TOKEN, IMAGE_CACHE_METRICS_TOKEN, or point",
    "the --*-token-file flags (or their variables) at files readable by this user only.",
    "",
    "Sizes: 500M, 10G, 1.5T (binary units). Durations: 500ms, 30s, 5m, 1h (a bare number is seconds).",
    "Booleans from the environment: 1/true/yes or 0/false/no.",
    "",
    "Endpoints besides the proxied ones: GET /healthz (alive), GET /readyz (cache writable,",
    "upstream answering), GET /metrics (metrics or admin token), /v2/cache... (admin token).",
    "",
    "Examples:",
    `  ${program}                                   # demo: a built-in Glance behind the cache`,
    `  IMAGE_CACHE_ADMIN_TOKEN_FILE=/etc/image-cache/admin-token ${program} \\`,
    "      --upstream http://glance.internal:9292 --listen :9292 \\",
    "      --cache-dir /var/cache/image-cache --max-size 500G",
    "",
    "Exit codes: 0 clean shutdown, 1 cannot start, 2 bad arguments.",
  );
  return lines.join("\n");
}

function wrap(text: string, width: number): string[] {
  const lines: string[] = [];
  let line = "";
  for (const word of text.split(" ")) {
    if (line !== "" && line.length + 1 + word.length > width) {
      lines.push(line);
      line = word;
    } else {
      line = line === "" ? word : `${line} ${word}`;
    }
  }
  if (line !== "") lines.push(line);
  return lines;
}

/** Reads the arguments, then the environment, then the defaults. */
function parseConfig(args: string[], env: Record<string, string | undefined>): Config | "help" {
  // A secret on the command line is refused before anything else reads the arguments, and
  // its value is never repeated in a message.
  for (const arg of args) {
    const name = /^--(admin-token|service-token|metrics-token|cluster-secret)(?:=|$)/.exec(arg)
      ?.[1] as
        | Secret
        | undefined;
    if (name !== undefined) {
      throw new UsageError(
        `--${name} is not accepted: a command line shows in ps and in task runners' output. Set ${
          SECRETS[name].env
        }, or put it in a file readable only by this user and give --${name}-file PATH`,
      );
    }
  }
  const options: Record<
    string,
    { type: "string" | "boolean"; short?: string; multiple?: boolean }
  > = {};
  for (const setting of SETTINGS) {
    options[setting.flag] = setting.multiple
      ? { type: "string", multiple: true }
      : { type: setting.boolean ? "boolean" : "string" };
  }
  options.help = { type: "boolean", short: "h" };
  let parsed;
  try {
    parsed = parseArgs({ args, options, strict: true, allowPositionals: false });
  } catch (error) {
    // Node's message may quote a whole `--flag=value`: keep the flag only.
    throw new UsageError((error as Error).message.replace(/(--[\w-]+)=[^'"\s]*/g, "$1"));
  }
  const values = parsed.values as Record<string, string | string[] | boolean | undefined>;
  if (values.help === true) return "help";

  const setting = (flag: string) => SETTINGS.find((s) => s.flag === flag)!;
  /** The raw value of a setting and where it came from (for messages). */
  const raw = (flag: string): { value: string | undefined; source: string } => {
    const given = values[flag];
    if (typeof given === "string") return { value: given, source: `--${flag}` };
    const fromEnv = setting(flag).env ? env[setting(flag).env] : undefined;
    if (fromEnv !== undefined && fromEnv !== "") {
      return { value: fromEnv, source: setting(flag).env };
    }
    return { value: setting(flag).default, source: `--${flag}` };
  };
  const bool = (flag: string): boolean => {
    if (values[flag] === true) return true;
    const name = setting(flag).env;
    const fromEnv = env[name]?.trim().toLowerCase();
    if (fromEnv === undefined || fromEnv === "") return false;
    if (["1", "true", "yes", "on"].includes(fromEnv)) return true;
    if (["0", "false", "no", "off"].includes(fromEnv)) return false;
    throw new UsageError(
      `${name} must be 1/true/yes or 0/false/no, received ${JSON.stringify(env[name])}`,
    );
  };
  const size = (flag: string): number => {
    const { value, source } = raw(flag);
    const match = /^(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?$/i.exec(value!.trim());
    if (match === null) {
      throw new UsageError(
        `${source} must be a size like 500M, 10G or 1.5T, received ${JSON.stringify(value)}`,
      );
    }
    const power = " kmgt".indexOf(match[2].toLowerCase() || " ");
    return Math.floor(Number(match[1]) * 1024 ** power);
  };
  const duration = (flag: string): number => {
    const { value, source } = raw(flag);
    const match = /^(\d+(?:\.\d+)?)\s*(ms|s|m|h)?$/.exec(value!.trim());
    if (match === null) {
      throw new UsageError(
        `${source} must be a duration like 500ms, 30s, 5m or 1h, received ${JSON.stringify(value)}`,
      );
    }
    const unit = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 }[match[2] ?? "s"]!;
    return Math.round(Number(match[1]) * unit);
  };
  const count = (flag: string): number => {
    const { value, source } = raw(flag);
    const n = Number(value);
    if (!/^\d+$/.test(value!.trim()) || n < 1) {
      throw new UsageError(
        `${source} must be a whole number of at least 1, received ${JSON.stringify(value)}`,
      );
    }
    return n;
  };
  const choice = <T extends string>(flag: string, allowed: readonly T[]): T => {
    const { value, source } = raw(flag);
    if (!(allowed as readonly string[]).includes(value!)) {
      throw new UsageError(
        `${source} must be ${allowed.map((a) => `"${a}"`).join(", ")}, received ${
          JSON.stringify(value)
        }`,
      );
    }
    return value as T;
  };

  const upstreamRaw = raw("upstream");
  let upstream: string | undefined;
  if (upstreamRaw.value !== undefined) {
    let url: URL | undefined;
    try {
      url = new URL(upstreamRaw.value);
    } catch {
      url = undefined;
    }
    if (
      url === undefined || (url.protocol !== "http:" && url.protocol !== "https:") ||
      url.search !== "" || url.hash !== "" || url.username !== "" || url.password !== ""
    ) {
      throw new UsageError(
        `${upstreamRaw.source} must be an http:// or https:// URL without query or credentials, like http://glance.internal:9292, received ${
          JSON.stringify(upstreamRaw.value)
        }`,
      );
    }
    upstream = url.href.replace(/\/$/, "");
  }

  const listenRaw = raw("listen");
  const listenMatch = /^(?:(?:\[([0-9a-fA-F:.]+)\]|([^:\[\]\s]*)):)?(\d{1,5})$/.exec(
    listenRaw.value!.trim(),
  );
  const port = listenMatch === null ? NaN : Number(listenMatch[3]);
  if (listenMatch === null || port > 65535) {
    throw new UsageError(
      `${listenRaw.source} must be HOST:PORT, :PORT or PORT (port 0-65535), like 127.0.0.1:8000, received ${
        JSON.stringify(listenRaw.value)
      }`,
    );
  }
  const hostname = listenMatch[1] ??
    (listenMatch[2] === undefined ? "127.0.0.1" : listenMatch[2] || "0.0.0.0");

  const cacheDir = raw("cache-dir").value!;
  if (cacheDir.trim() === "") throw new UsageError("--cache-dir must not be empty");

  const secret = (name: Secret): SecretSource => {
    const file = raw(`${name}-file`);
    const value = env[SECRETS[name].env];
    const fromFlag = typeof values[`${name}-file`] === "string";
    if (file.value !== undefined && value !== undefined && value !== "" && !fromFlag) {
      throw new UsageError(
        `${file.source} and ${SECRETS[name].env} cannot both be set: choose one`,
      );
    }
    if (file.value !== undefined) return { file: file.value };
    if (value === undefined || value === "") return undefined;
    checkToken(name, value.trim(), SECRETS[name].env);
    return { value: value.trim() };
  };

  const trusted: string[] = [];
  const givenTrusted = values["trusted-proxy"];
  const trustedRaw = Array.isArray(givenTrusted) && givenTrusted.length > 0
    ? givenTrusted
    : env.IMAGE_CACHE_TRUSTED_PROXIES
    ? [env.IMAGE_CACHE_TRUSTED_PROXIES]
    : [];
  for (const item of trustedRaw) {
    for (const part of item.split(",")) if (part.trim() !== "") trusted.push(part.trim());
  }
  try {
    trustedProxies("serve", trusted);
  } catch (error) {
    throw new UsageError(
      `--trusted-proxy must be addresses or CIDR ranges like 10.0.0.0/8, received ${
        JSON.stringify(trusted.join(","))
      } (${(error as Error).message.replace(/^.*received /, "bad: ")})`,
    );
  }

  const headerTimeout = duration("header-timeout");
  if (headerTimeout === 0) throw new UsageError("--header-timeout must be more than 0");

  const clusterSecret = secret("cluster-secret");
  const clusterDb = raw("cluster-db");
  const selfUrl = raw("self-url");
  let cluster: Config["cluster"];
  if (clusterDb.value !== undefined) {
    let url: URL | undefined;
    try {
      url = new URL(clusterDb.value);
    } catch {
      url = undefined;
    }
    if (url === undefined || !/^postgres(?:ql)?:$/.test(url.protocol)) {
      throw new UsageError(`${clusterDb.source} must be a postgres:// URL`);
    }
    if (url.password !== "" && clusterDb.source.startsWith("--")) {
      throw new UsageError(
        `--cluster-db must not hold a password: a command line shows in ps. Set IMAGE_CACHE_CLUSTER_DB, or PGPASSWORD`,
      );
    }
    if (selfUrl.value === undefined || !/^https?:\/\/[^/\s]+\/?$/.test(selfUrl.value)) {
      throw new UsageError(
        `cluster mode needs --self-url (or IMAGE_CACHE_SELF_URL): the http://host:port the other nodes reach this one at${
          selfUrl.value === undefined ? "" : `, received ${JSON.stringify(selfUrl.value)}`
        }`,
      );
    }
    if (clusterSecret === undefined) {
      throw new UsageError(
        "cluster mode needs the cluster secret: set IMAGE_CACHE_CLUSTER_SECRET, or give --cluster-secret-file PATH",
      );
    }
    cluster = { database: clusterDb.value, selfUrl: selfUrl.value };
  } else if (selfUrl.value !== undefined || clusterSecret !== undefined) {
    throw new UsageError("--self-url and the cluster secret need --cluster-db (cluster mode)");
  }

  return {
    upstream,
    hostname,
    port,
    cacheDir,
    maxSize: size("max-size"),
    minFree: size("min-free"),
    secrets: {
      "admin-token": secret("admin-token"),
      "service-token": secret("service-token"),
      "metrics-token": secret("metrics-token"),
      "cluster-secret": clusterSecret,
    },
    accessCheck: choice("access-check", ["glance", "off"]) === "glance",
    accessTtl: duration("access-ttl"),
    staleOnError: duration("serve-stale-on-error"),
    requireDigest: bool("require-digest"),
    headerTimeout,
    shutdownTimeout: duration("shutdown-timeout"),
    prefetchConcurrency: count("prefetch-concurrency"),
    prefetchAttempts: count("prefetch-attempts"),
    trustedProxies: trusted,
    logLevel: choice("log-level", LEVELS),
    logFormat: choice("log-format", ["text", "json"] as const),
    quietHits: bool("quiet-hits"),
    accessLog: !bool("no-access-log"),
    cluster,
  };
}

/** Checks a token's shape; the message names where it came from, never the token. */
function checkToken(name: Secret, token: string, source: string): void {
  if (name !== "service-token" && token.length < 16) {
    throw new UsageError(
      `${source} must hold at least 16 characters (it guards ${
        name === "admin-token"
          ? "the management API"
          : name === "cluster-secret"
          ? "the peer endpoint"
          : "the metrics"
      }), received ${token.length}`,
    );
  }
  if (!/^[\x21-\x7e]+$/.test(token)) {
    throw new UsageError(`${source} must hold printable ASCII without spaces`);
  }
}

function bytes(n: number): string {
  if (n === 0) return "0 B";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let unit = 0;
  let value = n;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return `${Number.isInteger(value) ? value : value.toFixed(1)} ${units[unit]}`;
}

function duration(ms: number): string {
  return ms % 1000 === 0 ? `${ms / 1000} s` : `${ms} ms`;
}

function urlHost(hostname: string): string {
  return hostname.includes(":") ? `[${hostname}]` : hostname;
}

/** Where the command writes; replaced in tests. */
export interface ServeIo {
  /** A log line (access log, events, banner). */
  out(line: string): void;
  /** A startup failure or usage message. */
  err(line: string): void;
  env: Record<string, string | undefined>;
}

/** The real terminal: stdout and stderr, the process's environment. */
function processIo(): ServeIo {
  return {
    out: (line) => void process.stdout.write(line + "\n"),
    err: (line) => void process.stderr.write(line + "\n"),
    env: process.env,
  };
}

/**
 * Runs the `serve` command until a signal stops it.
 *
 * @param args The arguments after the command's name.
 * @param program How the usage names the command (`deno task serve`).
 * @returns The exit code: 0 after a clean shutdown or `--help`, 1 when the
 *   proxy cannot start, 2 for bad arguments.
 */
export async function serveCommand(
  args: string[],
  program: string,
  io: ServeIo = processIo(),
): Promise<number> {
  let config;
  try {
    config = parseConfig(args, io.env);
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    io.err(`serve: ${error.message}\nRun with --help to see the options.`);
    return 2;
  }
  if (config === "help") {
    io.out(usage(program));
    return 0;
  }

  const levels = LEVELS.indexOf(config.logLevel);
  const format = config.logFormat;
  const event = (e: ProxyEvent) => {
    if (LEVELS.indexOf(e.level) > levels) return;
    io.out(formatProxyEvent(e, { format, stack: config.logLevel === "debug" }));
  };
  const say = (message: string, level: Level = "info", name = "lifecycle") =>
    event({ level, event: name, message });

  // Secrets: files read now (the admin's and the metrics'), or before each download (the
  // service token's, which a job may renew). A message names the file, never its content.
  const readSecret = async (name: Secret, source: SecretSource) => {
    if (source === undefined || "value" in source) return source?.value;
    let token;
    try {
      token = (await readFile(source.file, "utf8")).trim();
    } catch (error) {
      throw new UsageError(
        `cannot read ${SECRETS[name].what} from ${JSON.stringify(source.file)}: ${
          describeError(error)
        }`,
      );
    }
    checkToken(name, token, `The file ${JSON.stringify(source.file)}`);
    return token;
  };
  let adminToken: string | undefined;
  let metricsToken: string | undefined;
  let clusterSecret: string | undefined;
  let serviceToken: string | (() => Promise<string>) | undefined;
  try {
    adminToken = await readSecret("admin-token", config.secrets["admin-token"]);
    metricsToken = await readSecret("metrics-token", config.secrets["metrics-token"]);
    clusterSecret = await readSecret("cluster-secret", config.secrets["cluster-secret"]);
    const service = config.secrets["service-token"];
    if (service !== undefined && "file" in service) {
      await readSecret("service-token", service); // readable now, or no start
      serviceToken = async () => (await readFile(service.file, "utf8")).trim();
    } else {
      serviceToken = service?.value;
    }
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    io.err(`serve: ${error.message}`);
    return 1;
  }

  // The cache directory must take a write: access(W_OK) says yes to root on a read-only
  // file system, and then every fill would fail.
  try {
    await mkdir(config.cacheDir, { recursive: true });
    await proveWritable(config.cacheDir);
  } catch (error) {
    io.err(
      `serve: cannot write to the cache directory ${JSON.stringify(config.cacheDir)}: ${
        describeError(error)
      }`,
    );
    return 1;
  }
  const disk = await fileSystemSize(config.cacheDir);
  if (disk !== undefined && config.maxSize > disk) {
    say(
      `--max-size ${bytes(config.maxSize)} is more than the whole file system holding ${
        JSON.stringify(config.cacheDir)
      } (${
        bytes(disk)
      }): the disk fills before the cache prunes; lower --max-size (and set --min-free)`,
      "warn",
      "config",
    );
  }

  // No upstream: a demo Glance that wants a token, on a loopback port, and the management
  // API behind a generated admin token, so the command shows everything on a fresh machine.
  let demo: Listener | undefined;
  let upstream = config.upstream;
  let upstreamNote = "";
  let generatedAdmin: string | undefined;
  if (upstream === undefined) {
    const glance = demoGlance();
    demo = await listen(glance.app.fetch, "127.0.0.1", 0);
    upstream = `http://127.0.0.1:${demo.port}`;
    upstreamNote = ` (built-in demo Glance: ${
      Object.entries(glance.images).map(([id, image]) => `${id} ${bytes(image.size)}`).join(", ")
    }; tokens ${DEMO_TOKENS.reader}, ${DEMO_TOKENS.viewer} (metadata only))`;
    serviceToken ??= DEMO_TOKENS.service;
    if (adminToken === undefined) {
      generatedAdmin = randomBytes(18).toString("base64url");
      adminToken = generatedAdmin;
    }
  }

  const store = new FileSystemStore({
    directory: config.cacheDir,
    maxSize: config.maxSize,
    minFree: config.minFree,
  });
  // Cluster mode: a database unreachable at start is one line and exit 1.
  let cluster: Cluster | undefined;
  if (config.cluster !== undefined) {
    try {
      cluster = await joinCluster({
        store,
        database: config.cluster.database,
        selfUrl: config.cluster.selfUrl,
        secret: clusterSecret!,
        onLog: (line) => say(line, "info", "cluster"),
      });
    } catch (error) {
      io.err(`serve: ${(error as Error).message}`);
      await demo?.close();
      await store.close();
      return 1;
    }
  }
  const accessLine = (entry: AccessLogEntry) => {
    if (levels >= LEVELS.indexOf("info")) io.out(formatAccessLog(entry, format));
  };
  const proxy = proxyApp({
    cluster,
    upstream,
    store,
    accessCheck: config.accessCheck ? { ttl: config.accessTtl } : false,
    serveStaleOnError: config.staleOnError,
    requireDigest: config.requireDigest,
    adminToken,
    metricsToken,
    serviceToken,
    prefetchConcurrency: config.prefetchConcurrency,
    prefetchAttempts: config.prefetchAttempts,
    headerTimeout: config.headerTimeout,
    trustedProxies: config.trustedProxies,
    onLog: config.accessLog ? accessLine : undefined,
    logHits: !config.quietHits,
    onEvent: event,
  });

  let server: Listener;
  try {
    server = await listen(proxy.fetch, config.hostname, config.port, (error) =>
      event({
        level: "debug",
        event: "response-cut",
        message: `A response was cut before its end: ${describeError(error)}`,
        error,
      }));
  } catch (error) {
    io.err(
      `serve: cannot listen on ${urlHost(config.hostname)}:${config.port}: ${describeError(error)}`,
    );
    proxy.close();
    await cluster?.close().catch(() => {});
    await demo?.close();
    await store.close();
    return 1;
  }

  const address = `http://${urlHost(server.hostname)}:${server.port}`;
  const settings: [string, string][] = [
    ["upstream", `${upstream}${upstreamNote}`],
    [
      "cache",
      `${config.cacheDir} (max ${bytes(config.maxSize)}, keep ${bytes(config.minFree)} free${
        config.requireDigest ? "; only what a digest verifies" : ""
      })`,
    ],
    [
      "access check",
      config.accessCheck
        ? `Glance's download decision for the client's credentials before each hit, kept ${
          duration(config.accessTtl)
        } per credential and image (a revoked token or deleted image is served that long)${
          config.staleOnError > 0
            ? `; served up to ${
              duration(config.staleOnError)
            } after an "allowed" while Glance is down`
            : ""
        }`
        : "off: hits are served without asking the upstream (fills are still verified)",
    ],
    [
      "management API",
      proxy.managed
        ? `/v2/cache, legacy cached_images/queued_images (admin token${
          generatedAdmin === undefined ? "" : ": generated, below"
        })`
        : "not mounted (no admin token): /v2/cache goes to the upstream",
    ],
    [
      "metrics",
      adminToken !== undefined || metricsToken !== undefined
        ? `/metrics (${metricsToken !== undefined ? "metrics or admin token" : "admin token"})`
        : "not mounted (no admin or metrics token)",
    ],
    ["health", "/healthz (alive), /readyz (cache writable, upstream answering)"],
    [
      "cluster",
      cluster === undefined
        ? "off (single node)"
        : `${cluster.selfUrl}, index ${
          config.cluster!.database.replace(/^(postgres(?:ql)?:\/\/[^:@/]*):[^@/]*@/, "$1:***@")
        }`,
    ],
    [
      "prefetch",
      `${config.prefetchConcurrency} at once, ${config.prefetchAttempts} attempts, ${
        serviceToken === undefined
          ? "without credentials (no service token): an authenticating Glance refuses them; Range misses start no background fill"
          : "with the service token; a Range miss also fills the whole image in the background"
      }`,
    ],
    [
      "timeouts",
      `upstream headers ${duration(config.headerTimeout)}, shutdown ${
        duration(config.shutdownTimeout)
      }`,
    ],
    [
      "logs",
      `${format}, level ${config.logLevel}; access log ${
        !config.accessLog ? "off" : config.quietHits ? "every request but hits" : "every request"
      }${
        config.trustedProxies.length > 0
          ? `; client from X-Forwarded-For behind ${config.trustedProxies.join(", ")}`
          : ""
      }`,
    ],
  ];
  if (format === "json") {
    io.out(JSON.stringify({
      time: new Date().toISOString(),
      type: "event",
      level: "info",
      event: "listening",
      message: `hono-image-cache proxy listening on ${address}`,
      address,
      settings: Object.fromEntries(settings),
    }));
  } else {
    io.out(
      [
        `hono-image-cache proxy listening on ${address}`,
        ...settings.map(([name, value]) => `  ${name.padEnd(16)} ${value}`),
      ].join("\n"),
    );
  }
  if (demo !== undefined) {
    const lines = [
      `Try: curl -o /dev/null -w '%{http_code}\\n' ${address}/v2/images/cirros/file   # 401: the access check`,
      `     curl -H 'X-Auth-Token: ${DEMO_TOKENS.reader}' -o /dev/null -w '%{http_code}\\n' ${address}/v2/images/cirros/file   # 200, twice: a miss, then a hit`,
    ];
    if (generatedAdmin !== undefined) {
      lines.push(
        `Demo admin token (printed once, for this run only): export IMAGE_CACHE_TOKEN=${generatedAdmin}`,
        `     then: deno task cache-manage --url ${address} list-cached   (npm: npx hono-image-cache cache-manage ...)`,
      );
    }
    io.out(lines.join("\n"));
  }

  // Graceful shutdown: stop accepting, let requests and fills finish within the bound, then
  // exit 0. A fill still running is abandoned: its partial file belongs to this (now dead)
  // process, so the next start sweeps it and it is never served.
  const done = Promise.withResolvers<number>();
  let stoppingSince = 0;
  const stop = async (signal: string) => {
    const now = Date.now();
    if (stoppingSince !== 0) {
      // `npx` and `deno task` relay the signal the terminal (or `kill -- -PGID`) already sent
      // to the whole group: a repeat within a second is that copy, not an operator.
      if (now - stoppingSince < 1000) {
        say(`${signal} again (relayed): still shutting down`, "debug");
        return;
      }
      say(
        `${signal} again: exiting now, cutting ${proxy.inFlight()} request(s) and ${proxy.filling().length} fill(s)`,
        "warn",
      );
      done.resolve(1);
      return;
    }
    stoppingSince = now;
    const deadline = now + config.shutdownTimeout;
    say(
      `${signal}: shutting down: ${proxy.inFlight()} request(s) and ${proxy.filling().length} fill(s) under way, waiting up to ${
        duration(config.shutdownTimeout)
      } (another ${signal} after a second exits at once)`,
    );
    proxy.beginShutdown();
    let timer: ReturnType<typeof setTimeout> | undefined;
    const expired = new Promise<false>((resolve) => {
      timer = setTimeout(() => resolve(false), config.shutdownTimeout);
    });
    const drained = await Promise.race([server.close().then(() => true), expired]);
    clearTimeout(timer);
    const settled = await proxy.settle(Math.max(0, deadline - Date.now()));
    const abandoned = proxy.filling();
    const cut = proxy.inFlight();
    proxy.close(); // prefetches under way stop; the queue is resumed at the next start
    if (!drained && cut > 0) say(`${cut} request(s) still running were cut`, "warn");
    if (!settled && abandoned.length > 0) {
      say(
        `abandoned ${abandoned.length} fill(s): ${
          abandoned.join(", ")
        }; their partial files are swept at the next start`,
        "warn",
      );
    }
    // Cluster mode: deregister (this node's rows go).
    await cluster?.close().catch((error) =>
      event({
        level: "warn",
        event: "cluster",
        message: `cannot leave the cluster cleanly: ${describeError(error)}`,
        error,
      })
    );
    // Hit counts are written here.
    await store.close().catch((error) =>
      event({
        level: "warn",
        event: "cache-error",
        message: `cannot save hit counts: ${describeError(error)}`,
        error,
      })
    );
    await demo?.close().catch(() => {});
    say("stopped");
    done.resolve(0);
  };
  const listeners: [string, () => void][] = [];
  for (const signal of ["SIGINT", "SIGTERM"]) {
    const listener = () => void stop(signal);
    try {
      process.on(signal, listener);
      listeners.push([signal, listener]);
    } catch {
      // SIGTERM cannot be listened to on Windows.
    }
  }
  const code = await done.promise;
  for (const [signal, listener] of listeners) process.off(signal, listener);
  return code;
}
