/**
 * What an idle served volume costs, counted at the server: `s3blk serve` of 1 volume and of 20
 * volumes in one bucket, each behind its own fault proxy in front of RGW (which records every
 * request), written to by qemu-io and then left idle, with an nbdsh client connected, for a bit
 * over a minute. The only requests in that minute must be the renewals of the one process lease
 * (one a minute with the default 120 s lease), the same for 1 volume as for 20: nothing per
 * volume, and no background work on a timer. The writes left garbage whose grace (10 s) passes
 * during the idle minute; it is deleted by the next flush after it, never by a timer.
 */

import { spawn } from "node:child_process";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { createVolume } from "../../src/lifecycle/volume-lifecycle.js";
import { openStoreStack } from "../../src/store/store-stack.js";
import { missingTools, run } from "../nbd/harness.js";
import { FaultProxy, type ProxyRequest } from "../support/fault-proxy.js";
import { requireS3, s3Env, stackOptions } from "../support/s3-target.js";
import { startServe, type ServeProcess } from "../support/serve-process.js";

const s3 = await requireS3("idle cost of s3blk serve on S3");
const missing = missingTools("idle cost of s3blk serve", ["qemu-io", "nbdsh"]);

/** A bit over a minute: one renewal of a 120 s process lease falls inside. */
const IDLE_MS = 65_000;
const MiB = 1024 * 1024;

const isRenewal = (r: ProxyRequest) => r.method === "PUT" && r.path.includes("/s3blk-processes/");

interface Outcome {
  readonly volumes: number;
  readonly idle: readonly ProxyRequest[];
  readonly sinceCreationMs: number;
  readonly afterFlush: readonly ProxyRequest[];
}

describe.skipIf(s3 === undefined || missing.length > 0)("an idle s3blk serve on RGW", () => {
  const started: ServeProcess[] = [];
  const proxies: FaultProxy[] = [];
  afterAll(async () => {
    for (const server of started) if (server.child.exitCode === null) server.child.kill("SIGKILL");
    for (const proxy of proxies) await proxy.stop();
  });

  async function idleServe(volumes: number): Promise<Outcome> {
    const target = s3 ?? (undefined as never);
    const proxy = await FaultProxy.start(target.endpoint);
    proxies.push(proxy);
    const urls = Array.from({ length: volumes }, (_, i) => target.newVolumeUrl(`idle${i}`));
    for (const url of urls) {
      const stack = openStoreStack(url, stackOptions(target));
      await createVolume(stack, { sizeBytes: 64 * MiB });
      await stack.store.close();
    }
    const dir = mkdtempSync(path.join(tmpdir(), "s3blk-idle-"));
    const socket = path.join(dir, "s.sock");
    const server = await startServe([...urls, "--socket", socket, "--gc-grace", "10s"], {
      env: s3Env(target, proxy.endpoint),
    });
    started.push(server);
    const uri = server.uris[0]!;
    // Writes: a chunk, rewritten (its first object is garbage now, for 10 s), all flushed.
    const wrote = await run("qemu-io", [
      "-f",
      "raw",
      "-c",
      "write -P 0x11 0 1M",
      "-c",
      "flush",
      "-c",
      "write -P 0x22 0 64k",
      "-c",
      "flush",
      uri,
    ]);
    expect(wrote.code, wrote.stderr).toBe(0);
    // A guest that stays connected and does nothing.
    const guest = spawn(
      "/usr/bin/python3",
      ["-c", "import nbd, sys; h = nbd.NBD(); h.connect_uri(sys.argv[1]); sys.stdin.read()", uri],
      { stdio: ["pipe", "ignore", "inherit"] },
    );
    await new Promise((r) => setTimeout(r, 1000));

    const creation = proxy.requests.find(isRenewal);
    expect(creation).toBeDefined();
    const fromMs = Date.now();
    await new Promise((r) => setTimeout(r, IDLE_MS));
    const idle = proxy.requests.filter((r) => r.receivedAtMs >= fromMs);

    // The next flush (another guest's, after the grace) is what deletes the garbage.
    const flushFromMs = Date.now();
    const flushed = await run("qemu-io", ["-f", "raw", "-c", "flush", uri]);
    expect(flushed.code, flushed.stderr).toBe(0);
    const deleted = () =>
      proxy.requests.some((r) => r.method === "POST" && r.path.includes("delete"));
    for (let i = 0; i < 100 && !deleted(); i++) await new Promise((r) => setTimeout(r, 50));
    const afterFlush = proxy.requests.filter(
      (r) => r.receivedAtMs >= flushFromMs && (r.method === "POST" || r.method === "DELETE"),
    );

    guest.stdin.end();
    await new Promise((r) => guest.once("exit", r));
    expect(await server.stop()).toBe(0);
    // At stop, the process lease goes.
    const bare = (r: ProxyRequest) => r.path.replace(/\?.*/, "");
    expect(
      proxy.requests.filter((r) => r.method === "DELETE" && bare(r) === bare(creation!)),
    ).toHaveLength(1);
    return { volumes, idle, sinceCreationMs: fromMs - creation!.receivedAtMs, afterFlush };
  }

  it("makes no request but the process lease's renewal, for 1 volume as for 20", async () => {
    const outcomes = await Promise.all([idleServe(1), idleServe(20)]);
    for (const { volumes, idle, sinceCreationMs, afterFlush } of outcomes) {
      // The renewal due 60 s after the process lease was created falls in the window.
      expect(sinceCreationMs, `${volumes} volumes`).toBeLessThan(60_000 - 1000);
      expect(
        idle.map((r) => `${r.method} ${r.path.replace(/\?.*/, "")} ${r.status}`),
        `${volumes} volumes`,
      ).toEqual([expect.stringMatching(/^PUT \/[^/]+\/s3blk-processes\/[0-9a-f-]{36}\.json 200$/)]);
      expect(afterFlush.map((r) => `${r.method} ${r.path.replace(/^\/[^/?]+/, "")}`)).toEqual([
        expect.stringMatching(/^POST \/\?delete/),
      ]);
      console.log(
        `idle: ${volumes} volume${volumes === 1 ? "" : "s"}, ${IDLE_MS / 1000} s: ` +
          `${idle.length} request${idle.length === 1 ? "" : "s"} (${idle.filter(isRenewal).length} renewal)`,
      );
    }
  }, 240_000);
});
