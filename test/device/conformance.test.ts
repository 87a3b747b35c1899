/**
 * The block-interface conformance suite, run against every store (memory, a local directory, S3
 * on a real server) and on three kinds of device: a new volume, a clone of a snapshot of a volume
 * holding a pattern, and that snapshot opened read-only (the parts of the suite that only read).
 *
 * Each device starts with known contents, `initial`: zeros for a new volume, the snapshot's
 * pattern for the clone and the snapshot. Every check compares with `initial` overlaid with what
 * the test wrote, so a clone that lost its base's data, or let the base's later writes through,
 * fails the same checks that a new volume passes.
 */

import { describe, expect, it } from "vitest";
import {
  InvalidArgumentError,
  ppError,
  ppWriteError,
  type BlockDevice,
  type Result,
} from "../../src/block/block-device.js";
import { cloneVolume } from "../../src/lifecycle/clone-lifecycle.js";
import type { OpenOptions } from "../../src/lifecycle/volume-lifecycle.js";
import { chunkPrefix } from "../../src/volume/format.js";
import { listAll } from "../../src/store/object-store.js";
import { requireS3 } from "../support/s3-target.js";
import {
  existingTestVolume,
  fileBackend,
  memoryBackend,
  newTestVolume,
  pattern,
  s3Backend,
  siblingUrl,
  splitSectors,
  type Backend,
  type TestVolume,
} from "../support/volumes.js";

const CHUNK = 64 * 1024;
const SECTORS_PER_CHUNK = CHUNK / 512;
/** Sixteen chunks and a bit: the last chunk is partial. */
const SIZE_SECTORS = 16 * SECTORS_PER_CHUNK + 3;
const SIZE_BYTES = SIZE_SECTORS * 512;
const CHUNKS = Math.ceil(SIZE_SECTORS / SECTORS_PER_CHUNK);
const PARAMS = { sizeBytes: SIZE_BYTES, chunkSizeBytes: CHUNK };

const s3 = await requireS3("conformance suite on S3");
const backends: Backend[] = [memoryBackend, fileBackend(), ...(s3 ? [s3Backend(s3)] : [])];

type Device = Awaited<ReturnType<TestVolume["open"]>>;

/** One device to run the suite on, as it starts. */
interface Fixture {
  /** The volume whose prefix holds what the device writes. */
  readonly volume: TestVolume;
  /** Open the device (a snapshot is always opened read-only). */
  open(options?: OpenOptions): Promise<Device>;
  /** What the device reads as before the test writes anything. */
  readonly initial: Buffer;
  /** The chunks that hold data before the test writes anything. */
  readonly initialChunks: ReadonlySet<number>;
}

/** A kind of device: how to make a fresh one. */
interface Subject {
  readonly name: string;
  readonly writable: boolean;
  make(label: string): Promise<Fixture>;
}

/**
 * A volume whose snapshot "gold" holds pattern 50 everywhere but in chunks 3 and 11 (never
 * written) and the first half of chunk 6 (zeros inside a stored chunk). After the snapshot, the
 * volume moves on: chunks 0 and 1 rewritten, chunk 3 written, chunk 5 discarded. A device that
 * starts from "gold" must see none of that.
 */
async function goldBase(
  backend: Backend,
): Promise<Omit<Fixture, "open" | "volume"> & { base: TestVolume }> {
  const base = await newTestVolume(backend, "gold", PARAMS);
  const initial = Buffer.from(pattern(50, 0, SIZE_SECTORS));
  for (const chunk of [3, 11]) initial.fill(0, chunk * CHUNK, (chunk + 1) * CHUNK);
  initial.fill(0, 6 * CHUNK, 6 * CHUNK + CHUNK / 2);
  const writer = await base.open();
  expectOk(await writer.write(0, splitSectors(initial, [7, 300, 129])));
  expect((await writer.snapshot("gold")).ok).toBe(true);
  expectOk(await writer.write(0, [pattern(51, 0, 2 * SECTORS_PER_CHUNK)]));
  expectOk(await writer.write(3 * SECTORS_PER_CHUNK, [pattern(52, 3 * SECTORS_PER_CHUNK, 9)]));
  expectOk(await writer.discard(5 * SECTORS_PER_CHUNK, SECTORS_PER_CHUNK));
  expectOk(await writer.disconnect());
  const initialChunks = new Set([...Array(CHUNKS).keys()].filter((c) => c !== 3 && c !== 11));
  return { base, initial, initialChunks };
}

