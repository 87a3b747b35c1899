/**
 * The clone rows of `npm run bench` (issue 8), on S3, from one base: a 10 GiB volume holding
 * 1 GiB of data (the first 1024 chunks of 1 MiB), and its snapshot "gold".
 *
 *   - creation: 100 clones of "gold" made one after another, then 100 more made 16 at a time,
 *     through one S3 client as a fleet's controller would: the time, and the requests of each
 *     kind, counted by our request counter and by RGW.
 *   - storage: 100 clones each write 4 whole chunks and 256 4 KiB blocks scattered over the
 *     whole device, and flush; the bytes each stores under its own prefix (a LIST), against the
 *     bytes it wrote. Copy-on-write is per chunk: a 4 KiB write makes the clone own the whole
 *     1 MiB chunk. 100 such clones hold about 25 GiB, more than this RGW keeps in memory, so two
 *     are written at a time, and each is measured and deleted once flushed: the figure for 100
 *     is the sum.
 *   - cold read: a sequential read of the 1 GiB of data (1 MiB requests, 8 in flight) through a
 *     fresh device with a 16 MiB cache, too small to help, of an untouched clone against the
 *     base itself, interleaved (interleave.ts): the clone reads the base's objects, so the
 *     ratio should be 1.
 */

import { randomFillSync } from "node:crypto";
import type { ChunkedBlockDevice } from "../device/chunked-block-device.js";
import { cloneVolume } from "../lifecycle/clone-lifecycle.js";
import { createVolume, deleteVolume, openVolume } from "../lifecycle/volume-lifecycle.js";
import { zeroCounts, type RequestCounts } from "../store/counting-store.js";
import { deletePrefix, listAll } from "../store/object-store.js";
import { S3Store } from "../store/s3-store.js";
import {
  buildStoreStack,
  openStoreStack,
  type StoreStack,
  type StoreStackOptions,
} from "../store/store-stack.js";
import { workers } from "./device-bench.js";
import { interleave, spread, type Contender } from "./interleave.js";
import { rgwCounters } from "./rgw-counters.js";

const MiB = 1024 * 1024;
const SNAPSHOT = "gold";

export interface CloneBenchOptions {
  readonly bucket: string;
  /** Every volume of the rows goes under this prefix, which is deleted at the end. */
  readonly prefix: string;
  /** How to reach the bucket (endpoint, region, credentials). */
  readonly stackOptions: StoreStackOptions;
  /** Clones per row. Default 100. */
  readonly clones?: number;
  /** Default 10 GiB. */
  readonly baseSizeBytes?: number;
  /** Data at the start of the base. Default 1 GiB. */
  readonly dataBytes?: number;
  /** Interleaved rounds of the cold read. */
  readonly rounds: number;
  /** Told of progress, one line at a time. */
  readonly log?: (line: string) => void;
}

/** A distribution of milliseconds. */
export interface Spread {
  readonly median: number;
  readonly p90: number;
  readonly max: number;
}

export interface CloneReport {
  readonly base: {
    readonly sizeBytes: number;
    readonly dataBytes: number;
    readonly chunkSizeBytes: number;
    /** Writing its data once (and flushing): what a copy of it costs at least. */
    readonly writeSeconds: number;
  };
  readonly creation: {
    readonly clones: number;
    readonly sequentialSeconds: number;
    readonly msPerClone: Spread;
    readonly concurrentSeconds: number;
    readonly concurrency: number;
    /** Requests of the sequential clones, by kind, summed over the base's and the clones' stacks. */
    readonly requests: RequestCounts;
    /**
     * Requests RGW counted meanwhile, from every client (undefined without a local RGW): on a
     * shared machine, other users' requests too.
     */
    readonly rgwRequests?: number;
  };
  readonly storage: {
    readonly clones: number;
    readonly bytesWritten: number;
    /** Under the clones' own prefixes, summed. */
    readonly bytesStored: number;
    readonly requests: RequestCounts;
  };
  readonly coldRead: {
    readonly bytes: number;
    readonly cacheBytes: number;
    readonly cloneMBps: readonly number[];
    readonly baseMBps: readonly number[];
    /** Clone over base, per round. */
    readonly ratios: readonly number[];
    readonly ratio?: { median: number; min: number; max: number };
  };
}

