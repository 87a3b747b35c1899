/**
 * A read's fetch that was in flight while its page's upload ended, and that lands (or is used)
 * after the page was evicted, must not answer with what the store held before that upload.
 */

import { describe, expect, it } from "vitest";
import type { GetOptions, GetResult, ObjectStore } from "../../src/store/object-store.js";
import { StoreLayer } from "../../src/store/store-layer.js";
import { memoryBackend, newFilledVolume, pattern, sectorValue } from "../support/volumes.js";

const CHUNK = 64 * 1024;
const SPC = CHUNK / 512;
const PARAMS = { sizeBytes: 8 * CHUNK, chunkSizeBytes: CHUNK };
const HOUR = 3_600_000;

/** Holds the next GET of chunk `hold`'s object (any chunk's: "any"), until released. */
class HoldOneGet extends StoreLayer {
  hold: number | "any" | undefined;
  held: Promise<void> | undefined;
  #release: (() => void) | undefined;

  constructor(inner: ObjectStore) {
    super(inner);
  }

  override async get(key: string, options?: GetOptions): Promise<GetResult | undefined> {
    const chunk =
      this.hold === "any" ? "/chunks/" : `/chunks/${this.hold?.toString(16).padStart(16, "0")}.`;
    if (this.hold !== undefined && key.includes(chunk)) {
      this.hold = undefined;
      // Read now, answer later: the answer is the store as it was when the GET arrived.
      const answer = await super.get(key, options);
      this.held = new Promise<void>((resolve) => (this.#release = resolve));
      await this.held;
      return answer;
    }
    return super.get(key, options);
  }

  release(): void {
    this.#release?.();
  }
}

/** Chunk `chunk` of `out` holds pattern 2 in its first `written` sectors and pattern 1 after. */
function expectWritten(out: Uint8Array, chunk: number, written: number): void {
  const stale: number[] = [];
  for (let s = 0; s < SPC; s++) {
    const want = s < written ? 2 : 1;
    const sector = chunk * SPC + s;
    if (sectorValue(out.subarray(s * 512, (s + 1) * 512), sector, [want]) !== want) stale.push(s);
  }
  expect(stale, `stale sectors of chunk ${chunk}`).toEqual([]);
}

/** A device over a volume holding pattern 1, whose store can hold a GET back. */
async function heldDevice(label: string, cacheBytes: number) {
  const volume = await newFilledVolume(memoryBackend, label, PARAMS, 1, 8 * SPC);
  let layer: HoldOneGet | undefined;
  const stack = volume.stack({ wrap: (store) => (layer = new HoldOneGet(store)) });
  const device = await volume.open({ cacheBytes, writebackDelayMs: HOUR }, stack);
  return { device, layer: layer! };
}

/** Upload every dirty page, then read `chunks`, which evicts the pages uploaded. */
async function uploadAndEvict(
  device: Awaited<ReturnType<typeof heldDevice>>["device"],
  chunks: number[],
): Promise<void> {
  expect((await device.flush()).ok).toBe(true);
  for (const c of chunks) {
    expect((await device.read(c * SPC, [new Uint8Array(CHUNK)])).ok).toBe(true);
  }
}

describe("a fetch that lands after its page's upload and eviction", () => {
  it("is not used: the read fetches again and sees the write", async () => {
    // Chunk 2 holds pattern 1 in the store.
    const { device, layer } = await heldDevice("stale", 2 * CHUNK);

    // A partial page: the first 23 sectors of chunk 2 written, acknowledged, not uploaded.
    const written = pattern(2, 2 * SPC, 23);
    expect((await device.write(2 * SPC, [written])).ok).toBe(true);

    // A read of the whole chunk fetches it; the store answers with pattern 1, held back.
    layer.hold = "any";
    const out = new Uint8Array(CHUNK);
    const reading = device.read(2 * SPC, [out]);
    await new Promise((r) => setImmediate(r));
    expect(layer.held).toBeDefined();

    // Meanwhile the page is uploaded (clean, knowing the whole chunk) and evicted.
    await uploadAndEvict(device, [4, 5, 6]);
    layer.release();
    expect((await reading).ok).toBe(true);

    expectWritten(out, 2, 23);
    expect((await device.disconnect()).ok).toBe(true);
  });

  it("is not used when its page handed it back, then retired while the read waited", async () => {
    // 4 chunks of cache: 2 of dirty data at most, a write-back threshold of 1.
    const { device, layer } = await heldDevice("stale-back", 4 * CHUNK);
    expect((await device.write(2 * SPC, [pattern(2, 2 * SPC, 23)])).ok).toBe(true);
    expect((await device.write(5 * SPC, [pattern(2, 5 * SPC, 8)])).ok).toBe(true);

    // Chunks 2 and 3 in one read. Chunk 2's dirty page may not keep a whole chunk past the
    // threshold: its ranged GET's bytes are handed back to the read, which waits for chunk 3.
    layer.hold = 3;
    const out = new Uint8Array(2 * CHUNK);
    const reading = device.read(2 * SPC, [out]);
    for (let k = 0; k < 5; k++) await new Promise((r) => setImmediate(r));
    expect(layer.held).toBeDefined();

    // Meanwhile page 2 is uploaded and evicted.
    await uploadAndEvict(device, [6, 7, 4]);
    layer.release();
    expect((await reading).ok).toBe(true);
    expectWritten(out, 2, 23);
    expect((await device.disconnect()).ok).toBe(true);
  });
});
