/**
 * The NBD servers the benchmark compares, each started as its own process on a unix socket and
 * stopped by PID: s3blk itself, nbdkit's memory plugin (the ceiling for NBD on this machine),
 * and nbdkit's S3 plugin (the peer a user would pick today).
 */

import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { mkdtemp } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { withoutAws } from "../util/aws-environment.js";

export interface RunningTarget {
  readonly uri: string;
  readonly pid: number;
  /** Peak resident memory so far, bytes (VmHWM); 0 once the process is gone. */
  peakRssBytes(): number;
  /** Resident memory now, bytes (VmRSS); 0 once the process is gone. */
  rssBytes(): number;
  /** SIGTERM, wait for exit. */
  stop(): Promise<void>;
}

/** A `kB` figure of `/proc/PID/status`, in bytes; 0 once the process is gone. */
function statusBytes(pid: number, field: "VmHWM" | "VmRSS"): number {
  try {
    const status = readFileSync(`/proc/${pid}/status`, "utf8");
    return Number(new RegExp(`${field}:\\s+(\\d+) kB`).exec(status)?.[1] ?? 0) * 1024;
  } catch {
    return 0;
  }
}

/** Where the S3 server is, for the targets that use one. */
export interface S3Settings {
  readonly endpoint: string;
  readonly bucket: string;
  readonly accessKey: string;
  readonly secretKey: string;
  readonly region: string;
}

async function socketPath(label: string): Promise<string> {
  return path.join(await mkdtemp(path.join(tmpdir(), `s3blk-bench-${label}-`)), "nbd.sock");
}

export async function startProcess(
  command: string,
  args: readonly string[],
  socket: string,
  env: NodeJS.ProcessEnv = process.env,
): Promise<RunningTarget> {
  const child: ChildProcess = spawn(command, args, { stdio: ["ignore", "ignore", "pipe"], env });
  // A benchmark that dies (a failed turn throws) must not leave its servers running.
  const killOnExit = () => child.kill("SIGKILL");
  process.once("exit", killOnExit);
  let stderr = "";
  child.stderr?.on("data", (d: Buffer) => {
    stderr = (stderr + d.toString()).slice(-4000);
  });
  const exited = new Promise<void>((resolve) =>
    child.once("exit", () => {
      process.off("exit", killOnExit);
      resolve();
    }),
  );
  const deadline = Date.now() + 60_000;
  while (!existsSync(socket)) {
    if (child.exitCode !== null) {
      throw new Error(`${command} exited with ${child.exitCode}: ${stderr.trim()}`);
    }
    if (Date.now() > deadline) {
      child.kill("SIGKILL");
      throw new Error(`${command} did not create ${socket} within 60 s: ${stderr.trim()}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  const pid = child.pid ?? -1;
  return {
    uri: `nbd+unix:///?socket=${socket}`,
    pid,
    peakRssBytes: () => statusBytes(pid, "VmHWM"),
    rssBytes: () => statusBytes(pid, "VmRSS"),
    async stop() {
      if (child.exitCode === null) child.kill("SIGTERM");
      const timer = setTimeout(() => child.kill("SIGKILL"), 120_000);
      await exited;
      clearTimeout(timer);
    },
  };
}

export async function startNbdkitMemory(sizeBytes: number): Promise<RunningTarget> {
  const socket = await socketPath("memory");
  return startProcess("nbdkit", ["-f", "-U", socket, "memory", String(sizeBytes)], socket);
}

const S3_PLUGIN = "/usr/lib/x86_64-linux-gnu/nbdkit/plugins/nbdkit-S3-plugin";

/**
 * nbdkit's S3 plugin with `objectSizeBytes` objects. Debian's nbdkit 1.32 copy advertises its
 * object size as the minimum block size, and clients then refuse objects above 64K; a private
 * copy whose block_size answers (1, min(object, 32M), 0xffffffff) serves them.
 */
export async function startNbdkitS3(
  s3: S3Settings,
  key: string,
  sizeBytes: number,
  objectSizeBytes: number,
): Promise<RunningTarget> {
  if (!existsSync(S3_PLUGIN)) throw new Error(`${S3_PLUGIN} is missing (apt install nbdkit)`);
  const dir = await mkdtemp(path.join(tmpdir(), "s3blk-bench-plugin-"));
  const plugin = path.join(dir, "nbdkit-S3-plugin");
  const original = readFileSync(S3_PLUGIN, "utf8");
  const patched = original.replace(
    "return (cfg.obj_size, cfg.obj_size, cfg.obj_size)",
    "return (1, min(cfg.obj_size, 32 * 1024 * 1024), 0xffffffff)",
  );
  if (patched === original) throw new Error(`${S3_PLUGIN}: block_size is not the known one`);
  writeFileSync(plugin, patched);
  const socket = await socketPath("s3plugin");
  return startProcess(
    "nbdkit",
    [
      "-f",
      "-U",
      socket,
      "python",
      plugin,
      `endpoint-url=${s3.endpoint}`,
      `bucket=${s3.bucket}`,
      `key=${key}`,
      `size=${sizeBytes}`,
      `object-size=${objectSizeBytes}`,
      `access-key=${s3.accessKey}`,
      `secret-key=${s3.secretKey}`,
    ],
    socket,
    // boto3 reads the AWS variables and files too: only what we pass may reach it.
    { ...withoutAws(process.env), AWS_DEFAULT_REGION: s3.region },
  );
}

export interface S3blkServeOptions {
  readonly volumeUrl: string;
  /** `--cache-size` and `--dirty-size`; either omitted: the server's default. */
  readonly cacheBytes?: number;
  readonly dirtyBytes?: number;
  /** Serve Prometheus metrics too (on a free loopback port). Default false. */
  readonly metrics?: boolean;
  readonly env: NodeJS.ProcessEnv;
  /** The CLI to run (another build, for a before/after run). Default: this build's. */
  readonly cli?: string;
  /** Serve read-only. Default false. */
  readonly readOnly?: boolean;
  /** Create the volume at this size if it is missing (`--create-size`). */
  readonly createBytes?: number;
}

/** This build's CLI. */
export const THIS_CLI = path.resolve(
  path.dirname(new URL(import.meta.url).pathname),
  "../cli/main.js",
);

export async function startS3blk(options: S3blkServeOptions): Promise<RunningTarget> {
  const socket = await socketPath("s3blk");
  return startProcess(
    process.execPath,
    [
      options.cli ?? THIS_CLI,
      "serve",
      options.volumeUrl,
      "--socket",
      socket,
      ...(options.cacheBytes === undefined ? [] : ["--cache-size", String(options.cacheBytes)]),
      ...(options.dirtyBytes === undefined ? [] : ["--dirty-size", String(options.dirtyBytes)]),
      // Superseded chunk objects wait out the GC grace before the writer deletes them (at a
      // flush). At the default 15 min, a random-write row makes them faster than RGW's 4 GiB
      // memstore holds (about 50 MB/s: every hot chunk re-uploaded each write-back delay).
      "--gc-grace",
      "10s",
      ...(options.metrics ? ["--metrics", "127.0.0.1:0"] : []),
      ...(options.readOnly === true ? ["--read-only"] : []),
      ...(options.createBytes === undefined ? [] : ["--create-size", String(options.createBytes)]),
    ],
    socket,
    options.env,
  );
}
