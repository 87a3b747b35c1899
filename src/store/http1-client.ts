/**
 * A small HTTP/1.1 client for plain-TCP GETs, with its own keep-alive pool: what the lean GET
 * path uses for `http:` endpoints. It exists for one reason, measured on cold reads: `node:http`
 * hands every socket read to its parser as a fresh 64 KiB buffer, so a 1 MiB body cost 16
 * buffer allocations, 16 parser callbacks and stream events, and then a copy into the body; the
 * allocations drove most of the garbage collections (each MiB allocated twice over).
 *
 * Here each connection reads heads into one small reused buffer (`onread`, as the NBD server
 * does), and once a head has announced its body's length, the socket reads the rest of the body
 * straight into the response's own buffer (`onread` with a function: it names the buffer for
 * each next read), which the caller then owns: no copy in user space beyond the body bytes
 * that arrived with the head, and one allocation per response (none when the caller passes its
 * own buffer).
 *
 * It speaks just enough HTTP/1.1 for S3 GETs: a request with no body; a response framed by
 * `content-length`, `transfer-encoding: chunked`, or the connection's end; 1xx answers skipped;
 * `connection: close` honoured. A request sent on a reused connection that the server closed
 * meanwhile (the keep-alive race) is sent once more on a new one, which is safe for a GET.
 * HTTPS endpoints use `node:https` instead (TLS sockets have no `onread`).
 */

import assert from "node:assert/strict";
import net from "node:net";

export interface Http1ClientOptions {
  readonly hostname: string;
  readonly port: number;
  /** Connections open at most; more requests wait for one. */
  readonly maxSockets: number;
  /** An idle connection is closed after this long. */
  readonly idleTimeoutMs: number;
  /** Connecting for longer than this fails. */
  readonly connectionTimeoutMs: number;
}

export interface Http1Response {
  readonly status: number;
  /** Header names in lower case; repeated headers joined with ", ". */
  readonly headers: Readonly<Record<string, string>>;
  /** The whole body, in a buffer of its own. */
  readonly body: Buffer;
}

/**
 * The buffer for a body of `lengthBytes` announced by `content-length`: the caller's (exactly
 * that long), or `undefined` for a fresh one.
 */
export type BodyAllocator = (lengthBytes: number) => Buffer | undefined;

/** A failure of the connection, with a Node-style `code` (ECONNRESET, ...) for the error table. */
export class Http1Error extends Error {
  override readonly name = "Http1Error";
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

/**
 * The buffer heads (and bodies of unknown length) are read into. Small: the body bytes that
 * share a read with the head are the only ones copied.
 */
const HEAD_BUFFER_BYTES = 16 * 1024;
/** The most header bytes a response may have. */
const MAX_HEAD_BYTES = 64 * 1024;
const CRLF = Buffer.from("\r\n");
const HEAD_END = Buffer.from("\r\n\r\n");

export class Http1Client {
  readonly #options: Http1ClientOptions;
  readonly #idle: Connection[] = [];
  readonly #waiters: ((connection: Connection | undefined) => void)[] = [];
  #open = 0;

  constructor(options: Http1ClientOptions) {
    this.#options = options;
  }

  /**
   * Send a GET of `path` with `headers` (a `host` among them), and read its whole answer. Fails
   * with an {@link Http1Error} when the connection fails, or `signal` aborts.
   */
  async get(
    path: string,
    headers: Readonly<Record<string, string>>,
    signal: AbortSignal,
    allocate?: BodyAllocator,
  ): Promise<Http1Response> {
    let head = `GET ${path} HTTP/1.1\r\n`;
    for (const [name, value] of Object.entries(headers)) head += `${name}: ${value}\r\n`;
    head += "\r\n";
    for (let attempt = 0; ; attempt++) {
      const connection = await this.#acquire(signal);
      const reused = connection.served > 0;
      try {
        const response = await connection.exchange(head, signal, allocate);
        this.#release(connection, response.keepAlive);
        return response.response;
      } catch (error) {
        this.#release(connection, false);
        // The keep-alive race: the server closed an idle connection as we reused it.
        const code = (error as Http1Error).code;
        const raced = reused && (code === "ECONNRESET" || code === "EPIPE") && !signal.aborted;
        if (!(raced && connection.receivedNothing && attempt === 0)) throw error;
      }
    }
  }

