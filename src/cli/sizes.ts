/** Byte sizes as people type them: `10G`, `512`, `1.5T`, `4KiB`, `64m`. Binary multiples. */

const UNITS: Record<string, number> = {
  "": 1,
  B: 1,
  K: 1024,
  M: 1024 ** 2,
  G: 1024 ** 3,
  T: 1024 ** 4,
  P: 1024 ** 5,
};

/** A size in bytes, or an Error saying why `text` is not one. */
export function parseSize(text: string): number | Error {
  const match = /^\s*(\d+(?:\.\d+)?)\s*([kmgtpb]?)(?:i?b)?\s*$/i.exec(text);
  if (match === null) {
    return new Error(`"${text}" is not a size (examples: 10G, 512M, 4096, 1.5T)`);
  }
  const unit = UNITS[(match[2] ?? "").toUpperCase()] ?? 1;
  const bytes = Number(match[1]) * unit;
  if (!Number.isSafeInteger(bytes)) {
    return new Error(`"${text}" is not a whole number of bytes, or is too large`);
  }
  return bytes;
}

/** `1073741824` → `1 GiB`; exact where it can be. */
export function formatSize(bytes: number): string {
  for (const [unit, size] of [
    ["PiB", 1024 ** 5],
    ["TiB", 1024 ** 4],
    ["GiB", 1024 ** 3],
    ["MiB", 1024 ** 2],
    ["KiB", 1024],
  ] as const) {
    if (bytes >= size) {
      const value = bytes / size;
      return `${Number.isInteger(value) ? value : value.toFixed(2)} ${unit}`;
    }
  }
  return `${bytes} bytes`;
}
