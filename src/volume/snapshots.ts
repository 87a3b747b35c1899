/**
 * Snapshots: immutable, named, flattened chunk maps.
 *
 *     <prefix>/snapshots/<name>.json      {"format":"s3blk-snapshot", ..., "chunks":{hex: gen}}
 *
 * A snapshot record names, for every chunk holding data, the generation of the object that holds
 * it (a chunk absent reads as zeros), exactly as a seal does. Chunk objects are never
 * overwritten, so a snapshot is only this map: taking one copies nothing, and reading one is one
 * GET and then one map lookup per chunk, never a walk down a chain. A record is created with
 * `If-None-Match: *` and never rewritten; a retried create answered 412 reads the record back
 * and recognises its own `creator` id.
 *
 * While a record exists, every object it names is pinned: a writer's deletion of superseded
 * objects, and the garbage deletion at a writer's start, skip them. So a writer reads every
 * record at open (one GET each) to know the pins.
 */

import { randomUUID } from "node:crypto";
import { StoreError, listAll, type ObjectStore } from "../store/object-store.js";
import {
  FormatError,
  checkChunkMap,
  chunkCountOf,
  decodeChunkMap,
  encodeChunkMap,
  under,
  type ChunkRef,
  type EncodedChunkMap,
  type Superblock,
} from "./format.js";

export const SNAPSHOT_FORMAT = "s3blk-snapshot";

const NAME_PATTERN = /^[A-Za-z0-9._-]{1,64}$/;

/** A snapshot is unknown, its name taken or invalid: one line each, for the user. */
export class SnapshotError extends Error {
  override readonly name = "SnapshotError";
}

/** Undefined if `name` is a valid snapshot name, else what is wrong with it. */
export function checkSnapshotName(name: string): SnapshotError | undefined {
  if (NAME_PATTERN.test(name) && name !== "." && name !== "..") return undefined;
  return new SnapshotError(
    `invalid snapshot name "${name}": use 1 to 64 characters of A-Z, a-z, 0-9, ".", "_" and "-"`,
  );
}

export interface SnapshotRecord extends EncodedChunkMap {
  readonly format: typeof SNAPSHOT_FORMAT;
  readonly version: 1;
  readonly volumeId: string;
  readonly name: string;
  readonly createdAt: string;
  /** A random id per create, read back after a retried create. */
  readonly creator: string;
  /**
   * The id of the deletion that marked it, before it looked for clones (see clones.ts); left by
   * one that was interrupted. The snapshot can then no longer be opened or cloned; it still
   * pins its objects, and the clones that depend on it still read it.
   */
  readonly deleting?: string;
}

export function snapshotPrefix(prefix: string): string {
  return under(prefix, "snapshots/");
}

export function snapshotKey(prefix: string, name: string): string {
  return `${snapshotPrefix(prefix)}${name}.json`;
}

/**
 * Where a deleted snapshot's record waits out the grace horizon: its objects stay pinned until
 * garbage collection finds it older than the grace (see garbage.ts), so that an export of the
 * snapshot still running when it was deleted is not cut short.
 */
export function trashPrefix(prefix: string): string {
  return under(prefix, "trash/");
}

export function trashKey(prefix: string, record: SnapshotRecord): string {
  return `${trashPrefix(prefix)}${record.name}.${record.creator}.json`;
}

export function encodeSnapshotRecord(record: SnapshotRecord): Uint8Array {
  return Buffer.from(`${JSON.stringify(record)}\n`, "utf8");
}

/** Parse and check the record at `key` of a snapshot of the volume `volumeId`. */
export function decodeSnapshotRecord(
  bytes: Uint8Array,
  key: string,
  volumeId: string,
): SnapshotRecord {
  let record: Partial<SnapshotRecord> | null;
  try {
    record = JSON.parse(Buffer.from(bytes).toString("utf8")) as Partial<SnapshotRecord> | null;
  } catch {
    throw new FormatError(`${key} is not an s3blk snapshot (not JSON)`);
  }
  if (record === null || typeof record !== "object" || record.format !== SNAPSHOT_FORMAT) {
    throw new FormatError(`${key} is not an s3blk snapshot`);
  }
  if (record.volumeId !== volumeId) {
    throw new FormatError(`${key} belongs to volume ${String(record.volumeId)}, not ${volumeId}`);
  }
  if (record.version !== 1 || typeof record.name !== "string") {
    throw new FormatError(`${key} is a malformed snapshot`);
  }
  checkChunkMap(record, key, "snapshot");
  return record as SnapshotRecord;
}

