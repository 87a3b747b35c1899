/**
 * One writer at a time: the volume's lease, at a cost per process rather than per volume.
 *
 * Two records (lease-records.ts; docs/format.md, "The lease"):
 *
 * - the **process lease** `s3blk-processes/<id>.json`, one per process and key space (bucket),
 *   renewed every half of its duration D (default 120 s: one PUT a minute, however many volumes
 *   the process serves there), deleted when the process releases its last volume there
 *   (process-lease.ts);
 * - the volume's **claim** `<prefix>/lease.json`, written once per acquisition with a
 *   conditional PUT (`If-None-Match: *` or `If-Match`): epoch + 1 (epochs grow with every writer
 *   term, and chunk generations depend on it), the holder, and the key of its process lease. It
 *   is never renewed (but see "older s3blk" below); release writes it back with no holder.
 *
 * ## Is a claim held?
 *
 * Iff its process lease exists, has that holder, has not expired, is not an abandoned process of
 * this host (same boot, and no process with that pid and start time: a crashed holder on this
 * host is taken over at once), and does not list the claim (key, epoch) as revoked. A claim of
 * the old kind (version 1, renewed by an older s3blk) is held while it has a holder and has not
 * expired, and is not abandoned, as before.
 *
 * ## Taking a claim
 *
 * Free: taken. Held: refused, naming the holder, unless `force`. A claim whose process lease
 * still exists (held and forced, expired, or already revoked) is taken in three steps: write
 * the revocation `{key, epoch}` into that process lease with `If-Match` (on 412, read again and
 * decide again); write the claim (epoch + 1); then, unless the process lease had expired, wait
 * until its `expiresAtMs` as the revocation found it, plus the clock-skew margin, before this
 * open returns and anything is written. The old process's next renewal gets 412 (the entity tag
 * changed), reads its record again, marks the revoked volume lost (its fence refuses; `onLost`
 * is told), and renews again keeping the rest.
 *
 * ## Fencing, and why a revoked holder cannot write after the taker starts
 *
 * Each volume's fence (fenced-store.ts, below the retries, so every attempt is checked) admits
 * a write iff the volume was not revoked, is not released, and the process lease's validity
 * covers the request timeout: validity is the monotonic time the last successful renewal was
 * *sent*, plus D, minus the skew margin. A holder that cannot renew therefore stops writing
 * before its lease lapses, and resumes once a renewal succeeds, unless a volume was taken
 * meanwhile: a taker revokes through the very record the holder renews, so the renewal fails
 * first.
 *
 * Let R be the process record the revocation replaced (its `If-Match` held), and E its
 * `expiresAtMs`. R is what the old process's last renewal before the revocation wrote; that
 * renewal was sent at wall time E − D, and validity counts from no later a send. Every later
 * renewal of the old process carries R's entity tag (answered 412) or that of a record it read
 * afterwards, and on reading one it marks the revoked volume lost *before* it sends again: so
 * that volume's validity never grows past the send of R, and its fence lets an attempt out only
 * if it ends (the client abandons it) by E − skew on the old host's clock. The taker writes
 * nothing before E + skew on its own clock: with clocks that differ by less than the skew, after
 * every attempt the old holder admitted. A process lease that had already expired is revoked
 * too, for the same reason: otherwise a holder that was only slow could renew it back to life
 * and resume beside the taker. (An expired lease needs no wait: E is past.)
 *
 * What is left: an attempt the old holder sent in time but that the S3 server executes only after
 * the taker began (held inside the server longer than the client's timeout); S3 has no
 * conditional write across two objects, so a client cannot close it. Format version 2 makes such
 * a write harmless: the taker's term seals its map before writing, and a late write of an ended
 * term is never read.
 *
 * **Timing.** Renewals every D/2, each answered within a request timeout T, must keep the
 * validity above the request timeout: D/2 > 2 × T + skew, so D > 70 s with T = 15 s and a 5 s
 * skew ({@link LeaseTimingError}). A crashed holder on another host is taken over D + skew after
 * its last renewal at most (about two minutes by default); a live one with `force`, after D/2 to
 * D + skew; one on this host, at once.
 *
 * **Older s3blk.** A version 2 claim carries an `expiresAtMs` about 24 days ahead (under 2^31 ms,
 * so that an older s3blk's wait on it never overflows setTimeout), so an older s3blk, which reads
 * only the claim, refuses it, or with `--force` waits 24 days. So that this stays true while a
 * process runs longer than that, a claim with less than half of that left is written again (same
 * epoch) after a renewal: one PUT per volume every 12 days. If that PUT finds the claim taken, the
 * volume is lost.
 */

