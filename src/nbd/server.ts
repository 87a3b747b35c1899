/**
 * The NBD server: listens on TCP and unix sockets, and serves named exports to every client
 * through a {@link Connection} each.
 *
 * Design:
 * - **One device per export, shared.** Every connection to an export uses the same device (and
 *   so the same cache and range lock), which is what makes NBD_FLAG_CAN_MULTI_CONN true. The
 *   server does not own the devices: whoever built the exports disconnects them after
 *   {@link NbdServer.close}.
 * - **Reading into one reused buffer.** `net.Server` cannot give an accepted socket the `onread`
 *   option, so each connection is accepted paused and its handle re-wrapped in a socket that has
 *   it (Node's own `cluster` hands handles around the same way). Each connection reads into its
 *   own buffer of `readBufferBytes` (2 MiB by default; 1-4 MiB measured best here, see
 *   PERF-NOTES). Should that ever be unavailable, plain `data` events work the same, slower.
 * - **Stopping.** `close()` stops accepting, closes connections still negotiating, and lets
 *   each connection in transmission stop reading, answer what it admitted, and close.
 * - **TLS** (`tls`, see tls.ts): when on, one {@link TlsUpgrader} made at construction, which
 *   checks the key and certificates before anything listens, runs every connection's handshake.
 * - **Failure isolation.** Anything a client does (malformed frames, vanishing mid-request,
 *   resets) ends that connection only.
 */

import assert from "node:assert/strict";
import { existsSync, linkSync, lstatSync, unlinkSync } from "node:fs";
import path from "node:path";
import net, { type AddressInfo, type Server, type Socket } from "node:net";

import { Connection, DEFAULT_CONNECTION_LIMITS, type ConnectionLimits } from "./connection.js";
import { BufferPool } from "./buffer-pool.js";
import { ExportRegistry, type NbdExport } from "./exports.js";
import { TlsUpgrader, type NbdTlsOptions } from "./tls.js";
import { createLogger, type Logger } from "../util/logger.js";

/** Where to listen. */
export type Endpoint =
  | { readonly kind: "tcp"; readonly host: string; readonly port: number }
  | { readonly kind: "unix"; readonly path: string };

export interface NbdServerOptions {
  /** What to serve; the first is the default export (the empty name). */
  readonly exports: readonly NbdExport[];
  readonly limits?: Partial<ConnectionLimits>;
  /** Size of each connection's read buffer. Default 2 MiB. */
  readonly readBufferBytes?: number;
  /** Connections at once; more are refused. Default 64. */
  readonly maxConnections?: number;
  /**
   * Where log lines go; each connection logs through a child carrying `connection` (its id) and,
   * once it chose one, `export`. Routine events (connects, disconnects) are `debug`, trouble
   * `warn`. Default: warnings to stderr.
   */
  readonly logger?: Logger;
  /**
   * How long `close()` waits for connections to deliver their last replies before it cuts them
   * (a client that stops reading must not hold a shutdown forever). Default 10 s.
   */
  readonly drainTimeoutMs?: number;
  /**
   * NBD over TLS (NBD_OPT_STARTTLS): off, offered, or required; the key, certificates and
   * whether client certificates are checked. Default: off.
   */
  readonly tls?: NbdTlsOptions;
}

export const DEFAULT_READ_BUFFER_BYTES = 2 * 1024 * 1024;

export class NbdServer {
  readonly exports: ExportRegistry;
  readonly #limits: ConnectionLimits;
  readonly #readBufferBytes: number;
  readonly #maxConnections: number;
  readonly #drainTimeoutMs: number;
  readonly #logger: Logger;
  readonly #tls: NbdTlsOptions["mode"];
  readonly #tlsUpgrader: TlsUpgrader | undefined;
  readonly #listeners: { server: Server; endpoint: Endpoint }[] = [];
  readonly #connections = new Set<Connection>();
  readonly #pool = new BufferPool();
  #nextId = 1;
  #closing: Promise<void> | undefined;

