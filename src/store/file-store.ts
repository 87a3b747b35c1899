/**
 * An object store in a local directory: the embedded default, so s3blk runs with no S3 at all.
 *
 * A key `a/b/c` is the file `<root>/a/b/c`. Each file holds a small header (magic, metadata and
 * entity tag as JSON) followed by the object's bytes, so an object and its metadata are replaced
 * together.
 *
 * Writes are atomic and durable: the new object is written to a temporary file beside the target,
 * fsynced, renamed over the target, and the directory is fsynced. A crash leaves the old object or
 * the new one, never a mix; a leftover temporary file is ignored by `get` and `list`.
 *
 * Conditional writes hold across processes: `ifNoneMatch: "*"` publishes with `link(2)`, which
 * fails if the target exists; `ifMatch` takes a lock file around compare-and-rename (see
 * {@link takeLock}).
 */

import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { constants as fsConstants, readFileSync, readlinkSync } from "node:fs";
import { link, mkdir, open, readdir, rename, rm, stat, unlink, writeFile } from "node:fs/promises";
import { hostname } from "node:os";
import path from "node:path";
import {
  MAX_DELETE_BATCH,
  StoreError,
  type GetOptions,
  type GetResult,
  type ListEntry,
  type ListPage,
  type ObjectMetadata,
  type ObjectStore,
  type PutOptions,
  type PutResult,
} from "./object-store.js";
import { readFully } from "../util/read-fully.js";

const MAGIC = Buffer.from("S3BLKOB1", "ascii");
/** Magic (8) + header JSON length (4). */
const FIXED_HEADER_BYTES = 12;
/** Headers are small; refuse to parse one that claims more. */
const MAX_HEADER_JSON_BYTES = 64 * 1024;
/** Names of our own scratch files, which are never objects. */
const SCRATCH_PREFIX = ".s3blk-";
/**
 * A lock file older than this was left by a crashed process, whoever its holder was. A lock is
 * held for one compare-and-rename, milliseconds; one whose holder is seen to be dead is broken at
 * once (see {@link takeLock}).
 */
const STALE_LOCK_MS = 30_000;
/** How long {@link takeLock} waits for a live holder before it reports the lock as held. */
const LOCK_WAIT_MS = 2_000;
const LOCK_POLL_MS = 10;

interface Header {
  readonly etag: string;
  readonly metadata: ObjectMetadata;
}

export class FileStore implements ObjectStore {
  readonly description: string;

  constructor(readonly root: string) {
    this.description = `file://${root}`;
  }

  async get(key: string, options?: GetOptions): Promise<GetResult | undefined> {
    const file = this.#path(key);
    let handle;
    try {
      handle = await open(file, "r");
    } catch (error) {
      if (isCode(error, "ENOENT") || isCode(error, "ENOTDIR")) return undefined;
      throw storeError(error, `open ${file}`);
    }
    try {
      const fixed = Buffer.alloc(FIXED_HEADER_BYTES);
      await readFully(handle, fixed, 0, truncated);
      if (!fixed.subarray(0, MAGIC.length).equals(MAGIC)) {
        throw new StoreError("Permanent", `${file} is not an s3blk object file`);
      }
      const jsonBytes = fixed.readUInt32BE(MAGIC.length);
      if (jsonBytes > MAX_HEADER_JSON_BYTES) {
        throw new StoreError("Permanent", `${file} has a header of ${jsonBytes} bytes`);
      }
      const json = Buffer.alloc(jsonBytes);
      await readFully(handle, json, FIXED_HEADER_BYTES, truncated);
      const header = JSON.parse(json.toString("utf8")) as Header;
      const dataStart = FIXED_HEADER_BYTES + jsonBytes;
      const objectSizeBytes = (await handle.stat()).size - dataStart;
      const offset = Math.min(options?.range?.offsetBytes ?? 0, objectSizeBytes);
      const end = Math.min(
        options?.range === undefined ? objectSizeBytes : offset + options.range.lengthBytes,
        objectSizeBytes,
      );
      const body = options?.allocate?.(end - offset) ?? Buffer.allocUnsafe(end - offset);
      assert.equal(body.byteLength, end - offset, "an allocated body's length");
      await readFully(handle, body, dataStart + offset, truncated);
      return { body, metadata: header.metadata, etag: header.etag, objectSizeBytes };
    } catch (error) {
      if (error instanceof StoreError) throw error;
      throw storeError(error, `read ${file}`);
    } finally {
      await handle.close();
    }
  }

