/**
 * The server's TLS upgrade at the protocol level, in this process, with node:tls as the client:
 * what a plain client gets under `require`, bytes the client sends after NBD_OPT_STARTTLS without
 * waiting for the ack (the start of TLS: nothing may be lost or parsed as NBD), handshakes that
 * fail after the ack, and client certificates checked by the server.
 */

import { readFileSync } from "node:fs";
import net from "node:net";
import path from "node:path";
import { Duplex } from "node:stream";
import tls from "node:tls";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

import {
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_OPT_GO,
  NBD_OPT_LIST,
  NBD_OPT_STARTTLS,
  NBD_REP_ACK,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_TLS_REQD,
  NBD_REP_SERVER,
  GREETING_BYTES,
  OPTION_REPLY_HEADER_BYTES,
} from "../../src/nbd/protocol.js";
import {
  encodeClientFlags,
  encodeExportNameOption,
  encodeInfoOption,
  encodeOption,
  parseOptionReply,
} from "../../src/nbd/protocol/client.js";
import { parsePskFile, readTlsCertificates, TlsSetupError } from "../../src/nbd/tls.js";
import { NbdClient } from "../support/nbd-client.js";
import { makeTestCertificates, type TestCertificates } from "../support/tls-certificates.js";
import { memoryServer, type MemoryServer } from "./harness.js";
import { RawClient } from "./raw-client.js";
import { captureLog } from "../support/log-capture.js";

const MiB = 1024 * 1024;

let certs: TestCertificates;
let required: MemoryServer;
let verifying: MemoryServer;
const log = captureLog();
const logs = {
  some: (test: (line: string) => boolean) => log.messages().some(test),
  get length() {
    return log.raw.length;
  },
  slice: (from: number) =>
    log
      .entries()
      .slice(from)
      .map((e) => String(e.msg)),
};

function clientTls(dir: string): tls.ConnectionOptions {
  const file = (name: string) => readFileSync(path.join(dir, name));
  return {
    ca: file("ca-cert.pem"),
    key: file("client-key.pem"),
    cert: file("client-cert.pem"),
    host: "127.0.0.1",
  };
}

beforeAll(async () => {
  certs = makeTestCertificates();
  const files = readTlsCertificates(certs.server);
  required = await memoryServer([{ name: "disk", sizeBytes: 16 * MiB }], {
    tls: { mode: "require", ...files },
    logger: log.logger,
    // Tight bounds, so that flow control (pausing the TLS socket) is exercised.
    limits: { maxInFlightRequests: 4, maxInFlightBytes: 1 * MiB },
  });
  verifying = await memoryServer([{ name: "disk", sizeBytes: 16 * MiB }], {
    tls: { mode: "require", ...files, verifyPeer: true },
    logger: log.logger,
  });
});

afterAll(async () => {
  await required?.close();
  await verifying?.close();
});

/**
 * A stream over `socket` that hides the first `skip` bytes it receives (the greeting and the
 * STARTTLS ack) and sends `prefix` in the same write as the first bytes written to it (so the
 * TLS ClientHello follows NBD_OPT_STARTTLS in one segment, before the ack).
 */
function splice(socket: net.Socket, skip: number, prefix: Uint8Array): Duplex {
  let skipping = skip;
  let pending: Uint8Array | undefined = prefix;
  const duplex = new Duplex({
    read() {},
    write(chunk: Buffer, _encoding, done) {
      const out = pending === undefined ? chunk : Buffer.concat([pending, chunk]);
      pending = undefined;
      socket.write(out, done);
    },
  });
  socket.on("data", (d: Buffer) => {
    const n = Math.min(skipping, d.length);
    skipping -= n;
    if (n < d.length) duplex.push(d.subarray(n));
  });
  socket.on("end", () => duplex.push(null));
  return duplex;
}

