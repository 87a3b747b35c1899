/**
 * One cached chunk: the bytes it holds, which sectors of it are known, and where it stands in
 * write-back. The state machine is described in page-cache.ts and driven by the cache; this
 * class keeps the facts consistent, and each transition asserts the state it starts from:
 *
 * | transition          | from                       | to                          |
 * |---------------------|----------------------------|-----------------------------|
 * | `write`, `zero`     | clean / dirty              | dirty                       |
 * | `write`, `zero`     | writing / writing-redirtied| writing-redirtied           |
 * | `beginUpload`       | dirty                      | writing (the image is taken)|
 * | `uploadSucceeded`   | writing / writing-redirtied| clean / dirty               |
 * | `uploadFailed`      | dirty / writing / writing-redirtied | dirty              |
 *
 * (An upload can fail before it takes its image, so `uploadFailed` may start from dirty.)
 *
 * ## Sparse storage
 *
 * A page stores its bytes in spans of `SPAN_BYTES`, allocated only when a write or a fetch needs
 * them, so a page holding one 4 KiB write costs 4 KiB, not a whole chunk. The invariant:
 *
 * - a sector that is not *valid* has no meaning, whatever its span holds;
 * - a valid sector whose span is absent reads as zeros;
 * - a valid sector whose span is present reads as the span's bytes.
 *
 * Spans allocated together share one buffer, and a chunk fetched whole is adopted as the
 * spans' buffer, so copies in and out of a page run over contiguous memory, not span by span.
 * Spans are added as writes and fetches need them, each run in a buffer of exactly its size, and
 * dropped only all together, so `memoryBytes` (present spans times `SPAN_BYTES`) is exactly the
 * memory the page keeps alive.
 */

import assert from "node:assert/strict";
import type { ChunkBuffers } from "./chunk-buffers.js";

export type PageState =
  /** Matches the store (in its valid sectors). May be evicted. */
  | "clean"
  /** Holds writes the store has not got. Never evicted. */
  | "dirty"
  /** An upload of a snapshot is in flight; no write since the snapshot. */
  | "writing"
  /** An upload is in flight and the page was written since its snapshot. */
  | "writing-redirtied";

/** Bytes fetched for a page: chunk bytes from `offsetBytes`, or `undefined` for zeros. */
export interface Fetched {
  readonly offsetBytes: number;
  readonly bytes: Uint8Array | undefined;
}

/** The unit of a page's storage: the largest sector size, so a sector never straddles spans. */
export const SPAN_BYTES = 4096;

export class Page {
  #state: PageState = "clean";
  /** Bumped by every modification. */
  writeSeq = 0;
  #durableSeq = 0;
  /** The `writeSeq` of the image the upload in flight took, once it took one. */
  #imageSeq: number | undefined;
  /** The upload queued or in flight for this page, if any (set by the dirty set). */
  upload: Promise<void> | undefined;
  /**
   * A whole-chunk fetch in flight, shared by every reader that needs one. It resolves with the
   * bytes when the page could not keep them (the cache decides), else `undefined`.
   */
  fill: Promise<Fetched | undefined> | undefined;

  /**
   * Per span: the buffer that holds it (shared by spans allocated or adopted together), or
   * `undefined` where nothing is stored; and where in that buffer the span starts.
   */
  readonly #spans: (Buffer | undefined)[];
  readonly #spanOffsets: Uint32Array;
  /** The one buffer holding every span in order, when there is one: the fast path. */
  #whole: Buffer | undefined;
  #spanCount = 0;
  /** One byte per sector: 1 where the sector's contents are known. */
  readonly #valid: Uint8Array;
  #validCount = 0;
  /** Where whole-chunk buffers come from and go back to, and who counts their loans. */
  readonly #buffers: ChunkBuffers;
  /** Left the cache (see `retire`): it holds nothing and is never filled again. */
  #retired = false;

  constructor(
    readonly index: number,
    readonly chunkSizeBytes: number,
    readonly sectorSize: number,
    buffers: ChunkBuffers,
  ) {
    assert(sectorSize <= SPAN_BYTES && chunkSizeBytes % SPAN_BYTES === 0);
    assert.equal(buffers.chunkSizeBytes, chunkSizeBytes);
    this.#buffers = buffers;
    this.#spans = new Array<Buffer | undefined>(chunkSizeBytes / SPAN_BYTES).fill(undefined);
    this.#spanOffsets = new Uint32Array(chunkSizeBytes / SPAN_BYTES);
    this.#valid = new Uint8Array(chunkSizeBytes / sectorSize);
  }

