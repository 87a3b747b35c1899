/**
 * Server-side encoders for the transmission phase.
 *
 * Fixed-size headers come in two forms: `writeX(dst, at, ...)` fills a caller-provided buffer and
 * returns the position just past what it wrote (no allocation, for batching several headers in
 * one buffer), and `encodeX(...)` returns a fresh exactly-sized array. Payloads (read data) are
 * never copied here: write the OFFSET_DATA or simple reply header, then the data as its own
 * buffer. Error chunks carry a variable-length message and are cold, so they only come as
 * `encodeX`.
 */
import assert from "node:assert/strict";

import {
  assertU16,
  assertU32,
  encodeNbdText,
  writeU16,
  writeU32,
  writeU64FromBigInt,
  writeU64FromNumber,
} from "./bytes.js";
import {
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_ERROR_OFFSET,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
  OFFSET_DATA_HEADER_BYTES,
  OFFSET_HOLE_CHUNK_BYTES,
  SIMPLE_REPLY_HEADER_BYTES,
  STRUCTURED_REPLY_HEADER_BYTES,
} from "./constants.js";

function assertRoom(dst: Uint8Array, at: number, bytes: number): void {
  assert(Number.isInteger(at) && at >= 0 && at + bytes <= dst.length, "no room in dst");
}

/**
 * Simple reply header (16 bytes): magic, error (0 = success), cookie. For a successful
 * NBD_CMD_READ the read data follows as a separate write.
 */
export function writeSimpleReplyHeader(
  dst: Uint8Array,
  at: number,
  error: number,
  cookie: bigint,
): number {
  assertRoom(dst, at, SIMPLE_REPLY_HEADER_BYTES);
  assertU32(error, "error must fit 32 bits");
  writeU32(dst, at, NBD_SIMPLE_REPLY_MAGIC);
  writeU32(dst, at + 4, error);
  writeU64FromBigInt(dst, at + 8, cookie);
  return at + SIMPLE_REPLY_HEADER_BYTES;
}

/** {@link writeSimpleReplyHeader} into a fresh 16-byte array. */
export function encodeSimpleReplyHeader(error: number, cookie: bigint): Uint8Array {
  const b = new Uint8Array(SIMPLE_REPLY_HEADER_BYTES);
  writeSimpleReplyHeader(b, 0, error, cookie);
  return b;
}

/**
 * Generic structured reply chunk header (20 bytes): magic, flags, type, cookie, payload length.
 * The typed helpers below are preferred; this one is for chunk types they do not cover.
 */
export function writeStructuredReplyHeader(
  dst: Uint8Array,
  at: number,
  replyFlags: number,
  replyType: number,
  cookie: bigint,
  payloadLength: number,
): number {
  assertRoom(dst, at, STRUCTURED_REPLY_HEADER_BYTES);
  assertU16(replyFlags, "reply flags must fit 16 bits");
  assertU16(replyType, "reply type must fit 16 bits");
  assertU32(payloadLength, "chunk payload length must fit 32 bits");
  writeU32(dst, at, NBD_STRUCTURED_REPLY_MAGIC);
  writeU16(dst, at + 4, replyFlags);
  writeU16(dst, at + 6, replyType);
  writeU64FromBigInt(dst, at + 8, cookie);
  writeU32(dst, at + 16, payloadLength);
  return at + STRUCTURED_REPLY_HEADER_BYTES;
}

/**
 * NBD_REPLY_TYPE_NONE chunk (20 bytes). The spec requires NBD_REPLY_FLAG_DONE on it, so the flag
 * is always set.
 */
export function writeNoneChunk(dst: Uint8Array, at: number, cookie: bigint): number {
  return writeStructuredReplyHeader(dst, at, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, cookie, 0);
}

/** {@link writeNoneChunk} into a fresh 20-byte array. */
export function encodeNoneChunk(cookie: bigint): Uint8Array {
  const b = new Uint8Array(STRUCTURED_REPLY_HEADER_BYTES);
  writeNoneChunk(b, 0, cookie);
  return b;
}

/**
 * Header of an NBD_REPLY_TYPE_OFFSET_DATA chunk (28 bytes: chunk header + 64-bit offset). The
 * `dataLength` bytes of data are not written here; send them right after. `dataLength` must be
 * 1 .. 2^32 - 9 (the chunk length field counts the offset too).
 */
export function writeOffsetDataHeader(
  dst: Uint8Array,
  at: number,
  replyFlags: number,
  cookie: bigint,
  offset: number,
  dataLength: number,
): number {
  assert(Number.isInteger(dataLength) && dataLength >= 1, "OFFSET_DATA needs at least 1 byte");
  assertRoom(dst, at, OFFSET_DATA_HEADER_BYTES);
  writeStructuredReplyHeader(
    dst,
    at,
    replyFlags,
    NBD_REPLY_TYPE_OFFSET_DATA,
    cookie,
    8 + dataLength,
  );
  writeU64FromNumber(dst, at + STRUCTURED_REPLY_HEADER_BYTES, offset);
  return at + OFFSET_DATA_HEADER_BYTES;
}

/** {@link writeOffsetDataHeader} into a fresh 28-byte array. */
export function encodeOffsetDataHeader(
  replyFlags: number,
  cookie: bigint,
  offset: number,
  dataLength: number,
): Uint8Array {
  const b = new Uint8Array(OFFSET_DATA_HEADER_BYTES);
  writeOffsetDataHeader(b, 0, replyFlags, cookie, offset, dataLength);
  return b;
}

