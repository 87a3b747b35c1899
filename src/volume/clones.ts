/**
 * Clones, the deletion of snapshots, and the race between the two.
 *
 *     <base>/refs/<snapshot>/<clone volume id>.json   a clone of the base's snapshot exists
 *
 * A clone is a volume of its own, under its own prefix in the same bucket, whose superblock
 * names its origin: a snapshot of the base. Until its first writer term it reads as that
 * snapshot; every chunk it writes goes under its own prefix, and its seals and snapshots name
 * the base's objects for the chunks it has not written (flattened: a clone of a clone names the
 * objects of every ancestor directly). Nothing is copied: a clone costs a constant number of
 * requests whatever the base's size.
 *
 * A clone only ever names objects of its origin snapshot (or of snapshots of its own), so the
 * base keeps every object its clones read for as long as that snapshot exists, and a snapshot
 * with clones cannot be deleted. The base learns of its clones from the refs under its prefix,
 * without a bucket-wide LIST.
 *
 * ## Creating a clone against deleting its snapshot
 *
 * Creation: (1) PUT the ref (`If-None-Match: *`); (2) PUT the clone's superblock
 * (`If-None-Match: *`: the target must not exist); (3) GET the snapshot's record again. If it is
 * gone or being deleted, undo (2) and (1) and back off.
 *
 * Deletion: (1) rewrite the record with `deleting` (`If-Match`); (2) LIST the refs and GET each
 * clone's superblock; a ref whose clone does not exist was left by an interrupted create or
 * delete, and is removed; (3) if a clone is left, rewrite the record without `deleting` and
 * refuse, naming the clones; (4) otherwise copy the record into the trash (its objects stay
 * pinned through the grace horizon) and DELETE it.
 *
 * On a store where a request sees every request that completed before it (see docs/format.md),
 * one of the two always sees the other: if the deletion's LIST (2) missed the clone's ref, or
 * found it before the clone's superblock existed, then the mark (1) came before the clone's
 * step (3), which therefore sees it and backs off. If the deletion sees a live clone, it backs
 * off. Both may back off; neither can succeed against the other.
 */

import { randomUUID } from "node:crypto";
import { StoreError, listAll, type ObjectStore } from "../store/object-store.js";
import {
  FormatError,
  decodeSuperblock,
  encodeSuperblock,
  newSuperblock,
  superblockKey,
  under,
  type Superblock,
} from "./format.js";
import {
  SnapshotError,
  encodeSnapshotRecord,
  readSnapshot,
  readSnapshotAt,
  snapshotKey,
  trashKey,
  type SnapshotRecord,
} from "./snapshots.js";

export const REF_FORMAT = "s3blk-ref";

/** What a ref says: which clone depends on which snapshot. */
export interface CloneRef {
  readonly format: typeof REF_FORMAT;
  readonly version: 1;
  readonly snapshot: string;
  readonly clone: { readonly prefix: string; readonly volumeId: string };
  readonly createdAt: string;
}

/** A clone cannot be made, or a snapshot or volume cannot be deleted because of clones. */
export class CloneError extends Error {
  override readonly name = "CloneError";
}

export function refsPrefix(prefix: string, snapshot?: string): string {
  return under(prefix, snapshot === undefined ? "refs/" : `refs/${snapshot}/`);
}

function refKey(basePrefix: string, snapshot: string, cloneVolumeId: string): string {
  return `${refsPrefix(basePrefix, snapshot)}${cloneVolumeId}.json`;
}

/** A volume that exists: its prefix and superblock. */
export interface VolumeAt {
  readonly prefix: string;
  readonly superblock: Superblock;
}

/**
 * Make a clone of snapshot `snapshot` of `base` under `targetPrefix`, in the same store: a read
 * of the snapshot's record, a ref under the base, the clone's superblock, and a second read of
 * the record (see the module comment). Four requests. Returns the clone's superblock.
 */
