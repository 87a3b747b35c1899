/**
 * `s3blk serve` runs with two memory settings that only take effect when the process starts, so
 * main.ts asks this module first, before the CLI's modules load, and the process replaces itself
 * with them set (`process.execve`: the same PID, stdio and environment; Node 22.15 and 23.11 on).
 *
 * - A young generation smaller than Node's default (`--max-semi-space-size=16`). Under the
 *   server's allocation rate V8 on Node 24 grows its new space to 128 MiB (two semi-spaces of
 *   64 MiB), of which 1 to 14 MiB is live, and those pages stay resident.
 * - A fixed glibc mmap threshold (`MALLOC_MMAP_THRESHOLD_=131072`). Chunk and request buffers
 *   are 1 MiB; once one is freed, glibc's dynamic threshold rises above that size, later ones
 *   come from the heap, and freeing them no longer gives the memory back. With the threshold
 *   fixed, each is its own mapping and RSS falls when the load does.
 *
 * Measured by the bench's memory section (defaults, a 768 MiB volume on RGW), one run of three
 * rounds per build: peak RSS 637–646 MiB before (neither setting, the NBD pool keeping 64 MiB),
 * 551–573 MiB after. Single rounds of the settings apart: 594 with the young generation capped,
 * 576 with the mmap threshold too.
 *
 * Not done where the operator chose either one (the flag in the node options or NODE_OPTIONS,
 * or the threshold in MALLOC_MMAP_THRESHOLD_ or GLIBC_TUNABLES: theirs wins, and the other is
 * left as it is), under a debugger
 * (`--inspect*`: it would attach twice), or where Node cannot replace the process (Node 20,
 * Windows, the permission model: Node's defaults then). Node aborts the process if execve(2)
 * itself fails (a seccomp policy that forbids it): there, setting either one yourself is how to
 * serve without the restart.
 */

/** The semi-space limit serve runs with, MiB (V8's new space is two semi-spaces). */
export const SERVE_SEMI_SPACE_MIB = 16;
/** The glibc mmap threshold serve runs with, bytes. */
export const SERVE_MMAP_THRESHOLD_BYTES = 128 * 1024;

const SEMI_SPACE_FLAG = "--max-semi-space-size";
const MMAP_THRESHOLD_VARIABLE = "MALLOC_MMAP_THRESHOLD_";
/** The same setting in glibc's newer spelling, `GLIBC_TUNABLES=glibc.malloc.mmap_threshold=N`. */
const MMAP_THRESHOLD_TUNABLE = "glibc.malloc.mmap_threshold=";

/** The CLI's global options, which come before the command and take a value (program.ts). */
export const GLOBAL_VALUE_OPTIONS: ReadonlySet<string> = new Set([
  "--endpoint",
  "--request-timeout",
]);

/** The command in the CLI's arguments: the first word that is neither an option nor a value. */
export function commandOf(args: readonly string[]): string | undefined {
  for (let i = 0; i < args.length; i++) {
    const arg = args[i]!;
    if (!arg.startsWith("-")) return arg;
    if (GLOBAL_VALUE_OPTIONS.has(arg)) i++; // `--endpoint URL`; `--endpoint=URL` is one word
  }
  return undefined;
}

/** A node option's name as Node matches it: quotes gone, `_` spelt `-`, no value. */
function optionName(option: string): string {
  const name = option.replace(/^["']|["']$/g, "").split("=")[0]!;
  return name.startsWith("--") ? `--${name.slice(2).replaceAll("_", "-")}` : name;
}

export interface ProcessStart {
  readonly execArgv: readonly string[];
  /** As process.argv has it: the node binary, the script, then the CLI's arguments. */
  readonly argv: readonly string[];
  readonly env: NodeJS.ProcessEnv;
}

/**
 * What `serve` should restart with (argv for execve, without the node binary's path, and the
 * environment), or undefined when it should run as it is: not `serve`, the operator chose, or a
 * debugger is asked for.
 */
export function serveRestart(
  start: ProcessStart,
): { args: string[]; env: NodeJS.ProcessEnv } | undefined {
  if (commandOf(start.argv.slice(2)) !== "serve") return undefined;
  const nodeOptions = [...start.execArgv, ...(start.env.NODE_OPTIONS ?? "").split(/\s+/)].map(
    optionName,
  );
  const operatorChose =
    nodeOptions.includes(SEMI_SPACE_FLAG) ||
    start.env[MMAP_THRESHOLD_VARIABLE] !== undefined ||
    (start.env.GLIBC_TUNABLES ?? "").includes(MMAP_THRESHOLD_TUNABLE);
  const debugging = nodeOptions.some((name) => name.startsWith("--inspect"));
  if (operatorChose || debugging) return undefined;
  return {
    args: [`${SEMI_SPACE_FLAG}=${SERVE_SEMI_SPACE_MIB}`, ...start.execArgv, ...start.argv.slice(1)],
    env: { ...start.env, [MMAP_THRESHOLD_VARIABLE]: String(SERVE_MMAP_THRESHOLD_BYTES) },
  };
}

/** For `serve`, restart this process with its memory settings, if Node can; else return. */
export function restartServeWithMemorySettings(): void {
  // Typed here: the @types/node this builds with (for Node 20) does not know them.
  const { execve, permission } = process as {
    execve?: (file: string, args: readonly string[], env: NodeJS.ProcessEnv) => never;
    permission?: unknown;
  };
  // Where execve would refuse, not even asked: Node would print its experimental warning first.
  if (execve === undefined || process.platform === "win32" || permission !== undefined) return;
  const restart = serveRestart(process);
  if (restart === undefined) return;
  try {
    execve.call(process, process.execPath, [process.execPath, ...restart.args], restart.env);
  } catch {
    // Refused before execve(2) was tried (a reason Node checks that we did not): run as it is.
  }
}
