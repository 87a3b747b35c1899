/**
 * The one table that turns a block-device error into an NBD error value, and the error a
 * request gets when it is refused before it reaches the device.
 *
 * The spec (NetworkBlockDevice `doc/proto.md`, "Error values") asks for: NBD_EPERM for a write
 * on a read-only export, NBD_ENOSPC for a write past the end, NBD_EINVAL for a read or trim past
 * the end or a malformed request, NBD_EOVERFLOW for a payload over the maximum we advertise,
 * NBD_ESHUTDOWN while the server is going away, and NBD_EIO for everything that went wrong
 * below. NBD_ENOTSUP is only for a refused NBD_CMD_FLAG_FAST_ZERO, which we never refuse.
 */

import { InvalidArgumentError, type WriteError } from "../block/block-device.js";
import { ppWriteError } from "../block/block-device.js";
import { NBD_EINVAL, NBD_EIO, NBD_EPERM, NBD_ESHUTDOWN } from "./protocol.js";

/** An NBD error to send back: the value, and a message for structured error chunks. */
export interface NbdFailure {
  readonly errno: number;
  readonly message: string;
}

/**
 * Device error → NBD error:
 *
 * | device error                         | NBD error     |
 * |--------------------------------------|---------------|
 * | `Is_read_only`                       | NBD_EPERM     |
 * | `Io` caused by InvalidArgumentError  | NBD_EINVAL    |
 * | `Io` (anything else)                 | NBD_EIO       |
 * | `Disconnected`                       | NBD_ESHUTDOWN |
 * | `Unimplemented`                      | NBD_EINVAL    |
 *
 * `Io` from a bad argument should not happen (requests are checked before they reach the
 * device), but if it does the client did send something the device refused, so EINVAL.
 */
export function nbdFailureOf(error: WriteError): NbdFailure {
  const message = ppWriteError(error);
  switch (error.kind) {
    case "Is_read_only":
      return { errno: NBD_EPERM, message };
    case "Io":
      return {
        errno: error.cause instanceof InvalidArgumentError ? NBD_EINVAL : NBD_EIO,
        message,
      };
    case "Disconnected":
      return { errno: NBD_ESHUTDOWN, message };
    case "Unimplemented":
      return { errno: NBD_EINVAL, message };
  }
}

/** A request refused at the edge, before the device sees it. */
export function refused(errno: number, message: string): NbdFailure {
  return { errno, message };
}
