/**
 * The NBD server at the protocol level, in this process, with a test client that can send
 * anything: negotiation option by option, the error each bad request gets, unaligned requests,
 * read-modify-write racing overlapping writes, pipelining with a backed-up socket, flow control,
 * and connections that break.
 */

import { afterAll, beforeAll, describe, expect, it } from "vitest";

import {
  IHAVEOPT,
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_WRITE,
  NBD_EINVAL,
  NBD_ENOSPC,
  NBD_EOVERFLOW,
  NBD_EPERM,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_NO_ZEROES,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_CACHE,
  NBD_FLAG_SEND_DF,
  NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_NAME,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_OPT_LIST,
  NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_POLICY,
  NBD_REP_ERR_TOO_BIG,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  NBD_REP_SERVER,
  NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_STATE_HOLE,
  NBD_STATE_ZERO,
} from "../../src/nbd/protocol.js";
import {
  encodeExportNameOption,
  encodeInfoOption,
  encodeMetaContextOption,
  encodeOption,
  encodeRequest,
  parseRepInfo,
  parseRepMetaContext,
  parseRepServer,
} from "../../src/nbd/protocol/client.js";
import type { ChunkedBlockDevice } from "../../src/device/chunked-block-device.js";
import type { NbdDevice } from "../../src/nbd/exports.js";
import { RangeLock } from "../../src/nbd/range-lock.js";
import { BufferPool } from "../../src/nbd/buffer-pool.js";
import { bytesAt, memoryServer, type MemoryServer } from "./harness.js";
import { RawClient } from "./raw-client.js";

const MiB = 1024 * 1024;
const SIZE = 16 * MiB;

const RW_FLAGS =
  NBD_FLAG_HAS_FLAGS |
  NBD_FLAG_SEND_FLUSH |
  NBD_FLAG_SEND_FUA |
  NBD_FLAG_SEND_TRIM |
  NBD_FLAG_SEND_WRITE_ZEROES |
  NBD_FLAG_SEND_FAST_ZERO |
  NBD_FLAG_SEND_CACHE |
  NBD_FLAG_CAN_MULTI_CONN;

let srv: MemoryServer;
const target = () => ({ port: srv.port });

beforeAll(async () => {
  srv = await memoryServer([
    { name: "disk", sizeBytes: SIZE, description: "the test disk" },
    { name: "ro", sizeBytes: 4 * MiB, readOnly: true },
    { name: "big-sectors", sizeBytes: 4 * MiB, sectorSizeBytes: 4096 },
  ]);
});

afterAll(async () => {
  await srv.close();
});

