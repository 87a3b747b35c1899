/**
 * `s3blk serve` as users meet it: the built CLI as a process, and NBD clients nobody here wrote
 * (nbdinfo, qemu-io, qemu-img, nbdcopy, fio, nbdsh), against a volume on the local store and on
 * S3. Tools that are missing skip their tests with a line saying so (and fail under CI=true).
 */

import { randomFillSync } from "node:crypto";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

import { requireS3 } from "../support/s3-target.js";
import {
  fileServeBackend,
  missingTools,
  nbdsh,
  run,
  s3ServeBackend,
  startServe,
  type ServeBackend,
  type ServeProcess,
} from "./harness.js";

const MiB = 1024 * 1024;
const missing = missingTools("NBD client suite", [
  "nbdinfo",
  "qemu-io",
  "qemu-img",
  "nbdcopy",
  "fio",
  "nbdsh",
]);
const without = (...tools: string[]) => tools.some((t) => missing.includes(t));
const s3 = await requireS3("NBD client suite against S3");
const backends: ServeBackend[] = [
  fileServeBackend(),
  ...(s3 === undefined ? [] : [s3ServeBackend(s3)]),
];
const work = mkdtempSync(path.join(tmpdir(), "s3blk-clients-"));

interface MapEntry {
  offset: number;
  length: number;
  type: number;
  description: string;
}

