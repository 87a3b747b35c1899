/**
 * The Prometheus metrics of `s3blk serve`, registered on a registry the caller passes in.
 *
 * Every figure is pulled when the registry is scraped, from counters that already exist where
 * the work happens: the export's request cells (nbd/export-metrics.ts), the page cache's
 * statistics, the store stack's request counter and retry layer, the device's lease, and the
 * cost estimate built from those. So serving a request costs nothing here; a scrape costs a
 * walk over a few hundred numbers.
 *
 * Names follow the exposition format's conventions (checked by `promtool check metrics` in the
 * tests): base units (`_bytes`, `_seconds`), `_total` on counters only, every series of an
 * export labelled `export`. Figures for the whole process are sums over `export`.
 */

import { Counter, Gauge, Histogram, type Registry } from "prom-client";
import type { ChunkedBlockDevice, LeaseState } from "../device/chunked-block-device.js";
import {
  ERROR_NAMES,
  LATENCY_BUCKETS_SECONDS,
  type NbdExportMetrics,
} from "../nbd/export-metrics.js";
import { REQUEST_OUTCOMES, STORE_OPERATIONS } from "../store/counting-store.js";
import type { StoreStack } from "../store/store-stack.js";
import {
  estimateCost,
  requestClasses,
  StorageMeter,
  type CostEstimate,
  type PriceTable,
} from "./cost.js";

/** What the metrics read of one served volume. */
export interface MeteredVolume {
  /** The export's name: the `export` label. */
  readonly name: string;
  readonly requests: NbdExportMetrics;
  readonly device: ChunkedBlockDevice;
  readonly stack: StoreStack;
}

/** One volume's cost, kept across reads so that storage integrates over time. */
export class VolumeCost {
  readonly volume: Pick<MeteredVolume, "device" | "stack">;
  readonly #prices: PriceTable;
  readonly #storage: StorageMeter;
  readonly #nowMs: () => number;

  constructor(
    volume: Pick<MeteredVolume, "device" | "stack">,
    prices: PriceTable,
    nowMs: () => number = Date.now,
  ) {
    this.volume = volume;
    this.#prices = prices;
    this.#nowMs = nowMs;
    this.#storage = new StorageMeter(nowMs(), volume.device.storedBytes());
  }

  /** The figures so far. */
  estimate(): CostEstimate {
    const stored = this.volume.device.storedBytes();
    const byteSeconds = this.#storage.sample(this.#nowMs(), stored);
    const counter = this.volume.stack.counter;
    const classes = requestClasses(counter.outcomes());
    return estimateCost(classes, counter.counts(), stored, byteSeconds, this.#prices);
  }
}

const LEASE_STATES: readonly LeaseState[] = ["none", "held", "lost", "released"];

/** The cells of one labelled series of a {@link PulledHistogram}. */
interface HistogramCells {
  readonly labels: Record<string, string>;
  /** Per bucket, not cumulative; the last is past the largest bound. */
  readonly counts: Float64Array;
  readonly sum: number;
}

/**
 * prom-client's Histogram, fed from cells counted elsewhere: `get()` reports the cells instead
 * of observations (there are none), so recording stays a few additions on the hot path.
 */
class PulledHistogram extends Histogram<string> {
  readonly #name: string;
  readonly #help: string;
  readonly #read: () => Iterable<HistogramCells>;

  constructor(
    config: { name: string; help: string; labelNames: string[]; registers: Registry[] },
    read: () => Iterable<HistogramCells>,
  ) {
    super({ ...config, buckets: [...LATENCY_BUCKETS_SECONDS] });
    this.#name = config.name;
    this.#help = config.help;
    this.#read = read;
  }

