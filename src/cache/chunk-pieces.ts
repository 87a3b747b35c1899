/**
 * Splitting a request into the pieces that fall in each chunk, written once for every caller:
 * read and write (an offset and buffers laid end to end), discard, prefetch and the allocation
 * map (an offset and a length).
 *
 * It is on the path of every request, so it allocates nothing per piece: one `ChunkPieces` per
 * request is a cursor whose fields describe the current piece, moved on by `next()`, and
 * `forEachView` hands out views of the caller's buffers for the current piece (one, unless the
 * piece straddles buffers; the buffer itself when it is the whole piece).
 */

const NO_BUFFERS: readonly Uint8Array[] = [];

export class ChunkPieces {
  /** The chunk the current piece is in. */
  index = 0;
  /** Where the current piece starts in its chunk. */
  chunkOffsetBytes = 0;
  /** The current piece's length. */
  lengthBytes = 0;
  /** Where the current piece starts in the request. */
  requestOffsetBytes = 0;

  readonly #chunkSizeBytes: number;
  readonly #offsetBytes: number;
  readonly #requestBytes: number;
  readonly #buffers: readonly Uint8Array[];
  /** The first buffer that may hold the current piece, and where it starts in the request. */
  #bufferIndex = 0;
  #bufferStartBytes = 0;
  /** Where the next piece starts in the request. */
  #nextBytes = 0;

  /**
   * The pieces of `[offsetBytes, +lengthBytes)` of the volume; `buffers`, if given, are the
   * request's data laid end to end (their total length is `lengthBytes`).
   */
  constructor(
    chunkSizeBytes: number,
    offsetBytes: number,
    lengthBytes: number,
    buffers: readonly Uint8Array[] = NO_BUFFERS,
  ) {
    this.#chunkSizeBytes = chunkSizeBytes;
    this.#offsetBytes = offsetBytes;
    this.#requestBytes = lengthBytes;
    this.#buffers = buffers;
  }

  /** The pieces of a request whose data is `buffers`, laid end to end from `offsetBytes`. */
  static ofBuffers(
    chunkSizeBytes: number,
    offsetBytes: number,
    buffers: readonly Uint8Array[],
  ): ChunkPieces {
    let lengthBytes = 0;
    for (const buffer of buffers) lengthBytes += buffer.byteLength;
    return new ChunkPieces(chunkSizeBytes, offsetBytes, lengthBytes, buffers);
  }

  /** The request's length. */
  get requestBytes(): number {
    return this.#requestBytes;
  }

  /** Where the current piece starts in the volume. */
  get volumeOffsetBytes(): number {
    return this.#offsetBytes + this.requestOffsetBytes;
  }

  /** Move to the next piece, in chunk order; false once there is none. */
  next(): boolean {
    const at = this.#nextBytes;
    if (at >= this.#requestBytes) return false;
    const volumeOffsetBytes = this.#offsetBytes + at;
    const index = Math.floor(volumeOffsetBytes / this.#chunkSizeBytes);
    const chunkOffsetBytes = volumeOffsetBytes - index * this.#chunkSizeBytes;
    this.index = index;
    this.chunkOffsetBytes = chunkOffsetBytes;
    this.lengthBytes = Math.min(this.#requestBytes - at, this.#chunkSizeBytes - chunkOffsetBytes);
    this.requestOffsetBytes = at;
    this.#nextBytes = at + this.lengthBytes;
    return true;
  }

  /** Go back to before the first piece. */
  rewind(): void {
    this.#nextBytes = 0;
    this.#bufferIndex = 0;
    this.#bufferStartBytes = 0;
  }

  /**
   * Call `visit` with views of the request's buffers that hold the current piece, in order,
   * with where each starts in the chunk.
   */
  forEachView(visit: (chunkOffsetBytes: number, bytes: Uint8Array) => void): void {
    const start = this.requestOffsetBytes;
    const end = start + this.lengthBytes;
    const buffers = this.#buffers;
    // Pieces come in request order: buffers wholly before this piece are done with.
    let i = this.#bufferIndex;
    let bufferStart = this.#bufferStartBytes;
    while (i < buffers.length && bufferStart + buffers[i]!.byteLength <= start) {
      bufferStart += buffers[i]!.byteLength;
      i++;
    }
    this.#bufferIndex = i;
    this.#bufferStartBytes = bufferStart;
    while (i < buffers.length && bufferStart < end) {
      const buffer = buffers[i]!;
      const from = Math.max(start, bufferStart) - bufferStart;
      const to = Math.min(end, bufferStart + buffer.byteLength) - bufferStart;
      if (to > from) {
        const chunkOffsetBytes = this.chunkOffsetBytes + (bufferStart + from - start);
        visit(
          chunkOffsetBytes,
          from === 0 && to === buffer.byteLength ? buffer : buffer.subarray(from, to),
        );
      }
      bufferStart += buffer.byteLength;
      i++;
    }
  }
}
