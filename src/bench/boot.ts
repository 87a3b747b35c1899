/**
 * The boot row: a Linux guest under qemu TCG (src/bench/guest.ts, infra/vm) mounts a root
 * filesystem image (a Debian minbase with Python 3, infra/vm/build-rootfs.sh) and runs a program
 * from it, once from a local raw file and once from a cold s3blk volume holding the same image.
 *
 * - The local reference is `nbdkit file` on the raw image, with nbdkit's log filter, whose log
 *   says exactly which bytes the guest asked for.
 * - s3blk is a fresh `s3blk serve` process (default cache) on a volume the image was imported
 *   into, reached through the delay proxy (delay-proxy.ts) at each latency, also at 0 ms, so
 *   that the proxy counts the GETs and the bytes fetched (answers, headers included): RGW's own
 *   counters are shared with anything else on the machine.
 * - The figure is the guest's own time from the moment it starts mounting to the program's
 *   answer (the uptime stamps of init.sh's "boot: mount" and "boot: answer" lines): kernel start
 *   and module loading are the same on both sides and are left out.
 *
 * Rounds alternate local and s3blk; the row reports medians, because TCG is noisy. Every boot's
 * answer must equal the local one's.
 */

import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { DelayProxy } from "./delay-proxy.js";
import { bootGuest, ensureGuest, type GuestImage } from "./guest.js";
import { spread } from "./interleave.js";
import { startProcess, startS3blk, THIS_CLI, type S3Settings } from "./targets.js";

export interface BootTurn {
  /** Guest seconds from "boot: mount" to "boot: answer". */
  readonly mountToAnswerSeconds?: number;
  readonly answer?: string;
  readonly error?: string;
  /** Local turns: bytes and requests the guest read. */
  readonly guestReadBytes?: number;
  readonly guestReads?: number;
  /** s3blk turns: bytes of answers (headers included) and GETs through the proxy. */
  readonly fetchedBytes?: number;
  readonly gets?: number;
}

export interface BootRow {
  readonly latencyMs: number;
  readonly local: BootTurn[];
  readonly s3blk: BootTurn[];
  /** s3blk's time over the local one's, per round. */
  readonly ratios: number[];
  readonly ratio?: { median: number; min: number; max: number };
}

export interface BootRowsOptions {
  readonly s3: S3Settings;
  readonly run: string;
  readonly env: NodeJS.ProcessEnv;
  readonly cli: string;
  readonly latenciesMs: readonly number[];
  readonly rounds: number;
}

const MOUNT_LINE = /s3blk-vm: \[([\d.]+)s\] boot: mount/;
const ANSWER_LINE = /s3blk-vm: \[([\d.]+)s\] boot: answer/;

/** The boot rows, one per latency; a string if the guest or the image cannot be built here. */
export async function runBootRows(options: BootRowsOptions): Promise<BootRow[] | string> {
  const guest = await ensureGuest();
  if (typeof guest === "string") return guest;
  let image: string;
  try {
    image = execFileSync("bash", [rootfsScript()], {
      encoding: "utf8",
      stdio: ["ignore", "pipe", "inherit"],
      timeout: 1_800_000,
    }).trim();
  } catch (error) {
    return `infra/vm/build-rootfs.sh failed: ${(error as Error).message.split("\n")[0]}`;
  }
  const volumeUrl = `s3://${options.s3.bucket}/bench-${options.run}/boot`;
  execFileSync(process.execPath, [THIS_CLI, "import", image, volumeUrl], {
    env: options.env,
    stdio: "ignore",
  });
  const rows: BootRow[] = [];
  for (const latencyMs of options.latenciesMs) {
    const proxy = await DelayProxy.start(options.s3.endpoint, latencyMs);
    const row: BootRow = { latencyMs, local: [], s3blk: [], ratios: [] };
    try {
      for (let round = 0; round < options.rounds; round++) {
        const local = await localTurn(guest, image);
        const ours = await s3blkTurn(guest, volumeUrl, proxy, options);
        row.local.push(local);
        row.s3blk.push(
          ours.answer === undefined || ours.answer === local.answer
            ? ours
            : { ...ours, error: `answered "${ours.answer}", not "${local.answer}"` },
        );
        if (ours.mountToAnswerSeconds !== undefined && local.mountToAnswerSeconds !== undefined) {
          row.ratios.push(ours.mountToAnswerSeconds / local.mountToAnswerSeconds);
        }
        console.error(
          `  boot @${latencyMs}ms round ${round + 1}: local ${local.mountToAnswerSeconds?.toFixed(2) ?? local.error} s, ` +
            `s3blk ${ours.mountToAnswerSeconds?.toFixed(2) ?? ours.error} s, ` +
            `fetched ${((ours.fetchedBytes ?? 0) / 2 ** 20).toFixed(1)} MiB in ${ours.gets} GETs, ` +
            `guest read ${((local.guestReadBytes ?? 0) / 2 ** 20).toFixed(1)} MiB`,
        );
      }
    } finally {
      await proxy.stop();
    }
    const ratio = spread(row.ratios);
    rows.push(ratio === undefined ? row : { ...row, ratio });
  }
  return rows;
}

