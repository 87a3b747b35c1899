import fc from "fast-check";
import { describe, expect, it } from "vitest";

import * as nbd from "../../src/nbd/protocol.js";
import type { HandshakeEvent, OptionRequest, ProtocolError } from "../../src/nbd/protocol.js";
import * as client from "../../src/nbd/protocol/client.js";

// ---- helpers ----------------------------------------------------------------------------------

function hex(s: string): Uint8Array {
  const clean = s.replace(/\s+/g, "");
  const out = new Uint8Array(clean.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(clean.slice(2 * i, 2 * i + 2), 16);
  return out;
}

function ascii(s: string): Uint8Array {
  return Uint8Array.from(s, (c) => c.charCodeAt(0));
}

function cat(...parts: readonly Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

const utf8 = (s: string) => new TextEncoder().encode(s);

/** Every way to cut `stream` into two pushes, including empty first/second halves. */
function twoWaySplits(stream: Uint8Array): Uint8Array[][] {
  const out: Uint8Array[][] = [];
  for (let i = 0; i <= stream.length; i++) out.push([stream.subarray(0, i), stream.subarray(i)]);
  return out;
}

function bytewise(stream: Uint8Array): Uint8Array[] {
  return Array.from({ length: stream.length }, (_, i) => stream.subarray(i, i + 1));
}

function splitAtCuts(stream: Uint8Array, cuts: readonly number[]): Uint8Array[] {
  const points = [...new Set(cuts.map((c) => c % (stream.length + 1)))].sort((a, b) => a - b);
  const out: Uint8Array[] = [];
  let prev = 0;
  for (const p of points) {
    out.push(stream.subarray(prev, p));
    prev = p;
  }
  out.push(stream.subarray(prev));
  return out;
}

/**
 * Feed chunks the way the server will: each one copied into a single reused read buffer, which
 * is poisoned once the decoder has drained it. Any view the decoder kept past its contract would
 * show the poison.
 */
function feedReused<E>(
  chunks: readonly Uint8Array[],
  push: (chunk: Uint8Array) => void,
  next: () => E | null,
  onEvent: (e: E) => void,
): void {
  const reused = new Uint8Array(Math.max(1, ...chunks.map((c) => c.length)));
  for (const c of chunks) {
    reused.set(c);
    push(reused.subarray(0, c.length));
    for (let ev = next(); ev !== null; ev = next()) onEvent(ev);
    reused.fill(0xee);
  }
}

interface DecodedRequest {
  flags: number;
  type: number;
  cookie: bigint;
  offset: number;
  length: number;
  payload?: Uint8Array;
}
type Decoded = DecodedRequest | { error: ProtocolError };

/** Decode a transmission stream, reassembling WRITE payloads and checking event invariants. */
function decodeTransmission(chunks: readonly Uint8Array[]): Decoded[] {
  const dec = new nbd.TransmissionDecoder();
  const out: Decoded[] = [];
  let pending: {
    ev: nbd.RequestEvent;
    d: DecodedRequest;
    pieces: Uint8Array[];
    filled: number;
  } | null = null;
  feedReused(
    chunks,
    (c) => dec.push(c),
    () => dec.next(),
    (ev) => {
      switch (ev.kind) {
        case "request": {
          expect(pending).toBeNull();
          const d: DecodedRequest = {
            flags: ev.flags,
            type: ev.type,
            cookie: ev.cookie,
            offset: ev.offset,
            length: ev.length,
          };
          out.push(d);
          // Collect pieces rather than allocate `length` up front: fuzzed lengths can be 4 GiB.
          if (ev.type === nbd.NBD_CMD_WRITE) pending = { ev, d, pieces: [], filled: 0 };
          break;
        }
        case "write-data": {
          expect(pending).not.toBeNull();
          const p = pending!;
          expect(ev.request).toBe(p.ev);
          expect(ev.payloadOffset).toBe(p.filled);
          p.pieces.push(ev.data.slice());
          p.filled += ev.data.length;
          expect(ev.final).toBe(p.filled === p.ev.length);
          if (ev.final) {
            p.d.payload = cat(...p.pieces);
            pending = null;
          }
          break;
        }
        case "error":
          out.push({ error: ev.error });
          break;
      }
    },
  );
  return out;
}

function decodeHandshake(
  chunks: readonly Uint8Array[],
  options?: nbd.HandshakeDecoderOptions,
): HandshakeEvent[] {
  const dec = new nbd.HandshakeDecoder(options);
  const out: HandshakeEvent[] = [];
  feedReused(
    chunks,
    (c) => dec.push(c),
    () => dec.next(),
    (ev) => out.push(ev),
  );
  return out;
}

function arrayBuffersBytes(): number {
  return process.memoryUsage().arrayBuffers;
}

const MiB = 1024 * 1024;

// ---- constants --------------------------------------------------------------------------------

describe("constants", () => {
  it("have the values the spec gives them", () => {
    expect({
      NBD_FLAG_FIXED_NEWSTYLE: nbd.NBD_FLAG_FIXED_NEWSTYLE,
      NBD_FLAG_NO_ZEROES: nbd.NBD_FLAG_NO_ZEROES,
      NBD_FLAG_C_FIXED_NEWSTYLE: nbd.NBD_FLAG_C_FIXED_NEWSTYLE,
      NBD_FLAG_C_NO_ZEROES: nbd.NBD_FLAG_C_NO_ZEROES,
      NBD_FLAG_HAS_FLAGS: nbd.NBD_FLAG_HAS_FLAGS,
      NBD_FLAG_READ_ONLY: nbd.NBD_FLAG_READ_ONLY,
      NBD_FLAG_SEND_FLUSH: nbd.NBD_FLAG_SEND_FLUSH,
      NBD_FLAG_SEND_FUA: nbd.NBD_FLAG_SEND_FUA,
      NBD_FLAG_ROTATIONAL: nbd.NBD_FLAG_ROTATIONAL,
      NBD_FLAG_SEND_TRIM: nbd.NBD_FLAG_SEND_TRIM,
      NBD_FLAG_SEND_WRITE_ZEROES: nbd.NBD_FLAG_SEND_WRITE_ZEROES,
      NBD_FLAG_SEND_DF: nbd.NBD_FLAG_SEND_DF,
      NBD_FLAG_CAN_MULTI_CONN: nbd.NBD_FLAG_CAN_MULTI_CONN,
      NBD_FLAG_SEND_CACHE: nbd.NBD_FLAG_SEND_CACHE,
      NBD_FLAG_SEND_FAST_ZERO: nbd.NBD_FLAG_SEND_FAST_ZERO,
      NBD_OPT_EXPORT_NAME: nbd.NBD_OPT_EXPORT_NAME,
      NBD_OPT_ABORT: nbd.NBD_OPT_ABORT,
      NBD_OPT_LIST: nbd.NBD_OPT_LIST,
      NBD_OPT_STARTTLS: nbd.NBD_OPT_STARTTLS,
      NBD_OPT_INFO: nbd.NBD_OPT_INFO,
      NBD_OPT_GO: nbd.NBD_OPT_GO,
      NBD_OPT_STRUCTURED_REPLY: nbd.NBD_OPT_STRUCTURED_REPLY,
      NBD_OPT_LIST_META_CONTEXT: nbd.NBD_OPT_LIST_META_CONTEXT,
      NBD_OPT_SET_META_CONTEXT: nbd.NBD_OPT_SET_META_CONTEXT,
      NBD_REP_ACK: nbd.NBD_REP_ACK,
      NBD_REP_SERVER: nbd.NBD_REP_SERVER,
      NBD_REP_INFO: nbd.NBD_REP_INFO,
      NBD_REP_META_CONTEXT: nbd.NBD_REP_META_CONTEXT,
      NBD_REP_ERR_UNSUP: nbd.NBD_REP_ERR_UNSUP,
      NBD_REP_ERR_POLICY: nbd.NBD_REP_ERR_POLICY,
      NBD_REP_ERR_INVALID: nbd.NBD_REP_ERR_INVALID,
      NBD_REP_ERR_PLATFORM: nbd.NBD_REP_ERR_PLATFORM,
      NBD_REP_ERR_TLS_REQD: nbd.NBD_REP_ERR_TLS_REQD,
      NBD_REP_ERR_UNKNOWN: nbd.NBD_REP_ERR_UNKNOWN,
      NBD_REP_ERR_SHUTDOWN: nbd.NBD_REP_ERR_SHUTDOWN,
      NBD_REP_ERR_BLOCK_SIZE_REQD: nbd.NBD_REP_ERR_BLOCK_SIZE_REQD,
      NBD_REP_ERR_TOO_BIG: nbd.NBD_REP_ERR_TOO_BIG,
      NBD_INFO_EXPORT: nbd.NBD_INFO_EXPORT,
      NBD_INFO_NAME: nbd.NBD_INFO_NAME,
      NBD_INFO_DESCRIPTION: nbd.NBD_INFO_DESCRIPTION,
      NBD_INFO_BLOCK_SIZE: nbd.NBD_INFO_BLOCK_SIZE,
      NBD_CMD_READ: nbd.NBD_CMD_READ,
      NBD_CMD_WRITE: nbd.NBD_CMD_WRITE,
      NBD_CMD_DISC: nbd.NBD_CMD_DISC,
      NBD_CMD_FLUSH: nbd.NBD_CMD_FLUSH,
      NBD_CMD_TRIM: nbd.NBD_CMD_TRIM,
      NBD_CMD_CACHE: nbd.NBD_CMD_CACHE,
      NBD_CMD_WRITE_ZEROES: nbd.NBD_CMD_WRITE_ZEROES,
      NBD_CMD_BLOCK_STATUS: nbd.NBD_CMD_BLOCK_STATUS,
      NBD_CMD_FLAG_FUA: nbd.NBD_CMD_FLAG_FUA,
      NBD_CMD_FLAG_NO_HOLE: nbd.NBD_CMD_FLAG_NO_HOLE,
      NBD_CMD_FLAG_DF: nbd.NBD_CMD_FLAG_DF,
      NBD_CMD_FLAG_REQ_ONE: nbd.NBD_CMD_FLAG_REQ_ONE,
      NBD_CMD_FLAG_FAST_ZERO: nbd.NBD_CMD_FLAG_FAST_ZERO,
      NBD_REPLY_FLAG_DONE: nbd.NBD_REPLY_FLAG_DONE,
      NBD_REPLY_TYPE_NONE: nbd.NBD_REPLY_TYPE_NONE,
      NBD_REPLY_TYPE_OFFSET_DATA: nbd.NBD_REPLY_TYPE_OFFSET_DATA,
      NBD_REPLY_TYPE_OFFSET_HOLE: nbd.NBD_REPLY_TYPE_OFFSET_HOLE,
      NBD_REPLY_TYPE_BLOCK_STATUS: nbd.NBD_REPLY_TYPE_BLOCK_STATUS,
      NBD_REPLY_TYPE_ERROR: nbd.NBD_REPLY_TYPE_ERROR,
      NBD_REPLY_TYPE_ERROR_OFFSET: nbd.NBD_REPLY_TYPE_ERROR_OFFSET,
      NBD_STATE_HOLE: nbd.NBD_STATE_HOLE,
      NBD_STATE_ZERO: nbd.NBD_STATE_ZERO,
      NBD_EPERM: nbd.NBD_EPERM,
      NBD_EIO: nbd.NBD_EIO,
      NBD_ENOMEM: nbd.NBD_ENOMEM,
      NBD_EINVAL: nbd.NBD_EINVAL,
      NBD_ENOSPC: nbd.NBD_ENOSPC,
      NBD_EOVERFLOW: nbd.NBD_EOVERFLOW,
      NBD_ENOTSUP: nbd.NBD_ENOTSUP,
      NBD_ESHUTDOWN: nbd.NBD_ESHUTDOWN,
      NBD_REQUEST_MAGIC: nbd.NBD_REQUEST_MAGIC,
      NBD_SIMPLE_REPLY_MAGIC: nbd.NBD_SIMPLE_REPLY_MAGIC,
      NBD_STRUCTURED_REPLY_MAGIC: nbd.NBD_STRUCTURED_REPLY_MAGIC,
      NBD_REP_MAGIC: nbd.NBD_REP_MAGIC,
    }).toEqual({
      NBD_FLAG_FIXED_NEWSTYLE: 1,
      NBD_FLAG_NO_ZEROES: 2,
      NBD_FLAG_C_FIXED_NEWSTYLE: 1,
      NBD_FLAG_C_NO_ZEROES: 2,
      NBD_FLAG_HAS_FLAGS: 1,
      NBD_FLAG_READ_ONLY: 2,
      NBD_FLAG_SEND_FLUSH: 4,
      NBD_FLAG_SEND_FUA: 8,
      NBD_FLAG_ROTATIONAL: 16,
      NBD_FLAG_SEND_TRIM: 32,
      NBD_FLAG_SEND_WRITE_ZEROES: 64,
      NBD_FLAG_SEND_DF: 128,
      NBD_FLAG_CAN_MULTI_CONN: 256,
      NBD_FLAG_SEND_CACHE: 1024,
      NBD_FLAG_SEND_FAST_ZERO: 2048,
      NBD_OPT_EXPORT_NAME: 1,
      NBD_OPT_ABORT: 2,
      NBD_OPT_LIST: 3,
      NBD_OPT_STARTTLS: 5,
      NBD_OPT_INFO: 6,
      NBD_OPT_GO: 7,
      NBD_OPT_STRUCTURED_REPLY: 8,
      NBD_OPT_LIST_META_CONTEXT: 9,
      NBD_OPT_SET_META_CONTEXT: 10,
      NBD_REP_ACK: 1,
      NBD_REP_SERVER: 2,
      NBD_REP_INFO: 3,
      NBD_REP_META_CONTEXT: 4,
      NBD_REP_ERR_UNSUP: 2 ** 31 + 1,
      NBD_REP_ERR_POLICY: 2 ** 31 + 2,
      NBD_REP_ERR_INVALID: 2 ** 31 + 3,
      NBD_REP_ERR_PLATFORM: 2 ** 31 + 4,
      NBD_REP_ERR_TLS_REQD: 2 ** 31 + 5,
      NBD_REP_ERR_UNKNOWN: 2 ** 31 + 6,
      NBD_REP_ERR_SHUTDOWN: 2 ** 31 + 7,
      NBD_REP_ERR_BLOCK_SIZE_REQD: 2 ** 31 + 8,
      NBD_REP_ERR_TOO_BIG: 2 ** 31 + 9,
      NBD_INFO_EXPORT: 0,
      NBD_INFO_NAME: 1,
      NBD_INFO_DESCRIPTION: 2,
      NBD_INFO_BLOCK_SIZE: 3,
      NBD_CMD_READ: 0,
      NBD_CMD_WRITE: 1,
      NBD_CMD_DISC: 2,
      NBD_CMD_FLUSH: 3,
      NBD_CMD_TRIM: 4,
      NBD_CMD_CACHE: 5,
      NBD_CMD_WRITE_ZEROES: 6,
      NBD_CMD_BLOCK_STATUS: 7,
      NBD_CMD_FLAG_FUA: 1,
      NBD_CMD_FLAG_NO_HOLE: 2,
      NBD_CMD_FLAG_DF: 4,
      NBD_CMD_FLAG_REQ_ONE: 8,
      NBD_CMD_FLAG_FAST_ZERO: 16,
      NBD_REPLY_FLAG_DONE: 1,
      NBD_REPLY_TYPE_NONE: 0,
      NBD_REPLY_TYPE_OFFSET_DATA: 1,
      NBD_REPLY_TYPE_OFFSET_HOLE: 2,
      NBD_REPLY_TYPE_BLOCK_STATUS: 5,
      NBD_REPLY_TYPE_ERROR: 2 ** 15 + 1,
      NBD_REPLY_TYPE_ERROR_OFFSET: 2 ** 15 + 2,
      NBD_STATE_HOLE: 1,
      NBD_STATE_ZERO: 2,
      NBD_EPERM: 1,
      NBD_EIO: 5,
      NBD_ENOMEM: 12,
      NBD_EINVAL: 22,
      NBD_ENOSPC: 28,
      NBD_EOVERFLOW: 75,
      NBD_ENOTSUP: 95,
      NBD_ESHUTDOWN: 108,
      NBD_REQUEST_MAGIC: 0x25609513,
      NBD_SIMPLE_REPLY_MAGIC: 0x67446698,
      NBD_STRUCTURED_REPLY_MAGIC: 0x668e33ef,
      NBD_REP_MAGIC: 0x3e889045565a9n,
    });
  });

  it("spell NBDMAGIC and IHAVEOPT in ASCII", () => {
    const asText = (v: bigint) =>
      String.fromCharCode(
        ...Array.from({ length: 8 }, (_, i) => Number((v >> BigInt(56 - 8 * i)) & 0xffn)),
      );
    expect(asText(nbd.NBDMAGIC)).toBe("NBDMAGIC");
    expect(asText(nbd.IHAVEOPT)).toBe("IHAVEOPT");
  });
});

// ---- server encoders: exact bytes -------------------------------------------------------------

describe("server encoders produce the spec's bytes", () => {
  const cookie = 0x0102030405060708n;

  it("greeting", () => {
    const flags = nbd.NBD_FLAG_FIXED_NEWSTYLE | nbd.NBD_FLAG_NO_ZEROES;
    expect(nbd.encodeGreeting(flags)).toEqual(
      cat(ascii("NBDMAGIC"), ascii("IHAVEOPT"), hex("0003")),
    );
  });

  it("NBD_OPT_EXPORT_NAME reply with and without the 124 zeroes", () => {
    const flags = nbd.NBD_FLAG_HAS_FLAGS | nbd.NBD_FLAG_SEND_FLUSH;
    const head = hex("0000000100000200 0005");
    expect(nbd.encodeExportNameReply(2 ** 32 + 512, flags, true)).toEqual(head);
    expect(nbd.encodeExportNameReply(2 ** 32 + 512, flags, false)).toEqual(
      cat(head, new Uint8Array(124)),
    );
  });

  it("option replies: ACK, error with message, INFO_EXPORT", () => {
    expect(nbd.encodeRepAck(nbd.NBD_OPT_GO)).toEqual(
      hex("0003e889045565a9 00000007 00000001 00000000"),
    );
    expect(nbd.encodeRepError(nbd.NBD_OPT_LIST, nbd.NBD_REP_ERR_POLICY, "no")).toEqual(
      hex("0003e889045565a9 00000003 80000002 00000002 6e6f"),
    );
    expect(nbd.encodeRepInfoExport(nbd.NBD_OPT_INFO, 1 << 30, 0x0101)).toEqual(
      hex("0003e889045565a9 00000006 00000003 0000000c 0000 0000000040000000 0101"),
    );
  });

  it("simple reply header", () => {
    expect(nbd.encodeSimpleReplyHeader(nbd.NBD_EIO, cookie)).toEqual(
      hex("67446698 00000005 0102030405060708"),
    );
  });

  it("structured chunks: OFFSET_DATA header, NONE, OFFSET_HOLE, BLOCK_STATUS, ERROR, ERROR_OFFSET", () => {
    const done = nbd.NBD_REPLY_FLAG_DONE;
    expect(nbd.encodeOffsetDataHeader(done, cookie, 4096, 512)).toEqual(
      hex("668e33ef 0001 0001 0102030405060708 00000208 0000000000001000"),
    );
    expect(nbd.encodeNoneChunk(cookie)).toEqual(
      hex("668e33ef 0001 0000 0102030405060708 00000000"),
    );
    expect(nbd.encodeOffsetHoleChunk(0, cookie, 2 ** 40, 65536)).toEqual(
      hex("668e33ef 0000 0002 0102030405060708 0000000c 0000010000000000 00010000"),
    );
    const extents = [
      { length: 4096, statusFlags: nbd.NBD_STATE_HOLE | nbd.NBD_STATE_ZERO },
      { length: 512, statusFlags: 0 },
    ];
    expect(nbd.encodeBlockStatusChunk(done, cookie, 7, extents)).toEqual(
      hex(
        "668e33ef 0001 0005 0102030405060708 00000014 00000007 00001000 00000003 00000200 00000000",
      ),
    );
    expect(nbd.encodeErrorChunk(done, cookie, nbd.NBD_EIO, "bad")).toEqual(
      hex("668e33ef 0001 8001 0102030405060708 00000009 00000005 0003 626164"),
    );
    expect(nbd.encodeErrorOffsetChunk(done, cookie, nbd.NBD_EIO, 1024, "")).toEqual(
      hex("668e33ef 0001 8002 0102030405060708 0000000e 00000005 0000 0000000000000400"),
    );
  });
});

// ---- server encoders: round trips through the client parsers ----------------------------------

describe("server encoders round-trip through the client parsers", () => {
  it("every option reply kind, concatenated, parses back in order", () => {
    const opt = nbd.NBD_OPT_GO;
    const stream = cat(
      nbd.encodeRepServer(nbd.NBD_OPT_LIST, "disk-é", "a test disk"),
      nbd.encodeRepServer(nbd.NBD_OPT_LIST, ""),
      nbd.encodeRepInfoExport(opt, Number.MAX_SAFE_INTEGER, 0xffff),
      nbd.encodeRepInfoName(opt, "canonical"),
      nbd.encodeRepInfoDescription(opt, "descr ✓"),
      nbd.encodeRepInfoBlockSize(opt, 1, 4096, 32 * MiB),
      nbd.encodeRepMetaContext(nbd.NBD_OPT_SET_META_CONTEXT, 0xfffffffe, "base:allocation"),
      nbd.encodeRepError(opt, nbd.NBD_REP_ERR_UNKNOWN, "no such export"),
      nbd.encodeRepError(opt, nbd.NBD_REP_ERR_UNSUP),
      nbd.encodeRepAck(opt),
    );
    const replies: client.OptionReply[] = [];
    for (
      let at = 0, r = client.parseOptionReply(stream, at);
      r;
      r = client.parseOptionReply(stream, at)
    ) {
      replies.push(r);
      at = r.end;
    }
    expect(replies.at(-1)!.end).toBe(stream.length);
    expect(replies.map((r) => [r.option, r.replyType])).toEqual([
      [nbd.NBD_OPT_LIST, nbd.NBD_REP_SERVER],
      [nbd.NBD_OPT_LIST, nbd.NBD_REP_SERVER],
      [opt, nbd.NBD_REP_INFO],
      [opt, nbd.NBD_REP_INFO],
      [opt, nbd.NBD_REP_INFO],
      [opt, nbd.NBD_REP_INFO],
      [nbd.NBD_OPT_SET_META_CONTEXT, nbd.NBD_REP_META_CONTEXT],
      [opt, nbd.NBD_REP_ERR_UNKNOWN],
      [opt, nbd.NBD_REP_ERR_UNSUP],
      [opt, nbd.NBD_REP_ACK],
    ]);
    const [s1, s2, i1, i2, i3, i4, m, e1, e2, ack] = replies.map((r) => r.data);
    expect(client.parseRepServer(s1!)).toEqual({ name: "disk-é", description: "a test disk" });
    expect(client.parseRepServer(s2!)).toEqual({ name: "", description: "" });
    expect(client.parseRepInfo(i1!)).toEqual({
      info: "export",
      sizeBytes: Number.MAX_SAFE_INTEGER,
      transmissionFlags: 0xffff,
    });
    expect(client.parseRepInfo(i2!)).toEqual({ info: "name", name: "canonical" });
    expect(client.parseRepInfo(i3!)).toEqual({ info: "description", description: "descr ✓" });
    expect(client.parseRepInfo(i4!)).toEqual({
      info: "block-size",
      minimumBytes: 1,
      preferredBytes: 4096,
      maximumBytes: 32 * MiB,
    });
    expect(client.parseRepMetaContext(m!)).toEqual({
      contextId: 0xfffffffe,
      name: "base:allocation",
    });
    expect(client.parseRepErrorMessage(e1!)).toBe("no such export");
    expect(e2!.length).toBe(0);
    expect(ack!.length).toBe(0);
  });

  it("option reply parser reports every strict prefix as incomplete", () => {
    const reply = nbd.encodeRepServer(nbd.NBD_OPT_LIST, "x", "y");
    for (let n = 0; n < reply.length; n++) {
      expect(client.parseOptionReply(reply.subarray(0, n), 0)).toBeNull();
    }
    expect(client.parseOptionReply(reply, 0)?.end).toBe(reply.length);
  });

  it("structured chunks with random fields parse back (property)", () => {
    const u32 = fc.integer({ min: 0, max: 0xffffffff });
    const nonzeroU32 = fc.integer({ min: 1, max: 0xffffffff });
    const fields = fc.record({
      cookie: fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }),
      offset: fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER }),
      flags: fc.integer({ min: 0, max: 0xffff }),
      n: nonzeroU32,
      data: fc.uint8Array({ minLength: 1, maxLength: 64 }),
      extents: fc.array(fc.record({ length: nonzeroU32, statusFlags: u32 }), {
        minLength: 1,
        maxLength: 8,
      }),
      message: fc.string({ unit: "binary", maxLength: 40 }),
    });
    fc.assert(
      fc.property(fields, ({ cookie, offset, flags, n, data, extents, message }) => {
        const roundTrip = (bytes: Uint8Array) => {
          const chunk = client.parseStructuredChunk(bytes, 0)!;
          expect(chunk.end).toBe(bytes.length);
          expect(chunk.cookie).toBe(cookie);
          return {
            flags: chunk.flags,
            payload: client.parseChunkPayload(chunk.type, chunk.payload),
          };
        };
        expect(roundTrip(nbd.encodeNoneChunk(cookie))).toEqual({
          flags: nbd.NBD_REPLY_FLAG_DONE,
          payload: { kind: "none" },
        });
        // The OFFSET_DATA header announces data that the server sends separately.
        const header = nbd.encodeOffsetDataHeader(flags, cookie, offset, data.length);
        expect(roundTrip(cat(header, data))).toEqual({
          flags,
          payload: { kind: "offset-data", offset, data },
        });
        expect(roundTrip(nbd.encodeOffsetHoleChunk(flags, cookie, offset, n))).toEqual({
          flags,
          payload: { kind: "offset-hole", offset, holeLength: n },
        });
        expect(roundTrip(nbd.encodeBlockStatusChunk(flags, cookie, n, extents))).toEqual({
          flags,
          payload: { kind: "block-status", contextId: n, extents },
        });
        expect(roundTrip(nbd.encodeErrorChunk(flags, cookie, n, message))).toEqual({
          flags,
          payload: { kind: "error", error: n, message },
        });
        expect(roundTrip(nbd.encodeErrorOffsetChunk(flags, cookie, n, offset, message))).toEqual({
          flags,
          payload: { kind: "error-offset", error: n, message, offset },
        });
        expect(client.parseSimpleReplyHeader(nbd.encodeSimpleReplyHeader(n, cookie), 0)).toEqual({
          error: n,
          cookie,
          end: 16,
        });
      }),
    );
  });

  it("OFFSET_DATA header accepts the largest data length the u32 field can carry", () => {
    const h = nbd.encodeOffsetDataHeader(0, 1n, 0, 0xffffffff - 8);
    expect(h.subarray(16, 20)).toEqual(hex("ffffffff"));
    expect(client.parseStructuredChunk(h, 0)).toBeNull(); // the data is still to come
  });

  it("write* fill a caller buffer at an offset, touch nothing else, and return the end", () => {
    const cookie = 0xdeadbeefcafef00dn;
    const dst = new Uint8Array(3 + 16 + 28 + 32 + 20 + 40 + 5).fill(0xaa);
    let at = 3;
    at = nbd.writeSimpleReplyHeader(dst, at, 0, cookie);
    expect(at).toBe(3 + 16);
    at = nbd.writeOffsetDataHeader(dst, at, 0, cookie, 8192, 4096);
    expect(at).toBe(3 + 16 + 28);
    at = nbd.writeOffsetHoleChunk(dst, at, 0, cookie, 0, 512);
    at = nbd.writeNoneChunk(dst, at, cookie);
    const extents = [
      { length: 1, statusFlags: 3 },
      { length: 2, statusFlags: 0 },
    ];
    expect(nbd.blockStatusChunkBytes(2)).toBe(40);
    at = nbd.writeBlockStatusChunk(dst, at, nbd.NBD_REPLY_FLAG_DONE, cookie, 1, extents);
    expect(at).toBe(dst.length - 5);
    expect(dst.subarray(0, 3)).toEqual(new Uint8Array(3).fill(0xaa));
    expect(dst.subarray(at)).toEqual(new Uint8Array(5).fill(0xaa));
    expect(dst.subarray(3, at)).toEqual(
      cat(
        nbd.encodeSimpleReplyHeader(0, cookie),
        nbd.encodeOffsetDataHeader(0, cookie, 8192, 4096),
        nbd.encodeOffsetHoleChunk(0, cookie, 0, 512),
        nbd.encodeNoneChunk(cookie),
        nbd.encodeBlockStatusChunk(nbd.NBD_REPLY_FLAG_DONE, cookie, 1, extents),
      ),
    );
  });

  it("write* refuse to run past the end of dst", () => {
    const dst = new Uint8Array(20);
    expect(() => nbd.writeSimpleReplyHeader(dst, 5, 0, 1n)).toThrow();
    expect(() => nbd.writeOffsetDataHeader(dst, 0, 0, 1n, 0, 1)).toThrow();
    expect(dst).toEqual(new Uint8Array(20));
  });

  it("reject values the spec forbids (caller bugs)", () => {
    expect(() => nbd.encodeOffsetDataHeader(0, 1n, 0, 0)).toThrow(); // empty data chunk
    expect(() => nbd.encodeOffsetDataHeader(0, 1n, 0, 0xffffffff - 7)).toThrow(); // length overflow
    expect(() => nbd.encodeOffsetHoleChunk(0, 1n, 0, 0)).toThrow(); // empty hole
    expect(() => nbd.encodeBlockStatusChunk(0, 1n, 0, [])).toThrow();
    expect(() => nbd.encodeBlockStatusChunk(0, 1n, 0, [{ length: 0, statusFlags: 0 }])).toThrow();
    expect(() => nbd.encodeErrorChunk(0, 1n, 0)).toThrow();
    expect(() => nbd.encodeSimpleReplyHeader(0, 2n ** 64n)).toThrow();
    expect(() => nbd.encodeOffsetHoleChunk(0, 1n, 2 ** 53, 1)).toThrow(); // unsafe offset
    expect(() => nbd.encodeRepInfoName(nbd.NBD_OPT_GO, "x".repeat(4097))).toThrow();
    expect(() => nbd.encodeRepError(nbd.NBD_OPT_GO, nbd.NBD_REP_ACK)).toThrow();
    expect(() => nbd.encodeRepInfoBlockSize(nbd.NBD_OPT_GO, 512, 256, 4096)).toThrow();
    expect(() => nbd.encodeRepInfoBlockSize(nbd.NBD_OPT_GO, 3, 4096, 4096)).toThrow();
  });

  it("cut over-long messages to 4096 bytes without splitting a character", () => {
    // 4095 ASCII bytes then a 3-byte character that would straddle the limit.
    const message = "a".repeat(4095) + "€" + "tail";
    const chunk = nbd.encodeErrorChunk(nbd.NBD_REPLY_FLAG_DONE, 1n, nbd.NBD_EIO, message);
    const parsed = client.parseStructuredChunk(chunk, 0)!;
    const p = client.parseChunkPayload(parsed.type, parsed.payload);
    expect(p).toEqual({ kind: "error", error: nbd.NBD_EIO, message: "a".repeat(4095) });
    const rep = client.parseOptionReply(
      nbd.encodeRepError(7, nbd.NBD_REP_ERR_INVALID, message),
      0,
    )!;
    expect(rep.data.length).toBe(4095);
  });
});

