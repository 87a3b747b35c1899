/** The benchmark's interleaving: the order of turns, warm-ups and settles, and the statistics. */

import { describe, expect, it } from "vitest";
import { cpuTicks, interleave, spread, type Contender } from "../../src/bench/interleave.js";

describe("interleave", () => {
  it("runs A B A B after untimed warm-ups, settling each side after its turn", async () => {
    const events: string[] = [];
    let figure = 0;
    const side = (name: string): Contender<number> => ({
      name,
      turn: async () => {
        events.push(`${name}${++figure}`);
        return name === "A" ? 2 * figure : figure;
      },
      warmUp: async () => void events.push(`${name}-warm`),
      settle: async () => void events.push(`${name}-settle`),
    });
    const pairs = await interleave(side("A"), side("B"), 2, (x) => x);
    expect(events).toEqual([
      "A-warm",
      "A-settle",
      "B-warm",
      "B-settle",
      "A1",
      "A-settle",
      "B2",
      "B-settle",
      "A3",
      "A-settle",
      "B4",
      "B-settle",
    ]);
    // Each ratio is of neighbouring turns: 2×1 / 2 and 2×3 / 4.
    expect(pairs.ratios).toEqual([1, 1.5]);
  });

  it("leaves out a round where either side produced no figure", async () => {
    let n = 0;
    const a: Contender<number | undefined> = {
      name: "A",
      turn: async () => (n++ === 0 ? undefined : 3),
    };
    const b: Contender<number | undefined> = { name: "B", turn: async () => 1 };
    const pairs = await interleave(a, b, 3, (x) => x);
    expect(pairs.ratios).toEqual([3, 3]);
  });
});

describe("spread", () => {
  it("gives the median of odd and even counts, and the extremes", () => {
    expect(spread([3, 1, 2])).toEqual({ median: 2, min: 1, max: 3 });
    expect(spread([4, 1, 2, 10])).toEqual({ median: 3, min: 1, max: 10 });
    expect(spread([])).toBeUndefined();
  });
});

describe("cpuTicks", () => {
  it("reads this process's CPU time, and grows when it works", () => {
    const before = cpuTicks(process.pid)!;
    const until = performance.now() + 100;
    while (performance.now() < until) Math.sqrt(Math.random());
    expect(cpuTicks(process.pid)!).toBeGreaterThan(before);
    expect(cpuTicks(2 ** 22 + 12345)).toBeUndefined();
  });
});
