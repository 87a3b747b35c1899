/**
 * An HTTP proxy between s3blk and the real S3 server that injects the failures S3 shows in
 * production: 500 InternalError, 503 SlowDown, connection resets, stalls longer than our
 * timeouts, and outages. Tests point s3blk's endpoint at it (in process, or a spawned `s3blk
 * serve --endpoint`), and steer it with rules while a workload runs. A request no rule picks is
 * forwarded at once. Every request is recorded with the time it arrived, so a test can check
 * when attempts were sent (the lease's fence promises a deadline).
 *
 * `latencyMs` delays every forwarded request by a fixed time before it goes upstream, as a
 * distant S3 would (loopback RGW answers in 1-2 ms and flatters designs that make many small
 * serial requests); the benchmark's cold rows run at 0 and at 20 ms. With `tls`, the proxy
 * speaks HTTPS to its clients (and plain HTTP upstream), for the tests of TLS endpoints.
 */

import http from "node:http";
import https from "node:https";
import type { AddressInfo } from "node:net";

export type FaultKind = "500" | "503" | "reset" | "stall";

export interface ProxyRule {
  readonly kind: FaultKind;
  /** Only these methods. Default: all. */
  readonly methods?: readonly string[];
  /** Only paths containing this. Default: all. */
  readonly pathIncludes?: string;
  /** Fire this many times, then retire. Default: unlimited. */
  readonly times?: number;
  /** Fire with this probability. Default 1. */
  readonly probability?: number;
  /** For "stall": hold the request this long, then drop the connection. Default 60 s. */
  readonly stallMs?: number;
}

/** One request the proxy received. */
export interface ProxyRequest {
  readonly method: string;
  /** The path and query, as sent (`/bucket/key?...`). */
  readonly path: string;
  /** Wall-clock ms since 1970 at which its headers arrived. */
  readonly receivedAtMs: number;
  /** The fault injected, if any. */
  readonly fault?: FaultKind;
  /** The upstream's status, once it answered a forwarded request. */
  status?: number;
}

/** The most requests the log keeps; later ones are counted but not logged. */
const MAX_LOGGED_REQUESTS = 200_000;

export interface ProxyCounts {
  requests: number;
  forwarded: number;
  /** Bytes of the upstream's answer bodies forwarded to clients. */
  responseBytes: number;
  injected: Record<FaultKind, number>;
}

const BODIES: Record<"500" | "503", string> = {
  "500":
    '<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code><Message>injected</Message></Error>',
  "503":
    '<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>injected</Message></Error>',
};

export interface FaultProxyOptions {
  /** Decides `probability` rules. Default `Math.random`. */
  readonly random?: () => number;
  /** Every forwarded request waits this long before it is sent upstream. Default 0. */
  readonly latencyMs?: number;
  /** Serve HTTPS with this key and certificate (PEM). Default: plain HTTP. */
  readonly tls?: { readonly key: string | Buffer; readonly cert: string | Buffer };
}

export class FaultProxy {
  readonly #upstream: URL;
  readonly #server: http.Server;
  readonly #secure: boolean;
  /** Added before every forwarded request; change it at any time. */
  latencyMs: number;
  readonly #agent = new http.Agent({ keepAlive: true, maxSockets: 128 });
  #rules: { rule: ProxyRule; remaining: number }[] = [];
  #random: () => number;
  readonly counts: ProxyCounts = {
    requests: 0,
    forwarded: 0,
    responseBytes: 0,
    injected: { "500": 0, "503": 0, reset: 0, stall: 0 },
  };
  /** Every request received, in order of arrival (up to {@link MAX_LOGGED_REQUESTS}). */
  readonly requests: ProxyRequest[] = [];

  private constructor(upstream: string, options: FaultProxyOptions) {
    this.#upstream = new URL(upstream);
    this.#random = options.random ?? Math.random;
    this.latencyMs = options.latencyMs ?? 0;
    this.#secure = options.tls !== undefined;
    const handle = (req: http.IncomingMessage, res: http.ServerResponse) => this.#handle(req, res);
    this.#server =
      options.tls === undefined
        ? http.createServer(handle)
        : https.createServer({ key: options.tls.key, cert: options.tls.cert }, handle);
    this.#server.keepAliveTimeout = 5000;
  }

