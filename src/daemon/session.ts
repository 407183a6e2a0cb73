/**
 * One client connection: the handshake state (open, read-only, the URI it opened) and the
 * dispatch of every CALL to its handler, with libvirt's answers for everything that is not a
 * well-formed call of a known procedure on an open connection.
 *
 * Every handler runs wrapped: whatever it throws becomes a REPLY/ERROR (libvirt errors as they
 * are, anything else code 1 "internal error"), never a crash and never a dropped connection.
 */
import os from 'node:os';
import { SparsevirtError } from '../errors.js';
import { MessageType, REMOTE_PROGRAM, REMOTE_VERSION, Status, type Message } from '../rpc/message.js';
import type { Peer } from '../rpc/peer.js';
import { encodeRemoteError } from '../rpc/structs.js';
import {
  AuthType, CONNECT_RO, Feature, P, PROCEDURES_BY_NUM, PoolEventId, SPARSE_STREAM, STORAGE_POOL_LIST_MAX, STORAGE_VOL_LIST_MAX,
  type PoolRef, type Procedure, type VolRef,
} from '../protocol/remote.js';
import { XdrReader, encode } from '../xdr/index.js';
import { CODE, DOMAIN, checkFlags, readOnlyError, rpcError, storageError, toRemoteError, virError } from './errors.js';
import type { Logger } from './log.js';
import { SECRET_HANDLERS } from './secrets.js';
import type { Pool, PoolEvent, StorageDriver, Volume } from './storage.js';
import { ContentDigest, DIGEST_NAME } from '../digest.js';
import { digestRange, readerContentDigest } from './digest.js';
import { Transfer, transferLength } from './transfer.js';

/** What virsh gets from CONNECT_GET_LIB_VERSION: libvirt 9.0.0, the version we are compatible with. */
export const LIB_VERSION = 9000000n;
export const DRIVER_TYPE = 'sparsevirt';
export const DEFAULT_URI = 'sparsevirt:///system';

export interface SessionContext {
  driver: StorageDriver;
  log: Logger;
  /** sparsevirt's version as libvirt encodes one: major·10⁶ + minor·10³ + micro. */
  hvVersion: bigint;
  /** Throws the error to send when one more transfer is not allowed (`active` are open). */
  admitTransfer?(active: number): void;
}

interface Call {
  session: Session;
  msg: Message;
  /** Runs after the reply is queued (streams start sending only after their REPLY). */
  after?: () => void;
}

interface Handler {
  /** Answered before CONNECT_OPEN too. */
  beforeOpen?: boolean;
  /** libvirt reports "hypervisor connection not open" for these before CONNECT_OPEN. */
  hypervisor?: boolean;
  /** The libvirt API that refuses this on a read-only connection (procedures marked `writes`). */
  api?: string;
  run(call: Call, args: any): unknown;
}

/** libvirtd's serial on the event messages it sends. */
const EVENT_SERIAL = 1;

const FEATURES_SUPPORTED = new Set<number>([Feature.PROGRAM_KEEPALIVE, Feature.REMOTE_EVENT_CALLBACK, Feature.REMOTE_CLOSE_CALLBACK, Feature.SPARSEVIRT_CONTENT_DIGEST]);

/** How the client reached us: what CONNECT_IS_SECURE answers for. */
export type SessionTransport = 'unix' | 'tcp' | 'tls';

const poolRet = (p: Pool) => ({ pool: poolRef(p) });
const volRet = (v: Volume) => ({ vol: volRef(v) });

function poolRef(p: Pool): PoolRef {
  return { name: p.name, uuid: p.uuidBytes };
}

function volRef(v: Volume): VolRef {
  return { pool: v.pool.name, name: v.name, key: v.key };
}