function subjects(backend: Backend): Subject[] {
  // One base for every test of a backend: tests only read it, and the clones are their own.
  let gold: ReturnType<typeof goldBase> | undefined;
  const shared = () => (gold ??= goldBase(backend));
  return [
    {
      name: `a new volume on ${backend.name}`,
      writable: true,
      async make(label) {
        const volume = await newTestVolume(backend, label, PARAMS);
        return {
          volume,
          open: (options) => volume.open(options),
          initial: Buffer.alloc(SIZE_BYTES),
          initialChunks: new Set(),
        };
      },
    },
    {
      name: `a clone of a snapshot on ${backend.name}`,
      writable: true,
      async make(label) {
        const { base, initial, initialChunks } = await shared();
        const volume = existingTestVolume(backend, siblingUrl(base.url, `clone-${label}`));
        await cloneVolume(base.stack(), "gold", volume.stack());
        return { volume, open: (options) => volume.open(options), initial, initialChunks };
      },
    },
    {
      name: `a snapshot opened read-only on ${backend.name}`,
      writable: false,
      async make() {
        const { base, initial, initialChunks } = await shared();
        return {
          volume: base,
          open: (options) => base.open({ ...options, snapshot: "gold" }),
          initial,
          initialChunks,
        };
      },
    },
  ];
}

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

async function readSectors(device: BlockDevice, sector: number, sectors: number): Promise<Buffer> {
  const out = new Uint8Array(sectors * 512);
  expectOk(await device.read(sector, [out]));
  return Buffer.from(out);
}

/** `sectors` sectors of `bytes` from `sector`. */
function sectorsOf(bytes: Buffer, sector: number, sectors: number): Buffer {
  return bytes.subarray(sector * 512, (sector + sectors) * 512);
}

