/**
 * vitest's setupFiles: runs in each test file's process before the file. The S3 clients made
 * in process see only the AWS variables the tests set (see environment.ts).
 */

import { restrictTestProcessEnv } from "./environment.js";

restrictTestProcessEnv();
