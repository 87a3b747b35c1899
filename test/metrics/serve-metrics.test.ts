/**
 * `s3blk serve --metrics` on the real S3 server, scraped over HTTP as Prometheus would:
 *
 * - the scrape passes `promtool check metrics` (names, units, HELP, suffixes);
 * - the NBD counters match what qemu-io sent (K writes of N bytes, reads, a flush), and errors
 *   are counted by command and error value;
 * - the S3 counters match the requests a recording proxy in front of RGW saw: the chunk PUTs of
 *   the flush, and every request of the run, operation by operation;
 * - the lease: state, epoch, and renewals as the proxy saw them;
 * - the cost summary at stop: requests by price class, bytes, stored bytes and dollars, at the
 *   prices of a `--prices` file chosen so that the expected dollars are plain arithmetic.
 */

import { spawnSync } from "node:child_process";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

import { missingTools, run } from "../nbd/harness.js";
import { NbdClient } from "../support/nbd-client.js";
import { FaultProxy, type ProxyRequest } from "../support/fault-proxy.js";
import { requireS3, s3Env } from "../support/s3-target.js";
import { runCli, startServe, type ServeProcess } from "../support/serve-process.js";

const KiB = 1024;
const MiB = 1024 * KiB;
const s3 = await requireS3("metrics suite (s3blk serve --metrics on RGW)");
const missing = missingTools("metrics suite", ["qemu-io", "promtool"]);

/** One sample of a scrape: `name{labels} value`. */
interface Sample {
  readonly name: string;
  readonly labels: Record<string, string>;
  readonly value: number;
}

