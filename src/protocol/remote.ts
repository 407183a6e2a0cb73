/**
 * The REMOTE program (0x20008086 v1) as a declarative table: procedure numbers with their
 * argument and return codecs, stream direction and sparse flag. Client and daemon both read it.
 * Facts from libvirt's remote protocol (see shared/reference/libvirt-protocol.md §6).
 */
import {
  array, fixedOpaque, int, optional, string, struct, uhyper, uint, voidCodec, type Codec,
} from '../xdr/index.js';
import { STRING_MAX } from '../rpc/structs.js';
import { SECRET_PROCEDURES } from './secret.js';

export { STRING_MAX };
export const AUTH_TYPE_LIST_MAX = 20;
export const STORAGE_POOL_LIST_MAX = 16384;
export const STORAGE_VOL_LIST_MAX = 16384;

const str = string(STRING_MAX);
const optStr = optional(str);

export const poolRef = struct({ name: str, uuid: fixedOpaque(16) });
export interface PoolRef { name: string; uuid: Buffer }
export const volRef = struct({ pool: str, name: str, key: str });
export interface VolRef { pool: string; name: string; key: string }

export interface Procedure<A, R> {
  readonly num: number;
  readonly name: string;
  readonly args: Codec<A>;
  readonly ret: Codec<R>;
  /** For procedures that open a stream: who sends the data. */
  readonly stream?: 'upload' | 'download';
  /** Flag bit that turns on hole packets for the stream. */
  readonly sparseFlag?: number;
  /**
   * True when the procedure is refused on a read-only connection: every state change, plus
   * STORAGE_POOL_REFRESH as libvirt does. Unlike libvirt (which also refuses STORAGE_VOL_DOWNLOAD
   * read-only), sparsevirtd lets a read-only connection download: reading is what RO is for.
   */
  readonly writes?: boolean;
  /**
   * An event the daemon sends (MESSAGE type, never a CALL): `args` is the message body, `ret`
   * is void. A CALL of it gets "unknown procedure", as from libvirtd.
   */
  readonly event?: boolean;
}

function proc<A, R>(num: number, name: string, args: Codec<A>, ret: Codec<R>, extra: Partial<Procedure<A, R>> = {}): Procedure<A, R> {
  return { num, name, args, ret, ...extra };
}

const poolArg = struct({ pool: poolRef });
const poolFlags = struct({ pool: poolRef, flags: uint });
const volArg = struct({ vol: volRef });
const volFlags = struct({ vol: volRef, flags: uint });
const retPool = struct({ pool: poolRef });
const retVol = struct({ vol: volRef });
const volInfo = struct({ type: int, capacity: uhyper, allocation: uhyper });
const transfer = struct({ vol: volRef, offset: uhyper, length: uhyper, flags: uint });
const retNum = struct({ num: int });
const listNames = struct({ maxnames: int });
const retPoolNames = struct({ names: array(str, STORAGE_POOL_LIST_MAX) });