const HANDLERS = new Map<number, Handler>([
  // ------------------------------------------------------------ connection
  [P.AUTH_LIST.num, { beforeOpen: true, run: () => ({ types: [AuthType.NONE] }) }],
  [P.CONNECT_SUPPORTS_FEATURE.num, {
    beforeOpen: true,
    run: ({ session }, a: { feature: number }) => {
      if (a.feature === Feature.PROGRAM_KEEPALIVE) {
        session.peer.startKeepalive();
        return { supported: 1 };
      }
      session.requireOpen(true);
      if (a.feature === Feature.SPARSEVIRT_DEEP_QUEUE) {
        session.peer.deepQueue = true;
        return { supported: 1 };
      }
      return { supported: FEATURES_SUPPORTED.has(a.feature) ? 1 : 0 };
    },
  }],
  [P.CONNECT_OPEN.num, {
    beforeOpen: true,
    run: ({ session }, a: { name: string | null; flags: number }) => session.open(a.name, a.flags),
  }],
  [P.CONNECT_CLOSE.num, { beforeOpen: true, run: ({ session }) => session.closeConnection() }],
  [P.CONNECT_REGISTER_CLOSE_CALLBACK.num, { hypervisor: true, run: () => undefined }],
  [P.CONNECT_UNREGISTER_CLOSE_CALLBACK.num, { hypervisor: true, run: () => undefined }],
  [P.CONNECT_GET_URI.num, { hypervisor: true, run: ({ session }) => ({ uri: session.uri }) }],
  [P.CONNECT_GET_TYPE.num, { hypervisor: true, run: () => ({ type: DRIVER_TYPE }) }],
  [P.CONNECT_GET_VERSION.num, { hypervisor: true, run: ({ session }) => ({ hvVer: session.ctx.hvVersion }) }],
  [P.CONNECT_GET_LIB_VERSION.num, { hypervisor: true, run: () => ({ libVer: LIB_VERSION }) }],
  [P.CONNECT_GET_HOSTNAME.num, { hypervisor: true, run: () => ({ hostname: os.hostname() }) }],
  // libvirt's client asks this for both virConnectIsSecure and virConnectIsEncrypted and adds
  // what it knows of its own transport (encrypted: TLS, ssh).
  [P.CONNECT_IS_SECURE.num, { hypervisor: true, run: ({ session }) => ({ secure: session.transport === 'tcp' ? 0 : 1 }) }],
  [P.CONNECT_GET_STORAGE_POOL_CAPABILITIES.num, {
    run: ({ session }, a: { flags: number }) => ({ capabilities: session.driver.poolCapabilities(a.flags) }),
  }],
  [P.CONNECT_STORAGE_POOL_EVENT_REGISTER_ANY.num, {
    run: ({ session }, a: { eventID: number; pool: PoolRef | null }) => ({ callbackID: session.registerPoolEvents(a.eventID, a.pool) }),
  }],
  [P.CONNECT_STORAGE_POOL_EVENT_DEREGISTER_ANY.num, {
    run: ({ session }, a: { callbackID: number }) => session.deregisterPoolEvents(a.callbackID),
  }],

  // ------------------------------------------------------------ pools
  [P.CONNECT_LIST_ALL_STORAGE_POOLS.num, {
    run: ({ session }, a: { needResults: number; flags: number }) => {
      const pools = session.driver.listPools(a.flags);
      return { pools: a.needResults ? pools.map(poolRef) : [], ret: pools.length };
    },
  }],
  [P.CONNECT_NUM_OF_STORAGE_POOLS.num, { run: ({ session }) => ({ num: session.driver.poolNames(true).length }) }],
  [P.CONNECT_NUM_OF_DEFINED_STORAGE_POOLS.num, { run: ({ session }) => ({ num: session.driver.poolNames(false).length }) }],
  [P.CONNECT_LIST_STORAGE_POOLS.num, {
    run: ({ session }, a: { maxnames: number }) => ({ names: firstNames(() => session.driver.poolNames(true), a.maxnames, STORAGE_POOL_LIST_MAX, 'REMOTE_STORAGE_POOL_LIST_MAX') }),
  }],
  [P.CONNECT_LIST_DEFINED_STORAGE_POOLS.num, {
    run: ({ session }, a: { maxnames: number }) => ({ names: firstNames(() => session.driver.poolNames(false), a.maxnames, STORAGE_POOL_LIST_MAX, 'REMOTE_STORAGE_POOL_LIST_MAX') }),
  }],
  [P.CONNECT_FIND_STORAGE_POOL_SOURCES.num, {
    api: 'virConnectFindStoragePoolSources',
    run: ({ session }, a: { type: string; srcSpec: string | null; flags: number }) => session.driver.findPoolSources(a.type, a.flags),
  }],
  [P.STORAGE_POOL_LOOKUP_BY_TARGET_PATH.num, { run: ({ session }, a: { path: string }) => poolRet(session.driver.poolByTargetPath(a.path)) }],
  [P.STORAGE_POOL_CREATE_XML.num, {
    api: 'virStoragePoolCreateXML',
    run: async ({ session }, a: { xml: string; flags: number }) => poolRet(await session.driver.createTransient(a.xml, a.flags)),
  }],
  [P.STORAGE_POOL_LOOKUP_BY_NAME.num, { run: ({ session }, a: { name: string }) => poolRet(session.driver.poolByName(a.name)) }],
  [P.STORAGE_POOL_LOOKUP_BY_UUID.num, { run: ({ session }, a: { uuid: Buffer }) => poolRet(session.driver.poolByUuid(a.uuid)) }],
  [P.STORAGE_POOL_LOOKUP_BY_VOLUME.num, { run: ({ session }, a: { vol: VolRef }) => poolRet(session.driver.poolOfVol(a.vol)) }],
  [P.STORAGE_POOL_DEFINE_XML.num, {
    api: 'virStoragePoolDefineXML',
    run: async ({ session }, a: { xml: string; flags: number }) => poolRet(await session.driver.define(a.xml, a.flags)),
  }],
  [P.STORAGE_POOL_BUILD.num, {
    api: 'virStoragePoolBuild',
    run: ({ session }, a: { pool: PoolRef; flags: number }) => session.driver.build(session.driver.poolByRef(a.pool), a.flags),
  }],
  [P.STORAGE_POOL_CREATE.num, {
    api: 'virStoragePoolCreate',
    run: ({ session }, a: { pool: PoolRef; flags: number }) => session.driver.start(session.driver.poolByRef(a.pool), a.flags),
  }],
  [P.STORAGE_POOL_DESTROY.num, {
    api: 'virStoragePoolDestroy',
    run: ({ session }, a: { pool: PoolRef }) => session.driver.destroy(session.driver.poolByRef(a.pool)),
  }],
  [P.STORAGE_POOL_DELETE.num, {
    api: 'virStoragePoolDelete',
    run: ({ session }, a: { pool: PoolRef; flags: number }) => session.driver.deletePool(session.driver.poolByRef(a.pool), a.flags),
  }],
  [P.STORAGE_POOL_UNDEFINE.num, {
    api: 'virStoragePoolUndefine',
    run: ({ session }, a: { pool: PoolRef }) => session.driver.undefine(session.driver.poolByRef(a.pool)),
  }],
  [P.STORAGE_POOL_REFRESH.num, {
    api: 'virStoragePoolRefresh',
    run: ({ session }, a: { pool: PoolRef; flags: number }) => session.driver.refresh(session.driver.poolByRef(a.pool), a.flags),
  }],
  [P.STORAGE_POOL_GET_INFO.num, {
    run: ({ session }, a: { pool: PoolRef }) => session.driver.poolInfo(session.driver.poolByRef(a.pool)),
  }],
  [P.STORAGE_POOL_GET_XML_DESC.num, {
    run: async ({ session }, a: { pool: PoolRef; flags: number }) => ({ xml: await session.driver.poolXml(session.driver.poolByRef(a.pool), a.flags) }),
  }],
  [P.STORAGE_POOL_GET_AUTOSTART.num, {
    run: ({ session }, a: { pool: PoolRef }) => ({ autostart: session.driver.poolByRef(a.pool).autostart ? 1 : 0 }),
  }],
  [P.STORAGE_POOL_SET_AUTOSTART.num, {
    api: 'virStoragePoolSetAutostart',
    run: ({ session }, a: { pool: PoolRef; autostart: number }) => session.driver.setAutostart(session.driver.poolByRef(a.pool), a.autostart !== 0),
  }],
  [P.STORAGE_POOL_IS_ACTIVE.num, {
    run: ({ session }, a: { pool: PoolRef }) => ({ active: session.driver.poolByRef(a.pool).active ? 1 : 0 }),
  }],
  [P.STORAGE_POOL_IS_PERSISTENT.num, {
    run: ({ session }, a: { pool: PoolRef }) => ({ persistent: session.driver.poolByRef(a.pool).persistent ? 1 : 0 }),
  }],
  [P.STORAGE_POOL_NUM_OF_VOLUMES.num, {
    run: async ({ session }, a: { pool: PoolRef }) => ({ num: (await session.driver.listVolumes(session.driver.poolByRef(a.pool))).length }),
  }],
  [P.STORAGE_POOL_LIST_VOLUMES.num, {
    run: async ({ session }, a: { pool: PoolRef; maxnames: number }) => {
      checkMaxnames(a.maxnames, STORAGE_VOL_LIST_MAX, 'REMOTE_STORAGE_VOL_LIST_MAX');
      const names = await session.driver.listVolumes(session.driver.poolByRef(a.pool));
      return { names: names.slice(0, a.maxnames) };
    },
  }],
  [P.STORAGE_POOL_LIST_ALL_VOLUMES.num, {
    run: async ({ session }, a: { pool: PoolRef; needResults: number; flags: number }) => {
      const pool = session.driver.poolByRef(a.pool);
      const names = await session.driver.listVolumes(pool, a.flags);
      const vols = a.needResults ? names.map((name) => ({ pool: pool.name, name, key: pool.volPath(name) })) : [];
      return { vols, ret: names.length };
    },
  }],

  // ------------------------------------------------------------ volumes
  [P.STORAGE_VOL_LOOKUP_BY_NAME.num, {
    run: async ({ session }, a: { pool: PoolRef; name: string }) => volRet(await session.driver.volByName(session.driver.poolByRef(a.pool), a.name)),
  }],
  [P.STORAGE_VOL_LOOKUP_BY_KEY.num, { run: async ({ session }, a: { key: string }) => volRet(await session.driver.volByKey(a.key)) }],
  [P.STORAGE_VOL_LOOKUP_BY_PATH.num, { run: async ({ session }, a: { path: string }) => volRet(await session.driver.volByPath(a.path)) }],
  [P.STORAGE_VOL_CREATE_XML.num, {
    api: 'virStorageVolCreateXML',
    run: async ({ session }, a: { pool: PoolRef; xml: string; flags: number }) =>
      volRet(await session.driver.createVol(session.driver.poolByRef(a.pool), a.xml, a.flags)),
  }],
  [P.STORAGE_VOL_CREATE_XML_FROM.num, {
    api: 'virStorageVolCreateXMLFrom',
    run: async ({ session }, a: { pool: PoolRef; xml: string; clonevol: VolRef; flags: number }) =>
      volRet(await session.driver.createVolFrom(session.driver.poolByRef(a.pool), a.xml, a.clonevol, a.flags)),
  }],
  [P.STORAGE_VOL_DELETE.num, {
    api: 'virStorageVolDelete',
    run: async ({ session }, a: { vol: VolRef; flags: number }) => session.driver.deleteVol(await session.driver.volByRef(a.vol), a.flags),
  }],
  [P.STORAGE_VOL_GET_INFO.num, {
    run: async ({ session }, a: { vol: VolRef }) => session.driver.volInfo(await session.driver.volByRef(a.vol)),
  }],
  [P.STORAGE_VOL_GET_INFO_FLAGS.num, {
    run: async ({ session }, a: { vol: VolRef; flags: number }) => {
      checkFlags(a.flags, 1, 'storageVolGetInfoFlags');
      return session.driver.volInfo(await session.driver.volByRef(a.vol), a.flags);
    },
  }],
  [P.STORAGE_VOL_GET_XML_DESC.num, {
    run: async ({ session }, a: { vol: VolRef; flags: number }) => {
      checkFlags(a.flags, 0, 'storageVolGetXMLDesc');
      return { xml: await session.driver.volXml(await session.driver.volByRef(a.vol), a.flags) };
    },
  }],
  [P.STORAGE_VOL_GET_PATH.num, {
    run: async ({ session }, a: { vol: VolRef }) => ({ name: (await session.driver.volByRef(a.vol)).path }),
  }],
  [P.STORAGE_VOL_RESIZE.num, {
    api: 'virStorageVolResize',
    run: async ({ session }, a: { vol: VolRef; capacity: bigint; flags: number }) => {
      checkFlags(a.flags, 7, 'storageVolResize');
      return session.driver.resizeVol(await session.driver.volByRef(a.vol), a.capacity, a.flags);
    },
  }],
  [P.STORAGE_VOL_WIPE.num, {
    api: 'virStorageVolWipe',
    run: async ({ session }, a: { vol: VolRef; flags: number }) => {
      checkFlags(a.flags, 0, 'storageVolWipePattern');
      return session.driver.wipe(await session.driver.volByRef(a.vol), 0, a.flags);
    },
  }],
  [P.STORAGE_VOL_WIPE_PATTERN.num, {
    api: 'virStorageVolWipePattern',
    run: async ({ session }, a: { vol: VolRef; algorithm: number; flags: number }) => {
      checkFlags(a.flags, 0, 'storageVolWipePattern');
      return session.driver.wipe(await session.driver.volByRef(a.vol), a.algorithm, a.flags);
    },
  }],
  [P.STORAGE_VOL_UPLOAD.num, {
    api: 'virStorageVolUpload',
    run: (call, a: TransferArgs) => call.session.openTransfer(call, 'upload', a),
  }],
  [P.SPARSEVIRT_VOL_CONTENT_DIGEST.num, {
    run: async ({ session }, a: { vol: VolRef; offset: bigint; length: bigint; flags: number }) => {
      checkFlags(a.flags, 0, 'sparsevirtVolContentDigest');
      const vol = await session.driver.volByRef(a.vol);
      // the bytes a download gives: the file's for a dir pool (its physical size), the image's for RBD
      const size = (await session.driver.volInfo(vol, 1 /* GET_PHYSICAL */)).allocation;
      const length = digestRange(size, a.offset, a.length);
      const offset = Number(a.offset);
      if (length === 0) return { algorithm: DIGEST_NAME, digest: new ContentDigest(offset, 0).digest() };
      const reader = await session.driver.openForTransfer(vol, 'download', { offset, length, sparse: true });
      // beside this connection's own transfers, on the background workers (they go first)
      return readerContentDigest(reader, offset, length, { background: session.activeTransfers > 0 });
    },
  }],
  // libvirt refuses downloads on a read-only connection; sparsevirtd allows them (no `api`).
  [P.STORAGE_VOL_DOWNLOAD.num, { run: (call, a: TransferArgs) => call.session.openTransfer(call, 'download', a) }],
]);

