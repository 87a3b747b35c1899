/**
 * The NBD wire codec: pure functions and state machines over Uint8Array, no sockets, no I/O,
 * nothing else of ours. Constants carry the spec's names (NetworkBlockDevice `doc/proto.md`).
 *
 * Design:
 * - Encoders are for what the server sends. Handshake messages are cold and come back as fresh
 *   arrays (`encodeRep*`, `encodeGreeting`, `encodeExportNameReply`). Transmission headers are hot:
 *   `write*(dst, at, ...)` fills a caller buffer and returns the end position; `encode*` wraps it
 *   with a fresh exactly-sized array. Read data is never copied into a header: send the header,
 *   then the data as its own buffer (cork + two writes = one writev).
 * - Decoders are for what the client sends. Both are pull-style state machines: `push(chunk)`,
 *   then `next()` until null. They accept chunks split at any byte, never throw on client input,
 *   and report framing violations as a typed {@link ProtocolError} event, after which they stop.
 *   {@link HandshakeDecoder} yields client flags and parsed options; an option longer than its
 *   limit (64 KiB default) is reported and discarded, never buffered. {@link TransmissionDecoder}
 *   parses request headers in place (a header split across chunks goes to a fixed 28-byte buffer)
 *   and hands WRITE payloads out as views of the pushed chunk, valid until the next push, so the
 *   server copies each byte once, into a buffer it sized after checking the length itself.
 *   Nothing is ever allocated from a client-claimed length in the transmission phase.
 * - Numbers: 32-bit-and-under fields are numbers. Cookies are bigint (opaque, echoed exactly).
 *   Offsets and sizes are numbers: exact to 2^53 - 1; a wire offset above that decodes to a number
 *   ≥ 2^53 (rounded, never smaller), so the server's bounds check rejects it. The 64-bit magics
 *   are bigints.
 *
 * Client-side encoders and server-message parsers live in `./protocol/client.js`, for tests and
 * test clients; they are not re-exported here.
 */
export * from "./protocol/constants.js";
export * from "./protocol/encode-handshake.js";
export * from "./protocol/encode-transmission.js";
export * from "./protocol/handshake-decoder.js";
export * from "./protocol/options.js";
export * from "./protocol/protocol-error.js";
export * from "./protocol/transmission-decoder.js";
