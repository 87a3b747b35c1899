/**
 * Two `s3blk serve` processes on one volume: the second is refused with a line naming the first,
 * a read-only server may join, and once the first exits cleanly the next writer gets in.
 */

import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { childEnv } from "../support/environment.js";
import { NbdClient } from "../support/nbd-client.js";
import { CLI, startServe } from "../support/serve-process.js";

function start(args: string[]): {
  child: ChildProcess;
  output: () => string;
  exited: Promise<number>;
} {
  const child = spawn(process.execPath, [CLI, ...args], {
    env: childEnv(),
    stdio: ["ignore", "pipe", "pipe"],
  });
  let output = "";
  child.stdout?.on("data", (d: Buffer) => (output += d.toString()));
  child.stderr?.on("data", (d: Buffer) => (output += d.toString()));
  const exited = new Promise<number>((resolve) =>
    child.once("exit", (code) => resolve(code ?? -1)),
  );
  return { child, output: () => output, exited };
}

describe("two serve processes on one volume", () => {
  it("refuses the second writer by name, lets a reader in, and the next writer after a clean exit", async () => {
    const dir = mkdtempSync(path.join(tmpdir(), "s3blk-two-"));
    const volume = `file://${dir}/vol`;
    expect(await start(["create", volume, "--size", "64M"]).exited).toBe(0);

    const first = await startServe([volume, "--socket", path.join(dir, "a.sock")]);

    const second = start(["serve", volume, "--socket", path.join(dir, "b.sock")]);
    expect(await second.exited).toBe(1);
    const lines = second.output().trim().split("\n");
    expect(lines.at(-1)).toMatch(
      new RegExp(
        `volume is in use by pid ${first.child.pid} on .* \\(lease epoch 1, expires in \\d+ s\\); use --force`,
      ),
    );
    expect(second.output()).not.toMatch(/\n\s+at /);

    const reader = await startServe([volume, "--read-only", "--socket", path.join(dir, "r.sock")]);
    const client = await NbdClient.connect(path.join(dir, "r.sock"));
    await expect(client.pwrite(0, new Uint8Array(512))).rejects.toBeInstanceOf(Error);
    expect((await client.pread(0, 512)).length).toBe(512);
    await client.close();
    expect(await reader.stop()).toBe(0);

    expect(await first.stop()).toBe(0);
    const third = await startServe([volume, "--socket", path.join(dir, "c.sock")]);
    expect(await third.stop()).toBe(0);
  });
});
