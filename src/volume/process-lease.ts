/**
 * The process lease: one renewed record per process and key space, to which every volume claim
 * of that process in that space points (lease.ts has the design and the safety argument).
 *
 * `s3blk-processes/<id>.json` is created with `If-None-Match: *` when the process opens its
 * first volume in the space, renewed with `If-Match` every half of its duration, counted from
 * the last renewal *sent* (a few seconds after a renewal failed), and deleted when the last of
 * its volumes there is released. A renewal goes through the store of any volume still attached,
 * whose fence exempts this key.
 *
 * Only two parties ever write the record: its process, and a process taking a claim over, which
 * adds `{key, epoch}` to `revoked` with `If-Match`. So a renewal answered 412 means a takeover:
 * the record is read again, every member it revokes is marked lost (its fence refuses from then
 * on, before any later renewal can extend the validity it counts on), and the renewal is sent
 * again over the new entity tag. A record that is gone, or names another holder, ends every
 * member.
 *
 * `revoked` is kept short: an entry stays while its member is attached here (a lost volume
 * still being served), and after that only while its claim still names this record and that
 * epoch (one GET per such entry and renewal), i.e. while a taker has not written the claim yet.
 *
 * States: creating → live → ended (deleted, or abandoned as a crash leaves it), or live → dead
 * (the record vanished or was replaced: every member lost). Only a live lease renews.
 */

import type { Clock } from "../util/clock.js";
import { StoreError, type ObjectStore } from "../store/object-store.js";
import {
  PROCESS_LEASE_FORMAT,
  currentHolder,
  encodeRecord,
  parseClaim,
  parseProcessRecord,
  processLeaseKey,
  type ProcessLeaseRecord,
  type RevokedClaim,
} from "./lease-records.js";

/** Why a member stops for good. */
export type LossReason =
  | { readonly kind: "revoked"; readonly by?: RevokedClaim["by"] }
  | { readonly kind: "gone"; readonly detail: string };

/** A volume's claim attached to a process lease: what the process lease needs of it. */
export interface ClaimMember {
  /** The claim's key. */
  readonly key: string;
  readonly epoch: number;
  /** The volume's store (the top of its stack): renewals may go through it. */
  readonly store: ObjectStore;
  /** Set once it stopped for good. */
  readonly lost: Error | undefined;
  /** Stop writing for good. Called once per reason at most; must not throw. */
  lose(reason: LossReason): void;
  /** Told after each successful renewal. */
  renewed(): void;
}

/** How a process lease is timed, and whom it tells. */
export interface ProcessLeaseSettings {
  readonly durationMs: number;
  readonly clockSkewMs: number;
  readonly clock: Clock;
  /** Wall clock, ms since 1970. */
  readonly wallClockMs: () => number;
  readonly log?: (line: string) => void;
}

/** The longest a renewal waits after one that failed. */
const RENEWAL_RETRY_MAX_MS = 5_000;
/** At most this many claims are read back per renewal to prune `revoked`. */
const MAX_PRUNE_READS = 16;

/**
 * The leases of one process, one per key space (bucket, directory, memory store): give every
 * volume opened in one process the same instance (`s3blk serve` makes one), and each space
 * costs one renewal per half duration whatever the number of volumes. An open without one gets
 * a private one, which renews for that volume alone.
 */
export class ProcessLeases {
  readonly #bySpace = new Map<string, ProcessLease>();

