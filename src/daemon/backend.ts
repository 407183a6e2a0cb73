/**
 * The storage backend interface: what one type of pool (dir, rbd) does with its target, below
 * the storage driver (storage.ts), in the manner of libvirt's `virStorageBackend`.
 *
 * The driver keeps libvirt's semantics: the pool registry and its persistence, events, flags
 * checks of the public API, states ("storage pool is not active"), duplicate checks, transient
 * pools, the pool XML. A backend only touches its storage. An optional method a backend leaves
 * out is an operation its pools do not support: the driver answers it with libvirt's
 * VIR_ERR_NO_SUPPORT message, as libvirt does for a NULL callback (`supports` says the same,
 * for the capabilities and for callers that ask first).
 *
 * Errors: a backend throws `RemoteError`s with libvirt's codes (errors.ts), e.g. NO_STORAGE_VOL
 * from `lookupVolume`, STORAGE_VOL_EXIST from `createVolume`.
 *
 * A backend is one object for every daemon of the process: what belongs to one daemon (its
 * secrets) reaches it as a `BackendContext` from that daemon's driver, never through a store of
 * the process.
 */
import type { Chunk, FileRange, FileRef, WrittenRange } from '../chunk.js';

/** Operations a backend may leave out (libvirt's optional callbacks). */
export type BackendOp =
  | 'build' | 'deletePool' | 'createVol' | 'createVolFrom' | 'deleteVol' | 'resizeVol' | 'wipeVol' | 'upload' | 'download';

// ------------------------------------------------------------------ pool definitions

/** `<source><host name=… port=…/>` */
export interface PoolSourceHost {
  name: string;
  port: number | null;
}

/** `<source><auth type=… username=…><secret uuid=…|usage=…/></auth>` */
export interface PoolAuth {
  /** 'ceph' or 'chap' */
  type: string;
  username: string;
  secret: { uuid: string } | { usage: string };
}

export interface PoolSource {
  hosts: PoolSourceHost[];
  /** `<source><name>`: the RBD pool (Ceph's), the volume group… */
  name: string | null;
  auth: PoolAuth | null;
}

/** What a `<pool>` definition says, for any type. */
export interface PoolDef {
  /** 'dir', 'rbd', … (one of POOL_TYPES) */
  type: string;
  name: string;
  /** null when the XML had none (a new pool gets a random one). */
  uuid: string | null;
  /** `<target><path>`, sanitized; null for pools without a target (rbd). */
  target: string | null;
  /** `<target><permissions><mode>`, applied by build (dir). */
  mode: number | null;
  source: PoolSource;
  /**
   * `<rbd:config_opts><rbd:option name=… value=…/>` (xmlns:rbd='http://libvirt.org/schemas/storagepool/rbd/1.0'),
   * in order.
   */
  configOpts: Array<{ name: string; value: string }>;
}

export interface PoolStats {
  capacity: bigint;
  allocation: bigint;
  available: bigint;
}

/** A pool known to the driver: its definition and its runtime state. */
export class Pool {
  def: PoolDef;
  readonly uuid: string;
  autostart = false;
  active = false;
  /** False for a pool made by STORAGE_POOL_CREATE_XML: never saved, gone once stopped. */
  persistent = true;
  /** Last values seen while running: libvirt keeps showing them after a destroy. */
  stats: PoolStats = { capacity: 0n, allocation: 0n, available: 0n };
  /** Permissions of the target as last seen by start/refresh (dir). */
  perms: { mode: number; owner: number; group: number } | null = null;
  /** Saves of this pool's record, in order (the driver's). */
  saving: Promise<void> = Promise.resolve();
  /** The backend's own state of a running pool (a cluster connection…); null when stopped. */
  conn: unknown = null;

  constructor(def: PoolDef, uuid: string) {
    this.def = def;
    this.uuid = uuid;
  }

  get name(): string {
    return this.def.name;
  }

  get type(): string {
    return this.def.type;
  }