for (const [num, h] of SECRET_HANDLERS) HANDLERS.set(num, h);

/** libvirt's checks of `maxnames` in the old list calls, made before anything is looked up. */
function checkMaxnames(maxnames: number, max: number, maxName: string): void {
  if (maxnames > max) throw rpcError(CODE.RPC, `maxnames > ${maxName}`);
  if (maxnames < 0) throw rpcError(CODE.RPC, 'maxnames must be non-negative');
}

/** The first `maxnames` of `names`, `maxnames` checked first. */
function firstNames(names: () => string[], maxnames: number, max: number, maxName: string): string[] {
  checkMaxnames(maxnames, max, maxName);
  return names().slice(0, maxnames);
}

/** Storage pool event callback ids, unique in the process as libvirt's are in its daemon. */
let nextCallbackId = 1;

interface TransferArgs {
  vol: VolRef;
  offset: bigint;
  length: bigint;
  flags: number;
}

let nextSessionId = 1;

export class Session {
  readonly id = nextSessionId++;
  readonly log: Logger;
  private opened = false;
  private readonlyConn = false;
  private openedName: string | null = null;
  private readonly transfers = new Set<Transfer>();
  private readonly reportedOrphans = new Set<string>();
  /** Handlers still running (awaited at shutdown). */
  private inFlight = 0;
  /** This client's storage pool event callbacks: id → event id and the uuid it is limited to. */
  private readonly poolCallbacks = new Map<number, { eventID: number; uuid: string | null }>();
  private stopPoolEvents: (() => void) | null = null;

