import { describe, expect, it } from "vitest";
import { InFlight } from "../../src/util/in-flight.js";

/** Whether `promise` has settled after the queued continuations ran. */
async function settled(promise: Promise<unknown>): Promise<boolean> {
  let done = false;
  void promise.then(() => (done = true));
  await new Promise<void>((resolve) => setImmediate(resolve));
  return done;
}

describe("InFlight", () => {
  it("is idle at once with nothing running", async () => {
    expect(await settled(new InFlight().idle())).toBe(true);
  });

  it("waits for every operation, including one that starts before the last ends", async () => {
    const running = new InFlight();
    running.enter();
    running.enter();
    const idle = running.idle();
    running.leave();
    running.enter(); // starts while another still runs
    running.leave();
    expect(running.count).toBe(1);
    expect(await settled(idle)).toBe(false);
    running.leave();
    expect(await settled(idle)).toBe(true);
    expect(await settled(running.idle())).toBe(true);
  });

  it("refuses a leave without an enter: a bug", () => {
    expect(() => new InFlight().leave()).toThrow(/without enter/);
  });
});
