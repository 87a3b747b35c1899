/**
 * The client's side of the codec, for tests, fuzzing and in-process test clients: encoders for
 * what a client sends, and parsers for what the server sends.
 *
 * The encoders write exactly what they are given (a request's `length` need not match its
 * payload), so fuzzers can build malformed frames. The parsers take a whole buffer plus a start
 * position, return null when the message is not complete yet, and throw on malformed server
 * output: here a malformed message means a bug in the server under test.
 */
import assert from "node:assert/strict";

import {
  EMPTY_BYTES,
  encodeNbdString,
  readU16,
  readU32,
  readU64AsBigInt,
  readU64AsNumber,
  writeU16,
  writeU32,
  writeU64FromBigInt,
} from "./bytes.js";
import {
  CLIENT_FLAGS_BYTES,
  EXPORT_NAME_REPLY_ZEROES_BYTES,
  GREETING_BYTES,
  IHAVEOPT,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_EXPORT,
  NBD_INFO_NAME,
  NBD_OPT_EXPORT_NAME,
  NBD_REP_MAGIC,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_ERROR_OFFSET,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
  NBD_REQUEST_MAGIC,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
  NBDMAGIC,
  OPTION_HEADER_BYTES,
  OPTION_REPLY_HEADER_BYTES,
  REQUEST_HEADER_BYTES,
  SIMPLE_REPLY_HEADER_BYTES,
  STRUCTURED_REPLY_HEADER_BYTES,
} from "./constants.js";
import type { BlockStatusExtent } from "./encode-transmission.js";

const lenientUtf8 = new TextDecoder();

