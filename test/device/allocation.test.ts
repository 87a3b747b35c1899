/** The allocation map (for NBD block status) and cache warming (for NBD_CMD_CACHE). */

import { describe, expect, it } from "vitest";
import { memoryBackend, newTestVolume, pattern } from "../support/volumes.js";

const CHUNK = 64 * 1024;
const SPC = CHUNK / 512;

describe("allocation map", () => {
  it("shows written chunks as data and the rest as holes, before and after upload", async () => {
    const volume = await newTestVolume(memoryBackend, "map", {
      sizeBytes: 8 * CHUNK,
      chunkSizeBytes: CHUNK,
    });
    const device = await volume.open({ writebackDelayMs: 60_000 });
    expect(device.allocationMap(0, 8 * CHUNK)).toEqual([
      { offsetBytes: 0, lengthBytes: 8 * CHUNK, allocated: false },
    ]);
    expect((await device.write(2 * SPC + 1, [pattern(1, 2 * SPC + 1, 1)])).ok).toBe(true);
    expect((await device.write(3 * SPC, [pattern(2, 3 * SPC, 1)])).ok).toBe(true);
    expect((await device.write(6 * SPC, [new Uint8Array(512)])).ok).toBe(true);
    const expected = [
      { offsetBytes: 0, lengthBytes: 2 * CHUNK, allocated: false },
      { offsetBytes: 2 * CHUNK, lengthBytes: 2 * CHUNK, allocated: true },
      { offsetBytes: 4 * CHUNK, lengthBytes: 2 * CHUNK, allocated: false },
      // A dirty page written with zeros counts as data until write-back finds it all zero.
      { offsetBytes: 6 * CHUNK, lengthBytes: CHUNK, allocated: true },
      { offsetBytes: 7 * CHUNK, lengthBytes: CHUNK, allocated: false },
    ];
    expect(device.allocationMap(0, 8 * CHUNK)).toEqual(expected);
    expect((await device.flush()).ok).toBe(true);
    // After upload the zero chunk has no object: a hole.
    expect(device.allocationMap(0, 8 * CHUNK)).toEqual([
      { offsetBytes: 0, lengthBytes: 2 * CHUNK, allocated: false },
      { offsetBytes: 2 * CHUNK, lengthBytes: 2 * CHUNK, allocated: true },
      { offsetBytes: 4 * CHUNK, lengthBytes: 4 * CHUNK, allocated: false },
    ]);
    // A discarded chunk is a hole at once.
    expect((await device.discard(3 * SPC, SPC)).ok).toBe(true);
    expect(device.allocationMap(2 * CHUNK + 100, 2 * CHUNK)).toEqual([
      { offsetBytes: 2 * CHUNK + 100, lengthBytes: CHUNK - 100, allocated: true },
      { offsetBytes: 3 * CHUNK, lengthBytes: CHUNK + 100, allocated: false },
    ]);
    await device.disconnect();
  });
});

describe("prefetch", () => {
  it("loads stored chunks so later reads cost no GET", async () => {
    const volume = await newTestVolume(memoryBackend, "warm", {
      sizeBytes: 8 * CHUNK,
      chunkSizeBytes: CHUNK,
    });
    const writer = await volume.open();
    expect((await writer.write(0, [pattern(3, 0, 3 * SPC)])).ok).toBe(true);
    await writer.disconnect();
    const stack = volume.stack();
    const device = await volume.open({}, stack);
    stack.counter.reset();
    expect((await device.prefetch(0, 8 * SPC)).ok).toBe(true);
    expect(stack.counter.counts().gets).toBe(3);
    const out = new Uint8Array(3 * CHUNK);
    expect((await device.read(0, [out])).ok).toBe(true);
    expect(stack.counter.counts().gets).toBe(3);
    expect(Buffer.from(out).equals(Buffer.from(pattern(3, 0, 3 * SPC)))).toBe(true);
    await device.disconnect();
  });
});
