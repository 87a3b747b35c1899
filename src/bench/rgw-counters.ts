/**
 * Request and byte counters of a local Ceph RGW, read from its admin socket (`ceph daemon ...
 * perf dump`), so every server in the benchmark is counted the same way, by the S3 server itself.
 * Undefined when there is no local RGW to ask.
 */

import { execFileSync } from "node:child_process";
import { existsSync } from "node:fs";
import path from "node:path";

export interface RgwCounters {
  readonly requests: number;
  readonly gets: number;
  readonly getBytes: number;
  readonly puts: number;
  readonly putBytes: number;
}

/** Where infra/rgw-start.sh keeps the admin socket. */
function adminSocket(): string {
  const dir = process.env.S3BLK_RGW_DIR ?? path.join(process.env.TMPDIR ?? "/tmp", "s3blk-rgw");
  return path.join(dir, "run", "ceph-client.rgw.a.asok");
}

export function rgwCounters(): RgwCounters | undefined {
  const socket = adminSocket();
  if (!existsSync(socket)) return undefined;
  try {
    const out = execFileSync("ceph", ["--admin-daemon", socket, "perf", "dump", "rgw"], {
      encoding: "utf8",
      timeout: 10_000,
    });
    const rgw = (JSON.parse(out) as { rgw: Record<string, number> }).rgw;
    return {
      requests: rgw.req ?? 0,
      gets: rgw.get ?? 0,
      getBytes: rgw.get_b ?? 0,
      puts: rgw.put ?? 0,
      putBytes: rgw.put_b ?? 0,
    };
  } catch {
    return undefined;
  }
}