  constructor(options: NbdServerOptions) {
    this.exports = new ExportRegistry(options.exports);
    this.#limits = { ...DEFAULT_CONNECTION_LIMITS, ...options.limits };
    this.#readBufferBytes = options.readBufferBytes ?? DEFAULT_READ_BUFFER_BYTES;
    this.#maxConnections = options.maxConnections ?? 64;
    this.#drainTimeoutMs = options.drainTimeoutMs ?? 10_000;
    this.#logger = options.logger ?? createLogger({ level: "warn" });
    this.#tls = options.tls?.mode ?? "off";
    this.#tlsUpgrader = this.#tls === "off" ? undefined : new TlsUpgrader(options.tls!);
    assert(this.#limits.maxInFlightRequests >= 1, "maxInFlightRequests");
    assert(this.#limits.maxInFlightBytes >= 1, "maxInFlightBytes");
  }

  /**
   * Connections open now.
   * @internal
   */
  get connections(): readonly Connection[] {
    return [...this.#connections];
  }

  /**
   * Start listening; resolves with the endpoint actually bound (port 0 picks a free port).
   *
   * A unix socket appears at its path only once it accepts connections, so whoever waits for
   * the file (a VMM, a script) never connects too early: a socket's file exists from bind(2),
   * before listen(2). It is bound under a temporary name and then linked into place; `link(2)`
   * also refuses to replace a socket another server put there meanwhile.
   */
  async listen(endpoint: Endpoint): Promise<Endpoint> {
    assert(this.#closing === undefined, "listen() after close()");
    if (endpoint.kind === "unix") await removeStaleSocket(endpoint.path);
    const server = net.createServer({ pauseOnConnect: true, allowHalfOpen: true });
    server.on("connection", (socket) => this.#accept(socket));
    const staging = endpoint.kind === "unix" ? stagingPath(endpoint.path) : undefined;
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      const ready = () => {
        server.off("error", reject);
        resolve();
      };
      if (endpoint.kind === "tcp") server.listen(endpoint.port, endpoint.host, ready);
      else server.listen(staging ?? endpoint.path, ready);
    });
    if (endpoint.kind === "unix" && staging !== undefined) {
      try {
        linkSync(staging, endpoint.path);
      } catch (error) {
        await new Promise((resolve) => server.close(resolve));
        if ((error as NodeJS.ErrnoException).code !== "EEXIST") throw error;
        throw new Error(`${endpoint.path} is in use by another server`, { cause: error });
      } finally {
        unlinkIfPresent(staging); // closing the listener may have removed it already
      }
    }
    server.on("error", (error) => this.#logger.warn(`listener: ${error.message}`));
    const bound: Endpoint =
      endpoint.kind === "tcp"
        ? { kind: "tcp", host: endpoint.host, port: (server.address() as AddressInfo).port }
        : endpoint;
    this.#listeners.push({ server, endpoint: bound });
    return bound;
  }

  /**
   * Stop accepting, then end every connection: those in transmission answer what they admitted
   * first; any still open after `drainTimeoutMs` are cut. Resolves once every socket is closed.
   * Devices are the caller's to disconnect (requests still running against them finish first).
   */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      await Promise.all(
        this.#listeners.map(
          ({ server }) => new Promise<void>((resolve) => server.close(() => resolve())),
        ),
      );
      // A socket linked into place is not the name Node bound, so Node does not remove it.
      for (const { endpoint } of this.#listeners) {
        if (endpoint.kind === "unix") unlinkIfPresent(endpoint.path);
      }
      const connections = [...this.#connections];
      let timer: NodeJS.Timeout | undefined;
      const drained = Promise.all(connections.map((c) => c.shutdown()));
      const late = new Promise<boolean>((resolve) => {
        timer = setTimeout(() => resolve(true), this.#drainTimeoutMs);
      });
      if (await Promise.race([drained.then(() => false), late])) {
        await Promise.all(
          connections.map((c) => c.destroy("replies not delivered in time at shutdown")),
        );
      }
      clearTimeout(timer);
    })();
    return this.#closing;
  }

  #accept(accepted: Socket): void {
    if (this.#closing !== undefined || this.#connections.size >= this.#maxConnections) {
      this.#logger.warn(`refused a connection: ${this.#closing ? "shutting down" : "too many"}`);
      accepted.destroy();
      return;
    }
    const id = this.#nextId++;
    const buffer = Buffer.allocUnsafe(this.#readBufferBytes);
    const socket = withOnread(accepted, buffer, (n) => connection.onChunk(buffer.subarray(0, n)));
    if (socket === accepted) {
      // Fallback: fresh buffers from `data` events.
      socket.on("data", (chunk: Buffer) => {
        if (!connection.onChunk(chunk)) socket.pause();
      });
    }
    socket.setNoDelay(true);
    const logger = this.#logger.child({ connection: id });
    // The callbacks above run only once reading starts, after this line.
    const connection = new Connection(id, socket, {
      exports: this.exports,
      pool: this.#pool,
      limits: this.#limits,
      logger,
      shuttingDown: () => this.#closing !== undefined,
      tls: this.#tls,
      tlsUpgrader: this.#tlsUpgrader,
    });
    this.#connections.add(connection);
    const remote =
      socket.remoteAddress === undefined
        ? "unix socket"
        : `${socket.remoteAddress}:${socket.remotePort}`;
    logger.debug(`connection from ${remote}`);
    void connection.closed.then(() => {
      this.#connections.delete(connection);
      logger.debug("closed");
    });
    socket.resume();
  }
}

/**
 * Re-wrap a socket accepted paused (`pauseOnConnect`) in one that reads into `buffer` and calls
 * `callback(bytesRead)`; its return value false stops reading until `resume()`. Returns the
 * socket given if its handle cannot be taken over (then read it with `data` events).
 */
function withOnread(accepted: Socket, buffer: Buffer, callback: (n: number) => boolean): Socket {
  const internals = accepted as unknown as { _handle?: unknown };
  const handle = internals._handle;
  if (handle === undefined || handle === null) return accepted;
  // Detach the handle so that destroying the accepted wrapper leaves the connection open (and
  // keeps the listener's connection count right).
  internals._handle = null;
  accepted.destroy();
  const options = {
    handle,
    allowHalfOpen: true,
    onread: { buffer, callback: (n: number) => callback(n) },
  } as unknown as net.SocketConstructorOpts;
  return new net.Socket(options);
}

/** Remove a unix socket left by a server that is gone; refuse one that still answers. */
async function removeStaleSocket(path: string): Promise<void> {
  if (!existsSync(path)) return;
  if (!lstatSync(path).isSocket()) throw new Error(`${path} exists and is not a socket`);
  const alive = await new Promise<boolean>((resolve) => {
    const probe = net.connect(path);
    probe.once("connect", () => {
      probe.destroy();
      resolve(true);
    });
    probe.once("error", () => resolve(false));
  });
  if (alive) throw new Error(`${path} is in use by another server`);
  unlinkSync(path);
}

/**
 * Where to bind a unix socket before linking it to `socketPath`: beside it (link(2) needs the
 * same file system), under a short name, since socket paths are limited to 107 bytes. Undefined
 * when even that would be too long: the socket is then bound at its path directly.
 */
function stagingPath(socketPath: string): string | undefined {
  const staging = path.join(path.dirname(socketPath), `.s3blk-${process.pid}-${stagingCount++}`);
  return Buffer.byteLength(staging) <= MAX_SOCKET_PATH_BYTES ? staging : undefined;
}

const MAX_SOCKET_PATH_BYTES = 107;

function unlinkIfPresent(file: string): void {
  try {
    unlinkSync(file);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== "ENOENT") throw error;
  }
}
let stagingCount = 0;

/**
 * The NBD URI of `exportName` at `endpoint` (NetworkBlockDevice `doc/uri.md`); with `tls`, the
 * `nbds` scheme, which tells the client to require TLS.
 */
export function nbdUri(endpoint: Endpoint, exportName: string, tls = false): string {
  const name = encodeURIComponent(exportName).replace(/%2F/g, "/");
  const scheme = tls ? "nbds" : "nbd";
  if (endpoint.kind === "unix") {
    const socket = encodeURIComponent(endpoint.path).replace(/%2F/g, "/");
    return `${scheme}+unix:///${name}?socket=${socket}`;
  }
  const host = endpoint.host.includes(":") ? `[${endpoint.host}]` : endpoint.host;
  return `${scheme}://${host}:${endpoint.port}/${name}`;
}
