/**
 * `s3blk serve` starting and stopping: SIGTERM with unflushed writes flushes them and exits 0; a
 * server killed mid-transfer leaves its clients with an error, never with wrong data; several
 * exports over TCP and a unix socket; read-only serving; `npm start`'s command line; and the
 * one-line errors of a serve that cannot start.
 */

import { execFileSync, spawn } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, readFileSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import { describe, expect, it } from "vitest";

import { childEnv } from "../support/environment.js";
import { requireS3 } from "../support/s3-target.js";
import {
  bytesAt,
  CLI,
  fileServeBackend,
  missingTools,
  nbdsh,
  run,
  s3ServeBackend,
  startServe,
  tcpTarget,
  type ServeBackend,
} from "./harness.js";
import { RawClient } from "./raw-client.js";

const MiB = 1024 * 1024;
const missing = missingTools("NBD lifecycle suite", ["nbdinfo", "qemu-io", "nbdcopy", "nbdsh"]);
const without = (...tools: string[]) => tools.some((t) => missing.includes(t));
const s3 = await requireS3("NBD lifecycle suite against S3");
const file = fileServeBackend();
const backends: ServeBackend[] = [file, ...(s3 === undefined ? [] : [s3ServeBackend(s3)])];

describe.each(backends)("stopping s3blk serve on $name", (backend) => {
  it("flushes unflushed writes on SIGTERM, exits 0, and a new server sees them", async () => {
    const url = backend.newUrl("sigterm");
    // Write-back far in the future: only the shutdown can make these writes durable.
    const first = await startServe(backend, [
      url,
      "--create-size",
      "32M",
      "--writeback-delay",
      "600000",
    ]);
    const client = await RawClient.open(tcpTarget(first.uris[0]!));
    const pieces: [number, Buffer][] = [
      [0, bytesAt(1, 0, 4096)],
      [5 * MiB + 123, bytesAt(2, 5 * MiB + 123, 10_000)], // unaligned
      [20 * MiB, bytesAt(3, 20 * MiB, MiB)],
    ];
    for (const [at, data] of pieces) await client.ok(client.write(at, data));
    if (backend === file) {
      const chunks = path.join(new URL(url).pathname, "chunks");
      expect(existsSync(chunks) ? readdirSync(chunks) : []).toEqual([]); // nothing durable yet
    }
    expect(await first.stop("SIGTERM")).toBe(0);
    expect(first.stderr()).toMatch(/flushed and stopped/);
    await client.closed(); // the server closed our connection after answering everything
    if (backend === file) {
      expect(readdirSync(path.join(new URL(url).pathname, "chunks")).length).toBe(3);
    }

    const second = await startServe(backend, [url]);
    const reader = await RawClient.open(tcpTarget(second.uris[0]!));
    for (const [at, data] of pieces) {
      expect((await reader.ok(reader.read(at, data.length))).data).toEqual(data);
    }
    reader.disconnect();
    await reader.closed();
    expect(await second.stop("SIGINT")).toBe(0);
  });

  it.skipIf(without("qemu-io", "nbdcopy"))(
    "a server killed mid-transfer leaves its clients with an error, never wrong data",
    async () => {
      const url = backend.newUrl("kill");
      const server = await startServe(backend, [url, "--create-size", "32G"]);
      const uri = server.uris[0]!;
      const fill = await run("qemu-io", ["-f", "raw", "-c", "write -P 0xab 0 16M", uri]);
      expect(fill.code).toBe(0);

      // A reader checking the pattern over and over, and a copy of the whole 32 GiB, both cut off.
      const reads = Array.from({ length: 300 }, () => ["-c", "read -P 0xab 0 16M"]).flat();
      let readerOut = "";
      const reader = run("qemu-io", ["-f", "raw", ...reads, uri], {
        timeoutMs: 60_000,
        onStdout: (text) => (readerOut += text),
      });
      const copy = run("nbdcopy", ["--no-extents", uri, "null:"], { timeoutMs: 60_000 });
      // Kill once a read has succeeded (on a loaded machine the first may take a second or more),
      // and while the 32 GiB copy is surely still running.
      const deadline = Date.now() + 30_000;
      while (!/read 16777216\/16777216 bytes/.test(readerOut) && Date.now() < deadline) {
        await new Promise((r) => setTimeout(r, 20));
      }
      expect(await server.stop("SIGKILL")).toBe("SIGKILL");

      const [read, copied] = await Promise.all([reader, copy]);
      expect(read.stdout + read.stderr).not.toMatch(/Pattern verification failed/);
      // Some reads did succeed. (Once seen: every read failed, and the reason is not known; the
      // message carries what the server and the reader said.)
      expect(
        read.stdout,
        `reader saw ${readerOut.length} bytes live; server stderr:\n${server.stderr().slice(-4000)}`,
      ).toMatch(/read 16777216\/16777216 bytes/);
      expect(read.stdout + read.stderr).toMatch(/failed|error/i);
      expect(copied.code).not.toBe(0);
      expect(copied.stderr.length).toBeGreaterThan(0);

      // The volume is still fine for the next server (the dead holder's lease is taken over).
      const again = await startServe(backend, [url]);
      const check = await run("qemu-io", ["-f", "raw", "-c", "read -P 0xab 0 16M", again.uris[0]!]);
      expect(check.code).toBe(0);
      expect(await again.stop()).toBe(0);
    },
  );
});

