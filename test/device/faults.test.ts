/**
 * Backpressure, retries and integrity, on the in-memory store with fault and delay layers.
 */

import { describe, expect, it } from "vitest";
import { ChunkCorruptError } from "../../src/volume/format.js";
import { FaultStore } from "../../src/store/fault-store.js";
import { StoreError, type ObjectStore, type PutOptions } from "../../src/store/object-store.js";
import { StoreLayer } from "../../src/store/store-layer.js";
import { MemoryStore } from "../../src/store/memory-store.js";
import { superblockKey, encodeSuperblock, newSuperblock } from "../../src/volume/format.js";
import {
  memoryBackend,
  newFilledVolume,
  newTestVolume,
  pattern,
  stackOver,
  currentChunkKey,
} from "../support/volumes.js";
import { openVolume } from "../../src/lifecycle/volume-lifecycle.js";

const CHUNK = 64 * 1024;
const PARAMS = { sizeBytes: 256 * CHUNK, chunkSizeBytes: CHUNK };

/** A store whose PUTs take a while, so that write-back falls behind a writer. */
function slowPuts(inner: ObjectStore, ms: number): ObjectStore {
  return new (class extends StoreLayer {
    override async put(key: string, body: Uint8Array, options?: PutOptions) {
      await new Promise((r) => setTimeout(r, ms));
      return super.put(key, body, options);
    }
  })(inner);
}

