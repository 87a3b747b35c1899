/**
 * The environment of the tests, in process and in every process they start. The AWS SDK reads
 * many variables besides the ones a test sets: `AWS_ENDPOINT_URL_S3` wins over
 * `AWS_ENDPOINT_URL`, `AWS_PROFILE` and `AWS_CONFIG_FILE` bring in a profile's `endpoint_url`,
 * `region`, `use_dualstack_endpoint` or `auth_scheme_preference` (the last two apply even to a
 * client given its endpoint, region and credentials), `AWS_SESSION_TOKEN` is sent with any key.
 * A developer's MinIO settings would then take a test around the fault proxy, or to another
 * server. So the AWS part of the environment is an allow-list (src/util/aws-environment.ts, which
 * the benchmark uses too): every `AWS_*` variable is dropped but a few that only quiet the SDK,
 * both SDK files are /dev/null (so neither ~/.aws file is read), and a test adds what it means to
 * set (see `s3Env`).
 *
 * Everything else (PATH, HOME, TMPDIR, CI, S3_*...) is inherited.
 */

import {
  EMPTY_SDK_FILES,
  isDroppedAwsVariable,
  withoutAws,
} from "../../src/util/aws-environment.js";

/**
 * The environment for a process a test starts: this process's environment through the
 * allow-list, then `set` (a variable set to `undefined` is left out).
 */
export function childEnv(set: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
  return { ...withoutAws(process.env), ...set };
}

/**
 * Put this process's own environment through the allow-list, for the S3 clients the tests make
 * in process (run once per test file, from vitest's setupFiles). The S3 target's credentials
 * may come from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` when `S3_ACCESS_KEY` /
 * `S3_SECRET_KEY` are not set, as `infra/rgw-start.sh` and the MinIO README export both: they
 * are copied to the `S3_*` names before the `AWS_*` ones go.
 */
export function restrictTestProcessEnv(env: NodeJS.ProcessEnv = process.env): void {
  // process.env stores `undefined` as the string "undefined": assign only what is there.
  const accessKey = env.S3_ACCESS_KEY ?? env.AWS_ACCESS_KEY_ID;
  const secretKey = env.S3_SECRET_KEY ?? env.AWS_SECRET_ACCESS_KEY;
  if (accessKey !== undefined) env.S3_ACCESS_KEY = accessKey;
  if (secretKey !== undefined) env.S3_SECRET_KEY = secretKey;
  for (const name of Object.keys(env)) {
    if (isDroppedAwsVariable(name)) delete env[name];
  }
  Object.assign(env, EMPTY_SDK_FILES);
}