  constructor(
    readonly peer: Peer,
    readonly ctx: SessionContext,
    log: Logger,
    /** Forced read-only (a read-only listener); a client may also ask with CONNECT_OPEN flag 1. */
    private readonly forceReadonly = false,
    readonly transport: SessionTransport = 'unix',
  ) {
    this.log = log.child({ client: this.id });
    peer.on('call', (m: Message) => this.onCall(m));
    peer.on('orphanStreamPacket', (m: Message) => this.onOrphan(m));
    peer.on('unexpected', (m: Message) => this.onUnexpected(m));
    peer.on('close', () => this.dropPoolEvents());
  }

  get driver(): StorageDriver {
    return this.ctx.driver;
  }

  get readonly(): boolean {
    return this.readonlyConn;
  }

  get uri(): string {
    return this.openedName ? this.openedName : DEFAULT_URI;
  }

  get activeTransfers(): number {
    return this.transfers.size;
  }

  // ------------------------------------------------------------ connection state

  requireOpen(hypervisor: boolean): void {
    if (!this.opened) throw rpcError(CODE.INTERNAL_ERROR, hypervisor ? 'hypervisor connection not open' : 'connection not open');
  }

  open(name: string | null, flags: number): void {
    if (this.opened) throw rpcError(CODE.INTERNAL_ERROR, 'connection already open');
    this.opened = true;
    this.openedName = name;
    this.readonlyConn = this.forceReadonly || (flags & CONNECT_RO) !== 0;
    this.log.debug('connection opened', { name, readonly: this.readonlyConn });
  }

