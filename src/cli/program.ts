/**
 * The `s3blk` command line (main.ts is its executable). Each command is a small function over
 * the library; this module only parses arguments and turns failures into one clear line and a
 * non-zero exit code. A stack trace is printed only for a bug (an error we did not expect).
 */

import { Command, CommanderError, InvalidArgumentError, Option } from "commander";
import { createInterface } from "node:readline/promises";
import { ppWriteError } from "../block/block-device.js";
import { StoreError } from "../store/object-store.js";
import {
  openStoreStack,
  StoreUrlError,
  type StoreStack,
  type StoreStackOptions,
} from "../store/store-stack.js";
import { FORMAT_VERSION, FormatError, type Superblock } from "../volume/format.js";
import { SnapshotError, splitSnapshotUrl } from "../volume/snapshots.js";
import { listSnapshots } from "../lifecycle/snapshot-lifecycle.js";
import { register as registerSnapshotCommands } from "./snapshot-commands.js";
import { graceOption, register as registerCloneCommands } from "./clone-commands.js";
import { CloneError } from "../volume/clones.js";
import { LeaseHeldError, LeaseTimingError } from "../volume/lease.js";
import {
  createVolume,
  deleteVolume,
  describeVolume,
  openVolume,
  upgradeVolume,
  readSuperblock,
  VolumeError,
} from "../lifecycle/volume-lifecycle.js";
import {
  DEFAULT_CACHE_BYTES,
  DEFAULT_MAX_DIRTY_BYTES,
  DEFAULT_MAX_DIRTY_CHUNKS,
  DEFAULT_WRITEBACK_DELAY_MS,
} from "../cache/page-cache.js";
import { formatSize, parseSize } from "./sizes.js";
import { parseDuration } from "./durations.js";
import { progressBar } from "./progress.js";
import {
  exportVolume,
  importFile,
  TransferError,
  type TransferResult,
} from "../transfer/import-export.js";
import type { ChunkedBlockDevice } from "../device/chunked-block-device.js";
import { stat } from "node:fs/promises";
import {
  DEFAULT_LISTEN,
  DEFAULT_LOCAL_VOLUME,
  openUpgradingDefault,
  serve,
  ServeError,
} from "./serve.js";
import { listenForStop } from "./stop-signals.js";
import { printNodeVersionNotice } from "./node-version.js";
import { createLogger, DEFAULT_LOG_LEVEL, LOG_LEVELS } from "../util/logger.js";

/** On Node 20, one note of ours says why 22+ is recommended, instead of the SDK's on each start. */
process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= "true";
printNodeVersionNotice();

/** A mistake of the user's: printed as one line, exit code 1. */
export class UserError extends Error {
  override readonly name = "UserError";
}

export { DEFAULT_LOCAL_VOLUME } from "./serve.js";

interface GlobalOptions {
  endpoint?: string;
  requestTimeout?: number;
}

function sizeOption(value: string): number {
  const bytes = parseSize(value);
  if (bytes instanceof Error) throw new InvalidArgumentError(bytes.message);
  return bytes;
}

function durationOption(value: string): number {
  const ms = parseDuration(value);
  if (ms instanceof Error) throw new InvalidArgumentError(ms.message);
  if (ms < 1) throw new InvalidArgumentError(`"${value}" is not a duration of at least 1 ms`);
  return ms;
}

function countOption(value: string): number {
  const n = Number(value);
  if (!Number.isSafeInteger(n) || n < 1) {
    throw new InvalidArgumentError(`"${value}" is not a whole number of at least 1`);
  }
  return n;
}

function stackFor(url: string, program: Command) {
  const { endpoint, requestTimeout } = program.opts<GlobalOptions>();
  const options: StoreStackOptions = { endpoint, requestTimeoutMs: requestTimeout };
  return openStoreStack(url, options);
}

/** Run `use` with the store stack of `url`, and close the store after, whatever happens. */
async function withStack<T>(
  url: string,
  program: Command,
  use: (stack: StoreStack) => Promise<T>,
): Promise<T> {
  const stack = stackFor(url, program);
  try {
    return await use(stack);
  } finally {
    await stack.store.close();
  }
}

