/**
 * A store layer that counts requests and bytes, placed directly on the real store so that every
 * attempt (retries included) is counted once. The request-accounting tests and the benchmark
 * read its figures.
 */

import type { GetOptions, GetResult, ListPage, PutOptions, PutResult } from "./object-store.js";
import { StoreLayer } from "./store-layer.js";

export interface RequestCounts {
  gets: number;
  /** GETs that found no object. */
  getMisses: number;
  puts: number;
  deletes: number;
  /** Keys deleted by batch requests (each batch is one request in `deleteBatches`). */
  deleteBatches: number;
  lists: number;
  bytesIn: number;
  bytesOut: number;
  failures: number;
}

export function zeroCounts(): RequestCounts {
  return {
    gets: 0,
    getMisses: 0,
    puts: 0,
    deletes: 0,
    deleteBatches: 0,
    lists: 0,
    bytesIn: 0,
    bytesOut: 0,
    failures: 0,
  };
}

export class CountingStore extends StoreLayer {
  #counts = zeroCounts();

  /** A copy of the counts so far. */
  counts(): RequestCounts {
    return { ...this.#counts };
  }

  /** Return the counts so far and start again from zero. */
  reset(): RequestCounts {
    const counts = this.#counts;
    this.#counts = zeroCounts();
    return counts;
  }

  override async get(key: string, options?: GetOptions): Promise<GetResult | undefined> {
    this.#counts.gets++;
    const result = await this.#count(this.inner.get(key, options));
    if (result === undefined) this.#counts.getMisses++;
    else this.#counts.bytesIn += result.body.byteLength;
    return result;
  }

  override put(key: string, body: Uint8Array, options?: PutOptions): Promise<PutResult> {
    this.#counts.puts++;
    this.#counts.bytesOut += body.byteLength;
    return this.#count(this.inner.put(key, body, options));
  }

  override delete(key: string): Promise<void> {
    this.#counts.deletes++;
    return this.#count(this.inner.delete(key));
  }

  override deleteMany(keys: readonly string[]): Promise<void> {
    this.#counts.deleteBatches++;
    return this.#count(this.inner.deleteMany(keys));
  }

  override listPage(prefix: string, continuation?: string): Promise<ListPage> {
    this.#counts.lists++;
    return this.#count(this.inner.listPage(prefix, continuation));
  }

  async #count<T>(operation: Promise<T>): Promise<T> {
    try {
      return await operation;
    } catch (error) {
      this.#counts.failures++;
      throw error;
    }
  }
}
