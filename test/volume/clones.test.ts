/**
 * Clones: O(1) creation, reading through to the base, writes only under the clone's prefix,
 * discards, clones of clones, integrity against the writing volume, the clone-vs-delete race,
 * and the refusals. Request counts and the bucket's contents are asserted on the real server.
 */

import { describe, expect, it } from "vitest";
import { listAll, type ObjectStore } from "../../src/store/object-store.js";
import { createSnapshot, deleteSnapshot } from "../../src/lifecycle/snapshot-lifecycle.js";
import { cloneVolume } from "../../src/lifecycle/clone-lifecycle.js";
import {
  deleteVolume,
  describeVolume,
  readSuperblock,
  upgradeVolume,
} from "../../src/lifecycle/volume-lifecycle.js";
import { encodeSuperblock, superblockKey } from "../../src/volume/format.js";
import { snapshotKey } from "../../src/volume/snapshots.js";
import { StoreLayer } from "../../src/store/store-layer.js";
import { requireS3 } from "../support/s3-target.js";
import {
  existingTestVolume,
  memoryBackend,
  newTestVolume,
  pattern,
  readBytes,
  s3Backend,
  siblingUrl,
  type Backend,
  type TestVolume,
} from "../support/volumes.js";
import type { PutOptions, PutResult } from "../../src/store/object-store.js";

const CHUNK = 64 * 1024;
const SPC = CHUNK / 512;
const CHUNKS = 8;
const PARAMS = { sizeBytes: CHUNKS * CHUNK, chunkSizeBytes: CHUNK };

const s3 = await requireS3("clones on S3");
const backends: Backend[] = [memoryBackend, ...(s3 ? [s3Backend(s3)] : [])];

type Device = Awaited<ReturnType<TestVolume["open"]>>;

const readAll = (device: Device, chunks = CHUNKS) => readBytes(device, chunks * CHUNK);

/** Every key under the volume's prefix and its entity tag. */
async function objectsOf(volume: TestVolume): Promise<Map<string, string>> {
  const stack = volume.stack();
  const found = new Map<string, string>();
  for await (const entry of listAll(stack.store, `${stack.prefix}/`)) {
    const got = await stack.store.get(entry.key);
    if (got !== undefined) found.set(entry.key, got.etag);
  }
  return found;
}

/** A volume at `url` that already exists, as the tests open one. */
const existing = existingTestVolume;

/** A base holding pattern 1 in chunks 0-5 (6 and 7 never written), snapshot "gold". */
async function goldBase(backend: Backend, label: string): Promise<TestVolume> {
  const base = await newTestVolume(backend, label, PARAMS);
  const writer = await base.open();
  expect((await writer.write(0, [pattern(1, 0, 6 * SPC)])).ok).toBe(true);
  expect((await writer.disconnect()).ok).toBe(true);
  await createSnapshot(base.stack(), "gold");
  return base;
}

async function cloneOf(
  backend: Backend,
  base: TestVolume,
  snapshot: string,
  label = "clone",
): Promise<TestVolume> {
  const url = siblingUrl(base.url, label);
  await cloneVolume(base.stack(), snapshot, existing(backend, url).stack());
  return existing(backend, url);
}

