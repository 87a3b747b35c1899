/**
 * The VM guest infrastructure (infra/vm, test/vm/guest.ts), proven against a stand-in NBD server
 * until `s3blk serve` exists: a Linux guest under qemu TCG formats ext4 on a virtio-blk disk that
 * qemu backs with an nbdkit export and writes known files; a second boot against the same nbdkit
 * process finds them intact. A sector changed behind the guest's back must make the check fail,
 * or the check proves nothing.
 *
 * Skipped with a warning when qemu-system-x86_64 or nbdkit is missing, except under CI=true,
 * where that is a failure.
 */

import { spawn } from "node:child_process";
import {
  closeSync,
  mkdtempSync,
  openSync,
  readFileSync,
  readSync,
  rmSync,
  truncateSync,
  writeFileSync,
  writeSync,
} from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { childEnv } from "../support/environment.js";
import {
  bootGuest,
  ensureGuest,
  findExecutable,
  type BootResult,
  type GuestImage,
} from "./guest.js";

const CI = process.env.CI === "true";
const TOOLS = ["qemu-system-x86_64", "nbdkit"];
const missing = TOOLS.filter((tool) => findExecutable(tool) === undefined);
const skip = missing.length > 0 && !CI;
if (skip) {
  console.warn(
    `SKIP test/vm/vm-smoke: ${missing.join(" and ")} not on PATH ` +
      `(Debian: apt-get install qemu-system-x86 nbdkit)`,
  );
}

/** A boot under TCG takes 5–15 s here; allow a slow CI machine several times that. */
const BOOT_TIMEOUT_MS = 150_000;
const TEST_TIMEOUT_MS = BOOT_TIMEOUT_MS + 30_000;

interface NbdServer {
  readonly uri: string;
  stop(): Promise<void>;
}

/**
 * nbdkit in the foreground on a unix socket, owned by this process (--exit-with-parent), ready
 * once it has written its PID file (nbdkit writes it after it starts listening).
 */
async function startNbdkit(dir: string, name: string, plugin: string[]): Promise<NbdServer> {
  const socket = path.join(dir, `${name}.sock`);
  const pidFile = path.join(dir, `${name}.pid`);
  const args = ["-f", "--exit-with-parent", "-U", socket, "-P", pidFile, ...plugin];
  const child = spawn("nbdkit", args, { env: childEnv(), stdio: ["ignore", "ignore", "pipe"] });
  let stderr = "";
  child.stderr.on("data", (chunk: Buffer) => {
    stderr += chunk.toString("utf8");
  });
  const exited = new Promise<void>((resolve) => child.once("close", () => resolve()));
  const stop = async () => {
    if (child.pid !== undefined && child.exitCode === null && child.signalCode === null) {
      process.kill(child.pid, "SIGTERM");
    }
    await exited;
  };
  for (let waitedMs = 0; ; waitedMs += 20) {
    if (child.exitCode !== null || child.signalCode !== null) {
      throw new Error(`nbdkit ${args.join(" ")} exited: ${stderr.trim()}`);
    }
    if (readIfExists(pidFile).trim() !== "") break;
    if (waitedMs > 10_000) {
      await stop();
      throw new Error(`nbdkit ${args.join(" ")} not ready after 10 s: ${stderr.trim()}`);
    }
    await sleep(20);
  }
  return { uri: `nbd+unix:///?socket=${socket}`, stop };
}

function readIfExists(file: string): string {
  try {
    return readFileSync(file, "utf8");
  } catch {
    return "";
  }
}

/** The end of the console log, for a failed assertion's message. */
function tail(result: BootResult): string {
  const lines = result.serial.trimEnd().split("\n");
  return [
    `${result.argv.join(" ")}`,
    `exit ${result.exitCode ?? result.signal}, timed out: ${result.timedOut}, ${Math.round(result.durationMs)} ms`,
    ...lines.slice(-60),
  ].join("\n");
}

