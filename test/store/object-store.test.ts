/**
 * The ObjectStore contract, on every implementation: memory, local directory, and S3 on a real
 * server (RGW in CI), including the conditional PUTs that leases will need.
 */

import { mkdtempSync, readFileSync, readlinkSync, utimesSync, writeFileSync } from "node:fs";
import { hostname, tmpdir } from "node:os";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { FileStore } from "../../src/store/file-store.js";
import { MemoryStore } from "../../src/store/memory-store.js";
import {
  deletePrefix,
  listAll,
  StoreError,
  type ObjectStore,
} from "../../src/store/object-store.js";
import { S3Store } from "../../src/store/s3-store.js";
import { requireS3 } from "../support/s3-target.js";

const s3 = await requireS3("object store contract on S3");

interface Subject {
  name: string;
  make(): { store: ObjectStore; prefix: string };
}

let n = 0;
const subjects: Subject[] = [
  { name: "memory", make: () => ({ store: new MemoryStore(), prefix: "p" }) },
  {
    name: "file",
    make: () => ({
      store: new FileStore(mkdtempSync(path.join(tmpdir(), "s3blk-store-"))),
      prefix: "p",
    }),
  },
  ...(s3 === undefined
    ? []
    : [
        {
          name: "s3",
          make: () => ({
            store: new S3Store({
              bucket: s3.bucket,
              endpoint: s3.endpoint,
              region: s3.region,
              credentials: s3.credentials,
            }),
            prefix: s3.newVolumeUrl(`store${n++}`).replace(`s3://${s3.bucket}/`, ""),
          }),
        },
      ]),
];

const bytes = (text: string) => new Uint8Array(Buffer.from(text));
const text = (b: Uint8Array | undefined) =>
  b === undefined ? undefined : Buffer.from(b).toString();

async function rejectsWith(promise: Promise<unknown>, code: StoreError["code"]) {
  const error = await promise.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(error).toBeInstanceOf(StoreError);
  expect((error as StoreError).code).toBe(code);
}