describe("backpressure", () => {
  it("completes a burst 32x the dirty bound without ever passing the bound", async () => {
    const volume = await newTestVolume(memoryBackend, "burst", PARAMS);
    const maxDirtyBytes = 4 * CHUNK;
    const device = await volume.open(
      { maxDirtyBytes, concurrency: 2 },
      volume.stack({ wrap: (s) => slowPuts(s, 2) }),
    );
    const sectors = (128 * CHUNK) / 512;
    // Many writers at once, as a queue-depth-16 guest would.
    const writers = Array.from({ length: 16 }, async (_, w) => {
      for (let sector = w * 128; sector < sectors; sector += 16 * 128) {
        expect((await device.write(sector, [pattern(sector + 1, sector, 128)])).ok).toBe(true);
      }
    });
    await Promise.all(writers);
    const stats = device.cacheStats();
    expect(stats.backpressureWaits).toBeGreaterThan(0);
    expect(stats.peakDirtyBytes).toBeLessThanOrEqual(maxDirtyBytes);
    expect((await device.disconnect()).ok).toBe(true);

    const check = await volume.open({ readOnly: true });
    const out = new Uint8Array(128 * 512);
    for (let sector = 0; sector < sectors; sector += 128) {
      expect((await check.read(sector, [out])).ok).toBe(true);
      expect(Buffer.from(out).equals(Buffer.from(pattern(sector + 1, sector, 128)))).toBe(true);
    }
    await check.disconnect();
  });

  it("holds small scattered writes in a few KiB each, and no more dirty chunks than allowed", async () => {
    const volume = await newTestVolume(memoryBackend, "scatter", PARAMS);
    const maxDirtyChunks = 16;
    const device = await volume.open(
      { maxDirtyChunks, concurrency: 2, writebackDelayMs: 60_000 },
      volume.stack({ wrap: (s) => slowPuts(s, 2) }),
    );
    // One 4 KiB write into each of 200 chunks, as random writes from a guest land.
    const chunks = 200;
    const writers = Array.from({ length: 8 }, async (_, w) => {
      for (let c = w; c < chunks; c += 8) {
        const sector = c * (CHUNK / 512) + 16;
        expect((await device.write(sector, [pattern(c + 1, sector, 8)])).ok).toBe(true);
      }
    });
    await Promise.all(writers);
    const stats = device.cacheStats();
    expect(stats.backpressureWaits).toBeGreaterThan(0);
    expect(stats.peakDirtyChunks).toBe(maxDirtyChunks);
    // Each dirty page holds the one span it was written in, not a whole chunk.
    expect(stats.peakDirtyBytes).toBe(maxDirtyChunks * 4096);
    expect(stats.dirtyBytes).toBe(stats.dirtyChunks * 4096);
    expect((await device.disconnect()).ok).toBe(true);

    const check = await volume.open({ readOnly: true });
    const out = new Uint8Array(CHUNK);
    for (let c = 0; c < chunks; c++) {
      expect((await check.read(c * (CHUNK / 512), [out])).ok).toBe(true);
      const expected = Buffer.alloc(CHUNK);
      Buffer.from(pattern(c + 1, c * (CHUNK / 512) + 16, 8)).copy(expected, 16 * 512);
      expect(Buffer.from(out).equals(expected)).toBe(true);
    }
    await check.disconnect();
  });

  it("starts a dirty page empty when its cached chunk would crowd the dirty bound", async () => {
    const volume = await newFilledVolume(memoryBackend, "shed", PARAMS, 1, (8 * CHUNK) / 512);

    const stack = volume.stack();
    const device = await volume.open({ maxDirtyBytes: 4 * CHUNK, writebackDelayMs: 60_000 }, stack);
    const spc = CHUNK / 512;
    const whole = new Uint8Array(CHUNK);
    for (const c of [0, 2, 4, 6, 1, 3, 5, 7]) {
      expect((await device.read(c * spc, [whole])).ok).toBe(true); // all eight cached whole
    }
    stack.counter.reset();
    for (let c = 0; c < 8; c++) {
      expect((await device.write(c * spc + 8, [pattern(2, c * spc + 8, 8)])).ok).toBe(true);
    }
    // Pages stay whole only up to the write-back threshold (half the bound): at most two; the
    // other six start empty, holding their 4 KiB, and no writer waited for room.
    const stats = device.cacheStats();
    expect(stats.dirtyBytes).toBeLessThanOrEqual(2 * CHUNK + 6 * 4096);
    expect(stats.backpressureWaits).toBe(0);
    expect((await device.flush()).ok).toBe(true);
    // The six empty pages fetch their chunk at upload; every page is uploaded once.
    expect(stack.counter.counts()).toMatchObject({ gets: 6, puts: 8 });
    await device.disconnect();

    const check = await volume.open({ readOnly: true });
    const expected = Buffer.from(pattern(1, 0, 8 * spc));
    for (let c = 0; c < 8; c++)
      Buffer.from(pattern(2, c * spc + 8, 8)).copy(expected, (c * spc + 8) * 512);
    const out = new Uint8Array(8 * CHUNK);
    expect((await check.read(0, [out])).ok).toBe(true);
    expect(Buffer.from(out).equals(expected)).toBe(true);
    await check.disconnect();
  });

  it("serves reads of partly written dirty chunks without growing past the dirty bound", async () => {
    const volume = await newFilledVolume(memoryBackend, "dirty-read", PARAMS, 1, (4 * CHUNK) / 512);

    const maxDirtyBytes = 2 * CHUNK;
    const device = await volume.open({ maxDirtyBytes, writebackDelayMs: 60_000 });
    const spc = CHUNK / 512;
    // 4 KiB into each of the stored chunks 0-3, and a whole new chunk 4: 80 KiB of 128 KiB.
    for (let c = 0; c < 4; c++) {
      expect((await device.write(c * spc + 8, [pattern(2, c * spc + 8, 8)])).ok).toBe(true);
    }
    expect((await device.write(4 * spc, [pattern(3, 4 * spc, spc)])).ok).toBe(true);
    expect(device.cacheStats().dirtyBytes).toBe(4 * 4096 + CHUNK);
    // Whole-chunk reads of 0-3 fetch what the pages lack; they cannot all keep it.
    const expected = Buffer.from(pattern(1, 0, 4 * spc));
    for (let c = 0; c < 4; c++)
      Buffer.from(pattern(2, c * spc + 8, 8)).copy(expected, (c * spc + 8) * 512);
    const out = new Uint8Array(4 * CHUNK);
    expect((await device.read(0, [out])).ok).toBe(true);
    expect(Buffer.from(out).equals(expected)).toBe(true);
    expect(device.cacheStats().peakDirtyBytes).toBeLessThanOrEqual(maxDirtyBytes);
    expect((await device.disconnect()).ok).toBe(true);
  });
});

