/**
 * Volume lifecycle: create, open (as a block device), describe, delete.
 *
 * Every function takes the volume's store stack (see store-stack.ts) and uses it as it is: the
 * stack is built in one place, and nothing here adds a layer of its own. In particular a
 * writable open arms the stack's own fence with the volume's lease, and that fence sits below
 * the retries, so each attempt of each write is checked against the lease.
 *
 * A volume is a prefix in a store holding a superblock and chunk objects (see format.ts). Create
 * writes the superblock with `If-None-Match: *`, so two creates of one volume cannot both
 * succeed. Delete removes the chunks first and the superblock last, so an interrupted delete
 * can be run again.
 *
 * This module sits above the device (it builds one), and below the CLI and the NBD server.
 */

import { ChunkedBlockDevice, type DeviceOptions } from "../device/chunked-block-device.js";
import { StoreError, deletePrefix, listAll } from "../store/object-store.js";
import { isBuiltStack, type StoreStack } from "../store/store-stack.js";
import { systemClock } from "../util/clock.js";
import { Lease, type LeaseOptions } from "../volume/lease.js";
import {
  chunkPrefix,
  decodeSuperblock,
  encodeSuperblock,
  newSuperblock,
  superblockKey,
  type Superblock,
  type VolumeParameters,
} from "../volume/format.js";

/** What the lifecycle needs of a store stack. */
export type VolumeStack = Pick<StoreStack, "store" | "prefix" | "fence" | "requestTimeoutMs">;

/** The volume does not exist, or already exists. */
export class VolumeError extends Error {
  override readonly name = "VolumeError";
}

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
    if (error instanceof StoreError && error.code === "PreconditionFailed") {
      throw new VolumeError(`a volume already exists at ${describe(stack)}`);
    }
    throw error;
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
  if (options.readOnly || options.lease === false) {
    return ChunkedBlockDevice.open(store, prefix, superblock, options);
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
    return await ChunkedBlockDevice.open(store, prefix, superblock, options, lease);
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

/** The superblock, and what the volume stores: one LIST request per 1000 chunks. */
export async function describeVolume(stack: VolumeStack): Promise<VolumeDescription> {
  const superblock = await readSuperblock(stack);
  let storedChunks = 0;
  let storedBytes = 0;
  for await (const entry of listAll(stack.store, chunkPrefix(stack.prefix))) {
    storedChunks++;
    storedBytes += entry.sizeBytes;
  }
  return { superblock, storedChunks, storedBytes };
}

/** Delete the volume's chunks, then its superblock. Returns the number of objects deleted. */
export async function deleteVolume(stack: VolumeStack): Promise<number> {
  await readSuperblock(stack);
  const chunks = await deletePrefix(stack.store, chunkPrefix(stack.prefix));
  await stack.store.delete(superblockKey(stack.prefix));
  return chunks + 1;
}

function describe(stack: VolumeStack): string {
  const where = stack.store.description;
  return stack.prefix === "" ? where : `${where} prefix ${stack.prefix}`;
}
