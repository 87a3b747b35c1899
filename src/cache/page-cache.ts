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
 * cache of N chunks. `cacheBytes` bounds the memory of clean and dirty pages together. Clean
 * pages live in an LRU, which evicts its least recently used pages whenever the two together
 * would pass it (as s3backer's block cache counts its dirty blocks). Dirty pages live outside
 * the LRU, under two more bounds:
 *
 * - `maxDirtyBytes`, the memory dirty pages hold, at most half of `cacheBytes` (so that reads
 *   keep room for their pages and a read-ahead window);
 * - `maxDirtyChunks`, the number of dirty pages, which bounds the work of a flush (one upload,
 *   and for a partial page one GET, per dirty chunk).
 *
 * A write that would pass either waits for write-back (backpressure), and fails if write-back
 * fails meanwhile. Uploads take their image only when their turn in the request queue comes, so
 * images are bounded by the queue's concurrency. Peak memory is thus about `cacheBytes +
 * concurrency * chunkSizeBytes`, whatever the workload, plus the free chunk buffers
 * (chunk-buffers.ts). Not counted: dirty pages' bookkeeping (~5 KiB each, at most
 * `maxDirtyChunks` of them), buffers still lent to NBD replies after their page moved on, and
 * the chunks a read fetches past the cache when its pages were evicted meanwhile.
 *
 * ## Write-back
 *
 * A dirty page is uploaded once it has been dirty for `writebackDelayMs`; the oldest pages are
 * uploaded at once while dirty bytes or dirty chunks not yet uploading exceed half their bound,
 * when a writer is waiting for room, and every page on `flush`.
 * Rewriting a dirty page before then costs nothing more, so rewriting one sector a thousand times
 * costs one upload.
 *
 * ## Modules
 *
 * `PageCache` is the coordinator: it finds pages, fetches what reads miss, and moves pages
 * between the clean LRU and the dirty set. Each other job has a module of its own:
 *
 * - page.ts: one page's bytes, known sectors and state transitions;
 * - chunk-pieces.ts: splitting a request into per-chunk pieces;
 * - read-policy.ts: what a miss fetches, and what is read ahead;
 * - dirty-set.ts: the dirty pages and their accounts, bounds and thresholds;
 * - writeback.ts: when uploads start, what their end does, writers waiting for room;
 * - invariants.ts: the cross-checks the model tests run after every step.
 */

import { LRUCache } from "lru-cache";
import type { ChunkStore } from "../volume/chunk-store.js";
import type { Clock } from "../util/clock.js";
import { ChunkBuffers } from "./chunk-buffers.js";
import { ChunkPieces } from "./chunk-pieces.js";
import { DirtySet } from "./dirty-set.js";
import { checkCacheInvariants } from "./invariants.js";
import { Page, type Fetched } from "./page.js";
import { defaultReadPolicySettings, ReadPolicy, type ReadPolicySettings } from "./read-policy.js";
import { Writeback } from "./writeback.js";

export { WritebackError } from "./writeback.js";

export interface PageCacheOptions {
  readonly chunks: ChunkStore;
  readonly sectorSize: number;
  readonly clock: Clock;
  /** Memory of the pages kept, clean and dirty together. Default 256 MiB. */
  readonly cacheBytes?: number;
  /**
   * Memory held by dirty pages at most; writers wait past it. Default 128 MiB; at most half of
   * `cacheBytes`, at least 2 chunks.
   */
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
   * read-ahead window is also capped at half of the room dirty pages leave in `cacheBytes`, so
   * that read-ahead never evicts the pages it fetched before the guest reads them.
   */
  readonly readPolicy?: Partial<Omit<ReadPolicySettings, "chunkSizeBytes">>;
  /** Told of write-back failures. */
  readonly onWritebackError?: (error: Error) => void;
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
  /** Chunk buffers allocated, and reused from evicted pages instead (chunk-buffers.ts). */
  chunkBuffersAllocated: number;
  chunkBuffersReused: number;
}

/** Fill the caller's buffers for the current piece from `page`, or zeros (no page: no object). */
function copyPiece(pieces: ChunkPieces, page: Page | undefined): void {
  if (page === undefined) pieces.forEachView((_at, bytes) => bytes.fill(0));
  else pieces.forEachView((at, bytes) => page.copyOut(at, bytes));
}

/** The memory of clean and dirty pages together, at most, by default (`--cache-size`). */
export const DEFAULT_CACHE_BYTES = 256 * 1024 * 1024;
/** The dirty pages' memory, at most, by default (`maxDirtyBytes`, `--dirty-size`). */
export const DEFAULT_MAX_DIRTY_BYTES = 128 * 1024 * 1024;

/** Dirty pages at most, by default (`maxDirtyChunks`, `--dirty-chunks`). */
export const DEFAULT_MAX_DIRTY_CHUNKS = 1024;
/** How long a page stays dirty before its upload, by default (`--writeback-delay`). */
export const DEFAULT_WRITEBACK_DELAY_MS = 5000;

/** The dirty bound a cache of `cacheBytes` allows at most: half of it. */
export function maxDirtyBytesIn(cacheBytes: number): number {
  return Math.floor(cacheBytes / 2);
}

export class PageCache {
  readonly chunkSizeBytes: number;
  readonly #chunks: ChunkStore;
  readonly #sectorSize: number;
  readonly #clock: Clock;
  readonly #policy: ReadPolicy;
  readonly #dirty: DirtySet;
  readonly #writeback: Writeback;
  readonly #clean: LRUCache<number, Page>;
  readonly #buffers: ChunkBuffers;
  /** The memory clean and dirty pages hold together, at most (`cacheBytes`). */
  readonly #cacheBytes: number;
  /** A whole chunk's GET body goes into a reused chunk buffer, which the page then adopts. */
  readonly #allocate = (lengthBytes: number): Buffer | undefined =>
    lengthBytes === this.chunkSizeBytes ? this.#buffers.take() : undefined;
  /** Ranged GETs in flight, per page, each settled (never rejected) once it ends. */
  readonly #rangedInFlight = new Map<
    Page,
    { startBytes: number; endBytes: number; done: Promise<void> }[]
  >();
  /** Chunks whose read-ahead fill may still wait in the queue, at read-ahead priority. */
  readonly #readaheadQueued = new Set<number>();
  #readHits = 0;
  #readMisses = 0;

  constructor(options: PageCacheOptions) {
    this.#chunks = options.chunks;
    this.chunkSizeBytes = options.chunks.superblock.chunkSizeBytes;
    this.#sectorSize = options.sectorSize;
    this.#clock = options.clock;
    const cacheBytes = Math.max(1, options.cacheBytes ?? DEFAULT_CACHE_BYTES);
    this.#cacheBytes = cacheBytes;
    // Dirty pages are part of the cache's memory, and may hold at most half of it, so that
    // reads always have room for their pages and a read-ahead window.
    const maxDirtyBytes = Math.max(
      2 * this.chunkSizeBytes,
      Math.min(maxDirtyBytesIn(cacheBytes), options.maxDirtyBytes ?? DEFAULT_MAX_DIRTY_BYTES),
    );
    const maxDirtyChunks = Math.max(2, options.maxDirtyChunks ?? DEFAULT_MAX_DIRTY_CHUNKS);
    this.#dirty = new DirtySet({
      maxDirtyBytes,
      maxDirtyChunks,
      writebackThresholdBytes: Math.min(
        maxDirtyBytes,
        options.writebackThresholdBytes ?? maxDirtyBytes / 2,
      ),
      writebackThresholdChunks: Math.floor(maxDirtyChunks / 2),
    });
    this.#policy = new ReadPolicy(readPolicySettings(options, this.chunkSizeBytes));
    this.#buffers = new ChunkBuffers(this.chunkSizeBytes);
    this.#clean = new LRUCache<number, Page>({
      maxSize: cacheBytes,
      sizeCalculation: cleanChargeBytes,
      // An evicted page gives its buffer back for the next fetch. (Pages deleted from the LRU
      // to become dirty, or to be resized, are not leaving the cache.)
      dispose: (page, _index, reason) => {
        if (reason === "evict") page.retire();
      },
    });
    this.#writeback = new Writeback({
      chunks: options.chunks,
      dirty: this.#dirty,
      clock: options.clock,
      writebackDelayMs: options.writebackDelayMs ?? DEFAULT_WRITEBACK_DELAY_MS,
      onUploaded: (page) => {
        if (!this.#dirty.has(page)) this.#clean.set(page.index, page);
        this.#fitBudget();
      },
      onWritebackError: options.onWritebackError,
    });
  }

  stats(): CacheStats {
    const dirty = this.#dirty;
    return {
      dirtyBytes: dirty.memoryBytes,
      peakDirtyBytes: dirty.peakBytes,
      dirtyChunks: dirty.size,
      peakDirtyChunks: dirty.peakChunks,
      backlogChunks: dirty.backlogChunks,
      backlogBytes: dirty.backlogBytes,
      cleanBytes: this.#clean.calculatedSize,
      uploads: this.#writeback.uploads,
      uploadFailures: this.#writeback.uploadFailures,
      backpressureWaits: this.#writeback.backpressureWaits,
      readHits: this.#readHits,
      readMisses: this.#readMisses,
      chunkBuffersAllocated: this.#buffers.stats().allocated,
      chunkBuffersReused: this.#buffers.stats().reused,
    };
  }

  /**
   * Throw, with a message naming the first account found wrong, if the cache's structures and
   * totals disagree (invariants.ts). For tests: it walks every page.
   * @internal
   */
  checkInvariants(): void {
    checkCacheInvariants({
      dirty: this.#dirty,
      clean: this.#clean,
      chargeOf: cleanChargeBytes,
      cacheBytes: this.#cacheBytes,
    });
  }

  /**
   * Change `page`'s contents through `change(page)`, keeping the accounts of the memory it
   * holds: the dirty set's totals, or its size in the clean LRU; then the cache's budget.
   */
  #resize(page: Page, change: (page: Page) => void): void {
    if (this.#dirty.has(page)) {
      this.#dirty.resize(page, change);
    } else {
      const before = page.memoryBytes;
      change(page);
      if (page.memoryBytes !== before && this.#clean.peek(page.index) === page) {
        // lru-cache sizes an entry when it is added, not when the same value is set again.
        this.#clean.delete(page.index);
        this.#clean.set(page.index, page);
      }
    }
    this.#fitBudget();
  }

  /**
   * Evict the least recently used clean pages while clean and dirty pages together hold more
   * than `cacheBytes`. The LRU bounds the clean pages alone; this makes room for dirty ones,
   * after every change that grows either.
   */
  #fitBudget(): void {
    const dirtyBytes = this.#dirty.memoryBytes;
    while (this.#clean.calculatedSize + dirtyBytes > this.#cacheBytes && this.#clean.size > 0) {
      this.#clean.pop(); // disposed as "evict": the page retires
    }
  }

  // ---- reads -------------------------------------------------------------------------------

  /**
   * The read of {@link read}, done at once when every byte of it is in memory (a page that knows
   * it, or a chunk with no object); false, having done nothing, when something must be fetched.
   * A hit then costs no promise.
   */
  readFromMemory(offsetBytes: number, buffers: readonly Uint8Array[]): boolean {
    const pieces = ChunkPieces.ofBuffers(this.chunkSizeBytes, offsetBytes, buffers);
    while (pieces.next()) {
      const page = this.#dirty.get(pieces.index) ?? this.#clean.peek(pieces.index);
      const inMemory =
        page === undefined
          ? !this.#chunks.isAllocated(pieces.index)
          : page.isValid(pieces.chunkOffsetBytes, pieces.lengthBytes);
      if (!inMemory) return false;
    }
    pieces.rewind();
    while (pieces.next()) {
      this.#readHits++;
      copyPiece(pieces, this.#lookup(pieces.index));
    }
    this.#hitPlan(offsetBytes, pieces.requestBytes);
    return true;
  }

  /**
   * Bytes `[offsetBytes, +lengthBytes)` as a view of cache memory that nothing will ever write
   * (`Page.lend`: the page copies before it next changes), when they lie in one chunk whose page
   * holds all of it in one buffer; `undefined` otherwise. Counted as a read hit. Only reads of a
   * quarter of a chunk or more are lent, so the copy a later write may cost stays within 4× the
   * copy the read saved.
   */
  lend(offsetBytes: number, lengthBytes: number): Uint8Array | undefined {
    if (lengthBytes * 4 < this.chunkSizeBytes) return undefined;
    const pieces = new ChunkPieces(this.chunkSizeBytes, offsetBytes, lengthBytes);
    if (!pieces.next() || pieces.lengthBytes !== lengthBytes) return undefined;
    const page = this.#dirty.get(pieces.index) ?? this.#clean.get(pieces.index);
    const view = page?.lend(pieces.chunkOffsetBytes, lengthBytes);
    if (view === undefined) return undefined;
    this.#readHits++;
    try {
      this.#hitPlan(offsetBytes, lengthBytes);
    } catch (error) {
      this.#buffers.returnLoan(view); // never handed out
      throw error;
    }
    return view;
  }

  /** The reader of a view from {@link lend} is done with it: its memory may be reused. */
  returnLoan(view: Uint8Array): void {
    this.#buffers.returnLoan(view);
  }

  /** What a read answered from memory tells the read policy, and the read-ahead it starts. */
  #hitPlan(offsetBytes: number, lengthBytes: number): void {
    this.#readahead(
      this.#policy.onRead(offsetBytes, lengthBytes, this.#chunks.chunkCount, this.#readaheadRoom())
        .readahead,
    );
  }

  /** Fill `buffers`, laid end to end, from byte `offsetBytes` of the volume. */
  async read(offsetBytes: number, buffers: readonly Uint8Array[]): Promise<void> {
    const pieces = ChunkPieces.ofBuffers(this.chunkSizeBytes, offsetBytes, buffers);
    const requestBytes = pieces.requestBytes;
    const plan = this.#policy.onRead(
      offsetBytes,
      requestBytes,
      this.#chunks.chunkCount,
      this.#readaheadRoom(),
    );
    const { sequential } = plan;
    // Per piece: its page (undefined: a chunk with no object, zeros), and its fetch if any.
    const pages: (Page | undefined)[] = [];
    const loads: (Promise<Fetched | undefined> | undefined)[] = [];
    while (pieces.next()) {
      const { index, chunkOffsetBytes, lengthBytes } = pieces;
      const page = this.#lookup(index);
      if (page === undefined && !this.#chunks.isAllocated(index)) {
        this.#readHits++;
        pages.push(undefined);
        loads.push(undefined);
        continue;
      }
      const target = page ?? this.#newCleanPage(index);
      pages.push(target);
      if (target.isValid(chunkOffsetBytes, lengthBytes)) {
        this.#readHits++;
        loads.push(undefined);
      } else {
        this.#readMisses++;
        loads.push(this.#load(target, chunkOffsetBytes, lengthBytes, sequential, requestBytes));
      }
    }
    this.#readahead(plan.readahead);
    const fetched = await Promise.all(loads);
    // A page evicted meanwhile (by a read larger than the cache, or other reads' fetches) gave
    // its memory back: fetch those pieces' chunks again, past the cache, once each. That
    // includes pieces whose page handed bytes back: those may predate an upload that ended
    // since, and the retired page no longer knows the sectors to lay over them (#keep). A GET
    // issued after the eviction sees every upload of the page, and a page retires once, so
    // this ends.
    const refetched = new Set<number>();
    for (;;) {
      pieces.rewind();
      const refetches: Promise<void>[] = [];
      for (let i = 0; pieces.next(); i++) {
        if (pages[i]?.retired !== true || refetched.has(i)) continue;
        refetched.add(i);
        const read = this.#chunks.read(pieces.index, 0, this.chunkSizeBytes);
        refetches.push(read.then((bytes) => void (fetched[i] = { offsetBytes: 0, bytes })));
      }
      if (refetches.length === 0) break;
      await Promise.all(refetches);
    }
    // From here on synchronously, so every piece sees the page as it is now.
    pieces.rewind();
    for (let i = 0; pieces.next(); i++) {
      const page = pages[i];
      const scratch = fetched[i];
      if (page === undefined || scratch === undefined) {
        copyPiece(pieces, page);
      } else {
        // The page could not keep what was fetched (or left the cache): fetched bytes, then
        // what the page knows.
        pieces.forEachView((at, bytes) => {
          const from = at - scratch.offsetBytes;
          if (scratch.bytes === undefined) bytes.fill(0);
          else bytes.set(scratch.bytes.subarray(from, from + bytes.byteLength));
          page.copyKnownOut(at, bytes);
        });
      }
    }
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
    // A page evicted while this waited is no longer filled: the reader fetches past it.
    while (!page.retired && !page.isValid(offsetBytes, lengthBytes)) {
      if (page.fill === undefined) {
        const wholeWanted = this.#policy.wantsWhole(
          sequential,
          offsetBytes,
          offsetBytes + lengthBytes,
        );
        // A dirty page that could not keep the chunk would fetch it whole only to drop it.
        const keepable =
          !this.#dirty.has(page) ||
          this.#dirty.roomForCachedBytes(page.growthFor(0, this.chunkSizeBytes));
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
    const priority = readahead ? "readahead" : "guest";
    page.fill ??= this.#chunks
      .read(page.index, 0, this.chunkSizeBytes, { priority, allocate: this.#allocate })
      .then((bytes) => this.#keep(page, 0, bytes, this.chunkSizeBytes))
      .finally(() => {
        page.fill = undefined;
      });
    return page.fill;
  }

  /**
   * Put fetched bytes into `page`, unless it is dirty and they would take dirty memory past the
   * write-back threshold, or it is clean and would not fit beside the dirty pages even alone
   * (it would be evicted at once): then hand them back, for the readers to use once under what
   * the page knows. Bytes neither adopted nor handed back go back to the chunk buffers.
   *
   * A page that left the cache (retired) meanwhile takes nothing and hands nothing back: its
   * readers fetch again. The bytes may predate an upload of the page that ended while they
   * were in flight (a read after a write, of a chunk whose page was partial), and a retired
   * page no longer knows the sectors that upload stored, so it cannot correct them.
   */
  #keep(
    page: Page,
    offsetBytes: number,
    bytes: Uint8Array | undefined,
    lengthBytes: number,
  ): Fetched | undefined {
    if (page.retired) {
      if (Buffer.isBuffer(bytes)) this.#buffers.retire(bytes);
      return undefined;
    }
    const growth = bytes === undefined ? 0 : page.growthFor(offsetBytes, lengthBytes);
    const dirty = this.#dirty;
    const fits = dirty.has(page)
      ? dirty.roomForCachedBytes(growth)
      : dirty.memoryBytes + page.memoryBytes + growth <= this.#cacheBytes;
    if (!fits) return { offsetBytes, bytes };
    let adopted = false;
    this.#resize(page, (p) => (adopted = p.fillFrom(offsetBytes, bytes, lengthBytes)));
    if (!adopted && Buffer.isBuffer(bytes)) this.#buffers.retire(bytes);
    return undefined;
  }

  /**
   * The read-ahead window the cache has room for now: half of what dirty pages leave of
   * `cacheBytes` (the other half for the pages the guest is reading), whole chunks, at least one
   * while a chunk fits.
   */
  #readaheadRoom(): number {
    const chunk = this.chunkSizeBytes;
    const roomBytes = this.#cacheBytes - this.#dirty.memoryBytes;
    return roomBytes < chunk ? 0 : Math.max(chunk, Math.floor(roomBytes / 2 / chunk) * chunk);
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
    // Even an empty range names the chunk it starts in.
    const pieces = new ChunkPieces(this.chunkSizeBytes, offsetBytes, Math.max(lengthBytes, 1));
    const loads: Promise<unknown>[] = [];
    while (pieces.next()) {
      const index = pieces.index;
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
    const pieces = new ChunkPieces(this.chunkSizeBytes, offsetBytes, lengthBytes);
    while (pieces.next()) {
      const index = pieces.index;
      const page = this.#dirty.get(index) ?? this.#clean.peek(index);
      const allocated =
        page !== undefined && page.isDirty ? !page.isAllZero : this.#chunks.isAllocated(index);
      const last = extents.at(-1);
      if (last !== undefined && last.allocated === allocated) {
        last.lengthBytes += pieces.lengthBytes;
      } else {
        extents.push({
          offsetBytes: pieces.volumeOffsetBytes,
          lengthBytes: pieces.lengthBytes,
          allocated,
        });
      }
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
    const pieces = ChunkPieces.ofBuffers(this.chunkSizeBytes, offsetBytes, buffers);
    // The cursor stays on its piece until #pageForWrite returns: these read the current one.
    const growth = (page: Page) => page.growthFor(pieces.chunkOffsetBytes, pieces.lengthBytes);
    const modify = (page: Page) => pieces.forEachView((at, bytes) => page.write(at, bytes));
    while (pieces.next()) touched.push(await this.#pageForWrite(pieces.index, growth, modify));
    this.#writeback.modified();
    if (durable) await this.#writeback.makeDurable(touched.map((page) => [page, page.writeSeq]));
  }

  /**
   * The write of {@link write} (not durable), done at once when it falls in one chunk whose page
   * has room in the dirty bounds now; false, having done nothing, otherwise. A write that must
   * wait, or spans chunks, takes {@link write}.
   */
  writeToMemory(offsetBytes: number, buffers: readonly Uint8Array[]): boolean {
    const pieces = ChunkPieces.ofBuffers(this.chunkSizeBytes, offsetBytes, buffers);
    if (!pieces.next() || pieces.lengthBytes !== pieces.requestBytes) return false;
    const { chunkOffsetBytes, lengthBytes } = pieces;
    const page = this.#tryPageForWrite(pieces.index, (p) =>
      p.growthFor(chunkOffsetBytes, lengthBytes),
    );
    if (page === undefined) return false;
    // Modified synchronously with its return from #tryPageForWrite, as #pageForWrite does.
    this.#resize(page, (p) => pieces.forEachView((at, bytes) => p.write(at, bytes)));
    this.#writeback.modified();
    return true;
  }

  /** Set `lengthBytes` from `offsetBytes` to zeros; whole chunks lose their objects. */
  async discard(offsetBytes: number, lengthBytes: number): Promise<void> {
    const pieces = new ChunkPieces(this.chunkSizeBytes, offsetBytes, lengthBytes);
    const zero = (page: Page) => page.zero(pieces.chunkOffsetBytes, pieces.lengthBytes);
    while (pieces.next()) {
      // A chunk with no object and no page is zeros already.
      if (this.#lookup(pieces.index) !== undefined || this.#chunks.isAllocated(pieces.index)) {
        await this.#pageForWrite(pieces.index, noGrowth, zero);
      }
    }
    this.#writeback.modified();
  }

  /**
   * Modify the page for chunk `index` with `modify`, in the dirty set and out of the LRU; waits
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
        this.#resize(page, modify);
        return page;
      }
      await this.#writeback.waitForRoom();
    }
  }

  #tryPageForWrite(index: number, growth: (page: Page) => number): Page | undefined {
    const dirty = this.#dirty;
    const dirtyPage = dirty.get(index);
    if (dirtyPage !== undefined) {
      return dirty.hasRoomFor(growth(dirtyPage)) ? dirtyPage : undefined;
    }
    if (dirty.isFull) return undefined;
    let page = this.#clean.peek(index);
    if (page !== undefined && !dirty.roomForCachedBytes(page.memoryBytes + growth(page))) {
      // Its bytes are in the store: rather than crowd the dirty bound with them, start the
      // dirty page empty (its upload will fetch what it lacks). Readers already holding the
      // clean page were concurrent with this write and may see either.
      page = undefined;
    }
    page ??= new Page(index, this.chunkSizeBytes, this.#sectorSize, this.#buffers);
    if (!dirty.hasRoomFor(page.memoryBytes + growth(page))) return undefined;
    this.#clean.delete(index);
    dirty.add(page, this.#clock.nowMs());
    return page;
  }

  // ---- write-back --------------------------------------------------------------------------

  /** Make every write acknowledged so far durable. Throws the first upload failure. */
  async flush(): Promise<void> {
    const targets = [...this.#dirty.pages()].map((page) => [page, page.writeSeq] as const);
    await this.#writeback.makeDurable(targets);
  }

  // ---- helpers -----------------------------------------------------------------------------

  #lookup(index: number): Page | undefined {
    return this.#dirty.get(index) ?? this.#clean.get(index);
  }

  #newCleanPage(index: number): Page {
    const page = new Page(index, this.chunkSizeBytes, this.#sectorSize, this.#buffers);
    this.#clean.set(index, page);
    this.#fitBudget();
    return page;
  }

  /** Stop the write-back timer. Dirty pages stay as they are. */
  close(): void {
    this.#writeback.close();
  }
}

/** The read policy's settings: the defaults, then the options'. */
function readPolicySettings(options: PageCacheOptions, chunkSizeBytes: number): ReadPolicySettings {
  const chosen = { ...defaultReadPolicySettings(chunkSizeBytes), ...options.readPolicy };
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
    readaheadMinBytes: Math.min(chosen.readaheadMinBytes, chosen.readaheadMaxBytes),
  };
}

/** What the clean LRU charges a page: the memory it holds, at least its bookkeeping. */
function cleanChargeBytes(page: Page): number {
  return Math.max(page.memoryBytes, page.overheadBytes);
}

function noGrowth(): number {
  return 0;
}

function noop(): void {}
