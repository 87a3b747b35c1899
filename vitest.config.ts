import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    testTimeout: 60_000,
    hookTimeout: 120_000,
    // Integration suites share one S3 server and spawn real clients; two cores cannot run
    // many of them at once without turning timeouts into flakes.
    maxWorkers: 2,
    // Every test file's process sees no AWS variable but the ones the tests set (and the
    // processes it starts get the same allow-list): test/support/environment.ts.
    setupFiles: ["test/support/setup-environment.ts"],
    // Quiet: no notice from s3blk about old Node versions, in process or in the CLIs the tests
    // start, and none from the AWS SDK in process (the CLI silences the SDK's itself).
    env: {
      S3BLK_NODE_NOTICE: "off",
      AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED: "true",
    },
    reporters: process.env.CI === "true" ? ["default", "junit"] : ["default"],
    outputFile: { junit: "test-results/junit.xml" },
  },
});
