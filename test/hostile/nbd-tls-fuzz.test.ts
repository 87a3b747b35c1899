/**
 * Hostile handshakes against `s3blk serve --tls=require`: random and mutated plain handshakes
 * before NBD_OPT_STARTTLS, and random and mutated option frames inside TLS (node:tls as the
 * client), split at random points, while a healthy TLS client writes and verifies throughout.
 *
 * Required: nothing crashes; before TLS, a client learns nothing (no export list, no export
 * info, no transmission), whatever it sends; inside TLS, bad frames get their error or close
 * that one connection; the healthy client is never disturbed.
 */

import { spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { mkdtempSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import tls from "node:tls";
import fc from "fast-check";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

import {
  GREETING_BYTES,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_OPT_ABORT,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_OPT_LIST,
  NBD_OPT_STARTTLS,
  NBD_REP_ACK,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_TLS_REQD,
  NBD_REP_ERR_TOO_BIG,
  NBD_REP_ERR_UNSUP,
  NBD_REP_INFO,
  NBD_REP_MAGIC,
  NBD_REP_SERVER,
} from "../../src/nbd/protocol.js";
import {
  encodeClientFlags,
  encodeInfoOption,
  encodeOption,
  parseOptionReply,
  type OptionReply,
} from "../../src/nbd/protocol/client.js";
import { childEnv } from "../support/environment.js";
import { NbdClient } from "../support/nbd-client.js";
import { CLI, startServe, type ServeProcess } from "../support/serve-process.js";
import { makeTestCertificates, type TestCertificates } from "../support/tls-certificates.js";
import { verifyThroughout, type VerifyingLoop } from "../support/verifying-loop.js";

const SIZE = 64 * 1024 * 1024;

let certs: TestCertificates;
let server: ServeProcess;
let port: number;
let healthy: NbdClient;
let healthyLoop: VerifyingLoop | undefined;

function clientTls(): tls.ConnectionOptions {
  const file = (name: string) => readFileSync(path.join(certs.client, name));
  return {
    ca: file("ca-cert.pem"),
    key: file("client-key.pem"),
    cert: file("client-cert.pem"),
    host: "127.0.0.1",
  };
}

function splitAt(bytes: Uint8Array, cuts: number[]): Uint8Array[] {
  const points = [...new Set(cuts.map((c) => c % (bytes.length + 1)))].sort((a, b) => a - b);
  const out: Uint8Array[] = [];
  let last = 0;
  for (const p of points) {
    out.push(bytes.subarray(last, p));
    last = p;
  }
  out.push(bytes.subarray(last));
  return out.filter((c) => c.length > 0);
}

/**
 * Every option reply in `data` from `at`, until one is incomplete or what follows is not an
 * option reply (the reply to an NBD_OPT_EXPORT_NAME that entered transmission).
 */
function optionReplies(data: Buffer, at: number): OptionReply[] {
  const out: OptionReply[] = [];
  while (data.length - at >= 8 && data.readBigUInt64BE(at) === NBD_REP_MAGIC) {
    const reply = parseOptionReply(data, at);
    if (reply === null) break;
    out.push(reply);
    at = reply.end;
  }
  return out;
}

/**
 * Send `chunks` on `socket` with pauses, then collect what comes back for `waitMs`, or, given
 * `done`, until `done(data)` holds (at most 30 s: the machine may be busy).
 */
async function exchange(
  socket: net.Socket | tls.TLSSocket,
  chunks: readonly Uint8Array[],
  waitMs: number,
  done?: (data: Buffer) => boolean,
): Promise<{ data: Buffer; closed: boolean }> {
  const parts: Buffer[] = [];
  let closed = false;
  socket.on("data", (d: Buffer) => parts.push(d));
  socket.on("close", () => (closed = true));
  socket.on("error", () => (closed = true));
  for (const chunk of chunks) {
    if (closed) break;
    socket.write(chunk);
    await new Promise((r) => setTimeout(r, 2));
  }
  if (done === undefined) {
    await new Promise((r) => setTimeout(r, waitMs));
  } else {
    const deadline = Date.now() + 30_000;
    while (!closed && !done(Buffer.concat(parts)) && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 10));
    }
  }
  socket.destroy();
  return { data: Buffer.concat(parts), closed };
}

