/**
 * One writer at a time: the lease. Runs on memory and on S3 (RGW honours If-None-Match and
 * If-Match with bare entity tags).
 */

import { spawnSync } from "node:child_process";
import os from "node:os";
import { readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { FaultStore } from "../../src/store/fault-store.js";
import {
  Lease,
  leaseKey,
  LeaseHeldError,
  leaseTiming,
  LeaseTimingError,
  type LeaseRecord,
} from "../../src/volume/lease.js";
import { Fence } from "../../src/store/fenced-store.js";
import { openVolume } from "../../src/lifecycle/volume-lifecycle.js";
import { MemoryStore } from "../../src/store/memory-store.js";
import { StoreError, type PutOptions } from "../../src/store/object-store.js";
import { StoreLayer } from "../../src/store/store-layer.js";
import type { Clock } from "../../src/util/clock.js";
import { requireS3 } from "../support/s3-target.js";
import {
  memoryBackend,
  newTestVolume,
  pattern,
  s3Backend,
  type Backend,
  chunkObjectKeys,
} from "../support/volumes.js";

const CHUNK = 64 * 1024;
const PARAMS = { sizeBytes: 16 * CHUNK, chunkSizeBytes: CHUNK };
/**
 * Short leases so the tests see expiry and renewal in seconds, yet long enough that a loaded
 * machine still refuses a second writer before the first one's lease runs out.
 */
const SHORT = { durationMs: 3000, requestTimeoutMs: 300, clockSkewMs: 100 };
/** The stack's request timeout is the one the lease's fence counts on: they go together. */
const SHORT_STACK = { requestTimeoutMs: SHORT.requestTimeoutMs };

const s3 = await requireS3("lease suite on S3");
const backends: Backend[] = [memoryBackend, ...(s3 ? [s3Backend(s3)] : [])];

async function leaseRecord(
  volume: Awaited<ReturnType<typeof newTestVolume>>,
): Promise<LeaseRecord> {
  const stack = volume.stack();
  const got = await stack.store.get(leaseKey(stack.prefix));
  await stack.store.close();
  if (got === undefined) throw new Error("no lease record");
  return JSON.parse(Buffer.from(got.body).toString()) as LeaseRecord;
}

describe.each(backends)("lease on $name", (backend) => {
  it("refuses a second writer, naming the holder, and lets readers in", async () => {
    const volume = await newTestVolume(backend, "second", PARAMS);
    const first = await volume.open();
    const refused = await volume.open().then(
      () => undefined,
      (error: unknown) => error,
    );
    expect(refused).toBeInstanceOf(LeaseHeldError);
    expect((refused as Error).message).toMatch(
      new RegExp(
        `in use by pid ${process.pid} on ${os.hostname()} \\(lease epoch 1, expires in \\d+ s\\); use --force`,
      ),
    );
    const reader = await volume.open({ readOnly: true });
    expect((await reader.read(0, [new Uint8Array(512)])).ok).toBe(true);
    await reader.disconnect();
    await first.disconnect();
  });

  it("is released by disconnect, and the next writer gets the next epoch", async () => {
    const volume = await newTestVolume(backend, "release", PARAMS);
    const first = await volume.open();
    expect((await leaseRecord(volume)).epoch).toBe(1);
    await first.disconnect();
    const released = await leaseRecord(volume);
    expect(released.holder).toBeNull();
    const second = await volume.open();
    const taken = await leaseRecord(volume);
    expect(taken.epoch).toBe(2);
    expect(taken.holder?.pid).toBe(process.pid);
    await second.disconnect();
  });

  it("renews itself while held, and can be taken once it expired", async () => {
    const volume = await newTestVolume(backend, "expiry", PARAMS);
    const holder = await volume.open({ lease: SHORT }, volume.stack(SHORT_STACK));
    const before = await leaseRecord(volume);
    await new Promise((r) => setTimeout(r, SHORT.durationMs / 2)); // two renewals are due by now
    const renewed = await leaseRecord(volume);
    expect(renewed.epoch).toBe(before.epoch);
    expect(renewed.expiresAtMs).toBeGreaterThan(before.expiresAtMs);
    // A holder that stops renewing (as if hung) loses the lease to the next writer at expiry.
    await holder.abort();
    await expect(volume.open({ lease: SHORT }, volume.stack(SHORT_STACK))).rejects.toThrow(
      LeaseHeldError,
    );
    await new Promise((r) => setTimeout(r, SHORT.durationMs + 100));
    const next = await volume.open({ lease: SHORT }, volume.stack(SHORT_STACK));
    expect((await leaseRecord(volume)).epoch).toBe(before.epoch + 1);
    await next.disconnect();
  });

  it("takes over at once from a process of this host that no longer exists", async () => {
    const volume = await newTestVolume(backend, "abandoned", PARAMS);
    const dead = spawnSync("true").pid;
    const stack = volume.stack();
    const record: LeaseRecord = {
      format: "s3blk-lease",
      version: 1,
      epoch: 7,
      holder: {
        id: "crashed",
        host: os.hostname(),
        pid: dead,
        bootId: readFileSync("/proc/sys/kernel/random/boot_id", "utf8").trim(),
        startTicks: "1",
      },
      expiresAtMs: Date.now() + 600_000,
      durationMs: 600_000,
    };
    await stack.store.put(leaseKey(stack.prefix), Buffer.from(JSON.stringify(record)));
    const started = performance.now();
    const device = await volume.open();
    expect(performance.now() - started).toBeLessThan(5000); // no wait for the 10-minute expiry
    expect((await leaseRecord(volume)).epoch).toBe(8);
    await device.disconnect();
    await stack.store.close();
  });

  it("on a forced takeover, the old writer's dirty data never lands after the new writer starts", async () => {
    const volume = await newTestVolume(backend, "takeover", PARAMS);
    const old = await volume.open(
      { lease: SHORT, writebackDelayMs: 60_000 },
      volume.stack(SHORT_STACK),
    );
    expect((await old.write(0, [pattern(1, 0, 8)])).ok).toBe(true); // dirty, not uploaded

    const stack = volume.stack(SHORT_STACK);
    const forced = await volume.open({ lease: { ...SHORT, force: true } }, stack);
    // The takeover waited out the old lease: by now the old writer must have stopped.
    const flushed = await old.flush();
    expect(flushed.ok).toBe(false);
    if (!flushed.ok && flushed.error.kind === "Io") {
      expect(flushed.error.cause.message).toMatch(
        /lost the lease \(epoch 1\) to pid \d+ .*\(epoch 2\)|could not be renewed in time/,
      );
    }
    expect((await old.write(8, [pattern(2, 8, 8)])).ok).toBe(false);
    expect((await old.read(0, [new Uint8Array(512)])).ok).toBe(false);

    expect(await chunkObjectKeys(stack.store, stack.prefix, 0)).toEqual([]);
    expect((await forced.write(16, [pattern(3, 16, 8)])).ok).toBe(true);
    expect((await forced.flush()).ok).toBe(true);
    await old.abort(); // its dirty page is dropped, never uploaded
    const out = new Uint8Array(24 * 512);
    expect((await forced.read(0, [out])).ok).toBe(true);
    expect(out.subarray(0, 16 * 512).every((b) => b === 0)).toBe(true);
    expect(Buffer.from(out.subarray(16 * 512)).equals(Buffer.from(pattern(3, 16, 8)))).toBe(true);
    await forced.disconnect();
  });

  it("on a forced takeover whose PUT landed unanswered, still waits out the old lease", async () => {
    const volume = await newTestVolume(backend, "takeover-landed", PARAMS);
    const old = await volume.open({ lease: SHORT }, volume.stack(SHORT_STACK));
    const before = await leaseRecord(volume);
    // The takeover's PUT lands, but its answer is lost: the retry finds our own record.
    let loseOne = true;
    class LoseTakeoverAnswer extends StoreLayer {
      override async put(key: string, body: Uint8Array, options?: PutOptions) {
        const result = await super.put(key, body, options);
        if (loseOne && key.endsWith("lease.json") && options?.ifMatch !== undefined) {
          loseOne = false;
          throw new StoreError("Transient", "the answer to the takeover was lost");
        }
        return result;
      }
    }
    const stack = volume.stack({ ...SHORT_STACK, wrap: (s) => new LoseTakeoverAnswer(s) });
    const forced = await volume.open({ lease: { ...SHORT, force: true } }, stack);
    expect(loseOne).toBe(false);
    // The old holder's lease, as it stood before the takeover, has lapsed by now.
    expect(Date.now()).toBeGreaterThanOrEqual(before.expiresAtMs + SHORT.clockSkewMs);
    await forced.disconnect();
    await old.abort();
  });

  it("stops writing before its lease lapses when it cannot renew, and resumes when it can", async () => {
    const volume = await newTestVolume(backend, "selffence", PARAMS);
    let fault: FaultStore | undefined;
    const stack = volume.stack({ ...SHORT_STACK, wrap: (s) => (fault = new FaultStore(s)) });
    const device = await volume.open({ lease: SHORT, writebackDelayMs: 60_000 }, stack);
    fault?.inject({ operations: ["put"], keyIncludes: "lease.json" });
    await new Promise((r) => setTimeout(r, SHORT.durationMs));
    expect((await device.write(0, [pattern(4, 0, 8)])).ok).toBe(true); // into the cache
    const refused = await device.flush();
    expect(refused.ok).toBe(false);
    if (!refused.ok && refused.error.kind === "Io") {
      expect(refused.error.cause.message).toMatch(/could not be renewed in time; not writing/);
    }
    expect(await chunkObjectKeys(stack.store, stack.prefix, 0)).toEqual([]);
    fault?.heal();
    // The next renewal (every quarter of the duration) restores the lease; however slow the
    // machine, a flush then succeeds.
    let flushed = await device.flush();
    for (let i = 0; !flushed.ok && i < 100; i++) {
      await new Promise((r) => setTimeout(r, 100));
      flushed = await device.flush();
    }
    expect(flushed.ok).toBe(true);
    await device.disconnect();
  });
});

describe("lease timing", () => {
  /** A clock that moves only when told to, firing what falls due. */
  class ManualClock implements Clock {
    #nowMs = 0;
    #timers: { atMs: number; callback: () => void }[] = [];
    nowMs = () => this.#nowMs;
    sleep = (ms: number) => new Promise<void>((resolve) => this.schedule(resolve, ms));
    schedule(callback: () => void, ms: number) {
      const timer = { atMs: this.#nowMs + ms, callback };
      this.#timers.push(timer);
      return () => void (this.#timers = this.#timers.filter((t) => t !== timer));
    }
    async advanceTo(ms: number) {
      for (;;) {
        const due = this.#timers.filter((t) => t.atMs <= ms).sort((a, b) => a.atMs - b.atMs)[0];
        if (due === undefined) break;
        this.#timers = this.#timers.filter((t) => t !== due);
        this.#nowMs = due.atMs;
        due.callback();
        await new Promise((r) => setImmediate(r));
      }
      this.#nowMs = ms;
    }
  }

  it("sends each renewal a quarter of the duration after the last was sent, however slow", async () => {
    const clock = new ManualClock();
    const sentAtMs: number[] = [];
    let answer: () => void = () => {};
    class SlowLease extends StoreLayer {
      override async put(key: string, body: Uint8Array, options?: PutOptions) {
        if (key === leaseKey("")) {
          sentAtMs.push(clock.nowMs());
          if (sentAtMs.length > 1) await new Promise<void>((resolve) => (answer = resolve));
        }
        return super.put(key, body, options);
      }
    }
    const lease = await Lease.acquire(new SlowLease(new MemoryStore()), "", new Fence(), clock, {
      durationMs: 1200,
      requestTimeoutMs: 150,
      clockSkewMs: 100,
    });
    await clock.advanceTo(300); // the first renewal is sent, and takes 100 ms to answer
    await clock.advanceTo(400);
    answer();
    await new Promise((r) => setImmediate(r));
    await clock.advanceTo(600);
    expect(sentAtMs).toEqual([0, 300, 600]);
    answer();
    lease.abandon();
  });

  it("refuses timings under which a healthy holder would fence itself between renewals", () => {
    // 3/4 of the duration must exceed two request timeouts and the skew margin.
    expect(() => leaseTiming({ durationMs: 46_000 })).toThrow(LeaseTimingError);
    expect(() => leaseTiming({ durationMs: 46_000 })).toThrow(/must last more than 47 s/);
    expect(leaseTiming({ durationMs: 47_000 }).durationMs).toBe(47_000);
    expect(leaseTiming({}).durationMs).toBe(60_000);
    expect(() =>
      leaseTiming({ durationMs: 12_000, requestTimeoutMs: 2_000, clockSkewMs: 5_000 }),
    ).toThrow(LeaseTimingError);
  });
});

describe("a writable open's stack", () => {
  it("must be one the stack builder made, whose fence is below its retries", async () => {
    const volume = await newTestVolume(memoryBackend, "handmade", PARAMS);
    const built = volume.stack();
    // The same store, with a fence that no layer consults.
    const handmade = { ...built, fence: new Fence() };
    await expect(openVolume(handmade)).rejects.toThrow(/needs the store stack that openStoreStack/);
    const reader = await openVolume(handmade, { readOnly: true }); // reads are never fenced
    await reader.disconnect();
    const writer = await openVolume(volume.stack());
    await writer.disconnect();
  });
});
