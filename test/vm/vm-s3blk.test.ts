/**
 * A real VM on an s3blk disk: a Linux guest under qemu (TCG) with a virtio-blk disk that qemu
 * backs with `s3blk serve` over NBD. The guest makes an ext4 file system, writes files and their
 * checksums, syncs and powers off. The server is stopped, a *new* server process opens the same
 * volume, and a second boot must find e2fsck clean and every file matching its checksum.
 *
 * Runs on the local store and on S3 (RGW in CI). Skipped with a warning when qemu is missing,
 * except under CI=true.
 */

import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { beforeAll, describe, expect, it } from "vitest";
import { requireS3, s3Env } from "../support/s3-target.js";
import { runCli, startServe } from "../support/serve-process.js";
import { bootGuest, ensureGuest, findExecutable, type GuestImage } from "./guest.js";

const CI = process.env.CI === "true";
const BOOT_TIMEOUT_MS = 150_000;

const missing = findExecutable("qemu-system-x86_64") === undefined;
if (missing && !CI) {
  console.warn(
    "SKIP test/vm/vm-s3blk: qemu-system-x86_64 not on PATH (apt-get install qemu-system-x86)",
  );
}

const s3 = await requireS3("VM on s3blk over S3");

interface Backend {
  readonly name: string;
  readonly url: string;
  readonly env: NodeJS.ProcessEnv;
}

const work = mkdtempSync(path.join(tmpdir(), "s3blk-vm-"));
const backends: Backend[] = [
  { name: "local directory", url: `file://${work}/vol`, env: {} },
  ...(s3 === undefined
    ? []
    : [
        {
          name: "S3",
          url: s3.newVolumeUrl("vm"),
          env: s3Env(s3),
        },
      ]),
];

describe.skipIf(missing && !CI).each(backends)("a VM on s3blk ($name)", (backend) => {
  let guest: GuestImage;
  beforeAll(async () => {
    const image = await ensureGuest();
    if (typeof image === "string") throw new Error(`no guest image: ${image}`);
    guest = image;
  }, 300_000);

  it(
    "formats ext4, writes files, and finds them intact after a server restart",
    async () => {
      expect(await runCli(["create", backend.url, "--size", "1G"], backend.env)).toBe(0);

      const label = backend.name === "S3" ? "s3" : "local";
      const firstSocket = path.join(work, `${label}-1.sock`);
      const first = await startServe([backend.url, "--socket", firstSocket], { env: backend.env });
      const format = await bootGuest({
        ...guest,
        nbdUri: `nbd+unix:///?socket=${firstSocket}`,
        mode: "format",
        timeoutMs: BOOT_TIMEOUT_MS,
      });
      expect(format.serial).toContain("S3BLK-VM: FORMAT-OK");
      expect(format.ok).toBe(true);
      // SIGTERM: finish, flush, exit 0.
      expect(await first.stop()).toBe(0);

      const socket = path.join(work, `${label}-2.sock`);
      const second = await startServe([backend.url, "--socket", socket], { env: backend.env });
      const check = await bootGuest({
        ...guest,
        nbdUri: `nbd+unix:///?socket=${socket}`,
        mode: "check",
        timeoutMs: BOOT_TIMEOUT_MS,
      });
      expect(check.serial).toMatch(/e2fsck.*-> exit 0/);
      expect(check.serial).toContain("S3BLK-VM: CHECK-OK");
      expect(check.ok).toBe(true);
      expect(await second.stop()).toBe(0);
    },
    2 * BOOT_TIMEOUT_MS + 60_000,
  );
});