// ---- handshake decoder ------------------------------------------------------------------------

const GO = nbd.NBD_OPT_GO;

/** A handshake stream with every option kind, and the events it must decode to. */
function handshakeFixture(): { stream: Uint8Array; events: HandshakeEvent[] } {
  const flags = nbd.NBD_FLAG_C_FIXED_NEWSTYLE | nbd.NBD_FLAG_C_NO_ZEROES;
  const parts: [Uint8Array, HandshakeEvent][] = [
    [client.encodeClientFlags(flags), { kind: "client-flags", flags }],
    [
      client.encodeOption(nbd.NBD_OPT_STRUCTURED_REPLY),
      { kind: "option", request: { type: "structured-reply", option: 8 } },
    ],
    [
      client.encodeOption(nbd.NBD_OPT_LIST),
      { kind: "option", request: { type: "list", option: 3 } },
    ],
    [
      client.encodeInfoOption(nbd.NBD_OPT_INFO, "disk", [
        nbd.NBD_INFO_BLOCK_SIZE,
        nbd.NBD_INFO_NAME,
        999,
      ]),
      {
        kind: "option",
        request: { type: "info", option: 6, name: "disk", infoRequests: [3, 1, 999] },
      },
    ],
    [
      client.encodeMetaContextOption(nbd.NBD_OPT_LIST_META_CONTEXT, "disk", []),
      {
        kind: "option",
        request: { type: "list-meta-context", option: 9, exportName: "disk", queries: [] },
      },
    ],
    [
      client.encodeMetaContextOption(nbd.NBD_OPT_SET_META_CONTEXT, "disk", [
        "base:allocation",
        "qemu:dirty-bitmap:b",
      ]),
      {
        kind: "option",
        request: {
          type: "set-meta-context",
          option: 10,
          exportName: "disk",
          queries: ["base:allocation", "qemu:dirty-bitmap:b"],
        },
      },
    ],
    [
      client.encodeOption(nbd.NBD_OPT_STARTTLS),
      { kind: "option", request: { type: "starttls", option: 5 } },
    ],
    [
      client.encodeOption(nbd.NBD_OPT_STARTTLS, hex("16")),
      {
        kind: "option",
        request: { type: "invalid", option: 5, reason: "NBD_OPT_STARTTLS takes no data" },
      },
    ],
    [
      client.encodeOption(0x12345678, hex("010203")),
      { kind: "option", request: { type: "unknown", option: 0x12345678, data: hex("010203") } },
    ],
    [
      client.encodeOption(nbd.NBD_OPT_ABORT, hex("ff")),
      { kind: "option", request: { type: "abort", option: 2 } },
    ],
    [
      client.encodeInfoOption(GO, "ünïcødé", []),
      { kind: "option", request: { type: "go", option: 7, name: "ünïcødé", infoRequests: [] } },
    ],
    [
      client.encodeExportNameOption(""),
      { kind: "option", request: { type: "export-name", option: 1, name: "" } },
    ],
  ];
  return { stream: cat(...parts.map((p) => p[0])), events: parts.map((p) => p[1]) };
}

