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
 * A page tracks which sectors it knows, and stores only the 4 KiB spans it holds (page.ts). A
 * write lands in the page at once, without fetching the chunk; a read of sectors the page does
 * not know fetches them (a ranged GET, or the whole chunk when the request is large or
 * sequential). The read-modify-write happens only at upload time, and only for a page that is
 * not fully known, so a chunk overwritten whole costs no GET. It builds the upload's image from
 * the fetched chunk without growing the page; the image then becomes the page's storage if the
 * page is clean after the upload, or if dirty memory stays under the write-back threshold.
 *
 * Dirty pages hold whole chunks only under that threshold: past it, a write to a cached clean
 * chunk starts an empty dirty page instead, so that fully cached chunks never crowd the dirty
 * bound and make every write wait for a whole-chunk upload.
 *
 * ## Memory, and the two dirty bounds
 *
 * Every page is charged for the memory it keeps alive: its spans. In the clean LRU a page is
 * charged at least its bookkeeping (~5 KiB for 1 MiB chunks), so that pages holding little or
 * nothing are not free; a whole chunk is charged its size, so a working set of N chunks fits a
 * cache of N chunks. Clean pages live in an LRU bounded by `cacheBytes`. Dirty pages live outside it,
 * under two bounds:
 *
 * - `maxDirtyBytes`, the memory dirty pages hold, which bounds memory;
 * - `maxDirtyChunks`, the number of dirty pages, which bounds the work of a flush (one upload,
 *   and for a partial page one GET, per dirty chunk).
 *
 * A write that would pass either waits for write-back (backpressure), and fails if write-back
 * fails meanwhile. Uploads take their image only when their turn in the request queue comes, so
 * images are bounded by the queue's concurrency. Peak memory is thus about `cacheBytes +
 * maxDirtyBytes + concurrency * chunkSizeBytes`, whatever the workload.
 *
 * ## Write-back
 *
 * A dirty page is uploaded once it has been dirty for `writebackDelayMs`; the oldest pages are
 * uploaded at once while dirty bytes or dirty chunks not yet uploading exceed half their bound,
 * when a writer is waiting for room, and every page on `flush`.
 * Rewriting a dirty page before then costs nothing more, so rewriting one sector a thousand times
 * costs one upload.
 */

import assert from "node:assert/strict";
import { LRUCache } from "lru-cache";
import type { ChunkStore } from "../volume/chunk-store.js";
import type { Clock } from "../util/clock.js";
import { Page, type Fetched } from "./page.js";
import { defaultReadPolicySettings, ReadPolicy, type ReadPolicySettings } from "./read-policy.js";

export interface PageCacheOptions {
  readonly chunks: ChunkStore;
  readonly sectorSize: number;
  readonly clock: Clock;
  /** Bytes of clean pages kept. Default 256 MiB. */
  readonly cacheBytes?: number;
  /** Memory held by dirty pages at most; writers wait past it. Default 128 MiB (at least 2 chunks). */
  readonly maxDirtyBytes?: number;
  /**
   * Dirty pages at most; writers wait past it. It bounds a flush's work: at most this many
   * uploads, each with a GET when the page is partial. Default 1024: with 1 MiB chunks, about
   * 4 s of read-modify-write at the ~270 per second RGW gives on this 2-core machine.
   */
  readonly maxDirtyChunks?: number;
  /**
   * Upload a dirty page after this long. Default 5000 ms: measured on RGW, 1 s re-uploaded every
   * hot chunk each second and cut random 4 KiB writes from 86k to 24k IOPS; flush and FUA do not
   * wait for it.
   */
  readonly writebackDelayMs?: number;
  /**
   * Upload the oldest pages past this many dirty bytes not yet uploading. Default half of
   * `maxDirtyBytes`. (The same holds for dirty chunks, at half of `maxDirtyChunks`.)
   */
  readonly writebackThresholdBytes?: number;
  /** A read miss needing at least this many bytes of a chunk fetches all of it. Default chunk/4. */
  readonly wholeChunkReadBytes?: number;
  /**
   * The smallest span a ranged GET asks for, aligned: a power of two, at least the check block.
   * Default 64 KiB.
   */
  readonly minRangedReadBytes?: number;
  /**
   * How misses are fetched and what is read ahead (read-policy.ts, where the defaults are). The
   * read-ahead window is capped at half of `cacheBytes`.
   */
  readonly readPolicy?: Partial<Omit<ReadPolicySettings, "chunkSizeBytes">>;
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

/** Figures for tests, the benchmark and the metrics. */
export interface CacheStats {
  /** Memory held by dirty pages. */
  dirtyBytes: number;
  peakDirtyBytes: number;
  dirtyChunks: number;
  peakDirtyChunks: number;
  /** Dirty pages not uploading yet (the write-back backlog), and the memory they hold. */
  backlogChunks: number;
  backlogBytes: number;
  cleanBytes: number;
  uploads: number;
  uploadFailures: number;
  backpressureWaits: number;
  /**
   * Chunks a read touched that were answered from memory (a page that knew the bytes, or a
   * chunk with no object, which reads as zeros without a request)...
   */
  readHits: number;
  /** ...and those that had to be fetched, whole or in part (read-ahead not counted). */
  readMisses: number;
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
  readonly #maxDirtyChunks: number;
  readonly #writebackDelayMs: number;
  readonly #writebackThresholdBytes: number;
  readonly #writebackThresholdChunks: number;
  readonly #policy: ReadPolicy;
  readonly #onWritebackError: ((error: Error) => void) | undefined;
  readonly #zeroChunk: Buffer;

  readonly #dirty = new Map<number, Page>();
  /** Ranged GETs in flight, per page, each settled (never rejected) once it ends. */
  readonly #rangedInFlight = new Map<
    Page,
    { startBytes: number; endBytes: number; done: Promise<void> }[]
  >();
  /** Chunks whose read-ahead fill may still wait in the queue, at read-ahead priority. */
  readonly #readaheadQueued = new Set<number>();
  readonly #dirtiedAtMs = new Map<number, number>();
  readonly #clean: LRUCache<number, Page>;
  #roomWaiters: { resolve: () => void; reject: (error: Error) => void }[] = [];
  #cancelTimer: (() => void) | undefined;
  #retryDelayMs = 0;
  /** Memory held by dirty pages. */
  #dirtyMemory = 0;
  /** Pages whose upload is queued or in flight, and the memory they hold. */
  #uploadingPages = 0;
  #uploadingMemory = 0;
  #closed = false;
  #stats: CacheStats = {
    dirtyBytes: 0,
    peakDirtyBytes: 0,
    dirtyChunks: 0,
    peakDirtyChunks: 0,
    cleanBytes: 0,
    uploads: 0,
    uploadFailures: 0,
    backpressureWaits: 0,
    backlogChunks: 0,
    backlogBytes: 0,
    readHits: 0,
    readMisses: 0,
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
    this.#maxDirtyChunks = Math.max(2, options.maxDirtyChunks ?? 1024);
    this.#writebackDelayMs = options.writebackDelayMs ?? 5000;
    this.#writebackThresholdBytes = options.writebackThresholdBytes ?? this.#maxDirtyBytes / 2;
    this.#writebackThresholdChunks = Math.floor(this.#maxDirtyChunks / 2);
    this.#policy = new ReadPolicy(readPolicySettings(options, this.chunkSizeBytes));
    this.#onWritebackError = options.onWritebackError;
    this.#zeroChunk = Buffer.alloc(this.chunkSizeBytes);
    this.#clean = new LRUCache<number, Page>({
      maxSize: Math.max(1, options.cacheBytes ?? 256 * 1024 * 1024),
      sizeCalculation: (page) => Math.max(page.memoryBytes, page.overheadBytes),
    });
  }

  stats(): CacheStats {
    return {
      ...this.#stats,
      dirtyBytes: this.#dirtyMemory,
      dirtyChunks: this.#dirty.size,
      backlogChunks: this.#dirty.size - this.#uploadingPages,
      backlogBytes: this.#dirtyMemory - this.#uploadingMemory,
      cleanBytes: this.#clean.calculatedSize,
    };
  }

  /**
   * Change `page`'s contents through `change`, keeping the accounts of the memory it holds: the
   * dirty and uploading totals, or its size in the clean LRU.
   */
  #resize(page: Page, change: () => void): void {
    const before = page.memoryBytes;
    change();
    const delta = page.memoryBytes - before;
    if (delta === 0) return;
    if (page.upload !== undefined) this.#uploadingMemory += delta;
    if (this.#dirty.get(page.index) === page) {
      this.#dirtyMemory += delta;
      this.#stats.peakDirtyBytes = Math.max(this.#stats.peakDirtyBytes, this.#dirtyMemory);
    } else if (this.#clean.peek(page.index) === page) {
      // lru-cache sizes an entry when it is added, not when the same value is set again.
      this.#clean.delete(page.index);
      this.#clean.set(page.index, page);
    }
  }

  // ---- reads -------------------------------------------------------------------------------

  /** Fill `buffers`, laid end to end, from byte `offsetBytes` of the volume. */
  async read(offsetBytes: number, buffers: readonly Uint8Array[]): Promise<void> {
    const byChunk = this.#split(offsetBytes, buffers);
    const requestBytes = sumLengths(buffers);
    const plan = this.#policy.onRead(offsetBytes, requestBytes, this.#chunks.chunkCount);
    const { sequential } = plan;
    const ready: {
      page: Page | undefined;
      pieces: Piece[];
      load?: Promise<Fetched | undefined>;
    }[] = [];
    for (const [index, pieces] of byChunk) {
      const page = this.#lookup(index);
      if (page === undefined && !this.#chunks.isAllocated(index)) {
        this.#stats.readHits++;
        ready.push({ page: undefined, pieces });
        continue;
      }
      const target = page ?? this.#newCleanPage(index);
      const { start, end } = extentOf(pieces);
      if (target.isValid(start, end - start)) {
        this.#stats.readHits++;
        ready.push({ page: target, pieces });
      } else {
        this.#stats.readMisses++;
        ready.push({
          page: target,
          pieces,
          load: this.#load(target, start, end - start, sequential, requestBytes),
        });
      }
    }
    this.#readahead(plan.readahead);
    const fetched = await Promise.all(ready.map((r) => r.load));
    // From here on synchronously, so every piece sees the page as it is now.
    ready.forEach(({ page, pieces }, i) => {
      const scratch = fetched[i];
      for (const piece of pieces) {
        if (page === undefined) {
          piece.bytes.fill(0);
        } else if (scratch === undefined) {
          page.copyOut(piece.chunkOffsetBytes, piece.bytes);
        } else {
          // The page could not keep what was fetched: fetched bytes, then what the page knows.
          const from = piece.chunkOffsetBytes - scratch.offsetBytes;
          if (scratch.bytes === undefined) piece.bytes.fill(0);
          else piece.bytes.set(scratch.bytes.subarray(from, from + piece.bytes.byteLength));
          page.copyKnownOut(piece.chunkOffsetBytes, piece.bytes);
        }
      }
    });
  }

  /**
   * Make `[offset, +length)` of `page` valid. The read policy says whether the miss fetches the
   * whole chunk (shared by every reader that needs it meanwhile) or a ranged span; joining a
   * read-ahead that is still queued moves it up to a guest read's priority.
   *
   * Resolves with the fetched bytes when the page could not keep them (see `#keep`); the
   * caller then reads from those, overlaid with what the page knows.
   */
  async #load(
    page: Page,
    offsetBytes: number,
    lengthBytes: number,
    sequential: boolean,
    requestBytes = lengthBytes,
  ): Promise<Fetched | undefined> {
    while (!page.isValid(offsetBytes, lengthBytes)) {
      if (page.fill === undefined) {
        const wholeWanted = this.#policy.wantsWhole(
          sequential,
          offsetBytes,
          offsetBytes + lengthBytes,
        );
        // A dirty page that could not keep the chunk would fetch it whole only to drop it.
        const keepable =
          this.#dirty.get(page.index) !== page ||
          this.#roomForCachedBytes(page.growthFor(0, this.chunkSizeBytes));
        if (!(wholeWanted && keepable)) {
          // A ranged GET in flight that covers this miss serves it (a guest's parallel reads of
          // neighbouring blocks would otherwise fetch one span twice); then look again.
          const covering = this.#rangedInFlight
            .get(page)
            ?.find((r) => r.startBytes <= offsetBytes && offsetBytes + lengthBytes <= r.endBytes);
          if (covering !== undefined) {
            await covering.done;
            continue;
          }
          const fetched = await this.#fetchRange(page, offsetBytes, lengthBytes, requestBytes);
          if (fetched !== undefined) return fetched;
          continue;
        }
        this.#fillWhole(page);
      } else if (this.#readaheadQueued.delete(page.index)) {
        this.#chunks.promote(page.index);
      }
      const fetched = await page.fill;
      if (fetched !== undefined) return fetched;
    }
    return undefined;
  }

  /** One ranged GET, of an aligned span the policy sizes by the request, for a small miss. */
  async #fetchRange(
    page: Page,
    offsetBytes: number,
    lengthBytes: number,
    requestBytes: number,
  ): Promise<Fetched | undefined> {
    const { startBytes: start, endBytes: end } = this.#policy.rangedSpan(
      offsetBytes,
      offsetBytes + lengthBytes,
      requestBytes,
    );
    const inFlight = this.#rangedInFlight.get(page) ?? [];
    this.#rangedInFlight.set(page, inFlight);
    const read = this.#chunks.read(page.index, start, end - start);
    const entry = { startBytes: start, endBytes: end, done: read.then(noop, noop) };
    inFlight.push(entry);
    try {
      return this.#keep(page, start, await read, end - start);
    } finally {
      inFlight.splice(inFlight.indexOf(entry), 1);
      if (inFlight.length === 0) this.#rangedInFlight.delete(page);
    }
  }

  /**
   * Fetch the whole chunk into `page`, once for every reader that needs it meanwhile; as
   * read-ahead, below the guest's reads in the queue.
   */
  #fillWhole(page: Page, readahead = false): Promise<Fetched | undefined> {
    page.fill ??= this.#chunks
      .read(page.index, 0, this.chunkSizeBytes, readahead ? "readahead" : "guest")
      .then((bytes) => this.#keep(page, 0, bytes, this.chunkSizeBytes))
      .finally(() => {
        page.fill = undefined;
      });
    return page.fill;
  }

  /**
   * Put fetched bytes into `page`, unless it is dirty and they would take dirty memory past the
   * write-back threshold: then hand them back, for the reader to use once.
   */
  #keep(
    page: Page,
    offsetBytes: number,
    bytes: Uint8Array | undefined,
    lengthBytes: number,
  ): Fetched | undefined {
    const growth = bytes === undefined ? 0 : page.growthFor(offsetBytes, lengthBytes);
    if (this.#dirty.get(page.index) === page && !this.#roomForCachedBytes(growth)) {
      return { offsetBytes, bytes };
    }
    this.#resize(page, () => page.fillFrom(offsetBytes, bytes, lengthBytes));
    return undefined;
  }

  /** Start fetching the chunks the policy reads ahead, if they are stored and not cached. */
  #readahead(indexes: readonly number[]): void {
    for (const i of indexes) {
      if (this.#lookup(i) !== undefined || !this.#chunks.isAllocated(i)) continue;
      this.#policy.readaheadStarted();
      this.#readaheadQueued.add(i);
      // A failed read-ahead is forgotten: the page stays unfilled and a real read retries.
      this.#fillWhole(this.#newCleanPage(i), true)
        .catch(() => {})
        .finally(() => {
          this.#readaheadQueued.delete(i);
          this.#policy.readaheadEnded();
        });
    }
  }

  /**
   * Load the chunks overlapping `[offsetBytes, +lengthBytes)` into the cache, whole, without
   * copying them anywhere: NBD_CMD_CACHE.
   */
  async prefetch(offsetBytes: number, lengthBytes: number): Promise<void> {
    const first = Math.floor(offsetBytes / this.chunkSizeBytes);
    const last = Math.floor((offsetBytes + Math.max(lengthBytes, 1) - 1) / this.chunkSizeBytes);
    const loads: Promise<unknown>[] = [];
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
      const { start, end } = extentOf(pieces);
      const page = await this.#pageForWrite(
        index,
        (p) => p.growthFor(start, end - start),
        (p) => {
          for (const piece of pieces) p.write(piece.chunkOffsetBytes, piece.bytes);
        },
      );
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
        await this.#pageForWrite(
          index,
          () => 0,
          (p) => p.zero(chunkOffsetBytes, pieceBytes),
        );
      }
      at += pieceBytes;
    }
    this.#afterModify();
  }

  /**
   * Modify the page for chunk `index` with `modify`, in the dirty map and out of the LRU; waits
   * for room while the memory `growth` says the change needs, or a new dirty page, would pass a
   * dirty bound.
   *
   * The page must be modified synchronously with its return from `#tryPageForWrite`: across an
   * `await`, an upload could finish and move it back to the clean LRU, and a write to it then
   * would be lost. Hence the split into a synchronous try and a separate wait.
   */
  async #pageForWrite(
    index: number,
    growth: (page: Page) => number,
    modify: (page: Page) => void,
  ): Promise<Page> {
    for (;;) {
      const page = this.#tryPageForWrite(index, growth);
      if (page !== undefined) {
        this.#resize(page, () => modify(page));
        return page;
      }
      this.#stats.backpressureWaits++;
      await new Promise<void>((resolve, reject) => {
        this.#roomWaiters.push({ resolve, reject });
        this.#kick();
      });
    }
  }

  #tryPageForWrite(index: number, growth: (page: Page) => number): Page | undefined {
    const dirty = this.#dirty.get(index);
    if (dirty !== undefined) {
      return this.#hasRoomFor(growth(dirty)) ? dirty : undefined;
    }
    if (this.#dirty.size >= this.#maxDirtyChunks) return undefined;
    let page = this.#clean.peek(index);
    if (page !== undefined && !this.#roomForCachedBytes(page.memoryBytes + growth(page))) {
      // Its bytes are in the store: rather than crowd the dirty bound with them, start the
      // dirty page empty (its upload will fetch what it lacks). Readers already holding the
      // clean page were concurrent with this write and may see either.
      page = undefined;
    }
    page ??= new Page(index, this.chunkSizeBytes, this.#sectorSize);
    if (!this.#hasRoomFor(page.memoryBytes + growth(page))) return undefined;
    this.#clean.delete(index);
    this.#dirty.set(index, page);
    this.#dirtiedAtMs.set(index, this.#clock.nowMs());
    this.#dirtyMemory += page.memoryBytes;
    this.#stats.peakDirtyBytes = Math.max(this.#stats.peakDirtyBytes, this.#dirtyMemory);
    this.#stats.peakDirtyChunks = Math.max(this.#stats.peakDirtyChunks, this.#dirty.size);
    return page;
  }

  /**
   * Whether dirty pages may hold `bytes` more of data the store already has (a cached chunk, a
   * fetch, an uploaded image): only under the write-back threshold, so that such bytes never
   * crowd out writes.
   */
  #roomForCachedBytes(bytes: number): boolean {
    return bytes === 0 || this.#dirtyMemory + bytes <= this.#writebackThresholdBytes;
  }

  /** Whether dirty pages may hold `bytes` more; a cache with nothing dirty always may. */
  #hasRoomFor(bytes: number): boolean {
    return (
      bytes === 0 || this.#dirtyMemory === 0 || this.#dirtyMemory + bytes <= this.#maxDirtyBytes
    );
  }

  #afterModify(): void {
    if (this.#pastThreshold()) this.#kick();
    else this.#armTimer();
  }

  /** True when the dirty pages not yet uploading pass half of either dirty bound. */
  #pastThreshold(): boolean {
    const excess = this.#idleExcess();
    return excess.bytes > 0 || excess.chunks > 0;
  }

  /** How far the dirty pages not yet uploading are past the write-back thresholds. */
  #idleExcess(): { bytes: number; chunks: number } {
    return {
      bytes: this.#dirtyMemory - this.#uploadingMemory - this.#writebackThresholdBytes,
      chunks: this.#dirty.size - this.#uploadingPages - this.#writebackThresholdChunks,
    };
  }

  // ---- write-back --------------------------------------------------------------------------

  /** Make every write acknowledged so far durable. Throws the first upload failure. */
  async flush(): Promise<void> {
    await this.#makeDurable([...this.#dirty.values()].map((page) => [page, page.writeSeq]));
  }

  async #makeDurable(targets: readonly (readonly [Page, number])[]): Promise<void> {
    const results = await Promise.allSettled(
      targets.map(async ([page, seq]) => {
        // An upload this flush joins may have begun before the store or the lease recovered
        // (its attempts ran out, or the fence refused one): its failure is forgiven once, and
        // the flush fails only if the next upload fails too.
        let forgiven = false;
        while (page.durableSeq < seq) {
          const joined = page.upload;
          if (joined === undefined) {
            await this.#startUpload(page);
            continue;
          }
          await joined.catch((error: unknown) => {
            if (forgiven) throw error;
            forgiven = true;
          });
        }
      }),
    );
    const failed = results.find((r): r is PromiseRejectedResult => r.status === "rejected");
    if (failed !== undefined) throw failed.reason;
  }

  /**
   * Queue uploads, oldest dirty pages first: every page dirty for `writebackDelayMs`, plus as
   * many more as the dirty pages not yet being uploaded exceed the background thresholds (in
   * bytes, and in chunks), plus one for each writer waiting for room that no upload in flight
   * will serve. Pages beyond that stay dirty, so rewrites of them cost nothing.
   */
  #kick(): void {
    if (this.#closed) return;
    this.#cancelTimer?.();
    this.#cancelTimer = undefined;
    const nowMs = this.#clock.nowMs();
    let { bytes: excessBytes, chunks: excessChunks } = this.#idleExcess();
    let unservedWaiters = this.#roomWaiters.length - this.#uploadingPages;
    for (const [index, page] of this.#dirty) {
      if (page.upload !== undefined || page.state !== "dirty") continue;
      const due = (this.#dirtiedAtMs.get(index) ?? 0) + this.#writebackDelayMs <= nowMs;
      // The map is in the order pages became dirty: once one is not due, few later ones are.
      if (!due && excessBytes <= 0 && excessChunks <= 0 && unservedWaiters <= 0) break;
      excessBytes -= page.memoryBytes;
      excessChunks--;
      unservedWaiters--;
      this.#startUpload(page).catch(() => {});
    }
    this.#armTimer();
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
    let image: Buffer | undefined;
    const upload = this.#chunks
      .write(page.index, async (readWhole) => {
        let base: Buffer | undefined;
        if (!page.fullyValid && this.#chunks.isAllocated(page.index)) {
          const stored = await readWhole();
          if (stored !== undefined) base = asBuffer(stored);
        }
        // From here to the return, synchronously: the image is the page as it is now.
        page.beginUpload();
        image = page.image(base, this.#zeroChunk);
        return image;
      })
      .then(
        () => {
          this.#uploadEnded(page);
          this.#uploaded(page, image);
        },
        (error: unknown) => {
          this.#uploadEnded(page);
          this.#uploadFailed(page, error);
        },
      )
      // A writer may be waiting for room that this upload did not free (its page was written
      // again meanwhile): then start the uploads that can, rather than wait for the timer.
      .finally(() => (this.#roomWaiters.length > 0 ? this.#kick() : this.#armTimer()));
    page.upload = upload;
    this.#uploadingPages++;
    this.#uploadingMemory += page.memoryBytes;
    return upload;
  }

  #uploadEnded(page: Page): void {
    page.upload = undefined;
    this.#uploadingPages--;
    this.#uploadingMemory -= page.memoryBytes;
  }

  /**
   * The store holds `image` (undefined: no object) as of the page's image. A page written meanwhile stays
   * dirty; otherwise it is clean. Either way its unknown sectors may now be taken from the
   * image: a clean page adopts it (the LRU bounds it), a dirty one only while dirty memory
   * stays under the write-back threshold.
   */
  #uploaded(page: Page, image: Buffer | undefined): void {
    this.#stats.uploads++;
    this.#retryDelayMs = 0;
    page.uploadSucceeded();
    if (page.state === "clean") {
      this.#dirty.delete(page.index);
      this.#dirtiedAtMs.delete(page.index);
      this.#dirtyMemory -= page.memoryBytes;
      page.fillFrom(0, image, this.chunkSizeBytes);
      this.#clean.set(page.index, page);
      const waiters = this.#roomWaiters;
      this.#roomWaiters = [];
      for (const waiter of waiters) waiter.resolve();
    } else {
      this.#dirtiedAtMs.set(page.index, this.#clock.nowMs());
      // Keep the image only while dirty memory stays under the write-back threshold, so that
      // pages kept whole never crowd out new writes.
      const growth = image === undefined ? 0 : page.growthFor(0, this.chunkSizeBytes);
      if (this.#roomForCachedBytes(growth)) {
        this.#resize(page, () => page.fillFrom(0, image, this.chunkSizeBytes));
      }
    }
  }

  #uploadFailed(page: Page, error: unknown): never {
    this.#stats.uploadFailures++;
    page.uploadFailed();
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

/** The read policy's settings: the defaults, the options', the window capped by the cache. */
function readPolicySettings(options: PageCacheOptions, chunkSizeBytes: number): ReadPolicySettings {
  const defaults = defaultReadPolicySettings(chunkSizeBytes);
  const cacheBytes = Math.max(1, options.cacheBytes ?? 256 * 1024 * 1024);
  const chosen = { ...defaults, ...options.readPolicy };
  const readaheadMaxBytes = Math.max(
    chunkSizeBytes,
    Math.min(
      chosen.readaheadMaxBytes,
      Math.floor(cacheBytes / 2 / chunkSizeBytes) * chunkSizeBytes,
    ),
  );
  return {
    ...chosen,
    wholeChunkReadBytes: options.wholeChunkReadBytes ?? chosen.wholeChunkReadBytes,
    minRangedReadBytes: Math.min(
      chunkSizeBytes,
      Math.max(
        options.chunks.superblock.checkBlockBytes,
        options.minRangedReadBytes ?? chosen.minRangedReadBytes,
      ),
    ),
    readaheadMaxBytes,
    readaheadMinBytes: Math.min(chosen.readaheadMinBytes, readaheadMaxBytes),
  };
}

/** The bytes of a chunk that a run of consecutive pieces covers. */
function extentOf(pieces: readonly Piece[]): { start: number; end: number } {
  const first = pieces[0];
  const last = pieces.at(-1);
  assert(first !== undefined && last !== undefined);
  return { start: first.chunkOffsetBytes, end: last.chunkOffsetBytes + last.bytes.byteLength };
}

function noop(): void {}

function sumLengths(buffers: readonly Uint8Array[]): number {
  let n = 0;
  for (const b of buffers) n += b.byteLength;
  return n;
}

/** A `Buffer` over the same memory as `bytes`, without copying. */
function asBuffer(bytes: Uint8Array): Buffer {
  return Buffer.isBuffer(bytes)
    ? bytes
    : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}
