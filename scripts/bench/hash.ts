/**
 * The hashing ceiling of the miss path on one runtime (Deno, Bun, Node):
 * `node:crypto` MD5 and SHA-256 over `<MiB>` of in-memory data, fed in
 * 64 KiB chunks as a fetch body arrives. Started by `scripts/bench/bench.ts`.
 *
 * Usage: `<runtime> scripts/bench/hash.ts <MiB>`; prints one JSON line
 * `{"md5": MiB/s, "sha256": MiB/s, "md5CpuPerGiB": s, "sha256CpuPerGiB": s}`:
 * the speed of one core, and the CPU time (user + system) the hash alone
 * costs per GiB, the part of a fill's CPU that no server can avoid.
 *
 * @module
 */
import { createHash } from "node:crypto";
import process from "node:process";

const mib = Number(process.argv[2] ?? "1024");
if (!Number.isFinite(mib) || mib <= 0) {
  throw new RangeError(`Cannot hash: size must be a positive number of MiB, received ${mib}`);
}
const CHUNK = 64 * 1024;
// 64 MiB of varied data, so the input does not sit in a CPU cache.
const source = new Uint8Array(64 * 2 ** 20);
for (let at = 0; at < source.length; at += 65536) {
  crypto.getRandomValues(source.subarray(at, at + 65536));
}

/** Hashes `mib` MiB; returns MiB/s and the CPU seconds it took per GiB. */
function measure(algorithm: string, mib: number): { speed: number; cpuPerGiB: number } {
  const hash = createHash(algorithm);
  const total = mib * 2 ** 20;
  const cpu = process.cpuUsage();
  const start = performance.now();
  for (let done = 0; done < total; done += CHUNK) {
    const at = done % source.length;
    hash.update(source.subarray(at, at + CHUNK));
  }
  hash.digest("hex");
  const seconds = (performance.now() - start) / 1000;
  const used = process.cpuUsage(cpu);
  return { speed: mib / seconds, cpuPerGiB: (used.user + used.system) / 1e6 / (mib / 1024) };
}

measure("md5", 64); // Warm-up.
measure("sha256", 64);
const md5 = measure("md5", mib);
const sha256 = measure("sha256", mib);
console.log(JSON.stringify({
  md5: md5.speed,
  sha256: sha256.speed,
  md5CpuPerGiB: md5.cpuPerGiB,
  sha256CpuPerGiB: sha256.cpuPerGiB,
}));