describe("negotiation", () => {
  it("greets with fixed newstyle and no zeroes, lists exports, carries on after unknown options", async () => {
    const c = await RawClient.connect(target());
    const { handshakeFlags } = await c.greeting();
    expect(handshakeFlags).toBe(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);

    c.sendOption(encodeOption(NBD_OPT_LIST));
    const list = await c.optionReplies();
    expect(list.map((r) => r.replyType)).toEqual([
      NBD_REP_SERVER,
      NBD_REP_SERVER,
      NBD_REP_SERVER,
      NBD_REP_ACK,
    ]);
    expect(parseRepServer(list[0]!.data)).toEqual({ name: "disk", description: "the test disk" });
    expect(list.slice(1, 3).map((r) => parseRepServer(r.data).name)).toEqual(["ro", "big-sectors"]);

    // This server has no TLS: STARTTLS gets NBD_REP_ERR_POLICY (with data, INVALID first).
    c.sendOption(encodeOption(NBD_OPT_STARTTLS));
    expect((await c.optionReply()).replyType).toBe(NBD_REP_ERR_POLICY);
    c.sendOption(encodeOption(NBD_OPT_STARTTLS, Buffer.from("junk")));
    expect((await c.optionReply()).replyType).toBe(NBD_REP_ERR_INVALID);
    for (const option of [99, 0x7fffffff]) {
      c.sendOption(encodeOption(option, Buffer.from("junk")));
      const [unsup] = await c.optionReplies();
      expect(unsup?.option).toBe(option);
      expect(unsup?.replyType).toBe(NBD_REP_ERR_UNSUP);
    }
    c.sendOption(encodeOption(NBD_OPT_LIST, Buffer.from("x")));
    expect((await c.optionReply()).replyType).toBe(NBD_REP_ERR_INVALID);
    // An option over 64 KiB is refused and skipped, not buffered; negotiation goes on.
    c.sendOption(encodeOption(NBD_OPT_INFO, Buffer.alloc(70_000)));
    expect((await c.optionReply()).replyType).toBe(NBD_REP_ERR_TOO_BIG);

    const negotiated = await c.go({ exportName: "disk" });
    expect(negotiated.sizeBytes).toBe(SIZE);
    expect(negotiated.transmissionFlags).toBe(RW_FLAGS | NBD_FLAG_SEND_DF);
    const w = c.write(0, Buffer.from("still works".padEnd(512)));
    await c.ok(w);
    c.close();
  });

  it("answers NBD_OPT_INFO and GO with the export, its name, description and block sizes", async () => {
    const c = await RawClient.connect(target());
    await c.greeting();
    c.sendOption(
      encodeInfoOption(NBD_OPT_INFO, "", [
        NBD_INFO_NAME,
        NBD_INFO_DESCRIPTION,
        NBD_INFO_BLOCK_SIZE,
      ]),
    );
    const replies = await c.optionReplies();
    expect(replies.at(-1)?.replyType).toBe(NBD_REP_ACK);
    const infos = replies
      .filter((r) => r.replyType === NBD_REP_INFO)
      .map((r) => parseRepInfo(r.data));
    expect(infos).toEqual([
      // No structured replies negotiated yet: no DF.
      { info: "export", sizeBytes: SIZE, transmissionFlags: RW_FLAGS },
      { info: "name", name: "disk" },
      { info: "description", description: "the test disk" },
      { info: "block-size", minimumBytes: 512, preferredBytes: 4096, maximumBytes: 32 * MiB },
    ]);

    // A client that does not ask for block sizes may send anything: minimum 1 is the truth.
    c.sendOption(encodeInfoOption(NBD_OPT_INFO, "big-sectors", []));
    const bare = (await c.optionReplies())
      .filter((r) => r.replyType === NBD_REP_INFO)
      .map((r) => parseRepInfo(r.data));
    expect(bare).toContainEqual({
      info: "block-size",
      minimumBytes: 1,
      preferredBytes: 4096,
      maximumBytes: 32 * MiB,
    });
    expect(bare.some((i) => i.info === "name")).toBe(false);

    c.sendOption(encodeInfoOption(NBD_OPT_GO, "nope", []));
    const [unknown] = await c.optionReplies();
    expect(unknown?.replyType).toBe(NBD_REP_ERR_UNKNOWN);

    const ro = await c.go({ exportName: "ro", structured: false, baseAllocation: false });
    expect(ro.transmissionFlags).toBe(
      NBD_FLAG_HAS_FLAGS |
        NBD_FLAG_READ_ONLY |
        NBD_FLAG_SEND_FLUSH |
        NBD_FLAG_SEND_CACHE |
        NBD_FLAG_CAN_MULTI_CONN,
    );
    const r = c.read(0, 4096);
    expect((await c.ok(r)).data).toEqual(Buffer.alloc(4096, 0x5a));
    c.close();
  });

  it("offers base:allocation only after structured replies, and only for the export it was set for", async () => {
    const c = await RawClient.connect(target());
    await c.greeting();
    c.sendOption(encodeMetaContextOption(NBD_OPT_SET_META_CONTEXT, "disk", ["base:allocation"]));
    expect((await c.optionReply()).replyType).toBe(NBD_REP_ERR_INVALID);
    c.sendOption(encodeOption(NBD_OPT_STRUCTURED_REPLY));
    expect((await c.optionReply()).replyType).toBe(NBD_REP_ACK);

    for (const queries of [[], ["base:"], ["base:allocation"]]) {
      c.sendOption(encodeMetaContextOption(NBD_OPT_LIST_META_CONTEXT, "disk", queries));
      const replies = await c.optionReplies();
      expect(replies.map((r) => r.replyType)).toEqual([NBD_REP_META_CONTEXT, NBD_REP_ACK]);
      expect(parseRepMetaContext(replies[0]!.data).name).toBe("base:allocation");
    }
    c.sendOption(encodeMetaContextOption(NBD_OPT_LIST_META_CONTEXT, "disk", ["qemu:dirty"]));
    expect((await c.optionReplies()).map((r) => r.replyType)).toEqual([NBD_REP_ACK]);
    c.sendOption(encodeMetaContextOption(NBD_OPT_SET_META_CONTEXT, "nope", ["base:allocation"]));
    expect((await c.optionReply()).replyType).toBe(NBD_REP_ERR_UNKNOWN);

    c.close();

    // Selected for "ro", then GO to "disk": no context there, so BLOCK_STATUS is refused.
    const d = await RawClient.connect(target());
    await d.greeting();
    const negotiated = await d.go({ exportName: "disk", metaContextExport: "ro" });
    expect(negotiated.contextId).toBe(1);
    expect((await d.reply(d.blockStatus(0, 512))).error).toBe(NBD_EINVAL);
    d.close();
  });

  it("enters transmission with NBD_OPT_EXPORT_NAME, the empty name meaning the default export", async () => {
    for (const noZeroes of [false, true]) {
      const c = await RawClient.connect(target());
      await c.greeting(NBD_FLAG_C_FIXED_NEWSTYLE | (noZeroes ? NBD_FLAG_C_NO_ZEROES : 0));
      const reply = await c.exportName("", noZeroes);
      expect(reply).toEqual({ sizeBytes: SIZE, flags: RW_FLAGS });
      await c.ok(c.write(0, Buffer.alloc(512, 3)));
      expect((await c.ok(c.read(0, 512))).data).toEqual(Buffer.alloc(512, 3));
      c.close();
    }
    const bad = await RawClient.connect(target());
    await bad.greeting();
    bad.sendOption(encodeExportNameOption("no-such-export"));
    await bad.closed();
    expect(bad.ended).toBe(true);
  });

  it("drops a client that sets unknown client flags or breaks the option framing", async () => {
    const flags = await RawClient.connect(target());
    await flags.greeting(NBD_FLAG_C_FIXED_NEWSTYLE | 0x80);
    await flags.closed();

    const magic = await RawClient.connect(target());
    await magic.greeting();
    magic.sendOption(encodeOption(NBD_OPT_LIST, new Uint8Array(0), 0, IHAVEOPT + 1n));
    await magic.closed();

    // A client without fixed newstyle may only ask for an export by name.
    const old = await RawClient.connect(target());
    await old.greeting(0);
    old.sendOption(encodeOption(NBD_OPT_LIST));
    await old.closed();
    expect([flags.ended, magic.ended, old.ended]).toEqual([true, true, true]);
  });
});

