/**
 * The memory section of `npm run bench`: the peak RSS of `s3blk serve` with its default settings,
 * under a load larger than its cache, against the bound the README states for the process.
 *
 * Each round is a fresh server on a fresh volume in S3, three times the default cache (768 MiB),
 * driven through three phases by fio:
 *   - fill: half the volume written sequentially, 1 MiB requests, 8 in flight;
 *   - mix: random reads and writes over the whole volume, 60 % reads, 4 KiB to 1 MiB requests,
 *     16 in flight, a flush every 128 writes (a guest's fsyncs), for `mixSeconds`;
 *   - read: the whole volume read sequentially once.
 * VmHWM (the kernel's peak RSS, warm-up included) is read after each phase and then reset
 * (`/proc/PID/clear_refs`), so each phase reports its own peak; a round's peak is the largest.
 * RSS depends little on the machine's drift, so the rounds are not interleaved with a reference:
 * their spread shows what noise there is.
 *
 * The README bounds the process as: the runtime as it starts (Node, the AWS SDK, V8's heap: a
 * figure the README states, and each round checks against the server's RSS once it is up,
 * before any I/O), plus one volume's bound, plus the NBD request buffers (the pool's reuse and
 * one connection's payload in flight). The target allows 64 MiB more, for what the runtime
 * grows by under load.
 */

import { writeFileSync } from "node:fs";
import { spread } from "./interleave.js";
import { runFio, type FioJob } from "./fio.js";
import { startS3blk } from "./targets.js";
import { DEFAULT_CACHE_BYTES } from "../cache/page-cache.js";
import { DEFAULT_CHUNK_STORE_CONCURRENCY } from "../volume/chunk-store.js";
import { DEFAULT_CHUNK_SIZE_BYTES } from "../volume/format.js";
import { DEFAULT_MAX_FREE_BYTES } from "../cache/chunk-buffers.js";
import { DEFAULT_MAX_RETAINED_BYTES } from "../nbd/buffer-pool.js";
import { DEFAULT_CONNECTION_LIMITS } from "../nbd/connection.js";

const MiB = 1024 * 1024;

/** Bytes in whole MiB, for the tables. */
export function mib(bytes: number): string {
  return (bytes / MiB).toFixed(0);
}

/** A spread of byte counts in whole MiB, "562 (551-573)"; "-" when nothing was measured. */
export function mibSpread(bytes: { median: number; min: number; max: number } | undefined): string {
  return bytes === undefined ? "-" : `${mib(bytes.median)} (${mib(bytes.min)}-${mib(bytes.max)})`;
}

/**
 * The README's bound for one served volume with the defaults: `--cache-size` (clean and dirty
 * data together) + 32 × chunk size (the uploads and fetches in flight), plus the free chunk
 * buffers kept for reuse.
 */
export const VOLUME_BOUND_BYTES =
  DEFAULT_CACHE_BYTES +
  DEFAULT_CHUNK_STORE_CONCURRENCY * DEFAULT_CHUNK_SIZE_BYTES +
  DEFAULT_MAX_FREE_BYTES;
/** What the README adds for NBD: the request buffers kept, and one connection's payload. */
export const NBD_BOUND_BYTES =
  DEFAULT_MAX_RETAINED_BYTES + DEFAULT_CONNECTION_LIMITS.maxInFlightBytes;
/** The README's figure for the runtime as it starts, on Node 24: Node, the AWS SDK, V8's heap. */
export const RUNTIME_START_BYTES = 96 * MiB;
/** The README's bound for the process serving one volume over one connection. */
export const PROCESS_BOUND_BYTES = RUNTIME_START_BYTES + VOLUME_BOUND_BYTES + NBD_BOUND_BYTES;
/** What the target allows past the process's bound: the runtime's growth under load. */
export const TARGET_MARGIN_BYTES = 64 * MiB;

export interface MemoryPhase {
  readonly name: string;
  /** The phase's peak RSS: VmHWM at its end, reset at its start. */
  readonly peakRssBytes: number;
  /** fio's throughput in the phase, reads and writes together. */
  readonly bytesPerSecond: number;
}

export interface MemoryRound {
  /** RSS once the server is up, before any I/O: the runtime as it starts (0: not measured). */
  readonly startRssBytes: number;
  readonly phases: MemoryPhase[];
  readonly error?: string;
}

export interface MemoryReport {
  readonly volumeBytes: number;
  readonly mixSeconds: number;
  /** The rounds' median start RSS (0 if none was measured), against `RUNTIME_START_BYTES`. */
  readonly startRssBytes: number;
  /** One volume's bound, and the process's: the runtime at start + volume + NBD buffers. */
  readonly volumeBoundBytes: number;
  readonly boundBytes: number;
  /** The process's bound + 64 MiB. */
  readonly targetBytes: number;
  readonly rounds: MemoryRound[];
  /** The rounds' peaks (each the largest of its phases'). */
  readonly peakRssBytes?: { median: number; min: number; max: number };
}

export interface MemoryBenchOptions {
  /** A fresh volume URL for each round (created by the server: `--create-size`)... */
  readonly volumeUrl: (round: number) => string;
  /**
   * ...and what deletes it after the round: a round writes about twice the volume's size, more
   * than a local RGW's memstore holds for long.
   */
  readonly deleteVolume: (round: number) => Promise<void>;
  readonly rounds: number;
  readonly mixSeconds: number;
  readonly env: NodeJS.ProcessEnv;
  readonly cli?: string;
  readonly log: (line: string) => void;
}

/** Three times the default cache: no phase fits in memory. */
const VOLUME_BYTES = 3 * DEFAULT_CACHE_BYTES;

