/**
 * One fio job over NBD (`--ioengine=nbd`), its JSON result reduced to the figures we report.
 */

import { execFile } from "node:child_process";
import { promisify } from "node:util";

const run = promisify(execFile);

export interface FioJob {
  readonly name: string;
  readonly rw: "read" | "write" | "randread" | "randwrite" | "randrw";
  /** The block size; with `maxBlockSizeBytes`, the smallest of a range fio picks from. */
  readonly blockSizeBytes: number;
  readonly maxBlockSizeBytes?: number;
  readonly iodepth: number;
  /** Read or write the whole size once, not for a time: every byte is touched exactly once. */
  readonly once?: boolean;
  /** `randrw`: the share of reads, percent. Default fio's, 50. */
  readonly readPercent?: number;
  /** Flush after every this many writes (a guest's fsyncs). Default never. */
  readonly flushEvery?: number;
}

export interface FioResult {
  /** Bytes per second, reads and writes together. */
  readonly bytesPerSecond: number;
  readonly iops: number;
  /** Mean completion latency, microseconds. */
  readonly latencyUsMean: number;
}

export const STANDARD_JOBS: readonly FioJob[] = [
  { name: "seq write 1M QD8", rw: "write", blockSizeBytes: 1 << 20, iodepth: 8 },
  { name: "seq read 1M QD8", rw: "read", blockSizeBytes: 1 << 20, iodepth: 8 },
  { name: "rand read 4k QD1", rw: "randread", blockSizeBytes: 4096, iodepth: 1 },
  { name: "rand read 4k QD16", rw: "randread", blockSizeBytes: 4096, iodepth: 16 },
  { name: "rand write 4k QD1", rw: "randwrite", blockSizeBytes: 4096, iodepth: 1 },
  { name: "rand write 4k QD16", rw: "randwrite", blockSizeBytes: 4096, iodepth: 16 },
];

/**
 * The cold-read jobs, run by a fresh process at each injected latency: a sequential read of the
 * whole volume once (nothing is read twice, whatever the cache), and random 4 KiB reads.
 */
export const COLD_READ_JOBS: readonly FioJob[] = [
  { name: "seq read 1M QD8 once", rw: "read", blockSizeBytes: 1 << 20, iodepth: 8, once: true },
  { name: "rand read 4k QD1", rw: "randread", blockSizeBytes: 4096, iodepth: 1 },
  { name: "rand read 4k QD16", rw: "randread", blockSizeBytes: 4096, iodepth: 16 },
];

export interface FioOptions {
  readonly uri: string;
  readonly sizeBytes: number;
  readonly runtimeSeconds: number;
  /** Flush at the end, inside the measured time (cold writes: what reached the store). */
  readonly endFsync?: boolean;
}

export async function runFio(job: FioJob, options: FioOptions): Promise<FioResult> {
  const args = [
    `--name=${job.rw}`,
    "--ioengine=nbd",
    `--uri=${options.uri}`,
    `--rw=${job.rw}`,
    job.maxBlockSizeBytes === undefined
      ? `--bs=${job.blockSizeBytes}`
      : `--bsrange=${job.blockSizeBytes}-${job.maxBlockSizeBytes}`,
    ...(job.readPercent === undefined ? [] : [`--rwmixread=${job.readPercent}`]),
    ...(job.flushEvery === undefined ? [] : [`--fsync=${job.flushEvery}`]),
    `--iodepth=${job.iodepth}`,
    `--size=${options.sizeBytes}`,
    ...(job.once === true
      ? []
      : ["--time_based", `--runtime=${options.runtimeSeconds}`, "--ramp_time=1"]),
    "--randrepeat=0",
    "--norandommap",
    `--end_fsync=${options.endFsync ? 1 : 0}`,
    "--output-format=json",
  ];
  const { stdout } = await run("fio", args, {
    maxBuffer: 64 * 1024 * 1024,
    timeout: (options.runtimeSeconds + (job.once === true ? 600 : 120)) * 1000,
  });
  // fio may print notes before the JSON document.
  const json = JSON.parse(stdout.slice(stdout.indexOf("{"))) as {
    jobs: { read: FioSide; write: FioSide }[];
  };
  const result = json.jobs[0];
  if (result === undefined) throw new Error(`fio printed no job for ${job.name}`);
  if (job.rw !== "randrw") {
    const side = job.rw.includes("read") ? result.read : result.write;
    return {
      bytesPerSecond: side.bw_bytes,
      iops: side.iops,
      latencyUsMean: side.clat_ns.mean / 1000,
    };
  }
  // A mixed job moves both ways: the sums, and the mean latency weighted by each side's IOPS.
  const iops = result.read.iops + result.write.iops;
  const latencyNsTotal =
    result.read.clat_ns.mean * result.read.iops + result.write.clat_ns.mean * result.write.iops;
  return {
    bytesPerSecond: result.read.bw_bytes + result.write.bw_bytes,
    iops,
    latencyUsMean: iops === 0 ? 0 : latencyNsTotal / iops / 1000,
  };
}

interface FioSide {
  bw_bytes: number;
  iops: number;
  clat_ns: { mean: number };
}
