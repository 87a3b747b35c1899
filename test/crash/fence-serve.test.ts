/**
 * The lease's fence under `s3blk serve`, seen from outside: the fault proxy records the time of
 * every request s3blk sends, fails every lease renewal, and makes chunk uploads stall or fail
 * transiently, so that write-back keeps retrying while the lease runs out.
 *
 * The promise (lease.ts, fenced-store.ts): a holder that cannot renew sends no write after its
 * lease stops covering it. The last moment the fence may admit a write is the expiry of the last
 * renewal that succeeded, less the clock-skew margin, less the request timeout each attempt must
 * be able to finish within. No chunk PUT or DELETE attempt may arrive after it, retries included.
 * When S3 comes back, the next renewal restores the lease and nothing written is lost.
 */

import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { FaultProxy, type ProxyRequest } from "../support/fault-proxy.js";
import { NbdClient } from "../support/nbd-client.js";
import { runCli, startServe, type ServeProcess } from "../support/serve-process.js";
import { requireS3, s3Env } from "../support/s3-target.js";
import { pattern } from "../support/volumes.js";

const LEASE_MS = 14_000;
const REQUEST_TIMEOUT_MS = 2_000;
/** The lease's default clock-skew margin. */
const SKEW_MS = 5_000;
/** Between the fence's check and the request's arrival at the proxy: the SDK and loopback. */
const SEND_ALLOWANCE_MS = 500;
const BLOCK = 64 * 1024;

const s3 = await requireS3("fence test (s3blk serve behind the fault proxy)");

const isChunkWrite = (r: ProxyRequest) =>
  (r.path.includes("/chunks/") && (r.method === "PUT" || r.method === "DELETE")) ||
  (r.method === "POST" && r.path.includes("delete"));
const isLeaseRenewal = (r: ProxyRequest) => r.method === "PUT" && r.path.includes("lease.json");

describe.skipIf(s3 === undefined)("the lease fence under s3blk serve", () => {
  const started: ServeProcess[] = [];
  let proxy: FaultProxy | undefined;
  afterAll(async () => {
    for (const server of started) if (server.child.exitCode === null) server.child.kill("SIGKILL");
    await proxy?.stop();
  });

  it("sends no chunk write attempt after the lease stops covering it, and loses nothing", async () => {
    const target = s3 ?? (undefined as never);
    proxy = await FaultProxy.start(target.endpoint);
    const url = target.newVolumeUrl("fence");
    expect(await runCli(["create", url, "--size", "256M"], s3Env(target))).toBe(0);
    const dir = mkdtempSync(path.join(tmpdir(), "s3blk-fence-"));
    const socket = path.join(dir, "a.sock");
    const server = await startServe(
      [url, "--socket", socket, "--lease-duration", `${LEASE_MS}ms`, "--writeback-delay", "100"],
      {
        env: s3Env(target, proxy.endpoint),
        globalArgs: ["--request-timeout", `${REQUEST_TIMEOUT_MS}ms`],
      },
    );
    started.push(server);
    const client = await NbdClient.connect(socket);

    // Healthy: a flush goes through.
    await client.pwrite(0, pattern(1, 0, 2048));
    await client.flush();

    // Renewals fail from now on; chunk uploads stall past the request timeout or fail.
    proxy.inject({ kind: "500", methods: ["PUT"], pathIncludes: "lease.json" });
    proxy.inject({ kind: "503", methods: ["PUT"], pathIncludes: "/chunks/", probability: 0.5 });
    proxy.inject({ kind: "stall", methods: ["PUT"], pathIncludes: "/chunks/", stallMs: 4_000 });
    const faultsFromMs = Date.now();
    // Keep the guest writing, a new block every 250 ms, so write-back always has work to retry.
    const written: { offset: number; data: Uint8Array }[] = [];
    for (let i = 0; Date.now() - faultsFromMs < 15_000; i++) {
      const offset = (4 + i) * 1024 * 1024;
      const data = pattern(100 + i, offset / 512, BLOCK / 512);
      await client.pwrite(offset, data);
      written.push({ offset, data });
      await new Promise((r) => setTimeout(r, 250));
    }

    const log = [...proxy.requests];
    const renewedAtMs = Math.max(
      ...log.filter((r) => isLeaseRenewal(r) && r.status === 200).map((r) => r.receivedAtMs),
    );
    expect(renewedAtMs).toBeLessThan(faultsFromMs + 1_000);
    // The record of that renewal expires LEASE_MS after it was sent, which is before it arrived.
    const lastAdmitMs = renewedAtMs + LEASE_MS - SKEW_MS - REQUEST_TIMEOUT_MS;
    const attempts = log.filter((r) => isChunkWrite(r) && r.receivedAtMs > renewedAtMs);
    // The fence was exercised: uploads were attempted while renewals failed, and were refused.
    expect(attempts.length).toBeGreaterThan(3);
    expect(server.stderr()).toMatch(/could not be renewed in time; not writing/);
    const late = attempts.filter((r) => r.receivedAtMs > lastAdmitMs + SEND_ALLOWANCE_MS);
    expect(
      late.map((r) => `${r.method} ${r.path} ${r.receivedAtMs - lastAdmitMs} ms late`),
    ).toEqual([]);

    // S3 comes back: the next renewal restores the lease, and the flush stores everything.
    const healedAtMs = Date.now();
    proxy.heal();
    while (
      !proxy.requests.some(
        (r) => isLeaseRenewal(r) && r.status === 200 && r.receivedAtMs > healedAtMs,
      )
    ) {
      await new Promise((r) => setTimeout(r, 100));
    }
    await client.flush();
    await client.close();
    expect(await server.stop()).toBe(0);

    const again = await startServe([url, "--socket", path.join(dir, "b.sock")], {
      env: s3Env(target),
    });
    started.push(again);
    const check = await NbdClient.connect(path.join(dir, "b.sock"));
    for (const { offset, data } of written) {
      expect(Buffer.from(await check.pread(offset, data.length)).equals(data)).toBe(true);
    }
    await check.close();
    expect(await again.stop()).toBe(0);
    console.log(
      `fence: ${attempts.length} chunk write attempts after the last renewal, the last ` +
        `${Math.max(...attempts.map((r) => r.receivedAtMs)) - lastAdmitMs} ms from the last ` +
        `admissible moment; ${written.length} blocks written meanwhile, all read back`,
    );
  }, 120_000);
});