function concat(parts: readonly Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

function u32Bytes(v: number): Uint8Array {
  const b = new Uint8Array(4);
  writeU32(b, 0, v);
  return b;
}

// ---- Client → server --------------------------------------------------------------------------

/** The 4-byte client flags (NBD_FLAG_C_*). */
export function encodeClientFlags(flags: number): Uint8Array {
  const b = new Uint8Array(CLIENT_FLAGS_BYTES);
  writeU32(b, 0, flags);
  return b;
}

/**
 * An option frame. `length` defaults to `data.length`; passing another value builds a frame
 * whose header lies about its size (only `data` follows).
 */
export function encodeOption(
  option: number,
  data: Uint8Array = EMPTY_BYTES,
  length = data.length,
  magic: bigint = IHAVEOPT,
): Uint8Array {
  const b = new Uint8Array(OPTION_HEADER_BYTES + data.length);
  writeU64FromBigInt(b, 0, magic);
  writeU32(b, 8, option);
  writeU32(b, 12, length);
  b.set(data, OPTION_HEADER_BYTES);
  return b;
}

/** NBD_OPT_EXPORT_NAME with `name`. */
export function encodeExportNameOption(name: string): Uint8Array {
  return encodeOption(NBD_OPT_EXPORT_NAME, encodeNbdString(name));
}

/** NBD_OPT_INFO or NBD_OPT_GO (`option`) for `name`, asking for `infoRequests`. */
export function encodeInfoOption(
  option: number,
  name: string,
  infoRequests: readonly number[],
): Uint8Array {
  const nameBytes = encodeNbdString(name);
  const data = new Uint8Array(4 + nameBytes.length + 2 + 2 * infoRequests.length);
  writeU32(data, 0, nameBytes.length);
  data.set(nameBytes, 4);
  let p = 4 + nameBytes.length;
  writeU16(data, p, infoRequests.length);
  p += 2;
  for (const info of infoRequests) {
    writeU16(data, p, info);
    p += 2;
  }
  return encodeOption(option, data);
}

/** NBD_OPT_LIST_META_CONTEXT or NBD_OPT_SET_META_CONTEXT (`option`). */
export function encodeMetaContextOption(
  option: number,
  exportName: string,
  queries: readonly string[],
): Uint8Array {
  const nameBytes = encodeNbdString(exportName);
  const parts = [u32Bytes(nameBytes.length), nameBytes, u32Bytes(queries.length)];
  for (const q of queries) {
    const qb = encodeNbdString(q);
    parts.push(u32Bytes(qb.length), qb);
  }
  return encodeOption(option, concat(parts));
}

/** Fields of a request as a client builds it; `offset` may be a bigint to reach all of u64. */
export interface ClientRequest {
  readonly flags: number;
  readonly type: number;
  readonly cookie: bigint;
  readonly offset: number | bigint;
  readonly length: number;
  /** Defaults to NBD_REQUEST_MAGIC; set to build a bad frame. */
  readonly magic?: number;
}

/** A request header followed by `payload` verbatim (for NBD_CMD_WRITE, `length` bytes). */
export function encodeRequest(req: ClientRequest, payload: Uint8Array = EMPTY_BYTES): Uint8Array {
  const b = new Uint8Array(REQUEST_HEADER_BYTES + payload.length);
  writeU32(b, 0, req.magic ?? NBD_REQUEST_MAGIC);
  writeU16(b, 4, req.flags);
  writeU16(b, 6, req.type);
  writeU64FromBigInt(b, 8, req.cookie);
  writeU64FromBigInt(b, 16, BigInt(req.offset));
  writeU32(b, 24, req.length);
  b.set(payload, REQUEST_HEADER_BYTES);
  return b;
}

// ---- Server → client --------------------------------------------------------------------------

/** The handshake flags from an 18-byte newstyle greeting. */
export function parseGreeting(b: Uint8Array): { readonly handshakeFlags: number } {
  assert(b.length >= GREETING_BYTES, "greeting is 18 bytes");
  assert(readU64AsBigInt(b, 0) === NBDMAGIC, "greeting lacks NBDMAGIC");
  assert(readU64AsBigInt(b, 8) === IHAVEOPT, "greeting lacks IHAVEOPT");
  return { handshakeFlags: readU16(b, 16) };
}

/** The answer to NBD_OPT_EXPORT_NAME: 10 bytes, plus 124 zeroes unless `noZeroes`. */
export function parseExportNameReply(
  b: Uint8Array,
  at: number,
  noZeroes: boolean,
): { readonly sizeBytes: number; readonly transmissionFlags: number; readonly end: number } | null {
  const total = 10 + (noZeroes ? 0 : EXPORT_NAME_REPLY_ZEROES_BYTES);
  if (b.length - at < total) return null;
  for (let i = at + 10; i < at + total; i++) assert(b[i] === 0, "reserved bytes must be zero");
  return {
    sizeBytes: readU64AsNumber(b, at),
    transmissionFlags: readU16(b, at + 8),
    end: at + total,
  };
}

/** One option reply; `data` is a view into `b`. */
export interface OptionReply {
  readonly option: number;
  readonly replyType: number;
  readonly data: Uint8Array;
  /** Position in `b` just past this reply. */
  readonly end: number;
}

/** Parse the option reply starting at `b[at]`, or null if it is not all there yet. */
export function parseOptionReply(b: Uint8Array, at: number): OptionReply | null {
  if (b.length - at < OPTION_REPLY_HEADER_BYTES) return null;
  assert(readU64AsBigInt(b, at) === NBD_REP_MAGIC, "option reply lacks NBD_REP_MAGIC");
  const length = readU32(b, at + 16);
  const end = at + OPTION_REPLY_HEADER_BYTES + length;
  if (b.length < end) return null;
  return {
    option: readU32(b, at + 8),
    replyType: readU32(b, at + 12),
    data: b.subarray(at + OPTION_REPLY_HEADER_BYTES, end),
    end,
  };
}

/** NBD_REP_SERVER data: export name and the free text after it. */
export function parseRepServer(data: Uint8Array): {
  readonly name: string;
  readonly description: string;
} {
  const nameLength = readU32(data, 0);
  assert(nameLength <= data.length - 4, "NBD_REP_SERVER name overruns the reply");
  return {
    name: lenientUtf8.decode(data.subarray(4, 4 + nameLength)),
    description: lenientUtf8.decode(data.subarray(4 + nameLength)),
  };
}

/** NBD_REP_INFO data, by information type. */
export type InfoReply =
  | { readonly info: "export"; readonly sizeBytes: number; readonly transmissionFlags: number }
  | { readonly info: "name"; readonly name: string }
  | { readonly info: "description"; readonly description: string }
  | {
      readonly info: "block-size";
      readonly minimumBytes: number;
      readonly preferredBytes: number;
      readonly maximumBytes: number;
    }
  | { readonly info: "unknown"; readonly type: number; readonly data: Uint8Array };

/** Parse NBD_REP_INFO data, checking each type's fixed length. */
export function parseRepInfo(data: Uint8Array): InfoReply {
  assert(data.length >= 2, "NBD_REP_INFO needs a type");
  const type = readU16(data, 0);
  switch (type) {
    case NBD_INFO_EXPORT:
      assert(data.length === 12, "NBD_INFO_EXPORT is 12 bytes");
      return {
        info: "export",
        sizeBytes: readU64AsNumber(data, 2),
        transmissionFlags: readU16(data, 10),
      };
    case NBD_INFO_NAME:
      return { info: "name", name: lenientUtf8.decode(data.subarray(2)) };
    case NBD_INFO_DESCRIPTION:
      return { info: "description", description: lenientUtf8.decode(data.subarray(2)) };
    case NBD_INFO_BLOCK_SIZE:
      assert(data.length === 14, "NBD_INFO_BLOCK_SIZE is 14 bytes");
      return {
        info: "block-size",
        minimumBytes: readU32(data, 2),
        preferredBytes: readU32(data, 6),
        maximumBytes: readU32(data, 10),
      };
    default:
      return { info: "unknown", type, data: data.subarray(2) };
  }
}

/** NBD_REP_META_CONTEXT data. */
export function parseRepMetaContext(data: Uint8Array): {
  readonly contextId: number;
  readonly name: string;
} {
  assert(data.length >= 4, "NBD_REP_META_CONTEXT needs a context id");
  return { contextId: readU32(data, 0), name: lenientUtf8.decode(data.subarray(4)) };
}

/** The message of an NBD_REP_ERR_* reply. */
export function parseRepErrorMessage(data: Uint8Array): string {
  return lenientUtf8.decode(data);
}

/** A simple reply header at `b[at]`, or null if incomplete. Read data (if any) follows `end`. */
export function parseSimpleReplyHeader(
  b: Uint8Array,
  at: number,
): { readonly error: number; readonly cookie: bigint; readonly end: number } | null {
  if (b.length - at < SIMPLE_REPLY_HEADER_BYTES) return null;
  assert(readU32(b, at) === NBD_SIMPLE_REPLY_MAGIC, "not a simple reply");
  return {
    error: readU32(b, at + 4),
    cookie: readU64AsBigInt(b, at + 8),
    end: at + SIMPLE_REPLY_HEADER_BYTES,
  };
}

/** One structured reply chunk; `payload` is a view into the parsed buffer. */
export interface StructuredChunk {
  readonly flags: number;
  readonly type: number;
  readonly cookie: bigint;
  readonly payload: Uint8Array;
  readonly end: number;
}

/** The whole structured chunk at `b[at]`, or null if incomplete. */
export function parseStructuredChunk(b: Uint8Array, at: number): StructuredChunk | null {
  if (b.length - at < STRUCTURED_REPLY_HEADER_BYTES) return null;
  assert(readU32(b, at) === NBD_STRUCTURED_REPLY_MAGIC, "not a structured reply chunk");
  const length = readU32(b, at + 16);
  const end = at + STRUCTURED_REPLY_HEADER_BYTES + length;
  if (b.length < end) return null;
  return {
    flags: readU16(b, at + 4),
    type: readU16(b, at + 6),
    cookie: readU64AsBigInt(b, at + 8),
    payload: b.subarray(at + STRUCTURED_REPLY_HEADER_BYTES, end),
    end,
  };
}

/** A structured chunk's payload, by chunk type. */
export type ChunkPayload =
  | { readonly kind: "none" }
  | { readonly kind: "offset-data"; readonly offset: number; readonly data: Uint8Array }
  | { readonly kind: "offset-hole"; readonly offset: number; readonly holeLength: number }
  | {
      readonly kind: "block-status";
      readonly contextId: number;
      readonly extents: readonly BlockStatusExtent[];
    }
  | { readonly kind: "error"; readonly error: number; readonly message: string }
  | {
      readonly kind: "error-offset";
      readonly error: number;
      readonly message: string;
      readonly offset: number;
    }
  | { readonly kind: "unknown"; readonly type: number; readonly payload: Uint8Array };

/** Interpret a chunk's payload, checking the length rules of each type. */
export function parseChunkPayload(type: number, p: Uint8Array): ChunkPayload {
  switch (type) {
    case NBD_REPLY_TYPE_NONE:
      assert(p.length === 0, "NONE has no payload");
      return { kind: "none" };
    case NBD_REPLY_TYPE_OFFSET_DATA:
      assert(p.length >= 9, "OFFSET_DATA is at least 9 bytes");
      return { kind: "offset-data", offset: readU64AsNumber(p, 0), data: p.subarray(8) };
    case NBD_REPLY_TYPE_OFFSET_HOLE:
      assert(p.length === 12, "OFFSET_HOLE is 12 bytes");
      return { kind: "offset-hole", offset: readU64AsNumber(p, 0), holeLength: readU32(p, 8) };
    case NBD_REPLY_TYPE_BLOCK_STATUS: {
      assert(p.length >= 12 && (p.length - 4) % 8 === 0, "BLOCK_STATUS is 4 + 8n bytes, n ≥ 1");
      const extents: BlockStatusExtent[] = [];
      for (let i = 4; i < p.length; i += 8) {
        extents.push({ length: readU32(p, i), statusFlags: readU32(p, i + 4) });
      }
      return { kind: "block-status", contextId: readU32(p, 0), extents };
    }
    case NBD_REPLY_TYPE_ERROR:
    case NBD_REPLY_TYPE_ERROR_OFFSET: {
      const fixed = type === NBD_REPLY_TYPE_ERROR ? 6 : 14;
      assert(p.length >= fixed, "error chunk too short");
      const messageLength = readU16(p, 4);
      // ERROR may carry trailing bytes after its message; ERROR_OFFSET ends with the offset.
      const exact = type === NBD_REPLY_TYPE_ERROR_OFFSET;
      assert(
        exact ? messageLength === p.length - fixed : messageLength <= p.length - fixed,
        "error chunk message length does not fit the chunk",
      );
      const error = readU32(p, 0);
      const message = lenientUtf8.decode(p.subarray(6, 6 + messageLength));
      if (type === NBD_REPLY_TYPE_ERROR) return { kind: "error", error, message };
      return {
        kind: "error-offset",
        error,
        message,
        offset: readU64AsNumber(p, 6 + messageLength),
      };
    }
    default:
      return { kind: "unknown", type, payload: p };
  }
}
