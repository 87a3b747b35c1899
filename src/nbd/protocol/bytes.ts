/**
 * Big-endian field access on plain Uint8Arrays, and NBD string handling. Internal to the codec.
 *
 * Reads and writes go byte by byte so that no DataView has to be made per buffer; the one 64-bit
 * bigint path goes through a private 8-byte scratch view (the codec is synchronous, so sharing it
 * is safe). Callers check bounds before calling.
 */
import assert from "node:assert/strict";

import { NBD_MAX_STRING_BYTES } from "./constants.js";

/** A shared empty array; a zero-length view cannot be written through. */
export const EMPTY_BYTES = new Uint8Array(0);

const TWO_POW_32 = 0x1_0000_0000;
const U64_MAX = 0xffff_ffff_ffff_ffffn;

const scratchBytes = new Uint8Array(8);
const scratchView = new DataView(scratchBytes.buffer);

export function readU16(b: Uint8Array, at: number): number {
  return (b[at]! << 8) | b[at + 1]!;
}

export function readU32(b: Uint8Array, at: number): number {
  return ((b[at]! << 24) | (b[at + 1]! << 16) | (b[at + 2]! << 8) | b[at + 3]!) >>> 0;
}

/**
 * A u64 as a number. Exact up to 2^53 - 1; larger values come out rounded but never below 2^53,
 * so a bounds check against any real export size still rejects them.
 */
export function readU64AsNumber(b: Uint8Array, at: number): number {
  return readU32(b, at) * TWO_POW_32 + readU32(b, at + 4);
}

export function readU64AsBigInt(b: Uint8Array, at: number): bigint {
  for (let i = 0; i < 8; i++) scratchBytes[i] = b[at + i]!;
  return scratchView.getBigUint64(0);
}

export function writeU16(b: Uint8Array, at: number, v: number): void {
  b[at] = v >>> 8;
  b[at + 1] = v;
}

export function writeU32(b: Uint8Array, at: number, v: number): void {
  b[at] = v >>> 24;
  b[at + 1] = v >>> 16;
  b[at + 2] = v >>> 8;
  b[at + 3] = v;
}

export function writeU64FromNumber(b: Uint8Array, at: number, v: number): void {
  assert(Number.isSafeInteger(v) && v >= 0, "u64 field must be a non-negative safe integer");
  writeU32(b, at, Math.floor(v / TWO_POW_32));
  writeU32(b, at + 4, v >>> 0);
}

export function writeU64FromBigInt(b: Uint8Array, at: number, v: bigint): void {
  assert(v >= 0n && v <= U64_MAX, "u64 field out of range");
  scratchView.setBigUint64(0, v);
  for (let i = 0; i < 8; i++) b[at + i] = scratchBytes[i]!;
}

export function assertU16(v: number, what: string): void {
  assert(Number.isInteger(v) && v >= 0 && v <= 0xffff, what);
}

export function assertU32(v: number, what: string): void {
  assert(Number.isInteger(v) && v >= 0 && v <= 0xffff_ffff, what);
}

const utf8Encoder = new TextEncoder();
const strictUtf8Decoder = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });

/** UTF-8 bytes of a name the spec limits to NBD_MAX_STRING_BYTES; longer is a caller bug. */
export function encodeNbdString(s: string): Uint8Array {
  const bytes = utf8Encoder.encode(s);
  assert(bytes.length <= NBD_MAX_STRING_BYTES, "NBD string longer than 4096 bytes");
  return bytes;
}

/** UTF-8 bytes of free text (messages, descriptions), cut at a character boundary to the limit. */
export function encodeNbdText(s: string): Uint8Array {
  const bytes = utf8Encoder.encode(s);
  if (bytes.length <= NBD_MAX_STRING_BYTES) return bytes;
  let end = NBD_MAX_STRING_BYTES;
  while (end > 0 && (bytes[end]! & 0xc0) === 0x80) end--;
  return bytes.subarray(0, end);
}

/**
 * Decode a client-sent string: valid UTF-8, no NUL, at most 4096 bytes. Returns the reason as a
 * `{ invalid }` value otherwise.
 */
export function decodeNbdString(bytes: Uint8Array, what: string): string | { invalid: string } {
  if (bytes.length > NBD_MAX_STRING_BYTES) {
    return { invalid: `${what} is ${bytes.length} bytes, longer than ${NBD_MAX_STRING_BYTES}` };
  }
  if (bytes.includes(0)) return { invalid: `${what} contains NUL` };
  try {
    return strictUtf8Decoder.decode(bytes);
  } catch {
    return { invalid: `${what} is not valid UTF-8` };
  }
}
