/**
 * The fetch and read-ahead policy: alone (which reads are sequential, how the window grows,
 * its bounds), and in a device over a store that records every chunk GET (each chunk fetched
 * once, read-ahead bounded in requests in flight, the guest's reads sent before queued
 * read-ahead, short scattered runs fetched without read-ahead).
 */

import { describe, expect, it, vi } from "vitest";
import { defaultReadPolicySettings, ReadPolicy } from "../../src/cache/read-policy.js";
import { createVolume, openVolume } from "../../src/lifecycle/volume-lifecycle.js";
import { MemoryStore } from "../../src/store/memory-store.js";
import type { GetOptions, GetResult } from "../../src/store/object-store.js";
import { StoreLayer } from "../../src/store/store-layer.js";
import { pattern, stackOver } from "../support/volumes.js";

const MiB = 1024 * 1024;

describe("read policy", () => {
  const policy = (overrides = {}) =>
    new ReadPolicy({ ...defaultReadPolicySettings(MiB), ...overrides });

  it("keeps random 4 KiB reads ranged, one aligned 64 KiB span each, with no read-ahead", () => {
    const p = policy();
    for (const offset of [5 * MiB + 4096, 77 * MiB, 3 * MiB + 123 * 4096, 900 * MiB]) {
      const plan = p.onRead(offset, 4096, 1024);
      expect(plan).toEqual({ sequential: false, readahead: [] });
      const within = offset % MiB;
      expect(p.wantsWhole(plan.sequential, within, within + 4096)).toBe(false);
      const span = p.rangedSpan(within, within + 4096, 4096);
      expect(span.endBytes - span.startBytes).toBe(64 * 1024);
      expect(span.startBytes % (64 * 1024)).toBe(0);
    }
    // A guest's 128 KiB read-ahead fetches four times that; nothing more than 512 KiB is ranged.
    expect(p.rangedSpan(300 * 1024, 428 * 1024, 128 * 1024)).toEqual({
      startBytes: 0,
      endBytes: 512 * 1024,
    });
    expect(p.rangedSpan(500 * 1024, 628 * 1024, 128 * 1024)).toEqual({
      startBytes: 0,
      endBytes: 1024 * 1024,
    });
    expect(p.rangedSpan(4096, 8192, 128 * 1024)).toEqual({ startBytes: 0, endBytes: 512 * 1024 });
    expect(p.rangedSpan(4096, 8192, 4 * MiB)).toEqual({ startBytes: 0, endBytes: 512 * 1024 });
    // A large miss fetches the whole chunk; a chunk's second small miss no longer does.
    expect(p.wantsWhole(false, 0, MiB / 4)).toBe(true);
    expect(p.wantsWhole(false, 0, 4096)).toBe(false);
  });

  it("reads ahead of a long stream in a window that grows to its bound, each chunk once", () => {
    const p = policy({ readaheadMaxBytes: 16 * MiB, maxReadaheadRequests: 1000 });
    const issued: number[] = [];
    const windows: number[] = [];
    for (let offset = 0; offset < 200 * MiB; offset += 256 * 1024) {
      const plan = p.onRead(offset, 256 * 1024, 1024);
      expect(plan.sequential).toBe(offset + 256 * 1024 >= MiB);
      issued.push(...plan.readahead);
      const end = offset + 256 * 1024;
      if (plan.sequential && end % MiB === 0) windows.push(Math.max(...issued, 0) + 1 - end / MiB);
      for (let i = 0; i < plan.readahead.length; i++) p.readaheadStarted();
      for (let i = 0; i < plan.readahead.length; i++) p.readaheadEnded();
    }
    expect(new Set(issued).size).toBe(issued.length);
    expect(issued[0]).toBe(1);
    // The first window: two chunks past the read that made the stream sequential.
    expect(windows[0]).toBe(2);
    // The window widened, and never past its bound.
    expect(Math.max(...windows)).toBe(16);
    expect(windows.at(-1)).toBe(16);
    // It never runs past the volume.
    expect(Math.max(...issued)).toBeLessThan(1024);
  });

  it("bounds read-ahead in flight over all streams, and tells streams apart", () => {
    const p = policy({ maxReadaheadRequests: 5 });
    let inFlight = 0;
    for (let step = 0; step < 40; step++) {
      for (const base of [0, 500 * MiB]) {
        const plan = p.onRead(base + step * MiB, MiB, 1024);
        expect(plan.sequential).toBe(true);
        for (let i = 0; i < plan.readahead.length; i++) p.readaheadStarted();
        inFlight += plan.readahead.length;
        expect(p.readaheadInFlight).toBe(inFlight);
        expect(inFlight).toBeLessThanOrEqual(5);
      }
      // One fetch completes per step.
      if (inFlight > 0) {
        p.readaheadEnded();
        inFlight--;
      }
    }
  });
});

