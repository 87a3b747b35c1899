/**
 * Model-based property test: random sequences of write, read, flush, discard, close-and-reopen,
 * crash-and-reopen, snapshot, snapshot deletion, rollback, clone, a switch to another volume,
 * volume deletion and garbage collection against the device and a plain in-memory model. The
 * model keeps every volume (the first and its clones) and a copy of every snapshot: at the end
 * each volume and each snapshot that still exists must read exactly as the model says, and at
 * every step a deletion that clones forbid must be refused.
 *
 * The model tracks, per sector, what the device must return now, what the store holds for
 * certain (as of the last flush), and which values written since might have reached the store
 * through background write-back. After a close the device must hold everything; after a crash
 * each sector must hold its flushed value or one written since, never anything else. After
 * every step the page cache checks its own accounts (`checkInvariants`).
 */

import fc from "fast-check";
import { describe, expect, it } from "vitest";
import type { ChunkedBlockDevice } from "../../src/device/chunked-block-device.js";
import { FaultStore } from "../../src/store/fault-store.js";
import { deleteSnapshot, rollbackVolume } from "../../src/lifecycle/snapshot-lifecycle.js";
import { cloneVolume, gcVolume } from "../../src/lifecycle/clone-lifecycle.js";
import { deleteVolume, openVolume } from "../../src/lifecycle/volume-lifecycle.js";
import { openStoreStack, type StoreStackOptions } from "../../src/store/store-stack.js";
import { CloneError } from "../../src/volume/clones.js";
import {
  memoryBackend,
  newTestVolume,
  pattern,
  sectorValue,
  siblingUrl,
  splitSectors,
} from "../support/volumes.js";

const SECTOR = 512;
const CHUNK = 64 * 1024;
const SECTORS_PER_CHUNK = CHUNK / SECTOR;
const SIZE_SECTORS = 6 * SECTORS_PER_CHUNK + 17;

type Op =
  | { kind: "write"; sector: number; sectors: number; splits: number[]; fua: boolean }
  | { kind: "read"; sector: number; sectors: number }
  | { kind: "discard"; sector: number; sectors: number }
  | { kind: "flush" }
  | { kind: "reopen" }
  | { kind: "crash" }
  | { kind: "snapshot" }
  | { kind: "deleteSnapshot"; pick: number }
  | { kind: "rollback"; pick: number }
  | { kind: "clone"; pick: number }
  | { kind: "switch"; pick: number }
  | { kind: "deleteVolume"; pick: number }
  | { kind: "gc"; pick: number };

const range = fc
  .tuple(
    fc.integer({ min: 0, max: SIZE_SECTORS - 1 }),
    fc.integer({ min: 1, max: 3 * SECTORS_PER_CHUNK }),
  )
  .map(([sector, sectors]) => ({ sector, sectors: Math.min(sectors, SIZE_SECTORS - sector) }));

const op: fc.Arbitrary<Op> = fc.oneof(
  {
    weight: 6,
    arbitrary: fc
      .record({
        r: range,
        splits: fc.array(fc.integer({ min: 1, max: 200 }), { minLength: 1, maxLength: 4 }),
        fua: fc.boolean(),
      })
      .map(({ r, splits, fua }) => ({ kind: "write" as const, ...r, splits, fua })),
  },
  { weight: 4, arbitrary: range.map((r) => ({ kind: "read" as const, ...r })) },
  { weight: 2, arbitrary: range.map((r) => ({ kind: "discard" as const, ...r })) },
  { weight: 2, arbitrary: fc.constant({ kind: "flush" as const }) },
  { weight: 1, arbitrary: fc.constant({ kind: "reopen" as const }) },
  { weight: 1, arbitrary: fc.constant({ kind: "crash" as const }) },
  { weight: 2, arbitrary: fc.constant({ kind: "snapshot" as const }) },
  { weight: 1, arbitrary: fc.nat().map((pick) => ({ kind: "deleteSnapshot" as const, pick })) },
  { weight: 1, arbitrary: fc.nat().map((pick) => ({ kind: "rollback" as const, pick })) },
  { weight: 2, arbitrary: fc.nat().map((pick) => ({ kind: "clone" as const, pick })) },
  { weight: 2, arbitrary: fc.nat().map((pick) => ({ kind: "switch" as const, pick })) },
  { weight: 1, arbitrary: fc.nat().map((pick) => ({ kind: "deleteVolume" as const, pick })) },
  { weight: 1, arbitrary: fc.nat().map((pick) => ({ kind: "gc" as const, pick })) },
);

/** One volume's sectors. A sector's value: 0 is zeros, n > 0 is pattern(n, sector). */
class VolumeModel {
  constructor(
    readonly url: string,
    /** The snapshot it was cloned from, as `url@name`. */
    readonly origin?: string,
  ) {}

  current = new Int32Array(SIZE_SECTORS);
  durable = new Int32Array(SIZE_SECTORS);
  since: (Set<number> | undefined)[] = new Array(SIZE_SECTORS);

