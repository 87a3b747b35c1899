/**
 * Clones and garbage collection of volumes that are not open here.
 *
 * A clone is made from a snapshot of a base in the same key space (a bucket at one endpoint, a
 * directory's parent), in four requests after the base's superblock, whatever the base's size
 * (see src/volume/clones.ts). Garbage collection deletes what nothing reads any more, after a
 * grace horizon measured on the store's clock (src/volume/garbage.ts); it takes no lease, so it
 * runs beside a writer.
 */

import { createClone } from "../volume/clones.js";
import { FORMAT_VERSION, type Superblock } from "../volume/format.js";
import { collectGarbage, type GcOptions, type GcReport } from "../volume/garbage.js";
import {
  VolumeError,
  VolumeVersionError,
  readSuperblock,
  type VolumeStack,
} from "./volume-lifecycle.js";

/** What cloning needs of the two stacks. */
export type CloneStack = VolumeStack & { readonly space: string };

/**
 * Make `target` a clone of snapshot `snapshot` of `source`. Refused if the two are in different
 * key spaces, if one's prefix holds the other's, or if the base is of an older format version.
 */
export async function cloneVolume(
  source: CloneStack,
  snapshot: string,
  target: CloneStack,
): Promise<Superblock> {
  if (source.space !== target.space) {
    // A local volume's key space is its parent directory (see store-stack.ts).
    const same = source.space.startsWith("file://") ? "directory" : "bucket and endpoint";
    throw new VolumeError(
      `a clone must be in the same ${same} as its base: ${target.url} is in ` +
        `${target.space}, but ${source.url} is in ${source.space}`,
    );
  }
  if (overlap(source.prefix, target.prefix)) {
    throw new VolumeError(
      `${target.url} and ${source.url} overlap: a clone needs a prefix of its own, beside its base's`,
    );
  }
  const base = await readSuperblock(source);
  if (base.formatVersion < FORMAT_VERSION) {
    throw new VolumeVersionError(
      `${source.url} is a format version ${base.formatVersion} volume; to clone it, first run: ` +
        `s3blk upgrade ${source.url}`,
    );
  }
  return createClone(
    target.store,
    { prefix: source.prefix, superblock: base },
    snapshot,
    target.prefix,
  );
}

/** The key prefixes a volume's own objects live under (see docs/format.md). */
const VOLUME_PARTS = new Set([
  "volume.json",
  "lease.json",
  "chunks",
  "seals",
  "snapshots",
  "trash",
  "refs",
  "gc",
]);

/**
 * Whether the volumes at prefixes `a` and `b` would share keys: the same prefix, or one inside
 * the other's. A volume at the root of its store overlaps only what lies in its own parts.
 */
function overlap(a: string, b: string): boolean {
  if (a === b) return true;
  if (a === "" || b === "") return VOLUME_PARTS.has((a || b).split("/")[0] ?? "");
  return `${a}/`.startsWith(`${b}/`) || `${b}/`.startsWith(`${a}/`);
}

/**
 * Collect the volume's garbage (see src/volume/garbage.ts). Refused on a volume of an older
 * format version: its writers delete without a grace, and cannot read past a collector.
 */
export async function gcVolume(stack: VolumeStack, options: GcOptions = {}): Promise<GcReport> {
  const superblock = await readSuperblock(stack);
  if (superblock.formatVersion < FORMAT_VERSION) {
    throw new VolumeVersionError(
      `${stack.url} is a format version ${superblock.formatVersion} volume; to collect its ` +
        `garbage, first run: s3blk upgrade ${stack.url}`,
    );
  }
  return collectGarbage(stack.store, stack.prefix, superblock, options);
}
