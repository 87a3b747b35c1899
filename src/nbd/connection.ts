/**
 * One client connection: handshake, then transmission, over one socket.
 *
 * ## Reading
 *
 * Bytes arrive through {@link Connection.onChunk}, called with a view of one buffer reused for
 * every read (the socket's `onread` option, see server.ts). The codec's decoders parse headers
 * in place and hand WRITE payloads out as views, which are copied once, straight into the
 * request's own buffer. `onChunk` returns false to stop the socket reading; the chunk's memory
 * is then left alone until the connection resumes reading itself.
 *
 * ## Flow control
 *
 * A request holds a slot, and its payload bytes (READ or WRITE, sector-aligned) count against
 * the connection's byte budget, from the moment it is admitted until its reply has been handed
 * to the kernel. A request header that would pass `maxInFlightRequests` or `maxInFlightBytes`
 * (a lone request may always run) is held, unadmitted, and reading stops mid-chunk: nothing
 * more is parsed or allocated until replies drain. So a connection never holds more than
 * `maxInFlightBytes` of payload (plus one held header), whatever the client sends, and a client
 * that does not read its replies stops being read.
 *
 * ## Replies
 *
 * Requests run concurrently and are answered as they finish, out of order. Replies go through a
 * {@link ReplyWriter}: corked, header and data as separate writes, one `writev` per burst. READ
 * data is a buffer of the request's own, or memory the device lent (a large read of one cached
 * chunk, which the cache copies before changing), so it cannot change while queued.
 *
 * ## TLS
 *
 * When the negotiation returns a `starttls` step, the ack goes out on the plain socket; once it
 * is flushed, the plain socket (reading already stopped) goes to the server's {@link TlsUpgrader}.
 * On success the connection carries on with the TLS socket: replies go through a new
 * {@link ReplyWriter}, and its `data` events (fresh buffers) feed a new handshake decoder, then
 * the transmission decoder. A failed handshake closes the connection. Plain connections are
 * untouched: the reused read buffer and the same code paths as without TLS.
 *
 * ## Ending
 *
 * - NBD_CMD_DISC, a clean end of stream, or a server shutdown: stop reading, drop a WRITE whose
 *   payload is incomplete (never acknowledged), answer everything admitted, then close.
 * - A framing error or a client that vanished: close at once. Requests already running finish
 *   against the device; their replies are dropped.
 */

import assert from "node:assert/strict";
import type { Socket } from "node:net";
import type { TLSSocket } from "node:tls";

import {
  blockStatusChunkBytes,
  describeProtocolError,
  encodeErrorChunk,
  HandshakeDecoder,
  NBD_CMD_DISC,
  NBD_CMD_WRITE,
  NBD_EIO,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_NO_ZEROES,
  NBD_REPLY_FLAG_DONE,
  OFFSET_DATA_HEADER_BYTES,
  SIMPLE_REPLY_HEADER_BYTES,
  STRUCTURED_REPLY_HEADER_BYTES,
  TransmissionDecoder,
  encodeGreeting,
  writeBlockStatusChunk,
  writeNoneChunk,
  writeOffsetDataHeader,
  writeSimpleReplyHeader,
  type NbdRequest,
  type RequestEvent,
  type WriteDataEvent,
} from "./protocol.js";
import {
  allocateWriteBuffer,
  checkRequest,
  payloadCostBytes,
  runRequest,
  writePayloadOffset,
  type CheckedRequest,
  type Outcome,
  type Session,
} from "./commands.js";
import type { NbdFailure } from "./errors.js";
import type { BufferPool } from "./buffer-pool.js";
import type { ExportRegistry } from "./exports.js";
import { Negotiation, type TlsMode } from "./negotiation.js";
import { ReplyWriter } from "./reply-writer.js";
import type { TlsUpgrader } from "./tls.js";
import type { NbdExportMetrics } from "./export-metrics.js";
import type { Logger } from "../util/logger.js";

/** Per-connection limits. */
export interface ConnectionLimits {
  /** Requests admitted and not yet answered and flushed. Default 128. */
  readonly maxInFlightRequests: number;
  /** READ/WRITE payload bytes those requests may hold. Default 64 MiB. */
  readonly maxInFlightBytes: number;
  /** Time allowed to reach the transmission phase. Default 30 s. */
  readonly handshakeTimeoutMs: number;
  /** Options allowed during the handshake. Default 1024. */
  readonly maxOptions: number;
}

