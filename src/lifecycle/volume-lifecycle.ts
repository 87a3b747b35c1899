/**
 * Volume lifecycle: create, open (as a block device), describe, delete.
 *
 * Every function takes the volume's store stack (see store-stack.ts) and uses it as it is: the
 * stack is built in one place, and nothing here adds a layer of its own. In particular a
 * writable open arms the stack's own fence with the volume's lease, and that fence sits below
 * the retries, so each attempt of each write is checked against the lease.
 *
 * A volume is a prefix in a store holding a superblock, seals and chunk objects (see format.ts).
 * Create writes the superblock with `If-None-Match: *`, so two creates of one volume cannot both
 * succeed; a 412 answering a retried create whose first attempt landed is recognised by the
 * volume id read back. Delete removes the chunks and seals first and the superblock last, so an
 * interrupted delete can be run again.
 *
 * A version 1 volume opens read-only; a writable open says to run `s3blk upgrade`, which
 * converts it in place without copying a chunk (see `upgradeVolume`). A version 2 volume is
 * read and written as it is, and upgraded (its superblock rewritten) before it can be cloned.
 * Delete is refused while clones depend on the volume's snapshots; a clone's delete drops its
 * reference under its base last.
 *
 * This module sits above the device (it builds one), and below the CLI and the NBD server.
 */

import { ChunkedBlockDevice, type DeviceOptions } from "../device/chunked-block-device.js";
import { StoreError, deletePrefix, listAll } from "../store/object-store.js";
import { isBuiltStack, type StoreStack } from "../store/store-stack.js";
import { systemClock, type Clock } from "../util/clock.js";
import { resolveChunkMap, sealChunkMap } from "../volume/chunk-map.js";
import { dropCloneRef, markForDeletion, refsPrefix } from "../volume/clones.js";
import { Lease, type LeaseOptions } from "../volume/lease.js";
import {
  readSnapshot,
  readSnapshots,
  snapshotPrefix,
  snapshotRefs,
  trashPrefix,
} from "../volume/snapshots.js";
import {
  FORMAT_VERSION,
  WRITABLE_FORMAT_VERSIONS,
  chunkPrefix,
  decodeSuperblock,
  sealPrefix,
  encodeSuperblock,
  newSuperblock,
  superblockKey,
  under,
  type Origin,
  type Superblock,
  type VolumeParameters,
} from "../volume/format.js";

/** What the lifecycle needs of a store stack. */
export type VolumeStack = Pick<
  StoreStack,
  "store" | "prefix" | "fence" | "requestTimeoutMs" | "url"
>;

/** The volume does not exist, or already exists. */
export class VolumeError extends Error {
  override readonly name = "VolumeError";
}

/** A writable open of a volume of an older format version: it needs `s3blk upgrade`. */
export class VolumeVersionError extends VolumeError {}

/** Write the superblock of a new volume; refused if one exists. */
export async function createVolume(
  stack: VolumeStack,
  parameters: VolumeParameters,
): Promise<Superblock> {
  const superblock = newSuperblock(parameters);
  try {
    await stack.store.put(superblockKey(stack.prefix), encodeSuperblock(superblock), {
      ifNoneMatch: "*",
    });
  } catch (error) {
    if (!(error instanceof StoreError) || error.code !== "PreconditionFailed") throw error;
    // Ours, if a retried PUT whose first attempt landed: the volume id is random.
    const there = await readSuperblock(stack).catch(() => undefined);
    if (there?.volumeId !== superblock.volumeId) {
      throw new VolumeError(`a volume already exists at ${describe(stack)}`);
    }
  }
  return superblock;
}

/** Read and check the superblock. */
export async function readSuperblock(stack: VolumeStack): Promise<Superblock> {
  const key = superblockKey(stack.prefix);
  const got = await stack.store.get(key);
  if (got === undefined) {
    throw new VolumeError(`no volume at ${describe(stack)} (no ${key})`);
  }
  return decodeSuperblock(got.body, key);
}

export interface OpenOptions extends DeviceOptions {
  /**
   * The lease of a writable open; `false` for none (tests of other things). Default: taken,
   * with the stack's `requestTimeoutMs` as the time a write must be able to finish in.
   */
  readonly lease?: LeaseOptions | false;
  /** Open this snapshot of the volume, read-only, instead of the volume. */
  readonly snapshot?: string;
  /**
   * Start the writer term from this snapshot's map: a rollback. The record is read once the
   * lease is held, so a deletion by another process cannot slip in between.
   * @internal
   */
  readonly rollbackTo?: string;
}

