/**
 * Byte ranges (RFC 9110 §14): parsing the `Range` header against a known
 * size, and `multipart/byteranges` bodies (§14.6) streamed part by part.
 *
 * @module
 */

/** A byte range, both ends inclusive, within a representation. */
export interface ByteRange {
  /** First byte. */
  start: number;
  /** Last byte (inclusive). */
  end: number;
}

/**
 * How many range-specs one `Range` header may hold. Past it the header is
 * ignored and the full representation is sent with `200`, as nginx
 * (`max_ranges`) and Apache (`MaxRanges`) do (RFC 9110 §14.2 lets a server
 * ignore such a header).
 */
export const MAX_RANGES = 64;

/** What a `Range` header asks of a representation of a given size. */
export type RangeRequest =
  /** Ignore the header and send the full representation (`200`). */
  | { type: "full" }
  /** No range overlaps the representation: `416`. */
  | { type: "unsatisfiable" }
  /** The satisfiable ranges, clamped, overlapping ones coalesced: `206`. */
  | { type: "ranges"; ranges: ByteRange[] };

const FULL: RangeRequest = { type: "full" };
const UNSATISFIABLE: RangeRequest = { type: "unsatisfiable" };
const SPEC = /^(\d*)-(\d*)$/;

/**
 * Evaluates a `Range` header value against a representation of `size` bytes
 * (RFC 9110 §14.1.1 and §14.2).
 *
 * - A unit other than `bytes` (case-insensitive), a syntax error, an invalid
 *   range-spec (`5-3`, `abc`) or more than `maxRanges` specs: the header is
 *   ignored (`full`).
 * - A zero-length representation ignores every range (§14.2 allows it: a
 *   `206` cannot describe an empty range).
 * - `first-` and `first-last` with `first` at or past the end, and suffix
 *   `-0`, are unsatisfiable; when no spec is satisfiable: `unsatisfiable`.
 * - A `last` past the end is clamped; a suffix longer than the
 *   representation means all of it.
 * - Ranges that overlap or touch are coalesced (sorted); otherwise the
 *   request's order is kept.
 *
 * Whitespace (SP, HTAB) is accepted around each range-spec and comma, not
 * inside a spec nor around `=`.
 */
export function parseRange(value: string, size: number, maxRanges = MAX_RANGES): RangeRequest {
  const equals = value.indexOf("=");
  if (equals === -1 || value.slice(0, equals).toLowerCase() !== "bytes") return FULL;
  if (size === 0) return FULL;
  const ranges: ByteRange[] = [];
  let count = 0;
  let from = equals + 1;
  while (from <= value.length) {
    let to = value.indexOf(",", from);
    if (to === -1) to = value.length;
    const spec = trimOws(value.slice(from, to));
    from = to + 1;
    // RFC 9110 §5.6.1.2: empty list elements are allowed and ignored.
    if (spec === "") continue;
    if (++count > maxRanges) return FULL;
    const match = SPEC.exec(spec);
    if (match === null) return FULL;
    const [, first, last] = match;
    if (first === "") {
      if (last === "") return FULL;
      const suffix = Number(last);
      if (suffix === 0) continue;
      ranges.push({ start: Math.max(0, size - suffix), end: size - 1 });
      continue;
    }
    const start = Number(first);
    const end = last === "" ? Infinity : Number(last);
    if (end < start) return FULL;
    if (start >= size) continue;
    ranges.push({ start, end: Math.min(end, size - 1) });
  }
  if (count === 0) return FULL;
  if (ranges.length === 0) return UNSATISFIABLE;
  return { type: "ranges", ranges: coalesce(ranges) };
}

function trimOws(text: string): string {
  let start = 0;
  let end = text.length;
  while (start < end && (text[start] === " " || text[start] === "\t")) start++;
  while (end > start && (text[end - 1] === " " || text[end - 1] === "\t")) end--;
  return text.slice(start, end);
}

/**
 * Merges ranges that overlap or touch (RFC 9110 §15.3.7.2 lets a server
 * coalesce them, whatever their order); keeps the request's order when
 * nothing merges.
 */
export function coalesce(ranges: ByteRange[]): ByteRange[] {
  if (ranges.length < 2) return ranges;
  const sorted = [...ranges].sort((a, b) => a.start - b.start);
  const merged: ByteRange[] = [{ ...sorted[0] }];
  for (let i = 1; i < sorted.length; i++) {
    const last = merged[merged.length - 1];
    const range = sorted[i];
    if (range.start <= last.end + 1) last.end = Math.max(last.end, range.end);
    else merged.push({ ...range });
  }
  return merged.length === ranges.length ? ranges : merged;
}