/** A whole NBD_REPLY_TYPE_OFFSET_HOLE chunk (32 bytes): `holeLength` zero bytes at `offset`. */
export function writeOffsetHoleChunk(
  dst: Uint8Array,
  at: number,
  replyFlags: number,
  cookie: bigint,
  offset: number,
  holeLength: number,
): number {
  assert(holeLength >= 1, "hole size must be nonzero");
  assertU32(holeLength, "hole size must fit 32 bits");
  assertRoom(dst, at, OFFSET_HOLE_CHUNK_BYTES);
  writeStructuredReplyHeader(dst, at, replyFlags, NBD_REPLY_TYPE_OFFSET_HOLE, cookie, 12);
  writeU64FromNumber(dst, at + 20, offset);
  writeU32(dst, at + 28, holeLength);
  return at + OFFSET_HOLE_CHUNK_BYTES;
}

/** {@link writeOffsetHoleChunk} into a fresh 32-byte array. */
export function encodeOffsetHoleChunk(
  replyFlags: number,
  cookie: bigint,
  offset: number,
  holeLength: number,
): Uint8Array {
  const b = new Uint8Array(OFFSET_HOLE_CHUNK_BYTES);
  writeOffsetHoleChunk(b, 0, replyFlags, cookie, offset, holeLength);
  return b;
}

/** One block status descriptor: `length` bytes (nonzero) with NBD_STATE_* `statusFlags`. */
export interface BlockStatusExtent {
  readonly length: number;
  readonly statusFlags: number;
}

/** Size in bytes of an NBD_REPLY_TYPE_BLOCK_STATUS chunk with `extentCount` descriptors. */
export function blockStatusChunkBytes(extentCount: number): number {
  return STRUCTURED_REPLY_HEADER_BYTES + 4 + 8 * extentCount;
}

/**
 * A whole NBD_REPLY_TYPE_BLOCK_STATUS chunk: metadata context id, then one or more extents
 * (the spec forbids an empty list and zero-length extents). Needs
 * {@link blockStatusChunkBytes}`(extents.length)` bytes of room.
 */
export function writeBlockStatusChunk(
  dst: Uint8Array,
  at: number,
  replyFlags: number,
  cookie: bigint,
  contextId: number,
  extents: readonly BlockStatusExtent[],
): number {
  assert(extents.length >= 1, "BLOCK_STATUS needs at least one extent");
  assertU32(contextId, "context id must fit 32 bits");
  const total = blockStatusChunkBytes(extents.length);
  assertRoom(dst, at, total);
  writeStructuredReplyHeader(
    dst,
    at,
    replyFlags,
    NBD_REPLY_TYPE_BLOCK_STATUS,
    cookie,
    total - STRUCTURED_REPLY_HEADER_BYTES,
  );
  writeU32(dst, at + 20, contextId);
  let p = at + 24;
  for (const e of extents) {
    assert(e.length >= 1, "extent length must be nonzero");
    assertU32(e.length, "extent length must fit 32 bits");
    assertU32(e.statusFlags, "status flags must fit 32 bits");
    writeU32(dst, p, e.length);
    writeU32(dst, p + 4, e.statusFlags);
    p += 8;
  }
  return p;
}

/** {@link writeBlockStatusChunk} into a fresh exactly-sized array. */
export function encodeBlockStatusChunk(
  replyFlags: number,
  cookie: bigint,
  contextId: number,
  extents: readonly BlockStatusExtent[],
): Uint8Array {
  const b = new Uint8Array(blockStatusChunkBytes(extents.length));
  writeBlockStatusChunk(b, 0, replyFlags, cookie, contextId, extents);
  return b;
}

/**
 * An NBD_REPLY_TYPE_ERROR chunk: nonzero NBD_E* `error` and an optional message (cut to 4096
 * bytes). Usually sent with NBD_REPLY_FLAG_DONE.
 */
export function encodeErrorChunk(
  replyFlags: number,
  cookie: bigint,
  error: number,
  message = "",
): Uint8Array {
  assert(error !== 0, "error chunks carry a nonzero error");
  const msg = encodeNbdText(message);
  const b = new Uint8Array(STRUCTURED_REPLY_HEADER_BYTES + 6 + msg.length);
  writeStructuredReplyHeader(b, 0, replyFlags, NBD_REPLY_TYPE_ERROR, cookie, 6 + msg.length);
  writeU32(b, 20, error);
  writeU16(b, 24, msg.length);
  b.set(msg, 26);
  return b;
}

/**
 * An NBD_REPLY_TYPE_ERROR_OFFSET chunk: like {@link encodeErrorChunk} plus the export `offset`
 * where the error happened (which must lie inside the request).
 */
export function encodeErrorOffsetChunk(
  replyFlags: number,
  cookie: bigint,
  error: number,
  offset: number,
  message = "",
): Uint8Array {
  assert(error !== 0, "error chunks carry a nonzero error");
  const msg = encodeNbdText(message);
  const b = new Uint8Array(STRUCTURED_REPLY_HEADER_BYTES + 14 + msg.length);
  writeStructuredReplyHeader(
    b,
    0,
    replyFlags,
    NBD_REPLY_TYPE_ERROR_OFFSET,
    cookie,
    14 + msg.length,
  );
  writeU32(b, 20, error);
  writeU16(b, 24, msg.length);
  b.set(msg, 26);
  writeU64FromNumber(b, 26 + msg.length, offset);
  return b;
}
