/**
 * A small NBD client for tests that must know exactly which requests were acknowledged (the
 * crash loop) or must send what no real client would (the fuzz suite). Fixed newstyle,
 * NBD_OPT_GO, simple replies only, requests pipelined with cookies; over TLS (NBD_OPT_STARTTLS
 * first) when given `tls` options.
 */

import net from "node:net";
import tls from "node:tls";
import {
  NBD_CMD_DISC,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_OPT_GO,
  NBD_OPT_STARTTLS,
  NBD_REP_ACK,
  NBD_REP_INFO,
} from "../../src/nbd/protocol.js";
import {
  encodeClientFlags,
  encodeInfoOption,
  encodeOption,
  encodeRequest,
  parseGreeting,
  parseOptionReply,
  parseRepInfo,
  parseSimpleReplyHeader,
} from "../../src/nbd/protocol/client.js";

/** An NBD error reply, or the connection ending before the reply. */
export class NbdRequestError extends Error {
  constructor(
    readonly errno: number | undefined,
    message: string,
  ) {
    super(message);
  }
}

interface Pending {
  readonly readLength: number;
  resolve(data: Uint8Array): void;
  reject(error: Error): void;
}

export class NbdClient {
  readonly sizeBytes: number;
  readonly transmissionFlags: number;
  readonly #socket: net.Socket | tls.TLSSocket;
  readonly #pending = new Map<bigint, Pending>();
  #buffer: Buffer = Buffer.alloc(0);
  #nextCookie = 1n;
  #closed: Error | undefined;

