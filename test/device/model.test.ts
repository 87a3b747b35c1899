/**
 * Model-based property test: random sequences of write, read, flush, discard, close-and-reopen,
 * crash-and-reopen, snapshot, snapshot deletion and rollback against the device and a plain
 * in-memory model, which keeps a copy of every snapshot: each one that still exists must read
 * exactly as its copy at the end.
 *
 * The model tracks, per sector, what the device must return now, what the store holds for
 * certain (as of the last flush), and which values written since might have reached the store
 * through background write-back. After a close the device must hold everything; after a crash
 * each sector must hold its flushed value or one written since, never anything else.
 */

import fc from "fast-check";
import { describe, expect, it } from "vitest";
import type { ChunkedBlockDevice } from "../../src/device/chunked-block-device.js";
import { FaultStore } from "../../src/store/fault-store.js";
import { deleteSnapshot, rollbackVolume } from "../../src/lifecycle/snapshot-lifecycle.js";
import {
  memoryBackend,
  newTestVolume,
  pattern,
  sectorValue,
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
  | { kind: "rollback"; pick: number };

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
);

/** A sector's value: 0 is zeros, n > 0 is pattern(n, sector). */
class Model {
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

  /** Every snapshot that exists, by name: the sectors' values when it was taken. */
  readonly snapshots = new Map<string, Int32Array>();
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
  const volume = await newTestVolume(memoryBackend, "model", {
    sizeBytes: SIZE_SECTORS * SECTOR,
    chunkSizeBytes: CHUNK,
  });
  let fault: FaultStore | undefined;
  const open = () => {
    const stack = volume.stack({
      wrap: (store) => {
        fault = new FaultStore(store, { random: mulberry(ops.length) });
        if (faults) fault.inject({ probability: 0.2, operations: ["get", "put", "delete"] });
        return fault;
      },
      retry: { baseDelayMs: 0, maxAttempts: 50 },
    });
    return volume.open(
      {
        cacheBytes: 2 * CHUNK,
        maxDirtyBytes: 3 * CHUNK,
        writebackDelayMs: 2,
        wholeChunkReadBytes: CHUNK / 2,
        minRangedReadBytes: 4096,
        // A crash here is simulated in this very process, which a lease cannot tell from a
        // live holder; the lease has its own tests.
        lease: false,
      },
      stack,
    );
  };
  const model = new Model();
  let device: ChunkedBlockDevice = await open();
  let seed = 1;
  for (const o of ops) {
    switch (o.kind) {
      case "write": {
        const value = seed++;
        const data = pattern(value, o.sector, o.sectors);
        const result = await device.write(o.sector, splitSectors(data, o.splits), { fua: o.fua });
        expect(result.ok).toBe(true);
        model.set(o.sector, o.sectors, value, o.fua);
        break;
      }
      case "read": {
        const out = new Uint8Array(o.sectors * SECTOR);
        expect((await device.read(o.sector, [out])).ok).toBe(true);
        for (let s = 0; s < o.sectors; s++) {
          const got = out.subarray(s * SECTOR, (s + 1) * SECTOR);
          const want = model.current[o.sector + s] ?? -1;
          expect(sectorValue(got, o.sector + s, [want]), `sector ${o.sector + s}`).toBe(want);
        }
        break;
      }
      case "discard":
        expect((await device.discard(o.sector, o.sectors)).ok).toBe(true);
        model.set(o.sector, o.sectors, 0, false);
        break;
      case "flush":
        expect((await device.flush()).ok).toBe(true);
        model.flushed();
        break;
      case "reopen":
        expect((await device.disconnect()).ok).toBe(true);
        model.flushed();
        device = await open();
        break;
      case "snapshot": {
        const name = `s${seed++}`;
        expect((await device.snapshot(name)).ok).toBe(true);
        model.snapshots.set(name, Int32Array.from(model.current));
        model.flushed(); // a snapshot flushes
        break;
      }
      case "deleteSnapshot": {
        const name = [...model.snapshots.keys()][o.pick % Math.max(1, model.snapshots.size)];
        if (name === undefined) break;
        await deleteSnapshot(volume.stack(), name);
        model.snapshots.delete(name);
        break;
      }
      case "rollback": {
        const name = [...model.snapshots.keys()][o.pick % Math.max(1, model.snapshots.size)];
        if (name === undefined) break;
        expect((await device.disconnect()).ok).toBe(true);
        await rollbackVolume(volume.stack(), name, { lease: false });
        model.current = Int32Array.from(model.snapshots.get(name) ?? []);
        model.flushed();
        device = await open();
        break;
      }
      case "crash": {
        await device.abort();
        device = await open();
        const all = new Uint8Array(SIZE_SECTORS * SECTOR);
        expect((await device.read(0, [all])).ok).toBe(true);
        for (let s = 0; s < SIZE_SECTORS; s++) {
          const candidates = [model.durable[s] ?? 0, ...(model.since[s] ?? [])];
          const got = sectorValue(all.subarray(s * SECTOR, (s + 1) * SECTOR), s, candidates);
          expect(got, `sector ${s} after crash: not one of ${candidates.join(",")}`).toBeDefined();
          model.current[s] = got ?? 0;
        }
        model.flushed();
        break;
      }
    }
  }
  // Whatever the sequence, a final close and reopen returns the model exactly.
  expect((await device.disconnect()).ok).toBe(true);
  device = await open();
  const all = new Uint8Array(SIZE_SECTORS * SECTOR);
  expect((await device.read(0, [all])).ok).toBe(true);
  for (let s = 0; s < SIZE_SECTORS; s++) {
    const want = model.current[s] ?? -1;
    expect(
      sectorValue(all.subarray(s * SECTOR, (s + 1) * SECTOR), s, [want]),
      `final sector ${s}`,
    ).toBe(want);
  }
  expect((await device.disconnect()).ok).toBe(true);
  for (const [name, want] of model.snapshots) {
    const snapshot = await volume.open({ snapshot: name });
    await expectReads(snapshot, want, `snapshot ${name}`);
    await snapshot.disconnect();
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
      fc.asyncProperty(fc.array(op, { minLength: 1, maxLength: 40 }), (ops) => run(ops, false)),
      { numRuns: Number(process.env.MODEL_RUNS ?? 60) },
    );
  });

  it("agrees with the model while the store fails one request in five", async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(op, { minLength: 1, maxLength: 30 }), (ops) => run(ops, true)),
      { numRuns: Number(process.env.MODEL_RUNS ?? 30) },
    );
  });
});
