/**
 * `s3blk serve` restarts itself with its memory settings (a capped young generation, a fixed
 * glibc mmap threshold) where Node can, keeps the operator's own choice, and leaves every other
 * command alone; and the built CLI, started as a VMM would start it, serves from the restarted
 * process under the same PID.
 */

import { execFile } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { promisify } from "node:util";
import { afterEach, describe, expect, it } from "vitest";
import { buildProgram } from "../../src/cli/program.js";
import {
  commandOf,
  GLOBAL_VALUE_OPTIONS,
  SERVE_MMAP_THRESHOLD_BYTES,
  SERVE_SEMI_SPACE_MIB,
  serveRestart,
} from "../../src/cli/serve-memory.js";
import { startServe, type ServeProcess } from "../support/serve-process.js";

const run = promisify(execFile);
const FLAG = `--max-semi-space-size=${SERVE_SEMI_SPACE_MIB}`;
const start = (args: string[], execArgv: string[] = [], env: NodeJS.ProcessEnv = {}) => ({
  execArgv,
  argv: ["/usr/bin/node", "/opt/s3blk/dist/cli/main.js", ...args],
  env,
});

describe("serveRestart", () => {
  it("restarts serve with the flag first and the threshold set, keeping everything else", () => {
    const restart = serveRestart(
      start(["serve", "file:///v", "--socket", "/s"], ["--enable-source-maps"], { HOME: "/h" }),
    );
    expect(restart).toEqual({
      args: [FLAG, "--enable-source-maps", "/opt/s3blk/dist/cli/main.js", "serve"].concat([
        "file:///v",
        "--socket",
        "/s",
      ]),
      env: { HOME: "/h", MALLOC_MMAP_THRESHOLD_: String(SERVE_MMAP_THRESHOLD_BYTES) },
    });
  });

  it("finds serve after the global options, in either spelling", () => {
    for (const args of [
      ["--endpoint", "http://127.0.0.1:7480", "serve", "s3://b/v"],
      ["--endpoint=http://127.0.0.1:7480", "--request-timeout", "5s", "serve", "s3://b/v"],
    ]) {
      expect(serveRestart(start(args))?.args.slice(-args.length)).toEqual(args);
    }
  });

  it("leaves other commands, and serve with the operator's own settings, as they are", () => {
    expect(serveRestart(start(["ls", "s3://b/"]))).toBeUndefined();
    expect(serveRestart(start(["--endpoint", "serve", "ls"]))).toBeUndefined(); // a URL "serve"
    expect(serveRestart(start([]))).toBeUndefined();
    expect(serveRestart(start(["serve", "v"], ["--max-semi-space-size=4"]))).toBeUndefined();
    expect(serveRestart(start(["serve", "v"], ["--max-semi-space-size", "4"]))).toBeUndefined();
    const options = { NODE_OPTIONS: "--trace-gc --max-semi-space-size=4" };
    expect(serveRestart(start(["serve", "v"], [], options))).toBeUndefined();
    const threshold = { MALLOC_MMAP_THRESHOLD_: "65536" };
    expect(serveRestart(start(["serve", "v"], [], threshold))).toBeUndefined();
    const tunable = {
      GLIBC_TUNABLES: "glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=65536",
    };
    expect(serveRestart(start(["serve", "v"], [], tunable))).toBeUndefined();
    const otherTunable = { GLIBC_TUNABLES: "glibc.malloc.arena_max=2" };
    expect(serveRestart(start(["serve", "v"], [], otherTunable))).toBeDefined();
    expect(serveRestart(start(["serve", "v"], [], { NODE_OPTIONS: "--trace-gc" }))).toBeDefined();
  });

  it("knows the operator's flag in each spelling Node takes, and steps aside for a debugger", () => {
    for (const options of [
      "--max_semi_space_size=4",
      '"--max-semi-space-size=4"',
      "--trace-gc   '--max-semi-space-size=4'",
    ]) {
      expect(serveRestart(start(["serve", "v"], [], { NODE_OPTIONS: options }))).toBeUndefined();
    }
    expect(serveRestart(start(["serve", "v"], ["--inspect-brk=9229"]))).toBeUndefined();
    expect(serveRestart(start(["serve", "v"], [], { NODE_OPTIONS: "--inspect" }))).toBeUndefined();
  });

  it("knows every global option of the CLI that takes a value", () => {
    const valued = buildProgram()
      .options.filter((option) => option.required || option.optional)
      .flatMap((option) => [option.long, option.short].filter((name) => name !== undefined));
    expect(new Set(valued)).toEqual(GLOBAL_VALUE_OPTIONS);
    expect(commandOf(["--request-timeout", "5s", "serve"])).toBe("serve");
  });
});

describe("the built CLI", () => {
  let server: ServeProcess | undefined;
  let work: string | undefined;
  afterEach(async () => {
    await server?.stop();
    server = undefined;
    if (work !== undefined) rmSync(work, { recursive: true, force: true });
  });

  /** What /proc says of the serving process: its command line and its environment. */
  const procOf = (pid: number) => ({
    cmdline: readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0"),
    environ: readFileSync(`/proc/${pid}/environ`, "utf8").split("\0"),
  });
  // Node 22.15 and 23.11 on have process.execve; on Node 20 serve runs with Node's defaults.
  // CI runs this file on both, so each branch is asserted there.
  const canRestart = typeof (process as { execve?: unknown }).execve === "function";
  /** No setting of the caller's own may turn the restart off. */
  const unset = { NODE_OPTIONS: undefined, MALLOC_MMAP_THRESHOLD_: undefined };

  it("serves from the restarted process, under the PID it was started as", async () => {
    work = mkdtempSync(path.join(tmpdir(), "s3blk-serve-memory-"));
    const socket = path.join(work, "nbd.sock");
    server = await startServe([`file://${work}/v`, "--create-size", "8M", "--socket", socket], {
      env: unset,
    });
    const { cmdline, environ } = procOf(server.child.pid!);
    expect(cmdline.includes(FLAG)).toBe(canRestart);
    expect(environ.includes(`MALLOC_MMAP_THRESHOLD_=${SERVE_MMAP_THRESHOLD_BYTES}`)).toBe(
      canRestart,
    );
    // It serves: a client nobody here wrote reads the export's size.
    const { stdout } = await run("nbdinfo", ["--size", server.uris[0]!]);
    expect(stdout.trim()).toBe(String(8 * 1024 * 1024));
    // One process served, from its start to its stop: it said so once, and stopped cleanly.
    expect(await server.stop()).toBe(0);
    expect(server.stdout().match(/^connect with: /gm)).toHaveLength(1);
  });

  it("keeps the operator's young-generation limit, and then restarts nothing", async () => {
    work = mkdtempSync(path.join(tmpdir(), "s3blk-serve-memory-"));
    const socket = path.join(work, "nbd.sock");
    server = await startServe([`file://${work}/v`, "--create-size", "8M", "--socket", socket], {
      env: { ...unset, NODE_OPTIONS: "--max-semi-space-size=4" },
    });
    const { cmdline, environ } = procOf(server.child.pid!);
    expect(cmdline.some((arg) => arg.startsWith("--max-semi-space-size"))).toBe(false);
    expect(environ.some((entry) => entry.startsWith("MALLOC_MMAP_THRESHOLD_="))).toBe(false);
    expect(environ).toContain("NODE_OPTIONS=--max-semi-space-size=4");
  });
});