  /** Bytes of data this page keeps alive. */
  get memoryBytes(): number {
    return this.#spanCount * SPAN_BYTES;
  }

  /** Bytes of bookkeeping per page, whatever it holds: the valid map and the span table. */
  get overheadBytes(): number {
    return this.#valid.byteLength + this.#spans.length * 12;
  }

  get fullyValid(): boolean {
    return this.#validCount === this.#valid.length;
  }

  /** True when the page is known to be all zeros without looking at its bytes. */
  get isAllZero(): boolean {
    return this.fullyValid && this.#spanCount === 0;
  }

  get state(): PageState {
    return this.#state;
  }

  /** The `writeSeq` of the newest image known to be in the store. */
  get durableSeq(): number {
    return this.#durableSeq;
  }

  get isDirty(): boolean {
    return this.#state !== "clean";
  }

  /** True once the page has left the cache (`retire`): whoever still holds it looks again. */
  get retired(): boolean {
    return this.#retired;
  }

  /**
   * The page leaves the cache (evicted): its whole-chunk buffer goes back to the pool, to be
   * reused once its loans are returned, and it forgets every sector. A reader still holding the
   * page across an `await` must check `retired` and look the chunk up again; a fetch that ends
   * for it fills nothing.
   */
  retire(): void {
    assert(this.#state === "clean", `page ${this.index}: retired while ${this.#state}`);
    if (this.#whole !== undefined) this.#buffers.retire(this.#whole);
    this.#whole = undefined;
    this.#spans.fill(undefined);
    this.#spanCount = 0;
    this.#valid.fill(0);
    this.#validCount = 0;
    this.#retired = true;
  }

  // ---- write-back transitions --------------------------------------------------------------

  /** dirty → writing: the upload takes its image of the page as it is now. */
  beginUpload(): void {
    assert(this.#state === "dirty", `page ${this.index}: beginUpload from ${this.#state}`);
    this.#state = "writing";
    this.#imageSeq = this.writeSeq;
  }

  /**
   * The store holds the image: writing → clean, or writing-redirtied → dirty (written since the
   * image was taken). Either way the image's `writeSeq` is now durable.
   */
  uploadSucceeded(): void {
    assert(
      this.#state === "writing" || this.#state === "writing-redirtied",
      `page ${this.index}: uploadSucceeded from ${this.#state}`,
    );
    assert(this.#imageSeq !== undefined);
    this.#durableSeq = this.#imageSeq;
    this.#imageSeq = undefined;
    this.#state = this.#state === "writing" ? "clean" : "dirty";
  }

  /** The upload failed, before or after it took its image: back to dirty, nothing dropped. */
  uploadFailed(): void {
    assert(this.#state !== "clean", `page ${this.index}: uploadFailed from clean`);
    this.#imageSeq = undefined;
    this.#state = "dirty";
  }

  /** True if every sector in `[offsetBytes, offsetBytes + lengthBytes)` is known. */
  isValid(offsetBytes: number, lengthBytes: number): boolean {
    if (this.fullyValid) return true;
    const first = Math.floor(offsetBytes / this.sectorSize);
    const end = Math.ceil((offsetBytes + lengthBytes) / this.sectorSize);
    for (let s = first; s < end; s++) if (this.#valid[s] === 0) return false;
    return true;
  }

  /** The memory a write or fill of `[offsetBytes, +lengthBytes)` would add. */
  growthFor(offsetBytes: number, lengthBytes: number): number {
    if (this.#spanCount === this.#spans.length) return 0;
    let absent = 0;
    const end = Math.ceil((offsetBytes + lengthBytes) / SPAN_BYTES);
    for (let i = Math.floor(offsetBytes / SPAN_BYTES); i < end; i++) {
      if (this.#spans[i] === undefined) absent++;
    }
    return absent * SPAN_BYTES;
  }

  /** Copy bytes `[offsetBytes, +target.length)` out. They must be valid. */
  copyOut(offsetBytes: number, target: Uint8Array): void {
    assert(this.isValid(offsetBytes, target.byteLength), "copyOut of unknown sectors");
    if (this.#whole !== undefined) {
      target.set(this.#whole.subarray(offsetBytes, offsetBytes + target.byteLength));
      return;
    }
    this.#forEachRun(offsetBytes, target.byteLength, (at, view, length) => {
      const into = at - offsetBytes;
      if (view === undefined) target.fill(0, into, into + length);
      else target.set(view, into);
    });
  }

  /** Copy the sectors of `[offsetBytes, +target.length)` that are known into `target`. */
  copyKnownOut(offsetBytes: number, target: Uint8Array): void {
    const first = offsetBytes / this.sectorSize;
    this.#forEachSectorRun(first, first + target.byteLength / this.sectorSize, 1, (at, bytes) =>
      this.copyOut(at, target.subarray(at - offsetBytes, at - offsetBytes + bytes)),
    );
  }

  /**
   * A view of bytes `[offsetBytes, +lengthBytes)` that nothing writes until the borrower gives
   * it back (`ChunkBuffers.returnLoan`): the page's own memory, lent. A modification while a
   * loan is out first moves the page to a copy of that memory (copy-on-write); the lent buffer
   * is reused only after its last loan is returned. Only a fully valid page held in one buffer
   * lends; `undefined` otherwise.
   */
  lend(offsetBytes: number, lengthBytes: number): Uint8Array | undefined {
    if (this.#whole === undefined || !this.fullyValid) return undefined;
    this.#buffers.lend(this.#whole);
    return this.#whole.subarray(offsetBytes, offsetBytes + lengthBytes);
  }

  /** Apply a write of `source` at `offsetBytes` (sector-aligned). */
  write(offsetBytes: number, source: Uint8Array): void {
    this.#assertAligned(offsetBytes, source.byteLength);
    this.#unshare();
    if (this.#whole !== undefined) {
      this.#whole.set(source, offsetBytes);
    } else {
      this.#allocate(offsetBytes, source.byteLength);
      this.#forEachRun(offsetBytes, source.byteLength, (at, view) => {
        const from = at - offsetBytes;
        view!.set(source.subarray(from, from + view!.byteLength));
      });
    }
    this.#markValid(offsetBytes, source.byteLength);
    this.#modified();
  }

  /** Set `[offsetBytes, +lengthBytes)` to zeros. */
  zero(offsetBytes: number, lengthBytes: number): void {
    this.#assertAligned(offsetBytes, lengthBytes);
    if (offsetBytes === 0 && lengthBytes === this.chunkSizeBytes) {
      // The buffer is dropped, not written: a loan of it keeps its bytes.
      if (this.#whole !== undefined) this.#buffers.retire(this.#whole);
      this.#spans.fill(undefined);
      this.#spanCount = 0;
      this.#whole = undefined;
      this.#valid.fill(1);
      this.#validCount = this.#valid.length;
    } else {
      // Absent spans already read as zeros; present ones are zeroed in place.
      this.#unshare();
      this.#forEachRun(offsetBytes, lengthBytes, (_at, view) => view?.fill(0));
      this.#markValid(offsetBytes, lengthBytes);
    }
    this.#modified();
  }

  /**
   * Fill the sectors of `[offsetBytes, +lengthBytes)` that are not yet known from `source`
   * (bytes fetched from the store); `undefined` means the chunk has no object: zeros. Sectors
   * known already keep their (newer) data.
   *
   * A whole chunk in a `Buffer` is adopted: the page's known sectors are copied into it and it
   * becomes the page's storage, so the caller must not use it afterwards. Returns true then;
   * false when `source` stays the caller's. A retired page fills nothing.
   */
  fillFrom(offsetBytes: number, source: Uint8Array | undefined, lengthBytes: number): boolean {
    if (this.fullyValid || this.#retired) return false;
    if (
      offsetBytes === 0 &&
      lengthBytes === this.chunkSizeBytes &&
      source !== undefined &&
      Buffer.isBuffer(source) &&
      source.byteLength === this.chunkSizeBytes
    ) {
      this.#adopt(source);
      return true;
    }
    this.#forEachUnknownRun(offsetBytes, lengthBytes, (at, bytes) => {
      if (source === undefined) {
        // Zeros: absent spans read as zeros already; present ones need zeroing.
        this.#forEachRun(at, bytes, (_at, view) => view?.fill(0));
      } else {
        this.#allocate(at, bytes);
        this.#forEachRun(at, bytes, (runAt, view) => {
          const from = runAt - offsetBytes;
          view!.set(source.subarray(from, from + view!.byteLength));
        });
      }
      this.#markValid(at, bytes);
    });
    return false;
  }

  /**
   * The chunk's whole contents for an upload, in a buffer of its own (the page may change while
   * the upload runs), or `undefined` if all zeros. Sectors the page does not know come from
   * `base`, the chunk as stored (`undefined`: no object, zeros), which is overwritten and used
   * as the result; without a `base` the page must be fully valid.
   */
  image(base: Buffer | undefined, zeroChunk: Buffer): Buffer | undefined {
    if (this.isAllZero) return undefined;
    assert(base === undefined || base.byteLength === this.chunkSizeBytes);
    let out: Buffer;
    if (this.fullyValid) {
      out = base ?? this.#buffers.take();
      this.copyOut(0, out);
    } else {
      out = base ?? this.#buffers.take().fill(0); // no object: unknown sectors are zeros
      this.copyKnownOut(0, out);
    }
    if (!out.equals(zeroChunk)) return out;
    this.dropImage(out);
    return undefined;
  }

  /**
   * An image from {@link image} that nothing uses any more (its upload ended, and the page did
   * not adopt it): its buffer may be reused. The store keeps no reference to a body once its
   * PUT has settled.
   */
  dropImage(image: Buffer): void {
    this.#buffers.retire(image);
  }

  // ---- storage -----------------------------------------------------------------------------

  /**
   * Before bytes are modified in place: if `#whole` is lent, move to a copy of it, and retire
   * the lent one (reused once its loans are back). Only a page held in `#whole` lends, and then
   * every span is in it, at its own offset.
   */
  #unshare(): void {
    const lent = this.#whole;
    if (lent === undefined || !this.#buffers.isLent(lent)) return;
    const copy = this.#buffers.take();
    copy.set(lent);
    this.#spans.fill(copy);
    this.#whole = copy;
    this.#buffers.retire(lent);
  }

  /** Make the page fully valid with `chunk` as its storage, keeping the sectors it knows. */
  #adopt(chunk: Buffer): void {
    if (this.#validCount > 0) this.copyKnownOut(0, chunk);
    // Not lent: a page lends only when fully valid, and one that is never fills again.
    if (this.#whole !== undefined) this.#buffers.retire(this.#whole);
    this.#spans.fill(chunk);
    for (let i = 0; i < this.#spans.length; i++) this.#spanOffsets[i] = i * SPAN_BYTES;
    this.#whole = chunk;
    this.#spanCount = this.#spans.length;
    this.#valid.fill(1);
    this.#validCount = this.#valid.length;
  }

  /**
   * Give every span of `[offsetBytes, +lengthBytes)` storage: each run of absent spans gets one
   * buffer. The parts of a new span outside the range are zeroed, since valid sectors there
   * read as zeros until now.
   */
  #allocate(offsetBytes: number, lengthBytes: number): void {
    if (this.#spanCount === this.#spans.length) return;
    const end = offsetBytes + lengthBytes;
    const firstSpan = Math.floor(offsetBytes / SPAN_BYTES);
    const lastSpan = Math.ceil(end / SPAN_BYTES);
    forEachIndexRun(
      firstSpan,
      lastSpan,
      (k) => this.#spans[k] === undefined,
      (i, j) => {
        const whole = j - i === this.#spans.length;
        const buffer = whole ? this.#buffers.take() : Buffer.allocUnsafe((j - i) * SPAN_BYTES);
        const runStart = i * SPAN_BYTES;
        const runEnd = j * SPAN_BYTES;
        if (offsetBytes > runStart) buffer.fill(0, 0, offsetBytes - runStart);
        if (end < runEnd) buffer.fill(0, end - runStart);
        this.#spans.fill(buffer, i, j);
        for (let k = i; k < j; k++) this.#spanOffsets[k] = (k - i) * SPAN_BYTES;
        this.#spanCount += j - i;
        if (whole) this.#whole = buffer;
      },
    );
  }

  /**
   * Visit `[offsetBytes, +lengthBytes)` in runs: each run is either held in one contiguous
   * buffer (`view` is exactly its bytes) or has no storage (`view` undefined).
   */
  #forEachRun(
    offsetBytes: number,
    lengthBytes: number,
    visit: (at: number, view: Buffer | undefined, length: number) => void,
  ): void {
    const end = offsetBytes + lengthBytes;
    let at = offsetBytes;
    while (at < end) {
      const i = Math.floor(at / SPAN_BYTES);
      const span = this.#spans[i];
      let j = i + 1;
      if (span === undefined) {
        while (j * SPAN_BYTES < end && this.#spans[j] === undefined) j++;
      } else {
        // Spans that follow each other in the same buffer form one run.
        while (
          j * SPAN_BYTES < end &&
          this.#spans[j] === span &&
          this.#spanOffsets[j] === this.#spanOffsets[j - 1]! + SPAN_BYTES
        ) {
          j++;
        }
      }
      const runEnd = Math.min(end, j * SPAN_BYTES);
      const length = runEnd - at;
      const from = this.#spanOffsets[i]! + (at - i * SPAN_BYTES);
      const view = span?.subarray(from, from + length);
      visit(at, view, length);
      at = runEnd;
    }
  }

  /** Visit the runs of unknown sectors in `[offsetBytes, +lengthBytes)`, as byte ranges. */
  #forEachUnknownRun(
    offsetBytes: number,
    lengthBytes: number,
    visit: (at: number, bytes: number) => void,
  ): void {
    const first = offsetBytes / this.sectorSize;
    this.#forEachSectorRun(first, first + lengthBytes / this.sectorSize, 0, visit);
  }

  #forEachSectorRun(
    first: number,
    end: number,
    value: 0 | 1,
    visit: (at: number, bytes: number) => void,
  ): void {
    forEachIndexRun(
      first,
      end,
      (s) => this.#valid[s] === value,
      (s, runEnd) => visit(s * this.sectorSize, (runEnd - s) * this.sectorSize),
    );
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

  /** A write or zeroing: clean → dirty, writing → writing-redirtied; the others stay. */
  #modified(): void {
    this.writeSeq++;
    switch (this.#state) {
      case "clean":
        this.#state = "dirty";
        break;
      case "writing":
        this.#state = "writing-redirtied";
        break;
      case "dirty":
      case "writing-redirtied":
        break;
    }
  }

  /**
   * Throw if the page's own accounts disagree with its contents: the span table and
   * `memoryBytes`, the valid map and its count, the state and the sequence numbers. For tests
   * (the model tests call it after every step); it walks every span and sector.
   * @internal
   */
  checkInvariants(): void {
    const where = `page ${this.index}`;
    if (this.#retired) {
      assert(this.#spanCount === 0 && this.#validCount === 0, `${where}: retired, holding data`);
    }
    let present = 0;
    const buffers = new Map<Buffer, number>();
    this.#spans.forEach((span, i) => {
      if (span === undefined) return;
      present++;
      buffers.set(span, (buffers.get(span) ?? 0) + 1);
      const offset = this.#spanOffsets[i] ?? -1;
      assert(
        offset % SPAN_BYTES === 0 && offset + SPAN_BYTES <= span.byteLength,
        `${where}: span ${i} at ${offset} lies outside its ${span.byteLength}-byte buffer`,
      );
    });
    assert.equal(this.#spanCount, present, `${where}: span count disagrees with the span table`);
    // Each buffer holds exactly the spans that use it, so memoryBytes is the memory kept alive.
    for (const [buffer, spans] of buffers) {
      assert.equal(
        buffer.byteLength,
        spans * SPAN_BYTES,
        `${where}: a ${buffer.byteLength}-byte buffer backs ${spans} spans`,
      );
    }
    if (this.#whole !== undefined) {
      assert(
        this.#spans.every(
          (span, i) => span === this.#whole && this.#spanOffsets[i] === i * SPAN_BYTES,
        ),
        `${where}: the whole-chunk buffer is not every span in order`,
      );
    }
    let valid = 0;
    for (const v of this.#valid) valid += v;
    assert.equal(this.#validCount, valid, `${where}: valid count disagrees with the valid map`);
    assert(
      this.#durableSeq <= this.writeSeq,
      `${where}: durableSeq ${this.#durableSeq} is past writeSeq ${this.writeSeq}`,
    );
    const imageSeq = this.#imageSeq;
    switch (this.#state) {
      case "clean":
        assert.equal(this.#durableSeq, this.writeSeq, `${where}: clean but not durable`);
        assert(this.upload === undefined, `${where}: clean with an upload in flight`);
        break;
      case "dirty":
        assert(imageSeq === undefined, `${where}: dirty with an image taken`);
        break;
      case "writing":
        assert.equal(imageSeq, this.writeSeq, `${where}: writing, but written since its image`);
        assert(this.upload !== undefined, `${where}: writing with no upload`);
        break;
      case "writing-redirtied":
        assert(
          imageSeq !== undefined && imageSeq < this.writeSeq,
          `${where}: writing-redirtied, but not written since its image`,
        );
        assert(this.upload !== undefined, `${where}: writing-redirtied with no upload`);
        break;
    }
  }

  #assertAligned(offsetBytes: number, lengthBytes: number): void {
    assert(offsetBytes % this.sectorSize === 0 && lengthBytes % this.sectorSize === 0);
    assert(offsetBytes >= 0 && offsetBytes + lengthBytes <= this.chunkSizeBytes);
  }
}

/** Call `visit(start, stop)` for each maximal run of `[first, end)` where `inRun` holds. */
function forEachIndexRun(
  first: number,
  end: number,
  inRun: (i: number) => boolean,
  visit: (start: number, stop: number) => void,
): void {
  let i = first;
  while (i < end) {
    if (!inRun(i)) {
      i++;
      continue;
    }
    let j = i + 1;
    while (j < end && inRun(j)) j++;
    visit(i, j);
    i = j;
  }
}