describe.each(backends.flatMap(subjects))("block device: $name", (subject) => {
  it("reports its geometry", async () => {
    const device = await (await subject.make("info")).open();
    expect(await device.getInfo()).toEqual({
      readWrite: subject.writable,
      sectorSize: 512,
      sizeSectors: BigInt(SIZE_SECTORS),
    });
    expectOk(await device.disconnect());
  });

  it("reads what it starts with (zeros, or its snapshot), however the request is split", async () => {
    const fixture = await subject.make("initial");
    const { initial } = fixture;
    const device = await fixture.open();
    const whole = new Uint8Array(SIZE_BYTES);
    expectOk(await device.read(0, splitSectors(whole, [129, 2, 300, 7])));
    expect(Buffer.from(whole).equals(initial)).toBe(true);
    // An unaligned span across three chunks, a run of one-sector buffers, the last sector.
    const first = SECTORS_PER_CHUNK - 7;
    const span = 2 * SECTORS_PER_CHUNK + 20;
    const back = new Uint8Array(span * 512);
    expectOk(await device.read(BigInt(first), splitSectors(back, [3, 200, 1, 64])));
    expect(Buffer.from(back).equals(sectorsOf(initial, first, span))).toBe(true);
    const small = splitSectors(new Uint8Array(500 * 512), [1]);
    expectOk(await device.read(6 * SECTORS_PER_CHUNK - 250, small));
    expect(Buffer.concat(small).equals(sectorsOf(initial, 6 * SECTORS_PER_CHUNK - 250, 500))).toBe(
      true,
    );
    expect(
      (await readSectors(device, SIZE_SECTORS - 1, 1)).equals(
        sectorsOf(initial, SIZE_SECTORS - 1, 1),
      ),
    ).toBe(true);
    expectOk(await device.disconnect());
  });

  it("accepts an empty buffer list, even at the end of the device", async () => {
    const device = await (await subject.make("empty")).open();
    expectOk(await device.read(0, []));
    expectOk(await device.read(SIZE_SECTORS, []));
    expectOk(await device.read(SIZE_SECTORS, [new Uint8Array(0)]));
    if (subject.writable) {
      expectOk(await device.write(0, []));
      expectOk(await device.write(SIZE_SECTORS, [new Uint8Array(0)]));
    }
    expectOk(await device.disconnect());
  });

  it("rejects bad ranges and buffers without touching data", async () => {
    const fixture = await subject.make("bad");
    const device = await fixture.open();
    const last = subject.writable
      ? pattern(4, SIZE_SECTORS - 1, 1)
      : sectorsOf(fixture.initial, SIZE_SECTORS - 1, 1);
    if (subject.writable) expectOk(await device.write(SIZE_SECTORS - 1, [last]));

    expectInvalid(await device.read(SIZE_SECTORS + 1, []), /past the end/);
    expectInvalid(
      await device.read(BigInt(SIZE_SECTORS), [new Uint8Array(512)]),
      /end past the end/,
    );
    expectInvalid(await device.read(0, [new Uint8Array(511)]), /not a whole number/);
    expectInvalid(await device.read(0, [new Uint8Array(512), new Uint8Array(513)]), /buffer 1/);
    expectInvalid(await device.read(-1, [new Uint8Array(512)]), /negative/);
    expectInvalid(await device.read(0.5, [new Uint8Array(512)]), /safe integer/);
    if (subject.writable) {
      expectInvalid(
        await device.write(SIZE_SECTORS - 1, [new Uint8Array(1024)]),
        /end past the end/,
      );
      expectInvalid(await device.write(0, [new Uint8Array(511)]), /not a whole number/);
      expectInvalid(await device.write(0, [new Uint8Array(512), new Uint8Array(513)]), /buffer 1/);
      expectInvalid(await device.write(-1n, [new Uint8Array(512)]), /negative/);
      expectInvalid(await device.write(0.5, [new Uint8Array(512)]), /safe integer/);
      expectInvalid(await device.discard(SIZE_SECTORS - 1, 2), /end past the end/);
      expectInvalid(await device.discard(0, -1), /negative/);
    }

    // The refused write of two sectors at the last sector did not land in part.
    expect((await readSectors(device, SIZE_SECTORS - 1, 1)).equals(Buffer.from(last))).toBe(true);
    expect((await readSectors(device, 0, 2)).equals(sectorsOf(fixture.initial, 0, 2))).toBe(true);
    expectOk(await device.disconnect());
  });

  it("answers Is_read_only to writes on a read-only open, and still reads", async () => {
    const fixture = await subject.make("ro");
    const expected = Buffer.from(fixture.initial);
    if (subject.writable) {
      const writer = await fixture.open();
      const data = pattern(5, 10, 4);
      expectOk(await writer.write(10, [data]));
      expectOk(await writer.disconnect());
      Buffer.from(data).copy(expected, 10 * 512);
    }

    const reader = await fixture.open({ readOnly: true });
    expect((await reader.getInfo()).readWrite).toBe(false);
    const write = await reader.write(0, [new Uint8Array(512)]);
    expect(write).toEqual({ ok: false, error: { kind: "Is_read_only" } });
    if (!write.ok) expect(ppWriteError(write.error)).toBe("attempted to write to a read-only disk");
    expect(await reader.discard(0, 1)).toEqual({ ok: false, error: { kind: "Is_read_only" } });
    expect(await reader.flush()).toEqual({ ok: false, error: { kind: "Is_read_only" } });
    expect(await reader.snapshot("nope")).toEqual({ ok: false, error: { kind: "Is_read_only" } });
    // Refused before its arguments are looked at: a bad write is still just read-only.
    expect(await reader.write(-1, [new Uint8Array(3)])).toEqual({
      ok: false,
      error: { kind: "Is_read_only" },
    });
    expect((await readSectors(reader, 0, 64)).equals(sectorsOf(expected, 0, 64))).toBe(true);
    expectOk(await reader.disconnect());
  });

  it("answers Disconnected to every operation after disconnect", async () => {
    const device = await (await subject.make("disc")).open();
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

  if (subject.writable) writableConformance(subject);
});

/** The parts of the suite that write. */
function writableConformance(subject: Subject): void {
  it("round-trips an unaligned span across chunk boundaries, split differently", async () => {
    const fixture = await subject.make("span");
    const device = await fixture.open();
    const first = SECTORS_PER_CHUNK - 7;
    const sectors = 2 * SECTORS_PER_CHUNK + 20;
    const data = pattern(1, first, sectors);
    expectOk(await device.write(first, splitSectors(data, [3, 200, 1, 64])));
    const back = new Uint8Array(data.length);
    expectOk(await device.read(BigInt(first), splitSectors(back, [129, 2])));
    expect(Buffer.from(back).equals(Buffer.from(data))).toBe(true);
    // The neighbours were not touched.
    const before = sectorsOf(fixture.initial, first - 1, 1);
    const after = sectorsOf(fixture.initial, first + sectors, 1);
    expect((await readSectors(device, first - 1, 1)).equals(before)).toBe(true);
    expect((await readSectors(device, first + sectors, 1)).equals(after)).toBe(true);
    expectOk(await device.disconnect());
  });

  it("takes many small buffers in one request", async () => {
    const device = await (await subject.make("small")).open();
    const data = pattern(2, 300, 500);
    const buffers = splitSectors(data, [1]);
    expect(buffers).toHaveLength(500);
    expectOk(await device.write(300, buffers));
    expect((await readSectors(device, 300, 500)).equals(Buffer.from(data))).toBe(true);
    expectOk(await device.disconnect());
  });

  it("writes and reads the last sector, in the partial last chunk", async () => {
    const fixture = await subject.make("last");
    const device = await fixture.open();
    const data = pattern(3, SIZE_SECTORS - 1, 1);
    expectOk(await device.write(SIZE_SECTORS - 1, [data]));
    expectOk(await device.flush());
    expectOk(await device.disconnect());
    const again = await fixture.open();
    const expected = Buffer.from(fixture.initial);
    Buffer.from(data).copy(expected, (SIZE_SECTORS - 1) * 512);
    const tail = 16 * SECTORS_PER_CHUNK;
    expect((await readSectors(again, tail, 3)).equals(sectorsOf(expected, tail, 3))).toBe(true);
    expectOk(await again.disconnect());
  });

  it("keeps flushed data across close and reopen", async () => {
    const fixture = await subject.make("reopen");
    const device = await fixture.open({ writebackDelayMs: 60_000 });
    const a = pattern(6, 0, 3 * SECTORS_PER_CHUNK);
    const b = pattern(7, 9 * SECTORS_PER_CHUNK + 5, 11);
    expectOk(await device.write(0, [a]));
    expectOk(await device.write(9 * SECTORS_PER_CHUNK + 5, [b]));
    expectOk(await device.flush());
    const expected = Buffer.from(fixture.initial);
    Buffer.from(a).copy(expected);
    Buffer.from(b).copy(expected, (9 * SECTORS_PER_CHUNK + 5) * 512);
    // Not disconnected: a second opener sees what the flush made durable.
    const other = await fixture.open({ readOnly: true });
    expect((await readSectors(other, 0, SIZE_SECTORS)).equals(expected)).toBe(true);
    expectOk(await other.disconnect());
    expectOk(await device.disconnect());
  });

  it("flushes dirty data on disconnect", async () => {
    const fixture = await subject.make("drain");
    const device = await fixture.open({ writebackDelayMs: 60_000 });
    const data = pattern(8, 77, 300);
    expectOk(await device.write(77, [data]));
    expectOk(await device.disconnect());
    const again = await fixture.open();
    const expected = Buffer.from(fixture.initial);
    Buffer.from(data).copy(expected, 77 * 512);
    expect((await readSectors(again, 0, SIZE_SECTORS)).equals(expected)).toBe(true);
    expectOk(await again.disconnect());
  });

  it("makes a FUA write durable without a flush", async () => {
    const fixture = await subject.make("fua");
    const device = await fixture.open({ writebackDelayMs: 60_000 });
    const data = pattern(9, 1000, 8);
    expectOk(await device.write(1000, [data], { fua: true }));
    const other = await fixture.open({ readOnly: true });
    expect((await readSectors(other, 1000, 8)).equals(Buffer.from(data))).toBe(true);
    expect((await readSectors(other, 1008, 8)).equals(sectorsOf(fixture.initial, 1008, 8))).toBe(
      true,
    );
    expectOk(await other.disconnect());
    expectOk(await device.disconnect());
  });

  it("reads discarded ranges as zeros, and frees wholly discarded chunks", async () => {
    const fixture = await subject.make("discard");
    const device = await fixture.open();
    const all = pattern(10, 0, 6 * SECTORS_PER_CHUNK);
    expectOk(await device.write(0, [all]));
    expectOk(await device.flush());
    const stack = fixture.volume.stack();
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
    const expected = Buffer.from(fixture.initial);
    Buffer.from(all).copy(expected);
    expected.fill(0, start * 512, (start + count) * 512);
    expect((await readSectors(device, 0, SIZE_SECTORS)).equals(expected)).toBe(true);
    expectOk(await device.flush());
    // Chunks 0, 1, 4 and 5, and the chunks past 5 the device started with.
    const allocated = 4 + [...fixture.initialChunks].filter((c) => c > 5).length;
    expect(device.allocatedChunks()).toBe(allocated);
    expectOk(await device.disconnect());
    // Chunks 2 and 3 are empty tombstones now; the superseded objects of 1 to 4 are gone.
    expect(await countChunks()).toBe(6);

    const again = await fixture.open();
    // The next writer term sealed a map without them: the tombstones are garbage, and deleted.
    expect(await countChunks()).toBe(4);
    expect((await readSectors(again, 0, SIZE_SECTORS)).equals(expected)).toBe(true);
    expect(again.allocatedChunks()).toBe(allocated);
    expectOk(await again.disconnect());
  });

  it("stores no object for a chunk written with zeros, only a tombstone over data", async () => {
    const fixture = await subject.make("zerowrite");
    const device = await fixture.open();
    expectOk(await device.write(0, [new Uint8Array(CHUNK)]));
    const one = pattern(11, SECTORS_PER_CHUNK, 1);
    expectOk(await device.write(SECTORS_PER_CHUNK, [one]));
    expectOk(await device.flush());
    const stack = fixture.volume.stack();
    const keys: string[] = [];
    for await (const e of listAll(stack.store, chunkPrefix(stack.prefix))) keys.push(e.key);
    // Chunk 0 held data before (a clone's base): an empty tombstone says it is zeros now.
    expect(keys).toEqual([
      ...(fixture.initialChunks.has(0)
        ? [expect.stringMatching(/chunks\/0000000000000000\.[0-9a-f]{20}\.zero$/)]
        : []),
      expect.stringMatching(/chunks\/0000000000000001\.[0-9a-f]{20}$/),
    ]);
    const expected = Buffer.from(fixture.initial);
    expected.fill(0, 0, CHUNK);
    Buffer.from(one).copy(expected, CHUNK);
    expectOk(await device.disconnect());
    const again = await fixture.open({ readOnly: true });
    expect(
      (await readSectors(again, 0, 2 * SECTORS_PER_CHUNK)).equals(expected.subarray(0, 2 * CHUNK)),
    ).toBe(true);
    expectOk(await again.disconnect());
  });
}