describe("reads of dirty chunks while writes fill the dirty bound", () => {
  it("serve small reads with ranged GETs, not whole chunks they could not keep", async () => {
    const MiB = 1024 * 1024;
    const params = { sizeBytes: 4 * MiB, chunkSizeBytes: MiB };
    const volume = await newFilledVolume(memoryBackend, "amplify", params, 1, (3 * MiB) / 512);
    // Chunk uploads wait at a gate, so the dirty memory stays where the writes put it.
    let open: () => void = () => {};
    const gate = new Promise<void>((resolve) => (open = resolve));
    const stack = volume.stack({
      wrap: (inner) =>
        new Proxy(inner, {
          get(target, prop, receiver) {
            if (prop === "put") {
              return async (...args: Parameters<ObjectStore["put"]>) => {
                if (args[0].includes("/chunks/")) await gate; // not the lease
                return target.put(...args);
              };
            }
            const value = Reflect.get(target, prop, receiver);
            return typeof value === "function" ? value.bind(target) : value;
          },
        }),
    });
    const device = await volume.open({ maxDirtyBytes: 2 * MiB, writebackDelayMs: 60_000 }, stack);
    // Chunks 1-2 rewritten whole and 4 KiB of chunk 0: dirty memory at the bound.
    expect((await device.write(2048, [pattern(2, 2048, 4096 - 8)])).ok).toBe(true);
    expect((await device.write(0, [pattern(2, 0, 8)])).ok).toBe(true);
    stack.counter.reset();
    const out = new Uint8Array(4096);
    for (const kib of [100, 200, 300, 400, 500]) {
      const sector = (kib * 1024) / 512;
      expect((await device.read(sector, [out])).ok).toBe(true);
      expect(Buffer.from(out).equals(Buffer.from(pattern(1, sector, 8)))).toBe(true);
    }
    // Five 64 KiB spans, each fetched once; no whole chunk fetched to be thrown away.
    expect(stack.counter.counts()).toMatchObject({ gets: 5, bytesIn: 5 * 64 * 1024 });
    open();
    expect((await device.disconnect()).ok).toBe(true);
  });
});

describe("writers waiting for room", () => {
  it("are served when the upload that should free room ends with its page written again", async () => {
    const volume = await newTestVolume(memoryBackend, "redirtied", PARAMS);
    const device = await volume.open(
      { maxDirtyChunks: 2, writebackDelayMs: 60_000 },
      volume.stack({ wrap: (s) => slowPuts(s, 50) }),
    );
    const spc = CHUNK / 512;
    expect((await device.write(0, [pattern(1, 0, 8)])).ok).toBe(true);
    expect((await device.write(spc, [pattern(1, spc, 8)])).ok).toBe(true);
    // A third chunk must wait: the cache starts uploading chunk 0 to make room.
    const third = device.write(2 * spc, [pattern(1, 2 * spc, 8)]);
    await new Promise((r) => setTimeout(r, 10));
    // Chunk 0 is written again while its upload is in flight: that upload frees nothing.
    expect((await device.write(8, [pattern(2, 8, 8)])).ok).toBe(true);
    // The write-back timer is a minute away; the waiting writer must not depend on it.
    const outcome = await Promise.race([
      third.then((r) => (r.ok ? "written" : "failed")),
      new Promise((r) => setTimeout(() => r("still waiting after 10 s"), 10_000)),
    ]);
    expect(outcome).toBe("written");
    expect((await device.disconnect()).ok).toBe(true);
  });
});

