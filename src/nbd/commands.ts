/**
 * Transmission-phase commands: check a request at the edge, then run it against the export's
 * device. No sockets here; the connection decides when a request may start and how its outcome
 * is framed (simple or structured reply).
 *
 * ## Checks, in order (cf. nbdkit `server/protocol.c` validate_request)
 *
 * 1. Unknown command → NBD_EINVAL.
 * 2. A modifying command (WRITE, TRIM, WRITE_ZEROES) on a read-only export → NBD_EPERM.
 * 3. Flags: unknown bits, or a flag on a command it does not belong to (NO_HOLE and FAST_ZERO
 *    on WRITE_ZEROES only, DF on READ only and only with structured replies, REQ_ONE on
 *    BLOCK_STATUS only, FUA only where advertised) → NBD_EINVAL.
 * 4. A READ or WRITE payload over {@link MAX_PAYLOAD_BYTES} → NBD_EOVERFLOW. Checked before
 *    anything is allocated: a 4 GiB WRITE header costs nothing but the bytes we discard.
 * 5. Range: past the end is NBD_ENOSPC for WRITE and WRITE_ZEROES, NBD_EINVAL otherwise; FLUSH
 *    must have offset and length 0.
 * 6. BLOCK_STATUS without structured replies and `base:allocation`, or of length 0 → NBD_EINVAL.
 *
 * ## Unaligned requests
 *
 * We advertise the sector as the minimum block size, but serve any byte range correctly, as
 * clients that did not ask for block sizes may send anything. A READ reads the covering whole
 * sectors and replies with the middle. A WRITE is buffered in a sector-aligned buffer; its edge
 * sectors are read and merged in (read-modify-write) while the export's range lock holds the
 * span exclusively, so that no overlapping write, from any connection, can be lost in between.
 * WRITE_ZEROES zeroes partial edge sectors the same way and discards the whole ones. TRIM only
 * discards the whole sectors inside its range (a trim is advisory).
 *
 * ## Zeroes
 *
 * Our store keeps no all-zero chunk (a chunk that becomes all zeros is deleted), so writing zeros
 * and discarding leave the same stored state; WRITE_ZEROES is therefore a discard, with or
 * without NO_HOLE, and always fast (FAST_ZERO is never refused). Either way the range then reads
 * as zeros.
 */

import {
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_CACHE,
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_EINVAL,
  NBD_ENOSPC,
  NBD_EOVERFLOW,
  NBD_EPERM,
  NBD_FLAG_SEND_FUA,
  NBD_STATE_HOLE,
  NBD_STATE_ZERO,
  type BlockStatusExtent,
  type NbdRequest,
} from "./protocol.js";
import {
  type BlockError,
  type Result,
  type WriteError,
  type WriteOptions,
} from "../block/block-device.js";
import { nbdFailureOf, refused, type NbdFailure } from "./errors.js";
import { MAX_PAYLOAD_BYTES, type NbdExport } from "./exports.js";
import type { BufferPool } from "./buffer-pool.js";
import type { RangeHold } from "./range-lock.js";

/** NBD_CMD_CACHE warms at most this much per request (the command is advisory). */
export const MAX_PREFETCH_BYTES = 64 * 1024 * 1024;

/** NBD_CMD_BLOCK_STATUS answers at most this many extents; the client asks again for the rest. */
export const MAX_BLOCK_STATUS_EXTENTS = 4096;

const KNOWN_FLAGS =
  NBD_CMD_FLAG_FUA |
  NBD_CMD_FLAG_NO_HOLE |
  NBD_CMD_FLAG_DF |
  NBD_CMD_FLAG_REQ_ONE |
  NBD_CMD_FLAG_FAST_ZERO;

/** What the transmission phase agreed on, as the checks need it. */
export interface Session {
  readonly export: NbdExport;
  readonly structuredReplies: boolean;
  readonly baseAllocationContextId: number | undefined;
  readonly transmissionFlags: number;
}

/** A request that passed the checks, with its sector-aligned span. */
export interface CheckedRequest {
  readonly request: NbdRequest;
  /** First byte of the whole sectors covering the request. */
  readonly spanStartBytes: number;
  /** Bytes of those whole sectors (0 for a zero-length request). */
  readonly spanBytes: number;
}

