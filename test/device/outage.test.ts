/**
 * S3 faults through a real proxy in front of the real S3 server: retries ride through transient
 * faults invisibly, and an outage longer than the retry budget fails flushes (never reporting
 * success), keeps reads of cached data working and dirty data in memory within its bound, and
 * loses nothing once S3 is back.
 */

import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { ChunkedBlockDevice } from "../../src/device/chunked-block-device.js";
import { FaultProxy } from "../support/fault-proxy.js";
import { requireS3 } from "../support/s3-target.js";
import {
  currentChunkKey,
  newTestVolume,
  pattern,
  s3Backend,
  type TestVolume,
} from "../support/volumes.js";

const CHUNK = 256 * 1024;
const CHUNKS = 32;
const SPC = CHUNK / 512;
const PARAMS = { sizeBytes: CHUNKS * CHUNK, chunkSizeBytes: CHUNK };
/**
 * The retry budget of these tests: 4 attempts, waits of at most 100 ms, and time enough to
 * retry a request that timed out (2 s).
 */
const RETRY = { maxAttempts: 4, baseDelayMs: 20, maxDelayMs: 100, budgetMs: 5_000 };

const s3 = await requireS3("S3 fault suite (fault proxy in front of S3)");

describe.skipIf(s3 === undefined)("S3 faults through a proxy", () => {
  let proxy: FaultProxy;
  beforeAll(async () => {
    proxy = await FaultProxy.start(s3?.endpoint ?? "");
  });
  afterAll(async () => {
    await proxy?.stop();
  });

  async function openThroughProxy(label: string, options = {}, retry = RETRY) {
    const base = s3Backend(s3 ?? (undefined as never));
    const volume: TestVolume = await newTestVolume(base, label, PARAMS);
    const stack = volume.stack({ endpoint: proxy.endpoint, retry, requestTimeoutMs: 2_000 });
    const device = await volume.open({ writebackDelayMs: 60_000, ...options }, stack);
    return { volume, stack, device };
  }

  /** A model of what the device must hold: one value per sector. */
  class Model {
    readonly values = new Int32Array(CHUNKS * SPC);
    write(sector: number, sectors: number, value: number) {
      this.values.fill(value, sector, sector + sectors);
    }
    async verify(device: ChunkedBlockDevice): Promise<number> {
      const all = new Uint8Array(CHUNKS * CHUNK);
      expect((await device.read(0, [all])).ok).toBe(true);
      for (let s = 0; s < this.values.length; s++) {
        const value = this.values[s] ?? 0;
        const want = value === 0 ? new Uint8Array(512) : pattern(value, s, 1);
        const got = all.subarray(s * 512, (s + 1) * 512);
        if (!Buffer.from(got).equals(Buffer.from(want)))
          throw new Error(`sector ${s} differs from the model`);
      }
      return all.length;
    }
  }

  it("rides through 500s, SlowDowns, resets and stalls without an error reaching the caller", async () => {
    // A quarter of all requests fail here: with 4 attempts, one request in 250 would exhaust its
    // retries, so this test gives each request 12 (one in 17 million).
    const { volume, device } = await openThroughProxy(
      "transient",
      {},
      { ...RETRY, maxAttempts: 12 },
    );
    const model = new Model();
    const injectedBefore = proxy.totalInjected();
    proxy.inject({ kind: "500", probability: 0.1 });
    proxy.inject({ kind: "503", probability: 0.1 });
    proxy.inject({ kind: "reset", probability: 0.05 });
    let value = 1;
    for (let round = 0; round < 6; round++) {
      for (let i = 0; i < 12; i++) {
        const sector = ((round * 37 + i * 101) % (CHUNKS * SPC - 64)) & ~7;
        const written = await device.write(sector, [pattern(value, sector, 64)]);
        if (!written.ok) console.log("WRITE FAILED", written.error);
        expect(written.ok).toBe(true);
        model.write(sector, 64, value++);
      }
      const flushed = await device.flush();
      if (!flushed.ok) console.log("FLUSH FAILED", flushed.error);
      expect(flushed.ok).toBe(true);
    }
    proxy.heal();
    const injected = proxy.totalInjected() - injectedBefore;
    expect(injected).toBeGreaterThan(0);
    await device.disconnect();
    const again = await volume.open({ readOnly: true });
    const bytes = await model.verify(again);
    await again.disconnect();
    console.log(`transient faults: ${injected} injected, ${bytes} bytes verified after reopen`);
  });

  it("fails flushes during an outage longer than the retry budget, then loses nothing", async () => {
    const maxDirtyBytes = 6 * CHUNK;
    const { volume, device } = await openThroughProxy("outage", {
      maxDirtyBytes,
      cacheBytes: 64 * CHUNK,
    });
    const model = new Model();
    let value = 1;
    const write = async (sector: number, sectors: number) => {
      const result = await device.write(sector, [pattern(value, sector, sectors)]);
      if (result.ok) model.write(sector, sectors, value);
      value++;
      return result;
    };
    // A VM-like start: the first chunks written and flushed, then read back into the cache.
    for (let c = 0; c < 4; c++) expect((await write(c * SPC, SPC)).ok).toBe(true);
    expect((await device.flush()).ok).toBe(true);
    expect((await device.read(0, [new Uint8Array(4 * CHUNK)])).ok).toBe(true);

    const injectedBefore = proxy.totalInjected();
    proxy.outage();
    // Partial writes into new chunks: acknowledged from memory (a few KiB each).
    const acknowledged: number[] = [];
    for (let c = 4; c < 4 + 6; c++) if ((await write(c * SPC + 8, 16)).ok) acknowledged.push(c);
    expect(acknowledged).toHaveLength(6);
    const flush = await device.flush();
    expect(flush.ok).toBe(false);
    if (!flush.ok) expect(flush.error.kind).toBe("Io");
    // Whole chunks until the dirty memory bound: then a write fails rather than grow memory.
    let refusedAt: number | undefined;
    for (let c = 10; c < 10 + 8 && refusedAt === undefined; c++) {
      if ((await write(c * SPC, SPC)).ok) acknowledged.push(c);
      else refusedAt = c;
    }
    // 6 partial chunks hold 48 KiB, so 5 whole ones fit in the 6-chunk bound and the 6th cannot.
    expect(refusedAt).toBe(15);
    expect(device.cacheStats().peakDirtyBytes).toBeLessThanOrEqual(maxDirtyBytes);
    // Reads of cached data still work, and see the acknowledged writes.
    const cached = new Uint8Array(CHUNK);
    expect((await device.read(0, [cached])).ok).toBe(true);
    expect(Buffer.from(cached).equals(Buffer.from(pattern(1, 0, SPC)))).toBe(true);
    await new Promise((r) => setTimeout(r, 3 * RETRY.maxDelayMs * RETRY.maxAttempts));
    expect((await device.flush()).ok).toBe(false);
    const injected = proxy.totalInjected() - injectedBefore;

    proxy.heal();
    expect((await device.flush()).ok).toBe(true);
    expect(device.cacheStats().dirtyBytes).toBe(0);
    expect((await device.disconnect()).ok).toBe(true);
    const again = await volume.open({ readOnly: true });
    const bytes = await model.verify(again);
    await again.disconnect();
    console.log(
      `outage: ${injected} requests failed, ${acknowledged.length} chunks written during it, ` +
        `${bytes} bytes verified after reopen`,
    );
  });

  it("times out a stalled request and retries it", async () => {
    const { device } = await openThroughProxy("stall");
    const forwarded = proxy.counts.forwarded;
    // Stalled for longer than the test may run: only the request timeout (2 s here) can save it.
    proxy.inject({
      kind: "stall",
      methods: ["PUT"],
      pathIncludes: "/chunks/",
      times: 1,
      stallMs: 300_000,
    });
    expect((await device.write(0, [pattern(9, 0, 8)])).ok).toBe(true);
    expect((await device.flush()).ok).toBe(true);
    expect(proxy.counts.injected.stall).toBe(1);
    expect(proxy.counts.forwarded).toBeGreaterThan(forwarded); // the retry went through
    await device.disconnect();
  });

  it("reports corrupt objects in the bucket as I/O errors naming the chunk", async () => {
    const base = s3Backend(s3 ?? (undefined as never));
    const volume = await newTestVolume(base, "corrupt", PARAMS);
    const writer = await volume.open();
    expect((await writer.write(0, [pattern(5, 0, 4 * SPC)])).ok).toBe(true);
    await writer.disconnect();
    const stack = volume.stack();
    const keys = await Promise.all(
      [0, 1, 2].map((i) => currentChunkKey(stack.store, stack.prefix, i)),
    );
    const key = (i: number) => keys[i] ?? "";
    const original = await stack.store.get(key(0));
    if (original === undefined) throw new Error("chunk 0 missing");
    const flipped = Buffer.from(original.body);
    flipped[70_000] = (flipped[70_000] ?? 0) ^ 0x01;
    await stack.store.put(key(0), flipped, { metadata: original.metadata });
    const second = await stack.store.get(key(1));
    if (second === undefined) throw new Error("chunk 1 missing");
    await stack.store.put(key(1), Buffer.from(second.body).subarray(0, 1000), {
      metadata: second.metadata,
    });
    await stack.store.put(key(2), new Uint8Array(CHUNK).fill(9));
    const expectations: [number, RegExp][] = [
      [0, /chunks\/0000000000000000\.[0-9a-f]{20} is corrupt: checksum mismatch/],
      [1, /chunks\/0000000000000001\.[0-9a-f]{20} is corrupt: it is 1000 bytes/],
      [2, /chunks\/0000000000000002\.[0-9a-f]{20} is corrupt: it has no s3blk metadata/],
    ];
    const reader = await volume.open({ readOnly: true });
    for (const [chunk, message] of expectations) {
      const result = await reader.read(chunk * SPC, [new Uint8Array(CHUNK)]);
      expect(result.ok).toBe(false);
      if (!result.ok && result.error.kind === "Io")
        expect(result.error.cause.message).toMatch(message);
    }
    // The intact chunk still reads.
    const out = new Uint8Array(CHUNK);
    expect((await reader.read(3 * SPC, [out])).ok).toBe(true);
    expect(Buffer.from(out).equals(Buffer.from(pattern(5, 3 * SPC, SPC)))).toBe(true);
    await reader.disconnect();
    await stack.store.close();
  });
});
