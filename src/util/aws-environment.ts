/**
 * An environment for a process we start, with the AWS part reduced to an allow-list. The AWS SDK
 * reads many variables besides the ones we mean to set: `AWS_ENDPOINT_URL_S3` wins over
 * `AWS_ENDPOINT_URL`, `AWS_PROFILE` and `AWS_CONFIG_FILE` bring in a profile's `endpoint_url`,
 * `region`, `use_dualstack_endpoint` or `auth_scheme_preference` (the last two apply even to a
 * client given its endpoint, region and credentials), `AWS_SESSION_TOKEN` is sent with any key.
 * A shell's MinIO settings would then take a server we start (for a test, or for the benchmark)
 * to another endpoint than the one we chose. So every `AWS_*` variable is dropped except those in
 * {@link KEPT_AWS_VARIABLES}, both SDK files are /dev/null (neither ~/.aws file is read), and the
 * caller adds what it means to set. Everything else (PATH, HOME, TMPDIR...) is kept.
 */

/** `AWS_*` variables kept from the caller: they only quiet the SDK. */
export const KEPT_AWS_VARIABLES: readonly string[] = [
  "AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED",
];

/** Set instead of inherited: the SDK's config and credentials files hold nothing. */
export const EMPTY_SDK_FILES: Readonly<NodeJS.ProcessEnv> = Object.freeze({
  AWS_CONFIG_FILE: "/dev/null",
  AWS_SHARED_CREDENTIALS_FILE: "/dev/null",
});

/** Whether the allow-list drops the variable `name`. */
export function isDroppedAwsVariable(name: string): boolean {
  return name.startsWith("AWS_") && !KEPT_AWS_VARIABLES.includes(name);
}

/** `env` without the AWS variables the allow-list drops, plus {@link EMPTY_SDK_FILES}. */
export function withoutAws(env: NodeJS.ProcessEnv): NodeJS.ProcessEnv {
  const out: NodeJS.ProcessEnv = {};
  for (const [name, value] of Object.entries(env)) {
    if (!isDroppedAwsVariable(name)) out[name] = value;
  }
  return { ...out, ...EMPTY_SDK_FILES };
}
