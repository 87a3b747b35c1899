/**
 * Garbage collection: it leaves exactly the live objects, keeps what became garbage within the
 * grace, never deletes what a snapshot or a clone reads, and is safe beside a writer and a
 * reader. On memory and on S3.
 */

import { describe, expect, it } from "vitest";
import { listAll } from "../../src/store/object-store.js";
import { createSnapshot, deleteSnapshot } from "../../src/lifecycle/snapshot-lifecycle.js";
import { cloneVolume, gcVolume } from "../../src/lifecycle/clone-lifecycle.js";
import { openStoreStack } from "../../src/store/store-stack.js";
import {
  createVolume,
  openVolume,
  type OpenOptions,
} from "../../src/lifecycle/volume-lifecycle.js";
import { MemoryStore } from "../../src/store/memory-store.js";
import { StoreLayer } from "../../src/store/store-layer.js";
import { StoreError, type PutOptions, type PutResult } from "../../src/store/object-store.js";
import { ChunkStore } from "../../src/volume/chunk-store.js";
import { requireS3 } from "../support/s3-target.js";
import {
  memoryBackend,
  newTestVolume,
  pattern,
  readBytes,
  s3Backend,
  siblingUrl,
  stackOver,
  type Backend,
  type TestVolume,
} from "../support/volumes.js";
import type { Clock } from "../../src/util/clock.js";

const CHUNK = 64 * 1024;
const SPC = CHUNK / 512;
const CHUNKS = 8;
const PARAMS = { sizeBytes: CHUNKS * CHUNK, chunkSizeBytes: CHUNK };
const HOUR = 3_600_000;

const s3 = await requireS3("garbage collection on S3");
const backends: Backend[] = [memoryBackend, ...(s3 ? [s3Backend(s3)] : [])];

type Device = Awaited<ReturnType<TestVolume["open"]>>;

const readAll = (device: Device) => readBytes(device, CHUNKS * CHUNK);

/** Every key under the volume's prefix, but the gc clock. */
async function keysOf(volume: TestVolume): Promise<string[]> {
  const stack = volume.stack();
  const keys: string[] = [];
  for await (const entry of listAll(stack.store, `${stack.prefix}/`)) {
    if (!entry.key.endsWith("/gc/clock")) keys.push(entry.key);
  }
  return keys.sort();
}

/**
 * A volume whose chunks were rewritten three times, with two snapshots taken and deleted on the
 * way, by writers that kept all their garbage (a grace of an hour). Returns the data it must
 * read as.
 */
async function littered(backend: Backend): Promise<{ volume: TestVolume; expected: Buffer }> {
  const volume = await newTestVolume(backend, "littered", PARAMS);
  const expected = Buffer.alloc(CHUNKS * CHUNK);
  for (let round = 1; round <= 3; round++) {
    const writer = await volume.open({ gcGraceMs: HOUR });
    const data = pattern(round, 0, 6 * SPC);
    expect((await writer.write(0, [data])).ok).toBe(true);
    Buffer.from(data).copy(expected);
    if (round < 3) expect((await writer.snapshot(`s${round}`)).ok).toBe(true);
    else expect((await writer.flush()).ok).toBe(true);
    // Chunk 5 held data in this term, and now a tombstone speaks for it.
    expect((await writer.discard(5 * SPC, SPC)).ok).toBe(true);
    expected.fill(0, 5 * CHUNK, 6 * CHUNK);
    expect((await writer.disconnect()).ok).toBe(true);
  }
  await deleteSnapshot(volume.stack(), "s1");
  await deleteSnapshot(volume.stack(), "s2");
  return { volume, expected };
}

/** The keys a reader of the volume reads, plus its superblock, lease and newest seal. */
async function liveKeys(volume: TestVolume): Promise<string[]> {
  const reader = await volume.open({ readOnly: true });
  const stack = volume.stack();
  const keys = [`${stack.prefix}/volume.json`, `${stack.prefix}/lease.json`];
  for (let i = 0; i < CHUNKS; i++) {
    const key = reader.chunkObjectKey(i);
    if (key !== undefined) keys.push(key);
  }
  await reader.disconnect();
  const seals: string[] = [];
  for await (const e of listAll(stack.store, `${stack.prefix}/seals/`)) seals.push(e.key);
  keys.push(seals.sort().at(-1) ?? "no seal");
  return keys;
}

