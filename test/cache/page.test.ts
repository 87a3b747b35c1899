/**
 * One page against a plain model: a chunk's bytes and which sectors are known. Random sequences
 * of writes, zeroing, fills from the store (ranged and whole), upload images and upload
 * transitions must agree with the model, the page must hold only the spans it was given data
 * for, and its own accounts must hold after every step (`checkInvariants`).
 *
 * The chunk buffers are in play too: views are lent and returned, the page retires (is evicted)
 * and a new one takes its place, and another user takes free buffers and scribbles on them. No
 * view whose loan is outstanding, and no byte the page holds, may change.
 */

import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { ChunkBuffers } from "../../src/cache/chunk-buffers.js";
import { Page, SPAN_BYTES } from "../../src/cache/page.js";
import { pattern } from "../support/volumes.js";

const CHUNK = 64 * 1024;
const SECTOR = 512;
const SECTORS = CHUNK / SECTOR;
const ZERO_CHUNK = Buffer.alloc(CHUNK);

/** The chunk as stored: what fills and read-modify-writes read. */
const STORED = Buffer.from(pattern(77, 0, SECTORS));

class Model {
  readonly bytes = Buffer.alloc(CHUNK);
  readonly valid = new Uint8Array(SECTORS);

  set(offset: number, data: Uint8Array): void {
    this.bytes.set(data, offset);
    this.valid.fill(1, offset / SECTOR, (offset + data.byteLength) / SECTOR);
  }

  fill(offset: number, length: number, source: Buffer | undefined): void {
    for (let s = offset / SECTOR; s < (offset + length) / SECTOR; s++) {
      if (this.valid[s] === 1) continue;
      const at = s * SECTOR;
      if (source === undefined) this.bytes.fill(0, at, at + SECTOR);
      else source.copy(this.bytes, at, at - offset, at - offset + SECTOR);
      this.valid[s] = 1;
    }
  }

  /** The chunk an upload must store, with unknown sectors from `base` (zeros if undefined). */
  image(base: Buffer | undefined): Buffer {
    const out = Buffer.from(base ?? ZERO_CHUNK);
    for (let s = 0; s < SECTORS; s++) {
      if (this.valid[s] === 1) this.bytes.copy(out, s * SECTOR, s * SECTOR, (s + 1) * SECTOR);
    }
    return out;
  }
}

/** A sector-aligned range inside the chunk. */
const range = fc
  .tuple(fc.integer({ min: 0, max: SECTORS - 1 }), fc.integer({ min: 1, max: SECTORS }))
  .map(([first, count]) => ({
    offset: first * SECTOR,
    length: Math.min(count, SECTORS - first) * SECTOR,
  }));

const operation = fc.oneof(
  fc.record({
    op: fc.constant("write" as const),
    r: range,
    seed: fc.integer({ min: 1, max: 1e6 }),
  }),
  fc.record({ op: fc.constant("zero" as const), r: range }),
  fc.record({ op: fc.constant("zeroAll" as const) }),
  // A ranged GET of an aligned 16 KiB span, as the cache makes them.
  fc.record({ op: fc.constant("fillRange" as const), span: fc.integer({ min: 0, max: 3 }) }),
  fc.record({ op: fc.constant("fillWhole" as const), stored: fc.boolean() }),
  fc.record({ op: fc.constant("image" as const), stored: fc.boolean() }),
  // Begin an upload (a dirty page takes its image), or end the one in flight, either way.
  fc.record({ op: fc.constant("upload" as const), succeeds: fc.boolean() }),
  // Lend a view (zero-copy read): its bytes must not change until it is returned.
  fc.record({ op: fc.constant("lend" as const), r: range }),
  fc.record({ op: fc.constant("returnLoan" as const), which: fc.nat() }),
  // A clean page is evicted; a new, empty page for the chunk takes its place.
  fc.record({ op: fc.constant("retire" as const) }),
  // Someone else takes every free buffer, scribbles on it, and gives it back.
  fc.record({ op: fc.constant("scribble" as const) }),
);