import { StoreError, DEFAULT_REQUEST_TIMEOUT_MS, type ObjectStore } from "../store/object-store.js";
import type { Fence } from "../store/fenced-store.js";
import type { Clock } from "../util/clock.js";
import {
  LEASE_FORMAT,
  currentHolder,
  encodeRecord,
  isAbandoned,
  leaseKey,
  parseClaim,
  parseProcessRecord,
  processLeaseId,
  sameProcess,
  type LeaseHolder,
  type LeaseRecord,
  type ProcessLeaseRecord,
} from "./lease-records.js";
import { ProcessLeases, type LossReason, type ProcessLease } from "./process-lease.js";

export {
  LEASE_FORMAT,
  PROCESS_LEASE_FORMAT,
  leaseKey,
  processLeaseKey,
  type LeaseHolder,
  type LeaseRecord,
  type ProcessLeaseRecord,
  type RevokedClaim,
} from "./lease-records.js";
export { ProcessLeases } from "./process-lease.js";

export interface LeaseOptions {
  /**
   * How long the process lease lasts without renewal; it is renewed every half of it. A crashed
   * holder on another host is taken over about this long after its last renewal. Default 120 s.
   */
  readonly durationMs?: number;
  /** Take a live lease from its holder (after waiting out its process lease). Default false. */
  readonly force?: boolean;
  /** A write must be able to finish this long before the lease lapses. Default 15 s. */
  readonly requestTimeoutMs?: number;
  /** Allowance for wall clocks that disagree between hosts. Default 5 s. */
  readonly clockSkewMs?: number;
  /**
   * The process's leases, one per key space, shared by every volume opened with it (`s3blk
   * serve` makes one): then renewals cost one request per space, not per volume. Default: a
   * private one for this open. The first open in a space sets its `durationMs` and
   * `clockSkewMs`; later opens there must ask for the same.
   */
  readonly processLeases?: ProcessLeases;
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
  /**
   * `record`: the claim; `expiresAtMs`: when the hold lapses unless renewed (the holder's process
   * lease's expiry; a version 1 claim's own).
   */
  constructor(
    readonly record: LeaseRecord,
    nowMs: number,
    expiresAtMs: number = record.expiresAtMs,
  ) {
    const h = record.holder;
    super(
      `volume is in use by ${h === null ? "nobody" : `pid ${h.pid} on ${h.host}`} ` +
        `(lease epoch ${record.epoch}, expires in ${Math.max(0, Math.round((expiresAtMs - nowMs) / 1000))} s); ` +
        `use --force to take it over`,
    );
  }
}

/**
 * Lease timings that cannot work. A renewal is sent half the duration after the one before, and
 * may take up to a request timeout to answer; until it does, the fence counts from the one
 * before. Writes stay admitted throughout only if `durationMs / 2 > 2 × requestTimeoutMs +
 * clockSkewMs`; otherwise a healthy holder would refuse its own writes while a renewal is on its
 * way. A lease of more than a day is refused too (a takeover would wait that long).
 */
export class LeaseTimingError extends Error {
  override readonly name = "LeaseTimingError";
}

