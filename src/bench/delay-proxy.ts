/**
 * A TCP proxy that delays every HTTP request by a fixed time before it reaches the S3 server, for
 * the benchmark's rows "at 20 ms": a distant S3, with loopback's bandwidth. It forwards bytes
 * without parsing HTTP, so it costs little CPU: the fault proxy (fault-proxy.ts), which parses and
 * re-sends every request, capped 1 MiB GETs at 60-90 MiB/s here whatever the number in flight,
 * and would have measured itself.
 *
 * A request is the bytes a client sends after the server's last answer (S3 clients do not
 * pipeline): the first chunk of each is held `latencyMs`, later chunks of the same request wait
 * behind it, in order. Answers are forwarded at once. It counts requests (and GETs among them)
 * and answer bytes, headers included.
 */

import net from "node:net";
import type { AddressInfo } from "node:net";

export interface DelayCounts {
  requests: number;
  gets: number;
  /** Bytes the server sent back, headers included. */
  responseBytes: number;
}

export class DelayProxy {
  readonly counts: DelayCounts = { requests: 0, gets: 0, responseBytes: 0 };
  readonly #server: net.Server;
  readonly #sockets = new Set<net.Socket>();

  private constructor(upstream: URL, latencyMs: number) {
    this.#server = net.createServer((client) => this.#connection(client, upstream, latencyMs));
  }

  /** Start on 127.0.0.1 with an ephemeral port, in front of the `http:` server `upstream`. */
  static async start(upstream: string, latencyMs: number): Promise<DelayProxy> {
    const proxy = new DelayProxy(new URL(upstream), latencyMs);
    await new Promise<void>((resolve) => proxy.#server.listen(0, "127.0.0.1", resolve));
    return proxy;
  }

  get endpoint(): string {
    return `http://127.0.0.1:${(this.#server.address() as AddressInfo).port}`;
  }

  async stop(): Promise<void> {
    for (const socket of this.#sockets) socket.destroy();
    await new Promise<void>((resolve) => this.#server.close(() => resolve()));
  }

  #connection(client: net.Socket, upstream: URL, latencyMs: number): void {
    const server = net.connect({ host: upstream.hostname, port: Number(upstream.port || 80) });
    for (const s of [client, server]) {
      this.#sockets.add(s);
      s.setNoDelay(true);
      s.on("error", () => {
        client.destroy();
        server.destroy();
      });
      s.on("close", () => {
        this.#sockets.delete(s);
        client.destroy();
        server.destroy();
      });
    }
    // Held chunks, in order, each with the time it may go.
    const held: { bytes: Buffer; dueMs: number }[] = [];
    let answered = true;
    let timer: NodeJS.Timeout | undefined;
    const flush = () => {
      timer = undefined;
      const nowMs = performance.now();
      while (held.length > 0 && held[0]!.dueMs <= nowMs) server.write(held.shift()!.bytes);
      if (held.length > 0) timer = setTimeout(flush, held[0]!.dueMs - nowMs);
    };
    client.on("data", (bytes: Buffer) => {
      const last = held.at(-1);
      let dueMs = last?.dueMs ?? performance.now();
      if (answered) {
        answered = false;
        this.counts.requests++;
        if (bytes.subarray(0, 4).toString("latin1") === "GET ") this.counts.gets++;
        dueMs = performance.now() + latencyMs;
      }
      held.push({ bytes, dueMs });
      timer ??= setTimeout(flush, Math.max(0, dueMs - performance.now()));
    });
    server.on("data", (bytes: Buffer) => {
      answered = true;
      this.counts.responseBytes += bytes.byteLength;
      if (!client.write(bytes)) {
        server.pause();
        client.once("drain", () => server.resume());
      }
    });
  }
}