/** Run `use` with the stack of `url`, and close its store after. */
async function withStack<T>(
  url: string,
  stackOptions: StoreStackOptions,
  use: (stack: StoreStack) => Promise<T>,
): Promise<T> {
  const stack = openStoreStack(url, stackOptions);
  try {
    return await use(stack);
  } finally {
    await stack.store.close();
  }
}

async function must(result: Promise<{ ok: boolean }>, what: string): Promise<void> {
  if (!(await result).ok) throw new Error(`${what} failed`);
}

function add(into: RequestCounts, counts: RequestCounts): void {
  for (const key of Object.keys(into) as (keyof RequestCounts)[]) into[key] += counts[key];
}

function spreadOf(ms: readonly number[]): Spread {
  const sorted = [...ms].sort((a, b) => a - b);
  const at = (q: number) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] ?? 0;
  return { median: at(0.5), p90: at(0.9), max: at(1) };
}

/** Eight workers reading (or writing) [0, bytes) in 1 MiB steps. */
function sequentialPass(bytes: number, op: (sector: number) => Promise<void>): Promise<number> {
  let next = 0;
  return workers(
    8,
    () => next >= bytes,
    async () => {
      const at = next;
      next += MiB;
      if (at < bytes) await op(at / 512);
    },
  );
}

export async function runCloneBench(options: CloneBenchOptions): Promise<CloneReport> {
  const clones = options.clones ?? 100;
  const sizeBytes = options.baseSizeBytes ?? 10 * 1024 * MiB;
  const dataBytes = options.dataBytes ?? 1024 * MiB;
  const log = options.log ?? (() => {});
  const url = (name: string) => `s3://${options.bucket}/${options.prefix}/${name}`;
  // One client for the creation row, as a controller making many clones would hold.
  const real = new S3Store({ bucket: options.bucket, ...options.stackOptions });
  const stackOf = (name: string): StoreStack =>
    buildStoreStack(real, { prefix: `${options.prefix}/${name}`, url: url(name) });
  try {
    const base = await makeBase(url("base"), options.stackOptions, sizeBytes, dataBytes);
    log(
      `  clone          base: ${dataBytes / MiB} MiB written in ${base.writeSeconds.toFixed(1)} s`,
    );
    const creation = await createClones(stackOf, clones);
    log(
      `  clone          ${clones} clones in ${creation.sequentialSeconds.toFixed(2)} s ` +
        `(${creation.concurrentSeconds.toFixed(2)} s ${creation.concurrency} at a time)`,
    );
    const storage = await storeClones(url, options.stackOptions, clones, sizeBytes);
    log(
      `  clone          ${clones} writing clones: ${(storage.bytesWritten / MiB).toFixed(0)} MiB ` +
        `written, ${(storage.bytesStored / MiB).toFixed(0)} MiB stored`,
    );
    const coldRead = await coldReads(url, options.stackOptions, dataBytes, options.rounds);
    log(`  clone          cold read clone/base ${coldRead.ratio?.median.toFixed(2) ?? "-"}x`);
    return {
      base: { sizeBytes, dataBytes, chunkSizeBytes: MiB, writeSeconds: base.writeSeconds },
      creation,
      storage,
      coldRead,
    };
  } finally {
    await deletePrefix(real, `${options.prefix}/`).catch(() => 0);
    await real.close();
  }
}

/** The base: `dataBytes` of distinct chunks at its start, flushed, then snapshot "gold". */
async function makeBase(
  url: string,
  stackOptions: StoreStackOptions,
  sizeBytes: number,
  dataBytes: number,
): Promise<{ writeSeconds: number }> {
  await withStack(url, stackOptions, (stack) => createVolume(stack, { sizeBytes }));
  const device = await openVolume(openStoreStack(url, stackOptions));
  const block = Buffer.alloc(MiB);
  randomFillSync(block);
  const start = performance.now();
  await sequentialPass(dataBytes, async (sector) => {
    const chunk = Buffer.from(block);
    chunk.writeUInt32LE(sector, 0); // every chunk different
    await must(device.write(sector, [chunk]), "write");
  });
  await must(device.flush(), "flush");
  const writeSeconds = (performance.now() - start) / 1000;
  await must(device.snapshot(SNAPSHOT), "snapshot");
  await must(device.disconnect(), "disconnect");
  return { writeSeconds };
}

