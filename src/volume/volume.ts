/**
 * Volume lifecycle: create, open (as a block device), describe, delete.
 *
 * A volume is a prefix in a store holding a superblock and chunk objects (see format.ts). Create
 * writes the superblock with `If-None-Match: *`, so two creates of one volume cannot both
 * succeed. Delete removes the chunks first and the superblock last, so an interrupted delete
 * can be run again.
 */

import { ChunkedBlockDevice, type DeviceOptions } from "../device/chunked-block-device.js";
import { StoreError, deletePrefix, listAll, type ObjectStore } from "../store/object-store.js";
import { Fence, FencedStore } from "../store/fenced-store.js";
import { systemClock } from "../util/clock.js";
import { Lease, type LeaseOptions } from "./lease.js";
import {
  chunkPrefix,
  decodeSuperblock,
  encodeSuperblock,
  newSuperblock,
  superblockKey,
  type Superblock,
  type VolumeParameters,
} from "./format.js";

/** The volume does not exist, or already exists. */
export class VolumeError extends Error {
  override readonly name = "VolumeError";
}

export async function createVolume(
  store: ObjectStore,
  prefix: string,
  parameters: VolumeParameters,
): Promise<Superblock> {
  const superblock = newSuperblock(parameters);
  try {
    await store.put(superblockKey(prefix), encodeSuperblock(superblock), { ifNoneMatch: "*" });
  } catch (error) {
    if (error instanceof StoreError && error.code === "PreconditionFailed") {
      throw new VolumeError(`a volume already exists at ${describe(store, prefix)}`);
    }
    throw error;
  }
  return superblock;
}

/** Read and check the superblock. */
export async function readSuperblock(store: ObjectStore, prefix: string): Promise<Superblock> {
  const key = superblockKey(prefix);
  const got = await store.get(key);
  if (got === undefined) {
    throw new VolumeError(`no volume at ${describe(store, prefix)} (no ${key})`);
  }
  return decodeSuperblock(got.body, key);
}

export interface OpenOptions extends DeviceOptions {
  /** The lease of a writable open; `false` for none (tests of other things). Default: taken. */
  readonly lease?: LeaseOptions | false;
  /** The store stack's fence (see store-url.ts); one is added on top of `store` if absent. */
  readonly fence?: Fence;
}

/**
 * Open the volume as a block device. A writable open first takes the volume's lease (see
 * lease.ts) and fences every write of the store with it; `disconnect` releases it.
 */
export async function openVolume(
  store: ObjectStore,
  prefix: string,
  options: OpenOptions = {},
): Promise<ChunkedBlockDevice> {
  const superblock = await readSuperblock(store, prefix);
  if (options.readOnly || options.lease === false) {
    return ChunkedBlockDevice.open(store, prefix, superblock, options);
  }
  let fenced = store;
  let fence = options.fence;
  if (fence === undefined) {
    fence = new Fence();
    fenced = new FencedStore(store, fence);
  }
  const lease = await Lease.acquire(
    fenced,
    prefix,
    fence,
    options.clock ?? systemClock,
    options.lease,
  );
  try {
    return await ChunkedBlockDevice.open(fenced, prefix, superblock, options, lease);
  } catch (error) {
    await lease.release();
    throw error;
  }
}

export interface VolumeDescription {
  readonly superblock: Superblock;
  readonly storedChunks: number;
  readonly storedBytes: number;
}

export async function describeVolume(
  store: ObjectStore,
  prefix: string,
): Promise<VolumeDescription> {
  const superblock = await readSuperblock(store, prefix);
  let storedChunks = 0;
  let storedBytes = 0;
  for await (const entry of listAll(store, chunkPrefix(prefix))) {
    storedChunks++;
    storedBytes += entry.sizeBytes;
  }
  return { superblock, storedChunks, storedBytes };
}

/** Delete the volume's chunks, then its superblock. Returns the number of objects deleted. */
export async function deleteVolume(store: ObjectStore, prefix: string): Promise<number> {
  await readSuperblock(store, prefix);
  const chunks = await deletePrefix(store, chunkPrefix(prefix));
  await store.delete(superblockKey(prefix));
  return chunks + 1;
}

function describe(store: ObjectStore, prefix: string): string {
  return prefix === "" ? store.description : `${store.description} prefix ${prefix}`;
}