/** `bytes first-last/size`, the `Content-Range` of a part (RFC 9110 §14.4). */
export function contentRange(range: ByteRange, size: number): string {
  return `bytes ${range.start}-${range.end}/${size}`;
}

/** The byte count of a range. */
export function rangeLength(range: ByteRange): number {
  return range.end - range.start + 1;
}

/** The framing of a `multipart/byteranges` body, computed before any byte is read. */
export interface MultipartLayout {
  /** The boundary, also in the response's `Content-Type`. */
  boundary: string;
  /** The parts, in order. */
  parts: { range: ByteRange; head: Uint8Array }[];
  /** The closing delimiter. */
  tail: Uint8Array;
  /** Exact length of the whole body, for `Content-Length`. */
  length: number;
}

/** ASCII/Latin-1 bytes of a header text (header values are ByteStrings). */
function latin1(text: string): Uint8Array {
  const out = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) out[i] = text.charCodeAt(i) & 0xff;
  return out;
}

/** A fresh boundary: 24 random hex digits behind a fixed prefix. */
export function newBoundary(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  return "hono-image-cache-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * The layout of a `multipart/byteranges` body (RFC 9110 §14.6): each part
 * has its own `Content-Type` and `Content-Range`; the CRLF before each
 * delimiter belongs to the delimiter.
 */
export function multipartLayout(
  ranges: ByteRange[],
  size: number,
  contentType: string,
  boundary = newBoundary(),
): MultipartLayout {
  let length = 0;
  const parts = ranges.map((range, i) => {
    const head = latin1(
      `${i === 0 ? "" : "\r\n"}--${boundary}\r\nContent-Type: ${contentType}\r\n` +
        `Content-Range: ${contentRange(range, size)}\r\n\r\n`,
    );
    length += head.byteLength + rangeLength(range);
    return { range, head };
  });
  const tail = latin1(`\r\n--${boundary}--\r\n`);
  length += tail.byteLength;
  return { boundary, parts, tail, length };
}

/** Opens the bytes `start` to `end` (inclusive) of the representation. */
export type OpenRange = (
  start: number,
  end: number,
) => Promise<ReadableStream<Uint8Array> | Blob>;

function streamOf(body: ReadableStream<Uint8Array> | Blob): ReadableStream<Uint8Array> {
  return body instanceof Blob ? body.stream() : body;
}

/**
 * A `multipart/byteranges` body that opens one part at a time (never more
 * than one open file, nothing buffered beyond a chunk). `first` is the
 * first part, already opened by the caller so that a store fault surfaces
 * before any header is sent. A part that ends short or long errors the
 * stream, so the client sees a cut connection, never a clean wrong body.
 * `onEnd` is called once, when the body ends, fails or is cancelled.
 */
export function multipartBody(
  layout: MultipartLayout,
  open: OpenRange,
  first: ReadableStream<Uint8Array> | Blob,
  onEnd?: () => void,
): ReadableStream<Uint8Array> {
  let index = 0;
  let pending: ReadableStream<Uint8Array> | Blob | undefined = first;
  let reader: ReadableStreamDefaultReader<Uint8Array> | undefined;
  let left = 0;
  let ended = false;
  const end = () => {
    if (ended) return;
    ended = true;
    onEnd?.();
  };
  const release = (reason?: unknown) => {
    reader?.cancel(reason).catch(() => {});
    reader = undefined;
    if (pending !== undefined) streamOf(pending).cancel(reason).catch(() => {});
    pending = undefined;
    end();
  };
  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      try {
        for (;;) {
          if (index === layout.parts.length) {
            controller.enqueue(layout.tail);
            controller.close();
            end();
            return;
          }
          const part = layout.parts[index];
          if (reader === undefined) {
            const body = pending ?? await open(part.range.start, part.range.end);
            pending = undefined;
            reader = streamOf(body).getReader();
            left = rangeLength(part.range);
            controller.enqueue(part.head);
            return;
          }
          const { done, value } = await reader.read();
          if (done) {
            if (left !== 0) throw new Error(`Part ${index} of a multipart body ended early`);
            reader = undefined;
            index++;
            continue;
          }
          if (value.byteLength === 0) continue;
          if (value.byteLength > left) throw new Error(`Part ${index} of a multipart body overran`);
          left -= value.byteLength;
          controller.enqueue(value);
          return;
        }
      } catch (error) {
        release(error);
        controller.error(error);
      }
    },
    cancel(reason) {
      release(reason);
    },
  }, { highWaterMark: 0 });
}