export const DEFAULT_CONNECTION_LIMITS: ConnectionLimits = Object.freeze({
  maxInFlightRequests: 128,
  maxInFlightBytes: 64 * 1024 * 1024,
  handshakeTimeoutMs: 30_000,
  maxOptions: 1024,
});

/** What a connection needs from its server. */
export interface ConnectionContext {
  readonly exports: ExportRegistry;
  /** Where READ and WRITE buffers come from and go back to. */
  readonly pool: BufferPool;
  readonly limits: ConnectionLimits;
  /** This connection's logger (its lines carry its id); `debug` lines are routine. */
  readonly logger: Logger;
  readonly shuttingDown: () => boolean;
  /** Default `off`. */
  readonly tls?: TlsMode;
  /** Runs the TLS handshakes; required unless `tls` is `off`. */
  readonly tlsUpgrader?: TlsUpgrader;
}

/** A request between its header and its flushed reply. */
interface Admission {
  readonly request: NbdRequest;
  /** Set when the request passed the checks. */
  readonly checked: CheckedRequest | undefined;
  /** Set when it did not. */
  readonly failure: NbdFailure | undefined;
  readonly costBytes: number;
}

/** A WRITE whose payload is arriving. */
interface Receiving {
  readonly request: NbdRequest;
  /** The write to run once its payload is in; undefined when the payload is being discarded. */
  readonly admission: Admission | undefined;
  /** The sector-aligned buffer the payload goes into. */
  readonly buffer: Uint8Array | undefined;
  readonly payloadAt: number;
}

type Phase = "handshake" | "tls-handshake" | "transmission" | "draining" | "closed";

export class Connection {
  readonly id: number;
  /** Resolves when the socket has closed. */
  readonly closed: Promise<void>;
  /** The plain socket, then the TLS socket once TLS is up. */
  #socket: Socket;
  readonly #context: ConnectionContext;
  #writer: ReplyWriter;
  #phase: Phase = "handshake";
  #handshake: HandshakeDecoder | undefined = new HandshakeDecoder();
  readonly #negotiation: Negotiation;
  #handshakeTimer: NodeJS.Timeout | undefined;
  #decoder: TransmissionDecoder | undefined;
  #session: Session | undefined;
  /** A header parsed but not admitted (over a bound). */
  #held: Admission | undefined;
  #receiving: Receiving | undefined;
  /** We told the socket to stop reading. */
  #readPaused = false;
  /** The decoder still holds part of the last chunk. */
  #chunkUnfinished = false;
  #pumping = false;
  #inFlight = 0;
  #inFlightBytes = 0;
  /** Admitted requests whose reply has not been queued yet. */
  #unanswered = 0;
  #onClose: () => void = () => {};
  #logger: Logger;
  /** The export's counters, once in transmission (if it has any). */
  #metrics: NbdExportMetrics | undefined;

