/**
 * `s3blk serve`: open volumes, serve them as NBD exports, and stop cleanly on a signal.
 *
 * Each volume becomes the export named after the last segment of its URL (or the `name=` given
 * before it); the first one is also the default export, reached with an empty name. On SIGTERM
 * or SIGINT the server stops accepting, lets each connection answer what it admitted, then every
 * device is disconnected, which flushes its dirty data; the command then returns (exit 0) unless a
 * flush failed (exit 1: that data is lost, and we say so).
 *
 * One stop request may arrive as several copies of the signal (Ctrl-C under `npm start`, or a
 * supervisor signalling the process group): copies within a second of the first are the same
 * request (stop-signals.ts). A signal after that, while requests finish or devices flush, is a
 * second request: every device is aborted, which drops its unflushed writes, we say how many
 * chunks each lost, and exit 130.
 */

import path from "node:path";
import type { ChunkedBlockDevice } from "../device/chunked-block-device.js";
import { ppWriteError } from "../block/block-device.js";
import type { StoreStack } from "../store/store-stack.js";
import {
  createVolume,
  openVolume,
  upgradeVolume,
  VolumeError,
  VolumeVersionError,
  type OpenOptions,
} from "../lifecycle/volume-lifecycle.js";
import { LeaseHeldError, ProcessLeases } from "../volume/lease.js";
import { FORMAT_VERSION } from "../volume/format.js";
import { splitSnapshotUrl } from "../volume/snapshots.js";
import { NbdExport } from "../nbd/exports.js";
import { nbdUri, NbdServer, type Endpoint } from "../nbd/server.js";
import type { TlsMode } from "../nbd/negotiation.js";
import {
  readTlsCertificates,
  readTlsPskFile,
  TlsSetupError,
  type NbdTlsOptions,
} from "../nbd/tls.js";
import { formatSize } from "./sizes.js";
import { STOP_SIGNAL_WINDOW_MS, type WaitForStop } from "./stop-signals.js";

/** The default `--listen`: loopback, the IANA NBD port. */
export const DEFAULT_LISTEN = "127.0.0.1:10809";

/**
 * How long a forced exit waits for a device's abort (requests it already sent, a stalled upload
 * say) before it exits anyway. Default 2 s.
 */
export const FORCED_EXIT_WAIT_MS = 2000;

export interface ServeOptions {
  readonly listen?: string;
  readonly socket?: string;
  readonly cacheSize?: number;
  readonly dirtySize?: number;
  readonly dirtyChunks?: number;
  readonly readOnly?: boolean;
  readonly createSize?: number;
  readonly writebackDelay?: number;
  /** How long garbage waits for readers that opened before, in ms (see garbage.ts). */
  readonly gcGrace?: number;
  readonly force?: boolean;
  /** How long the process lease lasts without renewal, in ms (see lease.ts). Default 120 s. */
  readonly leaseDuration?: number;
  readonly verbose?: boolean;
  /** nbdkit's `--tls`: off (default), on (offered), require. */
  readonly tls?: TlsMode;
  /** nbdkit's `--tls-certificates`: server-cert.pem, server-key.pem, ca-cert.pem. */
  readonly tlsCertificates?: string;
  /** nbdkit's `--tls-verify-peer`: client certificates must be signed by ca-cert.pem. */
  readonly tlsVerifyPeer?: boolean;
  /** nbdkit's `--tls-psk`: a file of `identity:hexkey` lines, instead of certificates. */
  readonly tlsPsk?: string;
}

export interface ServeEnvironment {
  readonly stackFor: (url: string) => StoreStack;
  readonly out: (line: string) => void;
  readonly err: (line: string) => void;
  /** Resolves on the first stop request; `onSecond` runs on a second one. */
  readonly waitForStop: WaitForStop;
}

/** A mistake in `serve`'s arguments, or a volume that cannot be served. */
export class ServeError extends Error {
  override readonly name = "ServeError";
}

/**
 * The server's TLS settings from `--tls`, `--tls-certificates`, `--tls-verify-peer` and
 * `--tls-psk`.
 */
