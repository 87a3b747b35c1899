/**
 * Sends replies on a socket in batches: the first reply of a burst corks the socket and a
 * `process.nextTick` uncorks it, so every reply produced by the same run of callbacks and
 * promise continuations (typically, all the requests of one incoming chunk that were answered
 * from the cache) goes out in one `writev`. Each reply is a list of parts written as they are
 * (a header, then the read data as its own buffer): nothing is concatenated.
 *
 * The parts must not change until their write completes. Callers hand over buffers that nothing
 * else writes (see PERF-NOTES: a reply pointing at memory that can change while the socket is
 * backed up carries the wrong bytes).
 */

import type { Socket } from "node:net";

export class ReplyWriter {
  readonly #socket: Socket;
  #corked = false;
  readonly #uncork = (): void => {
    this.#corked = false;
    this.#socket.uncork();
  };

  constructor(socket: Socket) {
    this.#socket = socket;
  }

  /**
   * Queue `parts` as one reply. `onFlushed` runs once the last part has been handed to the
   * kernel, or at once (synchronously) if the socket can no longer be written.
   */
  send(parts: readonly Uint8Array[], onFlushed?: () => void): void {
    const socket = this.#socket;
    if (parts.length === 0 || socket.destroyed || !socket.writable) {
      onFlushed?.();
      return;
    }
    if (!this.#corked) {
      this.#corked = true;
      socket.cork();
      process.nextTick(this.#uncork);
    }
    const last = parts.length - 1;
    for (let i = 0; i < last; i++) socket.write(parts[i]!);
    if (onFlushed === undefined) socket.write(parts[last]!);
    else socket.write(parts[last]!, () => onFlushed());
  }
}
