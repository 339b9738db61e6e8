/**
 * The caching proxy from the command line: `deno task serve`, or the binary
 * `deno task compile` builds (`dist/hono-image-cache`).
 *
 * With no `--upstream`, a built-in demo Glance starts on a loopback port, so
 * the command works on a fresh machine. Run with `--help` for the options;
 * each can also come from an environment variable.
 *
 * Exit codes: 0 after a clean shutdown (SIGINT/SIGTERM) or `--help`, 1 when
 * the proxy cannot start (port taken, cache directory unusable), 2 for bad
 * arguments.
 *
 * @module
 */
import { access, constants, mkdir, readFile } from "node:fs/promises";
import process from "node:process";
import { parseArgs } from "node:util";
import { type Cluster, FileSystemStore, joinCluster } from "../mod.ts";
import { demoOrigin } from "../testing.ts";
import { formatAccessLog, proxyApp } from "../proxy.ts";

/** One setting: its flag, environment variable, default and help text. */
interface Setting {
  flag: string;
  env: string;
  value?: string;
  boolean?: true;
  default?: string;
  help: string;
}

const SETTINGS: Setting[] = [
  {
    flag: "upstream",
    env: "IMAGE_CACHE_UPSTREAM",
    value: "URL",
    help: "Glance (or any HTTP origin) to proxy to. Default: a built-in demo Glance on loopback",
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
    help: "Cache directory (Glance's layout; created when missing)",
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
    flag: "admin-token",
    env: "IMAGE_CACHE_ADMIN_TOKEN",
    value: "TOKEN",
    help:
      "Mounts the management API (/v2/cache...) for requests with this token (Bearer or X-Auth-Token, 16+ characters). Without it those paths go to the upstream",
  },
  {
    flag: "service-token",
    env: "IMAGE_CACHE_SERVICE_TOKEN",
    value: "TOKEN",
    help: "Credential (X-Auth-Token) prefetches download from the upstream with",
  },
  {
    flag: "service-token-file",
    env: "IMAGE_CACHE_SERVICE_TOKEN_FILE",
    value: "PATH",
    help:
      "Read the service token from this file before each download, so that a job can renew it (Keystone tokens expire) without a restart",
  },
  {
    flag: "access-check",
    env: "IMAGE_CACHE_ACCESS_CHECK",
    value: "glance|off",
    default: "glance",
    help:
      "Before a hit, ask the upstream GET /v2/images/{id} with the client's credentials; `off` only for public origins",
  },
  {
    flag: "access-ttl",
    env: "IMAGE_CACHE_ACCESS_TTL",
    value: "DURATION",
    default: "30s",
    help: "How long an access answer is reused for the same credential and image (0: never)",
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
    help: "On SIGINT/SIGTERM, wait this long for requests and fills to finish",
  },
  {
    flag: "prefetch-concurrency",
    env: "IMAGE_CACHE_PREFETCH_CONCURRENCY",
    value: "N",
    default: "2",
    help: "Prefetches (PUT /v2/cache/{id}) downloading at once",
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
    help: "No access log at all",
  },
  {
    flag: "cluster-db",
    env: "IMAGE_CACHE_CLUSTER_DB",
    value: "URL",
    help:
      "Cluster mode: the shared PostgreSQL index (postgres://user:password@host:5432/db); needs --self-url and --cluster-secret. Off by default",
  },
  {
    flag: "self-url",
    env: "IMAGE_CACHE_SELF_URL",
    value: "URL",
    help: "Cluster mode: the URL the other nodes reach this one at (http://10.0.0.5:9292)",
  },
  {
    flag: "cluster-secret",
    env: "IMAGE_CACHE_CLUSTER_SECRET",
    value: "SECRET",
    help: "Cluster mode: the secret every node shares (16+ characters); guards the peer endpoint",
  },
  { flag: "help", env: "", boolean: true, help: "Show this help (also -h)" },
];

/** A bad argument or environment variable: a message and exit code 2. */
class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "UsageError";
  }
}

/** The settings, checked. */
interface Config {
  upstream: string | undefined;
  hostname: string;
  port: number;
  cacheDir: string;
  maxSize: number;
  minFree: number;
  adminToken: string | undefined;
  serviceToken: string | undefined;
  serviceTokenFile: string | undefined;
  accessCheck: boolean;
  accessTtl: number;
  headerTimeout: number;
  shutdownTimeout: number;
  prefetchConcurrency: number;
  quietHits: boolean;
  accessLog: boolean;
  cluster: { database: string; selfUrl: string; secret: string } | undefined;
}