/** A clone's parent, `<url>@<snapshot>`: its prefix in the clone's own key space. */
function parentUrl(stack: StoreStack, superblock: Superblock): string | undefined {
  const origin = superblock.origin;
  if (origin === undefined) return undefined;
  const space = stack.url.endsWith(stack.prefix)
    ? stack.url.slice(0, stack.url.length - stack.prefix.length)
    : "";
  return `${space}${origin.prefix}@${origin.snapshot}`;
}

export function buildProgram(out: (line: string) => void = console.log): Command {
  /** Run an import or export with a progress bar, disconnect the device, and say what moved. */
  async function transfer(
    device: ChunkedBlockDevice,
    label: string,
    run: (onProgress: (doneBytes: number, totalBytes: number) => void) => Promise<TransferResult>,
    what: string,
  ): Promise<void> {
    const bar = progressBar(label);
    try {
      const result = await run(bar.update);
      bar.done();
      out(`${what}: ${formatSize(result.totalBytes)}, ${formatSize(result.dataBytes)} of data`);
    } finally {
      await device.disconnect();
    }
  }

  const program = new Command("s3blk")
    .description("A virtual block device whose sectors live in S3-compatible object storage.")
    .option(
      "--endpoint <url>",
      "S3 endpoint (default: $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, or AWS)",
    )
    .option(
      "--request-timeout <duration>",
      "one S3 request attempt fails (and is retried) if not answered within this (default 15s)",
      durationOption,
    )
    .exitOverride()
    .showHelpAfterError("(run with --help for usage)")
    .configureOutput({
      outputError: (text, write) => write(`s3blk: ${text.replace(/^error: /, "")}`),
    });

  program
    .command("create")
    .description("Create a volume: s3://bucket/prefix, file:///path, or a local directory path")
    .argument("<url>", "where the volume lives")
    .requiredOption("--size <size>", "size, with K/M/G/T suffixes (binary)", sizeOption)
    .addOption(
      new Option("--chunk-size <size>", "bytes per chunk object, a power of two from 64K to 64M")
        .argParser(sizeOption)
        .default(1024 * 1024, "1M"),
    )
    .addOption(
      new Option("--sector-size <bytes>", "512 or 4096").argParser(sizeOption).default(512),
    )
    .action(
      async (url: string, options: { size: number; chunkSize: number; sectorSize: number }) => {
        await withStack(url, program, async (stack) => {
          const superblock = await createVolume(stack, {
            sizeBytes: options.size,
            chunkSizeBytes: options.chunkSize,
            sectorSizeBytes: options.sectorSize,
          });
          out(
            `created ${stack.url}: ${formatSize(superblock.sizeBytes)}, ` +
              `${superblock.sectorSizeBytes}-byte sectors, ${formatSize(superblock.chunkSizeBytes)} chunks, ` +
              `volume id ${superblock.volumeId}`,
          );
        });
      },
    );

  program
    .command("info")
    .description("Show a volume's (or a snapshot's) parameters, what it stores, its snapshots")
    .argument("<url>", "the volume, or <url>@<snapshot>")
    .option("--json", "print JSON")
    .action(async (url: string, options: { json?: boolean }) => {
      const { url: volumeUrl, snapshot } = splitSnapshotUrl(url);
      await withStack(volumeUrl, program, async (stack) => {
        const described = await describeVolume(stack);
        const { superblock, storedChunks, ownedChunks, sharedChunks, storedBytes } = described;
        const snapshots = superblock.formatVersion < 2 ? [] : await listSnapshots(stack);
        const shown = snapshots.find((s) => s.name === snapshot);
        if (snapshot !== undefined && shown === undefined) {
          throw new SnapshotError(`no snapshot named "${snapshot}" of ${stack.url}`);
        }
        if (options.json) {
          const owned = ownedChunks * superblock.chunkSizeBytes;
          const shared = sharedChunks * superblock.chunkSizeBytes;
          const json = { url: stack.url, ...superblock, storedChunks, storedBytes };
          const counts = { ownedChunks, sharedChunks, ownedBytes: owned, sharedBytes: shared };
          const parent = parentUrl(stack, superblock);
          out(JSON.stringify({ ...json, parent, ...counts, snapshots, snapshot: shown }, null, 2));
          return;
        }
        const chunks = Math.ceil(superblock.sizeBytes / superblock.chunkSizeBytes);
        out(`volume        ${stack.url}`);
        if (shown !== undefined) {
          out(
            `snapshot      ${shown.name}: ${shown.chunks} of ${chunks} chunks, taken ${shown.createdAt}`,
          );
        }
        out(`id            ${superblock.volumeId}`);
        out(`format        ${superblock.format} v${superblock.formatVersion}`);
        out(`size          ${formatSize(superblock.sizeBytes)} (${superblock.sizeBytes} bytes)`);
        out(`sector size   ${superblock.sectorSizeBytes} bytes`);
        out(`chunk size    ${formatSize(superblock.chunkSizeBytes)}`);
        out(`stored        ${storedChunks} of ${chunks} chunks, ${formatSize(storedBytes)}`);
        if (superblock.origin !== undefined) {
          const chunkBytes = superblock.chunkSizeBytes;
          out(`parent        ${parentUrl(stack, superblock)}`);
          out(
            `owned         ${ownedChunks} chunks (${formatSize(ownedChunks * chunkBytes)}); ` +
              `shared with the parent: ${sharedChunks} chunks (${formatSize(sharedChunks * chunkBytes)})`,
          );
        }
        out(`snapshots     ${snapshots.map((s) => s.name).join(", ") || "none"}`);
        out(`created       ${superblock.createdAt}`);
      });
    });

  registerSnapshotCommands(program, (url, use) => withStack(url, program, use), out);
  registerCloneCommands(program, (url, use) => withStack(url, program, use), out);

  program
    .command("upgrade")
    .description("Convert a volume of an older format to the current one, in place")
    .argument("<url>", "the volume")
    .option("--force", "take the volume over from another process (waits out its lease)")
    .action(async (url: string, options: { force?: boolean }) => {
      await withStack(url, program, async (stack) => {
        const outcome = await upgradeVolume(stack, { lease: { force: options.force ?? false } });
        out(
          outcome.upgraded
            ? `upgraded ${stack.url} from format version ${outcome.fromVersion} to ${FORMAT_VERSION} ` +
                `in place (${outcome.chunks === undefined ? "every object" : `${outcome.chunks} chunks`} kept as they are)`
            : `${stack.url} is already format version ${outcome.version}; nothing to do`,
        );
      });
    });

  program
    .command("delete")
    .description("Delete a volume and every chunk it stores")
    .argument("<url>", "the volume")
    .option("-y, --yes", "do not ask for confirmation")
    .action(async (url: string, options: { yes?: boolean }) => {
      await withStack(url, program, async (stack) => {
        if (!options.yes) {
          if (!process.stdin.isTTY) {
            throw new UserError(`refusing to delete ${stack.url} without --yes`);
          }
          const rl = createInterface({ input: process.stdin, output: process.stdout });
          const answer = await rl.question(`delete ${stack.url} and all its data? [y/N] `);
          rl.close();
          if (!/^y(es)?$/i.test(answer.trim())) throw new UserError("not deleted");
        }
        const objects = await deleteVolume(stack);
        out(`deleted ${stack.url} (${objects} object${objects === 1 ? "" : "s"})`);
      });
    });

  program
    .command("import")
    .description("Copy a raw image file into a volume (created to fit if it does not exist)")
    .argument("<file>", "the image file")
    .argument("<url>", "the volume")
    .addOption(
      new Option("--chunk-size <size>", "chunk size, if the volume is created")
        .argParser(sizeOption)
        .default(1024 * 1024, "1M"),
    )
    .option("--force", "take the volume over from another process (waits out its lease)")
    .action(async (file: string, url: string, options: { chunkSize: number; force?: boolean }) => {
      await withStack(url, program, async (stack) => {
        let created = false;
        try {
          await readSuperblock(stack);
        } catch (error) {
          if (!(error instanceof VolumeError)) throw error;
          const fileBytes = await fileSize(file);
          await createVolume(stack, {
            sizeBytes: Math.max(512, Math.ceil(fileBytes / 512) * 512),
            chunkSizeBytes: options.chunkSize,
          });
          created = true;
          out(`created ${stack.url} (${formatSize(fileBytes)})`);
        }
        const device = await openVolume(stack, {
          lease: { force: options.force ?? false },
        });
        await transfer(
          device,
          "import",
          (onProgress) => importFile(file, device, created, { onProgress }),
          `imported ${file} into ${stack.url}`,
        );
      });
    });

  program
    .command("export")
    .description("Copy a volume into a raw image file, leaving holes where the volume has none")
    .argument("<url>", "the volume")
    .argument("<file>", "the image file, created or truncated")
    .action(async (url: string, file: string) => {
      const { url: volumeUrl, snapshot } = splitSnapshotUrl(url);
      await withStack(volumeUrl, program, async (stack) => {
        const device = await openVolume(stack, {
          readOnly: true,
          ...(snapshot === undefined ? {} : { snapshot }),
        });
        await transfer(
          device,
          "export",
          (onProgress) => exportVolume(device, file, { onProgress }),
          `exported ${stack.url}${snapshot === undefined ? "" : `@${snapshot}`} to ${file}`,
        );
      });
    });

  program
    .command("demo")
    .description("Create a local volume if needed, write and read it back, and show it")
    .argument("[url]", "the volume", DEFAULT_LOCAL_VOLUME)
    .option("--force", "take the volume over from another process (waits out its lease)")
    .action(async (url: string, options: { force?: boolean }) => {
      await withStack(url, program, async (stack) => {
        await createVolume(stack, { sizeBytes: 1024 ** 3 }).then(
          () => out(`created ${stack.url} (1 GiB)`),
          (error: unknown) => {
            if (!(error instanceof VolumeError)) throw error;
          },
        );
        const device = await openUpgradingDefault(
          stack,
          { lease: { force: options.force ?? false } },
          { out },
        );
        const message = Buffer.alloc(4096);
        message.write(`hello from s3blk at ${new Date().toISOString()}\n`);
        const written = await device.write(2048, [message], { fua: true });
        if (!written.ok) throw new UserError(ppWriteError(written.error));
        const back = Buffer.alloc(4096);
        const read = await device.read(2048, [back]);
        if (!read.ok) throw new UserError(ppWriteError(read.error));
        const closed = await device.disconnect();
        if (!closed.ok) throw new UserError(ppWriteError(closed.error));
        out(`wrote and read back sector 2048: ${back.toString("utf8").replace(/\0+$/, "").trim()}`);
        // The device closed the stack's store with itself: describe through a new one.
        const stored = await withStack(url, program, (again) => describeVolume(again));
        out(`stored chunks: ${stored.storedChunks}`);
        out(`next: s3blk info ${url}`);
      });
    });

  program
    .command("serve")
    .description(
      "Serve volumes over NBD, each as the export named after its URL's last segment (or name=URL)",
    )
    .argument("<volume-url...>", "the volumes; the first is also the default export")
    .option("--listen <host:port>", `TCP address (default ${DEFAULT_LISTEN} unless --socket)`)
    .option("--socket <path>", "also, or only, listen on this unix socket")
    .option(
      "--cache-size <size>",
      `memory of cached data per volume, clean and dirty (default ${formatSize(DEFAULT_CACHE_BYTES)})`,
      sizeOption,
    )
    .option(
      "--dirty-size <size>",
      "memory of dirty data per volume before writers wait, at most half of --cache-size" +
        ` (default ${formatSize(DEFAULT_MAX_DIRTY_BYTES)})`,
      sizeOption,
    )
    .option(
      "--dirty-chunks <n>",
      "dirty chunks per volume before writers wait: bounds a flush's uploads" +
        ` (default ${DEFAULT_MAX_DIRTY_CHUNKS})`,
      countOption,
    )
    .option("--read-only", "refuse writes")
    .option("--create-size <size>", "create missing volumes with this size", sizeOption)
    .addOption(
      new Option(
        "--writeback-delay <ms>",
        `upload a dirty chunk after this long (default ${DEFAULT_WRITEBACK_DELAY_MS})`,
      )
        .argParser((v) => {
          const ms = Number(v);
          if (!Number.isSafeInteger(ms) || ms < 0)
            throw new InvalidArgumentError(`"${v}" is not a number of milliseconds`);
          return ms;
        })
        .hideHelp(),
    )
    .option("--force", "take over a volume another process holds (waits out its lease)")
    .option(
      "--gc-grace <duration>",
      "keep the objects writes made garbage this long, for readers that opened before (default 15m)",
      graceOption,
    )
    .option(
      "--lease-duration <duration>",
      "how long the process lease lasts unrenewed (renewed every half of it); a crashed holder on another host is taken over after about this long (default 120s)",
      durationOption,
    )
    .addOption(
      new Option("--tls <mode>", "NBD over TLS: off, on (offered), require (default off)").choices([
        "off",
        "on",
        "require",
      ]),
    )
    .option(
      "--tls-certificates <dir>",
      "TLS key and certificates: server-cert.pem, server-key.pem, ca-cert.pem (as nbdkit, qemu)",
    )
    .option("--tls-verify-peer", "require a client certificate signed by ca-cert.pem")
    .option("--tls-psk <file>", "TLS with pre-shared keys (identity:hexkey lines) instead")
    .option(
      "--metrics <host:port>",
      "serve Prometheus metrics at http://HOST:PORT/metrics (PORT alone: on 127.0.0.1; default off)",
    )
    .option(
      "--prices <file>",
      "JSON price table for the cost estimate (default: S3 Standard us-east-1)",
    )
    .option("-v, --verbose", "log at debug level: connections, TLS sessions (--log-level debug)")
    .addOption(
      new Option("--log-level <level>", `log level (default ${DEFAULT_LOG_LEVEL})`).choices(
        LOG_LEVELS,
      ),
    )
    .action(
      async (
        urls: string[],
        options: {
          listen?: string;
          socket?: string;
          cacheSize?: number;
          dirtySize?: number;
          dirtyChunks?: number;
          readOnly?: boolean;
          createSize?: number;
          writebackDelay?: number;
          gcGrace?: number;
          force?: boolean;
          leaseDuration?: number;
          verbose?: boolean;
          logLevel?: (typeof LOG_LEVELS)[number];
          metrics?: string;
          prices?: string;
          tls?: "off" | "on" | "require";
          tlsCertificates?: string;
          tlsVerifyPeer?: boolean;
          tlsPsk?: string;
        },
      ) => {
        const logger = createLogger({
          level: options.logLevel ?? (options.verbose ? "debug" : DEFAULT_LOG_LEVEL),
        });
        const code = await serve(urls, options, {
          stackFor: (url) => stackFor(url, program),
          out,
          logger,
          // Listen for signals from the start: one that arrives while volumes open or sockets
          // bind must still stop the server cleanly, not kill it with the default action.
          waitForStop: listenForStop({
            // Nothing has been served yet, so nothing can be lost: a second Ctrl-C during a
            // slow start (a lease takeover waits up to two minutes) need not wait for it.
            onSecondWhileStarting: (signal) => {
              logger.warn(`second ${signal} while starting: exiting (nothing was served)`);
              process.exit(130);
            },
          }),
        });
        if (code !== 0) throw new UserError("some writes could not be flushed and are lost");
      },
    );

  return program;
}

