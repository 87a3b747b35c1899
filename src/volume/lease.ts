/**
 * One writer at a time: the volume's lease.
 *
 * A writable open takes the lease object `<prefix>/lease.json` with a conditional PUT
 * (`If-None-Match: *` to create it, `If-Match: <etag>` to take or renew it) and renews it every
 * quarter of its duration. The record names its holder (host, pid, a random id) and carries an
 * **epoch** that grows by one with every new holder, so takeovers are ordered and visible.
 *
 * ## Taking the lease
 *
 * - free (never taken, or released by a clean close), or expired: taken at once;
 * - held by a process on this host that no longer exists (same boot, no process with that pid
 *   and start time): abandoned, taken at once — this is a restart after a crash;
 * - held and live: refused, naming the holder, unless `force`; a forced takeover writes the new
 *   record at once (so the old holder's next renewal fails) and then **waits until the old
 *   record's expiry** before it lets this process write.
 *
 * ## Fencing
 *
 * The holder may write only while its lease certainly covers the write: `validUntil` is the
 * monotonic time at which its last successful renewal was *sent*, plus the duration, minus a
 * safety margin for clock skew. Every attempt of every write passes the fence (see
 * fenced-store.ts), which refuses it unless it can complete (`requestTimeoutMs`) before
 * `validUntil`. A holder that cannot renew therefore stops writing before its lease expires, and
 * anyone taking an expired lease (or waiting out a forced takeover) starts after the old holder
 * stopped. A renewal answered 412 by a record with another holder means the lease was taken: the
 * holder stops writing for good and reports the loss.
 *
 * The remaining window: a write the old holder sent in time but that the S3 server executes only
 * after the new holder has started writing (a request stuck in the server for longer than the
 * client's timeout). S3 offers no conditional write across two objects, so this cannot be closed
 * from the client; it is bounded by the server's own request handling, and assumes wall clocks
 * of the two hosts differ by less than the safety margin.
 */

import { randomUUID } from "node:crypto";
import { existsSync, readFileSync } from "node:fs";
import os from "node:os";
import { DEFAULT_REQUEST_TIMEOUT_MS, StoreError, type ObjectStore } from "../store/object-store.js";
import type { Fence } from "../store/fenced-store.js";
import type { Clock } from "../util/clock.js";

export const LEASE_FORMAT = "s3blk-lease";

export interface LeaseHolder {
  readonly id: string;
  readonly host: string;
  readonly pid: number;
  /** This boot of the host (Linux), so a pid is never mistaken across reboots. */
  readonly bootId?: string;
  /** The process's start time in clock ticks since boot (Linux), against pid reuse. */
  readonly startTicks?: string;
}

export interface LeaseRecord {
  readonly format: typeof LEASE_FORMAT;
  readonly version: 1;
  readonly epoch: number;
  /** `null` once released. */
  readonly holder: LeaseHolder | null;
  /** Wall-clock milliseconds since 1970 at which the lease lapses unless renewed. */
  readonly expiresAtMs: number;
  readonly durationMs: number;
}

export interface LeaseOptions {
  /** How long a lease lasts without renewal. Default 60 s. */
  readonly durationMs?: number;
  /** Take a live lease from its holder (after waiting out its expiry). Default false. */
  readonly force?: boolean;
  /** A write must be able to finish this long before the lease lapses. Default 15 s. */
  readonly requestTimeoutMs?: number;
  /** Allowance for wall clocks that disagree between hosts. Default 5 s. */
  readonly clockSkewMs?: number;
  /** Told when the lease is lost to another holder. */
  readonly onLost?: (error: LeaseLostError) => void;
  /** Told of anything worth a log line (waiting for a takeover, renewal trouble). */
  readonly log?: (line: string) => void;
  /** Wall clock, ms since 1970. Default Date.now. */
  readonly wallClockMs?: () => number;
}

/** Another process holds the lease. */
export class LeaseHeldError extends Error {
  override readonly name = "LeaseHeldError";
  constructor(
    readonly record: LeaseRecord,
    nowMs: number,
  ) {
    const h = record.holder;
    super(
      `volume is in use by ${h === null ? "nobody" : `pid ${h.pid} on ${h.host}`} ` +
        `(lease epoch ${record.epoch}, expires in ${Math.max(0, Math.round((record.expiresAtMs - nowMs) / 1000))} s); ` +
        `use --force to take it over`,
    );
  }
}

