/**
 * The soak's workload: clients that loop over a weighted mix of requests
 * against the cluster's live servers, and hand every answer to the oracle.
 *
 * Request shapes: full `GET`s (v1 and v2), `Range`s (single, open, suffix,
 * beyond the end, malformed, multiple, 20-digit, with or without
 * `If-Range`), `If-None-Match`, `HEAD`, hostile ids, `DELETE`s, and the
 * management API (queue, delete one or all, list, prune, clean). Clients
 * read at full speed, slowly, with a long pause, or hang up at a random
 * byte. Popular images are asked for more often (weight 1 / rank).
 *
 * @module
 */
import {
  type Catalog,
  type CatalogImage,
  encodeId,
  HOSTILE_IDS,
  randomId,
  type Rng,
} from "./data.ts";
import { type Cluster, sleep, type Slot } from "./cluster.ts";
import {
  checkDeletionWins,
  type Deletion,
  type Expectation,
  judge,
  type Judged,
  judgeFailure,
  type Violation,
  type World,
} from "./oracle.ts";
import { originRoute, type SoakOrigin } from "./origin.ts";
import { bump, type Ledger } from "./report.ts";

/** What the workload runs against. */
export interface WorkloadOptions {
  catalog: Catalog;
  origin: SoakOrigin;
  cluster: Cluster;
  ledger: Ledger;
  world: World;
  /** A request whose body does not move for this long (ms) is aborted. */
  idleTimeout: number;
}

/** A `Range` header for an image of `size` bytes, valid or not. */
function rangeFor(r: Rng, size: number): string {
  const at = () => r.int(0, Math.max(0, size - 1));
  switch (
    r.weighted({
      within: 6,
      open: 2,
      suffix: 2,
      beyond: 1,
      invalid: 1,
      garbage: 1,
      multi: 1,
      "multi-spread": 2,
      huge: 1,
    })
  ) {
    case "within": {
      const a = at();
      return `bytes=${a}-${r.int(a, Math.max(a, size - 1 + r.int(0, 2)))}`;
    }
    case "open":
      return `bytes=${at()}-`;
    case "suffix":
      return `bytes=-${r.int(0, size + 2)}`;
    case "beyond":
      return `bytes=${size + r.int(0, 10)}-`;
    case "invalid":
      return `bytes=${size + 5}-${r.int(0, 3)}`;
    case "garbage":
      return r.pick([
        "bytes=abc",
        "items=0-5",
        "bytes=",
        "bytes=--1",
        "bytes 0-1",
        "bytes=1-2-3",
      ]);
    case "multi":
      return `bytes=0-0,${at()}-`;
    case "multi-spread": {
      // Parts far apart: on a fill, the later part opens after the earlier is sent.
      const a = at();
      const b = at();
      const [lo, hi] = a <= b ? [a, b] : [b, a];
      return `bytes=${lo}-${Math.min(size - 1, lo + 99)},${hi}-${Math.min(size - 1, hi + 99)}`;
    }
    default:
      return `bytes=0-${"9".repeat(r.int(16, 30))}`;
  }
}

/** How the client reads the body: at full speed, hanging up, with a long pause, or slowly. */
function readingStyle(r: Rng, exp: Expectation, size: number) {
  const style = r.weighted({ fast: 14, hangup: 2, pause: 2, stall: 1, slow: 1 });
  if (style === "hangup") exp.hangUpAfter = r.int(0, Math.max(0, size));
  else if (style === "pause" || style === "stall") {
    // A stall: a client that stops reading for seconds while others read the same fill.
    exp.pauseAt = r.int(0, Math.max(0, size));
    exp.pause = style === "pause" ? r.int(200, 2500) : r.int(3000, 6000);
  } else if (style === "slow") {
    exp.chunkPause = Math.max(1, Math.min(20, Math.floor(3000 / Math.max(1, size / 65536))));
  }
}

/** The clients of a run. */
export class Workload {
  /** Requests under way (the end of the run waits for them). */
  readonly inFlight: Set<Promise<void>> = new Set();
  /** The last `DELETE` answered 2xx, by id. */
  readonly #deletedAt = new Map<string, Deletion>();
  readonly #options: WorkloadOptions;
  readonly #popular: { image: CatalogImage; weight: number }[];
  #sequence = 0;