  private constructor(
    socket: net.Socket | tls.TLSSocket,
    sizeBytes: number,
    flags: number,
    rest: Buffer,
  ) {
    this.#socket = socket;
    this.sizeBytes = sizeBytes;
    this.transmissionFlags = flags;
    this.#buffer = rest;
    socket.on("data", (chunk: Buffer) => {
      this.#buffer = this.#buffer.length === 0 ? chunk : Buffer.concat([this.#buffer, chunk]);
      this.#drain();
    });
    const fail = (why: string) => {
      this.#closed ??= new NbdRequestError(undefined, why);
      for (const p of this.#pending.values()) p.reject(this.#closed);
      this.#pending.clear();
    };
    socket.on("close", () => fail("connection closed"));
    socket.on("error", (e) => fail(`connection error: ${e.message}`));
    this.#drain();
  }

  /**
   * Connect to `path` (a unix socket) or `{host, port}`, and negotiate `exportName`; with `tls`,
   * send NBD_OPT_STARTTLS first and negotiate inside TLS.
   */
  static async connect(
    target: string | { host: string; port: number },
    exportName = "",
    options: { tls?: tls.ConnectionOptions } = {},
  ): Promise<NbdClient> {
    const plain =
      typeof target === "string" ? net.connect(target) : net.connect(target.port, target.host);
    await new Promise<void>((resolve, reject) => {
      plain.once("connect", resolve);
      plain.once("error", reject);
    });
    let socket: net.Socket | tls.TLSSocket = plain;
    let buffer: Buffer = Buffer.alloc(0);
    const need = async (n: number) => {
      while (buffer.length < n) {
        const chunk = await new Promise<Buffer>((resolve, reject) => {
          socket.once("data", resolve);
          socket.once("close", () => reject(new Error("closed during handshake")));
        });
        buffer = Buffer.concat([buffer, chunk]);
      }
    };
    await need(18);
    parseGreeting(buffer);
    buffer = buffer.subarray(18);
    socket.write(encodeClientFlags(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES));
    if (options.tls !== undefined) {
      socket.write(encodeOption(NBD_OPT_STARTTLS));
      let ack = parseOptionReply(buffer, 0);
      while (ack === null) {
        await need(buffer.length + 1);
        ack = parseOptionReply(buffer, 0);
      }
      if (ack.replyType !== NBD_REP_ACK || ack.end !== buffer.length) {
        plain.destroy();
        throw new Error(`NBD_OPT_STARTTLS refused: reply type 0x${ack.replyType.toString(16)}`);
      }
      buffer = Buffer.alloc(0);
      plain.removeAllListeners("data");
      const secure = tls.connect({ ...options.tls, socket: plain });
      await new Promise<void>((resolve, reject) => {
        secure.once("secureConnect", resolve);
        secure.once("error", reject);
      });
      socket = secure;
    }
    socket.write(encodeInfoOption(NBD_OPT_GO, exportName, []));
    let sizeBytes = -1;
    let flags = 0;
    for (;;) {
      let reply = parseOptionReply(buffer, 0);
      while (reply === null) {
        await need(buffer.length + 1);
        reply = parseOptionReply(buffer, 0);
      }
      buffer = buffer.subarray(reply.end);
      if (reply.replyType === NBD_REP_INFO) {
        const info = parseRepInfo(reply.data);
        if (info.info === "export") {
          sizeBytes = info.sizeBytes;
          flags = info.transmissionFlags;
        }
      } else if (reply.replyType === NBD_REP_ACK) {
        break;
      } else {
        socket.destroy();
        throw new Error(`NBD_OPT_GO refused: reply type 0x${reply.replyType.toString(16)}`);
      }
    }
    socket.removeAllListeners("data");
    socket.removeAllListeners("close");
    socket.removeAllListeners("error");
    return new NbdClient(socket, sizeBytes, flags, buffer);
  }

  pread(offset: number, length: number): Promise<Uint8Array> {
    return this.#request(NBD_CMD_READ, 0, offset, length, undefined, length);
  }

  async pwrite(offset: number, data: Uint8Array, fua = false): Promise<void> {
    await this.#request(NBD_CMD_WRITE, fua ? NBD_CMD_FLAG_FUA : 0, offset, data.length, data, 0);
  }

  async flush(): Promise<void> {
    await this.#request(NBD_CMD_FLUSH, 0, 0, 0, undefined, 0);
  }

  async trim(offset: number, length: number): Promise<void> {
    await this.#request(NBD_CMD_TRIM, 0, offset, length, undefined, 0);
  }

  /** Send raw bytes, for malformed-input tests. */
  sendRaw(bytes: Uint8Array): void {
    this.#socket.write(bytes);
  }

  /** Send NBD_CMD_DISC and close. */
  async close(): Promise<void> {
    if (this.#closed === undefined) {
      this.#socket.write(
        encodeRequest({ flags: 0, type: NBD_CMD_DISC, cookie: 0n, offset: 0, length: 0 }),
      );
    }
    this.#socket.end();
    await new Promise<void>((resolve) => {
      if (this.#socket.closed) resolve();
      else this.#socket.once("close", () => resolve());
    });
  }

  destroy(): void {
    this.#socket.destroy();
  }

  get closed(): boolean {
    return this.#closed !== undefined;
  }

  #request(
    type: number,
    flags: number,
    offset: number,
    length: number,
    payload: Uint8Array | undefined,
    readLength: number,
  ): Promise<Uint8Array> {
    if (this.#closed !== undefined) return Promise.reject(this.#closed);
    const cookie = this.#nextCookie++;
    const promise = new Promise<Uint8Array>((resolve, reject) => {
      this.#pending.set(cookie, { readLength, resolve, reject });
    });
    this.#socket.write(encodeRequest({ flags, type, cookie, offset, length }, payload));
    return promise;
  }

  #drain(): void {
    for (;;) {
      const header = this.#buffer.length >= 16 ? parseSimpleReplyHeader(this.#buffer, 0) : null;
      if (header === null) return;
      const pending = this.#pending.get(header.cookie);
      if (pending === undefined) {
        this.#closed = new NbdRequestError(undefined, `reply to unknown cookie ${header.cookie}`);
        this.#socket.destroy();
        return;
      }
      const dataLength = header.error === 0 ? pending.readLength : 0;
      if (this.#buffer.length < header.end + dataLength) return;
      const data = Buffer.from(this.#buffer.subarray(header.end, header.end + dataLength));
      this.#buffer = this.#buffer.subarray(header.end + dataLength);
      this.#pending.delete(header.cookie);
      if (header.error === 0) pending.resolve(data);
      else pending.reject(new NbdRequestError(header.error, `NBD error ${header.error}`));
    }
  }
}
