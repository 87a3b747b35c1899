/**
 * Incremental decoder for what a client sends during the handshake: the 32-bit client flags,
 * then option frames (IHAVEOPT, option u32, length u32, data).
 *
 * States: CLIENT_FLAGS → OPTION_HEADER ⇄ OPTION_DATA (length ≤ max) or OPTION_SKIP (length > max);
 * FAILED after a bad magic. Headers that straddle pushes are assembled in a fixed 16-byte buffer;
 * option data is copied into an array of the claimed length only after that length has been
 * checked against `maxOptionLengthBytes`. An over-long option is reported at once and its data is
 * then discarded as it arrives, never buffered.
 */
import assert from "node:assert/strict";

import { EMPTY_BYTES, readU32, readU64AsBigInt } from "./bytes.js";
import { CLIENT_FLAGS_BYTES, IHAVEOPT, OPTION_HEADER_BYTES } from "./constants.js";
import { type OptionRequest, parseOptionRequest } from "./options.js";
import type { ProtocolError } from "./protocol-error.js";

/** What {@link HandshakeDecoder.next} yields. */
export type HandshakeEvent =
  /** The client's flags; the server must drop the connection if it sets bits it did not offer. */
  | { readonly kind: "client-flags"; readonly flags: number }
  /** One whole option, parsed (see {@link OptionRequest}). */
  | { readonly kind: "option"; readonly request: OptionRequest }
  /**
   * An option whose claimed `length` exceeds `maxLength`. The decoder discards its data as it
   * arrives; the server answers NBD_REP_ERR_TOO_BIG (or disconnects, e.g. for
   * NBD_OPT_EXPORT_NAME, which has no error reply).
   */
  | {
      readonly kind: "option-too-long";
      readonly option: number;
      readonly length: number;
      readonly maxLength: number;
    }
  /** Fatal; the decoder yields nothing more. */
  | { readonly kind: "error"; readonly error: ProtocolError };

/** Options for {@link HandshakeDecoder}. */
export interface HandshakeDecoderOptions {
  /** Largest option payload accepted, in bytes. Default 65536. */
  readonly maxOptionLengthBytes?: number;
  /**
   * Start with the client flags (true, a fresh connection) or with an option frame (false: the
   * option haggling that goes on inside TLS after NBD_OPT_STARTTLS, where no flags are resent).
   * Default true.
   */
  readonly clientFlags?: boolean;
}

/** Default {@link HandshakeDecoderOptions.maxOptionLengthBytes}: 64 KiB. */
export const DEFAULT_MAX_OPTION_LENGTH_BYTES = 64 * 1024;

const CLIENT_FLAGS = 0;
const OPTION_HEADER = 1;
const OPTION_DATA = 2;
const OPTION_SKIP = 3;
const FAILED = 4;
const DONE = 5;

/**
 * Pull-style decoder: `push(chunk)`, then call `next()` until it returns null, then push the next
 * chunk. The decoder references the pushed chunk until `next()` has returned null (so the server
 * may pause between `next()` calls, as long as it does not reuse the chunk's memory); after that
 * it reads nothing more from it. Events own their data.
 *
 * When an option ends the handshake (NBD_OPT_EXPORT_NAME, or NBD_OPT_GO the server accepts), call
 * {@link takeRemaining} before calling `next()` again, and feed what it returns to the
 * transmission decoder. After an NBD_OPT_STARTTLS the server acknowledged, what it returns is
 * the start of the TLS stream.
 */
export class HandshakeDecoder {
  readonly #maxOptionLengthBytes: number;
  #state = CLIENT_FLAGS;
  #chunk: Uint8Array = EMPTY_BYTES;
  #pos = 0;
  readonly #header = new Uint8Array(OPTION_HEADER_BYTES);
  #headerFilled = 0;
  #option = 0;
  #data: Uint8Array = EMPTY_BYTES;
  #dataFilled = 0;
  #skipRemaining = 0;
  #error: ProtocolError | undefined;
  /** Where {@link #take} found the bytes: the chunk itself or the header buffer. */
  #src: Uint8Array = EMPTY_BYTES;

  constructor(options: HandshakeDecoderOptions = {}) {
    const max = options.maxOptionLengthBytes ?? DEFAULT_MAX_OPTION_LENGTH_BYTES;
    assert(Number.isSafeInteger(max) && max >= 0, "maxOptionLengthBytes");
    this.#maxOptionLengthBytes = max;
    if (options.clientFlags === false) this.#state = OPTION_HEADER;
  }

  /** The fatal error, once one has been yielded. */
  get error(): ProtocolError | undefined {
    return this.#error;
  }

