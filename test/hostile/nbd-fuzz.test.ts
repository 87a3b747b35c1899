/**
 * Hostile and broken input against a running `s3blk serve`: random and mutated handshakes and
 * requests, frames split at any byte, absurd lengths, offsets past the end, unknown commands,
 * options and flags, payloads shorter than announced, clients that vanish mid-request.
 *
 * Required: the server answers with the right error or closes that one connection; a healthy
 * client working throughout is never disturbed; memory stays bounded; nothing crashes.
 */

import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtempSync, readFileSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import fc from "fast-check";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  IHAVEOPT,
  NBD_CMD_READ,
  NBD_CMD_WRITE,
  NBD_EINVAL,
  NBD_ENOSPC,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_OPT_GO,
  NBD_REP_ERR_UNSUP,
  NBD_REP_ACK,
} from "../../src/nbd/protocol.js";
import {
  encodeClientFlags,
  encodeInfoOption,
  encodeOption,
  encodeRequest,
  parseOptionReply,
} from "../../src/nbd/protocol/client.js";
import { childEnv } from "../support/environment.js";
import { NbdClient, NbdRequestError } from "../support/nbd-client.js";
import { CLI, startServe, type ServeProcess } from "../support/serve-process.js";
import { pattern } from "../support/volumes.js";
import { verifyThroughout, type VerifyingLoop } from "../support/verifying-loop.js";

const SIZE = 64 * 1024 * 1024;

let server: ServeProcess;
let socket: string;
let healthy: NbdClient;
let healthyLoop: VerifyingLoop | undefined;

function rssBytes(pid: number): number {
  const status = readFileSync(`/proc/${pid}/status`, "utf8");
  return Number(/VmRSS:\s+(\d+) kB/.exec(status)?.[1] ?? 0) * 1024;
}

/** Open a raw connection, send `chunks` with pauses, and collect what comes back until close. */
async function raw(chunks: Uint8Array[], waitMs = 150): Promise<{ data: Buffer; closed: boolean }> {
  const conn = net.connect(socket);
  const parts: Buffer[] = [];
  let closed = false;
  conn.on("data", (d: Buffer) => parts.push(d));
  conn.on("close", () => (closed = true));
  conn.on("error", () => (closed = true));
  await new Promise<void>((resolve) => conn.once("connect", resolve));
  for (const chunk of chunks) {
    if (closed) break;
    conn.write(chunk);
    await new Promise((r) => setTimeout(r, 2));
  }
  await new Promise((r) => setTimeout(r, waitMs));
  conn.destroy();
  return { data: Buffer.concat(parts), closed };
}

