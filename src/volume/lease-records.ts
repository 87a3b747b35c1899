/**
 * The lease's two records, and who we are. lease.ts holds the design; this module only says
 * what the objects look like (docs/format.md, "The lease") and how a process is recognised.
 *
 * - The **claim**, `<prefix>/lease.json`: which writer term (epoch) of the volume is held, by
 *   which acquisition, and (version 2) the key of the process lease it points to.
 * - The **process lease**, `s3blk-processes/<id>.json` at the root of the key space: one per
 *   serving process and key space, renewed, listing the claims taken from it (`revoked`).
 */

import { randomUUID } from "node:crypto";
import { existsSync, readFileSync } from "node:fs";
import os from "node:os";
import { StoreError } from "../store/object-store.js";

export const LEASE_FORMAT = "s3blk-lease";
export const PROCESS_LEASE_FORMAT = "s3blk-process-lease";

/** Where process leases live: at the root of the key space, beside the volumes. */
export const PROCESS_LEASE_PREFIX = "s3blk-processes/";

export interface LeaseHolder {
  /** Random: per acquisition in a claim, per process lease in a process lease. */
  readonly id: string;
  readonly host: string;
  readonly pid: number;
  /** This boot of the host (Linux), so a pid is never mistaken across reboots. */
  readonly bootId?: string;
  /** The process's start time in clock ticks since boot (Linux), against pid reuse. */
  readonly startTicks?: string;
}

/**
 * A volume's claim, `<prefix>/lease.json`. Version 1 was renewed by its holder (an older
 * s3blk); version 2 is written once per acquisition and points to the holder's process lease.
 */
export interface LeaseRecord {
  readonly format: typeof LEASE_FORMAT;
  readonly version: 1 | 2;
  /** Grows by one with every new holder; chunk generations start with it. */
  readonly epoch: number;
  /** `null` once released. */
  readonly holder: LeaseHolder | null;
  /** Version 2: the key of the holder's process lease, which says whether it is held. */
  readonly process?: string;
  /**
   * Wall-clock ms since 1970 at which a version 1 claim lapses unless renewed. A version 2 claim
   * carries a time about 24 days ahead, so that an older s3blk, which reads only this, refuses it.
   */
  readonly expiresAtMs: number;
  /** The holder's lease duration (of its process lease, in version 2). */
  readonly durationMs: number;
}

/** A claim taken from a process: its holder must stop writing it. */
export interface RevokedClaim {
  /** The claim's key, `<prefix>/lease.json`. */
  readonly key: string;
  /** The epoch revoked; a later claim of the same key is not affected. */
  readonly epoch: number;
  /** Who took it, for the old holder's message. */
  readonly by?: { readonly host: string; readonly pid: number };
}

/** A process lease, `s3blk-processes/<id>.json`. */
export interface ProcessLeaseRecord {
  readonly format: typeof PROCESS_LEASE_FORMAT;
  readonly version: 1;
  /** The process; `id` is the one in the key. */
  readonly holder: LeaseHolder;
  /** Wall-clock ms since 1970 at which it lapses unless renewed. */
  readonly expiresAtMs: number;
  readonly durationMs: number;
  /** Claims pointing here that other processes took over (or that this one gave up unwritten). */
  readonly revoked: readonly RevokedClaim[];
}

/** The claim key of the volume at `prefix`. */
export function leaseKey(prefix: string): string {
  return prefix === "" ? "lease.json" : `${prefix.replace(/\/+$/, "")}/lease.json`;
}

/** The key of process lease `id`. */
export function processLeaseKey(id: string): string {
  return `${PROCESS_LEASE_PREFIX}${id}.json`;
}

const PROCESS_KEY = /^s3blk-processes\/([0-9a-f-]{36})\.json$/;

export function encodeRecord(record: LeaseRecord | ProcessLeaseRecord): Uint8Array {
  return Buffer.from(`${JSON.stringify(record)}\n`);
}

/** Parse a claim; a record that is not one is an error (never taken for free). */
export function parseClaim(bytes: Uint8Array, key: string): LeaseRecord {
  const record = parseJson(bytes) as Partial<LeaseRecord> | undefined;
  if (
    record?.format === LEASE_FORMAT &&
    Number.isSafeInteger(record.epoch) &&
    (record.version === 1 ||
      (record.version === 2 &&
        (record.holder === null || PROCESS_KEY.test(String(record.process)))))
  ) {
    return record as LeaseRecord;
  }
  throw new StoreError("Permanent", `${key} is not an s3blk lease record`);
}

/** Parse a process lease; `undefined` if the bytes are not one. */
export function parseProcessRecord(bytes: Uint8Array): ProcessLeaseRecord | undefined {
  const record = parseJson(bytes) as Partial<ProcessLeaseRecord> | undefined;
  if (
    record?.format === PROCESS_LEASE_FORMAT &&
    typeof record.holder?.id === "string" &&
    Number.isFinite(record.expiresAtMs) &&
    Array.isArray(record.revoked)
  ) {
    return record as ProcessLeaseRecord;
  }
  return undefined;
}

/** The id a process lease key names, or undefined. */
export function processLeaseId(key: string): string | undefined {
  return PROCESS_KEY.exec(key)?.[1];
}

function parseJson(bytes: Uint8Array): unknown {
  try {
    return JSON.parse(Buffer.from(bytes).toString("utf8"));
  } catch {
    return undefined;
  }
}

let processIdentity: Omit<LeaseHolder, "id"> | undefined;

/** Who we are: a fresh random id, plus what identifies this process. */
export function currentHolder(): LeaseHolder {
  processIdentity ??= {
    host: os.hostname(),
    pid: process.pid,
    ...linuxIdentity(process.pid),
  };
  return { id: randomUUID(), ...processIdentity };
}

/** Whether two holders are the same process (their ids may differ). */
export function sameProcess(a: LeaseHolder, b: LeaseHolder): boolean {
  return (
    a.host === b.host && a.pid === b.pid && a.bootId === b.bootId && a.startTicks === b.startTicks
  );
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
export function isAbandoned(holder: LeaseHolder): boolean {
  if (holder.host !== os.hostname() || holder.bootId === undefined) return false;
  const mine = linuxIdentity(process.pid);
  if (mine.bootId !== holder.bootId) return false;
  if (!existsSync(`/proc/${holder.pid}`)) return true;
  return holder.startTicks !== undefined && processStartTicks(holder.pid) !== holder.startTicks;
}
