/**
 * The base of every store layer: a store that forwards each call to the store below it.
 *
 * A layer (the fence, retries, the request counter, fault injection) extends this class and
 * overrides only the calls whose behaviour it changes, as nbdkit's filters pass every callback
 * they do not touch to `next_ops`. So a layer holds its own idea and nothing else, and a method
 * added to {@link ObjectStore} reaches the real store through every layer without each one
 * having to learn of it.
 */

import type {
  GetOptions,
  GetResult,
  ListPage,
  ObjectStore,
  PutOptions,
  PutResult,
} from "./object-store.js";

export class StoreLayer implements ObjectStore {
  readonly description: string;
  /** The store this layer sits on. */
  protected readonly inner: ObjectStore;

  constructor(inner: ObjectStore) {
    this.inner = inner;
    this.description = inner.description;
  }

  get(key: string, options?: GetOptions): Promise<GetResult | undefined> {
    return this.inner.get(key, options);
  }

  put(key: string, body: Uint8Array, options?: PutOptions): Promise<PutResult> {
    return this.inner.put(key, body, options);
  }

  delete(key: string): Promise<void> {
    return this.inner.delete(key);
  }

  deleteMany(keys: readonly string[]): Promise<void> {
    return this.inner.deleteMany(keys);
  }

  listPage(prefix: string, continuation?: string): Promise<ListPage> {
    return this.inner.listPage(prefix, continuation);
  }

  close(): Promise<void> {
    return this.inner.close();
  }
}