describe.each(backends)("garbage collection on $name", (backend) => {
  it("with a grace of 0, leaves exactly the live objects, and the volume reads the same", async () => {
    const { volume, expected } = await littered(backend);
    const before = await keysOf(volume);
    const dry = await gcVolume(volume.stack(), { graceMs: 0, dryRun: true });
    expect(await keysOf(volume)).toEqual(before); // a dry run deletes nothing
    const report = await gcVolume(volume.stack(), { graceMs: 0 });
    expect(report.deleted).toEqual(dry.deleted);
    expect(report.deleted.length).toBeGreaterThan(10);
    const after = await keysOf(volume);
    // What is left: the superblock, the lease, the newest seal, each chunk's object, and the
    // tombstone that keeps chunk 5 zero over the older seal.
    const live = await liveKeys(volume);
    const tombstones = after.filter((k) => k.endsWith(".zero"));
    expect(tombstones).toHaveLength(1);
    expect(after).toEqual([...live, ...tombstones].sort());
    const reader = await volume.open({ readOnly: true });
    expect((await readAll(reader)).equals(expected)).toBe(true);
    await reader.disconnect();
    // Run again: nothing left to do.
    expect((await gcVolume(volume.stack(), { graceMs: 0 })).deleted).toEqual([]);
  });

  it("keeps what became garbage within the grace, and what a snapshot names", async () => {
    const { volume } = await littered(backend);
    await createSnapshot(volume.stack(), "keep");
    const before = await keysOf(volume);
    const report = await gcVolume(volume.stack(), { graceMs: HOUR });
    expect(report.deleted).toEqual([]);
    expect(report.keptWithinGrace).toBeGreaterThan(5);
    // The deleted snapshots' records wait in the trash through the grace.
    expect(before.filter((k) => k.includes("/trash/"))).toHaveLength(2);
    expect(await keysOf(volume)).toEqual(before);
    // With no grace, the same garbage goes, and the two records in the trash.
    const now = await gcVolume(volume.stack(), { graceMs: 0 });
    expect(now.deleted).toHaveLength(report.keptWithinGrace + 2);
    const snapshot = await volume.open({ snapshot: "keep" });
    const live = await volume.open({ readOnly: true });
    expect((await readAll(snapshot)).equals(await readAll(live))).toBe(true);
    await snapshot.disconnect();
    await live.disconnect();
    expect((await keysOf(volume)).filter((k) => k.includes("/trash/"))).toEqual([]);
  });

  it("never deletes an object a clone reads, whatever the base does after", async () => {
    const base = await newTestVolume(backend, "gcbase", PARAMS);
    const w = await base.open();
    expect((await w.write(0, [pattern(1, 0, CHUNKS * SPC)])).ok).toBe(true);
    expect((await w.disconnect()).ok).toBe(true);
    await createSnapshot(base.stack(), "gold");
    const cloneUrl = siblingUrl(base.url, "gcclone");
    const cloneStack = () => openStoreStack(cloneUrl, backend.stackOptions);
    await cloneVolume(base.stack(), "gold", cloneStack());
    // The base rewrites everything and collects with no grace.
    const again = await base.open();
    expect((await again.write(0, [pattern(2, 0, CHUNKS * SPC)])).ok).toBe(true);
    expect((await again.disconnect()).ok).toBe(true);
    await gcVolume(base.stack(), { graceMs: 0 });
    await gcVolume(cloneStack(), { graceMs: 0 });
    const clone = await openVolume(cloneStack(), { readOnly: true });
    expect((await readAll(clone)).equals(pattern(1, 0, CHUNKS * SPC))).toBe(true);
    await clone.disconnect();
  });

  it("is safe beside a writer and a reader that opened before", async () => {
    const volume = await newTestVolume(backend, "beside", PARAMS);
    const first = await volume.open();
    expect((await first.write(0, [pattern(1, 0, CHUNKS * SPC)])).ok).toBe(true);
    expect((await first.disconnect()).ok).toBe(true);
    const reader = await volume.open({ readOnly: true, cacheBytes: 0 });
    const writer = await volume.open({ gcGraceMs: HOUR, writebackDelayMs: 1 });
    const expected = Buffer.from(pattern(1, 0, CHUNKS * SPC));
    let collections = 0;
    for (let round = 2; round < 12; round++) {
      const chunk = round % CHUNKS;
      const data = pattern(round, chunk * SPC, SPC);
      const writing = writer.write(chunk * SPC, [data]).then(() => writer.flush());
      // A collection with an hour's grace runs while the writer supersedes objects.
      const collecting = gcVolume(volume.stack(), { graceMs: HOUR });
      await writing;
      expect((await collecting).deleted).toEqual([]);
      collections++;
      Buffer.from(data).copy(expected, chunk * CHUNK);
      expect((await readAll(writer)).equals(expected)).toBe(true);
    }
    expect(collections).toBe(10);
    // The reader that opened before still reads its own view, whole: nothing it reads went.
    expect((await readAll(reader)).equals(pattern(1, 0, CHUNKS * SPC))).toBe(true);
    await reader.disconnect();
    expect((await writer.disconnect()).ok).toBe(true);
    const after = await volume.open({ readOnly: true });
    expect((await readAll(after)).equals(expected)).toBe(true);
    await after.disconnect();
  });
});

