/**
 * A test client that can do what real clients will not: negotiate step by step, send any frame,
 * pipeline without waiting, stop reading its replies (so the server's socket backs up), and
 * speak both simple and structured replies. Built on the codec's client half.
 */

import assert from "node:assert/strict";
import net from "node:net";

import {
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_CACHE,
  NBD_CMD_DISC,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_NAME,
  NBD_OPT_GO,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  NBD_REPLY_FLAG_DONE,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
  type BlockStatusExtent,
} from "../../src/nbd/protocol.js";
import {
  encodeClientFlags,
  encodeExportNameOption,
  encodeInfoOption,
  encodeMetaContextOption,
  encodeOption,
  encodeRequest,
  parseChunkPayload,
  parseExportNameReply,
  parseGreeting,
  parseOptionReply,
  parseRepInfo,
  parseRepMetaContext,
  parseSimpleReplyHeader,
  parseStructuredChunk,
  type InfoReply,
  type OptionReply,
} from "../../src/nbd/protocol/client.js";

/** A whole reply to one request. */
export interface Reply {
  readonly cookie: bigint;
  /** 0 on success. */
  readonly error: number;
  /** Error chunk message (structured replies). */
  readonly message: string;
  /** READ data, assembled from OFFSET_DATA / OFFSET_HOLE chunks or the simple reply. */
  readonly data: Uint8Array | undefined;
  readonly extents: readonly BlockStatusExtent[] | undefined;
  readonly contextId: number | undefined;
  /** Structured chunks received, by type (for tests of the framing). */
  readonly chunkTypes: readonly number[];
}

export type Target = { port: number; host?: string } | { path: string };

export interface GoOptions {
  readonly exportName?: string;
  /** The export to select `base:allocation` for; default `exportName`. */
  readonly metaContextExport?: string;
  readonly structured?: boolean;
  readonly baseAllocation?: boolean;
  readonly infoRequests?: readonly number[];
}

export interface Negotiated {
  readonly sizeBytes: number;
  readonly transmissionFlags: number;
  readonly infos: readonly InfoReply[];
  readonly contextId: number | undefined;
}

interface Partial {
  error: number;
  message: string;
  data: Uint8Array | undefined;
  extents: BlockStatusExtent[] | undefined;
  contextId: number | undefined;
  chunkTypes: number[];
}

export class RawClient {
  readonly socket: net.Socket;
  #buffer: Buffer = Buffer.alloc(0);
  #waiters: (() => void)[] = [];
  #ended = false;
  #transmission = false;
  #structured = false;
  #nextCookie = 1n;
  /** READ length by cookie, for simple replies (which do not say how much data follows). */
  readonly #readLengths = new Map<bigint, { offset: number; length: number }>();
  readonly #partial = new Map<bigint, Partial>();
  readonly #replies = new Map<bigint, Reply>();
  readonly #replyWaiters = new Map<
    bigint,
    { resolve: (reply: Reply) => void; reject: (error: Error) => void }
  >();

  private constructor(socket: net.Socket) {
    this.socket = socket;
    socket.on("data", (chunk: Buffer) => {
      this.#buffer = this.#buffer.length === 0 ? chunk : Buffer.concat([this.#buffer, chunk]);
      if (this.#transmission) this.#parseReplies();
      this.#wake();
    });
    const end = () => {
      this.#ended = true;
      this.#wake();
    };
    socket.on("end", end);
    socket.on("close", () => {
      end();
      for (const [cookie, waiter] of this.#replyWaiters) {
        waiter.reject(new Error(`connection closed before the reply to cookie ${cookie}`));
      }
      this.#replyWaiters.clear();
    });
    socket.on("error", () => {});
  }

  static connect(target: Target): Promise<RawClient> {
    return new Promise((resolve, reject) => {
      const socket =
        "path" in target
          ? net.connect(target.path)
          : net.connect(target.port, target.host ?? "127.0.0.1");
      socket.once("connect", () => resolve(new RawClient(socket)));
      socket.once("error", reject);
    });
  }

  /** Connect and negotiate with NBD_OPT_GO. */
  static async open(target: Target, options: GoOptions = {}): Promise<RawClient> {
    const client = await RawClient.connect(target);
    await client.greeting();
    await client.go(options);
    return client;
  }

  get ended(): boolean {
    return this.#ended;
  }

  get structured(): boolean {
    return this.#structured;
  }

  /** Wait until `n` bytes are buffered, or throw if the server closes first. */
  async #need(n: number): Promise<void> {
    while (this.#buffer.length < n) {
      if (this.#ended) throw new Error(`connection closed (wanted ${n} bytes)`);
      await new Promise<void>((resolve) => this.#waiters.push(resolve));
    }
  }

  #take(n: number): Buffer {
    const out = this.#buffer.subarray(0, n);
    this.#buffer = this.#buffer.subarray(n);
    return out;
  }

  #wake(): void {
    const waiters = this.#waiters;
    this.#waiters = [];
    for (const w of waiters) w();
  }

