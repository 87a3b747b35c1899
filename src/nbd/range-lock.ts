/**
 * A reader-writer lock over byte ranges of one export, so that a read-modify-write cannot lose
 * a concurrent write.
 *
 * An unaligned write reads the sectors at its edges, merges its bytes in, and writes whole
 * sectors back. If another write to those sectors landed between that read and that write, its
 * bytes would be overwritten with the stale ones: acknowledged data lost. So a read-modify-write
 * holds its range *exclusively*, and every other modification (aligned writes, discards) holds
 * its range *shared*: they do not conflict with one another, only with a read-modify-write.
 * Reads take no lock (a read concurrent with a write may see either contents anyway).
 *
 * One lock per export, not per connection: every connection to an export shares its device.
 *
 * Grants are first come, first served: a request waits for every held lock it conflicts with
 * and for every earlier waiter it conflicts with, so a stream of aligned writes cannot starve a
 * read-modify-write. The common case (no exclusive lock anywhere) is a Set insertion.
 */

import assert from "node:assert/strict";

/** A held lock; give it back with {@link RangeLock.release}. */
export interface RangeHold {
  readonly startBytes: number;
  readonly endBytes: number;
  readonly exclusive: boolean;
}

interface Waiter extends RangeHold {
  readonly grant: (hold: RangeHold) => void;
}

function conflicts(a: RangeHold, b: RangeHold): boolean {
  return (a.exclusive || b.exclusive) && a.startBytes < b.endBytes && b.startBytes < a.endBytes;
}

export class RangeLock {
  readonly #held = new Set<RangeHold>();
  #waiting: Waiter[] = [];
  /** Exclusive locks held or waited for; 0 enables the fast path. */
  #exclusives = 0;

  /** Locks held now (for tests). */
  get heldCount(): number {
    return this.#held.size;
  }

  /** Take `[startBytes, endBytes)` at once if nothing conflicts, else undefined. */
  tryAcquire(startBytes: number, endBytes: number, exclusive: boolean): RangeHold | undefined {
    assert(startBytes < endBytes, "a lock covers at least one byte");
    const hold: RangeHold = { startBytes, endBytes, exclusive };
    if (!exclusive && this.#exclusives === 0) {
      this.#held.add(hold);
      return hold;
    }
    if (!this.#grantable(hold, this.#waiting.length)) return undefined;
    if (exclusive) this.#exclusives++;
    this.#held.add(hold);
    return hold;
  }

  /** Take `[startBytes, endBytes)`, waiting for conflicting holders and earlier waiters. */
  acquire(startBytes: number, endBytes: number, exclusive: boolean): Promise<RangeHold> {
    const now = this.tryAcquire(startBytes, endBytes, exclusive);
    if (now !== undefined) return Promise.resolve(now);
    if (exclusive) this.#exclusives++;
    return new Promise((grant) => {
      this.#waiting.push({ startBytes, endBytes, exclusive, grant });
    });
  }

  release(hold: RangeHold): void {
    const had = this.#held.delete(hold);
    assert(had, "released a range lock that is not held");
    if (hold.exclusive) this.#exclusives--;
    if (this.#waiting.length > 0) this.#wake();
  }

  /** No held lock conflicts, and no waiter before position `before` does. */
  #grantable(hold: RangeHold, before: number): boolean {
    for (const other of this.#held) if (conflicts(hold, other)) return false;
    for (let i = 0; i < before; i++) if (conflicts(hold, this.#waiting[i]!)) return false;
    return true;
  }

  #wake(): void {
    const still: Waiter[] = [];
    for (const waiter of this.#waiting) {
      // A waiter must also yield to the waiters still queued before it.
      let blocked = false;
      for (const other of this.#held) if (conflicts(waiter, other)) blocked = true;
      for (const other of still) if (conflicts(waiter, other)) blocked = true;
      if (blocked) {
        still.push(waiter);
        continue;
      }
      const hold: RangeHold = {
        startBytes: waiter.startBytes,
        endBytes: waiter.endBytes,
        exclusive: waiter.exclusive,
      };
      this.#held.add(hold);
      waiter.grant(hold);
    }
    this.#waiting = still;
  }
}
