/**
 * Boot the s3blk test guest: a Debian kernel and a small initramfs (built by
 * infra/vm/build-guest.sh) under qemu with TCG, with one virtio-blk disk that qemu's own NBD client
 * backs with an NBD export. The guest formats or checks that disk and prints one marker line on
 * its serial console; this module collects the console output and reads the marker.
 *
 * No KVM and no nbd kernel module are needed on the host, so it runs in CI. Under TCG the guest
 * reaches /init about 5 s after qemu starts; a "format" boot takes about 10.5 s in all and a
 * "check" boot about 6 s (infra/vm/README.md has the measurements and why each flag is there).
 *
 * Owned by the VM test infrastructure (tests import it from test/vm/guest.ts); the benchmark's
 * boot row runs it too, which is why it lives under src/bench. Usage:
 *
 *   const image = await ensureGuest();           // string: why the guest cannot run here
 *   const result = await bootGuest({ ...image, nbdUri, mode: "format" });
 *   expect(result.marker).toBe("FORMAT-OK");
 */

import { spawn } from "node:child_process";
import { accessSync, constants, readFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { withoutAws } from "../util/aws-environment.js";

/** What the guest does with its disk (the kernel command line's `s3blk.mode=`). */
export type GuestMode = "format" | "check" | "boot";

/** A built guest: absolute paths to the kernel and the initramfs. */
export interface GuestImage {
  readonly kernel: string;
  readonly initrd: string;
  /** `uname -r` in the guest, e.g. "6.1.0-56-amd64". */
  readonly kernelRelease: string;
  /** The build directory that holds both (and the expected manifest). */
  readonly dir: string;
}

const BUILD_SCRIPT = fileURLToPath(new URL("../../infra/vm/build-guest.sh", import.meta.url));
const QEMU = "qemu-system-x86_64";

/** The absolute path of an executable on PATH, or undefined. */
export function findExecutable(name: string): string | undefined {
  for (const dir of (process.env.PATH ?? "").split(path.delimiter)) {
    if (dir === "") continue;
    const candidate = path.join(dir, name);
    try {
      accessSync(candidate, constants.X_OK);
      return candidate;
    } catch {
      // not in this directory
    }
  }
  return undefined;
}

export interface EnsureGuestOptions {
  /** Cache directory for the build. Default: `$S3BLK_VM_DIR`, else `~/.cache/s3blk-vm`. */
  readonly cacheDir?: string;
  /** Give up on the build after this long. Default 600 000 (a first build downloads ~70 MB). */
  readonly buildTimeoutMs?: number;
}

const built = new Map<string, Promise<GuestImage | string>>();

/**
 * Build the guest if needed (infra/vm/build-guest.sh, cached, so later calls take about a second)
 * and return it, or a one-line reason why it cannot run here: qemu-system-x86_64 is not on PATH,
 * or the build failed (the reason then ends with the script's last lines of stderr). The build
 * script may apt-get install its small build tools (busybox-static, e2fsprogs, cpio) when run as
 * root; qemu itself is only checked for. One build per process and cache dir.
 */
export function ensureGuest(options: EnsureGuestOptions = {}): Promise<GuestImage | string> {
  const key = options.cacheDir ?? "";
  let promise = built.get(key);
  if (promise === undefined) {
    promise = buildGuest(options);
    built.set(key, promise);
  }
  return promise;
}

async function buildGuest(options: EnsureGuestOptions): Promise<GuestImage | string> {
  if (findExecutable(QEMU) === undefined) {
    return `${QEMU} not found on PATH (Debian: apt-get install qemu-system-x86)`;
  }
  const env = withoutAws(process.env);
  if (options.cacheDir !== undefined) env.S3BLK_VM_DIR = options.cacheDir;
  const run = await runProcess("bash", [BUILD_SCRIPT], {
    env,
    timeoutMs: options.buildTimeoutMs ?? 600_000,
    outputLimitBytes: 1024 * 1024,
  });
  const dir = run.stdout.trim().split("\n").at(-1) ?? "";
  if (run.exitCode !== 0 || run.timedOut || dir === "") {
    const why = run.timedOut ? "timed out" : `exited with ${run.exitCode ?? run.signal}`;
    const tail = run.stderr.trim().split("\n").slice(-5).join(" | ");
    return `infra/vm/build-guest.sh ${why}: ${tail}`;
  }
  return {
    kernel: path.join(dir, "vmlinuz"),
    initrd: path.join(dir, "initrd.cpio.gz"),
    kernelRelease: readFileSync(path.join(dir, "kernel-release"), "utf8").trim(),
    dir,
  };
}

export interface BootGuestOptions {
  readonly kernel: string;
  readonly initrd: string;
  /**
   * The disk, as a qemu NBD URI: `nbd+unix:///?socket=/path/to.sock` (export ""),
   * `nbd+unix:///NAME?socket=...`, or `nbd://127.0.0.1:PORT/NAME`.
   */
  readonly nbdUri: string;
  readonly mode: GuestMode;
  /**
   * Kill qemu (SIGTERM, then SIGKILL 5 s later) after this long. Default 120 000. Keep it below
   * the test's own timeout, so that qemu is never left running after a test gave up.
   */
  readonly timeoutMs?: number;
  /** Attach the disk read-only (the guest sees ro=1). Default: true but for "format". */
  readonly readOnly?: boolean;
  /** Pass the guest's discards on as NBD_CMD_TRIM (qemu `discard=unmap`). Default true. */
  readonly discard?: boolean;
  /** Guest RAM. Default 512. */
  readonly memoryMiB?: number;
  /** More kernel command-line words, e.g. ["loglevel=4"]. */
  readonly extraAppend?: readonly string[];
  /** Called with each chunk of console output as it arrives (for live logs). */
  readonly onOutput?: (text: string) => void;
  /** Aborting kills qemu like a timeout does. */
  readonly signal?: AbortSignal;
}

export interface BootResult {
  /** The guest printed `<MODE>-OK` (FORMAT-OK, CHECK-OK) and qemu exited 0 by itself. */
  readonly ok: boolean;
  /** The last marker the guest printed, without "S3BLK-VM: ": "CHECK-FAIL sha256sum -c exit 1". */
  readonly marker: string | undefined;
  /** The serial console and qemu's own messages (stdout and stderr interleaved), "\r" removed. */
  readonly serial: string;
  /** qemu's exit code; 0 after the guest powers off, and also after a guest panic (-no-reboot). */
  readonly exitCode: number | null;
  readonly signal: NodeJS.Signals | null;
  readonly timedOut: boolean;
  readonly durationMs: number;
  /** The qemu command line, for a failure message. */
  readonly argv: readonly string[];
}

/** The kernel command line and qemu flags were chosen by measurement; see infra/vm/README.md. */
export function qemuArgs(options: BootGuestOptions): string[] {
  const readOnly = options.readOnly ?? options.mode !== "format";
  const discard = options.discard ?? true;
  const append = [
    "console=ttyS0",
    "panic=-1", // a panic reboots at once, and -no-reboot turns that into qemu exiting
    `s3blk.mode=${options.mode}`,
    ...(options.extraAppend ?? []),
  ];
  // qemu's option syntax doubles a comma inside a value.
  const file = options.nbdUri.replaceAll(",", ",,");
  const drive = [
    `file=${file}`,
    "format=raw",
    "if=virtio",
    "cache=none", // writeback cache visible to the guest, so ext4's flushes reach the server
    `discard=${discard ? "unmap" : "ignore"}`,
    ...(readOnly ? ["readonly=on"] : []),
  ].join(",");
  return [
    "-accel",
    "tcg",
    // -cpu max gives the guest RDRAND: without it the kernel's CRNG takes seconds to initialize
    // and mke2fs (libuuid, getrandom) waits for it.
    "-cpu",
    "max",
    "-smp",
    "1",
    "-m",
    String(options.memoryMiB ?? 512),
    // No default NIC (and its iPXE ROM), VGA, floppy or monitor: only the serial console.
    "-nodefaults",
    "-display",
    "none",
    "-serial",
    "stdio",
    "-no-reboot",
    "-kernel",
    options.kernel,
    "-initrd",
    options.initrd,
    "-append",
    append.join(" "),
    "-drive",
    drive,
  ];
}

const MARKER = /^S3BLK-VM: (.+)$/gm;

/** The last marker in a console log, without the "S3BLK-VM: " prefix. */
export function lastMarker(serial: string): string | undefined {
  let last: string | undefined;
  for (const match of serial.matchAll(MARKER)) last = match[1]?.trim();
  return last;
}

/** Boot the guest once, wait until qemu exits (or the timeout), and report. Never throws for a failed boot. */
export async function bootGuest(options: BootGuestOptions): Promise<BootResult> {
  const argv = qemuArgs(options);
  const run = await runProcess(QEMU, argv, {
    env: withoutAws(process.env),
    timeoutMs: options.timeoutMs ?? 120_000,
    outputLimitBytes: 8 * 1024 * 1024,
    onOutput: options.onOutput,
    signal: options.signal,
  });
  const serial = run.combined.replaceAll("\r", "");
  const marker = lastMarker(serial);
  const ok = marker === `${options.mode.toUpperCase()}-OK` && run.exitCode === 0 && !run.timedOut;
  return {
    ok,
    marker,
    serial,
    exitCode: run.exitCode,
    signal: run.signal,
    timedOut: run.timedOut,
    durationMs: run.durationMs,
    argv: [QEMU, ...argv],
  };
}

interface RunOptions {
  readonly env: NodeJS.ProcessEnv;
  readonly timeoutMs: number;
  /** Keep at most this much of each stream (and of the combined one): the tail. */
  readonly outputLimitBytes: number;
  readonly onOutput?: ((text: string) => void) | undefined;
  readonly signal?: AbortSignal | undefined;
}

interface RunResult {
  readonly stdout: string;
  readonly stderr: string;
  readonly combined: string;
  readonly exitCode: number | null;
  readonly signal: NodeJS.Signals | null;
  readonly timedOut: boolean;
  readonly durationMs: number;
}

/** Run a process with no stdin; stop it by its PID at the timeout or on abort. */
function runProcess(command: string, args: string[], options: RunOptions): Promise<RunResult> {
  const started = performance.now();
  return new Promise((resolve) => {
    const child = spawn(command, args, { env: options.env, stdio: ["ignore", "pipe", "pipe"] });
    const out = new TailBuffer(options.outputLimitBytes);
    const err = new TailBuffer(options.outputLimitBytes);
    const all = new TailBuffer(options.outputLimitBytes);
    let timedOut = false;
    let killTimer: NodeJS.Timeout | undefined;
    const stop = () => {
      if (child.pid === undefined || child.exitCode !== null || child.signalCode !== null) return;
      process.kill(child.pid, "SIGTERM");
      killTimer = setTimeout(() => {
        if (child.pid !== undefined && child.exitCode === null && child.signalCode === null) {
          process.kill(child.pid, "SIGKILL");
        }
      }, 5_000);
    };
    const timer = setTimeout(() => {
      timedOut = true;
      stop();
    }, options.timeoutMs);
    const onAbort = () => stop();
    options.signal?.addEventListener("abort", onAbort, { once: true });
    if (options.signal?.aborted) stop();
    const collect = (buffer: TailBuffer) => (chunk: Buffer) => {
      buffer.push(chunk);
      all.push(chunk);
      options.onOutput?.(chunk.toString("utf8"));
    };
    child.stdout.on("data", collect(out));
    child.stderr.on("data", collect(err));
    let settled = false;
    const finish = (exitCode: number | null, signal: NodeJS.Signals | null, error?: Error) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      clearTimeout(killTimer);
      options.signal?.removeEventListener("abort", onAbort);
      const note = error ? `\n${command}: ${error.message}\n` : "";
      resolve({
        stdout: out.text(),
        stderr: err.text() + note,
        combined: all.text() + note,
        exitCode,
        signal,
        timedOut,
        durationMs: performance.now() - started,
      });
    };
    // A process that could not be started gets "error" and maybe no "close".
    child.on("error", (error) => {
      if (child.pid === undefined) finish(null, null, error);
    });
    child.on("close", (exitCode, signal) => finish(exitCode, signal));
  });
}

/** The last `limitBytes` of a stream (the end of a console log is where the answer is). */
class TailBuffer {
  private chunks: Buffer[] = [];
  private sizeBytes = 0;
  private droppedBytes = 0;

  constructor(private readonly limitBytes: number) {}

  push(chunk: Buffer): void {
    this.chunks.push(chunk);
    this.sizeBytes += chunk.length;
    while (this.sizeBytes > this.limitBytes && this.chunks.length > 1) {
      const first = this.chunks.shift();
      if (first === undefined) break;
      this.sizeBytes -= first.length;
      this.droppedBytes += first.length;
    }
  }

  text(): string {
    const body = Buffer.concat(this.chunks).toString("utf8");
    return this.droppedBytes > 0 ? `[${this.droppedBytes} bytes dropped]\n${body}` : body;
  }
}
