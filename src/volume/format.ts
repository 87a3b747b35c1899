/**
 * The on-bucket format, version 1: how a volume is laid out under its prefix. docs/format.md is
 * the prose version of this module; change both together, and bump FORMAT_VERSION for any change
 * an older reader would misread.
 *
 *     <prefix>/volume.json                 the superblock (JSON)
 *     <prefix>/chunks/<16 hex digits>      chunk i, `chunkSizeBytes` bytes, i in lower-case hex
 *
 * A chunk with no object reads as zeros. Each chunk object carries, in its user metadata, the
 * format version, the volume id, its own index, and a CRC-32 of every check block (a fixed
 * slice of the chunk, at most 256 per chunk), so that a ranged GET can be verified without
 * fetching the whole chunk, and an object copied under the wrong key or from another volume is
 * caught.
 */

import { randomUUID } from "node:crypto";
import { crc32 } from "node:zlib";
import type { GetResult, ObjectMetadata } from "../store/object-store.js";

export const FORMAT_NAME = "s3blk";
export const FORMAT_VERSION = 1;

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
}

/** The superblock, a chunk, or the volume's parameters are not what this version can read. */
export class FormatError extends Error {
  override readonly name = "FormatError";
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
  if (s.formatVersion !== FORMAT_VERSION) {
    throw new FormatError(
      `${key} has format version ${String(s.formatVersion)}; this s3blk reads version ${FORMAT_VERSION} only` +
        (typeof s.formatVersion === "number" && s.formatVersion > FORMAT_VERSION
          ? " (upgrade s3blk)"
          : ""),
    );
  }
  validateSuperblock(s as Superblock);
  return s as Superblock;
}

/** Join a volume prefix and a relative key. */
function under(prefix: string, relative: string): string {
  return prefix === "" ? relative : `${prefix.replace(/\/+$/, "")}/${relative}`;
}

export function superblockKey(prefix: string): string {
  return under(prefix, "volume.json");
}

export function chunkPrefix(prefix: string): string {
  return under(prefix, "chunks/");
}

export function chunkKey(prefix: string, chunkIndex: number): string {
  return chunkPrefix(prefix) + chunkIndex.toString(16).padStart(16, "0");
}

/** The chunk index a key names, or undefined if it is not a chunk key of this volume. */
export function chunkIndexOfKey(prefix: string, key: string): number | undefined {
  const base = chunkPrefix(prefix);
  if (!key.startsWith(base)) return undefined;
  const hex = key.slice(base.length);
  if (!/^[0-9a-f]{16}$/.test(hex)) return undefined;
  const index = Number.parseInt(hex, 16);
  return Number.isSafeInteger(index) ? index : undefined;
}

const META_FORMAT = "s3blk-format";
const META_VOLUME = "s3blk-volume";
const META_CHUNK = "s3blk-chunk";
const META_CRC = "s3blk-crc32";

/** The metadata to store with chunk `chunkIndex` whose bytes are `data`. */
export function chunkMetadata(
  superblock: Superblock,
  chunkIndex: number,
  data: Uint8Array,
): ObjectMetadata {
  const blocks = data.byteLength / superblock.checkBlockBytes;
  const table = Buffer.allocUnsafe(blocks * 4);
  for (let i = 0; i < blocks; i++) {
    const start = i * superblock.checkBlockBytes;
    table.writeUInt32BE(crc32(data.subarray(start, start + superblock.checkBlockBytes)), i * 4);
  }
  return {
    [META_FORMAT]: String(FORMAT_VERSION),
    [META_VOLUME]: superblock.volumeId,
    [META_CHUNK]: chunkIndex.toString(16),
    [META_CRC]: table.toString("base64"),
  };
}

/**
 * Verify a GET of chunk `chunkIndex` that asked for bytes `[offsetBytes, offsetBytes + length)`
 * (whole check blocks). Returns the bytes, or throws a ChunkCorruptError naming the chunk.
 */
export function verifyChunk(
  superblock: Superblock,
  key: string,
  chunkIndex: number,
  got: GetResult,
  offsetBytes: number,
  lengthBytes: number,
): Uint8Array {
  const m = got.metadata;
  if (m[META_FORMAT] === undefined || m[META_CRC] === undefined) {
    throw new ChunkCorruptError(key, "it has no s3blk metadata (a foreign object?)");
  }
  if (m[META_FORMAT] !== String(FORMAT_VERSION)) {
    throw new ChunkCorruptError(key, `it has format version ${m[META_FORMAT]}`);
  }
  if (m[META_VOLUME] !== superblock.volumeId) {
    throw new ChunkCorruptError(key, `it belongs to volume ${m[META_VOLUME]}`);
  }
  if (m[META_CHUNK] !== chunkIndex.toString(16)) {
    throw new ChunkCorruptError(key, `it is chunk ${m[META_CHUNK]} stored under the wrong key`);
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