  constructor(options: WorkloadOptions) {
    this.#options = options;
    this.#popular = options.catalog.images.map((image, rank) => ({
      image,
      weight: 1 / (rank + 1),
    }));
  }

  /** One client: requests until `deadline`, one at a time, with short random gaps. */
  async client(n: number, r: Rng, deadline: number): Promise<void> {
    const { cluster, ledger } = this.#options;
    while (Date.now() < deadline && !cluster.stopping) {
      const api = cluster.hasCacheApi;
      const action = r.weighted({
        get: 40,
        range: 18,
        conditional: 6,
        head: 5,
        hostile: 5,
        delete: 3,
        "api-queue": api ? 4 : 0,
        "api-delete": api ? 2 : 0,
        "api-list": api ? 2 : 0,
        "api-prune": api ? 1 : 0,
        "api-clean": api ? 1 : 0,
        "api-clear": api ? 0.2 : 0,
      });
      let task: Promise<unknown>;
      if (action === "delete" || action === "api-delete" || action === "api-clear") {
        task = this.#deleteRequest(r, n, action);
      } else if (action.startsWith("api-")) task = this.#apiRequest(r, n, action);
      else task = this.#dataRequest(r, n, action);
      const p = task.then(
        () => {},
        (error) =>
          ledger.violation(
            { kind: "harness", message: String(error?.stack ?? error) },
            `client ${n}`,
          ),
      );
      this.inFlight.add(p);
      await p;
      this.inFlight.delete(p);
      if (r.chance(0.1)) await sleep(r.int(0, 200));
    }
  }

  /** Waits for the requests under way (every read has an idle timeout), at most that long plus 10 s. */
  async drain(): Promise<void> {
    await Promise.race([
      Promise.all([...this.inFlight]),
      sleep(this.#options.idleTimeout + 10_000),
    ]);
  }

  /** Every image once from `slot`, fault-free: each must come back whole and right. */
  async finalPass(slot: Slot): Promise<void> {
    const { catalog, world, ledger } = this.#options;
    for (const image of catalog.images) {
      const req = `final-${image.id}`;
      const exp: Expectation = { req, server: 0, image, method: "GET", started: Date.now() };
      const res = await fetch(`${slot.url}/v2/images/${encodeURIComponent(image.id)}/file`, {
        headers: { "x-soak-req": req },
        client: slot.client,
      });
      const judged = await judge(res, exp, world);
      this.#record("final-get", exp, judged, `/v2/images/${image.id}/file`, {});
      if (judged.ending !== "complete") {
        ledger.violation(
          { kind: "final", message: `final GET of ${image.id} ended ${judged.ending}` },
          "final pass",
        );
      }
    }
  }

  #pickImage(r: Rng): CatalogImage {
    const popular = this.#popular;
    let x = r.next() * popular.reduce((s, p) => s + p.weight, 0);
    for (const p of popular) {
      x -= p.weight;
      if (x < 0) return p.image;
    }
    return popular[0].image;
  }

  #record(
    action: string,
    exp: Expectation,
    judged: Judged,
    path: string,
    headers: Record<string, string>,
  ) {
    const { counts } = this.#options.ledger;
    const { origin, ledger } = this.#options;
    bump(counts.requests, action);
    bump(counts.endings, judged.ending);
    bump(counts.statuses, String(judged.status));
    const cs = judged.cacheStatus.replace(/^[^;]*;\s*/, "") || "(none)";
    bump(counts.cacheStatus, cs);
    if (judged.explained) bump(counts.explained, judged.explained);
    counts.bytes += judged.bytes;
    const deleted = this.#deletedAt.get(exp.image.id);
    const deletion = checkDeletionWins(exp, judged, deleted, origin.records, this.#options.world);
    if (deletion !== undefined) judged.violations.push(deletion);
    // For a shared fill (collapsed, or a peer's): the image's other origin reads around it.
    const shared = /collapsed|;\s*peer\b/.test(judged.cacheStatus)
      ? origin.records.filter((r) =>
        r.id === exp.image.id && r.req !== exp.req && r.at >= exp.started - 30_000
      ).slice(-8).map((r) =>
        `${r.req}@${r.at - exp.started}ms:s${r.server}:${r.status}/${r.fault}${
          r.detail === undefined ? "" : `(${r.detail})`
        }:${r.start}-${r.end}${r.done === undefined ? "" : `:done@${r.done - exp.started}ms`}`
      )
      : [];
    // A server that stopped answering: how it was doing (CPU, open files) tells a spin from a leak.
    const slot = this.#options.cluster.slots[exp.server];
    const health = slot?.health === undefined ? "" : `\n    server ${exp.server}: ${slot.health}`;
    for (const v of judged.violations) {
      ledger.violation(
        v,
        `origin: ${JSON.stringify(origin.byRequest.get(exp.req) ?? [])}${
          /stuck|request-failed/.test(v.kind) ? health : ""
        }; image ${JSON.stringify({ ...exp.image, md5: undefined })}${
          shared.length > 0 ? `\n    the image's other origin reads: ${shared.join(" ")}` : ""
        }\n    ` +
          `req ${exp.req} server ${exp.server} ${exp.method} ${path} ${
            JSON.stringify(headers)
          } -> ${judged.status} "${judged.cacheStatus}" ${judged.ending} ${judged.bytes}B`,
      );
    }
  }

  /** One request with a body judged by the oracle. */
  async #dataRequest(r: Rng, client: number, action: string) {
    const { catalog, cluster, world, idleTimeout } = this.#options;
    const slot = cluster.pickUp(r);
    if (slot === undefined) return sleep(100);
    const req = `${client}-${++this.#sequence}`;
    let image: CatalogImage;
    let path: string;
    const v1 = r.chance(0.3);
    if (action === "hostile") {
      const id = r.chance(0.7) ? r.pick(HOSTILE_IDS) : randomId(r);
      const encoded = encodeId(id, r);
      path = v1 ? `/v1/images/${encoded}` : `/v2/images/${encoded}/file`;
      const target = new URL(slot.url! + path).pathname;
      const route = originRoute("GET", target);
      if (route === undefined) {
        // Neither the cache nor the origin has a route for it: a plain 404 is right.
        return this.#plainRequest(slot, req, action, "GET", path, {}, [404]);
      }
      image = catalog.get(route.id);
    } else {
      image = this.#pickImage(r);
      const encoded = encodeURIComponent(image.id);
      path = v1 ? `/v1/images/${encoded}` : `/v2/images/${encoded}/file`;
    }
    const exp: Expectation = {
      req,
      server: slot.index,
      image,
      method: action === "head" ? "HEAD" : "GET",
      started: 0,
    };
    const headers: Record<string, string> = { "x-soak-req": req };
    if (action === "range") {
      exp.range = headers.range = rangeFor(r, image.size);
      if (r.chance(0.2)) {
        exp.ifRange = headers["if-range"] = r.chance(0.6)
          ? `"md5-${image.md5}"`
          : r.pick(['"other"', "Wed, 21 Oct 2015 07:28:00 GMT"]);
      }
    } else if (action === "conditional") {
      exp.ifNoneMatch = headers["if-none-match"] = r.pick([
        `"md5-${image.md5}"`,
        `W/"md5-${image.md5}"`,
        `"nope", "md5-${image.md5}"`,
        `"nope"`,
        "*",
      ]);
    }
    if (exp.method === "GET") readingStyle(r, exp, image.size);
    // A slow access check (a hit, or joining a fill another request started).
    if (r.chance(0.1)) headers["x-soak-authorize-delay"] = String(r.int(100, 2000));
    exp.started = Date.now();
    let judged: Judged;
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), idleTimeout);
    try {
      const res = await fetch(slot.url + path, {
        method: exp.method,
        headers,
        client: slot.client,
        signal: abort.signal,
      });
      clearTimeout(timer);
      judged = await judge(res, exp, world);
    } catch (error) {
      clearTimeout(timer);
      await sleep(300); // A crash is recorded once its exit is seen (see explainCut).
      judged =
        abort.signal.aborted && !world.killedBetween(slot.index, exp.started, Date.now() + 1000)
          ? {
            status: 0,
            cacheStatus: "",
            ending: "timeout",
            bytes: 0,
            violations: [{ kind: "stuck", message: `no answer in ${idleTimeout} ms` }],
          }
          : judgeFailure(exp, world, error);
    }
    this.#record(action, exp, judged, path, headers);
  }

  /** A request whose answer is judged by its status (and a check of its body). */
  async #plainRequest(
    slot: Slot,
    req: string,
    action: string,
    method: string,
    path: string,
    headers: Record<string, string>,
    allowed: number[],
    check?: (res: Response, body: string) => string | undefined,
  ): Promise<Response | undefined> {
    const { catalog, origin, ledger, world, idleTimeout } = this.#options;
    const counts = ledger.counts;
    const exp: Expectation = {
      req,
      server: slot.index,
      image: catalog.images[0],
      method: "GET",
      started: Date.now(),
    };
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), idleTimeout);
    let judged: Judged;
    let res: Response | undefined;
    try {
      res = await fetch(slot.url + path, {
        method,
        headers: { ...headers, "x-soak-req": req },
        client: slot.client,
        signal: abort.signal,
      });
      const body = await res.text();
      const violations: Violation[] = [];
      if (!allowed.includes(res.status)) {
        const originSaid = (origin.byRequest.get(req) ?? []).some((r) => r.status === res!.status);
        // A store fault behind a management answer is a 500 with its message.
        const storeFault = res.status === 500 && /^Cache store error: /.test(body);
        if (storeFault) bump(counts.explained, "api-500-store-fault");
        if (!originSaid && !storeFault) {
          violations.push({
            kind: "status",
            message: `${method} ${path}: ${res.status} (expected ${allowed.join("/")}): ${
              body.slice(0, 120)
            }`,
          });
        }
      } else {
        const problem = check?.(res, body);
        if (problem !== undefined) {
          violations.push({ kind: "api", message: `${method} ${path}: ${problem}` });
        }
      }
      judged = {
        status: res.status,
        cacheStatus: res.headers.get("cache-status") ?? "",
        ending: "complete",
        bytes: body.length,
        violations,
      };
    } catch (error) {
      await sleep(300); // A crash is recorded once its exit is seen (see explainCut).
      judged = judgeFailure(exp, world, error);
      res = undefined;
    } finally {
      clearTimeout(timer);
    }
    bump(counts.requests, action);
    bump(counts.statuses, String(judged.status));
    if (judged.explained) bump(counts.explained, judged.explained);
    for (const v of judged.violations) {
      ledger.violation(
        v,
        `req ${req} server ${slot.index} ${method} ${path} ${JSON.stringify(headers)}`,
      );
    }
    return judged.status === 0 ? undefined : res;
  }

  /** A `DELETE` of one image (Glance's or the management API's), or a clear of the cache. */
  async #deleteRequest(r: Rng, client: number, action: string) {
    const { catalog, cluster } = this.#options;
    const slot = cluster.pickUp(r);
    if (slot === undefined) return sleep(100);
    const req = `${client}-${++this.#sequence}`;
    const image = this.#pickImage(r);
    const encoded = encodeURIComponent(image.id);
    let path: string;
    let allowed: number[];
    let targets = [image.id];
    const headers: Record<string, string> = {};
    if (action === "delete") {
      path = r.chance(0.5) ? `/v1/images/${encoded}` : `/v2/images/${encoded}`;
      allowed = [200, 204];
    } else if (action === "api-delete") {
      path = `/v2/cache/${encoded}`;
      allowed = [204, 404];
    } else {
      path = "/v2/cache";
      const target = r.pick([undefined, "", "both", "cache", "queue", "nonsense"]);
      if (target !== undefined) headers["x-image-cache-clear-target"] = target;
      allowed = target === "nonsense" ? [400] : [204];
      targets = target === "queue" || target === "nonsense" ? [] : catalog.images.map((i) => i.id);
    }
    const { world, ledger } = this.#options;
    if (world.cluster && action !== "delete") {
      // The management API deletes on every node; with the database away it
      // asks the peers it knows directly, and answers 503 if one did not answer.
      headers["x-image-cache-scope"] = "cluster";
      if (!allowed.includes(400)) allowed = [...allowed, 503];
    }
    const sent = Date.now();
    const res = await this.#plainRequest(slot, req, action, "DELETE", path, headers, allowed);
    // A 503 says a peer known from the last syncs did not answer while the database
    // was away (for the deleting node: a node swept while it was starved of CPU
    // sees it away too). A killed node's old URL (a restart listens on a new port;
    // this node's own included) is such a peer: syncs list it until it is swept
    // (the soak's deadAfter, 2 s) and the node keeps it for 3 more syncs (1 s each),
    // then until it is back on the database: the look-back starts 8 s before the
    // outage did.
    const now = Date.now();
    const since = Math.min(sent, world.databaseDownSince(sent - 8000, now) ?? sent) - 8000;
    const peerDown = Array.from({ length: world.servers }, (_, i) => i)
      .some((i) => world.downBetween(i, since, now));
    if (res?.status === 503 && !peerDown) {
      ledger.violation(
        { kind: "status", message: `cluster DELETE answered 503 with every peer up` },
        `req ${req} server ${slot.index} DELETE ${path}`,
      );
    }
    if (res !== undefined && res.status >= 200 && res.status < 300 && res.status !== 404) {
      const at = Date.now();
      const what = `${req} DELETE ${path} ${JSON.stringify(headers)} -> ${res.status}`;
      for (const id of targets) this.#deletedAt.set(id, { sent, at, server: slot.index, what });
    }
  }

  /** A request of the management API: queue, list, prune or clean. */
  async #apiRequest(r: Rng, client: number, action: string) {
    const { catalog, cluster } = this.#options;
    const slot = cluster.pickUp(r);
    if (slot === undefined) return sleep(100);
    const req = `${client}-${++this.#sequence}`;
    const image = r.chance(0.1) ? catalog.get(r.pick(HOSTILE_IDS)) : this.#pickImage(r);
    switch (action) {
      case "api-queue": {
        const hostile = !catalog.has(image.id);
        const path = `/v2/cache/${encodeId(image.id, r)}`;
        const route = new URL(slot.url + path).pathname;
        if (route !== path) return; // The URL parser resolved a dot segment: not a cache route any more.
        await this.#plainRequest(slot, req, action, "PUT", path, {}, hostile ? [202, 400] : [202]);
        return;
      }
      case "api-list":
        await this.#plainRequest(slot, req, action, "GET", "/v2/cache", {}, [200], (_res, body) => {
          let value;
          try {
            value = JSON.parse(body);
          } catch {
            return `not JSON: ${body.slice(0, 100)}`;
          }
          if (!Array.isArray(value?.cached_images) || !Array.isArray(value?.queued_images)) {
            return `unexpected shape: ${body.slice(0, 200)}`;
          }
          for (const entry of value.cached_images) {
            const known = catalog.get(String(entry.image_id));
            if (entry.size !== known.size) {
              return `lists ${JSON.stringify(entry)} but the image has ${known.size} bytes`;
            }
          }
          return undefined;
        });
        return;
      case "api-prune":
        await this.#plainRequest(
          slot,
          req,
          action,
          "POST",
          "/v2/cache/prune",
          {},
          [200],
          (_res, body) => {
            try {
              const value = JSON.parse(body);
              if (
                !Number.isInteger(value.total_files_pruned) ||
                !Number.isInteger(value.total_bytes_pruned)
              ) {
                return `unexpected prune answer ${body}`;
              }
            } catch {
              return `not JSON: ${body.slice(0, 100)}`;
            }
            return undefined;
          },
        );
        return;
      case "api-clean":
        await this.#plainRequest(slot, req, action, "POST", "/v2/cache/clean", {}, [200]);
        return;
    }
  }
}
