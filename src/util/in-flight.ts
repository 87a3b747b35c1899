/**
 * A count of the operations running, and a way to wait until none is. It replaces a set of
 * their promises on the hot path: entering and leaving cost an increment, where adding a fresh
 * promise to a set costs a hash and an allocation per request.
 */

import assert from "node:assert/strict";

export class InFlight {
  #count = 0;
  #waiters: (() => void)[] = [];

  /** Operations running now. */
  get count(): number {
    return this.#count;
  }

  /** An operation starts; pair it with one {@link leave}. */
  enter(): void {
    this.#count++;
  }

  /** An operation ended. */
  leave(): void {
    assert(this.#count > 0, "InFlight.leave without enter");
    if (--this.#count > 0) return;
    const waiters = this.#waiters;
    this.#waiters = [];
    for (const resolve of waiters) resolve();
  }

  /**
   * Resolves once no operation is running: at once if none is. Operations that start before
   * then are waited for too, so the caller stops new ones first.
   */
  idle(): Promise<void> {
    if (this.#count === 0) return Promise.resolve();
    return new Promise((resolve) => this.#waiters.push(resolve));
  }
}