/** The defaults of {@link LeaseOptions}. */
export const DEFAULT_LEASE_TIMING = Object.freeze({
  durationMs: 120_000,
  requestTimeoutMs: DEFAULT_REQUEST_TIMEOUT_MS,
  clockSkewMs: 5_000,
});

/** The longest lease: a forced takeover waits up to this long, on one timer. */
const MAX_DURATION_MS = 86_400_000;

/** The timings `options` ask for, defaults filled in; throws {@link LeaseTimingError}. */
export function leaseTiming(
  options: LeaseOptions,
): Required<Pick<LeaseOptions, "durationMs" | "requestTimeoutMs" | "clockSkewMs">> {
  const timing = {
    durationMs: options.durationMs ?? DEFAULT_LEASE_TIMING.durationMs,
    requestTimeoutMs: options.requestTimeoutMs ?? DEFAULT_LEASE_TIMING.requestTimeoutMs,
    clockSkewMs: options.clockSkewMs ?? DEFAULT_LEASE_TIMING.clockSkewMs,
  };
  const neededMs = 2 * (2 * timing.requestTimeoutMs + timing.clockSkewMs);
  if (!(timing.durationMs > neededMs)) {
    throw new LeaseTimingError(
      `a lease of ${timing.durationMs / 1000} s is too short: it is renewed every half of it, so ` +
        `with a request timeout of ${timing.requestTimeoutMs / 1000} s and a clock-skew margin ` +
        `of ${timing.clockSkewMs / 1000} s it must last more than ${Math.ceil(neededMs / 1000)} s`,
    );
  }
  if (timing.durationMs > MAX_DURATION_MS) {
    throw new LeaseTimingError(`a lease of ${timing.durationMs / 1000} s is longer than a day`);
  }
  return timing;
}

/** This process lost the lease: it must not write again. */
export class LeaseLostError extends Error {
  override readonly name = "LeaseLostError";
}

type LeaseSettings = LeaseOptions &
  Required<Pick<LeaseOptions, "durationMs" | "requestTimeoutMs" | "clockSkewMs">>;

/**
 * How far ahead a version 2 claim's `expiresAtMs` is: 24 days, under 2^31 ms with room for an
 * older s3blk's skew margin. Written again once less than half of it is left.
 */
export const CLAIM_HORIZON_MS = 24 * 86_400_000;

/** What the look at a claim decided. */
type Decision =
  | { readonly take: true; readonly waitUntilWallMs?: number; readonly displaced?: LeaseHolder }
  | { readonly take: false }; // something changed under us: look again

// A ClaimMember of its process lease (structurally: that interface is internal).
export class Lease {
  readonly key: string;
  readonly store: ObjectStore;
  #claim: LeaseRecord;
  #claimEtag = "";
  #lost: LeaseLostError | undefined;
  #released = false;
  #refreshing: Promise<void> | undefined;
  readonly #process: ProcessLease;
  readonly #clock: Clock;
  readonly #settings: LeaseSettings;
  readonly #wallMs: () => number;

  private constructor(
    store: ObjectStore,
    key: string,
    claim: LeaseRecord,
    processLease: ProcessLease,
    clock: Clock,
    settings: LeaseSettings,
  ) {
    this.store = store;
    this.key = key;
    this.#claim = claim;
    this.#process = processLease;
    this.#clock = clock;
    this.#settings = settings;
    this.#wallMs = settings.wallClockMs ?? Date.now;
  }

