/**
 * A store layer that refuses writes when the volume's lease no longer covers them. It sits below
 * the retry layer, so every attempt of every write is checked, not just the first: a retry loop
 * cannot carry a write past the moment the lease stops covering it.
 *
 * The fence starts open (a read-only open, or a store with no lease, is never fenced); the lease
 * arms it with a check that throws while writes are not allowed.
 */

import type { ObjectStore, PutOptions, PutResult, StoreError } from "./object-store.js";
import { StoreLayer } from "./store-layer.js";

/** Decides whether a write may be sent now. */
export class Fence {
  #check: (() => StoreError | undefined) | undefined;
  #exemptKeys = new Set<string>();

  /**
   * Refuse writes whenever `check` returns an error. The `exemptKeys` (the lease's own records:
   * the volume's claim and the process lease renewed through this store) stay writable.
   */
  arm(check: () => StoreError | undefined, ...exemptKeys: readonly string[]): void {
    this.#check = check;
    for (const key of exemptKeys) this.#exemptKeys.add(key);
  }

  /** Let writes of `keys` through whatever the check says (the lease's own records). */
  exempt(...keys: readonly string[]): void {
    for (const key of keys) this.#exemptKeys.add(key);
  }

  /** Throw if a write of `key` may not be sent now. */
  assertWritable(key: string): void {
    if (this.#check === undefined || this.#exemptKeys.has(key)) return;
    const refusal = this.#check();
    if (refusal !== undefined) throw refusal;
  }
}

/** Refuses every PUT and DELETE attempt that the fence does not admit; reads pass. */
export class FencedStore extends StoreLayer {
  readonly #fence: Fence;

  constructor(inner: ObjectStore, fence: Fence) {
    super(inner);
    this.#fence = fence;
  }

  override async put(key: string, body: Uint8Array, options?: PutOptions): Promise<PutResult> {
    this.#fence.assertWritable(key);
    return this.inner.put(key, body, options);
  }

  override async delete(key: string): Promise<void> {
    this.#fence.assertWritable(key);
    return this.inner.delete(key);
  }

  override async deleteMany(keys: readonly string[]): Promise<void> {
    for (const key of keys) this.#fence.assertWritable(key);
    return this.inner.deleteMany(keys);
  }
}
