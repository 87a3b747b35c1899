/**
 * `s3blk serve` as a child process, for black-box tests: started from the built CLI, ready once
 * it prints "connect with:" (after every listener is bound *and* listening), stopped by signal.
 *
 * Readiness is the printed line, not the socket file: a unix socket's file appears at bind(2),
 * before listen(2), and a client that connects in between is refused.
 */

import { spawn, type ChildProcess } from "node:child_process";
import path from "node:path";
import { childEnv } from "./environment.js";

export const CLI = path.resolve("dist/cli/main.js");

export interface ServeOptions {
  /**
   * Added to this process's environment, of which no AWS variable is inherited (see
   * `childEnv`): pass what the server needs, e.g. `s3Env(target)`.
   */
  readonly env?: NodeJS.ProcessEnv;
  readonly cwd?: string;
  /** Options that go before `serve` (`--endpoint URL`). */
  readonly globalArgs?: readonly string[];
}

/** A running `s3blk serve`. */
export interface ServeProcess {
  readonly child: ChildProcess;
  /** The NBD URIs it printed, in order. */
  readonly uris: readonly string[];
  stdout(): string;
  stderr(): string;
  /** Resolves with the exit code, or the name of the signal that ended it. */
  readonly exited: Promise<number | string>;
  /** SIGTERM (or `signal`), then the exit: 0 after SIGTERM means everything was flushed. */
  stop(signal?: NodeJS.Signals): Promise<number | string>;
}

/** Start `s3blk [globalArgs] serve <args...>` and wait until it listens. */
export async function startServe(
  args: readonly string[],
  options: ServeOptions = {},
): Promise<ServeProcess> {
  const child = spawn(process.execPath, [CLI, ...(options.globalArgs ?? []), "serve", ...args], {
    env: childEnv(options.env),
    cwd: options.cwd,
    stdio: ["ignore", "pipe", "pipe"],
  });
  let stdout = "";
  let stderr = "";
  child.stdout!.on("data", (d: Buffer) => (stdout += d.toString()));
  child.stderr!.on("data", (d: Buffer) => (stderr = (stderr + d.toString()).slice(-16_000)));
  const exited = new Promise<number | string>((resolve) =>
    child.once("exit", (code, signal) => resolve(code ?? signal ?? -1)),
  );
  const deadline = Date.now() + 60_000;
  while (!/^connect with: /m.test(stdout)) {
    if (child.exitCode !== null || child.signalCode !== null) {
      throw new Error(`serve exited (${child.exitCode ?? child.signalCode}): ${stderr.trim()}`);
    }
    if (Date.now() > deadline) {
      child.kill("SIGKILL");
      throw new Error(`serve did not start within 60 s: ${stderr.trim()}`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  const uris = [...stdout.matchAll(/^ {2}(nbds?(?:\+unix)?:\/\/\S+)$/gm)].map((m) => m[1]!);
  return {
    child,
    uris,
    stdout: () => stdout,
    stderr: () => stderr,
    exited,
    stop(signal: NodeJS.Signals = "SIGTERM") {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      return exited;
    },
  };
}

/** Run another `s3blk` command to completion; its exit code. `env` as in `ServeOptions`. */
export function runCli(args: readonly string[], env: NodeJS.ProcessEnv = {}): Promise<number> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [CLI, ...args], {
      env: childEnv(env),
      stdio: "ignore",
    });
    child.once("exit", (code) => resolve(code ?? -1));
  });
}

/** How a command that may have been killed ended. */
export interface KilledRun {
  /** The signal's name ("SIGKILL") or the exit code ("0", "1"...). */
  readonly outcome: string;
  /** When it was started, in wall-clock ms since 1970, and how long it ran. */
  readonly startedAtMs: number;
  readonly ranMs: number;
  readonly stdout: string;
  readonly stderr: string;
}

/**
 * Run `s3blk args` and send it SIGKILL once `kill` resolves, if it is still running then: a
 * crash of that command at that moment. `env` as in `ServeOptions`.
 */
export function runCliKilledWhen(
  args: readonly string[],
  env: NodeJS.ProcessEnv,
  kill: Promise<unknown>,
): Promise<KilledRun> {
  return new Promise((resolve) => {
    const startedAtMs = Date.now();
    const startedMs = performance.now();
    const child = spawn(process.execPath, [CLI, ...args], {
      env: childEnv(env),
      stdio: ["ignore", "pipe", "pipe"],
    });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d: Buffer) => (stdout += d.toString()));
    child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    void kill.then(() => {
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
    });
    child.on("close", (code, signal) => {
      const ranMs = performance.now() - startedMs;
      resolve({ outcome: signal ?? String(code), startedAtMs, ranMs, stdout, stderr });
    });
  });
}

/** Run `s3blk args` and kill -9 it after `delayMs`, if it is still running then. */
export async function runCliKilledAfter(
  args: readonly string[],
  env: NodeJS.ProcessEnv,
  delayMs: number,
): Promise<KilledRun> {
  let timer: NodeJS.Timeout | undefined;
  const due = new Promise<void>((resolve) => (timer = setTimeout(resolve, delayMs)));
  try {
    return await runCliKilledWhen(args, env, due);
  } finally {
    clearTimeout(timer);
  }
}