describe("a writer's own garbage", () => {
  it("waits out the grace from the acknowledgement, on the writer's clock, then goes at a flush", async () => {
    let nowMs = 0;
    const clock: Clock = {
      nowMs: () => nowMs,
      sleep: (ms) => new Promise((resolve) => setTimeout(resolve, Math.min(ms, 5))),
      schedule: (callback, ms) => {
        const timer = setTimeout(callback, Math.min(ms, 5));
        return () => clearTimeout(timer);
      },
    };
    const volume = await newTestVolume(memoryBackend, "grace", PARAMS);
    const writer = await volume.open({ gcGraceMs: 60_000, clock });
    const objects = async () => (await keysOf(volume)).filter((k) => k.includes("/chunks/"));
    for (const value of [1, 2, 3]) {
      expect((await writer.write(0, [pattern(value, 0, SPC)], { fua: true })).ok).toBe(true);
      expect((await writer.flush()).ok).toBe(true);
    }
    await new Promise((resolve) => setTimeout(resolve, 20));
    expect(await objects()).toHaveLength(3); // two superseded, within the grace
    nowMs += 59_999;
    expect((await writer.flush()).ok).toBe(true);
    await new Promise((resolve) => setTimeout(resolve, 20));
    expect(await objects()).toHaveLength(3);
    nowMs += 2;
    expect((await writer.flush()).ok).toBe(true);
    await new Promise((resolve) => setTimeout(resolve, 20));
    expect(await objects()).toEqual([writer.chunkObjectKey(0)]);
    expect((await writer.disconnect()).ok).toBe(true);
  });
});

/** A volume on a memory store whose clock the test sets: the store dates objects by it. */
async function onStoreClock() {
  const clock = { nowMs: Date.UTC(2026, 0, 1) };
  const store = new MemoryStore("clocked", { wallClockMs: () => clock.nowMs });
  await createVolume(stackOver(store), PARAMS);
  const open = (options: OpenOptions = {}) =>
    openVolume(stackOver(store), { lease: false, gcGraceMs: HOUR, ...options });
  const gc = (graceMs: number) => gcVolume(stackOver(store), { graceMs });
  return { store, clock, open, gc };
}

