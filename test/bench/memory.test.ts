/** The memory section's bound and verdict, from rounds made up here. */

import { describe, expect, it } from "vitest";
import {
  memoryReport,
  memoryVerdict,
  NBD_BOUND_BYTES,
  VOLUME_BOUND_BYTES,
  type MemoryRound,
} from "../../src/bench/memory.js";

const MiB = 1024 * 1024;

function round(startMiB: number, peaksMiB: number[], error?: string): MemoryRound {
  const phases = peaksMiB.map((peak, i) => ({
    name: ["fill", "mix", "read"][i]!,
    peakRssBytes: peak * MiB,
    bytesPerSecond: 1e8,
  }));
  return error === undefined
    ? { startRssBytes: startMiB * MiB, phases }
    : { startRssBytes: startMiB * MiB, phases, error };
}

describe("the memory section's report", () => {
  it("bounds the process by the runtime at start, one volume and the NBD buffers, + 64 MiB", () => {
    // The README's terms with the defaults: 96 MiB of runtime at start; 256 MiB of cache, 32
    // uploads or fetches of 1 MiB in flight, 16 MiB of free chunk buffers; 16 MiB of NBD
    // buffers kept and 64 MiB in flight.
    expect(VOLUME_BOUND_BYTES).toBe(304 * MiB);
    expect(NBD_BOUND_BYTES).toBe(80 * MiB);
    const report = memoryReport(
      [round(84, [390, 510, 500]), round(90, [400, 530, 520]), round(86, [380, 520, 505])],
      15,
    );
    expect(report.startRssBytes).toBe(86 * MiB);
    expect(report.boundBytes).toBe((96 + 304 + 80) * MiB);
    expect(report.targetBytes).toBe((96 + 304 + 80 + 64) * MiB);
    expect(report.peakRssBytes).toEqual({ median: 520 * MiB, min: 510 * MiB, max: 530 * MiB });
    expect(memoryVerdict(report)).toMatch(/^peak RSS 520 MiB; .* 480 MiB .* 544 MiB: met$/);
  });

  it("leaves a failed round out, and says when the target is not met", () => {
    const report = memoryReport([round(85, [400, 600, 590]), round(200, [300], "boom")], 15);
    expect(report.peakRssBytes?.median).toBe(600 * MiB);
    expect(report.startRssBytes).toBe(85 * MiB);
    expect(memoryVerdict(report)).toMatch(/: not met$/);
  });

  it("does not call the target met when the runtime started larger than the README says", () => {
    const report = memoryReport([round(120, [300, 300, 300])], 15);
    expect(memoryVerdict(report)).toMatch(/: not met \(the runtime started larger/);
  });

  it("says when nothing was measured", () => {
    const report = memoryReport([round(90, [], "boom")], 15);
    expect(memoryVerdict(report)).toMatch(/: not measured$/);
  });
});
