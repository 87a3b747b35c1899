/**
 * The negotiation state machine alone, step by step, for the TLS modes: every option before and
 * after NBD_OPT_STARTTLS under `require`, `on` and `off`, STARTTLS with data and twice, and the
 * state that must not survive the upgrade. No sockets: events in, steps out.
 */

import { describe, expect, it } from "vitest";

import * as nbd from "../../src/nbd/protocol.js";
import * as client from "../../src/nbd/protocol/client.js";
import { ExportRegistry, NbdExport, type NbdDevice } from "../../src/nbd/exports.js";
import { Negotiation, type NegotiationStep, type TlsMode } from "../../src/nbd/negotiation.js";

/** A device the negotiation only asks for its info. */
const device = {
  getInfo: () => Promise.resolve({ readWrite: true, sectorSize: 512, sizeSectors: 2048n }),
} as unknown as NbdDevice;
const registry = new ExportRegistry([await NbdExport.create("disk", device, "the disk")]);

function negotiation(tls: TlsMode): Negotiation {
  const n = new Negotiation({ exports: registry, shuttingDown: () => false, tls });
  expect(n.onEvent({ kind: "client-flags", flags: nbd.NBD_FLAG_C_FIXED_NEWSTYLE })).toEqual({
    next: "continue",
    replies: [],
  });
  return n;
}

/** The option frame `bytes` as the decoder would yield it. */
function send(n: Negotiation, bytes: Uint8Array): NegotiationStep {
  const decoder = new nbd.HandshakeDecoder({ clientFlags: false });
  decoder.push(bytes);
  const event = decoder.next();
  expect(event?.kind === "option" || event?.kind === "option-too-long").toBe(true);
  return n.onEvent(event!);
}

/** The reply types of a step, in order. */
function replyTypes(step: NegotiationStep): number[] {
  const out: number[] = [];
  for (const r of step.replies) {
    for (let at = 0; at < r.length;) {
      const reply = client.parseOptionReply(r, at)!;
      out.push(reply.replyType);
      at = reply.end;
    }
  }
  return out;
}

const go = () => client.encodeInfoOption(nbd.NBD_OPT_GO, "disk", []);
const starttls = () => client.encodeOption(nbd.NBD_OPT_STARTTLS);

/** One of every option a client may send, and what it gets with TLS not in the way. */
const OPTIONS: { name: string; frame: () => Uint8Array; plain: number[]; next?: string }[] = [
  { name: "NBD_OPT_LIST", frame: () => client.encodeOption(nbd.NBD_OPT_LIST), plain: [2, 1] },
  {
    name: "NBD_OPT_INFO",
    frame: () => client.encodeInfoOption(nbd.NBD_OPT_INFO, "disk", []),
    plain: [3, 3, 1],
  },
  { name: "NBD_OPT_GO", frame: go, plain: [3, 3, 1], next: "transmission" },
  {
    name: "NBD_OPT_STRUCTURED_REPLY",
    frame: () => client.encodeOption(nbd.NBD_OPT_STRUCTURED_REPLY),
    plain: [1],
  },
  {
    name: "NBD_OPT_LIST_META_CONTEXT",
    frame: () => client.encodeMetaContextOption(nbd.NBD_OPT_LIST_META_CONTEXT, "disk", []),
    plain: [nbd.NBD_REP_ERR_INVALID], // structured replies first
  },
  {
    name: "NBD_OPT_SET_META_CONTEXT",
    frame: () =>
      client.encodeMetaContextOption(nbd.NBD_OPT_SET_META_CONTEXT, "disk", ["base:allocation"]),
    plain: [nbd.NBD_REP_ERR_INVALID],
  },
  {
    name: "an unknown option",
    frame: () => client.encodeOption(0x7abc, new Uint8Array([1])),
    plain: [nbd.NBD_REP_ERR_UNSUP],
  },
  {
    name: "a malformed NBD_OPT_LIST",
    frame: () => client.encodeOption(nbd.NBD_OPT_LIST, new Uint8Array([1])),
    plain: [nbd.NBD_REP_ERR_INVALID],
  },
];

