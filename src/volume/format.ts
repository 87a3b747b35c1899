/**
 * The on-bucket format, version 3: how a volume is laid out under its prefix. docs/format.md is
 * the prose version of this module; change both together, and bump FORMAT_VERSION for any change
 * an older reader would misread.
 *
 *     <prefix>/volume.json                          the superblock (JSON)
 *     <prefix>/seals/<8 hex epoch>.json             the chunk map a writer term started from
 *     <prefix>/chunks/<16 hex index>.<20 hex gen>   chunk i as of generation gen (never rewritten)
 *     <prefix>/chunks/<16 hex index>.<20 hex gen>.zero   a tombstone: chunk i is zeros from gen on
 *     <prefix>/chunks/<16 hex index>                a version 1 chunk object (generation "")
 *     <prefix>/snapshots/<name>.json                a snapshot (snapshots.ts)
 *     <prefix>/trash/<name>.<creator>.json          a deleted snapshot, in its grace (snapshots.ts)
 *     <prefix>/refs/<snapshot>/<clone id>.json      a clone of that snapshot (clones.ts)
 *     <prefix>/gc/clock                             the collector's clock marker (garbage.ts)
 *
 * A clone's superblock names its origin, a snapshot of another volume in the same bucket, and
 * its maps may name that volume's objects (and, flattened, its ancestors'): a map entry carries
 * the prefix and volume id of the object it names, so every read is one lookup and one GET.
 *
 * A generation is the writer term's lease epoch (8 hex digits) followed by a sequence number
 * within the term (12 hex digits), so generations of one chunk grow with time and two terms can
 * never produce the same key. How a reader resolves a chunk from these is in chunk-map.ts.
 *
 * A chunk with no object reads as zeros. Each chunk object carries, in its user metadata, the
 * format version, the id of the volume that wrote it, its own index and generation, and a
 * CRC-32 of every check block (a fixed slice of the chunk, at most 256 per chunk), so that a
 * ranged GET can be verified without fetching the whole chunk, and an object copied under the
 * wrong key or from another volume is caught.
 */

import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { crc32 } from "node:zlib";
import type { GetResult, ObjectMetadata } from "../store/object-store.js";

export const FORMAT_NAME = "s3blk";
export const FORMAT_VERSION = 3;
/**
 * Versions this s3blk opens: version 1 read-only (until `s3blk upgrade`), versions 2 and 3
 * fully. Version 3 is version 2 plus clones; a version 2 volume is cloned after an upgrade,
 * because a version 2 s3blk would delete a snapshot that clones depend on.
 */
export const READABLE_FORMAT_VERSIONS: readonly number[] = [1, 2, 3];
/** Versions this s3blk writes in place. */
export const WRITABLE_FORMAT_VERSIONS: readonly number[] = [2, 3];
/** The `s3blk-format` of a chunk object with a generation: unchanged since version 2. */
const CHUNK_OBJECT_FORMAT = "2";

export const SECTOR_SIZES = [512, 4096] as const;
export const MIN_CHUNK_SIZE_BYTES = 64 * 1024;
export const MAX_CHUNK_SIZE_BYTES = 64 * 1024 * 1024;
/** Chosen by measurement on RGW; see docs/architecture.md. */
export const DEFAULT_CHUNK_SIZE_BYTES = 1024 * 1024;
export const MIN_CHECK_BLOCK_BYTES = 4096;
export const MAX_CHECK_BLOCKS_PER_CHUNK = 256;
/** Chunk indexes are 16 hex digits; sizes must also stay exact in a JavaScript number. */
export const MAX_SIZE_BYTES =
  Number.MAX_SAFE_INTEGER - (Number.MAX_SAFE_INTEGER % (64 * 1024 * 1024));

/** A volume's superblock. */
export interface Superblock {
  readonly format: typeof FORMAT_NAME;
  readonly formatVersion: number;
  readonly volumeId: string;
  readonly sizeBytes: number;
  readonly sectorSizeBytes: number;
  readonly chunkSizeBytes: number;
  /** Bytes covered by one CRC-32 in a chunk's metadata. */
  readonly checkBlockBytes: number;
  readonly createdAt: string;
  /** A clone's origin: the snapshot it was cloned from. Absent on a volume made by create. */
  readonly origin?: Origin;
}

