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
  decodeChunkMap,
  encodeChunkMap,
  type ChunkRef,
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

export interface SnapshotRecord {
  readonly format: typeof SNAPSHOT_FORMAT;
  readonly version: 1;
  readonly volumeId: string;
  readonly name: string;
  readonly createdAt: string;
  /** A random id per create, read back after a retried create. */
  readonly creator: string;
  /** Chunk index in lower-case hex → generation ("" for a version 1 object). */
  readonly chunks: Readonly<Record<string, string>>;
}

function under(prefix: string, relative: string): string {
  return prefix === "" ? relative : `${prefix.replace(/\/+$/, "")}/${relative}`;
}

export function snapshotPrefix(prefix: string): string {
  return under(prefix, "snapshots/");
}

export function snapshotKey(prefix: string, name: string): string {
  return `${snapshotPrefix(prefix)}${name}.json`;
}

function decodeRecord(bytes: Uint8Array, key: string, volumeId: string): SnapshotRecord {
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
  if (record.version !== 1 || typeof record.chunks !== "object" || record.chunks === null) {
    throw new FormatError(`${key} is a malformed snapshot`);
  }
  for (const [hex, gen] of Object.entries(record.chunks)) {
    if (!/^[0-9a-f]{1,16}$/.test(hex) || !/^(|[0-9a-f]{20})$/.test(gen)) {
      throw new FormatError(`${key} is a malformed snapshot: entry ${hex} → ${gen}`);
    }
  }
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
    chunks: encodeChunkMap(refs),
  };
  const key = snapshotKey(prefix, name);
  try {
    await store.put(key, Buffer.from(`${JSON.stringify(record)}\n`), { ifNoneMatch: "*" });
  } catch (error) {
    if (!(error instanceof StoreError) || error.code !== "PreconditionFailed") throw error;
    const there = await store.get(key);
    if (
      there === undefined ||
      decodeRecord(there.body, key, superblock.volumeId).creator !== record.creator
    ) {
      throw new SnapshotError(`a snapshot named "${name}" already exists`);
    }
  }
  return record;
}

/** The record of snapshot `name`; a SnapshotError if there is none. */
export async function readSnapshot(
  store: ObjectStore,
  prefix: string,
  superblock: Superblock,
  name: string,
): Promise<SnapshotRecord> {
  const invalid = checkSnapshotName(name);
  if (invalid !== undefined) throw invalid;
  const key = snapshotKey(prefix, name);
  const got = await store.get(key);
  if (got === undefined) throw new SnapshotError(`no snapshot named "${name}" (no ${key})`);
  return decodeRecord(got.body, key, superblock.volumeId);
}

/** Every snapshot's record, by name: one LIST, and one GET per snapshot. */
export async function readSnapshots(
  store: ObjectStore,
  prefix: string,
  superblock: Superblock,
): Promise<SnapshotRecord[]> {
  const records: SnapshotRecord[] = [];
  const base = snapshotPrefix(prefix);
  for await (const entry of listAll(store, base)) {
    const match = /^(.+)\.json$/.exec(entry.key.slice(base.length));
    if (match === null || checkSnapshotName(match[1] ?? "") !== undefined) continue;
    const got = await store.get(entry.key);
    if (got !== undefined) records.push(decodeRecord(got.body, entry.key, superblock.volumeId));
  }
  return records;
}

/** The keys of every object some snapshot in `records` names. */
export function pinnedKeys(
  prefix: string,
  superblock: Superblock,
  records: readonly SnapshotRecord[],
): Set<string> {
  const keys = new Set<string>();
  for (const record of records) {
    for (const ref of decodeChunkMap(prefix, superblock, record.chunks).values()) keys.add(ref.key);
  }
  return keys;
}

/** Delete snapshot `name`'s record; its objects become garbage for the next writer's start. */
export async function deleteSnapshotRecord(
  store: ObjectStore,
  prefix: string,
  superblock: Superblock,
  name: string,
): Promise<void> {
  await readSnapshot(store, prefix, superblock, name);
  await store.delete(snapshotKey(prefix, name));
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