async function fileSize(file: string): Promise<number> {
  return (await stat(file)).size;
}

/** One line for an expected failure, or undefined for a bug. */
export function describeFailure(error: unknown): string | undefined {
  if (error instanceof StoreError) {
    const hint =
      error.code === "NoSuchBucket"
        ? " (create the bucket first)"
        : error.code === "AccessDenied"
          ? " (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
          : "";
    return `${error.message}${hint}`;
  }
  if (
    error instanceof UserError ||
    error instanceof VolumeError ||
    error instanceof FormatError ||
    error instanceof StoreUrlError ||
    error instanceof ServeError ||
    error instanceof TransferError ||
    error instanceof LeaseHeldError ||
    error instanceof SnapshotError ||
    error instanceof CloneError ||
    error instanceof LeaseTimingError
  ) {
    return error.message;
  }
  const code = (error as NodeJS.ErrnoException | undefined)?.code;
  if (code === "ENOENT" || code === "EACCES" || code === "EISDIR" || code === "ENOSPC") {
    return (error as Error).message;
  }
  return undefined;
}

export async function main(argv: readonly string[]): Promise<number> {
  const program = buildProgram();
  try {
    await program.parseAsync([...argv], { from: "user" });
    return 0;
  } catch (error) {
    if (error instanceof CommanderError) {
      return error.exitCode === 0 ? 0 : 2;
    }
    const line = describeFailure(error);
    if (line === undefined) {
      console.error("s3blk: internal error (a bug; please report it):");
      console.error(error);
      return 70;
    }
    console.error(`s3blk: ${line}`);
    return 1;
  }
}