  override async get(): ReturnType<Histogram<string>["get"]> {
    const base = { name: this.#name, help: this.#help, type: "histogram", aggregator: "sum" };
    const values: Awaited<ReturnType<Histogram<string>["get"]>>["values"] = [];
    const bucket = `${this.#name}_bucket`;
    for (const { labels, counts, sum } of this.#read()) {
      let cumulative = 0;
      LATENCY_BUCKETS_SECONDS.forEach((le, i) => {
        cumulative += counts[i]!;
        values.push({ labels: { ...labels, le }, value: cumulative, metricName: bucket });
      });
      cumulative += counts[LATENCY_BUCKETS_SECONDS.length]!;
      values.push({ labels: { ...labels, le: "+Inf" }, value: cumulative, metricName: bucket });
      values.push({ labels, value: sum, metricName: `${this.#name}_sum` });
      values.push({ labels, value: cumulative, metricName: `${this.#name}_count` });
    }
    return { ...base, values } as unknown as Awaited<ReturnType<Histogram<string>["get"]>>;
  }

  /**
   * The registry's text output asks for this (when a metric has it) rather than `get()`, and
   * prom-client's own reads the observations: answer the cells here too. Labels are given flat,
   * which the registry formats as it does `get()`'s.
   */
  getForPromString(): ReturnType<Histogram<string>["get"]> {
    return this.get();
  }
}

/**
 * Register the metrics of `volumes` on `registry`, with each volume's cost from `costs` (by
 * export name; the same meters give the summary at stop).
 */
export function registerServeMetrics(
  registry: Registry,
  volumes: readonly MeteredVolume[],
  costs: ReadonlyMap<string, VolumeCost>,
  prices: PriceTable,
): void {
  const registers = [registry];
  const each = <T>(read: (v: MeteredVolume) => T) => volumes.map((v) => ({ v, x: read(v) }));

  /** A counter or gauge whose series are set from `read` at every scrape. */
  const pulled = (
    kind: "counter" | "gauge",
    name: string,
    help: string,
    labelNames: string[],
    read: () => Iterable<[Record<string, string>, number]>,
  ) => {
    if (kind === "counter") {
      new Counter({
        name,
        help,
        labelNames,
        registers,
        collect() {
          this.reset();
          for (const [labels, value] of read()) this.inc(labels, value);
        },
      });
    } else {
      new Gauge({
        name,
        help,
        labelNames,
        registers,
        collect() {
          this.reset();
          for (const [labels, value] of read()) this.set(labels, value);
        },
      });
    }
  };
  const perVolume = (
    kind: "counter" | "gauge",
    name: string,
    help: string,
    read: (v: MeteredVolume) => number,
  ) =>
    pulled(kind, name, help, ["export"], function* () {
      for (const v of volumes) yield [{ export: v.name }, read(v)];
    });

  // ---- NBD ----
  pulled(
    "counter",
    "s3blk_nbd_requests_total",
    "NBD requests answered, by command",
    ["export", "command"],
    function* () {
      for (const v of volumes) {
        for (const c of v.requests.cells)
          yield [{ export: v.name, command: c.command }, c.requests];
      }
    },
  );
  pulled(
    "counter",
    "s3blk_nbd_request_bytes_total",
    "Bytes covered by NBD requests that succeeded (read, written, trimmed, zeroed, cached), by command",
    ["export", "command"],
    function* () {
      for (const v of volumes) {
        for (const c of v.requests.cells) yield [{ export: v.name, command: c.command }, c.bytes];
      }
    },
  );
  pulled(
    "counter",
    "s3blk_nbd_errors_total",
    "NBD requests answered with an error, by command and error value",
    ["export", "command", "errno"],
    function* () {
      for (const v of volumes) {
        for (const c of v.requests.cells) {
          for (let i = 0; i < ERROR_NAMES.length; i++) {
            if (c.errorCounts[i]! > 0) {
              yield [
                { export: v.name, command: c.command, errno: ERROR_NAMES[i]! },
                c.errorCounts[i]!,
              ];
            }
          }
        }
      }
    },
  );
  new PulledHistogram(
    {
      name: "s3blk_nbd_request_duration_seconds",
      help: "Time from an NBD request's start to its reply being queued, by command",
      labelNames: ["export", "command"],
      registers,
    },
    function* () {
      for (const v of volumes) {
        for (const c of v.requests.cells) {
          if (c.requests === 0) continue;
          yield {
            labels: { export: v.name, command: c.command },
            counts: c.latencyCounts,
            sum: c.latencySumSeconds,
          };
        }
      }
    },
  );
  perVolume(
    "gauge",
    "s3blk_nbd_connections",
    "NBD connections in transmission",
    (v) => v.requests.connections,
  );

  // ---- cache ----
  const stats = () => each((v) => v.device.cacheStats());
  const cacheFigure = (
    kind: "counter" | "gauge",
    name: string,
    help: string,
    pick: (s: ReturnType<ChunkedBlockDevice["cacheStats"]>) => number,
  ) =>
    pulled(kind, name, help, ["export"], function* () {
      for (const { v, x } of stats()) yield [{ export: v.name }, pick(x)];
    });
  cacheFigure(
    "counter",
    "s3blk_cache_hits_total",
    "Chunks reads found in memory (or known to be zeros)",
    (s) => s.readHits,
  );
  cacheFigure(
    "counter",
    "s3blk_cache_misses_total",
    "Chunks reads had to fetch from the store",
    (s) => s.readMisses,
  );
  cacheFigure(
    "gauge",
    "s3blk_cache_clean_bytes",
    "Memory of clean cached pages",
    (s) => s.cleanBytes,
  );
  cacheFigure(
    "gauge",
    "s3blk_cache_dirty_bytes",
    "Memory of dirty pages, uploading or not",
    (s) => s.dirtyBytes,
  );
  cacheFigure(
    "gauge",
    "s3blk_cache_dirty_chunks",
    "Dirty pages, uploading or not",
    (s) => s.dirtyChunks,
  );
  cacheFigure(
    "gauge",
    "s3blk_writeback_backlog_bytes",
    "Memory of dirty pages not yet uploading",
    (s) => s.backlogBytes,
  );
  cacheFigure(
    "gauge",
    "s3blk_writeback_backlog_chunks",
    "Dirty pages not yet uploading",
    (s) => s.backlogChunks,
  );
  cacheFigure(
    "counter",
    "s3blk_writeback_uploads_total",
    "Chunk uploads by write-back that succeeded",
    (s) => s.uploads,
  );
  cacheFigure(
    "counter",
    "s3blk_writeback_upload_failures_total",
    "Chunk uploads by write-back that failed (and will be retried)",
    (s) => s.uploadFailures,
  );
  cacheFigure(
    "counter",
    "s3blk_writeback_backpressure_waits_total",
    "Writes that waited for room under the dirty bounds",
    (s) => s.backpressureWaits,
  );

  // ---- S3 ----
  pulled(
    "counter",
    "s3blk_s3_requests_total",
    "Requests that reached the object store (each attempt), by S3 operation and outcome",
    ["export", "operation", "outcome"],
    function* () {
      for (const v of volumes) {
        const outcomes = v.stack.counter.outcomes();
        for (const operation of STORE_OPERATIONS) {
          for (const outcome of REQUEST_OUTCOMES) {
            const n = outcomes[operation][outcome];
            if (n > 0 || outcome === "ok") yield [{ export: v.name, operation, outcome }, n];
          }
        }
      }
    },
  );
  perVolume(
    "counter",
    "s3blk_s3_retries_total",
    "Request attempts made after a transient failure",
    (v) => v.stack.retry.retries,
  );
  perVolume(
    "counter",
    "s3blk_s3_uploaded_bytes_total",
    "Bytes sent in request bodies (PUT)",
    (v) => v.stack.counter.counts().bytesOut,
  );
  perVolume(
    "counter",
    "s3blk_s3_downloaded_bytes_total",
    "Bytes received in response bodies (GET)",
    (v) => v.stack.counter.counts().bytesIn,
  );

  // ---- lease ----
  pulled(
    "gauge",
    "s3blk_lease_state",
    "The volume's lease as this process holds it: 1 for the current state",
    ["export", "state"],
    function* () {
      for (const v of volumes) {
        const { state } = v.device.leaseStatus();
        for (const s of LEASE_STATES) yield [{ export: v.name, state: s }, s === state ? 1 : 0];
      }
    },
  );
  pulled(
    "gauge",
    "s3blk_lease_epoch",
    "The epoch of this process's writer term (absent without a lease)",
    ["export"],
    function* () {
      for (const v of volumes) {
        const { epoch } = v.device.leaseStatus();
        if (epoch !== undefined) yield [{ export: v.name }, epoch];
      }
    },
  );
  perVolume(
    "counter",
    "s3blk_lease_renewals_total",
    "Lease renewals that succeeded (attempts)",
    (v) => v.stack.counter.leaseWrites().renewals,
  );
  perVolume(
    "counter",
    "s3blk_lease_renewal_failures_total",
    "Lease renewal attempts that failed",
    (v) => v.stack.counter.leaseWrites().renewalFailures,
  );

  // ---- cost ----
  const estimates = () => volumes.map((v) => ({ v, e: costs.get(v.name)!.estimate() }));
  pulled(
    "counter",
    "s3blk_s3_billed_requests_total",
    "Requests by S3 price class: put_copy_post_list, get_head, and free (DELETE)",
    ["export", "class"],
    function* () {
      for (const { v, e } of estimates()) {
        yield [{ export: v.name, class: "put_copy_post_list" }, e.requests.putCopyPostList];
        yield [{ export: v.name, class: "get_head" }, e.requests.getHead];
        yield [{ export: v.name, class: "free" }, e.requests.free];
      }
    },
  );
  perVolume(
    "gauge",
    "s3blk_stored_bytes",
    "Bytes of the chunk objects the volume's chunk map names",
    (v) => v.device.storedBytes(),
  );
  pulled(
    "counter",
    "s3blk_estimated_cost_dollars_total",
    `Estimated S3 cost in US dollars at ${prices.name} prices, by part: requests, transfer, storage`,
    ["export", "part"],
    function* () {
      for (const { v, e } of estimates()) {
        yield [{ export: v.name, part: "requests" }, e.dollars.requests];
        yield [{ export: v.name, part: "transfer" }, e.dollars.transfer];
        yield [{ export: v.name, part: "storage" }, e.dollars.storage];
      }
    },
  );

  registerProcessMetrics(pulled);
}

/**
 * A few figures of the process, under the names prom-client's defaults use. The defaults
 * themselves are not registered: they start an event-loop monitor and a GC observer that run
 * whether anyone scrapes or not, and several of their names (`nodejs_active_handles_total`, a
 * gauge) fail promtool.
 */
function registerProcessMetrics(
  pulled: (
    kind: "counter" | "gauge",
    name: string,
    help: string,
    labelNames: string[],
    read: () => Iterable<[Record<string, string>, number]>,
  ) => void,
): void {
  const one = (kind: "counter" | "gauge", name: string, help: string, read: () => number) =>
    pulled(kind, name, help, [], () => [[{}, read()]]);
  const startSeconds = Math.round(Date.now() / 1000 - process.uptime());
  one(
    "counter",
    "process_cpu_user_seconds_total",
    "User CPU time spent",
    () => process.cpuUsage().user / 1e6,
  );
  one(
    "counter",
    "process_cpu_system_seconds_total",
    "System CPU time spent",
    () => process.cpuUsage().system / 1e6,
  );
  one(
    "gauge",
    "process_start_time_seconds",
    "Start time of the process since the Unix epoch",
    () => startSeconds,
  );
  one("gauge", "process_resident_memory_bytes", "Resident memory size", () =>
    process.memoryUsage.rss(),
  );
  one(
    "gauge",
    "nodejs_heap_size_used_bytes",
    "V8 heap in use",
    () => process.memoryUsage().heapUsed,
  );
  one(
    "gauge",
    "nodejs_heap_size_total_bytes",
    "V8 heap allocated",
    () => process.memoryUsage().heapTotal,
  );
  one(
    "gauge",
    "nodejs_external_memory_bytes",
    "Memory of C++ objects bound to JavaScript (buffers)",
    () => process.memoryUsage().external,
  );
}
