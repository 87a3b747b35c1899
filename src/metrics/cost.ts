/**
 * What serving a volume costs on S3, estimated from what s3blk itself counted: requests by S3's
 * price class, bytes downloaded, and bytes stored over time, priced by a {@link PriceTable}.
 *
 * - **Requests.** S3 bills PUT, COPY, POST and LIST requests at one price and GET, SELECT, HEAD
 *   and the rest at a tenth of it; DELETE is free. DeleteObjects (a batch delete) is an HTTP
 *   POST and is counted with the first class, an upper estimate. Every attempt counts, retries
 *   included: S3 bills a request it answered with an error too.
 * - **Transfer.** Bytes downloaded, at the price of data transfer out; uploads are free.
 * - **Storage.** The bytes of the chunk objects the volume's chunk map names, integrated over
 *   the time they were held (GB-months: 2^30 bytes for 730 hours), sampled whenever the figures
 *   are read (a scrape, the summary at stop) and interpolated linearly between samples. Objects
 *   a snapshot pins, or that wait for deletion, are not counted; nor is the volume's metadata.
 *
 * The defaults, {@link DEFAULT_PRICES}, are AWS's published prices for S3 Standard in US East
 * (N. Virginia); `--prices FILE` replaces any of them.
 */

import { readFileSync } from "node:fs";
import type { OutcomeCounts, RequestCounts } from "../store/counting-store.js";

/** Prices in US dollars. */
export interface PriceTable {
  /** Shown in the summary line. */
  readonly name: string;
  /** Per GB-month stored (GB = 2^30 bytes). */
  readonly storagePerGbMonth: number;
  /** Per 1,000 PUT, COPY, POST or LIST requests. */
  readonly putCopyPostListPer1000: number;
  /** Per 1,000 GET, SELECT, HEAD (and all other) requests. */
  readonly getHeadPer1000: number;
  /** Per GB transferred out of S3 (downloads). */
  readonly transferOutPerGb: number;
}

/**
 * S3 Standard, US East (N. Virginia), as AWS published them (unchanged in March 2026): storage
 * $0.023 per GB-month (the first 50 TB), PUT/COPY/POST/LIST $0.005 and GET/SELECT $0.0004 per
 * 1,000 requests, transfer out to the internet $0.09 per GB (the first 10 TB a month, past the
 * first 100 GB, which are free). Transfer to EC2 in the same region is free: set
 * `transferOutPerGb` to 0 there.
 */
export const DEFAULT_PRICES: PriceTable = Object.freeze({
  name: "S3 Standard us-east-1",
  storagePerGbMonth: 0.023,
  putCopyPostListPer1000: 0.005,
  getHeadPer1000: 0.0004,
  transferOutPerGb: 0.09,
});

const PRICE_FIELDS = [
  "storagePerGbMonth",
  "putCopyPostListPer1000",
  "getHeadPer1000",
  "transferOutPerGb",
] as const;

/** A price file that cannot be used; the message says what is wrong, and where. */
export class PriceTableError extends Error {
  override readonly name = "PriceTableError";
}

/**
 * The price table of a JSON object: any of the fields of {@link PriceTable}, each replacing
 * the default; prices are finite numbers of at least 0. `where` names the source in errors.
 */
export function parsePriceTable(text: string, where: string): PriceTable {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (error) {
    throw new PriceTableError(`${where}: not JSON: ${(error as Error).message}`);
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new PriceTableError(`${where}: a price table is a JSON object, like ${example()}`);
  }
  const table: Record<string, unknown> = { ...DEFAULT_PRICES };
  for (const [field, price] of Object.entries(value)) {
    if (field === "name") {
      if (typeof price !== "string" || price === "" || price.length > 100) {
        throw new PriceTableError(`${where}: "name" must be a string of 1 to 100 characters`);
      }
    } else if ((PRICE_FIELDS as readonly string[]).includes(field)) {
      if (typeof price !== "number" || !Number.isFinite(price) || price < 0) {
        throw new PriceTableError(
          `${where}: "${field}" must be a price in dollars, a number of at least 0, not ${JSON.stringify(price)}`,
        );
      }
    } else {
      throw new PriceTableError(
        `${where}: unknown field "${field}"; the fields are name, ${PRICE_FIELDS.join(", ")}`,
      );
    }
    table[field] = price;
  }
  if (!("name" in value)) table.name = `${DEFAULT_PRICES.name} with ${where}`;
  return Object.freeze(table as unknown as PriceTable);
}

