/**
 * Helpers for the NBD suites: run the built `s3blk serve` as a process and real NBD clients
 * against it, and serve memory volumes in this process for protocol-level tests.
 */

import { execFile, spawnSync } from "node:child_process";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";

import { openStoreStack } from "../../src/store/store-stack.js";
import { createVolume, openVolume } from "../../src/lifecycle/volume-lifecycle.js";
import type { ChunkedBlockDevice } from "../../src/device/chunked-block-device.js";
import { NbdExport, type NbdDevice } from "../../src/nbd/exports.js";
import { NbdServer, type NbdServerOptions } from "../../src/nbd/server.js";
import type { ConnectionLimits } from "../../src/nbd/connection.js";
import { childEnv } from "../support/environment.js";
import type { S3Target } from "../support/s3-target.js";
import { startServe as startServeProcess, type ServeProcess } from "../support/serve-process.js";
import { silentLogger } from "../../src/util/logger.js";

export { CLI, type ServeProcess } from "../support/serve-process.js";

/**
 * The tools missing from `names`. Missing tools skip a suite with a line saying what is missing,
 * except under CI=true, where they fail it.
 */
export function missingTools(suite: string, names: readonly string[]): string[] {
  const missing = names.filter((name) => {
    if (name === "nbdsh") {
      return spawnSync("/usr/bin/python3", ["-c", "import nbd"], { stdio: "ignore" }).status !== 0;
    }
    return spawnSync("sh", ["-c", `command -v ${name}`], { stdio: "ignore" }).status !== 0;
  });
  if (missing.length === 0) return [];
  const line = `${suite}: missing ${missing.join(", ")} (apt-get install qemu-utils libnbd-bin python3-libnbd fio)`;
  if (process.env.CI === "true") throw new Error(`CI=true but ${line}`);
  console.warn(`SKIP ${line}`);
  return missing;
}