/**
 * Open the volume as a block device. A writable open first takes the volume's lease (see
 * lease.ts) and arms the stack's fence with it; `disconnect` releases it.
 */
export async function openVolume(
  stack: VolumeStack,
  options: OpenOptions = {},
): Promise<ChunkedBlockDevice> {
  const { store, prefix } = stack;
  const superblock = await readSuperblock(stack);
  if (options.snapshot !== undefined) {
    const record = await readSnapshot(store, prefix, superblock, options.snapshot);
    return ChunkedBlockDevice.open(store, prefix, superblock, {
      ...options,
      readOnly: true,
      startFrom: snapshotRefs(prefix, superblock, record),
    });
  }
  if (!WRITABLE_FORMAT_VERSIONS.includes(superblock.formatVersion) && !options.readOnly) {
    throw new VolumeVersionError(
      `${stack.url} is a format version ${superblock.formatVersion} volume, which this s3blk ` +
        `opens read-only; to write it, run: s3blk upgrade ${stack.url}`,
    );
  }
  // A rollback's record is read once the lease (if any) is held: a deletion by another
  // process cannot slip in between.
  const withRollback = async (): Promise<OpenOptions> => {
    if (options.rollbackTo === undefined) return options;
    const record = await readSnapshot(store, prefix, superblock, options.rollbackTo);
    return { ...options, startFrom: snapshotRefs(prefix, superblock, record) };
  };
  if (options.readOnly || options.lease === false) {
    return ChunkedBlockDevice.open(store, prefix, superblock, await withRollback());
  }
  if (!isBuiltStack(stack)) {
    throw new TypeError(
      "a writable open needs the store stack that openStoreStack or buildStoreStack built " +
        "(its fence sits below its retries), not one put together by hand",
    );
  }
  // A write must be able to finish within the store's own timeout: the lease may assume more,
  // never less.
  const requestTimeoutMs = Math.max(stack.requestTimeoutMs, options.lease?.requestTimeoutMs ?? 0);
  const lease = await Lease.acquire(store, prefix, stack.fence, options.clock ?? systemClock, {
    ...options.lease,
    requestTimeoutMs,
  });
  try {
    return await ChunkedBlockDevice.open(store, prefix, superblock, await withRollback(), lease);
  } catch (error) {
    await lease.release();
    throw error;
  }
}

export interface VolumeDescription {
  readonly superblock: Superblock;
  /** Chunks holding data, by the volume's map. */
  readonly storedChunks: number;
  /** Of those, the chunks whose object is the volume's own. */
  readonly ownedChunks: number;
  /** And the chunks whose object a clone shares with its base (or an ancestor). */
  readonly sharedChunks: number;
  /** Bytes of every object under `chunks/`, garbage included. */
  readonly storedBytes: number;
  /** Objects under `chunks/` that no reader reads: superseded, tombstones, late writes. */
  readonly garbageObjects: number;
  /** A clone's origin. */
  readonly origin?: Origin;
  /** The names of its snapshots (those being deleted included), oldest first. */
  readonly snapshots: readonly string[];
}

/**
 * The superblock, and what the volume stores: its map's LISTs, one GET of its seal, a LIST of
 * its snapshots and a GET of each.
 */
export async function describeVolume(stack: VolumeStack): Promise<VolumeDescription> {
  const superblock = await readSuperblock(stack);
  const map = await resolveChunkMap(stack.store, stack.prefix, superblock);
  let storedBytes = 0;
  for await (const entry of listAll(stack.store, chunkPrefix(stack.prefix))) {
    storedBytes += entry.sizeBytes;
  }
  const owned = [...map.refs.values()].filter((r) => r.volumeId === superblock.volumeId).length;
  const snapshots = await readSnapshots(stack.store, stack.prefix, superblock);
  return {
    superblock,
    storedChunks: map.refs.size,
    ownedChunks: owned,
    sharedChunks: map.refs.size - owned,
    storedBytes,
    garbageObjects: map.garbage.length,
    ...(superblock.origin === undefined ? {} : { origin: superblock.origin }),
    snapshots: snapshots
      .sort((a, b) => a.createdAt.localeCompare(b.createdAt) || a.name.localeCompare(b.name))
      .map((r) => r.name),
  };
}

/**
 * Delete the volume, holding its lease: refused while clones depend on its snapshots (they are
 * marked as being deleted meanwhile, so that no clone of them starts). Its chunks, seals, snapshots and other
 * records go first, its superblock then, and a clone's reference under its base last, so an
 * interrupted delete can be run again. Returns the objects deleted.
 */