  closeConnection(): void {
    this.opened = false;
    this.dropPoolEvents();
  }

  // ------------------------------------------------------------ storage pool events

  /** CONNECT_STORAGE_POOL_EVENT_REGISTER_ANY: events of one kind, of every pool or of `pool` (by uuid). */
  registerPoolEvents(eventID: number, pool: PoolRef | null): number {
    if (eventID !== PoolEventId.LIFECYCLE && eventID !== PoolEventId.REFRESH) {
      throw rpcError(CODE.INTERNAL_ERROR, `unsupported storage pool event ID ${eventID}`);
    }
    const id = nextCallbackId++;
    this.poolCallbacks.set(id, { eventID, uuid: pool ? pool.uuid.toString('hex') : null });
    this.stopPoolEvents ??= this.driver.onPoolEvent((e) => this.onPoolEvent(e));
    this.log.debug('pool event callback registered', { callbackID: id, eventID, pool: pool?.name ?? null });
    return id;
  }

  deregisterPoolEvents(callbackID: number): void {
    if (!this.poolCallbacks.delete(callbackID)) {
      throw rpcError(CODE.INTERNAL_ERROR, `storage pool event callback ${callbackID} not registered`);
    }
    if (this.poolCallbacks.size === 0) this.dropPoolEvents();
  }

