/**
 * Server-side encoders for the handshake phase. These run once or a few times per connection, so
 * each returns a fresh, exactly-sized Uint8Array.
 */
import assert from "node:assert/strict";

import {
  assertU16,
  assertU32,
  EMPTY_BYTES,
  encodeNbdString,
  encodeNbdText,
  writeU16,
  writeU32,
  writeU64FromBigInt,
  writeU64FromNumber,
} from "./bytes.js";
import {
  EXPORT_NAME_REPLY_ZEROES_BYTES,
  GREETING_BYTES,
  IHAVEOPT,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_EXPORT,
  NBD_INFO_NAME,
  NBD_REP_ACK,
  NBD_REP_FLAG_ERROR,
  NBD_REP_INFO,
  NBD_REP_MAGIC,
  NBD_REP_META_CONTEXT,
  NBD_REP_SERVER,
  NBDMAGIC,
  OPTION_REPLY_HEADER_BYTES,
} from "./constants.js";

/** The newstyle greeting: NBDMAGIC, IHAVEOPT, 16-bit handshake flags (18 bytes). */
export function encodeGreeting(handshakeFlags: number): Uint8Array {
  assertU16(handshakeFlags, "handshake flags must fit 16 bits");
  const b = new Uint8Array(GREETING_BYTES);
  writeU64FromBigInt(b, 0, NBDMAGIC);
  writeU64FromBigInt(b, 8, IHAVEOPT);
  writeU16(b, 16, handshakeFlags);
  return b;
}

/**
 * The reply that ends an NBD_OPT_EXPORT_NAME handshake: export size, transmission flags, and the
 * 124 reserved zero bytes unless the client set NBD_FLAG_C_NO_ZEROES (`noZeroes`).
 */
export function encodeExportNameReply(
  sizeBytes: number,
  transmissionFlags: number,
  noZeroes: boolean,
): Uint8Array {
  assertU16(transmissionFlags, "transmission flags must fit 16 bits");
  const b = new Uint8Array(10 + (noZeroes ? 0 : EXPORT_NAME_REPLY_ZEROES_BYTES));
  writeU64FromNumber(b, 0, sizeBytes);
  writeU16(b, 8, transmissionFlags);
  return b;
}

/** Any fixed-newstyle option reply: NBD_REP_MAGIC, option, reply type, length, data. */
export function encodeOptionReply(
  option: number,
  replyType: number,
  data: Uint8Array = EMPTY_BYTES,
): Uint8Array {
  assertU32(option, "option must fit 32 bits");
  assertU32(replyType, "reply type must fit 32 bits");
  const b = new Uint8Array(OPTION_REPLY_HEADER_BYTES + data.length);
  writeU64FromBigInt(b, 0, NBD_REP_MAGIC);
  writeU32(b, 8, option);
  writeU32(b, 12, replyType);
  writeU32(b, 16, data.length);
  b.set(data, OPTION_REPLY_HEADER_BYTES);
  return b;
}

/** NBD_REP_ACK for `option`. */
export function encodeRepAck(option: number): Uint8Array {
  return encodeOptionReply(option, NBD_REP_ACK);
}

/** One NBD_REP_SERVER entry of an NBD_OPT_LIST answer: name, then optional description text. */
export function encodeRepServer(option: number, name: string, description = ""): Uint8Array {
  const nameBytes = encodeNbdString(name);
  const descBytes = encodeNbdText(description);
  const data = new Uint8Array(4 + nameBytes.length + descBytes.length);
  writeU32(data, 0, nameBytes.length);
  data.set(nameBytes, 4);
  data.set(descBytes, 4 + nameBytes.length);
  return encodeOptionReply(option, NBD_REP_SERVER, data);
}

/** NBD_REP_INFO carrying NBD_INFO_EXPORT: export size and transmission flags. */
export function encodeRepInfoExport(
  option: number,
  sizeBytes: number,
  transmissionFlags: number,
): Uint8Array {
  assertU16(transmissionFlags, "transmission flags must fit 16 bits");
  const data = new Uint8Array(12);
  writeU16(data, 0, NBD_INFO_EXPORT);
  writeU64FromNumber(data, 2, sizeBytes);
  writeU16(data, 10, transmissionFlags);
  return encodeOptionReply(option, NBD_REP_INFO, data);
}

function encodeRepInfoText(option: number, info: number, bytes: Uint8Array): Uint8Array {
  const data = new Uint8Array(2 + bytes.length);
  writeU16(data, 0, info);
  data.set(bytes, 2);
  return encodeOptionReply(option, NBD_REP_INFO, data);
}

/** NBD_REP_INFO carrying NBD_INFO_NAME: the export's canonical name. */
export function encodeRepInfoName(option: number, name: string): Uint8Array {
  return encodeRepInfoText(option, NBD_INFO_NAME, encodeNbdString(name));
}

/** NBD_REP_INFO carrying NBD_INFO_DESCRIPTION (cut to 4096 bytes). */
export function encodeRepInfoDescription(option: number, description: string): Uint8Array {
  return encodeRepInfoText(option, NBD_INFO_DESCRIPTION, encodeNbdText(description));
}

/**
 * NBD_REP_INFO carrying NBD_INFO_BLOCK_SIZE. The spec wants minimum a power of two ≤ 64 KiB,
 * preferred a power of two ≥ max(minimum, 512), maximum ≥ preferred; checked here as a bug guard.
 */
export function encodeRepInfoBlockSize(
  option: number,
  minimumBytes: number,
  preferredBytes: number,
  maximumBytes: number,
): Uint8Array {
  const isPow2 = (v: number) => Number.isInteger(v) && v > 0 && (v & (v - 1)) === 0;
  assert(isPow2(minimumBytes) && minimumBytes <= 65536, "minimum block size");
  assert(isPow2(preferredBytes) && preferredBytes >= Math.max(minimumBytes, 512), "preferred");
  assertU32(maximumBytes, "maximum payload must fit 32 bits");
  assert(maximumBytes >= preferredBytes, "maximum payload below preferred block size");
  const data = new Uint8Array(14);
  writeU16(data, 0, NBD_INFO_BLOCK_SIZE);
  writeU32(data, 2, minimumBytes);
  writeU32(data, 6, preferredBytes);
  writeU32(data, 10, maximumBytes);
  return encodeOptionReply(option, NBD_REP_INFO, data);
}

/** NBD_REP_META_CONTEXT: a context id (use 0 when answering LIST_META_CONTEXT) and its name. */
export function encodeRepMetaContext(option: number, contextId: number, name: string): Uint8Array {
  assertU32(contextId, "context id must fit 32 bits");
  const nameBytes = encodeNbdString(name);
  const data = new Uint8Array(4 + nameBytes.length);
  writeU32(data, 0, contextId);
  data.set(nameBytes, 4);
  return encodeOptionReply(option, NBD_REP_META_CONTEXT, data);
}

/** An NBD_REP_ERR_* reply with an optional human-readable message (cut to 4096 bytes). */
export function encodeRepError(option: number, errorType: number, message = ""): Uint8Array {
  assert(errorType >= NBD_REP_FLAG_ERROR, "error reply types have bit 31 set");
  return encodeOptionReply(option, errorType, encodeNbdText(message));
}
