/**
 * Chunk-sized buffers for one cache, reused instead of left to the garbage collector, and the
 * loans of page memory to NBD replies.
 *
 * Why: every whole chunk a cold read fetches used to be a fresh 1 MiB allocation. V8 counts such
 * memory against its heap limits, so a cold sequential read ran a full mark-compact every ~18 MiB
 * (56 per GiB, measured with `--trace-gc`), and major GC was a quarter of the server's CPU. The
 * pages evicted behind the read are exactly the buffers the next fetches need.
 *
 * The rule that makes reuse safe: a buffer goes back to the free list only when nothing can read
 * or write it any more, which takes two things.
 *
 * - Its owner (a page) has *retired* it. A page retires its buffer when it leaves the cache
 *   (evicted from the clean LRU), when a whole-chunk zero drops it, or when it moves to a copy
 *   because the buffer is lent. A retired page keeps no view of it (page.ts).
 * - No *loan* of it is outstanding. `lend` counts a view handed to a reader that outlives the
 *   call (an NBD reply waiting in the socket); `returnLoan` ends it, once the socket has taken
 *   the bytes. A buffer retired while lent goes to the free list at its last return.
 *
 * Only buffers this pool made are reused (`take`); retiring any other is a no-op, and a loan of
 * any buffer is counted, so that a page knows whether it must copy before writing (copy-on-write,
 * page.ts). A loan never returned (a reply lost with its connection) only keeps its buffer from
 * reuse: the collector takes it, as before. At most `maxFreeBytes` wait in the free list.
 */

import assert from "node:assert/strict";

export interface ChunkBufferStats {
  /** Buffers `take` allocated, and those it handed out again from the free list. */
  readonly allocated: number;
  readonly reused: number;
  /** Bytes in the free list now. */
  readonly freeBytes: number;
}

/** The free buffers a cache keeps for reuse, at most, by default. */
export const DEFAULT_MAX_FREE_BYTES = 16 * 1024 * 1024;

export class ChunkBuffers {
  readonly chunkSizeBytes: number;
  readonly #maxFree: number;
  readonly #free: Buffer[] = [];
  /** Buffers this pool made, and so may reuse. */
  readonly #ours = new WeakSet<ArrayBufferLike>();
  /** Loans outstanding, per buffer lent (absent: none). */
  readonly #loans = new WeakMap<ArrayBufferLike, number>();
  /** Our buffers retired while lent: they join the free list at their last return. */
  readonly #retiredLent = new WeakSet<ArrayBufferLike>();
  /** Our buffers in the free list (a second retire of one is a bug: two owners). */
  readonly #inFree = new WeakSet<ArrayBufferLike>();
  #allocated = 0;
  #reused = 0;

  /** `maxFreeBytes`: free buffers kept for reuse, at most (at least one). */
  constructor(chunkSizeBytes: number, maxFreeBytes = DEFAULT_MAX_FREE_BYTES) {
    assert(chunkSizeBytes > 0);
    this.chunkSizeBytes = chunkSizeBytes;
    this.#maxFree = Math.max(1, Math.floor(maxFreeBytes / chunkSizeBytes));
  }

  stats(): ChunkBufferStats {
    return {
      allocated: this.#allocated,
      reused: this.#reused,
      freeBytes: this.#free.length * this.chunkSizeBytes,
    };
  }

  /** A chunk-sized buffer of its own (no other view of it exists), contents unspecified. */
  take(): Buffer {
    const free = this.#free.pop();
    if (free !== undefined) {
      this.#inFree.delete(free.buffer);
      this.#reused++;
      return free;
    }
    this.#allocated++;
    // allocUnsafeSlow: a buffer with an ArrayBuffer of its own, never a slice of Node's pool.
    const buffer = Buffer.allocUnsafeSlow(this.chunkSizeBytes);
    this.#ours.add(buffer.buffer);
    return buffer;
  }

  /**
   * The owner gives `buffer` up and keeps no view of it: it is reused once no loan of it is
   * outstanding. Buffers this pool did not make are left to the collector.
   */
  retire(buffer: Buffer): void {
    const backing = buffer.buffer;
    if (!this.#ours.has(backing) || buffer.byteOffset !== 0) return;
    assert(!this.#inFree.has(backing), "a buffer retired twice");
    if (this.#loans.has(backing)) this.#retiredLent.add(backing);
    else this.#addFree(buffer);
  }

  /** A view of `buffer` is handed to a reader who will {@link returnLoan} it. */
  lend(buffer: Uint8Array): void {
    const backing = buffer.buffer;
    this.#loans.set(backing, (this.#loans.get(backing) ?? 0) + 1);
  }

  /** True while a loan of `buffer` is outstanding: its owner must not write it. */
  isLent(buffer: Uint8Array): boolean {
    return this.#loans.has(buffer.buffer);
  }

  /** The reader of a lent view (any view of the lent buffer) is done with it. */
  returnLoan(view: Uint8Array): void {
    const backing = view.buffer;
    const loans = this.#loans.get(backing);
    assert(loans !== undefined, "a loan returned that was never made (or returned twice)");
    if (loans > 1) {
      this.#loans.set(backing, loans - 1);
      return;
    }
    this.#loans.delete(backing);
    if (this.#retiredLent.delete(backing)) {
      this.#addFree(Buffer.from(backing, 0, this.chunkSizeBytes));
    }
  }

  #addFree(buffer: Buffer): void {
    assert.equal(buffer.byteLength, this.chunkSizeBytes);
    if (this.#free.length >= this.#maxFree) return;
    this.#free.push(buffer);
    this.#inFree.add(buffer.buffer);
  }
}
