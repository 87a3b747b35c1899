/**
 * The one place that builds a store stack: `buildStoreStack` layers a real store, and
 * `openStoreStack` first turns a volume URL into that real store and a key prefix:
 *
 *     s3://bucket/prefix     S3 (endpoint from the option, AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL)
 *     file:///path/to/dir    a local directory (also a plain path)
 *     memory://name[/prefix] this process's memory, for tests
 *
 * A directory's store is its parent, and the directory's name its prefix, so that volumes side
 * by side share one key space, as volumes in one bucket do: that is where a clone may live.
 *
 * The stack, bottom up: the real store, a request counter, [a test layer], the lease fence,
 * then retries. The fence sits below the retries so that each attempt of a write is fenced, not
 * only the first. Nothing above may add a layer of its own: the volume lifecycle takes a stack
 * and uses it as it is.
 */

import assert from "node:assert/strict";
import path from "node:path";
import type { Clock } from "../util/clock.js";
import { systemClock } from "../util/clock.js";
import { CountingStore } from "./counting-store.js";
import { Fence, FencedStore } from "./fenced-store.js";
import { FileStore } from "./file-store.js";
import { namedMemoryStore } from "./memory-store.js";
import { DEFAULT_REQUEST_TIMEOUT_MS, type ObjectStore } from "./object-store.js";
import { RetryStore, type RetryPolicy } from "./retry-store.js";
import { S3Store, type S3StoreOptions } from "./s3-store.js";
import { leaseKey } from "../volume/lease.js";

/** How the layers above the real store behave. */
export interface StoreLayerOptions {
  /**
   * One attempt of a request must be answered within this long, or it fails (and is retried).
   * The lease's fence admits a write only if it can finish this long before the lease lapses,
   * so the two use this one figure. S3 enforces it per request; the other stores answer at
   * local speed. Default {@link DEFAULT_REQUEST_TIMEOUT_MS}.
   */
  readonly requestTimeoutMs?: number;
  readonly retry?: Partial<RetryPolicy>;
  readonly clock?: Clock;
  /** Put a layer (fault injection, say) between the counter and the fence. */
  readonly wrap?: (store: ObjectStore) => ObjectStore;
}

/** How to reach the real store of a URL, and the layers above it. */
export interface StoreStackOptions extends StoreLayerOptions {
  /** S3 endpoint, overriding the environment. */
  readonly endpoint?: string;
  readonly credentials?: S3StoreOptions["credentials"];
  readonly region?: string;
}

export interface StoreStack {
  /** The top of the stack: what a volume uses. */
  readonly store: ObjectStore;
  /** The counter on the real store. */
  readonly counter: CountingStore;
  /** The retry layer at the top (the same object as `store`), which counts its retries. */
  readonly retry: RetryStore;
  /** Armed by the volume's lease: refuses writes the lease does not cover. */
  readonly fence: Fence;
  /** The volume's key prefix inside the store ("" for the whole store). */
  readonly prefix: string;
  /** A canonical form of the URL, for messages. */
  readonly url: string;
  /**
   * The key space the prefix is in: a bucket at an endpoint, a directory, a memory store. Two
   * volumes in one space can name each other's objects (a clone and its base).
   */
  readonly space: string;
  /** What one request attempt may take (see {@link StoreLayerOptions.requestTimeoutMs}). */
  readonly requestTimeoutMs: number;
}

/** A volume URL that cannot be used. */
export class StoreUrlError extends Error {
  override readonly name = "StoreUrlError";
}

/** The stack of the volume at `url`. */
export function openStoreStack(url: string, options: StoreStackOptions = {}): StoreStack {
  const { base, prefix, canonical } = baseStore(url, options);
  return buildStoreStack(base, { prefix, url: canonical }, options);
}

/** The stack over a real store that is already open (`openStoreStack` does this for a URL). */
export function buildStoreStack(
  base: ObjectStore,
  where: { readonly prefix: string; readonly url: string },
  options: StoreLayerOptions = {},
): StoreStack {
  const requestTimeoutMs = options.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS;
  assert(requestTimeoutMs > 0, `requestTimeoutMs must be positive, not ${requestTimeoutMs}`);
  const counter = new CountingStore(base, { leaseKey: leaseKey(where.prefix) });
  const middle = options.wrap?.(counter) ?? counter;
  const fence = new Fence();
  const store = new RetryStore(new FencedStore(middle, fence), {
    clock: options.clock ?? systemClock,
    ...(options.retry === undefined ? {} : { policy: options.retry }),
  });
  const stack = {
    store,
    retry: store,
    counter,
    fence,
    prefix: where.prefix,
    url: where.url,
    space: base.description,
    requestTimeoutMs,
  };
  builtStacks.add(stack);
  return stack;
}

/** The stacks built here, so that a writable open can check its fence is a real one. */
const builtStacks = new WeakSet<object>();

/**
 * Whether `stack` came from {@link buildStoreStack} (or {@link openStoreStack}): then its fence
 * is the one below its retries. A stack put together by hand may carry a fence no layer checks.
 */
export function isBuiltStack(stack: object): boolean {
  return builtStacks.has(stack);
}

/** The volume in directory `root`: its parent's store, under its name. */
function directoryStore(root: string): { base: ObjectStore; prefix: string; canonical: string } {
  return {
    base: new FileStore(path.dirname(root)),
    prefix: path.basename(root),
    canonical: `file://${root}`,
  };
}

function baseStore(
  url: string,
  options: StoreStackOptions,
): { base: ObjectStore; prefix: string; canonical: string } {
  const scheme = /^([a-z][a-z0-9+.-]*):\/\//i.exec(url)?.[1]?.toLowerCase();
  if (scheme === undefined) {
    if (url === "" || url.includes("://")) throw new StoreUrlError(`invalid volume URL "${url}"`);
    return directoryStore(path.resolve(url));
  }
  const rest = url.slice(scheme.length + 3);
  switch (scheme) {
    case "s3": {
      const slash = rest.indexOf("/");
      const bucket = slash < 0 ? rest : rest.slice(0, slash);
      const prefix = slash < 0 ? "" : rest.slice(slash + 1).replace(/\/+$/, "");
      if (!/^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/.test(bucket)) {
        throw new StoreUrlError(`invalid S3 bucket name "${bucket}" in "${url}"`);
      }
      const base = new S3Store({
        bucket,
        ...(options.endpoint === undefined ? {} : { endpoint: options.endpoint }),
        ...(options.region === undefined ? {} : { region: options.region }),
        ...(options.credentials === undefined ? {} : { credentials: options.credentials }),
        requestTimeoutMs: options.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS,
      });
      return { base, prefix, canonical: `s3://${bucket}/${prefix}` };
    }
    case "file": {
      if (!rest.startsWith("/")) {
        throw new StoreUrlError(`a file URL needs an absolute path: file:///path, not "${url}"`);
      }
      return directoryStore(path.resolve(decodeURIComponent(rest)));
    }
    case "memory": {
      const [name = "", ...parts] = rest.replace(/\/+$/, "").split("/");
      if (name === "") throw new StoreUrlError(`a memory URL needs a name: memory://name`);
      const prefix = parts.join("/");
      return {
        base: namedMemoryStore(name),
        prefix,
        canonical: `memory://${rest.replace(/\/+$/, "")}`,
      };
    }
    default:
      throw new StoreUrlError(
        `unknown scheme "${scheme}" in "${url}": use s3://bucket/prefix, file:///path or memory://name`,
      );
  }
}
