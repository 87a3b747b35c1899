/**
 * The block device of a volume: the `BlockDevice` contract on top of the page cache and the
 * chunk store.
 *
 * This is the edge where requests are validated (`checkRequest`) and where exceptions from the
 * layers below become error values, in one place (`toIoError`). Below it, a violated
 * precondition is an assertion failure: a bug.
 *
 * `disconnect` refuses new operations at once, waits for those in flight, flushes, then closes
 * the store. `abort` is the other way to stop: it drops dirty data and says how much.
 *
 * ## Snapshots
 *
 * `snapshot(name)` closes a gate: writes and discards that start after the call wait at it.
 * It waits for those in flight (so each is in the snapshot, whole), flushes, takes the chunk
 * map as it then is, pins its objects, writes the record, and opens the gate. So the writes
 * completed before the call are in, the writes started after it resolves are not, and a write
 * in flight during it is in, whole. No page is frozen or copied: writers wait instead, for one
 * flush of the dirty pages (at most `maxDirtyChunks` uploads), and the dirty bound counts
 * exactly what it counted before. Reads are not held.
 */

import { randomUUID } from "node:crypto";
import {
  disconnected,
  err,
  ioError,
  isReadOnly,
  ok,
  type BlockDevice,
  type BlockError,
  type Info,
  type Result,
  type Sector,
  type WriteError,
  type WriteOptions,
  InvalidArgumentError,
} from "../block/block-device.js";
import { checkRange, checkRequest } from "../block/validate.js";
import {
  PageCache,
  type CacheStats,
  type Extent,
  type PageCacheOptions,
} from "../cache/page-cache.js";
import type { ObjectStore } from "../store/object-store.js";
import { systemClock, type Clock } from "../util/clock.js";
import { ChunkStore, type GarbageStats } from "../volume/chunk-store.js";
import type { ChunkRef, Superblock } from "../volume/format.js";
import {
  checkSnapshotName,
  createSnapshotRecord,
  type SnapshotRecord,
} from "../volume/snapshots.js";
import type { Lease } from "../volume/lease.js";
import { InFlight } from "../util/in-flight.js";

/** See {@link ChunkedBlockDevice.leaseStatus}. */
export type LeaseState = "none" | "held" | "lost" | "released";

export interface DeviceOptions {
  /** Refuse writes, discards and flushes with `Is_read_only`. Default false. */
  readonly readOnly?: boolean;
  /** Clean cache bytes. Default 256 MiB. */
  readonly cacheBytes?: number;
  /** Memory held by dirty data at most; writers wait past it. Default 128 MiB. */
  readonly maxDirtyBytes?: number;
  /** Dirty chunks at most (a flush's work); writers wait past it. Default 1024. */
  readonly maxDirtyChunks?: number;
  /** Upload a dirty chunk after this long. Default 5000 ms. */
  readonly writebackDelayMs?: number;
  /** Store requests in flight. Default 32. */
  readonly concurrency?: number;
  /**
   * Open with this map instead of the volume's: a snapshot's. Read-only, it reads the snapshot;
   * writable, the new writer term starts from it (a rollback). Set by `openVolume`.
   * @internal
   */
  readonly startFrom?: ReadonlyMap<number, ChunkRef>;
  /** A read miss of at least this many bytes of a chunk fetches the whole chunk. */
  readonly wholeChunkReadBytes?: number;
  /** The smallest span a ranged GET asks for. Default 64 KiB. */
  readonly minRangedReadBytes?: number;
  /**
   * How long an object this writer made garbage waits before it is deleted, so that readers
   * that opened earlier can finish (see src/volume/garbage.ts). Default 15 minutes.
   */
  readonly gcGraceMs?: number;
  /**
   * The fetch and read-ahead policy (src/cache/read-policy.ts has the defaults), for tests and
   * measurements; not yet a public setting.
   * @internal
   */
  readonly readPolicy?: PageCacheOptions["readPolicy"];
  readonly clock?: Clock;
  readonly onWritebackError?: (error: Error) => void;
}

