/**
 * The chunk map: which object holds each chunk of a volume, resolved at open without reading
 * anything per chunk, and sealed by every writer term at its start.
 *
 * ## How a reader resolves chunk i (format version 2)
 *
 * 1. LIST `seals/` and take the seal of the highest epoch S (none: S = 0 and an empty map). GET
 *    it: it names the generation of every chunk holding data when term S began.
 * 2. LIST `chunks/`. For chunk i, the objects of epoch S (written by term S itself, after its
 *    seal) decide if there are any: the highest generation wins, and a tombstone means zeros.
 *    Otherwise the seal's entry decides. Otherwise chunk i is zeros.
 * 3. Every other chunk object is garbage: superseded generations, tombstones a seal has made
 *    unnecessary, and writes of an ended term that landed after the next term sealed.
 *
 * An object of an epoch above S cannot exist (a term seals before it writes a chunk): seeing
 * one means the LIST raced a new term's start, and the resolution starts again, a bounded
 * number of times, then fails closed.
 *
 * ## Why a new term seals
 *
 * "Highest generation wins" alone would let a write of an ended term that the S3 server executes
 * late resurrect a chunk the new writer never rewrote. The seal fixes what term S+1 starts from:
 * after it, only objects of epoch S+1 can change a chunk, and those only the lease holder writes.
 * A late write of term S that lands before the seal is as if it had landed in time (it was sent
 * in term S); one that lands after it is garbage and never read.
 *
 * A version 1 volume has no seals and only generation "" objects (epoch 0): the same rules
 * resolve it, with S = 0. A clone before its first writer term has no seal either: its map is
 * then its origin snapshot's (one GET of that record, under the base's prefix).
 *
 * Cost: one LIST of `seals/` (one or two keys), one GET of a seal, one LIST per 1000 chunk
 * objects; a writer adds one PUT (its seal) and batched DELETEs of the garbage and old seals.
 */

import { StoreError, listAll, type ObjectStore } from "../store/object-store.js";
import { readSnapshotAt } from "./snapshots.js";
import {
  FormatError,
  SEAL_FORMAT,
  chunkCountOf,
  chunkPrefix,
  decodeChunkMap,
  decodeSeal,
  encodeChunkMap,
  encodeSeal,
  epochOfGeneration,
  epochOfSealKey,
  parseChunkKey,
  sealKey,
  sealPrefix,
  type ChunkRef,
  type SealRecord,
  type Superblock,
} from "./format.js";

/** Resolutions started again because a LIST raced a new writer term, at most. */
const MAX_RESOLVE_ATTEMPTS = 3;

/** A listed object, with when the store says it was written. */
export interface Listed {
  readonly key: string;
  readonly sizeBytes: number;
  /** The store's `LastModified` (see ListEntry). */
  readonly lastModifiedMs: number;
}

/** A listed chunk object of the volume's own. */
export interface ListedChunk extends Listed {
  readonly ref: ChunkRef;
}

/** What a volume's objects say, as of one resolution. */
export interface ResolvedMap {
  /** The object of every chunk that holds data (tombstoned chunks are absent). */
  readonly refs: Map<number, ChunkRef>;
  /** The epoch of the newest seal; 0 if there is none. */
  readonly sealEpoch: number;
  /** Every seal listed, the newest last. */
  readonly seals: readonly Listed[];
  /** Chunk objects no reader of this resolution would read (snapshots aside). */
  readonly garbage: readonly string[];
  /**
   * Tombstones of the newest term that decide their chunk: garbage once a newer seal names
   * the chunk as zeros, but until then what keeps an older object from speaking for it.
   */
  readonly deciding: ReadonlySet<string>;
  /** Every chunk object of the volume's own that was listed. */
  readonly listed: readonly ListedChunk[];
}

/**
 * Resolve the map of the volume at `prefix` (see the module comment). `concurrentTerms`: a new
 * writer term may start meanwhile (a read-only open, not a lease holder's). Then the seals are
 * listed again after the chunks: a term that sealed and deleted the previous term's objects
 * between the two LISTs, before writing a chunk of its own, leaves no newer object to betray
 * it, and the older seal's entries would be read as current. One more LIST.
 */
