/**
 * The server's side of the fixed newstyle handshake, as a synchronous state machine: it takes
 * the events of the codec's `HandshakeDecoder` and says what to send and what to do next.
 * No sockets here, so the connection stays a thin pump and this is easy to follow option by
 * option against the spec.
 *
 * - Client flags with a bit we did not offer end the connection (the spec's MUST).
 * - A client that did not set NBD_FLAG_C_FIXED_NEWSTYLE may only send NBD_OPT_EXPORT_NAME.
 * - Unknown options get NBD_REP_ERR_UNSUP and the negotiation carries on; malformed ones
 *   NBD_REP_ERR_INVALID; over-long ones NBD_REP_ERR_TOO_BIG. NBD_OPT_EXPORT_NAME cannot be answered with an error, so a bad or
 *   unknown name there closes the connection.
 * - NBD_OPT_INFO/GO always answer NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE, plus NAME and
 *   DESCRIPTION when asked.
 * - Metadata contexts need structured replies first; the one context is `base:allocation`.
 *   A selection made for one export does not carry over to another.
 * - While the server shuts down, every option but NBD_OPT_ABORT gets NBD_REP_ERR_SHUTDOWN.
 *
 * TLS, in the spec's three modes ({@link TlsMode}):
 * - `off` (NOTLS): NBD_OPT_STARTTLS gets NBD_REP_ERR_POLICY; nothing is ever NBD_REP_ERR_TLS_REQD.
 * - `require` (FORCEDTLS): until TLS is up, every option but NBD_OPT_STARTTLS and NBD_OPT_ABORT
 *   gets NBD_REP_ERR_TLS_REQD (malformed, unknown and over-long ones too), and
 *   NBD_OPT_EXPORT_NAME, which cannot be answered, ends the session. So a plain client never
 *   learns the export list and never reaches data.
 * - `on` (SELECTIVETLS with no TLS-only export): TLS whenever the client asks for it, plain
 *   otherwise; NBD_REP_ERR_TLS_REQD is never sent.
 * - NBD_OPT_STARTTLS with data, or once TLS is up, gets NBD_REP_ERR_INVALID (as nbdkit, the data
 *   check comes first). Otherwise it is acknowledged and the step is `starttls`: the connection
 *   runs the TLS handshake and calls {@link Negotiation.tlsEstablished}, which forgets every option
 *   negotiated before (the spec: nothing from the plain part may be trusted). The client flags
 *   stay, since they are not resent; so does the count of options, which is a limit, not state.
 *   A handshake that fails closes the connection: the acknowledgement has been sent.
 */

import assert from "node:assert/strict";

import {
  encodeExportNameReply,
  encodeRepAck,
  encodeRepError,
  encodeRepInfoBlockSize,
  encodeRepInfoDescription,
  encodeRepInfoExport,
  encodeRepInfoName,
  encodeRepMetaContext,
  encodeRepServer,
  type HandshakeEvent,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_CACHE,
  NBD_FLAG_SEND_DF,
  NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_NAME,
  NBD_META_CONTEXT_BASE_ALLOCATION,
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_STARTTLS,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_POLICY,
  NBD_REP_ERR_SHUTDOWN,
  NBD_REP_ERR_TLS_REQD,
  NBD_REP_ERR_TOO_BIG,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  nameOfOption,
  type OptionRequest,
} from "./protocol.js";
import type { ExportRegistry, NbdExport } from "./exports.js";

/** The context id we give `base:allocation` when a client selects it. */
export const BASE_ALLOCATION_CONTEXT_ID = 1;

/** What the handshake settled, for the transmission phase. */
export interface Negotiated {
  readonly export: NbdExport;
  readonly structuredReplies: boolean;
  /** The id of `base:allocation` if the client selected it, else undefined. */
  readonly baseAllocationContextId: number | undefined;
  readonly transmissionFlags: number;
}

/**
 * Whether the server speaks TLS: `off` never; `on` when the client asks (plain clients are served
 * too); `require`: only clients that upgrade with NBD_OPT_STARTTLS reach an export.
 */
export type TlsMode = "off" | "on" | "require";

/**
 * What to do after an event: send `replies`, then carry on, upgrade the connection to TLS (and
 * then call {@link Negotiation.tlsEstablished}), enter transmission, or close.
 */
export type NegotiationStep =
  | { readonly next: "continue"; readonly replies: readonly Uint8Array[] }
  | { readonly next: "starttls"; readonly replies: readonly Uint8Array[] }
  | {
      readonly next: "transmission";
      readonly replies: readonly Uint8Array[];
      readonly negotiated: Negotiated;
    }
  | { readonly next: "close"; readonly replies: readonly Uint8Array[]; readonly reason: string };

export interface NegotiationOptions {
  readonly exports: ExportRegistry;
  /** True once the server is shutting down. */
  readonly shuttingDown: () => boolean;
  /** Options accepted before the client is deemed abusive and dropped. Default 1024. */
  readonly maxOptions?: number;
  /** Default `off`. */
  readonly tls?: TlsMode;
}

