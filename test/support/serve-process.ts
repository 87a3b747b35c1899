/**
 * `s3blk serve` as a child process, for black-box tests: started from the built CLI, ready once
 * its unix socket exists, stopped by PID.
 */

import { spawn, type ChildProcess } from "node:child_process";
import { existsSync } from "node:fs";
import path from "node:path";

export const CLI = path.resolve("dist/cli/main.js");

export interface ServeProcess {
  readonly child: ChildProcess;
  /** Resolves with the exit code (-1 if killed by a signal). */
  readonly exited: Promise<number>;
  /** SIGTERM, then the exit code: 0 means everything was flushed. */
  stop(): Promise<number>;
}

/** Start `s3blk serve <args...> --socket <socket>` and wait until it listens. */
export async function startServe(
  args: readonly string[],
  socket: string,
  env: NodeJS.ProcessEnv = {},
): Promise<ServeProcess> {
  const child = spawn(process.execPath, [CLI, "serve", ...args, "--socket", socket], {
    env: { ...process.env, ...env },
    stdio: ["ignore", "ignore", "pipe"],
  });
  let stderr = "";
  child.stderr?.on("data", (d: Buffer) => (stderr = (stderr + d.toString()).slice(-4000)));
  const exited = new Promise<number>((resolve) =>
    child.once("exit", (code) => resolve(code ?? -1)),
  );
  const deadline = Date.now() + 30_000;
  while (!existsSync(socket)) {
    if (child.exitCode !== null) throw new Error(`serve exited with ${child.exitCode}: ${stderr}`);
    if (Date.now() > deadline) {
      child.kill("SIGKILL");
      throw new Error(`serve did not listen on ${socket} within 30 s: ${stderr}`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  return {
    child,
    exited,
    stop() {
      if (child.exitCode === null) child.kill("SIGTERM");
      return exited;
    },
  };
}

/** Run another `s3blk` command to completion; its exit code. */
export function runCli(args: readonly string[], env: NodeJS.ProcessEnv = {}): Promise<number> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [CLI, ...args], {
      env: { ...process.env, ...env },
      stdio: "ignore",
    });
    child.once("exit", (code) => resolve(code ?? -1));
  });
}