/** A valid handshake up to transmission, as bytes. */
function handshake(): Uint8Array[] {
  return [encodeClientFlags(NBD_FLAG_C_FIXED_NEWSTYLE), encodeInfoOption(NBD_OPT_GO, "", [])];
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

beforeAll(async () => {
  const dir = mkdtempSync(path.join(tmpdir(), "s3blk-fuzz-"));
  socket = path.join(dir, "nbd.sock");
  const volume = `file://${dir}/vol`;
  const create = spawn(process.execPath, [CLI, "create", volume, "--size", String(SIZE)], {
    env: childEnv(),
  });
  await new Promise((r) => create.once("exit", r));
  server = await startServe([volume, "--socket", socket]);
  healthy = await NbdClient.connect(socket);
  // A well-behaved client writes and verifies throughout the abuse.
  healthyLoop = verifyThroughout(healthy);
}, 60_000);

afterAll(async () => {
  await healthyLoop?.stop().catch(() => 0);
  await healthy?.close().catch(() => {});
  await server?.stop();
});

describe("hostile input against s3blk serve", () => {
  it("survives random bytes and mutated handshakes", async () => {
    const valid = Buffer.concat(handshake());
    await fc.assert(
      fc.asyncProperty(
        fc.oneof(
          fc.uint8Array({ minLength: 1, maxLength: 300 }),
          fc.tuple(fc.nat(valid.length - 1), fc.integer({ min: 0, max: 255 })).map(([at, byte]) => {
            const mutated = Buffer.from(valid);
            mutated[at] = byte;
            return new Uint8Array(mutated);
          }),
        ),
        fc.array(fc.nat(400), { maxLength: 5 }),
        async (bytes, cuts) => {
          await raw(splitAt(bytes, cuts), 30);
          expect(server.child.exitCode).toBeNull();
        },
      ),
      { numRuns: 60 },
    );
  }, 120_000);

  it("answers unknown options with NBD_REP_ERR_UNSUP and carries on", async () => {
    const { data } = await raw([
      encodeClientFlags(NBD_FLAG_C_FIXED_NEWSTYLE),
      encodeOption(0x7abc, new Uint8Array([1, 2, 3])),
      encodeInfoOption(NBD_OPT_GO, "", []),
    ]);
    let at = 18; // after the greeting
    const first = parseOptionReply(data, at);
    expect(first?.option).toBe(0x7abc);
    expect(first?.replyType).toBe(NBD_REP_ERR_UNSUP);
    at = first?.end ?? at;
    let acked = false;
    for (
      let reply = parseOptionReply(data, at);
      reply !== null;
      reply = parseOptionReply(data, reply.end)
    ) {
      if (reply.replyType === NBD_REP_ACK) acked = true;
    }
    expect(acked).toBe(true);
  });

  it("refuses a bad option magic by closing that connection", async () => {
    const { closed } = await raw([
      encodeClientFlags(NBD_FLAG_C_FIXED_NEWSTYLE),
      encodeOption(NBD_OPT_GO, new Uint8Array(0), 0, IHAVEOPT ^ 1n),
    ]);
    expect(closed).toBe(true);
  });

  it("answers reads and writes past the end with errors, and keeps the connection", async () => {
    const client = await NbdClient.connect(socket);
    await expect(client.pread(SIZE, 512)).rejects.toMatchObject({ errno: NBD_EINVAL });
    await expect(client.pread(SIZE - 512, 1024)).rejects.toMatchObject({ errno: NBD_EINVAL });
    await expect(client.pwrite(SIZE - 512, new Uint8Array(1024))).rejects.toMatchObject({
      errno: NBD_ENOSPC,
    });
    await expect(client.pread(2 ** 60, 512)).rejects.toBeInstanceOf(NbdRequestError);
    const data = await client.pread(0, 4096);
    expect(data.length).toBe(4096);
    await client.close();
  });

  it("answers unknown commands and flags with EINVAL, or closes that connection", async () => {
    for (const request of [
      { flags: 0, type: 0x55, cookie: 7n, offset: 0, length: 0 },
      { flags: 0x8000, type: NBD_CMD_READ, cookie: 8n, offset: 0, length: 512 },
    ]) {
      const { data, closed } = await raw([...handshake(), encodeRequest(request)]);
      const replies = data.subarray(data.length - 16);
      const errno = replies.readUInt32BE(4);
      expect(closed || errno === NBD_EINVAL).toBe(true);
    }
    expect(server.child.exitCode).toBeNull();
  });

  it("does not allocate what a 4 GiB WRITE header claims", async () => {
    const before = rssBytes(server.child.pid ?? 0);
    const header = encodeRequest({
      flags: 0,
      type: NBD_CMD_WRITE,
      cookie: 1n,
      offset: 0,
      length: 0xffffffff,
    });
    await Promise.all(
      Array.from({ length: 4 }, () => raw([...handshake(), header, randomBytes(65536)], 300)),
    );
    const after = rssBytes(server.child.pid ?? 0);
    expect(after - before).toBeLessThan(256 * 1024 * 1024);
    expect(server.child.exitCode).toBeNull();
  });

  it("survives payloads shorter than announced and clients that vanish mid-request", async () => {
    const header = encodeRequest({
      flags: 0,
      type: NBD_CMD_WRITE,
      cookie: 1n,
      offset: 4096,
      length: 65536,
    });
    for (let i = 0; i < 20; i++) {
      const cut = Math.floor(Math.random() * header.length);
      await raw([...handshake(), header.subarray(0, cut)], 5);
      await raw([...handshake(), header, randomBytes(1000)], 5);
    }
    // Many pipelined reads, then gone before the answers.
    const reads = Array.from({ length: 64 }, (_, i) =>
      encodeRequest({
        flags: 0,
        type: NBD_CMD_READ,
        cookie: BigInt(i + 1),
        offset: i * 65536,
        length: 65536,
      }),
    );
    await raw([...handshake(), ...reads], 0);
    expect(server.child.exitCode).toBeNull();
  });

  it("serves a WRITE split at every kind of byte boundary", async () => {
    const data = pattern(77, 64, 8);
    const frame = encodeRequest(
      { flags: 0, type: NBD_CMD_WRITE, cookie: 5n, offset: 64 * 512, length: data.length },
      data,
    );
    for (const cuts of [
      [1],
      [27, 28],
      [100, 2000, 4000],
      Array.from({ length: 40 }, (_, i) => i * 103),
    ]) {
      await raw([...handshake(), ...splitAt(frame, cuts)], 100);
    }
    const client = await NbdClient.connect(socket);
    expect(Buffer.from(await client.pread(64 * 512, data.length)).equals(Buffer.from(data))).toBe(
      true,
    );
    await client.close();
  });

  it("kept the healthy client working and memory bounded throughout", async () => {
    const rounds = (await healthyLoop?.stop()) ?? 0;
    expect(rounds).toBeGreaterThan(10);
    expect(rssBytes(server.child.pid ?? 0)).toBeLessThan(1024 * 1024 * 1024);
    expect(server.child.exitCode).toBeNull();
    console.log(
      `hostile input: healthy client completed ${rounds} verified write+read rounds meanwhile`,
    );
  });
});
