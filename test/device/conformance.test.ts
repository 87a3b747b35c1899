/**
 * The block-interface conformance suite, run against every store: memory, a local directory,
 * and S3 on a real server.
 */

import { describe, expect, it } from "vitest";
import {
  InvalidArgumentError,
  ppError,
  ppWriteError,
  type BlockDevice,
  type Result,
} from "../../src/block/block-device.js";
import { chunkPrefix } from "../../src/volume/format.js";
import { listAll } from "../../src/store/object-store.js";
import { requireS3 } from "../support/s3-target.js";
import {
  fileBackend,
  memoryBackend,
  newTestVolume,
  pattern,
  s3Backend,
  splitSectors,
  type Backend,
} from "../support/volumes.js";

const CHUNK = 64 * 1024;
const SECTORS_PER_CHUNK = CHUNK / 512;
/** Sixteen chunks and a bit: the last chunk is partial. */
const SIZE_SECTORS = 16 * SECTORS_PER_CHUNK + 3;
const PARAMS = { sizeBytes: SIZE_SECTORS * 512, chunkSizeBytes: CHUNK };

const s3 = await requireS3("conformance suite on S3");
const backends: Backend[] = [memoryBackend, fileBackend(), ...(s3 ? [s3Backend(s3)] : [])];

function expectOk(result: Result<void, unknown>): void {
  expect(result).toEqual({ ok: true, value: undefined });
}

function expectInvalid(result: Result<void, { kind: string }>, message: RegExp): void {
  expect(result.ok).toBe(false);
  if (result.ok) return;
  expect(result.error.kind).toBe("Io");
  const cause = (result.error as { cause?: Error }).cause;
  expect(cause).toBeInstanceOf(InvalidArgumentError);
  expect(cause?.message).toMatch(message);
}

async function readSectors(
  device: BlockDevice,
  sector: number,
  sectors: number,
): Promise<Uint8Array> {
  const out = new Uint8Array(sectors * 512);
  expectOk(await device.read(sector, [out]));
  return out;
}