  /** Read the greeting and answer with `clientFlags` (fixed newstyle, no zeroes by default). */
  async greeting(
    clientFlags = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES,
  ): Promise<{ handshakeFlags: number }> {
    await this.#need(18);
    const greeting = parseGreeting(this.#take(18));
    this.socket.write(encodeClientFlags(clientFlags));
    return greeting;
  }

  /** Send an option frame as it is. */
  sendOption(frame: Uint8Array): void {
    this.socket.write(frame);
  }

  /** The next option reply. */
  async optionReply(): Promise<OptionReply> {
    for (;;) {
      const reply = parseOptionReply(this.#buffer, 0);
      if (reply !== null) {
        const copy = { ...reply, data: Buffer.from(reply.data) };
        this.#take(reply.end);
        return copy;
      }
      await this.#need(this.#buffer.length + 1);
    }
  }

  /** Option replies up to and including the final one (ACK or an error). */
  async optionReplies(): Promise<OptionReply[]> {
    const out: OptionReply[] = [];
    for (;;) {
      const reply = await this.optionReply();
      out.push(reply);
      if (reply.replyType === NBD_REP_ACK || reply.replyType >= 0x80000000) return out;
    }
  }

  /** Ask for structured replies and base:allocation as told, then NBD_OPT_GO. */
  async go(options: GoOptions = {}): Promise<Negotiated> {
    const name = options.exportName ?? "";
    if (options.structured ?? true) {
      this.sendOption(encodeOption(NBD_OPT_STRUCTURED_REPLY));
      const [ack] = await this.optionReplies();
      assert.equal(ack?.replyType, NBD_REP_ACK, "structured replies refused");
      this.#structured = true;
    }
    let contextId: number | undefined;
    if (options.baseAllocation ?? this.#structured) {
      this.sendOption(
        encodeMetaContextOption(NBD_OPT_SET_META_CONTEXT, options.metaContextExport ?? name, [
          "base:allocation",
        ]),
      );
      for (const r of await this.optionReplies()) {
        if (r.replyType === NBD_REP_META_CONTEXT) contextId = parseRepMetaContext(r.data).contextId;
      }
    }
    const infoRequests = options.infoRequests ?? [
      NBD_INFO_BLOCK_SIZE,
      NBD_INFO_NAME,
      NBD_INFO_DESCRIPTION,
    ];
    this.sendOption(encodeInfoOption(NBD_OPT_GO, name, infoRequests));
    const replies = await this.optionReplies();
    const last = replies.at(-1)!;
    if (last.replyType !== NBD_REP_ACK) {
      throw new Error(`NBD_OPT_GO refused: 0x${last.replyType.toString(16)}`);
    }
    const infos = replies
      .filter((r) => r.replyType === NBD_REP_INFO)
      .map((r) => parseRepInfo(r.data));
    const exportInfo = infos.find((i) => i.info === "export");
    assert(exportInfo?.info === "export");
    this.#transmission = true;
    this.#parseReplies();
    return {
      sizeBytes: exportInfo.sizeBytes,
      transmissionFlags: exportInfo.transmissionFlags,
      infos,
      contextId,
    };
  }

  /** NBD_OPT_EXPORT_NAME: enter transmission with simple replies; returns the export size. */
  async exportName(name: string, noZeroes: boolean): Promise<{ sizeBytes: number; flags: number }> {
    this.sendOption(encodeExportNameOption(name));
    const total = noZeroes ? 10 : 134;
    await this.#need(total);
    const reply = parseExportNameReply(this.#take(total), 0, noZeroes);
    assert(reply !== null);
    this.#transmission = true;
    this.#parseReplies();
    return { sizeBytes: reply.sizeBytes, flags: reply.transmissionFlags };
  }

  // ---- transmission ---------------------------------------------------------------------------

  /** Send a request (and payload) as given; returns its cookie. */
  request(
    type: number,
    offset: number | bigint,
    length: number,
    options: { flags?: number; payload?: Uint8Array; cookie?: bigint } = {},
  ): bigint {
    const cookie = options.cookie ?? this.#nextCookie++;
    if (type === NBD_CMD_READ) this.#readLengths.set(cookie, { offset: Number(offset), length });
    this.socket.write(
      encodeRequest({ flags: options.flags ?? 0, type, cookie, offset, length }, options.payload),
    );
    return cookie;
  }

  read(offset: number, length: number, flags = 0): bigint {
    return this.request(NBD_CMD_READ, offset, length, { flags });
  }

  write(offset: number, data: Uint8Array, flags = 0): bigint {
    return this.request(NBD_CMD_WRITE, offset, data.length, { flags, payload: data });
  }

  flush(): bigint {
    return this.request(NBD_CMD_FLUSH, 0, 0);
  }

  trim(offset: number, length: number, flags = 0): bigint {
    return this.request(NBD_CMD_TRIM, offset, length, { flags });
  }

  zero(offset: number, length: number, flags = 0): bigint {
    return this.request(NBD_CMD_WRITE_ZEROES, offset, length, { flags });
  }

  cache(offset: number, length: number): bigint {
    return this.request(NBD_CMD_CACHE, offset, length);
  }

  blockStatus(offset: number, length: number, flags = 0): bigint {
    return this.request(NBD_CMD_BLOCK_STATUS, offset, length, { flags });
  }

  disconnect(): void {
    this.request(NBD_CMD_DISC, 0, 0);
  }

  /** The reply to `cookie` (whenever it comes). */
  reply(cookie: bigint, timeoutMs = 30_000): Promise<Reply> {
    const have = this.#replies.get(cookie);
    if (have !== undefined) {
      this.#replies.delete(cookie);
      return Promise.resolve(have);
    }
    if (this.socket.closed) {
      return Promise.reject(new Error(`connection closed before the reply to cookie ${cookie}`));
    }
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#replyWaiters.delete(cookie);
        reject(new Error(`no reply to cookie ${cookie} within ${timeoutMs} ms`));
      }, timeoutMs);
      this.#replyWaiters.set(cookie, {
        resolve: (reply) => {
          clearTimeout(timer);
          resolve(reply);
        },
        reject: (error) => {
          clearTimeout(timer);
          reject(error);
        },
      });
    });
  }

  /** Send and wait: the reply must be a success; returns READ data if any. */
  async ok(cookie: bigint): Promise<Reply> {
    const reply = await this.reply(cookie);
    if (reply.error !== 0)
      throw new Error(`request ${cookie} failed: ${reply.error} ${reply.message}`);
    return reply;
  }

  /** Resolves when the server has closed the connection. */
  closed(): Promise<void> {
    if (this.socket.closed) return Promise.resolve();
    return new Promise((resolve) => this.socket.once("close", () => resolve()));
  }

  close(): void {
    this.socket.destroy();
  }

  #deliver(cookie: bigint, reply: Reply): void {
    const waiter = this.#replyWaiters.get(cookie);
    if (waiter !== undefined) {
      this.#replyWaiters.delete(cookie);
      waiter.resolve(reply);
    } else {
      this.#replies.set(cookie, reply);
    }
  }

  #parseReplies(): void {
    for (;;) {
      if (this.#buffer.length < 4) return;
      const magic = this.#buffer.readUInt32BE(0);
      if (magic === NBD_SIMPLE_REPLY_MAGIC) {
        const header = parseSimpleReplyHeader(this.#buffer, 0);
        if (header === null) return;
        const read = this.#readLengths.get(header.cookie);
        const dataBytes = read !== undefined && header.error === 0 ? read.length : 0;
        if (this.#buffer.length < header.end + dataBytes) return;
        this.#take(header.end);
        const data = read === undefined ? undefined : Buffer.from(this.#take(dataBytes));
        this.#readLengths.delete(header.cookie);
        this.#deliver(header.cookie, {
          cookie: header.cookie,
          error: header.error,
          message: "",
          data: header.error === 0 ? data : undefined,
          extents: undefined,
          contextId: undefined,
          chunkTypes: [],
        });
      } else if (magic === NBD_STRUCTURED_REPLY_MAGIC) {
        const chunk = parseStructuredChunk(this.#buffer, 0);
        if (chunk === null) return;
        const payload = parseChunkPayload(chunk.type, chunk.payload);
        let partial = this.#partial.get(chunk.cookie);
        if (partial === undefined) {
          partial = {
            error: 0,
            message: "",
            data: undefined,
            extents: undefined,
            contextId: undefined,
            chunkTypes: [],
          };
          this.#partial.set(chunk.cookie, partial);
        }
        partial.chunkTypes.push(chunk.type);
        const read = this.#readLengths.get(chunk.cookie);
        switch (payload.kind) {
          case "offset-data":
          case "offset-hole": {
            assert(read !== undefined, "read data for a request that is not a READ");
            partial.data ??= Buffer.alloc(read.length);
            const at = payload.offset - read.offset;
            if (payload.kind === "offset-data") partial.data.set(payload.data, at);
            else partial.data.fill(0, at, at + payload.holeLength);
            break;
          }
          case "block-status":
            partial.extents = [...payload.extents];
            partial.contextId = payload.contextId;
            break;
          case "error":
          case "error-offset":
            partial.error = payload.error;
            partial.message = payload.message;
            break;
          default:
            break;
        }
        this.#take(chunk.end);
        if ((chunk.flags & NBD_REPLY_FLAG_DONE) !== 0) {
          this.#partial.delete(chunk.cookie);
          this.#readLengths.delete(chunk.cookie);
          if (read !== undefined && partial.error === 0) partial.data ??= Buffer.alloc(0);
          this.#deliver(chunk.cookie, { cookie: chunk.cookie, ...partial });
        }
      } else {
        throw new Error(`bad reply magic 0x${magic.toString(16)}`);
      }
    }
  }
}