describe("--tls=require at the protocol level", () => {
  it("a plain client: NBD_REP_ERR_TLS_REQD for the list and GO, and a close for EXPORT_NAME", async () => {
    const c = await RawClient.connect({ port: required.port });
    await c.greeting();
    c.sendOption(encodeOption(NBD_OPT_LIST));
    const list = await c.optionReplies();
    expect(list.map((r) => r.replyType)).toEqual([NBD_REP_ERR_TLS_REQD]);
    c.sendOption(encodeInfoOption(NBD_OPT_GO, "disk", []));
    expect((await c.optionReply()).replyType).toBe(NBD_REP_ERR_TLS_REQD);
    c.sendOption(encodeOption(NBD_OPT_STARTTLS, Buffer.from("x")));
    expect((await c.optionReply()).replyType).toBe(NBD_REP_ERR_INVALID);
    c.sendOption(encodeExportNameOption("disk"));
    await c.closed();
    expect(c.ended).toBe(true);
  });

  it("a TLS client lists the exports and reads and writes, large requests too", async () => {
    const c = await NbdClient.connect({ host: "127.0.0.1", port: required.port }, "disk", {
      tls: clientTls(certs.client),
    });
    expect(c.sizeBytes).toBe(16 * MiB);
    const data = Buffer.alloc(8 * MiB);
    for (let i = 0; i < data.length; i += 4096) data.writeUInt32BE(i, i);
    await c.pwrite(MiB, data);
    expect(Buffer.from(await c.pread(MiB, data.length)).equals(data)).toBe(true);
    await c.close();
  });

  it("keeps its bounds over TLS: many pipelined writes and reads, all answered right", async () => {
    const c = await NbdClient.connect({ host: "127.0.0.1", port: required.port }, "disk", {
      tls: clientTls(certs.client),
    });
    const block = (i: number) => Buffer.alloc(256 * 1024, i + 1);
    await Promise.all(Array.from({ length: 32 }, (_, i) => c.pwrite(i * 256 * 1024, block(i))));
    const reads = await Promise.all(
      Array.from({ length: 32 }, (_, i) => c.pread(i * 256 * 1024, 256 * 1024)),
    );
    reads.forEach((data, i) => expect(Buffer.from(data).equals(block(i))).toBe(true));
    // Released once each reply's write completes, which may come just after the client has it.
    const connection = required.server.connections.at(-1)!;
    for (let i = 0; i < 100 && connection.inFlight.requests > 0; i++) {
      await new Promise((r) => setTimeout(r, 20));
    }
    expect(connection.inFlight).toEqual({ requests: 0, bytes: 0 });
    await c.close();
  });

  it("loses nothing the client sends after NBD_OPT_STARTTLS without waiting for the ack", async () => {
    const socket = net.connect(required.port, "127.0.0.1");
    await new Promise((resolve) => socket.once("connect", resolve));
    const opening = Buffer.concat([
      encodeClientFlags(NBD_FLAG_C_FIXED_NEWSTYLE),
      encodeOption(NBD_OPT_STARTTLS),
    ]);
    // Hide the greeting and the ack from the TLS client; check them as they go by.
    const seen: Buffer[] = [];
    socket.on("data", (d: Buffer) => seen.push(d));
    const secure = tls.connect({
      ...clientTls(certs.client),
      socket: splice(socket, GREETING_BYTES + OPTION_REPLY_HEADER_BYTES, opening),
    });
    await new Promise<void>((resolve, reject) => {
      secure.once("secureConnect", resolve);
      secure.once("error", reject);
    });
    const head = Buffer.concat(seen);
    const ack = parseOptionReply(head, GREETING_BYTES);
    expect(ack).toMatchObject({ option: NBD_OPT_STARTTLS, replyType: NBD_REP_ACK });
    secure.write(encodeOption(NBD_OPT_LIST));
    let replies = Buffer.alloc(0);
    const types: number[] = [];
    await new Promise<void>((resolve) => {
      secure.on("data", (d: Buffer) => {
        replies = Buffer.concat([replies, d]);
        for (let r = parseOptionReply(replies, 0); r !== null; r = parseOptionReply(replies, 0)) {
          types.push(r.replyType);
          replies = replies.subarray(r.end);
          if (r.replyType === NBD_REP_ACK) resolve();
        }
      });
    });
    expect(types).toEqual([NBD_REP_SERVER, NBD_REP_ACK]);
    secure.destroy();
  });

  it("closes the connection when what follows the ack is not TLS", async () => {
    const c = await RawClient.connect({ port: required.port });
    await c.greeting();
    c.sendOption(encodeOption(NBD_OPT_STARTTLS));
    expect((await c.optionReply()).replyType).toBe(NBD_REP_ACK);
    // An NBD option where a ClientHello must be: never parsed as NBD.
    c.socket.write(encodeOption(NBD_OPT_LIST));
    await c.closed();
    expect(c.ended).toBe(true);
    expect(logs.some((l) => /TLS handshake: /.test(l))).toBe(true);
  });

  it("closes a connection that acknowledged STARTTLS and then stalls, at the handshake timeout", async () => {
    const quick = await memoryServer([{ name: "disk", sizeBytes: MiB }], {
      tls: { mode: "require", ...readTlsCertificates(certs.server) },
      logger: log.logger,
      limits: { handshakeTimeoutMs: 300 },
    });
    try {
      const c = await RawClient.connect({ port: quick.port });
      await c.greeting();
      c.sendOption(encodeOption(NBD_OPT_STARTTLS));
      expect((await c.optionReply()).replyType).toBe(NBD_REP_ACK);
      await c.closed();
      expect(c.ended).toBe(true);
      // And the server let go of it.
      for (let i = 0; i < 100 && quick.server.connections.length > 0; i++) {
        await new Promise((r) => setTimeout(r, 20));
      }
      expect(quick.server.connections).toEqual([]);
    } finally {
      await quick.close();
    }
  });
});

