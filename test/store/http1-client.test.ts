/**
 * The lean GET path's HTTP/1.1 client against a server that answers with canned bytes, split at
 * every offset: content-length and chunked bodies, a 100 Continue before the answer, a body
 * framed by the connection's end, `connection: close`, a connection closed mid-body, keep-alive
 * reuse, and a head that is not HTTP.
 */

import net from "node:net";
import type { AddressInfo } from "node:net";
import { afterEach, describe, expect, it } from "vitest";
import { Http1Client, Http1Error } from "../../src/store/http1-client.js";

/** A server that answers each request with `answer`, written in pieces `split` bytes apart. */
async function cannedServer(
  answer: Buffer,
  options: { split?: number; end?: boolean } = {},
): Promise<{ port: number; connections: () => number; requests: string[]; stop(): void }> {
  const requests: string[] = [];
  let connections = 0;
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    connections++;
    sockets.add(socket);
    socket.on("data", (data) => {
      requests.push(data.toString("latin1"));
      const step = options.split ?? answer.byteLength;
      for (let at = 0; at < answer.byteLength; at += step) {
        socket.write(answer.subarray(at, at + step));
      }
      if (options.end === true) socket.end();
    });
    socket.on("error", () => {});
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    port: (server.address() as AddressInfo).port,
    connections: () => connections,
    requests,
    stop() {
      for (const socket of sockets) socket.destroy();
      server.close();
    },
  };
}

const stops: (() => void)[] = [];
afterEach(() => {
  for (const stop of stops.splice(0)) stop();
});

function client(port: number): Http1Client {
  const c = new Http1Client({
    hostname: "127.0.0.1",
    port,
    maxSockets: 2,
    idleTimeoutMs: 1000,
    connectionTimeoutMs: 1000,
  });
  stops.push(() => c.close());
  return c;
}

const signal = () => new AbortController().signal;
const body = Buffer.from("0123456789".repeat(30));

describe("HTTP/1.1 client", () => {
  it("reads a content-length answer split at every offset, and reuses the connection", async () => {
    const head = `HTTP/1.1 206 Partial Content\r\nContent-Length: ${body.length}\r\nx-amz-meta-a: 1\r\nX-Amz-Meta-A: 2\r\n\r\n`;
    const answer = Buffer.concat([Buffer.from(head), body]);
    for (const split of [1, 2, 3, 7, 64, answer.length]) {
      const server = await cannedServer(answer, { split });
      stops.push(server.stop);
      const c = client(server.port);
      for (let i = 0; i < 3; i++) {
        const got = await c.get("/b/k", { host: "h", range: "bytes=0-1" }, signal());
        expect(got.status).toBe(206);
        expect(got.body.equals(body)).toBe(true);
        expect(got.headers["x-amz-meta-a"]).toBe("1, 2");
      }
      expect(server.connections()).toBe(1);
      expect(server.requests[0]).toBe("GET /b/k HTTP/1.1\r\nhost: h\r\nrange: bytes=0-1\r\n\r\n");
      // Closing drops the idle connection, and the client still serves later requests (the
      // CLI closes a store and goes on using it, as the SDK's clients allow).
      c.close();
      expect((await c.get("/b/k", { host: "h" }, signal())).body.equals(body)).toBe(true);
      expect(server.connections()).toBe(2);
    }
  });

  it("reads chunked bodies and skips a 100 Continue, at every split", async () => {
    const chunked =
      "HTTP/1.1 100 Continue\r\n\r\n" +
      "HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n" +
      "5;ext=1\r\n<Erro\r\n" +
      "1a\r\nr><Code>NoSuchKey</Code></\r\n" +
      "6\r\nError>\r\n0\r\nx-trailer: y\r\n\r\n";
    for (const split of [1, 5, 1000]) {
      const server = await cannedServer(Buffer.from(chunked), { split });
      stops.push(server.stop);
      const c = client(server.port);
      for (let i = 0; i < 2; i++) {
        const got = await c.get("/", { host: "h" }, signal());
        expect(got.status).toBe(404);
        expect(got.body.toString()).toBe("<Error><Code>NoSuchKey</Code></Error>");
      }
      expect(server.connections()).toBe(1);
    }
  });

  it("reads a body framed by the connection's end, and honours connection: close", async () => {
    const server = await cannedServer(Buffer.from(`HTTP/1.1 200 OK\r\n\r\n${body}`), {
      split: 10,
      end: true,
    });
    stops.push(server.stop);
    const c = client(server.port);
    expect((await c.get("/", { host: "h" }, signal())).body.equals(body)).toBe(true);
    expect((await c.get("/", { host: "h" }, signal())).body.equals(body)).toBe(true);
    expect(server.connections()).toBe(2);

    const closing = await cannedServer(
      Buffer.from(`HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\nabc`),
    );
    stops.push(closing.stop);
    const d = client(closing.port);
    expect((await d.get("/", { host: "h" }, signal())).body.toString()).toBe("abc");
    expect((await d.get("/", { host: "h" }, signal())).body.toString()).toBe("abc");
    expect(closing.connections()).toBe(2);
  });

  it("fails a body cut short, a head that is not HTTP, and an aborted request", async () => {
    const cut = await cannedServer(
      Buffer.from("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"),
      {
        end: true,
      },
    );
    stops.push(cut.stop);
    const failure = await client(cut.port)
      .get("/", { host: "h" }, signal())
      .catch((e: unknown) => e);
    expect(failure).toBeInstanceOf(Http1Error);
    expect((failure as Http1Error).code).toBe("ECONNRESET");

    const garbage = await cannedServer(Buffer.from("SSH-2.0-OpenSSH\r\n\r\n"));
    stops.push(garbage.stop);
    const bad = await client(garbage.port)
      .get("/", { host: "h" }, signal())
      .catch((e: unknown) => e);
    expect((bad as Http1Error).code).toBe("EPROTO");

    const silent = net.createServer(() => {});
    await new Promise<void>((resolve) => silent.listen(0, "127.0.0.1", resolve));
    stops.push(() => silent.close());
    const abort = new AbortController();
    const pending = client((silent.address() as AddressInfo).port)
      .get("/", { host: "h" }, abort.signal)
      .catch((e: unknown) => e);
    setTimeout(() => abort.abort(), 50);
    expect(((await pending) as Http1Error).code).toBe("ETIMEDOUT");
  });
});