describe("requests", () => {
  it("gives each bad request the spec's error, and keeps serving after", async () => {
    for (const structured of [false, true]) {
      const c = await RawClient.open(target(), { exportName: "disk", structured });
      const cases: [string, bigint, number][] = [
        ["READ past the end", c.read(SIZE - 512, 1024), NBD_EINVAL],
        ["READ at a 2^63 offset", c.request(NBD_CMD_READ, 1n << 63n, 512), NBD_EINVAL],
        ["WRITE past the end", c.write(SIZE, Buffer.alloc(512)), NBD_ENOSPC],
        ["WRITE_ZEROES past the end", c.zero(SIZE - 512, 4096), NBD_ENOSPC],
        ["TRIM past the end", c.trim(SIZE, 512), NBD_EINVAL],
        ["CACHE past the end", c.cache(SIZE, 512), NBD_EINVAL],
        ["READ over 32 MiB", c.read(0, 32 * MiB + 512), NBD_EOVERFLOW],
        ["unknown command", c.request(42, 0, 512), NBD_EINVAL],
        ["unknown flag", c.read(0, 512, 1 << 9), NBD_EINVAL],
        ["NO_HOLE on WRITE", c.write(0, Buffer.alloc(512), NBD_CMD_FLAG_NO_HOLE), NBD_EINVAL],
        ["FAST_ZERO on TRIM", c.trim(0, 512, NBD_CMD_FLAG_FAST_ZERO), NBD_EINVAL],
        ["REQ_ONE on READ", c.read(0, 512, NBD_CMD_FLAG_REQ_ONE), NBD_EINVAL],
        ["FLUSH with a length", c.request(NBD_CMD_FLUSH, 0, 512), NBD_EINVAL],
        ["BLOCK_STATUS of length 0", c.blockStatus(0, 0), NBD_EINVAL],
      ];
      if (!structured) {
        cases.push(["DF without structured replies", c.read(0, 512, NBD_CMD_FLAG_DF), NBD_EINVAL]);
        cases.push(["BLOCK_STATUS without a context", c.blockStatus(0, 512), NBD_EINVAL]);
      }
      for (const [what, cookie, errno] of cases) {
        const reply = await c.reply(cookie);
        expect({ what, error: reply.error }).toEqual({ what, error: errno });
        if (structured) expect(reply.message.length).toBeGreaterThan(0);
      }
      const good = c.write(4096, bytesAt(1, 4096, 4096));
      await c.ok(good);
      expect((await c.ok(c.read(4096, 4096))).data).toEqual(bytesAt(1, 4096, 4096));
      c.disconnect();
      await c.closed();
    }
  });

  it("refuses writes, trims and zeroes on a read-only export with EPERM", async () => {
    const c = await RawClient.open(target(), { exportName: "ro" });
    expect((await c.reply(c.write(0, Buffer.alloc(512)))).error).toBe(NBD_EPERM);
    expect((await c.reply(c.trim(0, 512))).error).toBe(NBD_EPERM);
    expect((await c.reply(c.zero(0, 512))).error).toBe(NBD_EPERM);
    // FUA was not offered on a read-only export.
    expect((await c.reply(c.read(0, 512, NBD_CMD_FLAG_FUA))).error).toBe(NBD_EINVAL);
    await c.ok(c.flush());
    expect((await c.ok(c.read(0, 512))).data).toEqual(Buffer.alloc(512, 0x5a));
    c.close();
  });

  it("answers a 4 GiB WRITE header with EOVERFLOW at once, allocating nothing for it", async () => {
    const c = await RawClient.open(target(), { exportName: "disk" });
    const before = process.memoryUsage().arrayBuffers;
    const cookie = c.request(NBD_CMD_WRITE, 0, 0xffffffff);
    const reply = await c.reply(cookie, 5000);
    expect(reply.error).toBe(NBD_EOVERFLOW);
    expect(process.memoryUsage().arrayBuffers - before).toBeLessThan(64 * MiB);
    // The payload is owed, and discarded as it comes: the server is still reading.
    c.socket.write(Buffer.alloc(8 * MiB));
    const other = await RawClient.open(target(), { exportName: "disk" });
    await other.ok(other.read(0, 512));
    other.close();
    c.close();
  });

  it("replies to READ with one OFFSET_DATA chunk under structured replies, and honours DF", async () => {
    const c = await RawClient.open(target(), { exportName: "disk" });
    await c.ok(c.write(MiB, bytesAt(7, MiB, 64 * 1024)));
    const reply = await c.ok(c.read(MiB, 64 * 1024, NBD_CMD_FLAG_DF));
    expect(reply.chunkTypes).toEqual([NBD_REPLY_TYPE_OFFSET_DATA]);
    expect(reply.data).toEqual(bytesAt(7, MiB, 64 * 1024));
    const failedRead = await c.reply(c.read(SIZE, 512));
    expect(failedRead.chunkTypes).toEqual([NBD_REPLY_TYPE_ERROR]);
    const empty = await c.ok(c.read(0, 0));
    expect(empty.data?.length).toBe(0);
    c.close();
  });

  it("serves unaligned reads, writes and zeroes exactly, by read-modify-write", async () => {
    const c = await RawClient.open(target(), { exportName: "disk" });
    const base = 2 * MiB;
    const model = Buffer.from(bytesAt(3, base, 64 * 1024));
    await c.ok(c.write(base, model));
    const edits: [string, number, number][] = [
      ["write", 3, 11], // inside one sector
      ["write", 500, 30], // across a sector boundary
      ["write", 1000, 3000], // several sectors, both edges partial
      ["write", 4096 + 7, 512], // one sector's worth, misaligned
      ["zero", 8192 + 100, 1000],
      ["zero", 12288 + 5, 3],
      ["write", 16384, 700], // aligned start, partial end
      ["zero", 20480 + 300, 212], // partial start, aligned end
    ];
    for (const [i, [kind, at, length]] of edits.entries()) {
      if (kind === "write") {
        const data = bytesAt(100 + i, at, length);
        await c.ok(c.write(base + at, data));
        data.copy(model, at);
      } else {
        await c.ok(c.zero(base + at, length, i % 2 === 0 ? NBD_CMD_FLAG_NO_HOLE : 0));
        model.fill(0, at, at + length);
      }
    }
    expect((await c.ok(c.read(base, model.length))).data).toEqual(model);
    for (const [at, length] of [
      [1, 1],
      [511, 2],
      [777, 5000],
      [8192 + 99, 1002],
    ] as const) {
      expect((await c.ok(c.read(base + at, length))).data).toEqual(model.subarray(at, at + length));
    }
    // A 4 KiB-sector export too.
    const big = await RawClient.open(target(), { exportName: "big-sectors" });
    await big.ok(big.write(4096 * 3 + 10, Buffer.from("hello")));
    const got = (await big.ok(big.read(4096 * 3, 4096))).data!;
    expect(got.subarray(10, 15).toString()).toBe("hello");
    expect(got.subarray(0, 10)).toEqual(Buffer.alloc(10));
    big.close();
    c.close();
  });

  it("loses no byte when unaligned writes race overlapping writes on two connections", async () => {
    const a = await RawClient.open(target(), { exportName: "disk" });
    const b = await RawClient.open(target(), { exportName: "disk" });
    const base = 4 * MiB;
    const span = 16 * 1024;
    await a.ok(a.write(base, Buffer.alloc(span, 0xee)));
    for (let round = 0; round < 5; round++) {
      // Disjoint byte ranges that share sectors: every byte's final value is determined.
      const expected = Buffer.alloc(span, 0xee);
      const cookies: [RawClient, bigint][] = [];
      let at = 0;
      let i = 0;
      while (at < span) {
        const length = Math.min(span - at, 1 + ((i * 37 + round * 11) % 700));
        const data = bytesAt(1000 * round + i, at, length);
        data.copy(expected, at);
        const client = i % 2 === 0 ? a : b;
        // Every fourth piece is rounded out to whole sectors and written aligned, then its
        // neighbours' bytes are written by other requests: aligned writes race RMWs too.
        cookies.push([client, client.write(base + at, data)]);
        at += length;
        i++;
      }
      for (const [client, cookie] of cookies) await client.ok(cookie);
      expect((await a.ok(a.read(base, span))).data).toEqual(expected);
    }
    a.close();
    b.close();
  });

  it("reports holes and data with BLOCK_STATUS, chunk by chunk, and honours REQ_ONE", async () => {
    const c = await RawClient.open(target(), { exportName: "disk" });
    const chunk = 256 * 1024;
    const base = 8 * MiB;
    await c.ok(c.trim(base, 8 * chunk));
    await c.ok(c.write(base + 2 * chunk + 100, Buffer.alloc(1000, 1)));
    await c.ok(c.write(base + 5 * chunk, Buffer.alloc(chunk, 2)));
    const hole = NBD_STATE_HOLE | NBD_STATE_ZERO;
    const reply = await c.ok(c.blockStatus(base, 8 * chunk));
    expect(reply.contextId).toBe(1);
    expect(reply.extents).toEqual([
      { length: 2 * chunk, statusFlags: hole },
      { length: chunk, statusFlags: 0 },
      { length: 2 * chunk, statusFlags: hole },
      { length: chunk, statusFlags: 0 },
      { length: 2 * chunk, statusFlags: hole },
    ]);
    const one = await c.ok(c.blockStatus(base + 100, 8 * chunk, NBD_CMD_FLAG_REQ_ONE));
    expect(one.extents).toEqual([{ length: 2 * chunk - 100, statusFlags: hole }]);
    // Zeroing a whole chunk makes it a hole again.
    await c.ok(c.zero(base + 5 * chunk, chunk, NBD_CMD_FLAG_FAST_ZERO));
    const after = await c.ok(c.blockStatus(base + 4 * chunk, 2 * chunk));
    expect(after.extents).toEqual([{ length: 2 * chunk, statusFlags: hole }]);
    expect((await c.ok(c.read(base + 5 * chunk, chunk))).data).toEqual(Buffer.alloc(chunk));
    c.close();
  });

  it("flushes, caches, and makes FUA writes durable", async () => {
    const c = await RawClient.open(target(), { exportName: "disk" });
    const device = srv.devices[0]!;
    await c.ok(c.flush());
    await c.ok(c.write(10 * MiB, bytesAt(9, 0, 256 * 1024), NBD_CMD_FLAG_FUA));
    expect(device.cacheStats().dirtyBytes).toBe(0);
    await c.ok(c.write(11 * MiB, bytesAt(9, 0, 4096)));
    expect(device.cacheStats().dirtyBytes).toBeGreaterThan(0);
    await c.ok(c.flush());
    expect(device.cacheStats().dirtyBytes).toBe(0);
    await c.ok(c.trim(11 * MiB, 4096, NBD_CMD_FLAG_FUA));
    expect(device.cacheStats().dirtyBytes).toBe(0);
    await c.ok(c.cache(10 * MiB, 6 * MiB));
    await c.ok(c.request(NBD_CMD_BLOCK_STATUS, 0, 512));
    c.close();
  });
});

