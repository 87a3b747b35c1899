/**
 * An object store in this process's memory: the reference implementation, for unit tests and
 * `memory://` URLs. Named stores live in a registry so that "closing and reopening" a volume in
 * one process finds the same objects.
 */

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import {
  MAX_DELETE_BATCH,
  StoreError,
  sliceRange,
  type GetOptions,
  type GetResult,
  type ListPage,
  type ObjectMetadata,
  type ObjectStore,
  type PutOptions,
  type PutResult,
} from "./object-store.js";

interface StoredObject {
  readonly body: Uint8Array;
  readonly metadata: ObjectMetadata;
  readonly etag: string;
  readonly lastModifiedMs: number;
}

/** Keys per listing page, like S3's default. */
const LIST_PAGE_KEYS = 1000;

/** Numbers unnamed stores, so that two never share a description (a key space's name). */
let unnamedStores = 0;

export class MemoryStore implements ObjectStore {
  readonly description: string;
  readonly #objects = new Map<string, StoredObject>();

  readonly #wallClockMs: () => number;

  /** `wallClockMs`: the store's clock, which dates objects (`lastModifiedMs`). Default Date.now. */
  constructor(
    name = `anonymous-${++unnamedStores}`,
    options: { readonly wallClockMs?: () => number } = {},
  ) {
    this.description = `memory://${name}`;
    this.#wallClockMs = options.wallClockMs ?? Date.now;
  }

  async get(key: string, options?: GetOptions): Promise<GetResult | undefined> {
    const object = this.#objects.get(key);
    if (object === undefined) return undefined;
    const stored = sliceRange(object.body, options?.range);
    // A copy, never a view of the stored bytes (a Buffer's slice() would be one).
    const body = options?.allocate?.(stored.byteLength) ?? Buffer.allocUnsafe(stored.byteLength);
    assert.equal(body.byteLength, stored.byteLength, "an allocated body's length");
    body.set(stored);
    return {
      body,
      metadata: { ...object.metadata },
      etag: object.etag,
      objectSizeBytes: object.body.byteLength,
    };
  }

  async put(key: string, body: Uint8Array, options?: PutOptions): Promise<PutResult> {
    const existing = this.#objects.get(key);
    if (options?.ifNoneMatch === "*" && existing !== undefined) {
      throw new StoreError("PreconditionFailed", `${key} already exists`);
    }
    if (options?.ifMatch !== undefined && existing?.etag !== options.ifMatch) {
      throw new StoreError("PreconditionFailed", `${key} does not have etag ${options.ifMatch}`);
    }
    const etag = createHash("md5").update(body).digest("hex");
    this.#objects.set(key, {
      body: Buffer.from(body),
      metadata: { ...options?.metadata },
      etag,
      lastModifiedMs: this.#wallClockMs(),
    });
    return { etag };
  }

  async delete(key: string): Promise<void> {
    this.#objects.delete(key);
  }

  async deleteMany(keys: readonly string[]): Promise<void> {
    if (keys.length > MAX_DELETE_BATCH) {
      throw new StoreError("Permanent", `deleteMany of ${keys.length} keys`);
    }
    for (const key of keys) this.#objects.delete(key);
  }

  async listPage(prefix: string, continuation?: string): Promise<ListPage> {
    const keys = [...this.#objects.keys()]
      .filter((key) => key.startsWith(prefix) && (continuation === undefined || key > continuation))
      .sort();
    const page = keys.slice(0, LIST_PAGE_KEYS);
    const entries = page.map((key) => ({
      key,
      sizeBytes: this.#objects.get(key)?.body.byteLength ?? 0,
      lastModifiedMs: this.#objects.get(key)?.lastModifiedMs ?? 0,
    }));
    const last = page.at(-1);
    return keys.length > LIST_PAGE_KEYS && last !== undefined
      ? { entries, continuation: last }
      : { entries };
  }

  async close(): Promise<void> {}

  /** Test hook: overwrite an object's stored bytes in place, as bit rot would. */
  corrupt(key: string, mutate: (body: Uint8Array) => Uint8Array): void {
    const object = this.#objects.get(key);
    if (object === undefined) throw new Error(`no object ${key}`);
    this.#objects.set(key, { ...object, body: Buffer.from(mutate(Buffer.from(object.body))) });
  }
}

const registry = new Map<string, MemoryStore>();

/** The process-wide memory store called `name`, created on first use. */
export function namedMemoryStore(name: string): MemoryStore {
  let store = registry.get(name);
  if (store === undefined) {
    store = new MemoryStore(name);
    registry.set(name, store);
  }
  return store;
}