/** Records chunk GETs, and holds them while `held` until `release`. */
class RecordingStore extends StoreLayer {
  readonly gets: { chunk: number; lengthBytes: number | undefined }[] = [];
  inFlight = 0;
  maxInFlight = 0;
  held = false;
  #waiting: (() => void)[] = [];

  override async get(key: string, options?: GetOptions): Promise<GetResult | undefined> {
    const chunk = /(?:^|\/)chunks\/([0-9a-f]+)/.exec(key)?.[1];
    if (chunk === undefined) return super.get(key, options);
    this.gets.push({ chunk: parseInt(chunk, 16), lengthBytes: options?.range?.lengthBytes });
    this.inFlight++;
    this.maxInFlight = Math.max(this.maxInFlight, this.inFlight);
    try {
      if (this.held) await new Promise<void>((resolve) => this.#waiting.push(resolve));
      await new Promise((resolve) => setTimeout(resolve, 1));
      return await super.get(key, options);
    } finally {
      this.inFlight--;
    }
  }

  release(): void {
    this.held = false;
    for (const go of this.#waiting.splice(0)) go();
  }
}

const CHUNK = 256 * 1024;
const CHUNKS = 64;

async function filledVolume(store: RecordingStore) {
  const stack = stackOver(store);
  await createVolume(stack, { sizeBytes: CHUNKS * CHUNK, chunkSizeBytes: CHUNK });
  const writer = await openVolume(stack);
  expect((await writer.write(0, [pattern(7, 0, (CHUNKS * CHUNK) / 512)])).ok).toBe(true);
  expect((await writer.disconnect()).ok).toBe(true);
  return stack;
}

describe("read-ahead in the device", () => {
  it("fetches each chunk of a sequential read once, ahead, within its request bound", async () => {
    const store = new RecordingStore(new MemoryStore());
    const stack = await filledVolume(store);
    const device = await openVolume(stack, {
      readOnly: true,
      readPolicy: { maxReadaheadRequests: 3 },
    });
    store.gets.length = 0;
    const out = new Uint8Array(64 * 1024);
    for (let sector = 0; sector < (CHUNKS * CHUNK) / 512; sector += 128) {
      expect((await device.read(sector, [out])).ok).toBe(true);
      expect(Buffer.from(out).equals(Buffer.from(pattern(7, sector, 128)))).toBe(true);
    }
    const chunks = store.gets.map((g) => g.chunk);
    // The first chunk's first misses are ranged; every later chunk is one whole GET.
    const later = store.gets.filter((g) => g.chunk > 0);
    expect(later.every((g) => g.lengthBytes === undefined)).toBe(true);
    expect(new Set(later.map((g) => g.chunk)).size).toBe(later.length);
    expect(new Set(chunks).size).toBe(CHUNKS);
    // One guest read at a time, yet GETs overlapped: read-ahead, at most 3 of it at once.
    expect(store.maxInFlight).toBeGreaterThan(1);
    expect(store.maxInFlight).toBeLessThanOrEqual(3 + 1);
    await device.disconnect();
  });

  it("sends the guest's reads before queued read-ahead", async () => {
    const store = new RecordingStore(new MemoryStore());
    const stack = await filledVolume(store);
    const device = await openVolume(stack, {
      readOnly: true,
      concurrency: 1,
      readPolicy: { maxReadaheadRequests: 16, readaheadMinBytes: 16 * CHUNK },
    });
    const out = new Uint8Array(CHUNK);
    for (let i = 0; i < 3; i++) expect((await device.read((i * CHUNK) / 512, [out])).ok).toBe(true);
    store.held = true;
    store.gets.length = 0;
    // The read of chunk 3 makes the stream sequential: its GET is sent (and held), and
    // read-ahead of chunks 4 to 19 is queued behind it. Then the stream's next read needs
    // chunk 4, whose read-ahead is promoted, and a random read needs chunk 50.
    const third = device.read((3 * CHUNK) / 512, [new Uint8Array(CHUNK)]);
    const next = device.read((4 * CHUNK) / 512, [new Uint8Array(CHUNK)]);
    const random = device.read((50 * CHUNK) / 512 + 8, [new Uint8Array(4096)]);
    await new Promise((resolve) => setTimeout(resolve, 20));
    expect(store.gets.map((g) => g.chunk)).toEqual([3]);
    store.release();
    expect((await third).ok && (await next).ok && (await random).ok).toBe(true);
    const order = store.gets.map((g) => g.chunk);
    expect(order.slice(0, 3)).toEqual([3, 4, 50]);
    // Then the rest of the read-ahead, in order.
    await vi.waitFor(() => expect(store.gets.length).toBeGreaterThanOrEqual(6));
    expect(store.gets.slice(3, 6).map((g) => g.chunk)).toEqual([5, 6, 7]);
    await device.disconnect();
  });

  it("serves concurrent small misses in one span with one ranged GET", async () => {
    const store = new RecordingStore(new MemoryStore());
    const stack = await filledVolume(store);
    const device = await openVolume(stack, { readOnly: true });
    store.gets.length = 0;
    const outs = [0, 8, 16, 120].map(() => new Uint8Array(4096));
    const results = await Promise.all(
      [0, 8, 16, 120].map((sector, i) => device.read(CHUNK / 512 + sector, [outs[i]!])),
    );
    expect(results.every((r) => r.ok)).toBe(true);
    [0, 8, 16, 120].forEach((sector, i) =>
      expect(Buffer.from(outs[i]!).equals(Buffer.from(pattern(7, CHUNK / 512 + sector, 8)))).toBe(
        true,
      ),
    );
    expect(store.gets).toEqual([{ chunk: 1, lengthBytes: 64 * 1024 }]);
    await device.disconnect();
  });

  it("fetches short scattered runs without read-ahead, under twice what was read", async () => {
    const store = new RecordingStore(new MemoryStore());
    const stack = await filledVolume(store);
    const device = await openVolume(stack, { readOnly: true });
    store.gets.length = 0;
    let asked = 0;
    // A boot's shape: runs of 2-4 reads of 16-64 KiB, scattered over the disk.
    for (let run = 0; run < 20; run++) {
      let sector = ((run * 37) % CHUNKS) * (CHUNK / 512) + (run % 3) * 64;
      for (let i = 0; i < 2 + (run % 3); i++) {
        const sectors = 32 << (run % 3);
        expect((await device.read(sector, [new Uint8Array(sectors * 512)])).ok).toBe(true);
        sector += sectors;
        asked += sectors * 512;
      }
    }
    const fetched = store.gets.reduce((n, g) => n + (g.lengthBytes ?? CHUNK), 0);
    expect(fetched).toBeLessThanOrEqual(2 * asked);
    await device.disconnect();
  });
});