export function tlsSettings(options: ServeOptions): NbdTlsOptions {
  const mode = options.tls ?? "off";
  if (mode === "off") {
    const flag = options.tlsVerifyPeer
      ? "--tls-verify-peer"
      : options.tlsPsk !== undefined
        ? "--tls-psk"
        : options.tlsCertificates !== undefined
          ? "--tls-certificates"
          : undefined;
    if (flag !== undefined) throw new ServeError(`${flag} needs --tls=on or --tls=require`);
    return { mode };
  }
  if (options.tlsPsk !== undefined) {
    if (options.tlsCertificates !== undefined || options.tlsVerifyPeer) {
      const flag = options.tlsVerifyPeer ? "--tls-verify-peer" : "--tls-certificates";
      throw new ServeError(`--tls-psk and ${flag} do not go together: keys or certificates`);
    }
    try {
      return { mode, psk: readTlsPskFile(options.tlsPsk) };
    } catch (error) {
      if (error instanceof TlsSetupError) throw new ServeError(error.message);
      throw error;
    }
  }
  if (options.tlsCertificates === undefined) {
    throw new ServeError(`--tls=${mode} needs --tls-certificates DIR or --tls-psk FILE`);
  }
  try {
    const { key, cert, ca } = readTlsCertificates(options.tlsCertificates);
    const verifyPeer = options.tlsVerifyPeer ?? false;
    if (verifyPeer && ca === undefined) {
      throw new TlsSetupError(`--tls-verify-peer needs ${options.tlsCertificates}/ca-cert.pem`);
    }
    return { mode, key, cert, ca, verifyPeer };
  } catch (error) {
    if (error instanceof TlsSetupError) throw new ServeError(error.message);
    throw error;
  }
}

/** `name=url` or `url`; the name defaults to the URL's last path segment. */
export function parseVolumeArgument(argument: string): { name: string; url: string } {
  const named = /^([A-Za-z0-9][A-Za-z0-9._-]*)=(.+)$/.exec(argument);
  if (named !== null && !named[1]!.includes("/")) return { name: named[1]!, url: named[2]! };
  const trimmed = argument.replace(/\/+$/, "");
  const rest = trimmed.replace(/^[a-z][a-z0-9+.-]*:\/\//i, "");
  const name = rest.slice(rest.lastIndexOf("/") + 1);
  if (name === "") throw new ServeError(`cannot name an export after "${argument}": use name=URL`);
  return { name, url: argument };
}

/** `HOST:PORT`, `[V6]:PORT` or `PORT`. */
export function parseListen(text: string): { host: string; port: number } {
  const match = /^(?:(?:\[([^\]]+)\]|([^:[\]]*)):)?(\d{1,5})$/.exec(text);
  const port = Number(match?.[3]);
  if (match === null || port > 65535) {
    throw new ServeError(`--listen "${text}" is not HOST:PORT (example: ${DEFAULT_LISTEN})`);
  }
  const host = match[1] ?? match[2] ?? "";
  return { host: host === "" ? "127.0.0.1" : host, port };
}

interface Opened {
  readonly name: string;
  readonly stack: StoreStack;
  readonly device: ChunkedBlockDevice;
}