/**
 * Lease timings that cannot work. A renewal is sent a quarter of the duration after the one
 * before, and may take up to a request timeout to answer; until it does, the fence counts from
 * the one before. Writes stay admitted throughout only if `durationMs × 3/4 > 2 ×
 * requestTimeoutMs + clockSkewMs`; otherwise a healthy holder would refuse its own writes while
 * a renewal is on its way.
 */
export class LeaseTimingError extends Error {
  override readonly name = "LeaseTimingError";
}

/** The defaults of {@link LeaseOptions}. */
export const DEFAULT_LEASE_TIMING = Object.freeze({
  durationMs: 60_000,
  requestTimeoutMs: DEFAULT_REQUEST_TIMEOUT_MS,
  clockSkewMs: 5_000,
});

/** The timings `options` ask for, defaults filled in; throws {@link LeaseTimingError}. */
export function leaseTiming(
  options: LeaseOptions,
): Required<Pick<LeaseOptions, "durationMs" | "requestTimeoutMs" | "clockSkewMs">> {
  const timing = {
    durationMs: options.durationMs ?? DEFAULT_LEASE_TIMING.durationMs,
    requestTimeoutMs: options.requestTimeoutMs ?? DEFAULT_LEASE_TIMING.requestTimeoutMs,
    clockSkewMs: options.clockSkewMs ?? DEFAULT_LEASE_TIMING.clockSkewMs,
  };
  const neededMs = ((2 * timing.requestTimeoutMs + timing.clockSkewMs) * 4) / 3;
  if (!(timing.durationMs > neededMs)) {
    throw new LeaseTimingError(
      `a lease of ${timing.durationMs / 1000} s is too short: with a request timeout of ` +
        `${timing.requestTimeoutMs / 1000} s and a clock-skew margin of ${timing.clockSkewMs / 1000} s ` +
        `it must last more than ${Math.ceil(neededMs / 1000)} s`,
    );
  }
  return timing;
}

/** This process lost the lease: it must not write again. */
export class LeaseLostError extends Error {
  override readonly name = "LeaseLostError";
}

type LeaseSettings = LeaseOptions &
  Required<Pick<LeaseOptions, "durationMs" | "requestTimeoutMs" | "clockSkewMs">>;

export function leaseKey(prefix: string): string {
  return prefix === "" ? "lease.json" : `${prefix.replace(/\/+$/, "")}/lease.json`;
}

export class Lease {
  readonly key: string;
  #record: LeaseRecord;
  #etag: string;
  #validUntilMs: number;
  #lost: LeaseLostError | undefined;
  #cancelRenewal: (() => void) | undefined;
  #renewing: Promise<void> | undefined;
  /** When the last renewal (or the acquisition) was sent, on the monotonic clock. */
  #lastSentAtMs: number;
  #released = false;
  readonly #store: ObjectStore;
  readonly #clock: Clock;
  readonly #options: LeaseSettings;
  readonly #wallMs: () => number;

  private constructor(
    store: ObjectStore,
    key: string,
    record: LeaseRecord,
    etag: string,
    sentAtMs: number,
    clock: Clock,
    options: LeaseSettings,
  ) {
    this.#store = store;
    this.key = key;
    this.#record = record;
    this.#etag = etag;
    this.#clock = clock;
    this.#options = options;
    this.#wallMs = options.wallClockMs ?? Date.now;
    this.#validUntilMs = sentAtMs + options.durationMs - options.clockSkewMs;
    this.#lastSentAtMs = sentAtMs;
  }