describe("serving several volumes", () => {
  it.skipIf(without("nbdinfo", "qemu-io"))(
    "serves named exports on TCP and a unix socket; the empty name is the first",
    async () => {
      const socket = path.join(mkdtempSync(path.join(tmpdir(), "s3blk-sock-")), "nbd.sock");
      const server = await startServe(file, [
        `alpha=${file.newUrl("a")}`,
        file.newUrl("beta"),
        "--create-size",
        "8M",
        "--listen",
        "127.0.0.1:0",
        "--socket",
        socket,
      ]);
      const [alphaTcp, alphaUnix, betaTcp, betaUnix] = server.uris;
      expect(alphaTcp).toMatch(/^nbd:\/\/127\.0\.0\.1:\d+\/alpha$/);
      expect(alphaUnix).toBe(`nbd+unix:///alpha?socket=${socket}`);
      expect(betaTcp).toMatch(/^nbd:\/\/127\.0\.0\.1:\d+\/beta-\d+$/);
      expect(betaUnix).toMatch(/^nbd\+unix:\/\/\/beta-\d+\?socket=/);

      const list = await run("nbdinfo", ["--list", "--json", `nbd+unix:///?socket=${socket}`]);
      expect(list.code).toBe(0);
      const names = (
        JSON.parse(list.stdout) as { exports: { "export-name": string }[] }
      ).exports.map((e) => e["export-name"]);
      expect(names).toEqual(["alpha", betaTcp!.slice(betaTcp!.lastIndexOf("/") + 1)]);

      expect((await run("qemu-io", ["-f", "raw", "-c", "write -P 1 0 1M", alphaTcp!])).code).toBe(
        0,
      );
      expect((await run("qemu-io", ["-f", "raw", "-c", "write -P 2 0 1M", betaUnix!])).code).toBe(
        0,
      );
      const defaultTcp = alphaTcp!.replace(/\/alpha$/, "/");
      for (const [uri, p] of [
        [`nbd+unix:///?socket=${socket}`, 1],
        [defaultTcp, 1],
        [alphaUnix!, 1],
        [betaTcp!, 2],
      ] as const) {
        const check = await run("qemu-io", ["-f", "raw", "-c", `read -P ${p} 0 1M`, uri]);
        expect({ uri, code: check.code }).toEqual({ uri, code: 0 });
      }
      expect(await server.stop()).toBe(0);
      expect(existsSync(socket)).toBe(false);
    },
  );

  it.skipIf(without("nbdinfo", "nbdsh"))("serves read-only, and says so", async () => {
    const url = file.newUrl("ro");
    const setup = await run(process.execPath, [CLI, "create", url, "--size", "8M"]);
    expect(setup.code).toBe(0);
    const server = await startServe(file, [url, "--read-only"]);
    expect(server.stdout()).toMatch(/read-only/);
    const info = JSON.parse((await run("nbdinfo", ["--json", server.uris[0]!])).stdout) as {
      exports: Record<string, unknown>[];
    };
    expect(info.exports[0]).toMatchObject({
      is_read_only: true,
      can_trim: false,
      can_fua: false,
      can_zero: false,
      can_multi_conn: true,
    });
    const attempt = await nbdsh(
      server.uris[0]!,
      `
try:
    h.pwrite(b"x" * 512, 0)
    print("wrote")
except nbd.Error as e:
    print("errno", e.errnum)
print(h.pread(512, 0) == bytes(512))
`,
    );
    expect(attempt.stdout.trim().split("\n")).toEqual(["errno 1", "True"]);
    expect(await server.stop()).toBe(0);
  });
});

