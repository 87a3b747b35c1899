/**
 * A well-behaved client that keeps writing and verifying while a hostile suite attacks the same
 * server: each round writes a pattern to one of 64 places and reads it back.
 */

import type { NbdClient } from "./nbd-client.js";
import { pattern } from "./volumes.js";

export interface VerifyingLoop {
  /** Stop after the current round: the rounds completed, or the first wrong read or failure. */
  stop(): Promise<number>;
}

/** Start the loop on `client` (sectors 1000 and up, 4 KiB at a time, 5 ms apart). */
export function verifyThroughout(client: NbdClient): VerifyingLoop {
  let running = true;
  const loop = (async () => {
    let rounds = 0;
    while (running) {
      const sector = 1000 + (rounds % 64) * 8;
      const data = pattern(rounds + 1, sector, 8);
      await client.pwrite(sector * 512, data);
      const back = await client.pread(sector * 512, data.length);
      if (!Buffer.from(back).equals(Buffer.from(data)))
        throw new Error(`healthy client read wrong data at ${sector}`);
      rounds++;
      await new Promise((r) => setTimeout(r, 5));
    }
    return rounds;
  })();
  return {
    stop: () => {
      running = false;
      return loop;
    },
  };
}
