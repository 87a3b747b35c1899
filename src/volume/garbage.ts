/**
 * Garbage collection: delete the objects of a volume that nothing reads any more, and never
 * one that something does.
 *
 * ## What is garbage
 *
 * Only a volume's own objects, under its own prefix: a clone never deletes its base's. Of those,
 * an object is garbage when no resolution of the live map reads it (see chunk-map.ts: a
 * generation superseded within the newest term, an object of an older term the newest seal does
 * not name, an older seal) and no snapshot record names it. A snapshot that clones depend on
 * cannot be deleted (clones.ts), and a clone names only objects of its origin snapshot, so the
 * base's pins cover every object any clone reads, with no need to read the clones.
 *
 * ## The grace horizon
 *
 * An object becomes garbage at a moment: when the newer object that superseded it landed, when
 * the seal of the term that dropped it landed, when the snapshot that pinned it went into the
 * trash. A reader that resolved its map before that moment (a read-only open, an export) may
 * still read it. So it is deleted only once the grace has passed since that moment, measured on
 * the store's clock, never ours: this module writes a small marker, `gc/clock`, and reads the
 * store's own time off its LIST entry, then compares it with the `LastModified` of the objects
 * that made each candidate garbage. Anything it cannot date is kept (fail closed). With a grace,
 * the horizon moves back a further second and a request timeout: S3 dates an object to the
 * second, and may date it at the start of its upload.
 *
 * A writer collects its own garbage (chunk-store.ts). At its term's start it dates what it finds
 * as above, with its new seal's `LastModified` as the store's time, and deletes what is already
 * past the grace: so short-lived writers reclaim their predecessors' garbage. What it makes
 * garbage itself, and what was within the grace at its start, it times from the acknowledgement
 * of the request that made it garbage, on its monotonic clock. That request landed before it
 * was acknowledged, so at least as much time has passed on the store's clock too, and no two
 * machines' clocks are compared.
 *
 * ## Safety against a writer, a clone, and readers running meanwhile
 *
 * Nothing here takes the lease. The snapshot records are read after the chunks are listed, so a
 * snapshot taken meanwhile is either seen or names only objects current after the LIST, which
 * are not candidates. An object superseded before the LIST is never current again: a new writer
 * term seals what is current when it starts. Objects written after the LIST are not candidates.
 * A crash at any point leaves at most garbage: deletions are of garbage only, in any order.
 *
 * Cost: one PUT and one LIST for the clock, the LISTs and the GET of a resolution, one LIST of
 * `snapshots/` and of `trash/` and a GET per record, one DeleteObjects per 1000 deletions.
 * Nothing per live chunk.
 */

import {
  DEFAULT_REQUEST_TIMEOUT_MS,
  MAX_DELETE_BATCH,
  listAll,
  type ObjectStore,
} from "../store/object-store.js";
import { resolveChunkMap, type Listed, type ResolvedMap } from "./chunk-map.js";
import { FormatError, epochOfGeneration, under, type Superblock } from "./format.js";
import {
  pinnedKeys,
  readSnapshots,
  readTrash,
  type SnapshotRecord,
  type TrashedRecord,
} from "./snapshots.js";

/** How long garbage waits before it is deleted, unless told otherwise: 15 minutes. */
export const DEFAULT_GC_GRACE_MS = 15 * 60_000;

export interface GcOptions {
  /** See the module comment. Default {@link DEFAULT_GC_GRACE_MS}. */
  readonly graceMs?: number;
  /** Say what would be deleted, and delete nothing (the clock marker is still written). */
  readonly dryRun?: boolean;
}

export interface GcReport {
  /** The keys deleted, or that a dry run would delete. */
  readonly deleted: readonly string[];
  /** Their bytes. */
  readonly deletedBytes: number;
  /** Garbage kept because it became garbage within the grace. */
  readonly keptWithinGrace: number;
  /** The store's time the horizon was measured from, in ms since 1970. */
  readonly storeNowMs: number;
}

/**
 * How far the horizon is moved back past the grace, when there is one: S3 dates an object to
 * the second, and may date it at the start of its upload, up to a request timeout early.
 */
const CLOCK_MARGIN_MS = 1000 + DEFAULT_REQUEST_TIMEOUT_MS;

/** The moment before which an object must have become garbage to be deleted now. */
export function horizonOf(storeNowMs: number, graceMs: number): number {
  return graceMs === 0 ? storeNowMs : storeNowMs - graceMs - CLOCK_MARGIN_MS;
}

