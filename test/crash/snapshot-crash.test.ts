/**
 * kill -9 of `s3blk snapshot create` at random moments: during its open (the lease, the seal of
 * its writer term, the deletion of the previous terms' garbage), its flush, its record, its
 * close. After every kill, in this process: the volume reads exactly as the model says, every
 * snapshot that exists reads exactly as the volume did when it was taken, and a rewrite of some
 * chunks (leaving garbage for the next open to delete) succeeds. On a local directory and on S3.
 *
 * SNAPSHOT_CRASH_ROUNDS (default 8) sets the number of kills per backend.
 */

import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { openVolume, createVolume } from "../../src/lifecycle/volume-lifecycle.js";
import { listSnapshots } from "../../src/lifecycle/snapshot-lifecycle.js";
import { openStoreStack, type StoreStackOptions } from "../../src/store/store-stack.js";
import { runCliKilledAfter } from "../support/serve-process.js";
import { requireS3, s3Env, stackOptions } from "../support/s3-target.js";
import { pattern } from "../support/volumes.js";

const ROUNDS = Number(process.env.SNAPSHOT_CRASH_ROUNDS ?? 8);
const CHUNK = 64 * 1024;
const CHUNKS = 16;
const SPC = CHUNK / 512;

const s3 = await requireS3("snapshot crash loop on S3");

interface Backend {
  readonly name: string;
  readonly url: string;
  readonly env: NodeJS.ProcessEnv;
  readonly options: StoreStackOptions;
}

function backends(): Backend[] {
  const dir = mkdtempSync(path.join(tmpdir(), "s3blk-snapcrash-"));
  const list: Backend[] = [
    { name: "local directory", url: `file://${dir}/vol`, env: {}, options: {} },
  ];
  if (s3 !== undefined) {
    list.push({
      name: "S3",
      url: s3.newVolumeUrl("snapcrash"),
      env: s3Env(s3),
      options: stackOptions(s3),
    });
  }
  return list;
}

describe.each(backends())("kill -9 during snapshot create on $name", (backend) => {
  it(`leaves the volume and every snapshot as the model says, ${ROUNDS} kills`, async () => {
    const stack = () =>
      openStoreStack(backend.url, { ...backend.options, retry: { baseDelayMs: 1 } });
    await createVolume(stack(), { sizeBytes: CHUNKS * CHUNK, chunkSizeBytes: CHUNK });
    let volume = Buffer.from(pattern(1, 0, CHUNKS * SPC));
    const writer = await openVolume(stack());
    expect((await writer.write(0, [volume])).ok).toBe(true);
    expect((await writer.disconnect()).ok).toBe(true);
    const taken = new Map<string, Buffer>();
    const outcomes = new Set<string>();
    let checked = 0;
    let fullRunMs = 1000;

    for (let round = 1; round <= ROUNDS; round++) {
      const name = `r${round}`;
      // Every other round (the first among them) runs to the end, so that older snapshots exist
      // to be checked after the rewrites and garbage deletions of later rounds, and so that the
      // others can be killed at a random moment inside a whole run's time, however fast this
      // machine is today.
      const runsToEnd = round % 2 === 1;
      const delayMs = runsToEnd ? 120_000 : Math.floor((0.05 + 0.9 * Math.random()) * fullRunMs);
      const { outcome, ranMs } = await runCliKilledAfter(
        ["snapshot", "create", backend.url, name],
        backend.env,
        delayMs,
      );
      outcomes.add(outcome);
      if (runsToEnd && outcome === "0") fullRunMs = ranMs;
      taken.set(name, Buffer.from(volume));

      const readOnly = await openVolume(stack(), { readOnly: true });
      const now = new Uint8Array(CHUNKS * CHUNK);
      expect((await readOnly.read(0, [now])).ok).toBe(true);
      await readOnly.disconnect();
      expect(Buffer.from(now).equals(volume)).toBe(true);
      for (const { name: existing } of await listSnapshots(stack())) {
        const snap = await openVolume(stack(), { snapshot: existing });
        const bytes = new Uint8Array(CHUNKS * CHUNK);
        expect((await snap.read(0, [bytes])).ok).toBe(true);
        await snap.disconnect();
        expect(Buffer.from(bytes).equals(taken.get(existing) ?? Buffer.alloc(0))).toBe(true);
        checked++;
      }

      // Rewrite a few chunks: garbage for the next term's start, which the next kill may cut.
      const next = await openVolume(stack());
      const first = (round * 3) % (CHUNKS - 4);
      const data = pattern(round + 1, first * SPC, 4 * SPC);
      expect((await next.write(first * SPC, [data])).ok).toBe(true);
      expect((await next.disconnect()).ok).toBe(true);
      volume = Buffer.from(volume);
      Buffer.from(data).copy(volume, first * CHUNK);
    }
    // Some kills must have hit a running process, some runs finished, and the snapshots they
    // made were checked again after later rounds' rewrites; else the test proved nothing.
    expect(outcomes.has("SIGKILL") && outcomes.has("0")).toBe(true);
    expect(checked).toBeGreaterThan(ROUNDS / 2);
  }, 300_000);
});
