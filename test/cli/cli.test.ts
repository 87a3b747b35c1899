/**
 * The CLI as a user meets it: the built `s3blk` run as a process. Errors must be one line on
 * stderr with a non-zero exit code, never a stack trace.
 */

import { execFile } from "node:child_process";
import { mkdtempSync, readFileSync, readdirSync, statSync, writeFileSync } from "node:fs";
import { randomFillSync } from "node:crypto";
import { tmpdir } from "node:os";
import path from "node:path";
import { promisify } from "node:util";
import { describe, expect, it } from "vitest";
import { parseSize } from "../../src/cli/sizes.js";
import { childEnv } from "../support/environment.js";
import { requireS3, s3Env } from "../support/s3-target.js";
import { CLI, startServe } from "../support/serve-process.js";
import { FileStore } from "../../src/store/file-store.js";
import { decodeSuperblock, encodeSuperblock, superblockKey } from "../../src/volume/format.js";
import { pattern, siblingUrl, writeVersion1Volume } from "../support/volumes.js";

const run = promisify(execFile);

async function s3blk(args: string[], env: NodeJS.ProcessEnv = {}, cwd = work) {
  try {
    const { stdout, stderr } = await run("node", [CLI, ...args], {
      cwd,
      env: childEnv(env),
    });
    return { code: 0, stdout, stderr };
  } catch (error) {
    const e = error as { code: number; stdout: string; stderr: string };
    return { code: e.code, stdout: e.stdout, stderr: e.stderr };
  }
}

const work = mkdtempSync(path.join(tmpdir(), "s3blk-cli-"));

function expectOneLineError(result: { code: number; stderr: string }, pattern: RegExp, code = 1) {
  expect(result.code).toBe(code);
  const lines = result.stderr.trim().split("\n");
  expect(lines[0]).toMatch(/^s3blk: /);
  expect(lines[0]).toMatch(pattern);
  expect(result.stderr).not.toMatch(/\n\s+at /); // no stack trace
}

describe("sizes", () => {
  it("parses binary suffixes and rejects junk", () => {
    expect(parseSize("10G")).toBe(10 * 1024 ** 3);
    expect(parseSize("512")).toBe(512);
    expect(parseSize("4KiB")).toBe(4096);
    expect(parseSize("1.5T")).toBe(1.5 * 1024 ** 4);
    expect(parseSize("64m")).toBe(64 * 1024 ** 2);
    expect(parseSize("10X")).toBeInstanceOf(Error);
    expect(parseSize("0.3K")).toBeInstanceOf(Error);
    expect(parseSize("")).toBeInstanceOf(Error);
  });
});

