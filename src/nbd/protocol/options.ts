/**
 * Parsing of option payloads (the data after the 16-byte option header) into typed requests.
 *
 * Parsing never throws: a malformed payload of an option we know becomes `{ type: "invalid" }`,
 * which the server answers with NBD_REP_ERR_INVALID (or, for NBD_OPT_EXPORT_NAME, which cannot
 * be answered with an error, by disconnecting). Options we do not parse
 * (NBD_OPT_EXTENDED_HEADERS, anything unknown) become `{ type: "unknown" }` with the raw data, to be
 * answered with NBD_REP_ERR_UNSUP.
 */
import { decodeNbdString, readU16, readU32 } from "./bytes.js";
import {
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_OPT_LIST,
  NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY,
} from "./constants.js";

/** A client option, parsed. Every variant carries the `option` code to echo in replies. */
export type OptionRequest =
  /** NBD_OPT_EXPORT_NAME: enter transmission with this export ("" = default). */
  | { readonly type: "export-name"; readonly option: number; readonly name: string }
  /** NBD_OPT_ABORT: reply NBD_REP_ACK and close. Any data is ignored, as the spec asks. */
  | { readonly type: "abort"; readonly option: number }
  /** NBD_OPT_LIST: one NBD_REP_SERVER per export, then NBD_REP_ACK. */
  | { readonly type: "list"; readonly option: number }
  /** NBD_OPT_STARTTLS: NBD_REP_ACK, then the TLS handshake (or an error, and carry on). */
  | { readonly type: "starttls"; readonly option: number }
  /** NBD_OPT_STRUCTURED_REPLY: NBD_REP_ACK enables structured replies. */
  | { readonly type: "structured-reply"; readonly option: number }
  /**
   * NBD_OPT_INFO / NBD_OPT_GO: export name and the NBD_INFO_* items asked for (in wire order,
   * possibly with unknown values the server must ignore).
   */
  | {
      readonly type: "info" | "go";
      readonly option: number;
      readonly name: string;
      readonly infoRequests: readonly number[];
    }
  /** NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT: export name and query strings. */
  | {
      readonly type: "list-meta-context" | "set-meta-context";
      readonly option: number;
      readonly exportName: string;
      readonly queries: readonly string[];
    }
  /** An option this codec does not parse; reply NBD_REP_ERR_UNSUP. */
  | { readonly type: "unknown"; readonly option: number; readonly data: Uint8Array }
  /** A known option whose payload is malformed; reply NBD_REP_ERR_INVALID with `reason`. */
  | { readonly type: "invalid"; readonly option: number; readonly reason: string };

function invalid(option: number, reason: string): OptionRequest {
  return { type: "invalid", option, reason };
}

/**
 * Parse one option's payload. `data` is only read during the call; strings are decoded, and the
 * `unknown` variant keeps `data` itself (the handshake decoder passes a private copy).
 */
export function parseOptionRequest(option: number, data: Uint8Array): OptionRequest {
  switch (option) {
    case NBD_OPT_EXPORT_NAME: {
      const name = decodeNbdString(data, "export name");
      if (typeof name !== "string") return invalid(option, name.invalid);
      return { type: "export-name", option, name };
    }
    case NBD_OPT_ABORT:
      return { type: "abort", option };
    case NBD_OPT_LIST:
      if (data.length !== 0) return invalid(option, "NBD_OPT_LIST takes no data");
      return { type: "list", option };
    case NBD_OPT_STARTTLS:
      if (data.length !== 0) return invalid(option, "NBD_OPT_STARTTLS takes no data");
      return { type: "starttls", option };
    case NBD_OPT_STRUCTURED_REPLY:
      if (data.length !== 0) return invalid(option, "NBD_OPT_STRUCTURED_REPLY takes no data");
      return { type: "structured-reply", option };
    case NBD_OPT_INFO:
    case NBD_OPT_GO:
      return parseInfoOrGo(option, data);
    case NBD_OPT_LIST_META_CONTEXT:
    case NBD_OPT_SET_META_CONTEXT:
      return parseMetaContext(option, data);
    default:
      return { type: "unknown", option, data };
  }
}

function parseInfoOrGo(option: number, data: Uint8Array): OptionRequest {
  // u32 name length, name, u16 count, count × u16.
  if (data.length < 6) return invalid(option, `payload of ${data.length} bytes is under 6`);
  const nameLength = readU32(data, 0);
  if (nameLength > data.length - 6) {
    return invalid(option, `name length ${nameLength} exceeds the payload`);
  }
  const name = decodeNbdString(data.subarray(4, 4 + nameLength), "export name");
  if (typeof name !== "string") return invalid(option, name.invalid);
  let p = 4 + nameLength;
  const count = readU16(data, p);
  p += 2;
  if (data.length - p !== 2 * count) {
    return invalid(
      option,
      `${count} info requests need ${2 * count} bytes, got ${data.length - p}`,
    );
  }
  const infoRequests: number[] = [];
  for (let i = 0; i < count; i++, p += 2) infoRequests.push(readU16(data, p));
  return { type: option === NBD_OPT_GO ? "go" : "info", option, name, infoRequests };
}

function parseMetaContext(option: number, data: Uint8Array): OptionRequest {
  // u32 name length, name, u32 query count, count × (u32 length, query).
  if (data.length < 8) return invalid(option, `payload of ${data.length} bytes is under 8`);
  const nameLength = readU32(data, 0);
  if (nameLength > data.length - 8) {
    return invalid(option, `name length ${nameLength} exceeds the payload`);
  }
  const exportName = decodeNbdString(data.subarray(4, 4 + nameLength), "export name");
  if (typeof exportName !== "string") return invalid(option, exportName.invalid);
  let p = 4 + nameLength;
  const count = readU32(data, p);
  p += 4;
  // Each query takes at least 4 bytes, so the loop below is bounded by the payload size.
  if (count > (data.length - p) / 4) {
    return invalid(option, `${count} queries cannot fit in ${data.length - p} bytes`);
  }
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    if (data.length - p < 4) return invalid(option, `query ${i} is truncated`);
    const queryLength = readU32(data, p);
    p += 4;
    if (queryLength > data.length - p) {
      return invalid(option, `query ${i} length ${queryLength} exceeds the payload`);
    }
    const query = decodeNbdString(data.subarray(p, p + queryLength), `query ${i}`);
    if (typeof query !== "string") return invalid(option, query.invalid);
    queries.push(query);
    p += queryLength;
  }
  if (p !== data.length) return invalid(option, `${data.length - p} trailing bytes`);
  const type = option === NBD_OPT_SET_META_CONTEXT ? "set-meta-context" : "list-meta-context";
  return { type, option, exportName, queries };
}
