/**
 * NBD protocol constants, named exactly as in the NetworkBlockDevice `doc/proto.md` spec.
 *
 * 32-bit and smaller values are plain numbers (unsigned, as sent on the wire). The three 64-bit
 * handshake magics are bigints; the decoders compare them without allocating.
 */

// ---- Magic numbers ----------------------------------------------------------------------------

/** ASCII "NBDMAGIC" (`INIT_PASSWD`), first 8 bytes the server sends. */
export const NBDMAGIC = 0x4e42444d41474943n;
/** ASCII "IHAVEOPT": newstyle greeting magic, and the magic opening every client option. */
export const IHAVEOPT = 0x49484156454f5054n;
/** Oldstyle `cliserv_magic`; listed for completeness, we never speak oldstyle. */
export const NBD_CLISERV_MAGIC = 0x00420281861253n;
/** Magic opening every fixed-newstyle option reply. */
export const NBD_REP_MAGIC = 0x3e889045565a9n;
/** Magic opening every transmission request. */
export const NBD_REQUEST_MAGIC = 0x25609513;
/** Magic opening a simple reply (formerly `NBD_REPLY_MAGIC`). */
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
/** Magic opening a structured reply chunk. */
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;

// ---- Handshake flags (server, 16 bits) --------------------------------------------------------

export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_NO_ZEROES = 1 << 1;

// ---- Client flags (32 bits) -------------------------------------------------------------------

export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;

// ---- Transmission flags (16 bits) -------------------------------------------------------------

export const NBD_FLAG_HAS_FLAGS = 1 << 0;
export const NBD_FLAG_READ_ONLY = 1 << 1;
export const NBD_FLAG_SEND_FLUSH = 1 << 2;
export const NBD_FLAG_SEND_FUA = 1 << 3;
export const NBD_FLAG_ROTATIONAL = 1 << 4;
export const NBD_FLAG_SEND_TRIM = 1 << 5;
export const NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;
export const NBD_FLAG_SEND_DF = 1 << 7;
export const NBD_FLAG_CAN_MULTI_CONN = 1 << 8;
export const NBD_FLAG_SEND_CACHE = 1 << 10;
export const NBD_FLAG_SEND_FAST_ZERO = 1 << 11;

// ---- Options ----------------------------------------------------------------------------------

export const NBD_OPT_EXPORT_NAME = 1;
export const NBD_OPT_ABORT = 2;
export const NBD_OPT_LIST = 3;
export const NBD_OPT_STARTTLS = 5;
export const NBD_OPT_INFO = 6;
export const NBD_OPT_GO = 7;
export const NBD_OPT_STRUCTURED_REPLY = 8;
export const NBD_OPT_LIST_META_CONTEXT = 9;
export const NBD_OPT_SET_META_CONTEXT = 10;
/** Defined by the experimental EXTENDED_HEADERS extension; we answer it with ERR_UNSUP. */
export const NBD_OPT_EXTENDED_HEADERS = 11;

// ---- Option reply types -----------------------------------------------------------------------

export const NBD_REP_ACK = 1;
export const NBD_REP_SERVER = 2;
export const NBD_REP_INFO = 3;
export const NBD_REP_META_CONTEXT = 4;
/** Bit 31 marks an error reply type. */
export const NBD_REP_FLAG_ERROR = 0x80000000;
export const NBD_REP_ERR_UNSUP = 0x80000001;
export const NBD_REP_ERR_POLICY = 0x80000002;
export const NBD_REP_ERR_INVALID = 0x80000003;
export const NBD_REP_ERR_PLATFORM = 0x80000004;
export const NBD_REP_ERR_TLS_REQD = 0x80000005;
export const NBD_REP_ERR_UNKNOWN = 0x80000006;
export const NBD_REP_ERR_SHUTDOWN = 0x80000007;
export const NBD_REP_ERR_BLOCK_SIZE_REQD = 0x80000008;
export const NBD_REP_ERR_TOO_BIG = 0x80000009;
export const NBD_REP_ERR_EXT_HEADER_REQD = 0x8000000a;

// ---- NBD_REP_INFO information types -----------------------------------------------------------

export const NBD_INFO_EXPORT = 0;
export const NBD_INFO_NAME = 1;
export const NBD_INFO_DESCRIPTION = 2;
export const NBD_INFO_BLOCK_SIZE = 3;

// ---- Commands ---------------------------------------------------------------------------------

export const NBD_CMD_READ = 0;
export const NBD_CMD_WRITE = 1;
export const NBD_CMD_DISC = 2;
export const NBD_CMD_FLUSH = 3;
export const NBD_CMD_TRIM = 4;
export const NBD_CMD_CACHE = 5;
export const NBD_CMD_WRITE_ZEROES = 6;
export const NBD_CMD_BLOCK_STATUS = 7;

// ---- Command flags (16 bits) ------------------------------------------------------------------

export const NBD_CMD_FLAG_FUA = 1 << 0;
export const NBD_CMD_FLAG_NO_HOLE = 1 << 1;
export const NBD_CMD_FLAG_DF = 1 << 2;
export const NBD_CMD_FLAG_REQ_ONE = 1 << 3;
export const NBD_CMD_FLAG_FAST_ZERO = 1 << 4;

// ---- Structured replies -----------------------------------------------------------------------

export const NBD_REPLY_FLAG_DONE = 1 << 0;