/** Create the record of snapshot `name` naming `refs`. */
export async function createSnapshotRecord(
  store: ObjectStore,
  prefix: string,
  superblock: Superblock,
  name: string,
  refs: ReadonlyMap<number, ChunkRef>,
): Promise<SnapshotRecord> {
  const invalid = checkSnapshotName(name);
  if (invalid !== undefined) throw invalid;
  const record: SnapshotRecord = {
    format: SNAPSHOT_FORMAT,
    version: 1,
    volumeId: superblock.volumeId,
    name,
    createdAt: new Date().toISOString(),
    creator: randomUUID(),
    ...encodeChunkMap(superblock.volumeId, refs),
  };
  const key = snapshotKey(prefix, name);
  try {
    await store.put(key, encodeSnapshotRecord(record), { ifNoneMatch: "*" });
  } catch (error) {
    if (!(error instanceof StoreError) || error.code !== "PreconditionFailed") throw error;
    const there = await store.get(key);
    const theirs =
      there === undefined ? undefined : decodeSnapshotRecord(there.body, key, superblock.volumeId);
    if (theirs?.creator !== record.creator) {
      throw new SnapshotError(
        theirs?.deleting !== undefined
          ? `the snapshot named "${name}" is being deleted; finish that with: s3blk snapshot delete`
          : `a snapshot named "${name}" already exists`,
      );
    }
  }
  return record;
}

/**
 * The record of snapshot `name` of the volume `volumeId` at `prefix`, in whatever state, and
 * its entity tag; a SnapshotError if there is none.
 */
export async function readSnapshotAt(
  store: ObjectStore,
  prefix: string,
  volumeId: string,
  name: string,
  options: { readonly whatFor?: string } = {},
): Promise<{ readonly record: SnapshotRecord; readonly etag: string }> {
  const invalid = checkSnapshotName(name);
  if (invalid !== undefined) throw invalid;
  const key = snapshotKey(prefix, name);
  const got = await store.get(key);
  if (got === undefined) {
    const whatFor = options.whatFor === undefined ? "" : `, ${options.whatFor}`;
    throw new SnapshotError(`no snapshot named "${name}" (no ${key}${whatFor})`);
  }
  return { record: decodeSnapshotRecord(got.body, key, volumeId), etag: got.etag };
}

/** The record of snapshot `name`, to open or clone it: refused while it is being deleted. */
export async function readSnapshot(
  store: ObjectStore,
  prefix: string,
  superblock: Superblock,
  name: string,
): Promise<SnapshotRecord> {
  const { record } = await readSnapshotAt(store, prefix, superblock.volumeId, name);
  if (record.deleting !== undefined) {
    throw new SnapshotError(
      `snapshot "${name}" is being deleted (an interrupted delete is finished by running it again)`,
    );
  }
  return record;
}

/** A record found under `trash/` (or `snapshots/`), with when the store says it was written. */
export interface TrashedRecord {
  readonly record: SnapshotRecord;
  readonly key: string;
  readonly lastModifiedMs: number;
}

/** Every record under `base`: one LIST, and one GET per record. */
async function readRecords(
  store: ObjectStore,
  base: string,
  volumeId: string,
  pattern: RegExp,
): Promise<TrashedRecord[]> {
  const records = [];
  for await (const entry of listAll(store, base)) {
    const match = pattern.exec(entry.key.slice(base.length));
    if (match === null || checkSnapshotName(match[1] ?? "") !== undefined) continue;
    const got = await store.get(entry.key);
    if (got === undefined) continue;
    const record = decodeSnapshotRecord(got.body, entry.key, volumeId);
    records.push({ record, key: entry.key, lastModifiedMs: entry.lastModifiedMs });
  }
  return records;
}

/** Every snapshot's record, in any state: one LIST, and one GET per snapshot. */
export async function readSnapshots(
  store: ObjectStore,
  prefix: string,
  superblock: Superblock,
): Promise<SnapshotRecord[]> {
  const found = await readRecords(
    store,
    snapshotPrefix(prefix),
    superblock.volumeId,
    /^(.+)\.json$/,
  );
  return found.map((f) => f.record);
}

/** The records of deleted snapshots still in the trash, with when they were put there. */
export function readTrash(
  store: ObjectStore,
  prefix: string,
  superblock: Superblock,
): Promise<TrashedRecord[]> {
  return readRecords(store, trashPrefix(prefix), superblock.volumeId, /^(.+)\.[^.]+\.json$/);
}

/** The objects snapshot `record` of the volume at `prefix` names, by chunk. */
export function snapshotRefs(
  prefix: string,
  superblock: Superblock,
  record: SnapshotRecord,
): Map<number, ChunkRef> {
  const self = { prefix, volumeId: superblock.volumeId };
  return decodeChunkMap(self, chunkCountOf(superblock), record);
}

/** The keys of every object some snapshot in `records` names. */
export function pinnedKeys(
  prefix: string,
  superblock: Superblock,
  records: readonly SnapshotRecord[],
): Set<string> {
  const keys = new Set<string>();
  for (const record of records) {
    for (const ref of snapshotRefs(prefix, superblock, record).values()) keys.add(ref.key);
  }
  return keys;
}

/**
 * A volume URL that may name a snapshot, `<url>@<name>`: the name is what follows the last `@`,
 * unless that part holds a `/` (then the `@` belongs to the path). Throws a SnapshotError for
 * an invalid name.
 */
export function splitSnapshotUrl(url: string): {
  readonly url: string;
  readonly snapshot?: string;
} {
  const at = url.lastIndexOf("@");
  if (at < 0 || url.slice(at + 1).includes("/")) return { url };
  const name = url.slice(at + 1);
  const invalid = checkSnapshotName(name);
  if (invalid !== undefined) throw invalid;
  return { url: url.slice(0, at), snapshot: name };
}