describe.each(subjects)("object store: $name", (subject) => {
  it("puts, gets whole and ranged, with metadata, and misses cleanly", async () => {
    const { store, prefix } = subject.make();
    const key = `${prefix}/a/obj`;
    expect(await store.get(key)).toBeUndefined();
    await store.put(key, bytes("0123456789"), { metadata: { "s3blk-x": "abc" } });
    const whole = await store.get(key);
    expect(text(whole?.body)).toBe("0123456789");
    expect(whole?.metadata["s3blk-x"]).toBe("abc");
    expect(whole?.objectSizeBytes).toBe(10);
    const part = await store.get(key, { range: { offsetBytes: 3, lengthBytes: 4 } });
    expect(text(part?.body)).toBe("3456");
    expect(part?.objectSizeBytes).toBe(10);
    expect(part?.metadata["s3blk-x"]).toBe("abc");
    const tail = await store.get(key, { range: { offsetBytes: 8, lengthBytes: 10 } });
    expect(text(tail?.body)).toBe("89");
    await store.close();
  });

  it("reads a body into the buffer `allocate` gives, or into its own when it gives none", async () => {
    const { store, prefix } = subject.make();
    const key = `${prefix}/allocated`;
    const stored = Buffer.alloc(200_003);
    for (let i = 0; i < stored.length; i++) stored[i] = (i * 131) & 0xff;
    await store.put(key, stored);
    const asked: number[] = [];
    const given: Buffer[] = [];
    const allocate = (lengthBytes: number) => {
      asked.push(lengthBytes);
      const buffer = Buffer.alloc(lengthBytes, 0xee);
      given.push(buffer);
      return buffer;
    };
    const whole = await store.get(key, { allocate });
    const ranged = await store.get(key, { range: { offsetBytes: 65_536, lengthBytes: 70_000 } });
    const rangedInto = await store.get(key, {
      range: { offsetBytes: 65_536, lengthBytes: 70_000 },
      allocate,
    });
    // No attempt fails here, so each GET asks once, and its body is the buffer it was given.
    expect(asked).toEqual([stored.length, 70_000]);
    expect(whole?.body).toBe(given[0]);
    expect(rangedInto?.body).toBe(given[1]);
    expect(Buffer.from(whole!.body).equals(stored)).toBe(true);
    expect(Buffer.from(rangedInto!.body).equals(stored.subarray(65_536, 135_536))).toBe(true);
    expect(Buffer.from(ranged!.body).equals(Buffer.from(rangedInto!.body))).toBe(true);
    // Declining gives a fresh buffer of the same bytes.
    const declined = await store.get(key, { allocate: () => undefined });
    expect(Buffer.from(declined!.body).equals(stored)).toBe(true);
    expect(given.some((buffer) => buffer.buffer === declined!.body.buffer)).toBe(false);
    await store.close();
  });

  it("honours If-None-Match: * and If-Match with an unquoted entity tag", async () => {
    const { store, prefix } = subject.make();
    const key = `${prefix}/lease`;
    const first = await store.put(key, bytes("one"), { ifNoneMatch: "*" });
    expect(first.etag).not.toMatch(/"/);
    await rejectsWith(store.put(key, bytes("two"), { ifNoneMatch: "*" }), "PreconditionFailed");
    await rejectsWith(
      store.put(key, bytes("two"), { ifMatch: "0123456789abcdef0123456789abcdef" }),
      "PreconditionFailed",
    );
    const second = await store.put(key, bytes("three"), { ifMatch: first.etag });
    expect(second.etag).not.toBe(first.etag);
    await rejectsWith(store.put(key, bytes("four"), { ifMatch: first.etag }), "PreconditionFailed");
    expect(text((await store.get(key))?.body)).toBe("three");
    await store.close();
  });

  it("lists in key order, deletes one and many, and deleting a missing key succeeds", async () => {
    const { store, prefix } = subject.make();
    const keys = ["c", "a", "b/x", "b/y", "d"].map((k) => `${prefix}/l/${k}`);
    for (const key of keys) await store.put(key, bytes(key));
    await store.put(`${prefix}/other`, bytes("x"));
    const listed: string[] = [];
    for await (const entry of listAll(store, `${prefix}/l/`)) listed.push(entry.key);
    expect(listed).toEqual([...keys].sort());
    await store.delete(`${prefix}/l/a`);
    await store.delete(`${prefix}/l/never-was`);
    await store.deleteMany([`${prefix}/l/b/x`, `${prefix}/l/b/y`, `${prefix}/l/missing`]);
    const left: string[] = [];
    for await (const entry of listAll(store, `${prefix}/l/`)) left.push(entry.key);
    expect(left).toEqual([`${prefix}/l/c`, `${prefix}/l/d`]);
    expect(await deletePrefix(store, `${prefix}/`)).toBe(3);
    expect(await store.get(`${prefix}/other`)).toBeUndefined();
    await store.close();
  });
});

describe("file store", () => {
  it("never shows a temporary file as an object", async () => {
    const root = mkdtempSync(path.join(tmpdir(), "s3blk-store-"));
    const store = new FileStore(root);
    await Promise.all(
      Array.from({ length: 20 }, (_, i) => store.put(`v/k${i % 3}`, bytes(`value ${i}`))),
    );
    const keys: string[] = [];
    for await (const entry of listAll(store, "v/")) keys.push(entry.key);
    expect(keys).toEqual(["v/k0", "v/k1", "v/k2"]);
  });

  it("lets exactly one of many concurrent create-only PUTs win", async () => {
    const store = new FileStore(mkdtempSync(path.join(tmpdir(), "s3blk-store-")));
    const results = await Promise.allSettled(
      Array.from({ length: 10 }, (_, i) =>
        store.put("lease", bytes(`holder ${i}`), { ifNoneMatch: "*" }),
      ),
    );
    expect(results.filter((r) => r.status === "fulfilled")).toHaveLength(1);
  });

  it("lets exactly one of many concurrent If-Match PUTs of one entity tag win", async () => {
    const store = new FileStore(mkdtempSync(path.join(tmpdir(), "s3blk-store-")));
    const { etag } = await store.put("lease", bytes("holder 0"));
    const results = await Promise.allSettled(
      Array.from({ length: 10 }, (_, i) =>
        store.put("lease", bytes(`holder ${i + 1}`), { ifMatch: etag }),
      ),
    );
    expect(results.filter((r) => r.status === "fulfilled")).toHaveLength(1);
    for (const r of results) {
      if (r.status === "rejected") expect((r.reason as StoreError).code).toBe("PreconditionFailed");
    }
  });

  it("breaks at once the If-Match lock of a process that died holding it, and waits out a live one", async () => {
    const root = mkdtempSync(path.join(tmpdir(), "s3blk-store-"));
    const store = new FileStore(root);
    let { etag } = await store.put("lease", bytes("before"));
    const lock = path.join(root, ".s3blk-lock-lease");
    // Where this process's pids mean something (host, boot, pid namespace), and a pid that
    // cannot be alive in it.
    const space = [
      hostname(),
      readFileSync("/proc/sys/kernel/random/boot_id", "utf8").trim(),
      readlinkSync("/proc/self/ns/pid"),
    ].join("/");
    const deadPid = Number(readFileSync("/proc/sys/kernel/pid_max", "utf8")) + 1;

    // Rounds of takers racing to break one dead lock: exactly one may win each.
    for (let round = 0; round < 10; round++) {
      writeFileSync(lock, `${space} ${deadPid}\n`);
      const results = await Promise.allSettled(
        Array.from({ length: 8 }, (_, i) =>
          store.put("lease", bytes(`round ${round} taker ${i}`), { ifMatch: etag }),
        ),
      );
      const won = results.flatMap((r, i) => (r.status === "fulfilled" ? [i] : []));
      expect(won).toHaveLength(1);
      const now = await store.get("lease");
      expect(text(now?.body)).toBe(`round ${round} taker ${won[0]}`);
      etag = now?.etag ?? "";
    }

    writeFileSync(lock, `${space} ${process.pid}\n`);
    await rejectsWith(store.put("lease", bytes("while held"), { ifMatch: etag }), "Transient");
    // The same host, another pid namespace (a container on a shared directory): its pids are
    // not ours to judge.
    writeFileSync(lock, `${space.replace(/\[\d+\]$/, "[1]")} ${deadPid}\n`);
    await rejectsWith(store.put("lease", bytes("while held"), { ifMatch: etag }), "Transient");
    // A holder this host cannot see is trusted until its lock is older than any real hold.
    writeFileSync(lock, "another-host 1\n");
    await rejectsWith(store.put("lease", bytes("while held"), { ifMatch: etag }), "Transient");
    const longAgo = new Date(Date.now() - 120_000);
    utimesSync(lock, longAgo, longAgo);
    await store.put("lease", bytes("after the age"), { ifMatch: etag });
    expect(text((await store.get("lease"))?.body)).toBe("after the age");
  });

  it("refuses keys that would escape its root", async () => {
    const store = new FileStore(mkdtempSync(path.join(tmpdir(), "s3blk-store-")));
    await rejectsWith(store.put("../escape", bytes("x")), "Permanent");
    await rejectsWith(store.put("a//b", bytes("x")), "Permanent");
  });
});

describe("memory store", () => {
  it("keeps its own copy: neither the caller's buffer nor a returned body aliases it", async () => {
    const store = new MemoryStore();
    const body = Buffer.from("original");
    await store.put("k", body);
    body.write("CHANGED!");
    const got = await store.get("k");
    expect(text(got?.body)).toBe("original");
    got?.body.fill(0);
    expect(text((await store.get("k"))?.body)).toBe("original");
  });
});
