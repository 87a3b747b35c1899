/**
 * The block device alone, no NBD: what the cache and the chunk store reach on the store behind
 * them. Each row opens the volume afresh (an empty cache), so reads are cold and writes are
 * measured up to a flush that made them durable.
 */

import { randomFillSync } from "node:crypto";
import type { ChunkedBlockDevice } from "../device/chunked-block-device.js";
import type { RequestCounts } from "../store/counting-store.js";

export interface DeviceRow {
  readonly job: string;
  readonly bytesPerSecond: number;
  readonly iops: number;
  readonly requests: RequestCounts;
}

export interface DeviceBenchOptions {
  /** Opens the volume with an empty cache, returning the device and its request counter. */
  readonly open: () => Promise<{ device: ChunkedBlockDevice; counts: () => RequestCounts }>;
  readonly sizeBytes: number;
  readonly seconds: number;
}

async function must(result: Promise<{ ok: boolean }>, what: string): Promise<void> {
  if (!(await result).ok) throw new Error(`${what} failed`);
}

/** Run `depth` workers issuing `op(i)` until `stop()`; returns operations done. */
export async function workers(
  depth: number,
  stop: () => boolean,
  op: (i: number) => Promise<void>,
) {
  let n = 0;
  await Promise.all(
    Array.from({ length: depth }, async () => {
      while (!stop()) await op(n++);
    }),
  );
  return n;
}

export async function runDeviceBench(options: DeviceBenchOptions): Promise<DeviceRow[]> {
  const rows: DeviceRow[] = [];
  const sectors = options.sizeBytes / 512;
  const block = Buffer.alloc(1 << 20);
  randomFillSync(block);

  const row = async (
    job: string,
    body: (device: ChunkedBlockDevice) => Promise<{ bytes: number; ops: number }>,
  ) => {
    const { device, counts } = await options.open();
    const before = counts();
    const start = performance.now();
    const { bytes, ops } = await body(device);
    const seconds = (performance.now() - start) / 1000;
    const after = counts();
    const requests = Object.fromEntries(
      Object.entries(after).map(([k, v]) => [k, v - (before[k as keyof RequestCounts] ?? 0)]),
    ) as unknown as RequestCounts;
    rows.push({ job, bytesPerSecond: bytes / seconds, iops: ops / seconds, requests });
    await device.disconnect();
  };

  /** Eight workers walking the volume once in 1 MiB steps, `op` at each; the steps taken. */
  const sequentialPass = (op: (sector: number) => Promise<void>) => {
    let next = 0;
    return workers(
      8,
      () => next >= sectors,
      async () => {
        const sector = next;
        next += 2048;
        if (sector < sectors) await op(sector);
      },
    );
  };

  await row("seq write 1M QD8 + flush", async (device) => {
    const n = await sequentialPass((sector) => must(device.write(sector, [block]), "write"));
    await must(device.flush(), "flush");
    return { bytes: Math.min(n, sectors / 2048) * block.length, ops: n };
  });

  await row("seq read 1M QD8 (cold)", async (device) => {
    const n = await sequentialPass((sector) =>
      must(device.read(sector, [Buffer.allocUnsafe(1 << 20)]), "read"),
    );
    return { bytes: Math.min(n, sectors / 2048) * block.length, ops: n };
  });

  const deadline = () => {
    const end = performance.now() + options.seconds * 1000;
    return () => performance.now() >= end;
  };
  const random4k = () => Math.floor(Math.random() * (sectors / 8)) * 8;

  await row("rand read 4k QD16 (cold)", async (device) => {
    const n = await workers(16, deadline(), async () => {
      await must(device.read(random4k(), [Buffer.allocUnsafe(4096)]), "read");
    });
    return { bytes: n * 4096, ops: n };
  });

  await row("rand write 4k QD16 + flush", async (device) => {
    const n = await workers(16, deadline(), async (i) => {
      await must(
        device.write(random4k(), [block.subarray((i % 256) * 4096, ((i % 256) + 1) * 4096)]),
        "write",
      );
    });
    await must(device.flush(), "flush");
    return { bytes: n * 4096, ops: n };
  });

  return rows;
}
