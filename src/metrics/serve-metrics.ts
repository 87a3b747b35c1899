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
import type { CacheStats } from "../cache/page-cache.js";
import {
  ERROR_NAMES,
  LATENCY_BUCKETS_SECONDS,
  type CommandCell,
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

/** A series of a family: its labels and its value now. */
type Series = readonly [Record<string, string>, number];

/** A family whose series are read at every scrape. */
interface Family {
  readonly kind: "counter" | "gauge";
  readonly name: string;
  readonly help: string;
  readonly labelNames: readonly string[];
  readonly read: () => Iterable<Series>;
}

/** A family with one series per volume, labelled `export`. */
interface VolumeFigure {
  readonly kind: "counter" | "gauge";
  readonly name: string;
  readonly help: string;
  readonly read: (v: MeteredVolume, stats: CacheStats) => number;
}

const VOLUME_FIGURES: readonly VolumeFigure[] = [
  figure(
    "gauge",
    "s3blk_nbd_connections",
    "NBD connections in transmission",
    (v) => v.requests.connections,
  ),
  figure(
    "counter",
    "s3blk_cache_hits_total",
    "Chunks reads found in memory (or known to be zeros)",
    (_, s) => s.readHits,
  ),
  figure(
    "counter",
    "s3blk_cache_misses_total",
    "Chunks reads had to fetch from the store",
    (_, s) => s.readMisses,
  ),
  figure(
    "gauge",
    "s3blk_cache_clean_bytes",
    "Memory of clean cached pages",
    (_, s) => s.cleanBytes,
  ),
  figure(
    "gauge",
    "s3blk_cache_dirty_bytes",
    "Memory of dirty pages, uploading or not",
    (_, s) => s.dirtyBytes,
  ),
  figure(
    "gauge",
    "s3blk_cache_dirty_chunks",
    "Dirty pages, uploading or not",
    (_, s) => s.dirtyChunks,
  ),
  figure(
    "gauge",
    "s3blk_writeback_backlog_bytes",
    "Memory of dirty pages not yet uploading",
    (_, s) => s.backlogBytes,
  ),
  figure(
    "gauge",
    "s3blk_writeback_backlog_chunks",
    "Dirty pages not yet uploading",
    (_, s) => s.backlogChunks,
  ),
  figure(
    "counter",
    "s3blk_writeback_uploads_total",
    "Chunk uploads by write-back that succeeded",
    (_, s) => s.uploads,
  ),
  figure(
    "counter",
    "s3blk_writeback_upload_failures_total",
    "Chunk uploads by write-back that failed (and will be retried)",
    (_, s) => s.uploadFailures,
  ),
  figure(
    "counter",
    "s3blk_writeback_backpressure_waits_total",
    "Writes that waited for room under the dirty bounds",
    (_, s) => s.backpressureWaits,
  ),
  figure(
    "counter",
    "s3blk_s3_retries_total",
    "Request attempts made after a transient failure",
    (v) => v.stack.retry.retries,
  ),
  figure(
    "counter",
    "s3blk_s3_uploaded_bytes_total",
    "Bytes sent in request bodies (PUT)",
    (v) => v.stack.counter.counts().bytesOut,
  ),
  figure(
    "counter",
    "s3blk_s3_downloaded_bytes_total",
    "Bytes received in response bodies (GET)",
    (v) => v.stack.counter.counts().bytesIn,
  ),
  figure(
    "counter",
    "s3blk_lease_renewals_total",
    "Lease renewals that succeeded (attempts)",
    (v) => v.stack.counter.leaseWrites().renewals,
  ),
  figure(
    "counter",
    "s3blk_lease_renewal_failures_total",
    "Lease renewal attempts that failed",
    (v) => v.stack.counter.leaseWrites().renewalFailures,
  ),
  figure(
    "gauge",
    "s3blk_gc_pending_objects",
    "Objects this writer superseded, waiting out the GC grace or for a delete batch",
    (v) => v.device.garbageStats().pendingObjectCount,
  ),
  figure(
    "counter",
    "s3blk_gc_deleted_objects_total",
    "Superseded objects deleted",
    (v) => v.device.garbageStats().deletedObjectCount,
  ),
  figure(
    "counter",
    "s3blk_gc_delete_failures_total",
    "Delete batches that failed (their objects wait for the next batch or s3blk gc)",
    (v) => v.device.garbageStats().failedDeleteBatchCount,
  ),
  figure(
    "gauge",
    "s3blk_stored_bytes",
    "Bytes of the chunk objects the volume's chunk map names",
    (v) => v.device.storedBytes(),
  ),
];

function figure(
  kind: VolumeFigure["kind"],
  name: string,
  help: string,
  read: VolumeFigure["read"],
): VolumeFigure {
  return { kind, name, help, read };
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
  for (const f of VOLUME_FIGURES) {
    register(registers, {
      ...f,
      labelNames: ["export"],
      read: () => volumes.map((v) => [{ export: v.name }, f.read(v, v.device.cacheStats())]),
    });
  }
  for (const family of labelledFamilies(volumes, costs, prices)) register(registers, family);
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
          const labels = { export: v.name, command: c.command };
          yield { labels, counts: c.latencyCounts, sum: c.latencySumSeconds };
        }
      }
    },
  );
  for (const family of processFamilies()) register(registers, family);
}

/** A prom-client counter or gauge whose series are set from `family.read` at every scrape. */
function register(registers: Registry[], family: Family): void {
  const { name, help, read } = family;
  const labelNames = [...family.labelNames];
  if (family.kind === "counter") {
    new Counter({
      ...{ name, help, labelNames, registers },
      collect() {
        this.reset();
        for (const [labels, value] of read()) this.inc(labels, value);
      },
    });
  } else {
    new Gauge({
      ...{ name, help, labelNames, registers },
      collect() {
        this.reset();
        for (const [labels, value] of read()) this.set(labels, value);
      },
    });
  }
}

