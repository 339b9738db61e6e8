/**
 * A throwaway PostgreSQL for the cluster tests: found on the machine (or
 * installed with `apt-get install -y postgresql` when missing and allowed),
 * initialised in a temporary directory, started on a free loopback port as a
 * non-root user (PostgreSQL refuses root), and removed afterwards.
 * Runtime-neutral (node:child_process).
 *
 * @module
 */
import { execFile } from "node:child_process";
import { chmod, chown, mkdtemp, readdir, rm } from "node:fs/promises";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import process from "node:process";

/** A running PostgreSQL server. */
export interface TestPostgres {
  /** `postgres://postgres@127.0.0.1:<port>/postgres` */
  url: string;
  /** Stops the server (immediate mode: as a crash would). */
  stop(): Promise<void>;
  /** Starts it again on the same port and directory. */
  start(): Promise<void>;
  /** Stops it for good and removes its directory. */
  close(): Promise<void>;
}

interface Run {
  code: number;
  output: string;
}

function run(cmd: string, args: string[], timeout = 120_000): Promise<Run> {
  return new Promise((resolve) => {
    execFile(cmd, args, { timeout, maxBuffer: 8 * 2 ** 20 }, (error, stdout, stderr) => {
      const code = error === null ? 0 : typeof error.code === "number" ? error.code : 1;
      resolve({ code, output: `${stdout}${stderr}${error && code !== 0 ? `\n${error}` : ""}` });
    });
  });
}

/** The directory of PostgreSQL's server binaries (the newest Debian version), if any. */
async function binDir(): Promise<string | undefined> {
  const versions = await readdir("/usr/lib/postgresql").catch(() => [] as string[]);
  const sorted = versions.filter((v) => /^\d+$/.test(v)).sort((a, b) => Number(b) - Number(a));
  for (const version of sorted) {
    const dir = `/usr/lib/postgresql/${version}/bin`;
    if ((await readdir(dir).catch(() => [] as string[])).includes("initdb")) return dir;
  }
  const which = await run("sh", ["-c", "command -v initdb"]);
  const path = which.output.trim();
  return which.code === 0 && path !== "" ? path.slice(0, path.lastIndexOf("/")) : undefined;
}

let installing: Promise<string | undefined> | undefined;

/**
 * PostgreSQL's binaries: found, or installed (as root, with apt-get) once
 * per process. Resolves why not when impossible.
 */
function findOrInstall(): Promise<string | undefined> {
  installing ??= (async () => {
    const found = await binDir();
    if (found !== undefined) return found;
    if (process.getuid?.() !== 0) return undefined;
    if ((await run("sh", ["-c", "command -v apt-get"])).code !== 0) return undefined;
    let install = await run("apt-get", ["install", "-y", "-q", "postgresql"], 600_000);
    if (install.code !== 0) {
      await run("apt-get", ["update", "-q"], 300_000);
      install = await run("apt-get", ["install", "-y", "-q", "postgresql"], 600_000);
    }
    return install.code === 0 ? await binDir() : undefined;
  })();
  return installing;
}

/** A free loopback port (bound then released). */
function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      server.close(() => resolve(typeof address === "object" && address ? address.port : 0));
    });
  });
}

/**
 * Starts a throwaway PostgreSQL, or resolves a sentence saying why it
 * cannot (the cluster tests then skip with it).
 */
export async function startPostgres(): Promise<TestPostgres | string> {
  const bin = await findOrInstall();
  if (bin === undefined) {
    return "PostgreSQL is not installed and could not be installed (apt-get install -y postgresql needs root and Debian's packages)";
  }
  const root = process.getuid?.() === 0;
  // As root, the server runs as the `postgres` user, which owns its directory.
  const asUser = (cmd: string, args: string[]) =>
    root ? run("runuser", ["-u", "postgres", "--", cmd, ...args]) : run(cmd, args);
  if (root) {
    const user = await run("id", ["-u", "postgres"]);
    if (user.code !== 0) return "PostgreSQL refuses to run as root and there is no postgres user";
  }
  const dir = await mkdtemp(join(tmpdir(), "pg-"));
  if (root) {
    const uid = Number((await run("id", ["-u", "postgres"])).output.trim());
    const gid = Number((await run("id", ["-g", "postgres"])).output.trim());
    await chown(dir, uid, gid);
  }
  await chmod(dir, 0o700);
  const data = join(dir, "data");
  const init = await asUser(`${bin}/initdb`, [
    "-D",
    data,
    "-U",
    "postgres",
    "-A",
    "trust",
    "-E",
    "UTF8",
    "--no-sync",
  ]);
  if (init.code !== 0) {
    await rm(dir, { recursive: true, force: true });
    return `initdb failed: ${init.output.trim().split("\n").slice(-3).join(" ")}`;
  }
  const port = await freePort();
  // No fsync (the machine does not crash, only the server), but every commit's WAL is
  // written before it answers: a restart (an immediate stop, as a crash) loses nothing
  // committed, as with a real database. With synchronous_commit off it could lose the
  // last half-second, the tables just created included.
  const options =
    `-p ${port} -k ${dir} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off`;
  const start = async () => {
    const started = await asUser(`${bin}/pg_ctl`, [
      "-D",
      data,
      "-o",
      options,
      "-l",
      join(dir, "log"),
      "-w",
      "-t",
      "60",
      "start",
    ]);
    if (started.code !== 0) throw new Error(`pg_ctl start failed: ${started.output.trim()}`);
  };
  const stop = async () => {
    await asUser(`${bin}/pg_ctl`, ["-D", data, "-m", "immediate", "-w", "stop"]);
  };
  try {
    await start();
  } catch (error) {
    await rm(dir, { recursive: true, force: true });
    return String((error as Error).message);
  }
  return {
    url: `postgres://postgres@127.0.0.1:${port}/postgres`,
    start,
    stop,
    async close() {
      await stop();
      await rm(dir, { recursive: true, force: true });
    },
  };
}