describe("retries", () => {
  it("rides through transient failures invisibly", async () => {
    const volume = await newTestVolume(memoryBackend, "transient", PARAMS);
    let fault: FaultStore | undefined;
    const stack = volume.stack({ wrap: (s) => (fault = new FaultStore(s)) });
    const device = await volume.open({ writebackDelayMs: 60_000 }, stack);
    stack.counter.reset(); // the lease's PUT at open is not what this test counts
    fault?.inject({ operations: ["put"], times: 3 });
    fault?.inject({ operations: ["get"], times: 2 });
    expect((await device.write(0, [pattern(1, 0, 256)])).ok).toBe(true);
    expect((await device.flush()).ok).toBe(true);
    // Three attempts failed in the fault layer; then each of the two chunks reached the store.
    expect(fault?.injected).toBe(3);
    expect(stack.counter.counts().puts).toBe(2);
    await device.disconnect();

    const again = await volume.open({}, volume.stack({ wrap: (s) => (fault = new FaultStore(s)) }));
    fault?.inject({ operations: ["get"], times: 2 });
    const out = new Uint8Array(256 * 512);
    expect((await again.read(0, [out])).ok).toBe(true);
    expect(fault?.injected).toBe(2);
    expect(Buffer.from(out).equals(Buffer.from(pattern(1, 0, 256)))).toBe(true);
    await again.disconnect();
  });

  it("keeps data dirty when retries are exhausted, and a later flush lands it", async () => {
    const volume = await newTestVolume(memoryBackend, "outage", PARAMS);
    let fault: FaultStore | undefined;
    const stack = volume.stack({
      wrap: (s) => (fault = new FaultStore(s)),
      retry: { maxAttempts: 3, baseDelayMs: 1 },
    });
    const device = await volume.open({ writebackDelayMs: 60_000 }, stack);
    stack.counter.reset();
    const data = pattern(2, 100, 300);
    expect((await device.write(100, [data])).ok).toBe(true);
    fault?.outage();
    const failed = await device.flush();
    expect(failed.ok).toBe(false);
    if (!failed.ok) {
      expect(failed.error.kind).toBe("Io");
      expect(String((failed.error as { cause: Error }).cause.message)).toMatch(
        /gave up after 3 attempts/,
      );
    }
    // Four chunks, three attempts each, none reached the store.
    expect(fault?.injected).toBe(12);
    expect(stack.counter.counts().puts).toBe(0);
    expect(device.cacheStats().dirtyBytes).toBeGreaterThan(0);
    // Reads of the dirty data still work during the outage.
    const out = new Uint8Array(data.length);
    expect((await device.read(100, [out])).ok).toBe(true);
    expect(Buffer.from(out).equals(Buffer.from(data))).toBe(true);

    fault?.heal();
    expect((await device.flush()).ok).toBe(true);
    expect(device.cacheStats().dirtyBytes).toBe(0);
    await device.disconnect();
    const again = await volume.open();
    expect((await again.read(100, [out])).ok).toBe(true);
    expect(Buffer.from(out).equals(Buffer.from(data))).toBe(true);
    await again.disconnect();
  });

  it("lets a flush that joined an upload begun before recovery try once more", async () => {
    // The first chunk PUT is held, then refused the way the lease's fence refuses a write that
    // was admitted before a renewal came back: it is not retried below the cache.
    let release: () => void = () => {};
    const held = new Promise<void>((resolve) => (release = resolve));
    let holding = false;
    class RefuseFirstPut extends StoreLayer {
      override async put(key: string, body: Uint8Array, options?: PutOptions) {
        if (!holding && key.includes("chunks/")) {
          holding = true;
          await held;
          throw new StoreError("Fenced", "refused: the lease was not renewed in time");
        }
        return super.put(key, body, options);
      }
    }
    const volume = await newTestVolume(memoryBackend, "joined", PARAMS);
    const device = await volume.open(
      { writebackDelayMs: 1 },
      volume.stack({ wrap: (s) => new RefuseFirstPut(s) }),
    );
    const data = pattern(5, 0, CHUNK / 512);
    expect((await device.write(0, [data])).ok).toBe(true);
    while (!holding) await new Promise((r) => setTimeout(r, 1));
    // The flush joins the upload in flight; that upload then fails.
    const flushed = device.flush();
    release();
    expect(await flushed).toEqual({ ok: true, value: undefined });
    await device.disconnect();
    const again = await volume.open({ readOnly: true });
    const out = new Uint8Array(data.length);
    expect((await again.read(0, [out])).ok).toBe(true);
    expect(Buffer.from(out).equals(Buffer.from(data))).toBe(true);
    await again.disconnect();
  });

  it("does not retry a permanent failure", async () => {
    const volume = await newTestVolume(memoryBackend, "permanent", PARAMS);
    let fault: FaultStore | undefined;
    const stack = volume.stack({ wrap: (s) => (fault = new FaultStore(s)) });
    const device = await volume.open({ writebackDelayMs: 60_000 }, stack);
    fault?.inject({ operations: ["put"], code: "AccessDenied" });
    expect((await device.write(0, [pattern(3, 0, 1)])).ok).toBe(true);
    expect((await device.flush()).ok).toBe(false);
    expect(fault?.injected).toBe(1);
    await device.abort();
  });
});

