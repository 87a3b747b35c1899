/**
 * Format version 2: chunk objects written once under generation keys, the seal a writer term
 * starts from, late writes of an ended term, referenced objects that are missing, retried
 * creates, and the in-place upgrade of a version 1 volume. On memory and on S3.
 */

import { describe, expect, it } from "vitest";
import { openVolume, upgradeVolume } from "../../src/lifecycle/volume-lifecycle.js";
import { resolveChunkMap } from "../../src/volume/chunk-map.js";
import {
  StoreError,
  listAll,
  type ObjectStore,
  type PutOptions,
  type PutResult,
} from "../../src/store/object-store.js";
import { FaultStore } from "../../src/store/fault-store.js";
import { StoreLayer } from "../../src/store/store-layer.js";
import {
  chunkMetadata,
  chunkPrefix,
  chunkRef,
  generation,
  legacyChunkKey,
  sealPrefix,
} from "../../src/volume/format.js";
import { requireS3 } from "../support/s3-target.js";
import {
  chunkObjectKeys,
  currentChunkKey,
  memoryBackend,
  newTestVolume,
  pattern,
  s3Backend,
  type Backend,
  type TestVolume,
  writeVersion1Volume,
} from "../support/volumes.js";

const CHUNK = 64 * 1024;
const SPC = CHUNK / 512;
const PARAMS = { sizeBytes: 8 * CHUNK, chunkSizeBytes: CHUNK };

const s3 = await requireS3("format version 2 on S3");
const backends: Backend[] = [memoryBackend, ...(s3 ? [s3Backend(s3)] : [])];

async function readChunk(device: Awaited<ReturnType<TestVolume["open"]>>, index: number) {
  const out = new Uint8Array(CHUNK);
  const result = await device.read(index * SPC, [out]);
  return { result, out };
}

async function listKeys(store: ObjectStore, prefix: string): Promise<string[]> {
  const keys: string[] = [];
  for await (const entry of listAll(store, prefix)) keys.push(entry.key);
  return keys;
}

/** Answers the first PUT of a key containing `needle` with a transient error after it landed. */
class LostAnswerStore extends StoreLayer {
  constructor(
    inner: ObjectStore,
    readonly needle: string,
  ) {
    super(inner);
  }
  lost = 0;
  override async put(key: string, body: Uint8Array, options?: PutOptions): Promise<PutResult> {
    const result = await this.inner.put(key, body, options);
    if (key.includes(this.needle) && this.lost === 0) {
      this.lost++;
      throw new StoreError("Transient", `PUT ${key}: connection reset (after it landed)`);
    }
    return result;
  }
}

