/**
 * The benchmark's delay proxy, in front of a local HTTP server: every request on a keep-alive
 * connection waits its latency once (a request's body is not delayed again), answers arrive
 * whole, and GETs and answer bytes are counted.
 */

import http from "node:http";
import type { AddressInfo } from "node:net";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { DelayProxy } from "../../src/bench/delay-proxy.js";

describe("delay proxy", () => {
  const arrivals: { method: string; bodyBytes: number; atMs: number }[] = [];
  const body = Buffer.alloc(300_000, 7);
  let server: http.Server;
  let proxy: DelayProxy;
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });

  beforeAll(async () => {
    server = http.createServer((req, res) => {
      let bodyBytes = 0;
      req.on("data", (chunk: Buffer) => (bodyBytes += chunk.byteLength));
      req.on("end", () => {
        arrivals.push({ method: req.method ?? "", bodyBytes, atMs: performance.now() });
        res.end(req.method === "GET" ? body : "ok");
      });
    });
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    const { port } = server.address() as AddressInfo;
    proxy = await DelayProxy.start(`http://127.0.0.1:${port}`, 100);
  });
  afterAll(async () => {
    agent.destroy();
    await proxy.stop();
    server.close();
  });

  const request = (method: string, payload?: Buffer) =>
    new Promise<{ bytes: number; sentMs: number }>((resolve, reject) => {
      const sentMs = performance.now();
      const req = http.request(`${proxy.endpoint}/k`, { method, agent }, (res) => {
        let bytes = 0;
        res.on("data", (chunk: Buffer) => (bytes += chunk.byteLength));
        res.on("end", () => resolve({ bytes, sentMs }));
      });
      req.on("error", reject);
      req.end(payload);
    });

  it("delays each request once, forwards bodies and answers whole, and counts them", async () => {
    const first = await request("GET");
    const second = await request("GET");
    const put = await request("PUT", Buffer.alloc(2_000_000, 1));
    expect(first.bytes).toBe(body.byteLength);
    expect(second.bytes).toBe(body.byteLength);
    expect(put.bytes).toBe(2);
    expect(arrivals.map((a) => [a.method, a.bodyBytes])).toEqual([
      ["GET", 0],
      ["GET", 0],
      ["PUT", 2_000_000],
    ]);
    for (const [i, sent] of [first, second, put].entries()) {
      expect(arrivals[i]!.atMs - sent.sentMs).toBeGreaterThanOrEqual(99);
    }
    expect(proxy.counts.requests).toBe(3);
    expect(proxy.counts.gets).toBe(2);
    expect(proxy.counts.responseBytes).toBeGreaterThan(2 * body.byteLength);
  });
});