const KNOWN_CLIENT_FLAGS = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;

/** Transmission flags of `e`: only what is true of it. */
export function transmissionFlags(e: NbdExport, structuredReplies: boolean): number {
  let flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_CACHE;
  // Every connection to an export shares its device and cache, so a flush on one covers all.
  flags |= NBD_FLAG_CAN_MULTI_CONN;
  if (e.readOnly) flags |= NBD_FLAG_READ_ONLY;
  else {
    flags |= NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES;
    // Zeroing is always a discard for us, never a slow write of zeros.
    flags |= NBD_FLAG_SEND_FAST_ZERO;
  }
  // A read reply is always one chunk, so "don't fragment" is always honoured.
  if (structuredReplies) flags |= NBD_FLAG_SEND_DF;
  return flags;
}

export class Negotiation {
  readonly #exports: ExportRegistry;
  readonly #shuttingDown: () => boolean;
  readonly #maxOptions: number;
  readonly #tls: TlsMode;
  /** The ack of NBD_OPT_STARTTLS was sent: everything after it is inside TLS. */
  #tlsStarted = false;
  #fixedNewstyle = false;
  #noZeroes = false;
  #options = 0;
  #structuredReplies = false;
  /** The export `base:allocation` was selected for, if it was. */
  #metaExport: NbdExport | undefined;

  constructor(options: NegotiationOptions) {
    this.#exports = options.exports;
    this.#shuttingDown = options.shuttingDown;
    this.#maxOptions = options.maxOptions ?? 1024;
    this.#tls = options.tls ?? "off";
  }

  /**
   * The TLS handshake that followed a `starttls` step succeeded: forget what was negotiated in
   * plain text, and carry on with options (a new `HandshakeDecoder` that expects no flags).
   */
  tlsEstablished(): void {
    assert(this.#tlsStarted, "tlsEstablished() without a starttls step");
    this.#structuredReplies = false;
    this.#metaExport = undefined;
  }

  onEvent(event: HandshakeEvent): NegotiationStep {
    switch (event.kind) {
      case "client-flags": {
        if ((event.flags & ~KNOWN_CLIENT_FLAGS) !== 0) {
          return close(`client flags 0x${event.flags.toString(16)} have bits we did not offer`);
        }
        this.#fixedNewstyle = (event.flags & NBD_FLAG_C_FIXED_NEWSTYLE) !== 0;
        this.#noZeroes = (event.flags & NBD_FLAG_C_NO_ZEROES) !== 0;
        return proceed([]);
      }
      case "option":
        if (++this.#options > this.#maxOptions) {
          return close(`more than ${this.#maxOptions} options`);
        }
        return this.#option(event.request);
      case "option-too-long":
        if (event.option === NBD_OPT_EXPORT_NAME || !this.#fixedNewstyle) {
          return close(`${nameOfOption(event.option)} of ${event.length} bytes is too long`);
        }
        if (this.#tlsRequiredFor(event.option)) return proceed([tlsRequired(event.option)]);
        return proceed([
          encodeRepError(
            event.option,
            NBD_REP_ERR_TOO_BIG,
            `option data of ${event.length} bytes exceeds ${event.maxLength}`,
          ),
        ]);
      case "error":
        return close("malformed option frame");
    }
  }

  #option(request: OptionRequest): NegotiationStep {
    if (!this.#fixedNewstyle && request.type !== "export-name") {
      return close(`client without fixed newstyle sent ${nameOfOption(request.option)}`);
    }
    if (this.#shuttingDown() && request.type !== "abort") {
      if (request.type === "export-name") return close("shutting down");
      return proceed([
        encodeRepError(request.option, NBD_REP_ERR_SHUTDOWN, "the server is shutting down"),
      ]);
    }
    if (this.#tlsRequiredFor(request.option)) {
      if (request.option === NBD_OPT_EXPORT_NAME) {
        return close("NBD_OPT_EXPORT_NAME without TLS, which this server requires");
      }
      return proceed([tlsRequired(request.option)]);
    }
    switch (request.type) {
      case "export-name": {
        const e = this.#exports.find(request.name);
        if (e === undefined) return close(`no export named "${request.name}"`);
        const negotiated = this.#negotiated(e);
        return {
          next: "transmission",
          replies: [
            encodeExportNameReply(e.sizeBytes, negotiated.transmissionFlags, this.#noZeroes),
          ],
          negotiated,
        };
      }
      case "abort":
        return { next: "close", replies: [encodeRepAck(request.option)], reason: "client aborted" };
      case "list":
        return proceed([
          ...this.#exports.all.map((e) => encodeRepServer(request.option, e.name, e.description)),
          encodeRepAck(request.option),
        ]);
      case "structured-reply":
        this.#structuredReplies = true;
        return proceed([encodeRepAck(request.option)]);
      case "info":
      case "go":
        return this.#infoOrGo(request.type, request.option, request.name, request.infoRequests);
      case "list-meta-context":
      case "set-meta-context":
        return this.#metaContext(request.type, request.option, request.exportName, request.queries);
      case "starttls":
        return this.#startTls(request.option);
      case "unknown":
        return proceed([
          encodeRepError(
            request.option,
            NBD_REP_ERR_UNSUP,
            `${nameOfOption(request.option)} is not supported`,
          ),
        ]);
      case "invalid":
        if (request.option === NBD_OPT_EXPORT_NAME) return close(request.reason);
        return proceed([encodeRepError(request.option, NBD_REP_ERR_INVALID, request.reason)]);
    }
  }

  /** Under `require`, before TLS: every option but NBD_OPT_STARTTLS and NBD_OPT_ABORT. */
  #tlsRequiredFor(option: number): boolean {
    return (
      this.#tls === "require" &&
      !this.#tlsStarted &&
      option !== NBD_OPT_STARTTLS &&
      option !== NBD_OPT_ABORT
    );
  }

  /** NBD_OPT_STARTTLS without data (with data, it is `invalid`: NBD_REP_ERR_INVALID). */
  #startTls(option: number): NegotiationStep {
    if (this.#tls === "off") {
      return proceed([encodeRepError(option, NBD_REP_ERR_POLICY, "this server does not do TLS")]);
    }
    if (this.#tlsStarted) {
      return proceed([encodeRepError(option, NBD_REP_ERR_INVALID, "TLS is already up")]);
    }
    this.#tlsStarted = true;
    return { next: "starttls", replies: [encodeRepAck(option)] };
  }

