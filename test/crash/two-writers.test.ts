/**
 * Two `s3blk serve` processes on one volume: the second is refused with a line naming the first,
 * a read-only server may join, and once the first exits cleanly the next writer gets in. With
 * `--force` (on S3, behind the fault proxy, which records every request of both): the second
 * takes the volume over after waiting out the first's process lease, and no write of the first
 * reaches the server once the second has begun its term.
 */

import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { childEnv } from "../support/environment.js";
import { FaultProxy } from "../support/fault-proxy.js";
import { NbdClient } from "../support/nbd-client.js";
import { requireS3, s3Env } from "../support/s3-target.js";
import { CLI, runCli, startServe, type ServeProcess } from "../support/serve-process.js";
import { pattern } from "../support/volumes.js";

const s3 = await requireS3("forced takeover between two serve processes");

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

describe.skipIf(s3 === undefined)("a forced takeover between two serve processes", () => {
  const started: ServeProcess[] = [];
  let proxy: FaultProxy | undefined;
  afterAll(async () => {
    for (const server of started) if (server.child.exitCode === null) server.child.kill("SIGKILL");
    await proxy?.stop();
  });

  it("waits out the old process lease, and the old writer's dirty data never lands after", async () => {
    const target = s3 ?? (undefined as never);
    proxy = await FaultProxy.start(target.endpoint);
    const url = target.newVolumeUrl("force");
    expect(await runCli(["create", url, "--size", "64M"], s3Env(target))).toBe(0);
    const dir = mkdtempSync(path.join(tmpdir(), "s3blk-force-"));
    // Renewed every 16 s: more than two 5 s request timeouts and the 5 s skew margin.
    const timing = ["--lease-duration", "32s"];
    const options = { env: s3Env(target, proxy.endpoint), globalArgs: ["--request-timeout", "5s"] };
    const old = await startServe(
      [url, "--socket", path.join(dir, "old.sock"), ...timing, "--writeback-delay", "600000"],
      options,
    );
    started.push(old);
    const oldClient = await NbdClient.connect(path.join(dir, "old.sock"));
    const MiB = 1024 * 1024;
    await oldClient.pwrite(0, pattern(1, 0, 128));
    await oldClient.flush(); // stored, in the old term
    await oldClient.pwrite(MiB, pattern(2, MiB / 512, 128)); // dirty: never flushed

    const forcedFromMs = Date.now();
    const taker = await startServe(
      [url, "--socket", path.join(dir, "new.sock"), ...timing, "--force"],
      options,
    );
    started.push(taker);
    expect(taker.stderr()).toMatch(
      new RegExp(`took over the lease from pid ${old.child.pid} on .*; waiting \\d+ s`),
    );
    // It waited until the old process lease, as it found it, lapsed (16 to 32 s, plus 5 s).
    expect(Date.now() - forcedFromMs).toBeGreaterThan(16_000);
    // The old process learnt of it at its next renewal, before the taker began.
    expect(old.stderr()).toMatch(
      new RegExp(
        `lost the lease .*lease.json \\(epoch 1\\) to pid ${taker.child.pid} on .*took it over`,
      ),
    );
    await expect(oldClient.flush()).rejects.toThrow();
    await expect(oldClient.pwrite(2 * MiB, pattern(3, (2 * MiB) / 512, 128))).rejects.toThrow();
    await oldClient.close();
    expect(await old.stop()).toBe(1); // its unflushed writes are lost, and it says so
    expect(old.stderr()).toMatch(/flush failed, unflushed writes are lost/);

    // Seen at the server: the taker's term began with its seal; no chunk write of the old term
    // (epoch 1 in its generation) arrived after that, nor after the taker's claim.
    const log = [...proxy.requests];
    const claimAtMs = Math.max(
      ...log
        .filter((r) => r.method === "PUT" && r.path.includes("/lease.json"))
        .map((r) => r.receivedAtMs),
    );
    const sealAtMs = log.find(
      (r) => r.method === "PUT" && r.path.includes("/seals/00000002"),
    )?.receivedAtMs;
    expect(sealAtMs).toBeGreaterThan(forcedFromMs);
    const oldTermWrites = log.filter(
      (r) =>
        (r.method === "PUT" || r.method === "DELETE") &&
        /\/chunks\/[0-9a-f]{16}\.00000001/.test(r.path),
    );
    expect(oldTermWrites.length).toBeGreaterThan(0); // the flushed block, before the takeover
    expect(oldTermWrites.filter((r) => r.receivedAtMs > Math.min(claimAtMs, sealAtMs!))).toEqual(
      [],
    );

    const client = await NbdClient.connect(path.join(dir, "new.sock"));
    expect(Buffer.from(await client.pread(0, 64 * 1024)).equals(pattern(1, 0, 128))).toBe(true);
    expect((await client.pread(MiB, 64 * 1024)).every((b) => b === 0)).toBe(true);
    await client.close();
    expect(await taker.stop()).toBe(0);
  }, 150_000);
});