  /**
   * Close the idle connections. Requests in flight finish; a later request opens a new
   * connection, as the SDK's clients do after `destroy()` (callers close a store and go on
   * using it).
   */
  close(): void {
    for (const connection of this.#idle.splice(0)) connection.destroy();
  }

  async #acquire(signal: AbortSignal): Promise<Connection> {
    const idle = this.#idle.pop();
    if (idle !== undefined) {
      idle.unidle();
      return idle;
    }
    if (this.#open < this.#options.maxSockets) {
      this.#open++;
      try {
        return await Connection.open(this.#options, signal, () => this.#forget());
      } catch (error) {
        this.#open--;
        this.#wakeOne();
        throw error;
      }
    }
    const connection = await new Promise<Connection | undefined>((resolve, reject) => {
      const waiter = (c: Connection | undefined) => {
        signal.removeEventListener("abort", onAbort);
        resolve(c);
      };
      const onAbort = () => {
        const i = this.#waiters.indexOf(waiter);
        if (i >= 0) this.#waiters.splice(i, 1);
        reject(new Http1Error("ETIMEDOUT", "no connection became free in time"));
      };
      signal.addEventListener("abort", onAbort, { once: true });
      this.#waiters.push(waiter);
    });
    return connection ?? this.#acquire(signal);
  }

  /** A connection finished a request: keep it for the next, or close it. */
  #release(connection: Connection, keep: boolean): void {
    if (keep && connection.usable) {
      const waiter = this.#waiters.shift();
      if (waiter !== undefined) waiter(connection);
      else {
        connection.idle(this.#options.idleTimeoutMs, () => {
          const i = this.#idle.indexOf(connection);
          if (i >= 0) this.#idle.splice(i, 1);
        });
        this.#idle.push(connection);
      }
      return;
    }
    connection.destroy();
  }

  /** A connection closed for good: its slot is free. */
  #forget(): void {
    this.#open--;
    this.#wakeOne();
  }

  #wakeOne(): void {
    // A waiter woken with no connection tries to open one in the freed slot.
    this.#waiters.shift()?.(undefined);
  }
}

type Framing =
  | { readonly kind: "length"; remaining: number }
  | { readonly kind: "chunked"; state: "size" | "data" | "data-end" | "trailer"; remaining: number }
  | { readonly kind: "close" };

/** The answer being read. */
interface Reading {
  resolve(result: { response: Http1Response; keepAlive: boolean }): void;
  reject(error: Error): void;
  /** Head bytes split across reads, copied. */
  head: Buffer | undefined;
  status: number;
  headers: Record<string, string>;
  framing: Framing | undefined;
  keepAlive: boolean;
  /** The body, when its length is known; else its parts. */
  body: Buffer | undefined;
  readonly allocate: BodyAllocator | undefined;
  filled: number;
  parts: Buffer[];
  /** Bytes of a chunk-size or trailer line split across reads. */
  line: string;
}

/** One keep-alive connection: one request at a time. */
class Connection {
  served = 0;
  receivedNothing = true;
  readonly #socket: net.Socket;
  #reading: Reading | undefined;
  #failure: Http1Error | undefined;
  #idleTimer: NodeJS.Timeout | undefined;
  #onIdleClose: (() => void) | undefined;

  readonly #scratch: Buffer;

  private constructor(socket: net.Socket, scratch: Buffer) {
    this.#socket = socket;
    this.#scratch = scratch;
  }