describe("HandshakeDecoder", () => {
  it("decodes client flags and every option kind from one push", () => {
    const { stream, events } = handshakeFixture();
    expect(decodeHandshake([stream])).toEqual(events);
  });

  it("gives identical events with the input split at every byte offset", () => {
    const { stream, events } = handshakeFixture();
    for (const chunks of twoWaySplits(stream)) expect(decodeHandshake(chunks)).toEqual(events);
  });

  it("gives identical events from 1-byte pushes", () => {
    const { stream, events } = handshakeFixture();
    expect(decodeHandshake(bytewise(stream))).toEqual(events);
  });

  it("turns malformed payloads of known options into `invalid` and keeps framing", () => {
    const u32 = (v: number) => hex(v.toString(16).padStart(8, "0"));
    const u16 = (v: number) => hex(v.toString(16).padStart(4, "0"));
    const cases: [number, Uint8Array][] = [
      [nbd.NBD_OPT_LIST, hex("00")],
      [nbd.NBD_OPT_STRUCTURED_REPLY, hex("0000")],
      [GO, hex("0000000000")], // shorter than 6
      [GO, cat(u32(5), ascii("abcd"), u16(0))], // name overruns
      [GO, cat(u32(2), ascii("ab"))], // name leaves no room for the count
      [nbd.NBD_OPT_SET_META_CONTEXT, cat(u32(4), ascii("abcd"))], // likewise
      [GO, cat(u32(1), ascii("a"), u16(2), u16(1))], // one info request short
      [nbd.NBD_OPT_INFO, cat(u32(1), ascii("a"), u16(0), hex("00"))], // trailing byte
      [GO, cat(u32(2), hex("c328"), u16(0))], // bad UTF-8
      [nbd.NBD_OPT_EXPORT_NAME, hex("610062")], // NUL
      [nbd.NBD_OPT_EXPORT_NAME, new Uint8Array(4097).fill(0x61)], // over 4096 bytes
      [nbd.NBD_OPT_SET_META_CONTEXT, cat(u32(0), hex("000000"))], // shorter than 8
      [nbd.NBD_OPT_SET_META_CONTEXT, cat(u32(9), u32(0))], // name overruns
      [nbd.NBD_OPT_SET_META_CONTEXT, cat(u32(0), u32(0xffffffff), u32(0))], // too many queries
      [nbd.NBD_OPT_LIST_META_CONTEXT, cat(u32(0), u32(1), u32(6), ascii("base:"))], // query overruns
      [nbd.NBD_OPT_LIST_META_CONTEXT, cat(u32(0), u32(2), u32(0), hex("0000"))], // query truncated
      [nbd.NBD_OPT_LIST_META_CONTEXT, cat(u32(0), u32(0), hex("00"))], // trailing byte
    ];
    const stream = cat(...cases.map(([o, d]) => client.encodeOption(o, d)), client.encodeOption(3));
    const events = decodeHandshake([client.encodeClientFlags(1), stream]);
    expect(events).toHaveLength(1 + cases.length + 1);
    cases.forEach(([option], i) => {
      const ev = events[i + 1]!;
      expect(ev.kind === "option" && ev.request).toMatchObject({ type: "invalid", option });
    });
    expect(events.at(-1)).toEqual({ kind: "option", request: { type: "list", option: 3 } });
  });

  it("accepts a 4096-byte export name, the spec's maximum", () => {
    const name = "n".repeat(4096);
    const events = decodeHandshake([
      client.encodeClientFlags(1),
      client.encodeInfoOption(GO, name, []),
    ]);
    expect(events[1]).toEqual({
      kind: "option",
      request: { type: "go", option: GO, name, infoRequests: [] },
    });
  });

  it("reports a bad option magic as a protocol error and then stops", () => {
    const bad = client.encodeOption(GO, new Uint8Array(0), 0, 0x4948415645000000n);
    const stream = cat(
      client.encodeClientFlags(1),
      client.encodeOption(3),
      bad,
      client.encodeOption(3),
    );
    const expected: HandshakeEvent[] = [
      { kind: "client-flags", flags: 1 },
      { kind: "option", request: { type: "list", option: 3 } },
      { kind: "error", error: { code: "bad-option-magic", magic: 0x4948415645000000n } },
    ];
    for (const chunks of twoWaySplits(stream)) expect(decodeHandshake(chunks)).toEqual(expected);
    const dec = new nbd.HandshakeDecoder();
    dec.push(stream);
    while (dec.next() !== null);
    expect(dec.error).toEqual({ code: "bad-option-magic", magic: 0x4948415645000000n });
    dec.push(client.encodeOption(3)); // ignored, not thrown
    expect(dec.next()).toBeNull();
    expect(nbd.describeProtocolError(dec.error!)).toContain("0x4948415645000000");
  });

  it("reports an over-long option without buffering it, then decodes the next one", () => {
    const max = 16;
    const stream = cat(
      client.encodeClientFlags(0),
      client.encodeOption(0x99, new Uint8Array(16).fill(1)), // exactly at the limit
      client.encodeOption(0x98, new Uint8Array(17).fill(2)), // one byte over
      client.encodeOption(nbd.NBD_OPT_LIST),
    );
    const expected: HandshakeEvent[] = [
      { kind: "client-flags", flags: 0 },
      {
        kind: "option",
        request: { type: "unknown", option: 0x99, data: new Uint8Array(16).fill(1) },
      },
      { kind: "option-too-long", option: 0x98, length: 17, maxLength: 16 },
      { kind: "option", request: { type: "list", option: 3 } },
    ];
    for (const chunks of twoWaySplits(stream)) {
      expect(decodeHandshake(chunks, { maxOptionLengthBytes: max })).toEqual(expected);
    }
    // The too-long event comes as soon as the header is in, before any of its data.
    const dec = new nbd.HandshakeDecoder({ maxOptionLengthBytes: max });
    dec.push(cat(client.encodeClientFlags(0), client.encodeOption(0x98, new Uint8Array(0), 17)));
    expect(dec.next()?.kind).toBe("client-flags");
    expect(dec.next()?.kind).toBe("option-too-long");
  });

  it("does not allocate a 4 GiB option the client claims", () => {
    const dec = new nbd.HandshakeDecoder();
    const before = arrayBuffersBytes();
    dec.push(
      cat(client.encodeClientFlags(1), client.encodeOption(GO, new Uint8Array(0), 0xffffffff)),
    );
    expect(dec.next()?.kind).toBe("client-flags");
    expect(dec.next()).toEqual({
      kind: "option-too-long",
      option: GO,
      length: 0xffffffff,
      maxLength: nbd.DEFAULT_MAX_OPTION_LENGTH_BYTES,
    });
    dec.push(new Uint8Array(MiB));
    expect(dec.next()).toBeNull(); // discarded, not an option header
    expect(arrayBuffersBytes() - before).toBeLessThan(8 * MiB);
  });

  it("hands over the bytes that follow the final option, even if partly buffered", () => {
    const request = client.encodeRequest({
      flags: 0,
      type: nbd.NBD_CMD_READ,
      cookie: 9n,
      offset: 0,
      length: 512,
    });
    const stream = cat(client.encodeClientFlags(1), client.encodeInfoOption(GO, "d", []), request);
    // Case 1: the server switches phase right after the GO event.
    const a = new nbd.HandshakeDecoder();
    a.push(stream);
    expect(a.next()?.kind).toBe("client-flags");
    expect(a.next()?.kind).toBe("option");
    expect(a.takeRemaining()).toEqual(request);
    expect(() => a.push(new Uint8Array(1))).toThrow();
    // Case 2: it called next() once more, which buffered the start of the request as a header.
    const cut = stream.length - request.length + 10;
    const b = new nbd.HandshakeDecoder();
    b.push(stream.subarray(0, cut));
    expect(b.next()?.kind).toBe("client-flags");
    expect(b.next()?.kind).toBe("option");
    expect(b.next()).toBeNull();
    const rest = b.takeRemaining();
    expect(rest).toEqual(request.subarray(0, 10));
    expect(decodeTransmission([rest, stream.subarray(cut)])).toEqual([
      { flags: 0, type: nbd.NBD_CMD_READ, cookie: 9n, offset: 0, length: 512 },
    ]);
  });

  it("refuses a push before the previous chunk is drained", () => {
    const dec = new nbd.HandshakeDecoder();
    dec.push(cat(client.encodeClientFlags(1), client.encodeOption(3)));
    expect(dec.next()?.kind).toBe("client-flags");
    expect(() => dec.push(client.encodeOption(3))).toThrow();
  });

  it("decodes random option sequences split at random points (property)", () => {
    const name = fc.string({ unit: "binary", maxLength: 12 }).filter((s) => !s.includes("\0"));
    type Pair = [Uint8Array, OptionRequest];
    const pair = (bytes: Uint8Array, request: OptionRequest): Pair => [bytes, request];
    const optionArb: fc.Arbitrary<Pair> = fc.oneof(
      name.map((n) =>
        pair(client.encodeExportNameOption(n), { type: "export-name", option: 1, name: n }),
      ),
      fc
        .tuple(
          fc.constantFrom(nbd.NBD_OPT_INFO, GO),
          name,
          fc.array(fc.integer({ min: 0, max: 0xffff }), { maxLength: 5 }),
        )
        .map(([o, n, infos]) =>
          pair(client.encodeInfoOption(o, n, infos), {
            type: o === GO ? "go" : "info",
            option: o,
            name: n,
            infoRequests: infos,
          }),
        ),
      fc
        .tuple(
          fc.constantFrom(nbd.NBD_OPT_LIST_META_CONTEXT, nbd.NBD_OPT_SET_META_CONTEXT),
          name,
          fc.array(name, { maxLength: 4 }),
        )
        .map(([o, n, qs]) =>
          pair(client.encodeMetaContextOption(o, n, qs), {
            type: o === nbd.NBD_OPT_SET_META_CONTEXT ? "set-meta-context" : "list-meta-context",
            option: o,
            exportName: n,
            queries: qs,
          }),
        ),
      fc.constant(pair(client.encodeOption(3), { type: "list", option: 3 })),
      fc
        .tuple(fc.integer({ min: 11, max: 0xffffffff }), fc.uint8Array({ maxLength: 20 }))
        .map(([o, d]) => pair(client.encodeOption(o, d), { type: "unknown", option: o, data: d })),
    );
    fc.assert(
      fc.property(
        fc.integer({ min: 0, max: 0xffffffff }),
        fc.array(optionArb, { maxLength: 8 }),
        fc.array(fc.nat(), { maxLength: 10 }),
        (flags, options, cuts) => {
          const stream = cat(client.encodeClientFlags(flags), ...options.map((o) => o[0]));
          const expected: HandshakeEvent[] = [
            { kind: "client-flags", flags },
            ...options.map(([, request]): HandshakeEvent => ({ kind: "option", request })),
          ];
          expect(decodeHandshake(splitAtCuts(stream, cuts))).toEqual(expected);
        },
      ),
    );
  });

  it("never throws on arbitrary bytes (property)", () => {
    fc.assert(
      fc.property(fc.array(fc.uint8Array({ maxLength: 64 }), { maxLength: 8 }), (chunks) => {
        const events = decodeHandshake(chunks, { maxOptionLengthBytes: 32 });
        // Only the last event may be an error.
        events.slice(0, -1).forEach((e) => expect(e.kind).not.toBe("error"));
      }),
    );
  });
});

