/**
 * The write-back page cache: chunk-sized pages in front of a volume's chunk objects.
 *
 * ## Page states
 *
 * | state             | meaning                                  | evictable | moves to                                       |
 * |-------------------|------------------------------------------|-----------|------------------------------------------------|
 * | clean             | agrees with the store (where valid)      | yes (LRU) | dirty, on a write or discard                   |
 * | dirty             | holds writes the store lacks             | no        | writing, when its upload takes its snapshot    |
 * | writing           | a snapshot is being uploaded             | no        | clean, on success; dirty, on failure; writing-redirtied, on a write |
 * | writing-redirtied | written again since the snapshot         | no        | dirty, when the upload ends either way         |
 *
 * A failed upload (after the store layer's retries) puts the page back to dirty: dirty data is
 * never dropped. The cache retries it later with backoff, and the next flush retries it at once.
 *
 * ## Partial pages
 *
 * A page tracks which sectors it knows. A write lands in the page at once, without fetching the
 * chunk; a read of sectors the page does not know fetches them (a ranged GET, or the whole chunk
 * when the request is large or sequential). The read-modify-write happens only at upload time,
 * and only for a page that is not fully known, so a chunk overwritten whole costs no GET.
 *
 * ## Memory
 *
 * Clean pages live in an LRU bounded by `cacheBytes`. Dirty pages live outside it, bounded by
 * `maxDirtyBytes`: a write that needs a new dirty page while the bound is reached waits for
 * write-back (backpressure), and fails if write-back fails meanwhile. Uploads take their
 * snapshot only when their turn in the request queue comes, so snapshots are bounded by the
 * queue's concurrency. Peak memory is thus about `cacheBytes + maxDirtyBytes + concurrency *
 * chunkSizeBytes`, whatever the workload.
 *
 * ## Write-back
 *
 * A dirty page is uploaded once it has been dirty for `writebackDelayMs`; the oldest pages are
 * uploaded at once while dirty bytes exceed `writebackThresholdBytes`, when a writer is waiting
 * for room, and every page on `flush`.
 * Rewriting a dirty page before then costs nothing more, so rewriting one sector a thousand times
 * costs one upload.
 */

import assert from "node:assert/strict";
import { LRUCache } from "lru-cache";
import type { ChunkStore } from "../volume/chunk-store.js";
import type { Clock } from "../util/clock.js";
import { Page } from "./page.js";

export interface PageCacheOptions {
  readonly chunks: ChunkStore;
  readonly sectorSize: number;
  readonly clock: Clock;
  /** Bytes of clean pages kept. Default 256 MiB. */
  readonly cacheBytes?: number;
  /** Bytes of dirty pages at most; writers wait past it. Default 128 MiB (at least 2 chunks). */
  readonly maxDirtyBytes?: number;
  /**
   * Upload a dirty page after this long. Default 5000 ms: measured on RGW, 1 s re-uploaded every
   * hot chunk each second and cut random 4 KiB writes from 86k to 24k IOPS; flush and FUA do not
   * wait for it.
   */
  readonly writebackDelayMs?: number;
  /** Upload the oldest pages past this many dirty bytes. Default half of `maxDirtyBytes`. */
  readonly writebackThresholdBytes?: number;
  /** A read miss needing at least this many bytes of a chunk fetches all of it. Default chunk/4. */
  readonly wholeChunkReadBytes?: number;
  /**
   * The smallest span a ranged GET asks for, aligned: a power of two, at least the check block.
   * Default 64 KiB.
   */
  readonly minRangedReadBytes?: number;
  /** Chunks fetched ahead of a sequential reader. Default 4. */
  readonly readaheadChunks?: number;
  /** Told of write-back failures. */
  readonly onWritebackError?: (error: Error) => void;
}

/** A write waited for room in the dirty bound, and write-back failed meanwhile. */
export class WritebackError extends Error {
  override readonly name = "WritebackError";
}

/** A run of bytes that either holds data or certainly reads as zeros. */
export interface Extent {
  readonly offsetBytes: number;
  lengthBytes: number;
  readonly allocated: boolean;
}

/** Figures for tests and the benchmark. */
export interface CacheStats {
  dirtyBytes: number;
  peakDirtyBytes: number;
  cleanBytes: number;
  uploads: number;
  uploadFailures: number;
  backpressureWaits: number;
}

interface Piece {
  /** Offset in the chunk. */
  readonly chunkOffsetBytes: number;
  /** A view of the caller's buffer. */
  readonly bytes: Uint8Array;
}

const MAX_RETRY_DELAY_MS = 30_000;