describe("integrity", () => {
  async function storedVolume() {
    const store = new MemoryStore();
    const superblock = newSuperblock(PARAMS);
    await store.put(superblockKey(""), encodeSuperblock(superblock));
    const writer = await openVolume(stackOver(store));
    expect((await writer.write(0, [pattern(4, 0, (3 * CHUNK) / 512)])).ok).toBe(true);
    await writer.disconnect();
    return store;
  }

  async function readError(store: MemoryStore, sector: number, sectors = 8): Promise<Error> {
    const device = await openVolume(stackOver(store), { wholeChunkReadBytes: CHUNK });
    const result = await device.read(sector, [new Uint8Array(sectors * 512)]);
    await device.disconnect();
    expect(result.ok).toBe(false);
    if (result.ok || result.error.kind !== "Io") throw new Error("expected an I/O error");
    return result.error.cause;
  }

  it("reports a flipped bit as an I/O error naming the chunk", async () => {
    const store = await storedVolume();
    store.corrupt(await currentChunkKey(store, "", 1), (b) => {
      b[5000] = (b[5000] ?? 0) ^ 0x10;
      return b;
    });
    const cause = await readError(store, (CHUNK + 4096) / 512);
    expect(cause).toBeInstanceOf(ChunkCorruptError);
    expect(cause.message).toMatch(
      /chunks\/0000000000000001.*checksum mismatch in bytes 4096\.\.8192/,
    );
    // The untouched chunks still read.
    const device = await openVolume(stackOver(store));
    expect((await device.read(0, [new Uint8Array(CHUNK)])).ok).toBe(true);
    await device.disconnect();
  });

  it("reports a truncated object", async () => {
    const store = await storedVolume();
    store.corrupt(await currentChunkKey(store, "", 0), (b) => b.subarray(0, 1000));
    expect((await readError(store, 0)).message).toMatch(/truncated/);
  });

  it("reports an object copied under another chunk's key", async () => {
    const store = await storedVolume();
    const other = await store.get(await currentChunkKey(store, "", 0));
    if (other === undefined) throw new Error("missing chunk");
    await store.put(await currentChunkKey(store, "", 2), other.body, { metadata: other.metadata });
    expect((await readError(store, (2 * CHUNK) / 512)).message).toMatch(/wrong key/);
  });

  it("reports a foreign object under a chunk key", async () => {
    const store = await storedVolume();
    await store.put(await currentChunkKey(store, "", 1), new Uint8Array(CHUNK).fill(7));
    expect((await readError(store, CHUNK / 512)).message).toMatch(/no s3blk metadata/);
  });

  it("refuses a superblock of a newer format, naming the version", async () => {
    const store = new MemoryStore();
    const superblock = { ...newSuperblock(PARAMS), formatVersion: 4 };
    await store.put(superblockKey(""), encodeSuperblock(superblock));
    await expect(openVolume(stackOver(store))).rejects.toThrow(
      /format version 4.*reads versions 1, 2 and 3 only \(upgrade s3blk\)/,
    );
  });
});