  static open(
    options: Http1ClientOptions,
    signal: AbortSignal,
    onClosed: () => void,
  ): Promise<Connection> {
    return new Promise((resolve, reject) => {
      const scratch = Buffer.allocUnsafeSlow(HEAD_BUFFER_BYTES);
      // Set just below; `net.connect` already asks for the first buffer.
      // eslint-disable-next-line prefer-const -- a const would be read before it is set
      let connection: Connection | undefined;
      const socket = net.connect({
        host: options.hostname,
        port: options.port,
        noDelay: true,
        onread: {
          buffer: () => (connection === undefined ? scratch : connection.#nextReadBuffer()),
          callback: (nread: number, bytes: Uint8Array) => {
            connection!.#read(nread, bytes);
            return true;
          },
        },
      });
      const opened = new Connection(socket, scratch);
      connection = opened;
      let connected = false;
      const timer = setTimeout(
        () =>
          fail(
            new Http1Error("ETIMEDOUT", `not connected within ${options.connectionTimeoutMs} ms`),
          ),
        options.connectionTimeoutMs,
      );
      const onAbort = () => fail(new Http1Error("ETIMEDOUT", "aborted while connecting"));
      const fail = (error: Error) => {
        clearTimeout(timer);
        signal.removeEventListener("abort", onAbort);
        socket.destroy();
        reject(error);
      };
      signal.addEventListener("abort", onAbort, { once: true });
      socket.once("connect", () => {
        connected = true;
        clearTimeout(timer);
        signal.removeEventListener("abort", onAbort);
        resolve(opened);
      });
      socket.on("error", (error: NodeJS.ErrnoException) => {
        const failure = new Http1Error(error.code ?? "ECONNRESET", error.message);
        if (connected) opened.#fail(failure);
        else fail(failure);
      });
      socket.on("end", () => opened.#ended());
      socket.once("close", () => {
        opened.#fail(new Http1Error("ECONNRESET", "the connection closed"));
        opened.#onIdleClose?.();
        // A connection that never connected was never counted open by the pool's caller.
        if (connected) onClosed();
      });
    });
  }

  get usable(): boolean {
    return this.#failure === undefined && !this.#socket.destroyed;
  }

  /** Park the connection: closed after `timeoutMs`, or by the server, it leaves the pool. */
  idle(timeoutMs: number, onClose: () => void): void {
    this.#onIdleClose = onClose;
    this.#idleTimer = setTimeout(() => this.destroy(), timeoutMs);
    this.#idleTimer.unref();
    this.#socket.unref();
  }

  unidle(): void {
    clearTimeout(this.#idleTimer);
    this.#onIdleClose = undefined;
    this.#socket.ref();
  }

  destroy(): void {
    clearTimeout(this.#idleTimer);
    this.#socket.destroy();
  }

  /** Send `head` and read the answer; one at a time. */
  exchange(
    head: string,
    signal: AbortSignal,
    allocate: BodyAllocator | undefined,
  ): Promise<{ response: Http1Response; keepAlive: boolean }> {
    assert(this.#reading === undefined);
    if (this.#failure !== undefined) return Promise.reject(this.#failure);
    this.served++;
    this.receivedNothing = true;
    return new Promise((resolve, reject) => {
      const onAbort = () => {
        this.#fail(new Http1Error("ETIMEDOUT", "aborted"));
        this.#socket.destroy();
      };
      signal.addEventListener("abort", onAbort, { once: true });
      const settle = () => {
        signal.removeEventListener("abort", onAbort);
        this.#reading = undefined;
      };
      this.#reading = {
        resolve: (result) => {
          settle();
          resolve(result);
        },
        reject: (error) => {
          settle();
          reject(error);
        },
        head: undefined,
        status: 0,
        headers: {},
        framing: undefined,
        keepAlive: true,
        body: undefined,
        allocate,
        filled: 0,
        parts: [],
        line: "",
      };
      this.#socket.write(head, "latin1");
    });
  }

  #fail(error: Http1Error): void {
    this.#failure ??= error;
    this.#reading?.reject(error);
  }

  /** The server ended its side: that ends a body framed by the connection, and the connection. */
  #ended(): void {
    const reading = this.#reading;
    if (reading?.framing?.kind === "close") {
      reading.keepAlive = false;
      this.#finish(reading);
    }
    this.#fail(new Http1Error("ECONNRESET", "the server closed the connection"));
    this.#socket.destroy();
  }

  /**
   * Where the socket's next read goes: straight into the body being read, when its length is
   * known (no copy), else the connection's small buffer for heads.
   */
  #nextReadBuffer(): Uint8Array {
    const reading = this.#reading;
    const framing = reading?.framing;
    if (framing?.kind !== "length" || framing.remaining === 0) return this.#scratch;
    const filled = reading!.filled;
    return reading!.body!.subarray(filled, filled + framing.remaining);
  }

  /** `nread` bytes arrived in `bytes`, the buffer {@link #nextReadBuffer} named. */
  #read(nread: number, bytes: Uint8Array): void {
    if (bytes === this.#scratch) {
      this.#received(bytes.subarray(0, nread));
      return;
    }
    // Body bytes, already in place.
    const reading = this.#reading;
    const framing = reading?.framing;
    if (framing?.kind !== "length" || reading!.body?.buffer !== bytes.buffer) {
      this.#protocolError("body bytes arrived for no body being read");
      return;
    }
    this.receivedNothing = false;
    assert(nread <= framing.remaining);
    reading!.filled += nread;
    framing.remaining -= nread;
    if (framing.remaining === 0) this.#finish(reading!);
  }

  /** Bytes read into the shared buffer: take what is needed before returning. */
  #received(bytes: Uint8Array): void {
    this.receivedNothing = false;
    let at = 0;
    while (at < bytes.byteLength) {
      const reading = this.#reading;
      if (reading === undefined) {
        this.#protocolError("bytes arrived with no request outstanding");
        return;
      }
      const used =
        reading.framing === undefined
          ? this.#readHead(reading, bytes.subarray(at))
          : this.#readBody(reading, bytes.subarray(at));
      if (used < 0) return;
      at += used;
    }
  }