  /** Take the lease of the volume at `prefix`, and arm `fence` with it. */
  static async acquire(
    store: ObjectStore,
    prefix: string,
    fence: Fence,
    clock: Clock,
    options: LeaseOptions = {},
  ): Promise<Lease> {
    const settings: LeaseSettings = { ...options, ...leaseTiming(options) };
    const wallMs = options.wallClockMs ?? Date.now;
    const registry = options.processLeases ?? new ProcessLeases();
    const { lease: processLease, token } = registry.reserve(store, {
      durationMs: settings.durationMs,
      clockSkewMs: settings.clockSkewMs,
      clock,
      wallClockMs: wallMs,
      ...(options.log === undefined ? {} : { log: options.log }),
    });
    try {
      if (
        processLease.durationMs !== settings.durationMs ||
        processLease.clockSkewMs !== settings.clockSkewMs
      ) {
        throw new LeaseTimingError(
          `this process's lease in ${processLease.space} lasts ${processLease.durationMs / 1000} s ` +
            `with a skew margin of ${processLease.clockSkewMs / 1000} s; an open in the same ` +
            `space cannot ask for ${settings.durationMs / 1000} s and ${settings.clockSkewMs / 1000} s`,
        );
      }
      const key = leaseKey(prefix);
      // The lease's own records pass the fence, whatever it was armed with before.
      fence.exempt(key, processLease.key);
      await processLease.ready(store);
      return await Lease.#take(store, key, fence, processLease, clock, settings);
    } finally {
      await processLease.unreserve(token);
    }
  }

