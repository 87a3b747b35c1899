/**
 * An object store on S3 or an S3-compatible server (MinIO, Ceph RGW), through @aws-sdk/client-s3.
 *
 * - Connections are kept alive and pooled (`maxSockets`), since every chunk is a request.
 * - The SDK's own retries are off (`maxAttempts: 1`): the retry layer above us owns backoff, so
 *   that one policy, with one bound, applies to every store.
 * - Checksums are computed only when an operation requires them: the SDK's default chunked
 *   checksum uploads fail on RGW and corrupt data on some servers. Our chunks carry their own
 *   checksums (see docs/format.md).
 * - A custom endpoint implies path-style addressing (`http://host/bucket/key`).
 * - GETs take the lean path (s3-get.ts): one signed `node:http` request each, not the SDK's
 *   middleware stack, which cost more CPU per cold MiB than anything else. The SDK still resolves
 *   the bucket's endpoint (once) and supplies the credentials; every other call goes through it.
 * - Bodies are read straight into one buffer of the announced length, not concatenated.
 *
 * Errors are translated to {@link StoreError} in one table, `translateError`.
 */

import {
  DeleteObjectCommand,
  DeleteObjectsCommand,
  GetObjectCommand,
  ListObjectsV2Command,
  PutObjectCommand,
  S3Client,
  S3ServiceException,
} from "@aws-sdk/client-s3";
import { NodeHttpHandler } from "@smithy/node-http-handler";
import http from "node:http";
import https from "node:https";
import type { Readable } from "node:stream";
import { LeanGetter, objectSize, unquote, type BucketEndpoint } from "./s3-get.js";
import {
  DEFAULT_REQUEST_TIMEOUT_MS,
  MAX_DELETE_BATCH,
  StoreError,
  type GetOptions,
  type GetResult,
  type ListPage,
  type ObjectStore,
  type PutOptions,
  type PutResult,
} from "./object-store.js";

export interface S3StoreOptions {
  readonly bucket: string;
  /** e.g. `http://127.0.0.1:7480`. Default: `AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`, or AWS. */
  readonly endpoint?: string;
  /** Default: `AWS_REGION`, `AWS_DEFAULT_REGION`, or `us-east-1`. */
  readonly region?: string;
  /** Default: the SDK's default chain (environment, profile, instance role...). */
  readonly credentials?: { accessKeyId: string; secretAccessKey: string };
  /** Sockets in the pool. Default 64. */
  readonly maxSockets?: number;
  /**
   * A request not answered this long after it was sent fails (and is retried above us). Default
   * 15 s: it must not exceed the lease's `requestTimeoutMs`, which fences writes by it.
   */
  readonly requestTimeoutMs?: number;
  /** Connecting for longer than this fails. Default 5 s. */
  readonly connectionTimeoutMs?: number;
  /**
   * GETs through the lean path (s3-get.ts) rather than the SDK's `GetObjectCommand`. Default
   * true; false is for the benchmark's before/after rows and the tests that compare the two.
   */
  readonly leanGet?: boolean;
}

/** The endpoint the environment names for S3, if any: the SDK's standard variables. */
export function endpointFromEnvironment(env: NodeJS.ProcessEnv = process.env): string | undefined {
  return env.AWS_ENDPOINT_URL_S3 || env.AWS_ENDPOINT_URL || undefined;
}

export class S3Store implements ObjectStore {
  readonly description: string;
  readonly #client: S3Client;
  readonly #bucket: string;
  readonly #lean: LeanGetter | undefined;

