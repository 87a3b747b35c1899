/**
 * The lean GET path (src/store/s3-get.ts) on a real S3 server: it answers exactly what the SDK's
 * GetObjectCommand answers (bodies, ranges, metadata, entity tags, sizes, misses), its failures
 * go through the same error table (wrong bucket, wrong key, injected 500/503, resets, a stall
 * past the request timeout), it honours the fault proxy's latency, and it works against an
 * HTTPS endpoint.
 */

import { execFile } from "node:child_process";
import { readFileSync } from "node:fs";
import path from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { FaultProxy } from "../support/fault-proxy.js";
import { StoreError } from "../../src/store/object-store.js";
import { S3Store, type S3StoreOptions } from "../../src/store/s3-store.js";
import { encodeKey } from "../../src/store/s3-get.js";
import { childEnv } from "../support/environment.js";
import { requireS3 } from "../support/s3-target.js";
import { makeTestCertificates } from "../support/tls-certificates.js";

const s3 = await requireS3("lean GET path on S3");
const run = promisify(execFile);

async function failure(promise: Promise<unknown>): Promise<StoreError> {
  const error = await promise.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(error).toBeInstanceOf(StoreError);
  return error as StoreError;
}

describe.skipIf(s3 === undefined)("lean GET path", () => {
  const target = s3!;
  const prefix = target.newVolumeUrl("lean-get").replace(`s3://${target.bucket}/`, "");
  const make = (options: Partial<S3StoreOptions> = {}) =>
    new S3Store({
      bucket: target.bucket,
      endpoint: target.endpoint,
      region: target.region,
      credentials: target.credentials,
      ...options,
    });
  const lean = make();
  const sdk = make({ leanGet: false });
  const body = Buffer.alloc(300_001);
  for (let i = 0; i < body.length; i++) body[i] = (i * 7919) & 0xff;
  // Characters that S3's path escaping treats specially.
  const keys = [`${prefix}/plain`, `${prefix}/odd key+!'()*~ä/€=&?#%`];
  const metadata = { "s3blk-a": "one", "s3blk-b": "AAECAwQ=" };

  beforeAll(async () => {
    for (const key of keys) await sdk.put(key, body, { metadata });
  });
  afterAll(async () => {
    await sdk.deleteMany(keys);
    await lean.close();
    await sdk.close();
  });

  it("escapes keys as RFC 3986 does, segment by segment", () => {
    expect(encodeKey("a b/c+d/!'()*~")).toBe("a%20b/c%2Bd/%21%27%28%29%2A~");
  });

  it("answers what the SDK answers: whole, ranged, past the end, missing", async () => {
    const ranges = [
      undefined,
      { offsetBytes: 0, lengthBytes: 1 },
      { offsetBytes: 65_536, lengthBytes: 65_536 },
      { offsetBytes: 299_000, lengthBytes: 10_000 },
      { offsetBytes: 400_000, lengthBytes: 10 },
    ];
    for (const key of keys) {
      for (const range of ranges) {
        const options = range === undefined ? undefined : { range };
        const [ours, theirs] = await Promise.all([lean.get(key, options), sdk.get(key, options)]);
        expect(ours).toBeDefined();
        expect(Buffer.from(ours!.body).equals(Buffer.from(theirs!.body))).toBe(true);
        expect(ours!.objectSizeBytes).toBe(theirs!.objectSizeBytes);
        expect(ours!.etag).toBe(theirs!.etag);
        if (range === undefined || range.offsetBytes < body.length) {
          expect(ours!.metadata).toEqual(metadata);
          expect(ours!.metadata).toEqual(theirs!.metadata);
          expect(ours!.objectSizeBytes).toBe(body.length);
        }
      }
      const whole = await lean.get(key);
      expect(Buffer.from(whole!.body).equals(body)).toBe(true);
    }
    expect(await lean.get(`${prefix}/missing`)).toBeUndefined();
    expect(await sdk.get(`${prefix}/missing`)).toBeUndefined();
  });

  it("translates a missing bucket and bad credentials as the SDK path does", async () => {
    for (const leanGet of [true, false]) {
      const noBucket = make({ bucket: `${target.bucket}-absent-x`, leanGet });
      expect((await failure(noBucket.get("k"))).code).toBe("NoSuchBucket");
      await noBucket.close();
      const wrongKey = make({
        credentials: { accessKeyId: target.credentials.accessKeyId, secretAccessKey: "wrong" },
        leanGet,
      });
      const error = await failure(wrongKey.get(keys[0]!));
      expect(error.code).toBe("AccessDenied");
      expect(error.message).toMatch(/HTTP 403 SignatureDoesNotMatch/);
      await wrongKey.close();
    }
  });

  describe("behind the fault proxy", () => {
    let proxy: FaultProxy;
    let store: S3Store;
    beforeAll(async () => {
      proxy = await FaultProxy.start(target.endpoint);
      store = make({ endpoint: proxy.endpoint, requestTimeoutMs: 400 });
    });
    afterAll(async () => {
      await store.close();
      await proxy.stop();
    });

    it("marks 500, 503, resets and stalls transient, and a stall ends at the timeout", async () => {
      proxy.inject({ kind: "500", times: 1 });
      const internal = await failure(store.get(keys[0]!));
      expect([internal.code, internal.message]).toEqual([
        "Transient",
        `GET ${keys[0]}: HTTP 500 InternalError: injected`,
      ]);
      proxy.inject({ kind: "503", times: 1 });
      expect((await failure(store.get(keys[0]!))).message).toMatch(/HTTP 503 SlowDown/);
      // A reset of a reused connection before any answer is the keep-alive race: sent once
      // more on a new connection. A second reset is a failure.
      proxy.inject({ kind: "reset", times: 1 });
      let sent = proxy.counts.requests;
      expect(Buffer.from((await store.get(keys[0]!))!.body).equals(body)).toBe(true);
      expect(proxy.counts.requests - sent).toBe(2);
      proxy.inject({ kind: "reset", times: 2 });
      sent = proxy.counts.requests;
      expect((await failure(store.get(keys[0]!))).code).toBe("Transient");
      expect(proxy.counts.requests - sent).toBe(2);
      proxy.inject({ kind: "stall", times: 1, stallMs: 10_000 });
      const startedMs = Date.now();
      const stalled = await failure(store.get(keys[0]!));
      expect(stalled.code).toBe("Transient");
      expect(stalled.message).toMatch(/TimeoutError|400 ms/);
      // The timeout fired, not the proxy's 10 s stall.
      expect(Date.now() - startedMs).toBeLessThan(5_000);
      // And the next request, on a fresh or reused socket, is whole again.
      expect(Buffer.from((await store.get(keys[0]!))!.body).equals(body)).toBe(true);
    });

    it("waits the proxy's latency before every request it forwards", async () => {
      proxy.latencyMs = 150;
      try {
        const startedMs = Date.now();
        const got = await store.get(keys[0]!, { range: { offsetBytes: 0, lengthBytes: 4096 } });
        expect(Date.now() - startedMs).toBeGreaterThanOrEqual(150);
        expect(Buffer.from(got!.body).equals(body.subarray(0, 4096))).toBe(true);
      } finally {
        proxy.latencyMs = 0;
      }
    });
  });

  it("reads through an HTTPS endpoint whose certificate the process trusts", async () => {
    const certificates = makeTestCertificates();
    const server = path.join(certificates.server);
    const proxy = await FaultProxy.start(target.endpoint, {
      tls: {
        key: readFileSync(path.join(server, "server-key.pem")),
        cert: readFileSync(path.join(server, "server-cert.pem")),
      },
    });
    try {
      expect(proxy.endpoint).toMatch(/^https:/);
      // NODE_EXTRA_CA_CERTS is read at start only: a child process, on the built store.
      const script = `
        const { S3Store } = await import(${JSON.stringify(path.resolve("dist/store/s3-store.js"))});
        const store = new S3Store(JSON.parse(process.argv[1]));
        const got = await store.get(process.argv[2]);
        const { createHash } = await import("node:crypto");
        console.log(createHash("sha256").update(got.body).digest("hex"), JSON.stringify(got.metadata));
        await store.close();`;
      const options = {
        bucket: target.bucket,
        endpoint: proxy.endpoint,
        region: target.region,
        credentials: target.credentials,
      };
      const { stdout } = await run(
        process.execPath,
        ["--input-type=module", "-e", script, JSON.stringify(options), keys[0]!],
        {
          env: childEnv({
            NODE_EXTRA_CA_CERTS: path.join(server, "ca-cert.pem"),
            AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED: "true",
          }),
        },
      );
      const { createHash } = await import("node:crypto");
      expect(stdout.trim()).toBe(
        `${createHash("sha256").update(body).digest("hex")} ${JSON.stringify(metadata)}`,
      );
      expect(proxy.counts.forwarded).toBe(1);
    } finally {
      await proxy.stop();
    }
  });
});
