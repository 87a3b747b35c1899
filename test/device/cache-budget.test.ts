/**
 * `cacheBytes` is the memory of the cache's pages, clean and dirty together: dirty pages take
 * their room from the clean LRU, and the dirty bound can never be larger than the cache.
 */

import { describe, expect, it } from "vitest";
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

  it("holds the dirty bound to the cache's size", async () => {
    const volume = await newFilledVolume(memoryBackend, "budget-dirty", PARAMS, 1, 0);
    const device = await volume.open({
      cacheBytes: 4 * CHUNK,
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
});