/** The families with labels besides `export`: by command, operation, state, class, part. */
function labelledFamilies(
  volumes: readonly MeteredVolume[],
  costs: ReadonlyMap<string, VolumeCost>,
  prices: PriceTable,
): Family[] {
  const byCommand = (pick: (c: CommandCell) => number) =>
    function* (): Iterable<Series> {
      for (const v of volumes) {
        for (const c of v.requests.cells) yield [{ export: v.name, command: c.command }, pick(c)];
      }
    };
  const estimates = () => volumes.map((v) => ({ v, e: costs.get(v.name)!.estimate() }));
  return [
    {
      kind: "counter",
      name: "s3blk_nbd_requests_total",
      help: "NBD requests answered, by command",
      labelNames: ["export", "command"],
      read: byCommand((c) => c.requests),
    },
    {
      kind: "counter",
      name: "s3blk_nbd_request_bytes_total",
      help: "Bytes covered by NBD requests that succeeded (read, written, trimmed, zeroed, cached), by command",
      labelNames: ["export", "command"],
      read: byCommand((c) => c.bytes),
    },
    {
      kind: "counter",
      name: "s3blk_nbd_errors_total",
      help: "NBD requests answered with an error, by command and error value",
      labelNames: ["export", "command", "errno"],
      *read() {
        for (const v of volumes) {
          for (const c of v.requests.cells) {
            for (const [i, errno] of ERROR_NAMES.entries()) {
              const n = c.errorCounts[i]!;
              if (n > 0) yield [{ export: v.name, command: c.command, errno }, n];
            }
          }
        }
      },
    },
    {
      kind: "counter",
      name: "s3blk_s3_requests_total",
      help: "Requests that reached the object store (each attempt), by S3 operation and outcome",
      labelNames: ["export", "operation", "outcome"],
      *read() {
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
    },
    {
      kind: "gauge",
      name: "s3blk_lease_state",
      help: "The volume's lease as this process holds it: 1 for the current state",
      labelNames: ["export", "state"],
      *read() {
        for (const v of volumes) {
          const { state } = v.device.leaseStatus();
          for (const s of LEASE_STATES) yield [{ export: v.name, state: s }, s === state ? 1 : 0];
        }
      },
    },
    {
      kind: "gauge",
      name: "s3blk_lease_epoch",
      help: "The epoch of this process's writer term (absent without a lease)",
      labelNames: ["export"],
      *read() {
        for (const v of volumes) {
          const { epoch } = v.device.leaseStatus();
          if (epoch !== undefined) yield [{ export: v.name }, epoch];
        }
      },
    },
    {
      kind: "counter",
      name: "s3blk_s3_billed_requests_total",
      help: "Requests by S3 price class: put_copy_post_list, get_head, and free (DELETE)",
      labelNames: ["export", "class"],
      *read() {
        for (const { v, e } of estimates()) {
          yield [{ export: v.name, class: "put_copy_post_list" }, e.requests.putCopyPostList];
          yield [{ export: v.name, class: "get_head" }, e.requests.getHead];
          yield [{ export: v.name, class: "free" }, e.requests.free];
        }
      },
    },
    {
      kind: "counter",
      name: "s3blk_estimated_cost_dollars_total",
      help: `Estimated S3 cost in US dollars at ${prices.name} prices, by part: requests, transfer, storage`,
      labelNames: ["export", "part"],
      *read() {
        for (const { v, e } of estimates()) {
          yield [{ export: v.name, part: "requests" }, e.dollars.requests];
          yield [{ export: v.name, part: "transfer" }, e.dollars.transfer];
          yield [{ export: v.name, part: "storage" }, e.dollars.storage];
        }
      },
    },
  ];
}

/**
 * A few figures of the process, under the names prom-client's defaults use. The defaults
 * themselves are not registered: they start an event-loop monitor and a GC observer that run
 * whether anyone scrapes or not, and several of their names (`nodejs_active_handles_total`, a
 * gauge) fail promtool.
 */
function processFamilies(): Family[] {
  const startSeconds = Math.round(Date.now() / 1000 - process.uptime());
  const one = (kind: Family["kind"], name: string, help: string, read: () => number): Family => ({
    kind,
    name,
    help,
    labelNames: [],
    read: () => [[{}, read()]],
  });
  return [
    one(
      "counter",
      "process_cpu_user_seconds_total",
      "User CPU time spent",
      () => process.cpuUsage().user / 1e6,
    ),
    one(
      "counter",
      "process_cpu_system_seconds_total",
      "System CPU time spent",
      () => process.cpuUsage().system / 1e6,
    ),
    one(
      "gauge",
      "process_start_time_seconds",
      "Start time of the process since the Unix epoch",
      () => startSeconds,
    ),
    one("gauge", "process_resident_memory_bytes", "Resident memory size", () =>
      process.memoryUsage.rss(),
    ),
    one(
      "gauge",
      "nodejs_heap_size_used_bytes",
      "V8 heap in use",
      () => process.memoryUsage().heapUsed,
    ),
    one(
      "gauge",
      "nodejs_heap_size_total_bytes",
      "V8 heap allocated",
      () => process.memoryUsage().heapTotal,
    ),
    one(
      "gauge",
      "nodejs_external_memory_bytes",
      "Memory of C++ objects bound to JavaScript (buffers)",
      () => process.memoryUsage().external,
    ),
  ];
}
