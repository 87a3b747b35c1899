/**
 * `cacheBytes` is the memory of the cache's pages, clean and dirty together: dirty pages take
 * their room from the clean LRU, the dirty bound is at most half the cache, and read-ahead
 * stays within the room dirty pages leave.
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
const PARAMS = { sizeBytes: CHUNKS * CHUNK, chunkSizeBytes: CHUNK };
/** Long enough that nothing is uploaded before the test flushes. */
const HOUR = 3_600_000;

async function readsBack(
  device: { read: (sector: number, buffers: Uint8Array[]) => Promise<{ ok: boolean }> },
  chunk: number,
  seed: number,
): Promise<void> {
  const out = new Uint8Array(CHUNK);
  expect((await device.read(chunk * SPC, [out])).ok).toBe(true);
  expect(
    Buffer.from(out).equals(Buffer.from(pattern(seed, chunk * SPC, SPC))),
    `chunk ${chunk}`,
  ).toBe(true);
}

describe("the cache's memory budget", () => {
  it("evicts clean pages to make room for dirty ones", async () => {
    const volume = await newFilledVolume(memoryBackend, "budget", PARAMS, 1, CHUNKS * SPC);
    const device = await volume.open({ cacheBytes: 4 * CHUNK, writebackDelayMs: HOUR });
    for (let c = 0; c < 4; c++) await readsBack(device, c, 1);
    expect(device.cacheStats().cleanBytes).toBe(4 * CHUNK);

    for (let c = 8; c < 10; c++) {
      expect((await device.write(c * SPC, [pattern(2, c * SPC, SPC)])).ok).toBe(true);
    }
    const stats = device.cacheStats();
    expect(stats.dirtyBytes).toBe(2 * CHUNK);
    expect(stats.cleanBytes).toBe(2 * CHUNK); // the two least recently read chunks left
    for (let c = 0; c < 4; c++) await readsBack(device, c, 1);
    for (let c = 8; c < 10; c++) await readsBack(device, c, 2);
    const after = device.cacheStats();
    expect(after.cleanBytes + after.dirtyBytes).toBeLessThanOrEqual(4 * CHUNK);

    // Uploaded, the written pages are clean and stay within the same budget.
    expect((await device.flush()).ok).toBe(true);
    const flushed = device.cacheStats();
    expect(flushed.dirtyBytes).toBe(0);
    expect(flushed.cleanBytes).toBeLessThanOrEqual(4 * CHUNK);
    expect((await device.disconnect()).ok).toBe(true);
  });

  it("holds the dirty bound to half the cache", async () => {
    const volume = await newFilledVolume(memoryBackend, "budget-dirty", PARAMS, 1, 0);
    const device = await volume.open({
      cacheBytes: 8 * CHUNK,
      maxDirtyBytes: 16 * CHUNK,
      writebackDelayMs: HOUR,
    });
    // Writers wait for write-back past 4 chunks, not 16.
    for (let c = 0; c < 8; c++) {
      expect((await device.write(c * SPC, [pattern(3, c * SPC, SPC)])).ok).toBe(true);
    }
    expect(device.cacheStats().peakDirtyBytes).toBe(4 * CHUNK);
    expect((await device.disconnect()).ok).toBe(true);
    const reader = await volume.open({ readOnly: true });
    for (let c = 0; c < 8; c++) await readsBack(reader, c, 3);
    await reader.disconnect();
  });

  it("reads ahead only as far as the room dirty pages leave, fetching each chunk once", async () => {
    const volume = await newFilledVolume(memoryBackend, "budget-ahead", PARAMS, 1, CHUNKS * SPC);
    const gets = new Map<string, number>();
    const layer = { store: undefined as CountingGets | undefined };
    const stack = volume.stack({ wrap: (store) => (layer.store = new CountingGets(store, gets)) });
    const device = await volume.open(
      {
        cacheBytes: 8 * CHUNK,
        writebackDelayMs: HOUR,
        readPolicy: { sequentialAfterBytes: CHUNK, readaheadMaxBytes: 8 * CHUNK },
      },
      stack,
    );
    // Half the cache dirty, its uploads held: 4 chunks of room for the reader's pages and its
    // read-ahead.
    layer.store!.holdChunkPuts = true;
    for (let c = 8; c < 12; c++) {
      expect((await device.write(c * SPC, [pattern(4, c * SPC, SPC)])).ok).toBe(true);
    }
    gets.clear();
    for (let c = 0; c < 8; c++) await readsBack(device, c, 1);
    // GETs per chunk read (read-ahead may also fetch the written chunks uploaded meanwhile).
    const perChunk = Array.from({ length: 8 }, () => 0);
    for (const [key, n] of gets) {
      const index = /\/chunks\/([0-9a-f]{16})\./.exec(key)?.[1];
      if (index !== undefined && parseInt(index, 16) < 8) perChunk[parseInt(index, 16)]! += n;
    }
    expect(perChunk).toEqual([1, 1, 1, 1, 1, 1, 1, 1]);
    expect(device.cacheStats().dirtyBytes).toBe(4 * CHUNK);
    layer.store!.releasePuts();
    expect((await device.disconnect()).ok).toBe(true);
  });
});

/** Counts the GETs of each key; holds chunk PUTs while `holdChunkPuts`, until released. */
class CountingGets extends StoreLayer {
  holdChunkPuts = false;
  #held: (() => void)[] = [];

  constructor(
    inner: ObjectStore,
    readonly gets: Map<string, number>,
  ) {
    super(inner);
  }

  override async get(key: string, options?: GetOptions): Promise<GetResult | undefined> {
    this.gets.set(key, (this.gets.get(key) ?? 0) + 1);
    return super.get(key, options);
  }

  override async put(
    key: string,
    body: Uint8Array,
    options?: Parameters<ObjectStore["put"]>[2],
  ): Promise<PutResult> {
    if (this.holdChunkPuts && key.includes("/chunks/")) {
      await new Promise<void>((resolve) => this.#held.push(resolve));
    }
    return super.put(key, body, options);
  }

  releasePuts(): void {
    this.holdChunkPuts = false;
    for (const release of this.#held.splice(0)) release();
  }
}
