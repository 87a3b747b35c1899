/**
 * The crash loop: writes over NBD with flushes between batches, and `kill -9` of the server at
 * random moments, mid-upload included. After every kill a new server process opens the volume
 * and every sector is checked against a model:
 *
 * - every write acknowledged by a FLUSH (or a FUA write) reads back;
 * - a write not yet flushed reads back as its old or its new contents, never anything else;
 * - no chunk is half-written: an unflushed write inside one chunk landed whole or not at all.
 *
 * CRASH_ROUNDS (default 20) sets the number of kills per backend.
 */

import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { NbdClient } from "../support/nbd-client.js";
import { runCli, startServe, type ServeProcess } from "../support/serve-process.js";
import { requireS3, s3Env, type S3Target } from "../support/s3-target.js";
import { pattern, sectorValue } from "../support/volumes.js";

const ROUNDS = Number(process.env.CRASH_ROUNDS ?? 20);
const SECTOR = 512;
const CHUNK = 256 * 1024;
const SIZE = 32 * 1024 * 1024;
const SECTORS = SIZE / SECTOR;

const s3 = await requireS3("crash loop on S3");

interface Backend {
  readonly name: string;
  readonly url: string;
  readonly env: NodeJS.ProcessEnv;
}

function backends(): Backend[] {
  const dir = mkdtempSync(path.join(tmpdir(), "s3blk-crash-"));
  const list: Backend[] = [{ name: "local directory", url: `file://${dir}/vol`, env: {} }];
  if (s3 !== undefined) list.push(s3Backend(s3));
  return list;
}

function s3Backend(target: S3Target): Backend {
  return {
    name: "S3",
    url: target.newVolumeUrl("crash"),
    env: s3Env(target),
  };
}

/** Per sector: its durable value, and values written since that may or may not have landed. */
class Model {
  readonly durable = new Int32Array(SECTORS);
  readonly since = new Map<number, Set<number>>();
  /** Unflushed writes inside one chunk, for the half-written check. */
  unflushed: { sector: number; sectors: number; value: number }[] = [];

  wrote(sector: number, sectors: number, value: number, fua: boolean) {
    for (let s = sector; s < sector + sectors; s++) {
      if (fua) {
        this.durable[s] = value;
        this.since.delete(s);
      } else {
        let set = this.since.get(s);
        if (set === undefined) this.since.set(s, (set = new Set()));
        set.add(value);
      }
    }
    if (
      !fua &&
      Math.floor(sector / (CHUNK / SECTOR)) ===
        Math.floor((sector + sectors - 1) / (CHUNK / SECTOR))
    ) {
      this.unflushed.push({ sector, sectors, value });
    }
  }

  /** Everything written before a successful flush is durable. */
  flushed(current: Int32Array) {
    this.durable.set(current);
    this.since.clear();
    this.unflushed = [];
  }
}

/** Read the whole volume, check it against the model, and make what it holds the new truth. */
async function verify(client: NbdClient, model: Model, current: Int32Array): Promise<number> {
  const step = 4 * 1024 * 1024;
  for (let offset = 0; offset < SIZE; offset += step) {
    const data = await client.pread(offset, step);
    for (let i = 0; i < step / SECTOR; i++) {
      const s = offset / SECTOR + i;
      const candidates = [model.durable[s] ?? 0, ...(model.since.get(s) ?? [])];
      const got = sectorValue(data.subarray(i * SECTOR, (i + 1) * SECTOR), s, candidates);
      if (got === undefined) {
        throw new Error(
          `sector ${s}: neither its flushed value ${model.durable[s]} nor one written since`,
        );
      }
      current[s] = got;
    }
  }
  for (const w of model.unflushed) {
    const landed = Array.from({ length: w.sectors }, (_, i) => current[w.sector + i] === w.value);
    if (landed.some((x) => x) && !landed.every((x) => x)) {
      throw new Error(
        `write ${w.value} at sector ${w.sector} (one chunk) landed in part: a half-written chunk`,
      );
    }
  }
  model.flushed(current);
  return SIZE;
}

describe.each(backends())("crash loop on $name", (backend) => {
  it(`keeps every flushed byte across ${ROUNDS} kill -9s of the server`, async () => {
    expect(
      await runCli(
        ["create", backend.url, "--size", String(SIZE), "--chunk-size", String(CHUNK)],
        backend.env,
      ),
    ).toBe(0);
    const socketDir = mkdtempSync(path.join(tmpdir(), "s3blk-crash-sock-"));
    const model = new Model();
    const current = new Int32Array(SECTORS);
    let value = 1;
    let bytesVerified = 0;
    let flushesAcknowledged = 0;
    let writesAcknowledged = 0;
    let killsMidFlush = 0;

    let live: ServeProcess | undefined;
    try {
      for (let round = 0; round <= ROUNDS; round++) {
        const socket = path.join(socketDir, `r${round}.sock`);
        const server = await startServe([backend.url, "--socket", socket], { env: backend.env });
        live = server;
        const { exited } = server;
        const client = await NbdClient.connect(socket);
        bytesVerified += await verify(client, model, current);
        if (round === ROUNDS) {
          await client.close();
          await server.stop();
          break;
        }

        // Kill at a random moment: during writes, during a flush, during uploads.
        const killAfterMs = 50 + Math.floor(Math.random() * 1200);
        const killer = setTimeout(() => server.child.kill("SIGKILL"), killAfterMs);
        let inFlush = false;
        try {
          for (;;) {
            // A batch of non-overlapping writes, 4 KiB to 128 KiB, each inside one 128 KiB slot
            // (so inside one chunk), some of them FUA.
            const slots = new Set<number>();
            while (slots.size < 8) slots.add(Math.floor(Math.random() * (SECTORS / 256)));
            const writes: Promise<void>[] = [];
            for (const slot of slots) {
              const sectors = 8 * (1 + Math.floor(Math.random() * 32));
              const sector = slot * 256;
              const v = value++;
              const fua = Math.random() < 0.1;
              // Until it is acknowledged, even a FUA write may or may not have landed.
              model.wrote(sector, sectors, v, false);
              writes.push(
                client.pwrite(sector * SECTOR, pattern(v, sector, sectors), fua).then(() => {
                  writesAcknowledged++;
                  if (fua) model.wrote(sector, sectors, v, true);
                }),
              );
            }
            await Promise.all(writes);
            inFlush = true;
            await client.flush();
            inFlush = false;
            flushesAcknowledged++;
            // What the model says the device holds now is durable.
            for (const [s, values] of model.since)
              current[s] = [...values].at(-1) ?? current[s] ?? 0;
            for (let s = 0; s < SECTORS; s++)
              if (!model.since.has(s)) current[s] = model.durable[s] ?? 0;
            model.flushed(current);
          }
        } catch {
          // The server is gone.
          if (inFlush) killsMidFlush++;
        }
        clearTimeout(killer);
        client.destroy();
        await exited;
      }
    } finally {
      // A failed check must not leave a server running behind the test.
      if (live !== undefined && live.child.exitCode === null) live.child.kill("SIGKILL");
    }
    console.log(
      `crash loop (${backend.name}): ${ROUNDS} kill -9s (${killsMidFlush} during a flush), ` +
        `${writesAcknowledged} writes and ${flushesAcknowledged} flushes acknowledged, ` +
        `${(bytesVerified / 2 ** 20).toFixed(0)} MiB verified`,
    );
    expect(flushesAcknowledged).toBeGreaterThan(ROUNDS);
  }, 600_000);
});
