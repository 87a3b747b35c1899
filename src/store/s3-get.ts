/**
 * The lean GET path of {@link S3Store}: a chunk GET as one HTTP request signed with
 * `@smithy/signature-v4`, its body read straight into one buffer of the announced length (the
 * caller's, when it passes `allocate`: the page cache's chunk buffers), which the page cache then
 * adopts as the page's memory (no further copy). Plain `http:` endpoints go
 * through a small keep-alive client of our own (http1-client.ts), which reads each socket into
 * one reused buffer; `https:` ones through `node:https`.
 *
 * Why not the SDK's `GetObjectCommand`: on a cold sequential read the SDK's middleware stack
 * (serialisation, endpoint rules, the signer's wrappers, the body stream mixin, deserialisation)
 * cost more CPU per MiB than anything else s3blk does, and its garbage was most of the GC (see
 * "Choices made by measurement" in docs/architecture.md). A GET needs none of it: the endpoint
 * of a bucket does not depend on the key, so it is resolved once, by the SDK's own endpoint
 * rules (profiles, FIPS, dual-stack and path style still apply), and the rest is a signed HTTP
 * request.
 *
 * What is kept from the SDK path, on purpose:
 * - the same credentials provider, region and signing settings (`UNSIGNED-PAYLOAD`, S3's path
 *   escaping), and for HTTPS the same keep-alive agent, so TLS endpoints work as before;
 * - a timeout on the whole attempt (`requestTimeoutMs`, sent to body read) and on connecting;
 * - errors shaped like the SDK's (`S3ServiceException` with the S3 error code as its name and
 *   the HTTP status in `$metadata`), so the one table, `translateError`, translates both;
 * - no retries here: the retry layer above owns them.
 */

import assert from "node:assert/strict";
import { S3ServiceException } from "@aws-sdk/client-s3";
import { SignatureV4 } from "@smithy/signature-v4";
import type {
  AwsCredentialIdentityProvider,
  ChecksumConstructor,
  HashConstructor,
} from "@smithy/types";
import type http from "node:http";
import https from "node:https";
import { Http1Client, type BodyAllocator } from "./http1-client.js";
import { StoreError, type ByteRangeRequest, type GetResult } from "./object-store.js";

/** Where a bucket's objects are, and how requests to it are signed. */
export interface BucketEndpoint {
  /** `http:` or `https:`. */
  readonly protocol: string;
  readonly hostname: string;
  readonly port: number | undefined;
  /** The path up to the key, without a trailing slash: `/bucket` (path style) or `` (virtual). */
  readonly basePath: string;
  readonly signingRegion: string;
  readonly signingName: string;
}

export interface LeanGetOptions {
  /** Resolved once, at the first GET (the SDK's endpoint rules run then). */
  readonly endpoint: () => Promise<BucketEndpoint>;
  readonly credentials: AwsCredentialIdentityProvider;
  readonly sha256: ChecksumConstructor | HashConstructor;
  /** For HTTPS endpoints (plain ones use a pool of their own, http1-client.ts). */
  readonly httpsAgent: https.Agent;
  /** Plain connections open at most. */
  readonly maxSockets: number;
  /** One attempt, sent to the last body byte read, fails past this. */
  readonly requestTimeoutMs: number;
  /** Connecting for longer than this fails. */
  readonly connectionTimeoutMs: number;
}

/** The largest error body read, for its code and message. */
const MAX_ERROR_BODY_BYTES = 64 * 1024;

/**
 * Signed GETs of one bucket's objects. `get` answers `undefined` for a missing key (404
 * NoSuchKey), the empty result S3 gives a range past the end (416), and throws an SDK-shaped
 * error (or a transient {@link StoreError} for a body cut short) for anything else.
 */
export class LeanGetter {
  readonly #options: LeanGetOptions;
  #endpoint: Promise<BucketEndpoint> | undefined;
  #signer: { region: string; service: string; signer: SignatureV4 } | undefined;
  #plain: Http1Client | undefined;

  constructor(options: LeanGetOptions) {
    this.#options = options;
  }