describe.each(backends)("clones on $name", (backend) => {
  it("reads as the snapshot, writes only under its own prefix, and discards to zeros", async () => {
    const base = await goldBase(backend, "base");
    // The base moves on after the snapshot: the clone must not see it.
    const moving = await base.open();
    expect((await moving.write(0, [pattern(9, 0, SPC)], { fua: true })).ok).toBe(true);
    expect((await moving.disconnect()).ok).toBe(true);
    const clone = await cloneOf(backend, base, "gold");
    const baseObjects = await objectsOf(base);

    const device = await clone.open();
    const expected = Buffer.alloc(CHUNKS * CHUNK);
    Buffer.from(pattern(1, 0, 6 * SPC)).copy(expected);
    expect((await readAll(device)).equals(expected)).toBe(true);
    // A write inside a shared chunk, a whole-chunk write, a discard of a base chunk, and a
    // discard of part of one.
    expect((await device.write(SPC + 3, [pattern(2, SPC + 3, 5)])).ok).toBe(true);
    expect((await device.write(7 * SPC, [pattern(3, 7 * SPC, SPC)])).ok).toBe(true);
    expect((await device.discard(2 * SPC, SPC)).ok).toBe(true);
    expect((await device.discard(3 * SPC + 8, 16)).ok).toBe(true);
    expect((await device.disconnect()).ok).toBe(true);
    Buffer.from(pattern(2, SPC + 3, 5)).copy(expected, (SPC + 3) * 512);
    Buffer.from(pattern(3, 7 * SPC, SPC)).copy(expected, 7 * SPC * 512);
    expected.fill(0, 2 * CHUNK, 3 * CHUNK);
    expected.fill(0, (3 * SPC + 8) * 512, (3 * SPC + 24) * 512);

    const again = await clone.open({ readOnly: true });
    expect((await readAll(again)).equals(expected)).toBe(true);
    await again.disconnect();
    // The base's objects are exactly what they were after the clone was made: same keys,
    // same entity tags. Nothing was written or deleted under its prefix.
    expect(await objectsOf(base)).toEqual(baseObjects);
    const described = await describeVolume(clone.stack());
    expect(described.origin?.snapshot).toBe("gold");
    // Chunks 1, 3 and 7 are the clone's own now; 0, 4 and 5 still the base's; 2 reads as zeros.
    expect([described.ownedChunks, described.sharedChunks]).toEqual([3, 3]);
  });

  it("clones a clone's snapshot, flattened: every object read straight from its writer", async () => {
    const base = await goldBase(backend, "gbase");
    const child = await cloneOf(backend, base, "gold", "child");
    const writer = await child.open();
    expect((await writer.write(4 * SPC, [pattern(5, 4 * SPC, SPC)])).ok).toBe(true);
    expect((await writer.disconnect()).ok).toBe(true);
    await createSnapshot(child.stack(), "silver");
    const grandchild = await cloneOf(backend, child, "silver", "grandchild");
    const g = await grandchild.open();
    expect((await g.write(0, [pattern(6, 0, 8)])).ok).toBe(true);
    const expected = Buffer.alloc(CHUNKS * CHUNK);
    Buffer.from(pattern(1, 0, 6 * SPC)).copy(expected);
    Buffer.from(pattern(5, 4 * SPC, SPC)).copy(expected, 4 * CHUNK);
    Buffer.from(pattern(6, 0, 8)).copy(expected);
    expect((await readAll(g)).equals(expected)).toBe(true);
    // Flattened: chunk 1 is read from the base itself, chunk 4 from the child.
    const baseStack = base.stack();
    const childStack = child.stack();
    expect(g.chunkObjectKey(1)?.startsWith(`${baseStack.prefix}/chunks/`)).toBe(true);
    expect(g.chunkObjectKey(4)?.startsWith(`${childStack.prefix}/chunks/`)).toBe(true);
    expect((await g.disconnect()).ok).toBe(true);
  });

  it("checks an object read through a clone against the volume that wrote it", async () => {
    const base = await goldBase(backend, "ibase");
    const clone = await cloneOf(backend, base, "gold");
    const reader = await clone.open({ readOnly: true });
    const key = reader.chunkObjectKey(0);
    await reader.disconnect();
    expect(key).toBeDefined();
    // Replace the base's object by one of the same bytes that claims another volume.
    const stack = base.stack();
    const got = await stack.store.get(key ?? "");
    await stack.store.put(key ?? "", got?.body ?? new Uint8Array(), {
      metadata: {
        ...got?.metadata,
        "s3blk-volume": (await readSuperblock(clone.stack())).volumeId,
      },
    });
    const again = await clone.open({ readOnly: true });
    const result = await again.read(0, [new Uint8Array(4096)]);
    expect(result.ok || result.error.kind !== "Io" ? "" : String(result.error.cause)).toMatch(
      new RegExp(`chunk ${key} is corrupt: it belongs to volume`),
    );
    await again.disconnect();
  });

  it("refuses, in one line: a snapshot with clones, a base with cloned snapshots, a taken target", async () => {
    const base = await goldBase(backend, "rbase");
    const clone = await cloneOf(backend, base, "gold");
    await expect(deleteSnapshot(base.stack(), "gold")).rejects.toThrow(
      new RegExp(`a clone depends on snapshot "gold": .*${clone.stack().prefix}`),
    );
    await expect(deleteVolume(base.stack())).rejects.toThrow(/a clone depends on/);
    // Both refusals undid their marks: the snapshot still opens and clones.
    await (await base.open({ snapshot: "gold" })).disconnect();
    await expect(cloneVolume(base.stack(), "gold", clone.stack())).rejects.toThrow(
      /a volume already exists/,
    );
    await expect(cloneVolume(base.stack(), "nope", clone.stack())).rejects.toThrow(
      /no snapshot named "nope"/,
    );
    await expect(cloneVolume(base.stack(), "gold", base.stack())).rejects.toThrow(/overlap/);
    // Deleting the clone drops its reference: then the snapshot and the base can go.
    await deleteVolume(clone.stack());
    await deleteSnapshot(base.stack(), "gold");
    await deleteVolume(base.stack());
  });

  it("costs the same few requests to clone a 1 GiB and a 64 GiB base, and one GET per first read", async () => {
    const counts = [];
    for (const sizeBytes of [1024 ** 3, 64 * 1024 ** 3]) {
      const base = await newTestVolume(backend, "sized", { sizeBytes, chunkSizeBytes: CHUNK });
      const w = await base.open();
      expect((await w.write(0, [pattern(7, 0, 4 * SPC)])).ok).toBe(true);
      expect((await w.disconnect()).ok).toBe(true);
      await createSnapshot(base.stack(), "s");
      const target = existing(backend, siblingUrl(base.url, "sized-clone"));
      const stack = target.stack();
      await cloneVolume(base.stack(), "s", stack);
      const { gets, puts, lists, deletes, deleteBatches } = stack.counter.counts();
      counts.push({ gets, puts, lists, deletes, deleteBatches });
      if (sizeBytes === 1024 ** 3) {
        const reading = target.stack();
        const device = await target.open({ readOnly: true, cacheBytes: 0 }, reading);
        reading.counter.reset();
        expect((await device.read(SPC, [new Uint8Array(4096)])).ok).toBe(true);
        // One ranged GET of the base's object, nothing else.
        expect(reading.counter.counts()).toMatchObject({ gets: 1, puts: 0, lists: 0 });
        await device.disconnect();
      }
    }
    // Past the base's superblock (read on its own stack): the record, the ref, the clone's
    // superblock, the record again. Nothing per chunk.
    expect(counts[0]).toEqual({ gets: 2, puts: 2, lists: 0, deletes: 0, deleteBatches: 0 });
    expect(counts[1]).toEqual(counts[0]);
  });

  it.each([
    ["after the clone's ref", "/refs/", "deletion"],
    ["after the clone's superblock", "/volume.json", "clone"],
  ])(
    "never completes both a clone and a deletion of its snapshot: deletion %s",
    async (_when, trigger, winner) => {
      const base = await goldBase(backend, "race");
      const url = siblingUrl(base.url, "racer");
      const baseStack = base.stack();
      let deleting: Promise<string> | undefined;
      // Run the whole deletion right after the clone's PUT of `trigger` lands.
      const target = existing(backend, url).stack({
        wrap: (store: ObjectStore) =>
          new (class extends StoreLayer {
            override async put(key: string, body: Uint8Array, o?: PutOptions): Promise<PutResult> {
              const result = await this.inner.put(key, body, o);
              if (key.includes(trigger)) {
                deleting ??= deleteSnapshot(base.stack(), "gold").then(
                  () => "deleted",
                  (e: Error) => e.message,
                );
                await deleting;
              }
              return result;
            }
          })(store),
      });
      const cloned = await cloneVolume(baseStack, "gold", target).then(
        () => "cloned",
        (e: Error) => e.message,
      );
      const deleted = await deleting;
      const record = await baseStack.store.get(snapshotKey(baseStack.prefix, "gold"));
      if (winner === "deletion") {
        // It saw the ref, but no clone behind it yet: stale, so it went ahead. The clone then
        // found the record gone, and backed off, leaving nothing behind.
        expect(deleted).toBe("deleted");
        expect(cloned).toMatch(/is being deleted: no clone was made/);
        expect(record).toBeUndefined();
        await expect(readSuperblock(existing(backend, url).stack())).rejects.toThrow(/no volume/);
      } else {
        // It saw a live clone, refused and undid its mark, which the clone never saw.
        expect(deleted).toMatch(/a clone depends on snapshot "gold"/);
        expect(cloned).toBe("cloned");
        expect(record).toBeDefined();
        const device = await existing(backend, url).open({ readOnly: true });
        expect((await readAll(device)).subarray(0, 6 * CHUNK).equals(pattern(1, 0, 6 * SPC))).toBe(
          true,
        );
        await device.disconnect();
      }
    },
  );
});

