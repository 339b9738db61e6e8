/**
 * The proxy's own metrics, appended to the cache's (`metricsText`) on the
 * proxy's `/metrics`: requests by status and cache status, latency
 * histograms, access-check outcomes and upstream errors, in the Prometheus
 * text format.
 *
 * @module
 */

/** Upper bounds (seconds) of the time-to-first-byte buckets. */
const TTFB_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30];
/** Upper bounds (seconds) of the total-duration buckets: a hit of 64 KiB to a 20 GiB miss. */
const DURATION_BUCKETS = [
  0.005,
  0.01,
  0.025,
  0.05,
  0.1,
  0.25,
  0.5,
  1,
  2.5,
  5,
  10,
  30,
  60,
  120,
  300,
  600,
  1800,
  3600,
];

/** What the cache did with a request, in one bounded word (a metric label). */
export type CacheWord =
  | "hit"
  | "stale"
  | "miss"
  | "collapsed"
  | "pass"
  | "denied"
  | "check-failed"
  | "none";

/** How an access check ended. */
export type AccessOutcome = "allowed" | "denied" | "failed" | "stale";

/** Where an upstream error happened. */
export type UpstreamSource = "request" | "access-check" | "metadata" | "prefetch" | "readiness";

class Histogram {
  readonly #bounds: number[];
  readonly #series = new Map<string, { counts: number[]; sum: number; count: number }>();
  constructor(bounds: number[]) {
    this.#bounds = bounds;
  }
  observe(label: string, seconds: number) {
    let series = this.#series.get(label);
    if (series === undefined) {
      series = { counts: this.#bounds.map(() => 0), sum: 0, count: 0 };
      this.#series.set(label, series);
    }
    for (let i = 0; i < this.#bounds.length; i++) {
      if (seconds <= this.#bounds[i]) series.counts[i]++;
    }
    series.sum += seconds;
    series.count++;
  }
  text(name: string, help: string, labelName: string): string {
    let text = `# HELP ${name} ${help}\n# TYPE ${name} histogram\n`;
    for (const label of [...this.#series.keys()].sort()) {
      const series = this.#series.get(label)!;
      const own = `${labelName}="${escapeLabel(label)}"`;
      this.#bounds.forEach((bound, i) => {
        text += `${name}_bucket{${own},le="${bound}"} ${series.counts[i]}\n`;
      });
      text += `${name}_bucket{${own},le="+Inf"} ${series.count}\n`;
      text += `${name}_sum{${own}} ${series.sum}\n`;
      text += `${name}_count{${own}} ${series.count}\n`;
    }
    return text;
  }
}

/** Escapes a label value (backslash, double quote, line feed). */
function escapeLabel(value: string): string {
  return value.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, "\\n");
}

/** Counters by a tuple of label values, printed as one family. */
function counterText(
  name: string,
  help: string,
  labelNames: string[],
  counts: Map<string, number>,
): string {
  let text = `# HELP ${name} ${help}\n# TYPE ${name} counter\n`;
  for (const key of [...counts.keys()].sort()) {
    const values = key.split("\0");
    const labels = labelNames.map((label, i) => `${label}="${escapeLabel(values[i])}"`).join(",");
    text += `${name}{${labels}} ${counts.get(key)}\n`;
  }
  return text;
}

function bump(counts: Map<string, number>, ...labels: string[]) {
  const key = labels.join("\0");
  counts.set(key, (counts.get(key) ?? 0) + 1);
}

/** The proxy's counters and histograms, since the process started. */
export class ProxyMetrics {
  readonly #requests = new Map<string, number>();
  readonly #accessChecks = new Map<string, number>();
  readonly #upstreamErrors = new Map<string, number>();
  readonly #ttfb = new Histogram(TTFB_BUCKETS);
  readonly #duration = new Histogram(DURATION_BUCKETS);
  /** Requests whose response has not ended yet. */
  inFlight = 0;

  /** A request whose response headers are ready. */
  responded(status: number, cache: CacheWord, ttfbMs: number): void {
    bump(this.#requests, String(status), cache);
    this.#ttfb.observe(cache, ttfbMs / 1000);
  }

  /** A request whose body has ended (sent, or cut). */
  ended(cache: CacheWord, durationMs: number): void {
    this.#duration.observe(cache, durationMs / 1000);
  }

  /** An access check's outcome; `remembered` when no upstream request was made. */
  accessCheck(outcome: AccessOutcome, remembered: boolean): void {
    bump(this.#accessChecks, outcome, remembered ? "remembered" : "upstream");
  }

  /** The upstream could not be reached, answered too late, or answered 5xx. */
  upstreamError(source: UpstreamSource, kind: string): void {
    bump(this.#upstreamErrors, source, kind);
  }

  /** The exposition text of every family. */
  text(): string {
    return [
      counterText(
        "image_cache_proxy_requests_total",
        "Requests answered by the proxy, by status code and what the cache did.",
        ["code", "cache"],
        this.#requests,
      ),
      `# HELP image_cache_proxy_requests_in_flight Requests whose response has not ended.\n` +
      `# TYPE image_cache_proxy_requests_in_flight gauge\n` +
      `image_cache_proxy_requests_in_flight ${this.inFlight}\n`,
      this.#ttfb.text(
        "image_cache_proxy_time_to_first_byte_seconds",
        "Seconds from the request to its response headers, by what the cache did.",
        "cache",
      ),
      this.#duration.text(
        "image_cache_proxy_request_duration_seconds",
        "Seconds from the request to the end of its response body, by what the cache did.",
        "cache",
      ),
      counterText(
        "image_cache_proxy_access_checks_total",
        "Access checks of cached images, by outcome and whether the upstream was asked.",
        ["outcome", "source"],
        this.#accessChecks,
      ),
      counterText(
        "image_cache_proxy_upstream_errors_total",
        "Upstream requests that got no usable answer, by what asked and what happened.",
        ["source", "kind"],
        this.#upstreamErrors,
      ),
    ].join("");
  }
}
