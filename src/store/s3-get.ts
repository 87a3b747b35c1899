/**
 * The lean GET path of {@link S3Store}: a chunk GET as one plain `node:http`/`node:https` request
 * signed with `@smithy/signature-v4`, its body read straight into one buffer of the announced
 * length, which the page cache then adopts as the page's memory (no further copy).
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
 *   escaping), and the same keep-alive agents, so TLS endpoints work as before;
 * - a timeout on the whole attempt (`requestTimeoutMs`, sent to body read) and on connecting;
 * - errors shaped like the SDK's (`S3ServiceException` with the S3 error code as its name and
 *   the HTTP status in `$metadata`), so the one table, `translateError`, translates both;
 * - no retries here: the retry layer above owns them.
 */

import { S3ServiceException } from "@aws-sdk/client-s3";
import { SignatureV4 } from "@smithy/signature-v4";
import type {
  AwsCredentialIdentityProvider,
  ChecksumConstructor,
  HashConstructor,
} from "@smithy/types";
import http from "node:http";
import https from "node:https";
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
  readonly httpAgent: http.Agent;
  readonly httpsAgent: https.Agent;
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

  constructor(options: LeanGetOptions) {
    this.#options = options;
  }

  async get(key: string, range: ByteRangeRequest | undefined): Promise<GetResult | undefined> {
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
    return this.#send(endpoint, path, signed.headers);
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

  #send(
    endpoint: BucketEndpoint,
    path: string,
    headers: Record<string, string>,
  ): Promise<GetResult | undefined> {
    const secure = endpoint.protocol === "https:";
    const options = this.#options;
    return new Promise((resolve, reject) => {
      let settled = false;
      const fail = (error: unknown) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        request.destroy();
        reject(error);
      };
      const request = (secure ? https : http).request(
        {
          method: "GET",
          hostname: endpoint.hostname,
          ...(endpoint.port === undefined ? {} : { port: endpoint.port }),
          path,
          headers,
          agent: secure ? options.httpsAgent : options.httpAgent,
        },
        (response) => {
          const status = response.statusCode ?? 0;
          if (status !== 200 && status !== 206) {
            readErrorBody(response).then(
              (body) => fail(serviceError(status, response.headers, body)),
              fail,
            );
            return;
          }
          readBodyInto(response).then((body) => {
            if (settled) return;
            settled = true;
            clearTimeout(timer);
            resolve({
              body,
              metadata: userMetadata(response.headers),
              etag: unquote(header(response.headers, "etag")),
              objectSizeBytes: objectSize(header(response.headers, "content-range"), body),
            });
          }, fail);
        },
      );
      const timer = setTimeout(
        () => fail(timeoutError(`no whole answer within ${options.requestTimeoutMs} ms`)),
        options.requestTimeoutMs,
      );
      request.once("socket", (socket) => {
        if (!socket.connecting) return;
        const connectTimer = setTimeout(
          () => fail(timeoutError(`not connected within ${options.connectionTimeoutMs} ms`)),
          options.connectionTimeoutMs,
        );
        socket.once(secure ? "secureConnect" : "connect", () => clearTimeout(connectTimer));
        socket.once("close", () => clearTimeout(connectTimer));
      });
      request.once("error", fail);
      request.end();
    });
  }
}

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
 * The body of a 200/206 answer, into one buffer of its `content-length` (adopted by the page
 * cache as the page's memory), or concatenated if the server announced none.
 */
function readBodyInto(response: http.IncomingMessage): Promise<Uint8Array> {
  const announced = header(response.headers, "content-length");
  const lengthBytes = announced === undefined ? undefined : Number(announced);
  return new Promise((resolve, reject) => {
    const parts: Buffer[] = [];
    const body =
      lengthBytes === undefined || !Number.isSafeInteger(lengthBytes)
        ? undefined
        : Buffer.allocUnsafe(lengthBytes);
    let filled = 0;
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
    let ended = false;
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

/** Up to {@link MAX_ERROR_BODY_BYTES} of an error answer's body, as text. */
function readErrorBody(response: http.IncomingMessage): Promise<string> {
  return new Promise((resolve, reject) => {
    const parts: Buffer[] = [];
    let bytes = 0;
    response.on("data", (chunk: Buffer) => {
      if (bytes < MAX_ERROR_BODY_BYTES) parts.push(chunk);
      bytes += chunk.byteLength;
    });
    response.once("end", () =>
      resolve(Buffer.concat(parts).subarray(0, MAX_ERROR_BODY_BYTES).toString("utf8")),
    );
    response.once("error", reject);
  });
}

/**
 * An error answer as the SDK would throw it: the S3 error code (from the XML body, else what
 * the SDK names a bare status) as `name`, the status in `$metadata`.
 */
function serviceError(
  status: number,
  headers: http.IncomingHttpHeaders,
  body: string,
): S3ServiceException {
  const code = xmlElement(body, "Code") ?? BARE_STATUS_NAMES[status] ?? "UnknownError";
  const message = xmlElement(body, "Message") ?? code;
  return new S3ServiceException({
    name: code,
    $fault: status >= 500 ? "server" : "client",
    $metadata: {
      httpStatusCode: status,
      ...(header(headers, "x-amz-request-id") === undefined
        ? {}
        : { requestId: header(headers, "x-amz-request-id")! }),
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

function header(headers: http.IncomingHttpHeaders, name: string): string | undefined {
  const value = headers[name];
  return Array.isArray(value) ? value[0] : value;
}

const META_PREFIX = "x-amz-meta-";

/** `x-amz-meta-*` headers, as the SDK's `Metadata`: names without the prefix, lower case. */
function userMetadata(headers: http.IncomingHttpHeaders): Record<string, string> {
  const metadata: Record<string, string> = {};
  for (const [name, value] of Object.entries(headers)) {
    if (!name.startsWith(META_PREFIX) || value === undefined) continue;
    metadata[name.slice(META_PREFIX.length)] = Array.isArray(value) ? value.join(", ") : value;
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
