/**
 * The stop-signal window on its own, with an injected clock: copies of the first signal within
 * the window are one stop request; a signal after it is a second request. (npm-start.test.ts
 * covers the same through real process groups.)
 */

import { EventEmitter } from "node:events";
import { describe, expect, it } from "vitest";
import { listenForStop, STOP_SIGNAL_WINDOW_MS } from "../../src/cli/stop-signals.js";

function setup(windowMs?: number) {
  const source = new EventEmitter();
  let nowMs = 0;
  const waitForStop = listenForStop({
    source: { on: (signal, listener) => source.on(signal, listener) },
    clock: { nowMs: () => nowMs },
    ...(windowMs === undefined ? {} : { windowMs }),
  });
  const seconds: string[] = [];
  return {
    send: (signal: NodeJS.Signals, atMs: number) => {
      nowMs = atMs;
      source.emit(signal, signal);
    },
    waitForStop: () => waitForStop((signal) => seconds.push(signal)),
    seconds,
  };
}

describe("listenForStop", () => {
  it("takes copies within the window for the first request, and a later signal as a second", async () => {
    const s = setup();
    const stop = s.waitForStop();
    s.send("SIGINT", 1000); // the terminal's Ctrl-C
    s.send("SIGINT", 1003); // npm's forwarded copy
    s.send("SIGTERM", 1000 + STOP_SIGNAL_WINDOW_MS); // still inside the window
    expect(await stop).toBe("SIGINT");
    expect(s.seconds).toEqual([]);
    s.send("SIGINT", 1001 + STOP_SIGNAL_WINDOW_MS);
    s.send("SIGINT", 1002 + STOP_SIGNAL_WINDOW_MS); // its copy: onSecond is told each time
    expect(s.seconds).toEqual(["SIGINT", "SIGINT"]);
  });

  it("resolves at once for a signal that came before it was asked", async () => {
    const s = setup(50);
    s.send("SIGTERM", 0);
    s.send("SIGTERM", 10);
    expect(await s.waitForStop()).toBe("SIGTERM");
    s.send("SIGINT", 51);
    expect(s.seconds).toEqual(["SIGINT"]);
  });

  it("measures the window from the first signal, not the latest copy", async () => {
    const s = setup(100);
    const stop = s.waitForStop();
    for (let atMs = 0; atMs <= 100; atMs += 20) s.send("SIGINT", atMs);
    expect(await stop).toBe("SIGINT");
    expect(s.seconds).toEqual([]);
    s.send("SIGINT", 120);
    expect(s.seconds).toEqual(["SIGINT"]);
  });
});

describe("listenForStop while the caller is still starting", () => {
  it("hands a second request to onSecondWhileStarting, and SIGHUP counts as a stop", async () => {
    const source = new EventEmitter();
    let nowMs = 0;
    const early: string[] = [];
    const waitForStop = listenForStop({
      source: { on: (signal, listener) => source.on(signal, listener) },
      clock: { nowMs: () => nowMs },
      onSecondWhileStarting: (signal) => early.push(signal),
    });
    source.emit("SIGHUP", "SIGHUP"); // the terminal closed
    nowMs = 2 * STOP_SIGNAL_WINDOW_MS;
    source.emit("SIGINT", "SIGINT"); // Ctrl-C again, before start-up has finished
    expect(early).toEqual(["SIGINT"]);
    expect(await waitForStop(() => {})).toBe("SIGHUP");
  });
});