/** How a request ended. */
export type Outcome =
  | { readonly kind: "done" }
  /**
   * READ: the data to send: a view of `backing`, a buffer nobody else writes until the caller
   * gives it back to the pool (once the socket no longer needs it); or a view of `loan`, memory
   * the device lent, which it does not write until the caller returns it (`returnLoan`, once
   * the socket no longer needs it).
   */
  | {
      readonly kind: "data";
      readonly data: Uint8Array;
      readonly backing?: Uint8Array;
      readonly loan?: Uint8Array;
    }
  | { readonly kind: "extents"; readonly extents: readonly BlockStatusExtent[] }
  | { readonly kind: "failed"; readonly failure: NbdFailure };

const DONE: Outcome = Object.freeze({ kind: "done" });

function failed(failure: NbdFailure): Outcome {
  return { kind: "failed", failure };
}

/** The sector-aligned span covering `[offset, +length)`. */
export function alignedSpan(
  offsetBytes: number,
  lengthBytes: number,
  sectorSize: number,
): { spanStartBytes: number; spanBytes: number } {
  if (lengthBytes === 0) return { spanStartBytes: offsetBytes, spanBytes: 0 };
  const start = Math.floor(offsetBytes / sectorSize) * sectorSize;
  const end = Math.ceil((offsetBytes + lengthBytes) / sectorSize) * sectorSize;
  return { spanStartBytes: start, spanBytes: end - start };
}

/** Check `request` (not NBD_CMD_DISC, which the connection handles) against the session. */
export function checkRequest(session: Session, request: NbdRequest): CheckedRequest | NbdFailure {
  const e = session.export;
  const { type, flags, offset, length } = request;
  const modifies = type === NBD_CMD_WRITE || type === NBD_CMD_TRIM || type === NBD_CMD_WRITE_ZEROES;
  switch (type) {
    case NBD_CMD_READ:
    case NBD_CMD_WRITE:
    case NBD_CMD_FLUSH:
    case NBD_CMD_TRIM:
    case NBD_CMD_CACHE:
    case NBD_CMD_WRITE_ZEROES:
    case NBD_CMD_BLOCK_STATUS:
      break;
    default:
      return refused(NBD_EINVAL, `unknown command ${type}`);
  }
  if (modifies && e.readOnly) return refused(NBD_EPERM, `export "${e.name}" is read-only`);

  if ((flags & ~KNOWN_FLAGS) !== 0) {
    return refused(NBD_EINVAL, `unknown command flags 0x${flags.toString(16)}`);
  }
  if ((flags & (NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO)) !== 0) {
    if (type !== NBD_CMD_WRITE_ZEROES) {
      return refused(NBD_EINVAL, "NO_HOLE and FAST_ZERO are for WRITE_ZEROES only");
    }
  }
  if ((flags & NBD_CMD_FLAG_DF) !== 0 && (type !== NBD_CMD_READ || !session.structuredReplies)) {
    return refused(NBD_EINVAL, "DF is for READ with structured replies only");
  }
  if ((flags & NBD_CMD_FLAG_REQ_ONE) !== 0 && type !== NBD_CMD_BLOCK_STATUS) {
    return refused(NBD_EINVAL, "REQ_ONE is for BLOCK_STATUS only");
  }
  if ((flags & NBD_CMD_FLAG_FUA) !== 0 && (session.transmissionFlags & NBD_FLAG_SEND_FUA) === 0) {
    return refused(NBD_EINVAL, "FUA was not offered");
  }

  if ((type === NBD_CMD_READ || type === NBD_CMD_WRITE) && length > MAX_PAYLOAD_BYTES) {
    return refused(
      NBD_EOVERFLOW,
      `payload of ${length} bytes exceeds the maximum of ${MAX_PAYLOAD_BYTES}`,
    );
  }
  if (type === NBD_CMD_FLUSH) {
    if (offset !== 0 || length !== 0) {
      return refused(NBD_EINVAL, "FLUSH needs offset and length 0");
    }
  } else if (offset + length > e.sizeBytes) {
    return refused(
      type === NBD_CMD_WRITE || type === NBD_CMD_WRITE_ZEROES ? NBD_ENOSPC : NBD_EINVAL,
      `bytes ${offset}..${offset + length} end past the end of the export (${e.sizeBytes} bytes)`,
    );
  }
  if (type === NBD_CMD_BLOCK_STATUS) {
    if (session.baseAllocationContextId === undefined) {
      return refused(NBD_EINVAL, "BLOCK_STATUS needs structured replies and base:allocation");
    }
    if (length === 0) return refused(NBD_EINVAL, "BLOCK_STATUS of length 0");
  }
  return { request, ...alignedSpan(offset, length, e.sectorSize) };
}

