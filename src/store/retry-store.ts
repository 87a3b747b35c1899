/**
 * A store layer that retries transient failures with capped exponential backoff and full jitter
 * (each wait is uniform in `[0, min(maxDelayMs, baseDelayMs * 2^attempt)]`), within a bound on
 * attempts and on total time. Past the bound the last error is thrown, marked with how many
 * attempts were made, so the layer above can fail the operation with an I/O error.
 *
 * Only `StoreError`s with code `Transient` are retried: a precondition failure, a missing bucket
 * or a denied request is final. Conditional PUTs are retried too: a retried `ifNoneMatch` PUT
 * whose first attempt did land answers `PreconditionFailed`, which the lease code treats as
 * "look again", never as success.
 */

import type { Clock } from "../util/clock.js";
import {
  StoreError,
  type GetOptions,
  type GetResult,
  type ListPage,
  type ObjectStore,
  type PutOptions,
  type PutResult,
} from "./object-store.js";
import { StoreLayer } from "./store-layer.js";

export interface RetryPolicy {
  /** Attempts in all, the first included. Default 6. */
  readonly maxAttempts: number;
  /** Default 100 ms. */
  readonly baseDelayMs: number;
  /** Cap on one wait. Default 5000 ms. */
  readonly maxDelayMs: number;
  /** No new attempt starts this long after the first. Default 30 s. */
  readonly budgetMs: number;
}

export const DEFAULT_RETRY_POLICY: RetryPolicy = Object.freeze({
  maxAttempts: 6,
  baseDelayMs: 100,
  maxDelayMs: 5_000,
  budgetMs: 30_000,
});

export interface RetryStoreOptions {
  readonly policy?: Partial<RetryPolicy>;
  readonly clock: Clock;
  /** Uniform in [0, 1). Default Math.random. */
  readonly random?: () => number;
  /** Told of each retry, for logs and statistics. */
  readonly onRetry?: (what: string, attempt: number, error: StoreError, delayMs: number) => void;
}

export class RetryStore extends StoreLayer {
  readonly policy: RetryPolicy;
  readonly #clock: Clock;
  readonly #random: () => number;
  readonly #onRetry: RetryStoreOptions["onRetry"];
  #retries = 0;

  constructor(inner: ObjectStore, options: RetryStoreOptions) {
    super(inner);
    this.policy = { ...DEFAULT_RETRY_POLICY, ...options.policy };
    this.#clock = options.clock;
    this.#random = options.random ?? Math.random;
    this.#onRetry = options.onRetry;
  }

  /** Attempts made after a first one failed, so far. */
  get retries(): number {
    return this.#retries;
  }

  override get(key: string, options?: GetOptions): Promise<GetResult | undefined> {
    return this.#retry(`GET ${key}`, () => this.inner.get(key, options));
  }

  override put(key: string, body: Uint8Array, options?: PutOptions): Promise<PutResult> {
    return this.#retry(`PUT ${key}`, () => this.inner.put(key, body, options));
  }

  override delete(key: string): Promise<void> {
    return this.#retry(`DELETE ${key}`, () => this.inner.delete(key));
  }

  override deleteMany(keys: readonly string[]): Promise<void> {
    return this.#retry(`DELETE ${keys.length} keys`, () => this.inner.deleteMany(keys));
  }

  override listPage(prefix: string, continuation?: string): Promise<ListPage> {
    return this.#retry(`LIST ${prefix}`, () => this.inner.listPage(prefix, continuation));
  }

  async #retry<T>(what: string, attempt: () => Promise<T>): Promise<T> {
    const startMs = this.#clock.nowMs();
    for (let n = 1; ; n++) {
      try {
        return await attempt();
      } catch (error) {
        if (!(error instanceof StoreError) || !error.transient) throw error;
        const capMs = Math.min(this.policy.maxDelayMs, this.policy.baseDelayMs * 2 ** (n - 1));
        const delayMs = Math.floor(this.#random() * capMs);
        const elapsedMs = this.#clock.nowMs() - startMs;
        if (n >= this.policy.maxAttempts || elapsedMs + delayMs > this.policy.budgetMs) {
          throw new StoreError(
            "Transient",
            `${error.message} (gave up after ${n} attempts in ${Math.round(elapsedMs)} ms)`,
            { cause: error },
          );
        }
        this.#retries++;
        this.#onRetry?.(what, n, error, delayMs);
        await this.#clock.sleep(delayMs);
      }
    }
  }
}
