/**
 * Copy a raw image file into a volume, or a volume out to a file, without moving zeros:
 *
 * - import skips all-zero blocks of the file (on a volume that was empty) or discards them (on
 *   one that had data), so a sparse or mostly-empty image stays thin in the bucket;
 * - export reads only the extents the allocation map says hold data, and leaves holes in the
 *   file where the volume has none, so the file is as sparse as the volume.
 *
 * Both keep a bounded number of requests in flight (`depth`), each `pieceBytes` long, and report
 * progress through a callback.
 */

import assert from "node:assert/strict";
import { open } from "node:fs/promises";
import { ppError, ppWriteError } from "../block/block-device.js";
import type { ChunkedBlockDevice } from "../device/chunked-block-device.js";
import { readFully } from "../util/read-fully.js";

export interface TransferOptions {
  /** Bytes per request. Default 4 MiB. */
  readonly pieceBytes?: number;
  /** Requests in flight. Default 8. */
  readonly depth?: number;
  /** Told after each piece: bytes done of bytes in all. */
  readonly onProgress?: (doneBytes: number, totalBytes: number) => void;
}

export interface TransferResult {
  /** Bytes of the source covered. */
  readonly totalBytes: number;
  /** Bytes that held data and were copied. */
  readonly dataBytes: number;
}

/** Granularity of zero detection. */
const ZERO_BLOCK_BYTES = 64 * 1024;

/** A failed transfer: the message says where. */
export class TransferError extends Error {
  override readonly name = "TransferError";
}

/**
 * Copy the file at `path` into `device` from byte 0. `wasEmpty` says the volume was just created,
 * so zero blocks need not be written at all.
 */
export async function importFile(
  path: string,
  device: ChunkedBlockDevice,
  wasEmpty: boolean,
  options: TransferOptions = {},
): Promise<TransferResult> {
  const info = await device.getInfo();
  const sectorSize = info.sectorSize;
  const deviceBytes = Number(info.sizeSectors) * sectorSize;
  const file = await open(path, "r");
  try {
    const fileBytes = (await file.stat()).size;
    if (fileBytes > deviceBytes) {
      throw new TransferError(
        `${path} is ${fileBytes} bytes, larger than the volume (${deviceBytes} bytes)`,
      );
    }
    const pieceBytes = options.pieceBytes ?? 4 * 1024 * 1024;
    let dataBytes = 0;
    let doneBytes = 0;
    await forEachPiece(fileBytes, pieceBytes, options.depth ?? 8, async (offset, length) => {
      // The last piece is padded with zeros to a whole sector.
      const padded = Math.ceil(length / sectorSize) * sectorSize;
      const buffer = Buffer.alloc(padded);
      await readFully(
        file,
        buffer.subarray(0, length),
        offset,
        (at) => new TransferError(`unexpected end of file at byte ${at}`),
      );
      for (let at = 0; at < padded; at += ZERO_BLOCK_BYTES) {
        const block = buffer.subarray(at, Math.min(padded, at + ZERO_BLOCK_BYTES));
        const sector = (offset + at) / sectorSize;
        if (isZero(block)) {
          if (wasEmpty) continue;
          const discarded = await device.discard(sector, block.length / sectorSize);
          if (!discarded.ok)
            throw new TransferError(`at byte ${offset + at}: ${ppWriteError(discarded.error)}`);
          continue;
        }
        const written = await device.write(sector, [block]);
        if (!written.ok)
          throw new TransferError(`at byte ${offset + at}: ${ppWriteError(written.error)}`);
        dataBytes += block.length;
      }
      doneBytes += length;
      options.onProgress?.(doneBytes, fileBytes);
    });
    const flushed = await device.flush();
    if (!flushed.ok) throw new TransferError(`flush: ${ppWriteError(flushed.error)}`);
    return { totalBytes: fileBytes, dataBytes };
  } finally {
    await file.close();
  }
}

/** Copy all of `device` into a file at `path`, created or truncated, sparse where it can be. */
export async function exportVolume(
  device: ChunkedBlockDevice,
  path: string,
  options: TransferOptions = {},
): Promise<TransferResult> {
  const info = await device.getInfo();
  const sectorSize = info.sectorSize;
  const totalBytes = Number(info.sizeSectors) * sectorSize;
  const file = await open(path, "w");
  try {
    await file.truncate(totalBytes);
    const pieceBytes = options.pieceBytes ?? 4 * 1024 * 1024;
    let dataBytes = 0;
    let doneBytes = 0;
    await forEachPiece(totalBytes, pieceBytes, options.depth ?? 8, async (offset, length) => {
      for (const extent of device.allocationMap(offset, length)) {
        if (!extent.allocated) continue;
        const buffer = Buffer.allocUnsafe(extent.lengthBytes);
        const read = await device.read(extent.offsetBytes / sectorSize, [buffer]);
        if (!read.ok)
          throw new TransferError(`at byte ${extent.offsetBytes}: ${ppError(read.error)}`);
        for (let at = 0; at < buffer.length; at += ZERO_BLOCK_BYTES) {
          const block = buffer.subarray(at, Math.min(buffer.length, at + ZERO_BLOCK_BYTES));
          if (isZero(block)) continue;
          await file.write(block, 0, block.length, extent.offsetBytes + at);
          dataBytes += block.length;
        }
      }
      doneBytes += length;
      options.onProgress?.(doneBytes, totalBytes);
    });
    await file.sync();
    return { totalBytes, dataBytes };
  } finally {
    await file.close();
  }
}

/** Run `task` over `[0, totalBytes)` in pieces, `depth` at a time, in order of start. */
async function forEachPiece(
  totalBytes: number,
  pieceBytes: number,
  depth: number,
  task: (offset: number, length: number) => Promise<void>,
): Promise<void> {
  assert(pieceBytes > 0 && depth > 0);
  let next = 0;
  const worker = async () => {
    while (next < totalBytes) {
      const offset = next;
      const length = Math.min(pieceBytes, totalBytes - offset);
      next += length;
      await task(offset, length);
    }
  };
  await Promise.all(Array.from({ length: depth }, worker));
}

const ZEROS = Buffer.alloc(ZERO_BLOCK_BYTES);

function isZero(block: Buffer): boolean {
  return block.length <= ZEROS.length
    ? block.equals(ZEROS.subarray(0, block.length))
    : block.every((b) => b === 0);
}
