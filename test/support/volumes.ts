/** Helpers to make throw-away volumes on every backend. */

import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { randomBytes } from "node:crypto";
import {
  buildStoreStack,
  openStoreStack,
  type StoreLayerOptions,
  type StoreStack,
  type StoreStackOptions,
} from "../../src/store/store-stack.js";
import { listAll, type ObjectStore } from "../../src/store/object-store.js";
import { createVolume, openVolume } from "../../src/lifecycle/volume-lifecycle.js";
import type { OpenOptions } from "../../src/lifecycle/volume-lifecycle.js";
import { crc32 } from "node:zlib";
import {
  encodeSuperblock,
  legacyChunkKey,
  newSuperblock,
  superblockKey,
  type Superblock,
  type VolumeParameters,
} from "../../src/volume/format.js";
import { stackOptions, type S3Target } from "./s3-target.js";

export interface Backend {
  readonly name: string;
  /** A URL for a volume nobody has used. */
  newUrl(label: string): string;
  readonly stackOptions: StoreStackOptions;
}

export const memoryBackend: Backend = {
  name: "memory",
  // One store, a prefix per volume, as in a bucket: so volumes have siblings (clones).
  newUrl: (label) => `memory://tests/${label}-${randomBytes(6).toString("hex")}`,
  stackOptions: {},
};

export function fileBackend(): Backend {
  const root = mkdtempSync(path.join(tmpdir(), "s3blk-test-"));
  let n = 0;
  return {
    name: "file",
    newUrl: (label) => `file://${root}/${label}-${n++}`,
    stackOptions: {},
  };
}

export function s3Backend(target: S3Target): Backend {
  return {
    name: "s3",
    newUrl: (label) => target.newVolumeUrl(label),
    stackOptions: stackOptions(target),
  };
}

/** A volume on `backend`: its URL and a way to open it. */
export interface TestVolume {
  readonly url: string;
  stack(options?: StoreStackOptions): StoreStack;
  open(options?: OpenOptions, stack?: StoreStack): ReturnType<typeof openVolume>;
}

export async function newTestVolume(
  backend: Backend,
  label: string,
  parameters: VolumeParameters,
): Promise<TestVolume> {
  const volume = existingTestVolume(backend, backend.newUrl(label));
  await createVolume(volume.stack(), parameters);
  return volume;
}

/** The volume at `url` on `backend` (made by a test, e.g. a clone), as the tests open one. */
export function existingTestVolume(backend: Backend, url: string): TestVolume {
  const stack = (options?: StoreStackOptions) =>
    openStoreStack(url, { ...backend.stackOptions, retry: { baseDelayMs: 1 }, ...options });
  return {
    url,
    stack,
    open: (options, s) => {
      const opened = s ?? stack();
      // Garbage is deleted at once unless a test is about the grace: the tests count it.
      return openVolume(opened, { writebackDelayMs: 50, gcGraceMs: 0, ...options });
    },
  };
}

/** A URL for a new volume beside the one at `url`, in the same bucket (or store). */
export function siblingUrl(url: string, label: string): string {
  return `${url.slice(0, url.lastIndexOf("/"))}/${label}-${randomBytes(6).toString("hex")}`;
}

/** The store stack over `store` (a volume at its root), as `openStoreStack` builds it. */
export function stackOver(store: ObjectStore, options?: StoreLayerOptions): StoreStack {
  return buildStoreStack(store, { prefix: "", url: store.description }, options);
}

/** A new volume whose first `sectors` sectors hold `pattern(seed, 0, sectors)`, flushed. */
export async function newFilledVolume(
  backend: Backend,
  label: string,
  parameters: VolumeParameters,
  seed: number,
  sectors: number,
): Promise<TestVolume> {
  const volume = await newTestVolume(backend, label, parameters);
  const writer = await volume.open();
  const written = await writer.write(0, [pattern(seed, 0, sectors)]);
  const closed = await writer.disconnect();
  if (!written.ok || !closed.ok) throw new Error(`could not fill ${volume.url}`);
  return volume;
}

