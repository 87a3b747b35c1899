/**
 * Certificates for the TLS tests, made by `openssl` in a temporary directory, laid out the way
 * nbdkit, qemu and libnbd read them:
 * - `server/`: ca-cert.pem, server-cert.pem, server-key.pem (SAN IP:127.0.0.1, which libnbd
 *   and qemu check against the host they connect to);
 * - `client/`: ca-cert.pem, client-cert.pem, client-key.pem, signed by the same CA;
 * - `other-client/`: the same CA (so the client trusts the server), but a client certificate
 *   signed by a second CA the server does not know;
 * - `anonymous-client/`: the CA only, no client certificate.
 *
 * EC P-256 keys: GnuTLS (qemu, libnbd) and OpenSSL (Node) both take them, and they are quick to
 * make.
 */

import { execFileSync } from "node:child_process";
import { copyFileSync, mkdirSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";

export interface TestCertificates {
  readonly root: string;
  readonly server: string;
  readonly client: string;
  readonly otherClient: string;
  readonly anonymousClient: string;
}

function openssl(cwd: string, args: readonly string[]): void {
  execFileSync("openssl", [...args], { cwd, stdio: ["ignore", "ignore", "pipe"] });
}

const KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];

function makeCa(cwd: string, name: string): void {
  openssl(cwd, [
    "req", "-x509", "-new", ...KEY,
    "-keyout", `${name}-key.pem`, "-out", `${name}-cert.pem`,
    "-days", "3", "-subj", `/CN=s3blk test ${name}`,
    "-addext", "basicConstraints=critical,CA:TRUE",
    "-addext", "keyUsage=critical,keyCertSign,cRLSign",
  ]); // prettier-ignore
}

let serial = 1000;

function makeLeaf(cwd: string, ca: string, name: string, cn: string, extensions: string): void {
  openssl(cwd, ["req", "-new", ...KEY, "-keyout", `${name}-key.pem`, "-out", `${name}.csr`, "-subj", `/CN=${cn}`]); // prettier-ignore
  writeFileSync(path.join(cwd, `${name}.ext`), extensions);
  openssl(cwd, [
    "x509", "-req", "-in", `${name}.csr`,
    "-CA", `${ca}-cert.pem`, "-CAkey", `${ca}-key.pem`, "-set_serial", String(serial++),
    "-days", "3", "-extfile", `${name}.ext`, "-out", `${name}-cert.pem`,
  ]); // prettier-ignore
}

/** Make the CAs, certificates and directories described above. */
export function makeTestCertificates(): TestCertificates {
  const root = mkdtempSync(path.join(tmpdir(), "s3blk-tls-"));
  const work = path.join(root, "work");
  mkdirSync(work);
  makeCa(work, "ca");
  makeCa(work, "other-ca");
  makeLeaf(
    work,
    "ca",
    "server",
    "127.0.0.1",
    "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n" +
      "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
  );
  const clientExtensions =
    "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n" +
    "extendedKeyUsage=clientAuth\n";
  makeLeaf(work, "ca", "client", "s3blk test client", clientExtensions);
  makeLeaf(work, "other-ca", "other-client", "s3blk stranger", clientExtensions);

  const dir = (name: string, files: Record<string, string>): string => {
    const d = path.join(root, name);
    mkdirSync(d);
    for (const [to, from] of Object.entries(files)) {
      copyFileSync(path.join(work, from), path.join(d, to));
    }
    return d;
  };
  return {
    root,
    server: dir("server", {
      "ca-cert.pem": "ca-cert.pem",
      "server-cert.pem": "server-cert.pem",
      "server-key.pem": "server-key.pem",
    }),
    client: dir("client", {
      "ca-cert.pem": "ca-cert.pem",
      "client-cert.pem": "client-cert.pem",
      "client-key.pem": "client-key.pem",
    }),
    otherClient: dir("other-client", {
      "ca-cert.pem": "ca-cert.pem",
      "client-cert.pem": "other-client-cert.pem",
      "client-key.pem": "other-client-key.pem",
    }),
    anonymousClient: dir("anonymous-client", { "ca-cert.pem": "ca-cert.pem" }),
  };
}