  private dropPoolEvents(): void {
    this.poolCallbacks.clear();
    this.stopPoolEvents?.();
    this.stopPoolEvents = null;
  }

  /**
   * A pool event for each matching callback, as a MESSAGE. Sent on the next turn of the event
   * loop: after the reply to the call that caused it, as libvirtd queues its events.
   */
  private onPoolEvent(e: PoolEvent): void {
    const eventID = e.kind === 'lifecycle' ? PoolEventId.LIFECYCLE : PoolEventId.REFRESH;
    const uuid = e.pool.uuidBytes;
    const hex = uuid.toString('hex');
    const ids: number[] = [];
    for (const [id, cb] of this.poolCallbacks) if (cb.eventID === eventID && (cb.uuid === null || cb.uuid === hex)) ids.push(id);
    if (ids.length === 0) return;
    const pool = { name: e.pool.name, uuid };
    setImmediate(() => {
      for (const callbackID of ids) {
        if (this.peer.closed || !this.poolCallbacks.has(callbackID)) continue;
        const payload = e.kind === 'lifecycle'
          ? encode(P.STORAGE_POOL_EVENT_LIFECYCLE.args, { callbackID, pool, event: e.event, detail: e.detail })
          : encode(P.STORAGE_POOL_EVENT_REFRESH.args, { callbackID, pool });
        const proc = e.kind === 'lifecycle' ? P.STORAGE_POOL_EVENT_LIFECYCLE.num : P.STORAGE_POOL_EVENT_REFRESH.num;
        this.peer.sendFrame({ prog: REMOTE_PROGRAM, vers: REMOTE_VERSION, proc, type: MessageType.MESSAGE, serial: EVENT_SERIAL, status: Status.OK }, payload);
      }
    });
  }