/** The price table in `file` (see {@link parsePriceTable}). */
export function readPriceTable(file: string): PriceTable {
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (error) {
    throw new PriceTableError(`cannot read --prices ${file}: ${(error as Error).message}`);
  }
  return parsePriceTable(text, file);
}

function example(): string {
  return JSON.stringify({ storagePerGbMonth: 0.023, getHeadPer1000: 0.0004 });
}

const GB = 2 ** 30;
/** AWS's month for GB-months: 730 hours. */
export const SECONDS_PER_MONTH = 730 * 3600;

/** Requests by price class. */
export interface RequestClasses {
  readonly putCopyPostList: number;
  readonly getHead: number;
  /** DELETE requests, which S3 does not bill. */
  readonly free: number;
}

/** Sort counted requests into S3's price classes. */
export function requestClasses(outcomes: OutcomeCounts): RequestClasses {
  const total = (row: Record<string, number>) => Object.values(row).reduce((a, b) => a + b, 0);
  return {
    putCopyPostList:
      total(outcomes.PutObject) + total(outcomes.ListObjectsV2) + total(outcomes.DeleteObjects),
    getHead: total(outcomes.GetObject),
    free: total(outcomes.DeleteObject),
  };
}

/** One volume's (or the process's) figures and what they cost. */
export interface CostEstimate {
  readonly requests: RequestClasses;
  readonly storedBytes: number;
  readonly downloadedBytes: number;
  readonly uploadedBytes: number;
  /** Bytes stored times seconds held, so far. */
  readonly storedByteSeconds: number;
  readonly dollars: {
    readonly requests: number;
    readonly transfer: number;
    readonly storage: number;
  };
  readonly totalDollars: number;
}

/** Price figures. */
export function estimateCost(
  requests: RequestClasses,
  counts: Pick<RequestCounts, "bytesIn" | "bytesOut">,
  storedBytes: number,
  storedByteSeconds: number,
  prices: PriceTable,
): CostEstimate {
  const dollars = {
    requests:
      (requests.putCopyPostList / 1000) * prices.putCopyPostListPer1000 +
      (requests.getHead / 1000) * prices.getHeadPer1000,
    transfer: (counts.bytesIn / GB) * prices.transferOutPerGb,
    storage: (storedByteSeconds / GB / SECONDS_PER_MONTH) * prices.storagePerGbMonth,
  };
  return {
    requests,
    storedBytes,
    downloadedBytes: counts.bytesIn,
    uploadedBytes: counts.bytesOut,
    storedByteSeconds,
    dollars,
    totalDollars: dollars.requests + dollars.transfer + dollars.storage,
  };
}

/** The sum of several estimates: the process's. */
export function sumCosts(estimates: readonly CostEstimate[]): CostEstimate {
  const add = (pick: (e: CostEstimate) => number) => estimates.reduce((a, e) => a + pick(e), 0);
  const dollars = {
    requests: add((e) => e.dollars.requests),
    transfer: add((e) => e.dollars.transfer),
    storage: add((e) => e.dollars.storage),
  };
  return {
    requests: {
      putCopyPostList: add((e) => e.requests.putCopyPostList),
      getHead: add((e) => e.requests.getHead),
      free: add((e) => e.requests.free),
    },
    storedBytes: add((e) => e.storedBytes),
    downloadedBytes: add((e) => e.downloadedBytes),
    uploadedBytes: add((e) => e.uploadedBytes),
    storedByteSeconds: add((e) => e.storedByteSeconds),
    dollars,
    totalDollars: dollars.requests + dollars.transfer + dollars.storage,
  };
}

/**
 * Bytes stored, integrated over time: each sample adds the interval since the last one at the
 * mean of the two figures.
 */
export class StorageMeter {
  #lastMs: number;
  #lastBytes: number;
  #byteSeconds = 0;

  constructor(nowMs: number, bytes: number) {
    this.#lastMs = nowMs;
    this.#lastBytes = bytes;
  }

  /** Record `bytes` held at `nowMs`; returns bytes times seconds so far. */
  sample(nowMs: number, bytes: number): number {
    const seconds = Math.max(0, nowMs - this.#lastMs) / 1000;
    this.#byteSeconds += ((this.#lastBytes + bytes) / 2) * seconds;
    this.#lastMs = nowMs;
    this.#lastBytes = bytes;
    return this.#byteSeconds;
  }
}

/** `$0.000123`: enough digits for a test run's fractions of a cent. */
export function formatDollars(dollars: number): string {
  return `$${dollars < 1 ? dollars.toFixed(6) : dollars.toFixed(2)}`;
}
