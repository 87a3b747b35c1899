/**
 * Snapshots: taken while writes continue, immutable across rewrites and reopens, read-only
 * opens of them, rollback, deletion freeing their objects, and the one-line errors. On memory
 * and on S3.
 */

import { describe, expect, it } from "vitest";
import { listAll, type ObjectStore } from "../../src/store/object-store.js";
import { StoreLayer } from "../../src/store/store-layer.js";
import { chunkPrefix } from "../../src/volume/format.js";
import { SnapshotError } from "../../src/volume/snapshots.js";
import {
  createSnapshot,
  deleteSnapshot,
  listSnapshots,
  rollbackVolume,
} from "../../src/lifecycle/snapshot-lifecycle.js";
import { requireS3 } from "../support/s3-target.js";
import {
  memoryBackend,
  newTestVolume,
  pattern,
  readBytes,
  s3Backend,
  type Backend,
  type TestVolume,
} from "../support/volumes.js";

const CHUNK = 64 * 1024;
const SPC = CHUNK / 512;
const CHUNKS = 8;
const PARAMS = { sizeBytes: CHUNKS * CHUNK, chunkSizeBytes: CHUNK };

const s3 = await requireS3("snapshots on S3");
const backends: Backend[] = [memoryBackend, ...(s3 ? [s3Backend(s3)] : [])];

type Device = Awaited<ReturnType<TestVolume["open"]>>;

const readAll = (device: Device) => readBytes(device, CHUNKS * CHUNK);

async function countObjects(volume: TestVolume): Promise<number> {
  const stack = volume.stack();
  let n = 0;
  for await (const _ of listAll(stack.store, chunkPrefix(stack.prefix))) n++;
  return n;
}