  /**
   * Start on 127.0.0.1 with an ephemeral port. The second argument is the random source of
   * `probability` rules, or the options.
   */
  static async start(
    upstream: string,
    options: FaultProxyOptions | (() => number) = {},
  ): Promise<FaultProxy> {
    const proxy = new FaultProxy(
      upstream,
      typeof options === "function" ? { random: options } : options,
    );
    await new Promise<void>((resolve) => proxy.#server.listen(0, "127.0.0.1", resolve));
    return proxy;
  }

  get endpoint(): string {
    const { port } = this.#server.address() as AddressInfo;
    return `${this.#secure ? "https" : "http"}://127.0.0.1:${port}`;
  }

  inject(rule: ProxyRule): void {
    this.#rules.push({ rule, remaining: rule.times ?? Infinity });
  }

  /** Every request fails, alternating resets and 503s, until `heal`. */
  outage(): void {
    this.inject({ kind: "reset", probability: 0.5 });
    this.inject({ kind: "503" });
  }

  heal(): void {
    this.#rules = [];
  }

  totalInjected(): number {
    return Object.values(this.counts.injected).reduce((a, b) => a + b, 0);
  }

  async stop(): Promise<void> {
    this.heal();
    this.#server.closeAllConnections();
    await new Promise<void>((resolve) => this.#server.close(() => resolve()));
    this.#agent.destroy();
  }

  #pick(req: http.IncomingMessage): ProxyRule | undefined {
    for (const entry of this.#rules) {
      const { rule } = entry;
      if (entry.remaining <= 0) continue;
      if (rule.methods !== undefined && !rule.methods.includes(req.method ?? "")) continue;
      if (rule.pathIncludes !== undefined && !(req.url ?? "").includes(rule.pathIncludes)) continue;
      if (rule.probability !== undefined && this.#random() >= rule.probability) continue;
      entry.remaining--;
      return rule;
    }
    return undefined;
  }

  #handle(req: http.IncomingMessage, res: http.ServerResponse): void {
    this.counts.requests++;
    const rule = this.#pick(req);
    const record: ProxyRequest = {
      method: req.method ?? "",
      path: req.url ?? "",
      receivedAtMs: Date.now(),
      ...(rule === undefined ? {} : { fault: rule.kind }),
    };
    if (this.requests.length < MAX_LOGGED_REQUESTS) this.requests.push(record);
    if (rule !== undefined) {
      this.counts.injected[rule.kind]++;
      switch (rule.kind) {
        case "reset":
          req.socket.destroy();
          return;
        case "stall": {
          const timer = setTimeout(() => req.socket.destroy(), rule.stallMs ?? 60_000);
          req.socket.once("close", () => clearTimeout(timer));
          req.resume();
          return;
        }
        case "500":
        case "503": {
          const status = rule.kind;
          // Drain the body first, as a real server would, then answer.
          req.resume();
          req.once("end", () => {
            res.writeHead(Number(status), { "content-type": "application/xml" });
            res.end(BODIES[status]);
          });
          return;
        }
      }
    }
    this.counts.forwarded++;
    if (this.latencyMs > 0) {
      // Hold the request (its body waits in the socket) and forward it after the delay.
      req.pause();
      const cancel = () => clearTimeout(timer);
      const timer = setTimeout(() => {
        req.socket.off("close", cancel);
        this.#forward(req, res, record);
      }, this.latencyMs);
      req.socket.once("close", cancel);
      return;
    }
    this.#forward(req, res, record);
  }

  #forward(req: http.IncomingMessage, res: http.ServerResponse, record: ProxyRequest): void {
    const upstream = http.request(
      {
        host: this.#upstream.hostname,
        port: this.#upstream.port,
        method: req.method,
        path: req.url,
        headers: req.headers,
        agent: this.#agent,
      },
      (answer) => {
        record.status = answer.statusCode;
        answer.on("data", (chunk: Buffer) => (this.counts.responseBytes += chunk.byteLength));
        res.writeHead(answer.statusCode ?? 502, answer.headers);
        answer.pipe(res);
      },
    );
    upstream.on("error", () => req.socket.destroy());
    req.pipe(upstream);
  }
}
