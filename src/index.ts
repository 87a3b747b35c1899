/**
 * The public API of s3blk: `import { openStoreStack, openVolume } from "s3blk"`.
 *
 * It is 0.x and may change until 1.0: clones, metrics and a write-ahead journal are about to
 * extend it. What is
 * exported here is the whole of it; any other module under `dist/` is internal.
 *
 * - **The block contract**: {@link BlockDevice} (MirageOS's `Mirage_block.S`), its results and
 *   errors as values, and the pretty-printers {@link ppError} / {@link ppWriteError}.
 * - **Stores**: the {@link ObjectStore} interface, the real stores (S3, a local directory,
 *   memory), the layers, and the one factory that builds a stack ({@link openStoreStack}, or
 *   {@link buildStoreStack} over a store you opened).
 * - **The volume lifecycle**: {@link createVolume}, {@link openVolume}, {@link describeVolume},
 *   {@link deleteVolume}, snapshots, {@link cloneVolume} and {@link gcVolume}; each takes a
 *   store stack.
 * - **The device**: {@link ChunkedBlockDevice}, what `openVolume` returns.
 * - **The NBD server**: {@link NbdServer} serving {@link NbdExport}s.
 *
 * ```ts
 * import { openStoreStack, createVolume, openVolume, ppWriteError } from "s3blk";
 *
 * const stack = openStoreStack("s3://my-bucket/vm1");
 * await createVolume(stack, { sizeBytes: 1 << 30 });
 * const device = await openVolume(stack, { cacheBytes: 256 << 20 });
 * const written = await device.write(0n, [new Uint8Array(4096)]);
 * if (!written.ok) console.error(ppWriteError(written.error));
 * await device.disconnect(); // flushes, releases the lease, closes the store
 * ```
 *
 * @packageDocumentation
 */

// The block contract.
export {
  InvalidArgumentError,
  ppError,
  ppWriteError,
  type BlockDevice,
  type BlockError,
  type Disconnected,
  type Info,
  type IoError,
  type IsReadOnly,
  type Result,
  type Sector,
  type Unimplemented,
  type WriteError,
  type WriteOptions,
} from "./block/block-device.js";

// Stores and the stack.
export {
  DEFAULT_REQUEST_TIMEOUT_MS,
  MAX_DELETE_BATCH,
  StoreError,
  listAll,
  type ByteRangeRequest,
  type GetOptions,
  type GetResult,
  type ListEntry,
  type ListPage,
  type ObjectMetadata,
  type ObjectStore,
  type PutOptions,
  type PutResult,
  type StoreErrorCode,
} from "./store/object-store.js";
export { StoreLayer } from "./store/store-layer.js";
export {
  StoreUrlError,
  buildStoreStack,
  openStoreStack,
  type StoreLayerOptions,
  type StoreStack,
  type StoreStackOptions,
} from "./store/store-stack.js";
export { S3Store, type S3StoreOptions } from "./store/s3-store.js";
export { FileStore } from "./store/file-store.js";
export { MemoryStore } from "./store/memory-store.js";
export {
  CountingStore,
  REQUEST_OUTCOMES,
  STORE_OPERATIONS,
  type CountingStoreOptions,
  type LeaseWriteCounts,
  type OutcomeCounts,
  type RequestCounts,
  type RequestOutcome,
  type StoreOperation,
} from "./store/counting-store.js";
// The fence and the retry layer are built by buildStoreStack only (the fence must sit below the
// retries), so they are exported as types.
export type { Fence, FencedStore } from "./store/fenced-store.js";
export {
  DEFAULT_RETRY_POLICY,
  type RetryPolicy,
  type RetryStore,
  type RetryStoreOptions,
} from "./store/retry-store.js";

// The volume lifecycle, its format and its lease.
export {
  VolumeError,
  VolumeVersionError,
  upgradeVolume,
  type UpgradeOutcome,
  createVolume,
  deleteVolume,
  describeVolume,
  openVolume,
  readSuperblock,
  type OpenOptions,
  type VolumeDescription,
  type VolumeStack,
} from "./lifecycle/volume-lifecycle.js";
export {
  createSnapshot,
  deleteSnapshot,
  listSnapshots,
  rollbackVolume,
  type SnapshotSummary,
} from "./lifecycle/snapshot-lifecycle.js";
export { SnapshotError, type SnapshotRecord } from "./volume/snapshots.js";
export { cloneVolume, gcVolume, type CloneStack } from "./lifecycle/clone-lifecycle.js";
export { CloneError } from "./volume/clones.js";
export { DEFAULT_GC_GRACE_MS, type GcOptions, type GcReport } from "./volume/garbage.js";
export {
  ChunkCorruptError,
  FORMAT_VERSION,
  FormatError,
  type EncodedChunkMap,
  type MapSource,
  type Origin,
  type Superblock,
  type VolumeParameters,
} from "./volume/format.js";
export {
  DEFAULT_LEASE_TIMING,
  LeaseHeldError,
  LeaseLostError,
  LeaseTimingError,
  ProcessLeases,
  type LeaseHolder,
  type LeaseOptions,
  type LeaseRecord,
  type ProcessLeaseRecord,
  type RevokedClaim,
} from "./volume/lease.js";

// The device.
export {
  ChunkedBlockDevice,
  type DeviceOptions,
  type LeaseState,
} from "./device/chunked-block-device.js";
export type { CacheStats, Extent } from "./cache/page-cache.js";
export type { GarbageStats } from "./volume/chunk-store.js";
export { systemClock, type Clock } from "./util/clock.js";

// The NBD server.
export { NbdServer, nbdUri, type Endpoint, type NbdServerOptions } from "./nbd/server.js";
export { ExportRegistry, NbdExport, type AllocationExtent, type NbdDevice } from "./nbd/exports.js";
export {
  ERROR_NAMES,
  LATENCY_BUCKETS_SECONDS,
  NbdExportMetrics,
  UNKNOWN_COMMAND,
  type CommandCell,
} from "./nbd/export-metrics.js";
export type { ConnectionLimits } from "./nbd/connection.js";
export type { Logger } from "./util/logger.js";
export type { TlsMode } from "./nbd/negotiation.js";
export {
  parsePskFile,
  readTlsCertificates,
  readTlsPskFile,
  TlsSetupError,
  type NbdTlsOptions,
  type TlsCertificates,
} from "./nbd/tls.js";