  constructor(id: number, socket: Socket, context: ConnectionContext) {
    this.id = id;
    this.#socket = socket;
    this.#context = context;
    this.#logger = context.logger;
    this.#writer = new ReplyWriter(socket);
    this.#negotiation = new Negotiation({
      exports: context.exports,
      shuttingDown: context.shuttingDown,
      maxOptions: context.limits.maxOptions,
      tls: context.tls ?? "off",
    });
    assert(context.tls === undefined || context.tls === "off" || context.tlsUpgrader, "tls");
    this.closed = new Promise((resolve) => {
      this.#onClose = () => {
        this.#phase = "closed";
        clearTimeout(this.#handshakeTimer);
        resolve();
      };
      socket.once("close", this.#onClose);
    });
    socket.on("error", (error: NodeJS.ErrnoException) => {
      this.#log("debug", `socket error: ${error.code ?? error.message}`);
    });
    socket.on("end", () => this.#onEnd());
    this.#handshakeTimer = setTimeout(() => {
      if (this.#phase === "handshake" || this.#phase === "tls-handshake") {
        this.#abort("warn", "handshake timed out");
      }
    }, context.limits.handshakeTimeoutMs);
    this.#writer.send([encodeGreeting(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES)]);
  }

  /** Requests admitted and not yet flushed (for tests). */
  get inFlight(): { requests: number; bytes: number } {
    return { requests: this.#inFlight, bytes: this.#inFlightBytes };
  }

  /**
   * Bytes from the socket; `chunk` is only valid until this returns true. Returns false to stop
   * reading: the connection resumes the socket itself when it can take more.
   */
  onChunk(chunk: Uint8Array): boolean {
    let more: boolean;
    switch (this.#phase) {
      case "handshake":
        more = this.#handshakeChunk(chunk);
        break;
      case "transmission":
        this.#decoder!.push(chunk);
        more = this.#pump();
        break;
      default:
        more = false;
    }
    if (!more) this.#readPaused = true;
    return more;
  }

  /**
   * Stop for a server shutdown: a connection still negotiating is closed; one in transmission
   * stops reading, answers what it admitted, and closes. Resolves once the socket is closed.
   */
  shutdown(): Promise<void> {
    if (this.#phase === "handshake" || this.#phase === "tls-handshake")
      this.#abort("debug", "server shutting down");
    else this.#drain("server shutting down");
    return this.closed;
  }

  /** Close at once: requests running finish against the device, their replies are dropped. */
  destroy(reason: string): Promise<void> {
    if (this.#phase !== "closed") this.#abort("warn", reason);
    return this.closed;
  }

  // ---- handshake ----------------------------------------------------------------------------

  #handshakeChunk(chunk: Uint8Array): boolean {
    const decoder = this.#handshake!;
    decoder.push(chunk);
    for (;;) {
      const event = decoder.next();
      if (event === null) return true;
      const step = this.#negotiation.onEvent(event);
      if (step.next === "starttls") {
        this.#startTls(step.replies, decoder.takeRemaining());
        return false;
      }
      this.#writer.send(step.replies);
      if (step.next === "close") {
        const level = step.reason === "client aborted" ? "debug" : "warn";
        this.#log(level, `handshake ended: ${step.reason}`);
        this.#closeAfterReplies();
        return false;
      }
      if (step.next === "transmission") {
        const rest = decoder.takeRemaining();
        this.#handshake = undefined;
        clearTimeout(this.#handshakeTimer);
        this.#session = step.negotiated;
        this.#decoder = new TransmissionDecoder();
        this.#phase = "transmission";
        this.#logger = this.#logger.child({ export: step.negotiated.export.name });
        this.#metrics = step.negotiated.export.metrics;
        if (this.#metrics !== undefined) {
          const metrics = this.#metrics;
          metrics.connections++;
          void this.closed.then(() => metrics.connections--);
        }
        this.#log(
          "debug",
          `serving "${step.negotiated.export.name}"` +
            (step.negotiated.structuredReplies ? " with structured replies" : ""),
        );
        if (rest.length === 0) return true;
        this.#decoder.push(rest);
        return this.#pump();
      }
    }
  }

  /**
   * Send the ack of NBD_OPT_STARTTLS, then hand the plain socket (which has stopped reading) to
   * the upgrader. `early` holds what the client sent after the option without waiting for the
   * ack: TLS bytes, given back to the socket for the TLS side to read first.
   */
  #startTls(replies: readonly Uint8Array[], earlyView: Uint8Array): void {
    const early = Buffer.from(earlyView); // a view of the reused read buffer
    this.#handshake = undefined;
    this.#phase = "tls-handshake";
    const plain = this.#socket;
    this.#writer.send(replies, () => {
      if (this.#phase !== "tls-handshake") return;
      plain.pause();
      if (early.length > 0) plain.unshift(early);
      this.#context.tlsUpgrader!.upgrade(plain, {
        secure: (socket, session) => this.#tlsUp(socket, session),
        failed: (reason) => {
          if (this.#phase === "tls-handshake") this.#abort("warn", `TLS handshake: ${reason}`);
        },
      });
    });
  }

  #tlsUp(socket: TLSSocket, session: string): void {
    if (this.#phase !== "tls-handshake") {
      socket.destroy();
      return;
    }
    this.#log("debug", `TLS up: ${session}`);
    this.#socket = socket;
    this.#writer = new ReplyWriter(socket);
    this.#negotiation.tlsEstablished();
    this.#handshake = new HandshakeDecoder({ clientFlags: false });
    this.#phase = "handshake";
    this.#readPaused = false;
    socket.once("close", this.#onClose);
    socket.on("error", (error: NodeJS.ErrnoException) => {
      this.#log("debug", `TLS socket error: ${error.code ?? error.message}`);
    });
    socket.on("end", () => this.#onEnd());
    socket.on("data", (chunk: Buffer) => {
      if (!this.onChunk(chunk)) socket.pause();
    });
  }

  // ---- transmission: reading ----------------------------------------------------------------

  /** Parse and admit until the chunk is used up (true) or a bound or the phase stops us. */
  #pump(): boolean {
    assert(!this.#pumping, "pump re-entered");
    this.#pumping = true;
    try {
      const decoder = this.#decoder!;
      for (;;) {
        if (this.#phase !== "transmission") return false;
        if (this.#held !== undefined) {
          if (!this.#admissible(this.#held.costBytes)) {
            this.#chunkUnfinished = true;
            return false;
          }
          const admission = this.#held;
          this.#held = undefined;
          this.#admit(admission);
          continue;
        }
        const event = decoder.next();
        if (event === null) {
          this.#chunkUnfinished = false;
          return true;
        }
        switch (event.kind) {
          case "request":
            this.#onRequest(event);
            break;
          case "write-data":
            this.#onWriteData(event);
            break;
          case "error":
            this.#abort("warn", describeProtocolError(event.error));
            return false;
        }
      }
    } finally {
      this.#pumping = false;
    }
  }

  #admissible(costBytes: number): boolean {
    const { maxInFlightRequests, maxInFlightBytes } = this.#context.limits;
    if (this.#inFlight === 0) return true;
    return (
      this.#inFlight < maxInFlightRequests && this.#inFlightBytes + costBytes <= maxInFlightBytes
    );
  }

  #onRequest(request: RequestEvent): void {
    if (request.type === NBD_CMD_DISC) {
      this.#drain("client sent NBD_CMD_DISC");
      return;
    }
    const checked = checkRequest(this.#session!, request);
    this.#held =
      "errno" in checked
        ? { request, checked: undefined, failure: checked, costBytes: 0 }
        : { request, checked, failure: undefined, costBytes: payloadCostBytes(checked) };
  }

  #admit(admission: Admission): void {
    this.#inFlight++;
    this.#inFlightBytes += admission.costBytes;
    this.#unanswered++;
    const { request, checked } = admission;
    if (checked === undefined) {
      // Refused: answer now. A refused WRITE's payload (up to 4 GiB) is discarded as it comes.
      if (request.type === NBD_CMD_WRITE) {
        this.#receiving = { request, admission: undefined, buffer: undefined, payloadAt: 0 };
      }
      this.#answer(admission, { kind: "failed", failure: admission.failure! });
    } else if (request.type === NBD_CMD_WRITE) {
      this.#receiving = {
        request,
        admission,
        buffer: allocateWriteBuffer(checked, this.#context.pool),
        payloadAt: writePayloadOffset(checked),
      };
    } else {
      this.#run(admission, checked, undefined);
    }
  }

  #onWriteData(event: WriteDataEvent): void {
    const receiving = this.#receiving;
    assert(receiving !== undefined && receiving.request === event.request);
    receiving.buffer?.set(event.data, receiving.payloadAt + event.payloadOffset);
    if (!event.final) return;
    this.#receiving = undefined;
    const { admission } = receiving;
    if (admission !== undefined) this.#run(admission, admission.checked!, receiving.buffer);
  }

  #run(admission: Admission, checked: CheckedRequest, buffer: Uint8Array | undefined): void {
    const pool = this.#context.pool;
    const startedMs = this.#metrics === undefined ? 0 : performance.now();
    runRequest(this.#session!, checked, pool, buffer).then(
      (outcome) => {
        // The device holds no reference to a WRITE's buffer once its write settled.
        if (buffer !== undefined) pool.give(buffer);
        this.#answer(admission, outcome, startedMs);
      },
      (error: unknown) => {
        this.#log("warn", `internal error serving a request (a bug): ${String(error)}`);
        this.#answer(
          admission,
          { kind: "failed", failure: { errno: NBD_EIO, message: "internal server error" } },
          startedMs,
        );
      },
    );
  }

  // ---- transmission: replies ----------------------------------------------------------------

  /** Queue the reply; `startedMs` (performance.now()) is when it started running, if it ran. */
  #answer(admission: Admission, outcome: Outcome, startedMs?: number): void {
    this.#unanswered--;
    const metrics = this.#metrics;
    if (metrics !== undefined) {
      const { type, length } = admission.request;
      const seconds = startedMs === undefined ? 0 : (performance.now() - startedMs) / 1000;
      metrics.record(type, length, seconds, outcome.kind === "failed" ? outcome.failure.errno : 0);
    }
    const backing = outcome.kind === "data" ? outcome.backing : undefined;
    const loan = outcome.kind === "data" ? outcome.loan : undefined;
    this.#writer.send(this.#encode(admission.request, outcome), () => {
      // The kernel has the bytes now: the READ buffer, or the memory the device lent, may be
      // reused.
      if (backing !== undefined) this.#context.pool.give(backing);
      if (loan !== undefined) this.#session!.export.device.returnLoan?.(loan);
      this.#release(admission);
    });
    if (this.#phase === "draining" && this.#unanswered === 0) this.#closeAfterReplies();
  }

  #encode(request: NbdRequest, outcome: Outcome): Uint8Array[] {
    const session = this.#session!;
    const { cookie } = request;
    switch (outcome.kind) {
      case "done":
        return [simpleHeader(0, cookie)];
      case "failed": {
        const { errno, message } = outcome.failure;
        if (session.structuredReplies) {
          return [encodeErrorChunk(NBD_REPLY_FLAG_DONE, cookie, errno, message)];
        }
        return [simpleHeader(errno, cookie)];
      }
      case "data": {
        const { data } = outcome;
        if (!session.structuredReplies) {
          return data.length === 0 ? [simpleHeader(0, cookie)] : [simpleHeader(0, cookie), data];
        }
        if (data.length === 0) {
          const none = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_BYTES);
          writeNoneChunk(none, 0, cookie);
          return [none];
        }
        const header = Buffer.allocUnsafe(OFFSET_DATA_HEADER_BYTES);
        writeOffsetDataHeader(header, 0, NBD_REPLY_FLAG_DONE, cookie, request.offset, data.length);
        return [header, data];
      }
      case "extents": {
        const chunk = Buffer.allocUnsafe(blockStatusChunkBytes(outcome.extents.length));
        writeBlockStatusChunk(
          chunk,
          0,
          NBD_REPLY_FLAG_DONE,
          cookie,
          session.baseAllocationContextId!,
          outcome.extents,
        );
        return [chunk];
      }
    }
  }

  #release(admission: Admission): void {
    this.#inFlight--;
    this.#inFlightBytes -= admission.costBytes;
    this.#maybeResume();
  }

  /** After a release: admit what was held and read again, if the bounds now allow it. */
  #maybeResume(): void {
    if (this.#pumping || this.#phase !== "transmission" || !this.#readPaused) return;
    if (this.#chunkUnfinished && !this.#pump()) return;
    this.#readPaused = false;
    this.#socket.resume();
  }

  // ---- ending -------------------------------------------------------------------------------

  #onEnd(): void {
    if (this.#phase === "transmission") {
      const clean = this.#decoder!.atMessageBoundary && this.#held === undefined;
      this.#drain(clean ? "client closed" : "client closed in the middle of a request");
    } else if (this.#phase === "handshake" || this.#phase === "tls-handshake") {
      this.#abort("debug", "client closed during the handshake");
    }
  }

  /** Stop reading, answer what was admitted, then close. */
  #drain(reason: string): void {
    if (this.#phase === "draining" || this.#phase === "closed") return;
    this.#log("debug", reason);
    this.#phase = "draining";
    this.#held = undefined;
    const admission = this.#receiving?.admission;
    if (this.#receiving?.buffer !== undefined) this.#context.pool.give(this.#receiving.buffer);
    this.#receiving = undefined;
    if (admission !== undefined) {
      // Its payload will never be complete: never run, never acknowledged.
      this.#unanswered--;
      this.#release(admission);
    }
    if (!this.#readPaused) {
      this.#readPaused = true;
      this.#socket.pause();
    }
    if (this.#unanswered === 0) this.#closeAfterReplies();
  }

  /** End the socket once queued replies are flushed, then release it. */
  #closeAfterReplies(): void {
    if (this.#phase !== "closed") this.#phase = "draining";
    const socket = this.#socket;
    if (socket.destroyed) return;
    socket.end(() => socket.destroy());
  }

  /** Close at once (a violation, or a timeout); running requests finish unanswered. */
  #abort(level: "debug" | "warn", reason: string): void {
    this.#log(level, `closing: ${reason}`);
    this.#phase = "closed";
    this.#socket.destroy();
  }

  #log(level: "debug" | "warn", line: string): void {
    this.#logger[level](line);
  }
}

function simpleHeader(errno: number, cookie: bigint): Uint8Array {
  const header = Buffer.allocUnsafe(SIMPLE_REPLY_HEADER_BYTES);
  writeSimpleReplyHeader(header, 0, errno, cookie);
  return header;
}