describe("pipelining and flow control", () => {
  it("sends each READ the data it read, even when a later WRITE changes it while the reply waits in a backed-up socket", async () => {
    const c = await RawClient.open(target(), { exportName: "disk" });
    const base = 12 * MiB;
    const ranges = 8;
    const old = (i: number) => bytesAt(500 + i, 0, 4096);
    const fresh = (i: number) => bytesAt(900 + i, 0, 4096);
    for (let i = 0; i < ranges; i++) await c.ok(c.write(base + i * 8192, old(i)));

    c.socket.pause(); // stop reading replies: the server's socket backs up
    const fillers: bigint[] = [];
    for (let i = 0; i < 48; i++) fillers.push(c.read(0, MiB));
    // Their replies fill the socket first, whether they were fetched or answered from memory.
    await new Promise((r) => setTimeout(r, 300));
    const reads: bigint[] = [];
    for (let i = 0; i < ranges; i++) reads.push(c.read(base + i * 8192, 4096));
    await new Promise((r) => setTimeout(r, 300)); // the reads have run; their replies are queued
    const writes: bigint[] = [];
    for (let i = 0; i < ranges; i++) writes.push(c.write(base + i * 8192, fresh(i)));
    await new Promise((r) => setTimeout(r, 300)); // the writes have run too
    c.socket.resume();

    for (const f of fillers) await c.ok(f);
    for (let i = 0; i < ranges; i++) expect((await c.ok(reads[i]!)).data).toEqual(old(i));
    for (const w of writes) await c.ok(w);
    for (let i = 0; i < ranges; i++) {
      expect((await c.ok(c.read(base + i * 8192, 4096))).data).toEqual(fresh(i));
    }
    c.close();
  });

  it("sends each large READ the data it read: the cache memory it lends is copied before any change", async () => {
    // Reads of whole chunks are sent from the page's own memory (no copy); a write, a partial
    // zero or a discard of the page while a reply waits must not reach the reply.
    const c = await RawClient.open(target(), { exportName: "disk" });
    const chunk = 256 * 1024; // the harness's chunk size
    const base = 14 * MiB;
    const old = (i: number) => bytesAt(300 + i, 0, chunk);
    for (let i = 0; i < 4; i++) await c.ok(c.write(base + i * chunk, old(i)));

    c.socket.pause();
    const fillers: bigint[] = [];
    for (let i = 0; i < 48; i++) fillers.push(c.read(0, MiB));
    // Their replies fill the socket first, whether they were fetched or not.
    await new Promise((r) => setTimeout(r, 300));
    const reads: bigint[] = [];
    for (let i = 0; i < 4; i++) reads.push(c.read(base + i * chunk, chunk));
    await new Promise((r) => setTimeout(r, 300)); // the reads have run; their replies are queued
    const changes = [
      c.write(base + 4096, bytesAt(700, 0, 4096)),
      c.write(base + chunk, bytesAt(701, 0, chunk)),
      c.zero(base + 2 * chunk + 8192, 4096),
      c.trim(base + 3 * chunk, chunk),
    ];
    await new Promise((r) => setTimeout(r, 300)); // the changes have run too
    c.socket.resume();

    for (const f of fillers) await c.ok(f);
    for (let i = 0; i < 4; i++) expect((await c.ok(reads[i]!)).data).toEqual(old(i));
    for (const change of changes) await c.ok(change);
    const now = (await c.ok(c.read(base, 4 * chunk))).data!;
    expect(now.subarray(4096, 8192)).toEqual(bytesAt(700, 0, 4096));
    expect(now.subarray(chunk, 2 * chunk)).toEqual(bytesAt(701, 0, chunk));
    expect(now.subarray(2 * chunk + 8192, 2 * chunk + 12288)).toEqual(Buffer.alloc(4096));
    expect(now.subarray(3 * chunk)).toEqual(Buffer.alloc(chunk));
    c.close();
  });

  it("answers thousands of pipelined requests out of order, each with its own cookie", async () => {
    const c = await RawClient.open(target(), { exportName: "disk", structured: false });
    const base = 14 * MiB;
    const writes = [];
    for (let i = 0; i < 256; i++) writes.push(c.write(base + i * 4096, bytesAt(i, 0, 4096)));
    const reads = [];
    for (let round = 0; round < 8; round++) {
      for (let i = 0; i < 256; i++) reads.push([i, c.read(base + i * 4096, 4096)] as const);
    }
    for (const w of writes) await c.ok(w);
    for (const [i, cookie] of reads) {
      const reply = await c.ok(cookie);
      // Each read ran after or alongside its write; either way it is all old or all new.
      const data = Buffer.from(reply.data!);
      expect(data.equals(bytesAt(i, 0, 4096)) || data.equals(Buffer.alloc(4096))).toBe(true);
    }
    for (let i = 0; i < 256; i += 17) {
      expect((await c.ok(c.read(base + i * 4096, 4096))).data).toEqual(bytesAt(i, 0, 4096));
    }
    c.close();
  });
});

