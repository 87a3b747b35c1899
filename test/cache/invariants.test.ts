/**
 * The cache's invariant checker must fail on the corruptions it exists to catch: each case
 * builds the cache's structures (a dirty set, a clean LRU), keeps them right through their own
 * methods, then changes one thing behind an account's back.
 */

import { LRUCache } from "lru-cache";
import { describe, expect, it } from "vitest";
import { DirtySet } from "../../src/cache/dirty-set.js";
import { checkCacheInvariants } from "../../src/cache/invariants.js";
import { ChunkBuffers } from "../../src/cache/chunk-buffers.js";
import { Page, SPAN_BYTES } from "../../src/cache/page.js";
import { pattern } from "../support/volumes.js";

const CHUNK = 64 * 1024;
const SECTOR = 512;
const BUFFERS = new ChunkBuffers(CHUNK);

const chargeOf = (page: Page) => Math.max(page.memoryBytes, page.overheadBytes);

function structures() {
  const dirty = new DirtySet({
    maxDirtyBytes: 4 * CHUNK,
    maxDirtyChunks: 4,
    writebackThresholdBytes: 2 * CHUNK,
    writebackThresholdChunks: 2,
  });
  const clean = new LRUCache<number, Page>({ maxSize: 8 * CHUNK, sizeCalculation: chargeOf });
  const check = () => checkCacheInvariants({ dirty, clean, chargeOf, cacheBytes: 8 * CHUNK });
  return { dirty, clean, check };
}

/** A page of chunk `index`, dirty in `dirty` with one written span. */
function dirtyPage(dirty: DirtySet, index: number): Page {
  const page = new Page(index, CHUNK, SECTOR, BUFFERS);
  dirty.add(page, 0);
  dirty.resize(page, (p) => p.write(0, pattern(index + 1, 0, SPAN_BYTES / SECTOR)));
  return page;
}

describe("the cache's invariant checker", () => {
  it("passes structures kept through their own methods", () => {
    const { dirty, clean, check } = structures();
    const page = dirtyPage(dirty, 0);
    dirty.uploadStarted(page, Promise.resolve());
    dirty.resize(page, (p) => p.write(SPAN_BYTES, pattern(9, 8, 8)));
    clean.set(1, new Page(1, CHUNK, SECTOR, BUFFERS));
    check();
    expect(dirty.memoryBytes).toBe(2 * SPAN_BYTES);
    expect(dirty.backlogBytes).toBe(0);
  });

  it("finds dirty memory that a write changed behind the dirty set's back", () => {
    const { dirty, check } = structures();
    const page = dirtyPage(dirty, 0);
    page.write(2 * SPAN_BYTES, pattern(2, 16, 8)); // not through dirty.resize
    expect(check).toThrow(/dirty memory 4096 is not the dirty pages' 8192/);
  });

  it("finds an upload that ended without telling the dirty set", () => {
    const { dirty, check } = structures();
    const page = dirtyPage(dirty, 0);
    dirty.uploadStarted(page, Promise.resolve());
    check();
    page.upload = undefined; // not through dirty.uploadEnded
    expect(check).toThrow(/uploading pages 1, but 0 dirty pages have an upload/);
  });

  it("finds a chunk with both a dirty page and a clean one", () => {
    const { dirty, clean, check } = structures();
    dirtyPage(dirty, 3);
    clean.set(3, new Page(3, CHUNK, SECTOR, BUFFERS));
    expect(check).toThrow(/chunk 3 has a dirty page and a page in the clean LRU/);
  });

  it("finds a dirty page in the clean LRU", () => {
    const { clean, check } = structures();
    const page = new Page(2, CHUNK, SECTOR, BUFFERS);
    clean.set(2, page);
    page.write(0, pattern(1, 0, 1)); // a write to a page nobody moved to the dirty set
    expect(check).toThrow(/page 2 is in the clean LRU but dirty/);
  });

  it("finds a clean page that grew without being charged for it", () => {
    const { clean, check } = structures();
    const page = new Page(5, CHUNK, SECTOR, BUFFERS);
    clean.set(5, page);
    check();
    page.fillFrom(0, Buffer.alloc(CHUNK, 7), CHUNK); // not re-set in the LRU
    expect(check).toThrow(/clean page 5 is charged \d+ bytes but holds 65536/);
  });

  it("finds a retired page still in the clean LRU", () => {
    const { clean, check } = structures();
    const page = new Page(6, CHUNK, SECTOR, BUFFERS);
    clean.set(6, page);
    page.retire(); // gave its memory back, but nobody took it out of the LRU
    expect(check).toThrow(/clean page 6 has retired but is still in the LRU/);
  });

  it("finds clean and dirty pages that together hold more than the cache", () => {
    const { dirty, clean, check } = structures();
    for (let i = 0; i < 8; i++) {
      const page = new Page(10 + i, CHUNK, SECTOR, BUFFERS);
      page.fillFrom(0, Buffer.alloc(CHUNK, i), CHUNK);
      clean.set(10 + i, page); // the LRU alone is full, and within its bound
    }
    check();
    dirtyPage(dirty, 0); // nobody evicted a clean page to make room for it
    expect(check).toThrow(/clean pages \(524288 bytes\) and dirty ones \(4096\) hold more than/);
  });
});
