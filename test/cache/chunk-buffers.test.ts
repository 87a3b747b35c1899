/**
 * The chunk buffer pool: a retired buffer is handed out again only once no loan of it is
 * outstanding, never twice at once, and only if the pool made it.
 */

import { describe, expect, it } from "vitest";
import { ChunkBuffers } from "../../src/cache/chunk-buffers.js";

const CHUNK = 64 * 1024;

describe("chunk buffers", () => {
  it("hands a retired buffer out again instead of allocating", () => {
    const buffers = new ChunkBuffers(CHUNK);
    const first = buffers.take();
    expect(first.byteLength).toBe(CHUNK);
    buffers.retire(first);
    expect(buffers.stats()).toEqual({ allocated: 1, reused: 0, freeBytes: CHUNK });
    const again = buffers.take();
    expect(again.buffer).toBe(first.buffer);
    expect(buffers.take().buffer).not.toBe(first.buffer); // the free list is empty: a new one
    expect(buffers.stats()).toEqual({ allocated: 2, reused: 1, freeBytes: 0 });
  });

  it("keeps a buffer retired while lent until its last loan is returned", () => {
    const buffers = new ChunkBuffers(CHUNK);
    const buffer = buffers.take();
    buffers.lend(buffer);
    buffers.lend(buffer.subarray(4096)); // a second loan, of another view of the same memory
    expect(buffers.isLent(buffer)).toBe(true);
    buffers.retire(buffer);
    expect(buffers.stats().freeBytes).toBe(0);
    buffers.returnLoan(buffer.subarray(0, 512));
    expect(buffers.stats().freeBytes).toBe(0); // one loan still out
    expect(buffers.take().buffer).not.toBe(buffer.buffer);
    buffers.returnLoan(buffer);
    expect(buffers.isLent(buffer)).toBe(false);
    expect(buffers.stats().freeBytes).toBe(CHUNK);
    expect(buffers.take().buffer).toBe(buffer.buffer);
  });

  it("counts loans of any buffer, but reuses only its own", () => {
    const buffers = new ChunkBuffers(CHUNK);
    const foreign = Buffer.alloc(CHUNK);
    buffers.lend(foreign);
    expect(buffers.isLent(foreign)).toBe(true);
    buffers.retire(foreign);
    buffers.returnLoan(foreign);
    buffers.retire(foreign);
    expect(buffers.stats().freeBytes).toBe(0);
    // A view that does not start at its buffer's first byte is not a whole buffer of ours.
    const own = buffers.take();
    buffers.retire(own.subarray(512));
    expect(buffers.stats().freeBytes).toBe(0);
  });

  it("refuses a second retire and a loan returned that was never made", () => {
    const buffers = new ChunkBuffers(CHUNK);
    const buffer = buffers.take();
    buffers.retire(buffer);
    expect(() => buffers.retire(buffer)).toThrow(/retired twice/);
    expect(() => buffers.returnLoan(buffer)).toThrow(/never made/);
  });

  it("keeps at most its bound of free buffers, and at least one", () => {
    const buffers = new ChunkBuffers(CHUNK, 2 * CHUNK);
    const taken = [buffers.take(), buffers.take(), buffers.take()];
    for (const buffer of taken) buffers.retire(buffer);
    expect(buffers.stats().freeBytes).toBe(2 * CHUNK);
    const tiny = new ChunkBuffers(CHUNK, 0);
    tiny.retire(tiny.take());
    expect(tiny.stats().freeBytes).toBe(CHUNK);
  });
});