describe("flow control with a slow device", () => {
  let slow: MemoryServer;
  let peak = { ops: 0, bytes: 0 };
  let now = { ops: 0, bytes: 0 };

  function slowDevice(device: ChunkedBlockDevice): NbdDevice {
    const track = async <T>(bytes: number, op: () => Promise<T>): Promise<T> => {
      now = { ops: now.ops + 1, bytes: now.bytes + bytes };
      peak = { ops: Math.max(peak.ops, now.ops), bytes: Math.max(peak.bytes, now.bytes) };
      await new Promise((r) => setTimeout(r, 5));
      try {
        return await op();
      } finally {
        now = { ops: now.ops - 1, bytes: now.bytes - bytes };
      }
    };
    const size = (buffers: readonly Uint8Array[]) => buffers.reduce((n, b) => n + b.length, 0);
    return {
      getInfo: () => device.getInfo(),
      read: (s, b) => track(size(b), () => device.read(s, b)),
      write: (s, b, o) => track(size(b), () => device.write(s, b, o)),
      flush: () => device.flush(),
      discard: (s, n) => device.discard(s, n),
      disconnect: () => device.disconnect(),
      prefetch: (s, n) => device.prefetch(s, n),
      allocationMap: (o, l) => device.allocationMap(o, l),
    };
  }

  beforeAll(async () => {
    slow = await memoryServer([{ name: "slow", sizeBytes: 64 * MiB, wrap: slowDevice }], {
      limits: { maxInFlightRequests: 8, maxInFlightBytes: 256 * 1024 },
    });
  });
  afterAll(async () => {
    await slow.close();
  });

  it("never runs more requests or buffers more bytes than its bounds, and stops reading meanwhile", async () => {
    peak = { ops: 0, bytes: 0 };
    const c = await RawClient.open({ port: slow.port }, { structured: false });
    const cookies: bigint[] = [];
    const piece = 64 * 1024;
    for (let i = 0; i < 400; i++) cookies.push(c.write((i % 200) * piece, bytesAt(i, 0, piece)));
    // 25 MiB sent against a 256 KiB budget: the server stopped reading, so our side backs up.
    await new Promise((r) => setTimeout(r, 100));
    expect(c.socket.writableLength).toBeGreaterThan(8 * MiB);
    for (const cookie of cookies) await c.ok(cookie);
    expect(peak.ops).toBeLessThanOrEqual(8);
    expect(peak.bytes).toBeLessThanOrEqual(256 * 1024);
    expect(peak.ops).toBeGreaterThanOrEqual(2); // it did pipeline
    const read = await c.ok(c.read(199 * piece, piece));
    expect(read.data).toEqual(bytesAt(399, 0, piece));
    c.close();
  });

  it("stops reading from a client that does not read its replies, and serves it when it does", async () => {
    const c = await RawClient.open({ port: slow.port }, { structured: true });
    c.socket.pause();
    const cookies: bigint[] = [];
    for (let i = 0; i < 1000; i++) cookies.push(c.read((i % 64) * MiB, 32 * 1024));
    await new Promise((r) => setTimeout(r, 500));
    // Replies cannot drain, so slots stay taken: the connection is full and reads no further.
    const [connection] = slow.server.connections;
    expect(connection?.inFlight).toEqual({ requests: 8, bytes: 8 * 32 * 1024 });
    c.socket.resume();
    for (const cookie of cookies) expect((await c.ok(cookie)).data?.length).toBe(32 * 1024);
    c.close();
  });
});

