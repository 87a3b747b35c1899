/**
 * What one export's connections count, on the hot path: requests, bytes and latency by command,
 * errors by command and error value.
 *
 * Recording a request costs a few additions into cells made when the export is made, one per
 * command: no label strings, no maps, no allocation. The Prometheus side (src/metrics/) reads
 * the cells when it is scraped; nothing here knows of it.
 */

import assert from "node:assert/strict";
import {
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_CACHE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_ERRORS,
  nameOfCommand,
  nameOfError,
} from "./protocol.js";

/**
 * Upper bounds of the latency histogram's buckets, in seconds: from a cache hit (tens of µs)
 * to an S3 request that is retried (seconds).
 */
export const LATENCY_BUCKETS_SECONDS: readonly number[] = Object.freeze([
  0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
  5, 10,
]);

/** The commands a request can carry past the checks, each counted under its spec name. */
const COUNTED_COMMANDS = [
  NBD_CMD_READ,
  NBD_CMD_WRITE,
  NBD_CMD_FLUSH,
  NBD_CMD_TRIM,
  NBD_CMD_CACHE,
  NBD_CMD_WRITE_ZEROES,
  NBD_CMD_BLOCK_STATUS,
];

/** Label value of requests whose command type the server does not know (refused, EINVAL). */
export const UNKNOWN_COMMAND = "unknown";

/** The counts of one command. Read them; only {@link NbdExportMetrics.record} writes them. */
export interface CommandCell {
  /** `NBD_CMD_READ` and so on, or {@link UNKNOWN_COMMAND}. */
  readonly command: string;
  requests: number;
  /**
   * The lengths of the requests that succeeded: bytes read, written, trimmed, zeroed, cached or
   * queried. A refused request moved nothing, whatever its header claimed.
   */
  bytes: number;
  latencySumSeconds: number;
  /** Requests per latency bucket (not cumulative); the last is past the largest bound. */
  readonly latencyCounts: Float64Array;
  /** Failed requests per error value, in the order of {@link ERROR_NAMES}. */
  readonly errorCounts: Float64Array;
}

/** The spec's names of the error values, in the order of {@link CommandCell.errorCounts}. */
export const ERROR_NAMES: readonly string[] = NBD_ERRORS.map(nameOfError);

export class NbdExportMetrics {
  /** One cell per command: the counted ones, then the one for unknown types. */
  readonly cells: readonly CommandCell[];
  /** Cell by command type; types past the table go to the last cell. */
  readonly #byType: CommandCell[];
  readonly #unknown: CommandCell;
  /** Connections in the transmission phase on this export now. */
  connections = 0;

  constructor() {
    const cell = (command: string): CommandCell => ({
      command,
      requests: 0,
      bytes: 0,
      latencySumSeconds: 0,
      latencyCounts: new Float64Array(LATENCY_BUCKETS_SECONDS.length + 1),
      errorCounts: new Float64Array(NBD_ERRORS.length),
    });
    this.#unknown = cell(UNKNOWN_COMMAND);
    const largest = Math.max(...COUNTED_COMMANDS);
    this.#byType = Array.from({ length: largest + 1 }, () => this.#unknown);
    const counted = COUNTED_COMMANDS.map((type) => {
      const c = cell(nameOfCommand(type));
      this.#byType[type] = c;
      return c;
    });
    this.cells = [...counted, this.#unknown];
  }

  /**
   * Count one answered request: its command type, length, how long it took from admission to
   * its reply being queued, and its error value (0 for success).
   */
  record(type: number, lengthBytes: number, seconds: number, errno: number): void {
    const cell = (type < this.#byType.length ? this.#byType[type] : undefined) ?? this.#unknown;
    cell.requests++;
    if (errno === 0) cell.bytes += lengthBytes;
    cell.latencySumSeconds += seconds;
    let bucket = 0;
    while (bucket < LATENCY_BUCKETS_SECONDS.length && seconds > LATENCY_BUCKETS_SECONDS[bucket]!) {
      bucket++;
    }
    cell.latencyCounts[bucket] = cell.latencyCounts[bucket]! + 1;
    if (errno !== 0) {
      const index = NBD_ERRORS.indexOf(errno);
      assert(index >= 0, `an NBD error value the spec names, not ${errno}`);
      cell.errorCounts[index] = cell.errorCounts[index]! + 1;
    }
  }
}