  async put(key: string, body: Uint8Array, options?: PutOptions): Promise<PutResult> {
    const file = this.#path(key);
    const dir = path.dirname(file);
    const etag = createHash("md5").update(body).digest("hex");
    const json = Buffer.from(JSON.stringify({ etag, metadata: options?.metadata ?? {} }), "utf8");
    const fixed = Buffer.alloc(FIXED_HEADER_BYTES);
    MAGIC.copy(fixed);
    fixed.writeUInt32BE(json.length, MAGIC.length);
    const temp = path.join(dir, `${SCRATCH_PREFIX}tmp-${randomBytes(8).toString("hex")}`);
    try {
      await mkdir(dir, { recursive: true });
      const handle = await open(temp, "wx");
      try {
        await handle.writev([fixed, json, body]);
        await handle.sync();
      } finally {
        await handle.close();
      }
      if (options?.ifNoneMatch === "*") {
        await this.#publishIfAbsent(temp, file, key);
      } else if (options?.ifMatch !== undefined) {
        await this.#publishIfMatch(temp, file, key, options.ifMatch);
      } else {
        await rename(temp, file);
      }
      await syncDirectory(dir);
      return { etag };
    } catch (error) {
      await rm(temp, { force: true });
      if (error instanceof StoreError) throw error;
      throw storeError(error, `write ${file}`);
    }
  }

  async #publishIfAbsent(temp: string, file: string, key: string): Promise<void> {
    try {
      await link(temp, file);
    } catch (error) {
      if (isCode(error, "EEXIST")) throw new StoreError("PreconditionFailed", `${key} exists`);
      throw error;
    }
    await unlink(temp);
  }

  async #publishIfMatch(temp: string, file: string, key: string, etag: string): Promise<void> {
    const lock = path.join(path.dirname(file), `${SCRATCH_PREFIX}lock-${path.basename(file)}`);
    await takeLock(lock);
    try {
      const current = await this.get(key, { range: { offsetBytes: 0, lengthBytes: 0 } });
      if (current?.etag !== etag) {
        throw new StoreError("PreconditionFailed", `${key} does not have etag ${etag}`);
      }
      await rename(temp, file);
    } finally {
      await rm(lock, { force: true });
    }
  }

  async delete(key: string): Promise<void> {
    const file = this.#path(key);
    try {
      await unlink(file);
    } catch (error) {
      if (isCode(error, "ENOENT") || isCode(error, "ENOTDIR")) return;
      throw storeError(error, `delete ${file}`);
    }
  }

  async deleteMany(keys: readonly string[]): Promise<void> {
    if (keys.length > MAX_DELETE_BATCH) {
      throw new StoreError("Permanent", `deleteMany of ${keys.length} keys`);
    }
    await Promise.all(keys.map((key) => this.delete(key)));
  }

  /** Lists everything under `prefix` in one page: a local directory needs no paging. */
  async listPage(prefix: string): Promise<ListPage> {
    const slash = prefix.lastIndexOf("/");
    const dirKey = slash < 0 ? "" : prefix.slice(0, slash);
    const entries: ListEntry[] = [];
    await this.#walk(dirKey, prefix, entries);
    entries.sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0));
    return { entries };
  }

  async #walk(dirKey: string, prefix: string, into: ListEntry[]): Promise<void> {
    const dir = dirKey === "" ? this.root : this.#path(dirKey);
    let names;
    try {
      names = await readdir(dir, { withFileTypes: true });
    } catch (error) {
      if (isCode(error, "ENOENT") || isCode(error, "ENOTDIR")) return;
      throw storeError(error, `list ${dir}`);
    }
    for (const entry of names) {
      if (entry.name.startsWith(SCRATCH_PREFIX)) continue;
      const key = dirKey === "" ? entry.name : `${dirKey}/${entry.name}`;
      if (entry.isDirectory()) {
        if (`${key}/`.startsWith(prefix) || prefix.startsWith(`${key}/`)) {
          await this.#walk(key, prefix, into);
        }
      } else if (key.startsWith(prefix)) {
        const { size, mtimeMs } = await stat(path.join(dir, entry.name));
        into.push({ key, sizeBytes: size, lastModifiedMs: Math.floor(mtimeMs) });
      }
    }
  }

  async close(): Promise<void> {}

  #path(key: string): string {
    const parts = key.split("/");
    if (key === "" || parts.some((part) => part === "" || part === "." || part === "..")) {
      throw new StoreError("Permanent", `invalid object key ${JSON.stringify(key)}`);
    }
    return path.join(this.root, ...parts);
  }
}

function truncated(): StoreError {
  return new StoreError("Permanent", "object file is truncated");
}