  #infoOrGo(
    type: "info" | "go",
    option: number,
    name: string,
    infoRequests: readonly number[],
  ): NegotiationStep {
    const e = this.#exports.find(name);
    if (e === undefined) {
      return proceed([encodeRepError(option, NBD_REP_ERR_UNKNOWN, `no export named "${name}"`)]);
    }
    const negotiated = this.#negotiated(e);
    const asked = new Set(infoRequests);
    const replies = [encodeRepInfoExport(option, e.sizeBytes, negotiated.transmissionFlags)];
    if (asked.has(NBD_INFO_NAME)) replies.push(encodeRepInfoName(option, e.name));
    if (asked.has(NBD_INFO_DESCRIPTION) && e.description !== "") {
      replies.push(encodeRepInfoDescription(option, e.description));
    }
    // Sent whether asked or not: a client that did not ask is told minimum 1, which is true.
    const sizes = e.blockSizes(asked.has(NBD_INFO_BLOCK_SIZE));
    replies.push(
      encodeRepInfoBlockSize(option, sizes.minimumBytes, sizes.preferredBytes, sizes.maximumBytes),
    );
    replies.push(encodeRepAck(option));
    if (type === "info") return proceed(replies);
    return { next: "transmission", replies, negotiated };
  }

  #metaContext(
    type: "list-meta-context" | "set-meta-context",
    option: number,
    exportName: string,
    queries: readonly string[],
  ): NegotiationStep {
    if (!this.#structuredReplies) {
      return proceed([
        encodeRepError(option, NBD_REP_ERR_INVALID, "negotiate structured replies first"),
      ]);
    }
    const e = this.#exports.find(exportName);
    if (e === undefined) {
      return proceed([
        encodeRepError(option, NBD_REP_ERR_UNKNOWN, `no export named "${exportName}"`),
      ]);
    }
    const name = NBD_META_CONTEXT_BASE_ALLOCATION;
    if (type === "list-meta-context") {
      // No query lists everything; "base:" lists the base namespace, which is base:allocation.
      const matches = queries.length === 0 || queries.some((q) => q === name || q === "base:");
      return proceed([
        ...(matches ? [encodeRepMetaContext(option, 0, name)] : []),
        encodeRepAck(option),
      ]);
    }
    const selected = queries.includes(name);
    this.#metaExport = selected ? e : undefined;
    return proceed([
      ...(selected ? [encodeRepMetaContext(option, BASE_ALLOCATION_CONTEXT_ID, name)] : []),
      encodeRepAck(option),
    ]);
  }

  #negotiated(e: NbdExport): Negotiated {
    return {
      export: e,
      structuredReplies: this.#structuredReplies,
      baseAllocationContextId:
        this.#structuredReplies && this.#metaExport === e ? BASE_ALLOCATION_CONTEXT_ID : undefined,
      transmissionFlags: transmissionFlags(e, this.#structuredReplies),
    };
  }
}

function proceed(replies: readonly Uint8Array[]): NegotiationStep {
  return { next: "continue", replies };
}

function tlsRequired(option: number): Uint8Array {
  return encodeRepError(
    option,
    NBD_REP_ERR_TLS_REQD,
    `${nameOfOption(option)} needs TLS: this server requires NBD_OPT_STARTTLS first`,
  );
}

function close(reason: string): NegotiationStep {
  return { next: "close", replies: [], reason };
}
