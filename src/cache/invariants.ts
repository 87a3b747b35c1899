/**
 * The page cache checks itself, as s3backer's `block_cache_check_invariants` does: the
 * structures and totals the cache keeps must agree with the pages, at every point where the
 * cache waits (between two synchronous steps nothing may be half-moved). The model tests call
 * it after every operation, so drift in an account fails the step that caused it, with a
 * message naming the account, instead of surfacing later as a wrong bound or lost data.
 *
 * What holds:
 * - each page's own accounts (`Page.checkInvariants`: spans and memory, known sectors, state
 *   against its sequence numbers and its upload);
 * - the dirty set's totals equal the sums over its pages (`DirtySet.checkInvariants`: memory,
 *   uploads in flight and their memory, a dirtiedAt exactly for each dirty page, the bounds,
 *   the peaks);
 * - a chunk has at most one page: none is both dirty and in the clean LRU;
 * - every page is filed under its own chunk; dirty ones are dirty, LRU ones clean, with no
 *   upload and everything durable; none of them has retired (given its memory back);
 * - the LRU charges each page what it holds now (a page that grew or shrank was re-sized), the
 *   charges add up to the LRU's size, and that size is within its bound;
 * - clean and dirty pages together hold at most the cache's memory, unless no clean page is
 *   left to evict (dirty pages alone may reach their own bound).
 *
 * It walks every page and every sector: for tests, not for production.
 */

import assert from "node:assert/strict";
import type { LRUCache } from "lru-cache";
import type { DirtySet } from "./dirty-set.js";
import type { Page } from "./page.js";

/** What the checker looks at: the cache's two homes for pages. */
export interface CacheState {
  readonly dirty: DirtySet;
  readonly clean: LRUCache<number, Page>;
  /** What the clean LRU charges a page. */
  readonly chargeOf: (page: Page) => number;
  /** The memory of clean and dirty pages together, at most. */
  readonly cacheBytes: number;
}

/** Throw an `AssertionError` naming the first invariant of the cache found false. */
export function checkCacheInvariants({ dirty, clean, chargeOf, cacheBytes }: CacheState): void {
  dirty.checkInvariants();
  for (const page of dirty.pages()) {
    page.checkInvariants();
    assert(!page.retired, `dirty page ${page.index} has retired`);
    assert(
      clean.peek(page.index) === undefined,
      `chunk ${page.index} has a dirty page and a page in the clean LRU`,
    );
  }
  let chargedBytes = 0;
  for (const [index, entry] of clean.dump()) {
    const page = entry.value;
    assert.equal(page.index, index, `clean page ${page.index} is filed under chunk ${index}`);
    assert.equal(page.state, "clean", `page ${index} is in the clean LRU but ${page.state}`);
    assert(!page.retired, `clean page ${index} has retired but is still in the LRU`);
    page.checkInvariants();
    const charge = chargeOf(page);
    assert.equal(
      entry.size,
      charge,
      `clean page ${index} is charged ${entry.size} bytes but holds ${charge}`,
    );
    chargedBytes += charge;
  }
  assert.equal(
    clean.calculatedSize,
    chargedBytes,
    `the clean LRU's size ${clean.calculatedSize} is not its pages' ${chargedBytes}`,
  );
  assert(
    clean.calculatedSize <= clean.maxSize,
    `the clean LRU holds ${clean.calculatedSize} bytes, past its ${clean.maxSize}`,
  );
  assert(
    clean.size === 0 || clean.calculatedSize + dirty.memoryBytes <= cacheBytes,
    `clean pages (${clean.calculatedSize} bytes) and dirty ones (${dirty.memoryBytes}) hold` +
      ` more than the cache's ${cacheBytes}`,
  );
}
