/**
 * Time, passed in rather than taken from globals, so tests can run retries and write-back
 * delays without waiting.
 */

export interface Clock {
  /** Milliseconds on a monotonic clock. */
  nowMs(): number;
  /** Resolve after `ms` milliseconds. */
  sleep(ms: number): Promise<void>;
  /** Call `callback` after `ms` milliseconds, unless cancelled. Does not keep the process alive. */
  schedule(callback: () => void, ms: number): () => void;
}

export const systemClock: Clock = Object.freeze({
  nowMs: () => performance.now(),
  sleep: (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms)),
  schedule(callback: () => void, ms: number) {
    const timer = setTimeout(callback, ms);
    timer.unref();
    return () => clearTimeout(timer);
  },
});
