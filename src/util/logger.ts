/**
 * The process's logger: pino, JSON lines on stderr, or one readable line per entry when stderr
 * is a terminal (pino-pretty, synchronously, in this thread).
 *
 * Who logs what: `serve` makes one logger and hands children down, one per export
 * (`{ export: name }`) and one per connection (`{ connection: id }`, then also `export` once the
 * client chose one), so every line of a connection or an export carries its name. Nothing here
 * is a module-level singleton: the logger is passed in, and a test passes its own.
 *
 * Secrets never reach a line, by two means:
 * - **Care.** We log messages and small objects we build, never a request, a response, a client
 *   configuration or an SDK error object as it is; errors go through {@link errorFields}, which
 *   keeps the type, the code and the message only.
 * - **Redaction** (pino's `redact`), for what care misses: credentials, keys, PSKs, signatures
 *   and authorization headers under any of the names in {@link REDACTED_PATHS}, at the top or one
 *   level down, are replaced by `[redacted]`.
 */

import { pino, type DestinationStream, type Level, type Logger } from "pino";
import pretty from "pino-pretty";

export type { Logger } from "pino";

/** Log levels, quietest last; `silent` logs nothing. */
export const LOG_LEVELS: readonly (Level | "silent")[] = [
  "trace",
  "debug",
  "info",
  "warn",
  "error",
  "fatal",
  "silent",
];

/** The level unless told otherwise. */
export const DEFAULT_LOG_LEVEL: Level = "info";

const SECRET_NAMES = [
  "AWS_ACCESS_KEY_ID",
  "AWS_SECRET_ACCESS_KEY",
  "AWS_SESSION_TOKEN",
  "accessKeyId",
  "secretAccessKey",
  "sessionToken",
  "credentials",
  "authorization",
  "Authorization",
  "x-amz-security-token",
  "signature",
  "Signature",
  "psk",
  "key",
  "cert",
  "password",
];

/** Paths pino redacts: each secret name at the top level and one level down. */
export const REDACTED_PATHS: readonly string[] = SECRET_NAMES.flatMap((name) =>
  /^[A-Za-z_$][\w$]*$/.test(name) ? [name, `*.${name}`] : [`["${name}"]`, `*["${name}"]`],
);

export interface LoggerSettings {
  /** Default {@link DEFAULT_LOG_LEVEL}. */
  readonly level?: Level | "silent";
  /**
   * Where lines go. Default stderr: one readable line per entry if it is a terminal, JSON
   * otherwise.
   */
  readonly destination?: DestinationStream;
  /** Force the readable form (true) or JSON (false). Default: whether stderr is a terminal. */
  readonly pretty?: boolean;
}

/** The process's root logger. */
export function createLogger(settings: LoggerSettings = {}): Logger {
  const options = {
    level: settings.level ?? DEFAULT_LOG_LEVEL,
    base: { pid: process.pid },
    redact: { paths: [...REDACTED_PATHS], censor: "[redacted]" },
    serializers: { err: errorFields },
  };
  const readable = settings.pretty ?? (settings.destination === undefined && process.stderr.isTTY);
  const destination =
    settings.destination ??
    (readable
      ? pretty({
          destination: 2,
          sync: true,
          singleLine: true,
          colorize: true,
          translateTime: "SYS:HH:MM:ss.l",
          ignore: "pid,hostname",
        })
      : pino.destination({ dest: 2, sync: true }));
  return pino(options, destination);
}

/**
 * What a log line keeps of an error: its type, code and message, and the same of its causes.
 * Never the error object itself: an SDK error carries the request and response it came from.
 */
export function errorFields(error: unknown): Record<string, unknown> {
  if (!(error instanceof Error)) return { message: String(error) };
  const code = (error as { code?: unknown }).code;
  return {
    type: error.name,
    message: error.message,
    ...(typeof code === "string" ? { code } : {}),
    ...(error.cause === undefined ? {} : { cause: errorFields(error.cause) }),
  };
}

/** A logger that drops everything: the default of library code that was given none. */
export function silentLogger(): Logger {
  return pino({ level: "silent" });
}
