// Probe an S3 server for the numbers that pick s3blk's defaults: PUT/GET throughput by object
// size and concurrency, ranged-GET latency, how to read a GET body, user-metadata limits,
// conditional PUTs and DeleteObjects. Plain Node ESM on purpose (no build step), using the same
// SDK settings as src/store: no flexible checksums, path-style URLs, one attempt, keep-alive.
//
//   eval "$(bash infra/rgw-start.sh)"; node bench/s3-probe.mjs [--quick] [--json FILE]
//
// Env: S3_ENDPOINT, S3_ACCESS_KEY/S3_SECRET_KEY (or AWS_*), S3_REGION, S3_BUCKET (s3blk-test).
// Every object goes under probe-<random>/ and is deleted at the end. A run takes about 2 minutes
// (--quick: about 40 s). All traffic goes to S3_ENDPOINT only.
/* global console */
import { Buffer } from "node:buffer";
import http from "node:http";
import process from "node:process";
import { randomBytes } from "node:crypto";
import { writeFileSync } from "node:fs";
import { performance } from "node:perf_hooks";

process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= "true";
const {
  S3Client,
  CreateBucketCommand,
  PutObjectCommand,
  GetObjectCommand,
  HeadObjectCommand,
  DeleteObjectsCommand,
  ListObjectsV2Command,
} = await import("@aws-sdk/client-s3");
const { NodeHttpHandler } = await import("@smithy/node-http-handler");

const KiB = 1024;
const MiB = 1024 * KiB;
const args = process.argv.slice(2);
const QUICK = args.includes("--quick");
const jsonPath = args.includes("--json") ? args[args.indexOf("--json") + 1] : undefined;
/** Measured time per throughput/latency cell, after a warm-up that is not counted. */
const CELL_MS = QUICK ? 1000 : 2500;
const WARMUP_MS = QUICK ? 200 : 500;
const LAT_MS = QUICK ? 800 : 1500;

const endpoint = process.env.S3_ENDPOINT;
if (!endpoint) {
  console.error('S3_ENDPOINT is not set; run: eval "$(bash infra/rgw-start.sh)"');
  process.exit(2);
}
const bucket = process.env.S3_BUCKET ?? "s3blk-test";
const prefix = `probe-${randomBytes(4).toString("hex")}/`;
const agent = new http.Agent({ keepAlive: true, maxSockets: 64 });
const client = new S3Client({
  endpoint,
  region: process.env.S3_REGION ?? process.env.AWS_REGION ?? "us-east-1",
  credentials: {
    accessKeyId: process.env.S3_ACCESS_KEY ?? process.env.AWS_ACCESS_KEY_ID ?? "",
    secretAccessKey: process.env.S3_SECRET_KEY ?? process.env.AWS_SECRET_ACCESS_KEY ?? "",
  },
  forcePathStyle: true,
  requestChecksumCalculation: "WHEN_REQUIRED",
  responseChecksumValidation: "WHEN_REQUIRED",
  maxAttempts: 1,
  requestHandler: new NodeHttpHandler({
    httpAgent: agent,
    connectionTimeout: 5000,
    requestTimeout: 30000,
  }),
});
const results = { endpoint, startedAt: new Date().toISOString(), quick: QUICK };
const written = new Set();

// ---- helpers ---------------------------------------------------------------------------------

const fmt = (n, d = 1) => (Number.isFinite(n) ? n.toFixed(d) : "-");
const sizeName = (b) => (b >= MiB ? `${b / MiB} MiB` : `${b / KiB} KiB`);
function pct(sorted, p) {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}
function table(title, head, rows) {
  console.log(`\n### ${title}\n`);
  console.log(`| ${head.join(" | ")} |`);
  console.log(`|${head.map(() => "---").join("|")}|`);
  for (const r of rows) console.log(`| ${r.join(" | ")} |`);
}
function errName(e) {
  return `${e?.name ?? "Error"} ${e?.$metadata?.httpStatusCode ?? ""}`.trim();
}

async function put(key, body, extra = {}) {
  written.add(key);
  return client.send(new PutObjectCommand({ Bucket: bucket, Key: key, Body: body, ...extra }));
}

