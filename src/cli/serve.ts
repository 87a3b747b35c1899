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
import { DEFAULT_CACHE_BYTES, maxDirtyBytesIn } from "../cache/page-cache.js";
import { STOP_SIGNAL_WINDOW_MS, type WaitForStop } from "./stop-signals.js";
import type { Logger } from "../util/logger.js";
import { Registry } from "prom-client";
import { NbdExportMetrics } from "../nbd/export-metrics.js";
import {
  DEFAULT_PRICES,
  formatDollars,
  PriceTableError,
  readPriceTable,
  sumCosts,
  type CostEstimate,
  type PriceTable,
} from "../metrics/cost.js";
import { registerServeMetrics, VolumeCost } from "../metrics/serve-metrics.js";
import { startMetricsServer, type MetricsServer } from "../metrics/metrics-server.js";

/** The default `--listen`: loopback, the IANA NBD port. */
export const DEFAULT_LISTEN = "127.0.0.1:10809";

/** An example `--metrics`: loopback, the port node_exporter's neighbours leave free. */
export const DEFAULT_METRICS_LISTEN = "127.0.0.1:9810";

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
  /** nbdkit's `--tls`: off (default), on (offered), require. */
  readonly tls?: TlsMode;
  /** nbdkit's `--tls-certificates`: server-cert.pem, server-key.pem, ca-cert.pem. */
  readonly tlsCertificates?: string;
  /** nbdkit's `--tls-verify-peer`: client certificates must be signed by ca-cert.pem. */
  readonly tlsVerifyPeer?: boolean;
  /** nbdkit's `--tls-psk`: a file of `identity:hexkey` lines, instead of certificates. */
  readonly tlsPsk?: string;
  /** `HOST:PORT` (or `PORT`, on loopback) to serve Prometheus metrics at `/metrics`. Default off. */
  readonly metrics?: string;
  /** A JSON price table replacing the defaults of the cost estimate (see metrics/cost.ts). */
  readonly prices?: string;
}

export interface ServeEnvironment {
  readonly stackFor: (url: string) => StoreStack;
  /** What the user reads: the exports, how to connect. */
  readonly out: (line: string) => void;
  /** The log: each export's lines go through a child carrying `export`. */
  readonly logger: Logger;
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

/** `HOST:PORT`, `[V6]:PORT` or `PORT` (on 127.0.0.1); `flag` names the option in errors. */
export function parseListen(text: string, flag = "--listen"): { host: string; port: number } {
  const match = /^(?:(?:\[([^\]]+)\]|([^:[\]]*)):)?(\d{1,5})$/.exec(text);
  const port = Number(match?.[3]);
  if (match === null || port > 65535) {
    const example = flag === "--listen" ? DEFAULT_LISTEN : DEFAULT_METRICS_LISTEN;
    throw new ServeError(`${flag} "${text}" is not HOST:PORT (example: ${example})`);
  }
  const host = match[1] ?? match[2] ?? "";
  return { host: host === "" ? "127.0.0.1" : host, port };
}

interface Opened {
  readonly name: string;
  readonly logger: Logger;
  readonly stack: StoreStack;
  readonly device: ChunkedBlockDevice;
}

/**
 * Dirty data is part of the cache, and may take at most half of it: a `--dirty-size` larger
 * than that is held to it, with a warning. (The default dirty bound is held to half a smaller
 * `--cache-size` without a word.)
 */
