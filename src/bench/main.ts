/**
 * `npm run bench`: fio over NBD, on this machine, in one run. Each row is one fio job, s3blk
 * against a reference, interleaved (interleave.ts): A B A B A B, `--rounds` times (default 3),
 * and the row reports the median of the per-round ratios and their spread, because the machine
 * drifts by ±30 % within minutes and only ratios of neighbouring turns can be trusted.
 *
 *   - warm: s3blk with the working set inside its cache and dirty bound, against nbdkit's memory
 *     plugin (the ceiling for NBD here). Between turns s3blk is flushed and left to go idle.
 *   - cold: s3blk with its data in S3, a fresh process for every turn (writes measured up to a
 *     final flush), against nbdkit's S3 plugin on the same S3 server (the peer); twice: with the
 *     default 256 MiB cache, which warms during a turn, and with 16 MiB, far smaller than the
 *     working set, so that fio's later passes stay cold too.
 *   - device: the block device alone, no NBD, each row from an empty cache.
 *   - raw: raw 1 MiB GETs at 8, 16 and 32 in flight through S3Store's GET path, against the
 *     SDK's GetObjectCommand (raw-get.ts).
 *   - cold-read: truly cold reads (a fresh process, a 16 MiB cache, random data; the sequential
 *     job reads every byte once) against nbdkit's S3 plugin, at each `--latencies` delay added
 *     by the delay proxy (delay-proxy.ts; 0: direct).
 *   - boot: a TCG guest starts a program from a Debian root filesystem on a cold volume, against
 *     a local raw file (boot.ts).
 *   - clone: making 100 clones of a 10 GiB base, what 100 writing clones store, and a clone's
 *     cold sequential read against its base's (clone-bench.ts).
 *   - memory: the peak RSS of s3blk with its default settings under a read and write load larger
 *     than the cache, against the README's bound (memory.ts).
 *
 * It prints a table (ratios, S3 requests and bytes from RGW's own counters when the server is a
 * local RGW, peak RSS) and writes the same as JSON under bench/results/, with the commit, the
 * Node version and the CPU model. `--compare BEFORE.json AFTER.json` prints the median ratios of
 * two runs side by side: compare ratios, not absolute figures, across runs.
 *
 * Needs fio, nbdkit, nbdkit-plugin-python, python3-boto3 and python3-libnbd (apt), and S3_ENDPOINT
 * etc. (`eval "$(bash infra/rgw-start.sh)"`). Options: --quick (5 s turns), --runtime SECONDS,
 * --rounds N, --size SIZE, --only raw,cold-read,boot,device,warm,cold,clone,memory, --jobs
 * TEXT,TEXT (jobs whose name contains one), --latencies MS,MS, --cli PATH (another build's
 * CLI), --clones N (default 100), --metrics (s3blk serves its Prometheus metrics, as a
 * production server would), --out DIR.
 */

import { execFileSync } from "node:child_process";
import { randomFillSync } from "node:crypto";
import {
  closeSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readFileSync,
  rmSync,
  writeFileSync,
  writeSync,
} from "node:fs";
import { availableParallelism, tmpdir } from "node:os";
import path from "node:path";
import { parseArgs } from "node:util";
import { parseSize } from "../cli/sizes.js";
import { withoutAws } from "../util/aws-environment.js";
import { openStoreStack } from "../store/store-stack.js";
import { deletePrefix } from "../store/object-store.js";
import { createVolume, openVolume } from "../lifecycle/volume-lifecycle.js";
import { runDeviceBench, type DeviceRow } from "./device-bench.js";
import { cloneTable, runCloneBench, type CloneReport } from "./clone-bench.js";
import { bootTable, runBootRows, type BootRow } from "./boot.js";
import { DelayProxy } from "./delay-proxy.js";
import {
  memoryTable,
  memoryVerdict,
  mib,
  mibSpread,
  runMemoryBench,
  type MemoryReport,
} from "./memory.js";
import { COLD_READ_JOBS, runFio, STANDARD_JOBS, type FioJob, type FioResult } from "./fio.js";
import { putObjects, runRawGet } from "./raw-get.js";
import { S3Store } from "../store/s3-store.js";
import { cpuTicks, interleave, spread, waitUntilIdle, type Contender } from "./interleave.js";
import { rgwCounters, rgwPids } from "./rgw-counters.js";
import {
  startNbdkitMemory,
  startNbdkitS3,
  startS3blk,
  THIS_CLI,
  type RunningTarget,
  type S3Settings,
} from "./targets.js";

