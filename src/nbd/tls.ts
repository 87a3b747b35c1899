/**
 * NBD over TLS, server side: the settings (nbdkit's, which users know), reading nbdkit's and
 * qemu's certificate directory, and the upgrade of one accepted socket after NBD_OPT_STARTTLS.
 *
 * Design:
 * - **The negotiation decides, the connection carries out.** `negotiation.ts` answers
 *   NBD_OPT_STARTTLS and returns a `starttls` step; the connection sends the ack, stops reading
 *   the plain socket and hands it to {@link TlsUpgrader.upgrade}.
 * - **A `tls.Server` that never listens runs each handshake.** A bare `tls.TLSSocket` made
 *   around an accepted socket does not verify the client's certificate the way a `tls.Server`
 *   does (it never sets `authorized`), so each upgrade emits the plain socket as a 'connection'
 *   on a `tls.Server` of its own. That server is made per upgrade (about 3 ms of CPU, once per
 *   connection) because nothing public ties its 'secureConnection' back to the socket given.
 * - **Verification happens here, once.** With `verifyPeer`, the client must present a
 *   certificate that chains to `ca`; the handshake is let through and `authorized` checked
 *   after it, so that the refusal is logged with OpenSSL's reason, then the socket is closed.
 * - **Pre-shared keys** (nbdkit's `--tls-psk`): instead of certificates, a file of `identity:hexkey`
 *   lines, as nbdkit and qemu read it. A client is let in if it proves it holds the key of the
 *   identity it names; TLS 1.3 (and TLS 1.2's PSK suites, for older clients).
 * - **No byte is lost or misread.** Bytes the client sent after NBD_OPT_STARTTLS in the same
 *   read (a client that did not wait for the ack) are given back to the plain socket with
 *   `unshift`, where the TLS socket reads them first, as the start of the TLS stream.
 */

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import path from "node:path";
import type { Socket } from "node:net";
import tls, { type TLSSocket } from "node:tls";

import type { TlsMode } from "./negotiation.js";

/** TLS settings of an {@link NbdServer}; the names follow nbdkit's `--tls*` options. */
export interface NbdTlsOptions {
  /**
   * `off`: no TLS; `on`: TLS for clients that ask (NBD_OPT_STARTTLS), plain for the others;
   * `require`: only clients that upgrade reach an export. Default `off`.
   */
  readonly mode: TlsMode;
  /** The server's private key, PEM. Required unless `mode` is `off`. */
  readonly key?: string | Buffer;
  /** The server's certificate (chain), PEM. Required unless `mode` is `off`. */
  readonly cert?: string | Buffer;
  /** CA certificates, PEM, that client certificates must chain to. Required by `verifyPeer`. */
  readonly ca?: string | Buffer;
  /** Require a client certificate signed by `ca` (nbdkit `--tls-verify-peer`). Default false. */
  readonly verifyPeer?: boolean;
  /**
   * Pre-shared keys by identity, instead of `key` and `cert` (nbdkit `--tls-psk`): a client
   * must hold the key of the identity it names. See {@link readTlsPskFile}.
   */
  readonly psk?: ReadonlyMap<string, Uint8Array>;
}

/**
 * Parse a PSK file as nbdkit and qemu write it: one `identity:hexkey` a line. Blank lines are
 * skipped; anything else that is not such a line is an error (a key must not be half read).
 */
export function parsePskFile(text: string, where = "PSK file"): Map<string, Uint8Array> {
  const keys = new Map<string, Uint8Array>();
  text.split(/\r?\n/).forEach((line, i) => {
    if (line.trim() === "") return;
    const match = /^([^:]+):((?:[0-9a-fA-F]{2})+)$/.exec(line);
    if (match === null) {
      throw new TlsSetupError(`${where}, line ${i + 1}: not IDENTITY:HEXKEY`);
    }
    if (keys.has(match[1]!)) {
      throw new TlsSetupError(`${where}, line ${i + 1}: identity ${match[1]} again`);
    }
    keys.set(match[1]!, Buffer.from(match[2]!, "hex"));
  });
  if (keys.size === 0) throw new TlsSetupError(`${where} holds no key`);
  return keys;
}

/** Read and parse a PSK file ({@link parsePskFile}). */
export function readTlsPskFile(file: string): Map<string, Uint8Array> {
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    throw new TlsSetupError(`cannot read ${file}: ${code ?? String(error)}`);
  }
  return parsePskFile(text, file);
}

/**
 * Suites a PSK server offers: TLS 1.3's (which OpenSSL's PSK callback needs with SHA-256), and
 * TLS 1.2's PSK suites, which Node leaves out by default.
 */
const PSK_CIPHERS = [
  "TLS_AES_128_GCM_SHA256",
  "TLS_AES_256_GCM_SHA384",
  "TLS_CHACHA20_POLY1305_SHA256",
  "ECDHE-PSK-CHACHA20-POLY1305",
  "ECDHE-PSK-AES256-CBC-SHA384",
  "ECDHE-PSK-AES128-CBC-SHA256",
  "PSK-AES256-GCM-SHA384",
  "PSK-AES128-GCM-SHA256",
].join(":");