describe("garbage dated on the store's clock", () => {
  it("dates an object of an older term by what superseded it in the newest, not by the seal", async () => {
    const { clock, open, gc } = await onStoreClock();
    const first = await open();
    expect((await first.write(0, [pattern(1, 0, SPC)], { fua: true })).ok).toBe(true);
    expect((await first.disconnect()).ok).toBe(true);
    const writer = await open(); // a long term: its seal names term 1's object of chunk 0
    clock.nowMs += 2 * HOUR;
    const reader = await open({ readOnly: true, cacheBytes: 0 }); // opens two hours in
    clock.nowMs += 1000;
    expect((await writer.write(0, [pattern(2, 0, SPC)], { fua: true })).ok).toBe(true);
    clock.nowMs += 1000;
    // Term 1's object became garbage a second ago, not when the seal was written.
    await gc(HOUR);
    const out = new Uint8Array(CHUNK);
    expect((await reader.read(0, [out])).ok).toBe(true);
    expect(Buffer.from(out.subarray(0, 512)).equals(pattern(1, 0, 1))).toBe(true);
    clock.nowMs += HOUR + 60_000;
    expect((await gc(HOUR)).deleted.some((k) => k.includes("chunks/0000000000000000"))).toBe(true);
    await reader.disconnect();
    expect((await writer.disconnect()).ok).toBe(true);
  });

  it("keeps a deleted snapshot's objects through the grace from its deletion", async () => {
    const { clock, open, gc, store } = await onStoreClock();
    const writer = await open();
    expect((await writer.write(0, [pattern(1, 0, SPC)], { fua: true })).ok).toBe(true);
    expect((await writer.snapshot("old")).ok).toBe(true);
    expect((await writer.write(0, [pattern(2, 0, SPC)], { fua: true })).ok).toBe(true);
    expect((await writer.disconnect()).ok).toBe(true);
    clock.nowMs += 2 * HOUR; // long after the rewrite
    const snapshot = await openVolume(stackOver(store), { snapshot: "old", cacheBytes: 0 });
    await deleteSnapshot(stackOver(store), "old");
    clock.nowMs += 10 * 60_000;
    const kept = await gc(HOUR);
    expect(kept.deleted).toEqual([]);
    const out = new Uint8Array(CHUNK);
    expect((await snapshot.read(0, [out])).ok).toBe(true); // the export still runs
    expect(Buffer.from(out.subarray(0, 512)).equals(pattern(1, 0, 1))).toBe(true);
    await snapshot.disconnect();
    clock.nowMs += HOUR;
    const gone = await gc(HOUR);
    expect(
      gone.deleted.filter((k) => k.includes("/trash/") || k.startsWith("trash/")),
    ).toHaveLength(1);
    expect(gone.deleted.some((k) => k.includes("chunks/0000000000000000"))).toBe(true);
  });

  it("lets a writer's start delete its predecessors' garbage past the grace, and not before", async () => {
    const { clock, open, store } = await onStoreClock();
    const chunkKeys = async () => {
      const keys: string[] = [];
      for await (const e of listAll(store, "chunks/")) keys.push(e.key);
      return keys;
    };
    const first = await open();
    for (const value of [1, 2, 3]) {
      expect((await first.write(0, [pattern(value, 0, SPC)], { fua: true })).ok).toBe(true);
    }
    expect((await first.disconnect()).ok).toBe(true); // left two superseded objects
    expect(await chunkKeys()).toHaveLength(3);
    clock.nowMs += 10 * 60_000;
    await (await open()).disconnect(); // within the grace: kept
    expect(await chunkKeys()).toHaveLength(3);
    // An hour after that start: the second term's seal dropped them, more than a grace ago.
    clock.nowMs += HOUR + 60_000;
    const third = await open(); // gone at this start
    expect(await chunkKeys()).toEqual([third.chunkObjectKey(0)]);
    expect((await third.disconnect()).ok).toBe(true);
  });
});

describe("a writer beside a collector", () => {
  it("reads an upload reported failed that landed, when a collector deleted what it superseded", async () => {
    let loseAnswers = false;
    const store = new MemoryStore("landed");
    const superblock = await createVolume(stackOver(store), PARAMS);
    const layered = new (class extends StoreLayer {
      override async put(key: string, body: Uint8Array, options?: PutOptions): Promise<PutResult> {
        const result = await super.put(key, body, options);
        if (loseAnswers && key.startsWith("chunks/")) {
          loseAnswers = false;
          throw new StoreError("Permanent", `lost the answer to PUT ${key}`);
        }
        return result;
      }
    })(store);
    const chunks = await ChunkStore.open({
      store: layered,
      prefix: "",
      superblock,
      term: { writerId: "w" },
      gcGraceMs: HOUR,
    });
    const bytes = (value: number) => Buffer.from(pattern(value, 0, SPC));
    await chunks.write(0, async () => bytes(1));
    loseAnswers = true;
    await expect(chunks.write(0, async () => bytes(2))).rejects.toThrow(/lost the answer/);
    // Another process collects with no grace: the landed upload wins, the mapped one goes.
    await gcVolume(stackOver(store), { graceMs: 0 });
    const got = await chunks.read(0, 4096, 4096);
    expect(Buffer.from(got ?? []).equals(bytes(2).subarray(4096, 8192))).toBe(true);
    await chunks.drain();
  });
});
