/**
 * kill -9 of `s3blk clone` and of `s3blk gc` (with a writer running beside it) at random moments
 * of a measured whole run. After every kill, in this process: the base volume, every snapshot
 * and every clone read exactly as the model says, and running the command again completes. A
 * crash leaves at most garbage: a second gc leaves exactly the objects something reads, and once
 * the clones are deleted, nothing of them is left and their snapshot can be deleted.
 *
 * A run's first ~0.3 s is Node starting and loading the CLI, and how long that takes varies by
 * more than the whole of the requests under load, so a kill is timed from the run's first write
 * (before it, the run has only read): at a random moment within the span from its first write to
 * its end, measured on the last whole run. On S3 the CLI goes through a proxy (forwarding,
 * injecting nothing) that sees each request arrive; on a local directory, a watch on the
 * directory sees each file written. CLONE_GC_CRASH_ROUNDS (default 8) sets the rounds of each
 * test, half of them killed.
 */

import { mkdtempSync, watch } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { afterAll, describe, expect, it } from "vitest";
import { cloneVolume } from "../../src/lifecycle/clone-lifecycle.js";
import { createSnapshot, deleteSnapshot } from "../../src/lifecycle/snapshot-lifecycle.js";
import {
  createVolume,
  deleteVolume,
  openVolume,
  readSuperblock,
  type OpenOptions,
} from "../../src/lifecycle/volume-lifecycle.js";
import type { ChunkedBlockDevice } from "../../src/device/chunked-block-device.js";
import { listAll } from "../../src/store/object-store.js";
import { openStoreStack, type StoreStackOptions } from "../../src/store/store-stack.js";
import { FaultProxy } from "../support/fault-proxy.js";
import { runCliKilledWhen, type KilledRun } from "../support/serve-process.js";
import { requireS3, s3Env, stackOptions } from "../support/s3-target.js";
import { pattern, siblingUrl } from "../support/volumes.js";

const ROUNDS = Number(process.env.CLONE_GC_CRASH_ROUNDS ?? 8);
const CHUNK = 64 * 1024;
const CHUNKS = 32;
const SPC = CHUNK / 512;
const PARAMS = { sizeBytes: CHUNKS * CHUNK, chunkSizeBytes: CHUNK };
const HOUR = 3_600_000;

const s3 = await requireS3("clone and gc crash loop on S3");

interface Backend {
  readonly name: string;
  newUrl(label: string): string;
  readonly env: NodeJS.ProcessEnv;
  readonly options: StoreStackOptions;
  /** The directory the volumes are in, for a local one. */
  readonly root: string;
  readonly proxy?: FaultProxy;
}

/** On S3, the CLI's requests go through this proxy, which logs when each arrived. */
const proxy = s3 === undefined ? undefined : await FaultProxy.start(s3.endpoint);
afterAll(() => proxy?.stop());

function backends(): Backend[] {
  const dir = mkdtempSync(path.join(tmpdir(), "s3blk-clonecrash-"));
  let n = 0;
  const list: Backend[] = [
    {
      name: "local directory",
      newUrl: (label) => `file://${dir}/${label}-${n++}`,
      env: {},
      options: {},
      root: dir,
    },
  ];
  if (s3 !== undefined) {
    list.push({
      name: "S3",
      newUrl: (label) => s3.newVolumeUrl(label),
      env: s3Env(s3, proxy?.endpoint),
      options: stackOptions(s3),
      root: "",
      proxy,
    });
  }
  return list;
}

/**
 * Watch a run's requests from its first write whose key holds `keyPart`: when each was seen. On
 * S3 every request through the proxy counts, once the first write came; on a local directory,
 * every file written whose name holds `keyPart`.
 */
function watchWrites(backend: Backend, keyPart: string): { seen: number[]; close(): void } {
  const seen: number[] = [];
  const proxy = backend.proxy;
  if (proxy !== undefined) {
    let from = proxy.requests.length;
    const poll = setInterval(() => {
      for (const r of proxy.requests.slice(from)) {
        if (seen.length > 0 || (r.method === "PUT" && r.path.includes(keyPart))) {
          seen.push(r.receivedAtMs);
        }
      }
      from = proxy.requests.length;
    }, 2);
    return { seen, close: () => clearInterval(poll) };
  }
  const watcher = watch(backend.root, { recursive: true }, (_event, file) => {
    if (file?.includes(keyPart)) seen.push(Date.now());
  });
  return { seen, close: () => watcher.close() };
}