function rootfsScript(): string {
  return path.resolve(
    path.dirname(new URL(import.meta.url).pathname),
    "../../infra/vm/build-rootfs.sh",
  );
}

function timesOf(serial: string): { seconds?: number; answer?: string } {
  const mount = MOUNT_LINE.exec(serial)?.[1];
  const answer = ANSWER_LINE.exec(serial)?.[1];
  const marker = /^S3BLK-VM: BOOT-OK (.+)$/m.exec(serial)?.[1]?.trim();
  return {
    ...(mount === undefined || answer === undefined
      ? {}
      : { seconds: Number(answer) - Number(mount) }),
    ...(marker === undefined ? {} : { answer: marker }),
  };
}

async function boot(guest: GuestImage, nbdUri: string): Promise<BootTurn> {
  const result = await bootGuest({ ...guest, nbdUri, mode: "boot", timeoutMs: 600_000 });
  const { seconds, answer } = timesOf(result.serial);
  const booted = result.exitCode === 0 && !result.timedOut && answer !== undefined;
  if (!booted || seconds === undefined) {
    return {
      error: `boot failed: ${result.marker ?? result.serial.split("\n").slice(-3).join(" | ")}`,
    };
  }
  return { mountToAnswerSeconds: seconds, ...(answer === undefined ? {} : { answer }) };
}

/** The guest on `nbdkit file` over the image, its reads logged. */
async function localTurn(guest: GuestImage, image: string): Promise<BootTurn> {
  const dir = mkdtempSync(path.join(tmpdir(), "s3blk-bench-boot-"));
  const socket = path.join(dir, "nbd.sock");
  const log = path.join(dir, "reads.log");
  const server = await startProcess(
    "nbdkit",
    ["-f", "-r", "-U", socket, "--filter=log", "file", image, `logfile=${log}`],
    socket,
  );
  try {
    const turn = await boot(guest, server.uri);
    await server.stop();
    const { bytes, reads } = readsInLog(readFileSync(log, "utf8"));
    return { ...turn, guestReadBytes: bytes, guestReads: reads };
  } finally {
    await server.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}

/** Bytes and requests of the reads in an nbdkit log filter's log. */
export function readsInLog(log: string): { bytes: number; reads: number } {
  let bytes = 0;
  let reads = 0;
  for (const match of log.matchAll(/ Read id=\d+ offset=0x[0-9a-f]+ count=0x([0-9a-f]+)/g)) {
    bytes += parseInt(match[1]!, 16);
    reads++;
  }
  return { bytes, reads };
}

/** The guest on a fresh `s3blk serve` of the volume, through the proxy. */
async function s3blkTurn(
  guest: GuestImage,
  volumeUrl: string,
  proxy: DelayProxy,
  options: BootRowsOptions,
): Promise<BootTurn> {
  const server = await startS3blk({
    volumeUrl,
    cacheBytes: 256 << 20,
    dirtyBytes: 128 << 20,
    env: { ...options.env, AWS_ENDPOINT_URL: proxy.endpoint },
    cli: options.cli,
    readOnly: true,
  });
  // The open's LISTs and seal GET are done once the socket exists: count from here.
  const bytesBefore = proxy.counts.responseBytes;
  const getsBefore = proxy.counts.gets;
  try {
    const turn = await boot(guest, server.uri);
    return {
      ...turn,
      fetchedBytes: proxy.counts.responseBytes - bytesBefore,
      gets: proxy.counts.gets - getsBefore,
    };
  } finally {
    await server.stop();
  }
}

/** The boot rows as a table. */
export function bootTable(rows: readonly BootRow[]): string[][] {
  const lines = [
    [
      "latency",
      "local s (median)",
      "s3blk s (median)",
      "s3blk / local",
      "ratios",
      "guest read MiB",
      "fetched MiB",
      "fetched / read",
      "GETs",
      "errors",
    ],
  ];
  for (const row of rows) {
    const median = (xs: (number | undefined)[]) =>
      spread(xs.filter((x): x is number => x !== undefined))?.median;
    const local = median(row.local.map((t) => t.mountToAnswerSeconds));
    const ours = median(row.s3blk.map((t) => t.mountToAnswerSeconds));
    const read = median(row.local.map((t) => t.guestReadBytes));
    const fetched = median(row.s3blk.map((t) => t.fetchedBytes));
    const errors = [...row.local, ...row.s3blk].flatMap((t) => (t.error ? [t.error] : []));
    lines.push([
      `${row.latencyMs} ms`,
      local?.toFixed(2) ?? "-",
      ours?.toFixed(2) ?? "-",
      row.ratio === undefined ? "-" : `${row.ratio.median.toFixed(2)}x`,
      row.ratio === undefined ? "-" : `${row.ratio.min.toFixed(2)}-${row.ratio.max.toFixed(2)}`,
      read === undefined ? "-" : (read / 2 ** 20).toFixed(1),
      fetched === undefined ? "-" : (fetched / 2 ** 20).toFixed(1),
      read === undefined || fetched === undefined ? "-" : `${(fetched / read).toFixed(2)}x`,
      String(median(row.s3blk.map((t) => t.gets)) ?? "-"),
      errors.length === 0 ? "" : errors[0]!,
    ]);
  }
  return lines;
}
