/**
 * A store layer that counts requests and bytes, placed directly on the real store so that every
 * attempt (retries included) is counted once. The request-accounting tests, the benchmark, the
 * metrics and the cost estimate read its figures.
 *
 * Besides the totals it keeps, for each S3 operation, how many requests ended in each
 * {@link RequestOutcome}, and it recognises writes of the volume's lease object (when told its
 * key) as acquisitions, renewals or releases. Counting is a few additions per request; the
 * lease record, a few hundred bytes written every 15 s, is parsed only on a lease write.
 */

import { StoreError, type GetOptions, type GetResult, type ListPage } from "./object-store.js";
import type { PutOptions, PutResult } from "./object-store.js";
import { StoreLayer } from "./store-layer.js";
import type { ObjectStore } from "./object-store.js";

export interface RequestCounts {
  gets: number;
  /** GETs that found no object. */
  getMisses: number;
  puts: number;
  deletes: number;
  /** Keys deleted by batch requests (each batch is one request in `deleteBatches`). */
  deleteBatches: number;
  lists: number;
  bytesIn: number;
  bytesOut: number;
  failures: number;
}

export function zeroCounts(): RequestCounts {
  return {
    gets: 0,
    getMisses: 0,
    puts: 0,
    deletes: 0,
    deleteBatches: 0,
    lists: 0,
    bytesIn: 0,
    bytesOut: 0,
    failures: 0,
  };
}

/** The S3 API operation each store call is, by its name in the S3 API. */
export const STORE_OPERATIONS = [
  "GetObject",
  "PutObject",
  "DeleteObject",
  "DeleteObjects",
  "ListObjectsV2",
] as const;
export type StoreOperation = (typeof STORE_OPERATIONS)[number];

/**
 * How a request ended: answered (`ok`; `not_found` for a GET of a missing key), or the failure's
 * {@link StoreError} code in snake case; `error` for a failure that is not a StoreError.
 */
export const REQUEST_OUTCOMES = [
  "ok",
  "not_found",
  "precondition_failed",
  "access_denied",
  "no_such_bucket",
  "transient",
  "permanent",
  "error",
] as const;
export type RequestOutcome = (typeof REQUEST_OUTCOMES)[number];

/** Requests per operation and outcome. */
export type OutcomeCounts = Record<StoreOperation, Record<RequestOutcome, number>>;

/** Where process leases live, at the root of the key space (see lease.ts). */
const PROCESS_LEASE_PREFIX = "s3blk-processes/";

/** Writes of the lease object, by what they were. Attempts: a retried renewal counts twice. */
export interface LeaseWriteCounts {
  acquisitions: number;
  renewals: number;
  /** Renewal attempts that failed (the retry layer may still succeed with the next). */
  renewalFailures: number;
  releases: number;
}

function zeroOutcomes(): OutcomeCounts {
  const row = () =>
    Object.fromEntries(REQUEST_OUTCOMES.map((o) => [o, 0])) as Record<RequestOutcome, number>;
  return Object.fromEntries(STORE_OPERATIONS.map((op) => [op, row()])) as OutcomeCounts;
}

function outcomeOf(error: unknown): RequestOutcome {
  if (!(error instanceof StoreError)) return "error";
  switch (error.code) {
    case "PreconditionFailed":
      return "precondition_failed";
    case "AccessDenied":
      return "access_denied";
    case "NoSuchBucket":
      return "no_such_bucket";
    case "Transient":
      return "transient";
    case "Permanent":
    case "Fenced": // never from below the fence; counted as a refusal if a store said it
      return "permanent";
  }
}

export interface CountingStoreOptions {
  /** The key of the volume's lease object, whose writes are told apart (see lease.ts). */
  readonly leaseKey?: string;
}

export class CountingStore extends StoreLayer {
  #counts = zeroCounts();
  #outcomes = zeroOutcomes();
  #lease: LeaseWriteCounts = { acquisitions: 0, renewals: 0, renewalFailures: 0, releases: 0 };
  readonly #leaseKey: string | undefined;
  /** The epoch of the last lease record written here: a write of the same epoch is a renewal. */
  #leaseEpoch: number | undefined;