describe.each(backends)("snapshots on $name", (backend) => {
  it("holds the writes completed before the call, not those after, and one in flight whole", async () => {
    const volume = await newTestVolume(backend, "semantics", PARAMS);
    const device = await volume.open({ writebackDelayMs: 60_000 });
    expect((await device.write(0, [pattern(1, 0, CHUNKS * SPC)])).ok).toBe(true); // not flushed
    // In flight during the call: spans chunks 2 and 3.
    const spanning = device.write(2 * SPC + 10, [pattern(2, 2 * SPC + 10, SPC)]);
    const taking = device.snapshot("s1");
    // Started after the call: must not be in it, whatever the timing.
    const after = device.write(5 * SPC, [pattern(3, 5 * SPC, 8)]);
    const taken = await taking;
    expect(taken.ok).toBe(true);
    expect((await spanning).ok && (await after).ok).toBe(true);
    const now = await readAll(device);
    await device.disconnect();

    const snap = await volume.open({ snapshot: "s1" });
    expect((await snap.getInfo()).readWrite).toBe(false);
    const inSnapshot = await readAll(snap);
    await snap.disconnect();
    const expected = Buffer.from(pattern(1, 0, CHUNKS * SPC));
    Buffer.from(pattern(2, 2 * SPC + 10, SPC)).copy(expected, (2 * SPC + 10) * 512);
    expect(inSnapshot.equals(expected)).toBe(true);
    // The volume itself has the later write too.
    Buffer.from(pattern(3, 5 * SPC, 8)).copy(expected, 5 * SPC * 512);
    expect(now.equals(expected)).toBe(true);
  });

  it("stays as it was through rewrites, discards and reopens; deleting it frees its objects", async () => {
    const volume = await newTestVolume(backend, "immutable", PARAMS);
    const first = pattern(4, 0, CHUNKS * SPC);
    let device = await volume.open();
    expect((await device.write(0, [first])).ok).toBe(true);
    expect((await device.snapshot("before")).ok).toBe(true);
    expect((await device.write(0, [pattern(5, 0, CHUNKS * SPC)])).ok).toBe(true);
    expect((await device.discard(0, 2 * SPC)).ok).toBe(true);
    expect((await device.disconnect()).ok).toBe(true);
    // A new writer term deletes the garbage at its start: not the snapshot's objects.
    device = await volume.open();
    expect((await device.write(3 * SPC, [pattern(6, 3 * SPC, SPC)])).ok).toBe(true);
    expect((await device.disconnect()).ok).toBe(true);
    device = await volume.open();
    await device.disconnect();
    // Eight chunks of the snapshot, six live chunks of the volume.
    expect(await countObjects(volume)).toBe(CHUNKS + CHUNKS - 2);

    const snap = await volume.open({ snapshot: "before" });
    expect((await readAll(snap)).equals(Buffer.from(first))).toBe(true);
    await snap.disconnect();

    await deleteSnapshot(volume.stack(), "before");
    await (await volume.open()).disconnect();
    expect(await countObjects(volume)).toBe(CHUNKS - 2);
    await expect(volume.open({ snapshot: "before" })).rejects.toThrow(/no snapshot named "before"/);
  });

  it("rolls the volume back to a snapshot, and keeps the later snapshots", async () => {
    const volume = await newTestVolume(backend, "rollback", PARAMS);
    const device = await volume.open();
    expect((await device.write(0, [pattern(7, 0, 4 * SPC)])).ok).toBe(true);
    expect((await device.snapshot("one")).ok).toBe(true);
    expect((await device.write(SPC, [pattern(8, SPC, 4 * SPC)])).ok).toBe(true);
    expect((await device.snapshot("two")).ok).toBe(true);
    const two = await readAll(device);
    expect((await device.disconnect()).ok).toBe(true);

    await rollbackVolume(volume.stack(), "one");
    const rolled = await volume.open();
    const expected = Buffer.alloc(CHUNKS * CHUNK);
    Buffer.from(pattern(7, 0, 4 * SPC)).copy(expected);
    expect((await readAll(rolled)).equals(expected)).toBe(true);
    await rolled.disconnect();
    const later = await volume.open({ snapshot: "two" });
    expect((await readAll(later)).equals(two)).toBe(true);
    await later.disconnect();
    expect((await listSnapshots(volume.stack())).map((s) => s.name)).toEqual(["one", "two"]);
  });

  it("answers a taken, an invalid and an unknown name with one clear line", async () => {
    const volume = await newTestVolume(backend, "names", PARAMS);
    await createSnapshot(volume.stack(), "a.b_c-1");
    await expect(createSnapshot(volume.stack(), "a.b_c-1")).rejects.toThrow(
      /^a snapshot named "a\.b_c-1" already exists$/,
    );
    for (const bad of ["", "a/b", "x".repeat(65), "sp ace", ".."]) {
      await expect(createSnapshot(volume.stack(), bad)).rejects.toThrow(SnapshotError);
    }
    await expect(createSnapshot(volume.stack(), "a/b")).rejects.toThrow(
      /invalid snapshot name "a\/b": use 1 to 64 characters of A-Z, a-z, 0-9, "\.", "_" and "-"/,
    );
    await expect(deleteSnapshot(volume.stack(), "nope")).rejects.toThrow(
      /no snapshot named "nope"/,
    );
    await expect(rollbackVolume(volume.stack(), "nope")).rejects.toThrow(
      /no snapshot named "nope"/,
    );
    const readOnly = await volume.open({ readOnly: true });
    const refused = await readOnly.snapshot("x");
    expect(refused.ok ? "ok" : refused.error.kind).toBe("Is_read_only");
    await readOnly.disconnect();
  });

  it("refuses to snapshot a volume another writer holds, naming it", async () => {
    const volume = await newTestVolume(backend, "held", PARAMS);
    const holder = await volume.open();
    await expect(createSnapshot(volume.stack(), "x")).rejects.toThrow(
      /volume is in use by pid \d+ on /,
    );
    await holder.disconnect();
  });
});

describe("a snapshot and a disconnect", () => {
  it("disconnect waits for a snapshot in flight, which completes whole", async () => {
    const volume = await newTestVolume(memoryBackend, "snapclose", PARAMS);
    // A store that refuses every PUT once closed, as S3's client does.
    const stack = volume.stack({
      wrap: (store) =>
        new (class extends StoreLayer {
          #closed = false;
          override async put(...args: Parameters<ObjectStore["put"]>) {
            // The record's PUT is slow, so a disconnect that does not wait closes the store first.
            if (args[0].includes("/snapshots/")) await new Promise((r) => setTimeout(r, 50));
            if (this.#closed) throw new Error("store closed");
            return this.inner.put(...args);
          }
          override close() {
            this.#closed = true;
            return this.inner.close();
          }
        })(store),
    });
    const device = await volume.open({ writebackDelayMs: 60_000 }, stack);
    expect((await device.write(0, [pattern(1, 0, CHUNKS * SPC)])).ok).toBe(true);
    const taking = device.snapshot("during");
    const closing = device.disconnect();
    const [taken, closed] = await Promise.all([taking, closing]);
    expect(taken.ok).toBe(true);
    expect(closed.ok).toBe(true);
    const snap = await volume.open({ snapshot: "during" });
    expect((await readAll(snap)).equals(Buffer.from(pattern(1, 0, CHUNKS * SPC)))).toBe(true);
    await snap.disconnect();
  });
});
