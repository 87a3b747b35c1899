/**
 * Request accounting: what the cache promises to cost in S3 requests, counted on the real
 * store (every attempt counts). Runs on memory and on S3.
 *
 * Format version 2 changed two figures, on purpose: a rewrite of a chunk that held data
 * supersedes its object, which is deleted afterwards in one batched DeleteObjects per flush (up
 * to 1000 keys), never per chunk; and every writable open writes its term's seal once (and
 * deletes the previous seal), never per flush.
 */

import { describe, expect, it } from "vitest";
import { requireS3 } from "../support/s3-target.js";
import {
  memoryBackend,
  newFilledVolume,
  newTestVolume,
  pattern,
  s3Backend,
  type Backend,
} from "../support/volumes.js";

const CHUNK = 256 * 1024;
const CHUNKS = 12;
const PARAMS = { sizeBytes: CHUNKS * CHUNK, chunkSizeBytes: CHUNK };

const s3 = await requireS3("request accounting on S3");
const backends: Backend[] = [memoryBackend, ...(s3 ? [s3Backend(s3)] : [])];

describe.each(backends)("request accounting on $name", (backend) => {
  it("writes N whole chunks sequentially for exactly N PUTs and no GET", async () => {
    const volume = await newTestVolume(backend, "seq", PARAMS);
    const stack = volume.stack();
    const device = await volume.open({}, stack);
    stack.counter.reset();
    const n = 8;
    // 64 KiB writes, in order, as a guest's sequential writer would send them.
    for (let sector = 0; sector < (n * CHUNK) / 512; sector += 128) {
      expect((await device.write(sector, [pattern(sector + 1, sector, 128)])).ok).toBe(true);
    }
    expect((await device.flush()).ok).toBe(true);
    const counts = stack.counter.counts();
    expect(counts.puts).toBe(n);
    expect(counts.gets).toBe(0);
    expect(counts.bytesOut).toBe(n * CHUNK);
    await device.disconnect();
  });

  it("rewrites one 4 KiB block 1000 times for one upload", async () => {
    const volume = await newTestVolume(backend, "rewrite", PARAMS);
    const stack = volume.stack();
    // Write-back would otherwise upload after 50 ms; the claim is about coalescing.
    const device = await volume.open({ writebackDelayMs: 60_000 }, stack);
    stack.counter.reset();
    for (let i = 0; i < 1000; i++) {
      expect((await device.write(24, [pattern(i + 1, 24, 8)])).ok).toBe(true);
    }
    expect((await device.flush()).ok).toBe(true);
    const counts = stack.counter.counts();
    expect(counts.puts).toBe(1);
    // The chunk never had an object, so the upload's read-modify-write needs no GET.
    expect(counts.gets).toBe(0);
    await device.disconnect();
    const check = await volume.open({ readOnly: true });
    const out = new Uint8Array(8 * 512);
    expect((await check.read(24, [out])).ok).toBe(true);
    expect(Buffer.from(out).equals(Buffer.from(pattern(1000, 24, 8)))).toBe(true);
    await check.disconnect();
  });

  it("reads a never-written volume with no GET at all", async () => {
    const volume = await newTestVolume(backend, "thin", PARAMS);
    const stack = volume.stack();
    const device = await volume.open({}, stack);
    stack.counter.reset();
    const out = new Uint8Array(CHUNK);
    for (let i = 0; i < CHUNKS * 2; i++) {
      expect((await device.read((i % CHUNKS) * (CHUNK / 512), [out])).ok).toBe(true);
    }
    expect(out.every((b) => b === 0)).toBe(true);
    expect(stack.counter.counts().gets).toBe(0);
    await device.disconnect();
  });

  it("fetches a partly written chunk once, at upload, and a cached chunk never again", async () => {
    const volume = await newFilledVolume(backend, "rmw", PARAMS, 1, CHUNK / 512);

    const stack = volume.stack();
    const device = await volume.open({ writebackDelayMs: 60_000 }, stack);
    stack.counter.reset();
    expect((await device.write(8, [pattern(2, 8, 8)])).ok).toBe(true);
    expect(stack.counter.counts().gets).toBe(0); // acknowledged without fetching
    expect((await device.flush()).ok).toBe(true);
    expect(stack.counter.counts()).toMatchObject({ gets: 1, puts: 1 });
    const out = new Uint8Array(CHUNK);
    expect((await device.read(0, [out])).ok).toBe(true);
    expect(stack.counter.counts().gets).toBe(1);
    const expected = Buffer.from(pattern(1, 0, CHUNK / 512));
    Buffer.from(pattern(2, 8, 8)).copy(expected, 8 * 512);
    expect(Buffer.from(out).equals(expected)).toBe(true);
    await device.disconnect();
    // The superseded object of chunk 0, in one batch, plus the claim's release (a PUT) and
    // the process lease's (a DELETE: this was the process's last volume in the bucket).
    expect(stack.counter.counts()).toMatchObject({
      gets: 1,
      puts: 2,
      deleteBatches: 1,
      deletes: 1,
    });
  });

  it("serves small random misses with one 64 KiB ranged GET each, larger reads with wider ones", async () => {
    const volume = await newFilledVolume(backend, "ranged", PARAMS, 5, (2 * CHUNK) / 512);

    const stack = volume.stack();
    const device = await volume.open({}, stack);
    stack.counter.reset();
    const out = new Uint8Array(4096);
    // 4 KiB at 100 KiB into chunk 0: the aligned 64 KiB span [64 KiB, 128 KiB).
    expect((await device.read(200, [out])).ok).toBe(true);
    expect(stack.counter.counts()).toMatchObject({ gets: 1, bytesIn: 64 * 1024 });
    expect(Buffer.from(out).equals(Buffer.from(pattern(5, 200, 8)))).toBe(true);
    // Inside the span already fetched: no request.
    expect((await device.read(136, [out])).ok).toBe(true);
    expect(stack.counter.counts().gets).toBe(1);
    // A second small miss in the chunk is one more 64 KiB span (a whole chunk on the second
    // miss fetched 2.8 times what a booting guest read: docs/architecture.md).
    expect((await device.read(8, [out])).ok).toBe(true);
    expect(stack.counter.counts()).toMatchObject({ gets: 2, bytesIn: 2 * 64 * 1024 });
    expect(Buffer.from(out).equals(Buffer.from(pattern(5, 8, 8)))).toBe(true);
    // A 32 KiB read fetches four times its size, aligned: [128 KiB, 256 KiB) of chunk 0.
    const mid = new Uint8Array(32 * 1024);
    expect((await device.read(320, [mid])).ok).toBe(true);
    expect(stack.counter.counts()).toMatchObject({ gets: 3, bytesIn: 4 * 64 * 1024 });
    expect(Buffer.from(mid).equals(Buffer.from(pattern(5, 320, 64)))).toBe(true);
    // A large read (a quarter of a chunk or more) fetches the whole chunk at once.
    const big = new Uint8Array(CHUNK / 4);
    expect((await device.read(CHUNK / 512, [big])).ok).toBe(true);
    expect(stack.counter.counts()).toMatchObject({ gets: 4, bytesIn: 4 * 64 * 1024 + CHUNK });
    await device.disconnect();
  });

  it("charges the clean cache for the spans a page holds, not a whole chunk", async () => {
    const volume = await newFilledVolume(backend, "sparse-clean", PARAMS, 6, (8 * CHUNK) / 512);

    const stack = volume.stack();
    // Room for two whole chunks, and for six 64 KiB spans (with their bookkeeping).
    const device = await volume.open({ cacheBytes: 2 * CHUNK }, stack);
    stack.counter.reset();
    const out = new Uint8Array(4096);
    const sectors = [0, 1, 2, 3, 4, 5].map((c) => c * (CHUNK / 512) + 200);
    for (const sector of sectors) expect((await device.read(sector, [out])).ok).toBe(true);
    expect(stack.counter.counts()).toMatchObject({ gets: 6, bytesIn: 6 * 64 * 1024 });
    // Six partial pages fit in the cache: reading them again costs nothing.
    for (const sector of sectors) {
      expect((await device.read(sector, [out])).ok).toBe(true);
      expect(Buffer.from(out).equals(Buffer.from(pattern(6, sector, 8)))).toBe(true);
    }
    expect(stack.counter.counts().gets).toBe(6);
    // Whole chunks, out of order (no read-ahead): the cache keeps two of them, not all eight.
    const chunk = new Uint8Array(CHUNK);
    for (const c of [0, 2, 4, 6, 1, 3, 5, 7]) {
      expect((await device.read(c * (CHUNK / 512), [chunk])).ok).toBe(true);
    }
    expect(device.cacheStats().cleanBytes).toBeLessThanOrEqual(2 * CHUNK);
    const gets = stack.counter.counts().gets;
    expect((await device.read(0, [chunk])).ok).toBe(true); // long evicted
    expect(stack.counter.counts().gets).toBe(gets + 1);
    await device.disconnect();
  });

  it("keeps a working set of exactly the cache's size, whole chunks, without a second GET", async () => {
    const volume = await newFilledVolume(backend, "fit", PARAMS, 7, (4 * CHUNK) / 512);

    const stack = volume.stack();
    const device = await volume.open({ cacheBytes: 4 * CHUNK }, stack);
    stack.counter.reset();
    const chunk = new Uint8Array(CHUNK);
    for (let pass = 0; pass < 3; pass++) {
      for (const c of [0, 2, 1, 3]) {
        expect((await device.read(c * (CHUNK / 512), [chunk])).ok).toBe(true);
      }
    }
    expect(stack.counter.counts().gets).toBe(4);
    await device.disconnect();
  });

  it("rewrites N chunks for N PUTs and one batched DELETE of the superseded objects", async () => {
    const volume = await newFilledVolume(backend, "rewrite-all", PARAMS, 8, (8 * CHUNK) / 512);
    const stack = volume.stack();
    const device = await volume.open({ writebackDelayMs: 60_000 }, stack);
    stack.counter.reset();
    expect((await device.write(0, [pattern(9, 0, (8 * CHUNK) / 512)])).ok).toBe(true);
    expect((await device.flush()).ok).toBe(true);
    expect((await device.disconnect()).ok).toBe(true);
    // 8 chunk PUTs and the claim's release; no GET (whole chunks), one DeleteObjects, and
    // the process lease's DELETE.
    expect(stack.counter.counts()).toMatchObject({
      puts: 9,
      gets: 0,
      deleteBatches: 1,
      deletes: 1,
      lists: 0,
    });
  });

  it("opens with three LISTs and one GET of the seal, and a writer seals once", async () => {
    const volume = await newFilledVolume(backend, "open", PARAMS, 10, (3 * CHUNK) / 512);
    const reading = volume.stack();
    const reader = await volume.open({ readOnly: true }, reading);
    // The superblock and the seal; LISTs of seals/, chunks/ and seals/ again (a new writer term
    // may have started meanwhile); nothing per chunk.
    expect(reading.counter.counts()).toMatchObject({ gets: 2, lists: 3, puts: 0 });
    await reader.disconnect();

    const writing = volume.stack();
    const writer = await volume.open({}, writing);
    // Plus the claim (a GET and a PUT; it names no live holder) and this process's lease (a
    // PUT), LISTs of snapshots/ and trash/ (none here: no GET), this term's seal (a PUT), and
    // one DeleteObjects of the previous seal.
    expect(writing.counter.counts()).toMatchObject({
      gets: 3,
      lists: 4,
      puts: 3,
      deleteBatches: 1,
      deletes: 0,
    });
    writing.counter.reset();
    for (let i = 0; i < 3; i++) expect((await writer.flush()).ok).toBe(true);
    expect(writing.counter.counts().puts).toBe(0); // no map is written per flush
    await writer.disconnect();
  });

  it("takes a snapshot for one flush and one PUT, copying nothing, and opens it with one GET", async () => {
    const volume = await newFilledVolume(backend, "snap", PARAMS, 11, (3 * CHUNK) / 512);
    const stack = volume.stack();
    const device = await volume.open({ writebackDelayMs: 60_000 }, stack);
    expect((await device.write(0, [pattern(12, 0, 8)])).ok).toBe(true); // one dirty chunk
    stack.counter.reset();
    expect((await device.snapshot("s")).ok).toBe(true);
    // The flush's read-modify-write of chunk 0 (a GET and a PUT), then the record (a PUT).
    expect(stack.counter.counts()).toMatchObject({ gets: 1, puts: 2, lists: 0, deletes: 0 });
    expect(stack.counter.counts().bytesOut).toBeLessThan(CHUNK + 4096);
    await device.disconnect();

    const reading = volume.stack();
    const snap = await volume.open({ snapshot: "s" }, reading);
    // The superblock and the record; no LIST.
    expect(reading.counter.counts()).toMatchObject({ gets: 2, lists: 0, puts: 0 });
    await snap.disconnect();
    // A writer reads every snapshot record at open: one GET per snapshot.
    const writing = volume.stack();
    await (await volume.open({}, writing)).disconnect();
    expect(writing.counter.counts()).toMatchObject({ gets: 4, lists: 4 });
  });
});
