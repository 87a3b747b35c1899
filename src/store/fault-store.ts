/**
 * A store layer that injects failures, for tests: transient errors on chosen operations, a
 * number of times or with a probability, and full outages. It sits between the real store and
 * the retry layer, so retries see the faults as they would see S3's.
 */

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

export type Operation = "get" | "put" | "delete" | "list";

export interface FaultRule {
  /** Operations this rule hits. Default: all. */
  readonly operations?: readonly Operation[];
  /** Only keys containing this string. Default: all keys. */
  readonly keyIncludes?: string;
  /** Fail this many matching calls, then retire. Default: unlimited. */
  readonly times?: number;
  /** Fail a matching call with this probability. Default 1. */
  readonly probability?: number;
  /** The error's code. Default `Transient`. */
  readonly code?: StoreError["code"];
}

export class FaultStore extends StoreLayer {
  readonly #random: () => number;
  #rules: { rule: FaultRule; remaining: number }[] = [];
  /** Failures injected so far. */
  injected = 0;

  constructor(inner: ObjectStore, options: { random?: () => number } = {}) {
    super(inner);
    this.#random = options.random ?? Math.random;
  }

  /** Add a rule. Rules are checked in order; the first that fires fails the call. */
  inject(rule: FaultRule): void {
    this.#rules.push({ rule, remaining: rule.times ?? Infinity });
  }

  /** Fail every call until `heal`. */
  outage(): void {
    this.inject({});
  }

  /** Remove every rule. */
  heal(): void {
    this.#rules = [];
  }

  override async get(key: string, options?: GetOptions): Promise<GetResult | undefined> {
    this.#maybeFail("get", key);
    return this.inner.get(key, options);
  }

  override async put(key: string, body: Uint8Array, options?: PutOptions): Promise<PutResult> {
    this.#maybeFail("put", key);
    return this.inner.put(key, body, options);
  }

  override async delete(key: string): Promise<void> {
    this.#maybeFail("delete", key);
    return this.inner.delete(key);
  }

  override async deleteMany(keys: readonly string[]): Promise<void> {
    for (const key of keys) this.#maybeFail("delete", key);
    return this.inner.deleteMany(keys);
  }

  override async listPage(prefix: string, continuation?: string): Promise<ListPage> {
    this.#maybeFail("list", prefix);
    return this.inner.listPage(prefix, continuation);
  }

  #maybeFail(operation: Operation, key: string): void {
    for (const entry of this.#rules) {
      const { rule } = entry;
      if (entry.remaining <= 0) continue;
      if (rule.operations !== undefined && !rule.operations.includes(operation)) continue;
      if (rule.keyIncludes !== undefined && !key.includes(rule.keyIncludes)) continue;
      if (rule.probability !== undefined && this.#random() >= rule.probability) continue;
      entry.remaining--;
      this.injected++;
      throw new StoreError(rule.code ?? "Transient", `injected fault: ${operation} ${key}`);
    }
  }
}
