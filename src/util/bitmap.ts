/** A fixed-size set of small non-negative integers, one bit each. */
export class Bitmap {
  readonly #bits: Uint8Array;

  constructor(readonly size: number) {
    this.#bits = new Uint8Array(Math.ceil(size / 8));
  }

  has(i: number): boolean {
    return i >= 0 && i < this.size && ((this.#bits[i >> 3] ?? 0) & (1 << (i & 7))) !== 0;
  }

  set(i: number): void {
    this.#check(i);
    this.#bits[i >> 3] = (this.#bits[i >> 3] ?? 0) | (1 << (i & 7));
  }

  clear(i: number): void {
    this.#check(i);
    this.#bits[i >> 3] = (this.#bits[i >> 3] ?? 0) & ~(1 << (i & 7));
  }

  /** How many members. */
  count(): number {
    let n = 0;
    for (const byte of this.#bits) {
      let b = byte;
      while (b !== 0) {
        b &= b - 1;
        n++;
      }
    }
    return n;
  }

  #check(i: number): void {
    if (!Number.isInteger(i) || i < 0 || i >= this.size) {
      throw new RangeError(`bit ${i} outside a bitmap of ${this.size}`);
    }
  }
}