export async function resolveChunkMap(
  store: ObjectStore,
  prefix: string,
  superblock: Superblock,
  options: { readonly concurrentTerms?: boolean } = {},
): Promise<ResolvedMap> {
  for (let attempt = 1; ; attempt++) {
    const resolved = await resolveOnce(store, prefix, superblock, options.concurrentTerms ?? true);
    if (!(resolved instanceof RacedError)) return resolved;
    if (attempt >= MAX_RESOLVE_ATTEMPTS) {
      throw new FormatError(
        `cannot resolve the chunk map of ${prefix || "the volume"}: ${resolved.message}`,
      );
    }
  }
}

/** The LISTs raced a writer term starting: look again. */
class RacedError extends Error {}

async function resolveOnce(
  store: ObjectStore,
  prefix: string,
  superblock: Superblock,
  concurrentTerms: boolean,
): Promise<ResolvedMap | RacedError> {
  const seals = superblock.formatVersion === 1 ? [] : await listSeals(store, prefix);
  const sealEpoch = Math.max(0, ...seals.map((s) => s.epoch));
  const seal = sealEpoch === 0 ? undefined : await readSeal(store, prefix, superblock, sealEpoch);
  if (seal instanceof RacedError) return seal;
  const chunkCount = chunkCountOf(superblock);
  const current = new Map<number, ChunkRef>();
  const listed: ListedChunk[] = [];
  for await (const entry of listAll(store, chunkPrefix(prefix))) {
    const ref = parseChunkKey(prefix, superblock.volumeId, entry.key);
    if (ref === undefined || ref.index >= chunkCount) continue;
    const epoch = epochOfGeneration(ref.generation);
    if (epoch > sealEpoch) {
      return new RacedError(
        `${ref.key} is of epoch ${epoch}, newer than the newest seal (${sealEpoch})`,
      );
    }
    listed.push({ ...entry, ref });
    if (epoch !== sealEpoch) continue;
    const best = current.get(ref.index);
    if (best === undefined || ref.generation > best.generation) current.set(ref.index, ref);
  }
  if (concurrentTerms && superblock.formatVersion !== 1) {
    const newest = Math.max(0, ...(await listSeals(store, prefix)).map((s) => s.epoch));
    if (newest !== sealEpoch) {
      return new RacedError(`seal ${newest} appeared while the map of seal ${sealEpoch} was read`);
    }
  }
  const self = { prefix, volumeId: superblock.volumeId };
  const refs =
    seal !== undefined
      ? decodeChunkMap(self, chunkCount, seal)
      : await originMap(store, superblock, chunkCount);
  const deciding = new Set<string>();
  for (const [index, ref] of current) {
    if (ref.zero) {
      refs.delete(index);
      deciding.add(ref.key);
    } else refs.set(index, ref);
  }
  const live = new Set([...refs.values()].map((r) => r.key));
  return {
    refs,
    sealEpoch,
    seals: [...seals].sort((a, b) => a.epoch - b.epoch),
    garbage: listed.filter((l) => !live.has(l.key) && !deciding.has(l.key)).map((l) => l.key),
    deciding,
    listed,
  };
}

/** The map a volume with no seal starts from: empty, or a clone's origin snapshot's. */
async function originMap(
  store: ObjectStore,
  superblock: Superblock,
  chunkCount: number,
): Promise<Map<number, ChunkRef>> {
  const origin = superblock.origin;
  if (origin === undefined) return new Map();
  // Any state: a snapshot being deleted still exists for the clones that depend on it.
  const { record } = await readSnapshotAt(store, origin.prefix, origin.volumeId, origin.snapshot, {
    whatFor: "the origin of this clone",
  });
  if (record.creator !== origin.creator) {
    throw new FormatError(
      `the origin of this clone, snapshot "${origin.snapshot}" of ${origin.prefix}, was deleted ` +
        "and another made under its name: the clone's data is lost",
    );
  }
  return decodeChunkMap(origin, chunkCount, record);
}