describe("broken connections", () => {
  it("closes only the connection that sends a bad request magic", async () => {
    const good = await RawClient.open(target(), { exportName: "disk" });
    const bad = await RawClient.open(target(), { exportName: "disk" });
    bad.socket.write(
      encodeRequest({ flags: 0, type: 0, cookie: 1n, offset: 0, length: 512, magic: 0x12345678 }),
    );
    await bad.closed();
    await good.ok(good.read(0, 512));
    good.close();
  });

  it("never applies a WRITE whose payload was cut off by a vanishing client", async () => {
    const c = await RawClient.open(target(), { exportName: "disk" });
    const at = 15 * MiB;
    await c.ok(c.write(at, Buffer.alloc(64 * 1024, 0x11)));
    const header = encodeRequest({
      flags: 0,
      type: NBD_CMD_WRITE,
      cookie: 99n,
      offset: at,
      length: 64 * 1024,
    });
    c.socket.write(header);
    c.socket.write(Buffer.alloc(32 * 1024, 0x22));
    await new Promise((r) => setTimeout(r, 50));
    c.close();
    const d = await RawClient.open(target(), { exportName: "disk" });
    expect((await d.ok(d.read(at, 64 * 1024))).data).toEqual(Buffer.alloc(64 * 1024, 0x11));
    d.close();
  });

  it("on shutdown answers what it admitted, then closes, and refuses new connections", async () => {
    let running = 0;
    const delayed = (device: ChunkedBlockDevice): NbdDevice => ({
      getInfo: () => device.getInfo(),
      read: (s, b) => device.read(s, b),
      write: async (s, b, o) => {
        running++;
        await new Promise((r) => setTimeout(r, 100));
        running--;
        return device.write(s, b, o);
      },
      flush: () => device.flush(),
      discard: (s, n) => device.discard(s, n),
      disconnect: () => device.disconnect(),
      prefetch: (s, n) => device.prefetch(s, n),
      allocationMap: (o, l) => device.allocationMap(o, l),
    });
    const own = await memoryServer([{ name: "x", sizeBytes: 8 * MiB, wrap: delayed }]);
    const c = await RawClient.open({ port: own.port }, { structured: false });
    const writes = [];
    for (let i = 0; i < 32; i++) writes.push(c.write(i * 4096, bytesAt(i, 0, 4096)));
    while (running < 32) await new Promise((r) => setTimeout(r, 5));
    const closing = own.server.close();
    for (const w of writes) await c.ok(w);
    await closing;
    await c.closed();
    await expect(RawClient.open({ port: own.port })).rejects.toThrow();
    const device = own.devices[0]!;
    const back = Buffer.alloc(4096);
    expect((await device.read(31 * 8, [back])).ok).toBe(true);
    expect(back).toEqual(bytesAt(31, 0, 4096));
    await device.disconnect();
  });
});

