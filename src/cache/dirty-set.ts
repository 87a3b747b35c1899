/**
 * The dirty pages and every account kept of them, in one owner: which pages are dirty and since
 * when, the memory they hold, which of them have an upload queued or in flight and the memory
 * those hold, the peaks, and the two bounds with their write-back thresholds.
 *
 * The cache changes a dirty page's contents only through `resize`, and moves pages in and out
 * only through `add` and `remove`, so the totals always equal the sums over the pages;
 * `checkInvariants` says so, for the tests. A page with an upload in flight is always dirty:
 * it leaves the set only once its upload succeeded and it is clean.
 *
 * Iteration is in the order pages became dirty, which write-back relies on (oldest first).
 */

import assert from "node:assert/strict";
import type { Page } from "./page.js";

export interface DirtyBounds {
  /** Memory held by dirty pages at most; writers wait past it. */
  readonly maxDirtyBytes: number;
  /** Dirty pages at most; writers wait past it. */
  readonly maxDirtyChunks: number;
  /** Dirty bytes not yet uploading past which write-back starts at once. */
  readonly writebackThresholdBytes: number;
  /** Dirty pages not yet uploading past which write-back starts at once. */
  readonly writebackThresholdChunks: number;
}

export class DirtySet {
  readonly bounds: DirtyBounds;
  /** By chunk index, in the order they became dirty. */
  readonly #pages = new Map<number, Page>();
  /** When each dirty page became dirty (or was written again during its upload). */
  readonly #dirtiedAtMs = new Map<number, number>();
  #memoryBytes = 0;
  #uploadingPages = 0;
  #uploadingMemoryBytes = 0;
  #peakBytes = 0;
  #peakChunks = 0;

  constructor(bounds: DirtyBounds) {
    this.bounds = bounds;
  }

  /** Dirty pages. */
  get size(): number {
    return this.#pages.size;
  }

  /** Memory held by dirty pages. */
  get memoryBytes(): number {
    return this.#memoryBytes;
  }

  get peakBytes(): number {
    return this.#peakBytes;
  }

  get peakChunks(): number {
    return this.#peakChunks;
  }

  /** Dirty pages with no upload queued or in flight: the write-back backlog. */
  get backlogChunks(): number {
    return this.#pages.size - this.#uploadingPages;
  }

  /** Memory the backlog holds. */
  get backlogBytes(): number {
    return this.#memoryBytes - this.#uploadingMemoryBytes;
  }

  /** Pages with an upload queued or in flight. */
  get uploadingPages(): number {
    return this.#uploadingPages;
  }

  get(index: number): Page | undefined {
    return this.#pages.get(index);
  }

  /** Whether `page` itself (not just a page of its chunk) is dirty. */
  has(page: Page): boolean {
    return this.#pages.get(page.index) === page;
  }

  /** The dirty pages, oldest first. */
  pages(): IterableIterator<Page> {
    return this.#pages.values();
  }

  /** When `page` became dirty (or was last written during an upload that then succeeded). */
  dirtiedAtMs(page: Page): number {
    return this.#dirtiedAtMs.get(page.index) ?? 0;
  }

  /** Whether a new dirty page would pass `maxDirtyChunks`. */
  get isFull(): boolean {
    return this.#pages.size >= this.bounds.maxDirtyChunks;
  }

  /** Whether dirty pages may hold `bytes` more; a cache with nothing dirty always may. */
  hasRoomFor(bytes: number): boolean {
    return (
      bytes === 0 ||
      this.#memoryBytes === 0 ||
      this.#memoryBytes + bytes <= this.bounds.maxDirtyBytes
    );
  }

  /**
   * Whether dirty pages may hold `bytes` more of data the store already has (a cached chunk, a
   * fetch, an uploaded image): only under the write-back threshold, so that such bytes never
   * crowd out writes.
   */
  roomForCachedBytes(bytes: number): boolean {
    return bytes === 0 || this.#memoryBytes + bytes <= this.bounds.writebackThresholdBytes;
  }

  /** How far the bytes of the backlog are past the write-back threshold. */
  get excessBytes(): number {
    return this.backlogBytes - this.bounds.writebackThresholdBytes;
  }

  /** How far the pages of the backlog are past the write-back threshold. */
  get excessChunks(): number {
    return this.backlogChunks - this.bounds.writebackThresholdChunks;
  }

  /** True when the backlog passes half of either dirty bound. */
  get pastThreshold(): boolean {
    return this.excessBytes > 0 || this.excessChunks > 0;
  }

