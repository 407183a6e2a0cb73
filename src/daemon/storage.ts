/**
 * The storage driver: the pool registry and its persistence (state.ts), pool events, the pool and
 * volume XML, and libvirt's semantics and error codes (states, flags, duplicate checks, transient
 * pools), above one backend per pool type (backend.ts, backends/). An operation the pool's
 * backend does not have is answered with libvirt's VIR_ERR_NO_SUPPORT, as libvirt does for a
 * backend's NULL callback.
 */
import { randomUUID } from 'node:crypto';
import type { RemoteError } from '../errors.js';
import {
  ListPoolsFlags, ListPoolsTypeFlags, POOL_TYPES, PoolCreateFlags, PoolLifecycle, PoolState, VolCreateFlags, VolResizeFlags, WipeAlgorithm,
} from '../protocol/remote.js';
import {
  Pool, backendFor, registeredBackends,
  type BackendContext, type PoolBackend, type PoolDef, type PoolStats, type ReadOptions, type Volume, type VolumeReader, type VolumeWriter, type WriteOptions,
} from './backend.js';
import './backends/index.js';
import { CODE, checkFlags, storageError, systemError } from './errors.js';
import type { Logger } from './log.js';
import { PoolStore, type PoolRecord } from './state.js';
import { SecretStore } from './secrets.js';
import { formatPoolCapabilities, formatPoolXml, parsePoolXml, parseVolXml, sanitizePath } from './xml.js';

export { Pool, type PoolStats, type VolInfo, type Volume } from './backend.js';
export { isValidVolName } from './backends/dir.js';

/** libvirt's messages for an operation a backend does not have. */
const NO_SUPPORT: Record<string, string> = {
  deletePool: 'pool does not support pool deletion',
  createVol: 'storage pool does not support volume creation',
  createVolFrom: 'storage pool does not support volume creation from an existing volume',
  deleteVol: 'storage pool does not support vol deletion',
  resizeVol: 'storage pool does not support changing of volume capacity',
  wipeVol: 'storage pool doesn\'t support volume wiping',
  upload: 'storage pool doesn\'t support volume upload',
  download: 'storage pool doesn\'t support volume download',
};

function noSupport(op: keyof typeof NO_SUPPORT): RemoteError {
  return storageError(CODE.NO_SUPPORT, NO_SUPPORT[op]!);
}