describe("negotiation under --tls=require, before TLS", () => {
  it.each(OPTIONS)("$name gets NBD_REP_ERR_TLS_REQD and nothing else", ({ frame }) => {
    const n = negotiation("require");
    const step = send(n, frame());
    expect(step.next).toBe("continue");
    expect(replyTypes(step)).toEqual([nbd.NBD_REP_ERR_TLS_REQD]);
    const reply = client.parseOptionReply(step.replies[0]!, 0)!;
    expect(new TextDecoder().decode(reply.data)).toMatch(/needs TLS/);
  });

  it("an over-long option gets NBD_REP_ERR_TLS_REQD, not NBD_REP_ERR_TOO_BIG", () => {
    const n = negotiation("require");
    const step = n.onEvent({ kind: "option-too-long", option: 6, length: 1e6, maxLength: 65536 });
    expect(replyTypes(step)).toEqual([nbd.NBD_REP_ERR_TLS_REQD]);
  });

  it("NBD_OPT_EXPORT_NAME, which cannot be refused, ends the session", () => {
    const n = negotiation("require");
    const step = send(n, client.encodeExportNameOption("disk"));
    expect(step).toMatchObject({ next: "close", replies: [] });
  });

  it("NBD_OPT_ABORT is acknowledged and closes", () => {
    const step = send(negotiation("require"), client.encodeOption(nbd.NBD_OPT_ABORT));
    expect(step.next).toBe("close");
    expect(replyTypes(step)).toEqual([nbd.NBD_REP_ACK]);
  });

  it("NBD_OPT_STARTTLS is acknowledged with a starttls step; with data, NBD_REP_ERR_INVALID", () => {
    const n = negotiation("require");
    const invalid = send(n, client.encodeOption(nbd.NBD_OPT_STARTTLS, new Uint8Array([0x16])));
    expect(invalid.next).toBe("continue");
    expect(replyTypes(invalid)).toEqual([nbd.NBD_REP_ERR_INVALID]);
    const step = send(n, starttls());
    expect(step.next).toBe("starttls");
    expect(replyTypes(step)).toEqual([nbd.NBD_REP_ACK]);
  });
});

describe("negotiation under --tls=require, after TLS", () => {
  function upgraded(): Negotiation {
    const n = negotiation("require");
    expect(send(n, starttls()).next).toBe("starttls");
    n.tlsEstablished();
    return n;
  }

  it.each(OPTIONS)("$name gets what it gets without TLS", ({ frame, plain, next }) => {
    const step = send(upgraded(), frame());
    expect(step.next).toBe(next ?? "continue");
    expect(replyTypes(step)).toEqual(plain);
  });

  it("NBD_OPT_EXPORT_NAME enters transmission", () => {
    expect(send(upgraded(), client.encodeExportNameOption("disk")).next).toBe("transmission");
  });

  it("a second NBD_OPT_STARTTLS gets NBD_REP_ERR_INVALID, and the session carries on", () => {
    const n = upgraded();
    const again = send(n, starttls());
    expect(again.next).toBe("continue");
    expect(replyTypes(again)).toEqual([nbd.NBD_REP_ERR_INVALID]);
    expect(send(n, go()).next).toBe("transmission");
  });
});

