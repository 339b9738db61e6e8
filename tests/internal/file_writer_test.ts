/**
 * FileSystemStore's writer with a scripted file and lock: a commit that
 * fails at any step (a failed fsync included) always drops the fill's
 * lock, so the image is never held by a fill that is over. Deno-only: it
 * imports src/.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { FileWriter, type PositionalFile, type WriterLock } from "../../src/_fs/writer.ts";

function fakeFile(faults: { sync?: boolean } = {}): PositionalFile & { closed: number } {
  return {
    closed: 0,
    write: (_buffer, _offset, length) => Promise.resolve({ bytesWritten: length }),
    read: () => Promise.resolve({ bytesRead: 0 }),
    sync: () =>
      faults.sync
        ? Promise.reject(Object.assign(new Error("EIO: fsync failed"), { code: "EIO" }))
        : Promise.resolve(),
    datasync: () => Promise.resolve(),
    close() {
      this.closed++;
      return Promise.resolve();
    },
  };
}

function fakeLock(faults: { commit?: boolean } = {}) {
  const calls: string[] = [];
  const lock: WriterLock = {
    commit: (info) => {
      calls.push("commit");
      if (faults.commit) return Promise.reject(new Error("rename failed"));
      return Promise.resolve({
        id: "img",
        ...info,
        created: 0,
        lastAccessed: 0,
        hits: 0,
      });
    },
    abort: (reason) => {
      calls.push(`abort:${reason}`);
      return Promise.resolve();
    },
    owns: () => Promise.resolve(true),
    deleted: () => Promise.resolve(false),
    heartbeat: () => Promise.resolve(),
  };
  return { lock, calls };
}

const INFO = { size: 3, digest: { algorithm: "md5" as const, value: "0".repeat(32) }, headers: {} };

describe("FileSystemStore's writer", () => {
  it("drops its lock when the commit's fsync fails, and rejects", async () => {
    const file = fakeFile({ sync: true });
    const { lock, calls } = fakeLock();
    const writer = new FileWriter("img", "/nonexistent", file, fakeFile(), lock);
    await writer.write(new Uint8Array(3));
    await assert.rejects(writer.commit(INFO), /fsync failed/);
    assert.deepEqual(calls, ["abort:discard"]);
    assert.equal(file.closed, 1);
    await writer.close();
  });

  it("drops its lock when moving the data into place fails", async () => {
    const { lock, calls } = fakeLock({ commit: true });
    const writer = new FileWriter("img", "/nonexistent", fakeFile(), fakeFile(), lock);
    await writer.write(new Uint8Array(3));
    await assert.rejects(writer.commit(INFO), /rename failed/);
    assert.deepEqual(calls, ["commit", "abort:discard"]);
    await writer.close();
  });

  it("drops its lock when asked to commit a size it did not write", async () => {
    const { lock, calls } = fakeLock();
    const writer = new FileWriter("img", "/nonexistent", fakeFile(), fakeFile(), lock);
    await writer.write(new Uint8Array(2));
    await assert.rejects(writer.commit(INFO), /wrote 2 bytes, not 3/);
    assert.deepEqual(calls, ["abort:discard"]);
    await writer.close();
  });

  it("commits once, then refuses a second settlement", async () => {
    const { lock, calls } = fakeLock();
    const writer = new FileWriter("img", "/nonexistent", fakeFile(), fakeFile(), lock);
    await writer.write(new Uint8Array(3));
    assert.equal((await writer.commit(INFO)).size, 3);
    await assert.rejects(writer.commit(INFO), /already committed or aborted/);
    await writer.abort("discard"); // a no-op once settled
    assert.deepEqual(calls, ["commit"]);
    await writer.close();
  });
});