export async function deleteVolume(
  stack: VolumeStack,
  options: { readonly lease?: LeaseOptions; readonly clock?: Clock } = {},
): Promise<number> {
  const superblock = await readSuperblock(stack);
  // Under the lease: no writer takes a snapshot that this deletion would not mark.
  return holdingLease(stack, options, () => deleteHeld(stack, superblock));
}

async function deleteHeld(stack: VolumeStack, superblock: Superblock): Promise<number> {
  const { store, prefix } = stack;
  const snapshots = await readSnapshots(store, prefix, superblock);
  const names = snapshots.map((r) => r.name);
  await markForDeletion(store, { prefix, superblock }, names, true);
  let count = 0;
  for (const part of [
    chunkPrefix(prefix),
    sealPrefix(prefix),
    snapshotPrefix(prefix),
    trashPrefix(prefix),
    refsPrefix(prefix),
    under(prefix, "gc/"),
  ]) {
    count += await deletePrefix(store, part);
  }
  await store.delete(superblockKey(prefix));
  await dropCloneRef(store, superblock);
  return count + 1;
}

/** What `upgradeVolume` did. */
export type UpgradeOutcome =
  | {
      readonly upgraded: true;
      readonly fromVersion: number;
      /** From version 1: the chunks its new seal names. */
      readonly chunks?: number;
    }
  | { readonly upgraded: false; readonly version: number };

/**
 * Convert a volume of an older version to this one in place, without copying a chunk, under the
 * lease (so no writer runs meanwhile). Version 1: seal a map naming every version 1 chunk
 * object as generation "", then rewrite the superblock with `If-Match` (the commit). Before the
 * commit the volume is still version 1, whose readers ignore `seals/`; a crash anywhere is
 * undone by running it again, which seals afresh under a new epoch. Version 2 has the layout
 * already: only the superblock is rewritten, so that a version 2 s3blk no longer opens it (it
 * would delete a snapshot that clones depend on). Cost: a GET of the superblock and the lease,
 * two PUTs of the lease, one of the superblock; from version 1 also a LIST per 1000 chunks and
 * a PUT of the seal.
 */
export async function upgradeVolume(
  stack: VolumeStack,
  options: { readonly lease?: LeaseOptions; readonly clock?: Clock } = {},
): Promise<UpgradeOutcome> {
  const key = superblockKey(stack.prefix);
  const got = await stack.store.get(key);
  if (got === undefined) throw new VolumeError(`no volume at ${describe(stack)} (no ${key})`);
  const old = decodeSuperblock(got.body, key);
  if (old.formatVersion >= FORMAT_VERSION) return { upgraded: false, version: old.formatVersion };
  return holdingLease(stack, options, async (lease) => {
    let chunks: number | undefined;
    if (old.formatVersion === 1) {
      const map = await resolveChunkMap(stack.store, stack.prefix, old);
      // Version 1 has no garbage to speak of: what the seal leaves over is left to `s3blk gc`.
      await sealChunkMap(stack.store, stack.prefix, old, map, {
        epoch: lease.epoch,
        writerId: lease.holderId,
      });
      chunks = map.refs.size;
    }
    const upgraded: Superblock = { ...old, formatVersion: FORMAT_VERSION };
    try {
      await stack.store.put(key, encodeSuperblock(upgraded), { ifMatch: got.etag });
    } catch (error) {
      if (!(error instanceof StoreError) || error.code !== "PreconditionFailed") throw error;
      // A retried PUT that had landed; nobody else writes it while we hold the lease.
      const now = await readSuperblock(stack);
      if (now.volumeId !== old.volumeId || now.formatVersion !== FORMAT_VERSION) throw error;
    }
    return {
      upgraded: true,
      fromVersion: old.formatVersion,
      ...(chunks === undefined ? {} : { chunks }),
    };
  });
}

/**
 * Run `use` holding the volume's lease, as a writer would: refused, naming the holder, while
 * another process serves the volume; so no writer, snapshot or deletion runs meanwhile.
 */
export async function holdingLease<T>(
  stack: VolumeStack,
  options: { readonly lease?: LeaseOptions; readonly clock?: Clock },
  use: (lease: Lease) => Promise<T>,
): Promise<T> {
  const lease = await Lease.acquire(
    stack.store,
    stack.prefix,
    stack.fence,
    options.clock ?? systemClock,
    { requestTimeoutMs: stack.requestTimeoutMs, ...options.lease },
  );
  try {
    return await use(lease);
  } finally {
    await lease.release();
  }
}

function describe(stack: VolumeStack): string {
  const where = stack.store.description;
  return stack.prefix === "" ? where : `${where} prefix ${stack.prefix}`;
}