/** Reads a GET body into one Buffer of ContentLength, chunk by chunk ('data' events). */
function readIntoBuffer(out) {
  const len = Number(out.ContentLength);
  const buf = Buffer.allocUnsafe(len);
  let off = 0;
  return new Promise((resolve, reject) => {
    out.Body.on("data", (c) => {
      if (off + c.length > len) return reject(new Error(`body longer than ContentLength ${len}`));
      c.copy(buf, off);
      off += c.length;
    });
    out.Body.on("end", () =>
      off === len ? resolve(buf) : reject(new Error(`short body ${off}/${len}`)),
    );
    out.Body.on("error", reject);
  });
}
/** The same with `for await`, the idiom most code uses. */
async function readIntoBufferAsyncIter(out) {
  const len = Number(out.ContentLength);
  const buf = Buffer.allocUnsafe(len);
  let off = 0;
  for await (const c of out.Body) {
    if (off + c.length > len) throw new Error(`body longer than ContentLength ${len}`);
    c.copy(buf, off);
    off += c.length;
  }
  if (off !== len) throw new Error(`short body ${off}/${len}`);
  return buf;
}
const READERS = {
  transformToByteArray: (out) => out.Body.transformToByteArray(),
  "prealloc, for await": readIntoBufferAsyncIter,
  "prealloc, on('data')": readIntoBuffer,
};

async function get(key, range, reader = readIntoBuffer) {
  const out = await client.send(new GetObjectCommand({ Bucket: bucket, Key: key, Range: range }));
  const body = await reader(out);
  return { out, body };
}

/**
 * Runs `op(i)` from `concurrency` workers for WARMUP_MS + ms. Counts only operations that start
 * after the warm-up; the clock stops when the last counted one finishes.
 * `op` returns the number of payload bytes it moved.
 */
async function runCell(concurrency, ms, op) {
  const t0 = performance.now();
  const measureFrom = t0 + WARMUP_MS;
  const stopAt = measureFrom + ms;
  const lat = [];
  let bytes = 0;
  let errors = 0;
  let firstError;
  let i = 0;
  let lastEnd = measureFrom;
  const cpu0 = { at: 0, usage: undefined };
  async function worker() {
    for (;;) {
      const start = performance.now();
      if (start >= stopAt) return;
      if (start >= measureFrom && cpu0.usage === undefined) cpu0.usage = process.cpuUsage();
      try {
        const n = await op(i++);
        const end = performance.now();
        if (start >= measureFrom) {
          lat.push(end - start);
          bytes += n;
          lastEnd = Math.max(lastEnd, end);
        }
      } catch (e) {
        errors++;
        firstError ??= errName(e);
      }
    }
  }
  await Promise.all(Array.from({ length: concurrency }, worker));
  const cpu = process.cpuUsage(cpu0.usage);
  const seconds = (lastEnd - measureFrom) / 1000;
  lat.sort((a, b) => a - b);
  return {
    concurrency,
    requests: lat.length,
    errors,
    firstError,
    seconds,
    mibPerS: bytes / MiB / seconds,
    reqPerS: lat.length / seconds,
    p50Ms: pct(lat, 50),
    p90Ms: pct(lat, 90),
    p99Ms: pct(lat, 99),
    cpuMsPerReq: (cpu.user + cpu.system) / 1000 / Math.max(1, lat.length),
  };
}

// ---- setup -----------------------------------------------------------------------------------

try {
  await client.send(new CreateBucketCommand({ Bucket: bucket }));
} catch (e) {
  if (e?.name !== "BucketAlreadyOwnedByYou" && e?.name !== "BucketAlreadyExists") throw e;
}
console.log(
  `# S3 probe: ${endpoint}, bucket ${bucket}, prefix ${prefix}${QUICK ? " (quick)" : ""}`,
);
console.log(`node ${process.version}, ${new Date().toISOString()}`);
const t00 = performance.now();
// Warm the agent's sockets so the first cell does not pay for connection setup.
await Promise.all(
  Array.from({ length: 32 }, () =>
    client.send(new ListObjectsV2Command({ Bucket: bucket, MaxKeys: 1 })),
  ),
);

// ---- (a) throughput --------------------------------------------------------------------------

