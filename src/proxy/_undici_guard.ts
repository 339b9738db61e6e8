/**
 * A guard for a crash in the `fetch` of Node 24 and earlier (undici 7,
 * nodejs/undici#5360): when an upstream closes a connection while the
 * response body waits for its reader (backpressure, which a fill applies
 * when the disk or a client is slower than the upstream), undici's HTTP/1
 * parser throws `AssertionError: assert(!this.paused)` from the socket's
 * `end` handler. Nothing can catch it: the process dies, with every
 * download it serves. The request itself then fails on the socket's close
 * (the fill fails, its clients are cut, nothing is committed), so the
 * process can safely go on. Fixed in undici 8.
 *
 * @module
 */
import process from "node:process";
import { RUNTIME } from "../_runtime.ts";

/** Whether `error` is undici's paused-parser assertion (nodejs/undici#5360). */
export function isPausedParserCrash(error: unknown): boolean {
  return error instanceof Error && /assert\(!this\.paused\)/.test(error.message) &&
    /onHttpSocketEnd/.test(error.stack ?? "");
}

let guarded = false;

/**
 * On Node, keeps the process alive through that one assertion (logged with
 * `log`); any other uncaught exception still ends the process as Node's
 * default does (printed, exit code 1). Idempotent; does nothing on Deno and Bun.
 */
export function guardPausedParser(log: (message: string) => void): void {
  if (guarded || RUNTIME !== "node") return;
  guarded = true;
  process.on("uncaughtException", (error) => {
    if (isPausedParserCrash(error)) {
      log(
        "an upstream closed a connection whose body was waiting for its reader: Node's fetch " +
          "threw (nodejs/undici#5360); that download fails, the process goes on",
      );
      return;
    }
    console.error(error);
    process.exit(1);
  });
}