describe.each(backends)("a version 2 base on $name", (backend) => {
  it("is written as it is, refused as a base until upgraded, and upgraded by its superblock alone", async () => {
    const base = await goldBase(backend, "v2base");
    const stack = base.stack();
    const key = superblockKey(stack.prefix);
    const v3 = await readSuperblock(stack);
    await stack.store.put(key, encodeSuperblock({ ...v3, formatVersion: 2 }));
    // Read and written as it is.
    const writer = await base.open();
    expect((await writer.write(7 * SPC, [pattern(4, 7 * SPC, SPC)])).ok).toBe(true);
    expect((await writer.disconnect()).ok).toBe(true);
    expect((await readSuperblock(base.stack())).formatVersion).toBe(2);
    const target = existing(backend, siblingUrl(base.url, "v2clone"));
    await expect(cloneVolume(base.stack(), "gold", target.stack())).rejects.toThrow(
      /format version 2 volume; to clone it, first run: s3blk upgrade/,
    );
    const before = await objectsOf(base);
    const upgrading = base.stack();
    expect(await upgradeVolume(upgrading)).toMatchObject({ upgraded: true, fromVersion: 2 });
    // The lease (a PUT and a DELETE of the process lease, a GET and two PUTs of the claim) and
    // the superblock (PUT): no seal, no chunk.
    expect(upgrading.counter.counts()).toMatchObject({ puts: 4, deletes: 1, lists: 0 });
    const after = await objectsOf(base);
    const changed = [...after].filter(([k, etag]) => before.get(k) !== etag).map(([k]) => k);
    expect(changed.sort()).toEqual([key, `${stack.prefix}/lease.json`].sort());
    await cloneVolume(base.stack(), "gold", target.stack());
    const clone = await target.open({ readOnly: true });
    expect((await readAll(clone)).subarray(0, 6 * CHUNK).equals(pattern(1, 0, 6 * SPC))).toBe(true);
    await clone.disconnect();
  });
});