export const P = {
  CONNECT_OPEN: proc(1, 'CONNECT_OPEN', struct({ name: optStr, flags: uint }), voidCodec),
  CONNECT_CLOSE: proc(2, 'CONNECT_CLOSE', voidCodec, voidCodec),
  CONNECT_GET_TYPE: proc(3, 'CONNECT_GET_TYPE', voidCodec, struct({ type: str })),
  CONNECT_GET_VERSION: proc(4, 'CONNECT_GET_VERSION', voidCodec, struct({ hvVer: uhyper })),
  CONNECT_GET_HOSTNAME: proc(59, 'CONNECT_GET_HOSTNAME', voidCodec, struct({ hostname: str })),
  CONNECT_SUPPORTS_FEATURE: proc(60, 'CONNECT_SUPPORTS_FEATURE', struct({ feature: int }), struct({ supported: int })),
  AUTH_LIST: proc(66, 'AUTH_LIST', voidCodec, struct({ types: array(int, AUTH_TYPE_LIST_MAX) })),
  CONNECT_NUM_OF_STORAGE_POOLS: proc(71, 'CONNECT_NUM_OF_STORAGE_POOLS', voidCodec, retNum),
  CONNECT_LIST_STORAGE_POOLS: proc(72, 'CONNECT_LIST_STORAGE_POOLS', listNames, retPoolNames),
  CONNECT_NUM_OF_DEFINED_STORAGE_POOLS: proc(73, 'CONNECT_NUM_OF_DEFINED_STORAGE_POOLS', voidCodec, retNum),
  CONNECT_LIST_DEFINED_STORAGE_POOLS: proc(74, 'CONNECT_LIST_DEFINED_STORAGE_POOLS', listNames, retPoolNames),
  CONNECT_FIND_STORAGE_POOL_SOURCES: proc(75, 'CONNECT_FIND_STORAGE_POOL_SOURCES', struct({ type: str, srcSpec: optStr, flags: uint }), struct({ xml: str }),
    { writes: true }),
  STORAGE_POOL_CREATE_XML: proc(76, 'STORAGE_POOL_CREATE_XML', struct({ xml: str, flags: uint }), retPool, { writes: true }),
  STORAGE_POOL_DEFINE_XML: proc(77, 'STORAGE_POOL_DEFINE_XML', struct({ xml: str, flags: uint }), retPool, { writes: true }),
  STORAGE_POOL_CREATE: proc(78, 'STORAGE_POOL_CREATE', poolFlags, voidCodec, { writes: true }),
  STORAGE_POOL_BUILD: proc(79, 'STORAGE_POOL_BUILD', poolFlags, voidCodec, { writes: true }),
  STORAGE_POOL_DESTROY: proc(80, 'STORAGE_POOL_DESTROY', poolArg, voidCodec, { writes: true }),
  STORAGE_POOL_DELETE: proc(81, 'STORAGE_POOL_DELETE', poolFlags, voidCodec, { writes: true }),
  STORAGE_POOL_UNDEFINE: proc(82, 'STORAGE_POOL_UNDEFINE', poolArg, voidCodec, { writes: true }),
  STORAGE_POOL_REFRESH: proc(83, 'STORAGE_POOL_REFRESH', poolFlags, voidCodec, { writes: true }),
  STORAGE_POOL_LOOKUP_BY_NAME: proc(84, 'STORAGE_POOL_LOOKUP_BY_NAME', struct({ name: str }), retPool),
  STORAGE_POOL_LOOKUP_BY_UUID: proc(85, 'STORAGE_POOL_LOOKUP_BY_UUID', struct({ uuid: fixedOpaque(16) }), retPool),
  STORAGE_POOL_LOOKUP_BY_VOLUME: proc(86, 'STORAGE_POOL_LOOKUP_BY_VOLUME', volArg, retPool),
  STORAGE_POOL_GET_INFO: proc(87, 'STORAGE_POOL_GET_INFO', poolArg,
    struct({ state: int, capacity: uhyper, allocation: uhyper, available: uhyper })),
  STORAGE_POOL_GET_XML_DESC: proc(88, 'STORAGE_POOL_GET_XML_DESC', poolFlags, struct({ xml: str })),
  STORAGE_POOL_GET_AUTOSTART: proc(89, 'STORAGE_POOL_GET_AUTOSTART', poolArg, struct({ autostart: int })),
  STORAGE_POOL_SET_AUTOSTART: proc(90, 'STORAGE_POOL_SET_AUTOSTART', struct({ pool: poolRef, autostart: int }), voidCodec, { writes: true }),
  STORAGE_POOL_NUM_OF_VOLUMES: proc(91, 'STORAGE_POOL_NUM_OF_VOLUMES', poolArg, struct({ num: int })),
  STORAGE_POOL_LIST_VOLUMES: proc(92, 'STORAGE_POOL_LIST_VOLUMES', struct({ pool: poolRef, maxnames: int }),
    struct({ names: array(str, STORAGE_VOL_LIST_MAX) })),
  STORAGE_VOL_CREATE_XML: proc(93, 'STORAGE_VOL_CREATE_XML', struct({ pool: poolRef, xml: str, flags: uint }), retVol, { writes: true }),
  STORAGE_VOL_DELETE: proc(94, 'STORAGE_VOL_DELETE', volFlags, voidCodec, { writes: true }),
  STORAGE_VOL_LOOKUP_BY_NAME: proc(95, 'STORAGE_VOL_LOOKUP_BY_NAME', struct({ pool: poolRef, name: str }), retVol),
  STORAGE_VOL_LOOKUP_BY_KEY: proc(96, 'STORAGE_VOL_LOOKUP_BY_KEY', struct({ key: str }), retVol),
  STORAGE_VOL_LOOKUP_BY_PATH: proc(97, 'STORAGE_VOL_LOOKUP_BY_PATH', struct({ path: str }), retVol),
  STORAGE_VOL_GET_INFO: proc(98, 'STORAGE_VOL_GET_INFO', volArg, volInfo),
  STORAGE_VOL_GET_XML_DESC: proc(99, 'STORAGE_VOL_GET_XML_DESC', volFlags, struct({ xml: str })),
  STORAGE_VOL_GET_PATH: proc(100, 'STORAGE_VOL_GET_PATH', volArg, struct({ name: str })),
  CONNECT_GET_URI: proc(110, 'CONNECT_GET_URI', voidCodec, struct({ uri: str })),
  STORAGE_VOL_CREATE_XML_FROM: proc(125, 'STORAGE_VOL_CREATE_XML_FROM', struct({ pool: poolRef, xml: str, clonevol: volRef, flags: uint }), retVol, { writes: true }),
  CONNECT_IS_SECURE: proc(149, 'CONNECT_IS_SECURE', voidCodec, struct({ secure: int })),
  STORAGE_POOL_IS_ACTIVE: proc(154, 'STORAGE_POOL_IS_ACTIVE', poolArg, struct({ active: int })),
  STORAGE_POOL_IS_PERSISTENT: proc(155, 'STORAGE_POOL_IS_PERSISTENT', poolArg, struct({ persistent: int })),
  CONNECT_GET_LIB_VERSION: proc(157, 'CONNECT_GET_LIB_VERSION', voidCodec, struct({ libVer: uhyper })),
  STORAGE_VOL_WIPE: proc(165, 'STORAGE_VOL_WIPE', volFlags, voidCodec, { writes: true }),
  STORAGE_VOL_UPLOAD: proc(208, 'STORAGE_VOL_UPLOAD', transfer, voidCodec, { stream: 'upload', sparseFlag: 1, writes: true }),
  STORAGE_VOL_DOWNLOAD: proc(209, 'STORAGE_VOL_DOWNLOAD', transfer, voidCodec, { stream: 'download', sparseFlag: 1 }),
  STORAGE_VOL_WIPE_PATTERN: proc(259, 'STORAGE_VOL_WIPE_PATTERN', struct({ vol: volRef, algorithm: uint, flags: uint }), voidCodec, { writes: true }),
  STORAGE_VOL_RESIZE: proc(260, 'STORAGE_VOL_RESIZE', struct({ vol: volRef, capacity: uhyper, flags: uint }), voidCodec, { writes: true }),
  CONNECT_LIST_ALL_STORAGE_POOLS: proc(281, 'CONNECT_LIST_ALL_STORAGE_POOLS', struct({ needResults: int, flags: uint }),
    struct({ pools: array(poolRef, STORAGE_POOL_LIST_MAX), ret: uint })),
  STORAGE_POOL_LIST_ALL_VOLUMES: proc(282, 'STORAGE_POOL_LIST_ALL_VOLUMES', struct({ pool: poolRef, needResults: int, flags: uint }),
    struct({ vols: array(volRef, STORAGE_VOL_LIST_MAX), ret: uint })),
  CONNECT_REGISTER_CLOSE_CALLBACK: proc(360, 'CONNECT_REGISTER_CLOSE_CALLBACK', voidCodec, voidCodec),
  CONNECT_UNREGISTER_CLOSE_CALLBACK: proc(361, 'CONNECT_UNREGISTER_CLOSE_CALLBACK', voidCodec, voidCodec),
  CONNECT_STORAGE_POOL_EVENT_REGISTER_ANY: proc(368, 'CONNECT_STORAGE_POOL_EVENT_REGISTER_ANY',
    struct({ eventID: int, pool: optional(poolRef) }), struct({ callbackID: int })),
  CONNECT_STORAGE_POOL_EVENT_DEREGISTER_ANY: proc(369, 'CONNECT_STORAGE_POOL_EVENT_DEREGISTER_ANY', struct({ callbackID: int }), voidCodec),
  STORAGE_POOL_EVENT_LIFECYCLE: proc(370, 'STORAGE_POOL_EVENT_LIFECYCLE',
    struct({ callbackID: int, pool: poolRef, event: int, detail: int }), voidCodec, { event: true }),
  STORAGE_POOL_EVENT_REFRESH: proc(373, 'STORAGE_POOL_EVENT_REFRESH', struct({ callbackID: int, pool: poolRef }), voidCodec, { event: true }),
  STORAGE_VOL_GET_INFO_FLAGS: proc(378, 'STORAGE_VOL_GET_INFO_FLAGS', volFlags, volInfo),
  STORAGE_POOL_LOOKUP_BY_TARGET_PATH: proc(391, 'STORAGE_POOL_LOOKUP_BY_TARGET_PATH', struct({ path: str }), retPool),
  CONNECT_GET_STORAGE_POOL_CAPABILITIES: proc(403, 'CONNECT_GET_STORAGE_POOL_CAPABILITIES', struct({ flags: uint }), struct({ capabilities: str })),
  /**
   * sparsevirt's own: the content digest (`src/digest.ts`) of a volume range, computed by the
   * daemon without reading holes. Called only once the daemon took
   * `Feature.SPARSEVIRT_CONTENT_DIGEST`; libvirtd answers it as an unknown procedure.
   */
  SPARSEVIRT_VOL_CONTENT_DIGEST: proc(0x53560001, 'SPARSEVIRT_VOL_CONTENT_DIGEST',
    struct({ vol: volRef, offset: uhyper, length: uhyper, flags: uint }), struct({ algorithm: str, digest: str })),
  ...SECRET_PROCEDURES,
} as const;