function usage(): string {
  const lines = [
    "Usage: deno task serve [OPTIONS]        (or: dist/hono-image-cache [OPTIONS])",
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
    "Sizes: 500M, 10G, 1.5T (binary units). Durations: 500ms, 30s, 5m, 1h (a bare number is seconds).",
    "Booleans from the environment: 1/true/yes or 0/false/no.",
    "",
    "Examples:",
    "  deno task serve                                   # demo: a built-in Glance behind the cache",
    "  deno task serve --upstream http://glance.internal:9292 --listen :9292 \\",
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
  const options: Record<string, { type: "string" | "boolean"; short?: string }> = {};
  for (const setting of SETTINGS) {
    options[setting.flag] = { type: setting.boolean ? "boolean" : "string" };
  }
  options.help = { type: "boolean", short: "h" };
  let parsed;
  try {
    parsed = parseArgs({ args, options, strict: true, allowPositionals: false });
  } catch (error) {
    throw new UsageError((error as Error).message);
  }
  const values = parsed.values as Record<string, string | boolean | undefined>;
  if (values.help === true) return "help";

  /** The raw value of a setting and where it came from (for messages). */
  const raw = (flag: string): { value: string | undefined; source: string } => {
    const setting = SETTINGS.find((s) => s.flag === flag)!;
    const given = values[flag];
    if (typeof given === "string") return { value: given, source: `--${flag}` };
    const fromEnv = setting.env ? env[setting.env] : undefined;
    if (fromEnv !== undefined && fromEnv !== "") return { value: fromEnv, source: setting.env };
    return { value: setting.default, source: `--${flag}` };
  };
  const bool = (flag: string): boolean => {
    if (values[flag] === true) return true;
    const setting = SETTINGS.find((s) => s.flag === flag)!;
    const fromEnv = env[setting.env]?.trim().toLowerCase();
    if (fromEnv === undefined || fromEnv === "") return false;
    if (["1", "true", "yes", "on"].includes(fromEnv)) return true;
    if (["0", "false", "no", "off"].includes(fromEnv)) return false;
    throw new UsageError(
      `${setting.env} must be 1/true/yes or 0/false/no, received ${
        JSON.stringify(env[setting.env])
      }`,
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
  const listen = /^(?:(?:\[([0-9a-fA-F:.]+)\]|([^:\[\]\s]*)):)?(\d{1,5})$/.exec(
    listenRaw.value!.trim(),
  );
  const port = listen === null ? NaN : Number(listen[3]);
  if (listen === null || port > 65535) {
    throw new UsageError(
      `${listenRaw.source} must be HOST:PORT, :PORT or PORT (port 0-65535), like 127.0.0.1:8000, received ${
        JSON.stringify(listenRaw.value)
      }`,
    );
  }
  const hostname = listen[1] ?? (listen[2] === undefined ? "127.0.0.1" : listen[2] || "0.0.0.0");

  const cacheDir = raw("cache-dir").value!;
  if (cacheDir.trim() === "") throw new UsageError("--cache-dir must not be empty");

  const token = (flag: string): string | undefined => {
    const { value, source } = raw(flag);
    if (value === undefined) return undefined;
    if (flag === "admin-token" && value.length < 16) {
      throw new UsageError(
        `${source} must be at least 16 characters (it guards the management API), received ${value.length}`,
      );
    }
    if (!/^[\x21-\x7e]+$/.test(value)) {
      throw new UsageError(`${source} must be printable ASCII without spaces`);
    }
    return value;
  };

  const accessRaw = raw("access-check");
  if (accessRaw.value !== "glance" && accessRaw.value !== "off") {
    throw new UsageError(
      `${accessRaw.source} must be "glance" or "off", received ${JSON.stringify(accessRaw.value)}`,
    );
  }

  const concurrencyRaw = raw("prefetch-concurrency");
  const prefetchConcurrency = Number(concurrencyRaw.value);
  if (!/^\d+$/.test(concurrencyRaw.value!.trim()) || prefetchConcurrency < 1) {
    throw new UsageError(
      `${concurrencyRaw.source} must be a whole number of at least 1, received ${
        JSON.stringify(concurrencyRaw.value)
      }`,
    );
  }

  const serviceTokenFile = raw("service-token-file");
  if (serviceTokenFile.value !== undefined && raw("service-token").value !== undefined) {
    throw new UsageError(
      `${serviceTokenFile.source} and the service token itself cannot both be given: choose one`,
    );
  }

  const clusterDb = raw("cluster-db");
  const selfUrl = raw("self-url");
  const clusterSecret = raw("cluster-secret");
  let cluster: Config["cluster"];
  if (clusterDb.value !== undefined) {
    if (!/^postgres(?:ql)?:\/\/\S+$/.test(clusterDb.value)) {
      throw new UsageError(`${clusterDb.source} must be a postgres:// URL`);
    }
    if (selfUrl.value === undefined || !/^https?:\/\/[^/\s]+\/?$/.test(selfUrl.value)) {
      throw new UsageError(
        `cluster mode needs --self-url (or IMAGE_CACHE_SELF_URL): the http://host:port the other nodes reach this one at${
          selfUrl.value === undefined ? "" : `, received ${JSON.stringify(selfUrl.value)}`
        }`,
      );
    }
    if (clusterSecret.value === undefined || clusterSecret.value.length < 16) {
      throw new UsageError(
        `cluster mode needs --cluster-secret (or IMAGE_CACHE_CLUSTER_SECRET) of at least 16 characters${
          clusterSecret.value === undefined ? "" : `, received ${clusterSecret.value.length}`
        }`,
      );
    }
    cluster = { database: clusterDb.value, selfUrl: selfUrl.value, secret: clusterSecret.value };
  } else if (selfUrl.value !== undefined || clusterSecret.value !== undefined) {
    throw new UsageError("--self-url and --cluster-secret need --cluster-db (cluster mode)");
  }

  const headerTimeout = duration("header-timeout");
  if (headerTimeout === 0) throw new UsageError("--header-timeout must be more than 0");

  return {
    upstream,
    hostname,
    port,
    cacheDir,
    maxSize: size("max-size"),
    minFree: size("min-free"),
    adminToken: token("admin-token"),
    serviceToken: token("service-token"),
    serviceTokenFile: serviceTokenFile.value,
    accessCheck: accessRaw.value === "glance",
    accessTtl: duration("access-ttl"),
    headerTimeout,
    shutdownTimeout: duration("shutdown-timeout"),
    prefetchConcurrency,
    quietHits: bool("quiet-hits"),
    accessLog: !bool("no-access-log"),
    cluster,
  };
}

function bytes(n: number): string {
  if (n === 0) return "0 B";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let unit = 0;
  while (n >= 1024 && unit < units.length - 1 && n % 1024 === 0) {
    n /= 1024;
    unit++;
  }
  return `${n} ${units[unit]}`;
}

function duration(ms: number): string {
  return ms % 1000 === 0 ? `${ms / 1000} s` : `${ms} ms`;
}

function urlHost(hostname: string): string {
  return hostname.includes(":") ? `[${hostname}]` : hostname;
}

async function main(): Promise<number> {
  let config;
  try {
    config = parseConfig(process.argv.slice(2), process.env);
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    console.error(`serve: ${error.message}\nRun with --help to see the options.`);
    return 2;
  }
  if (config === "help") {
    console.log(usage());
    return 0;
  }

  const serviceTokenFile = config.serviceTokenFile;
  if (serviceTokenFile !== undefined) {
    try {
      await access(serviceTokenFile, constants.R_OK);
    } catch (error) {
      console.error(
        `serve: cannot read the service token file ${JSON.stringify(serviceTokenFile)}: ${
          (error as Error).message
        }`,
      );
      return 1;
    }
  }

  try {
    await mkdir(config.cacheDir, { recursive: true });
    await access(config.cacheDir, constants.R_OK | constants.W_OK);
  } catch (error) {
    console.error(
      `serve: cannot use the cache directory ${JSON.stringify(config.cacheDir)}: ${
        (error as Error).message
      }`,
    );
    return 1;
  }

  // No upstream: a demo Glance on a loopback port, so the command works on a fresh machine.
  let demo: Deno.HttpServer<Deno.NetAddr> | undefined;
  let upstream = config.upstream;
  let upstreamNote = "";
  if (upstream === undefined) {
    const origin = demoOrigin();
    demo = Deno.serve(
      { hostname: "127.0.0.1", port: 0, onListen: () => {} },
      origin.app.fetch,
    );
    upstream = `http://127.0.0.1:${demo.addr.port}`;
    upstreamNote = ` (built-in demo Glance: ${
      Object.entries(origin.images).map(([id, image]) => `${id} ${bytes(image.size)}`).join(", ")
    })`;
  }

  const store = new FileSystemStore({
    directory: config.cacheDir,
    maxSize: config.maxSize,
    minFree: config.minFree,
  });
  const log = (line: string) => console.log(line);
  // Cluster mode: a database unreachable at start is one line and exit 1.
  let cluster: Cluster | undefined;
  if (config.cluster !== undefined) {
    try {
      cluster = await joinCluster({ store, ...config.cluster, onLog: log });
    } catch (error) {
      console.error(`serve: ${(error as Error).message}`);
      await demo?.shutdown();
      await store.close();
      return 1;
    }
  }
  const proxy = proxyApp({
    cluster,
    upstream,
    store,
    accessCheck: config.accessCheck ? { ttl: config.accessTtl } : false,
    adminToken: config.adminToken,
    serviceToken: serviceTokenFile === undefined
      ? config.serviceToken
      : async () => (await readFile(serviceTokenFile, "utf8")).trim(),
    prefetchConcurrency: config.prefetchConcurrency,
    headerTimeout: config.headerTimeout,
    onLog: config.accessLog ? (entry) => log(formatAccessLog(entry)) : undefined,
    logHits: !config.quietHits,
  });

  let server: Deno.HttpServer<Deno.NetAddr>;
  try {
    // Deno.serve binds at once: a taken port throws here.
    server = Deno.serve({
      hostname: config.hostname,
      port: config.port,
      onListen: () => {},
    }, proxy.fetch);
  } catch (error) {
    console.error(
      `serve: cannot listen on ${urlHost(config.hostname)}:${config.port}: ${
        (error as Error).message
      }`,
    );
    await demo?.shutdown();
    await store.close();
    return 1;
  }

  const address = `http://${urlHost(server.addr.hostname)}:${server.addr.port}`;
  const managed = proxy.managed
    ? "/v2/cache, legacy cached_images/queued_images, /metrics (admin token required)"
    : "not mounted (no --admin-token): /v2/cache goes to the upstream";
  log(
    [
      `hono-image-cache proxy listening on ${address}`,
      `  upstream         ${upstream}${upstreamNote}`,
      `  cache            ${config.cacheDir} (max ${bytes(config.maxSize)}, keep ${
        bytes(config.minFree)
      } free)`,
      `  access check     ${
        config.accessCheck
          ? `GET /v2/images/{id} with the client's credentials before each hit, answers kept ${
            duration(config.accessTtl)
          }`
          : "off: hits are served without asking the upstream"
      }`,
      `  management API   ${managed}`,
      `  prefetch         ${config.prefetchConcurrency} at once, ${
        config.serviceToken === undefined && serviceTokenFile === undefined
          ? "without credentials (no --service-token); Range misses start no background fill"
          : `with the service token${
            serviceTokenFile === undefined ? "" : ` read from ${serviceTokenFile}`
          }; a Range miss also fills the whole image in the background`
      }`,
      `  timeouts         upstream headers ${duration(config.headerTimeout)}, shutdown ${
        duration(config.shutdownTimeout)
      }`,
      `  cluster          ${
        cluster === undefined
          ? "off (single node)"
          : `${cluster.selfUrl}, index ${
            config.cluster!.database.replace(/^(postgres(?:ql)?:\/\/[^:@/]*):[^@/]*@/, "$1:***@")
          }`
      }`,
      `  access log       ${
        !config.accessLog ? "off" : config.quietHits ? "every request but hits" : "every request"
      }`,
      ...(demo === undefined
        ? []
        : [`Try: curl -o /dev/null -w '%{http_code}\\n' ${address}/v2/images/cirros/file`]),
    ].join("\n"),
  );

  // Graceful shutdown: stop accepting, let short requests (and fills) finish within the
  // bound, then exit. A fill still running is abandoned: its partial file belongs to this
  // (now dead) process, so the next start sweeps it and it is never served.
  const done = Promise.withResolvers<number>();
  let stopping = false;
  const stop = async (signal: string) => {
    if (stopping) {
      log(`${signal} again: exiting now`);
      done.resolve(1);
      return;
    }
    stopping = true;
    const deadline = Date.now() + config.shutdownTimeout;
    log(`${signal}: shutting down, waiting up to ${duration(config.shutdownTimeout)}`);
    let timer: ReturnType<typeof setTimeout> | undefined;
    const expired = new Promise<false>((resolve) => {
      timer = setTimeout(() => resolve(false), config.shutdownTimeout);
    });
    const drained = await Promise.race([server.shutdown().then(() => true), expired]);
    clearTimeout(timer);
    const settled = await proxy.settle(Math.max(0, deadline - Date.now()));
    const abandoned = proxy.filling();
    proxy.close(); // prefetches under way stop; the queue is resumed at the next start
    if (!drained) log("requests still running were cut");
    if (!settled && abandoned.length > 0) {
      log(
        `abandoned ${abandoned.length} fill(s): ${
          abandoned.join(", ")
        }; their partial files are swept at the next start`,
      );
    }
    await cluster?.close().catch((error) => console.warn("hono-image-cache:", error));
    await store.close().catch((error) => console.warn("hono-image-cache:", error));
    log("stopped");
    done.resolve(0);
  };
  const signals: Deno.Signal[] = ["SIGINT", "SIGTERM"];
  for (const signal of signals) {
    try {
      Deno.addSignalListener(signal, () => void stop(signal));
    } catch {
      // SIGTERM cannot be listened to on Windows.
    }
  }
  return await done.promise;
}

if (import.meta.main) {
  const code = await main();
  Deno.exit(code);
}