  constructor(options: S3StoreOptions) {
    const endpoint = options.endpoint ?? endpointFromEnvironment();
    const maxSockets = options.maxSockets ?? 64;
    const agentOptions = { keepAlive: true, maxSockets, keepAliveMsecs: 1000, scheduling: "lifo" };
    const httpAgent = new http.Agent(agentOptions as http.AgentOptions);
    const httpsAgent = new https.Agent(agentOptions as https.AgentOptions);
    const requestTimeoutMs = options.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS;
    const connectionTimeoutMs = options.connectionTimeoutMs ?? 5_000;
    this.#bucket = options.bucket;
    this.description = `s3://${options.bucket}${endpoint === undefined ? "" : ` at ${endpoint}`}`;
    this.#client = new S3Client({
      region:
        options.region ?? process.env.AWS_REGION ?? process.env.AWS_DEFAULT_REGION ?? "us-east-1",
      ...(endpoint === undefined ? {} : { endpoint, forcePathStyle: true }),
      ...(options.credentials === undefined ? {} : { credentials: options.credentials }),
      maxAttempts: 1,
      requestChecksumCalculation: "WHEN_REQUIRED",
      responseChecksumValidation: "WHEN_REQUIRED",
      requestHandler: new NodeHttpHandler({
        httpAgent,
        httpsAgent,
        // A whole request, sent to answered, must finish within the timeout (the lease's fence
        // counts on it), and this version of the handler only warns unless told to throw.
        requestTimeout: requestTimeoutMs,
        throwOnRequestTimeout: true,
        socketTimeout: requestTimeoutMs,
        connectionTimeout: connectionTimeoutMs,
      }),
    });
    const config = this.#client.config;
    this.#lean =
      options.leanGet === false
        ? undefined
        : new LeanGetter({
            endpoint: () => bucketEndpoint(this.#client, options.bucket),
            credentials: config.credentials,
            sha256: config.sha256,
            httpsAgent,
            maxSockets,
            requestTimeoutMs,
            connectionTimeoutMs,
          });
    // Sign requests without hashing their bodies (SigV4's UNSIGNED-PAYLOAD). Hashing costs
    // ~0.6 ms of CPU per MiB uploaded, and buys nothing here: every chunk carries its own CRCs,
    // verified on every read, and the transport has its own checksums.
    this.#client.middlewareStack.add(
      (next) => async (args) => {
        const request = args.request as { headers?: Record<string, string> };
        if (request.headers !== undefined)
          request.headers["x-amz-content-sha256"] = "UNSIGNED-PAYLOAD";
        return next(args);
      },
      { step: "build", name: "s3blkUnsignedPayload" },
    );
  }

  async get(key: string, options?: GetOptions): Promise<GetResult | undefined> {
    const range = options?.range;
    if (range !== undefined && range.lengthBytes === 0) {
      // HTTP cannot express an empty range; nobody needs one.
      throw new StoreError("Permanent", `empty range requested of ${key}`);
    }
    try {
      if (this.#lean !== undefined) return await this.#lean.get(key, range, options?.allocate);
      const response = await this.#client.send(
        new GetObjectCommand({
          Bucket: this.#bucket,
          Key: key,
          ...(range === undefined
            ? {}
            : { Range: `bytes=${range.offsetBytes}-${range.offsetBytes + range.lengthBytes - 1}` }),
        }),
      );
      const body = await readBody(response.Body as Readable, response.ContentLength);
      return {
        body,
        metadata: response.Metadata ?? {},
        etag: unquote(response.ETag),
        objectSizeBytes: objectSize(response.ContentRange, body),
      };
    } catch (error) {
      if (isNotFound(error)) return undefined;
      if (isStatus(error, 416)) {
        // The range starts past the end of the object: S3's answer for a short object.
        return { body: new Uint8Array(0), metadata: {}, etag: "", objectSizeBytes: 0 };
      }
      throw translateError(error, `GET ${key}`);
    }
  }

  async put(key: string, body: Uint8Array, options?: PutOptions): Promise<PutResult> {
    try {
      const response = await this.#client.send(
        new PutObjectCommand({
          Bucket: this.#bucket,
          Key: key,
          Body: body,
          ContentLength: body.byteLength,
          ...(options?.metadata === undefined ? {} : { Metadata: { ...options.metadata } }),
          ...(options?.ifNoneMatch === undefined ? {} : { IfNoneMatch: options.ifNoneMatch }),
          // RGW matches only the bare entity tag, AWS and MinIO accept it too.
          ...(options?.ifMatch === undefined ? {} : { IfMatch: options.ifMatch }),
        }),
      );
      return { etag: unquote(response.ETag) };
    } catch (error) {
      throw translateError(error, `PUT ${key}`);
    }
  }

  async delete(key: string): Promise<void> {
    try {
      await this.#client.send(new DeleteObjectCommand({ Bucket: this.#bucket, Key: key }));
    } catch (error) {
      if (isNotFound(error)) return;
      throw translateError(error, `DELETE ${key}`);
    }
  }

  async deleteMany(keys: readonly string[]): Promise<void> {
    if (keys.length === 0) return;
    if (keys.length > MAX_DELETE_BATCH) {
      throw new StoreError("Permanent", `deleteMany of ${keys.length} keys`);
    }
    try {
      const response = await this.#client.send(
        new DeleteObjectsCommand({
          Bucket: this.#bucket,
          Delete: { Objects: keys.map((Key) => ({ Key })), Quiet: true },
        }),
      );
      const failed = (response.Errors ?? []).filter((e) => e.Code !== "NoSuchKey");
      if (failed.length > 0) {
        const first = failed[0];
        throw new StoreError(
          first?.Code === "SlowDown" || first?.Code === "InternalError" ? "Transient" : "Permanent",
          `DeleteObjects failed for ${failed.length} keys, first ${first?.Key}: ${first?.Code} ${first?.Message}`,
        );
      }
    } catch (error) {
      if (error instanceof StoreError) throw error;
      throw translateError(error, `DeleteObjects (${keys.length} keys)`);
    }
  }

  async listPage(prefix: string, continuation?: string): Promise<ListPage> {
    try {
      const response = await this.#client.send(
        new ListObjectsV2Command({
          Bucket: this.#bucket,
          Prefix: prefix,
          ...(continuation === undefined ? {} : { ContinuationToken: continuation }),
        }),
      );
      const entries = (response.Contents ?? []).map((o) => ({
        key: o.Key ?? "",
        sizeBytes: o.Size ?? 0,
        lastModifiedMs: o.LastModified?.getTime() ?? 0,
      }));
      return response.IsTruncated && response.NextContinuationToken !== undefined
        ? { entries, continuation: response.NextContinuationToken }
        : { entries };
    } catch (error) {
      throw translateError(error, `LIST ${prefix}`);
    }
  }

  async close(): Promise<void> {
    this.#lean?.close();
    this.#client.destroy();
  }
}