const PHASES: readonly { job: FioJob; sizeBytes: number }[] = [
  {
    job: { name: "fill", rw: "write", blockSizeBytes: MiB, iodepth: 8, once: true },
    sizeBytes: VOLUME_BYTES / 2,
  },
  {
    job: {
      name: "mix",
      rw: "randrw",
      readPercent: 60,
      blockSizeBytes: 4096,
      maxBlockSizeBytes: MiB,
      iodepth: 16,
      flushEvery: 128,
    },
    sizeBytes: VOLUME_BYTES,
  },
  {
    job: { name: "read", rw: "read", blockSizeBytes: MiB, iodepth: 8, once: true },
    sizeBytes: VOLUME_BYTES,
  },
];

export async function runMemoryBench(options: MemoryBenchOptions): Promise<MemoryReport> {
  const rounds: MemoryRound[] = [];
  for (let round = 0; round < options.rounds; round++) {
    const result = await memoryRound(options, round);
    rounds.push(result);
    options.log(
      `  memory round ${round + 1}: ` +
        (result.phases.map((p) => `${p.name} ${(p.peakRssBytes / MiB).toFixed(0)}`).join(", ") +
          " MiB peak RSS") +
        (result.error === undefined ? "" : `; error: ${result.error}`),
    );
  }
  return memoryReport(rounds, options.mixSeconds);
}

/**
 * The rounds' figures, from those that ended without error: the median peak (each round's
 * the largest of its phases') and the median start RSS; and the README's bound.
 */
export function memoryReport(rounds: MemoryRound[], mixSeconds: number): MemoryReport {
  const measured = rounds.filter((r) => r.error === undefined);
  const peakRssBytes = spread(
    measured.map((r) => Math.max(...r.phases.map((p) => p.peakRssBytes))),
  );
  const startRssBytes = spread(measured.map((r) => r.startRssBytes))?.median ?? 0;
  return {
    volumeBytes: VOLUME_BYTES,
    mixSeconds,
    startRssBytes,
    volumeBoundBytes: VOLUME_BOUND_BYTES,
    boundBytes: PROCESS_BOUND_BYTES,
    targetBytes: PROCESS_BOUND_BYTES + TARGET_MARGIN_BYTES,
    rounds,
    ...(peakRssBytes === undefined ? {} : { peakRssBytes }),
  };
}

/** One fresh server through the phases. A failure is the round's error, never the run's. */
async function memoryRound(options: MemoryBenchOptions, round: number): Promise<MemoryRound> {
  const phases: MemoryPhase[] = [];
  let startRssBytes = 0;
  let error: string | undefined;
  try {
    const running = await startS3blk({
      volumeUrl: options.volumeUrl(round),
      createBytes: VOLUME_BYTES,
      env: options.env,
      ...(options.cli === undefined ? {} : { cli: options.cli }),
    });
    try {
      startRssBytes = running.rssBytes();
      for (const { job, sizeBytes } of PHASES) {
        const result = await runFio(job, {
          uri: running.uri,
          sizeBytes,
          runtimeSeconds: options.mixSeconds,
        });
        const peakRssBytes = running.peakRssBytes();
        // 0: /proc no longer has the process. A dead server measured nothing.
        if (peakRssBytes === 0) throw new Error(`the server exited during ${job.name}`);
        phases.push({ name: job.name, peakRssBytes, bytesPerSecond: result.bytesPerSecond });
        writeFileSync(`/proc/${running.pid}/clear_refs`, "5"); // VmHWM := VmRSS
      }
    } finally {
      await running.stop();
    }
  } catch (caught) {
    error = (caught as Error).message.split("\n")[0];
  }
  // The run's own cleanup deletes whatever this leaves.
  await options.deleteVolume(round).catch(() => undefined);
  return error === undefined ? { startRssBytes, phases } : { startRssBytes, phases, error };
}

/** The section's table: a line per phase, the median of the rounds that ended without error. */
export function memoryTable(report: MemoryReport): string[][] {
  const lines = [["phase", "peak RSS MiB (median, min-max)", "MB/s (median)"]];
  const measured = report.rounds.filter((r) => r.error === undefined);
  for (const [i, { job }] of PHASES.entries()) {
    const phases = measured.map((r) => r.phases[i]!);
    const speed = spread(phases.map((p) => p.bytesPerSecond / 1e6));
    lines.push([
      job.name,
      mibSpread(spread(phases.map((p) => p.peakRssBytes))),
      speed === undefined ? "-" : speed.median.toFixed(0),
    ]);
  }
  return lines;
}

/**
 * The peak against the process's bound, its terms, and the target; and the runtime as it
 * started against the README's figure for it, which the target also needs.
 */
export function memoryVerdict(report: MemoryReport): string {
  const peak = report.peakRssBytes?.median;
  const start = report.startRssBytes;
  const verdict =
    peak === undefined
      ? "not measured"
      : peak > report.targetBytes
        ? "not met"
        : start > RUNTIME_START_BYTES
          ? "not met (the runtime started larger than the README says)"
          : "met";
  return (
    `peak RSS ${peak === undefined ? "-" : mib(peak)} MiB; the README's bound for the process` +
    ` ${mib(report.boundBytes)} MiB (the runtime at start ${mib(RUNTIME_START_BYTES)}, measured` +
    ` ${mib(start)}; one volume ${mib(report.volumeBoundBytes)}; NBD buffers` +
    ` ${mib(NBD_BOUND_BYTES)}); the target, that bound + ${mib(TARGET_MARGIN_BYTES)} MiB,` +
    ` ${mib(report.targetBytes)} MiB: ${verdict}`
  );
}