describe("shutdown with a client that stops reading", () => {
  it("cuts the connection after the drain timeout instead of waiting forever", async () => {
    const own = await memoryServer([{ name: "x", sizeBytes: 64 * MiB }], { drainTimeoutMs: 300 });
    const c = await RawClient.open({ port: own.port });
    c.socket.pause();
    for (let i = 0; i < 48; i++) c.read(i * MiB, MiB);
    await new Promise((r) => setTimeout(r, 300));
    const started = Date.now();
    await own.server.close();
    expect(Date.now() - started).toBeLessThan(3000);
    expect(Date.now() - started).toBeGreaterThanOrEqual(250);
    c.socket.resume();
    await c.closed();
    await Promise.all(own.devices.map((d) => d.disconnect()));
  });
});

describe("range lock", () => {
  it("lets shared holders overlap, makes exclusive ones wait, and serves waiters in order", async () => {
    const lock = new RangeLock();
    const s1 = lock.tryAcquire(0, 100, false)!;
    const s2 = lock.tryAcquire(50, 150, false)!;
    expect(s2).toBeDefined();
    expect(lock.tryAcquire(90, 95, true)).toBeUndefined();
    const order: string[] = [];
    const x = lock.acquire(90, 95, true).then((h) => {
      order.push("x");
      return h;
    });
    // A shared request behind a waiting exclusive one it overlaps waits too (no starvation)...
    const s3 = lock.acquire(0, 200, false).then((h) => {
      order.push("s3");
      return h;
    });
    // ...but one that overlaps nothing exclusive goes at once.
    expect(lock.tryAcquire(1000, 2000, false)).toBeDefined();
    lock.release(s1);
    await Promise.resolve();
    expect(order).toEqual([]);
    lock.release(s2);
    const xh = await x;
    expect(order).toEqual(["x"]);
    lock.release(xh);
    lock.release(await s3);
    expect(order).toEqual(["x", "s3"]);
    expect(() => lock.release(xh)).toThrow();
  });
});

