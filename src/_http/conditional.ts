/**
 * Conditional requests (RFC 9110 §13) evaluated against a cached entry's
 * validators: its `ETag` and `Last-Modified` (the origin's, or the digest and the
 * commit time).
 *
 * @module
 */

/** The validators of a selected representation. */
export interface Validators {
  /** An entity tag, quoted: the origin's, or `"md5-…"`. */
  etag: string;
  /** Last modification, in milliseconds since the epoch (compared in whole seconds). */
  lastModified: number;
}

/** The outcome of the preconditions of a request (RFC 9110 §13.2.2). */
export type Precondition = "pass" | "not-modified" | "failed";

/** Request headers that make a request conditional, If-Range aside. */
const CONDITIONAL = ["if-match", "if-none-match", "if-modified-since", "if-unmodified-since"];

/** Whether the request carries a precondition (If-Range counts only along with Range on a GET). */
export function hasPreconditions(method: string, headers: Headers): boolean {
  for (const name of CONDITIONAL) if (headers.has(name)) return true;
  return method === "GET" && headers.has("range") && headers.has("if-range");
}

/**
 * Evaluates `If-Match`, `If-Unmodified-Since`, `If-None-Match` and
 * `If-Modified-Since` in the order RFC 9110 §13.2.2 prescribes:
 *
 * 1. `If-Match` false → `failed` (412). Without `If-Match`,
 *    `If-Unmodified-Since` false → `failed`.
 * 2. `If-None-Match` false → `not-modified` (304) for GET and HEAD, `failed`
 *    otherwise. Without `If-None-Match`, on GET or HEAD, `If-Modified-Since`
 *    false → `not-modified`.
 * 3. Otherwise `pass`. (`If-Range` is evaluated with the range, see
 *    {@linkcode ifRangeHolds}.)
 */
export function evaluatePreconditions(
  method: string,
  headers: Headers,
  validators: Validators,
): Precondition {
  const ifMatch = headers.get("if-match");
  if (ifMatch !== null) {
    if (!ifMatchHolds(ifMatch, validators.etag)) return "failed";
  } else {
    const since = headers.get("if-unmodified-since");
    const date = since === null ? undefined : parseHttpDate(since);
    // §13.1.4: an invalid date is ignored.
    if (date !== undefined && seconds(validators.lastModified) > seconds(date)) return "failed";
  }
  const safe = method === "GET" || method === "HEAD";
  const ifNoneMatch = headers.get("if-none-match");
  if (ifNoneMatch !== null) {
    if (!ifNoneMatchHolds(ifNoneMatch, validators.etag)) return safe ? "not-modified" : "failed";
  } else if (safe) {
    const since = headers.get("if-modified-since");
    const date = since === null ? undefined : parseHttpDate(since);
    // §13.1.3: an invalid date (or a list of dates) is ignored.
    if (date !== undefined && seconds(validators.lastModified) <= seconds(date)) {
      return "not-modified";
    }
  }
  return "pass";
}

/**
 * `If-Range` (RFC 9110 §13.1.5): true when absent; with an entity tag, true
 * on a strong match; with an HTTP-date, true when it equals `Last-Modified`
 * exactly; otherwise (a weak tag, garbage) false, which means: send the
 * full representation with `200`.
 */
export function ifRangeHolds(value: string | null, validators: Validators): boolean {
  if (value === null) return true;
  const text = value.trim();
  if (text.startsWith('"') || text.startsWith("W/")) {
    const tags = parseEntityTags(text);
    return tags !== undefined && tags.length === 1 && !tags[0].weak &&
      tags[0].tag === validators.etag;
  }
  const date = parseHttpDate(text);
  return date !== undefined && seconds(date) === seconds(validators.lastModified);
}

/** §13.1.1: `*` or a strong match with any listed tag. */
function ifMatchHolds(value: string, etag: string): boolean {
  if (value.trim() === "*") return true;
  const tags = parseEntityTags(value) ?? [];
  return tags.some((t) => !t.weak && t.tag === etag);
}

/** §13.1.2: false for `*` (the representation exists) or a weak match with any listed tag. */
function ifNoneMatchHolds(value: string, etag: string): boolean {
  if (value.trim() === "*") return false;
  const tags = parseEntityTags(value) ?? [];
  return !tags.some((t) => t.tag === etag);
}