  constructor(inner: ObjectStore, options: CountingStoreOptions = {}) {
    super(inner);
    this.#leaseKey = options.leaseKey;
  }

  /** A copy of the counts so far. */
  counts(): RequestCounts {
    return { ...this.#counts };
  }

  /** Requests so far by operation and outcome (a copy). */
  outcomes(): OutcomeCounts {
    return structuredClone(this.#outcomes);
  }

  /** Writes of the lease object so far (a copy). */
  leaseWrites(): LeaseWriteCounts {
    return { ...this.#lease };
  }

  /** Return the counts so far and start again from zero (all three tables). */
  reset(): RequestCounts {
    const counts = this.#counts;
    this.#counts = zeroCounts();
    this.#outcomes = zeroOutcomes();
    this.#lease = { acquisitions: 0, renewals: 0, renewalFailures: 0, releases: 0 };
    return counts;
  }

  override async get(key: string, options?: GetOptions): Promise<GetResult | undefined> {
    this.#counts.gets++;
    const result = await this.#count("GetObject", this.inner.get(key, options));
    if (result === undefined) {
      this.#counts.getMisses++;
      this.#outcomes.GetObject.ok--;
      this.#outcomes.GetObject.not_found++;
    } else this.#counts.bytesIn += result.body.byteLength;
    return result;
  }

  override put(key: string, body: Uint8Array, options?: PutOptions): Promise<PutResult> {
    this.#counts.puts++;
    this.#counts.bytesOut += body.byteLength;
    const put = this.#count("PutObject", this.inner.put(key, body, options));
    if (key === this.#leaseKey) return this.#leaseWrite(put, body);
    // The process lease (lease.ts), renewed through one of its volumes' stacks.
    if (key.startsWith(PROCESS_LEASE_PREFIX)) {
      return this.#processLeaseWrite(put, options?.ifMatch === undefined);
    }
    return put;
  }

  /** A write of the process lease: its creation is an acquisition, every rewrite a renewal. */
  async #processLeaseWrite(put: Promise<PutResult>, creates: boolean): Promise<PutResult> {
    try {
      const result = await put;
      if (creates) this.#lease.acquisitions++;
      else this.#lease.renewals++;
      return result;
    } catch (error) {
      if (!creates) this.#lease.renewalFailures++;
      throw error;
    }
  }

  override delete(key: string): Promise<void> {
    this.#counts.deletes++;
    return this.#count("DeleteObject", this.inner.delete(key));
  }

  override deleteMany(keys: readonly string[]): Promise<void> {
    this.#counts.deleteBatches++;
    return this.#count("DeleteObjects", this.inner.deleteMany(keys));
  }

  override listPage(prefix: string, continuation?: string): Promise<ListPage> {
    this.#counts.lists++;
    return this.#count("ListObjectsV2", this.inner.listPage(prefix, continuation));
  }

  async #count<T>(operation: StoreOperation, request: Promise<T>): Promise<T> {
    try {
      const result = await request;
      this.#outcomes[operation].ok++;
      return result;
    } catch (error) {
      this.#counts.failures++;
      this.#outcomes[operation][outcomeOf(error)]++;
      throw error;
    }
  }

  /**
   * A write of the lease record: a release clears the holder; one of the epoch last written
   * renews it; any other takes it (a new term).
   */
  async #leaseWrite(put: Promise<PutResult>, body: Uint8Array): Promise<PutResult> {
    let record: { epoch?: unknown; holder?: unknown } = {};
    try {
      record = JSON.parse(Buffer.from(body).toString("utf8")) as typeof record;
    } catch {
      // Not a lease record of ours: counted as a request, nothing more.
    }
    const epoch = typeof record.epoch === "number" ? record.epoch : undefined;
    const kind =
      record.holder === null ? "release" : epoch === this.#leaseEpoch ? "renewal" : "acquisition";
    try {
      const result = await put;
      if (kind === "release") this.#lease.releases++;
      else if (kind === "renewal") this.#lease.renewals++;
      else {
        this.#lease.acquisitions++;
        this.#leaseEpoch = epoch;
      }
      return result;
    } catch (error) {
      if (kind === "renewal") this.#lease.renewalFailures++;
      throw error;
    }
  }
}
