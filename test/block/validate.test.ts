import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { InvalidArgumentError } from "../../src/block/block-device.js";
import { checkRange } from "../../src/block/validate.js";

const SIZE_SECTORS = 2048;
const geometry = { sectorSize: 512, sizeSectors: BigInt(SIZE_SECTORS) };

describe("checkRange", () => {
  it("gives the same answer in plain numbers as in bigints, errors included", () => {
    const sector = fc.integer({ min: -3, max: SIZE_SECTORS + 3 });
    fc.assert(
      fc.property(sector, sector, (start, count) => {
        expect(checkRange(geometry, start, count)).toEqual(
          checkRange(geometry, BigInt(start), BigInt(count)),
        );
      }),
      { numRuns: 2000 },
    );
  });

  it("returns plain zeros for -0, and refuses what is not a whole number", () => {
    const range = checkRange(geometry, -0, -0);
    expect(range).toEqual({ offsetBytes: 0, lengthBytes: 0 });
    expect(Object.is((range as { offsetBytes: number }).offsetBytes, 0)).toBe(true);
    expect(Object.is((range as { lengthBytes: number }).lengthBytes, 0)).toBe(true);
    for (const bad of [1.5, Number.NaN, Number.POSITIVE_INFINITY, 2 ** 53]) {
      const refused = checkRange(geometry, bad, 1);
      expect(refused).toBeInstanceOf(InvalidArgumentError);
      expect((refused as Error).message).toMatch(/not a safe integer/);
    }
    expect(checkRange(geometry, SIZE_SECTORS, 0)).toEqual({
      offsetBytes: SIZE_SECTORS * 512,
      lengthBytes: 0,
    });
    expect((checkRange(geometry, SIZE_SECTORS, 1) as Error).message).toMatch(/end past the end/);
  });
});
