/**
 * The lease's fence under `s3blk serve`, seen from outside: the fault proxy records the time of
 * every request s3blk sends, fails every renewal of its process lease, and makes chunk uploads
 * stall or fail transiently, so that write-back keeps retrying while the lease runs out. The
 * server serves two volumes of one bucket, which share that one process lease.
 *
 * The promise (lease.ts, fenced-store.ts): a holder that cannot renew sends no write after its
 * lease stops covering it. The last moment the fence may admit a write is the expiry of the last
 * renewal that succeeded, less the clock-skew margin, less the request timeout each attempt must
 * be able to finish within. No chunk PUT or DELETE attempt of either volume may arrive after it,
 * retries included. When S3 comes back, the next renewal restores the lease and nothing written
 * is lost.
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

/** Renewed every 10 s: more than two request timeouts and the skew margin. */
const LEASE_MS = 20_000;
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
const isLeaseRenewal = (r: ProxyRequest) =>
  r.method === "PUT" && r.path.includes("/s3blk-processes/");

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
    const urls = [target.newVolumeUrl("fence-a"), target.newVolumeUrl("fence-b")];
    for (const url of urls) {
      expect(await runCli(["create", url, "--size", "256M"], s3Env(target))).toBe(0);
    }
    const names = urls.map((u) => u.slice(u.lastIndexOf("/") + 1));
    const dir = mkdtempSync(path.join(tmpdir(), "s3blk-fence-"));
    const socket = path.join(dir, "a.sock");
    const server = await startServe(
      [
        ...urls,
        "--socket",
        socket,
        "--lease-duration",
        `${LEASE_MS}ms`,
        "--writeback-delay",
        "100",
      ],
      {
        env: s3Env(target, proxy.endpoint),
        globalArgs: ["--request-timeout", `${REQUEST_TIMEOUT_MS}ms`],
      },
    );
    started.push(server);
    const clients = await Promise.all(names.map((name) => NbdClient.connect(socket, name)));

    // Healthy: a flush goes through.
    for (const [v, client] of clients.entries()) {
      await client.pwrite(0, pattern(1 + v, 0, 2048));
      await client.flush();
    }

    // Renewals fail from now on; chunk uploads stall past the request timeout or fail.
    proxy.inject({ kind: "500", methods: ["PUT"], pathIncludes: "/s3blk-processes/" });
    proxy.inject({ kind: "503", methods: ["PUT"], pathIncludes: "/chunks/", probability: 0.5 });
    proxy.inject({ kind: "stall", methods: ["PUT"], pathIncludes: "/chunks/", stallMs: 4_000 });
    const faultsFromMs = Date.now();
    // Keep the guest writing, a new block every 250 ms to each volume in turn, so write-back
    // always has work to retry, past the moment the fence must close (at most 13 s from now).
    const written: { volume: number; offset: number; data: Uint8Array }[] = [];
    for (let i = 0; Date.now() - faultsFromMs < 20_000; i++) {
      const volume = i % 2;
      const offset = (4 + i) * 1024 * 1024;
      const data = pattern(100 + i, offset / 512, BLOCK / 512);
      await clients[volume]!.pwrite(offset, data);
      written.push({ volume, offset, data });
      await new Promise((r) => setTimeout(r, 250));
    }

    const log = [...proxy.requests];
    // One process lease for both volumes: every renewal is of one key.
    expect(new Set(log.filter(isLeaseRenewal).map((r) => r.path)).size).toBe(1);
    const renewedAtMs = Math.max(
      ...log.filter((r) => isLeaseRenewal(r) && r.status === 200).map((r) => r.receivedAtMs),
    );
    expect(renewedAtMs).toBeLessThan(faultsFromMs + 1_000);
    // The record of that renewal expires LEASE_MS after it was sent, which is before it arrived.
    const lastAdmitMs = renewedAtMs + LEASE_MS - SKEW_MS - REQUEST_TIMEOUT_MS;
    const attempts = log.filter((r) => isChunkWrite(r) && r.receivedAtMs > renewedAtMs);
    // The fence was exercised: uploads of both volumes were attempted while renewals failed,
    // and were refused.
    for (const name of names) {
      expect(attempts.filter((r) => r.path.includes(`/${name}/`)).length).toBeGreaterThan(3);
    }
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
    for (const client of clients) {
      await client.flush();
      await client.close();
    }
    expect(await server.stop()).toBe(0);

    const again = await startServe([...urls, "--socket", path.join(dir, "b.sock")], {
      env: s3Env(target),
    });
    started.push(again);
    const checks = await Promise.all(
      names.map((name) => NbdClient.connect(path.join(dir, "b.sock"), name)),
    );
    for (const { volume, offset, data } of written) {
      expect(Buffer.from(await checks[volume]!.pread(offset, data.length)).equals(data)).toBe(true);
    }
    for (const check of checks) await check.close();
    expect(await again.stop()).toBe(0);
    console.log(
      `fence: ${attempts.length} chunk write attempts after the last renewal, the last ` +
        `${Math.max(...attempts.map((r) => r.receivedAtMs)) - lastAdmitMs} ms from the last ` +
        `admissible moment; ${written.length} blocks written meanwhile, all read back`,
    );
  }, 150_000);
});