/** The byte offset in `file` of the sector that starts with `header`, or -1. */
function findSector(file: string, header: string): number {
  const needle = Buffer.from(header);
  const chunk = Buffer.alloc(4 * 1024 * 1024);
  const fd = openSync(file, "r");
  try {
    for (let offset = 0; ; offset += chunk.length) {
      const bytes = readSync(fd, chunk, 0, chunk.length, offset);
      if (bytes === 0) return -1;
      // Sectors start at multiples of 512, and a 4 MiB chunk holds whole sectors.
      const at = chunk.subarray(0, bytes).indexOf(needle);
      if (at >= 0) return offset + at;
    }
  } finally {
    closeSync(fd);
  }
}

describe.skipIf(skip)("the test guest on an nbdkit export", () => {
  let image: GuestImage;
  let work: string;
  const servers: NbdServer[] = [];

  beforeAll(async () => {
    if (missing.length > 0) throw new Error(`CI=true but not on PATH: ${missing.join(", ")}`);
    const guest = await ensureGuest();
    if (typeof guest === "string") throw new Error(`the test guest cannot run: ${guest}`);
    image = guest;
    work = mkdtempSync(path.join(tmpdir(), "s3blk-vm-"));
  }, 600_000);

  afterAll(async () => {
    await Promise.all(servers.map((server) => server.stop()));
    if (work !== undefined) rmSync(work, { recursive: true, force: true });
  });

  async function boot(server: NbdServer, mode: "format" | "check"): Promise<BootResult> {
    const result = await bootGuest({
      ...image,
      nbdUri: server.uri,
      mode,
      timeoutMs: BOOT_TIMEOUT_MS,
    });
    console.info(
      `vm-smoke: ${mode} on ${image.kernelRelease}: ${result.marker ?? "no marker"} ` +
        `in ${(result.durationMs / 1000).toFixed(1)} s`,
    );
    return result;
  }

  describe("nbdkit memory 1G", () => {
    let server: NbdServer;
    beforeAll(async () => {
      server = await startNbdkit(work, "memory", ["memory", "1G"]);
      servers.push(server);
    });

    it(
      "formats ext4 and writes the files",
      async () => {
        const result = await boot(server, "format");
        expect(result.marker, tail(result)).toBe("FORMAT-OK");
        expect(result.ok, tail(result)).toBe(true);
        expect(result.serial).toContain("/dev/vda: 2097152 sectors, ro=0");
      },
      TEST_TIMEOUT_MS,
    );

    it(
      "finds them intact in a second boot against the same server",
      async () => {
        const result = await boot(server, "check");
        expect(result.marker, tail(result)).toBe("CHECK-OK");
        expect(result.ok, tail(result)).toBe(true);
        expect(result.serial).toContain("ro=1"); // check attaches the disk read-only
        expect(result.serial).toMatch(/e2fsck -fn \/dev\/vda -> exit 0/);
        for (const name of ["file-1.bin", "file-2.bin", "file-3.bin"]) {
          expect(result.serial).toContain(`${name}: OK`);
        }
      },
      TEST_TIMEOUT_MS,
    );
  });

  it(
    "fails the check when one sector of a file changed on the server",
    async () => {
      // nbdkit file instead of memory, so that this process can change the disk between boots.
      const disk = path.join(work, "disk.img");
      writeFileSync(disk, "");
      truncateSync(disk, 256 * 1024 * 1024); // sparse
      const server = await startNbdkit(work, "file", ["file", disk]);
      servers.push(server);
      const formatted = await boot(server, "format");
      expect(formatted.marker, tail(formatted)).toBe("FORMAT-OK");

      const at = findSector(disk, "s3blk-vm file 2 sector 0000000100 word ");
      expect(at).toBeGreaterThan(0);
      expect(at % 512).toBe(0);
      const out = openSync(disk, "r+");
      writeSync(out, "#", at + 40); // in the pseudo-random word
      closeSync(out);

      const checked = await boot(server, "check");
      expect(checked.marker, tail(checked)).toBe("CHECK-FAIL sha256sum -c exit 1");
      expect(checked.ok).toBe(false);
      expect(checked.serial).toMatch(/e2fsck -fn \/dev\/vda -> exit 0/); // metadata untouched
      expect(checked.serial).toContain("file-2.bin: FAILED");
      expect(checked.serial).toContain("file-1.bin: OK");
    },
    2 * TEST_TIMEOUT_MS,
  );
});