export const NBD_REPLY_TYPE_NONE = 0;
export const NBD_REPLY_TYPE_OFFSET_DATA = 1;
export const NBD_REPLY_TYPE_OFFSET_HOLE = 2;
export const NBD_REPLY_TYPE_BLOCK_STATUS = 5;
/** Bit 15 marks an error chunk type. */
export const NBD_REPLY_TYPE_FLAG_ERROR = 0x8000;
export const NBD_REPLY_TYPE_ERROR = 0x8001;
export const NBD_REPLY_TYPE_ERROR_OFFSET = 0x8002;

// ---- base:allocation metadata context ---------------------------------------------------------

/** The one metadata context the spec defines. */
export const NBD_META_CONTEXT_BASE_ALLOCATION = "base:allocation";
export const NBD_STATE_HOLE = 1 << 0;
export const NBD_STATE_ZERO = 1 << 1;

// ---- Error values (simple reply `error`, structured error chunks) ------------------------------

export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_ENOMEM = 12;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
export const NBD_EOVERFLOW = 75;
export const NBD_ENOTSUP = 95;
export const NBD_ESHUTDOWN = 108;

// ---- Sizes ------------------------------------------------------------------------------------

/** Longest string (export name, message, query) the spec allows, in UTF-8 bytes. */
export const NBD_MAX_STRING_BYTES = 4096;
/** NBDMAGIC + IHAVEOPT + 16-bit handshake flags. */
export const GREETING_BYTES = 18;
/** Client flags, sent once after the greeting. */
export const CLIENT_FLAGS_BYTES = 4;
/** IHAVEOPT + option + length. */
export const OPTION_HEADER_BYTES = 16;
/** NBD_REP_MAGIC + option + reply type + length. */
export const OPTION_REPLY_HEADER_BYTES = 20;
/** The reserved zeroes after an NBD_OPT_EXPORT_NAME reply unless NO_ZEROES was negotiated. */
export const EXPORT_NAME_REPLY_ZEROES_BYTES = 124;
/** Magic, flags, type, cookie, offset, length. */
export const REQUEST_HEADER_BYTES = 28;
/** Magic, error, cookie. */
export const SIMPLE_REPLY_HEADER_BYTES = 16;
/** Magic, flags, type, cookie, length. */
export const STRUCTURED_REPLY_HEADER_BYTES = 20;
/** Structured header + the 64-bit offset that opens an OFFSET_DATA payload. */
export const OFFSET_DATA_HEADER_BYTES = 28;
/** A whole OFFSET_HOLE chunk: header + offset + hole size. */
export const OFFSET_HOLE_CHUNK_BYTES = 32;

const OPTION_NAMES: ReadonlyMap<number, string> = new Map([
  [NBD_OPT_EXPORT_NAME, "NBD_OPT_EXPORT_NAME"],
  [NBD_OPT_ABORT, "NBD_OPT_ABORT"],
  [NBD_OPT_LIST, "NBD_OPT_LIST"],
  [NBD_OPT_STARTTLS, "NBD_OPT_STARTTLS"],
  [NBD_OPT_INFO, "NBD_OPT_INFO"],
  [NBD_OPT_GO, "NBD_OPT_GO"],
  [NBD_OPT_STRUCTURED_REPLY, "NBD_OPT_STRUCTURED_REPLY"],
  [NBD_OPT_LIST_META_CONTEXT, "NBD_OPT_LIST_META_CONTEXT"],
  [NBD_OPT_SET_META_CONTEXT, "NBD_OPT_SET_META_CONTEXT"],
  [NBD_OPT_EXTENDED_HEADERS, "NBD_OPT_EXTENDED_HEADERS"],
]);

/** The spec's name of an option code, for messages: `NBD_OPT_GO`, or `option 0x7abc`. */
export function nameOfOption(option: number): string {
  return OPTION_NAMES.get(option) ?? `option 0x${option.toString(16)}`;
}

const COMMAND_NAMES: ReadonlyMap<number, string> = new Map([
  [NBD_CMD_READ, "NBD_CMD_READ"],
  [NBD_CMD_WRITE, "NBD_CMD_WRITE"],
  [NBD_CMD_DISC, "NBD_CMD_DISC"],
  [NBD_CMD_FLUSH, "NBD_CMD_FLUSH"],
  [NBD_CMD_TRIM, "NBD_CMD_TRIM"],
  [NBD_CMD_CACHE, "NBD_CMD_CACHE"],
  [NBD_CMD_WRITE_ZEROES, "NBD_CMD_WRITE_ZEROES"],
  [NBD_CMD_BLOCK_STATUS, "NBD_CMD_BLOCK_STATUS"],
]);

/** The spec's name of a command type, for messages and metrics: `NBD_CMD_READ`, or `command 9`. */
export function nameOfCommand(type: number): string {
  return COMMAND_NAMES.get(type) ?? `command ${type}`;
}

const ERROR_NAMES: ReadonlyMap<number, string> = new Map([
  [NBD_EPERM, "NBD_EPERM"],
  [NBD_EIO, "NBD_EIO"],
  [NBD_ENOMEM, "NBD_ENOMEM"],
  [NBD_EINVAL, "NBD_EINVAL"],
  [NBD_ENOSPC, "NBD_ENOSPC"],
  [NBD_EOVERFLOW, "NBD_EOVERFLOW"],
  [NBD_ENOTSUP, "NBD_ENOTSUP"],
  [NBD_ESHUTDOWN, "NBD_ESHUTDOWN"],
]);

/** The spec's name of an error value: `NBD_EIO`, or `error 42`. */
export function nameOfError(errno: number): string {
  return ERROR_NAMES.get(errno) ?? `error ${errno}`;
}

/** Every error value the spec names, in numeric order. */
export const NBD_ERRORS: readonly number[] = [...ERROR_NAMES.keys()];
