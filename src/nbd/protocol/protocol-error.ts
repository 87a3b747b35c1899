/**
 * Fatal framing errors the decoders report. After one, the stream cannot be resynchronised: the
 * server logs it and drops the connection (the spec allows a hard disconnect on a violation of a
 * MUST).
 */
export type ProtocolError =
  /** An option frame did not start with IHAVEOPT. */
  | { readonly code: "bad-option-magic"; readonly magic: bigint }
  /** A transmission request did not start with NBD_REQUEST_MAGIC. */
  | { readonly code: "bad-request-magic"; readonly magic: number };

/** One line for logs. */
export function describeProtocolError(e: ProtocolError): string {
  switch (e.code) {
    case "bad-option-magic":
      return `option frame has magic 0x${e.magic.toString(16).padStart(16, "0")}, not IHAVEOPT`;
    case "bad-request-magic":
      return `request has magic 0x${e.magic.toString(16).padStart(8, "0")}, not NBD_REQUEST_MAGIC`;
  }
}