/** Where a clone comes from: snapshot `snapshot` of the volume at `prefix` in the same bucket. */
export interface Origin {
  readonly prefix: string;
  readonly volumeId: string;
  readonly snapshot: string;
  /** The snapshot record's `creator`: a snapshot deleted and made again is another one. */
  readonly creator: string;
}

/** The superblock, a chunk, or the volume's parameters are not what this version can read. */
export class FormatError extends Error {
  override readonly name = "FormatError";
}

/** An object the chunk map references is not in the store: data is lost, never read as zeros. */
export class ChunkMissingError extends Error {
  override readonly name = "ChunkMissingError";
  constructor(readonly key: string) {
    super(
      `chunk ${key} is missing: the volume's map references it, but the store has no such object`,
    );
  }
}

/** A chunk object failed verification. */
export class ChunkCorruptError extends Error {
  override readonly name = "ChunkCorruptError";
  constructor(
    readonly key: string,
    reason: string,
  ) {
    super(`chunk ${key} is corrupt: ${reason}`);
  }
}

export interface VolumeParameters {
  readonly sizeBytes: number;
  readonly sectorSizeBytes?: number;
  readonly chunkSizeBytes?: number;
}

/** Check `parameters` and build a new volume's superblock. Throws a FormatError if invalid. */
export function newSuperblock(parameters: VolumeParameters): Superblock {
  const sectorSizeBytes = parameters.sectorSizeBytes ?? 512;
  const chunkSizeBytes = parameters.chunkSizeBytes ?? DEFAULT_CHUNK_SIZE_BYTES;
  const superblock: Superblock = {
    format: FORMAT_NAME,
    formatVersion: FORMAT_VERSION,
    volumeId: randomUUID(),
    sizeBytes: parameters.sizeBytes,
    sectorSizeBytes,
    chunkSizeBytes,
    checkBlockBytes: checkBlockBytesFor(chunkSizeBytes),
    createdAt: new Date().toISOString(),
  };
  validateSuperblock(superblock);
  return superblock;
}

function checkBlockBytesFor(chunkSizeBytes: number): number {
  return Math.max(MIN_CHECK_BLOCK_BYTES, chunkSizeBytes / MAX_CHECK_BLOCKS_PER_CHUNK);
}

function isPowerOfTwo(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && (n & (n - 1)) === 0;
}

function validateSuperblock(s: Superblock): void {
  if (!(SECTOR_SIZES as readonly number[]).includes(s.sectorSizeBytes)) {
    throw new FormatError(
      `sector size ${s.sectorSizeBytes} is not one of ${SECTOR_SIZES.join(", ")}`,
    );
  }
  if (
    !isPowerOfTwo(s.chunkSizeBytes) ||
    s.chunkSizeBytes < MIN_CHUNK_SIZE_BYTES ||
    s.chunkSizeBytes > MAX_CHUNK_SIZE_BYTES
  ) {
    throw new FormatError(
      `chunk size ${s.chunkSizeBytes} is not a power of two from ${MIN_CHUNK_SIZE_BYTES} to ${MAX_CHUNK_SIZE_BYTES} bytes`,
    );
  }
  if (s.checkBlockBytes !== checkBlockBytesFor(s.chunkSizeBytes)) {
    throw new FormatError(
      `check block size ${s.checkBlockBytes} does not fit chunk size ${s.chunkSizeBytes}`,
    );
  }
  if (!Number.isSafeInteger(s.sizeBytes) || s.sizeBytes <= 0 || s.sizeBytes > MAX_SIZE_BYTES) {
    throw new FormatError(`size ${s.sizeBytes} bytes is not between 1 and ${MAX_SIZE_BYTES} bytes`);
  }
  if (s.sizeBytes % s.sectorSizeBytes !== 0) {
    throw new FormatError(
      `size ${s.sizeBytes} bytes is not a multiple of the ${s.sectorSizeBytes}-byte sector size`,
    );
  }
  if (typeof s.volumeId !== "string" || s.volumeId.length === 0 || s.volumeId.length > 64) {
    throw new FormatError("volume id is missing");
  }
  const o = s.origin as Partial<Origin> | undefined;
  if (
    o !== undefined &&
    (typeof o !== "object" ||
      o === null ||
      typeof o.prefix !== "string" ||
      typeof o.volumeId !== "string" ||
      typeof o.snapshot !== "string" ||
      typeof o.creator !== "string")
  ) {
    throw new FormatError("the origin of the clone is malformed");
  }
}

