/**
 * `s3blk clone` and `s3blk gc`, registered on the program by `register`.
 */

import { InvalidArgumentError, type Command } from "commander";
import { cloneVolume, gcVolume } from "../lifecycle/clone-lifecycle.js";
import { DEFAULT_GC_GRACE_MS } from "../volume/garbage.js";
import { SnapshotError, splitSnapshotUrl } from "../volume/snapshots.js";
import type { StoreStack } from "../store/store-stack.js";
import { parseDuration } from "./durations.js";
import { formatSize } from "./sizes.js";

/** How a command reaches a volume's stack (and closes it after). */
export type WithStack = <T>(url: string, use: (stack: StoreStack) => Promise<T>) => Promise<T>;

/** A duration of 0 or more, for the grace: 0 deletes at once. */
export function graceOption(value: string): number {
  const ms = parseDuration(value);
  if (ms instanceof Error) throw new InvalidArgumentError(ms.message);
  return ms;
}

export function register(
  program: Command,
  withStack: WithStack,
  out: (line: string) => void,
): void {
  program
    .command("clone")
    .description(
      "Make a new volume that starts as a snapshot of another, in the same bucket: nothing is copied",
    )
    .argument("<source>", "the snapshot: <url>@<name>")
    .argument("<new-url>", "the new volume, beside the base (same bucket and endpoint)")
    .action(async (source: string, target: string) => {
      const { url, snapshot } = splitSnapshotUrl(source);
      if (snapshot === undefined) {
        throw new SnapshotError(`a clone is made from a snapshot: write ${source}@<name>`);
      }
      await withStack(url, (base) =>
        withStack(target, async (clone) => {
          const superblock = await cloneVolume(base, snapshot, clone);
          out(
            `${clone.url} (a clone of ${base.url}@${snapshot}, volume id ${superblock.volumeId})`,
          );
        }),
      );
    });

  program
    .command("gc")
    .description("Delete the volume's objects that nothing reads any more")
    .argument("<url>", "the volume")
    .option("--dry-run", "say what would be deleted, and delete nothing")
    .option(
      "--grace <duration>",
      "keep what became garbage less than this long ago, for readers that opened before (default 15m)",
      graceOption,
    )
    .action(async (url: string, options: { dryRun?: boolean; grace?: number }) => {
      await withStack(url, async (stack) => {
        const report = await gcVolume(stack, {
          graceMs: options.grace ?? DEFAULT_GC_GRACE_MS,
          dryRun: options.dryRun ?? false,
        });
        const verb = options.dryRun ? "would delete" : "deleted";
        for (const key of report.deleted) out(`${verb} ${key}`);
        out(
          `${stack.url}: ${verb} ${report.deleted.length} object${report.deleted.length === 1 ? "" : "s"} ` +
            `(${formatSize(report.deletedBytes)}); ${report.keptWithinGrace} kept within the grace`,
        );
      });
    });
}