// ---- transmission decoder ---------------------------------------------------------------------

interface Req {
  flags: number;
  type: number;
  cookie: bigint;
  offset: number;
  length: number;
  payload?: Uint8Array;
}

function encodeReqs(reqs: readonly Req[]): Uint8Array {
  return cat(...reqs.map((r) => client.encodeRequest(r, r.payload)));
}

function transmissionFixture(): Req[] {
  const payload = Uint8Array.from({ length: 300 }, (_, i) => (i * 7 + 3) & 0xff);
  return [
    { flags: nbd.NBD_CMD_FLAG_DF, type: nbd.NBD_CMD_READ, cookie: 1n, offset: 0, length: 4096 },
    {
      flags: nbd.NBD_CMD_FLAG_FUA,
      type: nbd.NBD_CMD_WRITE,
      cookie: 2n ** 64n - 1n,
      offset: 512,
      length: 5,
      payload: utf8("hello"),
    },
    {
      flags: 0,
      type: nbd.NBD_CMD_WRITE,
      cookie: 3n,
      offset: 1024,
      length: 0,
      payload: new Uint8Array(0),
    },
    { flags: 0, type: nbd.NBD_CMD_FLUSH, cookie: 4n, offset: 0, length: 0 },
    {
      flags: nbd.NBD_CMD_FLAG_FUA,
      type: nbd.NBD_CMD_TRIM,
      cookie: 5n,
      offset: 2 ** 40,
      length: 2 ** 31,
    },
    {
      flags: nbd.NBD_CMD_FLAG_NO_HOLE | nbd.NBD_CMD_FLAG_FAST_ZERO,
      type: nbd.NBD_CMD_WRITE_ZEROES,
      cookie: 6n,
      offset: 4096,
      length: 0xffffffff,
    },
    {
      flags: nbd.NBD_CMD_FLAG_REQ_ONE,
      type: nbd.NBD_CMD_BLOCK_STATUS,
      cookie: 7n,
      offset: 0,
      length: 65536,
    },
    { flags: 0, type: nbd.NBD_CMD_CACHE, cookie: 8n, offset: 8192, length: 4096 },
    {
      flags: 0xffff,
      type: 0x7fff,
      cookie: 0x8000000000000001n,
      offset: Number.MAX_SAFE_INTEGER,
      length: 1,
    },
    { flags: 0, type: nbd.NBD_CMD_WRITE, cookie: 10n, offset: 0, length: payload.length, payload },
    { flags: 0, type: nbd.NBD_CMD_DISC, cookie: 11n, offset: 0, length: 0 },
  ];
}