describe.each(backends)("format version 2 on $name", (backend) => {
  it("writes every upload under a new generation key, and deletes the superseded one", async () => {
    const volume = await newTestVolume(backend, "gens", PARAMS);
    const stack = volume.stack();
    const device = await volume.open({}, stack);
    expect((await device.write(0, [pattern(1, 0, SPC)], { fua: true })).ok).toBe(true);
    const first = await chunkObjectKeys(stack.store, stack.prefix, 0);
    expect((await device.write(0, [pattern(2, 0, SPC)], { fua: true })).ok).toBe(true);
    expect((await device.disconnect()).ok).toBe(true);
    const second = await chunkObjectKeys(stack.store, stack.prefix, 0);
    expect(first).toHaveLength(1);
    expect(second).toHaveLength(1);
    // Epoch 1 (the first lease), sequence numbers 0 and 1: never the same key twice.
    expect(first[0]).toMatch(/0000000000000000\.00000001000000000000$/);
    expect(second[0]).toMatch(/0000000000000000\.00000001000000000001$/);
  });

  it("never makes visible a write of an ended term that lands after the next term sealed", async () => {
    const volume = await newTestVolume(backend, "late", PARAMS);
    const a = await volume.open();
    expect((await a.write(0, [pattern(1, 0, SPC)])).ok).toBe(true);
    expect((await a.disconnect()).ok).toBe(true);
    const superblock = a.superblock;
    const stack = volume.stack(); // not fenced by any lease: it plays the S3 server

    const b = await volume.open();
    // Writes term 1 sent in time, executed by the server only now: a rewrite of chunk 0 and a
    // first write of chunk 3, both of a generation above anything term 1 wrote before.
    for (const [index, seed] of [
      [0, 8],
      [3, 9],
    ] as const) {
      const ref = chunkRef(stack.prefix, superblock.volumeId, index, generation(1, 1000 + index));
      const data = pattern(seed, index * SPC, SPC);
      await stack.store.put(ref.key, data, { metadata: chunkMetadata(superblock, ref, data) });
    }
    const check = async (device: Awaited<ReturnType<TestVolume["open"]>>) => {
      const zero = await readChunk(device, 0);
      const three = await readChunk(device, 3);
      expect(zero.result.ok && three.result.ok).toBe(true);
      expect(Buffer.from(zero.out).equals(Buffer.from(pattern(1, 0, SPC)))).toBe(true);
      expect(three.out.every((byte) => byte === 0)).toBe(true);
    };
    await check(b);
    expect((await b.disconnect()).ok).toBe(true);
    const readOnly = await volume.open({ readOnly: true });
    await check(readOnly);
    await readOnly.disconnect();
    // The next writer's start deletes them as garbage.
    const c = await volume.open();
    await check(c);
    expect(await chunkObjectKeys(stack.store, stack.prefix, 3)).toEqual([]);
    expect(await chunkObjectKeys(stack.store, stack.prefix, 0)).toHaveLength(1);
    expect(await listKeys(stack.store, sealPrefix(stack.prefix))).toHaveLength(1);
    await c.disconnect();
  });

  it("tombstones a chunk zeroed after an upload that landed though it was reported failed", async () => {
    // The PUT lands, but its answer is lost and no retry is left: the writer must assume that
    // object may exist, so that zeros written later are not hidden by it at the next open.
    let loseAnswers = false;
    class AnswerLost extends StoreLayer {
      override async put(key: string, body: Uint8Array, options?: PutOptions): Promise<PutResult> {
        const result = await super.put(key, body, options);
        if (loseAnswers && key.includes("chunks/")) {
          loseAnswers = false;
          throw new StoreError("Permanent", `lost the answer to PUT ${key}`);
        }
        return result;
      }
    }
    const volume = await newTestVolume(backend, "landed", PARAMS);
    const device = await volume.open(
      { writebackDelayMs: 60_000 },
      volume.stack({ wrap: (s) => new AnswerLost(s) }),
    );
    expect((await device.write(0, [pattern(7, 0, SPC)])).ok).toBe(true);
    loseAnswers = true;
    expect((await device.flush()).ok).toBe(false);
    expect((await device.discard(0, SPC)).ok).toBe(true);
    expect((await device.flush()).ok).toBe(true);
    expect((await device.disconnect()).ok).toBe(true);
    const reader = await volume.open({ readOnly: true });
    const out = new Uint8Array(CHUNK);
    expect((await reader.read(0, [out])).ok).toBe(true);
    await reader.disconnect();
    expect(out.every((b) => b === 0)).toBe(true);
  });

  it("gives a read-only open that races a new writer term the current map, not the old seal's", async () => {
    const volume = await newTestVolume(backend, "race", PARAMS);
    const first = await volume.open();
    expect((await first.write(0, [pattern(8, 0, SPC)])).ok).toBe(true);
    expect((await first.disconnect()).ok).toBe(true);
    // The next term's seal names chunk 0's object; a snapshot pins it; then chunk 0 is zeroed.
    const second = await volume.open();
    expect((await second.snapshot("x")).ok).toBe(true);
    expect((await second.discard(0, SPC)).ok).toBe(true);
    expect((await second.disconnect()).ok).toBe(true);
    // A third term starts (sealing, deleting the tombstone and the old seal) between the
    // reader's LIST of the seals and its LIST of the chunks.
    let third: Awaited<ReturnType<TestVolume["open"]>> | undefined;
    class StartTermBeforeChunkList extends StoreLayer {
      override async listPage(prefix: string, continuation?: string) {
        if (third === undefined && prefix.endsWith("chunks/")) third = await volume.open();
        return super.listPage(prefix, continuation);
      }
    }
    const reader = await volume.open(
      { readOnly: true },
      volume.stack({ wrap: (s) => new StartTermBeforeChunkList(s) }),
    );
    const out = new Uint8Array(CHUNK);
    expect((await reader.read(0, [out])).ok).toBe(true);
    await reader.disconnect();
    await third?.disconnect();
    expect(out.every((b) => b === 0)).toBe(true);
  });

  it("reports a referenced object that is missing as an I/O error naming it, never zeros", async () => {
    const volume = await newTestVolume(backend, "missing", PARAMS);
    const stack = volume.stack();
    const writer = await volume.open();
    expect((await writer.write(0, [pattern(3, 0, 2 * SPC)])).ok).toBe(true);
    expect((await writer.disconnect()).ok).toBe(true);
    // The next term's seal names the object (before that only the LIST does, which cannot tell
    // a lost object from one never written: see docs/format.md).
    await (await volume.open()).disconnect();
    const key = await currentChunkKey(stack.store, stack.prefix, 1);
    await stack.store.delete(key);
    for (const readOnly of [true, false]) {
      const device = await volume.open({ readOnly });
      const { result } = await readChunk(device, 1);
      expect(result.ok).toBe(false);
      if (!result.ok && result.error.kind === "Io") {
        expect(result.error.cause.message).toContain(`chunk ${key} is missing`);
      }
      expect((await readChunk(device, 0)).result.ok).toBe(true);
      await device.disconnect();
    }
  });

  it("recognises a retried create that had landed, of the superblock and of a seal", async () => {
    for (const needle of ["volume.json", "seals/"]) {
      const url = backend.newUrl(`lost-${needle.slice(0, 4)}`);
      const { openStoreStack } = await import("../../src/store/store-stack.js");
      const { createVolume } = await import("../../src/lifecycle/volume-lifecycle.js");
      let layer: LostAnswerStore | undefined;
      const stack = openStoreStack(url, {
        ...backend.stackOptions,
        retry: { baseDelayMs: 1 },
        wrap: (s) => (layer = new LostAnswerStore(s, needle)),
      });
      await createVolume(stack, PARAMS);
      const device = await openVolume(stack, { writebackDelayMs: 50 });
      expect(layer?.lost).toBe(1);
      expect((await device.write(0, [pattern(4, 0, 8)], { fua: true })).ok).toBe(true);
      await device.disconnect();
    }
  });
});