  /** Take the lease of the volume at `prefix`, and arm `fence` with it. */
  static async acquire(
    store: ObjectStore,
    prefix: string,
    fence: Fence,
    clock: Clock,
    options: LeaseOptions = {},
  ): Promise<Lease> {
    const settings = { ...options, ...leaseTiming(options) };
    const wallMs = options.wallClockMs ?? Date.now;
    const key = leaseKey(prefix);
    const me = currentHolder();
    // The wait a forced takeover owes the live holder it displaces: kept across attempts, so
    // that a PUT of ours that landed unanswered (found on the next look) still waits it out.
    let waitUntilWallMs = 0;
    let displaced: LeaseHolder | undefined;
    const waitOutDisplaced = async () => {
      if (waitUntilWallMs <= wallMs()) return;
      const waitMs = waitUntilWallMs - wallMs();
      options.log?.(
        `took over the lease from pid ${displaced?.pid} on ${displaced?.host}; ` +
          `waiting ${Math.ceil(waitMs / 1000)} s for its lease to lapse before writing`,
      );
      await clock.sleep(waitMs);
    };
    for (let attempt = 0; attempt < 10; attempt++) {
      const got = await store.get(key);
      const previous = got === undefined ? undefined : parseRecord(got.body, key);
      if (previous?.holder?.id === me.id && got !== undefined) {
        // Our own PUT landed though its answer was lost.
        const lease = new Lease(
          store,
          key,
          previous,
          got.etag,
          clock.nowMs() - settings.durationMs / 2,
          clock,
          settings,
        );
        lease.#arm(fence);
        lease.#scheduleRenewal();
        await waitOutDisplaced();
        return lease;
      }
      const nowMs = wallMs();
      if (previous !== undefined && previous.holder !== null && previous.expiresAtMs > nowMs) {
        if (!isAbandoned(previous.holder)) {
          if (!settings.force) throw new LeaseHeldError(previous, nowMs);
          waitUntilWallMs = Math.max(waitUntilWallMs, previous.expiresAtMs + settings.clockSkewMs);
          displaced = previous.holder;
        }
      }
      const record: LeaseRecord = {
        format: LEASE_FORMAT,
        version: 1,
        epoch: (previous?.epoch ?? 0) + 1,
        holder: me,
        expiresAtMs: nowMs + settings.durationMs,
        durationMs: settings.durationMs,
      };
      const sentAtMs = clock.nowMs();
      let etag: string;
      try {
        ({ etag } = await store.put(
          key,
          encodeRecord(record),
          got === undefined ? { ifNoneMatch: "*" } : { ifMatch: got.etag },
        ));
      } catch (error) {
        if (error instanceof StoreError && error.code === "PreconditionFailed") continue; // raced: look again
        throw error;
      }
      const lease = new Lease(store, key, record, etag, sentAtMs, clock, settings);
      lease.#arm(fence);
      lease.#scheduleRenewal();
      await waitOutDisplaced();
      return lease;
    }
    throw new StoreError("Transient", `could not take ${key}: it kept changing under us`);
  }

  /** This term's epoch: it grows with every new holder, and never repeats. */
  get epoch(): number {
    return this.#record.epoch;
  }

  /** This acquisition's random id, as written in the record. */
  get holderId(): string {
    return this.#record.holder?.id ?? "";
  }

  /** Set once the lease was lost to another holder. */
  get lost(): LeaseLostError | undefined {
    return this.#lost;
  }