/**
 * Past the planned rounds, while no kill has hit a running process yet: more rounds, up to
 * twice as many (each kill round aims earlier than the last one that missed).
 */
function untilKilled(round: number, outcomes: ReadonlySet<string>): boolean {
  return round <= 2 * ROUNDS && !outcomes.has("SIGKILL");
}

/** Runs of one command, killed at random moments after their first write. */
class Killer {
  /** From the first write to the last request of the last whole run. */
  #spanMs = 100;
  /**
   * A local directory's watch narrowed to the run's own files (another process writes beside
   * it) sees only the run's first writes: then the span runs to its exit.
   */
  readonly #untilExit: boolean;

  constructor(
    private readonly backend: Backend,
    private readonly keyPart: string,
  ) {
    this.#untilExit = backend.proxy === undefined && keyPart !== "";
  }

  /** Run `args` to its end (and measure it), or kill it at a random moment. */
  async run(args: readonly string[], toEnd: boolean): Promise<KilledRun> {
    const writes = watchWrites(this.backend, this.keyPart);
    const started = async () => {
      while (writes.seen.length === 0) await sleep(1);
    };
    try {
      const kill = toEnd
        ? new Promise<void>(() => {})
        : started().then(() => sleep(Math.random() * this.#spanMs));
      const run = await runCliKilledWhen(args, this.backend.env, kill);
      // A kill that came after the end: aim earlier from now on (the measured span ends at
      // the last request, and on a busy machine the process may exit sooner after it).
      if (!toEnd && run.outcome === "0") this.#spanMs /= 2;
      await sleep(20); // the last events, polled
      const [first, last] = [writes.seen[0], writes.seen.at(-1)];
      if (toEnd && first !== undefined && last !== undefined) {
        const end = this.#untilExit ? run.startedAtMs + run.ranMs : last + 20;
        this.#spanMs = Math.max(1, end - first);
      }
      return run;
    } finally {
      writes.close();
    }
  }
}

describe.each(backends())("kill -9 during clone and gc on $name", (backend) => {
  const stack = (url: string) =>
    openStoreStack(url, { ...backend.options, retry: { baseDelayMs: 1 } });

  async function open(url: string, options: OpenOptions = {}): Promise<ChunkedBlockDevice> {
    return openVolume(stack(url), { writebackDelayMs: 20, gcGraceMs: 0, ...options });
  }

  async function write(device: ChunkedBlockDevice, sector: number, bytes: Uint8Array) {
    expect((await device.write(sector, [bytes])).ok).toBe(true);
  }

  /** Read the whole volume at `url` (or its snapshot) and compare with `expected`. */
  async function expectReads(url: string, expected: Buffer, snapshot?: string): Promise<void> {
    const device = await open(url, snapshot === undefined ? { readOnly: true } : { snapshot });
    const bytes = new Uint8Array(CHUNKS * CHUNK);
    const read = await device.read(0, [bytes]);
    await device.disconnect();
    expect(read.ok ? "" : JSON.stringify(read.error)).toBe("");
    const what = `${url}${snapshot === undefined ? "" : `@${snapshot}`}`;
    expect(Buffer.from(bytes).equals(expected), `${what} reads as the model says`).toBe(true);
  }

  it(`s3blk clone: the base, its snapshot and every clone read as expected, ${ROUNDS} rounds`, async () => {
    const baseUrl = backend.newUrl("base");
    await createVolume(stack(baseUrl), PARAMS);
    // Snapshot "gold" holds pattern 1 but in chunks 5 to 8; then the base moves on.
    const gold = Buffer.from(pattern(1, 0, CHUNKS * SPC));
    gold.fill(0, 5 * CHUNK, 9 * CHUNK);
    const volume = Buffer.from(gold);
    const writer = await open(baseUrl);
    await write(writer, 0, gold);
    expect((await writer.snapshot("gold")).ok).toBe(true);
    const moved = pattern(2, 0, 8 * SPC);
    await write(writer, 0, moved);
    Buffer.from(moved).copy(volume);
    expect((await writer.disconnect()).ok).toBe(true);

    const clones = new Map<string, Buffer>();
    const outcomes = new Set<string>();
    // Nothing else writes meanwhile: its first write is whatever it writes first.
    const killer = new Killer(backend, "");
    for (let round = 1; round <= ROUNDS || untilKilled(round, outcomes); round++) {
      const target = siblingUrl(baseUrl, `clone${round}`);
      const args = ["clone", `${baseUrl}@gold`, target];
      const runsToEnd = round % 2 === 1;
      const run = await killer.run(args, runsToEnd);
      outcomes.add(run.outcome);
      if (runsToEnd) expect([run.outcome, run.stderr]).toEqual(["0", ""]);
      const made = await readSuperblock(stack(target)).then(
        () => true,
        () => false,
      );
      if (run.outcome === "0") expect(made).toBe(true);
      // Run again, as a user would after a crash: it completes, or says the clone is there.
      const again = await killer.run(args, true);
      if (made) {
        expect(again.outcome).toBe("1");
        expect(again.stderr).toMatch(/^s3blk: a volume already exists at .*\n$/);
      } else {
        expect([again.outcome, again.stderr]).toEqual(["0", ""]);
        expect(again.stdout).toContain(`a clone of ${baseUrl}@gold`);
      }
      const cloneBytes = Buffer.from(gold);
      clones.set(target, cloneBytes);
      // A clone is a volume of its own: write a chunk of it.
      const chunk = (round * 7) % CHUNKS;
      const own = pattern(100 + round, chunk * SPC, SPC);
      const device = await open(target);
      await write(device, chunk * SPC, own);
      expect((await device.disconnect()).ok).toBe(true);
      Buffer.from(own).copy(cloneBytes, chunk * CHUNK);

      await expectReads(baseUrl, volume);
      await expectReads(baseUrl, gold, "gold");
      for (const [url, bytes] of clones) await expectReads(url, bytes);
      // Every clone holds the snapshot (its reference landed), and nothing else does (a
      // reference a kill left without its clone is not counted): the refusal names them all.
      const refused = await deleteSnapshot(stack(baseUrl), "gold").then(
        () => "deleted",
        (error: Error) => error.message,
      );
      const count = clones.size === 1 ? "a clone depends" : `${clones.size} clones depend`;
      expect(refused).toMatch(new RegExp(`^${count} on snapshot "gold": `));
      for (const url of clones.keys()) {
        expect(refused).toContain(url.slice(url.lastIndexOf("/") + 1));
      }
    }
    // Some kills must have hit a running process, and some runs finished.
    expect(outcomes.has("SIGKILL") && outcomes.has("0")).toBe(true);

    // At most garbage: with the clones deleted, nothing of them is left but the lease (never
    // deleted: its epoch only grows), and nothing holds the snapshot any more.
    for (const url of clones.keys()) {
      const s = stack(url);
      await deleteVolume(s);
      const left: string[] = [];
      for await (const entry of listAll(s.store, `${s.prefix}/`)) left.push(entry.key);
      expect(left, url).toEqual([`${s.prefix}/lease.json`]);
    }
    await deleteSnapshot(stack(baseUrl), "gold");
    const base = stack(baseUrl);
    const refs: string[] = [];
    for await (const entry of listAll(base.store, `${base.prefix}/refs/`)) refs.push(entry.key);
    expect(refs).toEqual([]);
    await expectReads(baseUrl, volume);
  }, 300_000);

  it(`s3blk gc beside a writer: everything reads as expected, and a second gc leaves only what is read, ${ROUNDS} rounds`, async () => {
    const baseUrl = backend.newUrl("gcbase");
    await createVolume(stack(baseUrl), PARAMS);
    const volume = Buffer.from(pattern(1, 0, CHUNKS * SPC));
    const writer = await open(baseUrl);
    await write(writer, 0, volume);
    expect((await writer.disconnect()).ok).toBe(true);
    await createSnapshot(stack(baseUrl), "gold");
    const snapshots = new Map([["gold", Buffer.from(volume)]]);
    // A clone of "gold" with chunks of its own, and a snapshot of it.
    const cloneUrl = siblingUrl(baseUrl, "clone");
    await cloneVolume(stack(baseUrl), "gold", stack(cloneUrl));
    const clone = Buffer.from(volume);
    const cloneWriter = await open(cloneUrl);
    const own = pattern(3, 0, 4 * SPC);
    await write(cloneWriter, 0, own);
    Buffer.from(own).copy(clone);
    expect((await cloneWriter.snapshot("silver")).ok).toBe(true);
    const silver = Buffer.from(clone);
    await write(cloneWriter, 4 * SPC, pattern(4, 4 * SPC, SPC));
    Buffer.from(pattern(4, 4 * SPC, SPC)).copy(clone, 4 * CHUNK);
    expect((await cloneWriter.disconnect()).ok).toBe(true);

    const expectAll = async () => {
      await expectReads(baseUrl, volume);
      for (const [name, bytes] of snapshots) await expectReads(baseUrl, bytes, name);
      await expectReads(cloneUrl, clone);
      await expectReads(cloneUrl, silver, "silver");
    };
    const outcomes = new Set<string>();
    // Its first write is its clock (the writer beside it writes too).
    const killer = new Killer(backend, "/gc/");
    for (let round = 1; round <= ROUNDS || untilKilled(round, outcomes); round++) {
      // This writer keeps its own garbage (an hour's grace): collecting it is gc's work. It
      // holds no lease, so that this process can delete a snapshot beside it (a deletion takes
      // the lease, as a snapshot's creation does); gc, the process killed, takes none.
      const device = await open(baseUrl, { gcGraceMs: HOUR, cacheBytes: 4 * CHUNK, lease: false });
      const rewrite = async (sector: number, sectors: number, seed: number) => {
        const bytes = pattern(seed, sector, sectors);
        await write(device, sector, bytes);
        Buffer.from(bytes).copy(volume, sector * 512);
      };
      for (let i = 0; i < CHUNKS / 3; i++) {
        await rewrite(Math.floor(Math.random() * CHUNKS) * SPC, SPC, 10 * round);
      }
      const name = `r${round}`;
      expect((await device.snapshot(name)).ok).toBe(true);
      snapshots.set(name, Buffer.from(volume));
      // A snapshot deleted two rounds later: its record waits in the trash for gc.
      if (snapshots.delete(`r${round - 2}`)) await deleteSnapshot(stack(baseUrl), `r${round - 2}`);

      // The writer goes on beside gc: whole chunks and 4 KiB blocks, a flush every 8 writes.
      let stop = false;
      const beside = (async () => {
        for (let n = 1; !stop; n++) {
          const block = Math.floor(Math.random() * CHUNKS * 16);
          if (n % 3 === 0) await rewrite(block * 8, 8, 10 * round + 1 + (n % 5));
          else await rewrite(Math.floor(block / 16) * SPC, SPC, 10 * round + 1 + (n % 5));
          if (n % 8 === 0) expect((await device.flush()).ok).toBe(true);
        }
      })();
      const runsToEnd = round % 2 === 1;
      const run = await killer.run(["gc", "--grace", "0", baseUrl], runsToEnd);
      stop = true;
      await beside;
      expect((await device.disconnect()).ok).toBe(true);
      outcomes.add(run.outcome);
      if (runsToEnd) {
        expect([run.outcome, run.stderr]).toEqual(["0", ""]);
        expect(run.stdout).toMatch(/: deleted [1-9]\d* objects /);
      }
      await expectAll();

      // A second run completes, and leaves exactly the objects something reads.
      const again = await killer.run(["gc", "--grace", "0", baseUrl], true);
      expect([again.outcome, again.stderr]).toEqual(["0", ""]);
      await expectOnlyLive(baseUrl, [...snapshots.keys()]);
      await expectAll();
    }
    expect(outcomes.has("SIGKILL") && outcomes.has("0")).toBe(true);
  }, 300_000);

  /**
   * The volume's objects are exactly: its superblock, lease, one seal, its snapshots' records,
   * the reference of the clone, gc's clock, and the chunk objects that the volume or one of its
   * snapshots reads.
   */
  async function expectOnlyLive(url: string, names: readonly string[]): Promise<void> {
    const s = stack(url);
    const read = new Set<string>();
    for (const snapshot of [undefined, ...names]) {
      const device = await open(url, snapshot === undefined ? { readOnly: true } : { snapshot });
      for (let i = 0; i < CHUNKS; i++) {
        const key = device.chunkObjectKey(i);
        if (key !== undefined) read.add(key);
      }
      await device.disconnect();
    }
    const chunks: string[] = [];
    const others: string[] = [];
    for await (const entry of listAll(s.store, `${s.prefix}/`)) {
      const key = entry.key.slice(s.prefix.length + 1);
      (key.startsWith("chunks/") ? chunks : others).push(entry.key);
    }
    expect(chunks.sort()).toEqual([...read].sort());
    const relative = others.map((k) => k.slice(s.prefix.length + 1).replace(/[0-9a-f-]{36}/, "ID"));
    const seals = relative.filter((k) => k.startsWith("seals/"));
    expect(seals).toEqual([expect.stringMatching(/^seals\/[0-9a-f]{8}\.json$/)]);
    expect(relative.filter((k) => !seals.includes(k)).sort()).toEqual(
      [
        "gc/clock",
        "lease.json",
        "refs/gold/ID.json",
        "volume.json",
        ...names.map((n) => `snapshots/${n}.json`),
      ].sort(),
    );
  }
});
