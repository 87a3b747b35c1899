/**
 * An S3 outage longer than the retry budget, in the middle of a VM-like workload, seen from an
 * NBD client: `s3blk serve` talks to the real S3 server through the fault proxy. During the
 * outage a FLUSH fails with EIO (never success) and cached reads still work; when S3 returns the
 * next FLUSH succeeds, and after a restart of the server every byte is there.
 */

import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { NBD_EIO } from "../../src/nbd/protocol.js";
import { FaultProxy } from "../support/fault-proxy.js";
import { NbdClient } from "../support/nbd-client.js";
import { runCli, startServe, type ServeProcess } from "../support/serve-process.js";
import { requireS3, s3Env } from "../support/s3-target.js";
import { pattern } from "../support/volumes.js";

const SIZE = 64 * 1024 * 1024;
const s3 = await requireS3("NBD outage test (fault proxy in front of S3)");

describe.skipIf(s3 === undefined)("an S3 outage under a VM-like workload, over NBD", () => {
  const started: ServeProcess[] = [];
  let proxy: FaultProxy | undefined;
  afterAll(async () => {
    for (const server of started) if (server.child.exitCode === null) server.child.kill("SIGKILL");
    await proxy?.stop();
  });

  async function serve(url: string, socket: string, env: NodeJS.ProcessEnv) {
    const server = await startServe([url, "--socket", socket], { env });
    started.push(server);
    return server;
  }

  it("fails flushes during the outage, serves cached reads, and loses nothing", async () => {
    const target = s3 ?? (undefined as never);
    proxy = await FaultProxy.start(target.endpoint);
    const url = target.newVolumeUrl("nbd-outage");
    const direct = s3Env(target);
    const viaProxy = s3Env(target, proxy.endpoint);
    expect(await runCli(["create", url, "--size", String(SIZE)], direct)).toBe(0);

    const dir = mkdtempSync(path.join(tmpdir(), "s3blk-outage-"));
    const server = await serve(url, path.join(dir, "a.sock"), viaProxy);
    const client = await NbdClient.connect(path.join(dir, "a.sock"));

    // A VM-like start: a "boot" region written, flushed, and read back (now cached).
    const boot = pattern(1, 0, 2048);
    await client.pwrite(0, boot);
    await client.flush();
    expect(Buffer.from(await client.pread(0, boot.length)).equals(Buffer.from(boot))).toBe(true);

    // S3 goes away for longer than the retry budget (6 attempts, up to 30 s).
    proxy.outage();
    const during = pattern(2, 8192, 256);
    await client.pwrite(8192 * 512, during); // acknowledged from memory
    const started = performance.now();
    const flush = await client.flush().then(
      () => "ok",
      (error: { errno?: number }) => error.errno,
    );
    expect(flush).toBe(NBD_EIO);
    // Cached data still reads, including what was written during the outage.
    expect(Buffer.from(await client.pread(0, boot.length)).equals(Buffer.from(boot))).toBe(true);
    expect(
      Buffer.from(await client.pread(8192 * 512, during.length)).equals(Buffer.from(during)),
    ).toBe(true);
    const injected = proxy.totalInjected();
    const outageMs = Math.round(performance.now() - started);

    proxy.heal();
    await client.flush();
    await client.close();
    expect(await server.stop()).toBe(0);

    // A new server, straight to S3: every byte is there.
    const again = await serve(url, path.join(dir, "b.sock"), direct);
    const check = await NbdClient.connect(path.join(dir, "b.sock"));
    expect(Buffer.from(await check.pread(0, boot.length)).equals(Buffer.from(boot))).toBe(true);
    expect(
      Buffer.from(await check.pread(8192 * 512, during.length)).equals(Buffer.from(during)),
    ).toBe(true);
    await check.close();
    expect(await again.stop()).toBe(0);
    console.log(
      `NBD outage: ${injected} S3 requests failed over ${outageMs} ms; FLUSH answered EIO, ` +
        `cached reads served, ${(boot.length + during.length) / 1024} KiB verified after restart`,
    );
  }, 120_000);
});