describe("negotiation under --tls=on", () => {
  it.each(OPTIONS)("$name gets its plain answer before TLS, never TLS_REQD", ({ frame, plain }) => {
    expect(replyTypes(send(negotiation("on"), frame()))).toEqual(plain);
  });

  it("serves NBD_OPT_EXPORT_NAME in plain text", () => {
    expect(send(negotiation("on"), client.encodeExportNameOption("disk")).next).toBe(
      "transmission",
    );
  });

  it("upgrades on NBD_OPT_STARTTLS, once; with data it is NBD_REP_ERR_INVALID", () => {
    const n = negotiation("on");
    expect(
      replyTypes(send(n, client.encodeOption(nbd.NBD_OPT_STARTTLS, new Uint8Array(3)))),
    ).toEqual([nbd.NBD_REP_ERR_INVALID]);
    expect(send(n, starttls()).next).toBe("starttls");
    n.tlsEstablished();
    expect(replyTypes(send(n, starttls()))).toEqual([nbd.NBD_REP_ERR_INVALID]);
  });

  it("forgets what was negotiated before NBD_OPT_STARTTLS", () => {
    const n = negotiation("on");
    send(n, client.encodeOption(nbd.NBD_OPT_STRUCTURED_REPLY));
    const set = send(
      n,
      client.encodeMetaContextOption(nbd.NBD_OPT_SET_META_CONTEXT, "disk", ["base:allocation"]),
    );
    expect(replyTypes(set)).toEqual([nbd.NBD_REP_META_CONTEXT, nbd.NBD_REP_ACK]);
    expect(send(n, starttls()).next).toBe("starttls");
    n.tlsEstablished();
    // Structured replies are off again: meta contexts are refused, and GO settles neither.
    const meta = send(
      n,
      client.encodeMetaContextOption(nbd.NBD_OPT_SET_META_CONTEXT, "disk", ["base:allocation"]),
    );
    expect(replyTypes(meta)).toEqual([nbd.NBD_REP_ERR_INVALID]);
    const step = send(n, go());
    expect(step.next === "transmission" && step.negotiated).toMatchObject({
      structuredReplies: false,
      baseAllocationContextId: undefined,
    });
  });

  it("keeps what was negotiated when there is no STARTTLS (the control for the test above)", () => {
    const n = negotiation("on");
    send(n, client.encodeOption(nbd.NBD_OPT_STRUCTURED_REPLY));
    send(
      n,
      client.encodeMetaContextOption(nbd.NBD_OPT_SET_META_CONTEXT, "disk", ["base:allocation"]),
    );
    const step = send(n, go());
    expect(step.next === "transmission" && step.negotiated).toMatchObject({
      structuredReplies: true,
      baseAllocationContextId: 1,
    });
  });
});

describe("negotiation under --tls=off", () => {
  it("NBD_OPT_STARTTLS gets NBD_REP_ERR_POLICY; with data, NBD_REP_ERR_INVALID", () => {
    const n = negotiation("off");
    expect(replyTypes(send(n, starttls()))).toEqual([nbd.NBD_REP_ERR_POLICY]);
    expect(
      replyTypes(send(n, client.encodeOption(nbd.NBD_OPT_STARTTLS, new Uint8Array(1)))),
    ).toEqual([nbd.NBD_REP_ERR_INVALID]);
    expect(send(n, go()).next).toBe("transmission");
  });

  it.each(OPTIONS)("$name gets its plain answer", ({ frame, plain }) => {
    expect(replyTypes(send(negotiation("off"), frame()))).toEqual(plain);
  });

  it("the default is off", () => {
    const n = new Negotiation({ exports: registry, shuttingDown: () => false });
    n.onEvent({ kind: "client-flags", flags: nbd.NBD_FLAG_C_FIXED_NEWSTYLE });
    expect(replyTypes(send(n, starttls()))).toEqual([nbd.NBD_REP_ERR_POLICY]);
  });
});

describe("the handshake decoder after STARTTLS", () => {
  it("expects no client flags, and hands back bytes sent after STARTTLS untouched", () => {
    const decoder = new nbd.HandshakeDecoder();
    const hello = new Uint8Array([0x16, 0x03, 0x01, 0x02, 0x00]); // a TLS record's first bytes
    const stream = new Uint8Array([
      ...client.encodeClientFlags(nbd.NBD_FLAG_C_FIXED_NEWSTYLE),
      ...starttls(),
      ...hello,
    ]);
    decoder.push(stream);
    expect(decoder.next()?.kind).toBe("client-flags");
    expect(decoder.next()).toEqual({ kind: "option", request: { type: "starttls", option: 5 } });
    expect([...decoder.takeRemaining()]).toEqual([...hello]);

    const inside = new nbd.HandshakeDecoder({ clientFlags: false });
    inside.push(go());
    expect(inside.next()).toMatchObject({ kind: "option", request: { type: "go", name: "disk" } });
  });
});