function parseScrape(text: string): Sample[] {
  const samples: Sample[] = [];
  for (const line of text.split("\n")) {
    if (line === "" || line.startsWith("#")) continue;
    const match = /^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    if (match === null) throw new Error(`not a sample line: ${line}`);
    const labels: Record<string, string> = {};
    for (const m of (match[2] ?? "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[m[1]!] = m[2]!;
    samples.push({ name: match[1]!, labels, value: Number(match[3]) });
  }
  return samples;
}

/** The value of the one sample of `name` whose labels include `labels` (0 if there is none). */
function value(samples: readonly Sample[], name: string, labels: Record<string, string> = {}) {
  const found = samples.filter(
    (s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v),
  );
  expect(found.length, `${name} ${JSON.stringify(labels)}`).toBeLessThanOrEqual(1);
  return found[0]?.value ?? 0;
}

async function scrape(url: string): Promise<{ text: string; samples: Sample[] }> {
  const response = await fetch(url);
  expect(response.status).toBe(200);
  expect(response.headers.get("content-type")).toMatch(/^text\/plain; version=0\.0\.4/);
  const text = await response.text();
  return { text, samples: parseScrape(text) };
}

function promtool(text: string): { status: number | null; output: string } {
  const result = spawnSync("promtool", ["check", "metrics"], { input: text, encoding: "utf8" });
  return { status: result.status, output: `${result.stdout}${result.stderr}`.trim() };
}

/** What the proxy saw, by S3 operation (path-style requests: /bucket/key?query). */
function operationOf(r: ProxyRequest): string {
  if (r.method === "PUT") return "PutObject";
  if (r.method === "DELETE") return "DeleteObject";
  if (r.method === "POST" && r.path.includes("?delete")) return "DeleteObjects";
  if (r.method === "GET" && /list-type=2/.test(r.path)) return "ListObjectsV2";
  if (r.method === "GET") return "GetObject";
  return `${r.method} ${r.path}`;
}

function tally(requests: readonly ProxyRequest[]): Record<string, number> {
  const counts: Record<string, number> = {};
  for (const r of requests) counts[operationOf(r)] = (counts[operationOf(r)] ?? 0) + 1;
  return counts;
}

const metricsUrl = (serve: ServeProcess) => /^metrics: (\S+)$/m.exec(serve.stdout())?.[1] ?? "";

describe.skipIf(s3 === undefined || missing.length > 0)("s3blk serve --metrics on RGW", () => {
  const work = mkdtempSync(path.join(tmpdir(), "s3blk-metrics-"));
  let proxy: FaultProxy;
  let serve: ServeProcess;
  let url: string;
  let name: string;
  let socket: string;

  beforeAll(async () => {
    const target = s3!;
    proxy = await FaultProxy.start(target.endpoint);
    url = target.newVolumeUrl("metrics");
    name = url.slice(url.lastIndexOf("/") + 1);
    expect(await runCli(["create", url, "--size", "64M"], s3Env(target))).toBe(0);
    socket = path.join(work, "nbd.sock");
    // Round prices, so that the expected dollars are plain arithmetic.
    const prices = path.join(work, "prices.json");
    writeFileSync(
      prices,
      JSON.stringify({
        name: "test",
        putCopyPostListPer1000: 1000,
        getHeadPer1000: 100,
        transferOutPerGb: 1024,
        storagePerGbMonth: 0,
      }),
    );
    serve = await startServe(
      [
        url,
        ...["--socket", socket, "--metrics", "127.0.0.1:0", "--prices", prices],
        ...["--lease-duration", "15s", "--gc-grace", "2s"],
      ],
      // The process lease of 15 s renews every 7.5 s: renewals show up within the test.
      { env: s3Env(target, proxy.endpoint), globalArgs: ["--request-timeout", "1s"] },
    );
  }, 120_000);

  afterAll(async () => {
    if (serve?.child.exitCode === null) serve.child.kill("SIGKILL");
    await proxy?.stop();
  });

  it("serves a scrape that promtool accepts, and only at /metrics", async () => {
    const { text } = await scrape(metricsUrl(serve));
    const checked = promtool(text);
    expect(checked.output).toBe("");
    expect(checked.status).toBe(0);
    expect(text).toMatch(/^# TYPE s3blk_nbd_request_duration_seconds histogram$/m);
    const other = await fetch(metricsUrl(serve).replace(/\/metrics$/, "/"));
    expect(other.status).toBe(404);
    const post = await fetch(metricsUrl(serve), { method: "POST" });
    expect(post.status).toBe(405);
  });

  it("promtool would catch a badly named metric (so the check above can fail)", () => {
    const bad = "# HELP s3blk_foo_total a gauge\n# TYPE s3blk_foo_total gauge\ns3blk_foo_total 1\n";
    expect(promtool(bad).output).toMatch(/_total/);
  });

  it("counts qemu-io's writes, reads and flush, and the chunk PUTs the proxy saw", async () => {
    const before = (await scrape(metricsUrl(serve))).samples;
    const seen = proxy.requests.length;
    const WRITES = 5;
    const WRITE_BYTES = 64 * KiB;
    // Five writes, one in each of five chunks; three reads of written data; qemu-io flushes at
    // exit.
    const io = await run("qemu-io", [
      "-f",
      "raw",
      ...Array.from({ length: WRITES }, (_, i) => ["-c", `write -P 0x3${i} ${i}M 64k`]).flat(),
      ...["-c", "read -P 0x30 0 64k", "-c", "read -P 0x31 1M 64k", "-c", "read -P 0x32 2M 64k"],
      `nbd+unix:///${name}?socket=${socket}`,
    ]);
    expect(io.stderr).toBe("");
    expect(io.code).toBe(0);
    const scraped = await scrape(metricsUrl(serve));
    // With every family populated now, histograms included, the scrape still passes.
    expect(promtool(scraped.text).output).toBe("");
    const after = scraped.samples;
    const delta = (metric: string, labels: Record<string, string> = {}) =>
      value(after, metric, { export: name, ...labels }) -
      value(before, metric, { export: name, ...labels });

    const write = { command: "NBD_CMD_WRITE" };
    const read = { command: "NBD_CMD_READ" };
    expect(delta("s3blk_nbd_requests_total", write)).toBe(WRITES);
    expect(delta("s3blk_nbd_request_bytes_total", write)).toBe(WRITES * WRITE_BYTES);
    expect(delta("s3blk_nbd_requests_total", read)).toBe(3);
    expect(delta("s3blk_nbd_request_bytes_total", read)).toBe(3 * WRITE_BYTES);
    expect(delta("s3blk_nbd_requests_total", { command: "NBD_CMD_FLUSH" })).toBeGreaterThan(0);
    expect(delta("s3blk_nbd_request_duration_seconds_count", write)).toBe(WRITES);
    expect(delta("s3blk_nbd_request_duration_seconds_bucket", { ...write, le: "+Inf" })).toBe(
      WRITES,
    );
    // The reads found the written pages in memory: three hits, no miss.
    expect(delta("s3blk_cache_hits_total")).toBe(3);
    expect(delta("s3blk_cache_misses_total")).toBe(0);

    // The flush uploaded one object per written chunk, and the proxy saw exactly those.
    const chunkPuts = proxy.requests
      .slice(seen)
      .filter((r) => r.method === "PUT" && r.path.includes("/chunks/"));
    expect(chunkPuts.length).toBe(WRITES);
    expect(delta("s3blk_writeback_uploads_total")).toBe(WRITES);
    const puts = delta("s3blk_s3_requests_total", { operation: "PutObject", outcome: "ok" });
    const leasePuts = proxy.requests
      .slice(seen)
      .filter((r) => r.method === "PUT" && r.path.includes("lease.json")).length;
    expect(puts).toBe(WRITES + leasePuts);
    expect(delta("s3blk_s3_uploaded_bytes_total")).toBeGreaterThanOrEqual(WRITES * MiB);
    expect(value(after, "s3blk_stored_bytes", { export: name })).toBe(WRITES * MiB);
    expect(value(after, "s3blk_cache_dirty_bytes", { export: name })).toBe(0);
    expect(value(after, "s3blk_writeback_backlog_chunks", { export: name })).toBe(0);
  }, 60_000);

  it("counts the garbage a rewrite makes, and its deletion once the grace has passed", async () => {
    const uri = `nbd+unix:///${name}?socket=${socket}`;
    const gauge = (samples: Sample[], metric: string) => value(samples, metric, { export: name });
    const before = (await scrape(metricsUrl(serve))).samples;
    const seen = proxy.requests.length;
    // Rewrite two chunks the test above wrote: their old objects become garbage, kept for the
    // 2 s grace (qemu-io's flush at exit makes the rewrites durable).
    const io = await run("qemu-io", [
      ...["-f", "raw", "-c", "write -P 0x41 0 64k", "-c", "write -P 0x42 1M 64k", uri],
    ]);
    expect(io.code).toBe(0);
    const made = (await scrape(metricsUrl(serve))).samples;
    expect(gauge(made, "s3blk_gc_pending_objects")).toBe(2);
    expect(gauge(made, "s3blk_gc_deleted_objects_total")).toBe(
      gauge(before, "s3blk_gc_deleted_objects_total"),
    );
    // Past the grace, the next flush deletes them, in one batch, after it answers.
    await new Promise((resolve) => setTimeout(resolve, 2500));
    expect((await run("qemu-io", ["-f", "raw", "-c", "flush", uri])).code).toBe(0);
    let after = (await scrape(metricsUrl(serve))).samples;
    for (let i = 0; i < 50 && gauge(after, "s3blk_gc_pending_objects") > 0; i++) {
      await new Promise((resolve) => setTimeout(resolve, 100));
      after = (await scrape(metricsUrl(serve))).samples;
    }
    expect(gauge(after, "s3blk_gc_pending_objects")).toBe(0);
    expect(
      gauge(after, "s3blk_gc_deleted_objects_total") -
        gauge(before, "s3blk_gc_deleted_objects_total"),
    ).toBe(2);
    expect(gauge(after, "s3blk_gc_delete_failures_total")).toBe(0);
    const batches = proxy.requests.slice(seen).filter((r) => operationOf(r) === "DeleteObjects");
    expect(batches.length).toBe(1);
  }, 60_000);

  it("counts refused requests by command and error value", async () => {
    const before = (await scrape(metricsUrl(serve))).samples;
    const client = await NbdClient.connect(socket, name);
    await expect(client.pwrite(64 * MiB, new Uint8Array(4096))).rejects.toThrow();
    await expect(client.pwrite(64 * MiB + 4096, new Uint8Array(4096))).rejects.toThrow();
    await expect(client.pread(64 * MiB, 4096)).rejects.toThrow();
    await client.close();
    const after = (await scrape(metricsUrl(serve))).samples;
    const delta = (metric: string, labels: Record<string, string>) =>
      value(after, metric, { export: name, ...labels }) -
      value(before, metric, { export: name, ...labels });
    const enospc = { command: "NBD_CMD_WRITE", errno: "NBD_ENOSPC" };
    expect(delta("s3blk_nbd_errors_total", enospc)).toBe(2);
    expect(delta("s3blk_nbd_errors_total", { command: "NBD_CMD_READ", errno: "NBD_EINVAL" })).toBe(
      1,
    );
    // Refused requests moved no bytes.
    expect(delta("s3blk_nbd_request_bytes_total", { command: "NBD_CMD_WRITE" })).toBe(0);
    expect(delta("s3blk_nbd_requests_total", { command: "NBD_CMD_WRITE" })).toBe(2);
  });

  it("shows the lease held, its epoch, and the renewals the proxy saw", async () => {
    // The process lease's writes: its creation, then its renewals (the volume's claim is
    // written once, and counted as its acquisition).
    const leaseWrites = () =>
      proxy.requests.filter((r) => r.method === "PUT" && r.path.includes("s3blk-processes/"));
    // Three that succeeded: another test's injected faults may fail one on the way.
    const deadline = Date.now() + 30_000;
    while (leaseWrites().filter((r) => r.status === 200).length < 3 && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 200));
    }
    const sentBefore = leaseWrites().filter((r) => r.status === 200).length;
    const { samples } = await scrape(metricsUrl(serve));
    const sentAfter = leaseWrites().filter((r) => r.status === 200).length;
    expect(value(samples, "s3blk_lease_state", { export: name, state: "held" })).toBe(1);
    expect(value(samples, "s3blk_lease_state", { export: name, state: "lost" })).toBe(0);
    expect(value(samples, "s3blk_lease_epoch", { export: name })).toBeGreaterThanOrEqual(1);
    // One successful write created the process lease; every other was a renewal.
    const renewals = value(samples, "s3blk_lease_renewals_total", { export: name });
    expect(renewals).toBeGreaterThanOrEqual(2);
    expect(renewals).toBeGreaterThanOrEqual(sentBefore - 1);
    expect(renewals).toBeLessThanOrEqual(sentAfter - 1);
    // A renewal attempt that failed (another test's injected fault) is counted as one.
    const failed = leaseWrites().filter((r) => r.status !== 200).length;
    expect(value(samples, "s3blk_lease_renewal_failures_total", { export: name })).toBe(failed);
  }, 45_000);

  it("sums up the cost at stop, matching every request the proxy saw", async () => {
    expect(await serve.stop()).toBe(0);
    const line = serve
      .stderr()
      .split("\n")
      .filter((l) => l.startsWith("{"))
      .map((l) => JSON.parse(l) as { msg: string; cost?: Record<string, number> })
      .find((e) => e.msg.startsWith(`cost of ${name}: `));
    expect(line?.msg).toMatch(/at test prices$/);
    const cost = line!.cost!;
    // The proxy saw every request of the server's life, the opening ones included.
    const seen = tally(proxy.requests);
    const classA = (seen.PutObject ?? 0) + (seen.ListObjectsV2 ?? 0) + (seen.DeleteObjects ?? 0);
    const classB = seen.GetObject ?? 0;
    expect(cost.putCopyPostListRequests).toBe(classA);
    expect(cost.getHeadRequests).toBe(classB);
    expect(cost.deleteRequests).toBe(seen.DeleteObject ?? 0);
    expect(cost.storedBytes).toBe(5 * MiB);
    expect(cost.requestDollars).toBeCloseTo(classA * 1 + classB * 0.1, 9);
    expect(cost.transferDollars).toBeCloseTo((cost.downloadedBytes! / 2 ** 30) * 1024, 9);
    expect(cost.storageDollars).toBe(0);
    expect(cost.totalDollars).toBeCloseTo(cost.requestDollars! + cost.transferDollars!, 9);
  }, 60_000);
});