async function createClones(
  stackOf: (name: string) => StoreStack,
  clones: number,
): Promise<CloneReport["creation"]> {
  const base = stackOf("base");
  const requests = zeroCounts();
  const perCloneMs: number[] = [];
  const rgwBefore = rgwCounters();
  const start = performance.now();
  for (let i = 0; i < clones; i++) {
    const target = stackOf(`clone-${i}`);
    const began = performance.now();
    await cloneVolume(base, SNAPSHOT, target);
    perCloneMs.push(performance.now() - began);
    add(requests, target.counter.counts());
  }
  const sequentialSeconds = (performance.now() - start) / 1000;
  const rgwAfter = rgwCounters();
  add(requests, base.counter.counts());

  const concurrency = 16;
  let next = 0;
  const began = performance.now();
  await workers(
    concurrency,
    () => next >= clones,
    async () => {
      const i = next++;
      if (i < clones) await cloneVolume(base, SNAPSHOT, stackOf(`parallel-${i}`));
    },
  );
  const concurrentSeconds = (performance.now() - began) / 1000;
  for (let i = 0; i < clones; i++) {
    await deleteVolume(stackOf(`clone-${i}`));
    await deleteVolume(stackOf(`parallel-${i}`));
  }
  return {
    clones,
    sequentialSeconds,
    msPerClone: spreadOf(perCloneMs),
    concurrentSeconds,
    concurrency,
    requests,
    ...(rgwBefore === undefined || rgwAfter === undefined
      ? {}
      : { rgwRequests: rgwAfter.requests - rgwBefore.requests }),
  };
}

/** 4 whole chunks and 256 4 KiB blocks at random places, no two in one chunk. */
function scatteredWrites(sizeBytes: number): { offsetBytes: number; lengthBytes: number }[] {
  const chunks = Math.floor(sizeBytes / MiB);
  const taken = new Set<number>();
  const pick = (): number => {
    const chunk = Math.floor(Math.random() * chunks);
    if (taken.has(chunk)) return pick();
    taken.add(chunk);
    return chunk;
  };
  return [
    ...Array.from({ length: 4 }, () => ({ offsetBytes: pick() * MiB, lengthBytes: MiB })),
    ...Array.from({ length: 256 }, () => ({
      offsetBytes: pick() * MiB + Math.floor(Math.random() * 256) * 4096,
      lengthBytes: 4096,
    })),
  ];
}

async function storeClones(
  url: (name: string) => string,
  stackOptions: StoreStackOptions,
  clones: number,
  sizeBytes: number,
): Promise<CloneReport["storage"]> {
  const requests = zeroCounts();
  const data = Buffer.alloc(MiB);
  randomFillSync(data);
  let bytesWritten = 0;
  let bytesStored = 0;
  let next = 0;
  await workers(
    2,
    () => next >= clones,
    async () => {
      const i = next++;
      if (i >= clones) return;
      const target = openStoreStack(url(`writer-${i}`), stackOptions);
      await withStack(url("base"), stackOptions, (base) => cloneVolume(base, SNAPSHOT, target));
      const device = await openVolume(target);
      for (const { offsetBytes, lengthBytes } of scatteredWrites(sizeBytes)) {
        await must(device.write(offsetBytes / 512, [data.subarray(0, lengthBytes)]), "write");
        bytesWritten += lengthBytes;
      }
      await must(device.disconnect(), "disconnect");
      add(requests, target.counter.counts());
      await withStack(url(`writer-${i}`), stackOptions, async (counted) => {
        for await (const entry of listAll(counted.store, `${counted.prefix}/`)) {
          bytesStored += entry.sizeBytes;
        }
        await deleteVolume(counted);
      });
    },
  );
  return { clones, bytesWritten, bytesStored, requests };
}