  // ------------------------------------------------------------ dispatch

  private onCall(m: Message): void {
    try {
      this.dispatch(m);
    } catch (err) {
      // dispatch handles its own errors; this is the last line of defence.
      this.log.error('dispatch failed', { error: (err as Error).message });
    }
  }

  private dispatch(m: Message): void {
    if (m.prog !== REMOTE_PROGRAM || m.vers !== REMOTE_VERSION) {
      return this.replyError(m, rpcError(CODE.RPC, `Cannot find program ${m.prog >>> 0} version ${m.vers >>> 0}`));
    }
    if (m.type !== MessageType.CALL) {
      return this.replyError(m, rpcError(CODE.RPC, 'file descriptor passing is not supported by sparsevirtd'));
    }
    if (m.status !== Status.OK) {
      return this.replyError(m, rpcError(CODE.RPC, `Unexpected message status ${m.status}`));
    }
    const proc = PROCEDURES_BY_NUM.get(m.proc) as Procedure<unknown, unknown> | undefined;
    const handler = HANDLERS.get(m.proc);
    if (!proc || !handler) return this.replyError(m, rpcError(CODE.RPC, `unknown procedure: ${m.proc}`));
    let args: unknown;
    try {
      args = proc.args.dec(new XdrReader(m.payload));
    } catch {
      return this.replyError(m, rpcError(CODE.RPC, 'Unable to decode message payload'));
    }
    const call: Call = { session: this, msg: m };
    let result: unknown;
    try {
      if (!handler.beforeOpen) this.requireOpen(handler.hypervisor === true);
      // The protocol table marks what libvirt refuses on a read-only connection; downloads are
      // allowed here (libvirt refuses them too; reading is what read-only is for).
      if (this.readonlyConn && proc.writes && proc.num !== P.STORAGE_VOL_DOWNLOAD.num) throw readOnlyError(handler.api ?? proc.name);
      result = handler.run(call, args);
    } catch (err) {
      return this.replyError(m, toRemoteError(err));
    }
    if (result instanceof Promise) {
      this.inFlight++;
      result.then(
        (value) => this.replyOk(call, proc, value),
        (err) => this.replyError(m, toRemoteError(err)),
      ).finally(() => this.inFlight--);
    } else {
      this.replyOk(call, proc, result);
    }
  }

  private replyOk(call: Call, proc: Procedure<unknown, unknown>, value: unknown): void {
    try {
      this.peer.reply(call.msg, proc.ret, value);
    } catch (err) {
      // A value our own codec refuses (a bug): report it rather than leave the call hanging.
      this.log.error('cannot encode reply', { proc: proc.name, error: (err as Error).message });
      this.replyError(call.msg, toRemoteError(err));
      return;
    }
    call.after?.();
  }

  private replyError(m: Message, err: SparsevirtError): void {
    const remote = toRemoteError(err);
    if (this.log.enabled('debug')) this.log.debug('call failed', { proc: m.proc, serial: m.serial, code: remote.virCode, error: remote.message.slice(0, 1000) });
    try {
      this.peer.replyError(m, remote.toFields());
    } catch {
      // An error record our codec refuses (a huge echoed name…): send a short one instead.
      this.peer.replyError(m, rpcError(CODE.INTERNAL_ERROR, `procedure ${m.proc} failed (error message too large to send)`).toFields());
    }
  }