describe("starting s3blk serve", () => {
  it("npm start's command line creates and serves .s3blk/volumes/default", async () => {
    const scripts = (
      JSON.parse(readFileSync("package.json", "utf8")) as { scripts: { start: string } }
    ).scripts;
    // `exec`, so that npm's shell is replaced by the server and a SIGTERM npm forwards reaches it.
    expect(scripts.start).toMatch(/^exec node /);
    // The words npm's shell makes of the rest, with S3BLK_VOLUME unset: the default volume.
    const env = { ...process.env };
    delete env.S3BLK_VOLUME;
    const command = scripts.start.replace(/^exec /, "");
    const args = execFileSync("/bin/sh", ["-c", `set -- ${command}; printf '%s\\0' "$@"`], { env })
      .toString()
      .split("\0")
      .slice(0, -1);
    expect(args.slice(0, 3)).toEqual(["node", "dist/cli/main.js", "serve"]);
    const cwd = mkdtempSync(path.join(tmpdir(), "s3blk-start-"));
    const server = await startServe(file, args.slice(3), { cwd });
    expect(server.stdout()).toMatch(/created file:\/\/.*\/\.s3blk\/volumes\/default \(10 GiB\)/);
    expect(server.stdout()).toMatch(/serving default: 10 GiB/);
    expect(server.stdout()).toMatch(
      /^connect with: qemu-img info nbd:\/\/127\.0\.0\.1:\d+\/default$/m,
    );
    expect(server.uris[0]).toMatch(/\/default$/);
    expect(await server.stop()).toBe(0);
  });

  it("puts its unix socket in place only once it accepts connections, and removes it at stop", async () => {
    const url = file.newUrl("ready");
    expect((await run(process.execPath, [CLI, "create", url, "--size", "8M"])).code).toBe(0);
    const dir = mkdtempSync(path.join(tmpdir(), "s3blk-ready-"));
    // What a VMM does: wait for the socket file, then connect at once. A socket bound in place
    // exists from bind(2), before listen(2); such a connect was refused 2 times in 60 under load.
    const outcomes: string[] = [];
    for (let round = 0; round < 10; round++) {
      const socket = path.join(dir, `vm${round}.sock`);
      const child = spawn(process.execPath, [CLI, "serve", url, "--socket", socket], {
        env: childEnv(),
        stdio: "ignore",
      });
      const exited = new Promise((resolve) => child.once("exit", resolve));
      while (!existsSync(socket)) {
        if (child.exitCode !== null) throw new Error(`serve exited with ${child.exitCode}`);
        await new Promise((r) => setImmediate(r));
      }
      outcomes.push(
        await new Promise<string>((resolve) => {
          const probe = net.connect(socket);
          probe.once("connect", () => {
            probe.destroy();
            resolve("connected");
          });
          probe.once("error", (error: NodeJS.ErrnoException) => resolve(error.code ?? "error"));
        }),
      );
      child.kill("SIGTERM");
      await exited;
      expect(readdirSync(dir)).toEqual([]); // neither the socket nor its staging name is left
    }
    expect(outcomes).toEqual(Array(10).fill("connected"));
  });

  it("fails in one line when it cannot serve", async () => {
    const oneLine = (r: { code: number; stderr: string }, pattern: RegExp) => {
      expect(r.code).not.toBe(0);
      const lines = r.stderr.trim().split("\n");
      expect(lines).toHaveLength(1);
      expect(lines[0]).toMatch(/^s3blk: /);
      expect(lines[0]).toMatch(pattern);
    };
    const serve = (...args: string[]) => run(process.execPath, [CLI, "serve", ...args]);
    oneLine(
      await serve(file.newUrl("missing"), "--listen", "127.0.0.1:0"),
      /no volume at .*--create-size/,
    );
    oneLine(
      await serve(file.newUrl("x"), "--listen", "nowhere"),
      /--listen "nowhere" is not HOST:PORT/,
    );
    const url = file.newUrl("twice");
    oneLine(await serve(`a=${url}`, `a=${url}`, "--create-size", "1M"), /both be served as "a"/);

    const busy = net.createServer();
    await new Promise<void>((resolve) => busy.listen(0, "127.0.0.1", resolve));
    const port = (busy.address() as net.AddressInfo).port;
    oneLine(
      await serve(file.newUrl("busy"), "--create-size", "1M", "--listen", `127.0.0.1:${port}`),
      new RegExp(`cannot listen on 127\\.0\\.0\\.1:${port}: address in use`),
    );
    busy.close();
  });
});