process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= "true";

/** One timed turn of one target. */
interface Turn {
  result?: FioResult;
  error?: string;
  s3Requests?: number;
  s3BytesIn?: number;
  s3BytesOut?: number;
  peakRssBytes?: number;
  /** CPU time per MiB moved: the s3blk process's (for a whole-volume job), or the GET client's. */
  cpuMsPerMiB?: number;
  /**
   * CPU time the local S3 server (RGW and its OSD) spent during the turn: taken from the same
   * cores as fio and the NBD server, so a turn that uploads is slowed by its own S3 server.
   */
  s3ServerCpuMs?: number;
}

/** One job, s3blk against its reference, interleaved (see interleave.ts). */
export interface Row {
  target: string;
  reference: string;
  job: string;
  turns: Turn[];
  referenceTurns: Turn[];
  /** s3blk's figure over the reference's, one per round. */
  ratios: number[];
  ratio?: { median: number; min: number; max: number };
}

const USAGE = `usage: npm run bench -- [options]
       npm run bench -- --compare BEFORE.json AFTER.json

  --only LIST       sections: raw,cold-read,boot,device,warm,cold,clone,memory (default: all)
  --jobs TEXT,...   only the fio jobs whose name contains one of these
  --rounds N        interleaved rounds per row (default 3)
  --runtime SECONDS each timed turn (default 10; --quick: 5); the memory mix runs 3 times it
  --size SIZE       the volumes' size (default 256M)
  --latencies MS,.. delays per S3 request for the cold-read rows (default 0,20)
  --clones N        clones in the clone section (default 100)
  --cli PATH        another build's CLI, for a before/after run
  --metrics         serve s3blk with its Prometheus metrics on
  --out DIR         where the JSON goes (default bench/results)

Needs fio, nbdkit, nbdkit-plugin-python, python3-boto3, python3-libnbd, and S3_ENDPOINT etc.
(eval "$(bash infra/rgw-start.sh)").`;

function parseOptions() {
  try {
    return parseArgs({
      options: {
        help: { type: "boolean", short: "h", default: false },
        quick: { type: "boolean", default: false },
        runtime: { type: "string" },
        rounds: { type: "string" },
        size: { type: "string" },
        only: { type: "string" },
        jobs: { type: "string" },
        compare: { type: "boolean", default: false },
        clones: { type: "string" },
        metrics: { type: "boolean", default: false },
        out: { type: "string", default: "bench/results" },
        cli: { type: "string" },
        latencies: { type: "string", default: "0,20" },
      },
      allowPositionals: true,
    });
  } catch (error) {
    // A mistyped option: say which, and how to ask for the list, without a stack trace.
    console.error(`bench: ${(error as Error).message.split(". ")[0]}\n\n${USAGE}`);
    process.exit(2);
  }
}
const { values, positionals } = parseOptions();
if (values.help) {
  console.log(USAGE);
  process.exit(0);
}

const runtimeSeconds = Number(values.runtime ?? (values.quick ? 5 : 10));
const rounds = Number(values.rounds ?? 3);
const sizeBytes = values.size === undefined ? 256 * 1024 * 1024 : Number(parseSize(values.size));
const only = new Set(
  (values.only ?? "raw,cold-read,boot,device,warm,cold,clone,memory").split(","),
);
const picked = (all: readonly FioJob[]) =>
  values.jobs === undefined
    ? all
    : all.filter((j) => values.jobs!.split(",").some((w) => j.name.includes(w)));
const jobs = picked(STANDARD_JOBS);
/** The s3blk CLI measured: this build's, or another's (`--cli`, for a before/after run). */
const cli = values.cli === undefined ? THIS_CLI : path.resolve(values.cli);
/** Fixed delays per S3 request the cold-read rows run at, through the delay proxy. */
const latenciesMs = values.latencies.split(",").map(Number);

function s3Settings(): S3Settings | undefined {
  const endpoint = process.env.S3_ENDPOINT ?? process.env.AWS_ENDPOINT_URL;
  if (endpoint === undefined) return undefined;
  return {
    endpoint,
    bucket: process.env.S3_BUCKET ?? "s3blk-test",
    accessKey: process.env.S3_ACCESS_KEY ?? process.env.AWS_ACCESS_KEY_ID ?? "",
    secretKey: process.env.S3_SECRET_KEY ?? process.env.AWS_SECRET_ACCESS_KEY ?? "",
    region: process.env.S3_REGION ?? process.env.AWS_REGION ?? "us-east-1",
  };
}

