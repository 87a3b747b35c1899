/**
 * The note on Node versions older than 22: given on 20, not on 22 or 24, not when turned off;
 * and the built CLI prints it exactly once a run, and never the AWS SDK's own warning.
 */

import { execFile } from "node:child_process";
import { promisify } from "node:util";
import { describe, expect, it } from "vitest";
import { NODE_NOTICE_VARIABLE, nodeVersionNotice } from "../../src/cli/node-version.js";
import { childEnv } from "../support/environment.js";
import { CLI } from "../support/serve-process.js";

const run = promisify(execFile);

describe("nodeVersionNotice", () => {
  it("is given on Node 20 and 21, saying why and what is recommended", () => {
    for (const version of ["20.19.0", "20.20.2", "v20.19.5", "21.7.3"]) {
      const notice = nodeVersionNotice(version, {});
      expect(notice).toBeDefined();
      expect(notice).toContain(`Node.js ${version} is past its end of life`);
      expect(notice).toMatch(/AWS SDK releases from January 2027 on need Node 22 or later/);
      expect(notice).toMatch(/Node 24 \(the current LTS\) is recommended/);
      expect(notice).toContain(`${NODE_NOTICE_VARIABLE}=off`);
      expect(notice).not.toContain("\n");
    }
  });

  it("is not given on Node 22, 24 or later", () => {
    for (const version of ["22.0.0", "22.12.0", "24.11.1", "v24.0.0", "26.1.0"]) {
      expect(nodeVersionNotice(version, {})).toBeUndefined();
    }
  });

  it("is not given when S3BLK_NODE_NOTICE=off, and is for any other value", () => {
    expect(nodeVersionNotice("20.19.0", { S3BLK_NODE_NOTICE: "off" })).toBeUndefined();
    expect(nodeVersionNotice("20.19.0", { S3BLK_NODE_NOTICE: " OFF " })).toBeUndefined();
    expect(nodeVersionNotice("20.19.0", { S3BLK_NODE_NOTICE: "" })).toBeDefined();
    expect(nodeVersionNotice("20.19.0", { S3BLK_NODE_NOTICE: "on" })).toBeDefined();
    expect(nodeVersionNotice("20.19.0", { OTHER: "off" })).toBeDefined();
  });
});

describe("the CLI on this Node", () => {
  const major = Number(process.versions.node.split(".")[0]);
  const old = major < 22;

  /**
   * `delete` without --yes, not on a terminal: it builds the S3 client (where the SDK would
   * warn) and refuses before any request is sent.
   */
  async function stderrOf(env: NodeJS.ProcessEnv): Promise<string> {
    const args = [CLI, "delete", "s3://s3blk-no-such-bucket/v"];
    const failed = await run(process.execPath, args, { env: childEnv(env) }).then(
      () => undefined,
      (error: { code?: number; stderr?: string }) => error,
    );
    expect(failed?.code).toBe(1);
    expect(failed?.stderr).toMatch(/^s3blk: refusing to delete .* without --yes$/m);
    return failed?.stderr ?? "";
  }

  const quietSdk = { AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED: undefined };
  const notes = (stderr: string) => stderr.match(/^s3blk: note: Node\.js /gm)?.length ?? 0;

  it(`prints our note ${old ? "once" : "never"} on Node ${major}, and not the SDK's`, async () => {
    const stderr = await stderrOf({ ...quietSdk, [NODE_NOTICE_VARIABLE]: undefined });
    expect(notes(stderr)).toBe(old ? 1 : 0);
    expect(stderr).not.toMatch(/NodeVersionSupportWarning/);
  });

  it(`would show the SDK's warning ${old ? "" : "never "}on Node ${major} if not silenced`, async () => {
    const stderr = await stderrOf({
      AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED: "false",
      [NODE_NOTICE_VARIABLE]: "off",
    });
    expect(/NodeVersionSupportWarning/.test(stderr)).toBe(old);
  });

  it("prints no note with S3BLK_NODE_NOTICE=off", async () => {
    const stderr = await stderrOf({ ...quietSdk, [NODE_NOTICE_VARIABLE]: "off" });
    expect(notes(stderr)).toBe(0);
    expect(stderr.trim().split("\n")).toHaveLength(1);
  });
});
