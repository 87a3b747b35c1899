/**
 * `npm run bench`: fio over NBD, on this machine, in one run, against
 *
 *   1. s3blk with a warm cache (the working set fits in the cache and the dirty bound),
 *   2. s3blk cold (data in S3, a fresh process with an empty cache for every row; writes are
 *      measured up to a final flush, so they count what reached S3), twice: with the default
 *      256 MiB cache, which warms during the run, and with 16 MiB, far smaller than the working
 *      set, so that fio's later passes stay cold too,
 *   3. nbdkit's memory plugin: the ceiling for NBD here,
 *   4. nbdkit's S3 plugin on the same S3 server: the peer.
 *
 * It prints a table with each s3blk row as a ratio to rows 3 and 4, the S3 requests and bytes of
 * each run (from RGW's own counters, when the server is a local RGW), and each server's peak RSS,
 * and writes the same as JSON under bench/results/.
 *
 * Needs fio and nbdkit (apt), and S3_ENDPOINT etc. for the S3 rows (`eval "$(bash
 * infra/rgw-start.sh)"`). Options: --quick (short runs), --runtime SECONDS, --size SIZE,
 * --only NAME,NAME (targets: warm, cold, memory, peer).
 */

import { execFileSync } from "node:child_process";
import { mkdirSync, writeFileSync } from "node:fs";
import path from "node:path";
import { parseArgs } from "node:util";
import { parseSize } from "../cli/sizes.js";
import { openStoreStack } from "../store/store-stack.js";
import { deletePrefix } from "../store/object-store.js";
import { createVolume, openVolume } from "../lifecycle/volume-lifecycle.js";
import { runDeviceBench, type DeviceRow } from "./device-bench.js";
import { runFio, STANDARD_JOBS, type FioJob, type FioResult } from "./fio.js";
import { rgwCounters, type RgwCounters } from "./rgw-counters.js";
import {
  startNbdkitMemory,
  startNbdkitS3,
  startS3blk,
  type RunningTarget,
  type S3Settings,
} from "./targets.js";

process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= "true";

interface Row {
  target: string;
  job: string;
  result?: FioResult;
  error?: string;
  s3Requests?: number;
  s3BytesIn?: number;
  s3BytesOut?: number;
  peakRssBytes?: number;
}

const { values } = parseArgs({
  options: {
    quick: { type: "boolean", default: false },
    runtime: { type: "string" },
    size: { type: "string" },
    only: { type: "string" },
    out: { type: "string", default: "bench/results" },
  },
});

const runtimeSeconds = Number(values.runtime ?? (values.quick ? 5 : 10));
const sizeBytes = values.size === undefined ? 256 * 1024 * 1024 : Number(parseSize(values.size));
const only = new Set((values.only ?? "device,warm,cold,memory,peer").split(","));

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

async function measure(
  target: string,
  job: FioJob,
  start: () => Promise<RunningTarget>,
  options: { endFsync?: boolean; keep?: RunningTarget },
): Promise<{ row: Row; running: RunningTarget }> {
  const running = options.keep ?? (await start());
  const before = rgwCounters();
  const row: Row = { target, job: job.name };
  try {
    row.result = await runFio(job, {
      uri: running.uri,
      sizeBytes,
      runtimeSeconds,
      ...(options.endFsync === undefined ? {} : { endFsync: options.endFsync }),
    });
  } catch (error) {
    row.error = (error as Error).message.split("\n")[0];
  }
  addCounters(row, before, rgwCounters());
  row.peakRssBytes = running.peakRssBytes();
  return { row, running };
}

function addCounters(row: Row, before: RgwCounters | undefined, after: RgwCounters | undefined) {
  if (before === undefined || after === undefined) return;
  row.s3Requests = after.requests - before.requests;
  row.s3BytesIn = after.getBytes - before.getBytes;
  row.s3BytesOut = after.putBytes - before.putBytes;
}

