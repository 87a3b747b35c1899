/**
 * A clone as NBD clients nobody here wrote see it: `s3blk serve` of a clone, of the snapshot it
 * was made from (`url@name`) and of its base, after the clone wrote and discarded some ranges and
 * the base moved on. qemu-img compare finds the clone identical to the snapshot outside the
 * ranges the clone changed, different (at the first of them) over the whole, and identical to
 * the snapshot's image with the same changes applied by qemu-io to a local copy; nbdinfo --map
 * shows the base's data as allocated in the clone, and what the clone discarded as holes. On a
 * local directory and on S3.
 */

import { randomFillSync } from "node:crypto";
import { copyFileSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

import { requireS3 } from "../support/s3-target.js";
import { siblingUrl } from "../support/volumes.js";
import {
  CLI,
  fileServeBackend,
  missingTools,
  run,
  s3ServeBackend,
  startServe,
  tcpTarget,
  type ServeBackend,
  type ServeProcess,
} from "./harness.js";

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;
const missing = missingTools("NBD clients against a clone", ["qemu-img", "qemu-io", "nbdinfo"]);
const s3 = await requireS3("NBD clients against a clone on S3");
const backends: ServeBackend[] = [
  fileServeBackend(),
  ...(s3 === undefined ? [] : [s3ServeBackend(s3)]),
];
const work = mkdtempSync(path.join(tmpdir(), "s3blk-clone-clients-"));

/** Where the base holds data in snapshot "gold"; everything else was never written. */
const BASE_DATA: readonly (readonly [number, number])[] = [
  [0, 8 * MiB],
  [20 * MiB, 4 * MiB],
  [40 * MiB + 4096, 123_456],
];

/**
 * What the clone does, as qemu-io commands, and the byte ranges each touches: a write over the
 * base's data, a write into a chunk the base never wrote, an unaligned zero write inside a base
 * chunk, and a discard of two whole chunks of the base's data.
 */
const CLONE_CHANGES: readonly { command: string; range: readonly [number, number] }[] = [
  { command: "write -P 0x5c 2M 1049600", range: [2 * MiB, 1_049_600] },
  { command: "write -P 0x5d 30M 64k", range: [30 * MiB, 64 * 1024] },
  { command: "write -z 6291556 1000", range: [6 * MiB + 100, 1000] },
  { command: "discard 21M 2M", range: [21 * MiB, 2 * MiB] },
];

interface MapEntry {
  offset: number;
  length: number;
  description: string;
}

/** The parts of [0, SIZE) outside every changed range, each widened to 4 KiB. */
function untouchedWindows(): [number, number][] {
  const cuts = CLONE_CHANGES.map(({ range: [at, length] }) => [
    Math.floor(at / 4096) * 4096,
    Math.ceil((at + length) / 4096) * 4096,
  ]).sort((a, b) => a[0]! - b[0]!);
  const windows: [number, number][] = [];
  let from = 0;
  for (const [start, end] of cuts) {
    if (start! > from) windows.push([from, start! - from]);
    from = Math.max(from, end!);
  }
  if (from < SIZE) windows.push([from, SIZE - from]);
  return windows;
}

/** A qemu image spec of `length` bytes from `offset` of the export at `uri`. */
function window(uri: string, offset: number, length: number): string {
  const { host, port } = tcpTarget(uri);
  const exportName = decodeURIComponent(new URL(uri).pathname.slice(1));
  return `json:${JSON.stringify({
    driver: "raw",
    offset,
    size: length,
    file: { driver: "nbd", server: { type: "inet", host, port: String(port) }, export: exportName },
  })}`;
}

describe.skipIf(missing.length > 0).each(backends)(
  "real NBD clients against a clone served on $name",
  (backend) => {
    let serve: ServeProcess;
    let clone: string;
    let gold: string;
    let base: string;
    let cloneUrl: string;
    const image = path.join(work, `${backend.name}-gold.raw`);
    /** The snapshot's image with the clone's changes applied by qemu-io: the clone must read so. */
    const expected = path.join(work, `${backend.name}-expected.raw`);

    const s3blk = async (...args: string[]) => {
      const result = await run(process.execPath, [CLI, ...backend.globalArgs, ...args], {
        env: backend.env,
      });
      expect(result.stderr).toBe("");
      expect(result.code).toBe(0);
      return result.stdout;
    };

    beforeAll(async () => {
      const data = Buffer.alloc(SIZE);
      for (const [at, length] of BASE_DATA) randomFillSync(data, at, length);
      writeFileSync(image, data);
      const baseUrl = backend.newUrl("base");
      cloneUrl = siblingUrl(baseUrl, "clone");
      await s3blk("import", image, baseUrl);
      await s3blk("snapshot", "create", baseUrl, "gold");
      expect(await s3blk("clone", `${baseUrl}@gold`, cloneUrl)).toMatch(/a clone of .*@gold/);
      serve = await startServe(backend, [cloneUrl, `${baseUrl}@gold`, baseUrl]);
      [clone = "", gold = "", base = ""] = serve.uris;
      // The base moves on after the snapshot; neither the snapshot nor the clone may see it.
      const moved = await run("qemu-io", ["-f", "raw", "-c", "write -P 0x77 0 1M", base]);
      expect(moved.code).toBe(0);
      const changed = await run("qemu-io", [
        "-f",
        "raw",
        ...CLONE_CHANGES.flatMap((c) => ["-c", c.command]),
        ...["-c", "flush"],
        clone,
      ]);
      expect(changed.stderr).toBe("");
      expect(changed.code).toBe(0);
      copyFileSync(image, expected);
      const local = await run("qemu-io", [
        "-f",
        "raw",
        ...CLONE_CHANGES.flatMap((c) => ["-c", c.command]),
        expected,
      ]);
      expect(local.code).toBe(0);
    });

    afterAll(async () => {
      expect(await serve?.stop()).toBe(0);
    });

    it("qemu-img compare: the clone is the snapshot outside what it changed, and compare sees the changes", async () => {
      const windows = untouchedWindows();
      expect(windows.length).toBe(CLONE_CHANGES.length + 1);
      for (const [offset, length] of windows) {
        const same = await run("qemu-img", [
          "compare",
          window(clone, offset, length),
          window(gold, offset, length),
        ]);
        expect(same.stderr).toBe("");
        expect([offset, length, same.code, same.stdout.trim()]).toEqual([
          offset,
          length,
          0,
          "Images are identical.",
        ]);
      }
      // Over the whole device they differ, first at the clone's first write.
      const whole = await run("qemu-img", ["compare", "-f", "raw", "-F", "raw", clone, gold]);
      expect(whole.code).toBe(1);
      expect(whole.stdout).toMatch(new RegExp(`Content mismatch at offset ${2 * MiB}!`));
      // The base moved on after the snapshot: it differs from it at 0.
      const moved = await run("qemu-img", ["compare", "-f", "raw", "-F", "raw", base, gold]);
      expect(moved.code).toBe(1);
      expect(moved.stdout).toMatch(/Content mismatch at offset 0!/);
    });

    it("qemu-img compare: the clone is exactly the snapshot's image with its changes applied", async () => {
      // The snapshot's export is the image the base was imported from, not the base as it is.
      const exported = path.join(work, `${backend.name}-exported.raw`);
      const out = await run("qemu-img", ["convert", "-f", "raw", "-O", "raw", gold, exported]);
      expect(out.code).toBe(0);
      expect(readFileSync(exported).equals(readFileSync(image))).toBe(true);
      const same = await run("qemu-img", ["compare", "-f", "raw", "-F", "raw", clone, expected]);
      expect(same.stderr).toBe("");
      expect(same.code).toBe(0);
      expect(same.stdout).toMatch(/Images are identical/);
    });

    it("nbdinfo --map: the base's data allocated in the clone, its discards and the base's holes as holes", async () => {
      const map = async (uri: string) => {
        const result = await run("nbdinfo", ["--map", "--json", uri]);
        expect(result.code).toBe(0);
        const entries = JSON.parse(result.stdout) as MapEntry[];
        expect(entries.reduce((n, e) => n + e.length, 0)).toBe(SIZE);
        return (offset: number) =>
          entries.find((e) => e.offset <= offset && offset < e.offset + e.length)?.description;
      };
      const inClone = await map(clone);
      const inGold = await map(gold);
      // The base's data, shared by the clone, untouched by it.
      for (const at of [0, 7 * MiB, 20 * MiB, 23 * MiB, 40 * MiB]) {
        expect([at, inClone(at)]).toEqual([at, "data"]);
        expect([at, inGold(at)]).toEqual([at, "data"]);
      }
      // Written by the clone: over the base's data, into a hole of the base, zeros inside a chunk.
      for (const at of [2 * MiB, 3 * MiB, 6 * MiB, 30 * MiB]) {
        expect([at, inClone(at)]).toEqual([at, "data"]);
      }
      expect(inGold(30 * MiB)).toBe("hole,zero");
      // Discarded by the clone: holes, where the snapshot has data.
      for (const at of [21 * MiB, 22 * MiB + 512 * 1024]) {
        expect([at, inClone(at)]).toEqual([at, "hole,zero"]);
        expect([at, inGold(at)]).toEqual([at, "data"]);
      }
      // Never written by anyone.
      for (const at of [10 * MiB, 31 * MiB, 50 * MiB, SIZE - 1]) {
        expect([at, inClone(at)]).toEqual([at, "hole,zero"]);
      }
    });

    it("after a restart of the server, the clone still reads as the snapshot with its changes", async () => {
      // What the clone wrote and discarded was stored, not only cached.
      expect(await serve.stop()).toBe(0);
      serve = await startServe(backend, [cloneUrl]);
      [clone = ""] = serve.uris;
      const same = await run("qemu-img", ["compare", "-f", "raw", "-F", "raw", clone, expected]);
      expect(same.stderr).toBe("");
      expect(same.code).toBe(0);
      const result = await run("nbdinfo", ["--map", "--json", clone]);
      const holes = (JSON.parse(result.stdout) as MapEntry[]).filter(
        (e) => e.offset <= 21 * MiB && 23 * MiB <= e.offset + e.length,
      );
      expect(holes.map((e) => e.description)).toEqual(["hole,zero"]);
    });
  },
);
