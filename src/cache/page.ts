/**
 * One cached chunk: its bytes (or the knowledge that they are all zeros), which sectors of it
 * hold known data, and where it stands in write-back. The state machine is described and driven
 * by page-cache.ts; this class only keeps the facts consistent.
 */

import assert from "node:assert/strict";

export type PageState =
  /** Matches the store (in its valid sectors). May be evicted. */
  | "clean"
  /** Holds writes the store has not got. Never evicted. */
  | "dirty"
  /** An upload of a snapshot is in flight; no write since the snapshot. */
  | "writing"
  /** An upload is in flight and the page was written since its snapshot. */
  | "writing-redirtied";

export class Page {
  state: PageState = "clean";
  /** Bumped by every modification. */
  writeSeq = 0;
  /** The `writeSeq` of the newest image known to be in the store. */
  durableSeq = 0;
  /** The upload queued or in flight for this page, if any. */
  upload: Promise<void> | undefined;
  /** Ranged GETs made for this page: a second miss fetches the whole chunk instead. */
  rangedReads = 0;
  /** A whole-chunk fetch in flight, shared by every reader that needs one. */
  fill: Promise<void> | undefined;

  /** The chunk's bytes; `null` while no sector is held or the page is all zeros. */
  #data: Buffer | null = null;
  /** True when the whole chunk is known to be zeros and `#data` is null. */
  #zero = false;
  /** One byte per sector: 1 where the sector's contents are known. */
  readonly #valid: Uint8Array;
  #validCount = 0;

  constructor(
    readonly index: number,
    readonly chunkSizeBytes: number,
    readonly sectorSize: number,
  ) {
    this.#valid = new Uint8Array(chunkSizeBytes / sectorSize);
  }

  get fullyValid(): boolean {
    return this.#validCount === this.#valid.length;
  }

  /** True when the page is known to be all zeros without looking at its bytes. */
  get isAllZero(): boolean {
    return this.#zero;
  }

  get isDirty(): boolean {
    return this.state !== "clean";
  }

  /** True if every sector in `[offsetBytes, offsetBytes + lengthBytes)` is known. */
  isValid(offsetBytes: number, lengthBytes: number): boolean {
    if (this.fullyValid) return true;
    const first = offsetBytes / this.sectorSize;
    const end = Math.ceil((offsetBytes + lengthBytes) / this.sectorSize);
    for (let s = first; s < end; s++) if (this.#valid[s] === 0) return false;
    return true;
  }

  /** Copy bytes `[offsetBytes, +target.length)` out. They must be valid. */
  copyOut(offsetBytes: number, target: Uint8Array): void {
    assert(this.isValid(offsetBytes, target.byteLength), "copyOut of unknown sectors");
    if (this.#data === null) target.fill(0);
    else target.set(this.#data.subarray(offsetBytes, offsetBytes + target.byteLength));
  }

  /** Apply a write of `source` at `offsetBytes` (sector-aligned). */
  write(offsetBytes: number, source: Uint8Array): void {
    this.#assertAligned(offsetBytes, source.byteLength);
    this.#buffer().set(source, offsetBytes);
    this.#markValid(offsetBytes, source.byteLength);
    this.#modified();
  }

  /** Set `[offsetBytes, +lengthBytes)` to zeros. */
  zero(offsetBytes: number, lengthBytes: number): void {
    this.#assertAligned(offsetBytes, lengthBytes);
    if (offsetBytes === 0 && lengthBytes === this.chunkSizeBytes) {
      this.#data = null;
      this.#zero = true;
      this.#valid.fill(1);
      this.#validCount = this.#valid.length;
    } else {
      if (!this.#zero) this.#buffer().fill(0, offsetBytes, offsetBytes + lengthBytes);
      this.#markValid(offsetBytes, lengthBytes);
    }
    this.#modified();
  }

  /**
   * Fill the sectors of `[offsetBytes, +source.length)` that are not yet known from `source`
   * (bytes fetched from the store); `undefined` means the chunk has no object: zeros. Sectors
   * written meanwhile keep the newer data.
   */
  fillFrom(offsetBytes: number, source: Uint8Array | undefined, lengthBytes: number): void {
    if (this.fullyValid) return;
    if (
      this.#validCount === 0 &&
      this.#data === null &&
      offsetBytes === 0 &&
      lengthBytes === this.chunkSizeBytes &&
      source !== undefined &&
      Buffer.isBuffer(source)
    ) {
      // A whole chunk fetched into an empty page: adopt the buffer rather than copy it.
      this.#data = source;
      this.#valid.fill(1);
      this.#validCount = this.#valid.length;
      return;
    }
    // Copy runs of unknown sectors at once; known sectors keep their (newer) data.
    const first = offsetBytes / this.sectorSize;
    const end = (offsetBytes + lengthBytes) / this.sectorSize;
    let s = first;
    while (s < end) {
      if (this.#valid[s] === 1) {
        s++;
        continue;
      }
      let runEnd = s + 1;
      while (runEnd < end && this.#valid[runEnd] === 0) runEnd++;
      const at = s * this.sectorSize;
      const bytes = (runEnd - s) * this.sectorSize;
      if (source === undefined) {
        this.#buffer().fill(0, at, at + bytes);
      } else {
        const from = at - offsetBytes;
        this.#buffer().set(source.subarray(from, from + bytes), at);
      }
      this.#valid.fill(1, s, runEnd);
      this.#validCount += runEnd - s;
      s = runEnd;
    }
  }

  /**
   * The page's whole contents for an upload: a private copy, or `undefined` if all zeros. The
   * page must be fully valid.
   */
  snapshot(zeroChunk: Buffer): Uint8Array | undefined {
    assert(this.fullyValid, "snapshot of a partially valid page");
    if (this.#data === null || this.#data.equals(zeroChunk)) return undefined;
    return Buffer.from(this.#data);
  }

  #buffer(): Buffer {
    if (this.#data === null) {
      this.#data = this.#zero
        ? Buffer.alloc(this.chunkSizeBytes)
        : Buffer.allocUnsafe(this.chunkSizeBytes);
      this.#zero = false;
    }
    return this.#data;
  }

  #markValid(offsetBytes: number, lengthBytes: number): void {
    if (this.fullyValid) return;
    const end = (offsetBytes + lengthBytes) / this.sectorSize;
    for (let s = offsetBytes / this.sectorSize; s < end; s++) {
      if (this.#valid[s] === 0) {
        this.#valid[s] = 1;
        this.#validCount++;
      }
    }
  }

  #modified(): void {
    this.writeSeq++;
    if (this.state === "clean") this.state = "dirty";
    else if (this.state === "writing") this.state = "writing-redirtied";
  }

  #assertAligned(offsetBytes: number, lengthBytes: number): void {
    assert(offsetBytes % this.sectorSize === 0 && lengthBytes % this.sectorSize === 0);
    assert(offsetBytes >= 0 && offsetBytes + lengthBytes <= this.chunkSizeBytes);
  }
}