function uuidString(b: Buffer): string {
  const h = b.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

function backendOf(pool: Pool): PoolBackend {
  const b = backendFor(pool.type);
  if (!b) throw storageError(CODE.INTERNAL_ERROR, `missing backend for pool type ${pool.type}`);
  return b;
}

/** The backend of a definition's type; libvirt's refusals of the definition. */
function checkedBackend(def: PoolDef): PoolBackend {
  const b = backendFor(def.type);
  if (!b) {
    const have = registeredBackends().map((x) => `'${x.type}'`).join(', ');
    throw storageError(CODE.CONFIG_UNSUPPORTED, `sparsevirtd supports only ${have} storage pools, not '${def.type}'`);
  }
  b.checkDefinition(def);
  return b;
}

/** What the driver tells its listeners (the sessions' storage pool event callbacks). */
export type PoolEvent =
  | { kind: 'lifecycle'; pool: Pool; event: number; detail: number }
  | { kind: 'refresh'; pool: Pool };

export interface StorageDriverOptions {
  stateDir: string;
  log: Logger;
}

/** A volume opened for a stream: a download's reader or an upload's writer. */
function defOfRecord(rec: PoolRecord): PoolDef {
  return {
    type: rec.type, name: rec.name, uuid: rec.uuid, target: rec.target === '' ? null : rec.target, mode: rec.mode,
    source: rec.source ?? { hosts: [], name: null, auth: null }, configOpts: rec.configOpts ?? [],
  };
}
export class StorageDriver {
  readonly store: PoolStore;
  readonly secrets: SecretStore;
  private readonly log: Logger;
  private readonly pools = new Map<string, Pool>();
  private readonly listeners = new Set<(e: PoolEvent) => void>();
  /** What this daemon's backends calls get: its own secrets. */
  private readonly backendCtx: BackendContext;

  constructor(opts: StorageDriverOptions) {
    this.store = new PoolStore(opts.stateDir);
    this.log = opts.log;
    const secrets = new SecretStore(opts.stateDir, (file, err) => this.log.error('secret file unreadable, skipped', { file, error: (err as Error).message }));
    this.secrets = secrets;
    this.backendCtx = { lookupSecretValue: (ref, usageType) => secrets.lookupValue(ref, usageType) };
  }

  /**
   * Load the persisted pools, create the `default` pool in a fresh state directory (if
   * `defaultPoolTarget` is given), and start the pools that were running or are autostart.
   */
  async init(opts: { defaultPoolTarget?: string } = {}): Promise<void> {
    const fresh = await this.store.init();
    const records = await this.store.load((file, err) => {
      this.log.error('pool state file unreadable, skipped', { file, error: (err as Error).message });
    });
    for (const rec of records) {
      if (this.pools.has(rec.name)) continue;
      if (!backendFor(rec.type)) {
        this.log.error('pool of a type sparsevirtd has no backend for, skipped', { pool: rec.name, type: rec.type });
        continue;
      }
      const pool = new Pool(defOfRecord(rec), rec.uuid);
      pool.autostart = rec.autostart;
      pool.active = false;
      this.pools.set(pool.name, pool);
      if (rec.active || rec.autostart) {
        try {
          await this.start(pool, 0, { save: false });
          this.log.info('pool started', { pool: pool.name, reason: rec.active ? 'was running' : 'autostart' });
        } catch (err) {
          this.log.warn('pool could not be started', { pool: pool.name, error: (err as Error).message });
        }
      }
    }
    if (fresh && opts.defaultPoolTarget && !this.pools.has('default')) {
      await this.createDefaultPool(opts.defaultPoolTarget);
    }
  }

  private async createDefaultPool(target: string): Promise<void> {
    const xml = `<pool type='dir'>\n  <name>default</name>\n  <target>\n    <path>${target}</path>\n  </target>\n</pool>\n`;
    const pool = await this.define(xml, 0);
    await this.build(pool, 0);
    await this.start(pool, 0);
    await this.setAutostart(pool, true);
    this.log.info('default pool created', { pool: 'default', target });
  }

  /** Listen to pool events; returns the function that stops listening. */
  onPoolEvent(fn: (e: PoolEvent) => void): () => void {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  private lifecycle(pool: Pool, event: number): void {
    this.emit({ kind: 'lifecycle', pool, event, detail: 0 });
  }

  private emit(e: PoolEvent): void {
    for (const fn of this.listeners) {
      try {
        fn(e);
      } catch (err) {
        this.log.error('pool event listener failed', { pool: e.pool.name, error: (err as Error).message });
      }
    }
  }

  /**
   * An upload into a volume of `pool` ended (either way): libvirt refreshes the pool then and
   * tells the pool's refresh listeners.
   */
  uploadEnded(pool: Pool): void {
    if (this.pools.get(pool.name) !== pool || !pool.active) return;
    this.emit({ kind: 'refresh', pool });
  }

  private record(pool: Pool): PoolRecord {
    const { def } = pool;
    return {
      version: 1, name: pool.name, uuid: pool.uuid, type: def.type, target: def.target ?? '', mode: def.mode,
      ...(def.type !== 'dir' ? { source: def.source } : {}), ...(def.configOpts.length > 0 ? { configOpts: def.configOpts } : {}),
      autostart: pool.autostart, active: pool.active,
    };
  }

  /** Persist the pool's current state; saves of one pool run in order. A transient pool has nothing to save. */
  private persist(pool: Pool): Promise<void> {
    if (!pool.persistent) return Promise.resolve();
    const next = pool.saving.catch(() => undefined).then(async () => {
      if (this.pools.get(pool.name) !== pool) return; // undefined meanwhile
      try {
        await this.store.save(this.record(pool));
      } catch (err) {
        throw systemError(`cannot save the state of pool '${pool.name}' in '${this.store.dir}'`, err);
      }
    });
    pool.saving = next;
    return next;
  }

  // ================================================================= pools

  listPools(flags: number): Pool[] {
    checkFlags(flags, (1 << 20) - 1, 'storageConnectListAllStoragePools');
    const F = ListPoolsFlags;
    return [...this.pools.values()]
      .filter((p) => {
        if (flags & (F.ACTIVE | F.INACTIVE)) {
          if (!((flags & F.ACTIVE && p.active) || (flags & F.INACTIVE && !p.active))) return false;
        }
        if (flags & (F.PERSISTENT | F.TRANSIENT)) {
          if (!((flags & F.PERSISTENT && p.persistent) || (flags & F.TRANSIENT && !p.persistent))) return false;
        }
        if (flags & (F.AUTOSTART | F.NO_AUTOSTART)) {
          if (!((flags & F.AUTOSTART && p.autostart) || (flags & F.NO_AUTOSTART && !p.autostart))) return false;
        }
        const typeBits = flags & ~((1 << 6) - 1);
        if (typeBits !== 0 && !(typeBits & ((Object.hasOwn(ListPoolsTypeFlags, p.type) && ListPoolsTypeFlags[p.type]) || 0))) return false;
        return true;
      })
      .sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  }

  poolByName(name: string): Pool {
    const p = this.pools.get(name);
    if (!p) throw storageError(CODE.NO_STORAGE_POOL, `no storage pool with matching name '${name}'`);
    return p;
  }

  poolByUuid(uuid: Buffer): Pool {
    const want = uuidString(uuid);
    for (const p of this.pools.values()) if (p.uuid === want) return p;
    throw storageError(CODE.NO_STORAGE_POOL, `no storage pool with matching uuid '${want}'`);
  }

  /** STORAGE_POOL_LOOKUP_BY_TARGET_PATH: the running pool whose target is `p` (sanitized). */
  poolByTargetPath(p: string): Pool {
    const clean = sanitizePath(p);
    for (const pool of this.pools.values()) if (pool.active && pool.def.target !== null && pool.target === clean) return pool;
    throw storageError(CODE.NO_STORAGE_POOL, clean === p
      ? `no storage pool with matching target path '${p}'`
      : `no storage pool with matching target path '${p}' (${clean})`);
  }

  /**
   * CONNECT_FIND_STORAGE_POOL_SOURCES: libvirt's dir pools have nothing to discover; sparsevirtd
   * discovers no other kind either.
   */
  findPoolSources(type: string, flags: number): never {
    checkFlags(flags, 0, 'storageConnectFindStoragePoolSources');
    if (!POOL_TYPES.includes(type)) throw storageError(CODE.INTERNAL_ERROR, `unknown storage pool type ${type}`);
    throw storageError(CODE.NO_SUPPORT, `pool type '${type}' does not support source discovery`);
  }

  /** Names of the running (`active`) or inactive pools, sorted (CONNECT_LIST_(DEFINED_)STORAGE_POOLS). */
  poolNames(active: boolean): string[] {
    return this.listPools(active ? ListPoolsFlags.ACTIVE : ListPoolsFlags.INACTIVE).map((p) => p.name);
  }

  /** A pool reference from the wire: libvirt resolves it by UUID. */
  poolByRef(ref: { name: string; uuid: Buffer }): Pool {
    const want = uuidString(ref.uuid);
    for (const p of this.pools.values()) if (p.uuid === want) return p;
    throw storageError(CODE.NO_STORAGE_POOL, `no storage pool with matching uuid '${want}' (${ref.name})`);
  }

  private requireActive(pool: Pool): void {
    if (!pool.active) throw storageError(CODE.OPERATION_INVALID, `storage pool '${pool.name}' is not active`);
  }

  private requireInactive(pool: Pool, word: 'already' | 'still'): void {
    if (pool.active) throw storageError(CODE.OPERATION_INVALID, `storage pool '${pool.name}' is ${word} active`);
  }

  /**
   * libvirt's duplicate checks for a new definition: the same uuid under another name, the same
   * name with another uuid (a definition without a uuid gets a new one), another pool on the
   * same target. Returns the pool of the same name and uuid, if there is one.
   */
  private checkDuplicate(def: PoolDef, backend: PoolBackend): Pool | undefined {
    const existing = this.pools.get(def.name);
    if (existing) {
      if (def.uuid === null || def.uuid !== existing.uuid) {
        throw storageError(CODE.OPERATION_FAILED, `pool '${def.name}' already exists with uuid ${existing.uuid}`);
      }
    }
    if (def.uuid !== null) {
      for (const p of this.pools.values()) {
        if (p.uuid === def.uuid && p.name !== def.name) {
          throw storageError(CODE.OPERATION_FAILED, `pool '${p.name}' is already defined with uuid ${p.uuid}`);
        }
      }
    }
    for (const p of this.pools.values()) {
      if (p.name !== def.name && p.type === def.type && backend.sameSource(p.def, def)) {
        throw storageError(CODE.OPERATION_FAILED, `Storage source conflict with pool: '${p.name}'`);
      }
    }
    return existing;
  }

  async define(xml: string, flags: number): Promise<Pool> {
    checkFlags(flags, 1 /* VALIDATE */, 'storagePoolDefineXML');
    const def = parsePoolXml(xml);
    const backend = checkedBackend(def);
    const existing = this.checkDuplicate(def, backend);
    if (existing) {
      // Redefinition of the same pool (same name and uuid): takes effect now if inactive; a
      // running transient pool becomes persistent.
      if (existing.type !== def.type) throw storageError(CODE.OPERATION_FAILED, `pool '${def.name}' is already defined with type ${existing.type}`);
      const was = { def: existing.def, persistent: existing.persistent };
      if (!existing.active) existing.def = { ...def, uuid: existing.uuid };
      existing.persistent = true;
      try {
        await this.persist(existing);
      } catch (err) {
        Object.assign(existing, was);
        throw err;
      }
      this.lifecycle(existing, PoolLifecycle.DEFINED);
      return existing;
    }
    const pool = new Pool(def, def.uuid ?? randomUUID());
    this.pools.set(pool.name, pool);
    try {
      await this.persist(pool);
    } catch (err) {
      this.pools.delete(pool.name);
      throw err;
    }
    this.log.info('pool defined', { pool: pool.name, target: pool.target });
    this.lifecycle(pool, PoolLifecycle.DEFINED);
    return pool;
  }

  /**
   * STORAGE_POOL_CREATE_XML: a transient pool, started at once (built first if asked), never
   * saved; it is gone once stopped.
   */
  async createTransient(xml: string, flags: number): Promise<Pool> {
    const F = PoolCreateFlags;
    checkFlags(flags, F.WITH_BUILD | F.WITH_BUILD_OVERWRITE | F.WITH_BUILD_NO_OVERWRITE, 'storagePoolCreateXML');
    const def = parsePoolXml(xml);
    const backend = checkedBackend(def);
    const existing = this.checkDuplicate(def, backend);
    if (existing) {
      // the same name and uuid as a defined pool: that pool is started
      if (existing.active) throw storageError(CODE.OPERATION_INVALID, `pool is already active as '${existing.name}'`);
      await this.start(existing, flags);
      return existing;
    }
    const pool = new Pool(def, def.uuid ?? randomUUID());
    pool.persistent = false;
    this.pools.set(pool.name, pool);
    try {
      if (flags) await this.buildTarget(pool, buildFlagsOf(flags));
      await backend.start(pool, this.backendCtx);
    } catch (err) {
      if (this.pools.get(pool.name) === pool) this.pools.delete(pool.name);
      throw err;
    }
    pool.active = true;
    this.log.info('transient pool started', { pool: pool.name, target: pool.target });
    this.lifecycle(pool, PoolLifecycle.STARTED);
    return pool;
  }

  /** STORAGE_POOL_BUILD */
  async build(pool: Pool, flags: number): Promise<void> {
    await this.buildTarget(pool, flags);
    this.lifecycle(pool, PoolLifecycle.CREATED);
  }

  private async buildTarget(pool: Pool, flags: number): Promise<void> {
    this.requireInactive(pool, 'already');
    const backend = backendOf(pool);
    if (!backend.build) return; // (libvirt: nothing to build for such a pool)
    await backend.build(pool, flags);
    this.log.info('pool built', { pool: pool.name, type: pool.type });
  }

  async start(pool: Pool, flags: number, opts: { save?: boolean } = {}): Promise<void> {
    const F = PoolCreateFlags;
    checkFlags(flags, F.WITH_BUILD | F.WITH_BUILD_OVERWRITE | F.WITH_BUILD_NO_OVERWRITE, 'storagePoolCreate');
    this.requireInactive(pool, 'already');
    if (flags) await this.buildTarget(pool, buildFlagsOf(flags));
    const backend = backendOf(pool);
    await backend.start(pool, this.backendCtx);
    pool.active = true;
    if (opts.save !== false) {
      try {
        await this.persist(pool);
      } catch (err) {
        pool.active = false;
        await backend.stop(pool).catch(() => undefined);
        throw err;
      }
    }
    this.lifecycle(pool, PoolLifecycle.STARTED);
  }

  async destroy(pool: Pool): Promise<void> {
    this.requireActive(pool);
    pool.active = false;
    try {
      await this.persist(pool);
    } catch (err) {
      pool.active = true;
      throw err;
    }
    await backendOf(pool).stop(pool).catch((err) => {
      this.log.warn('pool backend failed to stop', { pool: pool.name, error: (err as Error).message });
    });
    this.stopped(pool);
  }

  /** A pool just stopped: tell the listeners; a transient pool is gone with it. */
  private stopped(pool: Pool): void {
    this.lifecycle(pool, PoolLifecycle.STOPPED);
    if (!pool.persistent && this.pools.get(pool.name) === pool) {
      this.pools.delete(pool.name);
      this.log.info('transient pool removed', { pool: pool.name });
    }
  }

  /** STORAGE_POOL_DELETE: the backend removes the pool's storage (dir: the empty target directory). */
  async deletePool(pool: Pool, flags: number): Promise<void> {
    this.requireInactive(pool, 'still');
    const backend = backendOf(pool);
    if (!backend.deletePool) throw noSupport('deletePool');
    await backend.deletePool(pool, flags);
    this.lifecycle(pool, PoolLifecycle.DELETED);
  }

  async undefine(pool: Pool): Promise<void> {
    this.requireInactive(pool, 'still');
    if (this.pools.get(pool.name) !== pool) return;
    this.pools.delete(pool.name);
    await pool.saving.catch(() => undefined);
    try {
      await this.store.remove(pool.name);
    } catch (err) {
      this.pools.set(pool.name, pool);
      throw systemError(`cannot remove config file for pool '${pool.name}'`, err);
    }
    this.log.info('pool undefined', { pool: pool.name });
    this.lifecycle(pool, PoolLifecycle.UNDEFINED);
  }

  async refresh(pool: Pool, flags: number): Promise<void> {
    checkFlags(flags, 0, 'storagePoolRefresh');
    this.requireActive(pool);
    const backend = backendOf(pool);
    try {
      await backend.refresh(pool);
    } catch (err) {
      // libvirt stops a pool whose refresh fails.
      pool.active = false;
      await this.persist(pool).catch(() => undefined);
      await backend.stop(pool).catch(() => undefined);
      this.stopped(pool);
      throw err;
    }
    this.emit({ kind: 'refresh', pool });
  }

  async setAutostart(pool: Pool, on: boolean): Promise<void> {
    if (!pool.persistent) throw storageError(CODE.INTERNAL_ERROR, 'pool has no config file');
    if (pool.autostart === on) return;
    pool.autostart = on;
    try {
      await this.persist(pool);
    } catch (err) {
      pool.autostart = !on;
      throw err;
    }
  }

  async poolInfo(pool: Pool): Promise<{ state: number; capacity: bigint; allocation: bigint; available: bigint }> {
    if (!pool.active) return { state: PoolState.INACTIVE, ...pool.stats };
    await this.updateStats(pool);
    return { state: PoolState.RUNNING, ...pool.stats };
  }

  async poolXml(pool: Pool, flags: number): Promise<string> {
    checkFlags(flags, 1 /* INACTIVE */, 'storagePoolGetXMLDesc');
    if (pool.active) await this.updateStats(pool).catch(() => undefined);
    // (INACTIVE: the persistent definition, which is the running one but for a redefinition meanwhile)
    return formatPoolXml({ def: pool.def, uuid: pool.uuid, ...pool.stats, perms: pool.perms });
  }

  /** The pool's sizes as its storage has them now, where the backend has them cheaply (dir: its filesystem's). */
  private async updateStats(pool: Pool): Promise<PoolStats> {
    const backend = backendOf(pool);
    if (backend.updateStats) await backend.updateStats(pool);
    return pool.stats;
  }

  /** CONNECT_GET_STORAGE_POOL_CAPABILITIES */
  poolCapabilities(flags: number): string {
    checkFlags(flags, 0, 'storageConnectGetStoragePoolCapabilities');
    return formatPoolCapabilities(registeredBackends());
  }


  // ================================================================= volumes

  /** Names of the volumes of an active pool, sorted. */
  async listVolumes(pool: Pool, flags = 0): Promise<string[]> {
    checkFlags(flags, 0, 'storagePoolListAllVolumes');
    this.requireActive(pool);
    return backendOf(pool).listVolumes(pool);
  }

  /** A volume of an active pool by name; code 50 when there is none. */
  async volByName(pool: Pool, name: string): Promise<Volume> {
    this.requireActive(pool);
    return backendOf(pool).lookupVolume(pool, name);
  }

  /** A volume reference from the wire: pool by name (must be active), then the volume by name. */
  async volByRef(ref: { pool: string; name: string; key: string }): Promise<Volume> {
    return this.volByName(this.poolByName(ref.pool), ref.name);
  }

  /** The pool of a volume reference (STORAGE_POOL_LOOKUP_BY_VOLUME). */
  poolOfVol(ref: { pool: string }): Pool {
    const pool = this.poolByName(ref.pool);
    this.requireActive(pool);
    return pool;
  }

  private async volByKeyOrPath(p: string): Promise<Volume | null> {
    for (const pool of this.listPools(0)) {
      if (!pool.active) continue;
      const v = await backendOf(pool).findVolume?.(pool, p);
      if (v) return v;
    }
    return null;
  }

  async volByKey(key: string): Promise<Volume> {
    const v = await this.volByKeyOrPath(key);
    if (!v) throw storageError(CODE.NO_STORAGE_VOL, `no storage vol with matching key ${key}`);
    return v;
  }

  async volByPath(p: string): Promise<Volume> {
    const v = await this.volByKeyOrPath(sanitizePath(p));
    if (!v) throw storageError(CODE.NO_STORAGE_VOL, `no storage vol with matching path '${p}'`);
    return v;
  }

  /** STORAGE_VOL_CREATE_XML */
  async createVol(pool: Pool, xml: string, flags: number): Promise<Volume> {
    checkFlags(flags, VolCreateFlags.PREALLOC_METADATA | VolCreateFlags.REFLINK | 4 /* VALIDATE */, 'storageVolCreateXML');
    this.requireActive(pool);
    const backend = backendOf(pool);
    const def = parseVolXml(xml);
    if (!backend.createVolume) throw noSupport('createVol');
    const vol = await backend.createVolume(pool, def, flags);
    this.log.info('volume created', { pool: pool.name, vol: def.name, format: def.format ?? 'default', capacity: def.capacity, allocation: def.allocation ?? null });
    return vol;
  }

  /**
   * STORAGE_VOL_CREATE_XML_FROM (vol-clone, vol-create-from): a new volume with the content of
   * `src`, which may be in another pool, of another type. The capacity may be left out (the
   * source's).
   */
  async createVolFrom(pool: Pool, xml: string, srcRef: { pool: string; name: string }, flags: number): Promise<Volume> {
    checkFlags(flags, VolCreateFlags.PREALLOC_METADATA | VolCreateFlags.REFLINK, 'storageVolCreateXMLFrom');
    let srcPool = pool;
    if (srcRef.pool !== pool.name) {
      const other = this.pools.get(srcRef.pool);
      if (!other) throw storageError(CODE.NO_STORAGE_POOL, `no storage pool with matching name '${srcRef.pool}'`);
      srcPool = other;
    }
    this.requireActive(pool);
    this.requireActive(srcPool);
    const srcBackend = backendOf(srcPool);
    const src = await srcBackend.lookupVolume(srcPool, srcRef.name);
    const def = parseVolXml(xml, { capacityOptional: true });
    const backend = backendOf(pool);
    if (!backend.createVolumeFrom) throw noSupport('createVolFrom');
    const info = await srcBackend.volumeInfo(src);
    const vol = await backend.createVolumeFrom(pool, def, {
      vol: src, info,
      openRead: (o: ReadOptions) => {
        if (!srcBackend.openRead) throw noSupport('download');
        return srcBackend.openRead(src, o);
      },
    }, flags);
    this.log.info('volume cloned', { pool: pool.name, vol: def.name, from: `${srcPool.name}/${src.name}` });
    return vol;
  }

  async deleteVol(vol: Volume, flags: number): Promise<void> {
    const ZEROED = 1;
    const WITH_SNAPSHOTS = 2;
    checkFlags(flags, ZEROED | WITH_SNAPSHOTS, 'virStorageBackendVolDeleteLocal');
    const backend = backendOf(vol.pool);
    if (!backend.deleteVolume) throw noSupport('deleteVol');
    if (flags & ZEROED) await this.wipe(vol, WipeAlgorithm.ZERO, 0);
    await backend.deleteVolume(vol, flags);
    this.log.info('volume deleted', { pool: vol.pool.name, vol: vol.name });
  }

  /** STORAGE_VOL_GET_INFO(_FLAGS): with GET_PHYSICAL, the physical size in place of the allocation. */
  async volInfo(vol: Volume, flags = 0): Promise<{ type: number; capacity: bigint; allocation: bigint }> {
    checkFlags(flags, 1 /* GET_PHYSICAL */, 'storageVolGetInfoFlags');
    const info = await backendOf(vol.pool).volumeInfo(vol);
    return { type: info.type, capacity: info.capacity, allocation: flags & 1 ? info.physical : info.allocation };
  }

  async volXml(vol: Volume, flags: number): Promise<string> {
    checkFlags(flags, 0, 'storageVolGetXMLDesc');
    return backendOf(vol.pool).volumeXml(vol);
  }

  /** STORAGE_VOL_RESIZE with libvirt's checks and messages (storageVolResize). */
  async resizeVol(vol: Volume, capacity: bigint, flags: number): Promise<void> {
    checkFlags(flags, VolResizeFlags.ALLOCATE | VolResizeFlags.DELTA | VolResizeFlags.SHRINK, 'storageVolResize');
    const backend = backendOf(vol.pool);
    const info = await backend.volumeInfo(vol);
    const cur = info.capacity;
    let abs: bigint;
    if (flags & VolResizeFlags.DELTA) {
      abs = flags & VolResizeFlags.SHRINK ? cur - (capacity < cur ? capacity : cur) : cur + capacity;
    } else {
      abs = capacity;
    }
    if (abs < info.allocation) throw storageError(CODE.INVALID_ARG, "can't shrink capacity below existing allocation");
    if (abs < cur && !(flags & VolResizeFlags.SHRINK)) {
      throw storageError(CODE.INVALID_ARG, "Can't shrink capacity below current capacity unless shrink flag explicitly specified");
    }
    if (abs > BigInt(Number.MAX_SAFE_INTEGER)) {
      throw storageError(CODE.OPERATION_UNSUPPORTED, `capacity ${abs} is larger than sparsevirtd supports (2^53 bytes)`);
    }
    if (flags & VolResizeFlags.ALLOCATE && abs > cur) {
      const stats = await this.updateStats(vol.pool);
      if (abs - info.allocation > stats.available) throw storageError(CODE.OPERATION_FAILED, 'Not enough space left in storage pool');
    }
    if (!backend.resizeVolume) throw noSupport('resizeVol');
    await backend.resizeVolume(vol, abs, flags & ~VolResizeFlags.DELTA);
  }

  /**
   * STORAGE_VOL_WIPE(_PATTERN): ZERO and RANDOM; the scrub(1) patterns and TRIM are refused, as
   * libvirt does without scrub.
   */
  async wipe(vol: Volume, algorithm: number, flags: number): Promise<void> {
    checkFlags(flags, 0, 'storageVolWipePattern');
    const names = ['zero', 'nnsa', 'dod', 'bsi', 'gutmann', 'schneier', 'pfitzner7', 'pfitzner33', 'random', 'trim'];
    if (algorithm >= names.length) throw storageError(CODE.INVALID_ARG, `wiping algorithm ${algorithm} not supported`);
    const backend = backendOf(vol.pool);
    if (!backend.wipeVolume) throw noSupport('wipeVol');
    if (algorithm !== WipeAlgorithm.ZERO && algorithm !== WipeAlgorithm.RANDOM) {
      throw storageError(CODE.ARGUMENT_UNSUPPORTED, `'${names[algorithm]}' algorithm not supported`);
    }
    await backend.wipeVolume(vol, algorithm, flags);
    this.log.info('volume wiped', { pool: vol.pool.name, vol: vol.name, algorithm: names[algorithm] });
  }

  /** Open a volume for a stream: an upload writes into it (never creates or truncates), a download reads it. */
  async openForTransfer(vol: Volume, kind: 'upload', o: WriteOptions): Promise<VolumeWriter>;
  async openForTransfer(vol: Volume, kind: 'download', o: ReadOptions): Promise<VolumeReader>;
  async openForTransfer(vol: Volume, kind: 'upload' | 'download', o: WriteOptions | ReadOptions): Promise<VolumeWriter | VolumeReader> {
    const backend = backendOf(vol.pool);
    if (kind === 'upload') {
      if (!backend.openWrite) throw noSupport('upload');
      return backend.openWrite(vol, o);
    }
    if (!backend.openRead) throw noSupport('download');
    return backend.openRead(vol, o as ReadOptions);
  }
}

/** STORAGE_POOL_CREATE(_XML)'s build flags as STORAGE_POOL_BUILD's: overwrite wins, as in libvirt. */
function buildFlagsOf(createFlags: number): number {
  if (createFlags & PoolCreateFlags.WITH_BUILD_OVERWRITE) return 8;
  return createFlags & PoolCreateFlags.WITH_BUILD_NO_OVERWRITE ? 4 : 0;
}
