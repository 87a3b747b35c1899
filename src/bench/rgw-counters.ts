/**
 * Request and byte counters of a local Ceph RGW, read from its admin socket (`ceph daemon ...
 * perf dump`), so every server in the benchmark is counted the same way, by the S3 server itself.
 * Undefined when there is no local RGW to ask.
 */

import { execFileSync } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import path from "node:path";

export interface RgwCounters {
  readonly requests: number;
  readonly gets: number;
  readonly getBytes: number;
  readonly puts: number;
  readonly putBytes: number;
}

/** Where infra/rgw-start.sh keeps its admin sockets and pid files. */
function runDir(): string {
  const dir = process.env.S3BLK_RGW_DIR ?? path.join(process.env.TMPDIR ?? "/tmp", "s3blk-rgw");
  return path.join(dir, "run");
}

function adminSocket(): string {
  return path.join(runDir(), "ceph-client.rgw.a.asok");
}

/**
 * The pids of the local S3 server's processes (the gateway and the OSD that stores its data),
 * whose CPU a turn on this machine shares: empty when there is no local RGW.
 */
export function rgwPids(): number[] {
  const pids: number[] = [];
  for (const file of ["rgw.pid", "osd.pid"]) {
    try {
      const pid = Number(readFileSync(path.join(runDir(), file), "utf8").trim());
      if (Number.isSafeInteger(pid) && pid > 0) pids.push(pid);
    } catch {
      // not running here
    }
  }
  return pids;
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