describe.each(backends)("real NBD clients against s3blk serve on $name", (backend) => {
  let serve: ServeProcess;
  let uri: string;
  let name: string;

  beforeAll(async () => {
    const url = backend.newUrl("clients");
    name = url.slice(url.lastIndexOf("/") + 1);
    serve = await startServe(backend, [url, "--create-size", "64M"]);
    uri = serve.uris[0]!;
  });

  afterAll(async () => {
    expect(await serve.stop()).toBe(0);
  });

  it.skipIf(without("nbdinfo"))(
    "nbdinfo --json tells the size, the flags and the block sizes",
    async () => {
      const result = await run("nbdinfo", ["--json", uri]);
      expect(result.code).toBe(0);
      const info = JSON.parse(result.stdout) as {
        structured: boolean;
        exports: Record<string, unknown>[];
      };
      expect(info.structured).toBe(true);
      expect(uri).toBe(`nbd://127.0.0.1:${/:(\d+)\//.exec(uri)?.[1]}/${name}`);
      expect(info.exports[0]).toMatchObject({
        "export-name": name,
        "export-size": 64 * MiB,
        contexts: ["base:allocation"],
        is_read_only: false,
        can_multi_conn: true,
        can_trim: true,
        can_fua: true,
        can_flush: true,
        can_zero: true,
        can_fast_zero: true,
        can_cache: true,
        can_df: true,
        block_size_minimum: 512,
        block_size_preferred: 4096,
        block_size_maximum: 32 * MiB,
      });
    },
  );

  it.skipIf(without("qemu-io", "nbdinfo"))(
    "qemu-io writes and reads patterns, unaligned too, and nbdinfo --map shows data where written and holes elsewhere",
    async () => {
      const io = await run("qemu-io", [
        "-f",
        "raw",
        ...["-c", "write -P 0xa1 4M 1M"],
        ...["-c", "write -P 0xb2 9M 4k"],
        ...["-c", "write -P 0xc3 12345 777"], // unaligned offset and length
        ...["-c", "read -P 0xa1 4M 1M"],
        ...["-c", "read -P 0xb2 9M 4k"],
        ...["-c", "read -P 0xc3 12345 777"],
        ...["-c", "read -P 0 0 12345"],
        ...["-c", "read -P 0 13122 1000"],
        ...["-c", "read -P 0 20M 1M"],
        uri,
      ]);
      expect(io.stderr).toBe("");
      expect(io.code).toBe(0);
      expect(io.stdout).not.toMatch(/Pattern verification failed/);

      const map = await run("nbdinfo", ["--map", "--json", uri]);
      expect(map.code).toBe(0);
      const entries = JSON.parse(map.stdout) as MapEntry[];
      const at = (offset: number) =>
        entries.find((e) => e.offset <= offset && offset < e.offset + e.length)?.description;
      expect(at(0)).toBe("data"); // chunk 0 holds the unaligned write
      expect(at(4 * MiB)).toBe("data");
      expect(at(9 * MiB)).toBe("data");
      expect(at(2 * MiB)).toBe("hole,zero");
      expect(at(7 * MiB)).toBe("hole,zero");
      expect(at(40 * MiB)).toBe("hole,zero");
      expect(entries.reduce((n, e) => n + e.length, 0)).toBe(64 * MiB);
    },
  );

  it.skipIf(without("qemu-io"))(
    "qemu-io detects a wrong pattern (exit 1), so the checks above can fail",
    async () => {
      await run("qemu-io", ["-f", "raw", "-c", "write -P 0x55 30M 64k", uri]);
      const wrong = await run("qemu-io", ["-f", "raw", "-c", "read -P 0x56 30M 64k", uri]);
      expect(wrong.code).toBe(1);
      expect(wrong.stdout + wrong.stderr).toMatch(/Pattern verification failed/);
    },
  );

  it.skipIf(without("qemu-io"))(
    "qemu-io: write -z, discard, aio_write + aio_flush, FUA writes",
    async () => {
      const io = await run("qemu-io", [
        "-f",
        "raw",
        ...["-c", "write -P 0x11 16M 2M"],
        ...["-c", "write -z 16M 512k"], // aligned: becomes a discard
        // Below: unaligned zeroes at 17M+100, a discard of 17M+512K..18M, and reads around them.
        ...["-c", "write -z 17825892 1000"], // unaligned zeroes
        ...["-c", "discard 18350080 512k"],
        ...["-c", "read -P 0 16M 512k"],
        ...["-c", "read -P 0x11 17301504 512k"],
        ...["-c", "read -P 0x11 17M 100"],
        ...["-c", "read -P 0 17825892 1000"],
        ...["-c", "read -P 0x11 17826892 523188"],
        ...["-c", "read -P 0 18350080 512k"], // we do zero what is discarded
        ...["-c", "aio_write -P 0x22 20M 256k"],
        ...["-c", "aio_write -P 0x23 21M 256k"],
        ...["-c", "aio_flush"],
        ...["-c", "write -f -P 0x24 22M 64k"],
        ...["-c", "read -P 0x22 20M 256k"],
        ...["-c", "read -P 0x23 21M 256k"],
        ...["-c", "read -P 0x24 22M 64k"],
        uri,
      ]);
      expect(io.stderr).toBe("");
      expect(io.code).toBe(0);
      expect(io.stdout).not.toMatch(/Pattern verification failed/);
    },
  );

  it.skipIf(without("qemu-img"))(
    "qemu-img convert into and out of the export, then compare",
    async () => {
      const source = path.join(work, `${backend.name}-src.raw`);
      const data = Buffer.alloc(64 * MiB);
      randomFillSync(data, 3 * MiB, 5 * MiB);
      randomFillSync(data, 40 * MiB + 4096, 123_456);
      writeFileSync(source, data);
      const into = await run("qemu-img", ["convert", "-n", "-f", "raw", "-O", "raw", source, uri]);
      expect(into.stderr).toBe("");
      expect(into.code).toBe(0);
      const out = path.join(work, `${backend.name}-out.raw`);
      const from = await run("qemu-img", ["convert", "-f", "raw", "-O", "raw", uri, out]);
      expect(from.code).toBe(0);
      expect(readFileSync(out).equals(data)).toBe(true);
      const same = await run("qemu-img", ["compare", "-f", "raw", "-F", "raw", source, uri]);
      expect(same.code).toBe(0);
      expect(same.stdout).toMatch(/Images are identical/);
      // And compare notices a difference.
      await run("qemu-io", ["-f", "raw", "-c", "write -P 0x99 50M 512", uri]);
      const differ = await run("qemu-img", ["compare", "-f", "raw", "-F", "raw", source, uri]);
      expect(differ.code).toBe(1);
    },
  );

  it.skipIf(without("nbdcopy"))(
    "nbdcopy both ways, over one and over four connections",
    async () => {
      const source = path.join(work, `${backend.name}-copy-src.raw`);
      const data = Buffer.alloc(64 * MiB);
      randomFillSync(data, 0, 6 * MiB);
      randomFillSync(data, 33 * MiB, 10 * MiB + 777);
      writeFileSync(source, data);
      for (const connections of ["1", "4"]) {
        const into = await run("nbdcopy", [`--connections=${connections}`, source, uri]);
        expect(into.stderr).toBe("");
        expect(into.code).toBe(0);
        const out = path.join(work, `${backend.name}-copy-out-${connections}.raw`);
        writeFileSync(out, "");
        const from = await run("nbdcopy", [`--connections=${connections}`, uri, out]);
        expect(from.code).toBe(0);
        expect(readFileSync(out).equals(data)).toBe(true);
      }
    },
  );

  it.skipIf(without("fio"))("fio random writes with crc32c verification", async () => {
    const result = await run("fio", [
      "--name=verify",
      "--ioengine=nbd",
      `--uri=${uri}`,
      "--rw=randwrite",
      "--bs=4k",
      "--iodepth=16",
      "--size=16M",
      "--offset=48M",
      "--verify=crc32c",
      "--verify_fatal=1",
      "--output-format=json",
    ]);
    expect(result.code).toBe(0);
    // fio prints a line of its own before the JSON.
    const json = result.stdout.slice(result.stdout.indexOf("{"));
    const job = (
      JSON.parse(json) as {
        jobs: { error: number; write: { io_bytes: number }; read: { io_bytes: number } }[];
      }
    ).jobs[0]!;
    expect(job.error).toBe(0);
    expect(job.write.io_bytes).toBe(16 * MiB);
    expect(job.read.io_bytes).toBe(16 * MiB); // the verify pass read it all back
  });

  it.skipIf(without("nbdsh"))(
    "nbdsh: structured replies, block status, pread/pwrite, zero, trim, cache, flush, unaligned I/O",
    async () => {
      const script = `
import json
out = {}
out["structured"] = h.get_structured_replies_negotiated()
out["base_allocation"] = h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.pwrite(b"\\x5a" * 65536, 24 << 20)
out["pread"] = h.pread(65536, 24 << 20) == b"\\x5a" * 65536
h.zero(4096, (24 << 20) + 4096)
out["zero"] = h.pread(8192, 24 << 20) == b"\\x5a" * 4096 + b"\\x00" * 4096
h.trim(1 << 20, 25 << 20)
h.cache(1 << 20, 24 << 20)
h.flush()
extents = []
def cb(meta, offset, entries, err):
    extents.extend(entries)
    return 0
h.block_status(3 << 20, 24 << 20, cb)
out["extents"] = extents
h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)
h.pwrite(b"hello, world", (26 << 20) + 3)
out["unaligned"] = h.pread(20, 26 << 20).hex()
try:
    h.pread(512, 64 << 20)
    out["past_end"] = 0
except nbd.Error as e:
    out["past_end"] = e.errnum
print(json.dumps(out))
`;
      const result = await nbdsh(uri, script);
      expect(result.stderr).toBe("");
      expect(result.code).toBe(0);
      const out = JSON.parse(result.stdout) as Record<string, unknown>;
      const hole = 3; // NBD_STATE_HOLE | NBD_STATE_ZERO
      expect(out).toEqual({
        structured: true,
        base_allocation: true,
        pread: true,
        zero: true,
        // 24M..25M still holds data in its first 4 KiB; 25M..27M: trimmed and never written.
        extents: [MiB, 0, 2 * MiB, hole],
        unaligned: "000000" + Buffer.from("hello, world").toString("hex") + "0000000000",
        past_end: 22,
      });
    },
  );
});