  /** A stream packet for a (proc, serial) with no stream: tell the client once, clearly. */
  private onOrphan(m: Message): void {
    const key = `${m.proc}:${m.serial}`;
    if (this.reportedOrphans.has(key)) return;
    if (this.reportedOrphans.size > 256) this.reportedOrphans.clear();
    this.reportedOrphans.add(key);
    const err = virError(CODE.RPC, DOMAIN.STREAMS, `no stream is open for procedure ${m.proc} serial ${m.serial}: packet ignored`);
    this.log.warn('stream packet without a stream', { proc: m.proc, serial: m.serial, type: m.type, status: m.status });
    this.peer.sendFrame({ prog: m.prog, vers: m.vers, proc: m.proc, type: MessageType.STREAM, serial: m.serial, status: Status.ERROR }, encodeRemoteError(err.toFields()));
  }

  /** A REPLY (or other message a server never expects) from the client: libvirt answers with an RPC error. */
  private onUnexpected(m: Message): void {
    this.replyError(m, rpcError(CODE.RPC, `Unexpected message type ${m.type}`));
  }

  // ------------------------------------------------------------ streams

  async openTransfer(call: Call, kind: 'upload' | 'download', a: TransferArgs): Promise<void> {
    const fn = kind === 'upload' ? 'storageVolUpload' : 'storageVolDownload';
    checkFlags(a.flags, SPARSE_STREAM, fn);
    const m = call.msg;
    // A second CALL on the serial of a stream in flight: refused before anything is opened, and
    // the stream already there goes on undisturbed.
    const busy = () => rpcError(CODE.RPC, `a stream is already open for procedure ${m.proc} serial ${m.serial}`);
    if (this.peer.hasStream(m.proc, m.serial)) throw busy();
    const vol = await this.driver.volByRef(a.vol);
    if (a.offset > BigInt(Number.MAX_SAFE_INTEGER)) {
      if (kind === 'upload') throw storageError(CODE.INVALID_ARG, `offset ${a.offset} is larger than sparsevirtd supports (2^53)`);
    }
    const offset = a.offset > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(a.offset);
    const length = transferLength(a.length);
    const sparse = (a.flags & SPARSE_STREAM) !== 0;
    const end = kind === 'upload'
      ? { kind, writer: await this.driver.openForTransfer(vol, kind, { offset, length }) } as const
      : { kind, reader: await this.driver.openForTransfer(vol, kind, { offset, length, sparse }) } as const;
    let transfer: Transfer;
    try {
      if (this.peer.closed) throw new SparsevirtError('ERR_CONNECTION_CLOSED', 'connection closed');
      if (this.peer.hasStream(m.proc, m.serial)) throw busy(); // opened while we looked the volume up
      this.ctx.admitTransfer?.(this.transfers.size); // no await from here to transfers.add: the count is exact
      const wire = this.peer.openStream(m.proc, m.serial, { sparse, sending: kind === 'download' });
      transfer = new Transfer({ end, vol, wire, offset, length, sparse, log: this.log });
    } catch (err) {
      await (end.kind === 'upload' ? end.writer : end.reader).close().catch(() => undefined);
      throw err;
    }
    this.transfers.add(transfer);
    call.after = () => {
      void transfer.run().finally(() => {
        this.transfers.delete(transfer);
        if (kind === 'upload') this.driver.uploadEnded(vol.pool);
      });
    };
  }

  /** Daemon shutdown: every stream in flight gets a STREAM/ERROR; resolves when all ended. */
  async stopTransfers(): Promise<void> {
    const err = virError(CODE.OPERATION_FAILED, DOMAIN.STREAMS, 'sparsevirtd is shutting down');
    const running = [...this.transfers];
    for (const t of running) t.abort(err);
    const deadline = Date.now() + 5000;
    while (this.transfers.size > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
  }

  /** Handlers still running. */
  get pendingCalls(): number {
    return this.inFlight;
  }
}