  /**
   * The process lease of `store`'s key space (a new one if there is none live), reserved for
   * the caller until it calls `unreserve`; `ready` creates it (through the first caller's
   * store).
   * @internal
   */
  reserve(
    store: ObjectStore,
    settings: ProcessLeaseSettings,
  ): { lease: ProcessLease; token: object } {
    const space = store.description;
    let lease = this.#bySpace.get(space);
    if (lease === undefined || !lease.joinable) {
      const created: ProcessLease = new ProcessLease(space, settings, () => {
        if (this.#bySpace.get(space) === created) this.#bySpace.delete(space);
      });
      lease = created;
      this.#bySpace.set(space, lease);
    }
    return { lease, token: lease.reserve(store) };
  }

  /** The keys of the process leases this process holds now, by key space. */
  held(): ReadonlyMap<string, string> {
    return new Map([...this.#bySpace].filter(([, l]) => l.joinable).map(([s, l]) => [s, l.key]));
  }
}

/**
 * One process lease in one key space.
 * @internal
 */
export class ProcessLease {
  readonly key: string;
  readonly space: string;
  readonly durationMs: number;
  readonly clockSkewMs: number;
  #record: ProcessLeaseRecord;
  #etag = "";
  /** Monotonic ms until which the record certainly holds: last successful send + D − skew. */
  #validUntilMs = -Infinity;
  #lastSentAtMs = 0;
  #lastFailed = false;
  #state: "creating" | "live" | "dead" | "ended" = "creating";
  #created: Promise<void> | undefined;
  readonly #members = new Set<ClaimMember>();
  /** Acquisitions in progress, with the store each may write through. */
  readonly #reserved = new Map<object, ObjectStore>();
  /** Members given up without their claim being freed: revoked at the next renewal. */
  #pending: RevokedClaim[] = [];
  #cancelTimer: (() => void) | undefined;
  #renewing: Promise<void> | undefined;
  /** The store the renewal in flight goes through. */
  #renewingThrough: ObjectStore | undefined;
  readonly #settings: ProcessLeaseSettings;
  readonly #onEnd: () => void;

  constructor(space: string, settings: ProcessLeaseSettings, onEnd: () => void) {
    const holder = currentHolder();
    this.key = processLeaseKey(holder.id);
    this.space = space;
    this.durationMs = settings.durationMs;
    this.clockSkewMs = settings.clockSkewMs;
    this.#settings = settings;
    this.#onEnd = onEnd;
    this.#record = {
      format: PROCESS_LEASE_FORMAT,
      version: 1,
      holder,
      expiresAtMs: 0,
      durationMs: settings.durationMs,
      revoked: [],
    };
  }

  /** Whether a new volume may join it. */
  get joinable(): boolean {
    return this.#state === "creating" || this.#state === "live";
  }

  /** The record as last written or read. */
  get record(): ProcessLeaseRecord {
    return this.#record;
  }

  /** Until when (monotonic ms) the lease certainly holds: a write must finish before it. */
  get validUntilMs(): number {
    return this.#state === "live" ? this.#validUntilMs : -Infinity;
  }

  /** The attached member holding claim `key` at `epoch`, if any. */
  member(key: string, epoch: number): ClaimMember | undefined {
    for (const m of this.#members) if (m.key === key && m.epoch === epoch) return m;
    return undefined;
  }

  reserve(store: ObjectStore): object {
    const token = {};
    this.#reserved.set(token, store);
    return token;
  }

  /** Created (once, through `store`) and live; throws if the creation failed. */
  async ready(store: ObjectStore): Promise<void> {
    this.#created ??= this.#create(store);
    await this.#created;
    if (this.#state !== "live") {
      throw new StoreError("Transient", `the process lease ${this.key} ended meanwhile`);
    }
  }

  /** Attach `member` before its claim is written, so that a revocation of it is recognised. */
  attach(member: ClaimMember): void {
    this.#members.add(member);
  }

  /** Take `member` off again: its claim was not written after all. */
  detach(member: ClaimMember): void {
    this.#members.delete(member);
  }

  /** End a reservation; the last one out, with no member left, deletes the record. */
  async unreserve(token: object): Promise<void> {
    const store = this.#reserved.get(token);
    this.#reserved.delete(token);
    if (store !== undefined) await this.#endIfUnused(store, false);
  }

  /**
   * `member` leaves: `released` (its claim was freed), `unreleased` (freeing it failed: it is
   * revoked at the next renewal, so nobody waits on it) or `abandoned` (as a crash would leave
   * it: no request; revoked at the next renewal if others keep the lease alive). The last member
   * out deletes the record, unless it abandons it.
   */
  async leave(member: ClaimMember, how: "released" | "unreleased" | "abandoned"): Promise<void> {
    if (!this.#members.delete(member)) return;
    if (how !== "released" && this.#state === "live") {
      this.#pending.push({ key: member.key, epoch: member.epoch });
    }
    await this.#endIfUnused(member.store, how === "abandoned");
  }

  async #create(store: ObjectStore): Promise<void> {
    const { clock, wallClockMs } = this.#settings;
    const record = { ...this.#record, expiresAtMs: wallClockMs() + this.durationMs };
    const body = encodeRecord(record);
    const sentAtMs = clock.nowMs();
    try {
      let etag: string;
      try {
        ({ etag } = await store.put(this.key, body, { ifNoneMatch: "*" }));
      } catch (error) {
        if (!(error instanceof StoreError) || error.code !== "PreconditionFailed") throw error;
        // The key is random: a 412 is our own retried PUT, which had landed.
        const got = await store.get(this.key);
        if (got === undefined || !Buffer.from(got.body).equals(body)) throw error;
        etag = got.etag;
      }
      this.#state = "live";
      this.#adopt(record, etag, sentAtMs, []);
      this.#schedule();
    } catch (error) {
      this.#state = "ended";
      this.#onEnd();
      throw error;
    }
  }

  #schedule(): void {
    if (this.#state !== "live") return;
    const { clock } = this.#settings;
    const retryMs = Math.min(RENEWAL_RETRY_MAX_MS, this.durationMs / 8);
    const dueMs = this.#lastSentAtMs + (this.#lastFailed ? retryMs : this.durationMs / 2);
    this.#cancelTimer = clock.schedule(
      () => {
        this.#cancelTimer = undefined;
        this.#renewing = this.#renew().finally(() => {
          this.#renewing = undefined;
          this.#renewingThrough = undefined;
          this.#schedule();
        });
      },
      Math.max(0, dueMs - clock.nowMs()),
    );
  }

  /** One renewal: sent again (a few times) over a record that a takeover changed. */
  async #renew(): Promise<void> {
    for (let round = 0; round < 4; round++) {
      const store = this.#anyStore();
      if (this.#state !== "live" || store === undefined) return;
      this.#renewingThrough = store;
      const considered = [...this.#pending];
      const revoked = await this.#revocationsToKeep(store);
      if (this.#state !== "live") return;
      const record = {
        ...this.#record,
        expiresAtMs: this.#settings.wallClockMs() + this.durationMs,
        revoked,
      };
      const body = encodeRecord(record);
      const sentAtMs = this.#settings.clock.nowMs();
      this.#lastSentAtMs = sentAtMs;
      let failure: unknown;
      try {
        const { etag } = await store.put(this.key, body, { ifMatch: this.#etag });
        this.#adopt(record, etag, sentAtMs, considered);
        return;
      } catch (error) {
        failure = error;
      }
      if (this.#state !== "live") return;
      if (failure instanceof StoreError && failure.code === "Transient")
        return this.#failed(failure);
      // A condition failed (or the answer is one we cannot read): see what is there now.
      let got;
      try {
        got = await store.get(this.key);
      } catch (error) {
        return this.#failed(error);
      }
      if (this.#state !== "live") return;
      const current = got === undefined ? undefined : parseProcessRecord(got.body);
      if (got === undefined || current?.holder.id !== this.#record.holder.id) {
        return this.#die(`its process lease ${this.key} is gone`);
      }
      if (Buffer.from(got.body).equals(body)) {
        this.#adopt(record, got.etag, sentAtMs, considered); // our retried PUT had landed
        return;
      }
      if (got.etag === this.#etag) return this.#failed(failure);
      // A takeover revoked a member (or a PUT of ours landed unanswered): revoke before any
      // renewal can extend what the fences count on, then renew over the new entity tag.
      this.#record = current;
      this.#etag = got.etag;
      this.#applyRevocations(current.revoked);
    }
    this.#failed(new Error(`${this.key} kept changing`));
  }

  #adopt(
    record: ProcessLeaseRecord,
    etag: string,
    sentAtMs: number,
    considered: readonly RevokedClaim[],
  ): void {
    this.#applyRevocations(record.revoked);
    this.#record = record;
    this.#etag = etag;
    this.#validUntilMs = sentAtMs + this.durationMs - this.clockSkewMs;
    this.#lastFailed = false;
    this.#pending = this.#pending.filter((p) => !considered.includes(p));
    for (const member of this.#members) member.renewed();
  }

  #failed(error: unknown): void {
    this.#lastFailed = true;
    this.#settings.log?.(
      `process lease renewal failed: ${(error as Error).message}; retrying in a few seconds`,
    );
  }

  /** The record is gone or someone else's: no member may write again. */
  #die(detail: string): void {
    this.#state = "dead";
    this.#cancelTimer?.();
    this.#onEnd();
    for (const member of this.#members) member.lose({ kind: "gone", detail });
  }

  #applyRevocations(revoked: readonly RevokedClaim[]): void {
    for (const r of revoked) {
      this.member(r.key, r.epoch)?.lose({ kind: "revoked", ...(r.by ? { by: r.by } : {}) });
    }
  }

  /**
   * The record's revocations and the pending ones, less those no longer needed: an entry stays
   * while its member is attached, else while its claim still names this record at that epoch.
   */
  async #revocationsToKeep(store: ObjectStore): Promise<RevokedClaim[]> {
    const all: RevokedClaim[] = [];
    for (const r of [...this.#record.revoked, ...this.#pending]) {
      if (!all.some((a) => a.key === r.key && a.epoch === r.epoch)) all.push(r);
    }
    const keep: RevokedClaim[] = [];
    let reads = 0;
    for (const r of all) {
      if (this.member(r.key, r.epoch) !== undefined || reads >= MAX_PRUNE_READS) {
        keep.push(r);
        continue;
      }
      reads++;
      try {
        const got = await store.get(r.key);
        const claim = got === undefined ? undefined : parseClaim(got.body, r.key);
        if (claim?.epoch === r.epoch && claim.process === this.key) keep.push(r);
      } catch {
        keep.push(r); // cannot tell: keep it
      }
    }
    return keep;
  }

  #anyStore(): ObjectStore | undefined {
    for (const member of this.#members) return member.store;
    for (const store of this.#reserved.values()) return store;
    return undefined;
  }

  async #endIfUnused(store: ObjectStore, abandoned: boolean): Promise<void> {
    if (this.#members.size > 0 || this.#reserved.size > 0) {
      // The store that leaves may close next: let a renewal through it finish first.
      if (!abandoned && this.#renewingThrough === store) await this.#renewing;
      return;
    }
    const wasLive = this.#state === "live";
    if (this.#state === "live" || this.#state === "creating") this.#state = "ended";
    this.#cancelTimer?.();
    this.#onEnd();
    if (abandoned || !wasLive) return;
    await this.#renewing;
    try {
      await store.delete(this.key);
    } catch (error) {
      this.#settings.log?.(
        `could not delete the process lease ${this.key}: ${(error as Error).message}; ` +
          `it lapses in ${Math.ceil(this.durationMs / 1000)} s`,
      );
    }
  }
}