  #arm(fence: Fence): void {
    fence.arm(() => {
      if (this.#lost !== undefined) return new StoreError("Fenced", this.#lost.message);
      if (this.#released) return new StoreError("Fenced", "the lease was released");
      if (this.#clock.nowMs() + this.#options.requestTimeoutMs > this.#validUntilMs) {
        return new StoreError(
          "Fenced",
          `the lease (epoch ${this.epoch}) could not be renewed in time; not writing`,
        );
      }
      return undefined;
    }, this.key);
  }

  /**
   * Renew a quarter of the duration after the last renewal was *sent*, not after it ended: the
   * validity counts from the send, so a slow renewal must not push the next one later.
   */
  #scheduleRenewal(): void {
    if (this.#released || this.#lost !== undefined) return;
    const dueMs = this.#lastSentAtMs + this.#options.durationMs / 4;
    this.#cancelRenewal = this.#clock.schedule(
      () => {
        this.#renewing = this.renew().finally(() => {
          this.#renewing = undefined;
          this.#scheduleRenewal();
        });
      },
      Math.max(0, dueMs - this.#clock.nowMs()),
    );
  }

  /** Extend the lease now. Failures are reported through `onLost`/`log`, never thrown. */
  async renew(): Promise<void> {
    if (this.#released || this.#lost !== undefined) return;
    const record = { ...this.#record, expiresAtMs: this.#wallMs() + this.#options.durationMs };
    const sentAtMs = this.#clock.nowMs();
    this.#lastSentAtMs = sentAtMs;
    try {
      const { etag } = await this.#store.put(this.key, encodeRecord(record), {
        ifMatch: this.#etag,
      });
      this.#record = record;
      this.#etag = etag;
      this.#validUntilMs = sentAtMs + this.#options.durationMs - this.#options.clockSkewMs;
    } catch (error) {
      if (!(error instanceof StoreError) || error.code !== "PreconditionFailed") {
        this.#options.log?.(`lease renewal failed: ${(error as Error).message}`);
        return;
      }
      const now = await this.#store.get(this.key).catch(() => undefined);
      const current = now === undefined ? undefined : parseRecord(now.body, this.key);
      if (
        now !== undefined &&
        current?.holder?.id === this.#record.holder?.id &&
        current?.epoch === this.epoch
      ) {
        // Our retried renewal had landed already.
        this.#record = current;
        this.#etag = now.etag;
        this.#validUntilMs = sentAtMs + this.#options.durationMs - this.#options.clockSkewMs;
        return;
      }
      const by = current?.holder;
      this.#lost = new LeaseLostError(
        `lost the lease (epoch ${this.epoch}) to ${by === undefined || by === null ? "another process" : `pid ${by.pid} on ${by.host}`} ` +
          `(epoch ${current?.epoch ?? "?"}); writes are refused`,
      );
      this.#cancelRenewal?.();
      this.#options.onLost?.(this.#lost);
    }
  }

  /** Stop renewing and mark the lease free, so the next writer need not wait. */
  async release(): Promise<void> {
    if (this.#released) return;
    this.#released = true;
    this.#cancelRenewal?.();
    await this.#renewing;
    if (this.#lost !== undefined) return;
    const record: LeaseRecord = { ...this.#record, holder: null, expiresAtMs: 0 };
    await this.#store
      .put(this.key, encodeRecord(record), { ifMatch: this.#etag })
      .catch((error: unknown) => {
        this.#options.log?.(`could not release the lease: ${(error as Error).message}`);
      });
  }

  /** Stop renewing without releasing, as a crash would leave it. */
  abandon(): void {
    this.#released = true;
    this.#cancelRenewal?.();
  }
}

function encodeRecord(record: LeaseRecord): Uint8Array {
  return Buffer.from(`${JSON.stringify(record)}\n`);
}

function parseRecord(bytes: Uint8Array, key: string): LeaseRecord {
  try {
    const record = JSON.parse(Buffer.from(bytes).toString("utf8")) as LeaseRecord;
    if (record.format === LEASE_FORMAT && Number.isSafeInteger(record.epoch)) return record;
  } catch {
    // fall through
  }
  throw new StoreError("Permanent", `${key} is not an s3blk lease record`);
}

let processHolder: Omit<LeaseHolder, "id"> | undefined;

/** Who we are: a fresh id for every acquisition, plus what identifies this process. */
function currentHolder(): LeaseHolder {
  processHolder ??= {
    host: os.hostname(),
    pid: process.pid,
    ...linuxIdentity(process.pid),
  };
  return { id: randomUUID(), ...processHolder };
}

function linuxIdentity(pid: number): { bootId?: string; startTicks?: string } {
  try {
    const bootId = readFileSync("/proc/sys/kernel/random/boot_id", "utf8").trim();
    const startTicks = processStartTicks(pid);
    return startTicks === undefined ? { bootId } : { bootId, startTicks };
  } catch {
    return {};
  }
}

function processStartTicks(pid: number): string | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    // Fields after the command name (which may hold spaces), 1-based: starttime is field 22.
    return stat.slice(stat.lastIndexOf(")") + 2).split(" ")[19];
  } catch {
    return undefined;
  }
}

/** True if `holder` was a process on this very boot of this host that is gone now. */
function isAbandoned(holder: LeaseHolder): boolean {
  if (holder.host !== os.hostname() || holder.bootId === undefined) return false;
  const mine = linuxIdentity(process.pid);
  if (mine.bootId !== holder.bootId) return false;
  if (!existsSync(`/proc/${holder.pid}`)) return true;
  return holder.startTicks !== undefined && processStartTicks(holder.pid) !== holder.startTicks;
}