describe("TransmissionDecoder", () => {
  it("decodes a request laid out as in the spec", () => {
    const bytes = hex("25609513 0001 0001 1122334455667788 0000000100000000 00000003 616263");
    expect(decodeTransmission([bytes])).toEqual([
      {
        flags: nbd.NBD_CMD_FLAG_FUA,
        type: nbd.NBD_CMD_WRITE,
        cookie: 0x1122334455667788n,
        offset: 2 ** 32,
        length: 3,
        payload: ascii("abc"),
      },
    ]);
  });

  it("decodes every command kind, concatenated in one push", () => {
    const reqs = transmissionFixture();
    expect(decodeTransmission([encodeReqs(reqs)])).toEqual(reqs);
  });

  it("gives identical results with the input split at every byte offset", () => {
    const reqs = transmissionFixture();
    const stream = encodeReqs(reqs);
    for (const chunks of twoWaySplits(stream)) expect(decodeTransmission(chunks)).toEqual(reqs);
  });

  it("gives identical results from 1-byte pushes", () => {
    const reqs = transmissionFixture();
    expect(decodeTransmission(bytewise(encodeReqs(reqs)))).toEqual(reqs);
  });

  it("hands WRITE payloads out as views of the pushed chunk, not copies", () => {
    const payload = Uint8Array.from({ length: 1000 }, (_, i) => i & 0xff);
    const chunk = client.encodeRequest(
      { flags: 0, type: nbd.NBD_CMD_WRITE, cookie: 1n, offset: 0, length: 1000 },
      payload,
    );
    const dec = new nbd.TransmissionDecoder();
    dec.push(chunk);
    const req = dec.next();
    expect(req?.kind).toBe("request");
    const data = dec.next();
    expect(data?.kind).toBe("write-data");
    if (data?.kind !== "write-data") return;
    expect(data.data.buffer).toBe(chunk.buffer);
    expect(data.data.byteOffset).toBe(chunk.byteOffset + 28);
    expect(data.data).toEqual(payload);
    expect(data).toMatchObject({ final: true, payloadOffset: 0, request: req });
    expect(dec.next()).toBeNull();
    expect(dec.atMessageBoundary).toBe(true);
  });

  it("yields one empty final write-data event for a zero-length WRITE", () => {
    const dec = new nbd.TransmissionDecoder();
    dec.push(
      client.encodeRequest({ flags: 0, type: nbd.NBD_CMD_WRITE, cookie: 1n, offset: 0, length: 0 }),
    );
    const req = dec.next();
    expect(dec.next()).toEqual({
      kind: "write-data",
      request: req,
      data: new Uint8Array(0),
      payloadOffset: 0,
      final: true,
    });
    expect(dec.next()).toBeNull();
  });

  it("keeps a split header in its own buffer, so the caller may reuse the chunk", () => {
    const bytes = client.encodeRequest({
      flags: 1,
      type: nbd.NBD_CMD_READ,
      cookie: 42n,
      offset: 4096,
      length: 512,
    });
    const buf = new Uint8Array(28);
    const dec = new nbd.TransmissionDecoder();
    buf.set(bytes.subarray(0, 27));
    dec.push(buf.subarray(0, 27));
    expect(dec.next()).toBeNull();
    expect(dec.atMessageBoundary).toBe(false);
    buf.fill(0xff); // the server's read buffer gets refilled
    buf[0] = bytes[27]!;
    dec.push(buf.subarray(0, 1));
    expect(dec.next()).toEqual({
      kind: "request",
      flags: 1,
      type: 0,
      cookie: 42n,
      offset: 4096,
      length: 512,
    });
    expect(dec.atMessageBoundary).toBe(true);
  });

  it("lets the server stop between events and resume later on the same chunk", () => {
    const reqs = transmissionFixture().slice(0, 4);
    const dec = new nbd.TransmissionDecoder();
    dec.push(encodeReqs(reqs));
    const first = dec.next();
    expect(first).toMatchObject({ kind: "request", cookie: 1n });
    expect(() => dec.push(new Uint8Array(1))).toThrow(); // not drained yet
    const kinds: string[] = [];
    for (let ev = dec.next(); ev; ev = dec.next()) kinds.push(ev.kind);
    expect(kinds).toEqual(["request", "write-data", "request", "write-data", "request"]);
  });

  it("reports a bad request magic as a protocol error and then stops", () => {
    const good = client.encodeRequest({
      flags: 0,
      type: nbd.NBD_CMD_FLUSH,
      cookie: 1n,
      offset: 0,
      length: 0,
    });
    const bad = client.encodeRequest({
      flags: 0,
      type: nbd.NBD_CMD_FLUSH,
      cookie: 2n,
      offset: 0,
      length: 0,
      magic: 0x12560953,
    });
    const stream = cat(good, bad, good);
    const expected: Decoded[] = [
      { flags: 0, type: nbd.NBD_CMD_FLUSH, cookie: 1n, offset: 0, length: 0 },
      { error: { code: "bad-request-magic", magic: 0x12560953 } },
    ];
    for (const chunks of twoWaySplits(stream)) expect(decodeTransmission(chunks)).toEqual(expected);
    const dec = new nbd.TransmissionDecoder();
    dec.push(bad);
    expect(dec.next()?.kind).toBe("error");
    expect(dec.error).toEqual({ code: "bad-request-magic", magic: 0x12560953 });
    dec.push(good);
    expect(dec.next()).toBeNull();
    expect(nbd.describeProtocolError(dec.error!)).toContain("0x12560953");
  });

  it("loses sync (and says so) when a WRITE carries fewer bytes than it claims", () => {
    const short = client.encodeRequest(
      { flags: 0, type: nbd.NBD_CMD_WRITE, cookie: 1n, offset: 0, length: 8 },
      utf8("abcd"),
    );
    const next = client.encodeRequest({
      flags: 0,
      type: nbd.NBD_CMD_FLUSH,
      cookie: 2n,
      offset: 0,
      length: 0,
    });
    const out = decodeTransmission([cat(short, next, next)]);
    expect(out[0]).toMatchObject({ cookie: 1n, payload: cat(utf8("abcd"), next.subarray(0, 4)) });
    expect(out[1]).toMatchObject({ error: { code: "bad-request-magic" } });
  });

  it("does not allocate for a WRITE that claims 4 GiB", () => {
    const dec = new nbd.TransmissionDecoder();
    const before = arrayBuffersBytes();
    dec.push(
      client.encodeRequest({
        flags: 0,
        type: nbd.NBD_CMD_WRITE,
        cookie: 1n,
        offset: 0,
        length: 0xffffffff,
      }),
    );
    expect(dec.next()).toMatchObject({ kind: "request", length: 0xffffffff });
    expect(dec.next()).toBeNull();
    let delivered = 0;
    for (let i = 0; i < 4; i++) {
      const chunk = new Uint8Array(MiB);
      dec.push(chunk);
      for (let ev = dec.next(); ev; ev = dec.next()) {
        expect(ev.kind).toBe("write-data");
        if (ev.kind !== "write-data") continue;
        expect(ev.data.buffer).toBe(chunk.buffer);
        expect(ev.final).toBe(false);
        delivered += ev.data.length;
      }
    }
    expect(delivered).toBe(4 * MiB);
    expect(dec.atMessageBoundary).toBe(false);
    expect(arrayBuffersBytes() - before).toBeLessThan(64 * MiB);
  });

  it("decodes u64 offsets exactly up to 2^53 - 1 and never below 2^53 beyond", () => {
    const offsets = [0n, 2n ** 32n - 1n, 2n ** 53n - 1n, 2n ** 53n, 2n ** 53n + 1n, 2n ** 64n - 1n];
    const reqs = offsets.map((o, i) =>
      client.encodeRequest({
        flags: 0,
        type: nbd.NBD_CMD_READ,
        cookie: BigInt(i),
        offset: o,
        length: 1,
      }),
    );
    const got = decodeTransmission([cat(...reqs)]).map((d) => ("offset" in d ? d.offset : NaN));
    expect(got.slice(0, 3)).toEqual([0, 2 ** 32 - 1, Number.MAX_SAFE_INTEGER]);
    for (const o of got.slice(3)) {
      expect(o).toBeGreaterThanOrEqual(2 ** 53);
      expect(Number.isSafeInteger(o)).toBe(false);
    }
    expect(got[5]).toBe(Number(2n ** 64n - 1n));
  });

  it("decodes random request sequences split at random points (property)", () => {
    // Each case is the bytes a client sends and the request the decoder must report. Offsets
    // span all of u64; the decoder's number must equal the correctly rounded value.
    const reqArb = fc
      .record({
        flags: fc.integer({ min: 0, max: 0xffff }),
        type: fc.oneof(
          fc.constantFrom(0, 1, 1, 1, 2, 3, 4, 5, 6, 7),
          fc.integer({ min: 0, max: 0xffff }),
        ),
        cookie: fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }),
        offset: fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }),
        length: fc.integer({ min: 0, max: 0xffffffff }),
        payload: fc.uint8Array({ maxLength: 200 }),
      })
      .map((r): [Uint8Array, Req] => {
        const isWrite = r.type === nbd.NBD_CMD_WRITE;
        // WRITE lengths must match their payloads; other commands carry none.
        const length = isWrite ? r.payload.length : r.length;
        const payload = isWrite ? r.payload : undefined;
        const wire = { flags: r.flags, type: r.type, cookie: r.cookie, offset: r.offset, length };
        const expected: Req = {
          ...wire,
          offset: Number(r.offset),
          ...(payload ? { payload } : {}),
        };
        return [client.encodeRequest(wire, payload), expected];
      });
    fc.assert(
      fc.property(
        fc.array(reqArb, { maxLength: 12 }),
        fc.array(fc.nat(), { maxLength: 20 }),
        (cases, cuts) => {
          const stream = cat(...cases.map((c) => c[0]));
          expect(decodeTransmission(splitAtCuts(stream, cuts))).toEqual(cases.map((c) => c[1]));
        },
      ),
      { numRuns: 300 },
    );
  });

  it("never throws on arbitrary bytes and accounts for every byte (property)", () => {
    // Pieces are random bytes or random headers behind a valid magic, so that garbage also
    // decodes into requests (and huge WRITEs) now and then, not only into bad-magic errors.
    const piece = fc.oneof(
      fc.uint8Array({ maxLength: 40 }),
      fc.uint8Array({ minLength: 24, maxLength: 24 }).map((b) => cat(hex("25609513"), b)),
    );
    fc.assert(
      fc.property(
        fc.array(piece, { maxLength: 10 }),
        fc.array(fc.nat(), { maxLength: 10 }),
        (pieces, cuts) => {
          const stream = cat(...pieces);
          const dec = new nbd.TransmissionDecoder();
          let consumed = 0;
          let sawError = false;
          for (const chunk of splitAtCuts(stream, cuts)) {
            dec.push(chunk);
            for (let ev = dec.next(); ev; ev = dec.next()) {
              expect(sawError).toBe(false);
              if (ev.kind === "write-data") consumed += ev.data.length;
              else consumed += 28;
              if (ev.kind === "error") sawError = true;
            }
          }
          const leftover = stream.length - consumed;
          if (sawError) {
            expect(leftover).toBeGreaterThanOrEqual(0);
          } else {
            expect(leftover).toBeGreaterThanOrEqual(0);
            expect(leftover).toBeLessThan(28);
            if (dec.atMessageBoundary) expect(leftover).toBe(0);
          }
        },
      ),
    );
  });
});