describe.each(backends)("snapshot deletion against clones on $name", (backend) => {
  it("a refused deletion leaves a clone in flight its ref: that clone keeps the snapshot alive", async () => {
    const base = await goldBase(backend, "inflight");
    const first = await cloneOf(backend, base, "gold", "first");
    const url = siblingUrl(base.url, "second");
    let refused: Promise<string> | undefined;
    // A deletion runs between the second clone's ref and its superblock: it sees the first
    // clone (live) and the second's ref (no superblock yet), and is refused.
    const target = existing(backend, url).stack({
      wrap: (store: ObjectStore) =>
        new (class extends StoreLayer {
          override async put(key: string, body: Uint8Array, o?: PutOptions): Promise<PutResult> {
            const result = await this.inner.put(key, body, o);
            if (key.includes("/refs/")) {
              refused ??= deleteSnapshot(base.stack(), "gold").then(
                () => "deleted",
                (e: Error) => e.message,
              );
              await refused;
            }
            return result;
          }
        })(store),
    });
    await cloneVolume(base.stack(), "gold", target);
    expect(await refused).toMatch(/a clone depends on snapshot "gold"/);
    // With the first clone gone, the second still holds the snapshot.
    await deleteVolume(first.stack());
    await expect(deleteSnapshot(base.stack(), "gold")).rejects.toThrow(
      new RegExp(`a clone depends on snapshot "gold": .*second`),
    );
  });

  it("a clone that began before a deletion and writes its ref after the deletion looked, backs off", async () => {
    const base = await goldBase(backend, "late");
    const url = siblingUrl(base.url, "late-clone");
    let atTrash!: () => void;
    const deletionAtTrash = new Promise<void>((resolve) => (atTrash = resolve));
    const clone = { done: undefined as Promise<string> | undefined };
    // The clone has read the record (unmarked); it writes its ref only once the deletion has
    // listed the refs (none) and trashed the record. Then only the mark can tell the clone.
    const cloneStack = existing(backend, url).stack({
      wrap: (store: ObjectStore) =>
        new (class extends StoreLayer {
          override async put(key: string, body: Uint8Array, o?: PutOptions): Promise<PutResult> {
            if (key.includes("/refs/")) await deletionAtTrash;
            return this.inner.put(key, body, o);
          }
        })(store),
    });
    const deleting = base.stack({
      wrap: (store: ObjectStore) =>
        new (class extends StoreLayer {
          override async put(key: string, body: Uint8Array, o?: PutOptions): Promise<PutResult> {
            const result = await this.inner.put(key, body, o);
            if (key.includes("/trash/")) {
              atTrash();
              await clone.done;
            }
            return result;
          }
        })(store),
    });
    clone.done = cloneVolume(base.stack(), "gold", cloneStack).then(
      () => "cloned",
      (e: Error) => e.message,
    );
    await deleteSnapshot(deleting, "gold");
    expect(await clone.done).toMatch(/is being deleted: no clone was made/);
    await expect(readSuperblock(existing(backend, url).stack())).rejects.toThrow(/no volume/);
  });

  it("is refused while another process holds the volume's lease, naming it", async () => {
    const base = await goldBase(backend, "leased");
    const writer = await base.open();
    await expect(deleteSnapshot(base.stack(), "gold")).rejects.toThrow(/in use by pid \d+/);
    await expect(deleteVolume(base.stack())).rejects.toThrow(/in use by pid \d+/);
    expect((await writer.disconnect()).ok).toBe(true);
  });

  it("takes a ref whose clone now has another origin for a stale one", async () => {
    const base = await goldBase(backend, "strayref");
    await createSnapshot(base.stack(), "silver");
    const clone = await cloneOf(backend, base, "gold");
    const stack = base.stack();
    const cloneBlock = await readSuperblock(clone.stack());
    // A ref under "silver" naming a clone of "gold": it does not depend on "silver".
    await stack.store.put(
      `${stack.prefix}/refs/silver/${cloneBlock.volumeId}.json`,
      Buffer.from(
        JSON.stringify({
          format: "s3blk-ref",
          version: 1,
          snapshot: "silver",
          clone: { prefix: clone.stack().prefix, volumeId: cloneBlock.volumeId },
          createdAt: new Date().toISOString(),
        }),
      ),
    );
    await deleteSnapshot(base.stack(), "silver");
    await expect(deleteSnapshot(base.stack(), "gold")).rejects.toThrow(/a clone depends/);
  });

  it("never reads a snapshot made again under its origin's name", async () => {
    const base = await goldBase(backend, "renamed");
    const clone = await cloneOf(backend, base, "gold");
    // Behind s3blk's back: the origin record is replaced by another snapshot of that name.
    const stack = base.stack();
    const key = snapshotKey(stack.prefix, "gold");
    const got = await stack.store.get(key);
    const record = JSON.parse(Buffer.from(got?.body ?? []).toString()) as { creator: string };
    await stack.store.put(key, Buffer.from(JSON.stringify({ ...record, creator: "someone else" })));
    await expect(clone.open({ readOnly: true })).rejects.toThrow(
      /was deleted and another made under its name/,
    );
  });
});