export async function serve(
  volumeArguments: readonly string[],
  options: ServeOptions,
  env: ServeEnvironment,
): Promise<number> {
  const volumes = volumeArguments.map(parseVolumeArgument);
  const names = new Set<string>();
  for (const { name } of volumes) {
    if (names.has(name)) {
      throw new ServeError(`two volumes would both be served as "${name}": name them, name=URL`);
    }
    names.add(name);
  }
  const endpoints: Endpoint[] = [];
  if (options.listen !== undefined || options.socket === undefined) {
    endpoints.push({ kind: "tcp", ...parseListen(options.listen ?? DEFAULT_LISTEN) });
  }
  if (options.socket !== undefined) endpoints.push({ kind: "unix", path: options.socket });
  const tls = tlsSettings(options);

  const deviceOptions: OpenOptions = {
    readOnly: options.readOnly ?? false,
    lease: {
      force: options.force ?? false,
      durationMs: options.leaseDuration,
      // One process lease per bucket (or directory) for every volume served: one renewal a
      // minute, however many volumes.
      processLeases: new ProcessLeases(),
      log: (line) => env.err(`s3blk: lease: ${line}`),
      onLost: (error) => env.err(`s3blk: ${error.message}`),
    },
    ...(options.cacheSize === undefined ? {} : { cacheBytes: options.cacheSize }),
    ...(options.dirtySize === undefined ? {} : { maxDirtyBytes: options.dirtySize }),
    ...(options.dirtyChunks === undefined ? {} : { maxDirtyChunks: options.dirtyChunks }),
    ...(options.writebackDelay === undefined ? {} : { writebackDelayMs: options.writebackDelay }),
    ...(options.gcGrace === undefined ? {} : { gcGraceMs: options.gcGrace }),
    onWritebackError: (error) => env.err(`s3blk: write-back failed, will retry: ${error.message}`),
  };
  const opened: Opened[] = [];
  try {
    for (const { name, url } of volumes) {
      opened.push({ name, ...(await openOne(url, options.createSize, deviceOptions, env)) });
    }
  } catch (error) {
    await Promise.all(opened.map((o) => o.device.disconnect()));
    throw error;
  }

  const exports = await Promise.all(
    opened.map((o) => NbdExport.create(o.name, o.device, `s3blk volume ${o.stack.url}`)),
  );
  let server: NbdServer;
  try {
    server = new NbdServer({
      exports,
      tls,
      log: (level, line) => {
        if (level === "warn" || options.verbose) env.err(`s3blk: ${line}`);
      },
    });
  } catch (error) {
    await Promise.all(opened.map((o) => o.device.disconnect()));
    if (error instanceof TlsSetupError) throw new ServeError(error.message);
    throw error;
  }
  const bound: Endpoint[] = [];
  try {
    for (const endpoint of endpoints) bound.push(await server.listen(endpoint));
  } catch (error) {
    await server.close();
    await Promise.all(opened.map((o) => o.device.disconnect()));
    const where = endpoints[bound.length]!;
    const place = where.kind === "tcp" ? `${where.host}:${where.port}` : where.path;
    const code = (error as NodeJS.ErrnoException).code;
    const why = code === "EADDRINUSE" ? "address in use" : (error as Error).message;
    throw new ServeError(`cannot listen on ${place}: ${why}`);
  }

  for (const e of exports) {
    env.out(
      `serving ${e.name}: ${formatSize(e.sizeBytes)}${e.readOnly ? ", read-only" : ""}, ` +
        `${e.description.replace(/^s3blk volume /, "")}`,
    );
    for (const endpoint of bound) env.out(`  ${nbdUri(endpoint, e.name, tls.mode === "require")}`);
  }
  const first = nbdUri(bound[0]!, exports[0]!.name, tls.mode === "require");
  if (tls.mode === "require") {
    const query = first.includes("?") ? "&" : "?";
    const credentials =
      tls.psk === undefined ? "tls-certificates=CLIENT-CERTIFICATES-DIR" : "tls-psk-file=KEYS";
    const uri = tls.psk === undefined ? first : first.replace("nbds://", "nbds://IDENTITY@");
    env.out(`connect with: nbdinfo '${uri}${query}${credentials}'`);
  } else {
    env.out(`connect with: qemu-img info ${first}`);
  }
  env.out(`stop with Ctrl-C or SIGTERM (writes are flushed first)`);

  let forcing = false;
  let stopped = false;
  const signal = await env.waitForStop((second) => {
    // Once every device is flushed and stopped, a late signal has nothing left to drop.
    if (forcing || stopped) return;
    forcing = true;
    void forceExit(opened, second, env);
  });
  env.err(
    `s3blk: ${signal}: finishing requests in flight, then flushing; a second Ctrl-C or ` +
      `SIGTERM, ${STOP_SIGNAL_WINDOW_MS / 1000} s or more after this one, exits without flushing`,
  );
  await server.close();
  let failures = 0;
  for (const o of opened) {
    const dirtyChunks = o.device.cacheStats().dirtyChunks;
    if (dirtyChunks > 0) {
      env.err(`s3blk: ${o.name}: flushing ${chunks(dirtyChunks)} of unflushed writes`);
    }
    const result = await o.device.disconnect();
    if (!result.ok) {
      failures++;
      env.err(
        `s3blk: ${o.name}: flush failed, unflushed writes are lost: ${ppWriteError(result.error)}`,
      );
    }
  }
  stopped = true;
  env.err(failures === 0 ? `s3blk: flushed and stopped` : `s3blk: stopped with lost writes`);
  return failures === 0 ? 0 : 1;
}

