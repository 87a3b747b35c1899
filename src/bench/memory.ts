/**
 * The memory section of `npm run bench`: the peak RSS of `s3blk serve` with its default settings,
 * under a load larger than its cache, against the bound the README states.
 *
 * Each round is a fresh server on a fresh volume in S3, twice the default cache and dirty bound
 * together, driven through three phases by fio:
 *   - fill: half the volume written sequentially, 1 MiB requests, 8 in flight;
 *   - mix: random reads and writes over the whole volume, 60 % reads, 4 KiB to 1 MiB requests,
 *     16 in flight, a flush every 128 writes (a guest's fsyncs), for `mixSeconds`;
 *   - read: the whole volume read sequentially once.
 * VmHWM (the kernel's peak RSS, warm-up included) is read after each phase and then reset
 * (`/proc/PID/clear_refs`), so each phase reports its own peak; a round's peak is the largest.
 * RSS depends little on the machine's drift, so the rounds are not interleaved with a reference:
 * their spread shows what noise there is.
 */

import { writeFileSync } from "node:fs";
import { spread } from "./interleave.js";
import { runFio, type FioJob } from "./fio.js";
import { startS3blk } from "./targets.js";
import { DEFAULT_CACHE_BYTES, DEFAULT_MAX_DIRTY_BYTES } from "../cache/page-cache.js";
import { DEFAULT_CHUNK_STORE_CONCURRENCY } from "../volume/chunk-store.js";
import { DEFAULT_CHUNK_SIZE_BYTES } from "../volume/format.js";
import { DEFAULT_MAX_FREE_BYTES } from "../cache/chunk-buffers.js";

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
 * The README's bound for one served volume with the defaults: `--cache-size + --dirty-size + 32 ×
 * chunk size` (the last for the uploads and fetches in flight) plus the free chunk buffers kept
 * for reuse. What the process adds (the NBD buffers, the runtime) the README states apart.
 */
export const DEFAULT_BOUND_BYTES =
  DEFAULT_CACHE_BYTES +
  DEFAULT_MAX_DIRTY_BYTES +
  DEFAULT_CHUNK_STORE_CONCURRENCY * DEFAULT_CHUNK_SIZE_BYTES +
  DEFAULT_MAX_FREE_BYTES;
/** The peak RSS the warm-path target allows the whole process: the volume's bound + 64 MiB. */
export const TARGET_PEAK_RSS_BYTES = DEFAULT_BOUND_BYTES + 64 * MiB;

export interface MemoryPhase {
  readonly name: string;
  /** The phase's peak RSS: VmHWM at its end, reset at its start. */
  readonly peakRssBytes: number;
  /** fio's throughput in the phase, reads and writes together. */
  readonly bytesPerSecond: number;
}

export interface MemoryRound {
  readonly phases: MemoryPhase[];
  readonly error?: string;
}

export interface MemoryReport {
  readonly volumeBytes: number;
  readonly mixSeconds: number;
  readonly boundBytes: number;
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

/** Twice the default cache and dirty bound: no phase fits in memory. */
const VOLUME_BYTES = 2 * (DEFAULT_CACHE_BYTES + DEFAULT_MAX_DIRTY_BYTES);

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
  const peakRssBytes = spread(
    rounds.flatMap((r) =>
      r.error === undefined ? [Math.max(...r.phases.map((p) => p.peakRssBytes))] : [],
    ),
  );
  return {
    volumeBytes: VOLUME_BYTES,
    mixSeconds: options.mixSeconds,
    boundBytes: DEFAULT_BOUND_BYTES,
    targetBytes: TARGET_PEAK_RSS_BYTES,
    rounds,
    ...(peakRssBytes === undefined ? {} : { peakRssBytes }),
  };
}

/** One fresh server through the phases. A failure is the round's error, never the run's. */
async function memoryRound(options: MemoryBenchOptions, round: number): Promise<MemoryRound> {
  const phases: MemoryPhase[] = [];
  let error: string | undefined;
  try {
    const running = await startS3blk({
      volumeUrl: options.volumeUrl(round),
      createBytes: VOLUME_BYTES,
      env: options.env,
      ...(options.cli === undefined ? {} : { cli: options.cli }),
    });
    try {
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
  return error === undefined ? { phases } : { phases, error };
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

/** The peak against the volume's bound and the target. */
export function memoryVerdict(report: MemoryReport): string {
  const peak = report.peakRssBytes?.median;
  const verdict =
    peak === undefined ? "not measured" : peak <= report.targetBytes ? "met" : "not met";
  return (
    `peak RSS ${peak === undefined ? "-" : mib(peak)} MiB; one volume's bound in` +
    ` the README ${mib(report.boundBytes)} MiB (the process adds the NBD buffers and the` +
    ` runtime); the target, that bound + 64 MiB, ${mib(report.targetBytes)} MiB: ${verdict}`
  );
}