/** Read a response body into one buffer of `lengthBytes`, or concatenate if it is unknown. */
async function readBody(stream: Readable, lengthBytes: number | undefined): Promise<Uint8Array> {
  if (lengthBytes === undefined) {
    const parts: Buffer[] = [];
    for await (const part of stream) parts.push(part as Buffer);
    return Buffer.concat(parts);
  }
  const body = Buffer.allocUnsafe(lengthBytes);
  let filled = 0;
  for await (const part of stream) {
    const chunk = part as Buffer;
    if (filled + chunk.byteLength > lengthBytes) {
      throw new StoreError("Transient", `response body longer than its ${lengthBytes} bytes`);
    }
    chunk.copy(body, filled);
    filled += chunk.byteLength;
  }
  if (filled !== lengthBytes) {
    throw new StoreError("Transient", `response body ended at ${filled} of ${lengthBytes} bytes`);
  }
  return body;
}

/**
 * Where `bucket`'s objects are, by the SDK's own endpoint rules (the configured endpoint and path
 * style, or AWS's virtual-hosted names; FIPS and dual-stack settings), and how to sign for it.
 * S3's rules give one endpoint per bucket, whatever the key.
 */
async function bucketEndpoint(client: S3Client, bucket: string): Promise<BucketEndpoint> {
  const config = client.config;
  const custom = await config.endpoint?.();
  const resolved = config.endpointProvider({
    Bucket: bucket,
    Region: await config.region(),
    UseFIPS: await config.useFipsEndpoint(),
    UseDualStack: await config.useDualstackEndpoint(),
    ForcePathStyle: config.forcePathStyle,
    Accelerate: config.useAccelerateEndpoint,
    ...(custom === undefined
      ? {}
      : {
          Endpoint: `${custom.protocol}//${custom.hostname}${custom.port === undefined ? "" : `:${custom.port}`}${custom.path}`,
        }),
  });
  const url = resolved.url;
  const scheme = (
    resolved.properties?.authSchemes as
      { name?: string; signingRegion?: string; signingName?: string }[] | undefined
  )?.find((s) => s.name === "sigv4");
  return {
    protocol: url.protocol,
    hostname: url.hostname,
    port: url.port === "" ? undefined : Number(url.port),
    basePath: url.pathname.replace(/\/+$/, ""),
    signingRegion: scheme?.signingRegion ?? (await config.region()),
    signingName: scheme?.signingName ?? "s3",
  };
}