const SIZES = [256 * KiB, 1 * MiB, 4 * MiB];
const CONCURRENCY = [8, 32];
const POOL = 32; // keys per size; overwritten round-robin by PUT, read round-robin by GET
const payload = {};
for (const size of SIZES) payload[size] = randomBytes(size);
results.throughput = [];
for (const size of SIZES) {
  const key = (i) => `${prefix}tp/${size}/${i % POOL}`;
  for (const c of CONCURRENCY) {
    const r = await runCell(c, CELL_MS, async (i) => (await put(key(i), payload[size]), size));
    results.throughput.push({ op: "PUT", size, ...r });
  }
  for (const c of CONCURRENCY) {
    const r = await runCell(c, CELL_MS, async (i) => (await get(key(i))).body.length);
    results.throughput.push({ op: "GET", size, ...r });
  }
}
table(
  "(a) throughput (GET bodies read into a preallocated Buffer)",
  [
    "op",
    "object",
    "in flight",
    "MiB/s",
    "req/s",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "client CPU ms/req",
    "errors",
  ],
  results.throughput.map((r) => [
    r.op,
    sizeName(r.size),
    r.concurrency,
    fmt(r.mibPerS),
    fmt(r.reqPerS),
    fmt(r.p50Ms),
    fmt(r.p90Ms),
    fmt(r.p99Ms),
    fmt(r.cpuMsPerReq, 2),
    r.errors ? `${r.errors} (${r.firstError})` : 0,
  ]),
);

// ---- (b) latency of ranged and whole GETs ------------------------------------------------------

// Chunk-sized objects to read from: one 1 MiB and one 4 MiB (already written above).
const obj1 = `${prefix}tp/${1 * MiB}/0`;
const obj4 = `${prefix}tp/${4 * MiB}/0`;
const cases = [
  { what: "range 4 KiB of 1 MiB", key: obj1, objSize: MiB, len: 4 * KiB },
  { what: "range 64 KiB of 1 MiB", key: obj1, objSize: MiB, len: 64 * KiB },
  { what: "range 256 KiB of 1 MiB", key: obj1, objSize: MiB, len: 256 * KiB },
  { what: "whole 1 MiB", key: obj1, objSize: MiB },
  { what: "range 4 KiB of 4 MiB", key: obj4, objSize: 4 * MiB, len: 4 * KiB },
  { what: "range 64 KiB of 4 MiB", key: obj4, objSize: 4 * MiB, len: 64 * KiB },
  { what: "range 1 MiB of 4 MiB", key: obj4, objSize: 4 * MiB, len: MiB },
  { what: "whole 4 MiB", key: obj4, objSize: 4 * MiB },
  { what: "whole 256 KiB", key: `${prefix}tp/${256 * KiB}/0`, objSize: 256 * KiB },
];
results.latency = [];
for (const cs of cases) {
  for (const c of [1, 16]) {
    const r = await runCell(c, LAT_MS, async () => {
      let range;
      if (cs.len !== undefined) {
        // 4 KiB-aligned random offset, as a block device would ask
        const blocks = (cs.objSize - cs.len) / (4 * KiB);
        const off = Math.floor(Math.random() * (blocks + 1)) * 4 * KiB;
        range = `bytes=${off}-${off + cs.len - 1}`;
      }
      const { body } = await get(cs.key, range);
      if (body.length !== (cs.len ?? cs.objSize)) throw new Error(`got ${body.length} bytes`);
      return body.length;
    });
    results.latency.push({ ...cs, ...r });
  }
}
table(
  "(b) GET latency",
  ["request", "in flight", "p50 ms", "p90 ms", "p99 ms", "req/s", "MiB/s", "errors"],
  results.latency.map((r) => [
    r.what,
    r.concurrency,
    fmt(r.p50Ms, 2),
    fmt(r.p90Ms, 2),
    fmt(r.p99Ms, 2),
    fmt(r.reqPerS),
    fmt(r.mibPerS),
    r.errors ? `${r.errors} (${r.firstError})` : 0,
  ]),
);

// ---- body reading: transformToByteArray vs a preallocated Buffer ---------------------------------

