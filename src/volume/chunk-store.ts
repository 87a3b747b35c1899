/**
 * Chunk I/O for one volume: turns "chunk i, these bytes" into verified object-store requests,
 * through one bounded request queue (p-queue), and keeps the chunk map.
 *
 * ## The chunk map (format version 2)
 *
 * For every chunk holding data, the object that holds it (see chunk-map.ts for how it is
 * resolved at open, and how a writer term seals it before writing). Chunk objects are written
 * once and never overwritten: an upload of chunk i writes a new key whose generation is this
 * term's lease epoch and the next sequence number, and only once that PUT succeeded does the
 * map point at it. The object it replaced is then superseded, and deleted in batches once the
 * grace horizon has passed since that PUT was acknowledged (see garbage.ts), at a flush, on
 * disconnect, or when a batch is full: never by a timer, so an idle volume makes no request.
 * A newer generation is always durable before an older one is deleted, so a crash leaves at
 * most garbage. The garbage a writer term's start finds (older terms' objects its seal does not
 * name, older seals, the records of deleted snapshots and what only they pinned) waits the same
 * grace from the seal's acknowledgement. A chunk that becomes all zeros gets a tombstone (an
 * empty object of the next generation), because the seal, or an older object a failed delete
 * left, would otherwise speak for it again at the next open.
 *
 * An object a snapshot names is pinned: it is never superseded into the delete batches, and the
 * garbage of a writer's start spares it (see snapshots.ts). An object of another volume (a
 * clone's base) is never deleted here.
 *
 * A chunk absent from the map reads as zeros without any request: this is how a never-written
 * volume costs no GET. A chunk the map names whose object is missing (404) is an I/O error
 * naming the key, never zeros. The map also answers NBD block-status queries. A read-only open
 * sees the map as of its open; if a writer meanwhile deletes an object it superseded, such a
 * read fails with that error rather than return anything stale.
 *
 * ## The queue
 *
 * Every request goes through one p-queue of `concurrency` slots. Reads have priority over
 * write-back, so a flood of uploads does not starve a guest's reads.
 */

import PQueue from "p-queue";
import { MAX_DELETE_BATCH, type GetOptions, type ObjectStore } from "../store/object-store.js";
import { systemClock, type Clock } from "../util/clock.js";
import { resolveChunkMap, sealChunkMap, sealTime } from "./chunk-map.js";
import { DEFAULT_GC_GRACE_MS, horizonOf, selectGarbage } from "./garbage.js";
import { pinnedKeys, readSnapshots, readTrash } from "./snapshots.js";
import {
  ChunkMissingError,
  MAX_SEQUENCE,
  chunkMetadata,
  chunkRef,
  generation,
  tombstoneMetadata,
  verifyChunk,
  type ChunkRef,
  type Superblock,
} from "./format.js";

/** Queue priorities: larger runs first. Read-ahead waits for the guest's reads and writes. */
const PRIORITY_READ = 2;
const PRIORITY_WRITE = 1;
const PRIORITY_READAHEAD = 0;

/** Who a read is for: the guest (first in the queue), or read-ahead (after everything else). */
export type ReadPriority = "guest" | "readahead";

/** How {@link ChunkStore.read} fetches. */
export interface ChunkReadOptions {
  /** Default "guest": before read-ahead in the request queue. */
  readonly priority?: ReadPriority;
  /** Where the fetched bytes go (`GetOptions.allocate`): the cache's chunk buffers. */
  readonly allocate?: GetOptions["allocate"];
}

/** Requests in flight at once, by default: the chunk images uploads and fetches hold. */
export const DEFAULT_CHUNK_STORE_CONCURRENCY = 32;

