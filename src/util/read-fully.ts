/** Reading a file region whole, which `FileHandle.read` does not promise in one call. */

import type { FileHandle } from "node:fs/promises";

/**
 * Fill `into` from byte `position` of `handle`. If the file ends first, throws the error
 * `short` makes of the byte offset where it ended.
 */
export async function readFully(
  handle: FileHandle,
  into: Uint8Array,
  position: number,
  short: (atByte: number) => Error,
): Promise<void> {
  let done = 0;
  while (done < into.byteLength) {
    const { bytesRead } = await handle.read(into, done, into.byteLength - done, position + done);
    if (bytesRead === 0) throw short(position + done);
    done += bytesRead;
  }
}
