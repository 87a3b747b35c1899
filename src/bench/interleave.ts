/**
 * Interleaved A/B measurement. This machine's speed drifts by ±30 % within minutes, so a ratio
 * of two figures taken minutes apart mixes speed with drift. Here each row runs s3blk (A) and
 * its reference (B) back to back, A B A B A B, and reports the ratio of each pair, their median
 * and spread: drift that is slow against one pair cancels in its ratio.
 *
 * - Each contender runs the job once, untimed, before the first round (warm-up).
 * - After each of A's turns, `settle` runs untimed: for s3blk, a flush and a wait until the
 *   process is idle, so that its write-back does not take CPU from B's turn.
 */

import { readFileSync } from "node:fs";

/** One side of a comparison. */
export interface Contender<T> {
  readonly name: string;
  /** One timed turn. */
  turn(): Promise<T>;
  /** One untimed turn before the rounds. Default: none. */
  warmUp?(): Promise<void>;
  /** Runs untimed after each turn, before the other side's. Default: none. */
  settle?(): Promise<void>;
}

export interface Pairs<T> {
  readonly a: T[];
  readonly b: T[];
  /** metric(a[i]) / metric(b[i]), for the rounds where both produced a figure. */
  readonly ratios: number[];
}

/** Run `rounds` rounds of A then B, each turn followed by its side's `settle`. */
export async function interleave<T>(
  a: Contender<T>,
  b: Contender<T>,
  rounds: number,
  metric: (result: T) => number | undefined,
): Promise<Pairs<T>> {
  await a.warmUp?.();
  await a.settle?.();
  await b.warmUp?.();
  await b.settle?.();
  const out: Pairs<T> = { a: [], b: [], ratios: [] };
  for (let round = 0; round < rounds; round++) {
    const ra = await a.turn();
    await a.settle?.();
    const rb = await b.turn();
    await b.settle?.();
    out.a.push(ra);
    out.b.push(rb);
    const ma = metric(ra);
    const mb = metric(rb);
    if (ma !== undefined && mb !== undefined && mb > 0) out.ratios.push(ma / mb);
  }
  return out;
}

/** The median, and the smallest and largest value; undefined for no values. */
export function spread(
  values: readonly number[],
): { median: number; min: number; max: number } | undefined {
  if (values.length === 0) return undefined;
  const sorted = [...values].sort((x, y) => x - y);
  const mid = sorted.length >> 1;
  const median = sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
  return { median, min: sorted[0]!, max: sorted[sorted.length - 1]! };
}

/** CPU time a process has used, in clock ticks (user + system), or undefined once it is gone. */
export function cpuTicks(pid: number): number | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    // Fields after the command name (which may hold spaces); utime and stime are fields 14, 15.
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return Number(fields[11]) + Number(fields[12]);
  } catch {
    return undefined;
  }
}

/**
 * Wait until `pid` uses at most `maxTicks` of CPU in a `windowMs` window (it has nothing in
 * flight), or `timeoutMs` passes. Returns how long it waited.
 */
export async function waitUntilIdle(
  pid: number,
  options: { windowMs?: number; maxTicks?: number; timeoutMs?: number } = {},
): Promise<number> {
  const windowMs = options.windowMs ?? 250;
  const maxTicks = options.maxTicks ?? 1;
  const started = Date.now();
  let before = cpuTicks(pid);
  while (before !== undefined && Date.now() - started < (options.timeoutMs ?? 60_000)) {
    await new Promise((r) => setTimeout(r, windowMs));
    const now = cpuTicks(pid);
    if (now === undefined || now - before <= maxTicks) break;
    before = now;
  }
  return Date.now() - started;
}