export async function createClone(
  store: ObjectStore,
  base: VolumeAt,
  snapshot: string,
  targetPrefix: string,
): Promise<Superblock> {
  const record = await readSnapshot(store, base.prefix, base.superblock, snapshot);
  // The record's creator id names this very snapshot: one deleted and made again under the
  // same name is another, and a clone must never read it in place of its own.
  const origin = {
    prefix: base.prefix,
    volumeId: base.superblock.volumeId,
    snapshot,
    creator: record.creator,
  };
  const { sizeBytes, sectorSizeBytes, chunkSizeBytes } = base.superblock;
  const clone: Superblock = {
    ...newSuperblock({ sizeBytes, sectorSizeBytes, chunkSizeBytes }),
    origin,
  };
  const ref: CloneRef = {
    format: REF_FORMAT,
    version: 1,
    snapshot,
    clone: { prefix: targetPrefix, volumeId: clone.volumeId },
    createdAt: clone.createdAt,
  };
  const key = refKey(base.prefix, snapshot, clone.volumeId);
  // The key holds the clone's random id: a 412 can only answer our own retried PUT.
  await createOrOwn(store, key, Buffer.from(`${JSON.stringify(ref)}\n`));
  const cloneKey = superblockKey(targetPrefix);
  try {
    await store.put(cloneKey, encodeSuperblock(clone), { ifNoneMatch: "*" });
  } catch (error) {
    // The PUT may have landed though it was reported failed: then the clone exists and its ref
    // must stay. Only a superblock that is certainly not ours lets the ref go.
    const there = await readVolumeId(store, cloneKey).catch(() => "unknown");
    if (there !== clone.volumeId) {
      if (there !== "unknown") await store.delete(key);
      if (error instanceof StoreError && error.code === "PreconditionFailed") {
        throw new CloneError(`a volume already exists at ${targetPrefix || "the target"}`);
      }
      throw error;
    }
  }
  const again = await readSnapshotAt(store, base.prefix, base.superblock.volumeId, snapshot).then(
    (found) => found.record,
    (error: unknown) => {
      if (error instanceof SnapshotError) return undefined;
      throw error;
    },
  );
  if (again === undefined || again.deleting !== undefined || again.creator !== record.creator) {
    await store.delete(cloneKey);
    await store.delete(key);
    throw new CloneError(`snapshot "${snapshot}" is being deleted: no clone was made`);
  }
  return clone;
}

async function createOrOwn(store: ObjectStore, key: string, body: Uint8Array): Promise<void> {
  try {
    await store.put(key, body, { ifNoneMatch: "*" });
  } catch (error) {
    if (!(error instanceof StoreError) || error.code !== "PreconditionFailed") throw error;
  }
}

/** The volume id of the superblock at `key`; undefined if there is none or it is not one. */
async function readVolumeId(store: ObjectStore, key: string): Promise<string | undefined> {
  const got = await store.get(key);
  if (got === undefined) return undefined;
  try {
    return decodeSuperblock(got.body, key).volumeId;
  } catch {
    return undefined;
  }
}

/** A clone that depends on a snapshot, as its ref names it. */
export interface Dependent {
  readonly snapshot: string;
  readonly prefix: string;
  readonly volumeId: string;
}

/** What the refs under a base say. */
export interface FoundClones {
  /** Clones that exist and depend on the snapshot. */
  readonly live: readonly Dependent[];
  /**
   * Refs with no such clone behind them: left by an interrupted create or delete, or a create
   * in flight that has not written its superblock yet. Removed only once the snapshot is gone.
   */
  readonly stale: readonly string[];
}

/**
 * The clones that depend on snapshots of the volume at `base` (on `snapshot` only, if given):
 * one LIST of the refs and a GET of each ref and of its clone's superblock. Deletes nothing.
 */
export async function findClones(
  store: ObjectStore,
  base: VolumeAt,
  snapshot?: string,
): Promise<FoundClones> {
  const live: Dependent[] = [];
  const stale: string[] = [];
  for await (const entry of listAll(store, refsPrefix(base.prefix, snapshot))) {
    const got = await store.get(entry.key);
    if (got === undefined) continue;
    const ref = decodeRef(got.body, entry.key);
    const there = await store.get(superblockKey(ref.clone.prefix));
    const clone = there === undefined ? undefined : decodeSuperblock(there.body, ref.clone.prefix);
    const depends =
      clone?.volumeId === ref.clone.volumeId &&
      clone.origin?.prefix === base.prefix &&
      clone.origin.volumeId === base.superblock.volumeId &&
      clone.origin.snapshot === ref.snapshot;
    if (depends) live.push({ snapshot: ref.snapshot, ...ref.clone });
    else stale.push(entry.key);
  }
  return { live, stale };
}

function decodeRef(bytes: Uint8Array, key: string): CloneRef {
  let ref: Partial<CloneRef> | null;
  try {
    ref = JSON.parse(Buffer.from(bytes).toString("utf8")) as Partial<CloneRef> | null;
  } catch {
    throw new FormatError(`${key} is not an s3blk clone reference (not JSON)`);
  }
  if (
    ref === null ||
    typeof ref !== "object" ||
    ref.format !== REF_FORMAT ||
    typeof ref.snapshot !== "string" ||
    typeof ref.clone?.prefix !== "string" ||
    typeof ref.clone.volumeId !== "string"
  ) {
    throw new FormatError(`${key} is not an s3blk clone reference`);
  }
  return ref as CloneRef;
}