/** The bytes a checked request buffers while in flight (its payload, sector-aligned). */
export function payloadCostBytes(checked: CheckedRequest): number {
  const t = checked.request.type;
  return t === NBD_CMD_READ || t === NBD_CMD_WRITE ? checked.spanBytes : 0;
}

/**
 * The buffer a WRITE's payload is received into: the aligned span, with the payload going at
 * {@link writePayloadOffset}. Taken only after the checks bounded its size; give it back to the
 * pool once {@link runRequest} has settled.
 */
export function allocateWriteBuffer(checked: CheckedRequest, pool: BufferPool): Uint8Array {
  return pool.take(checked.spanBytes);
}

/** Where in the write buffer the payload's first byte goes. */
export function writePayloadOffset(checked: CheckedRequest): number {
  return checked.request.offset - checked.spanStartBytes;
}

/**
 * Run a checked request. `writeBuffer` is the filled buffer of a WRITE. Never rejects for an
 * expected failure: those come back as `failed` outcomes. (Not an async function: each request
 * takes the promise of its command as it is, with no extra turn of the microtask queue.)
 */
export function runRequest(
  session: Session,
  checked: CheckedRequest,
  pool: BufferPool,
  writeBuffer?: Uint8Array,
): Promise<Outcome> {
  try {
    return run(session.export, checked, pool, writeBuffer);
  } catch (error) {
    // A bug below (an assertion): the connection answers it as an internal error.
    return Promise.reject(error);
  }
}

function run(
  e: NbdExport,
  checked: CheckedRequest,
  pool: BufferPool,
  writeBuffer: Uint8Array | undefined,
): Promise<Outcome> {
  const { request } = checked;
  const fua = (request.flags & NBD_CMD_FLAG_FUA) !== 0;
  switch (request.type) {
    case NBD_CMD_READ:
      return read(e, checked, pool);
    case NBD_CMD_WRITE:
      if (writeBuffer === undefined) return Promise.reject(new Error("WRITE without its payload"));
      return write(e, checked, writeBuffer, fua);
    case NBD_CMD_FLUSH:
      // Nothing can be dirty on a read-only export; the device would answer Is_read_only.
      return e.readOnly ? Promise.resolve(DONE) : e.device.flush().then(outcomeOf);
    case NBD_CMD_TRIM:
      return trim(e, request.offset, request.length, fua);
    case NBD_CMD_WRITE_ZEROES:
      return writeZeroes(e, checked, fua);
    case NBD_CMD_CACHE:
      return prefetch(e, request.offset, request.length);
    case NBD_CMD_BLOCK_STATUS:
      return Promise.resolve(blockStatus(e, request));
    default:
      return Promise.reject(new Error(`runRequest: unchecked command ${request.type}`));
  }
}

function outcomeOf(result: Result<void, WriteError | BlockError>): Outcome {
  return result.ok ? DONE : failed(nbdFailureOf(result.error));
}