  /** The target directory of a dir pool ('' for pools without one). */
  get target(): string {
    return this.def.target ?? '';
  }

  get mode(): number | null {
    return this.def.mode;
  }

  get uuidBytes(): Buffer {
    return Buffer.from(this.uuid.replace(/-/g, ''), 'hex');
  }

  /** The path of volume `name` in a dir pool. */
  volPath(name: string): string {
    return this.target === '/' ? `/${name}` : `${this.target}/${name}`;
  }
}

// ------------------------------------------------------------------ volumes

/** A volume found by a lookup. */
export interface Volume {
  pool: Pool;
  name: string;
  /** libvirt's key: the path for dir volumes, `<source name>/<image>` for rbd. */
  key: string;
  /** libvirt's target path: the file for dir volumes, `<source name>/<image>` for rbd. */
  path: string;
}

export interface VolInfo {
  /** VolType */
  type: number;
  capacity: bigint;
  allocation: bigint;
  /** What GET_PHYSICAL reports in place of the allocation (dir: the file's size). */
  physical: bigint;
  /** The volume's format as its backend sees it: 'raw', 'qcow2'… */
  format: string;
}

/** What a `<volume>` definition asks for. */
export interface VolDef {
  name: string;
  /** null only when the caller allowed it to be absent (a clone takes its source's). */
  capacity: number | null;
  /** undefined when `<allocation>` is absent. */
  allocation: number | undefined;
  /** `<target><format type=…>`; null when absent (the backend's default). */
  format: string | null;
  /** `<target><compat>` (qcow2: '0.10' or '1.1'). */
  compat: string | null;
  /** `<target><features>` children (qcow2: 'lazy_refcounts', 'extended_l2'). */
  features: string[];
  /** `<target><clusterSize>` in bytes. */
  clusterSize: number | null;
  /** `<backingStore><path>` and its `<format type=…>` (null format: probed). */
  backingStore: { path: string; format: string | null } | null;
  /** `<target><permissions><mode>` */
  mode: number | null;
}

/** The source of STORAGE_VOL_CREATE_XML_FROM: may belong to another backend (dir ↔ rbd). */
export interface VolumeSource {
  vol: Volume;
  /** Its backend's info (capacity, allocation, format). */
  info: VolInfo;
  /** Reads it as a transfer would (download); for backends that cannot share their storage. */
  openRead(o: ReadOptions): Promise<VolumeReader>;
}

export interface ReadOptions {
  offset: number;
  /** null: to the end. */
  length: number | null;
  /** true: holes as hole chunks; false: holes as zeros. */
  sparse: boolean;
}

export interface WriteOptions {
  offset: number;
  /** null: no limit. */
  length: number | null;
}

/** A volume's content for a download: batches of chunks and, where the data lies in a file, FileRanges (sendfile). */
export interface VolumeReader {
  batches(): AsyncIterable<Array<Chunk | FileRange>>;
  close(): Promise<void>;
}

/** Hooks the transfer gives a writer: buffer reuse and receiving in place. */
export interface WriteHooks {
  /** Gives the rpc layer's frame buffers back once their bytes landed. */
  release?: (buffers: Buffer[]) => void;
  /**
   * The receiving stream's in-place receive: a writer whose volume is a file in memory calls it
   * with the file and the offset of the stream's position 0 (large packets then arrive as
   * WrittenRanges, already in the file), and with null before closing. Writers that cannot take
   * it never call it.
   */
  receiveInto?: (target: { file: FileRef; base: number } | null) => unknown;
}

/** A volume's side of an upload: consumes the received chunks in order, at the offset given at open. */
export interface VolumeWriter {
  /** Writes every chunk of `source` (holes read back as zeros afterwards); rejects on the first failure. */
  write(source: AsyncIterable<Array<Chunk | WrittenRange>>, hooks: WriteHooks): Promise<void>;
  close(): Promise<void>;
}

/** What `getStoragePoolCapabilities` says of a pool type's volumes. */
export interface VolFormatCaps {
  defaultFormat: string;
  formats: readonly string[];
}

