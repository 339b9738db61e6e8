/**
 * Who the client is behind trusted proxies: addresses and CIDR ranges, IPv4,
 * IPv6 and IPv4-mapped IPv6, and `X-Forwarded-For` read from the right.
 * Deno-only: it imports a private module.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { addressBytes, clientBehind, trustedProxies } from "../../src/proxy/_client.ts";

describe("trusted proxies", () => {
  it("parses IPv4, IPv6 and IPv4-mapped IPv6 addresses, and nothing else", () => {
    assert.deepEqual([...addressBytes("10.1.2.3")!], [10, 1, 2, 3]);
    assert.deepEqual([...addressBytes("::ffff:10.1.2.3")!], [10, 1, 2, 3]);
    assert.equal(addressBytes("fd00::1")?.length, 16);
    assert.equal(addressBytes("[::1]")?.[15], 1);
    for (const bad of ["10.1.2", "10.1.2.256", "1::2::3", "unknown", "", "fd00::g"]) {
      assert.equal(addressBytes(bad), undefined, bad);
    }
  });

  it("matches addresses against addresses and CIDR ranges", () => {
    const trusted = trustedProxies("test", ["10.0.0.0/8", "192.168.1.7", "fd00::/8"]);
    assert.equal(trusted("10.200.3.4"), true);
    assert.equal(trusted("::ffff:10.200.3.4"), true, "a dual-stack socket's IPv4 client");
    assert.equal(trusted("11.0.0.1"), false);
    assert.equal(trusted("192.168.1.7"), true);
    assert.equal(trusted("192.168.1.8"), false);
    assert.equal(trusted("fd12::5"), true);
    assert.equal(trusted("fe80::1"), false);
    assert.throws(() => trustedProxies("test", ["10.0.0.0/33"]), TypeError);
    assert.throws(() => trustedProxies("test", ["example.com"]), /CIDR ranges/);
  });

  it("takes the client from X-Forwarded-For only from a trusted peer, rightmost untrusted first", () => {
    const trusted = trustedProxies("test", ["10.0.0.0/8"]);
    const list = "203.0.113.9, 198.51.100.4, 10.1.1.1";
    assert.equal(clientBehind("10.0.0.2", list, trusted), "198.51.100.4");
    assert.equal(clientBehind("203.0.113.50", list, trusted), "203.0.113.50", "an untrusted peer");
    assert.equal(clientBehind("10.0.0.2", null, trusted), "10.0.0.2");
    assert.equal(
      clientBehind("10.0.0.2", "10.9.9.9", trusted),
      "10.9.9.9",
      "all trusted: the first",
    );
    assert.equal(clientBehind("10.0.0.2", "junk, 10.1.1.1", trusted), "10.0.0.2", "garbled");
    assert.equal(clientBehind("10.0.0.2", list, undefined), "10.0.0.2", "no trusted proxies");
  });
});
