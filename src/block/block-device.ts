/**
 * The block device contract: MirageOS's `Mirage_block.S`, in TypeScript.
 *
 * This module holds the interface, its result and error values, and the pretty-printers. It does
 * no I/O. Every implementation (the S3-backed device, the validating wrapper) and every consumer
 * (the NBD server, the CLI) speaks only this.
 *
 * ## Sectors and buffers
 *
 * A device is `sizeSectors` sectors of `sectorSize` bytes. `read` and `write` take a starting
 * sector and a list of buffers; the buffers are laid end to end from that sector, so the list
 * `[a, b]` at sector `s` covers sectors `s .. s + (a.length + b.length) / sectorSize`. Each
 * buffer's length must be a whole number of sectors; the list may be empty (a no-op).
 *
 * **Buffer ownership.** The device does not copy a buffer before the operation starts and may
 * touch it at any point until the returned promise settles. The caller must not read a buffer
 * passed to `read`, nor modify a buffer passed to `write`, until then. After it settles the
 * device holds no reference to the caller's buffers.
 *
 * ## Results
 *
 * Expected failures are values, not exceptions: every operation resolves to a {@link Result}.
 * A thrown exception from a device means a bug in s3blk.
 *
 * **Partial failure.** A failed `read` leaves the caller's buffers with unspecified contents. A
 * failed `write` or `discard` leaves each sector of its range holding either its old contents or
 * its new contents, never anything else; which one is unspecified until a later `flush` succeeds.
 *
 * ## Durability
 *
 * `write` is acknowledged once the data is in the device's write-back cache: it is visible to
 * every later `read`, but it is not yet durable. A write is **durable** once it is stored in the
 * object store, so that it survives a crash of this process (and, for S3, of this machine).
 * `flush` resolves `Ok` only when every write and discard acknowledged before `flush` was called
 * is durable. A write with `{ fua: true }` is durable when it resolves `Ok`.
 */

/** A sector number. A `number` must be a safe integer; a `bigint` may use the full 64 bits. */
export type Sector = bigint | number;

/** What `getInfo` tells: `Mirage_block.info`. */
export interface Info {
  /** False when the device was opened read-only: every write answers `Is_read_only`. */
  readonly readWrite: boolean;
  /** Bytes in a sector: 512 or 4096. */
  readonly sectorSize: number;
  /** The device's size in sectors. */
  readonly sizeSectors: bigint;
}

/** An operation's outcome: `Ok`, or an error value. */
export type Result<T, E> =
  { readonly ok: true; readonly value: T } | { readonly ok: false; readonly error: E };

/** The operation is not supported by this device. */
export interface Unimplemented {
  readonly kind: "Unimplemented";
}

/** The device was disconnected; nothing more can be done with it. */
export interface Disconnected {
  readonly kind: "Disconnected";
}

/** A write, discard or flush on a device opened read-only. */
export interface IsReadOnly {
  readonly kind: "Is_read_only";
}

/**
 * An I/O error: the operation failed and `cause` says why. Invalid arguments (an out-of-range
 * sector, a buffer that is not a whole number of sectors) are reported as I/O errors whose cause
 * is an {@link InvalidArgumentError}.
 */
export interface IoError {
  readonly kind: "Io";
  readonly cause: Error;
}

/** Errors of `read`: `Mirage_block.error`. */
export type BlockError = Unimplemented | Disconnected | IoError;

/** Errors of `write`, `discard` and `flush`: `Mirage_block.write_error`. */
export type WriteError = BlockError | IsReadOnly;

/** Thrown by nobody: the cause of an `Io` error for a request that breaks the contract. */
export class InvalidArgumentError extends Error {
  override readonly name = "InvalidArgumentError";
}

/** Options of a single write. */
export interface WriteOptions {
  /** Force unit access: resolve only once this write is durable. Default false. */
  readonly fua?: boolean;
}

/** The block device: `Mirage_block.S` plus `flush` and `discard`. */
export interface BlockDevice {
  /** The device's characteristics. They do not change while it is connected. */
  getInfo(): Promise<Info>;

  /**
   * Fill `buffers`, laid end to end, with the device's contents from `sectorStart`.
   * See the module comment for buffer ownership and partial failure.
   */
  read(sectorStart: Sector, buffers: readonly Uint8Array[]): Promise<Result<void, BlockError>>;

  /**
   * Write `buffers`, laid end to end, to the device from `sectorStart`. Resolves once the data is
   * readable back (or, with `fua`, once it is durable).
   */
  write(
    sectorStart: Sector,
    buffers: readonly Uint8Array[],
    options?: WriteOptions,
  ): Promise<Result<void, WriteError>>;

  /** Make every write and discard acknowledged before this call durable. */
  flush(): Promise<Result<void, WriteError>>;

  /**
   * Forget the contents of `sectors` sectors from `sectorStart`: afterwards the range reads as
   * zeros, and whole chunks in it take no space in the store.
   */
  discard(sectorStart: Sector, sectors: Sector): Promise<Result<void, WriteError>>;

  /**
   * Flush what is dirty, then release every resource. After it, every operation answers
   * `Disconnected`. Resolves with the flush's error if dirty data could not be made durable:
   * that data is then lost.
   */
  disconnect(): Promise<Result<void, WriteError>>;
}

export const ok: Result<void, never> = Object.freeze({ ok: true, value: undefined });

/** Build an error result. */
export function err<E>(error: E): Result<never, E> {
  return { ok: false, error };
}

export const unimplemented: Unimplemented = Object.freeze({ kind: "Unimplemented" });
export const disconnected: Disconnected = Object.freeze({ kind: "Disconnected" });
export const isReadOnly: IsReadOnly = Object.freeze({ kind: "Is_read_only" });

/** An I/O error value carrying `cause`. */
export function ioError(cause: unknown): IoError {
  return { kind: "Io", cause: cause instanceof Error ? cause : new Error(String(cause)) };
}

/** Pretty-print a read error: `Mirage_block.pp_error`. */
export function ppError(error: BlockError): string {
  switch (error.kind) {
    case "Unimplemented":
      return "operation not yet implemented";
    case "Disconnected":
      return "a call was made on a disconnected block device";
    case "Io":
      return `I/O error: ${describeCause(error.cause)}`;
  }
}

/** Pretty-print a write error: `Mirage_block.pp_write_error`. */
export function ppWriteError(error: WriteError): string {
  return error.kind === "Is_read_only" ? "attempted to write to a read-only disk" : ppError(error);
}

function describeCause(cause: Error): string {
  const inner = cause.cause instanceof Error ? `: ${describeCause(cause.cause)}` : "";
  return `${cause.message}${inner}`;
}