async function coldReads(
  url: (name: string) => string,
  stackOptions: StoreStackOptions,
  dataBytes: number,
  rounds: number,
): Promise<CloneReport["coldRead"]> {
  await withStack(url("base"), stackOptions, (base) =>
    withStack(url("reader"), stackOptions, (reader) => cloneVolume(base, SNAPSHOT, reader)),
  );
  const cacheBytes = 16 * MiB;
  const read = async (name: string): Promise<number> => {
    const device: ChunkedBlockDevice = await openVolume(openStoreStack(url(name), stackOptions), {
      readOnly: true,
      cacheBytes,
    });
    const start = performance.now();
    await sequentialPass(dataBytes, (sector) =>
      must(device.read(sector, [Buffer.allocUnsafe(MiB)]), "read"),
    );
    const seconds = (performance.now() - start) / 1000;
    await device.disconnect();
    return dataBytes / seconds / 1e6;
  };
  const contender = (name: string): Contender<number> => ({
    name,
    turn: () => read(name),
    warmUp: async () => void (await read(name)),
  });
  const pairs = await interleave(contender("reader"), contender("base"), rounds, (mbps) => mbps);
  const ratio = spread(pairs.ratios);
  return {
    bytes: dataBytes,
    cacheBytes,
    cloneMBps: pairs.a,
    baseMBps: pairs.b,
    ratios: pairs.ratios,
    ...(ratio === undefined ? {} : { ratio }),
  };
}

/** The rows as a table, one line each. */
export function cloneTable(report: CloneReport): string[][] {
  const { base, creation, storage, coldRead } = report;
  const per = (n: number) => (n / creation.clones).toFixed(1).replace(/\.0$/, "");
  const r = creation.requests;
  const gib = (bytes: number) =>
    bytes < 1024 ** 3 ? `${(bytes / MiB).toFixed(0)} MiB` : `${(bytes / 1024 ** 3).toFixed(2)} GiB`;
  const mbps = (xs: readonly number[]) => spread(xs)?.median.toFixed(0) ?? "-";
  return [
    ["row", "result"],
    [
      `${creation.clones} clones, one after another`,
      `${creation.sequentialSeconds.toFixed(2)} s: ${creation.msPerClone.median.toFixed(1)} ms ` +
        `a clone (p90 ${creation.msPerClone.p90.toFixed(1)}, max ${creation.msPerClone.max.toFixed(1)})`,
    ],
    [
      `  requests per clone`,
      `${per(r.gets)} GET, ${per(r.puts)} PUT, ${per(r.lists)} LIST, ` +
        `${per(r.deletes + r.deleteBatches)} DELETE; ${per(r.bytesOut)} bytes out`,
    ],
    [
      `${creation.clones} clones, ${creation.concurrency} at a time`,
      `${creation.concurrentSeconds.toFixed(2)} s`,
    ],
    [
      `  for comparison: writing the base's data`,
      `${base.writeSeconds.toFixed(1)} s for ${gib(base.dataBytes)}`,
    ],
    [
      `${storage.clones} clones write 4 chunks + 256 x 4 KiB`,
      `${gib(storage.bytesWritten)} written, ${gib(storage.bytesStored)} stored ` +
        `(${(storage.bytesStored / storage.bytesWritten).toFixed(1)}x); ` +
        `${storage.clones} full copies: ${gib(storage.clones * base.dataBytes)}`,
    ],
    [
      `cold seq read 1M QD8, ${coldRead.cacheBytes / MiB} MiB cache`,
      `clone ${mbps(coldRead.cloneMBps)} MB/s, base ${mbps(coldRead.baseMBps)} MB/s: ` +
        (coldRead.ratio === undefined
          ? "-"
          : `${coldRead.ratio.median.toFixed(2)}x (${coldRead.ratio.min.toFixed(2)}-` +
            `${coldRead.ratio.max.toFixed(2)})`),
    ],
  ];
}
