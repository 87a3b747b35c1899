/**
 * A whole `s3blk serve` session at debug level, with real clients over TLS (pre-shared keys)
 * against RGW behind a proxy that fails some uploads, so that error paths log too. Then the
 * whole log, and everything else the process printed, is searched for the secrets it must
 * never show: the S3 access key and secret key, request signatures and authorization headers,
 * and the TLS keys.
 */

import { randomBytes } from "node:crypto";
import { mkdirSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";

import { missingTools, run } from "../nbd/harness.js";
import { FaultProxy } from "../support/fault-proxy.js";
import { requireS3, s3Env } from "../support/s3-target.js";
import { CLI, runCli, startServe, type ServeProcess } from "../support/serve-process.js";

const s3 = await requireS3("serve log secrets test");
const missing = missingTools("serve log secrets test", ["qemu-io", "nbdinfo"]);

describe.skipIf(s3 === undefined || missing.length > 0)("the log of a serve session", () => {
  let serve: ServeProcess | undefined;
  let proxy: FaultProxy | undefined;
  afterAll(async () => {
    if (serve?.child.exitCode === null) serve.child.kill("SIGKILL");
    await proxy?.stop();
  });

  it("never shows credentials, signatures or TLS keys", async () => {
    const target = s3!;
    const work = mkdtempSync(path.join(tmpdir(), "s3blk-logs-"));
    const keys = path.join(work, "psk");
    mkdirSync(keys);
    const psk = randomBytes(32).toString("hex");
    writeFileSync(path.join(keys, "keys.psk"), `alice:${psk}\n`);
    proxy = await FaultProxy.start(target.endpoint);
    const url = target.newVolumeUrl("logs");
    const name = url.slice(url.lastIndexOf("/") + 1);
    expect(await runCli(["create", url, "--size", "64M"], s3Env(target))).toBe(0);
    serve = await startServe(
      [
        url,
        ...["--listen", "127.0.0.1:0", "--log-level", "debug", "--metrics", "127.0.0.1:0"],
        ...["--tls=require", "--tls-psk", path.join(keys, "keys.psk")],
        ...["--writeback-delay", "100", "--lease-duration", "15s"],
      ],
      { env: s3Env(target, proxy.endpoint), globalArgs: ["--request-timeout", "1s"] },
    );
    const port = Number(/:(\d+)\//.exec(serve.uris[0]!)?.[1]);
    // Some uploads fail and are retried; one renewal fails every attempt, and that is logged
    // with the store's error.
    proxy.inject({ kind: "503", methods: ["PUT"], pathIncludes: "/chunks/", times: 4 });
    proxy.inject({ kind: "reset", methods: ["PUT"], pathIncludes: "s3blk-processes/", times: 6 });

    const tlsObject = `tls-creds-psk,id=tls0,dir=${keys},username=alice,endpoint=client`;
    const image = `driver=nbd,host=127.0.0.1,port=${port},export=${name},tls-creds=tls0`;
    const io = await run("qemu-io", [
      ...["-c", "write -P 0x6c 0 3M", "-c", "read -P 0x6c 0 3M", "-c", "flush"],
      ...["--object", tlsObject, "--image-opts", image],
    ]);
    expect(io.code).toBe(0);
    const uri = `nbds://alice@127.0.0.1:${port}/${name}?tls-psk-file=${path.join(keys, "keys.psk")}`;
    const map = await run("nbdinfo", ["--map", uri]);
    expect(map.code).toBe(0);
    const plain = await run("nbdinfo", ["--size", `nbd://127.0.0.1:${port}/${name}`]);
    expect(plain.code).not.toBe(0);
    // Past the process lease's renewal that fails (the first, 7.5 s in, retried for up to 3 s).
    await new Promise((r) => setTimeout(r, 12_000));
    expect(await serve.stop()).toBe(0);

    const log = serve.stderr();
    const everything = `${serve.stdout()}\n${log}`;
    const entries = log
      .split("\n")
      .filter((l) => l.startsWith("{"))
      .map((l) => JSON.parse(l) as Record<string, unknown>);
    // The session did log, at debug level, and through the error paths.
    expect(entries.some((e) => e.level === 20 && /^TLS up: /.test(String(e.msg)))).toBe(true);
    expect(entries.some((e) => /lease renewal failed: .*gave up after 6/.test(String(e.msg)))).toBe(
      true,
    );
    expect(proxy.counts.injected).toMatchObject({ "503": 4, reset: 6 });
    expect(entries.some((e) => String(e.msg).startsWith(`cost of ${name}: `))).toBe(true);
    // Every line of a connection carries its id, and once it chose an export, the export's name.
    const serving = entries.filter((e) => /^serving "/.test(String(e.msg)));
    expect(serving.length).toBeGreaterThan(0);
    for (const e of serving)
      expect(e).toMatchObject({ export: name, connection: expect.any(Number) });

    const secrets = [
      target.credentials.accessKeyId,
      target.credentials.secretAccessKey,
      psk,
      psk.toUpperCase(),
    ].filter((s) => s.length >= 3);
    expect(secrets.length).toBeGreaterThanOrEqual(3);
    for (const secret of secrets) expect(everything).not.toContain(secret);
    expect(everything).not.toMatch(/Signature=/);
    expect(everything).not.toMatch(/authorization/i);
    expect(everything).not.toMatch(/x-amz-security-token|PRIVATE KEY/i);
  }, 120_000);
});

describe("serve's --metrics, --prices and --log-level arguments", () => {
  const work = mkdtempSync(path.join(tmpdir(), "s3blk-args-"));
  const serveArgs = async (...args: string[]) =>
    run(process.execPath, [CLI, "serve", "memory://args", "--create-size", "1M", ...args]);

  it.each([
    [["--metrics", "localhost"], /^s3blk: --metrics "localhost" is not HOST:PORT \(example: /],
    [["--log-level", "loud"], /Allowed choices are trace, debug, info, warn, error, fatal, silent/],
    [["--prices", "/nonexistent/p.json"], /^s3blk: cannot read --prices \/nonexistent\/p\.json: /],
  ])("refuses %j with one clear line", async (args, message) => {
    const result = await serveArgs(...args);
    expect(result.code).not.toBe(0);
    expect(
      result.stderr
        .trim()
        .split("\n")
        .filter((l) => !/ note: Node|^\(run with --help/.test(l)),
    ).toHaveLength(1);
    expect(result.stderr).toMatch(new RegExp(message.source, "m"));
  });

  it("refuses a price file with an unknown field or a bad price, naming it", async () => {
    const file = path.join(work, "prices.json");
    writeFileSync(file, JSON.stringify({ getHeadPer1000: 0.0004, putPer1000: 1 }));
    const unknown = await serveArgs("--prices", file);
    expect(unknown.code).toBe(1);
    expect(unknown.stderr).toMatch(
      /^s3blk: .*prices\.json: unknown field "putPer1000"; the fields are /m,
    );
    writeFileSync(file, JSON.stringify({ transferOutPerGb: -0.09 }));
    const negative = await serveArgs("--prices", file);
    expect(negative.stderr).toMatch(
      /"transferOutPerGb" must be a price in dollars, a number of at least 0, not -0\.09/,
    );
  });
});