describe.each(backends)("block device on $name", (backend) => {
  const volume = (label: string) => newTestVolume(backend, label, PARAMS);

  it("reports its geometry", async () => {
    const device = await (await volume("info")).open();
    expect(await device.getInfo()).toEqual({
      readWrite: true,
      sectorSize: 512,
      sizeSectors: BigInt(SIZE_SECTORS),
    });
    expectOk(await device.disconnect());
  });

  it("reads a never-written volume as zeros", async () => {
    const device = await (await volume("zeros")).open();
    const data = await readSectors(device, 5, 3 * SECTORS_PER_CHUNK);
    expect(data.every((b) => b === 0)).toBe(true);
    expectOk(await device.disconnect());
  });

  it("round-trips an unaligned span across chunk boundaries, split differently", async () => {
    const device = await (await volume("span")).open();
    const first = SECTORS_PER_CHUNK - 7;
    const sectors = 2 * SECTORS_PER_CHUNK + 20;
    const data = pattern(1, first, sectors);
    expectOk(await device.write(first, splitSectors(data, [3, 200, 1, 64])));
    const back = new Uint8Array(data.length);
    expectOk(await device.read(BigInt(first), splitSectors(back, [129, 2])));
    expect(Buffer.from(back).equals(Buffer.from(data))).toBe(true);
    // The neighbours were not touched.
    expect((await readSectors(device, first - 1, 1)).every((b) => b === 0)).toBe(true);
    expect((await readSectors(device, first + sectors, 1)).every((b) => b === 0)).toBe(true);
    expectOk(await device.disconnect());
  });

  it("takes many small buffers in one request", async () => {
    const device = await (await volume("small")).open();
    const data = pattern(2, 300, 500);
    const buffers = splitSectors(data, [1]);
    expect(buffers).toHaveLength(500);
    expectOk(await device.write(300, buffers));
    expect(Buffer.from(await readSectors(device, 300, 500)).equals(Buffer.from(data))).toBe(true);
    expectOk(await device.disconnect());
  });

  it("writes and reads the last sector, in the partial last chunk", async () => {
    const v = await volume("last");
    const device = await v.open();
    const data = pattern(3, SIZE_SECTORS - 1, 1);
    expectOk(await device.write(SIZE_SECTORS - 1, [data]));
    expectOk(await device.flush());
    expectOk(await device.disconnect());
    const again = await v.open();
    expect(
      Buffer.from(await readSectors(again, SIZE_SECTORS - 1, 1)).equals(Buffer.from(data)),
    ).toBe(true);
    expectOk(await again.disconnect());
  });

  it("accepts an empty buffer list, even at the end of the device", async () => {
    const device = await (await volume("empty")).open();
    expectOk(await device.write(0, []));
    expectOk(await device.read(0, []));
    expectOk(await device.read(SIZE_SECTORS, []));
    expectOk(await device.write(SIZE_SECTORS, [new Uint8Array(0)]));
    expectOk(await device.disconnect());
  });

  it("rejects bad ranges and buffers without touching data", async () => {
    const device = await (await volume("bad")).open();
    const last = pattern(4, SIZE_SECTORS - 1, 1);
    expectOk(await device.write(SIZE_SECTORS - 1, [last]));

    expectInvalid(await device.read(SIZE_SECTORS + 1, []), /past the end/);
    expectInvalid(await device.write(SIZE_SECTORS - 1, [new Uint8Array(1024)]), /end past the end/);
    expectInvalid(
      await device.read(BigInt(SIZE_SECTORS), [new Uint8Array(512)]),
      /end past the end/,
    );
    expectInvalid(await device.write(0, [new Uint8Array(511)]), /not a whole number/);
    expectInvalid(await device.write(0, [new Uint8Array(512), new Uint8Array(513)]), /buffer 1/);
    expectInvalid(await device.read(-1, [new Uint8Array(512)]), /negative/);
    expectInvalid(await device.write(-1n, [new Uint8Array(512)]), /negative/);
    expectInvalid(await device.write(0.5, [new Uint8Array(512)]), /safe integer/);
    expectInvalid(await device.discard(SIZE_SECTORS - 1, 2), /end past the end/);
    expectInvalid(await device.discard(0, -1), /negative/);

    // The refused write of two sectors at the last sector did not land in part.
    expect(
      Buffer.from(await readSectors(device, SIZE_SECTORS - 1, 1)).equals(Buffer.from(last)),
    ).toBe(true);
    expect((await readSectors(device, 0, 2)).every((b) => b === 0)).toBe(true);
    expectOk(await device.disconnect());
  });

  it("answers Is_read_only to writes on a read-only open, and still reads", async () => {
    const v = await volume("ro");
    const writer = await v.open();
    const data = pattern(5, 10, 4);
    expectOk(await writer.write(10, [data]));
    expectOk(await writer.disconnect());

    const reader = await v.open({ readOnly: true });
    expect((await reader.getInfo()).readWrite).toBe(false);
    const write = await reader.write(0, [new Uint8Array(512)]);
    expect(write).toEqual({ ok: false, error: { kind: "Is_read_only" } });
    if (!write.ok) expect(ppWriteError(write.error)).toBe("attempted to write to a read-only disk");
    expect(await reader.discard(0, 1)).toEqual({ ok: false, error: { kind: "Is_read_only" } });
    expect(await reader.flush()).toEqual({ ok: false, error: { kind: "Is_read_only" } });
    expect(Buffer.from(await readSectors(reader, 10, 4)).equals(Buffer.from(data))).toBe(true);
    expectOk(await reader.disconnect());
  });

  it("answers Disconnected to every operation after disconnect", async () => {
    const device = await (await volume("disc")).open();
    expectOk(await device.disconnect());
    const disconnected = { ok: false, error: { kind: "Disconnected" } };
    expect(await device.read(0, [new Uint8Array(512)])).toEqual(disconnected);
    expect(await device.write(0, [new Uint8Array(512)])).toEqual(disconnected);
    expect(await device.flush()).toEqual(disconnected);
    expect(await device.discard(0, 1)).toEqual(disconnected);
    expect(await device.disconnect()).toEqual(disconnected);
    const read = await device.read(0, []);
    if (!read.ok) expect(ppError(read.error)).toMatch(/disconnected/);
  });

  it("keeps flushed data across close and reopen", async () => {
    const v = await volume("reopen");
    const device = await v.open({ writebackDelayMs: 60_000 });
    const a = pattern(6, 0, 3 * SECTORS_PER_CHUNK);
    const b = pattern(7, 9 * SECTORS_PER_CHUNK + 5, 11);
    expectOk(await device.write(0, [a]));
    expectOk(await device.write(9 * SECTORS_PER_CHUNK + 5, [b]));
    expectOk(await device.flush());
    // Not disconnected: a second opener sees what the flush made durable.
    const other = await v.open({ readOnly: true });
    expect(Buffer.from(await readSectors(other, 0, a.length / 512)).equals(Buffer.from(a))).toBe(
      true,
    );
    expect(
      Buffer.from(await readSectors(other, 9 * SECTORS_PER_CHUNK + 5, 11)).equals(Buffer.from(b)),
    ).toBe(true);
    expectOk(await other.disconnect());
    expectOk(await device.disconnect());
  });

  it("flushes dirty data on disconnect", async () => {
    const v = await volume("drain");
    const device = await v.open({ writebackDelayMs: 60_000 });
    const data = pattern(8, 77, 300);
    expectOk(await device.write(77, [data]));
    expectOk(await device.disconnect());
    const again = await v.open();
    expect(Buffer.from(await readSectors(again, 77, 300)).equals(Buffer.from(data))).toBe(true);
    expectOk(await again.disconnect());
  });

  it("makes a FUA write durable without a flush", async () => {
    const v = await volume("fua");
    const device = await v.open({ writebackDelayMs: 60_000 });
    const data = pattern(9, 1000, 8);
    expectOk(await device.write(1000, [data], { fua: true }));
    const other = await v.open({ readOnly: true });
    expect(Buffer.from(await readSectors(other, 1000, 8)).equals(Buffer.from(data))).toBe(true);
    expectOk(await other.disconnect());
    expectOk(await device.disconnect());
  });

  it("reads discarded ranges as zeros, and frees wholly discarded chunks", async () => {
    const v = await volume("discard");
    const device = await v.open();
    const all = pattern(10, 0, 6 * SECTORS_PER_CHUNK);
    expectOk(await device.write(0, [all]));
    expectOk(await device.flush());
    const stack = v.stack();
    const countChunks = async () => {
      let n = 0;
      for await (const _ of listAll(stack.store, chunkPrefix(stack.prefix))) n++;
      return n;
    };
    expect(await countChunks()).toBe(6);

    // From the middle of chunk 1 to the middle of chunk 4: chunks 2 and 3 wholly.
    const start = SECTORS_PER_CHUNK + 10;
    const count = 3 * SECTORS_PER_CHUNK;
    expectOk(await device.discard(start, count));
    const expected = Buffer.from(all);
    expected.fill(0, start * 512, (start + count) * 512);
    expect(Buffer.from(await readSectors(device, 0, all.length / 512)).equals(expected)).toBe(true);
    expectOk(await device.flush());
    expect(device.allocatedChunks()).toBe(4);
    expectOk(await device.disconnect());
    // Chunks 2 and 3 are empty tombstones now; the superseded objects of 1 to 4 are gone.
    expect(await countChunks()).toBe(6);

    const again = await v.open();
    // The next writer term sealed a map without them: the tombstones are garbage, and deleted.
    expect(await countChunks()).toBe(4);
    expect(Buffer.from(await readSectors(again, 0, all.length / 512)).equals(expected)).toBe(true);
    expectOk(await again.disconnect());
  });

  it("stores no object for a chunk written with zeros", async () => {
    const v = await volume("zerowrite");
    const device = await v.open();
    expectOk(await device.write(0, [new Uint8Array(CHUNK)]));
    expectOk(await device.write(SECTORS_PER_CHUNK, [pattern(11, SECTORS_PER_CHUNK, 1)]));
    expectOk(await device.flush());
    const stack = v.stack();
    const keys: string[] = [];
    for await (const e of listAll(stack.store, chunkPrefix(stack.prefix))) keys.push(e.key);
    expect(keys).toHaveLength(1);
    expect(keys[0]).toMatch(/chunks\/0000000000000001\.[0-9a-f]{20}$/);
    expectOk(await device.disconnect());
  });
});