/** Drop the ref of the clone `clone` under its origin, once the clone is deleted. */
export async function dropCloneRef(store: ObjectStore, clone: Superblock): Promise<void> {
  if (clone.origin === undefined) return;
  await store.delete(refKey(clone.origin.prefix, clone.origin.snapshot, clone.volumeId));
}

/** A snapshot record marked for deletion by this deletion, and how to undo the mark. */
interface Marked {
  readonly record: SnapshotRecord;
  readonly key: string;
  /** The entity tag of our mark. */
  readonly etag: string;
}

/**
 * Mark snapshots `names` of `base` as being deleted, then look for their clones. None: the
 * marked records are returned, for the caller to finish. Some: every mark is undone and a
 * CloneError names the clones. The caller holds the volume's lease, so no other deletion runs
 * meanwhile (a second one could reuse or undo this one's mark); clone creations may.
 */
export async function markForDeletion(
  store: ObjectStore,
  base: VolumeAt,
  names: readonly string[],
  allSnapshots = false,
): Promise<Marked[]> {
  const marked: Marked[] = [];
  try {
    for (const name of names) marked.push(await mark(store, base, name));
    const found = allSnapshots
      ? [await findClones(store, base)]
      : await Promise.all(names.map((name) => findClones(store, base, name)));
    const clones = found.flatMap((f) => f.live);
    if (clones.length > 0) {
      const list = clones.map((c) => `${c.prefix} (of ${c.snapshot})`).join(", ");
      throw new CloneError(
        `${clones.length === 1 ? "a clone depends" : `${clones.length} clones depend`} on ` +
          `${names.length === 1 ? `snapshot "${names[0]}"` : "its snapshots"}: ${list}; ` +
          `delete ${clones.length === 1 ? "it" : "them"} first`,
      );
    }
    return marked;
  } catch (error) {
    const stuck: string[] = [];
    for (const m of marked) await unmark(store, m).catch(() => stuck.push(m.record.name));
    if (stuck.length > 0 && error instanceof Error) {
      error.message +=
        ` (snapshot ${stuck.join(", ")} stays marked as being deleted: run the delete again ` +
        "to finish it, once no clone depends on it)";
    }
    throw error;
  }
}

/** Rewrite the record with a mark of this deletion's own, whatever mark it had. */
async function mark(store: ObjectStore, base: VolumeAt, name: string): Promise<Marked> {
  const key = snapshotKey(base.prefix, name);
  const { record, etag } = await readSnapshotAt(store, base.prefix, base.superblock.volumeId, name);
  const { deleting: _, ...unmarked } = record;
  const marking: SnapshotRecord = { ...unmarked, deleting: randomUUID() };
  try {
    const put = await store.put(key, encodeSnapshotRecord(marking), { ifMatch: etag });
    return { record: unmarked, key, etag: put.etag };
  } catch (error) {
    if (!(error instanceof StoreError) || error.code !== "PreconditionFailed") throw error;
    // A retried PUT that had landed finds our own mark; anything else changed under us.
    const now = await readSnapshotAt(store, base.prefix, base.superblock.volumeId, name);
    if (now.record.deleting === marking.deleting) return { record: unmarked, key, etag: now.etag };
    throw new CloneError(`snapshot "${name}" changed while it was being deleted; try again`);
  }
}

async function unmark(store: ObjectStore, m: Marked): Promise<void> {
  await store.put(m.key, encodeSnapshotRecord(m.record), { ifMatch: m.etag });
}

/**
 * Finish deleting a marked snapshot: its record goes into the trash, where it keeps its
 * objects pinned through the grace horizon, then its own key is deleted, and last the refs
 * left over by interrupted or backed-off clones (a clone in flight now finds the record gone).
 */
export async function finishDeletion(store: ObjectStore, base: VolumeAt, m: Marked): Promise<void> {
  const trashed: SnapshotRecord = { ...m.record, deleting: "trash" };
  await store.put(trashKey(base.prefix, trashed), encodeSnapshotRecord(trashed));
  await store.delete(m.key);
  const { stale } = await findClones(store, base, m.record.name);
  for (const key of stale) await store.delete(key);
}

/** Delete snapshot `name` of `base`, unless clones depend on it (see the module comment). */
export async function deleteSnapshotRecord(
  store: ObjectStore,
  base: VolumeAt,
  name: string,
): Promise<void> {
  const [marked] = await markForDeletion(store, base, [name]);
  if (marked !== undefined) await finishDeletion(store, base, marked);
}
