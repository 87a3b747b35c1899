#!/usr/bin/env node
/**
 * The `s3blk` executable. It loads the command line (program.ts) only after `serve` has had its
 * chance to restart with its memory settings (serve-memory.ts): a restart after loading would
 * pay for loading the AWS SDK and the rest (about 100 ms) twice.
 */

import { restartServeWithMemorySettings } from "./serve-memory.js";

restartServeWithMemorySettings();
const { main } = await import("./program.js");
process.exitCode = await main(process.argv.slice(2));