describe.each(backends)("a snapshot opened read-only on $name", (backend) => {
  it("reads the pattern it was taken with, refuses every change, and checks its arguments", async () => {
    const v = await newTestVolume(backend, "snapshot-ro", PARAMS);
    const writer = await v.open();
    const all = pattern(40, 0, SIZE_SECTORS);
    expectOk(await writer.write(0, splitSectors(all, [7, 300, 129])));
    const taken = await writer.snapshot("ro");
    expect(taken.ok).toBe(true);
    // Overwritten after the snapshot: the snapshot must not see it.
    expectOk(await writer.write(0, [pattern(41, 0, SIZE_SECTORS)]));
    expectOk(await writer.discard(SECTORS_PER_CHUNK, 2 * SECTORS_PER_CHUNK));
    expectOk(await writer.disconnect());

    const device = await v.open({ snapshot: "ro" });
    expect(await device.getInfo()).toEqual({
      readWrite: false,
      sectorSize: 512,
      sizeSectors: BigInt(SIZE_SECTORS),
    });
    expect(Buffer.from(await readSectors(device, 0, SIZE_SECTORS)).equals(Buffer.from(all))).toBe(
      true,
    );
    const start = SECTORS_PER_CHUNK - 5;
    const span = await readSectors(device, start, 2 * SECTORS_PER_CHUNK + 9);
    expect(
      Buffer.from(span).equals(Buffer.from(all.subarray(start * 512, span.length + start * 512))),
    ).toBe(true);
    const refused = [
      await device.write(0, [new Uint8Array(512)]),
      await device.discard(0, 1),
      await device.flush(),
    ];
    for (const result of refused) expect(result.ok ? "ok" : result.error.kind).toBe("Is_read_only");
    expectInvalid(await device.read(SIZE_SECTORS, [new Uint8Array(512)]), /past the end|end/);
    expectOk(await device.disconnect());
    expect((await device.disconnect()).ok).toBe(false);
  });
});