describe.each(backends)("upgrading a version 1 volume on $name", (backend) => {
  const data = new Map([
    [0, pattern(21, 0, SPC)],
    [2, pattern(22, 2 * SPC, SPC)],
  ]);

  async function version1Volume(label: string, wrap?: (s: ObjectStore) => ObjectStore) {
    const url = backend.newUrl(label);
    const { openStoreStack } = await import("../../src/store/store-stack.js");
    const stack = (w?: (s: ObjectStore) => ObjectStore) =>
      openStoreStack(url, {
        ...backend.stackOptions,
        retry: { baseDelayMs: 1, maxAttempts: 2 },
        ...(w === undefined ? {} : { wrap: w }),
      });
    const first = stack(wrap);
    await writeVersion1Volume(first.store, first.prefix, PARAMS, data);
    return { stack };
  }

  async function expectData(device: Awaited<ReturnType<typeof openVolume>>) {
    for (const [index, bytes] of data) {
      const out = new Uint8Array(CHUNK);
      expect((await device.read(index * SPC, [out])).ok).toBe(true);
      expect(Buffer.from(out).equals(Buffer.from(bytes))).toBe(true);
    }
  }

  it("opens read-only, refuses a writable open naming the upgrade, and upgrades in place", async () => {
    const { stack } = await version1Volume("v1");
    const readOnly = await openVolume(stack(), { readOnly: true });
    await expectData(readOnly);
    await readOnly.disconnect();
    await expect(openVolume(stack())).rejects.toThrow(
      /format version 1 volume, which this s3blk opens read-only; to write it, run: s3blk upgrade /,
    );

    const upgrading = stack();
    upgrading.counter.reset();
    expect(await upgradeVolume(upgrading)).toEqual({ upgraded: true, fromVersion: 1, chunks: 2 });
    // No chunk is read or copied: the lease, one seal and the superblock.
    const counts = upgrading.counter.counts();
    expect(counts.bytesOut).toBeLessThan(4096);
    expect(counts.bytesIn).toBeLessThan(4096);
    expect(await upgradeVolume(stack())).toEqual({ upgraded: false, version: 3 });

    const writer = await openVolume(stack(), { gcGraceMs: 0 });
    await expectData(writer);
    // Rewriting a version 1 chunk supersedes (and deletes) its plain key.
    expect((await writer.write(0, [pattern(23, 0, 8)], { fua: true })).ok).toBe(true);
    await writer.disconnect();
    const s = stack();
    const keys = await chunkObjectKeys(s.store, s.prefix, 0);
    expect(keys).toHaveLength(1);
    expect(keys[0]).not.toBe(legacyChunkKey(s.prefix, 0));
    expect(await chunkObjectKeys(s.store, s.prefix, 2)).toEqual([legacyChunkKey(s.prefix, 2)]);
  });

  it("survives a crash at any step of the upgrade: running it again finishes it", async () => {
    // Fail each write the upgrade makes in turn (the process lease, the claim, the seal, the
    // superblock): the volume stays a readable version 1 volume, and a second run completes it.
    for (const needle of ["s3blk-processes/", "lease.json", "seals/", "volume.json"]) {
      let fault: FaultStore | undefined;
      const { stack } = await version1Volume(`crash-${needle.slice(0, 4)}`);
      const failing = stack((s) => (fault = new FaultStore(s)));
      fault?.inject({ operations: ["put"], keyIncludes: needle, code: "Permanent" });
      await expect(upgradeVolume(failing)).rejects.toThrow(/injected fault: put/);
      const readOnly = await openVolume(stack(), { readOnly: true });
      expect(readOnly.superblock.formatVersion).toBe(1);
      await expectData(readOnly);
      await readOnly.disconnect();
      // The failed run left its lease held by this (live) process only if it took it; the
      // release in `finally` freed it, so a rerun takes it at once.
      expect(await upgradeVolume(stack())).toMatchObject({ upgraded: true });
      const after = stack();
      const map = await resolveChunkMap(after.store, after.prefix, {
        ...readOnly.superblock,
        formatVersion: 3,
      });
      expect([...map.refs.keys()].sort()).toEqual([0, 2]);
      const writer = await openVolume(after);
      await expectData(writer);
      await writer.disconnect();
      expect(await listKeys(after.store, chunkPrefix(after.prefix))).toHaveLength(2);
    }
  });
});
