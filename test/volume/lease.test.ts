/**
 * One writer at a time: the volume's claim and the process lease it points to. Runs on memory
 * and on S3 (RGW honours If-None-Match and If-Match with bare entity tags). Two registries
 * (`ProcessLeases`) in this one process stand for two processes: the properties here do not
 * depend on the pid, only on whose record is renewed.
 */

import { spawnSync } from "node:child_process";
import os from "node:os";
import { readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { FaultStore } from "../../src/store/fault-store.js";
import {
  CLAIM_HORIZON_MS,
  Lease,
  leaseKey,
  LeaseHeldError,
  leaseTiming,
  LeaseTimingError,
  ProcessLeases,
  processLeaseKey,
  type LeaseLostError,
  type LeaseRecord,
  type ProcessLeaseRecord,
} from "../../src/volume/lease.js";
import { Fence } from "../../src/store/fenced-store.js";
import { createVolume, openVolume } from "../../src/lifecycle/volume-lifecycle.js";
import { MemoryStore } from "../../src/store/memory-store.js";
import { StoreError, type ObjectStore, type PutOptions } from "../../src/store/object-store.js";
import { StoreLayer } from "../../src/store/store-layer.js";
import { buildStoreStack } from "../../src/store/store-stack.js";
import type { Clock } from "../../src/util/clock.js";
import { requireS3 } from "../support/s3-target.js";
import {
  memoryBackend,
  newTestVolume,
  pattern,
  s3Backend,
  type Backend,
  type TestVolume,
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
const PROCESSES = "s3blk-processes/";

const s3 = await requireS3("lease suite on S3");
const backends: Backend[] = [memoryBackend, ...(s3 ? [s3Backend(s3)] : [])];

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function readJson<T>(volume: TestVolume, key: string): Promise<{ record: T; etag: string }> {
  const stack = volume.stack();
  const got = await stack.store.get(key);
  await stack.store.close();
  if (got === undefined) throw new Error(`no ${key}`);
  return { record: JSON.parse(Buffer.from(got.body).toString()) as T, etag: got.etag };
}

async function exists(volume: TestVolume, key: string): Promise<boolean> {
  const stack = volume.stack();
  const got = await stack.store.get(key);
  await stack.store.close();
  return got !== undefined;
}

function claimKeyOf(volume: TestVolume): string {
  return leaseKey(volume.stack().prefix);
}

async function claimOf(volume: TestVolume): Promise<LeaseRecord> {
  return (await readJson<LeaseRecord>(volume, claimKeyOf(volume))).record;
}

/** The process lease the volume's claim points to. */
async function processOf(volume: TestVolume): Promise<{ key: string; record: ProcessLeaseRecord }> {
  const key = (await claimOf(volume)).process;
  if (key === undefined) throw new Error("the claim points to no process lease");
  return { key, record: (await readJson<ProcessLeaseRecord>(volume, key)).record };
}

/** Remembers the bodies of PUTs whose key contains `needle`. */
class PutLog extends StoreLayer {
  readonly bodies: { key: string; body: string }[] = [];
  constructor(
    inner: ObjectStore,
    readonly needle: string,
  ) {
    super(inner);
  }
  override async put(key: string, body: Uint8Array, options?: PutOptions) {
    const result = await super.put(key, body, options);
    if (key.includes(this.needle)) this.bodies.push({ key, body: Buffer.from(body).toString() });
    return result;
  }
}

/** Loses the answer to the first conditional (If-Match) PUT of a key containing `needle`. */
class LoseOneAnswer extends StoreLayer {
  lost = false;
  constructor(
    inner: ObjectStore,
    readonly needle: string,
  ) {
    super(inner);
  }
  override async put(key: string, body: Uint8Array, options?: PutOptions) {
    const result = await super.put(key, body, options);
    if (!this.lost && key.includes(this.needle) && options?.ifMatch !== undefined) {
      this.lost = true;
      throw new StoreError("Transient", "the answer was lost");
    }
    return result;
  }
}

async function until(condition: () => boolean | Promise<boolean>, what: string): Promise<void> {
  for (let i = 0; i < 200; i++) {
    if (await condition()) return;
    await sleep(50);
  }
  throw new Error(`timed out waiting for ${what}`);
}

describe.each(backends)("lease on $name", (backend) => {
  it("refuses a second writer, naming the holder, and lets readers in", async () => {
    const volume = await newTestVolume(backend, "second", PARAMS);
    const first = await volume.open();
    const claim = await claimOf(volume);
    expect(claim).toMatchObject({
      format: "s3blk-lease",
      version: 2,
      epoch: 1,
      holder: { pid: process.pid, host: os.hostname() },
    });
    // Far ahead, so that an older s3blk, reading only the claim, refuses it; but less than
    // 2^31 ms (with room for its skew margin), so that its wait on it never overflows a timer.
    expect(claim.expiresAtMs - Date.now()).toBeGreaterThan(23 * 86_400_000);
    expect(claim.expiresAtMs + 60_000 - Date.now()).toBeLessThan(2 ** 31);
    const { key, record } = await processOf(volume);
    expect(key).toMatch(/^s3blk-processes\/[0-9a-f-]{36}\.json$/);
    expect(record).toMatchObject({
      format: "s3blk-process-lease",
      holder: { pid: process.pid, host: os.hostname() },
      durationMs: 120_000,
      revoked: [],
    });
    expect(key).toBe(processLeaseKey(record.holder.id));

    const refused = await volume.open().then(
      () => undefined,
      (error: unknown) => error,
    );
    expect(refused).toBeInstanceOf(LeaseHeldError);
    const message = (refused as Error).message;
    expect(message).toMatch(
      new RegExp(
        `in use by pid ${process.pid} on ${os.hostname()} \\(lease epoch 1, expires in \\d+ s\\); use --force`,
      ),
    );
    // The hold lapses with the process lease, within its 120 s; not with the claim's 24 days.
    expect(Number(/expires in (\d+) s/.exec(message)?.[1])).toBeLessThanOrEqual(120);
    const reader = await volume.open({ readOnly: true });
    expect((await reader.read(0, [new Uint8Array(512)])).ok).toBe(true);
    await reader.disconnect();
    await first.disconnect();
  });

  it("is released by disconnect, deleting its process lease, and the next writer gets the next epoch", async () => {
    const volume = await newTestVolume(backend, "release", PARAMS);
    const first = await volume.open();
    const { key } = await processOf(volume);
    await first.disconnect();
    const released = await claimOf(volume);
    expect(released).toMatchObject({ holder: null, epoch: 1 });
    expect(await exists(volume, key)).toBe(false);
    const second = await volume.open();
    const taken = await claimOf(volume);
    expect(taken.epoch).toBe(2);
    expect(taken.holder?.pid).toBe(process.pid);
    expect(taken.process).not.toBe(key);
    await second.disconnect();
  });

  it("renews its process lease, never the claim, and can be taken once the process lease expired", async () => {
    const volume = await newTestVolume(backend, "expiry", PARAMS);
    const holder = await volume.open({ lease: SHORT }, volume.stack(SHORT_STACK));
    const claimKey = claimKeyOf(volume);
    const claimBefore = await readJson<LeaseRecord>(volume, claimKey);
    const before = await processOf(volume);
    await sleep(SHORT.durationMs / 2 + 500); // a renewal was due half the duration in
    const renewed = await processOf(volume);
    expect(renewed.record.expiresAtMs).toBeGreaterThan(before.record.expiresAtMs);
    expect((await readJson<LeaseRecord>(volume, claimKey)).etag).toBe(claimBefore.etag);
    // A holder that stops renewing (as if hung) loses the lease to the next writer at expiry.
    await holder.abort();
    await expect(volume.open({ lease: SHORT }, volume.stack(SHORT_STACK))).rejects.toThrow(
      LeaseHeldError,
    );
    await sleep(SHORT.durationMs + 100);
    const next = await volume.open({ lease: SHORT }, volume.stack(SHORT_STACK));
    expect((await claimOf(volume)).epoch).toBe(claimBefore.record.epoch + 1);
    // Expired, and revoked all the same (see the test of a slow holder below).
    const old = await readJson<ProcessLeaseRecord>(volume, before.key);
    expect(old.record.revoked).toEqual([
      { key: claimKey, epoch: 1, by: { host: os.hostname(), pid: process.pid } },
    ]);
    await next.disconnect();
  });

  it("takes over at once from a process of this host that no longer exists", async () => {
    const bootId = readFileSync("/proc/sys/kernel/random/boot_id", "utf8").trim();
    const dead = spawnSync("true").pid;
    const crashed = { host: os.hostname(), pid: dead, bootId, startTicks: "1" };
    // A claim of an older s3blk (version 1, renewed by its holder)...
    const older = await newTestVolume(backend, "abandoned-v1", PARAMS);
    const stack = older.stack();
    const record: LeaseRecord = {
      format: "s3blk-lease",
      version: 1,
      epoch: 7,
      holder: { id: "crashed", ...crashed },
      expiresAtMs: Date.now() + 600_000,
      durationMs: 600_000,
    };
    await stack.store.put(leaseKey(stack.prefix), Buffer.from(JSON.stringify(record)));
    let started = performance.now();
    const device = await older.open();
    expect(performance.now() - started).toBeLessThan(5000); // no wait for the 10-minute expiry
    expect((await claimOf(older)).epoch).toBe(8);
    await device.disconnect();
    await stack.store.close();

    // ... and one of this s3blk, pointing to the crashed process's lease, which goes too.
    const volume = await newTestVolume(backend, "abandoned-v2", PARAMS);
    const s = volume.stack();
    const id = crypto.randomUUID();
    const processKey = processLeaseKey(id);
    const processRecord: ProcessLeaseRecord = {
      format: "s3blk-process-lease",
      version: 1,
      holder: { id, ...crashed },
      expiresAtMs: Date.now() + 600_000,
      durationMs: 600_000,
      revoked: [],
    };
    await s.store.put(processKey, Buffer.from(JSON.stringify(processRecord)));
    const claim: LeaseRecord = {
      format: "s3blk-lease",
      version: 2,
      epoch: 4,
      holder: { id: crypto.randomUUID(), ...crashed },
      process: processKey,
      expiresAtMs: Date.now() + CLAIM_HORIZON_MS,
      durationMs: 600_000,
    };
    await s.store.put(leaseKey(s.prefix), Buffer.from(JSON.stringify(claim)));
    started = performance.now();
    const taken = await volume.open();
    expect(performance.now() - started).toBeLessThan(5000);
    expect((await claimOf(volume)).epoch).toBe(5);
    expect(await exists(volume, processKey)).toBe(false);
    await taken.disconnect();
    await s.store.close();
  });

  it("honours a live claim of an older s3blk, and with force waits out its expiry", async () => {
    const volume = await newTestVolume(backend, "older", PARAMS);
    const stack = volume.stack();
    const record: LeaseRecord = {
      format: "s3blk-lease",
      version: 1,
      epoch: 3,
      holder: { id: "older", host: os.hostname(), pid: process.pid }, // alive: this very process
      expiresAtMs: Date.now() + 2000,
      durationMs: 60_000,
    };
    await stack.store.put(leaseKey(stack.prefix), Buffer.from(JSON.stringify(record)));
    await expect(volume.open({ lease: SHORT }, volume.stack(SHORT_STACK))).rejects.toThrow(
      /in use by pid \d+ .*\(lease epoch 3, expires in [12] s\)/,
    );
    const forced = await volume.open(
      { lease: { ...SHORT, force: true } },
      volume.stack(SHORT_STACK),
    );
    expect(Date.now()).toBeGreaterThanOrEqual(record.expiresAtMs + SHORT.clockSkewMs);
    expect((await claimOf(volume)).epoch).toBe(4);
    await forced.disconnect();
    await stack.store.close();
  });

  it("on a forced takeover, the old writer's dirty data never lands after the new writer starts", async () => {
    const volume = await newTestVolume(backend, "takeover", PARAMS);
    const losses: LeaseLostError[] = [];
    const old = await volume.open(
      { lease: { ...SHORT, onLost: (e) => losses.push(e) }, writebackDelayMs: 60_000 },
      volume.stack(SHORT_STACK),
    );
    expect((await old.write(0, [pattern(1, 0, 8)])).ok).toBe(true); // dirty, not uploaded
    const before = await processOf(volume);

    const stack = volume.stack(SHORT_STACK);
    const forced = await volume.open({ lease: { ...SHORT, force: true } }, stack);
    // The takeover waited out the old process lease: by now the old writer must have stopped.
    const flushed = await old.flush();
    expect(flushed.ok).toBe(false);
    const lostMessage = new RegExp(
      `lost the lease .*lease.json \\(epoch 1\\) to pid ${process.pid} on .*, which took it over`,
    );
    if (!flushed.ok && flushed.error.kind === "Io") {
      expect(flushed.error.cause.message).toMatch(
        new RegExp(`${lostMessage.source}|could not be renewed in time`),
      );
    }
    expect((await old.write(8, [pattern(2, 8, 8)])).ok).toBe(false);
    expect((await old.read(0, [new Uint8Array(512)])).ok).toBe(false);
    expect(losses.map((e) => e.message)).toEqual([expect.stringMatching(lostMessage)]);
    // The old process keeps its lease (renewed, the revocation kept) for its other volumes.
    const after = await readJson<ProcessLeaseRecord>(volume, before.key);
    expect(after.record.revoked).toMatchObject([{ key: claimKeyOf(volume), epoch: 1 }]);

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

  it("takes one volume of a process and leaves its other volumes writing", async () => {
    const a = await newTestVolume(backend, "one-of-two-a", PARAMS);
    const b = await newTestVolume(backend, "one-of-two-b", PARAMS);
    const shared = new ProcessLeases();
    const lease = { ...SHORT, processLeases: shared };
    const oldA = await a.open({ lease, writebackDelayMs: 60_000 }, a.stack(SHORT_STACK));
    const oldB = await b.open({ lease, writebackDelayMs: 60_000 }, b.stack(SHORT_STACK));
    const { key } = await processOf(a);
    expect((await processOf(b)).key).toBe(key);
    expect([...shared.held().values()]).toEqual([key]);

    const forced = await a.open({ lease: { ...SHORT, force: true } }, a.stack(SHORT_STACK));
    expect((await oldA.write(0, [pattern(5, 0, 8)])).ok).toBe(false);
    // Long past the old process lease's expiry as the revocation found it: B is still held.
    expect((await oldB.write(0, [pattern(6, 0, 8)])).ok).toBe(true);
    expect((await oldB.flush()).ok).toBe(true);
    await expect(b.open({ lease: SHORT }, b.stack(SHORT_STACK))).rejects.toThrow(LeaseHeldError);
    expect((await readJson<ProcessLeaseRecord>(b, key)).record.expiresAtMs).toBeGreaterThan(
      Date.now(),
    );
    await forced.disconnect();
    await oldA.disconnect();
    expect(await exists(b, key)).toBe(true); // B still holds it
    await oldB.disconnect();
    expect(await exists(b, key)).toBe(false);
  });

  it("within one process lease, refuses a second writer, takes an abandoned claim at once, and forces at once", async () => {
    const volume = await newTestVolume(backend, "same-process", PARAMS);
    const other = await newTestVolume(backend, "same-process-other", PARAMS);
    const lease = { ...SHORT, processLeases: new ProcessLeases() };
    const kept = await other.open({ lease }, other.stack(SHORT_STACK)); // keeps it alive
    const first = await volume.open({ lease }, volume.stack(SHORT_STACK));
    await expect(volume.open({ lease }, volume.stack(SHORT_STACK))).rejects.toThrow(
      /in use by pid \d+ .*\(lease epoch 1, expires in \d s\)/,
    );
    // Abandoned (as a crash would leave it): this process knows it writes it no more.
    await first.abort();
    const second = await volume.open({ lease }, volume.stack(SHORT_STACK));
    expect((await claimOf(volume)).epoch).toBe(2);
    // Forced: stopped here and now, so the wait is one request timeout, not the lease.
    const losses: LeaseLostError[] = [];
    const started = performance.now();
    const third = await volume.open(
      { lease: { ...lease, force: true, onLost: (e) => losses.push(e) } },
      volume.stack(SHORT_STACK),
    );
    expect(performance.now() - started).toBeGreaterThanOrEqual(SHORT.requestTimeoutMs);
    expect(performance.now() - started).toBeLessThan(SHORT.durationMs / 2);
    expect((await second.write(0, [pattern(9, 0, 8)])).ok).toBe(false);
    expect((await claimOf(volume)).epoch).toBe(3);
    expect(losses).toEqual([]);
    await second.disconnect();
    await third.disconnect();
    await kept.disconnect();
  });

  it("revokes an expired process lease too, so that a holder that was only slow cannot resume beside the taker", async () => {
    const volume = await newTestVolume(backend, "slow", PARAMS);
    let fault: FaultStore | undefined;
    const slowStack = volume.stack({ ...SHORT_STACK, wrap: (s) => (fault = new FaultStore(s)) });
    const losses: LeaseLostError[] = [];
    const slow = await volume.open(
      { lease: { ...SHORT, onLost: (e) => losses.push(e) }, writebackDelayMs: 60_000 },
      slowStack,
    );
    const { key, record } = await processOf(volume);
    expect((await slow.write(0, [pattern(7, 0, 8)])).ok).toBe(true); // dirty, not uploaded
    // Its renewals fail until its process lease has expired...
    fault?.inject({ operations: ["put"], keyIncludes: PROCESSES });
    await sleep(Math.max(0, record.expiresAtMs - Date.now()) + SHORT.durationMs / 2);
    // ... so another writer takes the volume without --force and without waiting.
    const takerStack = volume.stack(SHORT_STACK);
    const started = performance.now();
    const taker = await volume.open({ lease: SHORT }, takerStack);
    expect(performance.now() - started).toBeLessThan(SHORT.durationMs);
    // The slow holder's renewals get through again, and its process lease is live again...
    fault?.heal();
    await until(
      async () => (await readJson<ProcessLeaseRecord>(volume, key)).record.expiresAtMs > Date.now(),
      "the slow holder to renew again",
    );
    // ... but not its claim of the volume: its first renewal found the revocation.
    expect((await slow.flush()).ok).toBe(false);
    expect(await chunkObjectKeys(takerStack.store, takerStack.prefix, 0)).toEqual([]);
    expect(losses.map((e) => e.message)).toEqual([
      expect.stringMatching(/lost the lease .*\(epoch 1\) to pid \d+ .*took it over/),
    ]);
    await slow.abort();
    await taker.disconnect();
  });

  it("frees a revoked claim whose taker never wrote it, without --force but after the wait", async () => {
    const volume = await newTestVolume(backend, "revoked", PARAMS);
    const losses: LeaseLostError[] = [];
    const old = await volume.open(
      { lease: { ...SHORT, onLost: (e) => losses.push(e) } },
      volume.stack(SHORT_STACK),
    );
    // A taker revokes the claim in the holder's process lease, then crashes before its claim.
    const { key } = await processOf(volume);
    const stack = volume.stack();
    const got = await stack.store.get(key);
    const record = JSON.parse(Buffer.from(got!.body).toString()) as ProcessLeaseRecord;
    const revoked = { ...record, revoked: [{ key: claimKeyOf(volume), epoch: 1 }] };
    await stack.store.put(key, Buffer.from(JSON.stringify(revoked)), { ifMatch: got!.etag });
    const next = await volume.open({ lease: SHORT }, volume.stack(SHORT_STACK));
    expect(Date.now()).toBeGreaterThanOrEqual(record.expiresAtMs + SHORT.clockSkewMs);
    expect(losses).toHaveLength(1);
    expect((await old.write(0, [pattern(8, 0, 8)])).ok).toBe(false);
    expect((await claimOf(volume)).epoch).toBe(2);
    await old.disconnect();
    await next.disconnect();
    await stack.store.close();
  });

  it("revokes a volume it abandons while its other volumes keep the process lease alive", async () => {
    const a = await newTestVolume(backend, "abandon-a", PARAMS);
    const b = await newTestVolume(backend, "abandon-b", PARAMS);
    const lease = { ...SHORT, processLeases: new ProcessLeases() };
    const oldA = await a.open({ lease }, a.stack(SHORT_STACK));
    const oldB = await b.open({ lease }, b.stack(SHORT_STACK));
    await oldA.abort(); // no request; its claim stays, pointing to a live process lease
    const { key } = await processOf(a);
    await until(
      async () => (await readJson<ProcessLeaseRecord>(a, key)).record.revoked.length > 0,
      "the next renewal to revoke the abandoned volume",
    );
    // So another writer need not force it (it waits out the process lease, as for any
    // revoked claim).
    const next = await a.open({ lease: SHORT }, a.stack(SHORT_STACK));
    expect((await claimOf(a)).epoch).toBe(2);
    await next.disconnect();
    // Once the claim moved on, the entry is dropped at the next renewal.
    await until(
      async () => (await readJson<ProcessLeaseRecord>(a, key)).record.revoked.length === 0,
      "the revocation to be pruned",
    );
    await oldB.disconnect();
  });

  it("on a forced takeover whose claim PUT landed unanswered, still waits out the old lease", async () => {
    const volume = await newTestVolume(backend, "takeover-landed", PARAMS);
    const old = await volume.open({ lease: SHORT }, volume.stack(SHORT_STACK));
    let log: PutLog | undefined;
    let lose: LoseOneAnswer | undefined;
    const stack = volume.stack({
      ...SHORT_STACK,
      wrap: (s) => (lose = new LoseOneAnswer((log = new PutLog(s, PROCESSES)), "lease.json")),
    });
    const forced = await volume.open({ lease: { ...SHORT, force: true } }, stack);
    expect(lose?.lost).toBe(true);
    // The revocation, and the old process lease as it found it, lapsed before the open returned.
    const revocation = log?.bodies.find((b) => b.body.includes('"revoked":[{'));
    expect(revocation).toBeDefined();
    const asRevoked = JSON.parse(revocation!.body) as ProcessLeaseRecord;
    expect(Date.now()).toBeGreaterThanOrEqual(asRevoked.expiresAtMs + SHORT.clockSkewMs);
    expect((await claimOf(volume)).epoch).toBe(2);
    await forced.disconnect();
    await old.abort();
  });

  it("on a forced takeover whose revocation landed unanswered, recognises it and waits", async () => {
    const volume = await newTestVolume(backend, "revocation-landed", PARAMS);
    const losses: LeaseLostError[] = [];
    const old = await volume.open(
      { lease: { ...SHORT, onLost: (e) => losses.push(e) } },
      volume.stack(SHORT_STACK),
    );
    const { key, record } = await processOf(volume);
    let lose: LoseOneAnswer | undefined;
    const stack = volume.stack({
      ...SHORT_STACK,
      wrap: (s) => (lose = new LoseOneAnswer(s, PROCESSES)),
    });
    const forced = await volume.open({ lease: { ...SHORT, force: true } }, stack);
    expect(lose?.lost).toBe(true);
    expect(Date.now()).toBeGreaterThanOrEqual(record.expiresAtMs + SHORT.clockSkewMs);
    expect((await claimOf(volume)).epoch).toBe(2);
    // Revoked once, not twice.
    const { record: after } = await readJson<ProcessLeaseRecord>(volume, key);
    expect(after.revoked).toHaveLength(1);
    expect(losses).toHaveLength(1);
    await forced.disconnect();
    await old.disconnect();
  });

  it("stops writing before its lease lapses when it cannot renew, and resumes when it can", async () => {
    const volume = await newTestVolume(backend, "selffence", PARAMS);
    let fault: FaultStore | undefined;
    const stack = volume.stack({ ...SHORT_STACK, wrap: (s) => (fault = new FaultStore(s)) });
    const device = await volume.open({ lease: SHORT, writebackDelayMs: 60_000 }, stack);
    fault?.inject({ operations: ["put"], keyIncludes: PROCESSES });
    await sleep(SHORT.durationMs);
    expect((await device.write(0, [pattern(4, 0, 8)])).ok).toBe(true); // into the cache
    const refused = await device.flush();
    expect(refused.ok).toBe(false);
    if (!refused.ok && refused.error.kind === "Io") {
      expect(refused.error.cause.message).toMatch(/could not be renewed in time; not writing/);
    }
    expect(await chunkObjectKeys(stack.store, stack.prefix, 0)).toEqual([]);
    fault?.heal();
    // A failed renewal is retried within a fraction of the duration; however slow the
    // machine, a flush then succeeds.
    let flushed = await device.flush();
    for (let i = 0; !flushed.ok && i < 100; i++) {
      await sleep(100);
      flushed = await device.flush();
    }
    expect(flushed.ok).toBe(true);
    await device.disconnect();
  });
});

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
      for (let i = 0; i < 20; i++) await new Promise((r) => setImmediate(r));
    }
    this.#nowMs = ms;
  }
}

/** Every request a store is asked, in order. */
class RequestLog extends StoreLayer {
  readonly requests: string[] = [];
  override get(...args: Parameters<ObjectStore["get"]>) {
    this.requests.push(`GET ${args[0]}`);
    return super.get(...args);
  }
  override put(...args: Parameters<ObjectStore["put"]>) {
    this.requests.push(`PUT ${args[0]}`);
    return super.put(...args);
  }
  override delete(key: string) {
    this.requests.push(`DELETE ${key}`);
    return super.delete(key);
  }
  override deleteMany(keys: readonly string[]) {
    this.requests.push(`DELETE ${keys.length} keys`);
    return super.deleteMany(keys);
  }
  override listPage(prefix: string, continuation?: string) {
    this.requests.push(`LIST ${prefix}`);
    return super.listPage(prefix, continuation);
  }
}

describe("lease timing", () => {
  const TIMING = { durationMs: 1200, requestTimeoutMs: 150, clockSkewMs: 100 };

  it("renews half the duration after the last renewal was sent, however slow, and soon after a failure", async () => {
    const clock = new ManualClock();
    const sentAtMs: number[] = [];
    let answer: () => void = () => {};
    let failNext = false;
    class SlowLease extends StoreLayer {
      override async put(key: string, body: Uint8Array, options?: PutOptions) {
        if (key.startsWith(PROCESSES)) {
          sentAtMs.push(clock.nowMs());
          if (failNext) {
            failNext = false;
            throw new StoreError("Transient", "injected");
          }
          if (sentAtMs.length === 2) await new Promise<void>((resolve) => (answer = resolve));
        }
        return super.put(key, body, options);
      }
    }
    const lease = await Lease.acquire(
      new SlowLease(new MemoryStore()),
      "",
      new Fence(),
      clock,
      TIMING,
    );
    await clock.advanceTo(600); // the first renewal is sent, and takes 100 ms to answer
    await clock.advanceTo(700);
    answer();
    await new Promise((r) => setImmediate(r));
    failNext = true;
    await clock.advanceTo(1200); // the next, counted from the send: it fails...
    await clock.advanceTo(1400); // ... and is sent again D/8 later, not D/2
    expect(sentAtMs).toEqual([0, 600, 1200, 1350]);
    lease.abandon();
  });

  it("admits a write only while the last successful renewal's send covers it", async () => {
    const clock = new ManualClock();
    const fence = new Fence();
    let failing = false;
    class Renewals extends StoreLayer {
      override async put(key: string, body: Uint8Array, options?: PutOptions) {
        if (failing && key.startsWith(PROCESSES)) throw new StoreError("Transient", "down");
        return super.put(key, body, options);
      }
    }
    const lease = await Lease.acquire(new Renewals(new MemoryStore()), "", fence, clock, TIMING);
    failing = true; // every renewal from 600 on fails: validity stays 0 + 1200 − 100 = 1100
    await clock.advanceTo(950);
    expect(() => fence.assertWritable("chunks/0")).not.toThrow(); // 950 + 150 ≤ 1100
    await clock.advanceTo(951);
    expect(() => fence.assertWritable("chunks/0")).toThrow(/could not be renewed in time/);
    expect(() => fence.assertWritable("lease.json")).not.toThrow(); // its own records pass
    failing = false;
    await clock.advanceTo(1200); // a retry, D/8 after the last failure, succeeds
    expect(() => fence.assertWritable("chunks/0")).not.toThrow();
    lease.abandon();
  });

  it("makes one renewal per half duration and nothing else, whether one volume or twenty is idle", async () => {
    const outcomes: { volumes: number; idle: string[]; afterFlush: string[] }[] = [];
    for (const volumes of [1, 20]) {
      const clock = new ManualClock();
      const log = new RequestLog(new MemoryStore());
      const leases = new ProcessLeases();
      const devices = [];
      for (let i = 0; i < volumes; i++) {
        const stack = buildStoreStack(log, { prefix: `v${i}`, url: `v${i}` }, { clock });
        await createVolume(stack, PARAMS);
        devices.push(
          await openVolume(stack, {
            clock,
            lease: { processLeases: leases },
            writebackDelayMs: 1000,
            gcGraceMs: 10_000,
          }),
        );
      }
      // Writes: a chunk written twice (the first object becomes garbage), write-back after 1 s.
      const first = devices[0]!;
      expect((await first.write(0, [pattern(1, 0, 128)], { fua: true })).ok).toBe(true);
      expect((await first.write(0, [pattern(2, 0, 8)])).ok).toBe(true);
      await clock.advanceTo(2000);
      expect(first.cacheStats().dirtyChunks).toBe(0);
      const from = log.requests.length;
      // Idle for 125 s: past two renewals (at 60 s and 120 s) and past the garbage's grace.
      await clock.advanceTo(125_000);
      const idle = log.requests.slice(from);
      // Background work waits for writes: the flush deletes the garbage whose grace passed.
      expect((await first.flush()).ok).toBe(true);
      await new Promise((r) => setImmediate(r));
      outcomes.push({ volumes, idle, afterFlush: log.requests.slice(from + idle.length) });
      for (const device of devices) await device.disconnect();
    }
    for (const { idle, afterFlush } of outcomes) {
      expect(idle).toHaveLength(2);
      expect(idle[0]).toMatch(/^PUT s3blk-processes\/[0-9a-f-]{36}\.json$/);
      expect(idle[1]).toBe(idle[0]);
      expect(afterFlush).toEqual(["DELETE 1 keys"]);
    }
  });

  it("writes the claim again (same epoch) when its horizon draws near, and finds it taken", async () => {
    const clock = new ManualClock();
    let wallMs = 1_000_000;
    const store = new MemoryStore();
    const options = { ...TIMING, wallClockMs: () => wallMs };
    const lease = await Lease.acquire(store, "", new Fence(), clock, options);
    const first = await store.get("lease.json");
    await clock.advanceTo(600);
    expect((await store.get("lease.json"))?.etag).toBe(first?.etag); // not renewed
    wallMs += CLAIM_HORIZON_MS / 2 + 1; // 12 days on
    await clock.advanceTo(1200);
    const again = JSON.parse(Buffer.from((await store.get("lease.json"))!.body).toString());
    expect(again).toMatchObject({ epoch: 1, expiresAtMs: wallMs + CLAIM_HORIZON_MS });
    // An older s3blk takes it over with --force (writing its own kind, then waiting 24 days):
    // the next rewrite finds it, long before that wait ends.
    const older = { ...again, version: 1, holder: { id: "old", host: "h", pid: 1 } };
    await store.put("lease.json", Buffer.from(JSON.stringify(older)));
    wallMs += CLAIM_HORIZON_MS / 2 + 1;
    await clock.advanceTo(1800);
    expect(lease.lost?.message).toMatch(/was taken over by pid 1 on h/);
    lease.abandon();
  });

  it("refuses timings under which a healthy holder would fence itself between renewals", () => {
    // Half the duration must exceed two request timeouts and the skew margin.
    expect(() => leaseTiming({ durationMs: 70_000 })).toThrow(LeaseTimingError);
    expect(() => leaseTiming({ durationMs: 70_000 })).toThrow(/must last more than 70 s/);
    expect(leaseTiming({ durationMs: 70_001 }).durationMs).toBe(70_001);
    expect(leaseTiming({}).durationMs).toBe(120_000);
    expect(() =>
      leaseTiming({ durationMs: 18_000, requestTimeoutMs: 2_000, clockSkewMs: 5_000 }),
    ).toThrow(LeaseTimingError);
    expect(() => leaseTiming({ durationMs: 2 * 86_400_000 })).toThrow(/longer than a day/);
  });

  it("refuses an open that asks a shared process lease for another duration", async () => {
    const store = new MemoryStore();
    const processLeases = new ProcessLeases();
    const clock = new ManualClock();
    const lease = await Lease.acquire(store, "a", new Fence(), clock, { ...TIMING, processLeases });
    await expect(
      Lease.acquire(store, "b", new Fence(), clock, {
        ...TIMING,
        durationMs: 2400,
        processLeases,
      }),
    ).rejects.toThrow(/lasts 1.2 s .* cannot ask for 2.4 s/);
    await lease.release();
    expect([...processLeases.held()]).toEqual([]);
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