export interface ChunkStoreOptions {
  readonly store: ObjectStore;
  readonly prefix: string;
  readonly superblock: Superblock;
  /** Requests in flight at once. Default 32. */
  readonly concurrency?: number;
  /**
   * The writer term of a writable open: its lease epoch and holder id. The open seals the map
   * under this epoch before anything is written. Absent: a read-only open.
   */
  readonly term?: WriterTerm;
  /**
   * The map to start from instead of the resolved one: a snapshot's. With a term, the term
   * seals it (a rollback); without, it is read as it is and nothing is listed (a snapshot
   * opened read-only).
   */
  readonly startFrom?: ReadonlyMap<number, ChunkRef>;
  /**
   * How long an object this writer made garbage stays, from the acknowledgement of the request
   * that made it so (see garbage.ts). Default {@link DEFAULT_GC_GRACE_MS}.
   */
  readonly gcGraceMs?: number;
  /** The monotonic clock the grace is measured on. */
  readonly clock?: Clock;
}

/** Who writes, in which epoch. */
export interface WriterTerm {
  /**
   * The lease epoch. Absent: one above the newest seal, for opens without a lease (tests),
   * which nothing then protects from a second writer.
   */
  readonly epoch?: number;
  readonly writerId: string;
}

function readaheadId(index: number): string {
  return `readahead-${index}`;
}

/** What a writer did with the garbage it made: see `ChunkedBlockDevice.garbageStats`. */
export interface GarbageStats {
  /** Objects this writer made garbage and has not deleted yet (a batch in flight included). */
  readonly pendingObjectCount: number;
  /** Superseded objects deleted since the open. */
  readonly deletedObjectCount: number;
  /** Delete batches that failed (their objects wait for the next one, or `s3blk gc`). */
  readonly failedDeleteBatchCount: number;
}

/** GETs of one chunk that found their object superseded meanwhile, at most, before failing. */
const MAX_SUPERSEDED_RETRIES = 3;

export class ChunkStore {
  readonly superblock: Superblock;
  readonly chunkCount: number;
  readonly #store: ObjectStore;
  readonly #prefix: string;
  readonly #queue: PQueue;
  readonly #refs: Map<number, ChunkRef>;
  readonly #epoch: number | undefined;
  /** Objects a snapshot names: never deleted by this store. */
  readonly #pinned: Set<string>;
  readonly #clock: Clock;
  readonly #gcGraceMs: number;
  #sequence = 0;
  #allocatedCount = 0;
  /**
   * Garbage not yet deleted, oldest first: keys, and when (on the monotonic clock) the request
   * that made each garbage was acknowledged.
   */
  #superseded: { readonly key: string; readonly atMs: number }[] = [];
  /** Per chunk, keys of this term whose PUT was reported failed but may have landed. */
  readonly #maybeLanded = new Map<number, string[]>();
  #deleting: Promise<void> | undefined;
  #fenced: Error | undefined;
  /** Objects in the delete batch in flight. */
  #deletingObjectCount = 0;
  #deletedObjectCount = 0;
  #failedDeleteBatchCount = 0;

