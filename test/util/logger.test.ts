/**
 * The logger: JSON lines that carry their child's bindings, secrets redacted wherever a
 * careless caller puts them, errors reduced to type, code and message.
 */

import { describe, expect, it } from "vitest";
import { captureLog } from "../support/log-capture.js";
import { errorFields } from "../../src/util/logger.js";

describe("the logger", () => {
  it("writes one JSON line per entry, with the bindings of its children", () => {
    const log = captureLog("debug");
    log.logger.child({ export: "vm1" }).child({ connection: 7 }).debug("hello");
    expect(log.entries()).toEqual([
      expect.objectContaining({ level: 20, export: "vm1", connection: 7, msg: "hello" }),
    ]);
  });

  it("redacts credentials, keys, PSKs and signatures at the top or one level down", () => {
    const log = captureLog("info");
    log.logger.info(
      {
        credentials: { accessKeyId: "AKIAEXAMPLE", secretAccessKey: "wJalrXUtnFEMI" },
        request: { headers: "x", authorization: "AWS4-HMAC-SHA256 Signature=abc123" },
        accessKeyId: "AKIAEXAMPLE",
        psk: "deadbeef",
        tls: { key: "-----BEGIN PRIVATE KEY-----", psk: "deadbeef" },
      },
      "careless",
    );
    const line = log.raw.join("\n");
    for (const secret of [
      "AKIAEXAMPLE",
      "wJalrXUtnFEMI",
      "Signature=",
      "deadbeef",
      "PRIVATE KEY",
    ]) {
      expect(line).not.toContain(secret);
    }
    expect(line).toContain("[redacted]");
  });

  it("keeps of an error its type, code, message and causes, not what it carries", () => {
    const sdkError = Object.assign(new Error("Access Denied"), {
      name: "AccessDenied",
      code: "AccessDenied",
      $response: { headers: { authorization: "AWS4-HMAC-SHA256 Signature=abc" } },
    });
    const wrapped = new Error("GET x failed", { cause: sdkError });
    expect(errorFields(wrapped)).toEqual({
      type: "Error",
      message: "GET x failed",
      cause: { type: "AccessDenied", message: "Access Denied", code: "AccessDenied" },
    });
    const log = captureLog("info");
    log.logger.warn({ err: wrapped }, "failed");
    expect(log.raw.join("\n")).not.toContain("Signature");
  });
});
