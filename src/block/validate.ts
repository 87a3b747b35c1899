/**
 * Argument checks at the edge of a block device: mirage-block's `Make_safe`.
 *
 * `checkRequest` turns a `(sector, buffers)` pair into a byte range, or into a clear
 * {@link InvalidArgumentError} without touching data. Devices call it first thing; inner layers
 * then `assert` the same preconditions, because past this point a violation is a bug.
 */

import { InvalidArgumentError, type Sector } from "./block-device.js";

/** A checked request: a byte range inside the device. */
export interface ByteRange {
  /** Offset of the first byte. */
  readonly offsetBytes: number;
  /** Number of bytes; may be 0. */
  readonly lengthBytes: number;
}

/** Geometry a request is checked against. */
export interface Geometry {
  readonly sectorSize: number;
  readonly sizeSectors: bigint;
}

/** Convert a sector argument to a bigint, or explain why it is not one. */
export function toSector(value: Sector, what: string): bigint | InvalidArgumentError {
  if (typeof value === "bigint") {
    return value < 0n ? new InvalidArgumentError(`${what} ${value} is negative`) : value;
  }
  if (!Number.isSafeInteger(value)) {
    return new InvalidArgumentError(`${what} ${value} is not a safe integer`);
  }
  if (value < 0) return new InvalidArgumentError(`${what} ${value} is negative`);
  return BigInt(value);
}

/**
 * Check a `read`/`write` request: every buffer a whole number of sectors, the range inside the
 * device.
 */
export function checkRequest(
  geometry: Geometry,
  sectorStart: Sector,
  buffers: readonly Uint8Array[],
): ByteRange | InvalidArgumentError {
  let lengthBytes = 0;
  for (let i = 0; i < buffers.length; i++) {
    const buffer = buffers[i];
    if (!(buffer instanceof Uint8Array)) {
      return new InvalidArgumentError(`buffer ${i} is not a Uint8Array`);
    }
    if (buffer.byteLength % geometry.sectorSize !== 0) {
      return new InvalidArgumentError(
        `buffer ${i} is ${buffer.byteLength} bytes, not a whole number of ${geometry.sectorSize}-byte sectors`,
      );
    }
    lengthBytes += buffer.byteLength;
  }
  return checkRange(geometry, sectorStart, lengthBytes / geometry.sectorSize);
}

const MAX_SAFE_SECTORS = BigInt(Number.MAX_SAFE_INTEGER);

/** Check a `discard`-style request given as a sector count. */
export function checkRange(
  geometry: Geometry,
  sectorStart: Sector,
  sectors: Sector,
): ByteRange | InvalidArgumentError {
  // Every request passes here: in plain numbers when that is exact, in bigints otherwise (and
  // for the error messages).
  if (
    typeof sectorStart === "number" &&
    typeof sectors === "number" &&
    Number.isSafeInteger(sectorStart) &&
    Number.isSafeInteger(sectors) &&
    sectorStart >= 0 &&
    sectors >= 0 &&
    geometry.sizeSectors <= MAX_SAFE_SECTORS &&
    sectorStart + sectors <= Number(geometry.sizeSectors)
  ) {
    const size = geometry.sectorSize;
    // `+ 0` turns a -0 argument into 0, as the bigint path does.
    const offsetBytes = sectorStart * size + 0;
    const lengthBytes = sectors * size + 0;
    if (Number.isSafeInteger(offsetBytes + lengthBytes)) return { offsetBytes, lengthBytes };
  }
  const start = toSector(sectorStart, "sector");
  if (start instanceof InvalidArgumentError) return start;
  const count = toSector(sectors, "sector count");
  if (count instanceof InvalidArgumentError) return count;
  if (start > geometry.sizeSectors) {
    return new InvalidArgumentError(
      `sector ${start} is past the end of the device (${geometry.sizeSectors} sectors)`,
    );
  }
  if (start + count > geometry.sizeSectors) {
    return new InvalidArgumentError(
      `sectors ${start}..${start + count} end past the end of the device (${geometry.sizeSectors} sectors)`,
    );
  }
  const size = BigInt(geometry.sectorSize);
  return { offsetBytes: Number(start * size), lengthBytes: Number(count * size) };
}
