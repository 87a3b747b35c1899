/**
 * Chunk buffers are reused (chunk-buffers.ts): the memory of an evicted page becomes the next
 * fetch's. These tests check that reuse happens where it should, and that it never hands out
 * memory something still reads or writes: concurrent reads, zero-copy loans held across other
 * requests, writes, whole-chunk discards and flushes, on a cache a few chunks large, with the
 * store answering after random delays so that evictions land in the middle of every operation.
 */

import { describe, expect, it } from "vitest";
import type {
  GetOptions,
  GetResult,
  ObjectStore,
  PutResult,
} from "../../src/store/object-store.js";
import { StoreLayer } from "../../src/store/store-layer.js";
import { memoryBackend, newFilledVolume, pattern } from "../support/volumes.js";

const CHUNK = 64 * 1024;
const SPC = CHUNK / 512;
const CHUNKS = 12;
/** Chunks 0..7 hold pattern 1 and are only read; chunks 8..11 are written. */
const READ_CHUNKS = 8;
const PARAMS = { sizeBytes: CHUNKS * CHUNK, chunkSizeBytes: CHUNK };

/** A deterministic generator (mulberry32), so that a failure replays. */
function random(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function ticks(n: number): Promise<void> {
  return n === 0 ? Promise.resolve() : new Promise((r) => setImmediate(() => r(ticks(n - 1))));
}

/** Answers GETs and PUTs after 0-3 turns of the event loop, in an order of its own. */
class Jitter extends StoreLayer {
  constructor(
    inner: ObjectStore,
    readonly next: () => number,
  ) {
    super(inner);
  }

  override async get(key: string, options?: GetOptions): Promise<GetResult | undefined> {
    await ticks(Math.floor(this.next() * 4));
    return super.get(key, options);
  }

  override async put(
    key: string,
    body: Uint8Array,
    options?: Parameters<ObjectStore["put"]>[2],
  ): Promise<PutResult> {
    await ticks(Math.floor(this.next() * 4));
    return super.put(key, body, options);
  }
}

describe("chunk buffer reuse", () => {
  it("reuses evicted pages' buffers on a sequential read past the cache, every byte right", async () => {
    const volume = await newFilledVolume(memoryBackend, "reuse-seq", PARAMS, 1, CHUNKS * SPC);
    const device = await volume.open({ readOnly: true, cacheBytes: 3 * CHUNK });
    for (let pass = 0; pass < 3; pass++) {
      for (let c = 0; c < CHUNKS; c++) {
        const out = new Uint8Array(CHUNK);
        expect((await device.read(c * SPC, [out])).ok).toBe(true);
        expect(Buffer.from(out).equals(Buffer.from(pattern(1, c * SPC, SPC)))).toBe(true);
      }
    }
    const stats = device.cacheStats();
    // 36 whole-chunk fetches through a 3-chunk cache: a handful allocated, the rest reused.
    expect(stats.chunkBuffersAllocated + stats.chunkBuffersReused).toBeGreaterThanOrEqual(36);
    expect(stats.chunkBuffersAllocated).toBeLessThanOrEqual(8);
    await device.disconnect();
  });

  it("reuses upload images on a sequential write past the cache, every byte stored right", async () => {
    const volume = await newFilledVolume(memoryBackend, "reuse-write", PARAMS, 1, 0);
    const stack = volume.stack({ wrap: (store) => new Jitter(store, random(7)) });
    const device = await volume.open(
      { cacheBytes: 3 * CHUNK, maxDirtyBytes: 2 * CHUNK, writebackDelayMs: 1 },
      stack,
    );
    for (let pass = 0; pass < 3; pass++) {
      for (let c = 0; c < CHUNKS; c++) {
        const data = pattern(10 + pass, c * SPC, SPC);
        expect((await device.write(c * SPC, [data])).ok).toBe(true);
      }
      expect((await device.flush()).ok).toBe(true);
    }
    const stats = device.cacheStats();
    // 36 pages and 36 upload images, each image a buffer that goes back to the pool when its
    // PUT has ended: a few buffers allocated for the first chunks, then all reused.
    expect(stats.chunkBuffersAllocated + stats.chunkBuffersReused).toBeGreaterThanOrEqual(72);
    expect(stats.chunkBuffersAllocated).toBeLessThanOrEqual(8);
    expect((await device.disconnect()).ok).toBe(true);
    const reader = await volume.open({ readOnly: true });
    for (let c = 0; c < CHUNKS; c++) {
      const out = new Uint8Array(CHUNK);
      expect((await reader.read(c * SPC, [out])).ok).toBe(true);
      expect(Buffer.from(out).equals(Buffer.from(pattern(12, c * SPC, SPC))), `chunk ${c}`).toBe(
        true,
      );
    }
    await reader.disconnect();
  });

  it("never hands out memory in use, under concurrent reads, loans, writes and discards", async () => {
    const next = random(20261202);
    const volume = await newFilledVolume(memoryBackend, "reuse-race", PARAMS, 1, READ_CHUNKS * SPC);
    const stack = volume.stack({ wrap: (store) => new Jitter(store, next) });
    const device = await volume.open({ cacheBytes: 3 * CHUNK, writebackDelayMs: 1 }, stack);
    /** What each written chunk holds: the seed of its last write, 0 for zeros. */
    const written = new Map<number, number>();
    let lendsChecked = 0;
    const pick = (n: number) => Math.floor(next() * n);

    const readAndCheck = async () => {
      const sector = pick(READ_CHUNKS * SPC - 1);
      const sectors = 1 + pick(Math.min(2 * SPC, READ_CHUNKS * SPC - sector) - 1);
      const out = new Uint8Array(sectors * 512);
      expect((await device.read(sector, [out])).ok).toBe(true);
      expect(Buffer.from(out).equals(Buffer.from(pattern(1, sector, sectors)))).toBe(true);
    };
    const lendAndCheck = async () => {
      const chunk = pick(READ_CHUNKS);
      let view = device.lend(chunk * SPC, SPC);
      if (view === undefined) {
        // Not in memory: read it in, and borrow it if it is still there.
        expect((await device.read(chunk * SPC, [new Uint8Array(CHUNK)])).ok).toBe(true);
        view = device.lend(chunk * SPC, SPC);
        if (view === undefined) return;
      }
      // Held across other requests, as a reply waiting in a backed-up socket.
      await ticks(pick(6));
      expect(Buffer.from(view).equals(Buffer.from(pattern(1, chunk * SPC, SPC)))).toBe(true);
      device.returnLoan(view);
      lendsChecked++;
    };
    const writeOrDiscard = async (chunk: number) => {
      if (next() < 0.25) {
        expect((await device.discard(chunk * SPC, SPC)).ok).toBe(true);
        written.set(chunk, 0);
      } else {
        const seed = 2 + pick(1e6);
        expect((await device.write(chunk * SPC, [pattern(seed, chunk * SPC, SPC)])).ok).toBe(true);
        written.set(chunk, seed);
      }
    };

    for (let round = 0; round < 30; round++) {
      const ops: Promise<void>[] = [];
      for (let i = 0; i < 12; i++) ops.push(next() < 0.5 ? readAndCheck() : lendAndCheck());
      // One write per written chunk a round, so that each round's end state is known.
      for (let chunk = READ_CHUNKS; chunk < CHUNKS; chunk++) {
        if (next() < 0.5) ops.push(writeOrDiscard(chunk));
      }
      if (next() < 0.2) ops.push(device.flush().then((r) => expect(r.ok).toBe(true)));
      await Promise.all(ops);
    }
    for (let chunk = READ_CHUNKS; chunk < CHUNKS; chunk++) {
      const out = new Uint8Array(CHUNK);
      expect((await device.read(chunk * SPC, [out])).ok).toBe(true);
      const seed = written.get(chunk) ?? 0;
      const expected = seed === 0 ? new Uint8Array(CHUNK) : pattern(seed, chunk * SPC, SPC);
      expect(Buffer.from(out).equals(Buffer.from(expected)), `chunk ${chunk}`).toBe(true);
    }
    device.checkInvariants();
    // The run did exercise what it is about.
    expect(device.cacheStats().chunkBuffersReused).toBeGreaterThan(20);
    expect(lendsChecked).toBeGreaterThan(20);
    expect((await device.disconnect()).ok).toBe(true);
  });
});