describe("a page", () => {
  it("agrees with the model on random operation sequences", () => {
    fc.assert(
      fc.property(fc.array(operation, { maxLength: 40 }), (operations) => {
        const buffers = new ChunkBuffers(CHUNK, 4 * CHUNK);
        let page = new Page(0, CHUNK, SECTOR, buffers);
        let model = new Model();
        /** The writeSeq of the image the upload in flight took. */
        let imageSeq: number | undefined;
        /** Views the page lent and not yet returned, with the bytes each held when lent. */
        const lent: { view: Uint8Array; bytes: Buffer }[] = [];
        for (const o of operations) {
          switch (o.op) {
            case "write": {
              const data = pattern(o.seed, o.r.offset / SECTOR, o.r.length / SECTOR);
              page.write(o.r.offset, data);
              model.set(o.r.offset, data);
              break;
            }
            case "zero":
              page.zero(o.r.offset, o.r.length);
              model.set(o.r.offset, new Uint8Array(o.r.length));
              break;
            case "zeroAll":
              page.zero(0, CHUNK);
              model.set(0, new Uint8Array(CHUNK));
              expect(page.memoryBytes).toBe(0);
              break;
            case "fillRange": {
              const offset = o.span * 16384;
              page.fillFrom(offset, STORED.subarray(offset, offset + 16384), 16384);
              model.fill(offset, 16384, STORED.subarray(offset, offset + 16384));
              break;
            }
            case "fillWhole": {
              // The page adopts a whole chunk's buffer: a chunk buffer, as the cache's GETs.
              const fetched = o.stored ? buffers.take() : undefined;
              fetched?.set(STORED);
              const adopted = page.fillFrom(0, fetched, CHUNK);
              if (fetched !== undefined && !adopted) buffers.retire(fetched);
              model.fill(0, CHUNK, o.stored ? STORED : undefined);
              break;
            }
            case "image": {
              const base = page.fullyValid || !o.stored ? undefined : Buffer.from(STORED);
              const image = page.image(base, ZERO_CHUNK);
              const expected = model.image(o.stored ? STORED : undefined);
              // `undefined` stands for a chunk of zeros.
              expect((image ?? ZERO_CHUNK).equals(expected)).toBe(true);
              break;
            }
            case "upload": {
              if (page.state === "clean") {
                expect(() => page.beginUpload()).toThrow(/beginUpload from clean/);
              } else if (imageSeq === undefined) {
                // The dirty set sets `upload` when it queues one; the cache clears it first.
                page.upload = Promise.resolve();
                page.beginUpload();
                imageSeq = page.writeSeq;
                expect(page.state).toBe("writing");
              } else {
                const writtenSince = page.writeSeq > imageSeq;
                const durableBefore = page.durableSeq;
                expect(page.state).toBe(writtenSince ? "writing-redirtied" : "writing");
                page.upload = undefined;
                if (o.succeeds) page.uploadSucceeded();
                else page.uploadFailed();
                expect(page.state).toBe(o.succeeds && !writtenSince ? "clean" : "dirty");
                expect(page.durableSeq).toBe(o.succeeds ? imageSeq : durableBefore);
                imageSeq = undefined;
              }
              break;
            }
            case "lend": {
              const view = page.lend(o.r.offset, o.r.length);
              // Only a fully known page in one buffer lends.
              if (view === undefined) break;
              expect(page.fullyValid).toBe(true);
              const expected = model.bytes.subarray(o.r.offset, o.r.offset + o.r.length);
              expect(Buffer.from(view).equals(expected)).toBe(true);
              lent.push({ view, bytes: Buffer.from(expected) });
              break;
            }
            case "returnLoan": {
              if (lent.length === 0) break;
              const [loan] = lent.splice(o.which % lent.length, 1);
              buffers.returnLoan(loan!.view);
              break;
            }
            case "retire":
              if (page.state !== "clean") {
                expect(() => page.retire()).toThrow(/retired while/);
                break;
              }
              page.retire();
              expect(page.retired && page.memoryBytes === 0 && !page.isValid(0, SECTOR)).toBe(true);
              page.checkInvariants();
              page = new Page(0, CHUNK, SECTOR, buffers);
              model = new Model();
              imageSeq = undefined;
              break;
            case "scribble": {
              const taken: Buffer[] = [];
              while (buffers.stats().freeBytes > 0) taken.push(buffers.take());
              for (const buffer of taken) buffer.fill(0xee);
              for (const buffer of taken) buffers.retire(buffer);
              break;
            }
          }
          for (const { view, bytes } of lent) expect(Buffer.from(view).equals(bytes)).toBe(true);
          // Every known sector reads as the model says, and only known sectors are claimed.
          for (let s = 0; s < SECTORS; s++) {
            expect(page.isValid(s * SECTOR, SECTOR)).toBe(model.valid[s] === 1);
          }
          const out = Buffer.alloc(SECTOR);
          for (let s = 0; s < SECTORS; s++) {
            if (model.valid[s] !== 1) continue;
            page.copyOut(s * SECTOR, out);
            expect(out.equals(model.bytes.subarray(s * SECTOR, (s + 1) * SECTOR))).toBe(true);
          }
          expect(page.memoryBytes % SPAN_BYTES).toBe(0);
          expect(page.memoryBytes).toBeLessThanOrEqual(CHUNK);
          page.checkInvariants();
        }
      }),
      { numRuns: 300 },
    );
  });

  it("lends a whole page's memory, and moves to a copy before the next change", () => {
    const page = new Page(0, CHUNK, SECTOR, new ChunkBuffers(CHUNK));
    expect(page.lend(0, CHUNK)).toBeUndefined(); // nothing known
    page.write(0, pattern(4, 0, 8));
    expect(page.lend(0, 8 * SECTOR)).toBeUndefined(); // not fully known
    page.fillFrom(0, Buffer.from(STORED), CHUNK);
    const view = page.lend(0, CHUNK)!;
    const before = Buffer.from(view);
    page.write(0, pattern(5, 0, 8));
    expect(Buffer.from(view).equals(before)).toBe(true);
    // A partial zero copies too (a whole-chunk zero just drops the buffer).
    const again = page.lend(0, CHUNK)!;
    const beforeZero = Buffer.from(again);
    page.zero(SPAN_BYTES, SPAN_BYTES);
    expect(Buffer.from(again).equals(beforeZero)).toBe(true);
    expect(Buffer.from(view).equals(before)).toBe(true);
    expect(page.memoryBytes).toBe(CHUNK); // the copy replaced the lent buffer
    const out = Buffer.alloc(8 * SECTOR);
    page.copyOut(0, out);
    expect(out.equals(Buffer.from(pattern(5, 0, 8)))).toBe(true);
  });

  it("holds one span for a small write, and only the spans written", () => {
    const page = new Page(0, CHUNK, SECTOR, new ChunkBuffers(CHUNK));
    page.write(3 * SECTOR, pattern(1, 3, 1));
    expect(page.memoryBytes).toBe(SPAN_BYTES);
    page.write(CHUNK - SECTOR, pattern(2, SECTORS - 1, 1));
    expect(page.memoryBytes).toBe(2 * SPAN_BYTES);
    // Zeroing needs no storage: absent spans read as zeros.
    page.zero(8 * SPAN_BYTES, 4 * SPAN_BYTES);
    expect(page.memoryBytes).toBe(2 * SPAN_BYTES);
    const out = Buffer.alloc(4 * SPAN_BYTES, 0xff);
    page.copyOut(8 * SPAN_BYTES, out);
    expect(out.equals(Buffer.alloc(4 * SPAN_BYTES))).toBe(true);
  });

  it("keeps zeros beside a write into a span that had none", () => {
    const page = new Page(0, CHUNK, SECTOR, new ChunkBuffers(CHUNK));
    page.zero(0, SPAN_BYTES); // known zeros, no storage
    page.write(SECTOR, pattern(3, 1, 1)); // now the span gets storage
    const out = Buffer.alloc(SPAN_BYTES);
    page.copyOut(0, out);
    const expected = Buffer.alloc(SPAN_BYTES);
    Buffer.from(pattern(3, 1, 1)).copy(expected, SECTOR);
    expect(out.equals(expected)).toBe(true);
  });

  it("adopts a fetched chunk, keeping the newer sectors it already held", () => {
    const page = new Page(0, CHUNK, SECTOR, new ChunkBuffers(CHUNK));
    page.write(5 * SECTOR, pattern(9, 5, 2));
    const fetched = Buffer.from(STORED);
    page.fillFrom(0, fetched, CHUNK);
    expect(page.fullyValid).toBe(true);
    expect(page.memoryBytes).toBe(CHUNK);
    const out = Buffer.alloc(CHUNK);
    page.copyOut(0, out);
    const expected = Buffer.from(STORED);
    Buffer.from(pattern(9, 5, 2)).copy(expected, 5 * SECTOR);
    expect(out.equals(expected)).toBe(true);
  });

  it("refuses each write-back transition from a state it does not start from", () => {
    const page = new Page(0, CHUNK, SECTOR, new ChunkBuffers(CHUNK));
    expect(() => page.beginUpload()).toThrow(/beginUpload from clean/);
    expect(() => page.uploadSucceeded()).toThrow(/uploadSucceeded from clean/);
    expect(() => page.uploadFailed()).toThrow(/uploadFailed from clean/);
    page.write(0, pattern(1, 0, 1));
    expect(page.state).toBe("dirty");
    expect(() => page.uploadSucceeded()).toThrow(/uploadSucceeded from dirty/);
    page.upload = Promise.resolve();
    page.beginUpload();
    expect(() => page.beginUpload()).toThrow(/beginUpload from writing/);
    page.write(0, pattern(2, 0, 1));
    expect(page.state).toBe("writing-redirtied");
    expect(() => page.beginUpload()).toThrow(/beginUpload from writing-redirtied/);
    page.upload = undefined;
    page.uploadSucceeded();
    expect(page.state).toBe("dirty");
    expect(page.durableSeq).toBe(1);
    page.checkInvariants();
  });
});