results.bodyRead = [];
for (const [size, key] of [
  [MiB, obj1],
  [4 * MiB, obj4],
]) {
  for (const c of [1, 8]) {
    // Interleave the readers in short rounds so drift in the server hits all of them alike.
    const acc = Object.fromEntries(Object.keys(READERS).map((n) => [n, []]));
    const rounds = QUICK ? 2 : 4;
    for (let round = 0; round < rounds; round++) {
      for (const [name, reader] of Object.entries(READERS)) {
        acc[name].push(
          await runCell(c, LAT_MS / 2, async () => {
            const { body } = await get(key, undefined, reader);
            if (body.length !== size) throw new Error(`got ${body.length} bytes`);
            return size;
          }),
        );
      }
    }
    for (const [name, runs] of Object.entries(acc)) {
      const reqs = runs.reduce((s, r) => s + r.requests, 0);
      const secs = runs.reduce((s, r) => s + r.seconds, 0);
      const p50s = runs.map((r) => r.p50Ms).sort((a, b) => a - b);
      results.bodyRead.push({
        size,
        concurrency: c,
        reader: name,
        requests: reqs,
        mibPerS: (reqs * size) / MiB / secs,
        p50Ms: p50s[Math.floor(p50s.length / 2)],
        cpuMsPerReq: runs.reduce((s, r) => s + r.cpuMsPerReq * r.requests, 0) / Math.max(1, reqs),
        errors: runs.reduce((s, r) => s + r.errors, 0),
      });
    }
  }
}
table(
  "GET body: transformToByteArray() vs chunks copied into Buffer.allocUnsafe(ContentLength)",
  [
    "object",
    "in flight",
    "reader",
    "MiB/s",
    "p50 ms (median of rounds)",
    "client CPU ms/req",
    "errors",
  ],
  results.bodyRead.map((r) => [
    sizeName(r.size),
    r.concurrency,
    r.reader,
    fmt(r.mibPerS),
    fmt(r.p50Ms, 2),
    fmt(r.cpuMsPerReq, 2),
    r.errors,
  ]),
);

// ---- (c) user metadata -------------------------------------------------------------------------

results.metadata = [];
const metaKey = `${prefix}meta/obj`;
for (const n of [1 * KiB, 2 * KiB, 4 * KiB, 8 * KiB, 12 * KiB, 16 * KiB]) {
  const value = randomBytes(n).toString("base64").slice(0, n); // n base64 characters
  const row = { valueBytes: n };
  try {
    await put(metaKey, randomBytes(64 * KiB), { Metadata: { s3blk: value } });
    row.put = "200";
    const head = await client.send(new HeadObjectCommand({ Bucket: bucket, Key: metaKey }));
    row.head =
      head.Metadata?.s3blk === value
        ? "returned intact"
        : `missing/changed (${head.Metadata?.s3blk?.length ?? 0} B)`;
    const { out } = await get(metaKey, "bytes=4096-8191");
    row.rangedGet =
      out.Metadata?.s3blk === value
        ? "returned intact"
        : `missing/changed (${out.Metadata?.s3blk?.length ?? 0} B)`;
    row.rangedStatus = `${out.$metadata.httpStatusCode} ${out.ContentRange ?? ""}`.trim();
  } catch (e) {
    row.put = errName(e);
    // Does the rejected request poison its keep-alive socket for the next request?
    row.nextRequest = await client
      .send(new HeadObjectCommand({ Bucket: bucket, Key: `${prefix}tp/${256 * KiB}/0` }))
      .then(
        (r) => `${r.$metadata.httpStatusCode} ok`,
        (e2) => `${errName(e2)}: ${e2?.message ?? ""}`,
      );
  }
  results.metadata.push(row);
}
table(
  "(c) user metadata: one x-amz-meta-s3blk key of N base64 characters",
  [
    "value bytes",
    "PUT",
    "HeadObject",
    "ranged GET (bytes=4096-8191)",
    "next request after a failed PUT",
  ],
  results.metadata.map((r) => [
    r.valueBytes,
    r.put,
    r.head ?? "-",
    r.rangedGet ? `${r.rangedGet}; ${r.rangedStatus}` : "-",
    r.nextRequest ?? "-",
  ]),
);

// ---- (d) conditional PUTs ----------------------------------------------------------------------

