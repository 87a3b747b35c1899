/**
 * The cost estimate's arithmetic, the price table's checks, and the NBD request cells, on
 * figures chosen by hand.
 */

import { describe, expect, it } from "vitest";
import {
  DEFAULT_PRICES,
  estimateCost,
  parsePriceTable,
  PriceTableError,
  requestClasses,
  SECONDS_PER_MONTH,
  StorageMeter,
} from "../../src/metrics/cost.js";
import { LATENCY_BUCKETS_SECONDS, NbdExportMetrics } from "../../src/nbd/export-metrics.js";
import { CountingStore } from "../../src/store/counting-store.js";
import { MemoryStore } from "../../src/store/memory-store.js";
import { NBD_CMD_READ, NBD_CMD_WRITE, NBD_EIO, NBD_ENOSPC } from "../../src/nbd/protocol.js";

const GB = 2 ** 30;

describe("the price table", () => {
  it("defaults to S3 Standard in us-east-1", () => {
    expect(DEFAULT_PRICES).toEqual({
      name: "S3 Standard us-east-1",
      storagePerGbMonth: 0.023,
      putCopyPostListPer1000: 0.005,
      getHeadPer1000: 0.0004,
      transferOutPerGb: 0.09,
    });
  });

  it("replaces only the prices a file names", () => {
    const table = parsePriceTable('{"transferOutPerGb": 0}', "in-region.json");
    expect(table).toEqual({
      ...DEFAULT_PRICES,
      name: "S3 Standard us-east-1 with in-region.json",
      transferOutPerGb: 0,
    });
    expect(parsePriceTable('{"name": "R2", "putCopyPostListPer1000": 0.0045}', "f").name).toBe(
      "R2",
    );
  });

  it.each([
    ["{", /f\.json: not JSON/],
    ["[1]", /f\.json: a price table is a JSON object/],
    [
      '{"getHeadPer1000": -1}',
      /"getHeadPer1000" must be a price in dollars, a number of at least 0, not -1/,
    ],
    ['{"getHeadPer1000": "0.1"}', /"getHeadPer1000" must be a price .* not "0\.1"/],
    ['{"storagePerGbMonth": null}', /"storagePerGbMonth" must be a price/],
    ['{"getPer1000": 0.1}', /unknown field "getPer1000"; the fields are name, storagePerGbMonth/],
    ['{"name": ""}', /"name" must be a string/],
  ])("refuses %s with a clear error", (text, message) => {
    expect(() => parsePriceTable(text, "f.json")).toThrow(PriceTableError);
    expect(() => parsePriceTable(text, "f.json")).toThrow(message);
  });
});

describe("the estimate", () => {
  it("prices requests by class, downloads, and stored GB-months", () => {
    const estimate = estimateCost(
      { putCopyPostList: 2000, getHead: 10_000, free: 7 },
      { bytesIn: 3 * GB, bytesOut: 5 * GB },
      GB,
      2 * GB * SECONDS_PER_MONTH,
      DEFAULT_PRICES,
    );
    expect(estimate.dollars.requests).toBeCloseTo(2 * 0.005 + 10 * 0.0004, 12);
    expect(estimate.dollars.transfer).toBeCloseTo(3 * 0.09, 12);
    expect(estimate.dollars.storage).toBeCloseTo(2 * 0.023, 12);
    expect(estimate.totalDollars).toBeCloseTo(0.014 + 0.27 + 0.046, 12);
    expect(estimate.uploadedBytes).toBe(5 * GB); // uploads are free, but shown
  });

  it("sorts counted requests into price classes: DELETE free, DeleteObjects a POST", async () => {
    const counter = new CountingStore(new MemoryStore());
    await counter.put("a", new Uint8Array(3));
    await counter.put("b", new Uint8Array(3));
    await counter.get("a");
    await counter.get("missing");
    await counter.listPage("");
    await counter.delete("a");
    await counter.deleteMany(["b"]);
    expect(requestClasses(counter.outcomes())).toEqual({ putCopyPostList: 4, getHead: 2, free: 1 });
    expect(counter.outcomes().GetObject).toMatchObject({ ok: 1, not_found: 1 });
  });

  it("integrates stored bytes over time, linearly between samples", () => {
    const meter = new StorageMeter(0, 0);
    expect(meter.sample(10_000, 100)).toBe(500); // 0 → 100 bytes over 10 s
    expect(meter.sample(20_000, 100)).toBe(1500);
    expect(meter.sample(20_000, 300)).toBe(1500); // no time, no bytes-seconds
  });
});

describe("an export's request cells", () => {
  it("count requests, bytes of successful ones, latency buckets and errors", () => {
    const m = new NbdExportMetrics();
    m.record(NBD_CMD_WRITE, 4096, 0.0003, 0);
    m.record(NBD_CMD_WRITE, 4096, 0.0003, NBD_ENOSPC);
    m.record(NBD_CMD_READ, 512, 20, NBD_EIO); // past the largest bound
    m.record(99, 0, 0, 22); // an unknown command, refused with EINVAL
    const write = m.cells.find((c) => c.command === "NBD_CMD_WRITE")!;
    expect(write.requests).toBe(2);
    expect(write.bytes).toBe(4096);
    const bucket = LATENCY_BUCKETS_SECONDS.indexOf(0.0005);
    expect(write.latencyCounts[bucket]).toBe(2);
    expect([...write.errorCounts].reduce((a, b) => a + b)).toBe(1);
    const read = m.cells.find((c) => c.command === "NBD_CMD_READ")!;
    expect(read.latencyCounts[LATENCY_BUCKETS_SECONDS.length]).toBe(1);
    expect(m.cells.at(-1)).toMatchObject({ command: "unknown", requests: 1 });
  });
});