async function read(e: NbdExport, checked: CheckedRequest, pool: BufferPool): Promise<Outcome> {
  const { offset, length } = checked.request;
  if (length === 0) return { kind: "data", data: new Uint8Array(0) };
  const at = offset - checked.spanStartBytes;
  // Memory the device lent does not change until it is returned, however long the reply waits
  // in the socket.
  const lent = e.device.lend?.(
    checked.spanStartBytes / e.sectorSize,
    checked.spanBytes / e.sectorSize,
  );
  if (lent !== undefined) {
    return {
      kind: "data",
      data: at === 0 && length === lent.length ? lent : lent.subarray(at, at + length),
      loan: lent,
    };
  }
  // Else a buffer of this request's own: nothing else writes it until the reply has been handed to
  // the kernel and the connection gives it back, however long it waits in a backed-up socket
  // (no zero-copy trap).
  const span = pool.take(checked.spanBytes);
  const result = await e.device.read(checked.spanStartBytes / e.sectorSize, [span]);
  if (!result.ok) {
    pool.give(span);
    return failed(nbdFailureOf(result.error));
  }
  const data = at === 0 && length === span.length ? span : span.subarray(at, at + length);
  return { kind: "data", data, backing: span };
}

const WITH_FUA = Object.freeze({ fua: true });
const WITHOUT_FUA = Object.freeze({ fua: false });

function write(
  e: NbdExport,
  checked: CheckedRequest,
  buffer: Uint8Array,
  fua: boolean,
): Promise<Outcome> {
  const { offset, length } = checked.request;
  if (length === 0) return Promise.resolve(DONE);
  const start = checked.spanStartBytes;
  const end = start + checked.spanBytes;
  const aligned = start === offset && end === offset + length;
  const options = fua ? WITH_FUA : WITHOUT_FUA;
  const hold = e.locks.tryAcquire(start, end, !aligned);
  if (!aligned || hold === undefined) {
    return writeWhenHeld(e, buffer, { start, end, offset, length }, options, hold);
  }
  // The usual case, an aligned write whose span is free: no wait before the device's write.
  let writing: Promise<Result<void, WriteError>>;
  try {
    writing = e.device.write(start / e.sectorSize, [buffer], options);
  } catch (error) {
    e.locks.release(hold);
    throw error;
  }
  return writing.then(
    (result) => {
      e.locks.release(hold);
      return outcomeOf(result);
    },
    (error: unknown) => {
      e.locks.release(hold);
      throw error;
    },
  );
}

/**
 * `write` of the payload `[offset, +length)` in the aligned span `[start, end)`, once the span
 * is held (`held`, or waited for here): with its edges merged if it is unaligned.
 */
async function writeWhenHeld(
  e: NbdExport,
  buffer: Uint8Array,
  { start, end, offset, length }: { start: number; end: number; offset: number; length: number },
  options: WriteOptions,
  held: RangeHold | undefined,
): Promise<Outcome> {
  const aligned = start === offset && end === offset + length;
  const hold = held ?? (await e.locks.acquire(start, end, !aligned));
  try {
    if (!aligned) {
      const merged = await mergeEdges(e, buffer, start, offset, length);
      if (!merged.ok) return failed(nbdFailureOf(merged.error));
    }
    return outcomeOf(await e.device.write(start / e.sectorSize, [buffer], options));
  } finally {
    e.locks.release(hold);
  }
}

function lock(e: NbdExport, start: number, end: number, exclusive: boolean): Promise<RangeHold> {
  const now = e.locks.tryAcquire(start, end, exclusive);
  return now !== undefined ? Promise.resolve(now) : e.locks.acquire(start, end, exclusive);
}

/**
 * Fill the parts of the edge sectors of `buffer` (the aligned span from `spanStart`) that the
 * payload `[offset, +length)` does not cover, from the device. The caller holds the span.
 */
async function mergeEdges(
  e: NbdExport,
  buffer: Uint8Array,
  spanStart: number,
  offset: number,
  length: number,
): Promise<Result<void, BlockError>> {
  const ss = e.sectorSize;
  const spanEnd = spanStart + buffer.length;
  const payloadEnd = offset + length;
  const headSector = spanStart;
  const tailSector = spanEnd - ss;
  const needHead = offset > spanStart;
  const needTail = payloadEnd < spanEnd;
  const sectors = new Map<number, Uint8Array>();
  if (needHead) sectors.set(headSector, Buffer.allocUnsafe(ss));
  if (needTail && !sectors.has(tailSector)) sectors.set(tailSector, Buffer.allocUnsafe(ss));
  const reads = await Promise.all(
    [...sectors].map(([at, bytes]) => e.device.read(at / ss, [bytes])),
  );
  for (const r of reads) if (!r.ok) return r;
  if (needHead) buffer.set(sectors.get(headSector)!.subarray(0, offset - spanStart), 0);
  if (needTail) {
    buffer.set(sectors.get(tailSector)!.subarray(payloadEnd - tailSector), payloadEnd - spanStart);
  }
  return { ok: true, value: undefined };
}