/** A plain connection that sends `chunks`. */
async function plain(chunks: readonly Uint8Array[], waitMs = 40, done?: (data: Buffer) => boolean) {
  const socket = net.connect(port, "127.0.0.1");
  await new Promise((resolve, reject) => {
    socket.once("connect", resolve);
    socket.once("error", reject);
  });
  return exchange(socket, chunks, waitMs, done);
}

/** A connection upgraded to TLS (client flags sent), which then sends `chunks` inside TLS. */
async function insideTls(
  chunks: readonly Uint8Array[],
  waitMs = 40,
  done?: (data: Buffer) => boolean,
) {
  const socket = net.connect(port, "127.0.0.1");
  let head = Buffer.alloc(0);
  const onData = (d: Buffer) => (head = Buffer.concat([head, d]));
  socket.on("data", onData);
  await new Promise((resolve) => socket.once("connect", resolve));
  socket.write(encodeClientFlags(NBD_FLAG_C_FIXED_NEWSTYLE));
  socket.write(encodeOption(NBD_OPT_STARTTLS));
  while (parseOptionReply(head, GREETING_BYTES) === null) {
    await new Promise((resolve) => socket.once("data", resolve));
  }
  expect(parseOptionReply(head, GREETING_BYTES)?.replyType).toBe(NBD_REP_ACK);
  socket.off("data", onData);
  const secure = tls.connect({ ...clientTls(), socket });
  await new Promise<void>((resolve, reject) => {
    secure.once("secureConnect", resolve);
    secure.once("error", reject);
  });
  return exchange(secure, chunks, waitMs, done);
}