export function encodeSuperblock(superblock: Superblock): Uint8Array {
  return Buffer.from(`${JSON.stringify(superblock, null, 2)}\n`, "utf8");
}

/** Parse and check a superblock. Throws a FormatError naming what is wrong. */
export function decodeSuperblock(bytes: Uint8Array, key: string): Superblock {
  let parsed: unknown;
  try {
    parsed = JSON.parse(Buffer.from(bytes).toString("utf8"));
  } catch {
    throw new FormatError(`${key} is not an s3blk superblock (not JSON)`);
  }
  const s = parsed as Partial<Superblock> | null;
  if (s === null || typeof s !== "object" || s.format !== FORMAT_NAME) {
    throw new FormatError(`${key} is not an s3blk superblock`);
  }
  if (typeof s.formatVersion !== "number" || !READABLE_FORMAT_VERSIONS.includes(s.formatVersion)) {
    throw new FormatError(
      `${key} has format version ${String(s.formatVersion)}; this s3blk reads versions ` +
        `${READABLE_FORMAT_VERSIONS.slice(0, -1).join(", ")} and ${READABLE_FORMAT_VERSIONS.at(-1)} only` +
        (typeof s.formatVersion === "number" && s.formatVersion > FORMAT_VERSION
          ? " (upgrade s3blk)"
          : ""),
    );
  }
  validateSuperblock(s as Superblock);
  return s as Superblock;
}

/** Join a volume prefix and a relative key. */
export function under(prefix: string, relative: string): string {
  return prefix === "" ? relative : `${prefix.replace(/\/+$/, "")}/${relative}`;
}

export function superblockKey(prefix: string): string {
  return under(prefix, "volume.json");
}

export function chunkPrefix(prefix: string): string {
  return under(prefix, "chunks/");
}

/** Version 1's key of chunk `chunkIndex`: the index alone (generation ""). */
export function legacyChunkKey(prefix: string, chunkIndex: number): string {
  return chunkPrefix(prefix) + chunkIndex.toString(16).padStart(16, "0");
}

/** The largest lease epoch a generation can carry (8 hex digits). */
export const MAX_EPOCH = 0xffff_ffff;
/** The largest sequence number within one writer term (12 hex digits). */
export const MAX_SEQUENCE = 0xffff_ffff_ffff;

/**
 * The generation of the `sequence`-th object a writer term of lease epoch `epoch` writes:
 * 20 hex digits, so that comparing two generations as strings compares them in time.
 */
export function generation(epoch: number, sequence: number): string {
  assert(Number.isSafeInteger(epoch) && epoch >= 1 && epoch <= MAX_EPOCH, `epoch ${epoch}`);
  assert(Number.isSafeInteger(sequence) && sequence >= 0 && sequence <= MAX_SEQUENCE);
  return epoch.toString(16).padStart(8, "0") + sequence.toString(16).padStart(12, "0");
}

/** The lease epoch of a generation; 0 for version 1's generation "". */
export function epochOfGeneration(gen: string): number {
  return gen === "" ? 0 : Number.parseInt(gen.slice(0, 8), 16);
}

/** One object of a chunk: what a map entry, a seal or a LIST names. */
export interface ChunkRef {
  readonly index: number;
  /** "" for a version 1 object. */
  readonly generation: string;
  /** A tombstone: the chunk reads as zeros from this generation on. */
  readonly zero: boolean;
  /** Its full key. */
  readonly key: string;
  /** The volume that wrote it, whose id its metadata must carry: a clone's base, or its own. */
  readonly volumeId: string;
  /** That volume's prefix. */
  readonly prefix: string;
}

/** The key of chunk `chunkIndex` at generation `gen` (a tombstone if `zero`). */
export function chunkKey(prefix: string, chunkIndex: number, gen: string, zero = false): string {
  const base = legacyChunkKey(prefix, chunkIndex);
  return gen === "" ? base : `${base}.${gen}${zero ? ".zero" : ""}`;
}

