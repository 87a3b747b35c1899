/**
 * `s3blk snapshot create|list|delete|rollback`: the snapshot commands, registered on the
 * program by `register`. Each opens the volume's store stack for the one operation and closes it.
 */

import type { Command } from "commander";
import {
  createSnapshot,
  deleteSnapshot,
  listSnapshots,
  rollbackVolume,
} from "../lifecycle/snapshot-lifecycle.js";
import type { StoreStack } from "../store/store-stack.js";

/** How a command reaches a volume's stack (and closes it after). */
export type WithStack = <T>(url: string, use: (stack: StoreStack) => Promise<T>) => Promise<T>;

export function register(
  program: Command,
  withStack: WithStack,
  out: (line: string) => void,
): void {
  const snapshot = program
    .command("snapshot")
    .description("Create, list, delete snapshots of a volume, or roll it back to one");

  snapshot
    .command("create")
    .description("Take a snapshot of the volume (refused while another process serves it)")
    .argument("<url>", "the volume")
    .argument("<name>", "1 to 64 characters of A-Z a-z 0-9 . _ -")
    .action(async (url: string, name: string) => {
      await withStack(url, async (stack) => {
        const record = await createSnapshot(stack, name);
        out(
          `created snapshot ${stack.url}@${record.name} (${Object.keys(record.chunks).length} chunks)`,
        );
      });
    });

  snapshot
    .command("list")
    .description("List the volume's snapshots, oldest first")
    .argument("<url>", "the volume")
    .option("--json", "print JSON")
    .action(async (url: string, options: { json?: boolean }) => {
      await withStack(url, async (stack) => {
        const snapshots = await listSnapshots(stack);
        if (options.json) {
          out(JSON.stringify(snapshots, null, 2));
          return;
        }
        if (snapshots.length === 0) out(`${stack.url} has no snapshots`);
        for (const s of snapshots) {
          out(
            `${s.name}\t${s.createdAt}\t${s.chunks} chunks${s.deleting ? "\tbeing deleted" : ""}`,
          );
        }
      });
    });

  snapshot
    .command("delete")
    .description(
      "Delete a snapshot (refused while clones depend on it); the data only it held is freed after the grace",
    )
    .argument("<url>", "the volume")
    .argument("<name>", "the snapshot")
    .action(async (url: string, name: string) => {
      await withStack(url, async (stack) => {
        await deleteSnapshot(stack, name);
        out(`deleted snapshot ${stack.url}@${name}`);
      });
    });

  snapshot
    .command("rollback")
    .description("Make the volume read as the snapshot again; later snapshots stay")
    .argument("<url>", "the volume")
    .argument("<name>", "the snapshot")
    .action(async (url: string, name: string) => {
      await withStack(url, async (stack) => {
        await rollbackVolume(stack, name);
        out(`rolled ${stack.url} back to snapshot ${name}`);
      });
    });
}