/** What a collection would do, of one resolution and the records read after it. */
export interface GarbageSelection {
  /** Garbage that became so before the horizon: to delete. */
  readonly due: readonly Listed[];
  /** Trash records older than the horizon: to delete once `due` is gone. */
  readonly expiredTrash: readonly string[];
  readonly keptWithinGrace: number;
}

/**
 * Date the garbage of resolution `map` (see the module comment) and pick what became garbage
 * before `horizonMs`. `snapshots` and `trash` must have been read after the resolution.
 */
export function selectGarbage(
  prefix: string,
  superblock: Superblock,
  map: ResolvedMap,
  snapshots: readonly SnapshotRecord[],
  trash: readonly TrashedRecord[],
  horizonMs: number,
): GarbageSelection {
  const expired = trash.filter((t) => t.lastModifiedMs <= horizonMs);
  const pinned = pinnedKeys(prefix, superblock, snapshots);
  const waiting = pinnedKeys(
    prefix,
    superblock,
    trash.filter((t) => !expired.includes(t)).map((t) => t.record),
  );
  const newestSeal = map.seals.at(-1);
  // The newest object of each chunk in the newest term: whatever it superseded, of this term
  // or (named by the seal) of an older one, became garbage no later than it was written.
  const winners = new Map<number, Listed>();
  for (const l of map.listed) {
    if (epochOfGeneration(l.ref.generation) !== map.sealEpoch) continue;
    const best = winners.get(l.ref.index);
    if (best === undefined || l.key > best.key) winners.set(l.ref.index, l);
  }
  const live = new Set([...map.refs.values()].map((r) => r.key));
  const due: Listed[] = [];
  let keptWithinGrace = 0;
  const consider = (object: Listed, since: Listed | undefined) => {
    if (since !== undefined && since.lastModifiedMs <= horizonMs) due.push(object);
    else keptWithinGrace++;
  };
  for (const l of map.listed) {
    if (live.has(l.key) || map.deciding.has(l.key) || pinned.has(l.key)) continue;
    // Named by a snapshot deleted within the grace: garbage since it went into the trash.
    if (waiting.has(l.key)) {
      keptWithinGrace++;
      continue;
    }
    // Superseded in the newest term: since its chunk's newest object. Otherwise dropped by the
    // newest seal: since that seal.
    consider(l, winners.get(l.ref.index) ?? newestSeal);
  }
  for (const seal of map.seals) if (seal !== newestSeal) consider(seal, newestSeal);
  return { due, expiredTrash: expired.map((t) => t.key), keptWithinGrace };
}

/** Collect the garbage of the volume at `prefix` (see the module comment). */
export async function collectGarbage(
  store: ObjectStore,
  prefix: string,
  superblock: Superblock,
  options: GcOptions = {},
): Promise<GcReport> {
  const graceMs = options.graceMs ?? DEFAULT_GC_GRACE_MS;
  const storeNowMs = await readStoreClock(store, prefix);
  const map = await resolveChunkMap(store, prefix, superblock);
  const snapshots = await readSnapshots(store, prefix, superblock);
  const trash = await readTrash(store, prefix, superblock);
  const selection = selectGarbage(
    prefix,
    superblock,
    map,
    snapshots,
    trash,
    horizonOf(storeNowMs, graceMs),
  );
  const deleted = selection.due.map((d) => d.key);
  if (!options.dryRun) {
    await deleteAll(store, deleted);
    // Only once the objects they pinned are gone: a crash between leaves garbage, no loss.
    await deleteAll(store, selection.expiredTrash);
  }
  return {
    deleted: [...deleted, ...selection.expiredTrash],
    deletedBytes: selection.due.reduce((sum, d) => sum + d.sizeBytes, 0),
    keptWithinGrace: selection.keptWithinGrace,
    storeNowMs,
  };
}

/** The store's time now: write the marker, and read its LastModified off a LIST. */
export async function readStoreClock(store: ObjectStore, prefix: string): Promise<number> {
  const key = under(prefix, "gc/clock");
  await store.put(key, new Uint8Array(0));
  for await (const entry of listAll(store, under(prefix, "gc/"))) {
    if (entry.key === key && entry.lastModifiedMs > 0) return entry.lastModifiedMs;
  }
  throw new FormatError(`cannot read the store's clock: ${key} was written but is not listed`);
}

async function deleteAll(store: ObjectStore, keys: readonly string[]): Promise<void> {
  for (let at = 0; at < keys.length; at += MAX_DELETE_BATCH) {
    await store.deleteMany(keys.slice(at, at + MAX_DELETE_BATCH));
  }
}