  /** Hand the decoder the next bytes from the socket. The previous chunk must be drained. */
  push(chunk: Uint8Array): void {
    assert(this.#state !== DONE, "push() after takeRemaining()");
    assert(this.#pos === this.#chunk.length, "push() before next() returned null");
    if (this.#state === FAILED) return;
    this.#chunk = chunk;
    this.#pos = 0;
  }

  /** The next whole event, or null when more bytes are needed. Never throws on client input. */
  next(): HandshakeEvent | null {
    for (;;) {
      switch (this.#state) {
        case CLIENT_FLAGS: {
          const at = this.#take(CLIENT_FLAGS_BYTES);
          if (at < 0) return null;
          const flags = readU32(this.#src, at);
          this.#state = OPTION_HEADER;
          return { kind: "client-flags", flags };
        }
        case OPTION_HEADER: {
          const at = this.#take(OPTION_HEADER_BYTES);
          if (at < 0) return null;
          const src = this.#src;
          const magic = readU64AsBigInt(src, at);
          if (magic !== IHAVEOPT) return this.#fail({ code: "bad-option-magic", magic });
          const option = readU32(src, at + 8);
          const length = readU32(src, at + 12);
          if (length > this.#maxOptionLengthBytes) {
            this.#state = OPTION_SKIP;
            this.#skipRemaining = length;
            return {
              kind: "option-too-long",
              option,
              length,
              maxLength: this.#maxOptionLengthBytes,
            };
          }
          if (length === 0) return this.#optionEvent(option, EMPTY_BYTES);
          this.#option = option;
          this.#data = new Uint8Array(length);
          this.#dataFilled = 0;
          this.#state = OPTION_DATA;
          continue;
        }
        case OPTION_DATA: {
          const n = Math.min(this.#data.length - this.#dataFilled, this.#chunk.length - this.#pos);
          this.#data.set(this.#chunk.subarray(this.#pos, this.#pos + n), this.#dataFilled);
          this.#pos += n;
          this.#dataFilled += n;
          if (this.#dataFilled < this.#data.length) return null;
          const data = this.#data;
          this.#data = EMPTY_BYTES;
          return this.#optionEvent(this.#option, data);
        }
        case OPTION_SKIP: {
          const n = Math.min(this.#skipRemaining, this.#chunk.length - this.#pos);
          this.#pos += n;
          this.#skipRemaining -= n;
          if (this.#skipRemaining > 0) return null;
          this.#state = OPTION_HEADER;
          continue;
        }
        default: // FAILED, DONE
          return null;
      }
    }
  }

  /**
   * Stop decoding and return the bytes received after the last yielded event (a view of the
   * current chunk, or a copy if part of them had been buffered). Call right after the event that
   * ended the handshake; the decoder must then not be used again.
   */
  takeRemaining(): Uint8Array {
    assert(this.#state === OPTION_HEADER, "takeRemaining() between option frames only");
    const rest = this.#chunk.subarray(this.#pos);
    let out = rest;
    if (this.#headerFilled > 0) {
      out = new Uint8Array(this.#headerFilled + rest.length);
      out.set(this.#header.subarray(0, this.#headerFilled));
      out.set(rest, this.#headerFilled);
    }
    this.#chunk = EMPTY_BYTES;
    this.#pos = 0;
    this.#headerFilled = 0;
    this.#state = DONE;
    return out;
  }

  /**
   * Make `n` contiguous bytes available at `this.#src[returned index]`, reading in place when the
   * chunk holds them all and assembling them in the header buffer otherwise. Returns -1 (having
   * buffered what there was) when the chunk ran out first.
   */
  #take(n: number): number {
    const avail = this.#chunk.length - this.#pos;
    if (this.#headerFilled === 0 && avail >= n) {
      const at = this.#pos;
      this.#pos += n;
      this.#src = this.#chunk;
      return at;
    }
    const k = Math.min(n - this.#headerFilled, avail);
    for (let i = 0; i < k; i++) this.#header[this.#headerFilled + i] = this.#chunk[this.#pos + i]!;
    this.#headerFilled += k;
    this.#pos += k;
    if (this.#headerFilled < n) return -1;
    this.#headerFilled = 0;
    this.#src = this.#header;
    return 0;
  }

  #optionEvent(option: number, data: Uint8Array): HandshakeEvent {
    this.#state = OPTION_HEADER;
    return { kind: "option", request: parseOptionRequest(option, data) };
  }

  #fail(error: ProtocolError): HandshakeEvent {
    this.#state = FAILED;
    this.#error = error;
    this.#chunk = EMPTY_BYTES;
    this.#pos = 0;
    return { kind: "error", error };
  }
}