/** The PEM files of a certificate directory as nbdkit and qemu lay it out. */
export interface TlsCertificates {
  readonly key: Buffer;
  readonly cert: Buffer;
  /** Undefined when `ca-cert.pem` is absent. */
  readonly ca: Buffer | undefined;
}

/** A certificate directory that cannot be used. */
export class TlsSetupError extends Error {
  override readonly name = "TlsSetupError";
}

/**
 * Read `server-key.pem`, `server-cert.pem` and, if present, `ca-cert.pem` from `dir` (the
 * layout of nbdkit's `--tls-certificates` and qemu's `tls-creds-x509,dir=`).
 */
export function readTlsCertificates(dir: string): TlsCertificates {
  const read = (name: string, required: boolean): Buffer | undefined => {
    try {
      return readFileSync(path.join(dir, name));
    } catch (error) {
      const code = (error as NodeJS.ErrnoException).code;
      if (code === "ENOENT" && !required) return undefined;
      throw new TlsSetupError(`cannot read ${path.join(dir, name)}: ${code ?? String(error)}`);
    }
  };
  return {
    key: read("server-key.pem", true)!,
    cert: read("server-cert.pem", true)!,
    ca: read("ca-cert.pem", false),
  };
}

/** How an upgrade ended: a verified TLS socket to carry on with, or why there is none. */
export interface TlsOutcome {
  /** `session` is one line for the log: protocol, cipher, who the client is. */
  secure(socket: TLSSocket, session: string): void;
  failed(reason: string): void;
}

/** Runs the TLS handshake of sockets whose client sent NBD_OPT_STARTTLS. */
export class TlsUpgrader {
  readonly #options: tls.TlsOptions;
  readonly #verifyPeer: boolean;
  readonly #psk: ReadonlyMap<string, Uint8Array> | undefined;

  /** Throws {@link TlsSetupError} for a missing or unusable key, certificate or CA. */
  constructor(options: NbdTlsOptions) {
    assert(options.mode !== "off", "a TlsUpgrader for mode off");
    const { key, cert, ca, psk } = options;
    this.#verifyPeer = options.verifyPeer ?? false;
    this.#psk = psk;
    if (psk !== undefined) {
      if (key !== undefined || cert !== undefined || this.#verifyPeer) {
        throw new TlsSetupError("pre-shared keys or certificates, not both");
      }
      if (psk.size === 0) throw new TlsSetupError("no pre-shared key");
      this.#options = { minVersion: "TLSv1.2", ciphers: PSK_CIPHERS };
      return;
    }
    if (key === undefined || cert === undefined) {
      throw new TlsSetupError(`TLS mode ${options.mode} needs a key and a certificate`);
    }
    if (this.#verifyPeer && ca === undefined) {
      throw new TlsSetupError("verifying client certificates needs a CA certificate");
    }
    this.#options = {
      key,
      cert,
      ...(ca === undefined ? {} : { ca }),
      minVersion: "TLSv1.2",
      requestCert: this.#verifyPeer,
      // Checked after the handshake, below, so that the reason can be logged.
      rejectUnauthorized: false,
    };
    try {
      tls.createSecureContext(this.#options); // fail now, not at the first client
    } catch (error) {
      throw new TlsSetupError(`unusable TLS key or certificates: ${(error as Error).message}`);
    }
  }

  /**
   * Run the server side of the handshake on `socket`, which must not be reading (bytes it
   * already holds are read first), and report the outcome once.
   */
  upgrade(socket: Socket, outcome: TlsOutcome): void {
    const psk = this.#psk;
    let identity: string | undefined;
    const server = tls.createServer({
      ...this.#options,
      ...(psk === undefined
        ? {}
        : {
            // An unknown identity gets null, which ends the handshake.
            pskCallback: (_socket: TLSSocket, id: string) => {
              identity = id;
              return psk.get(id) ?? null;
            },
          }),
    });
    server.once("secureConnection", (secure: TLSSocket) => {
      if (this.#verifyPeer && !secure.authorized) {
        secure.destroy();
        outcome.failed(`client certificate refused: ${String(secure.authorizationError)}`);
        return;
      }
      outcome.secure(secure, describeSession(secure, identity));
    });
    server.once("tlsClientError", (error: NodeJS.ErrnoException) => {
      const why = error.code ?? error.message;
      if (psk !== undefined && identity !== undefined && !psk.has(identity)) {
        outcome.failed(`unknown PSK identity ${JSON.stringify(identity)} (${why})`);
      } else {
        outcome.failed(why);
      }
    });
    server.emit("connection", socket);
  }
}

function describeSession(socket: TLSSocket, pskIdentity: string | undefined): string {
  const peer = socket.getPeerCertificate();
  const subject = peer !== null && typeof peer === "object" ? peer.subject?.CN : undefined;
  return (
    `${socket.getProtocol() ?? "TLS"} ${socket.getCipher()?.name ?? ""}`.trim() +
    (subject === undefined ? "" : `, client certificate CN=${String(subject)}`) +
    (pskIdentity === undefined ? "" : `, PSK identity ${JSON.stringify(pskIdentity)}`)
  );
}