  static async #take(
    store: ObjectStore,
    key: string,
    fence: Fence,
    processLease: ProcessLease,
    clock: Clock,
    settings: LeaseSettings,
  ): Promise<Lease> {
    const wallMs = settings.wallClockMs ?? Date.now;
    const me = currentHolder();
    // The wait a takeover owes the holder it displaces: kept across attempts, so that a PUT of
    // ours that landed unanswered (found on the next look) still waits it out.
    let waitUntilWallMs = 0;
    let displaced: LeaseHolder | undefined;
    for (let attempt = 0; attempt < 10; attempt++) {
      const got = await store.get(key);
      const previous = got === undefined ? undefined : parseClaim(got.body, key);
      const claim: LeaseRecord = {
        format: LEASE_FORMAT,
        version: 2,
        epoch: (previous?.epoch ?? 0) + 1,
        holder: me,
        process: processLease.key,
        expiresAtMs: wallMs() + CLAIM_HORIZON_MS,
        durationMs: processLease.durationMs,
      };
      let lease: Lease;
      if (previous?.holder?.id === me.id && got !== undefined) {
        // Our own PUT landed though its answer was lost.
        lease = new Lease(store, key, previous, processLease, clock, settings);
        processLease.attach(lease);
        lease.#claimEtag = got.etag;
      } else {
        const decision = await Lease.#decide(
          store,
          key,
          previous,
          fence,
          processLease,
          me,
          settings,
        );
        if (!decision.take) continue;
        if (decision.waitUntilWallMs !== undefined) {
          waitUntilWallMs = Math.max(waitUntilWallMs, decision.waitUntilWallMs);
          displaced = decision.displaced;
        }
        lease = new Lease(store, key, claim, processLease, clock, settings);
        processLease.attach(lease); // before the claim exists, so a revocation finds it
        try {
          ({ etag: lease.#claimEtag } = await store.put(
            key,
            encodeRecord(claim),
            got === undefined ? { ifNoneMatch: "*" } : { ifMatch: got.etag },
          ));
        } catch (error) {
          processLease.detach(lease);
          if (error instanceof StoreError && error.code === "PreconditionFailed") continue; // raced
          throw error;
        }
      }
      lease.#arm(fence);
      if (waitUntilWallMs > wallMs()) {
        const waitMs = waitUntilWallMs - wallMs();
        settings.log?.(
          `took over the lease from pid ${displaced?.pid} on ${displaced?.host}; ` +
            `waiting ${Math.ceil(waitMs / 1000)} s for its lease to lapse before writing`,
        );
        await clock.sleep(waitMs);
      }
      return lease;
    }
    throw new StoreError("Transient", `could not take ${key}: it kept changing under us`);
  }

  /**
   * Whether the claim `previous` may be taken, and what it costs: refused (LeaseHeldError), a
   * revocation written into the holder's process lease, a wait.
   */
  static async #decide(
    store: ObjectStore,
    key: string,
    previous: LeaseRecord | undefined,
    fence: Fence,
    processLease: ProcessLease,
    me: LeaseHolder,
    settings: LeaseSettings,
  ): Promise<Decision> {
    const wallMs = settings.wallClockMs ?? Date.now;
    const holder = previous?.holder;
    if (previous === undefined || holder === undefined || holder === null) return { take: true };
    const nowMs = wallMs();
    if (previous.version === 1) {
      // The old kind, renewed by an older s3blk: its own expiry says.
      if (previous.expiresAtMs <= nowMs || isAbandoned(holder)) return { take: true };
      if (!settings.force) throw new LeaseHeldError(previous, nowMs);
      return {
        take: true,
        waitUntilWallMs: previous.expiresAtMs + settings.clockSkewMs,
        displaced: holder,
      };
    }
    const processKey = previous.process ?? "";
    if (processKey === processLease.key) {
      // Our own process lease: we know whether we write it.
      const member = processLease.member(key, previous.epoch);
      if (member === undefined || member.lost !== undefined) return { take: true };
      if (!settings.force) {
        throw new LeaseHeldError(previous, nowMs, processLease.record.expiresAtMs);
      }
      member.lose({ kind: "revoked", by: me });
      // Refused from now on; what it sent already ends within a request timeout.
      return {
        take: true,
        waitUntilWallMs: nowMs + settings.requestTimeoutMs + settings.clockSkewMs,
        displaced: holder,
      };
    }
    fence.exempt(processKey); // a revocation, or the deletion of a crashed process's record
    const got = await store.get(processKey);
    const record = got === undefined ? undefined : parseProcessRecord(got.body);
    if (
      got === undefined ||
      record === undefined ||
      record.holder.id !== processLeaseId(processKey) ||
      !sameProcess(record.holder, holder)
    ) {
      return { take: true }; // its process released everything, or never was
    }
    if (isAbandoned(record.holder)) {
      // A crashed process of this host: it renews nothing any more. Its record goes too.
      await store.delete(processKey).catch(() => {});
      return { take: true };
    }
    const expired = record.expiresAtMs <= nowMs;
    const revoked = record.revoked.some((r) => r.key === key && r.epoch === previous.epoch);
    if (!expired && !revoked && !settings.force) {
      throw new LeaseHeldError(previous, nowMs, record.expiresAtMs);
    }
    if (
      !revoked &&
      !(await Lease.#revoke(store, processKey, got.etag, record, key, previous, me))
    ) {
      return { take: false };
    }
    return expired
      ? { take: true }
      : {
          take: true,
          waitUntilWallMs: record.expiresAtMs + settings.clockSkewMs,
          displaced: holder,
        };
  }

  /** Add the revocation of `claim` to a process lease; false if it changed meanwhile. */
  static async #revoke(
    store: ObjectStore,
    processKey: string,
    etag: string,
    record: ProcessLeaseRecord,
    key: string,
    claim: LeaseRecord,
    me: LeaseHolder,
  ): Promise<boolean> {
    const revoked: ProcessLeaseRecord = {
      ...record,
      revoked: [...record.revoked, { key, epoch: claim.epoch, by: { host: me.host, pid: me.pid } }],
    };
    try {
      await store.put(processKey, encodeRecord(revoked), { ifMatch: etag });
      return true;
    } catch (error) {
      // Renewed (or revoked) meanwhile, or a retried PUT of ours that landed: look again.
      if (error instanceof StoreError && error.code === "PreconditionFailed") return false;
      throw error;
    }
  }

  /** This term's epoch: it grows with every new holder, and never repeats. */
  get epoch(): number {
    return this.#claim.epoch;
  }

  /** This acquisition's random id, as written in the claim. */
  get holderId(): string {
    return this.#claim.holder?.id ?? "";
  }

  /** Set once the lease was lost to another holder. */
  get lost(): LeaseLostError | undefined {
    return this.#lost;
  }

  /** @internal */
  lose(reason: LossReason): void {
    if (this.#lost !== undefined || this.#released) return;
    const by = reason.kind === "revoked" ? reason.by : undefined;
    this.#lost = new LeaseLostError(
      reason.kind === "gone"
        ? `lost the lease ${this.key} (epoch ${this.epoch}): ${reason.detail}; writes are refused`
        : `lost the lease ${this.key} (epoch ${this.epoch}) to ` +
            `${by === undefined ? "another process" : `pid ${by.pid} on ${by.host}`}, which took ` +
            `it over; writes are refused`,
    );
    this.#settings.onLost?.(this.#lost);
  }

  /** @internal After each renewal: write the claim again if its horizon draws near. */
  renewed(): void {
    if (this.#lost !== undefined || this.#released || this.#refreshing !== undefined) return;
    if (this.#claim.expiresAtMs - this.#wallMs() > CLAIM_HORIZON_MS / 2) return;
    this.#refreshing = this.#refreshClaim().finally(() => (this.#refreshing = undefined));
  }

  async #refreshClaim(): Promise<void> {
    const claim = { ...this.#claim, expiresAtMs: this.#wallMs() + CLAIM_HORIZON_MS };
    try {
      const { etag } = await this.store.put(this.key, encodeRecord(claim), {
        ifMatch: this.#claimEtag,
      });
      this.#claim = claim;
      this.#claimEtag = etag;
    } catch (error) {
      if (!(error instanceof StoreError) || error.code !== "PreconditionFailed") {
        this.#settings.log?.(`could not rewrite ${this.key}: ${(error as Error).message}`);
        return;
      }
      const got = await this.store.get(this.key).catch(() => undefined);
      const now = got === undefined ? undefined : parseClaim(got.body, this.key);
      if (got !== undefined && now?.holder?.id === this.holderId && now.epoch === this.epoch) {
        this.#claim = now; // a retried PUT of ours had landed
        this.#claimEtag = got.etag;
        return;
      }
      this.lose({
        kind: "gone",
        detail:
          `${this.key} was taken over` +
          (now?.holder
            ? ` by pid ${now.holder.pid} on ${now.holder.host} (epoch ${now.epoch})`
            : ""),
      });
    }
  }

  #arm(fence: Fence): void {
    fence.arm(
      () => {
        if (this.#lost !== undefined) return new StoreError("Fenced", this.#lost.message);
        if (this.#released) return new StoreError("Fenced", "the lease was released");
        if (this.#clock.nowMs() + this.#settings.requestTimeoutMs > this.#process.validUntilMs) {
          return new StoreError(
            "Fenced",
            `the lease (epoch ${this.epoch}) could not be renewed in time; not writing`,
          );
        }
        return undefined;
      },
      this.key,
      this.#process.key,
    );
  }

  /** Stop, and mark the claim free, so the next writer need not wait. */
  async release(): Promise<void> {
    if (this.#released) return;
    this.#released = true;
    await this.#refreshing;
    if (this.#lost !== undefined) return this.#process.leave(this, "released");
    const freed: LeaseRecord = {
      format: LEASE_FORMAT,
      version: 2,
      epoch: this.epoch,
      holder: null,
      expiresAtMs: 0,
      durationMs: this.#claim.durationMs,
    };
    let how: "released" | "unreleased" = "released";
    try {
      await this.store.put(this.key, encodeRecord(freed), { ifMatch: this.#claimEtag });
    } catch (error) {
      // Taken over meanwhile (412): nothing of ours to free. Otherwise it is revoked instead.
      if (!(error instanceof StoreError) || error.code !== "PreconditionFailed") {
        this.#settings.log?.(`could not release the lease: ${(error as Error).message}`);
        how = "unreleased";
      }
    }
    await this.#process.leave(this, how);
  }

  /** Stop without releasing, as a crash would leave it (no request). */
  abandon(): void {
    if (this.#released) return;
    this.#released = true;
    void this.#process.leave(this, "abandoned");
  }
}