describe("--tls-verify-peer at the protocol level", () => {
  it("serves a client with a certificate from the CA", async () => {
    const c = await NbdClient.connect({ host: "127.0.0.1", port: verifying.port }, "disk", {
      tls: clientTls(certs.client),
    });
    expect((await c.pread(0, 4096)).length).toBe(4096);
    await c.close();
  });

  it("refuses a certificate from another CA, and a client without one", async () => {
    for (const options of [
      clientTls(certs.otherClient),
      { ca: readFileSync(path.join(certs.client, "ca-cert.pem")), host: "127.0.0.1" },
    ]) {
      const before = logs.length;
      const outcome = await NbdClient.connect({ host: "127.0.0.1", port: verifying.port }, "disk", {
        tls: options,
      }).then(
        async (c) => {
          // TLS 1.3: the client may finish its side before the server has checked the certificate.
          const read = await c.pread(0, 512).then(
            () => "served",
            () => "refused",
          );
          c.destroy();
          return read;
        },
        () => "refused",
      );
      expect(outcome).toBe("refused");
      await new Promise((r) => setTimeout(r, 50));
      expect(logs.slice(before).join("\n")).toMatch(/client certificate refused/);
    }
    for (let i = 0; i < 100 && verifying.server.connections.length > 0; i++) {
      await new Promise((r) => setTimeout(r, 20));
    }
    expect(verifying.server.connections).toEqual([]);
  });
});

describe("PSK files", () => {
  it("parse identity:hexkey lines, skipping blank ones", () => {
    const keys = parsePskFile("alice:00ff10\n\nbob:0123456789abcdef\r\n");
    expect([...keys.keys()]).toEqual(["alice", "bob"]);
    expect(Buffer.from(keys.get("alice")!).toString("hex")).toBe("00ff10");
  });

  it.each([
    ["alice:0g", /line 1: not IDENTITY:HEXKEY/],
    ["alice:abc", /line 1: not IDENTITY:HEXKEY/],
    ["ok:00\nnocolon", /line 2: not IDENTITY:HEXKEY/],
    ["a:00\na:01", /line 2: identity a again/],
    ["\n\n", /holds no key/],
  ])("refuse %j", (text, message) => {
    expect(() => parsePskFile(text)).toThrow(TlsSetupError);
    expect(() => parsePskFile(text)).toThrow(message);
  });
});
