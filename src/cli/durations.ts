/** Durations as people type them: `60s`, `2m`, `1500ms`, `1h`, `0`. A bare number is seconds. */

const UNIT_MS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };

/** A duration in milliseconds, or an Error saying why `text` is not one. */
export function parseDuration(text: string): number | Error {
  const match = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$/i.exec(text);
  if (match === null) {
    return new Error(`"${text}" is not a duration (examples: 60s, 2m, 1500ms, 1h)`);
  }
  const ms = Number(match[1]) * (UNIT_MS[(match[2] ?? "s").toLowerCase()] ?? 1000);
  if (!Number.isSafeInteger(Math.round(ms))) return new Error(`"${text}" is too long a duration`);
  return Math.round(ms);
}

/** `90000` → `90 s`, `1500` → `1.5 s`, `250` → `250 ms`. */
export function formatDuration(ms: number): string {
  if (ms < 1000) return `${ms} ms`;
  const s = ms / 1000;
  return `${Number.isInteger(s) ? s : s.toFixed(1)} s`;
}
