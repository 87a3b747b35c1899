/**
 * A real pino logger whose lines are kept in memory, for tests that check what was logged.
 */

import { Writable } from "node:stream";
import { createLogger, type Logger } from "../../src/util/logger.js";

export interface CapturedLog {
  readonly logger: Logger;
  /** Every line written, as pino wrote it (JSON). */
  readonly raw: string[];
  /** The `msg` of every line, in order. */
  messages(): string[];
  /** Every line, parsed. */
  entries(): Record<string, unknown>[];
}

export function captureLog(level: "debug" | "info" | "warn" = "debug"): CapturedLog {
  const raw: string[] = [];
  const destination = new Writable({
    write(chunk: Buffer, _encoding, done) {
      raw.push(
        ...chunk
          .toString()
          .split("\n")
          .filter((l) => l !== ""),
      );
      done();
    },
  });
  const logger = createLogger({ level, destination, pretty: false });
  const entries = () => raw.map((line) => JSON.parse(line) as Record<string, unknown>);
  return { logger, raw, entries, messages: () => entries().map((e) => String(e.msg)) };
}
