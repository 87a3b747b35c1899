/**
 * Chunk I/O for one volume: turns "chunk i, these bytes" into verified object-store requests,
 * through one bounded request queue (p-queue), and keeps the allocation map.
 *
 * ## The allocation map
 *
 * One bit per chunk: set when an object may exist for that chunk. It is built from a LIST of
 * `<prefix>/chunks/` when the volume is opened, set *before* every PUT (so a PUT that failed
 * after landing is still counted), and cleared only after a DELETE succeeded. So a clear bit
 * proves the chunk is absent, and the cache answers reads of such chunks with zeros without any
 * request: this is how a never-written volume costs no GET. A set bit whose object turns out
 * absent (404) reads as zeros too. The map also answers NBD block-status queries.
 *
 * A writable open is the only writer of its volume (issue #3 adds the lease that enforces it), so
 * the map stays exact. A read-only open sees the map as of its open.
 *
 * ## The queue
 *
 * Every request goes through one p-queue of `concurrency` slots. Reads have priority over
 * write-back, so a flood of uploads does not starve a guest's reads.
 */

import PQueue from "p-queue";
import type { ObjectStore } from "../store/object-store.js";
import { listAll } from "../store/object-store.js";
import { Bitmap } from "../util/bitmap.js";
import {
  chunkIndexOfKey,
  chunkKey,
  chunkMetadata,
  chunkPrefix,
  verifyChunk,
  type Superblock,
} from "./format.js";

/** Queue priorities: larger runs first. */
const PRIORITY_READ = 2;
const PRIORITY_WRITE = 1;

export interface ChunkStoreOptions {
  readonly store: ObjectStore;
  readonly prefix: string;
  readonly superblock: Superblock;
  /** Requests in flight at once. Default 32. */
  readonly concurrency?: number;
}

export class ChunkStore {
  readonly superblock: Superblock;
  readonly chunkCount: number;
  readonly #store: ObjectStore;
  readonly #prefix: string;
  readonly #queue: PQueue;
  readonly #allocated: Bitmap;
  #fenced: Error | undefined;

  private constructor(options: ChunkStoreOptions, allocated: Bitmap) {
    this.superblock = options.superblock;
    this.chunkCount = allocated.size;
    this.#store = options.store;
    this.#prefix = options.prefix;
    this.#queue = new PQueue({ concurrency: options.concurrency ?? 32 });
    this.#allocated = allocated;
  }

  /** Open the chunk space of a volume: list which chunks exist. */
  static async open(options: ChunkStoreOptions): Promise<ChunkStore> {
    const { superblock, prefix, store } = options;
    const chunkCount = Math.ceil(superblock.sizeBytes / superblock.chunkSizeBytes);
    const allocated = new Bitmap(chunkCount);
    for await (const entry of listAll(store, chunkPrefix(prefix))) {
      const index = chunkIndexOfKey(prefix, entry.key);
      if (index !== undefined && index < chunkCount) allocated.set(index);
    }
    return new ChunkStore(options, allocated);
  }

  /** False when no object exists for chunk `index`: it reads as zeros. */
  isAllocated(index: number): boolean {
    return this.#allocated.has(index);
  }

  /** How many chunks may have an object. */
  allocatedCount(): number {
    return this.#allocated.count();
  }

  /**
   * Bytes `[offsetBytes, offsetBytes + lengthBytes)` of chunk `index`, verified; `undefined` if
   * the chunk has no object (it reads as zeros). The range must be whole check blocks.
   */
  read(index: number, offsetBytes: number, lengthBytes: number): Promise<Uint8Array | undefined> {
    return this.#queue.add(() => this.#get(index, offsetBytes, lengthBytes), {
      priority: PRIORITY_READ,
    });
  }

  async #get(
    index: number,
    offsetBytes: number,
    lengthBytes: number,
  ): Promise<Uint8Array | undefined> {
    const key = chunkKey(this.#prefix, index);
    const whole = offsetBytes === 0 && lengthBytes === this.superblock.chunkSizeBytes;
    const got = await this.#store.get(
      key,
      whole ? undefined : { range: { offsetBytes, lengthBytes } },
    );
    if (got === undefined) return undefined;
    return verifyChunk(this.superblock, key, index, got, offsetBytes, lengthBytes);
  }

  /**
   * Store chunk `index`. `produce` runs when the request's turn comes and returns the chunk's
   * bytes, or `undefined` if the chunk is all zeros (then its object is deleted, if any). Taking
   * the bytes only then keeps memory bounded by the queue's concurrency, not its length.
   * `produce` may call `readWhole` for a read-modify-write: it runs in the same queue slot, so
   * uploads waiting on reads can never fill the queue and deadlock.
   */
  write(
    index: number,
    produce: (readWhole: () => Promise<Uint8Array | undefined>) => Promise<Uint8Array | undefined>,
  ): Promise<void> {
    return this.#queue.add(
      async () => {
        if (this.#fenced !== undefined) throw this.#fenced;
        const data = await produce(() => this.#get(index, 0, this.superblock.chunkSizeBytes));
        const key = chunkKey(this.#prefix, index);
        if (data === undefined) {
          if (!this.#allocated.has(index)) return;
          await this.#store.delete(key);
          this.#allocated.clear(index);
          return;
        }
        this.#allocated.set(index);
        await this.#store.put(key, data, {
          metadata: chunkMetadata(this.superblock, index, data),
        });
      },
      { priority: PRIORITY_WRITE },
    );
  }

  /**
   * Refuse every upload that has not started: they fail with `reason`. Requests already sent
   * finish. Used when the device is aborted (and, later, when it loses its lease).
   */
  fence(reason: Error): void {
    this.#fenced = reason;
  }

  /** Wait for every queued request to finish. */
  async drain(): Promise<void> {
    await this.#queue.onIdle();
  }
}