export class PageCache {
  readonly chunkSizeBytes: number;
  readonly #chunks: ChunkStore;
  readonly #sectorSize: number;
  readonly #clock: Clock;
  readonly #maxDirtyBytes: number;
  readonly #writebackDelayMs: number;
  readonly #writebackThresholdBytes: number;
  readonly #wholeChunkReadBytes: number;
  readonly #readaheadChunks: number;
  readonly #minRangedReadBytes: number;
  readonly #onWritebackError: ((error: Error) => void) | undefined;
  readonly #zeroChunk: Buffer;

  readonly #dirty = new Map<number, Page>();
  readonly #dirtiedAtMs = new Map<number, number>();
  readonly #clean: LRUCache<number, Page>;
  #roomWaiters: { resolve: () => void; reject: (error: Error) => void }[] = [];
  #cancelTimer: (() => void) | undefined;
  #retryDelayMs = 0;
  /** Pages whose upload is queued or in flight. */
  #uploadingPages = 0;
  #lastReadEndBytes = -1;
  #closed = false;
  #stats: CacheStats = {
    dirtyBytes: 0,
    peakDirtyBytes: 0,
    cleanBytes: 0,
    uploads: 0,
    uploadFailures: 0,
    backpressureWaits: 0,
  };

  constructor(options: PageCacheOptions) {
    this.#chunks = options.chunks;
    this.chunkSizeBytes = options.chunks.superblock.chunkSizeBytes;
    this.#sectorSize = options.sectorSize;
    this.#clock = options.clock;
    this.#maxDirtyBytes = Math.max(
      2 * this.chunkSizeBytes,
      options.maxDirtyBytes ?? 128 * 1024 * 1024,
    );
    this.#writebackDelayMs = options.writebackDelayMs ?? 5000;
    this.#writebackThresholdBytes = options.writebackThresholdBytes ?? this.#maxDirtyBytes / 2;
    this.#wholeChunkReadBytes = options.wholeChunkReadBytes ?? this.chunkSizeBytes / 4;
    this.#readaheadChunks = options.readaheadChunks ?? 4;
    this.#minRangedReadBytes = Math.min(
      this.chunkSizeBytes,
      Math.max(options.chunks.superblock.checkBlockBytes, options.minRangedReadBytes ?? 64 * 1024),
    );
    this.#onWritebackError = options.onWritebackError;
    this.#zeroChunk = Buffer.alloc(this.chunkSizeBytes);
    this.#clean = new LRUCache<number, Page>({
      maxSize: Math.max(1, options.cacheBytes ?? 256 * 1024 * 1024),
      sizeCalculation: () => this.chunkSizeBytes,
    });
  }

  stats(): CacheStats {
    return {
      ...this.#stats,
      dirtyBytes: this.#dirtyBytes(),
      cleanBytes: this.#clean.calculatedSize,
    };
  }

  /** Bytes of dirty pages now. */
  #dirtyBytes(): number {
    return this.#dirty.size * this.chunkSizeBytes;
  }

  // ---- reads -------------------------------------------------------------------------------

  /** Fill `buffers`, laid end to end, from byte `offsetBytes` of the volume. */
  async read(offsetBytes: number, buffers: readonly Uint8Array[]): Promise<void> {
    const byChunk = this.#split(offsetBytes, buffers);
    const sequential = offsetBytes === this.#lastReadEndBytes;
    this.#lastReadEndBytes = offsetBytes + sumLengths(buffers);
    const loads: Promise<void>[] = [];
    const ready: { page: Page | undefined; pieces: Piece[] }[] = [];
    for (const [index, pieces] of byChunk) {
      const page = this.#lookup(index);
      if (page === undefined && !this.#chunks.isAllocated(index)) {
        ready.push({ page: undefined, pieces });
        continue;
      }
      const target = page ?? this.#newCleanPage(index);
      const first = pieces[0];
      const last = pieces.at(-1);
      assert(first !== undefined && last !== undefined);
      const start = first.chunkOffsetBytes;
      const end = last.chunkOffsetBytes + last.bytes.byteLength;
      if (!target.isValid(start, end - start)) {
        loads.push(this.#load(target, start, end - start, sequential));
      }
      ready.push({ page: target, pieces });
    }
    if (sequential) this.#readahead(byChunk);
    await Promise.all(loads);
    for (const { page, pieces } of ready) {
      for (const piece of pieces) {
        if (page === undefined) piece.bytes.fill(0);
        else page.copyOut(piece.chunkOffsetBytes, piece.bytes);
      }
    }
  }

  /**
   * Make `[offset, +length)` of `page` valid. Large or sequential misses, and a second miss in
   * the same chunk, fetch the whole chunk (shared by every reader that needs it meanwhile);
   * small random misses fetch an aligned span of at least `minRangedReadBytes`, since on S3 a
   * 64 KiB ranged GET costs no more than a 4 KiB one.
   */
  async #load(page: Page, offsetBytes: number, lengthBytes: number, sequential: boolean) {
    while (!page.isValid(offsetBytes, lengthBytes)) {
      if (page.fill !== undefined) {
        await page.fill;
        continue;
      }
      if (sequential || lengthBytes >= this.#wholeChunkReadBytes || page.rangedReads > 0) {
        await this.#fillWhole(page);
        continue;
      }
      const span = this.#minRangedReadBytes;
      const start = Math.floor(offsetBytes / span) * span;
      const end = Math.min(
        this.chunkSizeBytes,
        Math.ceil((offsetBytes + lengthBytes) / span) * span,
      );
      page.rangedReads++;
      const bytes = await this.#chunks.read(page.index, start, end - start);
      page.fillFrom(start, bytes, end - start);
    }
  }

  #fillWhole(page: Page): Promise<void> {
    if (page.fill === undefined) {
      page.fill = this.#chunks
        .read(page.index, 0, this.chunkSizeBytes)
        .then((bytes) => page.fillFrom(0, bytes, this.chunkSizeBytes))
        .finally(() => {
          page.fill = undefined;
        });
    }
    return page.fill;
  }

  /** Start fetching the chunks after a sequential read, if they are stored and not cached. */
  #readahead(byChunk: Map<number, Piece[]>): void {
    const lastIndex = [...byChunk.keys()].at(-1);
    if (lastIndex === undefined) return;
    for (let i = lastIndex + 1; i <= lastIndex + this.#readaheadChunks; i++) {
      if (i >= this.#chunks.chunkCount) break;
      if (this.#lookup(i) !== undefined || !this.#chunks.isAllocated(i)) continue;
      // A failed readahead is forgotten: the page stays unfilled and a real read retries.
      this.#fillWhole(this.#newCleanPage(i)).catch(() => {});
    }
  }

  /**
   * Load the chunks overlapping `[offsetBytes, +lengthBytes)` into the cache, whole, without
   * copying them anywhere: NBD_CMD_CACHE.
   */
  async prefetch(offsetBytes: number, lengthBytes: number): Promise<void> {
    const first = Math.floor(offsetBytes / this.chunkSizeBytes);
    const last = Math.floor((offsetBytes + Math.max(lengthBytes, 1) - 1) / this.chunkSizeBytes);
    const loads: Promise<void>[] = [];
    for (let index = first; index <= last; index++) {
      const page = this.#lookup(index);
      if (page === undefined && !this.#chunks.isAllocated(index)) continue;
      const target = page ?? this.#newCleanPage(index);
      if (!target.fullyValid) loads.push(this.#load(target, 0, this.chunkSizeBytes, true));
    }
    await Promise.all(loads);
  }

  /**
   * Which parts of `[offsetBytes, +lengthBytes)` hold data, in runs: `allocated: false` means
   * the range certainly reads as zeros (no object and no page with data). Chunk-granular.
   */
  allocationMap(offsetBytes: number, lengthBytes: number): Extent[] {
    const extents: Extent[] = [];
    const end = offsetBytes + lengthBytes;
    let at = offsetBytes;
    while (at < end) {
      const index = Math.floor(at / this.chunkSizeBytes);
      const next = Math.min(end, (index + 1) * this.chunkSizeBytes);
      const page = this.#dirty.get(index) ?? this.#clean.peek(index);
      const allocated =
        page !== undefined && page.isDirty ? !page.isAllZero : this.#chunks.isAllocated(index);
      const last = extents.at(-1);
      if (last !== undefined && last.allocated === allocated) last.lengthBytes += next - at;
      else extents.push({ offsetBytes: at, lengthBytes: next - at, allocated });
      at = next;
    }
    return extents;
  }

  // ---- writes ------------------------------------------------------------------------------

  /**
   * Write `buffers`, laid end to end, at byte `offsetBytes`. Resolves once the data is in the
   * cache; with `durable`, once it is in the store.
   */
  async write(offsetBytes: number, buffers: readonly Uint8Array[], durable = false): Promise<void> {
    const touched: Page[] = [];
    for (const [index, pieces] of this.#split(offsetBytes, buffers)) {
      const page = await this.#pageForWrite(index, (p) => {
        for (const piece of pieces) p.write(piece.chunkOffsetBytes, piece.bytes);
      });
      touched.push(page);
    }
    this.#afterModify();
    if (durable) await this.#makeDurable(touched.map((page) => [page, page.writeSeq]));
  }

  /** Set `lengthBytes` from `offsetBytes` to zeros; whole chunks lose their objects. */
  async discard(offsetBytes: number, lengthBytes: number): Promise<void> {
    let at = offsetBytes;
    const end = offsetBytes + lengthBytes;
    while (at < end) {
      const index = Math.floor(at / this.chunkSizeBytes);
      const chunkOffsetBytes = at - index * this.chunkSizeBytes;
      const pieceBytes = Math.min(end - at, this.chunkSizeBytes - chunkOffsetBytes);
      // A chunk with no object and no page is zeros already.
      if (this.#lookup(index) !== undefined || this.#chunks.isAllocated(index)) {
        await this.#pageForWrite(index, (p) => p.zero(chunkOffsetBytes, pieceBytes));
      }
      at += pieceBytes;
    }
    this.#afterModify();
  }

  /**
   * The page for chunk `index`, in the dirty map and out of the LRU, ready for a write; waits
   * for room when a new dirty page would pass the dirty bound.
   *
   * The page must be modified synchronously with its return from `#tryPageForWrite`: across an
   * `await`, an upload could finish and move it back to the clean LRU, and a write to it then
   * would be lost. Hence the split into a synchronous try and a separate wait.
   */
  async #pageForWrite(index: number, modify: (page: Page) => void): Promise<Page> {
    for (;;) {
      const page = this.#tryPageForWrite(index);
      if (page !== undefined) {
        modify(page);
        return page;
      }
      this.#stats.backpressureWaits++;
      await new Promise<void>((resolve, reject) => {
        this.#roomWaiters.push({ resolve, reject });
        this.#kick();
      });
    }
  }

  #tryPageForWrite(index: number): Page | undefined {
    const dirty = this.#dirty.get(index);
    if (dirty !== undefined) return dirty;
    if (this.#dirtyBytes() + this.chunkSizeBytes > this.#maxDirtyBytes) return undefined;
    const page = this.#clean.get(index) ?? new Page(index, this.chunkSizeBytes, this.#sectorSize);
    this.#clean.delete(index);
    this.#dirty.set(index, page);
    this.#dirtiedAtMs.set(index, this.#clock.nowMs());
    this.#stats.peakDirtyBytes = Math.max(this.#stats.peakDirtyBytes, this.#dirtyBytes());
    return page;
  }

  #afterModify(): void {
    if (this.#idleDirtyBytes() > this.#writebackThresholdBytes) this.#kick();
    else this.#armTimer();
  }

  // ---- write-back --------------------------------------------------------------------------

  /** Make every write acknowledged so far durable. Throws the first upload failure. */
  async flush(): Promise<void> {
    await this.#makeDurable([...this.#dirty.values()].map((page) => [page, page.writeSeq]));
  }

  async #makeDurable(targets: readonly (readonly [Page, number])[]): Promise<void> {
    const results = await Promise.allSettled(
      targets.map(async ([page, seq]) => {
        while (page.durableSeq < seq) {
          await (page.upload ?? this.#startUpload(page));
        }
      }),
    );
    const failed = results.find((r): r is PromiseRejectedResult => r.status === "rejected");
    if (failed !== undefined) throw failed.reason;
  }

  /**
   * Queue uploads, oldest dirty pages first: every page dirty for `writebackDelayMs`, plus as
   * many more as the dirty bytes not yet being uploaded exceed the background threshold, plus
   * one for each writer waiting for room that no upload in flight will serve. Pages beyond that
   * stay dirty, so rewrites of them cost nothing.
   */
  #kick(): void {
    if (this.#closed) return;
    this.#cancelTimer?.();
    this.#cancelTimer = undefined;
    const nowMs = this.#clock.nowMs();
    let excessBytes = Math.max(
      this.#idleDirtyBytes() - this.#writebackThresholdBytes,
      (this.#roomWaiters.length - this.#uploadingPages) * this.chunkSizeBytes,
    );
    for (const [index, page] of this.#dirty) {
      if (page.upload !== undefined || page.state !== "dirty") continue;
      const due = (this.#dirtiedAtMs.get(index) ?? 0) + this.#writebackDelayMs <= nowMs;
      // The map is in the order pages became dirty: once one is not due, few later ones are.
      if (!due && excessBytes <= 0) break;
      this.#startUpload(page).catch(() => {});
      excessBytes -= this.chunkSizeBytes;
    }
    this.#armTimer();
  }

  /** Bytes of dirty pages with no upload queued or in flight. */
  #idleDirtyBytes(): number {
    return (this.#dirty.size - this.#uploadingPages) * this.chunkSizeBytes;
  }

  /** Arrange a kick when the oldest waiting dirty page falls due. */
  #armTimer(): void {
    if (this.#closed || this.#cancelTimer !== undefined) return;
    let dueMs = Infinity;
    for (const [index, page] of this.#dirty) {
      if (page.upload !== undefined || page.state !== "dirty") continue;
      dueMs = Math.min(dueMs, (this.#dirtiedAtMs.get(index) ?? 0) + this.#writebackDelayMs);
    }
    if (dueMs === Infinity) return;
    const delayMs = Math.max(this.#retryDelayMs, dueMs - this.#clock.nowMs(), 0);
    this.#cancelTimer = this.#clock.schedule(() => {
      this.#cancelTimer = undefined;
      this.#kick();
    }, delayMs);
  }

  #startUpload(page: Page): Promise<void> {
    assert(page.upload === undefined && page.isDirty);
    let seq: number | undefined;
    const upload = this.#chunks
      .write(page.index, async (readWhole) => {
        if (!page.fullyValid) {
          const base = this.#chunks.isAllocated(page.index) ? await readWhole() : undefined;
          page.fillFrom(0, base, this.chunkSizeBytes);
        }
        seq = page.writeSeq;
        page.state = "writing";
        return page.snapshot(this.#zeroChunk);
      })
      .then(
        () => this.#uploaded(page, seq),
        (error: unknown) => this.#uploadFailed(page, error),
      )
      .finally(() => {
        page.upload = undefined;
        this.#uploadingPages--;
        this.#armTimer();
      });
    page.upload = upload;
    this.#uploadingPages++;
    return upload;
  }

  #uploaded(page: Page, seq: number | undefined): void {
    assert(seq !== undefined);
    this.#stats.uploads++;
    this.#retryDelayMs = 0;
    page.durableSeq = seq;
    if (page.state === "writing") {
      page.state = "clean";
      this.#dirty.delete(page.index);
      this.#dirtiedAtMs.delete(page.index);
      this.#clean.set(page.index, page);
      const waiters = this.#roomWaiters;
      this.#roomWaiters = [];
      for (const waiter of waiters) waiter.resolve();
    } else {
      page.state = "dirty";
      this.#dirtiedAtMs.set(page.index, this.#clock.nowMs());
    }
  }

  #uploadFailed(page: Page, error: unknown): never {
    this.#stats.uploadFailures++;
    page.state = "dirty";
    this.#retryDelayMs = Math.min(MAX_RETRY_DELAY_MS, Math.max(1000, this.#retryDelayMs * 2));
    const failure = error instanceof Error ? error : new Error(String(error));
    this.#onWritebackError?.(failure);
    const waiters = this.#roomWaiters;
    this.#roomWaiters = [];
    for (const waiter of waiters) {
      waiter.reject(
        new WritebackError(`write-back failed: ${failure.message}`, { cause: failure }),
      );
    }
    throw failure;
  }

  // ---- helpers -----------------------------------------------------------------------------

  #lookup(index: number): Page | undefined {
    return this.#dirty.get(index) ?? this.#clean.get(index);
  }

  #newCleanPage(index: number): Page {
    const page = new Page(index, this.chunkSizeBytes, this.#sectorSize);
    this.#clean.set(index, page);
    return page;
  }

  /** Split a request into the pieces that fall in each chunk, in chunk order. */
  #split(offsetBytes: number, buffers: readonly Uint8Array[]): Map<number, Piece[]> {
    const byChunk = new Map<number, Piece[]>();
    let at = offsetBytes;
    for (const buffer of buffers) {
      let done = 0;
      while (done < buffer.byteLength) {
        const index = Math.floor(at / this.chunkSizeBytes);
        const chunkOffsetBytes = at - index * this.chunkSizeBytes;
        const n = Math.min(buffer.byteLength - done, this.chunkSizeBytes - chunkOffsetBytes);
        const piece = { chunkOffsetBytes, bytes: buffer.subarray(done, done + n) };
        const list = byChunk.get(index);
        if (list === undefined) byChunk.set(index, [piece]);
        else list.push(piece);
        done += n;
        at += n;
      }
    }
    return byChunk;
  }

  /** Stop the write-back timer. Dirty pages stay as they are. */
  close(): void {
    this.#closed = true;
    this.#cancelTimer?.();
    this.#cancelTimer = undefined;
  }
}

function sumLengths(buffers: readonly Uint8Array[]): number {
  let n = 0;
  for (const b of buffers) n += b.byteLength;
  return n;
}