  async get(
    key: string,
    range: ByteRangeRequest | undefined,
    allocate?: BodyAllocator,
  ): Promise<GetResult | undefined> {
    this.#endpoint ??= this.#options.endpoint().catch((error: unknown) => {
      this.#endpoint = undefined;
      throw error;
    });
    const endpoint = await this.#endpoint;
    const headers: Record<string, string> = {
      host:
        endpoint.port === undefined ? endpoint.hostname : `${endpoint.hostname}:${endpoint.port}`,
      "x-amz-content-sha256": "UNSIGNED-PAYLOAD",
    };
    if (range !== undefined) {
      headers.range = `bytes=${range.offsetBytes}-${range.offsetBytes + range.lengthBytes - 1}`;
    }
    const path = `${endpoint.basePath}/${encodeKey(key)}`;
    const signed = await this.#signerFor(endpoint).sign({
      method: "GET",
      protocol: endpoint.protocol,
      hostname: endpoint.hostname,
      ...(endpoint.port === undefined ? {} : { port: endpoint.port }),
      path,
      query: {},
      headers,
    });
    return this.#send(endpoint, path, signed.headers, allocate);
  }

  #signerFor(endpoint: BucketEndpoint): SignatureV4 {
    const { signingRegion: region, signingName: service } = endpoint;
    if (this.#signer?.region !== region || this.#signer.service !== service) {
      this.#signer = {
        region,
        service,
        signer: new SignatureV4({
          credentials: this.#options.credentials,
          region,
          service,
          sha256: this.#options.sha256,
          // S3 signs the path as sent: keys are escaped once, by encodeKey.
          uriEscapePath: false,
          applyChecksum: false,
        }),
      };
    }
    return this.#signer.signer;
  }

  /** Send the signed GET; a 200/206 answer becomes the result, anything else an error. */
  async #send(
    endpoint: BucketEndpoint,
    path: string,
    headers: Record<string, string>,
    allocate: BodyAllocator | undefined,
  ): Promise<GetResult | undefined> {
    const { requestTimeoutMs } = this.#options;
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), requestTimeoutMs);
    let answer: Answer;
    try {
      answer =
        endpoint.protocol === "https:"
          ? await this.#sendTls(endpoint, path, headers, abort.signal, allocate)
          : await this.#plainClient(endpoint).get(path, headers, abort.signal, allocate);
    } catch (error) {
      if (abort.signal.aborted) {
        throw timeoutError(`no whole answer within ${requestTimeoutMs} ms`);
      }
      throw error;
    } finally {
      clearTimeout(timer);
    }
    const { status, body } = answer;
    if (status !== 200 && status !== 206) {
      throw serviceError(status, answer.headers, body.subarray(0, MAX_ERROR_BODY_BYTES));
    }
    return {
      body,
      metadata: userMetadata(answer.headers),
      etag: unquote(answer.headers.etag),
      objectSizeBytes: objectSize(answer.headers["content-range"], body),
    };
  }

  #plainClient(endpoint: BucketEndpoint): Http1Client {
    this.#plain ??= new Http1Client({
      hostname: endpoint.hostname,
      port: endpoint.port ?? 80,
      maxSockets: this.#options.maxSockets,
      idleTimeoutMs: PLAIN_IDLE_TIMEOUT_MS,
      connectionTimeoutMs: this.#options.connectionTimeoutMs,
    });
    return this.#plain;
  }

  /** HTTPS, through `node:https` and the store's keep-alive agent. */
  #sendTls(
    endpoint: BucketEndpoint,
    path: string,
    headers: Record<string, string>,
    signal: AbortSignal,
    allocate: BodyAllocator | undefined,
  ): Promise<Answer> {
    const options = this.#options;
    return new Promise((resolve, reject) => {
      const request = https.request(
        {
          method: "GET",
          hostname: endpoint.hostname,
          ...(endpoint.port === undefined ? {} : { port: endpoint.port }),
          path,
          headers,
          agent: options.httpsAgent,
          signal,
        },
        (response) => {
          readBody(response, allocate).then(
            (body) =>
              resolve({
                status: response.statusCode ?? 0,
                headers: flatten(response.headers),
                body,
              }),
            (error: unknown) => {
              request.destroy();
              reject(error);
            },
          );
        },
      );
      request.once("socket", (socket) => {
        if (!socket.connecting) return;
        const connectTimer = setTimeout(
          () =>
            request.destroy(timeoutError(`not connected within ${options.connectionTimeoutMs} ms`)),
          options.connectionTimeoutMs,
        );
        socket.once("secureConnect", () => clearTimeout(connectTimer));
        socket.once("close", () => clearTimeout(connectTimer));
      });
      request.once("error", reject);
      request.end();
    });
  }

  close(): void {
    this.#plain?.close();
  }
}

/** A whole answer, from either transport. */
interface Answer {
  readonly status: number;
  readonly headers: Readonly<Record<string, string>>;
  readonly body: Buffer;
}

/** Idle plain connections are closed after this long: under the servers' own keep-alive limits. */
const PLAIN_IDLE_TIMEOUT_MS = 4_000;