async function trim(e: NbdExport, offset: number, length: number, fua: boolean): Promise<Outcome> {
  const ss = e.sectorSize;
  const start = Math.ceil(offset / ss) * ss;
  const end = Math.floor((offset + length) / ss) * ss;
  if (end <= start) return DONE;
  const hold = await lock(e, start, end, false);
  try {
    const result = await e.device.discard(start / ss, (end - start) / ss);
    if (!result.ok || !fua) return outcomeOf(result);
  } finally {
    e.locks.release(hold);
  }
  return outcomeOf(await e.device.flush());
}

async function writeZeroes(e: NbdExport, checked: CheckedRequest, fua: boolean): Promise<Outcome> {
  const { offset, length } = checked.request;
  if (length === 0) return DONE;
  const ss = e.sectorSize;
  const spanStart = checked.spanStartBytes;
  const spanEnd = spanStart + checked.spanBytes;
  const end = offset + length;
  const innerStart = Math.ceil(offset / ss) * ss;
  const innerEnd = Math.floor(end / ss) * ss;
  const aligned = spanStart === offset && spanEnd === end;
  const hold = await lock(e, spanStart, spanEnd, !aligned);
  try {
    // Partial edge sectors: read, zero the covered bytes, write back.
    const edges = new Set<number>();
    if (offset > spanStart) edges.add(spanStart);
    if (end < spanEnd) edges.add(spanEnd - ss);
    for (const sectorStart of edges) {
      const bytes = Buffer.allocUnsafe(ss);
      const got = await e.device.read(sectorStart / ss, [bytes]);
      if (!got.ok) return failed(nbdFailureOf(got.error));
      const from = Math.max(offset, sectorStart) - sectorStart;
      bytes.fill(0, from, Math.min(end, sectorStart + ss) - sectorStart);
      const put = await e.device.write(sectorStart / ss, [bytes]);
      if (!put.ok) return failed(nbdFailureOf(put.error));
    }
    if (innerEnd > innerStart) {
      const result = await e.device.discard(innerStart / ss, (innerEnd - innerStart) / ss);
      if (!result.ok) return failed(nbdFailureOf(result.error));
    }
  } finally {
    e.locks.release(hold);
  }
  return fua ? outcomeOf(await e.device.flush()) : DONE;
}

async function prefetch(e: NbdExport, offset: number, length: number): Promise<Outcome> {
  if (length === 0) return DONE;
  const ss = e.sectorSize;
  const { spanStartBytes, spanBytes } = alignedSpan(
    offset,
    Math.min(length, MAX_PREFETCH_BYTES),
    ss,
  );
  return outcomeOf(await e.device.prefetch(spanStartBytes / ss, spanBytes / ss));
}

function blockStatus(e: NbdExport, request: NbdRequest): Outcome {
  const reqOne = (request.flags & NBD_CMD_FLAG_REQ_ONE) !== 0;
  const map = e.device.allocationMap(request.offset, request.length);
  const limit = reqOne ? 1 : MAX_BLOCK_STATUS_EXTENTS;
  const extents: BlockStatusExtent[] = [];
  for (const run of map) {
    if (extents.length === limit) break;
    extents.push({
      length: run.lengthBytes,
      statusFlags: run.allocated ? 0 : NBD_STATE_HOLE | NBD_STATE_ZERO,
    });
  }
  if (extents.length === 0) {
    // The map covers the range; an empty one would be a device bug. Say "data": always safe.
    extents.push({ length: request.length, statusFlags: 0 });
  }
  return { kind: "extents", extents };
}
