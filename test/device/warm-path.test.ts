/**
 * The warm path: a read the cache can answer, and a write that fits in the dirty bounds, are
 * done in the call itself (no store request, no turn of the event loop), while everything that
 * must wait still waits: a miss, a FUA write, a write during a snapshot, a write past the dirty
 * bound. Each case checks what a caller can observe before awaiting the result.
 */

import { describe, expect, it } from "vitest";
import { memoryBackend, newTestVolume, pattern } from "../support/volumes.js";

const CHUNK = 64 * 1024;
const SECTORS_PER_CHUNK = CHUNK / 512;
const PARAMS = { sizeBytes: 8 * CHUNK, chunkSizeBytes: CHUNK };

/**
 * What `promise` holds if it was settled when this was called, else "pending". (Of two promises
 * already settled, `Promise.race` takes the first; one still pending loses to `Promise.resolve`.)
 */
function ready<T>(promise: Promise<T>): Promise<T | "pending"> {
  return Promise.race([promise, Promise.resolve("pending" as const)]);
}

describe("the warm path", () => {
  it("answers a cached read within the call, with no store request", async () => {
    const volume = await newTestVolume(memoryBackend, "warm-read", PARAMS);
    const stack = volume.stack();
    const device = await volume.open({}, stack);
    expect((await device.write(0, [pattern(1, 0, SECTORS_PER_CHUNK)])).ok).toBe(true);
    stack.counter.reset();
    const out = new Uint8Array(8 * 512).fill(0xee);
    const reading = device.read(16, [out]);
    // Filled before the caller awaits anything, and the result is there already.
    expect(Buffer.from(out).equals(Buffer.from(pattern(1, 16, 8)))).toBe(true);
    expect(await ready(reading)).toEqual({ ok: true, value: undefined });
    // A never-written chunk reads as zeros from memory too.
    const zeros = new Uint8Array(512).fill(0xee);
    void device.read(3 * SECTORS_PER_CHUNK, [zeros]);
    expect(zeros.every((b) => b === 0)).toBe(true);
    expect(stack.counter.counts()).toMatchObject({ gets: 0, puts: 0 });
    // Each counted as a hit, as the general path counts them.
    expect(device.cacheStats()).toMatchObject({ readHits: 2, readMisses: 0 });
    await device.disconnect();
  });

  it("lends a large cached read as memory that a later write does not change", async () => {
    const volume = await newTestVolume(memoryBackend, "warm-lend", PARAMS);
    const device = await volume.open({ writebackDelayMs: 60_000 });
    expect((await device.write(0, [pattern(9, 0, SECTORS_PER_CHUNK)])).ok).toBe(true);
    // Less than a quarter of a chunk, or across two chunks: not lent (the caller reads).
    expect(device.lend(0, SECTORS_PER_CHUNK / 4 - 1)).toBeUndefined();
    expect(device.lend(SECTORS_PER_CHUNK - 8, 16)).toBeUndefined();
    const hits = device.cacheStats().readHits;
    const view = device.lend(0, SECTORS_PER_CHUNK)!;
    expect(Buffer.from(view).equals(Buffer.from(pattern(9, 0, SECTORS_PER_CHUNK)))).toBe(true);
    expect(device.cacheStats().readHits).toBe(hits + 1);
    expect((await device.write(8, [pattern(10, 8, 8)])).ok).toBe(true);
    expect(Buffer.from(view).equals(Buffer.from(pattern(9, 0, SECTORS_PER_CHUNK)))).toBe(true);
    const out = new Uint8Array(8 * 512);
    void device.read(8, [out]);
    expect(Buffer.from(out).equals(Buffer.from(pattern(10, 8, 8)))).toBe(true);
    await device.disconnect();
    expect(device.lend(0, SECTORS_PER_CHUNK)).toBeUndefined(); // disconnected
  });

  it("still fetches a read that misses, and only then fills the buffer", async () => {
    const volume = await newTestVolume(memoryBackend, "warm-miss", PARAMS);
    const writer = await volume.open();
    expect((await writer.write(0, [pattern(2, 0, SECTORS_PER_CHUNK)])).ok).toBe(true);
    expect((await writer.disconnect()).ok).toBe(true);
    const stack = volume.stack();
    const device = await volume.open({ readOnly: true }, stack);
    stack.counter.reset();
    const out = new Uint8Array(4096).fill(0xee);
    const reading = device.read(8, [out]);
    expect(out.every((b) => b === 0xee)).toBe(true);
    expect(await ready(reading)).toBe("pending");
    expect((await reading).ok).toBe(true);
    expect(Buffer.from(out).equals(Buffer.from(pattern(2, 8, 8)))).toBe(true);
    expect(stack.counter.counts().gets).toBe(1);
    await device.disconnect();
  });

  it("completes a write that fits within the call: a read right after sees it", async () => {
    const volume = await newTestVolume(memoryBackend, "warm-write", PARAMS);
    const device = await volume.open({ writebackDelayMs: 60_000 });
    const writing = device.write(40, [pattern(3, 40, 8)]);
    expect(await ready(writing)).toEqual({ ok: true, value: undefined });
    const out = new Uint8Array(8 * 512);
    expect(await ready(device.read(40, [out]))).toEqual({ ok: true, value: undefined });
    expect(Buffer.from(out).equals(Buffer.from(pattern(3, 40, 8)))).toBe(true);
    // One that spans two chunks takes the general path, and lands the same.
    const across = device.write(SECTORS_PER_CHUNK - 4, [pattern(4, SECTORS_PER_CHUNK - 4, 8)]);
    expect(await ready(across)).toBe("pending");
    expect((await across).ok).toBe(true);
    void device.read(SECTORS_PER_CHUNK - 4, [out]);
    expect(Buffer.from(out).equals(Buffer.from(pattern(4, SECTORS_PER_CHUNK - 4, 8)))).toBe(true);
    await device.disconnect();
  });

  it("makes a FUA write wait for its upload", async () => {
    const volume = await newTestVolume(memoryBackend, "warm-fua", PARAMS);
    const stack = volume.stack();
    const device = await volume.open({ writebackDelayMs: 60_000 }, stack);
    stack.counter.reset();
    const writing = device.write(0, [pattern(4, 0, 8)], { fua: true });
    expect(await ready(writing)).toBe("pending");
    expect((await writing).ok).toBe(true);
    expect(stack.counter.counts().puts).toBe(1);
    await device.disconnect();
  });

  it("holds a write that starts during a snapshot until the snapshot is taken", async () => {
    const volume = await newTestVolume(memoryBackend, "warm-snapshot", PARAMS);
    const device = await volume.open({ writebackDelayMs: 60_000 });
    expect((await device.write(0, [pattern(5, 0, 8)])).ok).toBe(true);
    const taking = device.snapshot("before");
    const writing = device.write(0, [pattern(6, 0, 8)]);
    expect(await ready(writing)).toBe("pending");
    // Not applied in the call: the snapshot's gate holds it.
    const out = new Uint8Array(8 * 512);
    void device.read(0, [out]);
    expect(Buffer.from(out).equals(Buffer.from(pattern(5, 0, 8)))).toBe(true);
    expect((await taking).ok).toBe(true);
    expect((await writing).ok).toBe(true);
    await device.disconnect();
    const snapshot = await volume.open({ readOnly: true, snapshot: "before" });
    const inSnapshot = new Uint8Array(8 * 512);
    expect((await snapshot.read(0, [inSnapshot])).ok).toBe(true);
    expect(Buffer.from(inSnapshot).equals(Buffer.from(pattern(5, 0, 8)))).toBe(true);
    await snapshot.disconnect();
  });

  it("makes a write past the dirty bound wait for room", async () => {
    const volume = await newTestVolume(memoryBackend, "warm-bound", PARAMS);
    const stack = volume.stack();
    // Room for two dirty chunks: the third write must wait for an upload.
    const device = await volume.open({ writebackDelayMs: 60_000, maxDirtyChunks: 2 }, stack);
    for (let i = 0; i < 2; i++) {
      expect((await device.write(i * SECTORS_PER_CHUNK, [pattern(7, 0, 8)])).ok).toBe(true);
    }
    stack.counter.reset();
    const third = device.write(2 * SECTORS_PER_CHUNK, [pattern(8, 0, 8)]);
    expect(await ready(third)).toBe("pending");
    const out = new Uint8Array(8 * 512).fill(0xee);
    void device.read(2 * SECTORS_PER_CHUNK, [out]);
    expect(out.every((b) => b === 0)).toBe(true);
    expect((await third).ok).toBe(true);
    expect(stack.counter.counts().puts).toBeGreaterThan(0);
    await device.disconnect();
  });
});