export type ProcedureName = keyof typeof P;
export type ArgsOf<X> = X extends Procedure<infer A, any> ? A : never;
export type RetOf<X> = X extends Procedure<any, infer R> ? R : never;

/** Lookup by number (daemon dispatch, frame decoding in tests). */
export const PROCEDURES_BY_NUM: ReadonlyMap<number, Procedure<any, any>> = new Map(
  Object.values(P).map((p) => [p.num, p as Procedure<any, any>]),
);

/**
 * VIR_DRV_FEATURE_* numbers the handshake uses, and one of sparsevirt's own. libvirt answers 0 to
 * a feature it does not know (checked against libvirtd 9.0), so asking is safe with any daemon.
 *
 * SPARSEVIRT_DEEP_QUEUE: "this client's cost per received stream packet does not grow with the
 * number of packets queued for it". libvirt's own client (9.0) walks its whole queue for each
 * packet it reads, so sparsevirtd keeps the socket's send buffer small for small packets unless
 * the client said this (see `Peer.deepQueue`).
 *
 * SPARSEVIRT_CONTENT_DIGEST: the daemon answers `P.SPARSEVIRT_VOL_CONTENT_DIGEST`.
 */
export const Feature = {
  PROGRAM_KEEPALIVE: 10, REMOTE_EVENT_CALLBACK: 14, REMOTE_CLOSE_CALLBACK: 15,
  SPARSEVIRT_DEEP_QUEUE: 0x53560001,
  SPARSEVIRT_CONTENT_DIGEST: 0x53560002,
} as const;