/** The ref of chunk `index` at `gen` written by volume `volumeId` under `prefix`. */
export function chunkRef(
  prefix: string,
  volumeId: string,
  index: number,
  gen: string,
  zero = false,
): ChunkRef {
  assert(!(zero && gen === ""), "version 1 has no tombstones");
  return {
    index,
    generation: gen,
    zero,
    key: chunkKey(prefix, index, gen, zero),
    volumeId,
    prefix,
  };
}

const CHUNK_KEY_PATTERN = /^([0-9a-f]{16})(?:\.([0-9a-f]{20})(\.zero)?)?$/;

/** What a key under `chunks/` names, or undefined if it is not a chunk key of this format. */
export function parseChunkKey(prefix: string, volumeId: string, key: string): ChunkRef | undefined {
  const base = chunkPrefix(prefix);
  if (!key.startsWith(base)) return undefined;
  const match = CHUNK_KEY_PATTERN.exec(key.slice(base.length));
  if (match === null) return undefined;
  const index = Number.parseInt(match[1] ?? "", 16);
  if (!Number.isSafeInteger(index)) return undefined;
  const gen = match[2] ?? "";
  if (gen !== "" && epochOfGeneration(gen) === 0) return undefined;
  return { index, generation: gen, zero: match[3] !== undefined, key, volumeId, prefix };
}

export function sealPrefix(prefix: string): string {
  return under(prefix, "seals/");
}

export function sealKey(prefix: string, epoch: number): string {
  assert(Number.isSafeInteger(epoch) && epoch >= 1 && epoch <= MAX_EPOCH);
  return sealPrefix(prefix) + epoch.toString(16).padStart(8, "0") + ".json";
}

/** The epoch a seal key names, or undefined. */
export function epochOfSealKey(prefix: string, key: string): number | undefined {
  const base = sealPrefix(prefix);
  if (!key.startsWith(base)) return undefined;
  const match = /^([0-9a-f]{8})\.json$/.exec(key.slice(base.length));
  return match === null ? undefined : Number.parseInt(match[1] ?? "", 16);
}

export const SEAL_FORMAT = "s3blk-seal";

/** Another volume whose objects a map names: a clone's origin, or one of its ancestors. */
export interface MapSource {
  readonly prefix: string;
  readonly volumeId: string;
}

/**
 * A chunk map as a seal or a snapshot record stores it. Flattened: it names the object of
 * every chunk directly, whichever volume wrote it, so a read never walks a chain of parents.
 */
export interface EncodedChunkMap {
  /**
   * Chunk index in lower-case hex → the generation of the volume's own object ("" for a
   * version 1 object), or `<n>:<generation>` for an object of `sources[n - 1]`. A chunk absent
   * reads as zeros.
   */
  readonly chunks: Readonly<Record<string, string>>;
  /** The other volumes the entries name. Absent when there are none. */
  readonly sources?: readonly MapSource[];
}

/** The number of chunks of a volume. */
export function chunkCountOf(superblock: Superblock): number {
  return Math.ceil(superblock.sizeBytes / superblock.chunkSizeBytes);
}

/** The map of `refs` as a seal or a snapshot record of the volume `volumeId` stores it. */
export function encodeChunkMap(
  volumeId: string,
  refs: ReadonlyMap<number, ChunkRef>,
): EncodedChunkMap {
  const chunks: Record<string, string> = {};
  const sources: MapSource[] = [];
  const sourceNumbers = new Map<string, number>();
  for (const [index, ref] of [...refs].sort((a, b) => a[0] - b[0])) {
    if (ref.zero) continue;
    if (ref.volumeId === volumeId) {
      chunks[index.toString(16)] = ref.generation;
      continue;
    }
    let n = sourceNumbers.get(ref.volumeId);
    if (n === undefined) {
      n = sources.push({ prefix: ref.prefix, volumeId: ref.volumeId });
      sourceNumbers.set(ref.volumeId, n);
    }
    chunks[index.toString(16)] = `${n}:${ref.generation}`;
  }
  return sources.length === 0 ? { chunks } : { chunks, sources };
}

