/**
 * The write-back scheduler: when dirty pages are uploaded, the upload itself, what its end
 * does to the page, and the writers waiting for room in the dirty bounds.
 *
 * A dirty page is uploaded once it has been dirty for `writebackDelayMs`; the oldest pages at
 * once while the backlog passes a write-back threshold, or a writer waits for room; every page
 * the caller names in `makeDurable` (flush, FUA). An upload takes its image when its turn in
 * the chunk store's queue comes, so images are bounded by the queue's concurrency. A failed
 * upload puts the page back to dirty and fails the writers waiting for room; the next kick
 * waits a backoff (1 s doubling to 30 s), and a flush retries at once.
 *
 * The pages and their accounts are the dirty set's. The cache hears of every upload that
 * ended well (`onUploaded`): a page it left clean has left the dirty set, and the cache keeps
 * it in its clean LRU; either may have adopted the image and grown.
 */

import assert from "node:assert/strict";
import type { ChunkStore } from "../volume/chunk-store.js";
import type { Clock } from "../util/clock.js";
import type { DirtySet } from "./dirty-set.js";
import type { Page } from "./page.js";

export interface WritebackOptions {
  readonly chunks: ChunkStore;
  readonly dirty: DirtySet;
  readonly clock: Clock;
  /** Upload a dirty page after this long. */
  readonly writebackDelayMs: number;
  /**
   * `page`'s upload has ended well, and the page may hold more memory than before (it adopted
   * the image). A page left clean has left the dirty set: the cache keeps it.
   */
  readonly onUploaded: (page: Page) => void;
  /** Told of write-back failures. */
  readonly onWritebackError?: (error: Error) => void;
}

/** A write waited for room in the dirty bound, and write-back failed meanwhile. */
export class WritebackError extends Error {
  override readonly name = "WritebackError";
}

const MAX_RETRY_DELAY_MS = 30_000;

export class Writeback {
  readonly #chunks: ChunkStore;
  readonly #dirty: DirtySet;
  readonly #clock: Clock;
  readonly #writebackDelayMs: number;
  readonly #onUploaded: (page: Page) => void;
  readonly #onWritebackError: ((error: Error) => void) | undefined;
  readonly #zeroChunk: Buffer;
  #roomWaiters: { resolve: () => void; reject: (error: Error) => void }[] = [];
  #cancelTimer: (() => void) | undefined;
  #retryDelayMs = 0;
  #closed = false;
  #uploads = 0;
  #uploadFailures = 0;
  #backpressureWaits = 0;

  constructor(options: WritebackOptions) {
    this.#chunks = options.chunks;
    this.#dirty = options.dirty;
    this.#clock = options.clock;
    this.#writebackDelayMs = options.writebackDelayMs;
    this.#onUploaded = options.onUploaded;
    this.#onWritebackError = options.onWritebackError;
    this.#zeroChunk = Buffer.alloc(options.chunks.superblock.chunkSizeBytes);
  }

  /** Uploads that succeeded. */
  get uploads(): number {
    return this.#uploads;
  }

  /** Uploads that failed (after the store layer's retries). */
  get uploadFailures(): number {
    return this.#uploadFailures;
  }

  /** Times a writer waited for room. */
  get backpressureWaits(): number {
    return this.#backpressureWaits;
  }

  /** Wait until an upload ends well (there may be room then); rejects if one fails first. */
  waitForRoom(): Promise<void> {
    this.#backpressureWaits++;
    return new Promise<void>((resolve, reject) => {
      this.#roomWaiters.push({ resolve, reject });
      this.#kick();
    });
  }

  /** Dirty pages were modified: upload at once past a threshold, else when they fall due. */
  modified(): void {
    if (this.#dirty.pastThreshold) this.#kick();
    else this.#armTimer();
  }

  /**
   * Make each page durable up to its given `writeSeq`, uploading it (or joining its upload) as
   * often as it takes. Throws the first upload failure.
   */
  async makeDurable(targets: readonly (readonly [Page, number])[]): Promise<void> {
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

  /** Stop the timer; uploads in flight finish, and no new one starts by itself. */
  close(): void {
    this.#closed = true;
    this.#cancelTimer?.();
    this.#cancelTimer = undefined;
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
    let excessBytes = this.#dirty.excessBytes;
    let excessChunks = this.#dirty.excessChunks;
    let unservedWaiters = this.#roomWaiters.length - this.#dirty.uploadingPages;
    for (const page of this.#dirty.pages()) {
      if (page.upload !== undefined || page.state !== "dirty") continue;
      const due = this.#dirty.dirtiedAtMs(page) + this.#writebackDelayMs <= nowMs;
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
    for (const page of this.#dirty.pages()) {
      if (page.upload !== undefined || page.state !== "dirty") continue;
      dueMs = Math.min(dueMs, this.#dirty.dirtiedAtMs(page) + this.#writebackDelayMs);
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
          this.#dirty.uploadEnded(page);
          this.#uploaded(page, image);
        },
        (error: unknown) => {
          this.#dirty.uploadEnded(page);
          if (image !== undefined) page.dropImage(image);
          this.#uploadFailed(page, error);
        },
      )
      // A writer may be waiting for room that this upload did not free (its page was written
      // again meanwhile): then start the uploads that can, rather than wait for the timer.
      .finally(() => (this.#roomWaiters.length > 0 ? this.#kick() : this.#armTimer()));
    this.#dirty.uploadStarted(page, upload);
    return upload;
  }

  /**
   * The store holds `image` (undefined: no object) as of the page's image. A page written
   * meanwhile stays dirty; otherwise it is clean. Either way its unknown sectors may now be
   * taken from the image: a clean page adopts it (the LRU bounds it), a dirty one only while
   * dirty memory stays under the write-back threshold.
   */
  #uploaded(page: Page, image: Buffer | undefined): void {
    this.#uploads++;
    this.#retryDelayMs = 0;
    page.uploadSucceeded();
    const chunkSizeBytes = page.chunkSizeBytes;
    let adopted = false;
    if (page.state === "clean") {
      this.#dirty.remove(page);
      adopted = page.fillFrom(0, image, chunkSizeBytes);
      const waiters = this.#roomWaiters;
      this.#roomWaiters = [];
      for (const waiter of waiters) waiter.resolve();
    } else {
      this.#dirty.redirtied(page, this.#clock.nowMs());
      // Keep the image only while dirty memory stays under the write-back threshold, so that
      // pages kept whole never crowd out new writes.
      const growth = image === undefined ? 0 : page.growthFor(0, chunkSizeBytes);
      if (this.#dirty.roomForCachedBytes(growth)) {
        this.#dirty.resize(page, (p) => (adopted = p.fillFrom(0, image, chunkSizeBytes)));
      }
    }
    if (image !== undefined && !adopted) page.dropImage(image);
    this.#onUploaded(page);
  }

  #uploadFailed(page: Page, error: unknown): never {
    this.#uploadFailures++;
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
}

/** A `Buffer` over the same memory as `bytes`, without copying. */
function asBuffer(bytes: Uint8Array): Buffer {
  return Buffer.isBuffer(bytes)
    ? bytes
    : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}
