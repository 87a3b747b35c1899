/**
 * Stop signals as they really arrive: one request to stop is often several copies of a signal.
 * A terminal sends Ctrl-C's SIGINT to the whole foreground process group, so under `npm start`
 * both npm and we get it, and npm forwards its copy to us as well; a supervisor that stops a
 * process group with SIGTERM does the same. Node cannot tell who sent a signal, so copies are
 * told apart by time: every signal within {@link STOP_SIGNAL_WINDOW_MS} of the first is that
 * same request. A signal after the window is a second request, which the caller handles (`serve`
 * exits without flushing).
 */

import { systemClock, type Clock } from "../util/clock.js";

/** Signals within this long of the first stop signal are copies of it, not a second request. */
export const STOP_SIGNAL_WINDOW_MS = 1000;

/**
 * The signals that ask us to stop. SIGHUP too: closing the terminal that runs `npm start` sends
 * it, and its default action would kill the server without flushing.
 */
export const STOP_SIGNALS: readonly NodeJS.Signals[] = ["SIGTERM", "SIGINT", "SIGHUP"];

/** Something that emits signals: `process`, or a test's EventEmitter. */
export interface SignalSource {
  on(signal: NodeJS.Signals, listener: (signal: NodeJS.Signals) => void): unknown;
}

export interface StopSignalOptions {
  /** Default `process`. */
  readonly source?: SignalSource;
  /** Default the system clock. */
  readonly clock?: Pick<Clock, "nowMs">;
  /** Default {@link STOP_SIGNAL_WINDOW_MS}. */
  readonly windowMs?: number;
  /**
   * A second request that arrives before the caller waits for the first (while it is still
   * starting up: taking over a lease, say, which can take a minute). Default: ignored.
   */
  readonly onSecondWhileStarting?: (signal: NodeJS.Signals) => void;
}

/**
 * Resolves with the name of the first stop signal (at once if it already came). `onSecond`
 * runs, with the signal's name, on each signal that arrives later than the window after it.
 */
export type WaitForStop = (onSecond: (signal: NodeJS.Signals) => void) => Promise<NodeJS.Signals>;

/**
 * Start listening for the stop signals now, so that a signal which arrives while the caller is
 * still starting up is not lost (or left to the default action, which would kill the process).
 * A second request that comes before the caller has passed its `onSecond` goes to
 * `onSecondWhileStarting`.
 */
export function listenForStop(options: StopSignalOptions = {}): WaitForStop {
  const source = options.source ?? process;
  const clock = options.clock ?? systemClock;
  const windowMs = options.windowMs ?? STOP_SIGNAL_WINDOW_MS;
  let first: { signal: NodeJS.Signals; atMs: number } | undefined;
  let wake: ((signal: NodeJS.Signals) => void) | undefined;
  let onSecond: (signal: NodeJS.Signals) => void = options.onSecondWhileStarting ?? (() => {});
  const handler = (signal: NodeJS.Signals) => {
    if (first === undefined) {
      first = { signal, atMs: clock.nowMs() };
      wake?.(signal);
      return;
    }
    if (clock.nowMs() - first.atMs > windowMs) onSecond(signal);
  };
  for (const signal of STOP_SIGNALS) source.on(signal, handler);
  return (second) => {
    onSecond = second;
    if (first !== undefined) return Promise.resolve(first.signal);
    return new Promise((resolve) => (wake = resolve));
  };
}