export interface RunResult {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

/** Run a command to completion, in `childEnv(options.env)`; never throws for a non-zero exit. */
export function run(
  command: string,
  args: readonly string[],
  options: {
    env?: NodeJS.ProcessEnv;
    cwd?: string;
    timeoutMs?: number;
    /** Told of standard output as it arrives. */
    onStdout?: (text: string) => void;
  } = {},
): Promise<RunResult> {
  return new Promise((resolve) => {
    const child = execFile(
      command,
      [...args],
      {
        env: childEnv(options.env),
        cwd: options.cwd,
        timeout: options.timeoutMs ?? 120_000,
        maxBuffer: 64 * 1024 * 1024,
      },
      (error, stdout, stderr) => {
        const code = error === null ? 0 : typeof error.code === "number" ? error.code : -1;
        resolve({ code, stdout: String(stdout), stderr: String(stderr) });
      },
    );
    const onStdout = options.onStdout;
    if (onStdout !== undefined) child.stdout?.on("data", (d: Buffer) => onStdout(d.toString()));
  });
}

/** nbdsh is the libnbd Python module run as a program. */
export function nbdsh(uri: string, script: string, baseAllocation = true): Promise<RunResult> {
  return run("/usr/bin/python3", [
    "-m",
    "nbd",
    ...(baseAllocation ? ["--base-allocation"] : []),
    "-u",
    uri,
    "-c",
    script,
  ]);
}

/** Where a backend's volumes live, and the environment the CLI needs to reach them. */
export interface ServeBackend {
  readonly name: string;
  newUrl(label: string): string;
  readonly env: NodeJS.ProcessEnv;
  readonly globalArgs: readonly string[];
}

export function fileServeBackend(): ServeBackend {
  const root = mkdtempSync(path.join(tmpdir(), "s3blk-nbd-"));
  let n = 0;
  return {
    name: "file",
    newUrl: (label) => `file://${root}/${label}-${n++}`,
    env: {},
    globalArgs: [],
  };
}

export function s3ServeBackend(target: S3Target): ServeBackend {
  return {
    name: "s3",
    newUrl: (label) => target.newVolumeUrl(label),
    env: {
      AWS_ACCESS_KEY_ID: target.credentials.accessKeyId,
      AWS_SECRET_ACCESS_KEY: target.credentials.secretAccessKey,
      AWS_REGION: target.region,
    },
    globalArgs: ["--endpoint", target.endpoint],
  };
}

/**
 * Start `s3blk serve` on a backend. `args` follow `serve`; `--listen 127.0.0.1:0` is added unless
 * `--listen` or `--socket` is given.
 */
export function startServe(
  backend: ServeBackend,
  args: readonly string[],
  options: { cwd?: string } = {},
): Promise<ServeProcess> {
  const listen = args.includes("--listen") || args.includes("--socket");
  return startServeProcess([...args, ...(listen ? [] : ["--listen", "127.0.0.1:0"])], {
    env: backend.env,
    globalArgs: backend.globalArgs,
    ...options,
  });
}

/** `nbd://127.0.0.1:PORT/name` → `{ port }` for the raw client. */
export function tcpTarget(uri: string): { port: number; host: string } {
  const m = /^nbd:\/\/([^:/]+):(\d+)/.exec(uri);
  if (m === null) throw new Error(`not a TCP NBD URI: ${uri}`);
  return { host: m[1]!, port: Number(m[2]) };
}

/** An in-process server of memory volumes, for protocol-level tests. */
export interface MemoryServer {
  readonly server: NbdServer;
  readonly port: number;
  readonly devices: readonly ChunkedBlockDevice[];
  readonly exports: readonly NbdExport[];
  close(): Promise<void>;
}

export interface MemoryExport {
  readonly name: string;
  readonly sizeBytes: number;
  readonly readOnly?: boolean;
  readonly description?: string;
  readonly sectorSizeBytes?: number;
  /** Wrap the device (to slow it down, count calls...). */
  readonly wrap?: (device: ChunkedBlockDevice) => NbdDevice;
}

let memoryVolumes = 0;

export async function memoryServer(
  exports: readonly MemoryExport[],
  options: Partial<Omit<NbdServerOptions, "exports">> & { limits?: Partial<ConnectionLimits> } = {},
): Promise<MemoryServer> {
  const devices: ChunkedBlockDevice[] = [];
  const built: NbdExport[] = [];
  for (const e of exports) {
    const stack = openStoreStack(`memory://nbd-test-${process.pid}-${memoryVolumes++}`);
    await createVolume(stack, {
      sizeBytes: e.sizeBytes,
      chunkSizeBytes: 256 * 1024,
      ...(e.sectorSizeBytes === undefined ? {} : { sectorSizeBytes: e.sectorSizeBytes }),
    });
    if (e.readOnly) {
      // A read-only export of a volume with some data in it.
      const writer = await openVolume(stack, { lease: false });
      await writer.write(0, [Buffer.alloc(4096, 0x5a)]);
      await writer.disconnect();
    }
    const device = await openVolume(openStoreStack(stack.url), {
      readOnly: e.readOnly ?? false,
      lease: false,
      writebackDelayMs: 50,
    });
    devices.push(device);
    built.push(await NbdExport.create(e.name, e.wrap?.(device) ?? device, e.description ?? ""));
  }
  const server = new NbdServer({ exports: built, logger: silentLogger(), ...options });
  const endpoint = await server.listen({ kind: "tcp", host: "127.0.0.1", port: 0 });
  if (endpoint.kind !== "tcp") throw new Error("unreachable");
  return {
    server,
    port: endpoint.port,
    devices,
    exports: built,
    async close() {
      await server.close();
      await Promise.all(devices.map((d) => d.disconnect()));
    },
  };
}

/** `length` bytes where byte i is a function of `seed` and `offset + i`. */
export function bytesAt(seed: number, offset: number, length: number): Buffer {
  const out = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i++) {
    const x = Math.imul((offset + i) ^ (seed * 0x9e3779b1), 0x85ebca6b);
    out[i] = (x >>> 13) & 0xff;
  }
  return out;
}