function statusOf(error: unknown): number | undefined {
  return (error as { $metadata?: { httpStatusCode?: number } } | undefined)?.$metadata
    ?.httpStatusCode;
}

function isStatus(error: unknown, status: number): boolean {
  return statusOf(error) === status;
}

function isNotFound(error: unknown): boolean {
  const name = (error as Error | undefined)?.name;
  return (
    name === "NoSuchKey" || name === "NotFound" || (isStatus(error, 404) && name !== "NoSuchBucket")
  );
}

const TRANSIENT_NAMES = new Set([
  "SlowDown",
  "InternalError",
  "ServiceUnavailable",
  "RequestTimeout",
  "RequestTimeTooSkewed",
  "TimeoutError",
  "RequestTimeoutException",
  "ThrottlingException",
]);

const TRANSIENT_NODE_CODES = new Set([
  "ECONNRESET",
  "ECONNREFUSED",
  "EPIPE",
  "ETIMEDOUT",
  "EAI_AGAIN",
  "ENOTFOUND",
  "EHOSTUNREACH",
  "ENETUNREACH",
  "ECONNABORTED",
  "UND_ERR_SOCKET",
]);

/** One table: S3 and network failures to store errors. */
function translateError(error: unknown, what: string): StoreError {
  if (error instanceof StoreError) return error;
  const name = (error as Error | undefined)?.name ?? "";
  const code = (error as NodeJS.ErrnoException | undefined)?.code ?? "";
  const status = statusOf(error);
  const rawMessage = (error as Error | undefined)?.message ?? "";
  const detail =
    rawMessage === "" || rawMessage === "UnknownError" || rawMessage === name
      ? name || String(error)
      : name === "" || name === "Error" || rawMessage.includes(name)
        ? rawMessage
        : `${name}: ${rawMessage}`;
  const message = `${what}: ${status === undefined ? "" : `HTTP ${status} `}${detail}`;
  if (status === 412 || name === "PreconditionFailed") {
    return new StoreError("PreconditionFailed", message, { cause: error });
  }
  if (status === 409 && name === "ConditionalRequestConflict") {
    // AWS, to a conditional write racing another on the same key: try again, and the condition
    // then decides (a 412 that a caller reads back, as the lease and the seals do).
    return new StoreError("Transient", message, { cause: error });
  }
  if (name === "CredentialsProviderError") {
    return new StoreError("AccessDenied", `${what}: no S3 credentials: ${detail}`, {
      cause: error,
    });
  }
  if (name === "NoSuchBucket") return new StoreError("NoSuchBucket", message, { cause: error });
  if (
    status === 403 ||
    name === "AccessDenied" ||
    name === "InvalidAccessKeyId" ||
    name === "SignatureDoesNotMatch"
  ) {
    return new StoreError("AccessDenied", message, { cause: error });
  }
  // RGW may answer racing If-Match writers with a 500: transient, like any 5xx, below.
  const transient =
    (status !== undefined && (status >= 500 || status === 429 || status === 408)) ||
    TRANSIENT_NAMES.has(name) ||
    TRANSIENT_NODE_CODES.has(code) ||
    (status === undefined && !(error instanceof S3ServiceException));
  return new StoreError(transient ? "Transient" : "Permanent", message, { cause: error });
}