  private constructor(
    options: ChunkStoreOptions,
    refs: Map<number, ChunkRef>,
    epoch: number | undefined,
    pinned: Set<string>,
  ) {
    this.superblock = options.superblock;
    this.chunkCount = Math.ceil(this.superblock.sizeBytes / this.superblock.chunkSizeBytes);
    this.#store = options.store;
    this.#prefix = options.prefix;
    this.#queue = new PQueue({
      concurrency: options.concurrency ?? DEFAULT_CHUNK_STORE_CONCURRENCY,
    });
    this.#refs = refs;
    this.#epoch = epoch;
    this.#pinned = pinned;
    this.#clock = options.clock ?? systemClock;
    this.#gcGraceMs = options.gcGraceMs ?? DEFAULT_GC_GRACE_MS;
    for (const ref of refs.values()) if (!ref.zero) this.#allocatedCount++;
  }

  /**
   * Open the chunk space of a volume: resolve its map, and for a writer term seal it (and
   * delete the garbage the resolution found).
   */
  static async open(options: ChunkStoreOptions): Promise<ChunkStore> {
    const { superblock, prefix, store, term, startFrom } = options;
    if (term === undefined && startFrom !== undefined) {
      return new ChunkStore(options, new Map(startFrom), undefined, new Set());
    }
    // A writer term holds the lease: no other term starts while it resolves.
    const map = await resolveChunkMap(store, prefix, superblock, {
      concurrentTerms: term === undefined,
    });
    if (term === undefined) return new ChunkStore(options, map.refs, undefined, new Set());
    const snapshots = await readSnapshots(store, prefix, superblock);
    const pinned = pinnedKeys(prefix, superblock, snapshots);
    // Deleted snapshots' records pin their objects for the grace, which runs from now at the
    // latest: each was trashed before this open listed it.
    const trash = await readTrash(store, prefix, superblock);
    const refs = startFrom === undefined ? map.refs : new Map(startFrom);
    const epoch = term.epoch ?? map.sealEpoch + 1;
    const garbage = await sealChunkMap(store, prefix, superblock, map, {
      epoch,
      writerId: term.writerId,
      refs,
      pinned,
    });
    const chunks = new ChunkStore(options, refs, epoch, pinned);
    const found = [...garbage, ...trash.map((t) => t.key)];
    const graceMs = chunks.#gcGraceMs;
    // What was garbage long before this term is deleted now, dated on the store's clock as
    // `s3blk gc` does; the rest waits the grace from the seal.
    const storeNowMs =
      graceMs === 0 || found.length === 0 ? undefined : await sealTime(store, prefix, epoch);
    const due = new Set<string>();
    if (storeNowMs !== undefined) {
      const horizonMs = horizonOf(storeNowMs, graceMs);
      const selection = selectGarbage(prefix, superblock, map, snapshots, trash, horizonMs);
      for (const d of selection.due) due.add(d.key);
      for (const key of selection.expiredTrash) due.add(key);
    }
    chunks.#collect(
      found.filter((key) => due.has(key)),
      Number.NEGATIVE_INFINITY,
    );
    chunks.#collect(found.filter((key) => !due.has(key)));
    if (graceMs === 0 || due.size > 0) await chunks.deleteSuperseded();
    return chunks;
  }

  /** `keys` are garbage as of `atMs` (default: now, on the monotonic clock). */
  #collect(keys: readonly string[], atMs = this.#clock.nowMs()): void {
    for (const key of keys) this.#superseded.push({ key, atMs });
  }

  /**
   * The map as it is now, for a snapshot: every chunk holding data and its object. Its objects
   * are pinned from this moment: this store never deletes them.
   */
  snapshotRefs(): Map<number, ChunkRef> {
    const refs = new Map<number, ChunkRef>();
    for (const [index, ref] of this.#refs) {
      if (ref.zero) continue;
      refs.set(index, ref);
      this.#pinned.add(ref.key);
    }
    return refs;
  }

  /** False when chunk `index` certainly reads as zeros. */
  isAllocated(index: number): boolean {
    const ref = this.#refs.get(index);
    return ref !== undefined && !ref.zero;
  }

  /** How many chunks hold data. */
  allocatedCount(): number {
    return this.#allocatedCount;
  }

  /** The object chunk `index` reads from, if any (for tests and `info`). */
  refOf(index: number): ChunkRef | undefined {
    const ref = this.#refs.get(index);
    return ref === undefined || ref.zero ? undefined : ref;
  }

  /**
   * Bytes `[offsetBytes, offsetBytes + lengthBytes)` of chunk `index`, verified; `undefined` if
   * the chunk reads as zeros. The range must be whole check blocks.
   */
  read(
    index: number,
    offsetBytes: number,
    lengthBytes: number,
    options: ChunkReadOptions = {},
  ): Promise<Uint8Array | undefined> {
    return this.#queue.add(
      () => this.#get(index, offsetBytes, lengthBytes, options.allocate),
      options.priority !== "readahead"
        ? { priority: PRIORITY_READ }
        : { priority: PRIORITY_READAHEAD, id: readaheadId(index) },
    );
  }

  /** A guest now waits for chunk `index`'s read-ahead: if it is still queued, it goes first. */
  promote(index: number): void {
    try {
      this.#queue.setPriority(readaheadId(index), PRIORITY_READ);
    } catch {
      // Already sent (or done): nothing to move.
    }
  }

  async #get(
    index: number,
    offsetBytes: number,
    lengthBytes: number,
    allocate: GetOptions["allocate"],
  ): Promise<Uint8Array | undefined> {
    const whole = offsetBytes === 0 && lengthBytes === this.superblock.chunkSizeBytes;
    const options: GetOptions = whole
      ? { allocate }
      : { range: { offsetBytes, lengthBytes }, allocate };
    for (let attempt = 0; ; attempt++) {
      const ref = this.#refs.get(index);
      if (ref === undefined || ref.zero) return undefined;
      const got = await this.#store.get(ref.key, options);
      if (got !== undefined)
        return verifyChunk(this.superblock, ref, got, offsetBytes, lengthBytes);
      if (this.#refs.get(index) === ref) {
        const landed = await this.#readMaybeLanded(index, offsetBytes, lengthBytes);
        if (landed !== undefined) return landed;
      }
      // Superseded and deleted while the GET was on its way: read the newer object.
      if (this.#refs.get(index) === ref || attempt >= MAX_SUPERSEDED_RETRIES) {
        throw new ChunkMissingError(ref.key);
      }
    }
  }

  /**
   * Store chunk `index`. `produce` runs when the request's turn comes and returns the chunk's
   * bytes, or `undefined` if the chunk is all zeros (then it gets a tombstone, if it held
   * data). Taking the bytes only then keeps memory bounded by the queue's concurrency, not its
   * length. `produce` may call `readWhole` for a read-modify-write: it runs in the same queue
   * slot, so uploads waiting on reads can never fill the queue and deadlock.
   */
  write(
    index: number,
    produce: (readWhole: () => Promise<Uint8Array | undefined>) => Promise<Uint8Array | undefined>,
  ): Promise<void> {
    return this.#queue.add(
      async () => {
        if (this.#fenced !== undefined) throw this.#fenced;
        const data = await produce(() =>
          this.#get(index, 0, this.superblock.chunkSizeBytes, undefined),
        );
        const previous = this.#refs.get(index);
        // A PUT reported failed may have landed all the same: until a newer generation is
        // durable, that object would win at the next open, so zeros need a tombstone over it.
        const maybeLanded = this.#maybeLanded.get(index);
        if (
          data === undefined &&
          (previous === undefined || previous.zero) &&
          maybeLanded === undefined
        ) {
          return;
        }
        const ref = chunkRef(
          this.#prefix,
          this.superblock.volumeId,
          index,
          this.#nextGeneration(),
          data === undefined,
        );
        try {
          await this.#store.put(ref.key, data ?? new Uint8Array(0), {
            metadata:
              data === undefined
                ? tombstoneMetadata(ref)
                : chunkMetadata(this.superblock, ref, data),
          });
        } catch (error) {
          this.#maybeLanded.set(index, [...(maybeLanded ?? []), ref.key]);
          throw error;
        }
        this.#replace(index, ref, previous);
        if (maybeLanded !== undefined) {
          // The newer generation is durable: what may have landed before it is garbage.
          this.#maybeLanded.delete(index);
          this.#collect(maybeLanded);
        }
        if (this.#dueCount() >= MAX_DELETE_BATCH) await this.deleteSuperseded();
      },
      { priority: PRIORITY_WRITE },
    );
  }

  /**
   * The object of chunk `index` is gone because an upload reported failed had landed, and a
   * collector in another process, seeing that newer generation, deleted the one the map names.
   * The landed one holds the same bytes except where the chunk was dirty then, which is still
   * dirty now (a failed upload leaves its pages dirty) and read from the cache: so it answers.
   */
  async #readMaybeLanded(
    index: number,
    offsetBytes: number,
    lengthBytes: number,
  ): Promise<Uint8Array | undefined> {
    // Newest first: a collector deletes what the newest landed one supersedes.
    for (const key of [...(this.#maybeLanded.get(index) ?? [])].reverse()) {
      if (key.endsWith(".zero")) return undefined;
      const ref = chunkRef(this.#prefix, this.superblock.volumeId, index, key.slice(-20));
      const whole = offsetBytes === 0 && lengthBytes === this.superblock.chunkSizeBytes;
      const got = await this.#store.get(
        key,
        whole ? undefined : { range: { offsetBytes, lengthBytes } },
      );
      if (got !== undefined)
        return verifyChunk(this.superblock, ref, got, offsetBytes, lengthBytes);
    }
    return undefined;
  }

  #nextGeneration(): string {
    if (this.#epoch === undefined) throw new Error("a read-only chunk store does not write");
    if (this.#sequence > MAX_SEQUENCE) {
      throw new Error(`writer term ${this.#epoch} used up its generations: reopen the volume`);
    }
    return generation(this.#epoch, this.#sequence++);
  }

  /** `ref` is durable: the map points at it, and what it replaced is superseded. */
  #replace(index: number, ref: ChunkRef, previous: ChunkRef | undefined): void {
    this.#refs.set(index, ref);
    if (!ref.zero) this.#allocatedCount++;
    if (previous === undefined) return;
    if (!previous.zero) this.#allocatedCount--;
    const own = previous.volumeId === this.superblock.volumeId;
    if (own && !this.#pinned.has(previous.key)) this.#collect([previous.key]);
  }

  /** How many garbage objects have waited out the grace (at most one batch is counted). */
  #dueCount(): number {
    const dueBefore = this.#clock.nowMs() - this.#gcGraceMs;
    let count = 0;
    for (const entry of this.#superseded) {
      if (entry.atMs > dueBefore || count === MAX_DELETE_BATCH) break;
      count++;
    }
    return count;
  }

  /**
   * Delete, in batches, the garbage that has waited out the grace. A failure keeps it for the
   * next call (or leaves it for `s3blk gc`): garbage, never lost data.
   */
  async deleteSuperseded(): Promise<void> {
    while (this.#deleting !== undefined) await this.#deleting;
    const due = this.#dueCount();
    if (due === 0 || this.#fenced !== undefined) return;
    const batch = this.#superseded.splice(0, due);
    let deleted = false;
    this.#deletingObjectCount = batch.length;
    this.#deleting = this.#store.deleteMany(batch.map((b) => b.key)).then(
      () => {
        deleted = true;
        this.#deletedObjectCount += batch.length;
        this.#deletingObjectCount = 0;
        this.#deleting = undefined;
      },
      () => {
        this.#superseded.unshift(...batch);
        this.#failedDeleteBatchCount++;
        this.#deletingObjectCount = 0;
        this.#deleting = undefined;
      },
    );
    await this.#deleting;
    if (deleted && this.#dueCount() === MAX_DELETE_BATCH) await this.deleteSuperseded();
  }

  /** What this store's garbage collection has done, and what waits (for the metrics). */
  garbageStats(): GarbageStats {
    return {
      pendingObjectCount: this.#superseded.length + this.#deletingObjectCount,
      deletedObjectCount: this.#deletedObjectCount,
      failedDeleteBatchCount: this.#failedDeleteBatchCount,
    };
  }

  /**
   * Refuse every upload that has not started: they fail with `reason`. Requests already sent
   * finish. Used when the device is aborted (and, later, when it loses its lease).
   */
  fence(reason: Error): void {
    this.#fenced = reason;
  }

  /** Wait for every queued request, and a batch of deletes in flight, to finish. */
  async drain(): Promise<void> {
    await this.#queue.onIdle();
    await this.#deleting;
  }
}