/** The refs a map names, for the volume `self` (whose own objects the plain entries name). */
export function decodeChunkMap(
  self: MapSource,
  chunkCount: number,
  map: EncodedChunkMap,
): Map<number, ChunkRef> {
  const refs = new Map<number, ChunkRef>();
  for (const [hex, entry] of Object.entries(map.chunks)) {
    const index = Number.parseInt(hex, 16);
    if (index >= chunkCount) continue;
    const colon = entry.indexOf(":");
    const source = colon < 0 ? self : map.sources?.[Number(entry.slice(0, colon)) - 1];
    assert(source !== undefined, "decodeChunkMap of a map checkChunkMap did not pass");
    refs.set(index, chunkRef(source.prefix, source.volumeId, index, entry.slice(colon + 1)));
  }
  return refs;
}

const MAP_ENTRY_PATTERN = /^(?:([1-9][0-9]{0,5}):)?(|[0-9a-f]{20})$/;

/** Throw a FormatError naming `key` unless `map` is a well-formed chunk map. */
export function checkChunkMap(map: Partial<EncodedChunkMap>, key: string, what: string): void {
  if (typeof map.chunks !== "object" || map.chunks === null) {
    throw new FormatError(`${key} is a malformed ${what}`);
  }
  const sources = map.sources ?? [];
  if (
    !Array.isArray(sources) ||
    !sources.every(
      (s: Partial<MapSource> | null) =>
        typeof s === "object" &&
        s !== null &&
        typeof s.prefix === "string" &&
        typeof s.volumeId === "string",
    )
  ) {
    throw new FormatError(`${key} is a malformed ${what}: bad sources`);
  }
  for (const [hex, entry] of Object.entries(map.chunks)) {
    const match = typeof entry === "string" ? MAP_ENTRY_PATTERN.exec(entry) : null;
    if (
      !/^[0-9a-f]{1,16}$/.test(hex) ||
      match === null ||
      (match[1] !== undefined && Number(match[1]) > sources.length)
    ) {
      throw new FormatError(`${key} is a malformed ${what}: entry ${hex} → ${String(entry)}`);
    }
  }
}

/**
 * A seal: written once, by a writer term at its start, before it writes any chunk. It names the
 * object of every chunk that holds data at that moment (a chunk absent reads as zeros).
 */
export interface SealRecord extends EncodedChunkMap {
  readonly format: typeof SEAL_FORMAT;
  readonly version: 1;
  readonly volumeId: string;
  readonly epoch: number;
  /** Who wrote it: the lease holder's id, read back after a retried create. */
  readonly writer: string;
  readonly createdAt: string;
}

export function encodeSeal(seal: SealRecord): Uint8Array {
  return Buffer.from(`${JSON.stringify(seal)}\n`, "utf8");
}

/** Parse and check a seal of the volume `volumeId`. Throws a FormatError naming the key. */
export function decodeSeal(bytes: Uint8Array, key: string, volumeId: string): SealRecord {
  let seal: Partial<SealRecord> | null;
  try {
    seal = JSON.parse(Buffer.from(bytes).toString("utf8")) as Partial<SealRecord> | null;
  } catch {
    throw new FormatError(`${key} is not an s3blk seal (not JSON)`);
  }
  if (seal === null || typeof seal !== "object" || seal.format !== SEAL_FORMAT) {
    throw new FormatError(`${key} is not an s3blk seal`);
  }
  if (seal.version !== 1) {
    throw new FormatError(`${key} has seal version ${String(seal.version)}; this s3blk reads 1`);
  }
  if (seal.volumeId !== volumeId) {
    throw new FormatError(`${key} belongs to volume ${String(seal.volumeId)}, not ${volumeId}`);
  }
  if (!Number.isSafeInteger(seal.epoch)) throw new FormatError(`${key} is a malformed seal`);
  checkChunkMap(seal, key, "seal");
  return seal as SealRecord;
}

const META_FORMAT = "s3blk-format";
const META_VOLUME = "s3blk-volume";
const META_CHUNK = "s3blk-chunk";
const META_GENERATION = "s3blk-generation";
const META_CRC = "s3blk-crc32";

