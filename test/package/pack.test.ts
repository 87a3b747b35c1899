/**
 * The package as a user installs it: `npm pack`, install the tarball into a fresh project, and
 * use the public import `"s3blk"` from ESM (a write, flush, and read back after reopening) and
 * from TypeScript, type-checked by `tsc` against the declarations the package ships.
 *
 * The install takes the package's dependencies from npm's cache where it can (`npm ci` filled it).
 */

import { execFile } from "node:child_process";
import { mkdtempSync, readdirSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { promisify } from "node:util";
import { describe, expect, it } from "vitest";
import { childEnv } from "../support/environment.js";

const run = promisify(execFile);
const ROOT = path.resolve(".");

async function npm(args: readonly string[], cwd: string): Promise<string> {
  const { stdout } = await run("npm", [...args], {
    cwd,
    env: childEnv({ npm_config_audit: "false", npm_config_fund: "false" }),
    maxBuffer: 16 * 1024 * 1024,
    timeout: 240_000,
  });
  return stdout;
}

const ROUND_TRIP = `
import { createVolume, openStoreStack, openVolume, ppWriteError } from "s3blk";

const url = process.argv[2];
const stack = openStoreStack(url);
await createVolume(stack, { sizeBytes: 16 << 20 });
const device = await openVolume(stack);
const block = new Uint8Array(4096).map((_, i) => (i * 7 + 3) & 0xff);
const written = await device.write(8n, [block]);
if (!written.ok) throw new Error(ppWriteError(written.error));
const flushed = await device.flush();
if (!flushed.ok) throw new Error(ppWriteError(flushed.error));
const closed = await device.disconnect();
if (!closed.ok) throw new Error(ppWriteError(closed.error));

const reader = await openVolume(openStoreStack(url), { readOnly: true });
const back = new Uint8Array(4096);
const read = await reader.read(8n, [back]);
if (!read.ok) throw new Error(ppWriteError(read.error));
await reader.disconnect();
const same = back.every((b, i) => b === block[i]);
console.log(same ? "round trip: same bytes" : "round trip: DIFFERENT bytes");
`;

const TYPED = `
import {
  createVolume,
  openStoreStack,
  openVolume,
  ppError,
  type BlockDevice,
  type Result,
  type WriteError,
} from "s3blk";

async function firstSector(device: BlockDevice): Promise<Uint8Array | string> {
  const info = await device.getInfo();
  const buffer = new Uint8Array(info.sectorSize);
  const read = await device.read(0n, [buffer]);
  return read.ok ? buffer : ppError(read.error);
}

const stack = openStoreStack("memory://typed");
await createVolume(stack, { sizeBytes: 1 << 20 });
const device = await openVolume(stack, { cacheBytes: 1 << 20 });
const closed: Result<void, WriteError> = await device.disconnect();
console.log(closed.ok, await firstSector(device));

// The declarations are real types, not \`any\`: each misuse below must be an error.
// @ts-expect-error openVolume takes a store stack, not a URL
await openVolume("memory://typed");
// @ts-expect-error sizeBytes is a number of bytes
await createVolume(stack, { sizeBytes: "1G" });
`;

describe("the npm package", () => {
  it("installs from its tarball and works through the public import, in ESM and typed", async () => {
    const work = mkdtempSync(path.join(tmpdir(), "s3blk-pack-"));
    const packed = JSON.parse(
      await npm(["pack", "--ignore-scripts", "--json", "--pack-destination", work], ROOT),
    ) as { filename: string; files: { path: string }[] }[];
    const tarball = path.join(work, packed[0]!.filename);
    const files = packed[0]!.files.map((f) => f.path);
    expect(files).toContain("dist/index.js");
    expect(files).toContain("dist/index.d.ts");
    expect(files.filter((f) => f.startsWith("test/") || f.startsWith("src/"))).toEqual([]);

    const project = path.join(work, "app");
    await run("mkdir", ["-p", project]);
    writeFileSync(
      path.join(project, "package.json"),
      JSON.stringify({ name: "app", private: true, type: "module" }),
    );
    await npm(
      [
        "install",
        "--prefer-offline",
        "--no-package-lock",
        tarball,
        "typescript@5.9",
        "@types/node@20",
      ],
      project,
    );
    expect(readdirSync(path.join(project, "node_modules", "s3blk", "dist"))).toContain("index.js");

    writeFileSync(path.join(project, "round-trip.mjs"), ROUND_TRIP);
    const volume = `file://${path.join(work, "volume")}`;
    const { stdout } = await run(process.execPath, ["round-trip.mjs", volume], {
      cwd: project,
      env: childEnv(),
    });
    expect(stdout.trim()).toBe("round trip: same bytes");

    // Only the public entry point is importable.
    const deep = await run(
      process.execPath,
      ["--input-type=module", "-e", 'await import("s3blk/dist/cli/main.js")'],
      { cwd: project, env: childEnv() },
    ).then(
      () => "imported",
      (error: { stderr: string }) => error.stderr,
    );
    expect(deep).toMatch(/ERR_PACKAGE_PATH_NOT_EXPORTED/);

    writeFileSync(path.join(project, "typed.ts"), TYPED);
    writeFileSync(
      path.join(project, "tsconfig.json"),
      JSON.stringify({
        compilerOptions: {
          target: "ES2022",
          module: "NodeNext",
          moduleResolution: "NodeNext",
          strict: true,
          noEmit: true,
          types: ["node"],
        },
        files: ["typed.ts"],
      }),
    );
    const tsc = path.join(project, "node_modules", "typescript", "bin", "tsc");
    const checked = await run(process.execPath, [tsc, "-p", "."], { cwd: project }).then(
      () => "no errors",
      (error: { stdout: string }) => error.stdout,
    );
    expect(checked).toBe("no errors");
  }, 300_000);
});