  /** Head bytes: returns how many were used, or -1 after a failure. */
  #readHead(reading: Reading, bytes: Uint8Array): number {
    const previous = reading.head;
    const joined =
      previous === undefined
        ? Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength)
        : Buffer.concat([previous, bytes]);
    const end = joined.indexOf(HEAD_END);
    if (end < 0) {
      if (joined.byteLength > MAX_HEAD_BYTES) return this.#protocolError("response head too long");
      // `bytes` is the connection's read buffer, reused by the next read: keep a copy.
      reading.head = Buffer.from(joined);
      return bytes.byteLength;
    }
    const used = end + HEAD_END.byteLength - (previous?.byteLength ?? 0);
    reading.head = undefined;
    const lines = joined.toString("latin1", 0, end).split("\r\n");
    const status = /^HTTP\/1\.([01]) (\d{3})/.exec(lines[0] ?? "");
    if (status === null) return this.#protocolError(`bad status line "${lines[0]}"`);
    const headers: Record<string, string> = {};
    for (const line of lines.slice(1)) {
      const colon = line.indexOf(":");
      if (colon <= 0) return this.#protocolError(`bad header line "${line}"`);
      const name = line.slice(0, colon).trim().toLowerCase();
      const value = line.slice(colon + 1).trim();
      headers[name] = headers[name] === undefined ? value : `${headers[name]}, ${value}`;
    }
    const code = Number(status[2]);
    if (code >= 100 && code < 200) return used; // 100 Continue and the like: the real head follows
    reading.status = code;
    reading.headers = headers;
    const connection = (headers.connection ?? "").toLowerCase();
    reading.keepAlive = status[1] === "1" ? connection !== "close" : connection === "keep-alive";
    const length = headers["content-length"];
    if ((headers["transfer-encoding"] ?? "").toLowerCase().includes("chunked")) {
      reading.framing = { kind: "chunked", state: "size", remaining: 0 };
    } else if (code === 204 || code === 304) {
      reading.framing = { kind: "length", remaining: 0 };
    } else if (length !== undefined) {
      const n = Number(length);
      if (!Number.isSafeInteger(n) || n < 0)
        return this.#protocolError(`bad content-length ${length}`);
      reading.framing = { kind: "length", remaining: n };
      const body = reading.allocate?.(n) ?? Buffer.allocUnsafe(n);
      assert.equal(body.byteLength, n, "an allocated body of the wrong length");
      reading.body = body;
    } else {
      reading.framing = { kind: "close" };
      reading.keepAlive = false;
    }
    if (reading.framing.kind === "length" && reading.framing.remaining === 0) this.#finish(reading);
    return used;
  }

  /** Body bytes: returns how many were used, or -1 after a failure. */
  #readBody(reading: Reading, bytes: Uint8Array): number {
    const framing = reading.framing!;
    switch (framing.kind) {
      case "close":
        reading.parts.push(Buffer.from(bytes));
        return bytes.byteLength;
      case "length": {
        const n = Math.min(framing.remaining, bytes.byteLength);
        reading.body!.set(bytes.subarray(0, n), reading.filled);
        reading.filled += n;
        framing.remaining -= n;
        if (framing.remaining === 0) this.#finish(reading);
        return n;
      }
      case "chunked":
        return this.#readChunked(reading, framing, bytes);
    }
  }

  #readChunked(
    reading: Reading,
    framing: Extract<Framing, { kind: "chunked" }>,
    bytes: Uint8Array,
  ): number {
    let at = 0;
    while (at < bytes.byteLength && this.#reading === reading) {
      if (framing.state === "data") {
        const n = Math.min(framing.remaining, bytes.byteLength - at);
        reading.parts.push(Buffer.from(bytes.subarray(at, at + n)));
        at += n;
        framing.remaining -= n;
        if (framing.remaining === 0) framing.state = "data-end";
        continue;
      }
      // A line: a chunk's size, the CRLF after its data, or a trailer.
      const view = Buffer.from(bytes.buffer, bytes.byteOffset + at, bytes.byteLength - at);
      const eol = view.indexOf(CRLF);
      if (eol < 0) {
        reading.line += view.toString("latin1");
        if (reading.line.length > MAX_HEAD_BYTES) return this.#protocolError("chunk line too long");
        return bytes.byteLength;
      }
      const line = reading.line + view.toString("latin1", 0, eol);
      reading.line = "";
      at += eol + CRLF.byteLength;
      if (framing.state === "data-end") {
        if (line !== "") return this.#protocolError("chunk data longer than its size");
        framing.state = "size";
      } else if (framing.state === "size") {
        const size = parseInt(line.split(";")[0] ?? "", 16);
        if (!Number.isSafeInteger(size) || size < 0)
          return this.#protocolError(`bad chunk size "${line}"`);
        if (size === 0) framing.state = "trailer";
        else {
          framing.state = "data";
          framing.remaining = size;
        }
      } else if (line === "") {
        this.#finish(reading);
      }
    }
    return at;
  }

  #finish(reading: Reading): void {
    const body = reading.body ?? Buffer.concat(reading.parts);
    reading.resolve({
      response: { status: reading.status, headers: reading.headers, body },
      keepAlive: reading.keepAlive,
    });
  }

  #protocolError(message: string): -1 {
    this.#fail(new Http1Error("EPROTO", `HTTP: ${message}`));
    this.#socket.destroy();
    return -1;
  }
}
