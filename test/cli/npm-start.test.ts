/**
 * `npm start`, stopped as people and supervisors stop it. Ctrl-C in a terminal sends SIGINT to
 * the whole foreground process group, npm and node alike, and npm forwards its copy to node as
 * well; a supervisor stopping `npm start` may SIGTERM the group the same way. Either is one
 * request to stop: what was acknowledged must be flushed, and the exit code 0. A second signal
 * well after the first, while the flush is stuck, exits 130 and says how many chunks it dropped.
 *
 * Each test runs `npm start` in a process group of its own, on a volume (`S3BLK_VOLUME`) and a
 * port (`npm start -- --listen`) of its own, so a developer's own server and default volume are
 * never touched. Writes go through a real NBD client (nbdsh) and are never flushed by it; the
 * write-back delay is set far beyond the test, so only the stop can put the data in the store.
 */

import { execFile, spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, readFileSync } from "node:fs";
import { createServer, type AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import { promisify } from "node:util";
import { afterEach, describe, expect, it } from "vitest";
import { STOP_SIGNAL_WINDOW_MS } from "../../src/cli/stop-signals.js";
import { childEnv } from "../support/environment.js";
import { FaultProxy } from "../support/fault-proxy.js";
import { requireS3, s3Env, type S3Target } from "../support/s3-target.js";
import { CLI, runCli } from "../support/serve-process.js";

const run = promisify(execFile);
const work = mkdtempSync(path.join(tmpdir(), "s3blk-npm-start-"));
const MiB = 1024 * 1024;
/** Longer than any test: nothing is written back before the stop asks for it. */
const NO_WRITEBACK = ["--writeback-delay", "600000"];

/** `childEnv(set)` with this Node first on PATH, so that `npm` and its script run on it. */
function npmEnv(set: NodeJS.ProcessEnv): NodeJS.ProcessEnv {
  const bin = path.dirname(process.execPath);
  return childEnv({ PATH: `${bin}${path.delimiter}${process.env.PATH ?? ""}`, ...set });
}

/** A TCP port nobody listens on just now. */
async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as AddressInfo;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

async function waitFor(what: string, done: () => boolean, timeoutMs = 60_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!done()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

interface NpmStart {
  readonly child: ChildProcess;
  readonly uri: string;
  stderr(): string;
  /** The exit code of npm, or the signal that ended it. */
  readonly exited: Promise<number | string>;
  /** Send `signal` to npm's whole process group, as a terminal's Ctrl-C does. */
  signalGroup(signal: NodeJS.Signals): void;
}

const started: NpmStart[] = [];

afterEach(async () => {
  for (const npm of started.splice(0)) {
    if (npm.child.exitCode === null && npm.child.signalCode === null) {
      npm.signalGroup("SIGKILL");
      await npm.exited;
    }
  }
});

/** `npm start -- <args>` on `volume`, in a process group of its own, once it listens. */
async function npmStart(
  volume: string,
  args: readonly string[],
  env: NodeJS.ProcessEnv = {},
): Promise<NpmStart> {
  const child = spawn("npm", ["start", "--", ...args], {
    cwd: path.resolve("."),
    env: npmEnv({ ...env, S3BLK_VOLUME: volume }),
    stdio: ["ignore", "pipe", "pipe"],
    detached: true,
  });
  let stdout = "";
  let stderr = "";
  child.stdout!.on("data", (d: Buffer) => (stdout += d.toString()));
  child.stderr!.on("data", (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<number | string>((resolve) =>
    child.once("exit", (code, signal) => resolve(code ?? signal ?? -1)),
  );
  const npm: NpmStart = {
    child,
    get uri() {
      return /^connect with: qemu-img info (\S+)$/m.exec(stdout)?.[1] ?? "";
    },
    stderr: () => stderr,
    exited,
    signalGroup: (signal) => process.kill(-child.pid!, signal),
  };
  started.push(npm);
  await waitFor("npm start to listen", () => {
    if (child.exitCode !== null) throw new Error(`npm start exited: ${stdout}${stderr}`);
    return npm.uri !== "";
  });
  return npm;
}

/** Run Python `code` in nbdsh against `uri`, with the handle `h` connected. */
async function nbdsh(uri: string, code: string): Promise<string> {
  const { stdout } = await run("/usr/bin/python3", ["-m", "nbd", "-u", uri, "-c", code]);
  return stdout;
}

async function storedChunks(volume: string, env: NodeJS.ProcessEnv = {}): Promise<number> {
  const { stdout } = await run(process.execPath, [CLI, "info", "--json", volume], {
    env: childEnv(env),
  });
  return (JSON.parse(stdout) as { storedChunks: number }).storedChunks;
}

describe("npm start on a local volume", () => {
  it.each(["SIGINT", "SIGTERM"] as const)(
    "flushes acknowledged writes and exits 0 on %s to its process group",
    async (signal) => {
      const volume = path.join(work, `vol-${signal}`);
      expect(await runCli(["create", volume, "--size", "64M"])).toBe(0);
      const npm = await npmStart(volume, [
        "--listen",
        `127.0.0.1:${await freePort()}`,
        ...NO_WRITEBACK,
      ]);
      // 4 MiB in one write, acknowledged from the cache and not flushed.
      await nbdsh(npm.uri, String.raw`h.pwrite(b"\x5a" * (4 << 20), 1 << 20)`);
      expect(await storedChunks(volume)).toBe(0);

      npm.signalGroup(signal);
      expect(await npm.exited).toBe(0);
      expect(npm.stderr()).toMatch(
        new RegExp(`"msg":"${signal}: finishing requests in flight, then flushing`),
      );
      expect(npm.stderr()).toMatch(
        /"export":"vol-\w+","msg":"vol-\w+: flushing 4 chunks of unflushed writes/,
      );
      expect(npm.stderr()).toMatch(/"msg":"flushed and stopped"/);
      expect(npm.stderr()).not.toMatch(/exiting without flushing/);

      expect(await storedChunks(volume)).toBe(4);
      const image = path.join(work, `image-${signal}.raw`);
      expect(await runCli(["export", volume, image])).toBe(0);
      const expected = Buffer.alloc(64 * MiB);
      expected.fill(0x5a, MiB, 5 * MiB);
      expect(readFileSync(image).equals(expected)).toBe(true);
    },
    120_000,
  );
});

const s3: S3Target | undefined = await requireS3("npm start against S3");

describe.skipIf(s3 === undefined)("npm start on S3 whose uploads stall", () => {
  it("exits 130 on a second SIGINT during the flush, naming the chunks it drops", async () => {
    const target = s3!;
    const proxy = await FaultProxy.start(target.endpoint);
    try {
      const volume = target.newVolumeUrl("npm-start");
      const name = volume.slice(volume.lastIndexOf("/") + 1);
      expect(await runCli(["create", volume, "--size", "64M"], s3Env(target))).toBe(0);
      const npm = await npmStart(
        volume,
        ["--listen", `127.0.0.1:${await freePort()}`, ...NO_WRITEBACK],
        s3Env(target, proxy.endpoint),
      );
      await nbdsh(npm.uri, String.raw`h.pwrite(b"\xa5" * (3 << 20), 0)`);
      // Every chunk upload now hangs past the request timeout (15 s), and so does each retry.
      proxy.inject({ kind: "stall", methods: ["PUT"], pathIncludes: "/chunks/", stallMs: 120_000 });

      npm.signalGroup("SIGINT");
      await waitFor("the flush's uploads to stall", () => proxy.counts.injected.stall >= 3);
      expect(npm.stderr()).toMatch(
        new RegExp(`"export":"${name}","msg":"${name}: flushing 3 chunks of unflushed writes`),
      );
      // Well past the window: this is a second Ctrl-C, not a copy of the first.
      await new Promise((r) => setTimeout(r, 2.5 * STOP_SIGNAL_WINDOW_MS));
      expect(npm.child.exitCode).toBe(null); // still flushing
      npm.signalGroup("SIGINT");

      expect(await npm.exited).toBe(130);
      expect(npm.stderr()).toMatch(
        new RegExp(
          `"level":50,.*"msg":"second SIGINT: exiting without flushing; ` +
            `dropped 3 chunks of unflushed writes on ${name}`,
        ),
      );
      expect(npm.stderr()).not.toMatch(/flushed and stopped/);
      expect(await storedChunks(volume, s3Env(target))).toBe(0);
    } finally {
      await proxy.stop();
    }
  }, 120_000);
});