  set(sector: number, sectors: number, value: number, durable: boolean): void {
    for (let s = sector; s < sector + sectors; s++) {
      this.current[s] = value;
      if (durable) {
        // A FUA write is durable; older unflushed values of the sector may still have landed
        // before it, but not after it, so it becomes the floor.
        this.durable[s] = value;
        this.since[s] = undefined;
      } else {
        (this.since[s] ??= new Set()).add(value);
      }
    }
  }

  flushed(): void {
    this.durable.set(this.current);
    this.since = new Array(SIZE_SECTORS);
  }

  /** Every snapshot of this volume that exists, by name: the sectors' values when taken. */
  readonly snapshots = new Map<string, Int32Array>();
}

/** Every volume, and which snapshots clones depend on. */
class Model {
  readonly volumes: VolumeModel[] = [];

  /** The clones of snapshot `name` of `volume`. */
  clonesOf(volume: VolumeModel, name?: string): VolumeModel[] {
    return this.volumes.filter(
      (v) =>
        v.origin !== undefined &&
        (name === undefined
          ? v.origin.startsWith(`${volume.url}@`)
          : v.origin === `${volume.url}@${name}`),
    );
  }

  /** Every snapshot, as [volume, name]. */
  allSnapshots(): [VolumeModel, string][] {
    return this.volumes.flatMap((v) =>
      [...v.snapshots.keys()].map((n) => [v, n] as [VolumeModel, string]),
    );
  }
}

async function expectReads(device: ChunkedBlockDevice, want: Int32Array, what: string) {
  const all = new Uint8Array(SIZE_SECTORS * SECTOR);
  expect((await device.read(0, [all])).ok).toBe(true);
  for (let s = 0; s < SIZE_SECTORS; s++) {
    const value = want[s] ?? -1;
    expect(
      sectorValue(all.subarray(s * SECTOR, (s + 1) * SECTOR), s, [value]),
      `${what} sector ${s}`,
    ).toBe(value);
  }
}