beforeAll(async () => {
  certs = makeTestCertificates();
  const dir = mkdtempSync(path.join(tmpdir(), "s3blk-tls-fuzz-"));
  const volume = `file://${dir}/vol`;
  const create = spawn(process.execPath, [CLI, "create", volume, "--size", String(SIZE)], {
    env: childEnv(),
  });
  await new Promise((r) => create.once("exit", r));
  server = await startServe([
    volume,
    "--listen",
    "127.0.0.1:0",
    "--tls=require",
    "--tls-certificates",
    certs.server,
  ]);
  port = Number(/:(\d+)\//.exec(server.uris[0]!)?.[1]);
  healthy = await NbdClient.connect({ host: "127.0.0.1", port }, "", { tls: clientTls() });
  // A well-behaved client writes and verifies throughout the abuse.
  healthyLoop = verifyThroughout(healthy);
}, 60_000);

afterAll(async () => {
  await healthyLoop?.stop().catch(() => 0);
  await healthy?.close().catch(() => {});
  await server?.stop();
});

/** What a plain client may get before TLS: refusals, the ack of STARTTLS or ABORT. Nothing else. */
const PLAIN_REPLIES = new Set([NBD_REP_ERR_TLS_REQD, NBD_REP_ERR_INVALID, NBD_REP_ACK]);

describe("hostile input against s3blk serve --tls=require", () => {
  it("before STARTTLS: random bytes and mutated handshakes learn nothing and crash nothing", async () => {
    const valid = Buffer.concat([
      encodeClientFlags(NBD_FLAG_C_FIXED_NEWSTYLE),
      encodeOption(NBD_OPT_LIST),
      encodeInfoOption(NBD_OPT_INFO, "", []),
      encodeInfoOption(NBD_OPT_GO, "", []),
    ]);
    await fc.assert(
      fc.asyncProperty(
        fc.oneof(
          fc.uint8Array({ minLength: 1, maxLength: 300 }),
          fc
            .array(fc.tuple(fc.nat(valid.length - 1), fc.integer({ min: 0, max: 255 })), {
              minLength: 1,
              maxLength: 3,
            })
            .map((edits) => {
              const mutated = Buffer.from(valid);
              for (const [at, byte] of edits) mutated[at] = byte;
              return new Uint8Array(mutated);
            }),
        ),
        fc.array(fc.nat(400), { maxLength: 5 }),
        async (bytes, cuts) => {
          const { data } = await plain(splitAt(bytes, cuts));
          const replies = optionReplies(data, GREETING_BYTES);
          for (const reply of replies) {
            expect(PLAIN_REPLIES.has(reply.replyType)).toBe(true);
            if (reply.replyType === NBD_REP_ACK) {
              expect([NBD_OPT_STARTTLS, NBD_OPT_ABORT]).toContain(reply.option);
            }
          }
          expect(server.child.exitCode).toBeNull();
        },
      ),
      { numRuns: 60 },
    );
  }, 120_000);

  it("before STARTTLS: the unmutated plain handshake gets NBD_REP_ERR_TLS_REQD for each option", async () => {
    const { data } = await plain(
      [
        encodeClientFlags(NBD_FLAG_C_FIXED_NEWSTYLE),
        encodeOption(NBD_OPT_LIST),
        encodeInfoOption(NBD_OPT_GO, "", []),
      ],
      0,
      (d) => optionReplies(d, GREETING_BYTES).length >= 2,
    );
    expect(optionReplies(data, GREETING_BYTES).map((r) => r.replyType)).toEqual([
      NBD_REP_ERR_TLS_REQD,
      NBD_REP_ERR_TLS_REQD,
    ]);
  });

  it("inside TLS: random and mutated option frames crash nothing", async () => {
    const valid = Buffer.concat([
      encodeOption(0x7abc, new Uint8Array([1, 2, 3])),
      encodeOption(NBD_OPT_LIST),
      encodeInfoOption(NBD_OPT_GO, "", []),
    ]);
    await fc.assert(
      fc.asyncProperty(
        fc.oneof(
          fc.uint8Array({ minLength: 1, maxLength: 300 }),
          fc.tuple(fc.nat(valid.length - 1), fc.integer({ min: 0, max: 255 })).map(([at, byte]) => {
            const mutated = Buffer.from(valid);
            mutated[at] = byte;
            return new Uint8Array(mutated);
          }),
          fc
            .tuple(fc.integer({ min: 0, max: 20 }), fc.uint8Array({ maxLength: 64 }))
            .map(([option, data]) => new Uint8Array(encodeOption(option, data))),
        ),
        fc.array(fc.nat(400), { maxLength: 5 }),
        async (bytes, cuts) => {
          const { data } = await insideTls(splitAt(bytes, cuts));
          // Inside TLS, NBD_REP_ERR_TLS_REQD is never sent.
          for (const reply of optionReplies(data, 0)) {
            expect(reply.replyType).not.toBe(NBD_REP_ERR_TLS_REQD);
          }
          expect(server.child.exitCode).toBeNull();
        },
      ),
      { numRuns: 40 },
    );
  }, 180_000);

  it("inside TLS: answers an unknown option, STARTTLS again and an over-long option, then lists the export", async () => {
    const { data } = await insideTls(
      [
        encodeOption(0x7abc, new Uint8Array([1, 2, 3])),
        encodeOption(NBD_OPT_STARTTLS),
        encodeOption(NBD_OPT_INFO, new Uint8Array(70_000)),
        encodeOption(NBD_OPT_LIST),
        encodeInfoOption(NBD_OPT_INFO, "", []),
      ],
      0,
      (d) => optionReplies(d, 0).length >= 8,
    );
    const types = optionReplies(data, 0).map((r) => r.replyType);
    expect(types).toEqual([
      NBD_REP_ERR_UNSUP,
      NBD_REP_ERR_INVALID,
      NBD_REP_ERR_TOO_BIG,
      NBD_REP_SERVER,
      NBD_REP_ACK,
      NBD_REP_INFO,
      NBD_REP_INFO,
      NBD_REP_ACK,
    ]);
  });

  it("kept the healthy TLS client working throughout", async () => {
    const rounds = (await healthyLoop?.stop()) ?? 0;
    expect(rounds).toBeGreaterThan(10);
    expect(server.child.exitCode).toBeNull();
    console.log(`hostile TLS input: healthy client completed ${rounds} verified rounds meanwhile`);
  });
});