async function listSeals(
  store: ObjectStore,
  prefix: string,
): Promise<(Listed & { epoch: number })[]> {
  const seals: (Listed & { epoch: number })[] = [];
  for await (const entry of listAll(store, sealPrefix(prefix))) {
    const epoch = epochOfSealKey(prefix, entry.key);
    if (epoch !== undefined) seals.push({ ...entry, epoch });
  }
  return seals;
}

async function readSeal(
  store: ObjectStore,
  prefix: string,
  superblock: Superblock,
  epoch: number,
): Promise<SealRecord | RacedError> {
  const key = sealKey(prefix, epoch);
  const got = await store.get(key);
  // Listed a moment ago: gone only because a newer term sealed and removed it.
  if (got === undefined) return new RacedError(`${key} vanished after it was listed`);
  const seal = decodeSeal(got.body, key, superblock.volumeId);
  if (seal.epoch !== epoch)
    throw new FormatError(`${key} says it is the seal of epoch ${seal.epoch}`);
  return seal;
}

/** What a writer term starts from. */
export interface TermStart {
  readonly epoch: number;
  readonly writerId: string;
  /** The map the term starts from. Default: the resolution's (a rollback names a snapshot's). */
  readonly refs?: ReadonlyMap<number, ChunkRef>;
  /** Objects a snapshot names: never garbage. */
  readonly pinned?: ReadonlySet<string>;
}

/**
 * Start writer term `epoch` (above the resolution's seal): PUT its seal naming the map it
 * starts from. Returns what became garbage by it: every listed chunk object of the volume's
 * own that neither that map nor a snapshot names, and the older seals. The caller deletes them
 * once nobody can still be reading them (see garbage.ts). A crash anywhere leaves either the
 * old seal as the newest (nothing changed) or the new one (the term began); garbage left
 * behind is collected later.
 */
export async function sealChunkMap(
  store: ObjectStore,
  prefix: string,
  superblock: Superblock,
  map: ResolvedMap,
  term: TermStart,
): Promise<string[]> {
  const refs = term.refs ?? map.refs;
  if (!(term.epoch > map.sealEpoch)) {
    throw new FormatError(
      `the lease's epoch ${term.epoch} is not above the newest seal's (${map.sealEpoch}): ` +
        `was ${prefix || "the volume"}'s lease.json removed?`,
    );
  }
  const seal: SealRecord = {
    format: SEAL_FORMAT,
    version: 1,
    volumeId: superblock.volumeId,
    epoch: term.epoch,
    writer: term.writerId,
    createdAt: new Date().toISOString(),
    ...encodeChunkMap(superblock.volumeId, refs),
  };
  await putSeal(store, sealKey(prefix, term.epoch), seal, superblock.volumeId);
  const live = new Set([...refs.values()].map((r) => r.key));
  return [
    ...map.listed.map((l) => l.key).filter((k) => !live.has(k) && !(term.pinned?.has(k) ?? false)),
    ...map.seals.map((s) => s.key).filter((k) => k !== sealKey(prefix, term.epoch)),
  ];
}

/** The store's time at which the seal of term `epoch` was written (a LIST of `seals/`). */
export async function sealTime(
  store: ObjectStore,
  prefix: string,
  epoch: number,
): Promise<number | undefined> {
  const key = sealKey(prefix, epoch);
  const seal = (await listSeals(store, prefix)).find((s) => s.key === key);
  return seal === undefined || seal.lastModifiedMs === 0 ? undefined : seal.lastModifiedMs;
}

/** Create a seal; a 412 is ours if the seal there names us (a retried PUT that had landed). */
async function putSeal(
  store: ObjectStore,
  key: string,
  seal: SealRecord,
  volumeId: string,
): Promise<void> {
  try {
    await store.put(key, encodeSeal(seal), { ifNoneMatch: "*" });
  } catch (error) {
    if (!(error instanceof StoreError) || error.code !== "PreconditionFailed") throw error;
    const there = await store.get(key);
    if (there !== undefined && decodeSeal(there.body, key, volumeId).writer === seal.writer) return;
    throw new FormatError(`${key} was written by another writer of epoch ${seal.epoch}`);
  }
}
