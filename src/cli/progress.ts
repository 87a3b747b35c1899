/**
 * A one-line progress bar on a terminal, redrawn at most every 100 ms; nothing at all when
 * stderr is not a terminal, so logs and pipes stay quiet.
 */

import { formatSize } from "./sizes.js";

export interface Progress {
  update(doneBytes: number, totalBytes: number): void;
  done(): void;
}

export function progressBar(label: string, stream: NodeJS.WriteStream = process.stderr): Progress {
  if (!stream.isTTY) return { update() {}, done() {} };
  const startMs = performance.now();
  let lastDrawMs = 0;
  const draw = (doneBytes: number, totalBytes: number) => {
    const fraction = totalBytes === 0 ? 1 : doneBytes / totalBytes;
    const width = 30;
    const filled = Math.round(fraction * width);
    const seconds = (performance.now() - startMs) / 1000;
    const rate = seconds > 0 ? formatSize(Math.round(doneBytes / seconds)) : "-";
    stream.write(
      `\r${label} [${"#".repeat(filled)}${".".repeat(width - filled)}] ${(fraction * 100).toFixed(0).padStart(3)}% ` +
        `${formatSize(doneBytes)} / ${formatSize(totalBytes)}, ${rate}/s\x1b[K`,
    );
  };
  let last: [number, number] = [0, 0];
  return {
    update(doneBytes, totalBytes) {
      last = [doneBytes, totalBytes];
      const nowMs = performance.now();
      if (nowMs - lastDrawMs >= 100) {
        lastDrawMs = nowMs;
        draw(doneBytes, totalBytes);
      }
    },
    done() {
      draw(...last);
      stream.write("\n");
    },
  };
}