/** Escape a key for the path as S3 and the SDK do: each segment, RFC 3986 strictly. */
export function encodeKey(key: string): string {
  return key
    .split("/")
    .map((segment) =>
      encodeURIComponent(segment).replace(
        /[!'()*]/g,
        (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`,
      ),
    )
    .join("/");
}

/**
 * A `node:https` answer's body, into one buffer of its `content-length` (adopted by the page
 * cache as the page's memory), or concatenated if the server announced none.
 */
function readBody(
  response: http.IncomingMessage,
  allocate: BodyAllocator | undefined,
): Promise<Buffer> {
  const announced = Number(response.headers["content-length"] ?? Number.NaN);
  const lengthBytes = Number.isSafeInteger(announced) && announced >= 0 ? announced : undefined;
  return new Promise((resolve, reject) => {
    const parts: Buffer[] = [];
    const body =
      lengthBytes === undefined
        ? undefined
        : (allocate?.(lengthBytes) ?? Buffer.allocUnsafe(lengthBytes));
    assert(body === undefined || body.byteLength === lengthBytes, "an allocated body's length");
    let filled = 0;
    let ended = false;
    response.on("data", (chunk: Buffer) => {
      if (body === undefined) {
        parts.push(chunk);
      } else if (filled + chunk.byteLength > body.byteLength) {
        response.destroy();
        reject(new StoreError("Transient", `response body longer than its ${lengthBytes} bytes`));
      } else {
        body.set(chunk, filled);
      }
      filled += chunk.byteLength;
    });
    response.once("end", () => {
      ended = true;
      if (body === undefined) resolve(Buffer.concat(parts));
      else if (filled === body.byteLength) resolve(body);
      else {
        reject(
          new StoreError("Transient", `response body ended at ${filled} of ${lengthBytes} bytes`),
        );
      }
    });
    // A connection closed mid-body ends the response without "end" (and without an error on
    // some versions of Node).
    response.once("close", () => {
      if (!ended) reject(new StoreError("Transient", `response body cut at ${filled} bytes`));
    });
    response.once("error", reject);
  });
}

function flatten(headers: http.IncomingHttpHeaders): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [name, value] of Object.entries(headers)) {
    if (value !== undefined) out[name] = Array.isArray(value) ? value.join(", ") : value;
  }
  return out;
}

/**
 * An error answer as the SDK would throw it: the S3 error code (from the XML body, else what
 * the SDK names a bare status) as `name`, the status in `$metadata`.
 */
function serviceError(
  status: number,
  headers: Readonly<Record<string, string>>,
  bodyBytes: Buffer,
): S3ServiceException {
  const body = bodyBytes.toString("utf8");
  const code = xmlElement(body, "Code") ?? BARE_STATUS_NAMES[status] ?? "UnknownError";
  const message = xmlElement(body, "Message") ?? code;
  return new S3ServiceException({
    name: code,
    $fault: status >= 500 ? "server" : "client",
    $metadata: {
      httpStatusCode: status,
      ...(headers["x-amz-request-id"] === undefined
        ? {}
        : { requestId: headers["x-amz-request-id"] }),
    },
    message,
  });
}

/** What the SDK names an error answer without a body (as to a HEAD). */
const BARE_STATUS_NAMES: Readonly<Record<number, string>> = {
  304: "NotModified",
  400: "BadRequest",
  403: "Forbidden",
  404: "NotFound",
  412: "PreconditionFailed",
  416: "InvalidRange",
};

function timeoutError(message: string): Error {
  const error = new Error(message);
  error.name = "TimeoutError";
  return error;
}

function xmlElement(xml: string, name: string): string | undefined {
  const match = new RegExp(`<${name}>([^<]*)</${name}>`).exec(xml);
  return match?.[1] === undefined ? undefined : unescapeXml(match[1]);
}

function unescapeXml(text: string): string {
  return text.replace(/&(lt|gt|amp|quot|apos);/g, (_, e: string) =>
    e === "lt" ? "<" : e === "gt" ? ">" : e === "amp" ? "&" : e === "quot" ? '"' : "'",
  );
}

const META_PREFIX = "x-amz-meta-";

/** `x-amz-meta-*` headers, as the SDK's `Metadata`: names without the prefix, lower case. */
function userMetadata(headers: Readonly<Record<string, string>>): Record<string, string> {
  const metadata: Record<string, string> = {};
  for (const [name, value] of Object.entries(headers)) {
    if (name.startsWith(META_PREFIX)) metadata[name.slice(META_PREFIX.length)] = value;
  }
  return metadata;
}

export function objectSize(contentRange: string | undefined, body: Uint8Array): number {
  const total = contentRange?.split("/")[1];
  return total === undefined || total === "*" ? body.byteLength : Number(total);
}

export function unquote(etag: string | undefined): string {
  return (etag ?? "").replace(/^"|"$/g, "");
}
