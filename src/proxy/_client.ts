/**
 * Who the client is: the peer's address, or, behind trusted proxies (a
 * load balancer, an ingress), the address they put in `X-Forwarded-For`.
 * A header anyone can send is believed only from a trusted peer: otherwise
 * a client could log in any address it likes.
 *
 * @module
 */

/** An address range: the address bytes and how many leading bits must match. */
interface Range {
  bytes: Uint8Array;
  bits: number;
}

/** The 4 or 16 bytes of an IPv4 or IPv6 address (an IPv4-mapped IPv6 one as IPv4), or `undefined`. */
export function addressBytes(text: string): Uint8Array | undefined {
  let address = text.trim();
  if (address.startsWith("[") && address.endsWith("]")) address = address.slice(1, -1);
  const zone = address.indexOf("%");
  if (zone !== -1) address = address.slice(0, zone);
  const v4 = ipv4(address);
  if (v4 !== undefined) return v4;
  const v6 = ipv6(address);
  if (v6 === undefined) return undefined;
  // ::ffff:a.b.c.d is an IPv4 client on a dual-stack socket (Node reports them so).
  const mapped = v6.subarray(0, 10).every((byte) => byte === 0) && v6[10] === 0xff &&
    v6[11] === 0xff;
  return mapped ? v6.slice(12) : v6;
}

function ipv4(text: string): Uint8Array | undefined {
  const parts = text.split(".");
  if (parts.length !== 4) return undefined;
  const bytes = new Uint8Array(4);
  for (let i = 0; i < 4; i++) {
    if (!/^\d{1,3}$/.test(parts[i]) || Number(parts[i]) > 255) return undefined;
    bytes[i] = Number(parts[i]);
  }
  return bytes;
}

function ipv6(text: string): Uint8Array | undefined {
  if (!/^[0-9a-fA-F:.]+$/.test(text) || !text.includes(":")) return undefined;
  const halves = text.split("::");
  if (halves.length > 2) return undefined;
  const groups = (half: string): number[] | undefined => {
    if (half === "") return [];
    const out: number[] = [];
    const parts = half.split(":");
    for (let i = 0; i < parts.length; i++) {
      const part = parts[i];
      if (i === parts.length - 1 && part.includes(".")) {
        const v4 = ipv4(part);
        if (v4 === undefined) return undefined;
        out.push((v4[0] << 8) | v4[1], (v4[2] << 8) | v4[3]);
      } else if (/^[0-9a-fA-F]{1,4}$/.test(part)) {
        out.push(parseInt(part, 16));
      } else {
        return undefined;
      }
    }
    return out;
  };
  const head = groups(halves[0]);
  const tail = halves.length === 2 ? groups(halves[1]) : [];
  if (head === undefined || tail === undefined) return undefined;
  const missing = 8 - head.length - tail.length;
  if (halves.length === 2 ? missing < 1 : missing !== 0) return undefined;
  const all = [...head, ...new Array(halves.length === 2 ? missing : 0).fill(0), ...tail];
  const bytes = new Uint8Array(16);
  all.forEach((group, i) => {
    bytes[2 * i] = group >> 8;
    bytes[2 * i + 1] = group & 0xff;
  });
  return bytes;
}

function parseRange(text: string): Range | undefined {
  const [address, prefix, extra] = text.trim().split("/");
  if (extra !== undefined) return undefined;
  const bytes = addressBytes(address);
  if (bytes === undefined) return undefined;
  const max = bytes.length * 8;
  if (prefix === undefined) return { bytes, bits: max };
  if (!/^\d{1,3}$/.test(prefix)) return undefined;
  let bits = Number(prefix);
  // An IPv4-mapped range (::ffff:10.0.0.0/104) is compared as IPv4.
  if (bytes.length === 4 && address.includes(":")) bits -= 96;
  if (bits < 0 || bits > max) return undefined;
  return { bytes, bits };
}

function inRange(address: Uint8Array, range: Range): boolean {
  if (address.length !== range.bytes.length) return false;
  let bits = range.bits;
  for (let i = 0; i < address.length && bits > 0; i++, bits -= 8) {
    const mask = bits >= 8 ? 0xff : (0xff << (8 - bits)) & 0xff;
    if ((address[i] & mask) !== (range.bytes[i] & mask)) return false;
  }
  return true;
}

/**
 * A test of "is this peer a trusted proxy", from addresses and CIDR ranges
 * (`10.0.0.0/8`, `192.168.1.7`, `fd00::/8`).
 *
 * @throws {TypeError} When an entry is not an address or a range; the
 *   message names it, prefixed with `owner`.
 */
export function trustedProxies(
  owner: string,
  entries: readonly string[],
): (peer: string) => boolean {
  if (!Array.isArray(entries)) {
    throw new TypeError(
      `Cannot create ${owner}: "trustedProxies" must be an array of addresses or CIDR ranges, received ${typeof entries}`,
    );
  }
  const ranges = entries.map((entry) => {
    const range = typeof entry === "string" ? parseRange(entry) : undefined;
    if (range === undefined) {
      throw new TypeError(
        `Cannot create ${owner}: "trustedProxies" must hold addresses or CIDR ranges like 10.0.0.0/8, received ${
          JSON.stringify(entry)
        }`,
      );
    }
    return range;
  });
  return (peer) => {
    const bytes = addressBytes(peer);
    return bytes !== undefined && ranges.some((range) => inRange(bytes, range));
  };
}

/**
 * The client's address: `peer` itself, unless `peer` is trusted; then the
 * rightmost address of `X-Forwarded-For` that is not a trusted proxy (the
 * one the nearest untrusted hop gave), as nginx's `real_ip_recursive` does.
 */
export function clientBehind(
  peer: string | undefined,
  forwardedFor: string | null,
  trusted: ((peer: string) => boolean) | undefined,
): string | undefined {
  if (peer === undefined || trusted === undefined || !trusted(peer) || forwardedFor === null) {
    return peer;
  }
  const hops = forwardedFor.split(",").map((hop) => hop.trim()).filter((hop) => hop !== "");
  for (let i = hops.length - 1; i >= 0; i--) {
    if (addressBytes(hops[i]) === undefined) return peer; // a forged or garbled list
    if (!trusted(hops[i])) return hops[i];
  }
  return hops[0] ?? peer;
}