describe("buffer pool", () => {
  it("reuses a buffer only once it is given back, once, and keeps at most its bound", () => {
    const pool = new BufferPool(3 * 1024 * 1024);
    const a = pool.take(MiB);
    const b = pool.take(MiB - 512);
    expect(a.length).toBe(MiB);
    expect(b.length).toBe(MiB - 512);
    expect(a.buffer).not.toBe(b.buffer); // both lent at once: distinct memory
    pool.give(b.subarray(512)); // not the start of a lent buffer: ignored
    expect(pool.retainedBytes).toBe(0);
    pool.give(b);
    pool.give(b); // twice: ignored
    expect(pool.retainedBytes).toBe(MiB);
    const c = pool.take(700 * 1024);
    expect(c.buffer).toBe(b.buffer); // same 1 MiB class
    expect(pool.retainedBytes).toBe(0);
    const d = pool.take(MiB);
    expect(d.buffer).not.toBe(b.buffer); // c still holds it
    for (const x of [a, c, d, pool.take(MiB)]) pool.give(x);
    expect(pool.retainedBytes).toBe(3 * MiB); // the fourth was dropped
    pool.give(Buffer.alloc(MiB)); // never lent: ignored
    expect(pool.retainedBytes).toBe(3 * MiB);
    expect(pool.take(100).length).toBe(100); // small ones are not pooled
  });
});