/** The first `bytes` bytes of `device`, read in one request; throws if the read fails. */
export async function readBytes(
  device: Awaited<ReturnType<typeof openVolume>>,
  bytes: number,
): Promise<Buffer> {
  const out = new Uint8Array(bytes);
  const result = await device.read(0, [out]);
  if (!result.ok) throw new Error(`read failed: ${JSON.stringify(result.error)}`);
  return Buffer.from(out);
}

/** Deterministic bytes: each sector's content depends on `seed` and its absolute sector. */
export function pattern(
  seed: number,
  firstSector: number,
  sectors: number,
  sectorSize = 512,
): Uint8Array {
  const out = new Uint8Array(sectors * sectorSize);
  for (let s = 0; s < sectors; s++) {
    let x = (seed * 0x9e3779b1 + (firstSector + s) * 0x85ebca6b) >>> 0;
    for (let i = 0; i < sectorSize; i++) {
      x ^= x << 13;
      x ^= x >>> 17;
      x ^= x << 5;
      out[s * sectorSize + i] = x & 0xff;
    }
  }
  return out;
}

/**
 * Which of `candidates` one sector's bytes are: a value v > 0 is `pattern(v, sector, 1)`, 0 is
 * zeros. Undefined if none.
 */
export function sectorValue(
  bytes: Uint8Array,
  sector: number,
  candidates: Iterable<number>,
  sectorSize = 512,
): number | undefined {
  for (const value of candidates) {
    const expected =
      value === 0 ? new Uint8Array(sectorSize) : pattern(value, sector, 1, sectorSize);
    if (Buffer.from(bytes).equals(Buffer.from(expected))) return value;
  }
  return undefined;
}

/** Split `bytes` into buffers of the given sector counts (cycling). */
export function splitSectors(
  bytes: Uint8Array,
  counts: readonly number[],
  sectorSize = 512,
): Uint8Array[] {
  const out: Uint8Array[] = [];
  let at = 0;
  for (let i = 0; at < bytes.length; i++) {
    const n = (counts[i % counts.length] ?? 1) * sectorSize;
    out.push(bytes.subarray(at, Math.min(at + n, bytes.length)));
    at += n;
  }
  return out;
}

/** The keys of chunk `index`'s objects under `prefix`, oldest generation first. */
export async function chunkObjectKeys(
  store: ObjectStore,
  prefix: string,
  index: number,
): Promise<string[]> {
  const base = legacyChunkKey(prefix, index);
  const keys: string[] = [];
  for await (const entry of listAll(store, base)) keys.push(entry.key);
  return keys;
}

/** The key of chunk `index`'s newest object (what a volume written by one term reads). */
export async function currentChunkKey(
  store: ObjectStore,
  prefix: string,
  index: number,
): Promise<string> {
  const key = (await chunkObjectKeys(store, prefix, index)).at(-1);
  if (key === undefined) throw new Error(`chunk ${index} has no object`);
  return key;
}

/** Store a version 1 volume by hand, as s3blk 0.1 wrote it: superblock and plain chunk keys. */
export async function writeVersion1Volume(
  store: ObjectStore,
  prefix: string,
  parameters: VolumeParameters,
  chunks: ReadonlyMap<number, Uint8Array>,
): Promise<Superblock> {
  const superblock = { ...newSuperblock(parameters), formatVersion: 1 };
  const chunkBytes = superblock.chunkSizeBytes;
  await store.put(superblockKey(prefix), encodeSuperblock(superblock), { ifNoneMatch: "*" });
  for (const [index, data] of chunks) {
    const table = Buffer.alloc((chunkBytes / superblock.checkBlockBytes) * 4);
    for (let i = 0; i < table.byteLength / 4; i++) {
      const block = data.subarray(
        i * superblock.checkBlockBytes,
        (i + 1) * superblock.checkBlockBytes,
      );
      table.writeUInt32BE(crc32(block), i * 4);
    }
    await store.put(legacyChunkKey(prefix, index), data, {
      metadata: {
        "s3blk-format": "1",
        "s3blk-volume": superblock.volumeId,
        "s3blk-chunk": index.toString(16),
        "s3blk-crc32": table.toString("base64"),
      },
    });
  }
  return superblock;
}