export const AuthType = { NONE: 0, SASL: 1, POLKIT: 2 } as const;
export const CONNECT_RO = 1;

export const PoolState = { INACTIVE: 0, BUILDING: 1, RUNNING: 2, DEGRADED: 3, INACCESSIBLE: 4 } as const;
export const VolType = { FILE: 0, BLOCK: 1, DIR: 2, NETWORK: 3, NETDIR: 4, PLOOP: 5 } as const;

/** virStoragePoolEventID and virStoragePoolEventLifecycleType. */
export const PoolEventId = { LIFECYCLE: 0, REFRESH: 1 } as const;
export const PoolLifecycle = { DEFINED: 0, UNDEFINED: 1, STARTED: 2, STOPPED: 3, CREATED: 4, DELETED: 5 } as const;
export const PoolCreateFlags = { WITH_BUILD: 1, WITH_BUILD_OVERWRITE: 2, WITH_BUILD_NO_OVERWRITE: 4 } as const;

export const ListPoolsFlags = {
  INACTIVE: 1, ACTIVE: 2, PERSISTENT: 4, TRANSIENT: 8, AUTOSTART: 16, NO_AUTOSTART: 32,
} as const;
/** libvirt's storage pool types (virStoragePoolType), in its order. */
export const POOL_TYPES: readonly string[] = ['dir', 'fs', 'netfs', 'logical', 'disk', 'iscsi', 'iscsi-direct', 'scsi', 'mpath', 'rbd', 'sheepdog', 'gluster', 'zfs', 'vstorage'];
/** VIR_CONNECT_LIST_STORAGE_POOLS_<TYPE>: each pool type's bit in CONNECT_LIST_ALL_STORAGE_POOLS's flags (the bits below are ListPoolsFlags). */
export const ListPoolsTypeFlags: Readonly<Record<string, number>> = {
  dir: 1 << 6, fs: 1 << 7, netfs: 1 << 8, logical: 1 << 9, disk: 1 << 10, iscsi: 1 << 11, scsi: 1 << 12, mpath: 1 << 13,
  rbd: 1 << 14, sheepdog: 1 << 15, gluster: 1 << 16, zfs: 1 << 17, vstorage: 1 << 18, 'iscsi-direct': 1 << 19,
};
export const VolResizeFlags = { ALLOCATE: 1, DELTA: 2, SHRINK: 4 } as const;
export const VolInfoFlags = { GET_PHYSICAL: 1 } as const;
export const VolCreateFlags = { PREALLOC_METADATA: 1, REFLINK: 2, VALIDATE: 4 } as const;
export const PoolBuildFlags = { NEW: 0, REPAIR: 1, RESIZE: 2, NO_OVERWRITE: 4, OVERWRITE: 8 } as const;
export const WipeAlgorithm = { ZERO: 0, NNSA: 1, DOD: 2, BSI: 3, GUTMANN: 4, SCHNEIER: 5, PFITZNER7: 6, PFITZNER33: 7, RANDOM: 8, TRIM: 9 } as const;
/** The wipe algorithms as virsh names them (`vol-wipe --algorithm`), indexed by their values. */
export const WIPE_ALGORITHM_NAMES: readonly string[] = Object.keys(WipeAlgorithm).map((k) => k.toLowerCase());
export const SPARSE_STREAM = 1;
