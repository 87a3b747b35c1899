/**
 * What the server serves: named exports, each one block device shared by every connection to it.
 *
 * The server needs a little more than the `BlockDevice` contract: NBD_CMD_CACHE needs a way to
 * warm the cache, and NBD_CMD_BLOCK_STATUS needs to know which ranges are certainly zero.
 * {@link NbdDevice} names those two; `ChunkedBlockDevice` has both.
 *
 * Sharing one device (and so one cache) among all connections to an export is what makes
 * NBD_FLAG_CAN_MULTI_CONN true: a flush on any connection makes every write acknowledged on any
 * connection durable. The export also holds the {@link RangeLock} that serialises
 * read-modify-writes against overlapping writes, for the same reason: overlapping writes can
 * come from different connections.
 */

import assert from "node:assert/strict";

import type { BlockDevice, BlockError, Info, Result, Sector } from "../block/block-device.js";
import type { NbdExportMetrics } from "./export-metrics.js";
import { RangeLock } from "./range-lock.js";

/** A run of bytes that either may hold data (`allocated`) or certainly reads as zeros. */
export interface AllocationExtent {
  readonly offsetBytes: number;
  readonly lengthBytes: number;
  readonly allocated: boolean;
}

/** The block device an export serves. */
export interface NbdDevice extends BlockDevice {
  /** Warm the cache for `sectors` sectors from `sectorStart` (NBD_CMD_CACHE). */
  prefetch(sectorStart: Sector, sectors: Sector): Promise<Result<void, BlockError>>;
  /**
   * Runs covering `[offsetBytes, +lengthBytes)` exactly, in order: `allocated: false` where the
   * bytes certainly read as zeros. The range must lie inside the device.
   */
  allocationMap(offsetBytes: number, lengthBytes: number): readonly AllocationExtent[];
  /**
   * Optional zero-copy read: sectors `[sectorStart, +sectors)` as memory the device does not
   * write until the view is given back with {@link returnLoan} (it copies before changing memory
   * it lent), or `undefined` when it cannot lend them (then `read`). The range must lie inside
   * the device.
   */
  lend?(sectorStart: number, sectors: number): Uint8Array | undefined;
  /**
   * The reader of a view from {@link lend} is done with it (the reply is in the kernel's
   * hands): the device may reuse that memory. Each lent view is given back once.
   */
  returnLoan?(view: Uint8Array): void;
}

/** The largest payload of one request (NBD_CMD_READ or NBD_CMD_WRITE): 32 MiB. */
export const MAX_PAYLOAD_BYTES = 32 * 1024 * 1024;

/** The preferred block size we advertise, unless the sector is larger. */
export const PREFERRED_BLOCK_BYTES = 4096;

export class NbdExport {
  /** The name clients ask for. */
  readonly name: string;
  /** Free text for NBD_INFO_DESCRIPTION and NBD_OPT_LIST. */
  readonly description: string;
  readonly device: NbdDevice;
  readonly sizeBytes: number;
  readonly sectorSize: number;
  readonly readOnly: boolean;
  /**
   * Serialises read-modify-writes against overlapping writes, across connections.
   * @internal
   */
  readonly locks = new RangeLock();
  /** Where its connections count their requests; undefined when nobody reads the counts. */
  readonly metrics: NbdExportMetrics | undefined;

  private constructor(
    name: string,
    description: string,
    device: NbdDevice,
    info: Info,
    metrics: NbdExportMetrics | undefined,
  ) {
    const sizeBytes = info.sizeSectors * BigInt(info.sectorSize);
    assert(sizeBytes <= BigInt(Number.MAX_SAFE_INTEGER), "export size must be a safe integer");
    this.name = name;
    this.description = description;
    this.device = device;
    this.sizeBytes = Number(sizeBytes);
    this.sectorSize = info.sectorSize;
    this.readOnly = !info.readWrite;
    this.metrics = metrics;
  }

  /** An export of `device` called `name`; with `metrics`, its connections count requests there. */
  static async create(
    name: string,
    device: NbdDevice,
    description = "",
    options: { readonly metrics?: NbdExportMetrics } = {},
  ): Promise<NbdExport> {
    return new NbdExport(name, description, device, await device.getInfo(), options.metrics);
  }

  /**
   * NBD_INFO_BLOCK_SIZE: minimum, preferred, maximum payload.
   *
   * - Minimum: the sector size for a client that asked for block sizes (it promises to honour
   *   them, and sectors are what the device does natively), 1 for one that did not (it may send
   *   anything; we serve unaligned requests correctly, by read-modify-write, either way).
   * - Preferred: 4 KiB (or the sector): smaller requests cost a round trip each for little data,
   *   and below a sector they cost a read-modify-write.
   * - Maximum payload: 32 MiB, the largest request we buffer; larger ones get NBD_EOVERFLOW.
   */
  blockSizes(clientAsked: boolean): {
    minimumBytes: number;
    preferredBytes: number;
    maximumBytes: number;
  } {
    return {
      minimumBytes: clientAsked ? this.sectorSize : 1,
      preferredBytes: Math.max(PREFERRED_BLOCK_BYTES, this.sectorSize),
      maximumBytes: MAX_PAYLOAD_BYTES,
    };
  }
}

/** The exports of one server, by name; the first is the default (the empty name). */
export class ExportRegistry {
  readonly #byName = new Map<string, NbdExport>();
  readonly #ordered: NbdExport[] = [];

  constructor(exports: readonly NbdExport[]) {
    assert(exports.length > 0, "a server needs at least one export");
    for (const e of exports) {
      assert(e.name !== "", "export names are not empty");
      assert(!this.#byName.has(e.name), `two exports are called "${e.name}"`);
      this.#byName.set(e.name, e);
      this.#ordered.push(e);
    }
  }

  /** The export called `name`; "" is the default export. */
  find(name: string): NbdExport | undefined {
    return name === "" ? this.#ordered[0] : this.#byName.get(name);
  }

  get all(): readonly NbdExport[] {
    return this.#ordered;
  }

  get defaultExport(): NbdExport {
    return this.#ordered[0]!;
  }
}