// ------------------------------------------------------------------ the backend

/** What a daemon's storage driver gives the backend calls that need the daemon's own state. */
export interface BackendContext {
  /**
   * The value of the secret `<auth><secret uuid=…|usage=…/>` names, from this daemon's secret
   * driver, for the daemon's own use (a private secret's too). `usageType` is the type the pool
   * needs (virSecretUsageType: CEPH for rbd). Throws libvirt's errors: NO_SECRET for a missing
   * secret or value, INVALID_ARG for a secret of another usage type.
   */
  lookupSecretValue(ref: PoolAuth['secret'], usageType: number): Buffer;
}

export interface PoolBackend {
  /** The pool type: 'dir', 'rbd'. */
  readonly type: string;
  /** The optional operations this backend has. */
  readonly supports: ReadonlySet<BackendOp>;
  /** The volume formats for the capabilities; null: no `<volOptions>`. */
  readonly volFormats: VolFormatCaps | null;

  /** libvirt's refusals of a definition of this type (missing source name, host…). */
  checkDefinition(def: PoolDef): void;
  /** True when two definitions of this type name the same storage (libvirt's "Storage source conflict"). */
  sameSource(a: PoolDef, b: PoolDef): boolean;

  build?(pool: Pool, flags: number): Promise<void>;
  /** Connect to / check the target and fill `pool.stats` (and `pool.perms`, `pool.conn`). */
  start(pool: Pool, ctx: BackendContext): Promise<void>;
  /** Let go of what start took (`pool.conn`); never throws for a target that went away. */
  stop(pool: Pool): Promise<void>;
  /** Re-check the target and refill `pool.stats`; a failure stops the pool (the driver's). */
  refresh(pool: Pool): Promise<void>;
  deletePool?(pool: Pool, flags: number): Promise<void>;
  /**
   * Refill `pool.stats` of a running pool cheaply, for pool-info and pool-dumpxml (dir: statfs).
   * Absent: they show what the last start or refresh found, as libvirt does.
   */
  updateStats?(pool: Pool): Promise<void>;

  /** Names of the volumes, sorted. */
  listVolumes(pool: Pool): Promise<string[]>;
  /** NO_STORAGE_VOL when absent. */
  lookupVolume(pool: Pool, name: string): Promise<Volume>;
  /** The volume of this (running) pool with this key or target path, if any. */
  findVolume?(pool: Pool, keyOrPath: string): Promise<Volume | null>;
  volumeInfo(vol: Volume): Promise<VolInfo>;
  volumeXml(vol: Volume): Promise<string>;

  createVolume?(pool: Pool, def: VolDef, flags: number): Promise<Volume>;
  createVolumeFrom?(pool: Pool, def: VolDef, src: VolumeSource, flags: number): Promise<Volume>;
  deleteVolume?(vol: Volume, flags: number): Promise<void>;
  /** To `capacity` bytes (the driver computed it from DELTA/SHRINK and checked it). */
  resizeVolume?(vol: Volume, capacity: bigint, flags: number): Promise<void>;
  /** `algorithm`: WipeAlgorithm. */
  wipeVolume?(vol: Volume, algorithm: number, flags: number): Promise<void>;
  openRead?(vol: Volume, o: ReadOptions): Promise<VolumeReader>;
  openWrite?(vol: Volume, o: WriteOptions): Promise<VolumeWriter>;
}

// ------------------------------------------------------------------ the registry

const backends = new Map<string, PoolBackend>();

/** Make a backend known to the driver (backends/index.ts registers them all). */
export function registerBackend(b: PoolBackend): void {
  backends.set(b.type, b);
}

/** The backend of a pool type, or undefined when sparsevirtd has none. */
export function backendFor(type: string): PoolBackend | undefined {
  return backends.get(type);
}

/** The registered backends, by type. */
export function registeredBackends(): PoolBackend[] {
  return [...backends.values()];
}