/** The metadata to store with the object `ref` (not a tombstone) whose bytes are `data`. */
export function chunkMetadata(
  superblock: Superblock,
  ref: ChunkRef,
  data: Uint8Array,
): ObjectMetadata {
  assert(!ref.zero && ref.generation !== "" && ref.volumeId === superblock.volumeId);
  const blocks = data.byteLength / superblock.checkBlockBytes;
  const table = Buffer.allocUnsafe(blocks * 4);
  for (let i = 0; i < blocks; i++) {
    const start = i * superblock.checkBlockBytes;
    table.writeUInt32BE(crc32(data.subarray(start, start + superblock.checkBlockBytes)), i * 4);
  }
  return {
    [META_FORMAT]: CHUNK_OBJECT_FORMAT,
    [META_VOLUME]: superblock.volumeId,
    [META_CHUNK]: ref.index.toString(16),
    [META_GENERATION]: ref.generation,
    [META_CRC]: table.toString("base64"),
  };
}

/** The metadata of a tombstone (an empty object): enough to tell whose it is. */
export function tombstoneMetadata(ref: ChunkRef): ObjectMetadata {
  assert(ref.zero);
  return {
    [META_FORMAT]: CHUNK_OBJECT_FORMAT,
    [META_VOLUME]: ref.volumeId,
    [META_CHUNK]: ref.index.toString(16),
    [META_GENERATION]: ref.generation,
  };
}

/**
 * Verify a GET of the object `ref` that asked for bytes `[offsetBytes, offsetBytes + length)`
 * (whole check blocks). The object must be one the volume `ref.volumeId` wrote for that chunk
 * and generation: a version 1 object (generation "") says format 1 and has no generation.
 * Returns the bytes, or throws a ChunkCorruptError naming the key.
 */
export function verifyChunk(
  superblock: Superblock,
  ref: ChunkRef,
  got: GetResult,
  offsetBytes: number,
  lengthBytes: number,
): Uint8Array {
  const { key } = ref;
  const m = got.metadata;
  if (m[META_FORMAT] === undefined || m[META_CRC] === undefined) {
    throw new ChunkCorruptError(key, "it has no s3blk metadata (a foreign object?)");
  }
  const expectedFormat = ref.generation === "" ? "1" : CHUNK_OBJECT_FORMAT;
  if (m[META_FORMAT] !== expectedFormat) {
    throw new ChunkCorruptError(key, `it has format version ${m[META_FORMAT]}`);
  }
  if (m[META_VOLUME] !== ref.volumeId) {
    throw new ChunkCorruptError(key, `it belongs to volume ${m[META_VOLUME]}`);
  }
  if (m[META_CHUNK] !== ref.index.toString(16)) {
    throw new ChunkCorruptError(key, `it is chunk ${m[META_CHUNK]} stored under the wrong key`);
  }
  if (ref.generation !== "" && m[META_GENERATION] !== ref.generation) {
    throw new ChunkCorruptError(
      key,
      `it is generation ${String(m[META_GENERATION])} stored under the wrong key`,
    );
  }
  if (got.objectSizeBytes !== superblock.chunkSizeBytes) {
    throw new ChunkCorruptError(
      key,
      `it is ${got.objectSizeBytes} bytes, not ${superblock.chunkSizeBytes} (truncated?)`,
    );
  }
  if (got.body.byteLength !== lengthBytes) {
    throw new ChunkCorruptError(
      key,
      `a read of ${lengthBytes} bytes returned ${got.body.byteLength}`,
    );
  }
  const table = Buffer.from(m[META_CRC], "base64");
  const blockBytes = superblock.checkBlockBytes;
  if (table.byteLength !== (superblock.chunkSizeBytes / blockBytes) * 4) {
    throw new ChunkCorruptError(key, "its checksum table has the wrong length");
  }
  const firstBlock = offsetBytes / blockBytes;
  for (let i = 0; i < lengthBytes / blockBytes; i++) {
    const expected = table.readUInt32BE((firstBlock + i) * 4);
    const actual = crc32(got.body.subarray(i * blockBytes, (i + 1) * blockBytes));
    if (actual !== expected) {
      throw new ChunkCorruptError(
        key,
        `checksum mismatch in bytes ${(firstBlock + i) * blockBytes}..${(firstBlock + i + 1) * blockBytes}`,
      );
    }
  }
  return got.body;
}