function have(tool: string): boolean {
  try {
    execFileSync("which", [tool], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
}

/** Whether a row compares MB/s (sequential jobs, raw GETs) rather than IOPS. */
function isThroughput(job: string): boolean {
  return job.startsWith("seq") || job.startsWith("raw GET");
}

/** The figure a row compares: MB/s for sequential jobs and raw GETs, IOPS for random ones. */
function metric(job: string, turn: Turn): number | undefined {
  const r = turn.result;
  if (r === undefined) return undefined;
  return isThroughput(job) ? r.bytesPerSecond / 1e6 : r.iops;
}

/** CPU ticks of the local S3 server's processes so far, if it runs here. */
function s3ServerTicks(): number | undefined {
  const pids = rgwPids();
  let total = 0;
  for (const pid of pids) {
    const ticks = cpuTicks(pid);
    if (ticks === undefined) return undefined;
    total += ticks;
  }
  return pids.length === 0 ? undefined : total;
}

/** One fio run of `job` on `running`, with the S3 requests it caused and the server's peak RSS. */
async function fioTurn(
  job: FioJob,
  running: RunningTarget,
  options: {
    endFsync?: boolean;
    seconds?: number;
    /** Untimed, after fio, before the S3 counters are read: its requests count to the turn. */
    after?: () => Promise<void>;
  } = {},
): Promise<Turn> {
  const before = rgwCounters();
  const ticksBefore = cpuTicks(running.pid);
  const serverTicksBefore = s3ServerTicks();
  const turn: Turn = {};
  try {
    turn.result = await runFio(job, {
      uri: running.uri,
      sizeBytes,
      runtimeSeconds: options.seconds ?? runtimeSeconds,
      ...(options.endFsync === undefined ? {} : { endFsync: options.endFsync }),
    });
  } catch (error) {
    turn.error = (error as Error).message.split("\n")[0];
  }
  const ticksAfter = cpuTicks(running.pid);
  const serverTicksAfter = s3ServerTicks();
  if (serverTicksBefore !== undefined && serverTicksAfter !== undefined) {
    turn.s3ServerCpuMs = ((serverTicksAfter - serverTicksBefore) * 1000) / CLOCK_TICKS_PER_SECOND;
  }
  if (job.once === true && ticksBefore !== undefined && ticksAfter !== undefined) {
    turn.cpuMsPerMiB =
      ((ticksAfter - ticksBefore) * 1000) / CLOCK_TICKS_PER_SECOND / (sizeBytes / 2 ** 20);
  }
  await options.after?.();
  const after = rgwCounters();
  if (before !== undefined && after !== undefined) {
    turn.s3Requests = after.requests - before.requests;
    turn.s3BytesIn = after.getBytes - before.getBytes;
    turn.s3BytesOut = after.putBytes - before.putBytes;
  }
  turn.peakRssBytes = running.peakRssBytes();
  return turn;
}

/**
 * A server that runs for the whole comparison. `settle` runs untimed after each of its turns,
 * before the other side's; the S3 requests it causes (s3blk's write-back) count to the turn.
 */
function longRunning(
  name: string,
  running: RunningTarget,
  job: FioJob,
  settle?: () => Promise<void>,
): Contender<Turn> {
  const after = settle === undefined ? {} : { after: settle };
  return {
    name,
    turn: () => fioTurn(job, running, after),
    warmUp: async () => void (await fioTurn(job, running, { seconds: 2, ...after })),
  };
}

/** The kernel's USER_HZ, in which /proc/PID/stat counts CPU time (100 on Linux). */
const CLOCK_TICKS_PER_SECOND = 100;

/** s3blk with no upload in flight: every write flushed, and the process idle. */
async function quiesce(running: RunningTarget): Promise<void> {
  execFileSync("/usr/bin/python3", ["-m", "nbd", "-u", running.uri, "-c", "h.flush()"], {
    stdio: "ignore",
    timeout: 120_000,
  });
  await waitUntilIdle(running.pid);
}

/** Where and on what this run happened, for comparing runs. */
function runContext() {
  const git = (args: string[]) => {
    try {
      return execFileSync("git", args, { encoding: "utf8", stdio: ["ignore", "pipe", "ignore"] });
    } catch {
      return "";
    }
  };
  const cpuinfo = readFileSync("/proc/cpuinfo", "utf8");
  return {
    commit: git(["rev-parse", "HEAD"]).trim() || undefined,
    uncommittedChanges: git(["status", "--porcelain", "--untracked-files=no"]).trim() !== "",
    node: process.version,
    cpuModel: /^model name\s*:\s*(.+)$/m.exec(cpuinfo)?.[1],
    cpus: availableParallelism(),
    metrics: values.metrics,
    // With --cli the commit above is the harness's: the build measured is this one.
    cli: values.cli === undefined ? undefined : cli,
  };
}

async function main(): Promise<void> {
  if (values.compare) {
    const [before, after] = positionals;
    if (before === undefined || after === undefined) {
      console.error("bench: --compare takes two JSON files: --compare BEFORE.json AFTER.json");
      process.exitCode = 2;
      return;
    }
    printComparison(before, after);
    return;
  }
  if (!have("fio") || !have("nbdkit")) {
    console.error(
      "bench: needs fio and nbdkit (apt-get install fio nbdkit nbdkit-plugin-python python3-boto3 python3-libnbd)",
    );
    process.exitCode = 1;
    return;
  }
  const s3 = s3Settings();
  if (s3 === undefined) {
    console.error('bench: S3_ENDPOINT is not set (eval "$(bash infra/rgw-start.sh)")');
    process.exitCode = 1;
    return;
  }
  const rows: Row[] = [];
  let deviceRows: DeviceRow[] = [];
  let clones: CloneReport | undefined;
  let memory: MemoryReport | undefined;
  const compare = async (a: Contender<Turn>, b: Contender<Turn>, job: { name: string }) => {
    const pairs = await interleave(a, b, rounds, (t) => metric(job.name, t));
    const row: Row = {
      target: a.name,
      reference: b.name,
      job: job.name,
      turns: pairs.a,
      referenceTurns: pairs.b,
      ratios: pairs.ratios,
      ...(spread(pairs.ratios) === undefined ? {} : { ratio: spread(pairs.ratios)! }),
    };
    rows.push(row);
    const errors = [...pairs.a, ...pairs.b].flatMap((t) => (t.error ? [t.error] : []));
    console.error(
      `  ${row.target.padEnd(14)} ${row.job.padEnd(20)} vs ${row.reference.padEnd(14)} ` +
        (row.ratio === undefined
          ? `error: ${errors[0]}`
          : `${row.ratio.median.toFixed(2)}x (${row.ratios.map((r) => r.toFixed(2)).join(" ")})`),
    );
  };
  const run = `${Date.now().toString(36)}`;
  // The servers reach S3 through what we set here, whatever AWS variables the shell has.
  const env = {
    ...withoutAws(process.env),
    AWS_ENDPOINT_URL: s3.endpoint,
    AWS_ACCESS_KEY_ID: s3.accessKey,
    AWS_SECRET_ACCESS_KEY: s3.secretKey,
    AWS_REGION: s3.region,
  };
  const stackOptions = {
    endpoint: s3.endpoint,
    credentials: { accessKeyId: s3.accessKey, secretAccessKey: s3.secretKey },
    region: s3.region,
  };

  // Whatever happens, the run's objects go: the S3 server here is a few GiB of RAM, shared.
  const cleanup = openStoreStack(`s3://${s3.bucket}/bench-${run}`, stackOptions);
  let bootRows: BootRow[] = [];
  try {
    if (only.has("raw")) await rawGetRows(s3, run, compare);
    if (only.has("cold-read")) await coldReadRows(s3, run, env, compare);
    if (only.has("boot")) {
      const booted = await runBootRows({ s3, run, env, cli, latenciesMs, rounds });
      if (typeof booted === "string") console.error(`  boot: not run: ${booted}`);
      else bootRows = booted;
    }
    deviceRows = await fioSections(s3, run, env, stackOptions, compare);
    if (only.has("clone")) {
      clones = await runCloneBench({
        bucket: s3.bucket,
        prefix: `bench-${run}/clones`,
        stackOptions,
        rounds,
        ...(values.clones === undefined ? {} : { clones: Number(values.clones) }),
        log: (line) => console.error(line),
      });
    }
    if (only.has("memory")) {
      memory = await runMemoryBench({
        volumeUrl: (round) => `s3://${s3.bucket}/bench-${run}/memory-${round}`,
        deleteVolume: async (round) => {
          await deletePrefix(cleanup.store, `bench-${run}/memory-${round}/`);
        },
        rounds,
        mixSeconds: 3 * runtimeSeconds,
        env,
        cli,
        log: (line) => console.error(line),
      });
    }
  } finally {
    await deletePrefix(cleanup.store, `bench-${run}/`).catch(() => 0);
    await cleanup.store.close();
  }

  if (deviceRows.length > 0) printDeviceTable(deviceRows);
  if (bootRows.length > 0) {
    console.log(
      `\nBoot: the guest's seconds from mount to the program's answer, s3blk (cold, fresh process)` +
        ` against a local raw file, ${rounds} interleaved rounds:\n`,
    );
    printLines(bootTable(bootRows));
    console.log("");
  }
  printTable(rows);
  if (clones !== undefined) {
    console.log("\nClones (a 10 GiB base holding 1 GiB, 1 MiB chunks), on S3:\n");
    printLines(cloneTable(clones));
  }
  if (memory !== undefined) printMemory(memory);
  const outDir = values.out ?? "bench/results";
  mkdirSync(outDir, { recursive: true });
  const file = path.join(outDir, `bench-${new Date().toISOString().replace(/[:.]/g, "-")}.json`);
  const report = {
    date: new Date().toISOString(),
    context: runContext(),
    runtimeSeconds,
    rounds,
    sizeBytes,
    s3Endpoint: s3.endpoint,
    rows,
    deviceRows,
    bootRows,
    clones,
    memory,
  };
  writeFileSync(file, JSON.stringify(report, null, 2));
  console.log(`\nwrote ${file}`);
}

/** The fio rows of the device, warm and cold sections, and the device rows. */
async function fioSections(
  s3: S3Settings,
  run: string,
  env: NodeJS.ProcessEnv,
  stackOptions: Parameters<typeof openStoreStack>[1],
  compare: Compare,
): Promise<DeviceRow[]> {
  const deviceRows: DeviceRow[] = [];
  if (only.has("device")) {
    const deviceUrl = `s3://${s3.bucket}/bench-${run}/device`;
    const creator = openStoreStack(deviceUrl, stackOptions);
    await createVolume(creator, { sizeBytes });
    deviceRows.push(
      ...(await runDeviceBench({
        sizeBytes,
        seconds: runtimeSeconds,
        open: async () => {
          const stack = openStoreStack(deviceUrl, stackOptions);
          const device = await openVolume(stack);
          return { device, counts: () => stack.counter.counts() };
        },
      })),
    );
    for (const r of deviceRows) {
      console.error(
        `  device         ${r.job.padEnd(28)} ${(r.bytesPerSecond / 1e6).toFixed(1)} MB/s`,
      );
    }
  }
  if (!only.has("warm") && !only.has("cold")) return deviceRows;
  const volumeUrl = `s3://${s3.bucket}/bench-${run}/s3blk`;
  const stack = openStoreStack(volumeUrl, stackOptions);
  await createVolume(stack, { sizeBytes });

  if (only.has("warm")) {
    // The working set fits in the dirty bound twice over, and so its write-back threshold
    // (half the bound): no upload starts before the write-back delay, as with a guest whose
    // writes fit in memory. Dirty data may take half the cache.
    const memory = await startNbdkitMemory(sizeBytes * 4);
    const warm = await startS3blk({
      volumeUrl,
      cacheBytes: 4 * sizeBytes,
      dirtyBytes: 2 * sizeBytes,
      metrics: values.metrics,
      env,
      cli,
    });
    for (const job of jobs) {
      await compare(
        longRunning("s3blk-warm", warm, job, () => quiesce(warm)),
        longRunning("nbdkit-memory", memory, job),
        job,
      );
    }
    await warm.stop();
    await memory.stop();
  }

  if (only.has("cold")) {
    // "Cold": data in S3, a fresh s3blk process for every turn, against nbdkit's S3 plugin. With
    // the default cache (256 MiB, as large as the working set) the cache warms during the turn;
    // with 16 MiB every pass stays cold. Writes are measured up to a final flush.
    const peer = await startNbdkitS3(s3, `bench-${run}/peer`, sizeBytes, 1024 * 1024);
    for (const cold of [
      { target: "s3blk-cold", cacheBytes: 256 << 20 },
      { target: "s3blk-cold16M", cacheBytes: 16 << 20 },
    ]) {
      for (const job of jobs) {
        const endFsync = job.rw.includes("write");
        const fresh: Contender<Turn> = {
          name: cold.target,
          turn: async () => {
            const running = await startS3blk({
              volumeUrl,
              cacheBytes: cold.cacheBytes,
              metrics: values.metrics,
              env,
              cli,
            });
            try {
              return await fioTurn(job, running, { endFsync });
            } finally {
              await running.stop();
            }
          },
        };
        const reference: Contender<Turn> = {
          name: "nbdkit-S3",
          turn: () => fioTurn(job, peer, { endFsync }),
          settle: async () => void (await waitUntilIdle(peer.pid)),
        };
        await compare(fresh, reference, job);
      }
    }
    await peer.stop();
  }
  await stack.store.close();
  return deviceRows;
}

type Compare = (a: Contender<Turn>, b: Contender<Turn>, job: { name: string }) => Promise<void>;

/**
 * Raw GETs of 1 MiB objects at 8, 16 and 32 in flight, through `S3Store` as s3blk uses it (the
 * lean GET path) against the SDK's GetObjectCommand: the ceiling for a cold sequential read, and
 * what the GET path costs in client CPU.
 */
async function rawGetRows(s3: S3Settings, run: string, compare: Compare): Promise<void> {
  const make = (leanGet: boolean) =>
    new S3Store({
      bucket: s3.bucket,
      endpoint: s3.endpoint,
      region: s3.region,
      credentials: { accessKeyId: s3.accessKey, secretAccessKey: s3.secretKey },
      leanGet,
    });
  const lean = make(true);
  const sdk = make(false);
  const prefix = `bench-${run}/raw`;
  const keys = await putObjects(lean, prefix, 64, 1 << 20);
  const side = (name: string, store: S3Store, inFlight: number): Contender<Turn> => ({
    name,
    turn: async () => {
      const before = rgwCounters();
      const result = await runRawGet({ store, keys, inFlight, seconds: runtimeSeconds });
      const after = rgwCounters();
      return {
        result,
        cpuMsPerMiB: result.cpuMsPerMiB,
        ...(before === undefined || after === undefined
          ? {}
          : {
              s3Requests: after.requests - before.requests,
              s3BytesIn: after.getBytes - before.getBytes,
            }),
      };
    },
  });
  for (const inFlight of [8, 16, 32]) {
    await compare(side("s3blk-GET", lean, inFlight), side("SDK-GET", sdk, inFlight), {
      name: `raw GET 1M x${inFlight}`,
    });
  }
  await deletePrefix(lean, `${prefix}/`);
  await lean.close();
  await sdk.close();
}

/**
 * Truly cold reads: a volume of random data (every chunk stored), read by a fresh s3blk process
 * with a 16 MiB cache, against nbdkit's S3 plugin over the same data, at each latency of
 * `--latencies` (the delay proxy adds it to every request of both; 0 goes direct). The
 * sequential job reads every byte exactly once.
 */
async function coldReadRows(
  s3: S3Settings,
  run: string,
  env: NodeJS.ProcessEnv,
  compare: Compare,
): Promise<void> {
  const dir = mkdtempSync(path.join(tmpdir(), "s3blk-bench-image-"));
  const image = path.join(dir, "random.raw");
  writeRandomImage(image, sizeBytes);
  const volumeUrl = `s3://${s3.bucket}/bench-${run}/cold-read`;
  const peerKey = `bench-${run}/cold-read-peer`;
  execFileSync(process.execPath, [THIS_CLI, "import", image, volumeUrl], { env, stdio: "ignore" });
  const filler = await startNbdkitS3(s3, peerKey, sizeBytes, 1 << 20);
  execFileSync("nbdcopy", [image, filler.uri], { stdio: "ignore" });
  await filler.stop();
  rmSync(dir, { recursive: true, force: true });

  for (const latencyMs of latenciesMs) {
    const proxy = latencyMs > 0 ? await DelayProxy.start(s3.endpoint, latencyMs) : undefined;
    const endpoint = proxy?.endpoint ?? s3.endpoint;
    const peer = await startNbdkitS3({ ...s3, endpoint }, peerKey, sizeBytes, 1 << 20);
    for (const job of picked(COLD_READ_JOBS)) {
      const fresh: Contender<Turn> = {
        name: "s3blk-cold16M",
        turn: async () => {
          const running = await startS3blk({
            volumeUrl,
            cacheBytes: 16 << 20,
            env: { ...env, AWS_ENDPOINT_URL: endpoint },
            cli,
            readOnly: true,
          });
          try {
            return await fioTurn(job, running);
          } finally {
            await running.stop();
          }
        },
      };
      const reference: Contender<Turn> = {
        name: "nbdkit-S3",
        turn: () => fioTurn(job, peer),
        settle: async () => void (await waitUntilIdle(peer.pid)),
      };
      await compare(fresh, reference, { name: `${job.name} @${latencyMs}ms` });
    }
    await peer.stop();
    await proxy?.stop();
  }
}

/** A raw image of `sizeBytes` random bytes: no chunk of it is all zeros. */
function writeRandomImage(file: string, sizeBytes: number): void {
  const fd = openSync(file, "w");
  const block = Buffer.allocUnsafe(1 << 20);
  try {
    for (let at = 0; at < sizeBytes; at += block.byteLength) {
      randomFillSync(block);
      writeSync(fd, block, 0, Math.min(block.byteLength, sizeBytes - at));
    }
  } finally {
    closeSync(fd);
  }
}

function printDeviceTable(rows: DeviceRow[]): void {
  console.log("\nThe block device alone (no NBD), on S3, each row from an empty cache:\n");
  const lines = [["job", "MB/s", "IOPS", "GETs", "PUTs", "DELETEs", "MB in", "MB out"]];
  for (const r of rows) {
    lines.push([
      r.job,
      (r.bytesPerSecond / 1e6).toFixed(1),
      r.iops.toFixed(0),
      String(r.requests.gets),
      String(r.requests.puts),
      String(r.requests.deletes),
      (r.requests.bytesIn / 1e6).toFixed(0),
      (r.requests.bytesOut / 1e6).toFixed(0),
    ]);
  }
  printLines(lines);
  console.log("");
}

function printMemory(report: MemoryReport): void {
  console.log(
    `\nMemory: s3blk serve with the defaults on a ${mib(report.volumeBytes)} MiB volume in S3` +
      ` (fill half, ${report.mixSeconds} s of mixed I/O, read it all), ${report.rounds.length}` +
      ` rounds, the peak RSS of each phase (VmHWM, reset between them):\n`,
  );
  printLines(memoryTable(report));
  console.log(`\n${memoryVerdict(report)}`);
}

function printLines(lines: string[][]): void {
  const widths = (lines[0] ?? []).map((_, i) => Math.max(...lines.map((l) => (l[i] ?? "").length)));
  for (const [n, line] of lines.entries()) {
    console.log(line.map((cell, i) => cell.padEnd(widths[i] ?? 0)).join("  "));
    if (n === 0) console.log(widths.map((w) => "-".repeat(w)).join("  "));
  }
}

function printTable(rows: readonly Row[]): void {
  if (rows.length === 0) return;
  console.log(`fio over NBD, each row ${rounds} interleaved rounds of s3blk and its reference:\n`);
  const mean = (xs: (number | undefined)[]) => {
    const known = xs.filter((x): x is number => x !== undefined);
    return known.length === 0 ? undefined : known.reduce((a, b) => a + b, 0) / known.length;
  };
  const fmt = (v: number | undefined, unit: string) =>
    v === undefined ? "-" : `${v.toFixed(v < 100 ? 1 : 0)} ${unit}`;
  const lines = [
    [
      "target",
      "job",
      "s3blk",
      "reference",
      "ref result",
      "ratio (median)",
      "ratios",
      "S3 req",
      "S3 in MB",
      "S3 out MB",
      "peak RSS MB",
      "CPU ms/MiB",
      "S3 server CPU s",
    ],
  ];
  for (const row of rows) {
    const unit = isThroughput(row.job) ? "MB/s" : "IOPS";
    const ours = spread(row.turns.flatMap((t) => metric(row.job, t) ?? []));
    const theirs = spread(row.referenceTurns.flatMap((t) => metric(row.job, t) ?? []));
    const perTurn = (f: (t: Turn) => number | undefined) => mean(row.turns.map(f));
    lines.push([
      row.target,
      row.job,
      ours === undefined ? "error" : fmt(ours.median, unit),
      row.reference,
      theirs === undefined ? "error" : fmt(theirs.median, unit),
      row.ratio === undefined ? "-" : `${row.ratio.median.toFixed(2)}x`,
      row.ratio === undefined ? "-" : `${row.ratio.min.toFixed(2)}-${row.ratio.max.toFixed(2)}`,
      fmt(
        perTurn((t) => t.s3Requests),
        "",
      ).trim(),
      fmt(
        perTurn((t) => (t.s3BytesIn === undefined ? undefined : t.s3BytesIn / 1e6)),
        "",
      ).trim(),
      fmt(
        perTurn((t) => (t.s3BytesOut === undefined ? undefined : t.s3BytesOut / 1e6)),
        "",
      ).trim(),
      (Math.max(0, ...row.turns.map((t) => t.peakRssBytes ?? 0)) / 2 ** 20).toFixed(0),
      perTurn((t) => t.cpuMsPerMiB)?.toFixed(2) ?? "-",
      perTurn((t) => (t.s3ServerCpuMs === undefined ? undefined : t.s3ServerCpuMs / 1000))?.toFixed(
        1,
      ) ?? "-",
    ]);
  }
  printLines(lines);
  console.log(
    "\nS3 requests and bytes: mean per s3blk turn. ratios: smallest-largest of the rounds. " +
      "CPU ms/MiB: s3blk's process for a whole-volume job, the client for raw GETs. " +
      "S3 server CPU: a local RGW's (gateway and OSD) during each s3blk turn, on the same cores.",
  );
}

/** The median ratios of two runs side by side, for a before/after comparison. */
function printComparison(beforeFile: string, afterFile: string): void {
  const load = (file: string) =>
    JSON.parse(readFileSync(file, "utf8")) as {
      context?: { commit?: string; cli?: string };
      rows: Row[];
      clones?: CloneReport;
      memory?: MemoryReport;
    };
  const before = load(beforeFile);
  const after = load(afterFile);
  // A run of another build (--cli) is named by that build's directory (dist-base/cli/main.js).
  const name = (report: { context?: { commit?: string; cli?: string } }, file: string) =>
    report.context?.cli !== undefined
      ? path.basename(path.dirname(path.dirname(report.context.cli)))
      : (report.context?.commit?.slice(0, 8) ?? path.basename(file));
  const key = (r: Row) => `${r.target}\u0000${r.job}`;
  const beforeRows = new Map(before.rows.map((r) => [key(r), r]));
  const lines = [
    [
      "target",
      "job",
      "reference",
      `before (${name(before, beforeFile)})`,
      `after (${name(after, afterFile)})`,
      "after / before",
    ],
  ];
  const cell = (r: Row | undefined) =>
    r?.ratio === undefined
      ? "-"
      : `${r.ratio.median.toFixed(2)}x (${r.ratio.min.toFixed(2)}-${r.ratio.max.toFixed(2)})`;
  for (const row of after.rows) {
    const old = beforeRows.get(key(row));
    const change =
      old?.ratio === undefined || row.ratio === undefined
        ? "-"
        : `${(row.ratio.median / old.ratio.median).toFixed(2)}`;
    lines.push([row.target, row.job, row.reference, cell(old), cell(row), change]);
  }
  const coldClone = (r: { clones?: CloneReport }) => r.clones?.coldRead.ratio;
  const [was, now] = [coldClone(before), coldClone(after)];
  if (now !== undefined) {
    const ratio = (r: typeof now) =>
      `${r.median.toFixed(2)}x (${r.min.toFixed(2)}-${r.max.toFixed(2)})`;
    const change = was === undefined ? "-" : (now.median / was.median).toFixed(2);
    lines.push([
      "s3blk-clone",
      "cold seq read 1M QD8",
      "s3blk-base",
      was === undefined ? "-" : ratio(was),
      ratio(now),
      change,
    ]);
  }
  // Peak RSS is not a ratio, and drifts little: the medians in MiB, and their ratio.
  const peak = (r: { memory?: MemoryReport }) => r.memory?.peakRssBytes;
  const [peakWas, peakNow] = [peak(before), peak(after)];
  if (peakNow !== undefined) {
    lines.push([
      "s3blk-serve",
      "peak RSS MiB, memory section",
      `target ${mib(after.memory!.targetBytes)} MiB`,
      mibSpread(peakWas),
      mibSpread(peakNow),
      peakWas === undefined ? "-" : (peakNow.median / peakWas.median).toFixed(2),
    ]);
  }
  console.log("Median ratios to the reference (spread of the rounds):\n");
  printLines(lines);
}

await main();