describe("s3blk on a local directory", () => {
  it("creates, describes and deletes a volume", async () => {
    const created = await s3blk(["create", "vol", "--size", "2G", "--chunk-size", "4M"]);
    expect(created.code).toBe(0);
    expect(created.stdout).toMatch(
      /created file:\/\/.*\/vol: 2 GiB, 512-byte sectors, 4 MiB chunks/,
    );
    const info = await s3blk(["info", "vol", "--json"]);
    expect(info.code).toBe(0);
    expect(JSON.parse(info.stdout)).toMatchObject({
      sizeBytes: 2 * 1024 ** 3,
      chunkSizeBytes: 4 * 1024 ** 2,
      sectorSizeBytes: 512,
      formatVersion: 3,
      storedChunks: 0,
    });
    expectOneLineError(await s3blk(["create", "vol", "--size", "1G"]), /already exists/);
    expectOneLineError(await s3blk(["delete", "vol"]), /without --yes/);
    expect((await s3blk(["delete", "--yes", "vol"])).stdout).toMatch(/deleted .*vol \(1 object\)/);
    expectOneLineError(await s3blk(["info", "vol"]), /no volume at/);
  });

  it("imports and exports an image, sparse both ways", async () => {
    const image = path.join(work, "image.raw");
    const data = Buffer.alloc(20 * 1024 * 1024);
    randomFillSync(data, 5 * 1024 * 1024, 3 * 1024 * 1024);
    data.write("last bytes", data.length - 100);
    writeFileSync(image, data);
    const imported = await s3blk(["import", image, "imported"]);
    expect(imported.code).toBe(0);
    expect(imported.stdout).toMatch(/imported .*: 20 MiB, 3.06 MiB of data/);
    expect(imported.stderr).toBe(""); // no progress bar without a terminal
    const info = JSON.parse((await s3blk(["info", "--json", "imported"])).stdout);
    expect(info.sizeBytes).toBe(data.length);
    expect(info.storedChunks).toBe(4); // three data chunks and the last one
    const exported = path.join(work, "exported.raw");
    expect((await s3blk(["export", "imported", exported])).code).toBe(0);
    expect(readFileSync(exported).equals(data)).toBe(true);
    // The export is as sparse as the volume: about the 3 MiB of data, not 20 MiB.
    expect(statSync(exported).blocks * 512).toBeLessThan(5 * 1024 * 1024);

    // Importing over existing data replaces it, zeros included.
    const zeros = path.join(work, "zeros.raw");
    writeFileSync(zeros, Buffer.alloc(20 * 1024 * 1024));
    expect((await s3blk(["import", zeros, "imported"])).code).toBe(0);
    expect(JSON.parse((await s3blk(["info", "--json", "imported"])).stdout).storedChunks).toBe(0);
    expectOneLineError(
      await s3blk(["import", path.join(work, "nothing.raw"), "imported"]),
      /ENOENT/,
    );
    writeFileSync(path.join(work, "big.raw"), Buffer.alloc(21 * 1024 * 1024));
    expectOneLineError(
      await s3blk(["import", path.join(work, "big.raw"), "imported"]),
      /larger than the volume/,
    );
  });

  it("refuses to import into a volume another process is serving, in one line", async () => {
    expect((await s3blk(["create", "busy", "--size", "16M"])).code).toBe(0);
    const socket = path.join(work, "busy.sock");
    const server = await startServe(["busy", "--socket", socket], { cwd: work });
    try {
      const image = path.join(work, "small.raw");
      writeFileSync(image, Buffer.alloc(4096, 1));
      expectOneLineError(
        await s3blk(["import", image, "busy"]),
        new RegExp(`volume is in use by pid ${server.child.pid} on .*use --force`),
      );
    } finally {
      await server.stop();
    }
  });

  it("warns when --dirty-size is more than half of --cache-size, which holds dirty data too", async () => {
    expect((await s3blk(["create", "bounds", "--size", "16M"])).code).toBe(0);
    const serveWith = async (args: string[]) => {
      const socket = path.join(work, "bounds.sock");
      const server = await startServe(["bounds", "--socket", socket, ...args], { cwd: work });
      expect(await server.stop()).toBe(0);
      return server.stderr();
    };
    const warning =
      /--dirty-size 12 MiB is more than half of --cache-size 16 MiB, which holds dirty data too: dirty data is held to 8 MiB/;
    expect(await serveWith(["--cache-size", "16M", "--dirty-size", "12M"])).toMatch(warning);
    expect(await serveWith(["--cache-size", "16M"])).not.toMatch(/--dirty-size/);
    expect(await serveWith(["--cache-size", "64M", "--dirty-size", "32M"])).not.toMatch(/--dirty/);
  });

  it("runs the demo twice on the default volume", async () => {
    const first = await s3blk(["demo"]);
    expect(first.code).toBe(0);
    expect(first.stdout).toMatch(/created .*\.s3blk\/volumes\/default \(1 GiB\)/);
    expect(first.stdout).toMatch(/wrote and read back sector 2048: hello from s3blk/);
    const second = await s3blk(["demo"]);
    expect(second.stdout).not.toMatch(/created/);
    expect(second.stdout).toMatch(/stored chunks: 1/);
  });

  it("opens a version 1 volume read-only until upgraded, and upgrades the default one on start", async () => {
    const data = new Map([[3, pattern(31, 3 * 2048, 2048)]]);
    const old = new FileStore(path.join(work, "old1"));
    await writeVersion1Volume(old, "", { sizeBytes: 16 * 1024 ** 2 }, data);
    expectOneLineError(
      await s3blk(["demo", "old1"]),
      /read-only; to write it, run: s3blk upgrade file:\/\/.*old1$/,
    );
    expect((await s3blk(["info", "old1"])).stdout).toMatch(/format\s+s3blk v1/);
    expect((await s3blk(["upgrade", "old1"])).stdout).toMatch(
      /upgraded file:\/\/.*old1 from format version 1 to 3 in place \(1 chunks kept/,
    );
    expect((await s3blk(["upgrade", "old1"])).stdout).toMatch(
      /already format version 3; nothing to do/,
    );
    const demo = await s3blk(["demo", "old1"]);
    expect(demo.code).toBe(0);
    expect(demo.stdout).toMatch(/stored chunks: 2/);

    const fallback = path.join(work, "default-v1");
    const def = new FileStore(path.join(fallback, ".s3blk/volumes/default"));
    await writeVersion1Volume(def, "", { sizeBytes: 16 * 1024 ** 2 }, data);
    const started = await s3blk(["demo"], {}, fallback);
    expect(started.code).toBe(0);
    expect(started.stdout).toMatch(
      /upgraded the default volume file:\/\/.*default from format version 1 to 3/,
    );
  });

  it("snapshots, lists, exports, serves, rolls back and deletes a snapshot", async () => {
    const message = (stdout: string) => /sector 2048: (hello from s3blk at \S+)/.exec(stdout)?.[1];
    const first = message((await s3blk(["demo", "snapvol"])).stdout);
    expect(first).toBeDefined();
    expect((await s3blk(["snapshot", "create", "snapvol", "s1"])).stdout).toMatch(
      /created snapshot file:\/\/.*snapvol@s1 \(1 chunks\)/,
    );
    expectOneLineError(await s3blk(["snapshot", "create", "snapvol", "s1"]), /"s1" already exists/);
    expectOneLineError(
      await s3blk(["snapshot", "create", "snapvol", "a b"]),
      /invalid snapshot name "a b": use 1 to 64 characters of A-Z, a-z, 0-9/,
    );
    const listed = JSON.parse((await s3blk(["snapshot", "list", "snapvol", "--json"])).stdout);
    expect(listed).toMatchObject([{ name: "s1", chunks: 1 }]);
    await new Promise((r) => setTimeout(r, 5)); // a later timestamp for the second demo
    const second = message((await s3blk(["demo", "snapvol"])).stdout);
    expect(second).not.toBe(first);

    const exported = path.join(work, "s1.raw");
    expect((await s3blk(["export", "snapvol@s1", exported])).code).toBe(0);
    const at = (file: string) =>
      readFileSync(file)
        .subarray(2048 * 512, 2048 * 512 + 60)
        .toString();
    expect(at(exported)).toContain(first);
    expect((await s3blk(["info", "snapvol@s1"])).stdout).toMatch(/snapshot\s+s1: 1 of 1024 chunks/);
    expect((await s3blk(["info", "snapvol"])).stdout).toMatch(/snapshots\s+s1/);
    expectOneLineError(await s3blk(["info", "snapvol@nope"]), /no snapshot named "nope"/);
    expectOneLineError(await s3blk(["info", "snapvol@bad!"]), /invalid snapshot name "bad!"/);

    const socket = path.join(work, "snap.sock");
    const server = await startServe(["snapvol@s1", "--socket", socket], { cwd: work });
    try {
      // The export is named <last path segment>@<name>, and a snapshot is served read-only.
      expect(server.uris[0]).toMatch(/snapvol%40s1/);
      expect(server.stdout()).toMatch(/serving snapvol@s1: 1 GiB, read-only/);
    } finally {
      await server.stop();
    }

    expect((await s3blk(["snapshot", "rollback", "snapvol", "s1"])).stdout).toMatch(
      /rolled .*snapvol back to snapshot s1/,
    );
    const now = path.join(work, "now.raw");
    expect((await s3blk(["export", "snapvol", now])).code).toBe(0);
    expect(at(now)).toContain(first);
    expect((await s3blk(["snapshot", "delete", "snapvol", "s1"])).stdout).toMatch(
      /deleted snapshot/,
    );
    expect((await s3blk(["snapshot", "list", "snapvol"])).stdout).toMatch(/has no snapshots/);
    expectOneLineError(
      await s3blk(["snapshot", "delete", "snapvol", "s1"]),
      /no snapshot named "s1"/,
    );
  }, 180_000); // a dozen CLI processes, each a Node start: 35 s here on a loaded machine

  it("clones a snapshot, shows the clone's parent and what it owns, and collects garbage", async () => {
    const MiB = 1024 * 1024;
    const image = path.join(work, "cbase.raw");
    const data = Buffer.alloc(16 * MiB);
    randomFillSync(data, 0, 5 * MiB);
    writeFileSync(image, data);
    expect((await s3blk(["import", image, "cbase"])).code).toBe(0);
    expect((await s3blk(["snapshot", "create", "cbase", "gold"])).code).toBe(0);
    const cloned = await s3blk(["clone", "cbase@gold", "cclone"]);
    expect(cloned.stderr).toBe("");
    expect(cloned.stdout).toMatch(
      /^file:\/\/\S+\/cclone \(a clone of file:\/\/\S+\/cbase@gold, volume id [0-9a-f-]{36}\)\n$/,
    );
    const baseId = JSON.parse((await s3blk(["info", "cbase", "--json"])).stdout).volumeId;
    const shares = async () => JSON.parse((await s3blk(["info", "cclone", "--json"])).stdout);
    expect(await shares()).toMatchObject({
      origin: { prefix: "cbase", volumeId: baseId, snapshot: "gold" },
      storedChunks: 5,
      ownedChunks: 0,
      sharedChunks: 5,
      ownedBytes: 0,
      sharedBytes: 5 * MiB,
    });
    // The demo writes 4 KiB at 1 MiB: the clone owns chunk 1 now, and shares the other four.
    expect((await s3blk(["demo", "cclone"])).code).toBe(0);
    expect(await shares()).toMatchObject({
      ownedChunks: 1,
      sharedChunks: 4,
      ownedBytes: MiB,
      sharedBytes: 4 * MiB,
    });
    const info = (await s3blk(["info", "cclone"])).stdout;
    // The parent as a URL, which the other commands take.
    expect(info).toMatch(new RegExp(`^parent\\s+file://${work}/cbase@gold$`, "m"));
    expect((await shares()).parent).toBe(`file://${work}/cbase@gold`);
    expect(info).toMatch(
      /^owned\s+1 chunks \(1 MiB\); shared with the parent: 4 chunks \(4 MiB\)$/m,
    );
    const exported = path.join(work, "cclone.raw");
    expect((await s3blk(["export", "cclone", exported])).code).toBe(0);
    const clonedBytes = readFileSync(exported);
    expect(clonedBytes.subarray(0, MiB).equals(data.subarray(0, MiB))).toBe(true);
    expect(clonedBytes.subarray(2 * MiB).equals(data.subarray(2 * MiB))).toBe(true);
    expect(clonedBytes.subarray(MiB, MiB + 60).toString()).toMatch(/^hello from s3blk/);

    // Two writer terms on the base after the snapshot (the import and the snapshot were two
    // before them): the second supersedes the first's chunk object, and each term's seal
    // supersedes the one before. A writer keeps its garbage for
    // the default grace (15 minutes), so it is all still there.
    for (let n = 0; n < 2; n++) expect((await s3blk(["demo", "cbase"])).code).toBe(0);
    // Every file of the volume's but gc's clock marker, which a dry run writes too.
    const files = () =>
      readdirSync(path.join(work, "cbase"), { recursive: true })
        .map(String)
        .filter((f) => !f.startsWith("gc"));
    const before = files();
    const graced = await s3blk(["gc", "--dry-run", "cbase"]);
    expect(graced.stdout).toMatch(
      /^file:\S+cbase: would delete 0 objects \(0 bytes\); [1-9]\d* kept within the grace$/m,
    );
    const dry = await s3blk(["gc", "--dry-run", "--grace", "0", "cbase"]);
    const wouldDelete = [...dry.stdout.matchAll(/^would delete (\S+)$/gm)].map((m) => m[1]);
    // The first demo's chunk 1, and the seals of the three terms before the last.
    expect(wouldDelete).toHaveLength(4);
    expect(
      wouldDelete.filter((k) => /^cbase\/chunks\/0{15}1\.[0-9a-f]{20}$/.test(k ?? "")),
    ).toHaveLength(1);
    expect(
      wouldDelete.filter((k) => /^cbase\/seals\/[0-9a-f]{8}\.json$/.test(k ?? "")),
    ).toHaveLength(3);
    expect(dry.stdout).toMatch(/: would delete 4 objects \(1.00 MiB\); 0 kept within the grace$/m);
    expect(files()).toEqual(before);
    const collected = await s3blk(["gc", "--grace", "0", "cbase"]);
    expect([...collected.stdout.matchAll(/^deleted (\S+)$/gm)].map((m) => m[1])).toEqual(
      wouldDelete,
    );
    expect(collected.stdout).toMatch(/: deleted 4 objects \(1.00 MiB\); 0 kept within the grace$/m);
    for (const key of wouldDelete) expect(files()).not.toContain(key?.slice("cbase/".length));
    expect((await s3blk(["gc", "--grace", "0", "cbase"])).stdout).toMatch(/: deleted 0 objects/);
    // What the snapshot and the clone read is all still there.
    const gold = path.join(work, "gold.raw");
    expect((await s3blk(["export", "cbase@gold", gold])).code).toBe(0);
    expect(readFileSync(gold).equals(data)).toBe(true);
    expect((await s3blk(["export", "cclone", exported])).code).toBe(0);
    expect(readFileSync(exported).equals(clonedBytes)).toBe(true);
  }, 180_000);

  it("refuses what cannot be cloned or deleted because of clones, in one line", async () => {
    expect((await s3blk(["create", "rbase", "--size", "16M"])).code).toBe(0);
    expect((await s3blk(["snapshot", "create", "rbase", "gold"])).code).toBe(0);
    expect((await s3blk(["clone", "rbase@gold", "rclone"])).code).toBe(0);
    expectOneLineError(
      await s3blk(["clone", "rbase@nope", "rother"]),
      /no snapshot named "nope" \(no rbase\/snapshots\/nope.json\)/,
    );
    expectOneLineError(
      await s3blk(["clone", "rbase", "rother"]),
      /a clone is made from a snapshot: write rbase@<name>/,
    );
    expectOneLineError(
      await s3blk(["clone", "rbase@gold", "rclone"]),
      /a volume already exists at .*rclone/,
    );
    const elsewhere = mkdtempSync(path.join(tmpdir(), "s3blk-cli-other-"));
    expectOneLineError(
      await s3blk(["clone", "rbase@gold", path.join(elsewhere, "rclone")]),
      new RegExp(`a clone must be in the same directory as its base: .*${elsewhere}`),
    );
    expectOneLineError(
      await s3blk(["snapshot", "delete", "rbase", "gold"]),
      /a clone depends on snapshot "gold": rclone \(of gold\); delete it first/,
    );
    expectOneLineError(
      await s3blk(["delete", "--yes", "rbase"]),
      /a clone depends on snapshot "gold": rclone \(of gold\)/,
    );
    // Both refusals left everything as it was: the clone still reads, a second clone is made.
    expect((await s3blk(["info", "rclone"])).stdout).toMatch(/^parent\s+file:\S+\/rbase@gold$/m);
    expect((await s3blk(["clone", "rbase@gold", "rclone2"])).code).toBe(0);
    expectOneLineError(
      await s3blk(["snapshot", "delete", "rbase", "gold"]),
      /2 clones depend on snapshot "gold": .*rclone \(of gold\).*; delete them first/,
    );
    // Deleting the clones drops their references: then the snapshot and the base can go.
    for (const clone of ["rclone", "rclone2"]) {
      expect((await s3blk(["delete", "--yes", clone])).code).toBe(0);
    }
    expect((await s3blk(["snapshot", "delete", "rbase", "gold"])).code).toBe(0);
    expect((await s3blk(["delete", "--yes", "rbase"])).code).toBe(0);
  });

  it("refuses to clone a base of format version 2 until it is upgraded", async () => {
    expect((await s3blk(["create", "v2base", "--size", "16M"])).code).toBe(0);
    expect((await s3blk(["snapshot", "create", "v2base", "gold"])).code).toBe(0);
    // As a version 2 s3blk left it: the same layout, formatVersion 2.
    const store = new FileStore(work);
    const key = superblockKey("v2base");
    const superblock = decodeSuperblock((await store.get(key))!.body, key);
    await store.put(key, encodeSuperblock({ ...superblock, formatVersion: 2 }));
    expectOneLineError(
      await s3blk(["clone", "v2base@gold", "v2clone"]),
      /v2base is a format version 2 volume; to clone it, first run: s3blk upgrade file:\/\/\S+\/v2base$/,
    );
    expectOneLineError(await s3blk(["info", "v2clone"]), /no volume at/);
    expect((await s3blk(["upgrade", "v2base"])).stdout).toMatch(/from format version 2 to 3/);
    expect((await s3blk(["clone", "v2base@gold", "v2clone"])).code).toBe(0);
  });

  it("answers bad input with one clear line", async () => {
    expectOneLineError(await s3blk(["create", "x", "--size", "10X"]), /"10X" is not a size/, 2);
    expectOneLineError(await s3blk(["create", "x"]), /--size/, 2);
    expectOneLineError(
      await s3blk(["create", "x", "--size", "1000"]),
      /not a multiple of the 512-byte sector size/,
    );
    expectOneLineError(
      await s3blk(["create", "x", "--size", "1G", "--chunk-size", "3M"]),
      /chunk size 3145728 is not a power of two/,
    );
    expectOneLineError(
      await s3blk(["create", "x", "--size", "1G", "--sector-size", "1024"]),
      /sector size 1024/,
    );
    expectOneLineError(await s3blk(["info", "bogus://x"]), /unknown scheme "bogus"/);
    expectOneLineError(await s3blk(["info", "file://relative"]), /absolute path/);
    expectOneLineError(await s3blk(["frobnicate"]), /unknown command/, 2);
  });
});

const s3 = await requireS3("CLI against S3");

describe.skipIf(s3 === undefined)("s3blk against S3", () => {
  const env = () => (s3 === undefined ? {} : s3Env(s3));

  it("creates, describes and deletes a volume in a bucket", async () => {
    const url = s3?.newVolumeUrl("cli") ?? "";
    expect((await s3blk(["create", url, "--size", "1G"], env())).code).toBe(0);
    expect((await s3blk(["demo", url], env())).stdout).toMatch(/stored chunks: 1/);
    expect((await s3blk(["info", url], env())).stdout).toMatch(/stored\s+1 of 1024 chunks, 1 MiB/);
    // The chunk, the demo's seal, the superblock.
    expect((await s3blk(["delete", "-y", url], env())).stdout).toMatch(/\(3 objects\)/);
  });

  it("clones in the bucket, and refuses a clone in another bucket in one line", async () => {
    const url = s3?.newVolumeUrl("cli-base") ?? "";
    const clone = siblingUrl(url, "cli-clone");
    expect((await s3blk(["create", url, "--size", "1G"], env())).code).toBe(0);
    expect((await s3blk(["demo", url], env())).code).toBe(0);
    expect((await s3blk(["snapshot", "create", url, "gold"], env())).code).toBe(0);
    expect((await s3blk(["clone", `${url}@gold`, clone], env())).stdout).toBe(
      `${clone} (a clone of ${url}@gold, volume id ` +
        `${JSON.parse((await s3blk(["info", "--json", clone], env())).stdout).volumeId})\n`,
    );
    expect(JSON.parse((await s3blk(["info", "--json", clone], env())).stdout)).toMatchObject({
      parent: `${url}@gold`,
      ownedBytes: 0,
      sharedBytes: 1024 * 1024,
    });
    expectOneLineError(
      await s3blk(["clone", `${url}@gold`, "s3://another-bucket-s3blk/c"], env()),
      /a clone must be in the same bucket and endpoint as its base: s3:\/\/another-bucket-s3blk\/c is in s3:\/\/another-bucket-s3blk at /,
    );
    expect((await s3blk(["delete", "-y", clone], env())).code).toBe(0);
    expect((await s3blk(["snapshot", "delete", url, "gold"], env())).code).toBe(0);
    expect((await s3blk(["delete", "-y", url], env())).code).toBe(0);
  });

  it("names a missing bucket and wrong credentials in one line", async () => {
    expectOneLineError(
      await s3blk(["create", "s3://no-such-bucket-s3blk/v", "--size", "1G"], env()),
      /NoSuchBucket \(create the bucket first\)/,
    );
    expectOneLineError(
      await s3blk(["info", s3?.newVolumeUrl("creds") ?? ""], {
        ...env(),
        AWS_SECRET_ACCESS_KEY: "wrong",
      }),
      /HTTP 403 .*check AWS_ACCESS_KEY_ID/,
    );
  });
});
