/**
 * Where the S3 suites run: the server named by S3_ENDPOINT (CI starts Ceph RGW), else MinIO in
 * a container when a Docker engine answers, else nowhere. "Nowhere" is a skip with a line that
 * says what is missing on a developer's machine, and a failure under CI=true.
 */

import { CreateBucketCommand, S3Client } from "@aws-sdk/client-s3";
import { randomBytes } from "node:crypto";
import { execFileSync } from "node:child_process";

export interface S3Target {
  readonly endpoint: string;
  readonly bucket: string;
  readonly region: string;
  readonly credentials: { accessKeyId: string; secretAccessKey: string };
  /** A fresh volume URL under the bucket. */
  newVolumeUrl(label: string): string;
  stop(): Promise<void>;
}

let shared: Promise<S3Target | string> | undefined;

/** The S3 target, or a string saying why there is none. Cached per test file. */
export function s3Target(): Promise<S3Target | string> {
  shared ??= findTarget();
  return shared;
}

/** Skip (with a reason) or fail under CI: call at the top of an S3 suite. */
export async function requireS3(suite: string): Promise<S3Target | undefined> {
  const target = await s3Target();
  if (typeof target !== "string") return target;
  if (process.env.CI === "true") {
    throw new Error(`${suite}: CI=true but no S3 server: ${target}`);
  }
  console.warn(`SKIP ${suite}: ${target}`);
  return undefined;
}

async function findTarget(): Promise<S3Target | string> {
  const endpoint = process.env.S3_ENDPOINT;
  if (endpoint !== undefined && endpoint !== "") {
    return await prepare({
      endpoint,
      bucket: process.env.S3_BUCKET ?? "s3blk-test",
      region: process.env.S3_REGION ?? "us-east-1",
      credentials: {
        // Copied from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY when unset (environment.ts).
        accessKeyId: process.env.S3_ACCESS_KEY ?? "",
        secretAccessKey: process.env.S3_SECRET_KEY ?? "",
      },
      stop: async () => {},
    });
  }
  if (!dockerAnswers()) {
    return 'S3_ENDPOINT is not set and no Docker engine answers for MinIO (start one with `eval "$(bash infra/rgw-start.sh)"`)';
  }
  const { MinioContainer } = await import("@testcontainers/minio");
  const container = await new MinioContainer(
    // The official images left Docker Hub in September 2026; this is the community build.
    process.env.MINIO_IMAGE ?? "pgsty/minio:RELEASE.2026-08-04T00-00-00Z",
  ).start();
  return await prepare({
    endpoint: container.getConnectionUrl(),
    bucket: "s3blk-test",
    region: "us-east-1",
    credentials: { accessKeyId: container.getUsername(), secretAccessKey: container.getPassword() },
    stop: async () => {
      await container.stop();
    },
  });
}

function dockerAnswers(): boolean {
  try {
    execFileSync("docker", ["info", "--format", "{{.ServerVersion}}"], {
      stdio: "ignore",
      timeout: 5000,
    });
    return true;
  } catch {
    return false;
  }
}

async function prepare(target: Omit<S3Target, "newVolumeUrl">): Promise<S3Target> {
  const client = new S3Client({
    endpoint: target.endpoint,
    region: target.region,
    credentials: target.credentials,
    forcePathStyle: true,
    requestChecksumCalculation: "WHEN_REQUIRED",
    responseChecksumValidation: "WHEN_REQUIRED",
  });
  try {
    await client.send(new CreateBucketCommand({ Bucket: target.bucket }));
  } catch (error) {
    const name = (error as Error).name;
    if (name !== "BucketAlreadyOwnedByYou" && name !== "BucketAlreadyExists") throw error;
  } finally {
    client.destroy();
  }
  const run = randomBytes(4).toString("hex");
  let n = 0;
  return {
    ...target,
    newVolumeUrl: (label: string) => `s3://${target.bucket}/test-${run}/${label}-${n++}`,
  };
}

/** Store-stack options that reach the target. */
export function stackOptions(target: S3Target) {
  return { endpoint: target.endpoint, region: target.region, credentials: target.credentials };
}

/**
 * The AWS variables a spawned `s3blk` needs to reach the target (through `endpoint` if given).
 * Pass them to `startServe`/`runCli`/`childEnv`, which drop every other AWS variable: an
 * inherited `AWS_ENDPOINT_URL_S3` would win over `AWS_ENDPOINT_URL` here.
 */
export function s3Env(target: S3Target, endpoint = target.endpoint): NodeJS.ProcessEnv {
  return {
    AWS_ENDPOINT_URL: endpoint,
    AWS_ACCESS_KEY_ID: target.credentials.accessKeyId,
    AWS_SECRET_ACCESS_KEY: target.credentials.secretAccessKey,
    AWS_REGION: target.region,
  };
}
