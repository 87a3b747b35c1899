/**
 * The one interface every object store implements: S3, a local directory, memory, and the layers
 * stacked on them (retries, fault injection, request counting).
 *
 * The shape is the subset of S3 that s3blk needs: whole or ranged GET, PUT (optionally
 * conditional, for leases), DELETE (single and batch) and paged LIST. A store is a flat key space;
 * a volume is a key prefix inside it.
 *
 * Failures are thrown as {@link StoreError}, whose `code` is what callers branch on. Transient
 * failures (5xx, throttling, resets, timeouts) are marked so the retry layer knows what it may
 * repeat. A GET of a missing key is not an error: it answers `undefined`.
 */

/** User metadata stored with an object: small ASCII strings, lower-case keys. */
export type ObjectMetadata = Readonly<Record<string, string>>;

/** A byte range of an object. */
export interface ByteRangeRequest {
  readonly offsetBytes: number;
  readonly lengthBytes: number;
}

/** What a GET returns. */
export interface GetResult {
  /** The object's bytes, or the requested range of them (shorter if the object is shorter). */
  readonly body: Uint8Array;
  readonly metadata: ObjectMetadata;
  /** The object's entity tag, unquoted. */
  readonly etag: string;
  /** The whole object's size, whatever range was asked for. */
  readonly objectSizeBytes: number;
}

export interface GetOptions {
  /** Only these bytes. Default: the whole object. */
  readonly range?: ByteRangeRequest;
  /**
   * Where the body goes: called with its length once that is known, it returns a buffer of
   * exactly that length that the caller owns (from its pool), or `undefined` for a fresh one.
   * The result's `body` is then that buffer. A store may ignore it, and may call it more than
   * once (an attempt that fails abandons its buffer to the collector).
   */
  readonly allocate?: (lengthBytes: number) => Buffer | undefined;
}

export interface PutOptions {
  readonly metadata?: ObjectMetadata;
  /** `"*"`: only create; fail with `PreconditionFailed` if the key exists. */
  readonly ifNoneMatch?: "*";
  /** Only replace the object whose entity tag (unquoted) is this. */
  readonly ifMatch?: string;
}

export interface PutResult {
  /** The new object's entity tag, unquoted. */
  readonly etag: string;
}

export interface ListEntry {
  readonly key: string;
  readonly sizeBytes: number;
  /**
   * When the object was written, in ms since 1970, on the store's clock (S3's `LastModified`;
   * a file's mtime). Garbage collection compares these with each other, never with ours.
   */
  readonly lastModifiedMs: number;
}

export interface ListPage {
  readonly entries: readonly ListEntry[];
  /** Pass back to get the next page; absent on the last page. */
  readonly continuation?: string;
}

/** Kinds of store failure. */
export type StoreErrorCode =
  /** A conditional PUT's condition did not hold. */
  | "PreconditionFailed"
  /** The bucket, the directory, or the credentials are wrong: retrying will not help. */
  | "NoSuchBucket"
  | "AccessDenied"
  /** A write refused because this process no longer holds the volume's lease. */
  | "Fenced"
  /** Worth retrying: 5xx, SlowDown, a reset connection, a timeout. */
  | "Transient"
  /** Anything else. */
  | "Permanent";

/** A failure of a store operation. */
export class StoreError extends Error {
  override readonly name = "StoreError";
  constructor(
    readonly code: StoreErrorCode,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }

  get transient(): boolean {
    return this.code === "Transient";
  }
}

/** An object store. Implementations must be safe to call concurrently. */
export interface ObjectStore {
  /** A short description for messages, e.g. `s3://bucket` or `file:///srv/vols`. */
  readonly description: string;

  /** The object, or `undefined` if there is none under `key`. */
  get(key: string, options?: GetOptions): Promise<GetResult | undefined>;

  /**
   * Store `body` under `key`, atomically: a reader sees the old object or the new, whole. What
   * is stored never depends on `body` after the returned promise settles: the cache reuses it
   * then. (An HTTP request the server has already answered with an error may still be sending
   * the rest of its body; the server stores none of it.)
   */
  put(key: string, body: Uint8Array, options?: PutOptions): Promise<PutResult>;

  /** Delete `key`. Deleting a missing key succeeds. */
  delete(key: string): Promise<void>;

  /** Delete every key in `keys` (at most {@link MAX_DELETE_BATCH}). */
  deleteMany(keys: readonly string[]): Promise<void>;

  /** One page of the keys under `prefix`, in lexicographic order. */
  listPage(prefix: string, continuation?: string): Promise<ListPage>;

  /** Release connections and handles. */
  close(): Promise<void>;
}

/**
 * How long one attempt of a request may take, sent to answered, unless told otherwise: S3
 * enforces it per attempt, and the lease's fence admits a write only if it can finish within it
 * before the lease lapses.
 */
export const DEFAULT_REQUEST_TIMEOUT_MS = 15_000;

/** The most keys one `deleteMany` call takes: S3's DeleteObjects limit. */
export const MAX_DELETE_BATCH = 1000;

/** Every key under `prefix`, page by page. */
export async function* listAll(store: ObjectStore, prefix: string): AsyncGenerator<ListEntry> {
  let continuation: string | undefined;
  do {
    const page = await store.listPage(prefix, continuation);
    yield* page.entries;
    continuation = page.continuation;
  } while (continuation !== undefined);
}

/** Delete every key under `prefix`, in batches. Returns how many keys were deleted. */
export async function deletePrefix(store: ObjectStore, prefix: string): Promise<number> {
  let batch: string[] = [];
  let count = 0;
  for await (const entry of listAll(store, prefix)) {
    batch.push(entry.key);
    if (batch.length === MAX_DELETE_BATCH) {
      await store.deleteMany(batch);
      count += batch.length;
      batch = [];
    }
  }
  if (batch.length > 0) await store.deleteMany(batch);
  return count + batch.length;
}

/** Slice `body` as a ranged GET would: the part of `[offset, offset + length)` that exists. */
export function sliceRange(body: Uint8Array, range: ByteRangeRequest | undefined): Uint8Array {
  if (range === undefined) return body;
  const start = Math.min(range.offsetBytes, body.byteLength);
  const end = Math.min(range.offsetBytes + range.lengthBytes, body.byteLength);
  return body.subarray(start, end);
}
