/**
 * A read's fetch that was in flight while its page's upload ended, and that lands after the
 * page was evicted, must not answer with what the store held before that upload.
 */

import { describe, expect, it } from "vitest";
import type { GetOptions, GetResult, ObjectStore } from "../../src/store/object-store.js";
import { StoreLayer } from "../../src/store/store-layer.js";
import { memoryBackend, newFilledVolume, pattern, sectorValue } from "../support/volumes.js";

const CHUNK = 64 * 1024;
const SPC = CHUNK / 512;
const PARAMS = { sizeBytes: 8 * CHUNK, chunkSizeBytes: CHUNK };
const HOUR = 3_600_000;

/** Holds the next GET of a chunk object while `holdNext`, until released. */
class HoldOneGet extends StoreLayer {
  holdNext = false;
  held: Promise<void> | undefined;
  #release: (() => void) | undefined;

  constructor(inner: ObjectStore) {
    super(inner);
  }

  override async get(key: string, options?: GetOptions): Promise<GetResult | undefined> {
    if (this.holdNext && key.includes("/chunks/")) {
      this.holdNext = false;
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

describe("a fetch that lands after its page's upload and eviction", () => {
  it("is not used: the read fetches again and sees the write", async () => {
    // Chunk 2 holds pattern 1 in the store.
    const volume = await newFilledVolume(memoryBackend, "stale", PARAMS, 1, 8 * SPC);
    let layer: HoldOneGet | undefined;
    const stack = volume.stack({ wrap: (store) => (layer = new HoldOneGet(store)) });
    const device = await volume.open({ cacheBytes: 2 * CHUNK, writebackDelayMs: HOUR }, stack);

    // A partial page: the first 23 sectors of chunk 2 written, acknowledged, not uploaded.
    const written = pattern(2, 2 * SPC, 23);
    expect((await device.write(2 * SPC, [written])).ok).toBe(true);

    // A read of the whole chunk fetches it; the store answers with pattern 1, held back.
    layer!.holdNext = true;
    const out = new Uint8Array(CHUNK);
    const reading = device.read(2 * SPC, [out]);
    await new Promise((r) => setImmediate(r));
    expect(layer!.held).toBeDefined();

    // Meanwhile the page is uploaded (clean, knowing the whole chunk) and evicted.
    expect((await device.flush()).ok).toBe(true);
    for (const c of [4, 5, 6]) {
      expect((await device.read(c * SPC, [new Uint8Array(CHUNK)])).ok).toBe(true);
    }
    layer!.release();
    expect((await reading).ok).toBe(true);

    for (let s = 0; s < SPC; s++) {
      const sector = 2 * SPC + s;
      const want = s < 23 ? 2 : 1;
      const got = sectorValue(out.subarray(s * 512, (s + 1) * 512), sector, [want]);
      expect(got, `sector ${sector}`).toBe(want);
    }
    expect((await device.disconnect()).ok).toBe(true);
  });
});