export class ChunkedBlockDevice implements BlockDevice {
  readonly superblock: Superblock;
  readonly #store: ObjectStore;
  readonly #chunks: ChunkStore;
  readonly #cache: PageCache;
  readonly #info: Info;
  /** Operations running: a disconnect waits for them. */
  readonly #inFlight = new InFlight();
  readonly #lease: Lease | undefined;
  readonly #prefix: string;
  /** Modifying operations running: a snapshot waits for them. */
  readonly #writesInFlight = new InFlight();
  /** Closed while a snapshot is taken: modifying operations wait for it. */
  #gate: Promise<void> | undefined;
  #connected = true;

  /** `lease`: the volume's lease, held by a writable open and released on disconnect. */
  private constructor(
    store: ObjectStore,
    prefix: string,
    chunks: ChunkStore,
    options: DeviceOptions,
    lease: Lease | undefined,
  ) {
    this.superblock = chunks.superblock;
    this.#store = store;
    this.#prefix = prefix;
    this.#chunks = chunks;
    this.#lease = lease;
    this.#cache = new PageCache({
      chunks,
      sectorSize: this.superblock.sectorSizeBytes,
      clock: options.clock ?? systemClock,
      // Absent options stay undefined; the cache applies its own defaults.
      cacheBytes: options.cacheBytes,
      maxDirtyBytes: options.maxDirtyBytes,
      maxDirtyChunks: options.maxDirtyChunks,
      writebackDelayMs: options.writebackDelayMs,
      wholeChunkReadBytes: options.wholeChunkReadBytes,
      minRangedReadBytes: options.minRangedReadBytes,
      readPolicy: options.readPolicy,
      onWritebackError: options.onWritebackError,
    });
    this.#info = Object.freeze({
      readWrite: !(options.readOnly ?? false),
      sectorSize: this.superblock.sectorSizeBytes,
      sizeSectors: BigInt(this.superblock.sizeBytes / this.superblock.sectorSizeBytes),
    });
  }

  /**
   * Open the device of the volume at `prefix` whose superblock has been read. Use `openVolume`,
   * which reads the superblock and takes the lease.
   * @internal
   */
  static async open(
    store: ObjectStore,
    prefix: string,
    superblock: Superblock,
    options: DeviceOptions = {},
    lease?: Lease,
  ): Promise<ChunkedBlockDevice> {
    const chunks = await ChunkStore.open({
      store,
      prefix,
      superblock,
      concurrency: options.concurrency,
      ...(options.gcGraceMs === undefined ? {} : { gcGraceMs: options.gcGraceMs }),
      ...(options.clock === undefined ? {} : { clock: options.clock }),
      ...(options.startFrom === undefined ? {} : { startFrom: options.startFrom }),
      ...(options.readOnly
        ? {}
        : {
            term:
              lease === undefined
                ? { writerId: randomUUID() }
                : { epoch: lease.epoch, writerId: lease.holderId },
          }),
    });
    return new ChunkedBlockDevice(store, prefix, chunks, options, lease);
  }

  async getInfo(): Promise<Info> {
    return this.#info;
  }

  read(sectorStart: Sector, buffers: readonly Uint8Array[]): Promise<Result<void, BlockError>> {
    const refused = this.#refusal<BlockError>(false);
    if (refused !== undefined) return Promise.resolve(refused);
    const range = checkRequest(this.#info, sectorStart, buffers);
    if (range instanceof InvalidArgumentError) return Promise.resolve(err(ioError(range)));
    // Answered from memory: nothing stays in flight, so there is nothing to track.
    try {
      if (this.#cache.readFromMemory(range.offsetBytes, buffers)) return DONE;
    } catch (error) {
      return Promise.resolve(err(ioError(error)));
    }
    return this.#track(false, () => this.#cache.read(range.offsetBytes, buffers));
  }

  /**
   * Sectors `[sectorStart, +sectors)` as a view of the cache's memory that nothing writes or
   * reuses until it is given back with {@link returnLoan}, when they are in memory in one chunk
   * and make a quarter of it or more; `undefined` otherwise (then `read`). The NBD server's
   * large reads send it as it is: no copy.
   */
  lend(sectorStart: number, sectors: number): Uint8Array | undefined {
    if (this.#refusal(false) !== undefined) return undefined;
    const range = checkRange(this.#info, sectorStart, sectors);
    if (range instanceof InvalidArgumentError) return undefined;
    try {
      return this.#cache.lend(range.offsetBytes, range.lengthBytes);
    } catch {
      return undefined; // the caller's read then meets the failure, as an error value
    }
  }

  /** The reader of a view from {@link lend} is done with it: the cache may reuse its memory. */
  returnLoan(view: Uint8Array): void {
    this.#cache.returnLoan(view);
  }

  write(
    sectorStart: Sector,
    buffers: readonly Uint8Array[],
    options?: WriteOptions,
  ): Promise<Result<void, WriteError>> {
    const refused = this.#refusal<WriteError>(true);
    if (refused !== undefined) return Promise.resolve(refused);
    const range = checkRequest(this.#info, sectorStart, buffers);
    if (range instanceof InvalidArgumentError) return Promise.resolve(err(ioError(range)));
    const fua = options?.fua ?? false;
    // Done in memory at once, unless it must be durable or wait (for a snapshot, or for room).
    try {
      if (
        !fua &&
        this.#gate === undefined &&
        this.#cache.writeToMemory(range.offsetBytes, buffers)
      ) {
        return DONE;
      }
    } catch (error) {
      return Promise.resolve(err(ioError(error)));
    }
    return this.#track(true, () => this.#cache.write(range.offsetBytes, buffers, fua));
  }

  flush(): Promise<Result<void, WriteError>> {
    const refused = this.#refusal<WriteError>(true);
    if (refused !== undefined) return Promise.resolve(refused);
    return this.#track(true, async () => {
      await this.#cache.flush();
      // Superseded objects are garbage now; deleting them need not delay the flush.
      void this.#chunks.deleteSuperseded();
    });
  }

  discard(sectorStart: Sector, sectors: Sector): Promise<Result<void, WriteError>> {
    const refused = this.#refusal<WriteError>(true);
    if (refused !== undefined) return Promise.resolve(refused);
    const range = checkRange(this.#info, sectorStart, sectors);
    if (range instanceof InvalidArgumentError) return Promise.resolve(err(ioError(range)));
    return this.#track(true, () => this.#cache.discard(range.offsetBytes, range.lengthBytes));
  }

  async disconnect(): Promise<Result<void, WriteError>> {
    if (!this.#connected) return err(disconnected);
    this.#connected = false;
    await this.#inFlight.idle();
    let result: Result<void, WriteError> = ok;
    if (this.#info.readWrite) {
      try {
        await this.#cache.flush();
      } catch (error) {
        result = err(ioError(error));
      }
    }
    this.#cache.close();
    await this.#chunks.drain();
    if (this.#info.readWrite && result.ok) await this.#chunks.deleteSuperseded();
    await this.#lease?.release();
    await this.#store.close();
    return result;
  }

  /**
   * Stop at once, as a crash would but tidily: refuse new operations, upload nothing more, wait
   * for requests already sent, and close the store. Returns how many chunks held writes that
   * were dropped.
   */
  async abort(): Promise<{ lostDirtyChunks: number }> {
    const lostDirtyChunks = this.#cache.stats().dirtyChunks;
    this.#connected = false;
    this.#cache.close();
    this.#chunks.fence(new Error("device aborted"));
    this.#lease?.abandon();
    await this.#inFlight.idle();
    await this.#chunks.drain();
    await this.#store.close();
    return { lostDirtyChunks };
  }

  /**
   * Take snapshot `name` of the device as it is now, while writes continue (see the module
   * comment). Fails with `Is_read_only` on a read-only device, and with an I/O error whose
   * cause is a SnapshotError for an invalid or taken name.
   */
  async snapshot(name: string): Promise<Result<SnapshotRecord, WriteError>> {
    if (!this.#connected) return err(disconnected);
    if (!this.#info.readWrite) return err(isReadOnly);
    const invalid = checkSnapshotName(name);
    if (invalid !== undefined) return err(ioError(invalid));
    // A disconnect waits for it like any operation in flight.
    this.#inFlight.enter();
    try {
      return await this.#takeSnapshot(name);
    } finally {
      this.#inFlight.leave();
    }
  }

  async #takeSnapshot(name: string): Promise<Result<SnapshotRecord, WriteError>> {
    while (this.#gate !== undefined) await this.#gate;
    let open: () => void = () => {};
    this.#gate = new Promise((resolve) => (open = resolve));
    try {
      await this.#writesInFlight.idle();
      await this.#cache.flush();
      const refs = this.#chunks.snapshotRefs();
      const record = await createSnapshotRecord(
        this.#store,
        this.#prefix,
        this.superblock,
        name,
        refs,
      );
      return { ok: true, value: record };
    } catch (error) {
      return err(ioError(error));
    } finally {
      this.#gate = undefined;
      open();
    }
  }

  /** Warm the cache with the chunks under `sectors` sectors from `sectorStart`. */
  prefetch(sectorStart: Sector, sectors: Sector): Promise<Result<void, BlockError>> {
    const refused = this.#refusal<BlockError>(false);
    if (refused !== undefined) return Promise.resolve(refused);
    const range = checkRange(this.#info, sectorStart, sectors);
    if (range instanceof InvalidArgumentError) return Promise.resolve(err(ioError(range)));
    return this.#track(false, () => this.#cache.prefetch(range.offsetBytes, range.lengthBytes));
  }

  /**
   * Which bytes of `[offsetBytes, +lengthBytes)` hold data: runs of `allocated: true`, or
   * `false` where the range certainly reads as zeros. Chunk-granular. The range must be inside
   * the device.
   */
  allocationMap(offsetBytes: number, lengthBytes: number): Extent[] {
    return this.#cache.allocationMap(offsetBytes, lengthBytes);
  }

  /** Whether chunk `index` holds data: false means it reads as zeros. */
  isChunkAllocated(index: number): boolean {
    return this.#chunks.isAllocated(index);
  }

  /** The key chunk `index` reads from, if it holds data. */
  chunkObjectKey(index: number): string | undefined {
    return this.#chunks.refOf(index)?.key;
  }

  /** Chunks that hold data. */
  allocatedChunks(): number {
    return this.#chunks.allocatedCount();
  }

  cacheStats(): CacheStats {
    return this.#cache.stats();
  }

  /** The garbage this writer made: deleted, waiting, failed batches. */
  garbageStats(): GarbageStats {
    return this.#chunks.garbageStats();
  }

  /**
   * Throw if the page cache's accounts disagree with its pages (src/cache/invariants.ts). For
   * tests: it walks every cached page.
   * @internal
   */
  checkInvariants(): void {
    this.#cache.checkInvariants();
  }

  /** Bytes of the chunk objects the chunk map names: what the volume's chunks store. */
  storedBytes(): number {
    return this.#chunks.allocatedCount() * this.superblock.chunkSizeBytes;
  }

  /**
   * The lease as this device sees it: `none` for a read-only open (or one without a lease),
   * `held` while it writes, `lost` once another process took it, `released` after
   * `disconnect` or `abort`; with the epoch of this writer's term.
   */
  leaseStatus(): { readonly state: LeaseState; readonly epoch: number | undefined } {
    const lease = this.#lease;
    if (lease === undefined) return { state: "none", epoch: undefined };
    const state = lease.lost !== undefined ? "lost" : this.#connected ? "held" : "released";
    return { state, epoch: lease.epoch };
  }

  /** Why an operation may not start now, if it may not: disconnected, read-only, lease lost. */
  #refusal<E extends WriteError>(modifies: boolean): Result<void, E> | undefined {
    if (!this.#connected) return err(disconnected as E);
    if (modifies && !this.#info.readWrite) return err(isReadOnly as E);
    const lost = this.#lease?.lost;
    if (lost !== undefined) return err(ioError(lost) as E);
    return undefined;
  }

  /**
   * Run one operation that may wait, counted in flight until it settles; a modifying one first
   * waits for a snapshot being taken. A throw becomes an I/O error.
   */
  async #track<E extends WriteError>(
    modifies: boolean,
    operation: () => Promise<void>,
  ): Promise<Result<void, E>> {
    while (modifies && this.#gate !== undefined) await this.#gate;
    // Checked again after the wait, and with no await before the count goes up.
    const refused = this.#refusal<E>(modifies);
    if (refused !== undefined) return refused;
    this.#inFlight.enter();
    if (modifies) this.#writesInFlight.enter();
    try {
      await operation();
      return ok;
    } catch (error) {
      return err(ioError(error) as E);
    } finally {
      this.#inFlight.leave();
      if (modifies) this.#writesInFlight.leave();
    }
  }
}

/** The result of an operation done at once, shared: it is immutable. */
const DONE: Promise<Result<void, never>> = Promise.resolve(ok);