/** An entity tag as sent: its opaque part with quotes, and whether it was marked weak. */
export interface EntityTag {
  /** The quoted opaque tag, `"…"`. */
  tag: string;
  /** Whether it had the `W/` prefix. */
  weak: boolean;
}

/**
 * Parses `#entity-tag` (RFC 9110 §8.8.3, list syntax §5.6.1). Returns the
 * tags up to the first malformed member (which, with everything after it,
 * is dropped), or `undefined` when the first one is already malformed.
 */
export function parseEntityTags(value: string): EntityTag[] | undefined {
  const tags: EntityTag[] = [];
  let i = 0;
  const n = value.length;
  const skip = () => {
    while (i < n && (value[i] === " " || value[i] === "\t" || value[i] === ",")) i++;
  };
  skip();
  while (i < n) {
    let weak = false;
    if (value.startsWith("W/", i)) {
      weak = true;
      i += 2;
    }
    if (value[i] !== '"') break;
    const close = value.indexOf('"', i + 1);
    if (close === -1) break;
    const tag = value.slice(i, close + 1);
    // etagc = %x21 / %x23-7E / obs-text
    if (!/^"[\x21\x23-\x7e\x80-\xff]*"$/.test(tag)) break;
    tags.push({ tag, weak });
    i = close + 1;
    const before = i;
    skip();
    if (i < n && i === before) break; // two tags without a comma between them
  }
  return tags.length === 0 ? undefined : tags;
}

function seconds(ms: number): number {
  return Math.floor(ms / 1000);
}

const DAYS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
const LONG_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
const TIME = "(\\d\\d):(\\d\\d):(\\d\\d)";
const MONTH = `(${MONTHS.join("|")})`;
/** `Sun, 06 Nov 1994 08:49:37 GMT` */
const IMF_FIXDATE = new RegExp(`^(?:${DAYS.join("|")}), (\\d\\d) ${MONTH} (\\d{4}) ${TIME} GMT$`);
/** `Sunday, 06-Nov-94 08:49:37 GMT` */
const RFC850_DATE = new RegExp(
  `^(?:${LONG_DAYS.join("|")}), (\\d\\d)-${MONTH}-(\\d\\d) ${TIME} GMT$`,
);
/** `Sun Nov  6 08:49:37 1994` */
const ASCTIME_DATE = new RegExp(`^(?:${DAYS.join("|")}) ${MONTH} ([ \\d]\\d) ${TIME} (\\d{4})$`);

/**
 * Parses an HTTP-date (RFC 9110 §5.6.7): IMF-fixdate, or the obsolete
 * RFC 850 and asctime forms. Case-sensitive, as the grammar is. Returns
 * milliseconds since the epoch, or `undefined` when the value is not a
 * valid HTTP-date.
 */
export function parseHttpDate(value: string, now = Date.now()): number | undefined {
  const text = value.trim();
  let day: string, month: string, year: number, h: string, m: string, s: string;
  let match = IMF_FIXDATE.exec(text);
  if (match !== null) {
    [, day, month, , h, m, s] = match;
    year = Number(match[3]);
  } else if ((match = RFC850_DATE.exec(text)) !== null) {
    [, day, month, , h, m, s] = match;
    // §5.6.7: a two-digit year more than 50 years in the future is in the past century.
    const thisYear = new Date(now).getUTCFullYear();
    year = Math.floor(thisYear / 100) * 100 + Number(match[3]);
    if (year > thisYear + 50) year -= 100;
  } else if ((match = ASCTIME_DATE.exec(text)) !== null) {
    [, month, day, h, m, s] = match;
    year = Number(match[6]);
  } else {
    return undefined;
  }
  const dayOfMonth = Number(day.trim());
  const monthIndex = MONTHS.indexOf(month);
  const hours = Number(h);
  const minutes = Number(m);
  const secs = Number(s);
  if (hours > 23 || minutes > 59 || secs > 60) return undefined;
  const date = new Date(Date.UTC(year, monthIndex, dayOfMonth, hours, minutes, Math.min(secs, 59)));
  date.setUTCFullYear(year); // Date.UTC maps years 0-99 to 1900-1999
  if (date.getUTCDate() !== dayOfMonth || date.getUTCMonth() !== monthIndex) return undefined;
  return date.getTime();
}