async function main(): Promise<void> {
  if (!have("fio") || !have("nbdkit")) {
    console.error(
      "bench: needs fio and nbdkit (apt-get install fio nbdkit nbdkit-plugin-python python3-boto3)",
    );
    process.exitCode = 1;
    return;
  }
  const s3 = s3Settings();
  const rows: Row[] = [];
  let deviceRows: DeviceRow[] = [];
  const log = (row: Row) => {
    rows.push(row);
    const r = row.result;
    console.error(
      `  ${row.target.padEnd(14)} ${row.job.padEnd(20)} ` +
        (r
          ? `${(r.bytesPerSecond / 1e6).toFixed(1)} MB/s ${r.iops.toFixed(0)} IOPS`
          : `error: ${row.error}`),
    );
  };
  const run = `${Date.now().toString(36)}`;

  if (only.has("memory")) {
    const memory = await startNbdkitMemory(sizeBytes * 4);
    for (const job of STANDARD_JOBS)
      log((await measure("nbdkit-memory", job, async () => memory, { keep: memory })).row);
    await memory.stop();
  }

  if (s3 === undefined) {
    console.error(
      'bench: S3_ENDPOINT is not set: skipping the S3 rows (eval "$(bash infra/rgw-start.sh)")',
    );
  } else {
    const env = {
      ...process.env,
      AWS_ENDPOINT_URL: s3.endpoint,
      AWS_ACCESS_KEY_ID: s3.accessKey,
      AWS_SECRET_ACCESS_KEY: s3.secretKey,
      AWS_REGION: s3.region,
    };
    if (only.has("peer")) {
      const peer = await startNbdkitS3(s3, `bench-${run}/peer`, sizeBytes, 1024 * 1024);
      for (const job of STANDARD_JOBS)
        log((await measure("nbdkit-S3", job, async () => peer, { keep: peer })).row);
      await peer.stop();
    }
    if (only.has("device")) {
      const deviceUrl = `s3://${s3.bucket}/bench-${run}/device`;
      const stackOptions = {
        endpoint: s3.endpoint,
        credentials: { accessKeyId: s3.accessKey, secretAccessKey: s3.secretKey },
        region: s3.region,
      };
      const creator = openStoreStack(deviceUrl, stackOptions);
      await createVolume(creator, { sizeBytes });
      deviceRows = await runDeviceBench({
        sizeBytes,
        seconds: runtimeSeconds,
        open: async () => {
          const stack = openStoreStack(deviceUrl, stackOptions);
          const device = await openVolume(stack);
          return { device, counts: () => stack.counter.counts() };
        },
      });
      for (const r of deviceRows) {
        console.error(
          `  device         ${r.job.padEnd(28)} ${(r.bytesPerSecond / 1e6).toFixed(1)} MB/s`,
        );
      }
    }
    const volumeUrl = `s3://${s3.bucket}/bench-${run}/s3blk`;
    const stack = openStoreStack(volumeUrl, {
      endpoint: s3.endpoint,
      credentials: { accessKeyId: s3.accessKey, secretAccessKey: s3.secretKey },
      region: s3.region,
    });
    await createVolume(stack, { sizeBytes });
    if (only.has("warm")) {
      const warm = await startS3blk({
        volumeUrl,
        cacheBytes: 2 * sizeBytes,
        dirtyBytes: 2 * sizeBytes,
        env,
      });
      for (const job of STANDARD_JOBS)
        log((await measure("s3blk-warm", job, async () => warm, { keep: warm })).row);
      await warm.stop();
    }
    // "Cold": data in S3, a fresh process per row. With the default cache (256 MiB, as large as
    // the working set) the cache warms during the run; with 16 MiB every pass stays cold.
    const coldConfigs = [
      { target: "s3blk-cold", cacheBytes: 256 << 20 },
      { target: "s3blk-cold16M", cacheBytes: 16 << 20 },
    ];
    for (const cold of coldConfigs) {
      if (!only.has("cold")) break;
      for (const job of STANDARD_JOBS) {
        const { row, running } = await measure(
          cold.target,
          job,
          () => startS3blk({ volumeUrl, cacheBytes: cold.cacheBytes, dirtyBytes: 128 << 20, env }),
          { endFsync: job.rw.includes("write") },
        );
        await running.stop();
        log(row);
      }
    }
    await deletePrefix(stack.store, `bench-${run}/`).catch(() => 0);
    await stack.store.close();
  }

  if (deviceRows.length > 0) printDeviceTable(deviceRows);
  printTable(rows);
  const outDir = values.out ?? "bench/results";
  mkdirSync(outDir, { recursive: true });
  const file = path.join(outDir, `bench-${new Date().toISOString().replace(/[:.]/g, "-")}.json`);
  writeFileSync(
    file,
    JSON.stringify(
      { date: new Date().toISOString(), runtimeSeconds, sizeBytes, s3Endpoint: s3?.endpoint, rows },
      null,
      2,
    ),
  );
  console.log(`\nwrote ${file}`);
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

function printLines(lines: string[][]): void {
  const widths = (lines[0] ?? []).map((_, i) => Math.max(...lines.map((l) => (l[i] ?? "").length)));
  for (const [n, line] of lines.entries()) {
    console.log(line.map((cell, i) => cell.padEnd(widths[i] ?? 0)).join("  "));
    if (n === 0) console.log(widths.map((w) => "-".repeat(w)).join("  "));
  }
}

function printTable(rows: Row[]): void {
  if (rows.length === 0) return;
  console.log("fio over NBD:\n");
  const find = (target: string, job: string) =>
    rows.find((r) => r.target === target && r.job === job)?.result;
  const metric = (job: string, r: FioResult | undefined) =>
    r === undefined ? undefined : job.startsWith("seq") ? r.bytesPerSecond / 1e6 : r.iops;
  const fmt = (v: number | undefined, unit: string) =>
    v === undefined ? "-" : `${v.toFixed(v < 100 ? 1 : 0)} ${unit}`;
  const ratio = (a: number | undefined, b: number | undefined) =>
    a === undefined || b === undefined || b === 0 ? "-" : `${(a / b).toFixed(2)}x`;
  const header = [
    "target",
    "job",
    "result",
    "vs memory",
    "vs nbdkit-S3",
    "S3 req",
    "S3 in MB",
    "S3 out MB",
    "peak RSS MB",
  ];
  const lines = [header];
  for (const row of rows) {
    const unit = row.job.startsWith("seq") ? "MB/s" : "IOPS";
    const value = metric(row.job, row.result);
    const isOurs = row.target.startsWith("s3blk");
    lines.push([
      row.target,
      row.job,
      row.result === undefined ? `error` : fmt(value, unit),
      isOurs ? ratio(value, metric(row.job, find("nbdkit-memory", row.job))) : "",
      isOurs ? ratio(value, metric(row.job, find("nbdkit-S3", row.job))) : "",
      row.s3Requests === undefined ? "-" : String(row.s3Requests),
      row.s3BytesIn === undefined ? "-" : (row.s3BytesIn / 1e6).toFixed(0),
      row.s3BytesOut === undefined ? "-" : (row.s3BytesOut / 1e6).toFixed(0),
      row.peakRssBytes === undefined ? "-" : (row.peakRssBytes / 2 ** 20).toFixed(0),
    ]);
  }
  printLines(lines);
}

await main();