  /** `page` becomes dirty (the caller modifies it next, through `resize`). */
  add(page: Page, nowMs: number): void {
    // A message built only on failure: this runs for every newly dirtied chunk.
    if (this.#pages.has(page.index)) assert.fail(`chunk ${page.index} is dirty already`);
    this.#pages.set(page.index, page);
    this.#dirtiedAtMs.set(page.index, nowMs);
    this.#memoryBytes += page.memoryBytes;
    this.#peakBytes = Math.max(this.#peakBytes, this.#memoryBytes);
    this.#peakChunks = Math.max(this.#peakChunks, this.#pages.size);
  }

  /** `page`'s upload succeeded and left it clean: it is no longer dirty. */
  remove(page: Page): void {
    assert(this.has(page) && page.upload === undefined && !page.isDirty);
    this.#pages.delete(page.index);
    this.#dirtiedAtMs.delete(page.index);
    this.#memoryBytes -= page.memoryBytes;
  }

  /** `page` was written during its upload, which succeeded: it is dirty as of now. */
  redirtied(page: Page, nowMs: number): void {
    assert(this.has(page));
    this.#dirtiedAtMs.set(page.index, nowMs);
  }

  /** Change dirty `page`'s contents through `change(page)`, keeping the memory totals. */
  resize(page: Page, change: (page: Page) => void): void {
    assert(this.has(page));
    const before = page.memoryBytes;
    change(page);
    const delta = page.memoryBytes - before;
    if (delta === 0) return;
    if (page.upload !== undefined) this.#uploadingMemoryBytes += delta;
    this.#memoryBytes += delta;
    this.#peakBytes = Math.max(this.#peakBytes, this.#memoryBytes);
  }

  /** `upload` of dirty `page` is queued. */
  uploadStarted(page: Page, upload: Promise<void>): void {
    assert(this.has(page) && page.upload === undefined && page.isDirty);
    page.upload = upload;
    this.#uploadingPages++;
    this.#uploadingMemoryBytes += page.memoryBytes;
  }

  /** `page`'s upload ended, either way. */
  uploadEnded(page: Page): void {
    assert(page.upload !== undefined);
    page.upload = undefined;
    this.#uploadingPages--;
    this.#uploadingMemoryBytes -= page.memoryBytes;
  }

  /**
   * Throw if a total disagrees with the pages: the memory and the uploads, the times, the
   * peaks and the bounds. For tests.
   * @internal
   */
  checkInvariants(): void {
    let memoryBytes = 0;
    let uploadingPages = 0;
    let uploadingMemoryBytes = 0;
    for (const [index, page] of this.#pages) {
      assert.equal(page.index, index, `dirty page ${page.index} is filed under chunk ${index}`);
      assert(page.isDirty, `page ${index} is in the dirty map but clean`);
      assert(this.#dirtiedAtMs.has(index), `dirty page ${index} has no dirtiedAt`);
      memoryBytes += page.memoryBytes;
      if (page.upload !== undefined) {
        uploadingPages++;
        uploadingMemoryBytes += page.memoryBytes;
      }
    }
    assert.equal(
      this.#memoryBytes,
      memoryBytes,
      `dirty memory ${this.#memoryBytes} is not the dirty pages' ${memoryBytes}`,
    );
    assert.equal(
      this.#uploadingPages,
      uploadingPages,
      `uploading pages ${this.#uploadingPages}, but ${uploadingPages} dirty pages have an upload`,
    );
    assert.equal(
      this.#uploadingMemoryBytes,
      uploadingMemoryBytes,
      `uploading memory ${this.#uploadingMemoryBytes} is not the uploading pages' ` +
        `${uploadingMemoryBytes}`,
    );
    for (const index of this.#dirtiedAtMs.keys()) {
      assert(this.#pages.has(index), `chunk ${index} has a dirtiedAt but no dirty page`);
    }
    const { maxDirtyBytes, maxDirtyChunks, writebackThresholdBytes } = this.bounds;
    assert(
      this.#pages.size <= maxDirtyChunks,
      `${this.#pages.size} dirty pages, past the bound of ${maxDirtyChunks}`,
    );
    // A cache with nothing dirty may take any one write (hasRoomFor), but a write adds at most
    // a chunk and the bound is at least two, so the bound holds all the same. Cached bytes are
    // kept up to the threshold, which an option may set above the bound.
    const boundBytes = Math.max(maxDirtyBytes, writebackThresholdBytes);
    assert(
      this.#memoryBytes <= boundBytes,
      `dirty memory ${this.#memoryBytes} is past the bound of ${boundBytes}`,
    );
    assert(this.#peakBytes >= this.#memoryBytes, "dirty memory is past its peak");
    assert(this.#peakChunks >= this.#pages.size, "dirty pages are past their peak");
  }
}
