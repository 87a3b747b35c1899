/**
 * Incremental decoder for what a client sends during transmission: 28-byte request headers,
 * each NBD_CMD_WRITE followed by `length` payload bytes.
 *
 * Zero-copy by design: a header that lies wholly inside the pushed chunk is parsed in place; only
 * a header split across pushes is assembled in a fixed 28-byte buffer. WRITE payloads are not
 * buffered at all: they come out as `write-data` events whose `data` is a view of the pushed
 * chunk, so the server copies them once, straight to where they belong, into a buffer it
 * allocated itself after checking `length` against its own limit. The decoder never allocates
 * anything sized by a client-claimed length.
 */
import assert from "node:assert/strict";

import { EMPTY_BYTES, readU16, readU32, readU64AsBigInt, readU64AsNumber } from "./bytes.js";
import { NBD_CMD_WRITE, NBD_REQUEST_MAGIC, REQUEST_HEADER_BYTES } from "./constants.js";
import type { ProtocolError } from "./protocol-error.js";

/**
 * A request header, as sent. Fields keep the spec's names.
 *
 * `offset` is a u64 on the wire and a number here: exact up to Number.MAX_SAFE_INTEGER (2^53 - 1).
 * A larger wire value comes out rounded but never below 2^53, so the server's bounds check
 * (`offset + length > sizeBytes`) rejects it like any other out-of-range offset.
 */
export interface NbdRequest {
  /** NBD_CMD_FLAG_* bits. */
  readonly flags: number;
  /** NBD_CMD_* command. Unknown values are passed through; the server answers NBD_EINVAL. */
  readonly type: number;
  /** Opaque 64-bit value (formerly "handle") the reply must echo. */
  readonly cookie: bigint;
  /** Byte offset into the export (see above for values ≥ 2^53). */
  readonly offset: number;
  /** Byte count (u32); for NBD_CMD_WRITE, the payload length that follows. */
  readonly length: number;
}

/** A decoded request header. */
export interface RequestEvent extends NbdRequest {
  readonly kind: "request";
}

/**
 * A piece of an NBD_CMD_WRITE payload. `data` is a view into the chunk last pushed and is valid
 * only until the next `push()` (when the server reads the socket into a reused buffer, until
 * that buffer is refilled): copy it synchronously, e.g. `dest.set(ev.data, ev.payloadOffset)`.
 * Every WRITE yields at least one of these, the last with `final: true`, even when `length` is 0.
 */
export interface WriteDataEvent {
  readonly kind: "write-data";
  /** The WRITE this payload belongs to (the same object as its `request` event). */
  readonly request: RequestEvent;
  readonly data: Uint8Array;
  /** Where `data` starts within the payload, in bytes. */
  readonly payloadOffset: number;
  /** True on the piece that completes the payload. */
  readonly final: boolean;
}

/** Fatal; the decoder yields nothing more. */
export interface TransmissionErrorEvent {
  readonly kind: "error";
  readonly error: ProtocolError;
}

/** What {@link TransmissionDecoder.next} yields. */
export type TransmissionEvent = RequestEvent | WriteDataEvent | TransmissionErrorEvent;

/**
 * Pull-style decoder: `push(chunk)`, then call `next()` until it returns null, then push the next
 * chunk. Until `next()` has returned null the decoder references the chunk, so the server may
 * stop between events (for backpressure) and resume later, provided the chunk's memory is left
 * untouched meanwhile.
 */
export class TransmissionDecoder {
  #chunk: Uint8Array = EMPTY_BYTES;
  #pos = 0;
  readonly #header = new Uint8Array(REQUEST_HEADER_BYTES);
  #headerFilled = 0;
  /** The WRITE whose payload is being delivered, if any. */
  #write: RequestEvent | undefined;
  #payloadDelivered = 0;
  #error: ProtocolError | undefined;

  /** The fatal error, once one has been yielded. */
  get error(): ProtocolError | undefined {
    return this.#error;
  }

  /**
   * Once `next()` has returned null: true when no request is half-received (no partial header
   * buffered, no WRITE payload pending), i.e. an end of stream here is a clean one.
   */
  get atMessageBoundary(): boolean {
    return this.#headerFilled === 0 && this.#write === undefined;
  }

  /** Hand the decoder the next bytes from the socket. The previous chunk must be drained. */
  push(chunk: Uint8Array): void {
    assert(this.#pos === this.#chunk.length, "push() before next() returned null");
    if (this.#error !== undefined) return;
    this.#chunk = chunk;
    this.#pos = 0;
  }

  /** The next event, or null when more bytes are needed. Never throws on client input. */
  next(): TransmissionEvent | null {
    if (this.#error !== undefined) return null;
    if (this.#write !== undefined) return this.#nextPayload(this.#write);

    let src: Uint8Array;
    let at: number;
    const avail = this.#chunk.length - this.#pos;
    if (this.#headerFilled === 0 && avail >= REQUEST_HEADER_BYTES) {
      src = this.#chunk;
      at = this.#pos;
      this.#pos += REQUEST_HEADER_BYTES;
    } else {
      const n = Math.min(REQUEST_HEADER_BYTES - this.#headerFilled, avail);
      for (let i = 0; i < n; i++)
        this.#header[this.#headerFilled + i] = this.#chunk[this.#pos + i]!;
      this.#headerFilled += n;
      this.#pos += n;
      if (this.#headerFilled < REQUEST_HEADER_BYTES) return null;
      this.#headerFilled = 0;
      src = this.#header;
      at = 0;
    }

    const magic = readU32(src, at);
    if (magic !== NBD_REQUEST_MAGIC) {
      const error: ProtocolError = { code: "bad-request-magic", magic };
      this.#error = error;
      this.#chunk = EMPTY_BYTES;
      this.#pos = 0;
      return { kind: "error", error };
    }
    const request: RequestEvent = {
      kind: "request",
      flags: readU16(src, at + 4),
      type: readU16(src, at + 6),
      cookie: readU64AsBigInt(src, at + 8),
      offset: readU64AsNumber(src, at + 16),
      length: readU32(src, at + 24),
    };
    if (request.type === NBD_CMD_WRITE) {
      this.#write = request;
      this.#payloadDelivered = 0;
    }
    return request;
  }

  #nextPayload(request: RequestEvent): WriteDataEvent | null {
    const remaining = request.length - this.#payloadDelivered;
    const n = Math.min(remaining, this.#chunk.length - this.#pos);
    if (n === 0 && remaining > 0) return null;
    const event: WriteDataEvent = {
      kind: "write-data",
      request,
      data: n === 0 ? EMPTY_BYTES : this.#chunk.subarray(this.#pos, this.#pos + n),
      payloadOffset: this.#payloadDelivered,
      final: n === remaining,
    };
    this.#pos += n;
    this.#payloadDelivered += n;
    if (event.final) this.#write = undefined;
    return event;
  }
}