async function run(ops: Op[], faults: boolean): Promise<void> {
  const first = await newTestVolume(memoryBackend, "model", {
    sizeBytes: SIZE_SECTORS * SECTOR,
    chunkSizeBytes: CHUNK,
  });
  const stackOf = (url: string, options?: StoreStackOptions) =>
    openStoreStack(url, { retry: { baseDelayMs: 0, maxAttempts: 50 }, ...options });
  let fault: FaultStore | undefined;
  const open = (volume: VolumeModel) => {
    const stack = stackOf(volume.url, {
      wrap: (store) => {
        fault = new FaultStore(store, { random: mulberry(ops.length) });
        if (faults) fault.inject({ probability: 0.2, operations: ["get", "put", "delete"] });
        return fault;
      },
    });
    return openVolume(stack, {
      cacheBytes: 2 * CHUNK,
      maxDirtyBytes: 3 * CHUNK,
      writebackDelayMs: 2,
      wholeChunkReadBytes: CHUNK / 2,
      minRangedReadBytes: 4096,
      gcGraceMs: 0,
      // A crash here is simulated in this very process, which a lease cannot tell from a
      // live holder; the lease has its own tests.
      lease: false,
    });
  };
  const model = new Model();
  let volume = new VolumeModel(first.url);
  model.volumes.push(volume);
  let device: ChunkedBlockDevice = await open(volume);
  /** A volume other than the open one, if there is one. */
  const other = (pick: number) => {
    const others = model.volumes.filter((v) => v !== volume);
    return others[pick % Math.max(1, others.length)];
  };
  let seed = 1;
  for (const o of ops) {
    switch (o.kind) {
      case "write": {
        const value = seed++;
        const data = pattern(value, o.sector, o.sectors);
        const result = await device.write(o.sector, splitSectors(data, o.splits), { fua: o.fua });
        expect(result.ok).toBe(true);
        volume.set(o.sector, o.sectors, value, o.fua);
        break;
      }
      case "read": {
        const out = new Uint8Array(o.sectors * SECTOR);
        expect((await device.read(o.sector, [out])).ok).toBe(true);
        for (let s = 0; s < o.sectors; s++) {
          const got = out.subarray(s * SECTOR, (s + 1) * SECTOR);
          const want = volume.current[o.sector + s] ?? -1;
          expect(sectorValue(got, o.sector + s, [want]), `sector ${o.sector + s}`).toBe(want);
        }
        break;
      }
      case "discard":
        expect((await device.discard(o.sector, o.sectors)).ok).toBe(true);
        volume.set(o.sector, o.sectors, 0, false);
        break;
      case "flush":
        expect((await device.flush()).ok).toBe(true);
        volume.flushed();
        break;
      case "reopen":
        expect((await device.disconnect()).ok).toBe(true);
        volume.flushed();
        device = await open(volume);
        break;
      case "snapshot": {
        const name = `s${seed++}`;
        expect((await device.snapshot(name)).ok).toBe(true);
        volume.snapshots.set(name, Int32Array.from(volume.current));
        volume.flushed(); // a snapshot flushes
        break;
      }
      case "deleteSnapshot": {
        const picked = model.allSnapshots()[o.pick % Math.max(1, model.allSnapshots().length)];
        if (picked === undefined) break;
        const [owner, name] = picked;
        const deleting = deleteSnapshot(stackOf(owner.url), name);
        if (model.clonesOf(owner, name).length > 0) {
          await expect(deleting).rejects.toThrow(CloneError);
        } else {
          await deleting;
          owner.snapshots.delete(name);
        }
        break;
      }
      case "rollback": {
        const names = [...volume.snapshots.keys()];
        const name = names[o.pick % Math.max(1, names.length)];
        if (name === undefined) break;
        expect((await device.disconnect()).ok).toBe(true);
        await rollbackVolume(stackOf(volume.url), name, { lease: false, gcGraceMs: 0 });
        volume.current = Int32Array.from(volume.snapshots.get(name) ?? []);
        volume.flushed();
        device = await open(volume);
        break;
      }
      case "clone": {
        if (model.allSnapshots().length === 0) {
          // Something to clone: a snapshot of the open volume, as the op "snapshot" takes one.
          const name = `s${seed++}`;
          expect((await device.snapshot(name)).ok).toBe(true);
          volume.snapshots.set(name, Int32Array.from(volume.current));
          volume.flushed();
        }
        const picked = model.allSnapshots()[o.pick % model.allSnapshots().length];
        if (picked === undefined) break;
        const [owner, name] = picked;
        const url = siblingUrl(first.url, "clone");
        await cloneVolume(stackOf(owner.url), name, stackOf(url));
        const clone = new VolumeModel(url, `${owner.url}@${name}`);
        clone.current = Int32Array.from(owner.snapshots.get(name) ?? []);
        clone.flushed();
        model.volumes.push(clone);
        break;
      }
      case "switch": {
        const next = other(o.pick);
        if (next === undefined) break;
        expect((await device.disconnect()).ok).toBe(true);
        volume.flushed();
        volume = next;
        device = await open(volume);
        break;
      }
      case "deleteVolume": {
        // Another volume than the open one: deleting one being written is not a thing to do.
        const victim = other(o.pick);
        if (victim === undefined) break;
        const deleting = deleteVolume(stackOf(victim.url));
        if (model.clonesOf(victim).length > 0) {
          await expect(deleting).rejects.toThrow(CloneError);
        } else {
          await deleting;
          model.volumes.splice(model.volumes.indexOf(victim), 1);
        }
        break;
      }
      case "gc": {
        // With no grace, beside no writer: the open volume is collected by its own writer.
        const target = other(o.pick);
        if (target !== undefined) await gcVolume(stackOf(target.url), { graceMs: 0 });
        break;
      }
      case "crash": {
        await device.abort();
        device = await open(volume);
        const all = new Uint8Array(SIZE_SECTORS * SECTOR);
        expect((await device.read(0, [all])).ok).toBe(true);
        for (let s = 0; s < SIZE_SECTORS; s++) {
          const candidates = [volume.durable[s] ?? 0, ...(volume.since[s] ?? [])];
          const got = sectorValue(all.subarray(s * SECTOR, (s + 1) * SECTOR), s, candidates);
          expect(got, `sector ${s} after crash: not one of ${candidates.join(",")}`).toBeDefined();
          volume.current[s] = got ?? 0;
        }
        volume.flushed();
        break;
      }
    }
    // The cache's accounts agree with its pages after every step (src/cache/invariants.ts).
    device.checkInvariants();
  }
  // Whatever the sequence, a final close, a collection of every volume, and reopens return the
  // model exactly: every volume, every snapshot.
  expect((await device.disconnect()).ok).toBe(true);
  for (const v of model.volumes) await gcVolume(stackOf(v.url), { graceMs: 0 });
  for (const v of model.volumes) {
    const reader = await openVolume(stackOf(v.url), { readOnly: true });
    await expectReads(reader, v.current, `final ${v.url}`);
    await reader.disconnect();
    for (const [name, want] of v.snapshots) {
      const snapshot = await openVolume(stackOf(v.url), { snapshot: name });
      await expectReads(snapshot, want, `snapshot ${v.url}@${name}`);
      await snapshot.disconnect();
    }
  }
}

function mulberry(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

describe("device against a model", () => {
  it("agrees with the model on random operation sequences", async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(op, { minLength: 5, maxLength: 40, size: "medium" }), (ops) =>
        run(ops, false),
      ),
      { numRuns: Number(process.env.MODEL_RUNS ?? 60) },
    );
  });

  it("agrees with the model while the store fails one request in five", async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(op, { minLength: 5, maxLength: 30, size: "medium" }), (ops) =>
        run(ops, true),
      ),
      { numRuns: Number(process.env.MODEL_RUNS ?? 30) },
    );
  });
});