/** Abort every device, say what each dropped, and exit 130. */
async function forceExit(
  opened: readonly Opened[],
  signal: NodeJS.Signals,
  env: ServeEnvironment,
): Promise<never> {
  const aborted = await Promise.all(opened.map((o) => abortWithin(o.device, FORCED_EXIT_WAIT_MS)));
  opened.forEach((o, i) => {
    const { lostDirtyChunks, settled } = aborted[i]!;
    env.err(
      `s3blk: second ${signal}: exiting without flushing; dropped ${chunks(lostDirtyChunks)} ` +
        `of unflushed writes on ${o.name}${settled ? "" : " (its uploads in flight were cut off)"}`,
    );
  });
  process.exit(130);
}

/**
 * `device.abort()`, waited for at most `waitMs`. abort() counts the chunks it drops before it
 * waits for the requests already sent; the same count is read here first, for when those
 * requests outlast the wait.
 */
async function abortWithin(
  device: ChunkedBlockDevice,
  waitMs: number,
): Promise<{ lostDirtyChunks: number; settled: boolean }> {
  const lostDirtyChunks = device.cacheStats().dirtyChunks;
  let timer: NodeJS.Timeout | undefined;
  const timedOut = new Promise<undefined>((resolve) => {
    timer = setTimeout(() => resolve(undefined), waitMs);
  });
  const result = await Promise.race([device.abort().catch(() => ({ lostDirtyChunks })), timedOut]);
  clearTimeout(timer);
  return result === undefined
    ? { lostDirtyChunks, settled: false }
    : { lostDirtyChunks: result.lostDirtyChunks, settled: true };
}

function chunks(n: number): string {
  return `${n} chunk${n === 1 ? "" : "s"}`;
}

/** Where `npm start` keeps its volume. */
export const DEFAULT_LOCAL_VOLUME = ".s3blk/volumes/default";

/**
 * Open a volume; the default volume of `npm start`, if of an older format, is upgraded first
 * (saying so), since nobody else would ever be told to run `s3blk upgrade` on it.
 */
export async function openUpgradingDefault(
  stack: StoreStack,
  deviceOptions: OpenOptions,
  env: Pick<ServeEnvironment, "out">,
): Promise<ChunkedBlockDevice> {
  try {
    return await openVolume(stack, deviceOptions);
  } catch (error) {
    if (!(error instanceof VolumeVersionError)) throw error;
    if (stack.url !== `file://${path.resolve(DEFAULT_LOCAL_VOLUME)}`) throw error;
    const outcome = await upgradeVolume(stack, {
      ...(deviceOptions.lease === false ? {} : { lease: deviceOptions.lease ?? {} }),
    });
    if (outcome.upgraded) {
      env.out(
        `upgraded the default volume ${stack.url} from format version ${outcome.fromVersion} ` +
          `to ${FORMAT_VERSION} in place (${outcome.chunks} chunks kept as they are)`,
      );
    }
    return openVolume(stack, deviceOptions);
  }
}

async function openOne(
  url: string,
  createSize: number | undefined,
  deviceOptions: OpenOptions,
  env: ServeEnvironment,
): Promise<{ stack: StoreStack; device: ChunkedBlockDevice }> {
  const { url: volumeUrl, snapshot } = splitSnapshotUrl(url);
  const stack = env.stackFor(volumeUrl);
  if (snapshot !== undefined) {
    // A snapshot is immutable: served read-only, never created.
    deviceOptions = { ...deviceOptions, readOnly: true, snapshot };
    createSize = undefined;
  }
  try {
    if (createSize !== undefined) {
      try {
        await createVolume(stack, { sizeBytes: createSize });
        env.out(`created ${stack.url} (${formatSize(createSize)})`);
      } catch (error) {
        if (!(error instanceof VolumeError)) throw error;
      }
    }
    try {
      return { stack, device: await openUpgradingDefault(stack, deviceOptions, env) };
    } catch (error) {
      if (error instanceof VolumeError && createSize === undefined) {
        throw new ServeError(`${error.message}; create it with --create-size SIZE`);
      }
      if (error instanceof LeaseHeldError) throw new ServeError(`${stack.url}: ${error.message}`);
      throw error;
    }
  } catch (error) {
    await stack.store.close();
    throw error;
  }
}