function warnOfDirtyPastCache(options: ServeOptions, logger: Logger): void {
  const cacheBytes = options.cacheSize ?? DEFAULT_CACHE_BYTES;
  const dirtyBytes = options.dirtySize;
  const allowedBytes = maxDirtyBytesIn(cacheBytes);
  if (dirtyBytes === undefined || dirtyBytes <= allowedBytes) return;
  logger.warn(
    `--dirty-size ${formatSize(dirtyBytes)} is more than half of --cache-size` +
      ` ${formatSize(cacheBytes)}, which holds dirty data too: dirty data is held to` +
      ` ${formatSize(allowedBytes)}`,
  );
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
  const metricsAt =
    options.metrics === undefined ? undefined : parseListen(options.metrics, "--metrics");
  const prices = priceTable(options.prices);
  warnOfDirtyPastCache(options, env.logger);

  // One process lease per bucket (or directory) for every volume served: one renewal a minute,
  // however many volumes.
  const processLeases = new ProcessLeases();
  const deviceOptions = (logger: Logger): OpenOptions => ({
    readOnly: options.readOnly ?? false,
    lease: {
      force: options.force ?? false,
      durationMs: options.leaseDuration,
      processLeases,
      log: (line) => {
        if (/fail|could not/.test(line)) logger.warn(`lease: ${line}`);
        else logger.info(`lease: ${line}`);
      },
      onLost: (error) => logger.error(`${error.message}; refusing further writes`),
    },
    ...(options.cacheSize === undefined ? {} : { cacheBytes: options.cacheSize }),
    ...(options.dirtySize === undefined ? {} : { maxDirtyBytes: options.dirtySize }),
    ...(options.dirtyChunks === undefined ? {} : { maxDirtyChunks: options.dirtyChunks }),
    ...(options.writebackDelay === undefined ? {} : { writebackDelayMs: options.writebackDelay }),
    ...(options.gcGrace === undefined ? {} : { gcGraceMs: options.gcGrace }),
    onWritebackError: (error) => logger.warn(`write-back failed, will retry: ${error.message}`),
  });
  const opened: Opened[] = [];
  try {
    for (const { name, url } of volumes) {
      const logger = env.logger.child({ export: name });
      const one = await openOne(url, options.createSize, deviceOptions(logger), env);
      opened.push({ name, logger, ...one });
    }
  } catch (error) {
    await Promise.all(opened.map((o) => o.device.disconnect()));
    throw error;
  }

  const costs = new Map(opened.map((o) => [o.name, new VolumeCost(o, prices)]));
  const requestCounts = new Map(
    opened.map((o) => [o.name, metricsAt === undefined ? undefined : new NbdExportMetrics()]),
  );
  const exports = await Promise.all(
    opened.map((o) =>
      NbdExport.create(o.name, o.device, `s3blk volume ${o.stack.url}`, {
        metrics: requestCounts.get(o.name),
      }),
    ),
  );
  let server: NbdServer;
  try {
    server = new NbdServer({
      exports,
      tls,
      logger: env.logger,
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
  let metricsServer: MetricsServer | undefined;
  if (metricsAt !== undefined) {
    const registry = new Registry();
    const metered = opened.map((o) => ({ ...o, requests: requestCounts.get(o.name)! }));
    registerServeMetrics(registry, metered, costs, prices);
    try {
      metricsServer = await startMetricsServer(registry, metricsAt.host, metricsAt.port);
    } catch (error) {
      await server.close();
      await Promise.all(opened.map((o) => o.device.disconnect()));
      const code = (error as NodeJS.ErrnoException).code;
      const why = code === "EADDRINUSE" ? "address in use" : (error as Error).message;
      throw new ServeError(`cannot serve --metrics on ${options.metrics}: ${why}`);
    }
  }

  for (const e of exports) {
    env.out(
      `serving ${e.name}: ${formatSize(e.sizeBytes)}${e.readOnly ? ", read-only" : ""}, ` +
        `${e.description.replace(/^s3blk volume /, "")}`,
    );
    for (const endpoint of bound) env.out(`  ${nbdUri(endpoint, e.name, tls.mode === "require")}`);
  }
  if (metricsServer !== undefined) env.out(`metrics: ${metricsServer.url}`);
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
    void forceExit(opened, second, () => logCosts(opened, costs, prices, env.logger));
  });
  env.logger.info(
    `${signal}: finishing requests in flight, then flushing; a second Ctrl-C or ` +
      `SIGTERM, ${STOP_SIGNAL_WINDOW_MS / 1000} s or more after this one, exits without flushing`,
  );
  await server.close();
  let failures = 0;
  for (const o of opened) {
    const dirtyChunks = o.device.cacheStats().dirtyChunks;
    if (dirtyChunks > 0) {
      o.logger.info(`${o.name}: flushing ${chunks(dirtyChunks)} of unflushed writes`);
    }
    const result = await o.device.disconnect();
    if (!result.ok) {
      failures++;
      o.logger.error(
        `${o.name}: flush failed, unflushed writes are lost: ${ppWriteError(result.error)}`,
      );
    }
  }
  stopped = true;
  logCosts(opened, costs, prices, env.logger);
  await metricsServer?.close();
  if (failures === 0) env.logger.info("flushed and stopped");
  else env.logger.error("stopped with lost writes");
  return failures === 0 ? 0 : 1;
}

/** Abort every device, say what each dropped, and exit 130. */
async function forceExit(
  opened: readonly Opened[],
  signal: NodeJS.Signals,
  summarise: () => void,
): Promise<never> {
  const aborted = await Promise.all(opened.map((o) => abortWithin(o.device, FORCED_EXIT_WAIT_MS)));
  opened.forEach((o, i) => {
    const { lostDirtyChunks, settled } = aborted[i]!;
    const say =
      lostDirtyChunks === 0 ? o.logger.warn.bind(o.logger) : o.logger.error.bind(o.logger);
    say(
      `second ${signal}: exiting without flushing; dropped ${chunks(lostDirtyChunks)} ` +
        `of unflushed writes on ${o.name}${settled ? "" : " (its uploads in flight were cut off)"}`,
    );
  });
  summarise();
  process.exit(130);
}

/** The price table of `--prices FILE`, or the defaults. */
function priceTable(file: string | undefined): PriceTable {
  if (file === undefined) return DEFAULT_PRICES;
  try {
    return readPriceTable(file);
  } catch (error) {
    if (error instanceof PriceTableError) throw new ServeError(error.message);
    throw error;
  }
}

/** The summary at stop: one line per volume, one for the process, with the figures attached. */
function logCosts(
  opened: readonly Opened[],
  costs: ReadonlyMap<string, VolumeCost>,
  prices: PriceTable,
  logger: Logger,
): void {
  const estimates = opened.map((o) => costs.get(o.name)!.estimate());
  opened.forEach((o, i) => {
    const e = estimates[i]!;
    o.logger.info({ cost: costFields(e) }, `cost of ${o.name}: ${costLine(e, prices)}`);
  });
  if (opened.length > 1) {
    const total = sumCosts(estimates);
    logger.info({ cost: costFields(total) }, `cost of this process: ${costLine(total, prices)}`);
  }
}

function costLine(e: CostEstimate, prices: PriceTable): string {
  const { putCopyPostList, getHead, free } = e.requests;
  return (
    `${putCopyPostList} PUT/COPY/POST/LIST, ${getHead} GET/HEAD and ${free} DELETE requests; ` +
    `${formatSize(e.storedBytes)} stored, ${formatSize(e.downloadedBytes)} downloaded, ` +
    `${formatSize(e.uploadedBytes)} uploaded; estimated ${formatDollars(e.totalDollars)} ` +
    `(requests ${formatDollars(e.dollars.requests)}, transfer ${formatDollars(e.dollars.transfer)}, ` +
    `storage ${formatDollars(e.dollars.storage)}) at ${prices.name} prices`
  );
}

function costFields(e: CostEstimate): Record<string, number> {
  return {
    putCopyPostListRequests: e.requests.putCopyPostList,
    getHeadRequests: e.requests.getHead,
    deleteRequests: e.requests.free,
    storedBytes: e.storedBytes,
    downloadedBytes: e.downloadedBytes,
    uploadedBytes: e.uploadedBytes,
    requestDollars: e.dollars.requests,
    transferDollars: e.dollars.transfer,
    storageDollars: e.dollars.storage,
    totalDollars: e.totalDollars,
  };
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