async function outcome(p) {
  try {
    const r = await p;
    return `${r.$metadata.httpStatusCode} ok`;
  } catch (e) {
    return errName(e);
  }
}
results.conditional = [];
const cKey = `${prefix}cond/obj`;
const cond = (what, expect, got) => results.conditional.push({ what, expect, got });
cond(
  "IfNoneMatch '*' on a missing key",
  "200",
  await outcome(put(cKey, "v1", { IfNoneMatch: "*" })),
);
cond(
  "IfNoneMatch '*' on an existing key",
  "412",
  await outcome(put(cKey, "v2", { IfNoneMatch: "*" })),
);
const head1 = await client.send(new HeadObjectCommand({ Bucket: bucket, Key: cKey }));
const quoted = head1.ETag;
const unquoted = quoted.replace(/^"|"$/g, "");
cond(
  `IfMatch quoted ETag ${quoted}`,
  "200 (AWS)",
  await outcome(put(cKey, "v3", { IfMatch: quoted })),
);
const headQ = await client.send(new HeadObjectCommand({ Bucket: bucket, Key: cKey }));
const afterQuoted = headQ.ETag === quoted ? "(object unchanged)" : "(object replaced)";
results.conditional[results.conditional.length - 1].got += ` ${afterQuoted}`;
const cur = headQ.ETag.replace(/^"|"$/g, "");
cond(`IfMatch unquoted ETag ${cur}`, "200", await outcome(put(cKey, "v4", { IfMatch: cur })));
cond(
  "IfMatch stale unquoted ETag",
  "412",
  await outcome(put(cKey, "v5", { IfMatch: unquoted === cur ? "0".repeat(32) : unquoted })),
);
cond(
  "IfMatch on a missing key",
  "404 or 412",
  await outcome(put(`${cKey}-missing`, "x", { IfMatch: cur })),
);
// Races: 16 writers at once. A compare-and-swap is only safe if exactly one wins.
{
  const rKey = `${prefix}cond/race-create`;
  const outs = await Promise.all(
    Array.from({ length: 16 }, (_, i) => outcome(put(rKey, `writer ${i}`, { IfNoneMatch: "*" }))),
  );
  cond(
    "16 concurrent IfNoneMatch '*' on one new key: winners",
    "1",
    `${outs.filter((o) => o.endsWith("ok")).length} (${[...new Set(outs)].join(", ")})`,
  );
}
{
  const rKey = `${prefix}cond/race-swap`;
  await put(rKey, "base");
  const etag = (
    await client.send(new HeadObjectCommand({ Bucket: bucket, Key: rKey }))
  ).ETag.replace(/^"|"$/g, "");
  const outs = await Promise.all(
    Array.from({ length: 16 }, (_, i) => outcome(put(rKey, `writer ${i}`, { IfMatch: etag }))),
  );
  cond(
    "16 concurrent IfMatch on one ETag: winners",
    "1",
    `${outs.filter((o) => o.endsWith("ok")).length} (${[...new Set(outs)].join(", ")})`,
  );
}
table(
  "(d) conditional PUT",
  ["case", "expected", "got"],
  results.conditional.map((r) => [r.what, r.expect, r.got]),
);

// ---- (e) DeleteObjects of 1000 keys ---------------------------------------------------------------

{
  const keys = Array.from({ length: 1000 }, (_, i) => `${prefix}del/${String(i).padStart(4, "0")}`);
  const small = randomBytes(4 * KiB);
  const t0 = performance.now();
  let next = 0;
  await Promise.all(
    Array.from({ length: 32 }, async () => {
      while (next < keys.length) await put(keys[next++], small);
    }),
  );
  const putMs = performance.now() - t0;
  const t1 = performance.now();
  const out = await client.send(
    new DeleteObjectsCommand({
      Bucket: bucket,
      Delete: { Objects: keys.map((Key) => ({ Key })), Quiet: true },
    }),
  );
  const delMs = performance.now() - t1;
  for (const k of keys) written.delete(k);
  const left = await client.send(
    new ListObjectsV2Command({ Bucket: bucket, Prefix: `${prefix}del/` }),
  );
  results.deleteObjects = {
    putMs,
    deleteMs: delMs,
    errors: out.Errors?.length ?? 0,
    leftAfter: left.KeyCount ?? 0,
  };
  table(
    "(e) DeleteObjects",
    ["step", "time", "notes"],
    [
      [
        "PUT 1000 x 4 KiB, 32 in flight",
        `${fmt(putMs, 0)} ms`,
        `${fmt(1000 / (putMs / 1000))} req/s`,
      ],
      [
        "DeleteObjects 1000 keys (one request, Quiet)",
        `${fmt(delMs, 0)} ms`,
        `errors ${results.deleteObjects.errors}, keys left ${results.deleteObjects.leftAfter}`,
      ],
    ],
  );
}

// ---- cleanup ---------------------------------------------------------------------------------------

const rest = [...written];
for (let i = 0; i < rest.length; i += 1000) {
  await client.send(
    new DeleteObjectsCommand({
      Bucket: bucket,
      Delete: { Objects: rest.slice(i, i + 1000).map((Key) => ({ Key })), Quiet: true },
    }),
  );
}
results.totalSeconds = (performance.now() - t00) / 1000;
console.log(
  `\ntotal ${fmt(results.totalSeconds)} s; deleted ${rest.length} leftover keys under ${prefix}`,
);
if (jsonPath) writeFileSync(jsonPath, JSON.stringify(results, null, 2));
client.destroy();
agent.destroy();
