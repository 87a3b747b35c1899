/**
 * Snapshot operations on a volume that is not open here: create, list, delete, roll back (the
 * in-process snapshot of an open device is `ChunkedBlockDevice.snapshot`).
 *
 * Creating and rolling back take the volume's lease, like any writer: a volume another process
 * serves is refused, naming the holder. Listing and reading need no lease. Deleting a snapshot
 * is refused while clones depend on it; otherwise its record moves to the trash, where it keeps
 * its objects pinned through the grace horizon, after which garbage collection deletes what it
 * alone named. A delete racing a writer can lose nothing the writer still reads: a writer's
 * pins are the records it read at open, and more.
 */

import { ppWriteError } from "../block/block-device.js";
import { deleteSnapshotRecord } from "../volume/clones.js";
import type { LeaseOptions } from "../volume/lease.js";
import { readSnapshot, readSnapshots, type SnapshotRecord } from "../volume/snapshots.js";
import {
  holdingLease,
  openVolume,
  readSuperblock,
  type OpenOptions,
  type VolumeStack,
} from "./volume-lifecycle.js";

/** Take snapshot `name` of the volume: open it writable, snapshot, close. */
export async function createSnapshot(
  stack: VolumeStack,
  name: string,
  options: OpenOptions = {},
): Promise<SnapshotRecord> {
  const device = await openVolume(stack, options);
  const taken = await device.snapshot(name);
  const closed = await device.disconnect();
  if (!taken.ok)
    throw taken.error.kind === "Io" ? taken.error.cause : new Error(ppWriteError(taken.error));
  if (!closed.ok) throw new Error(ppWriteError(closed.error));
  return taken.value;
}

/** What `snapshot list` shows of one snapshot. */
export interface SnapshotSummary {
  readonly name: string;
  readonly createdAt: string;
  /** Chunks holding data in it. */
  readonly chunks: number;
  /** A delete of it was interrupted: it cannot be opened or cloned until it is run again. */
  readonly deleting: boolean;
}

/** The volume's snapshots, oldest first: one LIST, one GET per snapshot. */
export async function listSnapshots(stack: VolumeStack): Promise<SnapshotSummary[]> {
  const superblock = await readSuperblock(stack);
  const records = await readSnapshots(stack.store, stack.prefix, superblock);
  return records
    .map((r) => ({
      name: r.name,
      createdAt: r.createdAt,
      chunks: Object.keys(r.chunks).length,
      deleting: r.deleting !== undefined,
    }))
    .sort((a, b) => a.createdAt.localeCompare(b.createdAt) || a.name.localeCompare(b.name));
}

/**
 * Delete snapshot `name`: a SnapshotError if there is none, a CloneError naming the clones that
 * depend on it.
 */
export async function deleteSnapshot(
  stack: VolumeStack,
  name: string,
  options: { readonly lease?: LeaseOptions } = {},
): Promise<void> {
  const superblock = await readSuperblock(stack);
  // Under the lease, like a snapshot's creation: two deletions never run at once (each would
  // undo or reuse the other's mark), and none runs beside a writer taking snapshots.
  await holdingLease(stack, options, () =>
    deleteSnapshotRecord(stack.store, { prefix: stack.prefix, superblock }, name),
  );
}

/**
 * Make the volume read as snapshot `name` again: a new writer term starts from the snapshot's
 * map and seals it. Later snapshots stay. Data written since is garbage unless a snapshot names
 * it.
 */
export async function rollbackVolume(
  stack: VolumeStack,
  name: string,
  options: OpenOptions = {},
): Promise<SnapshotRecord> {
  const superblock = await readSuperblock(stack);
  // Checked before the lease is taken, for a clear error; read again under it.
  const record = await readSnapshot(stack.store, stack.prefix, superblock, name);
  const device = await openVolume(stack, { ...options, rollbackTo: name });
  const closed = await device.disconnect();
  if (!closed.ok) throw new Error(ppWriteError(closed.error));
  return record;
}
