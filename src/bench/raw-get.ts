/**
 * Raw GETs: whole 1 MiB objects fetched at a fixed number in flight, through an `ObjectStore`
 * (the same `S3Store` and GET path that s3blk's chunk reads take), with nothing above it: no
 * cache, no checksums, no NBD. Its figure is the ceiling a cold read can approach on this
 * server, and the client CPU each MiB costs shows what the GET path itself spends.
 */

import type { ObjectStore } from "../store/object-store.js";
import type { FioResult } from "./fio.js";

export interface RawGetOptions {
  readonly store: ObjectStore;
  /** The objects, read round-robin. */
  readonly keys: readonly string[];
  readonly inFlight: number;
  readonly seconds: number;
}

/** What one run measured, shaped as a fio result, plus the client's CPU per MiB. */
export interface RawGetResult extends FioResult {
  /** This process's CPU time (user + system) per MiB fetched, ms. */
  readonly cpuMsPerMiB: number;
}

/** Store `count` objects of `sizeBytes` under `prefix`, `inFlight` at a time. */
export async function putObjects(
  store: ObjectStore,
  prefix: string,
  count: number,
  sizeBytes: number,
): Promise<string[]> {
  const keys = Array.from({ length: count }, (_, i) => `${prefix}/object-${i}`);
  const body = Buffer.alloc(sizeBytes, 0x5a);
  for (let i = 0; i < keys.length; i += 16) {
    await Promise.all(keys.slice(i, i + 16).map((key) => store.put(key, body)));
  }
  return keys;
}

export async function runRawGet(options: RawGetOptions): Promise<RawGetResult> {
  const { store, keys, inFlight } = options;
  let next = 0;
  let bytes = 0;
  let requests = 0;
  let latencyUs = 0;
  const cpuBefore = process.cpuUsage();
  const startedMs = performance.now();
  const deadlineMs = startedMs + options.seconds * 1000;
  await Promise.all(
    Array.from({ length: inFlight }, async () => {
      while (performance.now() < deadlineMs) {
        const key = keys[next++ % keys.length]!;
        const sentMs = performance.now();
        const got = await store.get(key);
        if (got === undefined) throw new Error(`raw GET: ${key} is missing`);
        latencyUs += (performance.now() - sentMs) * 1000;
        bytes += got.body.byteLength;
        requests++;
      }
    }),
  );
  const seconds = (performance.now() - startedMs) / 1000;
  const cpu = process.cpuUsage(cpuBefore);
  return {
    bytesPerSecond: bytes / seconds,
    iops: requests / seconds,
    latencyUsMean: requests === 0 ? 0 : latencyUs / requests,
    cpuMsPerMiB: bytes === 0 ? 0 : (cpu.user + cpu.system) / 1000 / (bytes / 2 ** 20),
  };
}