async function syncDirectory(dir: string): Promise<void> {
  const handle = await open(dir, fsConstants.O_RDONLY | fsConstants.O_DIRECTORY);
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

/**
 * Takes the lock file `lock` (an `O_EXCL`-style create, by `link(2)` of a file already written,
 * so that a lock is never seen half-made). It names its holder: {@link processSpace} and pid.
 *
 * A process killed inside the few milliseconds it holds a lock leaves the file behind. Its next
 * taker breaks it at once when the holder ran in the same process space (host, boot and pid
 * namespace: a container beside it on a shared directory is another) and its pid is gone, and
 * otherwise (another host sharing the directory, a lock from an older s3blk, a pid since reused)
 * once it is older than {@link STALE_LOCK_MS}. See {@link breakIfStale} for why two takers of one
 * dead lock cannot both win.
 */
async function takeLock(lock: string): Promise<void> {
  const mine = `${lock}-${randomBytes(8).toString("hex")}`;
  await writeFile(mine, holderLine(), { flag: "wx" });
  try {
    const deadlineMs = Date.now() + LOCK_WAIT_MS;
    for (;;) {
      try {
        await link(mine, lock);
        return;
      } catch (error) {
        if (!isCode(error, "EEXIST")) throw error;
      }
      if (await breakIfStale(lock)) continue;
      if (Date.now() > deadlineMs) throw new StoreError("Transient", `lock ${lock} is held`);
      await new Promise((resolve) => setTimeout(resolve, LOCK_POLL_MS));
    }
  } finally {
    await rm(mine, { force: true });
  }
}

/** This process, as a lock file names it. */
function holderLine(): string {
  return `${processSpace()} ${process.pid}\n`;
}

let space: string | undefined;

/**
 * Where this process's pids mean something: host name, boot id and pid namespace. A part this
 * system does not show is `?`, and then no lock is judged by its pid.
 */
function processSpace(): string {
  space ??= [
    hostname(),
    shown(() => readFileSync("/proc/sys/kernel/random/boot_id", "utf8")),
    shown(() => readlinkSync("/proc/self/ns/pid")),
  ].join("/");
  return space;
}

/** What `read` returns, trimmed, or `?` if the system does not show it. */
function shown(read: () => string): string {
  try {
    return read().trim();
  } catch {
    return "?";
  }
}

/**
 * Removes `lock` if its holder is gone; true if the lock is gone now. Breakers take a guard
 * file first and look again under it: a lock whose holder is dead is neither released nor
 * replaced, so what the second look saw is what is unlinked, and a taker that judged an
 * earlier lock dead cannot unlink a live one taken since. A guard outlives its breaker only
 * if that process too was killed within milliseconds; it is then removed by age.
 */
async function breakIfStale(lock: string): Promise<boolean> {
  const seen = await lockHolder(lock);
  if (seen === undefined) return true;
  if (!seen.stale) return false;
  const guard = `${lock}-breaking`;
  try {
    await writeFile(guard, holderLine(), { flag: "wx" });
  } catch (error) {
    if (!isCode(error, "EEXIST")) throw error;
    const age = await stat(guard).then(
      (s) => Date.now() - s.mtimeMs,
      () => 0,
    );
    if (age > STALE_LOCK_MS) await rm(guard, { force: true });
    return false;
  }
  try {
    const now = await lockHolder(lock);
    if (now?.stale === true) await rm(lock, { force: true });
    return true;
  } finally {
    await rm(guard, { force: true });
  }
}

/** Whether the holder of the lock file `file` is gone; undefined if there is no such file. */
async function lockHolder(file: string): Promise<{ stale: boolean } | undefined> {
  let handle;
  try {
    handle = await open(file, "r");
  } catch (error) {
    if (isCode(error, "ENOENT")) return undefined;
    throw error;
  }
  try {
    // One open file for both, so the holder read is the file whose age is judged.
    const [{ mtimeMs }, text] = await Promise.all([handle.stat(), handle.readFile("utf8")]);
    const [where, pid] = text.trim().split(" ");
    const ours = processSpace();
    const dead =
      where === ours && !ours.includes("?") && pid !== undefined && !isAlive(Number(pid));
    return { stale: dead || Date.now() - mtimeMs > STALE_LOCK_MS };
  } finally {
    await handle.close();
  }
}

function isAlive(pid: number): boolean {
  if (!Number.isSafeInteger(pid) || pid <= 0) return true;
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return !isCode(error, "ESRCH");
  }
}

function isCode(error: unknown, code: string): boolean {
  return (error as NodeJS.ErrnoException | undefined)?.code === code;
}

/** One table: file-system errors to store errors. */
function storeError(error: unknown, what: string): StoreError {
  const code = (error as NodeJS.ErrnoException | undefined)?.code;
  const message = `${what}: ${(error as Error | undefined)?.message ?? String(error)}`;
  switch (code) {
    case "EACCES":
    case "EPERM":
    case "EROFS":
      return new StoreError("AccessDenied", message, { cause: error });
    case "EAGAIN":
    case "EBUSY":
    case "EMFILE":
    case "ENFILE":
    case "EINTR":
      return new StoreError("Transient", message, { cause: error });
    default:
      return new StoreError("Permanent", message, { cause: error });
  }
}
